//! Guest memory: anonymous, private, `MAP_NORESERVE` mappings, so an idle
//! guest costs only the pages it touches; or, for a restored VM, private
//! mappings of a snapshot's memory file, so pages load as the guest
//! touches them, are copied on write, and clones share the file's pages.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::arch::x86_64::boot_params::guest_ram_ranges;

const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map the memory file: {0}")]
    MapFile(String),
    #[error("the memory file holds {found} bytes; the snapshot's guest has {expected}")]
    FileSize { found: u64, expected: u64 },
    #[error("cannot fault in huge pages ahead: {0}")]
    Prefault(std::io::Error),
    #[error("cannot write guest memory to the memory file: {0}")]
    Dump(std::io::Error),
}

/// Where guest memory comes from, which decides how it is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Untouched pages are not resident and read as zero.
    Anonymous,
    /// A snapshot's memory file: a page that is not resident may still
    /// hold data in the file.
    SnapshotFile,
}

pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&guest_ram_ranges(mem_size)).map_err(|source| MemoryError::Map {
        size: mem_size,
        source,
    })
}

/// The size of a transparent huge page on x86_64.
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Asks for transparent huge pages over the 2 MiB-aligned spans around
/// `ranges`, before anything touches them: for a kernel image. Its first
/// write then takes one 2 MiB fault instead of a fault per 4 KiB page
/// (about 0.2 ms against 2-4 us a page on a nested host, for a 1 MiB
/// image 0.5-0.9 ms), and KVM, finding the host page huge, maps a guest
/// 2 MiB page with one shadow or stage-2 entry instead of a fault per 32
/// KiB. Only a hint: without THP (or with `enabled=never`) nothing
/// changes; with `defrag=madvise` a fragmented host may compact memory to
/// find the page. Spans outside guest memory are skipped, and so is the
/// low 2 MiB: it holds the boot structures and the page tables KVM
/// shadows, so KVM maps no huge page there, and one would cost 2 MiB for
/// a few pages of structures.
///
/// Where `faulted` still holds pages faulted in ahead, a 2 MiB-aligned
/// span takes one of them instead, already resident.
pub fn advise_huge_pages(
    mem: &GuestMemoryMmap,
    ranges: &[Range<u64>],
    faulted: &mut FaultedHugePages,
) {
    // Segments often share a huge page: each page is taken once.
    let mut pages = Vec::new();
    for range in ranges.iter().filter(|r| !r.is_empty()) {
        let start = (range.start / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE).max(HUGE_PAGE_SIZE);
        let end = range.end.next_multiple_of(HUGE_PAGE_SIZE);
        if start >= end {
            continue;
        }
        let Some(host) = mem
            .get_slice(GuestAddress(start), (end - start) as usize)
            .ok()
            .map(|slice| slice.ptr_guard_mut().as_ptr())
        else {
            continue;
        };
        // SAFETY: `host..host + (end - start)` is mapped guest memory
        // (checked by `get_slice`); the advice changes no contents.
        unsafe { libc::madvise(host.cast(), (end - start) as usize, libc::MADV_HUGEPAGE) };
        pages.extend(
            (0..end - start)
                .step_by(HUGE_PAGE_SIZE as usize)
                .map(|offset| {
                    // SAFETY: within the span checked above.
                    unsafe { host.add(offset as usize) }
                }),
        );
    }
    pages.sort();
    pages.dedup();
    for page in pages {
        faulted.move_one_to(page);
    }
}

/// Huge pages faulted in before the guest's memory exists, by a VMM on
/// standby, to be moved where the kernel image goes: the first touch of a
/// fresh 2 MiB page (the kernel zeroes it, and on a nested host the level
/// below may fault too) costs 0.3-0.5 ms, and 4-5 ms when the host is
/// busy, and is then off the launch's path. Moving them keeps them huge
/// where both addresses are 2 MiB-aligned, which is where a kernel image's
/// span goes.
pub struct FaultedHugePages {
    /// Host address of the next page, aligned to `HUGE_PAGE_SIZE`.
    next: usize,
    left: usize,
}

