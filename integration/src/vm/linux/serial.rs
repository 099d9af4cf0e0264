//! The guest's console: a vm-superio 8250 UART at 0x3f8 (IRQ 4 through an irqfd), whose output
//! goes to the VMM's stdout or a file and, line by line, into a bounded [`ConsoleLog`] that the
//! probe parser and the complaint scanner read.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::probe::{self, GuestVmclockView, PhcSample, ProbeLine, ProbeSample};
use crate::vm::lock;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// COM1's IRQ (GSI).
pub const COM1_GSI: u32 = 4;
/// Lines kept in the log.
pub const MAX_LINES: usize = 4096;
/// Probe samples kept.
pub const MAX_SAMPLES: usize = 100_000;
/// The longest line kept whole (longer ones are cut).
pub const MAX_LINE: usize = 4096;
/// PHC readings kept.
pub const MAX_PHC: usize = 10_000;
/// Module results, PHC errors kept.
pub const MAX_NOTES: usize = 64;

/// The serial interrupt: an eventfd registered as an irqfd on GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// How often [`IrqWatch::check`] runs while the vCPUs run.
pub const IRQ_WATCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// IER: received data available; transmitter holding register empty.
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
/// IIR as vm-superio keeps it: no interrupt; THRE; received data.
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;

/// An interrupt condition is pending (the guest did not read IIR since it arose) and enabled.
pub fn interrupt_pending(ier: u8, iir: u8) -> bool {
    iir & IIR_NONE == 0
        && ((iir & IIR_THRE != 0 && ier & IER_THRE != 0)
            || (iir & IIR_RDA != 0 && ier & IER_RDA != 0))
}

/// COM1's interrupt as a level.
///
/// vm-superio raises the interrupt as an edge (one eventfd write through the irqfd on GSI 4)
/// when a condition arises; a real 8250 holds a level while an enabled condition is pending, so
/// an interrupt the guest's interrupt controller did not take at that instant (its pin masked
/// while the driver sets the port up) is taken once the pin is unmasked. An edge lost that way
/// is lost for good: the guest's driver waits for a THRE interrupt that never comes, and its
/// console, and every task that writes to or opens it, stalls. The watch gives the level back:
/// a condition pending and enabled at two checks in a row, with no guest access to the UART in
/// between (a guest that services it reads IIR), is raised again.
#[derive(Debug, Default)]
pub struct IrqWatch {
    accesses_seen: u64,
    pending_before: bool,
    /// Interrupts raised again, in all.
    pub reraised: u64,
}

impl IrqWatch {
    /// One check: `accesses` counts the guest's accesses to the UART so far, `ier`/`iir` its
    /// registers now. True: raise the interrupt again.
    pub fn check(&mut self, accesses: u64, ier: u8, iir: u8) -> bool {
        let untouched = accesses == self.accesses_seen;
        self.accesses_seen = accesses;
        let pending = interrupt_pending(ier, iir);
        let raise = pending && untouched && self.pending_before;
        // After raising, wait two more checks: the guest gets a whole period to take it.
        self.pending_before = pending && !raise;
        self.reraised += u64::from(raise);
        raise
    }
}

/// What the guest printed.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    partial: Vec<u8>,
    /// The last [`MAX_LINES`] lines.
    pub lines: VecDeque<String>,
    /// Lines seen in all.
    pub total_lines: u64,
    /// The probe's samples, oldest first (the last [`MAX_SAMPLES`]).
    pub samples: VecDeque<ProbeSample>,
    /// The guest's clocksource as the probe last reported it.
    pub clocksource: Option<String>,
    /// vCPUs the probe reported at start (0: no probe yet).
    pub probe_cpus: usize,
    /// Kernel complaints about time (clocksource watchdog, soft lockup, ...), with their line.
    pub complaints: Vec<String>,
    /// The probe said goodbye.
    pub probe_done: bool,
    /// Modules the probe loaded: (name, finit_module result).
    pub modules: Vec<(String, i64)>,
    /// The vmclock PTP clock the probe found (`ptpN`).
    pub phc_device: Option<String>,
    /// Why the probe found no vmclock PTP clock.
    pub phc_unavailable: Option<String>,
    /// Failed PHC readings (the probe reports the first few).
    pub phc_errors: Vec<String>,
    /// The PHC readings, oldest first (the last [`MAX_PHC`]).
    pub phc: VecDeque<PhcSample>,
    /// The vmclock structure as the guest last read it.
    pub guest_vmclock: Option<GuestVmclockView>,
    /// Why the guest has no vmclock device (or its read failed).
    pub guest_vmclock_unavailable: Option<String>,
}

impl ConsoleLog {
    fn push_byte(&mut self, b: u8) {
        if b == b'\n' {
            let line = String::from_utf8_lossy(&self.partial)
                .trim_end_matches('\r')
                .to_string();
            self.partial.clear();
            self.push_line(line);
        } else if self.partial.len() < MAX_LINE {
            self.partial.push(b);
        }
    }

