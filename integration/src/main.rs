//! clockvmm: a small real-KVM VMM hosting the guest-clock plugin.

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("demo") => println!("clockvmm demo: not built yet (the VMM is being written)"),
        _ => println!("usage: clockvmm demo"),
    }
}