impl FaultedHugePages {
    pub fn none() -> Self {
        FaultedHugePages { next: 0, left: 0 }
    }

    /// Maps and faults in `count` huge pages (small pages where the host
    /// has no transparent huge pages: they are moved all the same).
    pub fn fault_in(count: usize) -> Result<Self, MemoryError> {
        let size = count * HUGE_PAGE_SIZE as usize;
        let padded = size + HUGE_PAGE_SIZE as usize;
        // SAFETY: a new anonymous mapping, owned by the value made below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MemoryError::Prefault(std::io::Error::last_os_error()));
        }
        let base = base as usize;
        let next = base.next_multiple_of(HUGE_PAGE_SIZE as usize);
        let padding = [
            (base, next - base),
            (next + size, base + padded - next - size),
        ];
        for (at, len) in padding.into_iter().filter(|&(_, len)| len > 0) {
            // SAFETY: unmaps padding on one side of the aligned pages, part
            // of the mapping made above.
            unsafe { libc::munmap(at as *mut libc::c_void, len) };
        }
        // SAFETY: advice on the aligned pages, mapped above.
        unsafe { libc::madvise(next as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
        for page in (next..next + size).step_by(PAGE_SIZE) {
            // SAFETY: within the aligned pages, mapped writable above.
            unsafe { std::ptr::write_volatile(page as *mut u8, 0) };
        }
        Ok(FaultedHugePages { next, left: count })
    }

    /// Moves the next page over the 2 MiB of mapped guest memory at
    /// `host`, when `host` is aligned and a page is left.
    fn move_one_to(&mut self, host: *mut u8) {
        if self.left == 0 || !(host as usize).is_multiple_of(HUGE_PAGE_SIZE as usize) {
            return;
        }
        // SAFETY: both ranges are mapped and private to this process; the
        // guest's 2 MiB are replaced by a page of zeros, as they read now.
        let moved = unsafe {
            libc::mremap(
                self.next as *mut libc::c_void,
                HUGE_PAGE_SIZE as usize,
                HUGE_PAGE_SIZE as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                host as *mut libc::c_void,
            )
        };
        if moved != libc::MAP_FAILED {
            self.next += HUGE_PAGE_SIZE as usize;
            self.left -= 1;
        }
    }
}

impl Drop for FaultedHugePages {
    fn drop(&mut self) {
        if self.left > 0 {
            // SAFETY: the pages not moved are this value's own mapping.
            unsafe {
                libc::munmap(
                    self.next as *mut libc::c_void,
                    self.left * HUGE_PAGE_SIZE as usize,
                )
            };
        }
    }
}

/// Faults in the guest pages of `ranges` for writing, from user mode, by
/// writing a zero to each: for pages the caller fills next, so their old
/// contents do not matter. A page fault taken inside a system call, as a
/// `read()` into fresh guest memory takes one per page, holds the
/// process's mmap lock, and the main thread's `mmap()` calls and this
/// thread's faults then wait for each other; a fault taken in user mode
/// locks only its own mapping. Addresses outside guest memory are skipped.
pub fn fault_in_for_writing(mem: &GuestMemoryMmap, ranges: &[Range<u64>]) {
    let page = PAGE_SIZE as u64;
    for range in ranges {
        for addr in (range.start / page * page..range.end).step_by(PAGE_SIZE) {
            let _ = mem.write_obj(0u8, GuestAddress(addr.max(range.start)));
        }
    }
}

/// Maps a memory file written by [`dump_guest_memory`] as the guest's RAM,
/// privately: the guest's writes never reach the file.
pub fn map_memory_file(file: &File, mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let found = file
        .metadata()
        .map_err(|e| MemoryError::MapFile(e.to_string()))?
        .len();
    if found != mem_size {
        return Err(MemoryError::FileSize {
            found,
            expected: mem_size,
        });
    }
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, size) in guest_ram_ranges(mem_size) {
        let file = file
            .try_clone()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| MemoryError::MapFile("region past the address space".into()))?,
        );
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::MapFile(e.to_string()))
}

