//! clockvmm: a small real-KVM VMM hosting the guest-clock plugin, shaped like
//! cloud-hypervisor + ch-remote. See `clockvmm --help`.

mod api;
mod bench;
mod client;
mod demo;
mod error;
mod files;
mod inspect;
mod migration;
mod refresher;
mod sockets;
mod vm;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use guest_clock::restore::{RestoreMode, RestoreOptions};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "clockvmm",
    version,
    about = "A real-KVM VMM hosting the guest-clock plugin"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a VMM serving the REST API on a UNIX socket.
    Run {
        /// API socket path.
        #[arg(long)]
        api_socket: PathBuf,
        /// vCPUs of the VM booted at start.
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// Guest memory, MiB (default 2 for the tiny guest, 256 for Linux).
        #[arg(long)]
        memory_mib: Option<usize>,
        /// Use the model backend even where /dev/kvm works.
        #[arg(long)]
        model: bool,
        /// Start without a VM (to restore a snapshot or receive a migration).
        #[arg(long)]
        no_vm: bool,
        /// Re-anchor the guest's vmclock page this often while the VM runs, ms (0: only at
        /// creation and restore).
        #[arg(long, default_value_t = 1000)]
        vmclock_refresh_ms: u64,
        /// TAI − UTC, s, for the vmclock page when this host does not know it (no NTP daemon
        /// told the kernel, no unexpired tzdata leap-seconds.list); Linux 7.x's ptp_vmclock
        /// needs it to offer its PTP clock.
        #[arg(long, value_parser = clap::value_parser!(i16).range(10..=1000))]
        vmclock_tai_offset_s: Option<i16>,
        #[command(flatten)]
        linux: LinuxArgs,
    },
    /// Talk to a running VMM (like ch-remote).
    Remote {
        /// API socket path.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(subcommand)]
        cmd: RemoteCmd,
    },
    /// Boot a guest, live-update it, migrate it, print the clock errors.
    Demo {
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// Visible downtime of each disruption, ms.
        #[arg(long, default_value_t = 200)]
        downtime_ms: u64,
        /// Wallclock skew injected into the migration, ns.
        #[arg(long, default_value_t = 250_000)]
        skew_ns: i64,
        /// Use the model backend.
        #[arg(long)]
        model: bool,
        /// The guest: `tiny` (the 31-byte loop) or `linux` (needs --kernel and a KVM that runs
        /// stock Linux; elsewhere the demo says why and uses the tiny guest).
        #[arg(long, default_value = "tiny", value_parser = ["tiny", "linux"])]
        guest: String,
        /// The bzImage for `--guest linux`.
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[command(flatten)]
        vmclock: VmclockGuestArgs,
    },
    /// Measure clock error and cost of the restore strategies.
    Bench {
        /// Write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw the results as SVG.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Fewer repetitions (CI smoke run).
        #[arg(long)]
        quick: bool,
        /// The guest: `tiny` (strategies × backends, scaling, drift) or `linux` (the strategies
        /// measured by a real Linux guest's own clocks, both clocksources; needs --kernel).
        #[arg(long, default_value = "tiny", value_parser = ["tiny", "linux"])]
        guest: String,
        /// The bzImage for `--guest linux`.
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[command(flatten)]
        vmclock: VmclockGuestArgs,
    },
    /// Print a clock section (raw framed file, or a snapshot directory).
    Inspect {
        /// A section file or a snapshot directory.
        path: PathBuf,
    },
}

/// The PHC of `demo|bench --guest linux`: guests with the vmclock ACPI device and
/// ptp_vmclock, whose PTP clock is measured through each guest-clock hop.
#[derive(clap::Args, Debug, Default)]
struct VmclockGuestArgs {
    /// A kernel module for the Linux guests, in load order (repeatable): ptp_vmclock.ko and
    /// what it depends on. Given: the guests get the vmclock device and the PHC is measured.
    #[arg(long = "guest-module", value_name = "FILE")]
    guest_modules: Vec<PathBuf>,
    /// TAI − UTC, s, for the vmclock page when the host does not know it (see `run`).
    #[arg(long, value_parser = clap::value_parser!(i16).range(10..=1000))]
    vmclock_tai_offset_s: Option<i16>,
}

impl VmclockGuestArgs {
    fn guest(&self) -> bench::linux::VmclockGuest {
        bench::linux::VmclockGuest {
            modules: self.guest_modules.clone(),
            tai_offset_fallback_s: self.vmclock_tai_offset_s,
        }
    }
}

