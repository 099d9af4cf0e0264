//! Builds the Linux guest's probe (`guest/linux/probe.c`, static) into OUT_DIR, where
//! `src/vm/linux/initramfs.rs` embeds it. Without a C compiler able to link statically the
//! build still succeeds: the embedded probe is empty and a Linux guest needs `--initrd`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "guest/linux/probe.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let probe = out.join("gc-probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    let ok = target.starts_with("x86_64-")
        && Command::new(&cc)
            .args(["-static", "-O2", "-Wall", "-s", "-o"])
            .arg(&probe)
            .arg(src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok {
        println!(
            "cargo:warning=the Linux guest probe was not built ({cc} -static failed or not x86_64): \
             a Linux guest then needs --initrd"
        );
        std::fs::write(&probe, b"").expect("writing OUT_DIR/gc-probe");
    }
}
