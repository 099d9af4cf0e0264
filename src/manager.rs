//! `ClockManager`: the plugin as a VMM sees it, on the vm-migration traits.
//!
//! - `Pausable::pause` captures the clock section (call it once the vCPUs are paused);
//!   `Pausable::resume` leaves the clocks alone: kvmclock and the TSCs kept running in KVM, so a
//!   source that resumes after an abandoned migration continues with zero error.
//! - `Snapshottable`: id `"clock"`; the snapshot carries the framed, CRC-protected, versioned
//!   section. With CH v38's vm-migration it is a versionize state
//!   (`SnapshotData::new_from_versioned_state`); with the `ch-current` feature (CH v53, serde
//!   only) the same frame is carried as bytes in a JSON state.
//! - CH restores a component when it creates it, from its snapshot (no `restore` method on
//!   `Snapshottable` since CH v29): [`ClockManager::restore_snapshot`] does it, and
//!   [`clock_state_from_snapshot`] decodes a section without a VM.
//! - `Transportable`, `Migratable`: the clocks have no transport of their own and no dirty
//!   memory; the defaults apply.

use std::sync::Arc;

use guest_clock_format::{ClockState, FramedClockState};
use log::{info, warn};
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable};

use crate::backend::ClockBackend;
use crate::capture::{capture, CaptureError};
use crate::restore::{restore, RestoreError, RestoreOptions, RestoreReport};
use crate::signal::{VmclockMemory, VmclockWriter};
use crate::vmclock::{Refresh, VmclockConfig, VmclockError, VmclockUpdater};

/// The id of the clock section in a VMM's snapshot tree.
pub const CLOCK_SNAPSHOT_ID: &str = "clock";

fn restore_err(e: impl std::fmt::Display) -> MigratableError {
    MigratableError::Restore(anyhow::anyhow!("clock: {e}"))
}

#[cfg(not(feature = "ch-current"))]
mod carrier {
    //! CH v38: the frame as a versionize state with the format's version map.
    use guest_clock_format::FramedClockState;
    use versionize::{VersionMap, Versionize, VersionizeResult};
    use vm_migration::{MigratableError, Snapshot, SnapshotData, VersionMapped};

    pub(super) struct ClockSection(pub(super) FramedClockState);

    impl Versionize for ClockSection {
        fn serialize<W: std::io::Write>(
            &self,
            writer: &mut W,
            version_map: &VersionMap,
            app_version: u16,
        ) -> VersionizeResult<()> {
            self.0.serialize(writer, version_map, app_version)
        }
        fn deserialize<R: std::io::Read>(
            reader: &mut R,
            version_map: &VersionMap,
            app_version: u16,
        ) -> VersionizeResult<Self> {
            FramedClockState::deserialize(reader, version_map, app_version).map(ClockSection)
        }
        fn version() -> u16 {
            FramedClockState::version()
        }
    }

    impl VersionMapped for ClockSection {
        fn version_map() -> VersionMap {
            guest_clock_format::version_map()
        }
    }

    pub(super) fn to_snapshot(state: FramedClockState) -> Result<Snapshot, MigratableError> {
        SnapshotData::new_from_versioned_state(&ClockSection(state)).map(Snapshot::from_data)
    }

    pub(super) fn from_data(data: &SnapshotData) -> Result<FramedClockState, MigratableError> {
        data.to_versioned_state::<ClockSection>().map(|s| s.0)
    }
}

#[cfg(feature = "ch-current")]
mod carrier {
    //! CH v53: serde only; the frame (`guest_clock_format::encode`) travels as bytes.
    use guest_clock_format::{FramedClockState, CURRENT_VERSION};
    use serde::{Deserialize, Serialize};
    use vm_migration::{MigratableError, Snapshot, SnapshotData};

    /// The JSON state: `{"frame": [bytes]}`.
    #[derive(Serialize, Deserialize)]
    struct ClockSectionJson {
        frame: Vec<u8>,
    }

    pub(super) fn to_snapshot(state: FramedClockState) -> Result<Snapshot, MigratableError> {
        let frame = guest_clock_format::encode(&state.0, CURRENT_VERSION)
            .map_err(|e| MigratableError::Snapshot(anyhow::anyhow!("clock: {e}")))?;
        SnapshotData::new_from_state(&ClockSectionJson { frame }).map(Snapshot::from_data)
    }

