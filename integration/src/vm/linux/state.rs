//! A Linux guest's whole machine state, captured while its vCPUs are parked and restored into a
//! new VM (live update into a new process, live migration, snapshot/restore), and the ordering
//! contract a VMM follows around the guest-clock plugin.
//!
//! What a vCPU's state is, in the order it is restored ([`VcpuState`]): CPUID (set at vCPU
//! creation from the same template), MP state, regs, sregs, XSAVE (FPU/SSE/AVX), XCRs, debug
//! registers, LAPIC, the MSRs of `KVM_GET_MSR_INDEX_LIST` (early phase), vCPU events. Then the
//! plugin's `ClockManager::restore` (TSC offsets, kvmclock, signalling), then the late MSRs. The
//! VM's state ([`MachineState`]): the in-kernel PIC (master, slave) and IOAPIC, the PIT, the
//! COM1 UART. Guest memory travels apart (memory.bin / the Memory command). The snapshot layout
//! is Cloud Hypervisor's: one child section per component ([`CPU_MANAGER_ID`] with one child per
//! vCPU, [`DEVICE_MANAGER_ID`] with one child per device).
//!
//! The contract, for one vCPU's MSRs (the list from `KVM_GET_MSR_INDEX_LIST`):
//!
//! 1. [`MsrPhase::LeftToPlugin`]: `MSR_IA32_TSC` (0x10) is never written by the VMM. A host
//!    write of IA32_TSC goes through KVM's TSC "matching" heuristic (writes within ~1 s of
//!    another vCPU's are folded onto its offset) and fixes the offset at the write's instant;
//!    the plugin sets each vCPU's TSC through `KVM_VCPU_TSC_OFFSET` (or the MSR where that
//!    attribute is absent) exactly once, from the captured (Tₙ, Kₙ).
//! 2. [`MsrPhase::BeforeClock`]: every other MSR, restored with the rest of the vCPU state
//!    *before* the plugin. That includes `MSR_IA32_TSC_ADJUST` (0x3b): a host-initiated write
//!    only sets the guest-visible value (KVM_X86_QUIRK_TSC_HOST_ACCESS, on by default) and, with
//!    that quirk off, moves the offset, which the plugin then overwrites with its absolute one —
//!    either way the guest TSC is the plugin's. It also includes the kvmclock system-time MSRs
//!    (`MSR_KVM_SYSTEM_TIME{,_NEW}`): KVM only records the page's address there and publishes the
//!    page at the vCPU's next entry (after the plugin, from the restored kvmclock), and the
//!    plugin's `KVM_KVMCLOCK_CTRL` (PVCLOCK_GUEST_STOPPED on migration) fails with EINVAL on a vCPU
//!    whose kvmclock is not enabled yet.
//! 3. [`MsrPhase::AfterClock`]: `MSR_IA32_TSC_DEADLINE` (0x6e0) and the kvmclock wall-clock MSRs
//!    (`MSR_KVM_WALL_CLOCK{,_NEW}`) are written *after* the plugin. KVM stores a TSC deadline as a
//!    guest TSC value and arms the host timer from the offset in force at the write: written
//!    before the plugin set the offset, the guest's timer fires early or late by the offset
//!    change (the whole downtime, on a new VM). A wall-clock MSR write makes KVM write the wall
//!    clock into guest memory at once, from the VM's kvmclock at that moment: before
//!    `KVM_SET_CLOCK` that is the fresh VM's clock.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use log::{debug, info};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vm_migration::Snapshot;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::vm::{kvm_err, VmError};

