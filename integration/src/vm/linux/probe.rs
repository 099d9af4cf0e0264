//! The guest probe's report lines (see `guest/linux/probe.c`) and the kernel messages that
//! mean the guest noticed a time disruption.

/// One sample: the guest's TSC around its three clocks, on one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeSample {
    /// The vCPU.
    pub cpu: usize,
    /// The probe's sample counter (over all vCPUs).
    pub seq: u64,
    /// RDTSC before the clock reads.
    pub tsc0: u64,
    /// CLOCK_REALTIME, ns.
    pub realtime_ns: u64,
    /// CLOCK_MONOTONIC, ns.
    pub monotonic_ns: u64,
    /// CLOCK_BOOTTIME, ns.
    pub boottime_ns: u64,
    /// RDTSC after the clock reads.
    pub tsc1: u64,
}

impl ProbeSample {
    /// The guest TSC the clocks are taken at: the midpoint of the two reads.
    pub fn tsc_mid(&self) -> u64 {
        self.tsc0 / 2 + self.tsc1 / 2 + (self.tsc0 % 2 + self.tsc1 % 2) / 2
    }
}

/// One PTP_SYS_OFFSET_EXTENDED reading of the vmclock PHC: its best (narrowest) reading.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhcSample {
    /// The vCPU it was read on.
    pub cpu: usize,
    /// The `s` sample taken just before it on that vCPU.
    pub seq: u64,
    /// The PTP device (`ptpN`).
    pub dev: String,
    /// RDTSC before the ioctl.
    pub tsc0: u64,
    /// The PHC's time, ns (UTC, as ptp_vmclock computes it from the vmclock page).
    pub phc_ns: u64,
    /// Guest CLOCK_REALTIME just before the PHC reading, ns.
    pub rt0_ns: u64,
    /// Guest CLOCK_REALTIME just after it, ns (= `rt0_ns` when the system clocksource is the
    /// vmclock's counter: one counter read serves both).
    pub rt1_ns: u64,
    /// RDTSC after the ioctl.
    pub tsc1: u64,
    /// Readings the ioctl made.
    pub n: u32,
}

impl PhcSample {
    /// The middle of the CLOCK_REALTIME bracket, ns.
    pub fn realtime_mid_ns(&self) -> u64 {
        self.rt0_ns / 2 + self.rt1_ns / 2 + (self.rt0_ns % 2 + self.rt1_ns % 2) / 2
    }

    /// PHC − guest CLOCK_REALTIME at the bracket's middle, ns.
    pub fn phc_minus_realtime_ns(&self) -> i64 {
        guest_clock::math::diff_signed(self.phc_ns, self.realtime_mid_ns())
    }

    /// The TSC midpoint of the ioctl.
    pub fn tsc_mid(&self) -> u64 {
        self.tsc0 / 2 + self.tsc1 / 2 + (self.tsc0 % 2 + self.tsc1 % 2) / 2
    }
}

/// The vmclock structure as the guest's `/dev/vmclockN` read it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestVmclockView {
    /// The device.
    pub dev: String,
    /// `seq_count` (even: a consistent copy).
    pub seq_count: u32,
    /// `clock_status`.
    pub clock_status: u8,
    /// `disruption_marker`.
    pub disruption_marker: u64,
    /// `vm_generation_counter`.
    pub vm_generation_counter: u64,
    /// `flags`.
    pub flags: u64,
    /// `counter_id`.
    pub counter_id: u8,
}

/// A parsed probe line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeLine {
    /// `GCPROBE mod name=N rc=R`: a module the probe loaded (rc 0 or −errno).
    Module {
        /// Module name.
        name: String,
        /// finit_module's result.
        rc: i64,
    },
    /// `GCPROBE phc found dev=ptpN name=vmclock0`
    PhcFound {
        /// The PTP device.
        dev: String,
        /// Its clock_name.
        name: String,
    },
    /// `GCPROBE phc none reason=...`: no vmclock PTP clock.
    PhcNone(String),
    /// `GCPROBE phc err ...`: a PHC reading failed (the rest of the line).
    PhcError(String),
    /// `GCPROBE phc cpu=...`
    Phc(PhcSample),
    /// `GCPROBE vmclock dev=...`
    Vmclock(GuestVmclockView),
    /// `GCPROBE vmclock none|err ...`: no vmclock device, or its read failed.
    VmclockNone(String),
    /// `GCPROBE hello v=1 cpus=N period_ms=P`
    Hello {
        /// Online vCPUs.
        cpus: usize,
    },
    /// `GCPROBE cs name=X`
    Clocksource(String),
    /// `GCPROBE s ...`
    Sample(ProbeSample),
    /// `GCPROBE bye`
    Bye,
}

