//! API-compatible stand-in for Cloud Hypervisor's in-tree `vm-migration` crate of the
//! versionize era (CH v29–v38), written for guest-clock. CH's crate is not published on
//! crates.io; a plugin built against this one builds inside CH by pointing the path dependency at
//! CH's crate. Deviations are listed in README.md (errors carry boxed std errors instead of
//! `anyhow::Error`; `protocol` encodes headers field by field instead of transmuting).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use versionize::{VersionMap, Versionize};

pub mod protocol;
pub mod url;

pub use protocol::{MemoryRange, MemoryRangeTable};

/// The boxed error a [`MigratableError`] carries (CH: `anyhow::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A migration or snapshot step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigratableError {
    /// Pausing a component failed.
    #[error("Failed to pause migratable component: {0}")]
    Pause(#[source] BoxError),
    /// Resuming a component failed.
    #[error("Failed to resume migratable component: {0}")]
    Resume(#[source] BoxError),
    /// Taking a snapshot failed.
    #[error("Failed to snapshot migratable component: {0}")]
    Snapshot(#[source] BoxError),
    /// Restoring from a snapshot failed.
    #[error("Failed to restore migratable component: {0}")]
    Restore(#[source] BoxError),
    /// Sending the snapshot failed.
    #[error("Failed to send migratable component snapshot: {0}")]
    MigrateSend(#[source] BoxError),
    /// Receiving the snapshot failed.
    #[error("Failed to receive migratable component snapshot: {0}")]
    MigrateReceive(#[source] BoxError),
    /// Socket I/O of the migration failed.
    #[error("Socket error: {0}")]
    MigrateSocket(#[source] std::io::Error),
    /// Starting dirty-page logging failed.
    #[error("Failed to start migration for migratable component: {0}")]
    StartDirtyLog(#[source] BoxError),
    /// Stopping dirty-page logging failed.
    #[error("Failed to stop migration for migratable component: {0}")]
    StopDirtyLog(#[source] BoxError),
    /// Reading the dirty log failed.
    #[error("Failed to retrieve dirty ranges for migratable component: {0}")]
    DirtyLog(#[source] BoxError),
    /// Starting the migration failed.
    #[error("Failed to start migration for migratable component: {0}")]
    StartMigration(#[source] BoxError),
    /// Completing the migration failed.
    #[error("Failed to complete migration for migratable component: {0}")]
    CompleteMigration(#[source] BoxError),
}

/// A component that can be paused and resumed.
pub trait Pausable {
    /// Pause the component.
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Resume the component.
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// A type's versionize version map (CH: one per snapshotted state type).
pub trait VersionMapped {
    /// The map; the default has one version.
    fn version_map() -> VersionMap {
        VersionMap::new()
    }
}

/// One component's serialized state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct SnapshotData {
    /// The bytes: serde JSON (`new_from_state`) or versionize (`new_from_versioned_state`).
    pub state: Vec<u8>,
}

impl SnapshotData {
    /// Serialize `state` with versionize at its version map's latest version.
    pub fn new_from_versioned_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        let vm = T::version_map();
        let mut data = Vec::new();
        state
            .serialize(&mut data, &vm, vm.latest_version())
            .map_err(|e| MigratableError::Snapshot(format!("Error serialising: {e:?}").into()))?;
        Ok(SnapshotData { state: data })
    }

    /// Deserialize a versionize state written by [`Self::new_from_versioned_state`].
    pub fn to_versioned_state<T>(&self) -> Result<T, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        let vm = T::version_map();
        T::deserialize(&mut self.state.as_slice(), &vm, vm.latest_version())
            .map_err(|e| MigratableError::Restore(format!("Error deserialising: {e:?}").into()))
    }

    /// Serialize `state` as JSON.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        let data = serde_json::to_vec(state)
            .map_err(|e| MigratableError::Snapshot(format!("Error serialising: {e}").into()))?;
        Ok(SnapshotData { state: data })
    }

    /// Deserialize a JSON state.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        serde_json::from_slice(&self.state)
            .map_err(|e| MigratableError::Restore(format!("Error deserialising: {e}").into()))
    }
}

/// A tree of component snapshots: each component's data plus its children by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Snapshot {
    /// Children, by `Snapshottable::id`.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// This component's own data.
    pub snapshot_data: Option<SnapshotData>,
}

impl Snapshot {
    /// A leaf with a JSON state.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        Ok(Snapshot {
            snapshots: BTreeMap::new(),
            snapshot_data: Some(SnapshotData::new_from_state(state)?),
        })
    }

    /// A leaf with a versionize state.
    pub fn new_from_versioned_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        Ok(Snapshot {
            snapshots: BTreeMap::new(),
            snapshot_data: Some(SnapshotData::new_from_versioned_state(state)?),
        })
    }

    /// Add a child snapshot under `id`.
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// This snapshot's versionize state.
    pub fn to_versioned_state<T>(&self) -> Result<T, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        self.snapshot_data
            .as_ref()
            .ok_or_else(|| MigratableError::Restore("Missing snapshot data".into()))?
            .to_versioned_state()
    }

    /// This snapshot's JSON state.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        self.snapshot_data
            .as_ref()
            .ok_or_else(|| MigratableError::Restore("Missing snapshot data".into()))?
            .to_state()
    }
}

/// A component that can be snapshotted and restored.
pub trait Snapshottable: Pausable {
    /// The component's id in the snapshot tree.
    fn id(&self) -> String {
        String::new()
    }
    /// Take a snapshot (the component is paused).
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
    /// Restore from a snapshot.
    fn restore(&mut self, _snapshot: Snapshot) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// A component whose snapshot can be sent to / received from a URL.
pub trait Transportable: Pausable + Snapshottable {
    /// Send `snapshot` to `destination_url`.
    fn send(&self, _snapshot: &Snapshot, _destination_url: &str) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Receive the snapshot of component `id` from `source_url`.
    fn recv(&self, _source_url: &str, _id: &str) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that takes part in live migration.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    /// Start logging dirty guest memory.
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Stop logging dirty guest memory.
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// The memory dirtied since the last call.
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        Ok(MemoryRangeTable::default())
    }
    /// The migration starts.
    fn start_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// The migration completed.
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}