/// The snapshot child holding one child per vCPU (named by its index, as Cloud Hypervisor's
/// CpuManager does).
pub const CPU_MANAGER_ID: &str = "cpu-manager";
/// The snapshot child holding one child per device.
pub const DEVICE_MANAGER_ID: &str = "device-manager";
/// The devices under [`DEVICE_MANAGER_ID`].
pub const PIC_MASTER_ID: &str = "pic-master";
/// The slave PIC.
pub const PIC_SLAVE_ID: &str = "pic-slave";
/// The IOAPIC.
pub const IOAPIC_ID: &str = "ioapic";
/// The PIT.
pub const PIT_ID: &str = "pit";
/// COM1.
pub const SERIAL_ID: &str = "serial";
/// MSRs read per KVM_GET_MSRS call.
const MSR_CHUNK: usize = 64;

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// `MSR_IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `MSR_KVM_WALL_CLOCK`.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// `MSR_KVM_SYSTEM_TIME`.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// `MSR_KVM_WALL_CLOCK_NEW`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// When a VMM restores an MSR relative to the plugin's clock restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MsrPhase {
    /// With the rest of the vCPU state, before the clocks.
    BeforeClock,
    /// Never by the VMM: the plugin owns it.
    LeftToPlugin,
    /// After the plugin restored the clocks.
    AfterClock,
}

/// The phase of MSR `index`.
pub fn msr_phase(index: u32) -> MsrPhase {
    match index {
        MSR_IA32_TSC => MsrPhase::LeftToPlugin,
        // Named for the contract: early, like every MSR not listed here.
        MSR_IA32_TSC_ADJUST | MSR_KVM_SYSTEM_TIME | MSR_KVM_SYSTEM_TIME_NEW => {
            MsrPhase::BeforeClock
        }
        MSR_IA32_TSC_DEADLINE | MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW => MsrPhase::AfterClock,
        _ => MsrPhase::BeforeClock,
    }
}

/// Saved MSRs: `(index, value)`.
pub type MsrList = Vec<(u32, u64)>;

/// Split saved `(index, value)` MSRs into what the VMM writes before the clock restore and
/// after it; the plugin's MSRs are dropped.
pub fn split_for_restore(msrs: &[(u32, u64)]) -> (MsrList, MsrList) {
    let mut before = Vec::new();
    let mut after = Vec::new();
    for &(i, v) in msrs {
        match msr_phase(i) {
            MsrPhase::BeforeClock => before.push((i, v)),
            MsrPhase::AfterClock => after.push((i, v)),
            MsrPhase::LeftToPlugin => {}
        }
    }
    // Within the late phase the wall clock goes before the deadline, so that a deadline that
    // fires at once finds everything restored.
    after.sort_by_key(|&(i, _)| i == MSR_IA32_TSC_DEADLINE);
    (before, after)
}

/// A KVM structure carried as the hex of its bytes, of exactly the structure's size (a short
/// or long blob is refused naming its length, never padded).
pub struct Raw<T>(pub T);

impl<T: FromBytes + IntoBytes + Immutable> Clone for Raw<T> {
    fn clone(&self) -> Self {
        // Byte-for-byte: some KVM structures (kvm_xsave) are not Clone themselves.
        let mut copy = T::new_zeroed();
        copy.as_mut_bytes().copy_from_slice(self.0.as_bytes());
        Raw(copy)
    }
}

impl<T> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw<{}>", std::any::type_name::<T>())
    }
}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.as_bytes();
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&hex)
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let hex = String::deserialize(d)?;
        let want = std::mem::size_of::<T>();
        if hex.len() != want * 2 {
            return Err(D::Error::custom(format!(
                "{}: {} hex digits, expected {}",
                std::any::type_name::<T>(),
                hex.len(),
                want * 2
            )));
        }
        let bytes: Result<Vec<u8>, _> = (0..want)
            .map(|i| {
                hex.get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("not hex"))
            })
            .collect();
        T::read_from_bytes(&bytes?)
            .map(Raw)
            .map_err(|_| D::Error::custom("size mismatch"))
    }
}

/// One vCPU's whole state, fields in restore order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as KVM holds it (the destination sets its own template at creation and refuses a
    /// different one).
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: Raw<kvm_mp_state>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: Raw<kvm_regs>,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: Raw<kvm_sregs>,
    /// FPU, SSE, AVX state (the 4 KiB legacy KVM_GET_XSAVE area).
    pub xsave: Raw<kvm_xsave>,
    /// XCR0.
    pub xcrs: Raw<kvm_xcrs>,
    /// DR0-3, DR6, DR7.
    pub debugregs: Raw<kvm_debugregs>,
    /// The local APIC's registers.
    pub lapic: Raw<kvm_lapic_state>,
    /// `(index, value)` of every MSR of KVM_GET_MSR_INDEX_LIST that KVM could read.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub vcpu_events: Raw<kvm_vcpu_events>,
}

