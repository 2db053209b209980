//! Intel MultiProcessor Specification 1.4 tables, which tell Linux the
//! number of CPUs, where the IOAPIC is and how ISA interrupts are wired.
//! Built byte by byte: every record is little-endian and unaligned.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_PINS, IOAPIC_START};

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_SMALL_ENTRY_SIZE: usize = 8;
/// The tables must fit in the 1 KiB EBDA where Linux looks for them.
const EBDA_SIZE: usize = 0x400;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforming to the bus": edge, active high on
/// ISA.
const MP_IRQFLAG_DEFAULT: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Family 6 with FPU and APIC present, as a BIOS reports a modern CPU.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Largest vCPU count whose MP table fits in the EBDA.
pub const MAX_VCPUS: u8 =
    ((EBDA_SIZE - MPF_SIZE - MPC_HEADER_SIZE - (3 + IOAPIC_PINS as usize) * MPC_SMALL_ENTRY_SIZE)
        / MPC_CPU_SIZE) as u8;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's APIC ID: the first one after the CPUs.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the floating pointer and configuration table for `num_cpus` CPUs
/// as one blob to be placed at `EBDA_START`.
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let table_addr = EBDA_START as u32 + MPF_SIZE as u32;

    let mut entries = Vec::with_capacity(EBDA_SIZE);
    for id in 0..num_cpus {
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION]);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id(num_cpus), IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT]);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id(num_cpus), pin]);
    }
    // LINT0 takes ExtINT and LINT1 NMI on every CPU, matching the LAPIC LVT
    // setup of each vCPU.
    for (irq_type, dest_apic, lint) in [(MP_IRQ_EXTINT, 0xff, 0), (MP_IRQ_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[MP_LINTSRC, irq_type]);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, dest_apic, lint]);
    }

    // CPUs, the bus, the IOAPIC, one source per pin, and the two LINTs.
    let entry_count = u16::from(num_cpus) + 2 + IOAPIC_PINS as u16 + 2;
    let mut header = Vec::with_capacity(MPC_HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((MPC_HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"LAMBDAVM");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let blob = build_mptable(num_cpus)?;
    mem.write_slice(&blob, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_is_valid_and_points_at_the_table() {
        let blob = build_mptable(2).unwrap();
        assert_eq!(&blob[0..4], b"_MP_");
        assert_eq!(sum(&blob[..MPF_SIZE]), 0);
        let ptr = u32::from_le_bytes(blob[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), EBDA_START + MPF_SIZE as u64);
        assert_eq!(blob[8], 1);
        assert_eq!(blob[9], 4);
    }

    #[test]
    fn configuration_table_checksums_and_counts_its_entries() {
        for cpus in [1, 2, MAX_VCPUS] {
            let blob = build_mptable(cpus).unwrap();
            let table = &blob[MPF_SIZE..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "{cpus} CPUs");
            assert!(blob.len() <= EBDA_SIZE);
            // Walk the entries by type and count them.
            let count = u16::from_le_bytes([table[34], table[35]]);
            let (mut pos, mut seen, mut cpu_ids) = (MPC_HEADER_SIZE, 0, vec![]);
            while pos < len {
                let size = if table[pos] == MP_PROCESSOR {
                    cpu_ids.push(table[pos + 1]);
                    MPC_CPU_SIZE
                } else {
                    MPC_SMALL_ENTRY_SIZE
                };
                pos += size;
                seen += 1;
            }
            assert_eq!(pos, len);
            assert_eq!(seen, count);
            assert_eq!(cpu_ids, (0..cpus).collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_the_first_cpu_is_the_bootstrap_processor() {
        let blob = build_mptable(3).unwrap();
        let cpu = |i: usize| blob[MPF_SIZE + MPC_HEADER_SIZE + i * MPC_CPU_SIZE + 3];
        assert_eq!(cpu(0), CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(cpu(1), CPU_ENABLED);
        assert_eq!(cpu(2), CPU_ENABLED);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(matches!(
            build_mptable(MAX_VCPUS + 1),
            Err(MpTableError::TooManyCpus(_))
        ));
        assert!(build_mptable(0).is_err());
    }
}
