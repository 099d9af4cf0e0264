//! `file://` snapshot transport, as Cloud Hypervisor's vmm does for `Transportable`: a
//! component's snapshot is the file `<dir>/<id>.json` (the snapshot tree as JSON).

use std::path::PathBuf;

use crate::{MigratableError, Snapshot};

/// The directory of a `file://DIR` URL.
pub fn url_to_path(url: &str) -> Result<PathBuf, MigratableError> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| MigratableError::MigrateSend(format!("not a file:// URL: {url}").into()))?;
    if path.is_empty() {
        return Err(MigratableError::MigrateSend("empty file:// path".into()));
    }
    Ok(PathBuf::from(path))
}

/// Write `snapshot` of component `id` under the `file://` directory `url`.
pub fn send_to_file(snapshot: &Snapshot, id: &str, url: &str) -> Result<(), MigratableError> {
    let dir = url_to_path(url)?;
    std::fs::create_dir_all(&dir).map_err(|e| MigratableError::MigrateSend(e.into()))?;
    let bytes = serde_json::to_vec(snapshot).map_err(|e| MigratableError::MigrateSend(e.into()))?;
    std::fs::write(dir.join(format!("{id}.json")), bytes)
        .map_err(|e| MigratableError::MigrateSend(e.into()))
}

/// Read the snapshot of component `id` from the `file://` directory `url`; at most 64 MiB.
pub fn recv_from_file(url: &str, id: &str) -> Result<Snapshot, MigratableError> {
    let path = url_to_path(url)?.join(format!("{id}.json"));
    let len = std::fs::metadata(&path)
        .map_err(|e| MigratableError::MigrateReceive(e.into()))?
        .len();
    if len > 64 << 20 {
        return Err(MigratableError::MigrateReceive(
            format!("{} is {len} bytes (bound 64 MiB)", path.display()).into(),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| MigratableError::MigrateReceive(e.into()))?;
    serde_json::from_slice(&bytes).map_err(|e| MigratableError::MigrateReceive(e.into()))
}
