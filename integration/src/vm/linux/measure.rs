//! The Linux guest's own clocks, mapped to host time exactly: a probe sample's guest TSC
//! (midpoint of its two RDTSCs) minus the vCPU's TSC offset as KVM holds it (read while the
//! vCPUs are parked: at start, at every pause, after a restore) is a host TSC value; host TSC
//! → host CLOCK_REALTIME comes from `KVM_GET_CLOCK` (REALTIME|HOST_TSC: one kernel snapshot of
//! both), interpolated between the two references around the sample (extrapolated at the host
//! TSC rate beyond them). No TSC scaling: KVM_CAP_TSC_CONTROL is absent under the nested lane and
//! clockvmm never sets a ratio.

use guest_clock::math;
use serde::{Deserialize, Serialize};

use super::probe::{PhcSample, ProbeSample};

/// One (host TSC, host CLOCK_REALTIME) pair from a single KVM_GET_CLOCK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRef {
    /// Host TSC, ticks.
    pub host_tsc: u64,
    /// Host CLOCK_REALTIME, ns.
    pub realtime_ns: u64,
}

/// References kept (oldest dropped).
pub const MAX_REFS: usize = 4096;

/// Host CLOCK_REALTIME at host TSC `tsc`: linear between the bracketing references (exact up to
/// the host's own NTP slew between them), else from the nearest one at `host_khz`.
pub fn host_realtime_at(refs: &[HostRef], host_khz: u32, tsc: u64) -> Option<u64> {
    let below = refs
        .iter()
        .filter(|r| r.host_tsc <= tsc)
        .max_by_key(|r| r.host_tsc);
    let above = refs
        .iter()
        .filter(|r| r.host_tsc > tsc)
        .min_by_key(|r| r.host_tsc);
    match (below, above) {
        (Some(b), Some(a)) if a.realtime_ns >= b.realtime_ns => {
            let span_t = u128::from(a.host_tsc - b.host_tsc);
            let span_ns = u128::from(a.realtime_ns - b.realtime_ns);
            let d = u128::from(tsc - b.host_tsc) * span_ns / span_t.max(1);
            Some(b.realtime_ns.saturating_add(u64::try_from(d).ok()?))
        }
        (Some(b), _) => Some(
            b.realtime_ns
                .saturating_add(math::ticks_to_ns_round(tsc - b.host_tsc, host_khz)),
        ),
        (None, Some(a)) => Some(
            a.realtime_ns
                .saturating_sub(math::ticks_to_ns_round(a.host_tsc - tsc, host_khz)),
        ),
        (None, None) => None,
    }
}

/// A probe sample with the host time it was taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxSample {
    /// vCPU.
    pub vcpu: usize,
    /// The probe's sequence number.
    pub seq: u64,
    /// Guest TSC (midpoint of the probe's two reads), ticks.
    pub guest_tsc: u64,
    /// Guest CLOCK_REALTIME, ns.
    pub guest_realtime_ns: u64,
    /// Guest CLOCK_MONOTONIC, ns.
    pub guest_monotonic_ns: u64,
    /// Guest CLOCK_BOOTTIME, ns.
    pub guest_boottime_ns: u64,
    /// Host CLOCK_REALTIME at that instant, ns.
    pub host_realtime_ns: u64,
    /// The TSC offset used for the mapping.
    pub tsc_offset: u64,
    /// Half the sample's RDTSC bracket in host time, ns (its mapping's uncertainty: a vCPU
    /// exit between the two reads widens it).
    #[serde(default)]
    pub bracket_ns: u64,
}

impl LinuxSample {
    /// Guest CLOCK_REALTIME minus host CLOCK_REALTIME, ns.
    pub fn realtime_error_ns(&self) -> i64 {
        math::diff_signed(self.guest_realtime_ns, self.host_realtime_ns)
    }
}

