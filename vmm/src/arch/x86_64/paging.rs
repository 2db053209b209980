//! Identity page tables for the 64-bit entries: the first 4 GiB, RAM below
//! the device hole and the hole itself, mapped with 2 MiB pages. The Linux
//! 64-bit boot protocol needs only the first 1 GiB; mapping the hole too
//! lets a guest without page tables of its own reach its devices.
//!
//! For a guest entered in PVM user mode every page is also user-accessible:
//! there the guest runs at CPL 3 and owns no page tables.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PAGE_SIZE_2M: u64 = 1 << 7;
/// Page directories, one per GiB.
pub const MAPPED_GIB: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("cannot write the boot page tables to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Who may use the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    Supervisor,
    User,
}

/// Writes the tables and returns the value for CR3.
pub fn write_identity_page_tables(
    mem: &GuestMemoryMmap,
    privilege: Privilege,
) -> Result<u64, PagingError> {
    // Accessed and dirty from the start, as Linux sets them in its own
    // early tables: otherwise the first access through each entry has the
    // MMU set the bit, and under shadow paging (PVM) KVM maps a 2 MiB page
    // read-only until its first write sets the dirty bit, then maps every
    // page of it again, writable, through a new shadow page.
    let flags = PRESENT
        | WRITABLE
        | ACCESSED
        | match privilege {
            Privilege::Supervisor => 0,
            Privilege::User => USER,
        };
    let write = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(PagingError::Write)
    };
    write(PDPTE_START | flags, PML4_START)?;
    for gib in 0..MAPPED_GIB {
        write((PDE_START + gib * 0x1000) | flags, PDPTE_START + gib * 8)?;
    }
    let pds: Vec<u8> = (0..512 * MAPPED_GIB)
        .flat_map(|i| ((i << 21) | PAGE_SIZE_2M | DIRTY | flags).to_le_bytes())
        .collect();
    mem.write_slice(&pds, GuestAddress(PDE_START))
        .map_err(PagingError::Write)?;
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables by hand: (physical address, the flags every level
    /// has, and the leaf's dirty bit).
    fn walk(mem: &GuestMemoryMmap, addr: u64) -> Option<(u64, u64)> {
        let entry = |table: u64, index: u64| -> u64 {
            mem.read_obj(GuestAddress((table & 0x000f_ffff_ffff_f000) + index * 8))
                .unwrap()
        };
        let pml4e = entry(PML4_START, (addr >> 39) & 511);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = entry(pml4e, (addr >> 30) & 511);
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = entry(pdpte, (addr >> 21) & 511);
        if pde & PRESENT == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        let phys = (pde & 0x000f_ffff_ffe0_0000) | (addr & 0x1f_ffff);
        Some((
            phys,
            (pde & pml4e & pdpte & (WRITABLE | USER | ACCESSED)) | (pde & DIRTY),
        ))
    }

    #[test]
    fn maps_the_first_4_gib_one_to_one_for_the_supervisor() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cr3 = write_identity_page_tables(&mem, Privilege::Supervisor).unwrap();
        assert_eq!(cr3, PML4_START);
        for addr in [
            0u64,
            0x20_0000,
            0x1234_5678,
            (1 << 30) - 1,
            0xd000_0000,
            0xfee0_0000,
        ] {
            assert_eq!(
                walk(&mem, addr),
                Some((addr, WRITABLE | ACCESSED | DIRTY)),
                "{addr:#x}"
            );
        }
        assert_eq!(walk(&mem, 4 << 30), None);
    }

    #[test]
    fn user_tables_are_user_accessible_at_every_level() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_identity_page_tables(&mem, Privilege::User).unwrap();
        for addr in [0x10_0000u64, 0xd000_0000] {
            assert_eq!(
                walk(&mem, addr),
                Some((addr, WRITABLE | USER | ACCESSED | DIRTY)),
                "{addr:#x}"
            );
        }
    }
}
