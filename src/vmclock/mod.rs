//! The whole vmclock structure (`include/uapi/linux/vmclock-abi.h`, 112 bytes, little-endian):
//! the guest TSC → UTC relationship, its error bounds and the host's NTP status, so that a guest
//! (Linux's ptp_vmclock, AWS ClockBound) has correct time the instant it lands.
//!
//! - [`VmclockAbi`]: every field, [`VmclockAbi::encode`]/[`VmclockAbi::decode`], and
//!   [`VmclockAbi::time_at`], the time a guest computes at a counter value (ptp_vmclock's formula).
//! - [`write_vmclock`] / [`read_vmclock`]: the seq_count protocol, host and guest side.
//! - [`host::HostTimeStatus`]: the host's `adjtimex` state and what it means for `clock_status`,
//!   the leap indicator, the error fields and the counter period.
//! - [`updater::VmclockUpdater`]: keeps the page fresh and rewrites it on restore.
//!
//! [`crate::signal`] keeps its "disruption signal only" writer; this module builds on its
//! [`VmclockMemory`] and constants.

use std::sync::atomic::{fence, AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

use crate::math::{self, VmclockPeriod};
pub use crate::signal::{
    VmclockMemory, VMCLOCK_ABI_SIZE, VMCLOCK_COUNTER_INVALID, VMCLOCK_COUNTER_X86_TSC,
    VMCLOCK_MAGIC, VMCLOCK_STATUS_FREERUNNING, VMCLOCK_STATUS_INITIALIZING,
    VMCLOCK_STATUS_SYNCHRONIZED, VMCLOCK_STATUS_UNKNOWN, VMCLOCK_STATUS_UNRELIABLE,
};

pub mod host;
pub mod updater;

pub use host::HostTimeStatus;
pub use updater::{HostTimeSource, Refresh, VmclockConfig, VmclockUpdater};

/// The size of the region we expose: a full page. ptp_vmclock creates `/dev/vmclockN` (mmap and
/// read) only when `size ≥ PAGE_SIZE`, and the UAPI spec asks for a page.
pub const VMCLOCK_PAGE_SIZE: u32 = 4096;

/// `time_type`: UTC, seconds since 1970-01-01 00:00:00Z.
pub const VMCLOCK_TIME_UTC: u8 = 0;
/// `time_type`: TAI.
pub const VMCLOCK_TIME_TAI: u8 = 1;
/// `time_type`: a monotonic clock with no defined epoch.
pub const VMCLOCK_TIME_MONOTONIC: u8 = 2;

/// `flags`: `tai_offset_sec` is valid.
pub const VMCLOCK_FLAG_TAI_OFFSET_VALID: u64 = 1 << 0;
/// `flags`: a disruption is expected in about a day.
pub const VMCLOCK_FLAG_DISRUPTION_SOON: u64 = 1 << 1;
/// `flags`: a disruption is expected in about an hour.
pub const VMCLOCK_FLAG_DISRUPTION_IMMINENT: u64 = 1 << 2;
/// `flags`: `counter_period_esterror_rate_frac_sec` is valid.
pub const VMCLOCK_FLAG_PERIOD_ESTERROR_VALID: u64 = 1 << 3;
/// `flags`: `counter_period_maxerror_rate_frac_sec` is valid.
pub const VMCLOCK_FLAG_PERIOD_MAXERROR_VALID: u64 = 1 << 4;
/// `flags`: `time_esterror_nanosec` is valid.
pub const VMCLOCK_FLAG_TIME_ESTERROR_VALID: u64 = 1 << 5;
/// `flags`: `time_maxerror_nanosec` is valid.
pub const VMCLOCK_FLAG_TIME_MAXERROR_VALID: u64 = 1 << 6;
/// `flags`: the time never appears to go back across updates.
pub const VMCLOCK_FLAG_TIME_MONOTONIC: u64 = 1 << 7;
/// `flags`: `vm_generation_counter` is maintained.
pub const VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT: u64 = 1 << 8;
/// `flags`: the device notifies the guest of updates.
pub const VMCLOCK_FLAG_NOTIFICATION_PRESENT: u64 = 1 << 9;

/// `leap_indicator`: no known nearby leap second.
pub const VMCLOCK_LEAP_NONE: u8 = 0;
/// `leap_indicator`: a positive leap second at the end of the month.
pub const VMCLOCK_LEAP_PRE_POS: u8 = 1;
/// `leap_indicator`: a negative leap second at the end of the month.
pub const VMCLOCK_LEAP_PRE_NEG: u8 = 2;
/// `leap_indicator`: during the 23:59:60 second.
pub const VMCLOCK_LEAP_POS: u8 = 3;
/// `leap_indicator`: a positive leap second happened at the end of the previous month.
pub const VMCLOCK_LEAP_POST_POS: u8 = 4;
/// `leap_indicator`: a negative leap second happened at the end of the previous month.
pub const VMCLOCK_LEAP_POST_NEG: u8 = 5;

/// Offset of `seq_count`.
const SEQ: usize = 12;
/// The seq-protected part starts after `seq_count`.
const BODY: usize = 16;

/// Every field of `struct vmclock_abi`, host byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmclockAbi {
    /// `VMCLOCK_MAGIC`.
    pub magic: u32,
    /// Size of the region containing the structure, bytes.
    pub size: u32,
    /// 1.
    pub version: u16,
    /// `VMCLOCK_COUNTER_*`.
    pub counter_id: u8,
    /// `VMCLOCK_TIME_*`.
    pub time_type: u8,
    /// Odd while the host updates.
    pub seq_count: u32,
    /// Changes when the counter was disrupted (live migration).
    pub disruption_marker: u64,
    /// `VMCLOCK_FLAG_*`.
    pub flags: u64,
    /// `VMCLOCK_STATUS_*`.
    pub clock_status: u8,
    /// `VMCLOCK_SMEARING_*` hint (0: strict).
    pub leap_second_smearing_hint: u8,
    /// TAI − UTC, s (valid with `VMCLOCK_FLAG_TAI_OFFSET_VALID`).
    pub tai_offset_sec: i16,
    /// `VMCLOCK_LEAP_*`.
    pub leap_indicator: u8,
    /// Extra shift of the period fields.
    pub counter_period_shift: u8,
    /// Counter value at `time_sec + time_frac_sec`.
    pub counter_value: u64,
    /// Tick period, `2^-(64 + shift)` s.
    pub counter_period_frac_sec: u64,
    /// Estimated ± error of the period, same units.
    pub counter_period_esterror_rate_frac_sec: u64,
    /// Maximum ± error of the period, same units.
    pub counter_period_maxerror_rate_frac_sec: u64,
    /// Seconds since the `time_type` epoch.
    pub time_sec: u64,
    /// Fraction of a second, 2⁻⁶⁴ s.
    pub time_frac_sec: u64,
    /// Estimated ± error of the time, ns.
    pub time_esterror_nanosec: u64,
    /// Maximum ± error of the time, ns.
    pub time_maxerror_nanosec: u64,
    /// Changes when the guest was loaded from a saved state.
    pub vm_generation_counter: u64,
}

