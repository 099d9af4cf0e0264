//! Facts about the host the plugin runs on: identity (machine-id hash, boot_id, TSC rate,
//! clocksource) and NTP state (`adjtimex`). Used by the KVM backend.

use std::fs;

use guest_clock_format::{HostIdentity, NtpState};

use super::{BackendError, HostInfo};

/// 64-bit FNV-1a: a stable hash (std's hasher is randomised per process).
/// `h = 0xcbf29ce484222325; for b: h = (h ^ b) · 0x100000001b3`.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Parse a UUID string (`8-4-4-4-12` hex) into 16 bytes.
pub(crate) fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn read_trim(path: &str) -> Result<String, BackendError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| BackendError::HostInfo(format!("{path}: {e}")))
}

/// The host TSC rate from sysfs (`/sys/devices/system/cpu/cpu0/tsc_freq_khz`), if the kernel
/// exposes it.
pub(crate) fn sysfs_tsc_khz() -> Option<u32> {
    read_trim("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()?
        .parse()
        .ok()
}

/// `adjtimex(2)` with modes 0 (reads only): the kernel's whole `timex` and the clock state it
/// returns (`TIME_OK`, `TIME_INS`, ...).
pub(crate) fn read_adjtimex() -> Result<(libc::timex, i32), BackendError> {
    // SAFETY: an all-zero timex is a valid argument; modes 0 only reads the kernel's state
    // into the struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: tx is a valid, exclusively borrowed timex for the duration of the call.
    let rc = unsafe { libc::adjtimex(&mut tx) };
    if rc < 0 {
        return Err(BackendError::HostInfo(format!(
            "adjtimex: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok((tx, rc))
}

/// `adjtimex(2)` with no modification: status, maxerror and esterror (µs).
pub fn ntp_state() -> Result<NtpState, BackendError> {
    let (tx, _) = read_adjtimex()?;
    Ok(NtpState {
        status: tx.status,
        maxerror_us: tx.maxerror,
        esterror_us: tx.esterror,
    })
}

/// Read the host's identity and NTP state. `host_tsc_khz` comes from the caller (sysfs or the
/// rate KVM reports for a fresh vCPU).
pub fn read_host_info(host_tsc_khz: u32) -> Result<HostInfo, BackendError> {
    let machine_id = read_trim("/etc/machine-id")
        .or_else(|_| read_trim("/var/lib/dbus/machine-id"))
        .unwrap_or_default();
    let boot_id = read_trim("/proc/sys/kernel/random/boot_id")?;
    let boot_id = parse_uuid(&boot_id)
        .ok_or_else(|| BackendError::HostInfo(format!("boot_id {boot_id:?} is not a UUID")))?;
    let mut clocksource =
        read_trim("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_else(|_| "unknown".into());
    clocksource.truncate(guest_clock_format::MAX_CLOCKSOURCE_LEN);
    Ok(HostInfo {
        identity: HostIdentity {
            machine_id_hash: fnv1a64(machine_id.as_bytes()),
            boot_id,
            host_tsc_khz,
            clocksource,
        },
        ntp: ntp_state()?,
    })
}

/// Which KVM module serves /dev/kvm: `kvm_pvm`, `kvm_intel`, `kvm_amd`, or `kvm`.
pub fn kvm_flavour() -> &'static str {
    for m in ["kvm_pvm", "kvm_intel", "kvm_amd"] {
        if std::path::Path::new(&format!("/sys/module/{m}")).exists() {
            return m;
        }
    }
    "kvm"
}

/// Host CLOCK_REALTIME, ns.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The host TSC (`RDTSC`).
#[cfg(target_arch = "x86_64")]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC scaling fractional bits for this CPU's vendor: 48 Intel, 32 AMD, 0 otherwise.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tsc_scaling_frac_bits() -> u8 {
    // CPUID leaf 0 (vendor string) exists on every x86_64 CPU and has no side effects.
    let r = core::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    match &vendor {
        b"GenuineIntel" => 48,
        b"AuthenticAMD" | b"HygonGenuine" => 32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_uuid() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let u = parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap();
        assert_eq!(u[0], 0x0f);
        assert_eq!(u[15], 0xf0);
        assert!(parse_uuid("nope").is_none());
        assert!(parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1zz").is_none());
    }

    #[test]
    fn host_info_reads() {
        let info = read_host_info(1).unwrap();
        assert_ne!(info.identity.boot_id, [0; 16]);
        assert!(!info.identity.clocksource.is_empty());
    }
}
