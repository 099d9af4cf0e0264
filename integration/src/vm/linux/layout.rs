//! Where a Linux guest's boot structures live in guest-physical memory (below 1 MiB, like
//! Firecracker's layout), and the e820 map that tells the kernel which memory is RAM.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page (boot_params)   0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4  0xa000 PDPT  0xb000 PD (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  the vmclock page          (reserved in e820: the plugin writes it)
//! 0x0003_0000  kernel command line
//! 0x0009_fc00  EBDA start                (reserved up to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  the kernel (bzImage's protected-mode part)
//! top of RAM   the initramfs (page aligned)
//! ```

use linux_loader::loader::bootparam::boot_e820_entry;

use super::super::guest::VMCLOCK_GPA;

/// The GDT.
pub const GDT_GPA: u64 = 0x500;
/// The (empty) IDT.
pub const IDT_GPA: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// The boot stack pointer.
pub const BOOT_STACK_GPA: u64 = 0x8ff0;
/// PML4.
pub const PML4_GPA: u64 = 0x9000;
/// PDPT.
pub const PDPT_GPA: u64 = 0xa000;
/// PD (512 × 2 MiB = 1 GiB).
pub const PD_GPA: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_GPA: u64 = 0x30000;
/// The kernel command line's largest size accepted here.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA: RAM below it.
pub const EBDA_GPA: u64 = 0x9fc00;
/// The ACPI tables (RSDP at the start: Linux also scans 0xe0000..0x100000 for it).
pub const ACPI_GPA: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// The kernel's load address (HIMEM start).
pub const KERNEL_GPA: u64 = 0x100000;
/// The vmclock page (the tiny guest's address; reserved for a Linux guest).
pub const VMCLOCK_PAGE: (u64, u64) = (VMCLOCK_GPA, 0x1000);
/// The identity map covers this much.
pub const IDENTITY_MAPPED: u64 = 1 << 30;
/// The local APIC's address.
pub const LAPIC_GPA: u32 = 0xfee0_0000;
/// The IOAPIC's address.
pub const IOAPIC_GPA: u32 = 0xfec0_0000;

/// e820 RAM.
pub const E820_RAM: u32 = 1;
/// e820 reserved.
pub const E820_RESERVED: u32 = 2;

/// The e820 map of a guest with `mem_size` bytes of RAM from address 0.
pub fn e820(mem_size: u64) -> Vec<boot_e820_entry> {
    let e = |addr: u64, end: u64, type_: u32| boot_e820_entry {
        addr,
        size: end - addr,
        type_,
    };
    let (vc, vc_len) = VMCLOCK_PAGE;
    vec![
        e(0, vc, E820_RAM),
        e(vc, vc + vc_len, E820_RESERVED),
        e(vc + vc_len, EBDA_GPA, E820_RAM),
        e(ACPI_GPA, ACPI_END, E820_RESERVED),
        e(KERNEL_GPA, mem_size, E820_RAM),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_is_ordered_disjoint_and_keeps_the_vmclock_page_out_of_ram() {
        let map = e820(256 << 20);
        for w in map.windows(2) {
            let (a, s, b) = (w[0].addr, w[0].size, w[1].addr);
            assert!(a + s <= b);
        }
        let vc = map.iter().find(|x| x.addr == VMCLOCK_GPA).unwrap();
        let t = vc.type_;
        assert_eq!(t, E820_RESERVED);
        for (start, end) in [
            (GDT_GPA, IDT_GPA + 8),
            (ZERO_PAGE_GPA, PD_GPA + 0x1000),
            (CMDLINE_GPA, CMDLINE_GPA + CMDLINE_MAX as u64),
        ] {
            assert!(map.iter().any(|x| {
                let (a, s, t) = (x.addr, x.size, x.type_);
                t == E820_RAM && a <= start && end <= a + s
            }));
        }
    }
}
