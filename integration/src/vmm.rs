//! The VMM: at most one VM, its `ClockManager`, and the operations the API exposes (pause,
//! resume, info, clock, snapshot, restore, send/receive migration). The VMM is a *client* of the
//! guest-clock library: it calls the vm-migration traits the plugin implements.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guest_clock::restore::{RestoreOptions, RestoreReport};
use guest_clock::vmclock::{read_vmclock, Refresh, VmclockConfig};
use guest_clock::{clock_state_from_snapshot, ClockManager, CLOCK_SNAPSHOT_ID};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vm_migration::protocol::{Command, MemoryRangeTable, Request};
use vm_migration::{Pausable, Snapshot, Snapshottable};

use crate::error::{VmmError, VmmResult};
use crate::migration::{
    self, Deadlines, MigrationHint, MigrationState, MigrationUrl, RequestError,
};
use crate::vm::{
    observed_kvmclock_error_ns, observed_kvmclock_vs_tsc_error_ns, observed_tsc_error_ticks,
    GuestObservation, Vm, VmConfig,
};

/// The snapshot directory's state file.
pub const STATE_FILE: &str = "state.json";
/// The snapshot directory's memory file.
pub const MEMORY_FILE: &str = "memory.bin";
/// The largest state.json accepted, bytes.
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// state.json of a snapshot directory.
#[derive(Clone, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// The VM configuration (its identity included).
    pub config: VmConfig,
    /// The snapshot tree (child "clock").
    pub snapshot: Snapshot,
    /// The guest's last observation before the pause.
    pub observation: GuestObservation,
}

/// What the VMM is doing with its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No VM.
    Empty,
    /// A VM, running or paused (see `paused`).
    Active,
    /// A migration sent Complete and never learnt the outcome: the VM stays paused until an
    /// operator resumes it (after checking the destination) or shuts it down.
    OutcomeUnknown,
}

/// The VMM state.
pub struct Vmm {
    vm: Option<Arc<Vm>>,
    clock: Option<ClockManager<'static>>,
    /// The guest observation from before the disruption (old process / sender).
    before: Option<GuestObservation>,
    report: Option<RestoreReport>,
    note: String,
    paused: bool,
    phase: Phase,
    /// How often the refresh thread re-anchors the vmclock page (None: never).
    vmclock_refresh: Option<Duration>,
    /// TAI − UTC for the page when the host does not know it.
    tai_offset_fallback_s: Option<i16>,
    refresh_stats: RefreshStats,
}

/// What the vmclock refresh thread did to the current VM's page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefreshStats {
    /// Ticks that found the VM running and asked the updater.
    pub ticks: u64,
    /// Of those, the ones that rewrote the page.
    pub rewrites: u64,
    /// Failed refreshes.
    pub errors: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

impl Default for Vmm {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side's progress through one migration (reset for every sender).
#[derive(Default)]
struct Receiving {
    config: Option<VmConfig>,
    memory_loaded: bool,
    /// Clocks restored at State (vCPUs not started yet) and the sender's observation.
    restored: Option<(RestoreReport, GuestObservation)>,
}

impl Vmm {
    /// No VM yet.
    pub fn new() -> Self {
        Vmm {
            vm: None,
            clock: None,
            before: None,
            report: None,
            note: "no VM".into(),
            paused: false,
            phase: Phase::Empty,
            vmclock_refresh: None,
            tai_offset_fallback_s: None,
            refresh_stats: RefreshStats::default(),
        }
    }

    /// Re-anchor the vmclock page every `period` while the VM runs (see
    /// [`crate::refresher`]); the updater's own refresh period is set a little shorter, so that
    /// every tick rewrites. None: the page is written only at creation and restore.
    pub fn with_vmclock_refresh(mut self, period: Option<Duration>) -> Self {
        self.vmclock_refresh = period.filter(|p| !p.is_zero());
        self
    }

    /// TAI − UTC to publish in the vmclock page when the host does not know it (see
    /// [`VmclockConfig::tai_offset_fallback_s`]).
    pub fn with_tai_offset_fallback(mut self, tai_s: Option<i16>) -> Self {
        self.tai_offset_fallback_s = tai_s;
        self
    }

