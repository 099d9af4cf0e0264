//! The VMM: at most one VM, its `ClockManager`, and the operations the API exposes (pause,
//! resume, info, clock, snapshot, restore, send/receive migration). The VMM is a *client* of the
//! guest-clock library: it calls the vm-migration traits the plugin implements.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use guest_clock::restore::{RestoreOptions, RestoreReport};
use guest_clock::{clock_state_from_snapshot, ClockManager, CLOCK_SNAPSHOT_ID};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vm_migration::protocol::{Command, MemoryRangeTable, Request};
use vm_migration::{Pausable, Snapshot, Snapshottable};

use crate::migration::{self, MigrationState, MigrationUrl};
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
    /// The VM configuration.
    pub config: VmConfig,
    /// The snapshot tree (child "clock").
    pub snapshot: Snapshot,
    /// The guest's last observation before the pause.
    pub observation: GuestObservation,
}

/// A VMM error: a message for the API caller.
pub type VmmResult<T> = Result<T, String>;

/// The VMM state.
pub struct Vmm {
    vm: Option<Arc<Vm>>,
    clock: Option<ClockManager<'static>>,
    /// The guest observation from before the disruption (old process / sender).
    before: Option<GuestObservation>,
    report: Option<RestoreReport>,
    note: String,
    paused: bool,
}

