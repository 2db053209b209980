//! Guest memory: anonymous, private, `MAP_NORESERVE` mappings, so an idle
//! guest costs only the pages it touches.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::boot_params::guest_ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&guest_ram_ranges(mem_size)).map_err(|source| MemoryError::Map {
        size: mem_size,
        source,
    })
}

/// Host address, guest address and size of each region, for
/// `KVM_SET_USER_MEMORY_REGION`.
pub fn region_mappings(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |p| p as u64);
            (host, r.start_addr().0, r.len())
        })
        .collect()
}