/// A time read from a vmclock structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmclockTime {
    /// Seconds since the epoch (UTC after the TAI adjustment ptp_vmclock makes).
    pub sec: u64,
    /// Nanoseconds, `0..1e9`.
    pub nsec: u32,
}

impl VmclockTime {
    /// As ns since the epoch (u128: never overflows).
    pub fn as_ns(&self) -> u128 {
        u128::from(self.sec) * 1_000_000_000 + u128::from(self.nsec)
    }
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

impl VmclockAbi {
    /// The 112 little-endian bytes of the structure.
    pub fn encode(&self) -> [u8; VMCLOCK_ABI_SIZE] {
        let mut b = [0u8; VMCLOCK_ABI_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.counter_id;
        b[11] = self.time_type;
        b[12..16].copy_from_slice(&self.seq_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.disruption_marker.to_le_bytes());
        b[24..32].copy_from_slice(&self.flags.to_le_bytes());
        // 32..34: pad.
        b[34] = self.clock_status;
        b[35] = self.leap_second_smearing_hint;
        b[36..38].copy_from_slice(&self.tai_offset_sec.to_le_bytes());
        b[38] = self.leap_indicator;
        b[39] = self.counter_period_shift;
        let tail = [
            self.counter_value,
            self.counter_period_frac_sec,
            self.counter_period_esterror_rate_frac_sec,
            self.counter_period_maxerror_rate_frac_sec,
            self.time_sec,
            self.time_frac_sec,
            self.time_esterror_nanosec,
            self.time_maxerror_nanosec,
            self.vm_generation_counter,
        ];
        for (i, v) in tail.iter().enumerate() {
            b[40 + 8 * i..48 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decode the first 112 bytes of `b`; `None` when `b` is shorter. No field is validated
    /// (see [`VmclockAbi::check_header`]).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..VMCLOCK_ABI_SIZE)?;
        Some(VmclockAbi {
            magic: le_u32(b, 0),
            size: le_u32(b, 4),
            version: u16::from_le_bytes([b[8], b[9]]),
            counter_id: b[10],
            time_type: b[11],
            seq_count: le_u32(b, 12),
            disruption_marker: le_u64(b, 16),
            flags: le_u64(b, 24),
            clock_status: b[34],
            leap_second_smearing_hint: b[35],
            tai_offset_sec: i16::from_le_bytes([b[36], b[37]]),
            leap_indicator: b[38],
            counter_period_shift: b[39],
            counter_value: le_u64(b, 40),
            counter_period_frac_sec: le_u64(b, 48),
            counter_period_esterror_rate_frac_sec: le_u64(b, 56),
            counter_period_maxerror_rate_frac_sec: le_u64(b, 64),
            time_sec: le_u64(b, 72),
            time_frac_sec: le_u64(b, 80),
            time_esterror_nanosec: le_u64(b, 88),
            time_maxerror_nanosec: le_u64(b, 96),
            vm_generation_counter: le_u64(b, 104),
        })
    }

    /// ptp_vmclock's probe checks: magic, version 1, and a size covering the structure.
    pub fn check_header(&self) -> Result<(), String> {
        if self.magic != VMCLOCK_MAGIC {
            return Err(format!(
                "magic {:#x}, expected {VMCLOCK_MAGIC:#x}",
                self.magic
            ));
        }
        if self.version != 1 {
            return Err(format!("version {}, expected 1", self.version));
        }
        if (self.size as usize) < VMCLOCK_ABI_SIZE {
            return Err(format!(
                "size {} < {VMCLOCK_ABI_SIZE}: the clock fields are absent",
                self.size
            ));
        }
        Ok(())
    }

    /// The counter period.
    pub fn period(&self) -> VmclockPeriod {
        VmclockPeriod {
            frac_sec: self.counter_period_frac_sec,
            shift: self.counter_period_shift,
        }
    }

    /// Whether ptp_vmclock would offer this time as unambiguous UTC: `time_type` UTC, or TAI
    /// with `VMCLOCK_FLAG_TAI_OFFSET_VALID` (its `tai_adjust`).
    pub fn unambiguous(&self) -> bool {
        self.time_type == VMCLOCK_TIME_UTC
            || (self.time_type == VMCLOCK_TIME_TAI
                && self.flags & VMCLOCK_FLAG_TAI_OFFSET_VALID != 0)
    }

    /// The TAI a Linux 7.x ptp_vmclock's PHC reads at counter value `counter`: the page's time
    /// for a TAI page, `sec − tai_offset_sec` for a UTC page with `VMCLOCK_FLAG_TAI_OFFSET_VALID`
    /// (the driver's sign: `tai_offset_sec` = UTC − TAI); `None` where that driver refuses
    /// (UNRELIABLE, no counter, a UTC page without a valid offset).
    pub fn tai_at(&self, counter: u64) -> Option<VmclockTime> {
        if self.clock_status == VMCLOCK_STATUS_UNRELIABLE
            || self.counter_id == VMCLOCK_COUNTER_INVALID
        {
            return None;
        }
        let offset = match self.time_type {
            VMCLOCK_TIME_TAI => 0,
            VMCLOCK_TIME_UTC if self.flags & VMCLOCK_FLAG_TAI_OFFSET_VALID != 0 => {
                -i64::from(self.tai_offset_sec)
            }
            _ => return None,
        };
        let (sec, frac) = math::vmclock_time_at(
            self.counter_value,
            self.period(),
            self.time_sec,
            self.time_frac_sec,
            counter,
        );
        Some(VmclockTime {
            sec: sec.wrapping_add_signed(offset),
            nsec: math::frac_sec_to_ns(frac),
        })
    }

    /// The UTC a guest reads at counter value `counter`, as ptp_vmclock before Linux 7.x computes it:
    /// [`math::vmclock_time_at`], nanoseconds truncated, then its TAI adjustment
    /// (`sec += tai_offset_sec` for TAI with a valid offset). `None` where ptp_vmclock returns
    /// an error: `clock_status` UNRELIABLE, no counter (`counter_id` INVALID), or ambiguous time.
    pub fn time_at(&self, counter: u64) -> Option<VmclockTime> {
        if self.clock_status == VMCLOCK_STATUS_UNRELIABLE
            || self.counter_id == VMCLOCK_COUNTER_INVALID
            || !self.unambiguous()
        {
            return None;
        }
        let (mut sec, frac) = math::vmclock_time_at(
            self.counter_value,
            self.period(),
            self.time_sec,
            self.time_frac_sec,
            counter,
        );
        if self.time_type == VMCLOCK_TIME_TAI {
            sec = sec.wrapping_add_signed(i64::from(self.tai_offset_sec));
        }
        Some(VmclockTime {
            sec,
            nsec: math::frac_sec_to_ns(frac),
        })
    }

    /// A human-readable rendering (for `clockvmm inspect`).
    pub fn describe(&self) -> String {
        let mut o = String::new();
        let hdr = match self.check_header() {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("INVALID: {e}"),
        };
        o += &format!("vmclock        {hdr}\n");
        o += &format!(
            "               size {} bytes, version {}, seq_count {}{}\n",
            self.size,
            self.version,
            self.seq_count,
            if self.seq_count % 2 == 1 {
                " (update in progress)"
            } else {
                ""
            }
        );
        let counter = match self.counter_id {
            VMCLOCK_COUNTER_X86_TSC => "X86_TSC".to_string(),
            0 => "ARM_VCNT".to_string(),
            VMCLOCK_COUNTER_INVALID => "INVALID (disruption signal only)".to_string(),
            c => format!("{c} (unknown)"),
        };
        let time_type = match self.time_type {
            VMCLOCK_TIME_UTC => "UTC",
            VMCLOCK_TIME_TAI => "TAI",
            VMCLOCK_TIME_MONOTONIC => "MONOTONIC",
            _ => "unsupported",
        };
        o += &format!("counter        {counter}, time {time_type}\n");
        let status = clock_status_name(self.clock_status);
        o += &format!("clock_status   {} ({status})\n", self.clock_status);
        o += &format!("flags          {}\n", flag_names(self.flags));
        o += &format!(
            "markers        disruption {}, vm generation {}\n",
            self.disruption_marker, self.vm_generation_counter
        );
        o += &format!(
            "leap           indicator {}, smearing hint {}, TAI offset {} s\n",
            self.leap_indicator, self.leap_second_smearing_hint, self.tai_offset_sec
        );
        o += &format!(
            "period         {:#018x} >> (64 + {}) s/tick{}\n",
            self.counter_period_frac_sec,
            self.counter_period_shift,
            hz_of(self.period()).map_or(String::new(), |hz| format!(" ≈ {hz:.3} Hz"))
        );
        o += &format!(
            "period error   est {:#x}, max {:#x} (same units)\n",
            self.counter_period_esterror_rate_frac_sec, self.counter_period_maxerror_rate_frac_sec
        );
        o += &format!(
            "reference      counter {} at {}.{:09} s\n",
            self.counter_value,
            self.time_sec,
            math::frac_sec_to_ns(self.time_frac_sec)
        );
        o += &format!(
            "time error     est {} ns, max {} ns\n",
            self.time_esterror_nanosec, self.time_maxerror_nanosec
        );
        o
    }
}

/// The counter rate a period stands for (display only).
fn hz_of(p: VmclockPeriod) -> Option<f64> {
    if p.frac_sec == 0 {
        return None;
    }
    Some(2f64.powi(64 + i32::from(p.shift)) / p.frac_sec as f64)
}

/// The name of a `clock_status` value (`"unknown value"` for one the ABI does not define).
pub fn clock_status_name(status: u8) -> &'static str {
    match status {
        VMCLOCK_STATUS_UNKNOWN => "UNKNOWN",
        VMCLOCK_STATUS_INITIALIZING => "INITIALIZING",
        VMCLOCK_STATUS_SYNCHRONIZED => "SYNCHRONIZED",
        VMCLOCK_STATUS_FREERUNNING => "FREERUNNING",
        VMCLOCK_STATUS_UNRELIABLE => "UNRELIABLE",
        _ => "unknown value",
    }
}

/// `flags` as names.
pub fn flag_names(flags: u64) -> String {
    let names = [
        (VMCLOCK_FLAG_TAI_OFFSET_VALID, "TAI_OFFSET_VALID"),
        (VMCLOCK_FLAG_DISRUPTION_SOON, "DISRUPTION_SOON"),
        (VMCLOCK_FLAG_DISRUPTION_IMMINENT, "DISRUPTION_IMMINENT"),
        (VMCLOCK_FLAG_PERIOD_ESTERROR_VALID, "PERIOD_ESTERROR_VALID"),
        (VMCLOCK_FLAG_PERIOD_MAXERROR_VALID, "PERIOD_MAXERROR_VALID"),
        (VMCLOCK_FLAG_TIME_ESTERROR_VALID, "TIME_ESTERROR_VALID"),
        (VMCLOCK_FLAG_TIME_MAXERROR_VALID, "TIME_MAXERROR_VALID"),
        (VMCLOCK_FLAG_TIME_MONOTONIC, "TIME_MONOTONIC"),
        (
            VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT,
            "VM_GEN_COUNTER_PRESENT",
        ),
        (VMCLOCK_FLAG_NOTIFICATION_PRESENT, "NOTIFICATION_PRESENT"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{flags:#x} ({})", v.join("|"))
}

/// A vmclock access that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmclockError {
    /// Reading or writing the page failed.
    #[error("vmclock page access: {0}")]
    Io(#[from] std::io::Error),
    /// A hypervisor operation failed while sampling the relationship.
    #[error("vmclock sample: {0}")]
    Backend(#[from] crate::backend::BackendError),
    /// The page never showed a stable even `seq_count` within the retry budget.
    #[error("vmclock seq_count stayed odd or kept changing for {0} attempts")]
    Busy(u32),
    /// The relationship cannot be expressed in the structure (0 Hz, period ≥ 1 s, ...).
    #[error("vmclock relationship not representable: {0}")]
    Unrepresentable(String),
}

/// Retries [`read_vmclock`] makes before giving up.
pub const READ_ATTEMPTS: u32 = 100_000;

/// Read the structure as a guest does: `seq = seq_count & !1`, read barrier, copy the fields,
/// read barrier, retry unless `seq_count` still equals `seq` (ptp_vmclock's loop; an odd value
/// never matches). Returns the consistent copy (its `seq_count` is the even value it was read
/// under), or [`VmclockError::Busy`] after [`READ_ATTEMPTS`].
pub fn read_vmclock(mem: &dyn VmclockMemory) -> Result<VmclockAbi, VmclockError> {
    let mut seq_b = [0u8; 4];
    let mut buf = [0u8; VMCLOCK_ABI_SIZE];
    for _ in 0..READ_ATTEMPTS {
        mem.read_bytes(SEQ, &mut seq_b)?;
        let seq = u32::from_le_bytes(seq_b) & !1;
        fence(Ordering::Acquire);
        mem.read_bytes(0, &mut buf)?;
        fence(Ordering::Acquire);
        mem.read_bytes(SEQ, &mut seq_b)?;
        if u32::from_le_bytes(seq_b) == seq {
            let mut abi = VmclockAbi::decode(&buf).unwrap_or_default();
            abi.seq_count = seq;
            return Ok(abi);
        }
        std::hint::spin_loop();
    }
    Err(VmclockError::Busy(READ_ATTEMPTS))
}

/// Write the whole structure under the seq_count protocol: `seq_count` ← odd (from the page's
/// current value when it carries the magic, else 0), release barrier, every other field, release
/// barrier, `seq_count` ← the next even value. `abi.seq_count` is ignored; the value written is
/// returned. The guest sees either the old or the new structure, never a mix (see
/// [`read_vmclock`]).
pub fn write_vmclock(mem: &dyn VmclockMemory, abi: &VmclockAbi) -> Result<u32, VmclockError> {
    let mut head = [0u8; 16];
    mem.read_bytes(0, &mut head)?;
    let seq = if le_u32(&head, 0) == VMCLOCK_MAGIC {
        le_u32(&head, SEQ) & !1
    } else {
        0
    };
    let odd = seq.wrapping_add(1);
    let even = seq.wrapping_add(2);
    let bytes = abi.encode();
    mem.write_bytes(SEQ, &odd.to_le_bytes())?;
    fence(Ordering::Release);
    // The constant fields (0..12) are rewritten with the same values after the first write.
    mem.write_bytes(0, &bytes[..SEQ])?;
    mem.write_bytes(BODY, &bytes[BODY..])?;
    fence(Ordering::Release);
    mem.write_bytes(SEQ, &even.to_le_bytes())?;
    Ok(even)
}

/// A lock-free vmclock page in host memory: every byte an atomic accessed `Relaxed`, ordering
/// only from the protocol's fences — like guest memory, where nothing serialises the host's
/// writes against the guest's reads. Used by the concurrency tests and the model.
#[derive(Debug)]
pub struct AtomicVmclockMemory(Box<[AtomicU8]>);

impl AtomicVmclockMemory {
    /// A zeroed page of [`VMCLOCK_PAGE_SIZE`] bytes.
    pub fn new() -> Self {
        AtomicVmclockMemory(
            (0..VMCLOCK_PAGE_SIZE)
                .map(|_| AtomicU8::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        )
    }

    /// A copy of the bytes (not synchronised with a concurrent writer).
    pub fn bytes(&self) -> Vec<u8> {
        self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

impl Default for AtomicVmclockMemory {
    fn default() -> Self {
        Self::new()
    }
}

fn range_err(offset: usize, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("vmclock access {offset}+{len} outside the page"),
    )
}

impl VmclockMemory for AtomicVmclockMemory {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        let src = self
            .0
            .get(offset..offset.saturating_add(buf.len()))
            .ok_or_else(|| range_err(offset, buf.len()))?;
        for (d, s) in buf.iter_mut().zip(src) {
            *d = s.load(Ordering::Relaxed);
        }
        Ok(())
    }
    fn write_bytes(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        let dst = self
            .0
            .get(offset..offset.saturating_add(data.len()))
            .ok_or_else(|| range_err(offset, data.len()))?;
        for (d, s) in dst.iter().zip(data) {
            d.store(*s, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