/// The COM1 UART's registers (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialRegs {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegs {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegs) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The whole machine apart from memory and clocks.
#[derive(Debug, Clone)]
pub struct MachineState {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [Raw<kvm_irqchip>; 3],
    /// The PIT's channels.
    pub pit: Raw<kvm_pit_state2>,
    /// COM1.
    pub serial: SerialRegs,
}

fn snap_err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Invalid(format!("snapshot section {what}: {e}"))
}

impl MachineState {
    /// The CH-shaped snapshot children: `cpu-manager/<n>` and `device-manager/<device>`.
    pub fn to_snapshots(&self) -> Result<Vec<(String, Snapshot)>, VmError> {
        let mut cpus = Snapshot::default();
        for (n, v) in self.vcpus.iter().enumerate() {
            let s = Snapshot::new_from_state(v).map_err(|e| snap_err("vCPU", e))?;
            cpus.add_snapshot(n.to_string(), s);
        }
        let mut devices = Snapshot::default();
        let ids = [PIC_MASTER_ID, PIC_SLAVE_ID, IOAPIC_ID];
        for (id, chip) in ids.iter().zip(&self.irqchips) {
            let s = Snapshot::new_from_state(chip).map_err(|e| snap_err(id, e))?;
            devices.add_snapshot(id.to_string(), s);
        }
        let pit = Snapshot::new_from_state(&self.pit).map_err(|e| snap_err(PIT_ID, e))?;
        devices.add_snapshot(PIT_ID.into(), pit);
        let serial = Snapshot::new_from_state(&self.serial).map_err(|e| snap_err(SERIAL_ID, e))?;
        devices.add_snapshot(SERIAL_ID.into(), serial);
        Ok(vec![
            (CPU_MANAGER_ID.into(), cpus),
            (DEVICE_MANAGER_ID.into(), devices),
        ])
    }

    /// Decode from a snapshot root, refusing (naming the section) anything missing, malformed
    /// or of another shape than a `vcpus`-vCPU Linux VM.
    pub fn from_snapshot(root: &Snapshot, vcpus: usize) -> Result<MachineState, VmError> {
        let child = |s: &Snapshot, id: &str| -> Result<Snapshot, VmError> {
            s.snapshots
                .get(id)
                .cloned()
                .ok_or_else(|| snap_err(id, "missing (a Linux guest cannot resume without it)"))
        };
        let cpus = child(root, CPU_MANAGER_ID)?;
        if cpus.snapshots.len() != vcpus {
            return Err(snap_err(
                CPU_MANAGER_ID,
                format!("{} vCPUs, the VM has {vcpus}", cpus.snapshots.len()),
            ));
        }
        let mut states = Vec::with_capacity(vcpus);
        for n in 0..vcpus {
            let id = format!("{CPU_MANAGER_ID}/{n}");
            let s = child(&cpus, &n.to_string()).map_err(|_| snap_err(&id, "missing"))?;
            let v: VcpuState = s.to_state().map_err(|e| snap_err(&id, e))?;
            if v.msrs.len() > 4096 || v.cpuid.len() > 256 {
                return Err(snap_err(&id, "too many MSRs or CPUID entries"));
            }
            states.push(v);
        }
        let devices = child(root, DEVICE_MANAGER_ID)?;
        let chip = |id: &str| -> Result<Raw<kvm_irqchip>, VmError> {
            child(&devices, id)?.to_state().map_err(|e| snap_err(id, e))
        };
        let serial: SerialRegs = child(&devices, SERIAL_ID)?
            .to_state()
            .map_err(|e| snap_err(SERIAL_ID, e))?;
        if serial.in_buffer.len() > 64 {
            return Err(snap_err(SERIAL_ID, "receive FIFO longer than 64 bytes"));
        }
        Ok(MachineState {
            vcpus: states,
            irqchips: [chip(PIC_MASTER_ID)?, chip(PIC_SLAVE_ID)?, chip(IOAPIC_ID)?],
            pit: child(&devices, PIT_ID)?
                .to_state()
                .map_err(|e| snap_err(PIT_ID, e))?,
            serial,
        })
    }
}