/// Map a probe sample (None: no reference yet, or no offset for its vCPU).
pub fn map_sample(
    s: &ProbeSample,
    offsets: &[u64],
    refs: &[HostRef],
    host_khz: u32,
) -> Option<LinuxSample> {
    let offset = *offsets.get(s.cpu)?;
    let tsc = s.tsc_mid();
    let host_tsc = tsc.wrapping_sub(offset);
    Some(LinuxSample {
        vcpu: s.cpu,
        seq: s.seq,
        guest_tsc: tsc,
        guest_realtime_ns: s.realtime_ns,
        guest_monotonic_ns: s.monotonic_ns,
        guest_boottime_ns: s.boottime_ns,
        host_realtime_ns: host_realtime_at(refs, host_khz, host_tsc)?,
        tsc_offset: offset,
        bracket_ns: math::ticks_to_ns_round(s.tsc1.saturating_sub(s.tsc0), host_khz) / 2,
    })
}

/// A reading of the guest's vmclock PHC (ptp_vmclock) beside its system clock, against host
/// time.
///
/// Two ways to the PHC's error:
/// - through the system clock: `phc_error_ns` = (PHC − guest CLOCK_REALTIME at the middle of the
///   ioctl's bracket) + the guest CLOCK_REALTIME error of the `s` sample taken just before on the
///   same vCPU (exactly mapped through its TSC); it assumes the guest's realtime error did not
///   move between the two (they are microseconds apart);
/// - directly: `phc_error_direct_ns` = PHC − host realtime at the TSC midpoint of the whole
///   ioctl (`direct_bracket_ns` is half the ioctl's span: n readings, so coarser).
///
/// A PHC's timescale is TAI (Linux 7.x's ptp_vmclock) or UTC (older ones): both errors are
/// against the host's time on the PHC's timescale, `timescale_offset_s` whole seconds from its
/// UTC (TAI − UTC, 37 s, for a TAI PHC; 0 for UTC), found as the whole seconds of PHC − host
/// UTC (not of PHC − guest realtime: the guest's own realtime may be seconds off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxPhcSample {
    /// vCPU.
    pub vcpu: usize,
    /// The `s` sample it follows.
    pub seq: u64,
    /// The PTP device.
    pub dev: String,
    /// The PHC's time, ns.
    pub phc_ns: u64,
    /// Width of the guest CLOCK_REALTIME bracket around the PHC reading, ns.
    pub realtime_bracket_ns: u64,
    /// PHC − guest CLOCK_REALTIME, ns (with the timescale's whole seconds).
    pub phc_minus_guest_realtime_ns: i64,
    /// The PHC's timescale − UTC, whole seconds (37 for TAI, 0 for UTC).
    #[serde(default)]
    pub timescale_offset_s: i64,
    /// The guest's CLOCK_REALTIME − host CLOCK_REALTIME at the `s` sample, ns (its system clock
    /// error, shown beside the PHC's).
    pub guest_realtime_error_ns: Option<i64>,
    /// That sample's half bracket, ns: the uncertainty of `guest_realtime_error_ns` and so of
    /// `phc_error_ns`.
    #[serde(default)]
    pub sample_bracket_ns: Option<u64>,
    /// PHC − host time on the PHC's timescale, through the system clock, ns.
    pub phc_error_ns: Option<i64>,
    /// PHC − host time on the PHC's timescale at the ioctl's TSC midpoint, ns.
    pub phc_error_direct_ns: Option<i64>,
    /// Half the ioctl's span in host time, ns (the direct error's uncertainty).
    pub direct_bracket_ns: u64,
}

