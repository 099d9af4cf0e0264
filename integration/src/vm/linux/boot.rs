//! The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): linux-loader loads the
//! bzImage and writes the command line and `boot_params`; this module builds the identity page
//! tables and GDT and puts the boot vCPU in long mode at the kernel's 64-bit entry
//! (`startup_64`, load address + 0x200) with `rsi` = the zero page.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use log::info;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::vm::{kvm_err, VmError};

/// The command line every Linux guest gets before the user's words: the 8250 console, no PCI,
/// a triple fault on reboot (KVM_EXIT_SHUTDOWN: the VMM sees the guest stop), no panic reboot loop.
pub const BASE_CMDLINE: &str = "console=ttyS0 pci=off reboot=t panic=-1 i8042.noaux i8042.nomux \
                                i8042.nopnp i8042.dumbkbd nomodeset";

/// What the kernel was loaded as.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The end of the kernel image.
    pub kernel_end: u64,
    /// Where the initramfs is, and its size.
    pub initrd: Option<(u64, u64)>,
}

fn mem_err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Memory(format!("{what}: {e}"))
}

/// Load `kernel` (a bzImage), `initrd` (bytes) and the command line into `mem`, and write the
/// zero page with the e820 map and the RSDP address.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: &[u8],
    cmdline: &str,
    rsdp: u64,
) -> Result<Loaded, VmError> {
    let mut f = File::open(kernel)
        .map_err(|e| VmError::Invalid(format!("kernel {}: {e}", kernel.display())))?;
    let r = BzImage::load(mem, Some(GuestAddress(KERNEL_GPA)), &mut f, None).map_err(|e| {
        VmError::Invalid(format!(
            "kernel {}: not a loadable bzImage ({e})",
            kernel.display()
        ))
    })?;
    let mut hdr = r
        .setup_header
        .ok_or_else(|| VmError::Invalid("bzImage without a setup header".into()))?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(VmError::Invalid(format!(
            "boot protocol {version:#x}: the 64-bit entry needs 2.12 or later"
        )));
    }
    let max = (hdr.cmdline_size as usize).clamp(256, CMDLINE_MAX);
    let mut cl = Cmdline::new(max).map_err(|e| VmError::Invalid(format!("cmdline: {e}")))?;
    cl.insert_str(cmdline)
        .map_err(|e| VmError::Invalid(format!("cmdline ({} bytes max): {e}", max - 1)))?;
    load_cmdline(mem, GuestAddress(CMDLINE_GPA), &cl).map_err(|e| mem_err("cmdline", e))?;

    let mut initrd_at = None;
    if !initrd.is_empty() {
        let len = initrd.len() as u64;
        let top = mem_size.min(u64::from(hdr.initrd_addr_max) + 1);
        let addr = top.checked_sub(len).map(|a| a & !0xfff).unwrap_or(0);
        if addr < r.kernel_end.max(KERNEL_GPA) {
            return Err(VmError::Invalid(format!(
                "initramfs of {len} bytes does not fit above the kernel in {mem_size} bytes"
            )));
        }
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(|e| mem_err("initramfs", e))?;
        initrd_at = Some((addr, len));
    }

    let mut bp = boot_params::default();
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    hdr.cmdline_size = cl
        .as_cstring()
        .map(|c| c.as_bytes().len() as u32)
        .unwrap_or(0);
    hdr.loadflags |= 0x01; // LOADED_HIGH
    if let Some((addr, len)) = initrd_at {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = len as u32;
    }
    bp.hdr = hdr;
    bp.acpi_rsdp_addr = rsdp;
    let map = e820(mem_size);
    for (i, e) in map.iter().enumerate() {
        bp.e820_table[i] = *e;
    }
    bp.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&bp, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(|e| mem_err("boot_params", e))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    info!(
        "Linux kernel loaded at {KERNEL_GPA:#x}..{:#x} (boot protocol {:#x}), initramfs {:?}, \
         cmdline {cmdline:?}",
        r.kernel_end, version, initrd_at
    );
    Ok(Loaded {
        entry: KERNEL_GPA + 0x200,
        kernel_end: r.kernel_end,
        initrd: initrd_at,
    })
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    // PML4[0] → PDPT, PDPT[0] → PD, PD[i] → i × 2 MiB (present, writable, huge).
    mem.write_obj(PDPT_GPA | 0x3, GuestAddress(PML4_GPA))
        .map_err(|e| mem_err("PML4", e))?;
    mem.write_obj(PD_GPA | 0x3, GuestAddress(PDPT_GPA))
        .map_err(|e| mem_err("PDPT", e))?;
    for i in 0..(IDENTITY_MAPPED >> 21) {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_GPA + i * 8))
            .map_err(|e| mem_err("PD", e))?;
    }
    Ok(())
}

/// GDT entries: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_GPA + 8 * i as u64))
            .map_err(|e| mem_err("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_GPA))
        .map_err(|e| mem_err("IDT", e))
}

/// The KVM segment a GDT entry describes.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for the boot vCPU.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    s.cs = code;
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *seg = data;
    }
    s.tr = segment(GDT[3], 3);
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = IDT_GPA;
    s.idt.limit = 7;
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE (caches enabled)
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LME | LMA
    s
}

/// Put the boot vCPU at the kernel's 64-bit entry.
pub fn setup_boot_vcpu(v: &VcpuFd, entry: u64) -> Result<(), VmError> {
    let sregs = v.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
    v.set_sregs(&long_mode_sregs(sregs))
        .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_GPA,
        rbp: BOOT_STACK_GPA,
        rsi: ZERO_PAGE_GPA,
        rflags: 2,
        ..Default::default()
    };
    v.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    v.set_fpu(&fpu).map_err(|e| kvm_err("KVM_SET_FPU", e))?;
    Ok(())
}

/// MSRs every vCPU starts with (`IA32_MISC_ENABLE`: fast strings).
pub fn setup_boot_msrs(v: &VcpuFd) -> Result<(), VmError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x1a0,
        data: 1,
        ..Default::default()
    }])
    .map_err(|e| VmError::Invalid(format!("{e:?}")))?;
    v.set_msrs(&msrs).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;
    Ok(())
}

/// LINT0 = ExtINT, LINT1 = NMI, as a BIOS leaves them.
pub fn setup_lint(v: &VcpuFd) -> Result<(), VmError> {
    let mut lapic = v.get_lapic().map_err(|e| kvm_err("KVM_GET_LAPIC", e))?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    v.set_lapic(&lapic).map_err(|e| kvm_err("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_long_mode_flat_segments() {
        let c = segment(GDT[1], 1);
        assert_eq!(
            (c.selector, c.type_, c.l, c.db, c.g, c.s),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!((c.base, c.limit, c.present), (0, 0xffff_ffff, 1));
        let d = segment(GDT[2], 2);
        assert_eq!((d.selector, d.type_, d.l, d.db), (16, 3, 0, 1));
        let t = segment(GDT[3], 3);
        assert_eq!((t.selector, t.type_, t.s), (24, 0xb, 0));
    }

    #[test]
    fn a_file_that_is_no_bzimage_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let p = std::env::temp_dir().join(format!("gc-notbz-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let e = load(&mem, 4 << 20, &p, &[], "console=ttyS0", 0).unwrap_err();
        assert!(e.to_string().contains("bzImage"), "{e}");
        let _ = std::fs::remove_file(&p);
    }
}