/// Whether KVM's XSAVE area for this VM fits the 4 KiB `kvm_xsave` (KVM_CAP_XSAVE2 reports the
/// size KVM copies; 0 means the capability is absent and the legacy size holds).
pub fn check_xsave_size(vm: &VmFd) -> Result<(), VmError> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size as usize > std::mem::size_of::<kvm_xsave>() {
        return Err(VmError::Invalid(format!(
            "KVM's XSAVE area is {size} bytes (KVM_CAP_XSAVE2), more than kvm_xsave holds: \
             this guest's extended state cannot be saved"
        )));
    }
    Ok(())
}

/// Read `indices` from `v`, skipping (with a debug log) the MSRs KVM refuses to read.
pub fn read_msrs(v: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MSR_CHUNK)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&chunk).map_err(|e| VmError::Invalid(format!("MSRs: {e:?}")))?;
        let n = v
            .get_msrs(&mut msrs)
            .map_err(|e| kvm_err("KVM_GET_MSRS", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            // KVM stops at the first MSR it cannot read: skip that one.
            debug!("MSR {:#x} not readable: not saved", chunk[n].index);
            rest.drain(..=n);
        } else {
            rest.drain(..n);
        }
    }
    Ok(out)
}

/// Write `msrs` to `v`; an MSR KVM refuses is an error naming it.
pub fn write_msrs(v: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), VmError> {
    for chunk in msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list =
            Msrs::from_entries(&entries).map_err(|e| VmError::Invalid(format!("MSRs: {e:?}")))?;
        let n = v.set_msrs(&list).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;
        if n < chunk.len() {
            return Err(VmError::Invalid(format!(
                "KVM refused MSR {:#x} = {:#x} of the snapshot",
                chunk[n].0, chunk[n].1
            )));
        }
    }
    Ok(())
}

/// Capture one parked vCPU (its pending I/O completed, see `complete_pending_exit`).
pub fn capture_vcpu(v: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VmError> {
    let cpuid = v
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| kvm_err("KVM_GET_CPUID2", e))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().iter().copied().map(Raw).collect(),
        mp_state: Raw(v
            .get_mp_state()
            .map_err(|e| kvm_err("KVM_GET_MP_STATE", e))?),
        regs: Raw(v.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?),
        sregs: Raw(v.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?),
        xsave: Raw(v.get_xsave().map_err(|e| kvm_err("KVM_GET_XSAVE", e))?),
        xcrs: Raw(v.get_xcrs().map_err(|e| kvm_err("KVM_GET_XCRS", e))?),
        debugregs: Raw(v
            .get_debug_regs()
            .map_err(|e| kvm_err("KVM_GET_DEBUGREGS", e))?),
        lapic: Raw(v.get_lapic().map_err(|e| kvm_err("KVM_GET_LAPIC", e))?),
        msrs: read_msrs(v, msr_indices)?,
        vcpu_events: Raw(v
            .get_vcpu_events()
            .map_err(|e| kvm_err("KVM_GET_VCPU_EVENTS", e))?),
    })
}

