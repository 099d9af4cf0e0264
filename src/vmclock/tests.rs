//! vmclock structure, protocol and concurrency tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::signal::HostVmclockMemory;

fn sample_abi() -> VmclockAbi {
    VmclockAbi {
        magic: VMCLOCK_MAGIC,
        size: VMCLOCK_PAGE_SIZE,
        version: 1,
        counter_id: VMCLOCK_COUNTER_X86_TSC,
        time_type: VMCLOCK_TIME_UTC,
        seq_count: 4,
        disruption_marker: 0x0102_0304_0506_0708,
        flags: VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT | VMCLOCK_FLAG_TAI_OFFSET_VALID,
        clock_status: VMCLOCK_STATUS_SYNCHRONIZED,
        leap_second_smearing_hint: 0,
        tai_offset_sec: -37,
        leap_indicator: VMCLOCK_LEAP_PRE_POS,
        counter_period_shift: 29,
        counter_value: 1_000_000,
        counter_period_frac_sec: 0x8970_5f41_36b4_a597,
        counter_period_esterror_rate_frac_sec: 11,
        counter_period_maxerror_rate_frac_sec: 22,
        time_sec: 1_764_000_000,
        time_frac_sec: 1 << 63,
        time_esterror_nanosec: 33,
        time_maxerror_nanosec: 44,
        vm_generation_counter: 55,
    }
}

#[test]
fn encode_decode_layout() {
    let a = sample_abi();
    let b = a.encode();
    assert_eq!(VmclockAbi::decode(&b), Some(a));
    assert_eq!(VmclockAbi::decode(&b[..111]), None);
    // Offsets from vmclock-abi.h.
    assert_eq!(&b[0..4], b"VCLK");
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 4096);
    assert_eq!(b[10], 1);
    assert_eq!(b[34], VMCLOCK_STATUS_SYNCHRONIZED);
    assert_eq!(i16::from_le_bytes([b[36], b[37]]), -37);
    assert_eq!(b[38], VMCLOCK_LEAP_PRE_POS);
    assert_eq!(b[39], 29);
    assert_eq!(u64::from_le_bytes(b[40..48].try_into().unwrap()), 1_000_000);
    assert_eq!(u64::from_le_bytes(b[104..112].try_into().unwrap()), 55);
    assert_eq!(&b[32..34], &[0, 0], "pad");
    assert!(a.check_header().is_ok());
    assert!(VmclockAbi::default().check_header().is_err());
    assert!(a.describe().contains("SYNCHRONIZED"));
}

#[test]
fn time_at_as_ptp_vmclock() {
    let a = sample_abi();
    // 1 GHz period: 1000 ticks = 1 µs after .5 s.
    let t = a.time_at(a.counter_value + 1000).unwrap();
    assert_eq!(t.sec, 1_764_000_000);
    assert!(t.nsec.abs_diff(500_001_000) <= 1, "{t:?}");
    // UNRELIABLE, INVALID counter, TAI without a valid offset: no time.
    for bad in [
        VmclockAbi {
            clock_status: VMCLOCK_STATUS_UNRELIABLE,
            ..a
        },
        VmclockAbi {
            counter_id: VMCLOCK_COUNTER_INVALID,
            ..a
        },
        VmclockAbi {
            time_type: VMCLOCK_TIME_TAI,
            flags: 0,
            ..a
        },
        VmclockAbi {
            time_type: VMCLOCK_TIME_MONOTONIC,
            ..a
        },
    ] {
        assert_eq!(bad.time_at(a.counter_value), None, "{bad:?}");
    }
    // TAI with a valid offset: ptp_vmclock adds tai_offset_sec.
    let tai = VmclockAbi {
        time_type: VMCLOCK_TIME_TAI,
        ..a
    };
    assert_eq!(
        tai.time_at(a.counter_value).unwrap().sec,
        1_764_000_000 - 37
    );
    // Linux 7.x returns TAI: a TAI page as it is, a UTC page with a valid offset (UTC − TAI,
    // −37) 37 s ahead, a UTC page without one refused.
    assert_eq!(tai.tai_at(a.counter_value).unwrap().sec, 1_764_000_000);
    let utc = VmclockAbi {
        time_type: VMCLOCK_TIME_UTC,
        flags: a.flags | VMCLOCK_FLAG_TAI_OFFSET_VALID,
        ..a
    };
    assert_eq!(utc.tai_at(a.counter_value).unwrap().sec, 1_764_000_037);
    assert_eq!(
        utc.tai_at(a.counter_value).unwrap().nsec,
        utc.time_at(a.counter_value).unwrap().nsec
    );
    let no_offset = VmclockAbi {
        flags: a.flags & !VMCLOCK_FLAG_TAI_OFFSET_VALID,
        ..utc
    };
    assert_eq!(no_offset.tai_at(a.counter_value), None);
    assert!(
        no_offset.time_at(a.counter_value).is_some(),
        "the UTC reading"
    );
}

