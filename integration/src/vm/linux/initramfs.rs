//! The initramfs clockvmm gives a Linux guest when no `--initrd` is named: a newc cpio archive
//! with `/dev/console` and the project's probe as `/init` (built from `guest/linux/probe.c` by
//! `build.rs`, static, embedded in the binary).
//!
//! `--guest-module` files are appended as a second newc archive (`/gcmod/NN-name.ko`; the
//! kernel unpacks concatenated archives in order), which the probe loads before sampling.

/// The probe binary (empty when the build could not compile it).
pub const PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gc-probe"));

/// One archive entry.
pub enum Entry<'a> {
    /// A directory.
    Dir(&'a str),
    /// A regular file with its mode bits.
    File(&'a str, u32, &'a [u8]),
    /// A character device (major, minor).
    Char(&'a str, u32, u32),
}

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// A newc ("070701") cpio archive of `entries`, as the kernel's initramfs unpacker reads it.
pub fn cpio(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let fields = [
            ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(data);
        pad4(&mut out);
    };
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir(n) => put(ino, n, 0o040755, (0, 0), &[]),
            Entry::File(n, m, d) => put(ino, n, 0o100000 | (m & 0o7777), (0, 0), d),
            Entry::Char(n, maj, min) => put(ino, n, 0o020600, (*maj, *min), &[]),
        }
    }
    put(0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// The default initramfs: `/dev/console`, `/proc`, `/sys` and the probe as `/init`; `None`
/// when the probe was not built.
pub fn probe_initramfs() -> Option<Vec<u8>> {
    if PROBE.is_empty() {
        return None;
    }
    Some(cpio(&[
        Entry::Dir("dev"),
        Entry::Char("dev/console", 5, 1),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::File("init", 0o755, PROBE),
    ]))
}

/// Where the probe looks for modules.
pub const MODULE_DIR: &str = "gcmod";

/// A kernel module file for the guest: `name.ko` as it is, `name.ko.xz` decompressed here with
/// the `xz` tool (the probe loads plain ELF objects). Returns (name, object); refuses anything
/// that is not an ELF object after that, or larger than `max` bytes.
pub fn load_module(path: &std::path::Path, max: u64) -> Result<(String, Vec<u8>), String> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("--guest-module {}: no file name", path.display()))?;
    let (name, xz) = if let Some(n) = file.strip_suffix(".ko.xz") {
        (n, true)
    } else if let Some(n) = file.strip_suffix(".ko") {
        (n, false)
    } else {
        return Err(format!(
            "--guest-module {}: expected a .ko or .ko.xz file",
            path.display()
        ));
    };
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!(
            "--guest-module {}: bad module name",
            path.display()
        ));
    }
    let data = if xz {
        let out = std::process::Command::new("xz")
            .args(["--decompress", "--stdout", "--"])
            .arg(path)
            .output()
            .map_err(|e| {
                format!(
                    "--guest-module {}: running xz to decompress it: {e} (install xz-utils, or \
                     pass the decompressed .ko)",
                    path.display()
                )
            })?;
        if !out.status.success() {
            return Err(format!(
                "--guest-module {}: xz failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        out.stdout
    } else {
        std::fs::read(path).map_err(|e| format!("--guest-module {}: {e}", path.display()))?
    };
    if data.len() as u64 > max {
        return Err(format!(
            "--guest-module {}: {} bytes, more than the guest's memory allows",
            path.display(),
            data.len()
        ));
    }
    if !data.starts_with(b"\x7fELF") {
        return Err(format!(
            "--guest-module {}: not an ELF kernel module",
            path.display()
        ));
    }
    Ok((name.to_string(), data))
}

/// Append `modules` to `initrd` as a second newc archive holding `/gcmod/NN-name.ko` (NN: the
/// load order), after padding the first to 4 bytes (the kernel's unpacker skips the zeros).
pub fn append_modules(initrd: &mut Vec<u8>, modules: &[(String, Vec<u8>)]) {
    if modules.is_empty() {
        return;
    }
    pad4(initrd);
    let names: Vec<String> = modules
        .iter()
        .enumerate()
        .map(|(i, (n, _))| format!("{MODULE_DIR}/{i:02}-{n}.ko"))
        .collect();
    let mut entries = vec![Entry::Dir(MODULE_DIR)];
    for (name, (_, data)) in names.iter().zip(modules) {
        entries.push(Entry::File(name, 0o644, data));
    }
    initrd.extend_from_slice(&cpio(&entries));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_a_second_archive_in_load_order() {
        let mut img = cpio(&[Entry::Dir("dev")]);
        img.push(7); // an initrd whose length is not a multiple of 4
        let first = img.len();
        append_modules(
            &mut img,
            &[
                ("pps_core".into(), b"\x7fELFa".to_vec()),
                ("ptp_vmclock".into(), b"\x7fELFb".to_vec()),
            ],
        );
        let second = first.next_multiple_of(4);
        assert!(img[first..second].iter().all(|b| *b == 0));
        assert_eq!(&img[second..second + 6], b"070701");
        let s = String::from_utf8_lossy(&img[second..]);
        let a = s.find("gcmod/00-pps_core.ko").unwrap();
        let b = s.find("gcmod/01-ptp_vmclock.ko").unwrap();
        assert!(a < b, "load order kept");
        assert!(s[b..].contains("TRAILER!!!"));
        assert_eq!(img.len() % 4, 0);
        let mut same = img.clone();
        append_modules(&mut same, &[]);
        assert_eq!(same, img);
    }

    #[test]
    fn module_files_plain_and_xz() {
        let dir = std::env::temp_dir().join(format!("gc-mod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("ptp_vmclock.ko");
        std::fs::write(&plain, b"\x7fELF plain module").unwrap();
        assert_eq!(
            load_module(&plain, 1 << 20).unwrap(),
            ("ptp_vmclock".to_string(), b"\x7fELF plain module".to_vec())
        );
        assert!(load_module(&plain, 4).unwrap_err().contains("memory"));
        let bad = dir.join("x.txt");
        std::fs::write(&bad, b"x").unwrap();
        assert!(load_module(&bad, 1 << 20).unwrap_err().contains(".ko"));
        let not_elf = dir.join("y.ko");
        std::fs::write(&not_elf, b"hello").unwrap();
        assert!(load_module(&not_elf, 1 << 20).unwrap_err().contains("ELF"));
        let compressed = std::process::Command::new("xz")
            .args(["--keep", "--force", "--"])
            .arg(&plain)
            .status();
        match compressed {
            Ok(st) if st.success() => {
                let xz = dir.join("ptp_vmclock.ko.xz");
                let (n, d) = load_module(&xz, 1 << 20).unwrap();
                assert_eq!(
                    (n.as_str(), d.as_slice()),
                    ("ptp_vmclock", &b"\x7fELF plain module"[..])
                );
                std::fs::write(&xz, b"not xz").unwrap();
                assert!(load_module(&xz, 1 << 20).unwrap_err().contains("xz failed"));
            }
            _ => eprintln!("SKIP (xz part): no xz tool"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpio_layout_is_newc() {
        let a = cpio(&[Entry::Dir("d"), Entry::File("d/f", 0o644, b"abc")]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("d/f") && s.contains("abc") && s.contains("TRAILER!!!"));
        // Header (110) + "d\0" padded to 112.
        assert_eq!(&a[112..118], b"070701");
    }

    #[test]
    fn the_probe_is_embedded_static() {
        let Some(img) = probe_initramfs() else {
            eprintln!("SKIP: the probe was not built (no static C toolchain)");
            return;
        };
        assert!(PROBE.starts_with(b"\x7fELF"));
        // Static: no PT_INTERP program header.
        let u16_at = |o: usize| u16::from_le_bytes([PROBE[o], PROBE[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(PROBE[0x20..0x28].try_into().unwrap()) as usize;
        let (size, n) = (u16_at(0x36), u16_at(0x38));
        for i in 0..n {
            let o = phoff + i * size;
            let p_type = u32::from_le_bytes(PROBE[o..o + 4].try_into().unwrap());
            assert_ne!(p_type, 3, "the probe has an interpreter: not static");
        }
        assert!(img.len() > PROBE.len());
    }
}
