//! Stand-in for Cloud Hypervisor's in-tree `vm-migration` crate, which is not published on
//! crates.io. It presents the public API of one CH release, written for guest-clock (no CH code
//! copied), so that a plugin built against it builds inside CH by pointing the path dependency
//! at CH's crate:
//!
//! - by default, CH **v38.0** (the last release whose snapshots use versionize);
//! - with `VM_MIGRATION_API=current` in the build environment, CH **v53.0** (serde-only
//!   snapshots, `cfg(ch_current)`). CH's crate has no cargo features, so neither has this one.
//!
//! Remaining differences from CH's crates are listed in README.md.
#![warn(missing_docs)]

use std::collections::BTreeMap;

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
#[cfg(not(ch_current))]
use versionize::{VersionMap, Versionize};

use crate::protocol::MemoryRangeTable;

pub mod protocol;

/// The versionize application version of CH v38.0: `38 << 12 | 0`, computed in `u16` as CH does
/// (the major version's high bits fall off: 0x6000).
#[cfg(not(ch_current))]
const VMM_VERSION: u16 = {
    let major: u16 = 38;
    let minor: u16 = 0;
    (major << 12) | (minor & 0b1111)
};

/// A type with a versionize version map (every versioned state in CH v38).
#[cfg(not(ch_current))]
pub trait VersionMapped {
    /// The type's version map; the default has one version.
    fn version_map() -> VersionMap {
        VersionMap::new()
    }
}

