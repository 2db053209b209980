//! The memory map and the structures a kernel reads at its entry: Linux
//! `boot_params` (the "zero page") for the 64-bit boot protocol, and
//! `hvm_start_info` for PVH.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// The highest address a 64-bit kernel without a setup header accepts for
/// its initrd.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the memory map has {0} entries, more than the boot structure holds")]
    TooManyE820Entries(usize),
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdDoesNotFit { size: u64, limit: u64 },
    #[error("cannot write the boot parameters to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Guest RAM regions for a guest of `mem_size` bytes: low memory up to the
/// device hole, and whatever is left above 4 GiB.
pub fn guest_ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_GAP_START {
        ranges.push((
            GuestAddress(MMIO_GAP_END),
            (mem_size - MMIO_GAP_START) as usize,
        ));
    }
    ranges
}

/// The e820 map of a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        // The EBDA holds the MP table; the rest of the hole below 1 MiB is
        // reserved by convention and needs no entry.
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: mem_size.min(MMIO_GAP_START) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Where an initrd of `size` bytes goes: page aligned, as high in low
/// memory as the kernel allows, so it stays clear of the kernel image.
pub fn initrd_address(
    mem_size: u64,
    size: u64,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<u64, BootParamsError> {
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = mem_size.min(MMIO_GAP_START).min(addr_max + 1);
    let fits = limit
        .checked_sub(size)
        .map(|start| start & !0xfff)
        .filter(|&start| start >= kernel_end);
    fits.ok_or(BootParamsError::InitrdDoesNotFit { size, limit })
}

/// A loaded initrd: guest address and size.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

/// Writes the zero page for the Linux 64-bit boot protocol. `header` is the
/// bzImage setup header, if the kernel had one; `rsdp` is where the ACPI
/// tables start, if the guest has them.
pub fn write_linux_boot_params(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    cmdline_size: usize,
    initrd: Option<InitrdRegion>,
    header: Option<setup_header>,
    rsdp: Option<u64>,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if e820.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(e820.len()));
    }
    params.hdr = header.unwrap_or(setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    });
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = rsdp.unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)
}

/// Writes `hvm_start_info`, its memory map and its module list for PVH,
/// with `rsdp` where the ACPI tables start, if the guest has them.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<InitrdRegion>,
    rsdp: Option<u64>,
) -> Result<(), BootParamsError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(e820.len()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    for (i, entry) in e820.iter().enumerate() {
        let record = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(record, GuestAddress(at))
            .map_err(BootParamsError::Write)?;
    }
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(BootParamsError::Write)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&guest_ram_ranges(size)).unwrap()
    }

    #[test]
    fn small_guest_has_one_low_ram_range_and_no_high_memory() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[2].addr, 0x10_0000);
        assert_eq!(map[2].addr + map[2].size, 128 << 20);
        assert_eq!(guest_ram_ranges(128 << 20).len(), 1);
    }

    #[test]
    fn large_guest_continues_above_4g_and_leaves_the_device_hole_empty() {
        let size = 4u64 << 30;
        let map = e820_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, 1 << 32);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        let ranges = guest_ram_ranges(size);
        assert_eq!(
            ranges[1],
            (GuestAddress(1 << 32), (size - MMIO_GAP_START) as usize)
        );
    }

    #[test]
    fn zero_page_follows_the_boot_protocol() {
        let m = mem(64 << 20);
        let map = e820_map(64 << 20);
        let initrd = InitrdRegion {
            addr: 0x300_0000,
            size: 0x1234,
        };
        write_linux_boot_params(&m, &map, 42, Some(initrd), None, Some(0xe0000)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x300_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn bzimage_setup_header_is_kept() {
        let m = mem(64 << 20);
        let hdr = setup_header {
            version: 0x020f,
            boot_flag: 0xaa55,
            header: KERNEL_HDR_MAGIC,
            setup_sects: 27,
            ..Default::default()
        };
        write_linux_boot_params(&m, &e820_map(64 << 20), 10, None, Some(hdr), None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(({ p.hdr.version }, p.hdr.setup_sects), (0x020f, 27));
        assert_eq!(p.hdr.type_of_loader, 0xff);
    }

    #[test]
    fn pvh_start_info_points_at_its_memory_map_and_module() {
        let m = mem(64 << 20);
        let map = e820_map(64 << 20);
        let initrd = InitrdRegion {
            addr: 0x200_0000,
            size: 4096,
        };
        write_pvh_start_info(&m, &map, Some(initrd), Some(0xe0000)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        let e: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((e.addr, e.type_), (HIMEM_START, E820_RAM));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 4096));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_never_over_the_kernel() {
        let mem_size = 64 << 20;
        let addr = initrd_address(mem_size, 10_000, 0x20_0000, None).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= mem_size);
        assert!(addr >= mem_size - 16384);
        assert!(initrd_address(mem_size, 63 << 20, 0x20_0000, None).is_err());
        let hdr = setup_header {
            initrd_addr_max: 0x00ff_ffff,
            ..Default::default()
        };
        let capped = initrd_address(mem_size, 4096, 0x20_0000, Some(&hdr)).unwrap();
        assert_eq!(capped, 0x00ff_f000);
    }
}
