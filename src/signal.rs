//! Telling the guest its clock was disrupted: `KVM_KVMCLOCK_CTRL` on every vCPU
//! (`PVCLOCK_GUEST_STOPPED`) and, where the VMM provides one, the vmclock page
//! (`include/uapi/linux/vmclock-abi.h`): `disruption_marker` bumped and `clock_status` set under
//! the structure's seqcount protocol.
//!
//! On an exact live update nothing is signalled: from the guest's view it was merely not
//! scheduled for a moment.

use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, ClockBackend};

/// vmclock magic, "VCLK" little-endian.
pub const VMCLOCK_MAGIC: u32 = 0x4b4c_4356;
/// Size of `struct vmclock_abi` we write, bytes.
pub const VMCLOCK_ABI_SIZE: usize = 112;
/// `counter_id`: x86 TSC.
pub const VMCLOCK_COUNTER_X86_TSC: u8 = 1;
/// `counter_id`: no counter relationship provided.
pub const VMCLOCK_COUNTER_INVALID: u8 = 0xff;
/// `clock_status` values.
pub const VMCLOCK_STATUS_UNKNOWN: u8 = 0;
/// The host clock is being synchronised.
pub const VMCLOCK_STATUS_INITIALIZING: u8 = 1;
/// The host clock is synchronised.
pub const VMCLOCK_STATUS_SYNCHRONIZED: u8 = 2;
/// The host clock runs free, undisciplined.
pub const VMCLOCK_STATUS_FREERUNNING: u8 = 3;
/// The clock's error is not known: what a guest is told after a live migration.
pub const VMCLOCK_STATUS_UNRELIABLE: u8 = 4;

/// Byte offsets in `struct vmclock_abi` (little-endian).
pub mod offsets {
    /// `magic` u32.
    pub const MAGIC: usize = 0;
    /// `size` u32.
    pub const SIZE: usize = 4;
    /// `version` u16.
    pub const VERSION: usize = 8;
    /// `counter_id` u8.
    pub const COUNTER_ID: usize = 10;
    /// `time_type` u8.
    pub const TIME_TYPE: usize = 11;
    /// `seq_count` u32, odd while the host updates.
    pub const SEQ_COUNT: usize = 12;
    /// `disruption_marker` u64.
    pub const DISRUPTION_MARKER: usize = 16;
    /// `flags` u64.
    pub const FLAGS: usize = 24;
    /// `clock_status` u8.
    pub const CLOCK_STATUS: usize = 34;
    /// `time_maxerror_nanosec` u64.
    pub const TIME_MAXERROR_NANOSEC: usize = 96;
}

/// Where the vmclock structure lives: a window of guest memory the VMM owns.
///
/// Offsets are relative to the start of the structure. Implementations must perform each
/// access as one copy into/out of guest memory (vm-memory's `write_slice`/`read_slice` do).
pub trait VmclockMemory: Send + Sync {
    /// Read `buf.len()` bytes at `offset`.
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()>;
    /// Write `data` at `offset`.
    fn write_bytes(&self, offset: usize, data: &[u8]) -> std::io::Result<()>;
}

/// A vmclock structure in plain host memory, for tests and the model backend.
#[derive(Debug)]
pub struct HostVmclockMemory(Mutex<Vec<u8>>);

impl HostVmclockMemory {
    /// A zeroed page.
    pub fn new() -> Self {
        HostVmclockMemory(Mutex::new(vec![0; 4096]))
    }
    /// A copy of the bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Default for HostVmclockMemory {
    fn default() -> Self {
        Self::new()
    }
}

fn out_of_range(offset: usize, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("vmclock access {offset}+{len} outside the page"),
    )
}