/// A migration or snapshot step failed (CH v38.0's variants and messages).
#[cfg(not(ch_current))]
#[derive(thiserror::Error, Debug)]
#[allow(missing_docs)]
pub enum MigratableError {
    #[error("Failed to pause migratable component: {0}")]
    Pause(#[source] anyhow::Error),
    #[error("Failed to resume migratable component: {0}")]
    Resume(#[source] anyhow::Error),
    #[error("Failed to snapshot migratable component: {0}")]
    Snapshot(#[source] anyhow::Error),
    #[error("Failed to restore migratable component: {0}")]
    Restore(#[source] anyhow::Error),
    #[error("Failed to send migratable component snapshot: {0}")]
    MigrateSend(#[source] anyhow::Error),
    #[error("Failed to receive migratable component snapshot: {0}")]
    MigrateReceive(#[source] anyhow::Error),
    #[error("Socket error: {0}")]
    MigrateSocket(#[source] std::io::Error),
    #[error("Failed to start migration for migratable component: {0}")]
    StartDirtyLog(#[source] anyhow::Error),
    #[error("Failed to stop migration for migratable component: {0}")]
    StopDirtyLog(#[source] anyhow::Error),
    #[error("Failed to retrieve dirty ranges for migratable component: {0}")]
    DirtyLog(#[source] anyhow::Error),
    #[error("Failed to start migration for migratable component: {0}")]
    StartMigration(#[source] anyhow::Error),
    #[error("Failed to complete migration for migratable component: {0}")]
    CompleteMigration(#[source] anyhow::Error),
}

/// A migration or snapshot step failed (CH v53.0's variants and messages; the on-demand
/// restore, disk-lock, disconnected-device and TLS variants carry CH's types there and are not
/// part of the stand-in, see README.md).
#[cfg(ch_current)]
#[derive(thiserror::Error, Debug)]
#[allow(missing_docs)]
pub enum MigratableError {
    #[error("Failed to pause migratable component")]
    Pause(#[source] anyhow::Error),
    #[error("Failed to resume migratable component")]
    Resume(#[source] anyhow::Error),
    #[error("Failed to snapshot migratable component")]
    Snapshot(#[source] anyhow::Error),
    #[error("Failed to restore migratable component")]
    Restore(#[source] anyhow::Error),
    #[error("Failed to send migratable component snapshot")]
    MigrateSend(#[source] anyhow::Error),
    #[error("Failed to receive migratable component snapshot")]
    MigrateReceive(#[source] anyhow::Error),
    #[error("Socket error")]
    MigrateSocket(#[source] std::io::Error),
    #[error("Failed to start migration for migratable component")]
    StartDirtyLog(#[source] anyhow::Error),
    #[error("Failed to stop migration for migratable component")]
    StopDirtyLog(#[source] anyhow::Error),
    #[error("Failed to retrieve dirty ranges for migratable component")]
    DirtyLog(#[source] anyhow::Error),
    #[error("Failed to start migration for migratable component")]
    StartMigration(#[source] anyhow::Error),
    #[error("Failed to complete migration for migratable component")]
    CompleteMigration(#[source] anyhow::Error),
    #[error("Failed to release a disk lock")]
    UnlockError(#[source] anyhow::Error),
    #[error("Lifecycle operation skipped for disconnected component {0}")]
    DeviceDisconnected(String),
}

/// A component that can be paused and resumed.
pub trait Pausable {
    /// Pause the component.
    fn pause(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }

    /// Resume the component.
    fn resume(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }
}

/// One component's serialized state (CH v38: the bytes, serde JSON or versionize).
#[cfg(not(ch_current))]
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct SnapshotData(pub Vec<u8>);

/// One component's serialized state (CH v53: a JSON document, private).
#[cfg(ch_current)]
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct SnapshotData {
    state: String,
}

impl SnapshotData {
    /// Deserialize the JSON state.
    pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
    where
        T: Deserialize<'a>,
    {
        #[cfg(not(ch_current))]
        let r = serde_json::from_slice(&self.0);
        #[cfg(ch_current)]
        let r = serde_json::from_str(&self.state);
        r.map_err(|e| MigratableError::Restore(anyhow!("Error deserialising: {e}")))
    }

    /// Serialize `state` as JSON.
    pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Serialize,
    {
        #[cfg(not(ch_current))]
        let r = serde_json::to_vec(state).map(SnapshotData);
        #[cfg(ch_current)]
        let r = serde_json::to_string(state).map(|state| SnapshotData { state });
        r.map_err(|e| MigratableError::Snapshot(anyhow!("Error serialising: {e}")))
    }

    /// Deserialize a versionize state at CH v38's application version.
    #[cfg(not(ch_current))]
    pub fn to_versioned_state<T>(&self) -> Result<T, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        T::deserialize(&mut self.0.as_slice(), &T::version_map(), VMM_VERSION)
            .map_err(|e| MigratableError::Restore(anyhow!("Error deserialising: {e}")))
    }

    /// Serialize `state` with versionize at CH v38's application version.
    #[cfg(not(ch_current))]
    pub fn new_from_versioned_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        let mut bytes = Vec::new();
        state
            .serialize(&mut bytes, &T::version_map(), VMM_VERSION)
            .map_err(|e| MigratableError::Snapshot(anyhow!("Error serialising: {e}")))?;
        Ok(SnapshotData(bytes))
    }
}

/// A tree of component snapshots: each node's own data and its children by id.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct Snapshot {
    /// Children, by `Snapshottable::id`.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// This component's own data.
    pub snapshot_data: Option<SnapshotData>,
}

fn missing_data() -> MigratableError {
    MigratableError::Restore(anyhow!("Missing snapshot data"))
}

impl Snapshot {
    /// A leaf carrying `data`.
    pub fn from_data(data: SnapshotData) -> Self {
        Snapshot {
            snapshots: BTreeMap::new(),
            snapshot_data: Some(data),
        }
    }

    /// A leaf with a JSON state.
    pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Serialize,
    {
        SnapshotData::new_from_state(state).map(Snapshot::from_data)
    }

    /// A leaf with a versionize state.
    #[cfg(not(ch_current))]
    pub fn new_from_versioned_state<T>(state: &T) -> Result<Self, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        SnapshotData::new_from_versioned_state(state).map(Snapshot::from_data)
    }

    /// Add a child under `id` (replacing one of the same id).
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// This node's JSON state.
    pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
    where
        T: Deserialize<'a>,
    {
        self.snapshot_data
            .as_ref()
            .ok_or_else(missing_data)?
            .to_state()
    }

    /// This node's versionize state.
    #[cfg(not(ch_current))]
    pub fn to_versioned_state<T>(&self) -> Result<T, MigratableError>
    where
        T: Versionize + VersionMapped,
    {
        self.snapshot_data
            .as_ref()
            .ok_or_else(missing_data)?
            .to_versioned_state()
    }
}

/// The child `id` of `snapshot`, cloned (CH v38).
#[cfg(not(ch_current))]
pub fn snapshot_from_id(snapshot: Option<&Snapshot>, id: &str) -> Option<Snapshot> {
    snapshot?.snapshots.get(id).cloned()
}

/// The child `id` of `snapshot`, borrowed (CH v53).
#[cfg(ch_current)]
pub fn snapshot_from_id<'a>(snapshot: Option<&'a Snapshot>, id: &str) -> Option<&'a Snapshot> {
    snapshot?.snapshots.get(id)
}

/// The versionize state of child `id` of `snapshot`; `Ok(None)` without such a child.
#[cfg(not(ch_current))]
pub fn versioned_state_from_id<T>(
    snapshot: Option<&Snapshot>,
    id: &str,
) -> Result<Option<T>, MigratableError>
where
    T: Versionize + VersionMapped,
{
    match snapshot.and_then(|s| s.snapshots.get(id)) {
        Some(child) => child.to_versioned_state().map(Some),
        None => Ok(None),
    }
}

/// The JSON state of child `id` of `s`; `Ok(None)` without such a child (CH v53).
#[cfg(ch_current)]
pub fn state_from_id<'a, T>(s: Option<&'a Snapshot>, id: &str) -> Result<Option<T>, MigratableError>
where
    T: Deserialize<'a>,
{
    match s.and_then(|s| s.snapshots.get(id)) {
        Some(child) => child.to_state().map(Some),
        None => Ok(None),
    }
}

/// A component that can be snapshotted. (CH restores a component when it is created from its
/// snapshot: there is no `restore` method.)
pub trait Snapshottable: Pausable {
    /// The component's id in the snapshot tree.
    fn id(&self) -> String {
        String::new()
    }

    /// Take the component's snapshot.
    fn snapshot(&mut self) -> std::result::Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component with its own transport for its snapshot.
pub trait Transportable: Pausable + Snapshottable {
    /// Send `snapshot` to `destination_url` (an HTTP endpoint, a TCP address, a local file...).
    fn send(
        &self,
        _snapshot: &Snapshot,
        _destination_url: &str,
    ) -> std::result::Result<(), MigratableError> {
        Ok(())
    }

    /// Receive the component's snapshot from `source_url`.
    fn recv(&self, _source_url: &str) -> std::result::Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that takes part in live migration: paused before it is snapshotted, then
/// resumed; transported to a local or remote destination.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    /// Start logging dirty guest memory.
    fn start_dirty_log(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }

    /// Stop logging dirty guest memory.
    fn stop_dirty_log(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }

    /// The memory dirtied since the last call.
    fn dirty_log(&mut self) -> std::result::Result<MemoryRangeTable, MigratableError> {
        Ok(MemoryRangeTable::default())
    }

    /// The migration starts.
    fn start_migration(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }

    /// The migration completed.
    fn complete_migration(&mut self) -> std::result::Result<(), MigratableError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct S {
        a: u32,
    }

    #[test]
    fn json_state_round_trip_and_tree_helpers() {
        let mut root = Snapshot::default();
        root.add_snapshot("x".into(), Snapshot::new_from_state(&S { a: 7 }).unwrap());
        let json = serde_json::to_string(&root).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.snapshots["x"].to_state::<S>().unwrap(), S { a: 7 });
        assert!(snapshot_from_id(Some(&back), "x").is_some());
        assert!(snapshot_from_id(Some(&back), "y").is_none());
        assert!(snapshot_from_id(None, "x").is_none());
        assert!(back.to_state::<S>().is_err(), "the root has no data");
    }

    #[cfg(not(ch_current))]
    impl VersionMapped for u64 {}

    #[cfg(not(ch_current))]
    #[test]
    fn v38_json_shape_and_versioned_state() {
        // CH v38: SnapshotData is a tuple struct, serialized as the bare byte array.
        let snap = Snapshot::from_data(SnapshotData(vec![1, 2]));
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(json, r#"{"snapshots":{},"snapshot_data":[1,2]}"#);
        assert_eq!(VMM_VERSION, 0x6000);
        let mut root = Snapshot::default();
        root.add_snapshot(
            "n".into(),
            Snapshot::new_from_versioned_state(&5u64).unwrap(),
        );
        assert_eq!(
            versioned_state_from_id::<u64>(Some(&root), "n").unwrap(),
            Some(5)
        );
        assert_eq!(
            versioned_state_from_id::<u64>(Some(&root), "m").unwrap(),
            None
        );
        assert!(versioned_state_from_id::<u64>(Some(&snap), "n")
            .unwrap()
            .is_none());
    }

    #[cfg(ch_current)]
    #[test]
    fn current_json_shape() {
        // CH v53: SnapshotData { state: String }, the state a JSON document in a string.
        let snap = Snapshot::new_from_state(&S { a: 1 }).unwrap();
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(
            json,
            r#"{"snapshots":{},"snapshot_data":{"state":"{\"a\":1}"}}"#
        );
        let mut root = Snapshot::default();
        root.add_snapshot("s".into(), snap);
        assert_eq!(
            state_from_id::<S>(Some(&root), "s").unwrap(),
            Some(S { a: 1 })
        );
        assert!(state_from_id::<S>(Some(&root), "t").unwrap().is_none());
    }
}