    pub(super) fn from_data(data: &SnapshotData) -> Result<FramedClockState, MigratableError> {
        let json: ClockSectionJson = data.to_state()?;
        guest_clock_format::decode(&json.frame)
            .map(|d| FramedClockState(d.state))
            .map_err(super::restore_err)
    }
}

/// Decode and validate the clock section of a snapshot tree (the root's child `"clock"`, or the
/// snapshot itself when it is the clock's). Needs no VM: a VMM calls it before creating vCPUs.
pub fn clock_state_from_snapshot(snapshot: &Snapshot) -> Result<ClockState, MigratableError> {
    let own = snapshot
        .snapshots
        .get(CLOCK_SNAPSHOT_ID)
        .unwrap_or(snapshot);
    let data = own.snapshot_data.as_ref().ok_or_else(|| {
        restore_err(format!(
            "snapshot has no '{CLOCK_SNAPSHOT_ID}' section data"
        ))
    })?;
    carrier::from_data(data).map(|s| s.0)
}

/// Owns a VM's clock backend; captures at pause, restores on the receiver.
///
/// `'a` is how long the backend may borrow the VM (a [`crate::backend::kvm::KvmBackend`] over
/// `&VmFd`/`&[VcpuFd]`); `ClockManager<'static>` owns it (an adapter over the VMM's own
/// hypervisor objects).
pub struct ClockManager<'a> {
    backend: Arc<dyn ClockBackend + 'a>,
    vmclock: Option<Arc<dyn VmclockMemory>>,
    vmclock_updater: Option<Arc<VmclockUpdater>>,
    options: RestoreOptions,
    captured: Option<ClockState>,
    last_report: Option<RestoreReport>,
    paused: bool,
    vm_id: [u8; 16],
}

impl<'a> ClockManager<'a> {
    /// A manager over `backend`.
    pub fn new(backend: Arc<dyn ClockBackend + 'a>) -> Self {
        ClockManager {
            backend,
            vmclock: None,
            vmclock_updater: None,
            options: RestoreOptions::default(),
            captured: None,
            last_report: None,
            paused: false,
            vm_id: [0; 16],
        }
    }

    /// The identity of the VM this manager belongs to (a random id the VMM gives the VM at its
    /// first boot and keeps across snapshots and migrations). Every captured section carries it;
    /// a receiver that knows the VM compares it (`RestoreOptions::expected_vm_id`).
    pub fn with_vm_id(mut self, vm_id: [u8; 16]) -> Self {
        self.vm_id = vm_id;
        self
    }

    /// Give the manager the guest's vmclock page with the default [`VmclockConfig`] for its
    /// backend; see [`with_vmclock_config`](Self::with_vmclock_config).
    pub fn with_vmclock(self, mem: Arc<dyn VmclockMemory>) -> Self {
        let config = VmclockConfig::for_backend(self.backend.as_ref());
        self.with_vmclock_config(mem, config)
    }

    /// Give the manager the guest's vmclock page. A page that does not carry the vmclock magic
    /// gets the whole structure now (guest TSC → UTC, status, errors; marker and generation 0),
    /// falling back to "disruption signal only" (counter INVALID) if the relationship cannot be
    /// sampled; a page that carries it (a restored guest's) is left for the restore to rewrite.
    pub fn with_vmclock_config(
        mut self,
        mem: Arc<dyn VmclockMemory>,
        config: VmclockConfig,
    ) -> Self {
        let initialised = read_magic(mem.as_ref()) == Some(crate::signal::VMCLOCK_MAGIC);
        let updater = Arc::new(VmclockUpdater::new(mem.clone(), config));
        if !initialised {
            if let Err(e) = updater.write_now(self.backend.as_ref()) {
                warn!("vmclock: full structure not written ({e}); disruption signal only");
                if let Err(e) = VmclockWriter::new(mem.as_ref()).init(0) {
                    warn!("vmclock page not initialised: {e}");
                }
            }
        }
        self.vmclock = Some(mem);
        self.vmclock_updater = Some(updater);
        self
    }

    /// The vmclock updater, for a VMM that refreshes the page from its own timer thread.
    pub fn vmclock_updater(&self) -> Option<&Arc<VmclockUpdater>> {
        self.vmclock_updater.as_ref()
    }

    /// Keep the vmclock page fresh (see [`VmclockUpdater::refresh`]); `None` without a page.
    pub fn refresh_vmclock(&self) -> Option<Result<Refresh, VmclockError>> {
        self.vmclock_updater
            .as_ref()
            .map(|u| u.refresh(self.backend.as_ref()))
    }