/// Boot a Linux guest instead of the tiny one (real KVM, not kvm_pvm).
#[derive(clap::Args, Debug, Default)]
struct LinuxArgs {
    /// A bzImage to boot (64-bit boot protocol).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs (default: the built-in one running the project's clock probe as /init).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Words appended to the kernel command line.
    #[arg(long, requires = "kernel", default_value = "")]
    cmdline: String,
    /// Write the guest's console to this file instead of stdout.
    #[arg(long, requires = "kernel")]
    serial: Option<PathBuf>,
    /// Advertise an invariant TSC (Linux then uses the TSC clocksource, not kvm-clock).
    #[arg(long, requires = "kernel")]
    invariant_tsc: bool,
    /// Describe the vmclock page to the guest as an ACPI device (HID AMZNC10C).
    #[arg(long, requires = "kernel")]
    acpi_vmclock: bool,
    /// A kernel module for the guest (.ko, or .ko.xz: decompressed with the host's xz),
    /// appended to the initramfs; the built-in probe loads them in the order given
    /// (repeatable; e.g. ptp_vmclock.ko with --acpi-vmclock).
    #[arg(long = "guest-module", value_name = "FILE", requires = "kernel")]
    guest_modules: Vec<PathBuf>,
}

impl LinuxArgs {
    fn config(&self) -> Option<vm::linux::LinuxConfig> {
        self.kernel.as_ref().map(|k| vm::linux::LinuxConfig {
            kernel: k.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            serial: self.serial.clone(),
            invariant_tsc: self.invariant_tsc,
            acpi_vmclock: self.acpi_vmclock,
            modules: self.guest_modules.clone(),
        })
    }
}

#[derive(Subcommand)]
enum RemoteCmd {
    /// Pause the VM (captures the clocks).
    Pause,
    /// Resume the VM.
    Resume,
    /// VM state and backend.
    Info,
    /// The guest-observed clock and the last restore report.
    Clock,
    /// Stop the VMM.
    Shutdown,
    /// Snapshot to a directory.
    Snapshot {
        /// file://DIR
        #[arg(long)]
        destination_url: String,
    },
    /// Restore from a snapshot directory (into a VMM started with --no-vm).
    Restore {
        /// file://DIR
        #[arg(long)]
        source_url: String,
    },
    /// Migrate the VM to a receiving VMM.
    SendMigration {
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        destination_url: String,
        /// Extra pause between capture and State, ms (demos).
        #[arg(long, default_value_t = 0)]
        downtime_ms: u64,
        /// Ask the receiver to signal the guest even on an exact restore (the only restore
        /// request a sender can make: the receiver owns its policy).
        #[arg(long)]
        always_signal: bool,
        #[command(flatten)]
        deadlines: DeadlineArgs,
    },
    /// Receive a migration (into a VMM started with --no-vm).
    ReceiveMigration {
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        receiver_url: String,
        /// Refuse a sender whose VM has another vCPU count.
        #[arg(long)]
        vcpus: Option<usize>,
        /// Force this receiver's restore mode.
        #[arg(long, value_parser = ["live-update", "live-migration"])]
        mode: Option<String>,
        /// Pretend this receiver's wallclock is this far ahead of the sender's, ns (demos).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        inject_skew_ns: i64,
        #[command(flatten)]
        deadlines: DeadlineArgs,
    },
}

/// Migration deadlines (see `migration::Deadlines`).
#[derive(clap::Args)]
struct DeadlineArgs {
    /// One request and its response, ms.
    #[arg(long, default_value_t = migration::Deadlines::default().phase_ms)]
    phase_timeout_ms: u64,
    /// The whole migration, ms.
    #[arg(long, default_value_t = migration::Deadlines::default().total_ms)]
    total_timeout_ms: u64,
}

impl DeadlineArgs {
    fn to_json(&self) -> Value {
        json!({"phase_ms": self.phase_timeout_ms, "total_ms": self.total_timeout_ms})
    }
}

fn restore_options(mode: Option<&str>, skew_ns: i64) -> Option<RestoreOptions> {
    let mode = match mode {
        Some("live-update") => Some(RestoreMode::LiveUpdate),
        Some("live-migration") => Some(RestoreMode::LiveMigration),
        _ => None,
    };
    (mode.is_some() || skew_ns != 0).then(|| RestoreOptions {
        mode,
        inject_wallclock_skew_ns: skew_ns,
        ..RestoreOptions::default()
    })
}