fn field<'a>(words: &[&'a str], name: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

fn num(words: &[&str], name: &str) -> Option<u64> {
    field(words, name)?.parse().ok()
}

fn small<T: TryFrom<u64>>(words: &[&str], name: &str) -> Option<T> {
    T::try_from(num(words, name)?).ok()
}

/// The rest of the line after `key=` (free text).
fn rest_after<'a>(rest: &'a str, key: &str) -> &'a str {
    rest.find(key)
        .map_or(rest, |i| &rest[i + key.len()..])
        .trim()
}

/// Parse one console line (anything before "GCPROBE", such as a kernel timestamp, is ignored;
/// malformed probe lines are `None`).
pub fn parse_line(line: &str) -> Option<ProbeLine> {
    let rest = &line[line.find("GCPROBE ")? + 8..];
    let words: Vec<&str> = rest.split_whitespace().collect();
    match *words.first()? {
        "hello" => Some(ProbeLine::Hello {
            cpus: usize::try_from(num(&words, "cpus")?).ok()?,
        }),
        "cs" => Some(ProbeLine::Clocksource(field(&words, "name")?.to_string())),
        "bye" => Some(ProbeLine::Bye),
        "mod" => Some(ProbeLine::Module {
            name: field(&words, "name")?.to_string(),
            rc: field(&words, "rc")?.parse().ok()?,
        }),
        "phc" => match *words.get(1)? {
            "found" => Some(ProbeLine::PhcFound {
                dev: field(&words, "dev")?.to_string(),
                name: field(&words, "name")?.to_string(),
            }),
            "none" => Some(ProbeLine::PhcNone(rest_after(rest, "reason=").to_string())),
            "err" => Some(ProbeLine::PhcError(rest_after(rest, "err").to_string())),
            _ => Some(ProbeLine::Phc(PhcSample {
                cpu: small(&words, "cpu")?,
                seq: num(&words, "seq")?,
                dev: field(&words, "dev")?.to_string(),
                tsc0: num(&words, "tsc0")?,
                phc_ns: num(&words, "phc")?,
                rt0_ns: num(&words, "rt0")?,
                rt1_ns: num(&words, "rt1")?,
                tsc1: num(&words, "tsc1")?,
                n: small(&words, "n")?,
            })),
        },
        "vmclock" => match *words.get(1)? {
            "none" => Some(ProbeLine::VmclockNone(
                rest_after(rest, "reason=").to_string(),
            )),
            "err" => Some(ProbeLine::VmclockNone(rest_after(rest, "err").to_string())),
            _ => Some(ProbeLine::Vmclock(GuestVmclockView {
                dev: field(&words, "dev")?.to_string(),
                seq_count: small(&words, "seq")?,
                clock_status: small(&words, "status")?,
                disruption_marker: num(&words, "marker")?,
                vm_generation_counter: num(&words, "gen")?,
                flags: num(&words, "flags")?,
                counter_id: small(&words, "counter_id")?,
            })),
        },
        "s" => Some(ProbeLine::Sample(ProbeSample {
            cpu: usize::try_from(num(&words, "cpu")?).ok()?,
            seq: num(&words, "seq")?,
            tsc0: num(&words, "tsc0")?,
            realtime_ns: num(&words, "rt")?,
            monotonic_ns: num(&words, "mono")?,
            boottime_ns: num(&words, "boot")?,
            tsc1: num(&words, "tsc1")?,
        })),
        _ => None,
    }
}

/// Kernel messages that mean the guest noticed a time disruption.
pub const TIME_COMPLAINTS: &[&str] = &[
    "clocksource watchdog",
    "timekeeping watchdog",
    "Marking clocksource",
    "as unstable",
    "soft lockup",
    "hard LOCKUP",
    "time went backwards",
    "rcu_sched self-detected stall",
    "rcu: INFO: rcu_preempt",
    "self-detected stall",
    "TSC ADJUST",
    "tsc: Marking TSC unstable",
    "hung_task",
];