/// Writes guest RAM to `file`, regions back to back, as a sparse file:
/// for anonymous memory only the pages the guest touched are written.
/// Returns the bytes written.
pub fn dump_guest_memory(
    mem: &GuestMemoryMmap,
    backing: MemoryBacking,
    file: &File,
) -> Result<u64, MemoryError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(0)
        .and_then(|_| file.set_len(total))
        .map_err(MemoryError::Dump)?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Dump(std::io::Error::other(e.to_string())))?;
        // SAFETY: `host..host+len` is this region's live mapping, and the
        // vCPUs are paused, so nothing writes to it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let present = match backing {
            MemoryBacking::Anonymous => resident_pages(host, len).map_err(MemoryError::Dump)?,
            MemoryBacking::SnapshotFile => vec![true; len / PAGE_SIZE],
        };
        let mut page = 0;
        while page < present.len() {
            if !present[page] {
                page += 1;
                continue;
            }
            let run_end = present[page..]
                .iter()
                .position(|&p| !p)
                .map_or(present.len(), |n| page + n);
            let run = &bytes[page * PAGE_SIZE..run_end * PAGE_SIZE];
            file.write_all_at(run, offset + (page * PAGE_SIZE) as u64)
                .map_err(MemoryError::Dump)?;
            written += run.len() as u64;
            page = run_end;
        }
        offset += len as u64;
    }
    Ok(written)
}

