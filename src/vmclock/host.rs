//! The host's clock discipline as `adjtimex(2)` reports it, and what it means for the vmclock
//! fields: `clock_status`, `leap_indicator`, the TAI offset, the error fields and the rate of
//! CLOCK_REALTIME against the host TSC.

use guest_clock_format::NtpState;
use serde::{Deserialize, Serialize};

use super::{
    VMCLOCK_LEAP_NONE, VMCLOCK_LEAP_POS, VMCLOCK_LEAP_POST_NEG, VMCLOCK_LEAP_POST_POS,
    VMCLOCK_LEAP_PRE_NEG, VMCLOCK_LEAP_PRE_POS, VMCLOCK_STATUS_FREERUNNING,
    VMCLOCK_STATUS_SYNCHRONIZED, VMCLOCK_STATUS_UNKNOWN, VMCLOCK_STATUS_UNRELIABLE,
};
use crate::backend::BackendError;
use crate::math::{RealtimeRate, USER_HZ};

/// `STA_INS`: insert a leap second at the end of the UTC day.
pub const STA_INS: i32 = 0x0010;
/// `STA_DEL`: delete a leap second at the end of the UTC day.
pub const STA_DEL: i32 = 0x0020;
/// `STA_UNSYNC`: the clock is not synchronised.
pub const STA_UNSYNC: i32 = 0x0040;
/// `STA_CLOCKERR`: clock hardware fault.
pub const STA_CLOCKERR: i32 = 0x1000;

/// `adjtimex` return value: clock synchronised, no leap second pending.
pub const TIME_OK: i32 = 0;
/// Insert a leap second at the end of the day.
pub const TIME_INS: i32 = 1;
/// Delete a leap second at the end of the day.
pub const TIME_DEL: i32 = 2;
/// The leap second is in progress.
pub const TIME_OOP: i32 = 3;
/// A leap second has occurred.
pub const TIME_WAIT: i32 = 4;
/// The clock is not synchronised.
pub const TIME_ERROR: i32 = 5;

/// The kernel's `NTP_PHASE_LIMIT` in µs (16 s): `maxerror` saturates there and the kernel sets
/// `STA_UNSYNC`; a value at or beyond it bounds nothing.
pub const NTP_PHASE_LIMIT_US: i64 = 16_000_000;
/// `MAXFREQ_SCALED`: 500 ppm in 2⁻¹⁶ ppm, the kernel's frequency tolerance.
pub const MAXFREQ_SCALED: i64 = 500 << 16;

/// What `adjtimex(2)` (modes 0) says about the host's CLOCK_REALTIME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTimeStatus {
    /// The return value: `TIME_OK`, `TIME_INS`, ..., `TIME_ERROR`; `None` when only the
    /// status bits are known.
    pub state: Option<i32>,
    /// `timex.status` (`STA_*`).
    pub status: i32,
    /// `timex.maxerror`, µs (grows by 500 µs/s between NTP updates).
    pub maxerror_us: i64,
    /// `timex.esterror`, µs.
    pub esterror_us: i64,
    /// `timex.freq`, 2⁻¹⁶ ppm.
    pub freq_scaled_ppm: i64,
    /// `timex.tick`, µs per `USER_HZ` tick (10000 nominal).
    pub tick_us: i64,
    /// `timex.tolerance`, 2⁻¹⁶ ppm: the largest frequency error the kernel assumes.
    pub tolerance_scaled_ppm: i64,
    /// TAI − UTC, s: `timex.tai`, or (when nobody told the kernel, 0) the system's leap-second
    /// list ([`LEAP_SECONDS_LIST`], while it has not expired) in [`from_kernel`](Self::from_kernel);
    /// 0: unknown.
    pub tai_s: i32,
}

/// The IERS leap-second list as tzdata installs it (what chrony's `leapseclist` reads).
pub const LEAP_SECONDS_LIST: &str = "/usr/share/zoneinfo/leap-seconds.list";

/// Seconds from the NTP epoch (1900) to the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// TAI − UTC at `now_unix_s` from the text of an IERS `leap-seconds.list`: the offset of the
/// last entry at or before `now`, `None` when the list has expired (its `#@` line), has no
/// expiry or no entry before `now`.
pub fn tai_from_leap_list(text: &str, now_unix_s: u64) -> Option<i32> {
    let now = now_unix_s.checked_add(NTP_UNIX_OFFSET)?;
    let mut expires = None;
    let mut tai = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(e) = line.strip_prefix("#@") {
            expires = e.trim().parse::<u64>().ok();
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let mut w = line.split_whitespace();
        let (Some(at), Some(off)) = (w.next(), w.next()) else {
            continue;
        };
        let (Ok(at), Ok(off)) = (at.parse::<u64>(), off.parse::<i32>()) else {
            continue;
        };
        if at <= now {
            tai = Some(off);
        }
    }
    if now >= expires? {
        return None;
    }
    tai
}

