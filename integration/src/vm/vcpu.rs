//! The vCPU loop: one thread per vCPU runs KVM_RUN until the guest's OUT, then records the
//! guest's sample (its TSC mapped to host realtime) and its kvmclock reading; it parks outside
//! KVM_RUN while a pause is requested.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_clock::backend::{host, Hypervisor, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME};
use guest_clock::math;
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::guest::{EXIT_PORT, SLOTS_GPA};
use super::lock;
use super::observe::{read_pvclock, VcpuObservation};

/// What the vCPU threads and the VM share.
pub(super) struct Shared {
    pub(super) pause_requested: AtomicBool,
    pub(super) stop: AtomicBool,
    pub(super) parked: Mutex<usize>,
    pub(super) cv: Condvar,
    pub(super) obs: Mutex<Vec<Option<VcpuObservation>>>,
    /// The vCPU threads (for kicks out of KVM_RUN).
    pub(super) tids: Mutex<Vec<libc::pthread_t>>,
}

/// Unregisters a vCPU thread from the kick list when dropped.
pub(super) struct ThreadGuard<'a>(&'a Shared, libc::pthread_t);

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.tids).retain(|t| *t != self.1);
    }
}

impl Shared {
    /// Record the calling thread as a vCPU thread to kick, until the guard drops (before the
    /// thread ends: a kick never targets a finished thread).
    pub(super) fn register_thread(&self) -> ThreadGuard<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.tids).push(me);
        ThreadGuard(self, me)
    }

    /// Interrupt every vCPU thread's KVM_RUN (a Linux guest idles inside KVM).
    pub(super) fn kick_all(&self) {
        let sig = super::linux::kick_signal();
        for t in lock(&self.tids).iter() {
            // SAFETY: `t` is a vCPU thread of this process that registered itself; the VM
            // joins its threads before they are forgotten, and the signal's handler is a
            // no-op installed before any vCPU thread starts.
            unsafe {
                libc::pthread_kill(*t, sig);
            }
        }
    }

    /// Wake every parked thread after a change of `pause_requested` or `stop`. Under the
    /// lock the parked threads check those flags with: a notification sent while a thread is
    /// between its check and its wait would be lost, and that thread would sleep forever.
    pub(super) fn wake_all(&self) {
        let _parked = lock(&self.parked);
        self.cv.notify_all();
    }

    /// Park while a pause is requested; whether the thread parked.
    pub(super) fn park_if_requested(&self) -> bool {
        if !self.pause_requested.load(Ordering::SeqCst) {
            return false;
        }
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.cv.notify_all();
        while self.pause_requested.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            parked = self.cv.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        true
    }
}

pub(super) fn vcpu_loop(
    id: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    kvm: Arc<super::ClockvmmKvm>,
) {
    let slot = GuestAddress(SLOTS_GPA + 16 * id as u64);
    let host_khz = kvm.host_tsc_khz();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if shared.park_if_requested() {
            continue;
        }
        let exit = {
            let mut v = lock(&vcpu);
            match v.run() {
                Ok(VcpuExit::IoOut(EXIT_PORT, _)) => Ok(()),
                Ok(other) => Err(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(e) = exit {
            warn!("vCPU {id}: unexpected exit {e}; stopping it");
            return;
        }
        let mut b = [0u8; 16];
        if mem.read_slice(&mut b, slot).is_err() {
            continue;
        }
        let tsc = u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8]));
        let samples = u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4])));
        if let Some(p) = read_pvclock(&mem, id).filter(|p| tsc >= p.tsc_timestamp) {
            // (A sample older than the page's tsc_timestamp was taken before KVM rewrote the
            // page at this entry: no guest computes kvmclock that way; it is skipped.)
            // Guest TSC → host TSC through the offset the backend reads (0 on kvm_pvm; the VMM
            // does not use TSC scaling), then → realtime by the host rate.
            let (h_now, rt_now) = host_tsc_and_realtime(kvm.as_ref());
            let offset = kvm.tsc_offset(id).unwrap_or(0);
            let h_sample = tsc.wrapping_sub(offset);
            let back_ns = math::ticks_to_ns_round(h_now.saturating_sub(h_sample), host_khz);
            let o = VcpuObservation {
                vcpu: id,
                guest_tsc_ticks: tsc,
                guest_kvmclock_ns: math::pvclock_read_ns(&p, tsc),
                host_realtime_ns: rt_now.saturating_sub(back_ns),
                pvclock_flags: p.flags,
                tsc_to_system_mul: p.tsc_to_system_mul,
                tsc_shift: p.tsc_shift,
                samples,
            };
            if let Some(s) = lock(&shared.obs).get_mut(id) {
                *s = Some(o);
            }
        } else {
            debug!("vCPU {id}: pvclock not valid yet");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A (host TSC, host CLOCK_REALTIME) pair taken at one instant: from one `KVM_GET_CLOCK` with
/// REALTIME|HOST_TSC (one kernel timekeeping snapshot, exact) where the kernel gives both, else
/// two userspace reads (a preemption between them is an error of the sample's mapping).
fn host_tsc_and_realtime(kvm: &dyn Hypervisor) -> (u64, u64) {
    const BOTH: u32 = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    match kvm.get_clock() {
        Ok(d) if d.flags & BOTH == BOTH => (d.host_tsc_ticks, d.realtime_ns),
        _ => (host::rdtsc(), host::realtime_ns()),
    }
}