    /// The refresh period asked for.
    pub fn vmclock_refresh(&self) -> Option<Duration> {
        self.vmclock_refresh
    }

    /// One tick of the refresh thread: re-anchor the page of a running VM (no vCPU ioctl:
    /// [`ClockManager::refresh_vmclock_running`]). Does nothing without a VM, while it is paused
    /// (its clocks are captured, a snapshot or migration may be under way), or while a
    /// migration's outcome is unknown; a restore runs under the same lock, and rewrites the page
    /// itself. Returns whether it asked the updater.
    pub fn refresh_vmclock(&mut self) -> bool {
        let (Some(vm), Some(clock)) = (self.vm.as_ref(), self.clock.as_ref()) else {
            return false;
        };
        if self.phase != Phase::Active || self.paused || !vm.is_running() {
            return false;
        }
        let Some(r) = clock.refresh_vmclock_running() else {
            return false;
        };
        let st = &mut self.refresh_stats;
        st.ticks += 1;
        match r {
            Ok(Refresh::Rewritten(reason, abi)) => {
                st.rewrites += 1;
                debug!(
                    "vmclock refreshed ({reason:?}): seq {}, counter {} at {}.{:09}",
                    abi.seq_count,
                    abi.counter_value,
                    abi.time_sec,
                    guest_clock::math::frac_sec_to_ns(abi.time_frac_sec)
                );
            }
            Ok(Refresh::Unchanged) => {}
            Err(e) => {
                st.errors += 1;
                if st.errors == 1 || st.errors.is_power_of_two() {
                    warn!("vmclock refresh failed ({} so far): {e}", st.errors);
                }
                st.last_error = Some(e.to_string());
            }
        }
        true
    }

    /// Create and start a VM (it gets a new identity unless the config carries one).
    pub fn boot(&mut self, cfg: &VmConfig) -> VmmResult<String> {
        if self.vm.is_some() {
            return Err(VmmError::state("a VM already exists"));
        }
        let vm = self.create(cfg)?;
        vm.start()?;
        self.note = "running".into();
        Ok(vm.describe())
    }

    fn create(&mut self, cfg: &VmConfig) -> VmmResult<Arc<Vm>> {
        let mut cfg = cfg.clone();
        if cfg.vm_id == [0; 16] {
            cfg.vm_id = crate::vm::new_vm_id();
        }
        let vm = Arc::new(Vm::create(&cfg)?);
        let backend = vm.clock_backend();
        let mut vmclock = VmclockConfig::for_backend(backend.as_ref());
        vmclock.tai_offset_fallback_s = self.tai_offset_fallback_s;
        if let Some(p) = self.vmclock_refresh {
            // A little under the tick: every tick of the refresh thread rewrites.
            let ns = u64::try_from(p.as_nanos()).unwrap_or(u64::MAX);
            vmclock.refresh_period_ns = ns - ns / 8;
        }
        let clock = ClockManager::new(backend)
            .with_vmclock_config(vm.vmclock_memory(), vmclock)
            .with_vm_id(cfg.vm_id);
        self.refresh_stats = RefreshStats::default();
        self.vm = Some(vm.clone());
        self.clock = Some(clock);
        self.paused = false;
        self.phase = Phase::Active;
        Ok(vm)
    }

    fn vm(&self) -> VmmResult<Arc<Vm>> {
        self.vm.clone().ok_or(VmmError::NoVm)
    }

    fn no_vm_yet(&self, what: &str) -> VmmResult<()> {
        match self.phase {
            Phase::Empty => Ok(()),
            _ => Err(VmmError::state(format!(
                "a VM already exists: {what} needs a VMM started with --no-vm"
            ))),
        }
    }

    /// Pause the vCPUs, then capture the clocks.
    pub fn pause(&mut self) -> VmmResult<()> {
        let vm = self.vm()?;
        if self.paused {
            return Ok(());
        }
        vm.pause()?;
        if let Some(c) = self.clock.as_mut() {
            c.pause().map_err(VmmError::failed)?;
        }
        self.paused = true;
        Ok(())
    }

