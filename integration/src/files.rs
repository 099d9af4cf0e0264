//! Snapshot files, opened safely: never through a symlink (`O_NOFOLLOW`), regular files only,
//! sizes checked on the open file (`fstat`), reads bounded. Opening is non-blocking so that a
//! FIFO or a device at the path is refused instead of hanging the VMM.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Open `path` for reading: not a symlink, a regular file, at most `max` bytes. Returns the
/// file and its size.
pub fn open_regular(path: &Path, max: u64) -> Result<(File, u64), String> {
    let shown = path.display();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let m = f.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !m.file_type().is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if m.len() > max {
        return Err(format!("{shown} is {} bytes (bound {max})", m.len()));
    }
    Ok((f, m.len()))
}

/// Read all of `path` (see [`open_regular`]), never more than `max` bytes even if it grows.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let (f, len) = open_regular(path, max)?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if buf.len() as u64 > max {
        return Err(format!(
            "{} grew past {max} bytes while read",
            path.display()
        ));
    }
    Ok(buf)
}

/// Create (or truncate) `path` for writing, mode 0600: never through a symlink, only over a
/// regular file.
pub fn create_regular(path: &Path) -> Result<File, String> {
    open_for_writing(path, false)
}

/// Create `path` or append to it, with [`create_regular`]'s checks (a guest's console log that
/// continues across live updates).
pub fn append_regular(path: &Path) -> Result<File, String> {
    open_for_writing(path, true)
}

fn open_for_writing(path: &Path, append: bool) -> Result<File, String> {
    let shown = path.display();
    // Refuse what is there before opening: O_TRUNC on a FIFO or device would act on it.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_file() {
            return Err(format!(
                "{shown} exists and is not a regular file: refusing to write it"
            ));
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!append)
        .append(append)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let m = f.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !m.file_type().is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    Ok(f)
}

fn open_error(path: &Path, e: std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ELOOP) {
        format!("{} is a symlink: refused", path.display())
    } else {
        format!("{}: {e}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_symlinks_fifos_devices_and_big_files() {
        let d = std::env::temp_dir().join(format!("clockvmm-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert!(read_regular(&f, 4).unwrap_err().contains("bound 4"));
        let l = d.join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(read_regular(&l, 10).unwrap_err().contains("symlink"));
        assert!(create_regular(&l)
            .unwrap_err()
            .contains("not a regular file"));
        assert_eq!(std::fs::read(&f).unwrap(), b"12345", "target untouched");
        assert!(read_regular(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .contains("not a regular file"));
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read_regular(&fifo, 10)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(create_regular(&fifo).is_err());
        let mut w = create_regular(&d.join("new")).unwrap();
        std::io::Write::write_all(&mut w, b"x").unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
