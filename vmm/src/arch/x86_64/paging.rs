//! Identity page tables for the 64-bit entry: the first 1 GiB mapped with
//! 2 MiB pages, which is what the Linux 64-bit boot protocol requires.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("cannot write the boot page tables to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Writes the tables and returns the value for CR3.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, PagingError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))
        .map_err(PagingError::Write)?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))
        .map_err(PagingError::Write)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE).to_le_bytes())
        .collect();
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(PagingError::Write)?;
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_first_gigabyte_one_to_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        assert_eq!(write_identity_page_tables(&mem).unwrap(), PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        // Walk a few addresses through the tables by hand.
        for addr in [0u64, 0x20_0000, 0x1234_5678, (1 << 30) - 1] {
            let pde: u64 = mem
                .read_obj(GuestAddress(PDE_START + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
    }
}
