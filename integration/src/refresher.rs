//! The vmclock refresh thread: keeps the guest's vmclock page current while the VM runs, by
//! calling [`Vmm::refresh_vmclock`] every period (`clockvmm run --vmclock-refresh-ms`).
//!
//! It shares the VMM's one lock with the API, but only ever *tries* it: an operation in progress
//! (a pause, a snapshot, a restore, a migration) holds the lock, and the tick waits in short
//! steps until the lock is free or the next tick is due, then skips — it never queues behind a
//! migration, and never runs inside one. [`Vmm::refresh_vmclock`] itself does nothing while the
//! VM is paused or absent. The thread holds the VMM weakly and ends when it is dropped or
//! [`VmclockRefresher::stop`] is called.

use std::sync::{Arc, Condvar, Mutex, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::vmm::Vmm;

/// How long a busy tick waits between tries of the VMM lock.
const RETRY: Duration = Duration::from_millis(10);

/// A running refresh thread.
pub struct VmclockRefresher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

/// Wait until `deadline` or a stop request; whether to stop.
fn wait_until(stop: &(Mutex<bool>, Condvar), deadline: Instant) -> bool {
    let mut stopped = stop.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *stopped {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        stopped = stop
            .1
            .wait_timeout(stopped, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

impl VmclockRefresher {
    /// Start refreshing `vmm` every `period`.
    pub fn spawn(vmm: Weak<Mutex<Vmm>>, period: Duration) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("vmclock-refresh".into())
            .spawn(move || {
                info!("vmclock refresh every {period:?}");
                let mut next = Instant::now() + period;
                'ticks: loop {
                    if wait_until(&flag, next) {
                        break;
                    }
                    next += period;
                    let now = Instant::now();
                    if next <= now {
                        // Fell behind (a long stall): do not catch up with a burst.
                        next = now + period;
                    }
                    loop {
                        let Some(vmm) = vmm.upgrade() else {
                            break 'ticks;
                        };
                        let outcome = match vmm.try_lock() {
                            Ok(mut v) => Some(v.refresh_vmclock()),
                            Err(TryLockError::Poisoned(p)) => {
                                Some(p.into_inner().refresh_vmclock())
                            }
                            Err(TryLockError::WouldBlock) => None,
                        };
                        drop(vmm);
                        if outcome.is_some() {
                            break;
                        }
                        let retry = (Instant::now() + RETRY).min(next);
                        if wait_until(&flag, retry) {
                            break 'ticks;
                        }
                        if retry >= next {
                            debug!("vmclock refresh: the VMM stayed busy, tick skipped");
                            break;
                        }
                    }
                }
                debug!("vmclock refresh thread ends");
            })?;
        Ok(VmclockRefresher {
            stop,
            handle: Some(handle),
        })
    }

    /// Stop the thread and wait for it (it never blocks on the VMM: at most one refresh).
    pub fn stop(mut self) {
        self.signal_and_join();
    }

    fn signal_and_join(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for VmclockRefresher {
    fn drop(&mut self) {
        self.signal_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmConfig;

    fn page_seq_and_time(vmm: &Mutex<Vmm>) -> (u32, u64) {
        let v = vmm.lock().unwrap();
        let c = v.clock().unwrap();
        let p = &c["vmclock"];
        (
            p["seq_count"].as_u64().unwrap() as u32,
            p["time_sec"].as_u64().unwrap() * 1_000_000_000
                + guest_clock::math::frac_sec_to_ns(p["time_frac_sec"].as_u64().unwrap()) as u64,
        )
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// With the thread on, the page's seq_count and time advance while the VM runs, stand still
    /// while it is paused, and advance again after the resume; the thread ends with the VMM.
    #[test]
    fn the_thread_keeps_the_page_fresh_while_the_vm_runs() {
        for force_model in [true, false] {
            let mut vmm = Vmm::new().with_vmclock_refresh(Some(Duration::from_millis(20)));
            vmm.boot(&VmConfig {
                vcpus: 2,
                memory_mib: 2,
                force_model,
                ..Default::default()
            })
            .unwrap();
            let vmm = Arc::new(Mutex::new(vmm));
            let (seq0, t0) = page_seq_and_time(&vmm);
            let r =
                VmclockRefresher::spawn(Arc::downgrade(&vmm), Duration::from_millis(20)).unwrap();
            wait_for("the page is rewritten", || {
                let (s, t) = page_seq_and_time(&vmm);
                s >= seq0 + 6 && t > t0
            });
            let stats = vmm.lock().unwrap().clock().unwrap()["vmclock_refresh"].clone();
            assert!(stats["stats"]["rewrites"].as_u64().unwrap() >= 3, "{stats}");
            assert_eq!(stats["stats"]["errors"], 0, "{stats}");
            assert_eq!(stats["period_ms"], 20);

            vmm.lock().unwrap().pause().unwrap();
            let paused = page_seq_and_time(&vmm);
            std::thread::sleep(Duration::from_millis(150));
            assert_eq!(
                page_seq_and_time(&vmm),
                paused,
                "paused: the page is left alone"
            );

            vmm.lock().unwrap().resume().unwrap();
            wait_for("rewritten again after the resume", || {
                page_seq_and_time(&vmm).0 > paused.0
            });
            drop(vmm);
            wait_for("the thread ends with the VMM", || {
                r.handle.as_ref().is_some_and(|h| h.is_finished())
            });
            r.stop();
        }
    }
}