    /// Keep the vmclock page fresh while the vCPUs run, without vCPU ioctls (see
    /// [`VmclockUpdater::refresh_running`]); `None` without a page.
    pub fn refresh_vmclock_running(&self) -> Option<Result<Refresh, VmclockError>> {
        self.vmclock_updater
            .as_ref()
            .map(|u| u.refresh_running(self.backend.as_ref()))
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn ClockBackend + 'a> {
        &self.backend
    }

    /// Options for the next restore (mode override, skew injection for demos...).
    pub fn set_restore_options(&mut self, options: RestoreOptions) {
        self.options = options;
    }

    /// The section captured at the last pause.
    pub fn captured(&self) -> Option<&ClockState> {
        self.captured.as_ref()
    }

    /// The report of the last restore.
    pub fn last_report(&self) -> Option<&RestoreReport> {
        self.last_report.as_ref()
    }

    /// The vmclock marker the guest currently sees (0 without a page).
    pub fn vmclock_marker(&self) -> u64 {
        self.vmclock
            .as_ref()
            .and_then(|m| VmclockWriter::new(m.as_ref()).view().ok())
            .map_or(0, |v| v.disruption_marker)
    }

    /// Capture now (the vCPUs must be paused).
    pub fn capture_now(&mut self) -> Result<ClockState, CaptureError> {
        let mut state = capture(self.backend.as_ref(), self.vmclock_marker())?;
        state.vm_id = self.vm_id;
        self.captured = Some(state.clone());
        Ok(state)
    }

    /// Restore the clocks from `snapshot` (a VM's snapshot tree with a `"clock"` child, or the
    /// clock's own snapshot), as a CH component does when it is created from a snapshot.
    pub fn restore_snapshot(
        &mut self,
        snapshot: &Snapshot,
    ) -> Result<RestoreReport, MigratableError> {
        let state = clock_state_from_snapshot(snapshot)?;
        self.restore_state(&state)
            .map_err(|e| MigratableError::Restore(anyhow::Error::new(e)))
    }

    /// Restore `state` into this manager's VM with the configured options.
    pub fn restore_state(&mut self, state: &ClockState) -> Result<RestoreReport, RestoreError> {
        let report = restore(
            self.backend.as_ref(),
            state,
            &self.options,
            self.vmclock.as_deref(),
        )?;
        if let Some(u) = &self.vmclock_updater {
            // Before the first KVM_RUN: this host's relationship and status; marker and
            // generation bumped only when the guest was disrupted.
            let signalled = report.signalled.vmclock_disruption_marker;
            let disrupted =
                report.mode == crate::restore::RestoreMode::LiveMigration || signalled.is_some();
            let marker = signalled.unwrap_or(if disrupted {
                state.vmclock_disruption_marker.wrapping_add(1)
            } else {
                state.vmclock_disruption_marker
            });
            u.set_wallclock_skew_ns(self.options.inject_wallclock_skew_ns);
            if let Err(e) = u.after_restore(self.backend.as_ref(), disrupted, marker) {
                warn!("vmclock not rewritten after the restore: {e}");
            }
        }
        self.last_report = Some(report.clone());
        Ok(report)
    }
}

fn read_magic(mem: &dyn VmclockMemory) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read_bytes(crate::signal::offsets::MAGIC, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

impl Pausable for ClockManager<'_> {
    fn pause(&mut self) -> Result<(), MigratableError> {
        if self.paused {
            return Ok(());
        }
        self.capture_now()
            .map_err(|e| MigratableError::Pause(anyhow::Error::new(e)))?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        // Nothing to do to the clocks: they kept running in KVM while the vCPUs were paused.
        self.paused = false;
        info!("clock: resumed, clocks untouched");
        Ok(())
    }
}

impl Snapshottable for ClockManager<'_> {
    fn id(&self) -> String {
        CLOCK_SNAPSHOT_ID.to_string()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        match &self.captured {
            Some(s) if self.paused => carrier::to_snapshot(FramedClockState(s.clone())),
            _ => Err(MigratableError::Snapshot(anyhow::anyhow!(
                "clock: pause the VM before taking a snapshot"
            ))),
        }
    }
}

impl Transportable for ClockManager<'_> {}

impl Migratable for ClockManager<'_> {}