    /// Resume (clocks untouched). After a migration whose outcome is unknown this is the
    /// operator's decision that the destination does not run the guest.
    pub fn resume(&mut self) -> VmmResult<()> {
        let vm = self.vm()?;
        if let Some(c) = self.clock.as_mut() {
            c.resume().map_err(VmmError::failed)?;
        }
        vm.resume()?;
        self.paused = false;
        if self.phase == Phase::OutcomeUnknown {
            warn!("resumed by the operator after a migration of unknown outcome");
            self.phase = Phase::Active;
        }
        Ok(())
    }

    /// vm.info.
    pub fn info(&self) -> Value {
        match &self.vm {
            Some(vm) => json!({
                "state": match self.phase {
                    Phase::OutcomeUnknown => "migration-outcome-unknown",
                    _ if self.paused => "paused",
                    _ => "running",
                },
                "backend": vm.describe(),
                "backend_kind": vm.backend_kind(),
                "config": vm.config(),
                "vm_id": guest_clock::restore::vm_id_string(&vm.config().vm_id),
                "vcpus": vm.vcpu_count(),
            }),
            None => json!({"state": self.note, "backend": null}),
        }
    }

    /// vm.clock: the guest-observed clock, the error across the last disruption, the report.
    pub fn clock(&self) -> VmmResult<Value> {
        let vm = self.vm()?;
        let now = vm.observe()?;
        let khz = vm.guest_tsc_khz();
        let mut errors = Vec::new();
        if let Some(before) = &self.before {
            for a in &now.vcpus {
                if let Some(b) = before.vcpus.iter().find(|b| b.vcpu == a.vcpu) {
                    errors.push(json!({
                        "vcpu": a.vcpu,
                        "kvmclock_error_ns": observed_kvmclock_error_ns(b, a),
                        "kvmclock_vs_tsc_error_ns": observed_kvmclock_vs_tsc_error_ns(b, a),
                        "tsc_error_ticks": observed_tsc_error_ticks(b, a, khz),
                        "guest_stopped": a.pvclock_flags & 2 != 0,
                    }));
                }
            }
        }
        // A Linux guest: its own clocks across the last disruption, per vCPU.
        // Per vCPU the narrowest-bracket samples: of the last two probe rounds before (the
        // baseline; the latest from an older sender) and of the first three read after.
        let samples = vm.linux_samples();
        let mut linux_errors = Vec::new();
        let mut compared = Value::Null;
        if let Some(b) = self.before.as_ref().and_then(|b| b.linux.as_ref()) {
            use crate::vm::linux::measure::{disruption, first_seq_after_pause, narrowest};
            let last = b.latest.iter().map(|s| s.seq).max().unwrap_or(0);
            let first = first_seq_after_pause(last);
            let rounds3 = 3 * vm.vcpu_count() as u64;
            let after = narrowest(
                samples.iter().copied(),
                |s| s.seq >= first && s.seq < first + rounds3,
                |s| s.bracket_ns,
            );
            // Which samples after: a caller waits for `end - 1` to have all of them.
            compared = json!({ "first_seq": first, "end_seq": first + rounds3 });
            let before = if b.baseline.is_empty() {
                &b.latest
            } else {
                &b.baseline
            };
            for a in &after {
                if let Some(bs) = before.iter().find(|x| x.vcpu == a.vcpu) {
                    linux_errors.push(disruption(bs, a, khz));
                }
            }
        }
        let recent: Vec<_> = samples.iter().rev().take(16).copied().collect();
        let marker = self.clock.as_ref().map_or(0, |c| c.vmclock_marker());
        let page = read_vmclock(vm.vmclock_memory().as_ref()).ok();
        Ok(json!({
            "backend": vm.describe(),
            "tsc_khz": khz,
            "observation": now,
            "observed_errors": errors,
            "linux_errors": linux_errors,
            "linux_errors_after_seqs": compared,
            "linux_recent_samples": recent,
            "vmclock_disruption_marker": marker,
            "vmclock": page,
            "vmclock_refresh": {
                "period_ms": self.vmclock_refresh.map(|p| p.as_millis() as u64),
                "stats": self.refresh_stats,
            },
            "restore_report": self.report,
        }))
    }