fn remote(socket: &std::path::Path, cmd: RemoteCmd) -> Result<Value, String> {
    let (method, endpoint, body) = match cmd {
        RemoteCmd::Pause => ("PUT", "vm.pause", None),
        RemoteCmd::Resume => ("PUT", "vm.resume", None),
        RemoteCmd::Info => ("GET", "vm.info", None),
        RemoteCmd::Clock => ("GET", "vm.clock", None),
        RemoteCmd::Shutdown => ("PUT", "vmm.shutdown", None),
        RemoteCmd::Snapshot { destination_url } => (
            "PUT",
            "vm.snapshot",
            Some(json!({"destination_url": destination_url})),
        ),
        RemoteCmd::Restore { source_url } => {
            ("PUT", "vm.restore", Some(json!({"source_url": source_url})))
        }
        RemoteCmd::SendMigration {
            destination_url,
            downtime_ms,
            always_signal,
            deadlines,
        } => (
            "PUT",
            "vm.send-migration",
            Some(json!({
                "destination_url": destination_url,
                "downtime_ms": downtime_ms,
                "hint": {"always_signal": always_signal},
                "deadlines": deadlines.to_json(),
            })),
        ),
        RemoteCmd::ReceiveMigration {
            receiver_url,
            vcpus,
            mode,
            inject_skew_ns,
            deadlines,
        } => (
            "PUT",
            "vm.receive-migration",
            Some(json!({
                "receiver_url": receiver_url,
                "vcpus": vcpus,
                "restore_options": restore_options(mode.as_deref(), inject_skew_ns),
                "deadlines": deadlines.to_json(),
            })),
        ),
    };
    client::call_ok(socket, method, endpoint, body.as_ref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmark creates hundreds of VMs on purpose: keep their per-VM warnings out of its
    // table unless RUST_LOG asks for them.
    let default_level = if matches!(cli.cmd, Cmd::Bench { .. }) {
        "error"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    let r = match cli.cmd {
        Cmd::Run {
            api_socket,
            vcpus,
            memory_mib,
            model,
            no_vm,
            vmclock_refresh_ms,
            vmclock_tai_offset_s,
            linux,
        } => {
            let mut vmm = vmm::Vmm::new()
                .with_vmclock_refresh(Some(std::time::Duration::from_millis(vmclock_refresh_ms)))
                .with_tai_offset_fallback(vmclock_tai_offset_s);
            if no_vm {
                println!("clockvmm: no VM yet (waiting for restore or receive-migration)");
            } else {
                let linux = linux.config();
                let default_mib = if linux.is_some() { 256 } else { 2 };
                match vmm.boot(&vm::VmConfig {
                    vcpus,
                    memory_mib: memory_mib.unwrap_or(default_mib),
                    force_model: model,
                    vm_id: [0; 16],
                    linux,
                }) {
                    Ok(d) => println!("clockvmm: {d}"),
                    Err(e) => {
                        eprintln!("clockvmm: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            api::serve(&api_socket, vmm)
        }
        Cmd::Remote { api_socket, cmd } => remote(&api_socket, cmd).map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }),
        Cmd::Demo {
            vcpus,
            downtime_ms,
            skew_ns,
            model,
            guest,
            kernel,
            vmclock,
        } => {
            let why_not = bench::linux::unavailable(kernel.as_deref(), model);
            match (guest.as_str(), why_not, kernel) {
                ("linux", None, Some(k)) => bench::run_linux(
                    &k,
                    Duration::from_millis(downtime_ms),
                    skew_ns,
                    vmclock.guest(),
                    None,
                ),
                ("linux", why, _) => {
                    println!(
                        "clockvmm demo: --guest linux: {}; using the tiny guest",
                        why.unwrap_or_else(|| "no --kernel given".into())
                    );
                    demo::run(vcpus, downtime_ms, skew_ns, model)
                }
                _ => demo::run(vcpus, downtime_ms, skew_ns, model),
            }
        }
        Cmd::Bench {
            json,
            svg,
            quick,
            guest,
            kernel,
            vmclock,
        } => match (guest.as_str(), kernel) {
            ("linux", Some(k)) => match bench::linux::unavailable(Some(&k), false) {
                None => bench::run_linux(
                    &k,
                    Duration::from_millis(200),
                    250_000,
                    vmclock.guest(),
                    json.as_deref(),
                ),
                Some(why) => Err(format!("--guest linux: {why}")),
            },
            ("linux", None) => Err("--guest linux needs --kernel BZIMAGE".into()),
            _ => bench::run(json.as_deref(), svg.as_deref(), quick),
        },
        Cmd::Inspect { path } => inspect::run(&path),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clockvmm: {e}");
            ExitCode::FAILURE
        }
    }
}
