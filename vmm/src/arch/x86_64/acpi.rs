//! ACPI tables, built with rust-vmm's `acpi_tables`: what a Linux guest
//! needs ACPI for and nothing else.
//!
//! * MADT: one LAPIC per vCPU and the IOAPIC. With ACPI on, Linux takes
//!   its CPUs and interrupt routing from here and ignores the MP table
//!   (which stays, for kernels built without ACPI). Legacy IRQs 0-15 are
//!   the IOAPIC's pins 0-15, edge-triggered: COM1's and the virtio
//!   devices' lines, which the command line names.
//! * FADT: a PC's fixed hardware reduced to the PM1 event and control
//!   registers, always in ACPI mode (no SMI command port), no PM timer, no
//!   GPEs, no fixed buttons, no VGA, no CMOS RTC. Not "hardware-reduced":
//!   in that mode Linux drops the legacy IRQs, and COM1 and the virtio
//!   devices would need ACPI descriptions of their own.
//! * FACS, which a full FADT requires.
//! * DSDT: `\_S5` (the sleep type written to PM1 control to power off) and
//!   the pvpanic device, through which a panicking kernel tells the VMM.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ACPI_END, ACPI_SCI_IRQ, ACPI_START, APIC_START, IOAPIC_START, PM1_CONTROL_LEN,
    PM1_CONTROL_PORT, PM1_EVENT_LEN, PM1_EVENT_PORT, PVPANIC_PORT,
};

const OEM_ID: [u8; 6] = *b"LMBDVM";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;

/// The sleep type `\_S5` names: what the guest writes, with `SLP_EN`, into
/// PM1 control's `SLP_TYP` field to power off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC.
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the {1} reserved for them")]
    TooLarge(usize, u64),
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The DSDT's AML.
fn dsdt_aml() -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&pvpanic_io]),
    );
    let pvpanic = aml::Device::new("_SB_.PVPN".into(), vec![&hid, &crs]);
    let mut bytes = Vec::new();
    s5.to_aml_bytes(&mut bytes);
    pvpanic.to_aml_bytes(&mut bytes);
    bytes
}

/// Where the FACS goes: it must be 64-byte aligned.
const FACS_OFFSET: u64 = 0x40;

/// Lays the tables out from `ACPI_START`: RSDP, FACS, XSDT, FADT, DSDT,
/// MADT. Returns the bytes to write there.
fn tables(vcpus: u8, ioapic_id: u8) -> Vec<u8> {
    // Revision 2: the AML's integers are 64-bit.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml());

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id, IOAPIC_START as u32, 0));
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);

    // Offsets from ACPI_START; the XSDT lists two tables after the FADT.
    let xsdt_at = FACS_OFFSET + FACS::len() as u64;
    let xsdt_len = 36 + 2 * 8;
    let fadt_at = xsdt_at + xsdt_len;
    let dsdt_at = fadt_at + acpi_tables::fadt::FADT::len() as u64;
    let madt_at = dsdt_at + dsdt.len() as u64;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(ACPI_START + dsdt_at)
        .firmware_ctrl_64(ACPI_START + FACS_OFFSET)
        // The power and sleep buttons, if any, would be devices, not
        // fixed hardware: there are none.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = ACPI_SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(PM1_EVENT_PORT).into();
    fadt.pm1_evt_len = PM1_EVENT_LEN;
    fadt.pm1a_cnt_blk = u32::from(PM1_CONTROL_PORT).into();
    fadt.pm1_cnt_len = PM1_CONTROL_LEN;
    fadt.iapc_boot_arch = (BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC).into();
    let fadt = fadt.finalize();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(ACPI_START + fadt_at);
    xsdt.add_entry(ACPI_START + madt_at);

    let mut out = Vec::new();
    Rsdp::new(OEM_ID, ACPI_START + xsdt_at).to_aml_bytes(&mut out);
    out.resize(FACS_OFFSET as usize, 0);
    FACS::new().to_aml_bytes(&mut out);
    xsdt.to_aml_bytes(&mut out);
    debug_assert_eq!(out.len() as u64, fadt_at);
    fadt.to_aml_bytes(&mut out);
    out.extend_from_slice(dsdt.as_slice());
    debug_assert_eq!(out.len() as u64, madt_at);
    out.extend_from_slice(&madt_bytes);
    out
}

