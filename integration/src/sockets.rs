//! UNIX sockets clockvmm listens on (the API, a migration receiver): created 0600, never over
//! something that is not a stale socket, removed on exit only while they are still ours.
//!
//! Binding `path`:
//! - nothing there: bind;
//! - a socket that accepts a connection: refused (another process serves it);
//! - a socket nobody listens on (connection refused): stale, removed, then bind;
//! - anything else (regular file, directory, FIFO, symlink...): refused, left untouched.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::warn;

/// A bound listening socket and the identity of the file it created.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener.
    pub listener: UnixListener,
    path: PathBuf,
    id: FileId,
}

impl BoundSocket {
    /// A guard that removes the socket file when dropped (if it is still this socket).
    pub fn cleanup_guard(&self) -> SocketCleanup {
        SocketCleanup {
            path: self.path.clone(),
            id: self.id,
        }
    }
}

/// Which file a path names: device, inode and change time to the nanosecond (an inode number
/// alone may be reused by a socket created after ours was removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

/// Removes a socket file on drop, only while the path still names the socket we created.
pub struct SocketCleanup {
    path: PathBuf,
    id: FileId,
}

impl SocketCleanup {
    /// Remove the socket now (idempotent).
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && FileId::of(&m) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for SocketCleanup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Bind a listening UNIX socket at `path` with mode 0600, following the rules in the module
/// docs. The error names the path and why.
pub fn bind(path: &Path) -> Result<BoundSocket, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{shown}: another process is listening on this socket"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                warn!("{shown}: removing a stale socket");
                std::fs::remove_file(path).map_err(|e| format!("{shown}: {e}"))?;
            }
            Err(e) => return Err(format!("{shown}: existing socket: {e}")),
        },
        Ok(m) => {
            return Err(format!(
                "{shown} exists and is not a socket ({}): refusing to replace it",
                kind(&m)
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    // The socket file gets its mode from the umask at bind time; make it 0600 from the start so
    // there is no window where others may connect. umask is process-wide, but only files created
    // during these few instructions are affected, and 0177 only ever removes permissions.
    // SAFETY: umask(2) has no memory-safety preconditions; it only swaps the process file mode
    // creation mask.
    let old = unsafe { libc::umask(0o177) };
    // bind(2) creates the path before listen(2) runs: a client connecting in between is refused
    // (a window a slow machine widens). Listen under a temporary name beside it, then link the
    // listening socket to `path` (link(2) never replaces what appeared there meanwhile).
    let tmp = temp_name(path);
    let bound = match &tmp {
        Some(t) => UnixListener::bind(t),
        None => UnixListener::bind(path),
    };
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("binding {shown}: {e}"))?;
    if let Some(t) = &tmp {
        let linked = std::fs::hard_link(t, path);
        let _ = std::fs::remove_file(t);
        linked.map_err(|e| format!("binding {shown}: {e}"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{shown}: chmod 0600: {e}"))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        id: FileId::of(&m),
    })
}

/// A fresh sibling name for binding `path` (None: it would not fit a socket address, then the
/// socket is bound at `path` itself).
fn temp_name(path: &Path) -> Option<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".gc-{}-{n}.sock", std::process::id());
    let t = path.parent()?.join(name);
    // sun_path holds 108 bytes with its NUL.
    (t.as_os_str().len() < 108).then_some(t)
}

fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a socket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("clockvmm-sock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_path_appears_only_once_listening() {
        let d = dir("listening");
        let p = d.join("s.sock");
        let watcher = {
            let p = p.clone();
            std::thread::spawn(move || {
                // Connect the instant the path exists: never refused.
                while !p.exists() {
                    std::hint::spin_loop();
                }
                UnixStream::connect(&p).map(|_| ())
            })
        };
        let s = bind(&p).unwrap();
        watcher.join().unwrap().unwrap();
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("s.sock")],
            "no temporary name left"
        );
        drop(s.cleanup_guard());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn refuses_live_and_non_sockets_replaces_stale() {
        let d = dir("rules");
        let p = d.join("s.sock");
        let a = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(bind(&p).unwrap_err().contains("another process"));
        let guard = a.cleanup_guard();
        drop(a); // listener closed: the socket file is stale now
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = bind(&p).unwrap();
        // The old guard must not remove the new socket.
        drop(guard);
        assert!(p.exists());
        drop(b.cleanup_guard());
        assert!(!p.exists());
        let f = d.join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert!(bind(&f).unwrap_err().contains("regular file"));
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