/// Restore one vCPU's state up to the plugin (everything but the late MSRs, which it
/// returns). The vCPU was created with the destination's CPUID template: a snapshot taken
/// under another CPUID is refused (the guest kernel's feature decisions depend on it).
pub fn restore_vcpu_early(v: &VcpuFd, s: &VcpuState, n: usize) -> Result<MsrList, VmError> {
    let have = v
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| kvm_err("KVM_GET_CPUID2", e))?;
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx);
    let mine: Vec<_> = have.as_slice().iter().map(key).collect();
    let theirs: Vec<_> = s.cpuid.iter().map(|e| key(&e.0)).collect();
    if mine != theirs {
        return Err(VmError::Invalid(format!(
            "snapshot section {CPU_MANAGER_ID}/{n}: its CPUID differs from this VM's template \
             (another --invariant-tsc or another host CPU)"
        )));
    }
    let (early, late) = split_for_restore(&s.msrs);
    v.set_mp_state(s.mp_state.0)
        .map_err(|e| kvm_err("KVM_SET_MP_STATE", e))?;
    v.set_regs(&s.regs.0)
        .map_err(|e| kvm_err("KVM_SET_REGS", e))?;
    v.set_sregs(&s.sregs.0)
        .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
    // SAFETY: `check_xsave_size` ran when this VM was created: KVM's XSAVE area for it is at
    // most `size_of::<kvm_xsave>()`, so KVM_SET_XSAVE reads only within `s.xsave.0`.
    unsafe { v.set_xsave(&s.xsave.0) }.map_err(|e| kvm_err("KVM_SET_XSAVE", e))?;
    v.set_xcrs(&s.xcrs.0)
        .map_err(|e| kvm_err("KVM_SET_XCRS", e))?;
    v.set_debug_regs(&s.debugregs.0)
        .map_err(|e| kvm_err("KVM_SET_DEBUGREGS", e))?;
    v.set_lapic(&s.lapic.0)
        .map_err(|e| kvm_err("KVM_SET_LAPIC", e))?;
    write_msrs(v, &early)?;
    v.set_vcpu_events(&s.vcpu_events.0)
        .map_err(|e| kvm_err("KVM_SET_VCPU_EVENTS", e))?;
    Ok(late)
}

/// Capture the in-kernel irqchip and PIT.
pub fn capture_chips(vm: &VmFd) -> Result<([Raw<kvm_irqchip>; 3], Raw<kvm_pit_state2>), VmError> {
    let chip = |id| -> Result<Raw<kvm_irqchip>, VmError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| kvm_err("KVM_GET_IRQCHIP", e))?;
        Ok(Raw(c))
    };
    let chips = [
        chip(KVM_IRQCHIP_PIC_MASTER)?,
        chip(KVM_IRQCHIP_PIC_SLAVE)?,
        chip(KVM_IRQCHIP_IOAPIC)?,
    ];
    let pit = vm.get_pit2().map_err(|e| kvm_err("KVM_GET_PIT2", e))?;
    Ok((chips, Raw(pit)))
}