    fn snapshot_tree(&mut self) -> VmmResult<Snapshot> {
        let clock = self.clock.as_mut().ok_or(VmmError::NoVm)?;
        let mut root = Snapshot::default();
        root.add_snapshot(
            CLOCK_SNAPSHOT_ID.to_string(),
            clock.snapshot().map_err(VmmError::failed)?,
        );
        for (id, child) in self.vm()?.save_machine()? {
            root.add_snapshot(id, child);
        }
        Ok(root)
    }

    /// vm.snapshot to `file://DIR`: pauses first (the VM stays paused, like CH). The files are
    /// created 0600 and never written through a symlink or over a non-regular file.
    pub fn snapshot(&mut self, url: &str) -> VmmResult<String> {
        let dir = file_url(url)?;
        if self.phase == Phase::OutcomeUnknown {
            return Err(VmmError::state(
                "a migration of unknown outcome holds this VM: resume or shut it down first",
            ));
        }
        self.pause()?;
        let vm = self.vm()?;
        let observation = vm.observe()?;
        let file = SnapshotFile {
            config: vm.config().clone(),
            snapshot: self.snapshot_tree()?,
            observation,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmmError::failed(format!("{}: {e}", dir.display())))?;
        let json = serde_json::to_vec_pretty(&file).map_err(VmmError::failed)?;
        let mut f = crate::files::create_regular(&dir.join(STATE_FILE)).map_err(VmmError::bad)?;
        std::io::Write::write_all(&mut f, &json).map_err(VmmError::failed)?;
        let mut f = crate::files::create_regular(&dir.join(MEMORY_FILE)).map_err(VmmError::bad)?;
        vm.save_memory(&mut f)?;
        info!("snapshot written to {}", dir.display());
        Ok(dir.display().to_string())
    }

    /// vm.restore from `file://DIR` into a new VM, with this VMM's restore policy. Everything is
    /// checked before any VM exists: state.json and memory.bin are regular files (no symlinks)
    /// of bounded and exact sizes, the clock section decodes and belongs to the VM of the
    /// snapshot (`vm_id`).
    pub fn restore(
        &mut self,
        url: &str,
        options: Option<RestoreOptions>,
    ) -> VmmResult<RestoreReport> {
        self.no_vm_yet("restore")?;
        let dir = file_url(url)?;
        let file = read_snapshot_file(&dir)?;
        let state = clock_state_from_snapshot(&file.snapshot).map_err(|e| {
            VmmError::bad(format!("clock section refused before creating the VM: {e}"))
        })?;
        let machine = machine_state(&file.snapshot, &file.config)
            .map_err(|e| VmmError::bad(format!("refused before creating the VM: {e}")))?;
        let want = memory_bytes(&file.config)?;
        let (mut mem, have) = crate::files::open_regular(&dir.join(MEMORY_FILE), want)
            .map_err(|e| VmmError::bad(format!("refused before creating the VM: {e}")))?;
        if have != want {
            return Err(VmmError::bad(format!(
                "refused before creating the VM: {MEMORY_FILE} is {have} bytes, the VM has {want}"
            )));
        }
        let mut options = options.unwrap_or_default();
        if file.config.vm_id != [0; 16] {
            options.expected_vm_id = Some(file.config.vm_id);
        }
        // A dry validation needs the destination VM; the restore below refuses before its first
        // ioctl, and any failure discards the VM.
        let vm = self.create(&file.config)?;
        let result = (|| {
            vm.load_memory(&mut mem)?;
            if let Some(m) = &machine {
                vm.restore_machine(m)?;
            }
            let clock = self.clock.as_mut().ok_or(VmmError::NoVm)?;
            clock.set_restore_options(options);
            clock.restore_state(&state).map_err(restore_error)
        })()
        .and_then(|report| {
            vm.start()?;
            Ok(report)
        });
        match result {
            Ok(report) => {
                self.before = Some(file.observation);
                self.report = Some(report.clone());
                self.note = "restored".into();
                Ok(report)
            }
            Err(e) => {
                self.discard();
                self.note = "no VM (the last restore failed)".into();
                Err(e)
            }
        }
    }

