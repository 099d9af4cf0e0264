//! ACPI tables for a Linux guest, built with the rust-vmm `acpi_tables` crate: RSDP → XSDT →
//! {FADT → DSDT, MADT}. Hardware-reduced ACPI (like Cloud Hypervisor): no PM timer, no legacy
//! PIC; the kernel uses the LAPIC (TSC-deadline) timers and the IOAPIC. The MADT lists one
//! local APIC per vCPU (SMP) and the IOAPIC at GSI 0.
//!
//! The DSDT holds COM1 (PNP0501, 0x3f8, IRQ 4) and whatever [`DsdtDevice`]s the VM adds: this
//! is where the vmclock device (`_HID` "AMZNC10C", `_CRS` = the vmclock page) is added — see
//! [`vmclock_device`].

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::layout::{ACPI_END, ACPI_GPA, IOAPIC_GPA, LAPIC_GPA};
use crate::vm::VmError;

const OEM_ID: [u8; 6] = *b"GCLOCK";

/// A device of the DSDT (its AML, already encoded).
#[derive(Debug, Clone)]
pub struct DsdtDevice(pub Vec<u8>);

impl DsdtDevice {
    /// Encode any AML object.
    pub fn from_aml(a: &dyn Aml) -> Self {
        let mut v = Vec::new();
        a.to_aml_bytes(&mut v);
        DsdtDevice(v)
    }
}

/// COM1: 0x3f8..0x3ff, IRQ 4 (edge, active high).
pub fn com1_device() -> DsdtDevice {
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, 4);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    DsdtDevice::from_aml(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The vmclock device Linux's `ptp_vmclock` binds to: `_HID` "AMZNC10C", `_CID` "VMCLOCK",
/// `_CRS` a fixed memory range over the `struct vmclock_abi` page.
pub fn vmclock_device(base: u32, len: u32) -> DsdtDevice {
    let mem = aml::Memory32Fixed::new(false, base, len);
    let crs = aml::ResourceTemplate::new(vec![&mem]);
    DsdtDevice::from_aml(&aml::Device::new(
        "_SB_.VCLK".into(),
        vec![
            &aml::Name::new("_HID".into(), &"AMZNC10C"),
            &aml::Name::new("_CID".into(), &"VMCLOCK"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The tables, each with its guest-physical address; the RSDP is the first, at [`ACPI_GPA`].
pub struct AcpiTables {
    /// (address, bytes) of every table.
    pub tables: Vec<(u64, Vec<u8>)>,
    /// The RSDP's address (boot_params.acpi_rsdp_addr).
    pub rsdp: u64,
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Build the tables for `vcpus` vCPUs with the DSDT `devices` (COM1 is always there).
pub fn build(vcpus: usize, devices: &[DsdtDevice]) -> Result<AcpiTables, VmError> {
    if vcpus == 0 || vcpus > 255 {
        return Err(VmError::Invalid(format!(
            "{vcpus} vCPUs: the MADT takes 1..=255"
        )));
    }
    let mut next = ACPI_GPA + 0x40; // the RSDP (36 bytes) first
    let mut place = |len: usize| {
        let at = next;
        next = (next + len as u64 + 15) & !15;
        at
    };
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"GCDSDT  ", 1);
    for d in std::iter::once(com1_device()).chain(devices.iter().cloned()) {
        dsdt.append_slice(&d.0);
    }
    let dsdt = dsdt.as_slice().to_vec();
    let dsdt_at = place(dsdt.len());

    let mut fadt = FADTBuilder::new(OEM_ID, *b"GCFADT  ", 1)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (1u16 << 2 | 1 << 3).into(); // no VGA, no MSI
    let fadt = bytes(&fadt.finalize());
    let fadt_at = place(fadt.len());

    let mut madt = MADT::new(
        OEM_ID,
        *b"GCMADT  ",
        1,
        LocalInterruptController::Address(LAPIC_GPA),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_GPA, 0));
    let madt = bytes(&madt);
    let madt_at = place(madt.len());

    let mut xsdt = XSDT::new(OEM_ID, *b"GCXSDT  ", 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    let xsdt_at = place(xsdt.len());
    if next > ACPI_END {
        return Err(VmError::Invalid(format!(
            "ACPI tables need {} bytes, more than the {} reserved",
            next - ACPI_GPA,
            ACPI_END - ACPI_GPA
        )));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Ok(AcpiTables {
        tables: vec![
            (ACPI_GPA, rsdp),
            (dsdt_at, dsdt),
            (fadt_at, fadt),
            (madt_at, madt),
            (xsdt_at, xsdt),
        ],
        rsdp: ACPI_GPA,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_point_at_each_other() {
        let t = build(4, &[vmclock_device(0x20000, 0x1000)]).unwrap();
        let find = |sig: &[u8]| t.tables.iter().find(|(_, b)| b.starts_with(sig)).unwrap();
        let (_, rsdp) = find(b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let (xa, _) = find(b"XSDT");
        assert_eq!(*xa, xsdt_at);
        for sig in [&b"XSDT"[..], b"FACP", b"APIC", b"DSDT"] {
            let (_, b) = find(sig);
            assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(sig));
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
        }
        let (_, madt) = find(b"APIC");
        // 44-byte header, 4 × 8-byte local APICs, one 12-byte IOAPIC.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        let (_, dsdt) = find(b"DSDT");
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"COM1") && has(b"VCLK") && has(b"AMZNC10C"));
        for (a, b) in &t.tables {
            assert!(*a >= ACPI_GPA && a + b.len() as u64 <= ACPI_END);
        }
        assert!(build(0, &[]).is_err());
    }
}