/// Map a PHC reading: `sample` is the mapped `s` sample with its vCPU and sequence number
/// (None: not mappable, the system-clock route is then absent too).
pub fn map_phc(
    p: &PhcSample,
    sample: Option<&LinuxSample>,
    offsets: &[u64],
    refs: &[HostRef],
    host_khz: u32,
) -> LinuxPhcSample {
    let sample = sample.filter(|s| s.vcpu == p.cpu && s.seq == p.seq);
    let rt_err = sample.map(LinuxSample::realtime_error_ns);
    let phc_minus = p.phc_minus_realtime_ns();
    // PHC − host UTC both ways, then the timescale: its whole seconds, rounded to the nearest
    // (a PHC error is far below half a second; the guest's own realtime error may not be).
    let via_system = rt_err.map(|e| e.saturating_add(phc_minus));
    let direct_raw = offsets.get(p.cpu).and_then(|off| {
        host_realtime_at(refs, host_khz, p.tsc_mid().wrapping_sub(*off))
            .map(|h| math::diff_signed(p.phc_ns, h))
    });
    let timescale_offset_s = via_system.or(direct_raw).map_or(0, |raw| {
        raw.saturating_add(raw.signum() * 500_000_000) / 1_000_000_000
    });
    let scale_ns = timescale_offset_s * 1_000_000_000;
    LinuxPhcSample {
        vcpu: p.cpu,
        seq: p.seq,
        dev: p.dev.clone(),
        phc_ns: p.phc_ns,
        realtime_bracket_ns: p.rt1_ns.saturating_sub(p.rt0_ns),
        phc_minus_guest_realtime_ns: phc_minus,
        timescale_offset_s,
        guest_realtime_error_ns: rt_err,
        sample_bracket_ns: sample.map(|s| s.bracket_ns),
        phc_error_ns: via_system.map(|r| r.saturating_sub(scale_ns)),
        phc_error_direct_ns: direct_raw.map(|r| r.saturating_sub(scale_ns)),
        direct_bracket_ns: math::ticks_to_ns_round(p.tsc1.saturating_sub(p.tsc0), host_khz) / 2,
    }
}

/// The first probe sample whose clocks were read after a pause at which the VMM had parsed the
/// guest's samples up to sequence number `last_parsed`.
///
/// first = `last_parsed` + 2: the probe drains its console output before each reading (see
/// `guest/linux/probe.c`), so at most one sample, `last_parsed` + 1, was read before the pause
/// with its line not yet out (a restored guest's tty then prints it from the destination, where
/// its TSC maps through the new offsets as if read after the landing: it must not count).
pub fn first_seq_after_pause(last_parsed: u64) -> u64 {
    last_parsed.saturating_add(2)
}

/// Per vCPU, the item with the smallest `key` among those `keep` accepts (the sample with the
/// narrowest RDTSC bracket, say: a vCPU exit inside a sample's bracket makes its host time
/// uncertain by as much), sorted by vCPU.
pub fn narrowest<T: Clone + PerVcpu>(
    all: impl IntoIterator<Item = T>,
    keep: impl Fn(&T) -> bool,
    key: impl Fn(&T) -> u64,
) -> Vec<T> {
    let mut best: Vec<T> = Vec::new();
    for x in all.into_iter().filter(|x| keep(x)) {
        match best.iter_mut().find(|b| b.vcpu() == x.vcpu()) {
            Some(b) if key(&x) < key(b) => *b = x,
            Some(_) => {}
            None => best.push(x),
        }
    }
    best.sort_by_key(PerVcpu::vcpu);
    best
}

/// A per-vCPU reading.
pub trait PerVcpu {
    /// Its vCPU.
    fn vcpu(&self) -> usize;
}

impl PerVcpu for LinuxSample {
    fn vcpu(&self) -> usize {
        self.vcpu
    }
}

impl PerVcpu for LinuxPhcSample {
    fn vcpu(&self) -> usize {
        self.vcpu
    }
}

/// What a disruption did to the guest's clocks, from the last sample of a vCPU before it and
/// the first one after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxDisruption {
    /// vCPU.
    pub vcpu: usize,
    /// Guest CLOCK_REALTIME − host CLOCK_REALTIME after the disruption, ns.
    pub realtime_error_after_ns: i64,
    /// The same before it (the guest's standing error), ns.
    pub realtime_error_before_ns: i64,
    /// Host time between the two samples (the downtime plus the sampling gap), ns.
    pub host_elapsed_ns: i64,
    /// CLOCK_MONOTONIC advance − host elapsed, ns (0: the guest counted the downtime exactly).
    pub monotonic_error_ns: i64,
    /// CLOCK_BOOTTIME advance − host elapsed, ns.
    pub boottime_error_ns: i64,
    /// Guest TSC advance − host elapsed × guest TSC rate, ticks (0: TSC continuous).
    pub tsc_error_ticks: i64,
    /// The wider half RDTSC bracket of the two samples, ns: the uncertainty of the time
    /// figures above (the TSC one is exact at the brackets' midpoints).
    #[serde(default)]
    pub bracket_ns: u64,
}

