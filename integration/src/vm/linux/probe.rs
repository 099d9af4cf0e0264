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

/// A parsed probe line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeLine {
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
}