#[test]
fn write_then_read_and_seq_advances() {
    let mem = HostVmclockMemory::new();
    let a = sample_abi();
    assert_eq!(write_vmclock(&mem, &a).unwrap(), 2, "fresh page: 0 → 1 → 2");
    let r = read_vmclock(&mem).unwrap();
    assert_eq!(r, VmclockAbi { seq_count: 2, ..a });
    assert_eq!(write_vmclock(&mem, &a).unwrap(), 4);
    // The old signal writer and the full writer share the protocol.
    crate::signal::VmclockWriter::new(&mem)
        .disrupt(9, VMCLOCK_STATUS_UNRELIABLE, 1)
        .unwrap();
    let r = read_vmclock(&mem).unwrap();
    assert_eq!((r.seq_count, r.disruption_marker), (6, 9));
    assert_eq!(r.counter_value, a.counter_value, "other fields kept");
}

/// A page whose writes can be interrupted: a read issued in the middle of an update must be
/// refused (odd seq_count) — the guest never uses a half-written structure.
struct Interrupting {
    inner: HostVmclockMemory,
    during_body: std::sync::Mutex<Option<Result<VmclockAbi, String>>>,
}

impl VmclockMemory for Interrupting {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_bytes(offset, buf)
    }
    fn write_bytes(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_bytes(offset, data)?;
        if offset == BODY {
            // Half-way: the body is new, seq_count still odd. A one-shot guest read.
            let mut seq = [0u8; 4];
            self.inner.read_bytes(SEQ, &mut seq)?;
            let s = u32::from_le_bytes(seq);
            *self.during_body.lock().unwrap() = Some(if s % 2 == 1 {
                Err(format!("odd seq {s}"))
            } else {
                Ok(VmclockAbi::decode(&self.inner.bytes()).unwrap())
            });
        }
        Ok(())
    }
}

#[test]
fn mid_update_is_odd() {
    let m = Interrupting {
        inner: HostVmclockMemory::new(),
        during_body: std::sync::Mutex::new(None),
    };
    write_vmclock(&m, &sample_abi()).unwrap();
    let seen = m.during_body.lock().unwrap().clone().unwrap();
    assert_eq!(seen, Err("odd seq 1".to_string()));
}

#[test]
fn read_gives_up_on_a_stuck_odd_seq() {
    let mem = AtomicVmclockMemory::new();
    write_vmclock(&mem, &sample_abi()).unwrap();
    mem.write_bytes(SEQ, &3u32.to_le_bytes()).unwrap();
    assert!(matches!(read_vmclock(&mem), Err(VmclockError::Busy(_))));
}

/// State `i` of the hammer test: every field a different function of `i`, so any mix of two
/// states is detected.
fn state(i: u64) -> VmclockAbi {
    let h = |k: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(k as u32) ^ k;
    VmclockAbi {
        magic: VMCLOCK_MAGIC,
        size: VMCLOCK_PAGE_SIZE,
        version: 1,
        counter_id: VMCLOCK_COUNTER_X86_TSC,
        time_type: VMCLOCK_TIME_UTC,
        seq_count: 0,
        disruption_marker: i,
        flags: h(1),
        clock_status: (i % 4) as u8,
        leap_second_smearing_hint: (i % 3) as u8,
        tai_offset_sec: (i % 1000) as i16,
        leap_indicator: (i % 6) as u8,
        counter_period_shift: (i % 64) as u8,
        counter_value: h(2),
        counter_period_frac_sec: h(3),
        counter_period_esterror_rate_frac_sec: h(4),
        counter_period_maxerror_rate_frac_sec: h(5),
        time_sec: h(6),
        time_frac_sec: h(7),
        time_esterror_nanosec: h(8),
        time_maxerror_nanosec: h(9),
        vm_generation_counter: !i,
    }
}

/// One writer rewrites the whole structure continuously; readers read under the seq_count
/// protocol on a lock-free page. Every value read must be exactly one written state.
#[test]
fn hammer_no_torn_reads() {
    let mem = Arc::new(AtomicVmclockMemory::new());
    write_vmclock(mem.as_ref(), &state(0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mem, stop, written) = (mem.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                write_vmclock(mem.as_ref(), &state(i)).unwrap();
                written.store(i, Ordering::Relaxed);
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let (mut reads, mut torn_unprotected) = (0u64, 0u64);
                let mut last = 0u64;
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(700);
                while std::time::Instant::now() < deadline {
                    let a = read_vmclock(mem.as_ref()).expect("reader starved");
                    let i = a.disruption_marker;
                    assert_eq!(
                        a,
                        VmclockAbi {
                            seq_count: a.seq_count,
                            ..state(i)
                        },
                        "torn read"
                    );
                    assert_eq!(a.seq_count % 2, 0);
                    assert!(i >= last, "went back from state {last} to {i}");
                    last = i;
                    reads += 1;
                    // Control: the same bytes copied *without* the protocol do tear.
                    let raw = VmclockAbi::decode(&mem.bytes()).unwrap();
                    if raw
                        != (VmclockAbi {
                            seq_count: raw.seq_count,
                            ..state(raw.disruption_marker)
                        })
                    {
                        torn_unprotected += 1;
                    }
                }
                (reads, torn_unprotected)
            })
        })
        .collect();
    let mut total = 0;
    let mut torn = 0;
    for r in readers {
        let (n, t) = r.join().unwrap();
        total += n;
        torn += t;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let w = written.load(Ordering::Relaxed);
    eprintln!("{total} consistent reads over {w} updates; {torn} unprotected copies were torn");
    assert!(total > 100 && w > 100, "reads {total}, updates {w}");
}