impl Default for Vmm {
    fn default() -> Self {
        Self::new()
    }
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
        }
    }

    /// Create and start a VM.
    pub fn boot(&mut self, cfg: &VmConfig) -> VmmResult<String> {
        if self.vm.is_some() {
            return Err("a VM already exists".into());
        }
        let vm = self.create(cfg)?;
        vm.start().map_err(|e| e.to_string())?;
        self.note = "running".into();
        Ok(vm.describe())
    }

    fn create(&mut self, cfg: &VmConfig) -> VmmResult<Arc<Vm>> {
        let vm = Arc::new(Vm::create(cfg).map_err(|e| e.to_string())?);
        let clock = ClockManager::new(vm.clock_backend()).with_vmclock(vm.vmclock_memory());
        self.vm = Some(vm.clone());
        self.clock = Some(clock);
        self.paused = false;
        Ok(vm)
    }

    fn vm(&self) -> VmmResult<Arc<Vm>> {
        self.vm.clone().ok_or_else(|| "no VM".to_string())
    }

    /// Pause the vCPUs, then capture the clocks.
    pub fn pause(&mut self) -> VmmResult<()> {
        let vm = self.vm()?;
        if self.paused {
            return Ok(());
        }
        vm.pause().map_err(|e| e.to_string())?;
        if let Some(c) = self.clock.as_mut() {
            c.pause().map_err(|e| e.to_string())?;
        }
        self.paused = true;
        Ok(())
    }

    /// Resume (clocks untouched).
    pub fn resume(&mut self) -> VmmResult<()> {
        let vm = self.vm()?;
        if let Some(c) = self.clock.as_mut() {
            c.resume().map_err(|e| e.to_string())?;
        }
        vm.resume().map_err(|e| e.to_string())?;
        self.paused = false;
        Ok(())
    }

    /// vm.info.
    pub fn info(&self) -> Value {
        match &self.vm {
            Some(vm) => json!({
                "state": if self.paused { "paused" } else { "running" },
                "backend": vm.describe(),
                "backend_kind": vm.backend_kind(),
                "config": vm.config(),
                "vcpus": vm.vcpu_count(),
            }),
            None => json!({"state": self.note, "backend": null}),
        }
    }

    /// vm.clock: the guest-observed clock, the error across the last disruption, the report.
    pub fn clock(&self) -> VmmResult<Value> {
        let vm = self.vm()?;
        let now = vm.observe().map_err(|e| e.to_string())?;
        let khz = vm.clock_backend().tsc_khz(0).unwrap_or(0);
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
        let marker = self.clock.as_ref().map_or(0, |c| c.vmclock_marker());
        Ok(json!({
            "backend": vm.describe(),
            "tsc_khz": khz,
            "observation": now,
            "observed_errors": errors,
            "vmclock_disruption_marker": marker,
            "restore_report": self.report,
        }))
    }

    fn snapshot_tree(&mut self) -> VmmResult<Snapshot> {
        let clock = self.clock.as_mut().ok_or("no VM")?;
        let mut root = Snapshot::default();
        root.add_snapshot(
            CLOCK_SNAPSHOT_ID.to_string(),
            clock.snapshot().map_err(|e| e.to_string())?,
        );
        Ok(root)
    }

    /// vm.snapshot to `file://DIR`: pauses first (the VM stays paused, like CH).
    pub fn snapshot(&mut self, url: &str) -> VmmResult<String> {
        let dir = file_url(url)?;
        self.pause()?;
        let vm = self.vm()?;
        let observation = vm.observe().map_err(|e| e.to_string())?;
        let file = SnapshotFile {
            config: vm.config().clone(),
            snapshot: self.snapshot_tree()?,
            observation,
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(STATE_FILE), json).map_err(|e| e.to_string())?;
        let mut f = std::fs::File::create(dir.join(MEMORY_FILE)).map_err(|e| e.to_string())?;
        vm.save_memory(&mut f).map_err(|e| e.to_string())?;
        info!("snapshot written to {}", dir.display());
        Ok(dir.display().to_string())
    }

    /// vm.restore from `file://DIR` into a new VM: the clock section is decoded and validated
    /// before any vCPU is created.
    pub fn restore(
        &mut self,
        url: &str,
        options: Option<RestoreOptions>,
    ) -> VmmResult<RestoreReport> {
        if self.vm.is_some() {
            return Err("a VM already exists: restore needs a VMM started with --no-vm".into());
        }
        let dir = file_url(url)?;
        let file = read_snapshot_file(&dir)?;
        let state = clock_state_from_snapshot(&file.snapshot)
            .map_err(|e| format!("clock section refused before creating the VM: {e}"))?;
        let vm = self.create(&file.config)?;
        let mut mem = std::fs::File::open(dir.join(MEMORY_FILE)).map_err(|e| e.to_string())?;
        let result = (|| {
            vm.load_memory(&mut mem).map_err(|e| e.to_string())?;
            let clock = self.clock.as_mut().ok_or("no clock manager")?;
            if let Some(o) = options {
                clock.set_restore_options(o);
            }
            clock.restore_state(&state).map_err(|e| e.to_string())
        })();
        match result {
            Ok(report) => {
                vm.start().map_err(|e| e.to_string())?;
                self.before = Some(file.observation);
                self.report = Some(report.clone());
                self.note = "restored".into();
                Ok(report)
            }
            Err(e) => {
                self.discard();
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
    }

    /// vm.send-migration: on any failure the source resumes and the reason is returned.
    pub fn send_migration(
        &mut self,
        url: &str,
        downtime_ms: u64,
        restore_options: Option<RestoreOptions>,
    ) -> VmmResult<String> {
        let target = MigrationUrl::parse(url)?;
        let vm = self.vm()?;
        let mut s = target.connect()?;
        let result = (|| -> VmmResult<()> {
            migration::request(&mut s, Request::start(), &[])?;
            let cfg = migration::config_payload(vm.config());
            migration::request(&mut s, Request::config(cfg.len() as u64), &cfg)?;
            // Memory: the table, then its bytes (the guest keeps running meanwhile; its memory
            // holds no state the clocks depend on).
            let table = migration::memory_table(vm.memory_size());
            let mut payload = Vec::new();
            table.write_to(&mut payload).map_err(|e| e.to_string())?;
            vm.save_memory(&mut payload).map_err(|e| e.to_string())?;
            migration::request(&mut s, Request::memory(table.length()), &payload)?;
            self.pause()?;
            let observation = vm.observe().map_err(|e| e.to_string())?;
            if downtime_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(downtime_ms));
            }
            let st = MigrationState {
                snapshot: self.snapshot_tree()?,
                observation,
                restore_options: restore_options.clone(),
            };
            let payload = serde_json::to_vec(&st).map_err(|e| e.to_string())?;
            migration::request(&mut s, Request::state(payload.len() as u64), &payload)?;
            migration::request(&mut s, Request::complete(), &[])
        })();
        match result {
            Ok(()) => {
                self.discard();
                self.note = "migrated".into();
                Ok(format!("migrated to {url}"))
            }
            Err(e) => {
                warn!("migration failed: {e}; resuming the source");
                let _ = Request::abandon().write_to(&mut s);
                if self.paused {
                    self.resume()?;
                }
                Err(e)
            }
        }
    }

    /// vm.receive-migration: accept one sender and run the receiving side.
    pub fn receive_migration(
        &mut self,
        url: &str,
        expect_vcpus: Option<usize>,
    ) -> VmmResult<String> {
        if self.vm.is_some() {
            return Err("a VM already exists: receive needs a VMM started with --no-vm".into());
        }
        let source = MigrationUrl::parse(url)?;
        let mut s = source.accept_one()?;
        let mut memory_loaded = false;
        loop {
            let req = Request::read_from(&mut s).map_err(|e| {
                self.discard();
                format!("sender went away: {e}")
            })?;
            let step = self.receive_step(&mut s, &req, expect_vcpus, &mut memory_loaded);
            match step {
                Ok(Step::Continue) => migration::reply_ok(&mut s)?,
                Ok(Step::Done) => {
                    migration::reply_ok(&mut s)?;
                    self.note = "received".into();
                    return Ok("migration received".into());
                }
                Ok(Step::Abandoned) => {
                    self.discard();
                    return Err("the sender abandoned the migration".into());
                }
                Err(e) => {
                    warn!("refusing {}: {e}", migration::command_name(req.command()));
                    migration::reply_error(&mut s, &e);
                    self.discard();
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
        memory_loaded: &mut bool,
    ) -> VmmResult<Step> {
        match req.command() {
            Command::Start => Ok(Step::Continue),
            Command::Config => {
                let p = migration::read_payload(s, req, migration::MAX_CONFIG_LEN)?;
                let cfg: VmConfig =
                    serde_json::from_slice(&p).map_err(|e| format!("bad Config: {e}"))?;
                if let Some(n) = expect_vcpus {
                    if n != cfg.vcpus {
                        return Err(format!(
                            "vCPU count mismatch: the sender has {}, this receiver expects {n}",
                            cfg.vcpus
                        ));
                    }
                }
                self.create(&cfg)?;
                Ok(Step::Continue)
            }
            Command::Memory => {
                let vm = self.vm()?;
                let table =
                    MemoryRangeTable::read_from(s, req.length()).map_err(|e| e.to_string())?;
                let size = vm.memory_size();
                if table.regions().len() != 1
                    || table.regions()[0].gpa != 0
                    || table.regions()[0].length != size
                {
                    return Err(format!(
                        "memory table {:?} does not cover the {size}-byte guest",
                        table
                            .regions()
                            .iter()
                            .map(|r| (r.gpa, r.length))
                            .collect::<Vec<_>>()
                    ));
                }
                vm.load_memory(s).map_err(|e| e.to_string())?;
                *memory_loaded = true;
                Ok(Step::Continue)
            }
            Command::State => {
                if !*memory_loaded {
                    return Err("State before Memory".into());
                }
                let p = migration::read_payload(s, req, migration::MAX_STATE_LEN)?;
                let st: MigrationState =
                    serde_json::from_slice(&p).map_err(|e| format!("bad State: {e}"))?;
                let state = clock_state_from_snapshot(&st.snapshot).map_err(|e| e.to_string())?;
                let vm = self.vm()?;
                let clock = self.clock.as_mut().ok_or("no VM")?;
                if let Some(o) = st.restore_options {
                    clock.set_restore_options(o);
                }
                let report = clock.restore_state(&state).map_err(|e| e.to_string())?;
                vm.start().map_err(|e| e.to_string())?;
                self.before = Some(st.observation);
                self.report = Some(report);
                Ok(Step::Continue)
            }
            Command::Complete => {
                if self.report.is_none() {
                    return Err("Complete before State".into());
                }
                Ok(Step::Done)
            }
            Command::Abandon => Ok(Step::Abandoned),
            Command::Invalid | Command::MemoryFd => Err(format!(
                "unsupported command {}",
                migration::command_name(req.command())
            )),
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

/// The directory of a `file://DIR` URL.
pub fn file_url(url: &str) -> VmmResult<PathBuf> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("not a file:// URL: {url}"))?;
    if path.is_empty() {
        return Err("empty file:// path".into());
    }
    Ok(PathBuf::from(path))
}

/// Read and parse a snapshot directory's state.json (bounded).
pub fn read_snapshot_file(dir: &Path) -> VmmResult<SnapshotFile> {
    let path = dir.join(STATE_FILE);
    let len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_STATE_FILE {
        return Err(format!(
            "{} is {len} bytes (bound {MAX_STATE_FILE})",
            path.display()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}
