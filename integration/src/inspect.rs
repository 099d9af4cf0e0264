//! `clockvmm inspect FILE|DIR`: print a clock section (or a vmclock page) human-readably.

use std::path::Path;

use guest_clock::format::{
    decode, ClockState, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE,
};

/// The largest section file read, bytes.
const MAX_FILE: u64 = 2 << 20;

fn flags(f: u32) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (KVM_CLOCK_TSC_STABLE, "TSC_STABLE"),
        (KVM_CLOCK_REALTIME, "REALTIME"),
        (KVM_CLOCK_HOST_TSC, "HOST_TSC"),
    ] {
        if f & bit != 0 {
            v.push(name);
        }
    }
    format!("{f:#x} ({})", v.join("|"))
}

/// Render a section.
pub fn render(s: &ClockState, version: Option<u16>) -> String {
    let mut o = String::new();
    if let Some(v) = version {
        o += &format!("clock section v{v}\n");
    }
    o += &format!("capture        {:?}\n", s.capture_kind);
    o += &format!("K (kvmclock)   {} ns\n", s.clock.clock_ns);
    o += &format!("W (realtime)   {} ns\n", s.clock.realtime_ns);
    o += &format!("host TSC       {} ticks\n", s.clock.host_tsc_ticks);
    o += &format!("flags          {}\n", flags(s.clock.flags));
    let unc = if s.capture_uncertainty_ns == u64::MAX {
        "unknown (v1)".to_string()
    } else {
        format!("{} ns", s.capture_uncertainty_ns)
    };
    o += &format!("uncertainty    {unc}\n");
    o += &format!(
        "guest TSC      {} kHz (host {} kHz, ratio {:#x}, {} frac bits)\n",
        s.tsc.guest_tsc_khz, s.tsc.host_tsc_khz, s.tsc.ratio, s.tsc.frac_bits
    );
    o += &format!(
        "host           machine {:#018x}, boot {}, {} kHz, clocksource {}\n",
        s.host.machine_id_hash,
        s.host
            .boot_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        s.host.host_tsc_khz,
        s.host.clocksource
    );
    o += &format!(
        "NTP            status {:#x}, maxerror {} us, esterror {} us\n",
        s.ntp.status, s.ntp.maxerror_us, s.ntp.esterror_us
    );
    o += &format!("vmclock marker {}\n", s.vmclock_disruption_marker);
    let id = if s.has_vm_id() {
        guest_clock::restore::vm_id_string(&s.vm_id)
    } else {
        "unknown (v1/v2 section)".to_string()
    };
    o += &format!("VM id          {id}\n");
    o += &format!("vCPUs          {}\n", s.vcpus.len());
    for v in &s.vcpus {
        o += &format!(
            "  vCPU {:>3}: T = {} ticks at K = {} ns, offset {:#x}\n",
            v.id, v.tsc_ticks, v.kvmclock_ns, v.tsc_offset_ticks
        );
    }
    o
}

/// Inspect a path: a snapshot directory, or a raw section file (a regular file of at most
/// `MAX_FILE` bytes, read bounded: a FIFO or a device is refused, never waited on).
pub fn run(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        let file = crate::vmm::read_snapshot_file(path).map_err(|e| e.to_string())?;
        let s = guest_clock::clock_state_from_snapshot(&file.snapshot)
            .map_err(|e| format!("bad clock section: {e}"))?;
        println!("snapshot {} ({} vCPUs)", path.display(), file.config.vcpus);
        print!("{}", render(&s, None));
        return Ok(());
    }
    let bytes = crate::files::read_regular(path, MAX_FILE)
        .map_err(|e| format!("{e}: not a clock section file"))?;
    // A vmclock page (e.g. dumped from guest memory) starts with "VCLK".
    if bytes.starts_with(&guest_clock::vmclock::VMCLOCK_MAGIC.to_le_bytes()) {
        let abi = guest_clock::vmclock::VmclockAbi::decode(&bytes)
            .ok_or_else(|| format!("{}: vmclock page shorter than 112 bytes", path.display()))?;
        print!("{}", abi.describe());
        return Ok(());
    }
    let d = decode(&bytes).map_err(|e| format!("bad clock section ({}): {e}", e.field()))?;
    print!("{}", render(&d.state, Some(d.version)));
    Ok(())
}
