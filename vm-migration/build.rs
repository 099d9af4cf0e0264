//! Selects which Cloud Hypervisor vm-migration API this stand-in presents.
//!
//! CH's crate has no cargo features, so the shape is not a feature either: the environment
//! variable `VM_MIGRATION_API` picks it at build time.
//!
//! - unset, `v38`: CH v38.0 (the last versionize release), the default;
//! - `current` (or `v53`): CH v53.0 (serde-only snapshots, `cfg(ch_current)`).

fn main() {
    println!("cargo:rerun-if-env-changed=VM_MIGRATION_API");
    println!("cargo:rustc-check-cfg=cfg(ch_current)");
    match std::env::var("VM_MIGRATION_API").as_deref() {
        Err(_) | Ok("") | Ok("v38") => {}
        Ok("current") | Ok("v53") => println!("cargo:rustc-cfg=ch_current"),
        Ok(other) => {
            println!(
                "cargo:warning=VM_MIGRATION_API={other:?} is not one of v38, current, v53; using v38"
            );
        }
    }
}