impl VmclockMemory for HostVmclockMemory {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        let mem = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let src = mem
            .get(offset..offset.saturating_add(buf.len()))
            .ok_or_else(|| out_of_range(offset, buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_bytes(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        let mut mem = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let dst = mem
            .get_mut(offset..offset.saturating_add(data.len()))
            .ok_or_else(|| out_of_range(offset, data.len()))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// The fields of a vmclock structure the plugin reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmclockView {
    /// `seq_count`.
    pub seq_count: u32,
    /// `disruption_marker`.
    pub disruption_marker: u64,
    /// `clock_status`.
    pub clock_status: u8,
    /// `time_maxerror_nanosec`.
    pub time_maxerror_ns: u64,
}

/// Writes a vmclock structure following the seqcount protocol of `vmclock-abi.h`: make
/// `seq_count` odd, barrier, update fields, barrier, make it even again. A guest that reads an odd
/// or changed `seq_count` retries.
pub struct VmclockWriter<'a> {
    mem: &'a dyn VmclockMemory,
}

fn read_u32(mem: &dyn VmclockMemory, off: usize) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    mem.read_bytes(off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(mem: &dyn VmclockMemory, off: usize) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    mem.read_bytes(off, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

impl<'a> VmclockWriter<'a> {
    /// A writer over `mem`.
    pub fn new(mem: &'a dyn VmclockMemory) -> Self {
        VmclockWriter { mem }
    }

    /// Lay out a fresh structure: magic, size, version 1, no counter relationship
    /// (`counter_id` = INVALID: the basic "disruption signal only" mode), status UNKNOWN,
    /// `disruption_marker` = `marker`.
    pub fn init(&self, marker: u64) -> std::io::Result<()> {
        let m = self.mem;
        m.write_bytes(offsets::SEQ_COUNT, &1u32.to_le_bytes())?;
        fence(Ordering::Release);
        m.write_bytes(offsets::MAGIC, &VMCLOCK_MAGIC.to_le_bytes())?;
        m.write_bytes(offsets::SIZE, &(VMCLOCK_ABI_SIZE as u32).to_le_bytes())?;
        m.write_bytes(offsets::VERSION, &1u16.to_le_bytes())?;
        m.write_bytes(offsets::COUNTER_ID, &[VMCLOCK_COUNTER_INVALID])?;
        m.write_bytes(offsets::TIME_TYPE, &[0])?;
        m.write_bytes(offsets::DISRUPTION_MARKER, &marker.to_le_bytes())?;
        m.write_bytes(offsets::FLAGS, &0u64.to_le_bytes())?;
        m.write_bytes(offsets::CLOCK_STATUS, &[VMCLOCK_STATUS_UNKNOWN])?;
        fence(Ordering::Release);
        m.write_bytes(offsets::SEQ_COUNT, &2u32.to_le_bytes())
    }

    /// Read the fields the plugin cares about (no seqcount retry: the host is the only writer).
    pub fn view(&self) -> std::io::Result<VmclockView> {
        let mut status = [0u8; 1];
        self.mem.read_bytes(offsets::CLOCK_STATUS, &mut status)?;
        Ok(VmclockView {
            seq_count: read_u32(self.mem, offsets::SEQ_COUNT)?,
            disruption_marker: read_u64(self.mem, offsets::DISRUPTION_MARKER)?,
            clock_status: status[0],
            time_maxerror_ns: read_u64(self.mem, offsets::TIME_MAXERROR_NANOSEC)?,
        })
    }

    /// Signal a disruption: `disruption_marker` = `new_marker`, `clock_status` = `status`,
    /// `time_maxerror_nanosec` = `maxerror_ns`, under the seqcount protocol.
    pub fn disrupt(&self, new_marker: u64, status: u8, maxerror_ns: u64) -> std::io::Result<()> {
        let m = self.mem;
        let magic = read_u32(m, offsets::MAGIC)?;
        if magic != VMCLOCK_MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "vmclock magic {magic:#x}, expected {VMCLOCK_MAGIC:#x}: page not initialised"
                ),
            ));
        }
        // Even → odd: readers retry while we update.
        let seq = read_u32(m, offsets::SEQ_COUNT)? & !1;
        m.write_bytes(offsets::SEQ_COUNT, &seq.wrapping_add(1).to_le_bytes())?;
        fence(Ordering::Release);
        m.write_bytes(offsets::DISRUPTION_MARKER, &new_marker.to_le_bytes())?;
        m.write_bytes(offsets::CLOCK_STATUS, &[status])?;
        m.write_bytes(offsets::TIME_MAXERROR_NANOSEC, &maxerror_ns.to_le_bytes())?;
        fence(Ordering::Release);
        m.write_bytes(offsets::SEQ_COUNT, &seq.wrapping_add(2).to_le_bytes())
    }
}