    fn push_line(&mut self, line: String) {
        self.total_lines += 1;
        match probe::parse_line(&line) {
            Some(ProbeLine::Sample(s)) => {
                if self.samples.len() == MAX_SAMPLES {
                    self.samples.pop_front();
                }
                self.samples.push_back(s);
            }
            Some(ProbeLine::Clocksource(c)) => self.clocksource = Some(c),
            Some(ProbeLine::Hello { cpus }) => self.probe_cpus = cpus,
            Some(ProbeLine::Bye) => self.probe_done = true,
            Some(ProbeLine::Module { name, rc }) => {
                if self.modules.len() < MAX_NOTES {
                    self.modules.push((name, rc));
                }
            }
            Some(ProbeLine::PhcFound { dev, .. }) => self.phc_device = Some(dev),
            Some(ProbeLine::PhcNone(why)) => self.phc_unavailable = Some(why),
            Some(ProbeLine::PhcError(e)) => {
                if self.phc_errors.len() < MAX_NOTES {
                    self.phc_errors.push(e);
                }
            }
            Some(ProbeLine::Phc(p)) => {
                if self.phc.len() == MAX_PHC {
                    self.phc.pop_front();
                }
                self.phc.push_back(p);
            }
            Some(ProbeLine::Vmclock(v)) => self.guest_vmclock = Some(v),
            Some(ProbeLine::VmclockNone(why)) => self.guest_vmclock_unavailable = Some(why),
            None => {
                if probe::is_time_complaint(&line) && self.complaints.len() < 1000 {
                    self.complaints.push(line.clone());
                }
            }
        }
        if self.lines.len() == MAX_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

/// The console: where output goes, and the log.
pub struct Console {
    out: Mutex<Box<dyn Write + Send>>,
    /// What the guest printed.
    pub log: Mutex<ConsoleLog>,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Arc<Console> {
        Arc::new(Console {
            out: Mutex::new(out),
            log: Mutex::new(ConsoleLog::default()),
        })
    }
}

/// The UART's output side: tees into the console's sink and its log.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A broken sink (closed stdout) must not stop the guest: its output is dropped.
        let _ = lock(&self.0.out).write_all(buf);
        let mut log = lock(&self.0.log);
        for b in buf {
            log.push_byte(*b);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = lock(&self.0.out).flush();
        Ok(())
    }
}

/// The UART.
pub type Uart = Serial<IrqTrigger, NoEvents, ConsoleWriter>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_raises_only_an_interrupt_left_pending_and_untouched() {
        assert!(interrupt_pending(IER_THRE, IIR_THRE));
        assert!(interrupt_pending(IER_RDA | IER_THRE, IIR_RDA));
        assert!(!interrupt_pending(IER_RDA, IIR_THRE), "THRE not enabled");
        assert!(!interrupt_pending(IER_THRE, IIR_NONE));
        assert!(!interrupt_pending(0, IIR_THRE | IIR_RDA));
        let mut w = IrqWatch::default();
        // Serviced: the guest touches the UART between checks.
        for n in 1..10 {
            assert!(!w.check(n, IER_THRE, IIR_THRE));
        }
        // Left pending and untouched since the last check: raised, then two checks apart.
        assert!(w.check(9, IER_THRE, IIR_THRE));
        assert!(!w.check(9, IER_THRE, IIR_THRE));
        assert!(w.check(9, IER_THRE, IIR_THRE));
        assert_eq!(w.reraised, 2);
        // Nothing pending: nothing raised however long the guest leaves it.
        assert!(!w.check(9, IER_THRE, IIR_NONE));
        assert!(!w.check(9, IER_THRE, IIR_NONE));
        assert!(!w.check(9, IER_THRE, IIR_NONE));
        // Pending but disabled (the console masks IER while it writes).
        assert!(!w.check(9, 0, IIR_THRE));
        assert!(!w.check(9, 0, IIR_THRE));
        assert_eq!(w.reraised, 2);
    }

    #[test]
    fn the_log_splits_lines_parses_probe_lines_and_bounds_everything() {
        let c = Console::new(Box::new(std::io::sink()));
        let mut w = ConsoleWriter(c.clone());
        w.write_all(b"[    0.1] hello\r\nGCPROBE hello v=1 cpus=2 period_ms=100\nGCPROBE s cpu=1 seq=3 tsc0=10 rt=20 mono=30 boot=40 tsc1=12\n")
            .unwrap();
        w.write_all(b"GCPROBE mod name=ptp_vmclock rc=0\nGCPROBE phc found dev=ptp0 name=vmclock0\nGCPROBE phc cpu=1 seq=3 dev=ptp0 tsc0=13 phc=25 rt0=21 rt1=23 tsc1=15 n=3\nGCPROBE vmclock dev=vmclock0 seq=4 status=2 marker=0 gen=0 flags=256 counter_id=1\n")
            .unwrap();
        w.write_all(b"clocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable\npartial")
            .unwrap();
        let log = lock(&c.log);
        assert_eq!(log.total_lines, 8);
        assert_eq!(log.probe_cpus, 2);
        assert_eq!(log.modules, vec![("ptp_vmclock".to_string(), 0)]);
        assert_eq!(log.phc_device.as_deref(), Some("ptp0"));
        assert_eq!(log.phc.len(), 1);
        assert_eq!(log.phc[0].phc_minus_realtime_ns(), 3);
        assert_eq!(log.guest_vmclock.as_ref().map(|v| v.seq_count), Some(4));
        assert_eq!(log.samples.len(), 1);
        assert_eq!(log.samples[0].cpu, 1);
        assert_eq!(log.complaints.len(), 1);
        assert!(log.lines.iter().any(|l| l.contains("hello")));
        drop(log);
        w.write_all(&vec![b'x'; 10 * MAX_LINE]).unwrap();
        w.write_all(b"\n").unwrap();
        assert!(lock(&c.log).lines.back().unwrap().len() <= MAX_LINE);
    }
}