/// Writes the tables for `vcpus` vCPUs and the IOAPIC `ioapic_id` into
/// guest memory; returns the RSDP's address, which the boot protocols
/// hand the kernel (it is also where Linux would scan for it).
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    ioapic_id: u8,
) -> Result<u64, AcpiError> {
    let bytes = tables(vcpus, ioapic_id);
    if bytes.len() as u64 > ACPI_END - ACPI_START {
        return Err(AcpiError::TooLarge(bytes.len(), ACPI_END - ACPI_START));
    }
    mem.write_slice(&bytes, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(bytes: &[u8], at: u64) -> &[u8] {
        let at = (at - ACPI_START) as usize;
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        &bytes[at..at + len]
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// Follows the pointers as Linux does, from the RSDP to every table,
    /// checking signatures, lengths and checksums on the way.
    #[test]
    fn the_tables_chain_from_the_rsdp_with_valid_checksums() {
        let bytes = tables(4, 4);
        assert_eq!(&bytes[..8], b"RSD PTR ");
        assert!(sums_to_zero(&bytes[..20]) && sums_to_zero(&bytes[..36]));
        let xsdt = table(&bytes, u64_at(&bytes, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(xsdt));
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|&e| &table(&bytes, e)[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        for &entry in &entries {
            assert!(sums_to_zero(table(&bytes, entry)));
        }
        let fadt = table(&bytes, entries[0]);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(
            flags & (1 << 20),
            0,
            "not hardware-reduced: Linux keeps the ISA IRQs"
        );
        let facs = u64_at(fadt, 132);
        assert_eq!(facs % 64, 0, "the FACS is 64-byte aligned");
        assert_eq!(&table(&bytes, facs)[..4], b"FACS");
        let dsdt = table(&bytes, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(dsdt));
        let aml = &dsdt[36..];
        for needle in [&b"_S5_"[..], b"QEMU0001", b"PVPN"] {
            assert!(aml.windows(needle.len()).any(|w| w == needle), "{needle:?}");
        }
        // PM1: the event block and the control register at their ports,
        // no SMI command port (always in ACPI mode), the SCI's line.
        let u32_at = |at: usize| u32::from_le_bytes(fadt[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(56), u32::from(PM1_EVENT_PORT));
        assert_eq!(u32_at(64), u32::from(PM1_CONTROL_PORT));
        assert_eq!((fadt[88], fadt[89]), (PM1_EVENT_LEN, PM1_CONTROL_LEN));
        assert_eq!(u32_at(48), 0);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), ACPI_SCI_IRQ);
    }

    #[test]
    fn the_madt_has_a_lapic_per_vcpu_and_the_ioapic() {
        let bytes = tables(3, 3);
        let xsdt_at = (u64_at(&bytes, 24) - ACPI_START) as usize;
        let madt_at = u64_at(&bytes, xsdt_at + 36 + 8);
        let madt = table(&bytes, madt_at);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => lapics.push((madt[at + 2], madt[at + 3])),
                1 => ioapics.push((
                    madt[at + 2],
                    u32::from_le_bytes(madt[at + 4..at + 8].try_into().unwrap()),
                )),
                other => panic!("unexpected MADT entry {other}"),
            }
            at += len;
        }
        assert_eq!(lapics, [(0, 0), (1, 1), (2, 2)]);
        assert_eq!(ioapics, [(3, IOAPIC_START as u32)]);
    }

    #[test]
    fn the_largest_machine_fits_the_reserved_area() {
        let bytes = tables(super::super::mptable::MAX_VCPUS, 255);
        assert!((bytes.len() as u64) < ACPI_END - ACPI_START);
    }
}