/// Restore the in-kernel irqchip and PIT (before the vCPUs' LAPICs, as KVM expects).
pub fn restore_chips(
    vm: &VmFd,
    chips: &[Raw<kvm_irqchip>; 3],
    pit: &Raw<kvm_pit_state2>,
) -> Result<(), VmError> {
    let ids = [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ];
    for (want, c) in ids.iter().zip(chips) {
        if c.0.chip_id != *want {
            return Err(VmError::Invalid(format!(
                "snapshot section {DEVICE_MANAGER_ID}: irqchip {} where {want} belongs",
                c.0.chip_id
            )));
        }
        vm.set_irqchip(&c.0)
            .map_err(|e| kvm_err("KVM_SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&pit.0)
        .map_err(|e| kvm_err("KVM_SET_PIT2", e))?;
    info!("irqchip (PIC, IOAPIC) and PIT restored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ordering_contract() {
        let saved = [
            (0x1a0, 1),                        // IA32_MISC_ENABLE: early
            (MSR_IA32_TSC, 123),               // plugin
            (MSR_IA32_TSC_DEADLINE, 999),      // late
            (0xc000_0080, 0x500),              // EFER: early
            (MSR_KVM_SYSTEM_TIME_NEW, 0x1001), // early: KVMCLOCK_CTRL needs it
            (MSR_IA32_TSC_ADJUST, 5),          // early: the guest-visible value
            (MSR_KVM_WALL_CLOCK_NEW, 0x2000),  // late
        ];
        let (before, after) = split_for_restore(&saved);
        assert_eq!(
            before,
            vec![
                (0x1a0, 1),
                (0xc000_0080, 0x500),
                (MSR_KVM_SYSTEM_TIME_NEW, 0x1001),
                (MSR_IA32_TSC_ADJUST, 5)
            ]
        );
        assert_eq!(
            after,
            vec![
                (MSR_KVM_WALL_CLOCK_NEW, 0x2000),
                (MSR_IA32_TSC_DEADLINE, 999)
            ]
        );
        assert!(!before.iter().chain(&after).any(|(i, _)| *i == MSR_IA32_TSC));
        assert_eq!(msr_phase(MSR_KVM_SYSTEM_TIME), MsrPhase::BeforeClock);
        assert_eq!(msr_phase(MSR_KVM_WALL_CLOCK), MsrPhase::AfterClock);
    }

    #[test]
    fn raw_blobs_round_trip_and_refuse_other_sizes() {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rax: 7,
            ..Default::default()
        };
        regs.rflags = 2;
        let json = serde_json::to_string(&Raw(regs)).unwrap();
        let back: Raw<kvm_regs> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0.rip, regs.rip);
        assert_eq!(back.0.rax, 7);
        let short = format!("\"{}\"", &json[1..json.len() - 3]);
        let e = serde_json::from_str::<Raw<kvm_regs>>(&short).unwrap_err();
        assert!(e.to_string().contains("hex digits"), "{e}");
        let bad = json.replacen('0', "g", 1);
        assert!(serde_json::from_str::<Raw<kvm_regs>>(&bad).is_err());
    }

    fn machine(vcpus: usize) -> MachineState {
        let v = VcpuState {
            cpuid: vec![Raw(kvm_cpuid_entry2::default())],
            mp_state: Raw(kvm_mp_state::default()),
            regs: Raw(kvm_regs::default()),
            sregs: Raw(kvm_sregs::default()),
            xsave: Raw(kvm_xsave::default()),
            xcrs: Raw(kvm_xcrs::default()),
            debugregs: Raw(kvm_debugregs::default()),
            lapic: Raw(kvm_lapic_state::default()),
            msrs: vec![(0x1a0, 1), (MSR_IA32_TSC_DEADLINE, 5)],
            vcpu_events: Raw(kvm_vcpu_events::default()),
        };
        let chip = |id| {
            Raw(kvm_irqchip {
                chip_id: id,
                ..Default::default()
            })
        };
        MachineState {
            vcpus: vec![v; vcpus],
            irqchips: [
                chip(KVM_IRQCHIP_PIC_MASTER),
                chip(KVM_IRQCHIP_PIC_SLAVE),
                chip(KVM_IRQCHIP_IOAPIC),
            ],
            pit: Raw(kvm_pit_state2::default()),
            serial: SerialRegs {
                interrupt_enable: 2,
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_machine_is_ch_shaped_and_refused_when_incomplete() {
        let mut root = Snapshot::default();
        for (id, s) in machine(2).to_snapshots().unwrap() {
            root.add_snapshot(id, s);
        }
        let json = serde_json::to_string(&root).unwrap();
        let root: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(root.snapshots[CPU_MANAGER_ID].snapshots.len(), 2);
        assert!(root.snapshots[DEVICE_MANAGER_ID]
            .snapshots
            .contains_key(PIT_ID));
        let m = MachineState::from_snapshot(&root, 2).unwrap();
        assert_eq!(m.serial.interrupt_enable, 2);
        assert_eq!(
            m.vcpus[1].msrs,
            vec![(0x1a0, 1), (MSR_IA32_TSC_DEADLINE, 5)]
        );
        let e = MachineState::from_snapshot(&root, 3).unwrap_err();
        assert!(e.to_string().contains("2 vCPUs, the VM has 3"), "{e}");
        let mut no_pit = root.clone();
        let mut dm = no_pit.snapshots[DEVICE_MANAGER_ID].clone();
        dm.snapshots.remove(PIT_ID);
        no_pit.snapshots.insert(DEVICE_MANAGER_ID.into(), dm);
        let e = MachineState::from_snapshot(&no_pit, 2).unwrap_err();
        assert!(e.to_string().contains(PIT_ID), "{e}");
        let e = MachineState::from_snapshot(&Snapshot::default(), 2).unwrap_err();
        assert!(e.to_string().contains(CPU_MANAGER_ID), "{e}");
    }
}