/// Compare one vCPU's samples across a disruption; `khz` is the guest TSC rate.
pub fn disruption(before: &LinuxSample, after: &LinuxSample, khz: u32) -> LinuxDisruption {
    let host = math::diff_signed(after.host_realtime_ns, before.host_realtime_ns);
    let ticks = math::diff_signed(after.guest_tsc, before.guest_tsc);
    let expected_ticks = (i128::from(host) * i128::from(khz) / 1_000_000) as i64;
    LinuxDisruption {
        vcpu: after.vcpu,
        realtime_error_after_ns: after.realtime_error_ns(),
        realtime_error_before_ns: before.realtime_error_ns(),
        host_elapsed_ns: host,
        monotonic_error_ns: math::diff_signed(after.guest_monotonic_ns, before.guest_monotonic_ns)
            .saturating_sub(host),
        boottime_error_ns: math::diff_signed(after.guest_boottime_ns, before.guest_boottime_ns)
            .saturating_sub(host),
        tsc_error_ticks: ticks.saturating_sub(expected_ticks),
        bracket_ns: before.bracket_ns.max(after.bracket_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_exact_between_references_and_extrapolates_outside() {
        let refs = [
            HostRef {
                host_tsc: 1_000_000,
                realtime_ns: 10_000_000,
            },
            HostRef {
                host_tsc: 3_000_000,
                realtime_ns: 11_000_000,
            },
        ];
        // 2 GHz between the references.
        assert_eq!(
            host_realtime_at(&refs, 2_000_000, 2_000_000),
            Some(10_500_000)
        );
        assert_eq!(
            host_realtime_at(&refs, 2_000_000, 5_000_000),
            Some(12_000_000)
        );
        assert_eq!(host_realtime_at(&refs, 2_000_000, 0), Some(9_500_000));
        assert_eq!(host_realtime_at(&[], 2_000_000, 0), None);
        let s = ProbeSample {
            cpu: 1,
            seq: 0,
            tsc0: 2_000_100,
            realtime_ns: 10_500_070,
            monotonic_ns: 5,
            boottime_ns: 5,
            tsc1: 2_000_300,
        };
        let m = map_sample(&s, &[0, 100], &refs, 2_000_000).unwrap();
        assert_eq!(m.host_realtime_ns, 10_500_050);
        assert_eq!(m.realtime_error_ns(), 20);
        assert!(map_sample(&s, &[0], &refs, 2_000_000).is_none());
    }

    #[test]
    fn a_phc_reading_is_mapped_both_ways() {
        // 1 GHz host TSC, offset 1000 on vCPU 0; host realtime = 5e9 + host TSC.
        let refs = [
            HostRef {
                host_tsc: 0,
                realtime_ns: 5_000_000_000,
            },
            HostRef {
                host_tsc: 1_000_000_000,
                realtime_ns: 6_000_000_000,
            },
        ];
        let s = ProbeSample {
            cpu: 0,
            seq: 4,
            tsc0: 100_000_000,
            realtime_ns: 5_099_999_000 + 300, // guest realtime 300 ns ahead
            monotonic_ns: 1,
            boottime_ns: 1,
            tsc1: 100_000_000,
        };
        let mapped = map_sample(&s, &[1000], &refs, 1_000_000).unwrap();
        assert_eq!(mapped.realtime_error_ns(), 300);
        // The PHC read 10 µs later, 200 ns behind the guest's realtime.
        let p = PhcSample {
            cpu: 0,
            seq: 4,
            dev: "ptp0".into(),
            tsc0: 100_009_000,
            phc_ns: 5_100_009_100,
            rt0_ns: 5_100_008_800,
            rt1_ns: 5_100_009_800,
            tsc1: 100_011_000,
            n: 3,
        };
        let m = map_phc(&p, Some(&mapped), &[1000], &refs, 1_000_000);
        assert_eq!(m.phc_minus_guest_realtime_ns, -200);
        assert_eq!(m.guest_realtime_error_ns, Some(300));
        assert_eq!(m.phc_error_ns, Some(100));
        // Direct: host realtime at TSC 100_010_000 − 1000 is 5_100_009_000.
        assert_eq!(m.phc_error_direct_ns, Some(100));
        assert_eq!(m.direct_bracket_ns, 1_000);
        assert_eq!(m.realtime_bracket_ns, 1_000);
        // Another sample (or none): no system-clock route.
        let other = LinuxSample { seq: 5, ..mapped };
        let m = map_phc(&p, Some(&other), &[1000], &refs, 1_000_000);
        assert_eq!((m.guest_realtime_error_ns, m.phc_error_ns), (None, None));
        assert!(map_phc(&p, None, &[], &refs, 1_000_000)
            .phc_error_direct_ns
            .is_none());
        assert_eq!(m.timescale_offset_s, 0);
        // A TAI PHC (Linux 7.x) 37 s ahead: the same errors on its timescale.
        let tai = PhcSample {
            phc_ns: p.phc_ns + 37_000_000_000,
            ..p.clone()
        };
        let m = map_phc(&tai, Some(&mapped), &[1000], &refs, 1_000_000);
        assert_eq!(m.timescale_offset_s, 37);
        assert_eq!(m.phc_minus_guest_realtime_ns, 37_000_000_000 - 200);
        assert_eq!(
            (m.phc_error_ns, m.phc_error_direct_ns),
            (Some(100), Some(100))
        );
        // A guest realtime 1.5 s behind (as seen nested) does not move the timescale.
        let late = LinuxSample {
            guest_realtime_ns: mapped.guest_realtime_ns - 1_500_000_000,
            ..mapped
        };
        let lagging = PhcSample {
            rt0_ns: tai.rt0_ns - 1_500_000_000,
            rt1_ns: tai.rt1_ns - 1_500_000_000,
            ..tai.clone()
        };
        let m = map_phc(&lagging, Some(&late), &[1000], &refs, 1_000_000);
        assert_eq!(m.timescale_offset_s, 37);
        assert_eq!(m.guest_realtime_error_ns, Some(300 - 1_500_000_000));
        assert_eq!(
            (m.phc_error_ns, m.phc_error_direct_ns),
            (Some(100), Some(100))
        );
    }

    #[test]
    fn a_continuous_guest_has_no_disruption_error() {
        let b = LinuxSample {
            vcpu: 0,
            seq: 1,
            guest_tsc: 1_000,
            guest_realtime_ns: 1_000_000_000,
            guest_monotonic_ns: 50,
            guest_boottime_ns: 60,
            host_realtime_ns: 1_000_000_000,
            tsc_offset: 0,
            bracket_ns: 0,
        };
        let a = LinuxSample {
            guest_tsc: 1_000 + 400_000_000,
            guest_realtime_ns: 1_200_000_000,
            guest_monotonic_ns: 200_000_050,
            guest_boottime_ns: 200_000_060,
            host_realtime_ns: 1_200_000_000,
            ..b
        };
        let d = disruption(&b, &a, 2_000_000);
        assert_eq!(
            (d.monotonic_error_ns, d.boottime_error_ns, d.tsc_error_ticks),
            (0, 0, 0)
        );
        assert_eq!(d.host_elapsed_ns, 200_000_000);
        let lost = LinuxSample {
            guest_monotonic_ns: 50 + 1_000,
            ..a
        };
        assert_eq!(
            disruption(&b, &lost, 2_000_000).monotonic_error_ns,
            -199_999_000
        );
    }
}