impl HostTimeStatus {
    /// Read this host's kernel; TAI − UTC from the leap-second list when the kernel does not
    /// know it (no NTP daemon told it: `timex.tai` 0).
    pub fn from_kernel() -> Result<Self, BackendError> {
        let (mut tx, rc) = crate::backend::host::read_adjtimex()?;
        if !(10..=1000).contains(&tx.tai) {
            let now = crate::backend::host::realtime_ns() / 1_000_000_000;
            if let Some(t) = std::fs::read_to_string(LEAP_SECONDS_LIST)
                .ok()
                .and_then(|text| tai_from_leap_list(&text, now))
            {
                tx.tai = t;
            }
        }
        Ok(HostTimeStatus {
            state: Some(rc),
            status: tx.status,
            maxerror_us: tx.maxerror,
            esterror_us: tx.esterror,
            freq_scaled_ppm: tx.freq,
            tick_us: tx.tick,
            tolerance_scaled_ppm: tx.tolerance,
            tai_s: tx.tai,
        })
    }

    /// From the NTP state a backend reports (status, maxerror, esterror only): nominal rate,
    /// the kernel's default tolerance, TAI offset unknown.
    pub fn from_ntp(ntp: &NtpState) -> Self {
        HostTimeStatus {
            state: None,
            status: ntp.status,
            maxerror_us: ntp.maxerror_us,
            esterror_us: ntp.esterror_us,
            freq_scaled_ppm: 0,
            tick_us: 1_000_000 / USER_HZ,
            tolerance_scaled_ppm: MAXFREQ_SCALED,
            tai_s: 0,
        }
    }

    /// The `clock_status` to publish. SYNCHRONIZED only when the kernel says synchronised
    /// (`STA_UNSYNC` clear, state not `TIME_ERROR`) *and* `0 ≤ maxerror ≤ synced_limit_us`;
    /// still disciplined but with a larger (growing) maxerror → FREERUNNING; `STA_UNSYNC`, an
    /// insane maxerror (< 0 or ≥ 16 s) → UNKNOWN; `STA_CLOCKERR` → UNRELIABLE.
    pub fn clock_status(&self, synced_limit_us: i64) -> u8 {
        if self.status & STA_CLOCKERR != 0 {
            return VMCLOCK_STATUS_UNRELIABLE;
        }
        let unsync = self.status & STA_UNSYNC != 0 || self.state == Some(TIME_ERROR);
        if unsync || self.maxerror_us < 0 || self.maxerror_us >= NTP_PHASE_LIMIT_US {
            return VMCLOCK_STATUS_UNKNOWN;
        }
        if self.maxerror_us <= synced_limit_us {
            VMCLOCK_STATUS_SYNCHRONIZED
        } else {
            VMCLOCK_STATUS_FREERUNNING
        }
    }

    /// `leap_indicator`: from the kernel's leap state (`TIME_INS` → PRE_POS, `TIME_DEL` →
    /// PRE_NEG, `TIME_OOP` → POS, `TIME_WAIT` → POST_POS/POST_NEG by the still-set `STA_INS` /
    /// `STA_DEL`), else from the status bits alone (`STA_INS` → PRE_POS, `STA_DEL` → PRE_NEG).
    /// Linux schedules leap seconds at the end of a UTC day; they only ever happen at the end of
    /// a month, which is what the vmclock values say.
    pub fn leap_indicator(&self) -> u8 {
        let ins = self.status & STA_INS != 0;
        let del = self.status & STA_DEL != 0;
        match self.state {
            Some(TIME_INS) => VMCLOCK_LEAP_PRE_POS,
            Some(TIME_DEL) => VMCLOCK_LEAP_PRE_NEG,
            Some(TIME_OOP) => VMCLOCK_LEAP_POS,
            Some(TIME_WAIT) if del => VMCLOCK_LEAP_POST_NEG,
            Some(TIME_WAIT) if ins => VMCLOCK_LEAP_POST_POS,
            Some(TIME_WAIT) => VMCLOCK_LEAP_NONE,
            _ if ins => VMCLOCK_LEAP_PRE_POS,
            _ if del => VMCLOCK_LEAP_PRE_NEG,
            _ => VMCLOCK_LEAP_NONE,
        }
    }

    /// TAI − UTC when the kernel knows it (`timex.tai` non-zero and plausible: 10..=1000 s;
    /// it was 10 s in 1972 and is 37 s since 2017).
    pub fn tai_offset(&self) -> Option<i16> {
        (10..=1000)
            .contains(&self.tai_s)
            .then(|| i16::try_from(self.tai_s).ok())
            .flatten()
    }