    fn discard(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
        self.clock = None;
        self.paused = false;
        self.before = None;
        self.report = None;
        self.phase = Phase::Empty;
    }

    /// vm.send-migration, following the hand-over rule of [`crate::migration`]: any failure
    /// before Complete resumes the source; after Complete it resumes only on an explicit refusal.
    pub fn send_migration(
        &mut self,
        url: &str,
        downtime_ms: u64,
        hint: MigrationHint,
        deadlines: Deadlines,
    ) -> VmmResult<String> {
        let target = MigrationUrl::parse(url).map_err(VmmError::bad)?;
        let vm = self.vm()?;
        if self.phase == Phase::OutcomeUnknown {
            return Err(VmmError::state(
                "a migration of unknown outcome holds this VM: resume or shut it down first",
            ));
        }
        let mut s = target.connect(deadlines).map_err(VmmError::failed)?;
        let before_complete = (|| -> Result<(), String> {
            let rq = |s: &mut migration::Stream, r, p: &[u8]| {
                migration::request(s, r, p).map_err(|e| e.to_string())
            };
            rq(&mut s, Request::start(), &[])?;
            let cfg = migration::config_payload(vm.config());
            rq(&mut s, Request::config(cfg.len() as u64), &cfg)?;
            // Memory: the table, then its bytes. The tiny guest keeps running meanwhile (its
            // memory holds no state the clocks depend on); a Linux guest's memory is its
            // state, sent with the vCPUs paused (no dirty-page tracking here).
            if vm.config().linux.is_some() {
                self.pause().map_err(|e| e.to_string())?;
            }
            let table = migration::memory_table(vm.memory_size());
            let mut payload = Vec::new();
            table.write_to(&mut payload).map_err(|e| e.to_string())?;
            vm.save_memory(&mut payload).map_err(|e| e.to_string())?;
            rq(&mut s, Request::memory(table.length()), &payload)?;
            self.pause().map_err(|e| e.to_string())?;
            let observation = vm.observe().map_err(|e| e.to_string())?;
            if downtime_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(downtime_ms));
            }
            let st = MigrationState {
                snapshot: self.snapshot_tree().map_err(|e| e.to_string())?,
                observation,
                hint,
            };
            let payload = serde_json::to_vec(&st).map_err(|e| e.to_string())?;
            rq(&mut s, Request::state(payload.len() as u64), &payload)
        })();
        if let Err(e) = before_complete {
            warn!("migration failed before Complete: {e}; resuming the source");
            let _ = Request::abandon().write_to(&mut s);
            if self.paused {
                self.resume()?;
            }
            return Err(VmmError::failed(e));
        }
        // Past this point the receiver may start the guest at any moment.
        match migration::request(&mut s, Request::complete(), &[]) {
            Ok(()) => {
                self.discard();
                self.note = "migrated".into();
                Ok(format!("migrated to {url}"))
            }
            Err(RequestError::Refused(e)) => {
                warn!("receiver refused Complete: {e}; resuming the source");
                self.resume()?;
                Err(VmmError::failed(e))
            }
            Err(RequestError::NoAnswer(e)) => {
                self.phase = Phase::OutcomeUnknown;
                warn!(
                    "migration outcome unknown ({e}): the source stays paused; resume it only \
                     after checking that the destination does not run the guest"
                );
                Err(VmmError::failed(format!(
                    "migration outcome unknown after Complete ({e}): the source VM stays paused; \
                     the destination may be running the guest. Check it, then vm.resume or \
                     vmm.shutdown this VMM"
                )))
            }
        }
    }

    /// vm.receive-migration: accept one sender and run the receiving side with this
    /// receiver's restore policy (`options`, a sender's hint can only add signalling). Any
    /// failure discards everything this attempt built.
    pub fn receive_migration(
        &mut self,
        url: &str,
        expect_vcpus: Option<usize>,
        options: Option<RestoreOptions>,
        deadlines: Deadlines,
    ) -> VmmResult<String> {
        self.no_vm_yet("receive")?;
        let source = MigrationUrl::parse(url).map_err(VmmError::bad)?;
        let mut s = source.accept_one(deadlines).map_err(VmmError::failed)?;
        let options = options.unwrap_or_default();
        let mut rx = Receiving::default();
        loop {
            s.begin_phase("waiting for a request");
            let req = match Request::read_from(&mut s) {
                Ok(r) => r,
                Err(e) => {
                    self.discard();
                    self.note = "no VM (the last receive failed)".into();
                    return Err(VmmError::failed(format!("sender went away: {e}")));
                }
            };
            s.begin_phase(migration::command_name(req.command()));
            let step = self.receive_step(&mut s, &req, expect_vcpus, &options, &mut rx);
            match step {
                Ok(Step::Continue) => {
                    if let Err(e) = migration::reply_ok(&mut s) {
                        self.discard();
                        self.note = "no VM (the last receive failed)".into();
                        return Err(VmmError::failed(format!("sender went away: {e}")));
                    }
                }
                Ok(Step::Done) => {
                    // The vCPUs run already: the guest is ours even if the sender never reads
                    // this Ok (it then stays paused, see the hand-over rule).
                    self.note = "received".into();
                    if let Err(e) = migration::reply_ok(&mut s) {
                        warn!("the sender did not get the final Ok ({e}); running the guest");
                    }
                    return Ok("migration received".into());
                }
                Ok(Step::Abandoned) => {
                    self.discard();
                    self.note = "no VM (the sender abandoned)".into();
                    return Err(VmmError::failed("the sender abandoned the migration"));
                }
                Err(e) => {
                    warn!("refusing {}: {e}", migration::command_name(req.command()));
                    migration::reply_error(&mut s, &e.to_string());
                    self.discard();
                    self.note = "no VM (the last receive failed)".into();
                    return Err(e);
                }
            }
        }
    }

    fn receive_step(
        &mut self,
        s: &mut migration::Stream,
        req: &Request,
        expect_vcpus: Option<usize>,
        options: &RestoreOptions,
        rx: &mut Receiving,
    ) -> VmmResult<Step> {
        let order = |m: &str| Err(VmmError::bad(m.to_string()));
        match req.command() {
            Command::Start => Ok(Step::Continue),
            Command::Config => {
                if rx.config.is_some() {
                    return order("a second Config");
                }
                let p = migration::read_payload(s, req, migration::MAX_CONFIG_LEN)
                    .map_err(VmmError::bad)?;
                let cfg: VmConfig = serde_json::from_slice(&p)
                    .map_err(|e| VmmError::bad(format!("bad Config: {e}")))?;
                if let Some(n) = expect_vcpus {
                    if n != cfg.vcpus {
                        return Err(VmmError::bad(format!(
                            "vCPU count mismatch: the sender has {}, this receiver expects {n}",
                            cfg.vcpus
                        )));
                    }
                }
                self.create(&cfg)?;
                rx.config = Some(cfg);
                Ok(Step::Continue)
            }
            Command::Memory => {
                if rx.config.is_none() {
                    return order("Memory before Config");
                }
                let vm = self.vm()?;
                let table = MemoryRangeTable::read_from(s, req.length())
                    .map_err(|e| VmmError::bad(e.to_string()))?;
                let size = vm.memory_size();
                if table.regions().len() != 1
                    || table.regions()[0].gpa != 0
                    || table.regions()[0].length != size
                {
                    return Err(VmmError::bad(format!(
                        "memory table {:?} does not cover the {size}-byte guest",
                        table
                            .regions()
                            .iter()
                            .map(|r| (r.gpa, r.length))
                            .collect::<Vec<_>>()
                    )));
                }
                vm.load_memory(s)?;
                rx.memory_loaded = true;
                Ok(Step::Continue)
            }
            Command::State => {
                if !rx.memory_loaded {
                    return order("State before Memory");
                }
                if rx.restored.is_some() {
                    return order("a second State");
                }
                let p = migration::read_payload(s, req, migration::MAX_STATE_LEN)
                    .map_err(VmmError::bad)?;
                let st: MigrationState = serde_json::from_slice(&p)
                    .map_err(|e| VmmError::bad(format!("bad State: {e}")))?;
                let state = clock_state_from_snapshot(&st.snapshot)
                    .map_err(|e| VmmError::bad(e.to_string()))?;
                let cfg = rx.config.as_ref().ok_or(VmmError::NoVm)?;
                if let Some(m) = machine_state(&st.snapshot, cfg)? {
                    self.vm()?.restore_machine(&m)?;
                }
                // The receiver's policy; the sender's hint may only add signalling.
                let mut opts = options.clone();
                opts.always_signal |= st.hint.always_signal;
                if let Some(id) = rx.config.as_ref().map(|c| c.vm_id) {
                    if id != [0; 16] {
                        opts.expected_vm_id = Some(id);
                    }
                }
                let clock = self.clock.as_mut().ok_or(VmmError::NoVm)?;
                clock.set_restore_options(opts);
                let report = clock.restore_state(&state).map_err(restore_error)?;
                rx.restored = Some((report, st.observation));
                Ok(Step::Continue)
            }
            Command::Complete => {
                let Some((report, observation)) = rx.restored.take() else {
                    return order("Complete before State");
                };
                // Start the guest before confirming: see the hand-over rule.
                self.vm()?.start()?;
                self.before = Some(observation);
                self.report = Some(report);
                Ok(Step::Done)
            }
            Command::Abandon => Ok(Step::Abandoned),
            Command::Invalid | Command::MemoryFd => Err(VmmError::bad(format!(
                "unsupported command {}",
                migration::command_name(req.command())
            ))),
        }
    }

    /// Stop the VM.
    pub fn shutdown(&mut self) {
        self.discard();
        self.note = "shut down".into();
    }
}