/// What was signalled to the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signalled {
    /// vCPUs on which `KVM_KVMCLOCK_CTRL` succeeded (PVCLOCK_GUEST_STOPPED will be set).
    pub guest_stopped_vcpus: Vec<usize>,
    /// vCPUs whose guest had not enabled kvmclock (EINVAL): nothing to signal there.
    pub kvmclock_not_enabled_vcpus: Vec<usize>,
    /// The new vmclock `disruption_marker`, when a vmclock page was updated.
    pub vmclock_disruption_marker: Option<u64>,
}

impl Signalled {
    /// Whether the guest was told anything at all.
    pub fn any(&self) -> bool {
        !self.guest_stopped_vcpus.is_empty() || self.vmclock_disruption_marker.is_some()
    }
}

/// Tell the guest its clock was disrupted: `KVM_KVMCLOCK_CTRL` on every vCPU and, if given, a
/// vmclock disruption with marker `previous_marker + 1`.
///
/// A vCPU whose guest never enabled kvmclock is not an error (recorded in
/// [`Signalled::kvmclock_not_enabled_vcpus`]); `Unsupported` (no `KVM_CAP_KVMCLOCK_CTRL`) is
/// logged and skipped; any other ioctl failure is returned.
pub fn signal_disruption(
    backend: &dyn ClockBackend,
    vmclock: Option<&dyn VmclockMemory>,
    previous_marker: u64,
    maxerror_ns: u64,
) -> Result<Signalled, BackendError> {
    let mut out = Signalled::default();
    if backend.capabilities().kvmclock_ctrl {
        for vcpu in 0..backend.vcpu_count() {
            match backend.kvmclock_ctrl(vcpu) {
                Ok(()) => out.guest_stopped_vcpus.push(vcpu),
                Err(BackendError::KvmclockNotEnabled { .. }) => {
                    debug!("vCPU {vcpu}: kvmclock not enabled by the guest, nothing to signal");
                    out.kvmclock_not_enabled_vcpus.push(vcpu);
                }
                Err(e) => return Err(e),
            }
        }
    } else {
        warn!("KVM_CAP_KVMCLOCK_CTRL absent: PVCLOCK_GUEST_STOPPED not signalled");
    }
    if let Some(mem) = vmclock {
        let writer = VmclockWriter::new(mem);
        let marker = previous_marker.wrapping_add(1);
        match writer.disrupt(marker, VMCLOCK_STATUS_UNRELIABLE, maxerror_ns) {
            Ok(()) => out.vmclock_disruption_marker = Some(marker),
            Err(e) => warn!("vmclock page not updated: {e}"),
        }
    }
    info!(
        "signalled clock disruption: GUEST_STOPPED on {:?}, vmclock marker {:?}",
        out.guest_stopped_vcpus, out.vmclock_disruption_marker
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqcount_protocol_and_fields() {
        let mem = HostVmclockMemory::new();
        let w = VmclockWriter::new(&mem);
        w.init(7).unwrap();
        let v = w.view().unwrap();
        assert_eq!(v.seq_count % 2, 0);
        assert_eq!(v.disruption_marker, 7);
        w.disrupt(8, VMCLOCK_STATUS_UNRELIABLE, 1234).unwrap();
        let v2 = w.view().unwrap();
        assert_eq!(
            v2.seq_count,
            v.seq_count + 2,
            "one update = seq +2, even again"
        );
        assert_eq!(v2.disruption_marker, 8);
        assert_eq!(v2.clock_status, VMCLOCK_STATUS_UNRELIABLE);
        assert_eq!(v2.time_maxerror_ns, 1234);
        let b = mem.bytes();
        assert_eq!(&b[0..4], &VMCLOCK_MAGIC.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 112);
        assert_eq!(u16::from_le_bytes(b[8..10].try_into().unwrap()), 1);
    }

    #[test]
    fn disrupt_refuses_uninitialised_page() {
        let mem = HostVmclockMemory::new();
        assert!(VmclockWriter::new(&mem).disrupt(1, 4, 0).is_err());
        assert_eq!(mem.bytes(), vec![0; 4096], "nothing written");
    }
}