/// Which pages of an anonymous mapping the guest has touched.
fn resident_pages(host: *mut u8, len: usize) -> std::io::Result<Vec<bool>> {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `host` is page-aligned (an mmap), `len` bytes are mapped, and
    // `vec` has a byte per page.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Which of the pages of guest memory at `addr..addr + len` are there.
    fn resident(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<bool> {
        resident_pages(mem.get_host_address(GuestAddress(addr)).unwrap(), len).unwrap()
    }

    /// The host mapping containing `addr`, from /proc/self/smaps: its
    /// range and whether THP may back it.
    fn host_mapping(addr: u64) -> (Range<u64>, bool) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut holding = None;
        for line in smaps.lines() {
            let header = line
                .split_whitespace()
                .next()
                .and_then(|f| f.split_once('-'))
                .and_then(|(lo, hi)| {
                    Some((
                        u64::from_str_radix(lo, 16).ok()?,
                        u64::from_str_radix(hi, 16).ok()?,
                    ))
                });
            if let Some((lo, hi)) = header {
                holding = (lo..hi).contains(&addr).then_some(lo..hi);
            } else if let (Some(range), Some(v)) = (&holding, line.strip_prefix("THPeligible:")) {
                return (range.clone(), v.trim() == "1");
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn huge_pages_are_asked_for_over_the_aligned_span_around_a_range() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let image = (3u64 << 20) + 100..(3u64 << 20) + 300_000;
        let low = (1u64 << 20)..(1u64 << 20) + 4096;
        advise_huge_pages(
            &mem,
            &[low, image, (16 << 20)..(17 << 20)],
            &mut FaultedHugePages::none(),
        );
        let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if enabled.is_err() {
            println!("SKIPPED: this kernel has no transparent huge pages");
            return;
        }
        // The advice splits the mapping exactly at the span's ends.
        let (span, eligible) = host_mapping(host(3 << 20));
        assert_eq!(span, host(2 << 20)..host(4 << 20));
        assert_eq!(host_mapping(host(4 << 20)).0.start, host(4 << 20));
        assert!(host_mapping(host(1 << 20)).0.end <= host(2 << 20));
        let enabled = enabled.unwrap();
        match enabled.contains("[never]") {
            true => println!("SKIPPED (eligibility): THP is disabled on this host"),
            false => assert!(eligible, "THP may back the advised span"),
        }
        // The low 2 MiB was not advised: where THP needs the advice, it
        // may not back it.
        if enabled.contains("[madvise]") {
            assert!(!host_mapping(host(1 << 20)).1, "the low 2 MiB stays small");
        }
    }

    #[test]
    fn huge_pages_faulted_ahead_move_under_a_kernel_image_once_each() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        if !host(0).is_multiple_of(HUGE_PAGE_SIZE) {
            println!("SKIPPED: this kernel does not align guest memory to 2 MiB");
            return;
        }
        mem.write_slice(b"boot structures", GuestAddress(4096))
            .unwrap();
        let mut faulted = FaultedHugePages::fault_in(2).unwrap();
        // Two segments in one huge page take one page; the low 2 MiB and
        // spans outside guest memory take none.
        let segments = [
            4096..8192,
            (2 << 20) + 100..(2 << 20) + 5000,
            (3 << 20)..(3 << 20) + 10,
            (20 << 20)..(21 << 20),
        ];
        advise_huge_pages(&mem, &segments, &mut faulted);
        assert_eq!(faulted.left, 1);
        assert!(
            resident(&mem, 2 << 20, HUGE_PAGE_SIZE as usize)
                .iter()
                .all(|&r| r),
            "the moved page is resident before anything touches it"
        );
        assert!(!resident(&mem, 4 << 20, PAGE_SIZE)[0]);
        let mut read = [0xffu8; 15];
        mem.read_slice(&mut read, GuestAddress(2 << 20)).unwrap();
        assert_eq!(read, [0; 15], "it reads as zeros, as fresh memory does");
        mem.read_slice(&mut read, GuestAddress(4096)).unwrap();
        assert_eq!(&read, b"boot structures");
        // Memory beside the moved page is still the guest's.
        mem.write_slice(b"beside", GuestAddress((4 << 20) - 6))
            .unwrap();
        drop(faulted);
    }

    #[test]
    fn faulting_in_for_writing_makes_every_page_of_the_ranges_resident() {
        let mem = create_guest_memory(8 << 20).unwrap();
        let start = 1u64 << 20;
        mem.write_slice(&[0xaa; 100], GuestAddress(start)).unwrap();
        let range = start + 100..start + 5 * PAGE_SIZE as u64 + 1;
        fault_in_for_writing(&mem, std::slice::from_ref(&range));
        assert_eq!(
            resident(&mem, start, 8 * PAGE_SIZE),
            [true, true, true, true, true, true, false, false]
        );
        // The bytes before the range's start, on its first page, stay.
        let mut head = [0u8; 100];
        mem.read_slice(&mut head, GuestAddress(start)).unwrap();
        assert_eq!(head, [0xaa; 100]);
        // Past the end of guest memory: nothing, and no error.
        let outside = (16 << 20)..(17 << 20);
        fault_in_for_writing(&mem, std::slice::from_ref(&outside));
    }

    #[test]
    fn a_dump_maps_back_with_the_same_bytes_and_stays_private() {
        let size = 8 << 20;
        let mem = create_guest_memory(size).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"far page", GuestAddress(5 << 20)).unwrap();
        let path = std::env::temp_dir().join(format!("memdump-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let written = dump_guest_memory(&mem, MemoryBacking::Anonymous, &file).unwrap();
        assert!(written < size / 4, "only touched pages: {written}");

        let restored = map_memory_file(&file, size).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        restored
            .read_slice(&mut buf[..8], GuestAddress(5 << 20))
            .unwrap();
        assert_eq!(&buf[..8], b"far page");
        restored.write_slice(b"clone", GuestAddress(0)).unwrap();
        let mut on_disk = [0u8; 5];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(&on_disk, b"first", "a clone's write never reaches the file");

        let err = map_memory_file(&file, size * 2).unwrap_err();
        assert!(err.to_string().contains("holds 8388608 bytes"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