enum Step {
    Continue,
    Done,
    Abandoned,
}

/// A refusal is the caller's input at fault (400); anything else is a failure (500).
fn restore_error(e: guest_clock::restore::RestoreError) -> VmmError {
    match e {
        guest_clock::restore::RestoreError::Refused { .. } => VmmError::bad(e),
        other => VmmError::failed(other),
    }
}

/// A Linux guest's machine state from a snapshot tree (None: the tiny guest, which has none).
fn machine_state(
    root: &vm_migration::Snapshot,
    cfg: &VmConfig,
) -> VmmResult<Option<crate::vm::linux::state::MachineState>> {
    if cfg.linux.is_none() {
        return Ok(None);
    }
    crate::vm::linux::state::MachineState::from_snapshot(root, cfg.vcpus)
        .map(Some)
        .map_err(VmmError::bad)
}

/// The guest memory size a configuration asks for, bytes.
fn memory_bytes(cfg: &VmConfig) -> VmmResult<u64> {
    (cfg.memory_mib as u64)
        .checked_mul(1 << 20)
        .ok_or_else(|| VmmError::bad(format!("{} MiB of memory", cfg.memory_mib)))
}

/// The directory of a `file://DIR` URL (CH's vm-migration has no URL helper; this VMM's own).
pub fn file_url(url: &str) -> VmmResult<PathBuf> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| VmmError::bad(format!("not a file:// URL: {url}")))?;
    if path.is_empty() {
        return Err(VmmError::bad("empty file:// path"));
    }
    Ok(PathBuf::from(path))
}

/// Read and parse a snapshot directory's state.json (a regular file, no symlink, bounded).
pub fn read_snapshot_file(dir: &Path) -> VmmResult<SnapshotFile> {
    let path = dir.join(STATE_FILE);
    let bytes = crate::files::read_regular(&path, MAX_STATE_FILE).map_err(VmmError::bad)?;
    serde_json::from_slice(&bytes).map_err(|e| VmmError::bad(format!("{}: {e}", path.display())))
}