    /// How fast CLOCK_REALTIME runs against the host TSC's nominal rate; `None` (the caller
    /// then uses the nominal rate) for values the kernel would not accept.
    pub fn realtime_rate(&self) -> Option<RealtimeRate> {
        RealtimeRate::from_adjtimex(self.tick_us, self.freq_scaled_ppm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> HostTimeStatus {
        HostTimeStatus::from_ntp(&NtpState {
            status: 0x2001,
            maxerror_us: 5_000,
            esterror_us: 100,
        })
    }

    #[test]
    fn status_is_honest() {
        let s = synced();
        assert_eq!(s.clock_status(1_000_000), VMCLOCK_STATUS_SYNCHRONIZED);
        // Still disciplined but maxerror beyond the limit: free-running.
        let f = HostTimeStatus {
            maxerror_us: 2_000_000,
            ..s
        };
        assert_eq!(f.clock_status(1_000_000), VMCLOCK_STATUS_FREERUNNING);
        // STA_UNSYNC, whatever maxerror says: never SYNCHRONIZED.
        for maxerror_us in [0, 5_000, 16_000_000] {
            let u = HostTimeStatus {
                status: s.status | STA_UNSYNC,
                maxerror_us,
                ..s
            };
            assert_eq!(u.clock_status(1_000_000), VMCLOCK_STATUS_UNKNOWN);
        }
        // TIME_ERROR from the kernel, insane maxerror values.
        let e = HostTimeStatus {
            state: Some(TIME_ERROR),
            ..s
        };
        assert_eq!(e.clock_status(1_000_000), VMCLOCK_STATUS_UNKNOWN);
        for maxerror_us in [-1, NTP_PHASE_LIMIT_US, i64::MAX] {
            let m = HostTimeStatus { maxerror_us, ..s };
            assert_eq!(m.clock_status(i64::MAX), VMCLOCK_STATUS_UNKNOWN);
        }
        let c = HostTimeStatus {
            status: STA_CLOCKERR,
            ..s
        };
        assert_eq!(c.clock_status(1_000_000), VMCLOCK_STATUS_UNRELIABLE);
    }

    #[test]
    fn leap_and_tai() {
        let s = synced();
        assert_eq!(s.leap_indicator(), VMCLOCK_LEAP_NONE);
        let ins = HostTimeStatus {
            status: s.status | STA_INS,
            ..s
        };
        assert_eq!(ins.leap_indicator(), VMCLOCK_LEAP_PRE_POS);
        let oop = HostTimeStatus {
            state: Some(TIME_OOP),
            ..ins
        };
        assert_eq!(oop.leap_indicator(), VMCLOCK_LEAP_POS);
        let wait = HostTimeStatus {
            state: Some(TIME_WAIT),
            ..ins
        };
        assert_eq!(wait.leap_indicator(), VMCLOCK_LEAP_POST_POS);
        let del = HostTimeStatus {
            state: Some(TIME_DEL),
            status: s.status | STA_DEL,
            ..s
        };
        assert_eq!(del.leap_indicator(), VMCLOCK_LEAP_PRE_NEG);
        assert_eq!(s.tai_offset(), None);
        assert_eq!(HostTimeStatus { tai_s: 37, ..s }.tai_offset(), Some(37));
        assert_eq!(HostTimeStatus { tai_s: -5, ..s }.tai_offset(), None);
        assert_eq!(s.realtime_rate(), RealtimeRate::from_adjtimex(10_000, 0));
    }

    #[test]
    fn the_leap_list_gives_tai_until_it_expires() {
        let list = "#\tleap-seconds.list\n#$\t 3929093563\n#@\t3991593600\n\
                    2272060800\t10\t# 1 Jan 1972\n3644697600\t36\t# 1 Jul 2015\n\
                    3692217600\t37\t# 1 Jan 2017\n#h\t16edd0f0 3666784f\n";
        let unix = |ntp: u64| ntp - NTP_UNIX_OFFSET;
        assert_eq!(tai_from_leap_list(list, unix(3692217600)), Some(37));
        assert_eq!(tai_from_leap_list(list, unix(3692217599)), Some(36));
        assert_eq!(tai_from_leap_list(list, unix(2272060800)), Some(10));
        assert_eq!(tai_from_leap_list(list, unix(2272060799)), None);
        assert_eq!(tai_from_leap_list(list, unix(3991593599)), Some(37));
        assert_eq!(tai_from_leap_list(list, unix(3991593600)), None, "expired");
        let no_expiry: String = list.lines().filter(|l| !l.starts_with("#@")).collect();
        assert_eq!(tai_from_leap_list(&no_expiry, unix(3692217600)), None);
        // The system's own list, where there is one (tzdata), gives a plausible value or None.
        if let Ok(text) = std::fs::read_to_string(LEAP_SECONDS_LIST) {
            let now = crate::backend::host::realtime_ns() / 1_000_000_000;
            let t = tai_from_leap_list(&text, now);
            assert!(t.is_none_or(|t| (37..100).contains(&t)), "{t:?}");
        }
    }

    #[test]
    fn kernel_reads() {
        let k = HostTimeStatus::from_kernel().unwrap();
        assert!(k.state.is_some());
        assert!(k.tick_us > 0);
    }
}
