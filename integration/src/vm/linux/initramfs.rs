//! The initramfs clockvmm gives a Linux guest when no `--initrd` is named: a newc cpio archive
//! with `/dev/console` and the project's probe as `/init` (built from `guest/linux/probe.c` by
//! `build.rs`, static, embedded in the binary).

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

#[cfg(test)]
mod tests {
    use super::*;

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