/// Whether a console line is one of [`TIME_COMPLAINTS`].
pub fn is_time_complaint(line: &str) -> bool {
    !line.contains("GCPROBE") && TIME_COMPLAINTS.iter().any(|p| line.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_probe_and_refuses_garbage() {
        let s = parse_line("GCPROBE s cpu=0 seq=1 tsc0=5 rt=6 mono=7 boot=8 tsc1=8").unwrap();
        let ProbeLine::Sample(s) = s else { panic!() };
        assert_eq!((s.cpu, s.tsc0, s.tsc1, s.tsc_mid()), (0, 5, 8, 6));
        assert_eq!(
            parse_line("x GCPROBE cs name=kvm-clock"),
            Some(ProbeLine::Clocksource("kvm-clock".into()))
        );
        assert_eq!(parse_line("GCPROBE bye"), Some(ProbeLine::Bye));
        for bad in [
            "",
            "GCPROBE",
            "GCPROBE s cpu=0",
            "GCPROBE s cpu=-1 seq=1 tsc0=5 rt=6 mono=7 boot=8 tsc1=8",
            "GCPROBE s cpu=0 seq=1 tsc0=99999999999999999999 rt=6 mono=7 boot=8 tsc1=8",
            "GCPROBE what",
            "GCPROBE hello cpus=x",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
        let big = ProbeSample {
            cpu: 0,
            seq: 0,
            tsc0: u64::MAX,
            realtime_ns: 0,
            monotonic_ns: 0,
            boottime_ns: 0,
            tsc1: u64::MAX,
        };
        assert_eq!(big.tsc_mid(), u64::MAX);
        assert!(is_time_complaint(
            "[ 3.2] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"
        ));
        assert!(!is_time_complaint(
            "[ 0.0] clocksource: tsc: mask: 0xffffffffffffffff"
        ));
    }

    /// Lines as the probe prints them in the nested lane (values from a kvm-clock guest).
    #[test]
    fn parses_the_module_phc_and_vmclock_lines() {
        assert_eq!(
            parse_line("GCPROBE mod name=ptp_vmclock rc=0"),
            Some(ProbeLine::Module {
                name: "ptp_vmclock".into(),
                rc: 0
            })
        );
        assert_eq!(
            parse_line("GCPROBE mod name=ptp_vmclock rc=-17"),
            Some(ProbeLine::Module {
                name: "ptp_vmclock".into(),
                rc: -17
            })
        );
        assert_eq!(
            parse_line("GCPROBE phc found dev=ptp0 name=vmclock0"),
            Some(ProbeLine::PhcFound {
                dev: "ptp0".into(),
                name: "vmclock0".into()
            })
        );
        assert_eq!(
            parse_line("GCPROBE phc none reason=no PTP clock named vmclock*; clocks: none"),
            Some(ProbeLine::PhcNone(
                "no PTP clock named vmclock*; clocks: none".into()
            ))
        );
        assert_eq!(
            parse_line("GCPROBE phc err cpu=1 dev=ptp0 errno=22 (Invalid argument)"),
            Some(ProbeLine::PhcError(
                "cpu=1 dev=ptp0 errno=22 (Invalid argument)".into()
            ))
        );
        let line = "[   14.2] GCPROBE phc cpu=1 seq=7 dev=ptp0 tsc0=91234567890 \
                    phc=1764578472123456789 rt0=1764578472123450001 rt1=1764578472123460001 \
                    tsc1=91234667890 n=3";
        let Some(ProbeLine::Phc(p)) = parse_line(line) else {
            panic!("{line}")
        };
        assert_eq!((p.cpu, p.seq, p.dev.as_str(), p.n), (1, 7, "ptp0", 3));
        assert_eq!(p.realtime_mid_ns(), 1_764_578_472_123_455_001);
        assert_eq!(p.phc_minus_realtime_ns(), 1_788);
        assert_eq!(p.tsc_mid(), 91_234_617_890);
        let v = parse_line(
            "GCPROBE vmclock dev=vmclock0 seq=42 status=2 marker=0 gen=0 flags=352 counter_id=1",
        );
        assert_eq!(
            v,
            Some(ProbeLine::Vmclock(GuestVmclockView {
                dev: "vmclock0".into(),
                seq_count: 42,
                clock_status: 2,
                disruption_marker: 0,
                vm_generation_counter: 0,
                flags: 352,
                counter_id: 1,
            }))
        );
        assert!(matches!(
            parse_line("GCPROBE vmclock none reason=no /dev/vmclock0 (No such file or directory)"),
            Some(ProbeLine::VmclockNone(r)) if r.starts_with("no /dev/vmclock0")
        ));
        for bad in [
            "GCPROBE mod name=x",
            "GCPROBE mod rc=0",
            "GCPROBE phc",
            "GCPROBE phc cpu=0 seq=1 dev=ptp0 tsc0=1 phc=-5 rt0=1 rt1=2 tsc1=3 n=3",
            "GCPROBE phc cpu=0 seq=1 dev=ptp0 tsc0=1 phc=5 rt0=1 tsc1=3 n=3",
            "GCPROBE vmclock dev=vmclock0 seq=1 status=300 marker=0 gen=0 flags=0 counter_id=1",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }
}
