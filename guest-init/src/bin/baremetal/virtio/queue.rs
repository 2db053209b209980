//! A split virtqueue, driver side, polled.

use alloc::alloc::{alloc, alloc_zeroed, dealloc, handle_alloc_error, Layout};
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Equal buffers only the device writes, in one allocation left unzeroed:
/// a guest's first touch of a page is a page fault, tens of microseconds
/// under PVM's shadow paging, and zeroing a vsock driver's 1 MiB of receive
/// buffers cost 4.5 ms of boot. One allocation, because the allocator
/// writes its bookkeeping after each block: a block per buffer touched a
/// fresh page per buffer. The driver reads back only what the device
/// reports it wrote.
pub struct DeviceBuffers {
    ptr: NonNull<u8>,
    layout: Layout,
    slot: usize,
    count: usize,
}

impl DeviceBuffers {
    pub fn new(count: usize, slot: usize) -> Self {
        let layout = count
            .checked_mul(slot)
            .and_then(|len| Layout::from_size_align(len.max(1), 4096).ok())
            .expect("device buffer sizes are small");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => DeviceBuffers {
                ptr,
                layout,
                slot,
                count,
            },
            None => handle_alloc_error(layout),
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Buffer `index` (empty past the last), for the device to write.
    pub fn writable(&self, index: usize) -> Buffer {
        let index = index.min(self.count);
        Buffer {
            addr: self.ptr.as_ptr() as u64 + (index * self.slot) as u64,
            len: if index < self.count {
                self.slot as u32
            } else {
                0
            },
            writable: true,
        }
    }

    /// The first `len` bytes of buffer `index` (at most its size), which
    /// the device reported it wrote.
    pub fn written(&self, index: usize, len: usize) -> &[u8] {
        if index >= self.count {
            return &[];
        }
        // SAFETY: within the allocation; the device wrote these bytes, and
        // any byte value is a valid u8.
        unsafe {
            core::slice::from_raw_parts(
                self.ptr.as_ptr().add(index * self.slot),
                len.min(self.slot),
            )
        }
    }
}

impl Drop for DeviceBuffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

pub struct VirtQueue {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    notify_addr: u64,
    index: u16,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

fn zeroed_pages(bytes: usize) -> *mut u8 {
    let layout =
        Layout::from_size_align(bytes.next_multiple_of(4096), 4096).expect("queue sizes are small");
    // SAFETY: non-zero size; a failed allocation aborts the guest below.
    let ptr = unsafe { alloc_zeroed(layout) };
    assert!(!ptr.is_null(), "out of memory for a virtqueue");
    ptr
}

impl VirtQueue {
    pub fn new(size: u16, notify_addr: u64, index: u16) -> Self {
        let n = usize::from(size);
        // The three rings back to back, at the alignments virtio 1 asks
        // for (16, 2 and 4 bytes): one page for a 64-entry queue, where a
        // page each would cost two more first-touch faults.
        let avail_offset = 16 * n;
        let used_offset = (avail_offset + 6 + 2 * n).next_multiple_of(4);
        let rings = zeroed_pages(used_offset + 6 + 8 * n);
        VirtQueue {
            size,
            desc: rings,
            // SAFETY: both offsets are within the allocation.
            avail: unsafe { rings.add(avail_offset) },
            used: unsafe { rings.add(used_offset) },
            notify_addr,
            index,
            free: (0..size).rev().collect(),
            chains: (0..size).map(|_| Vec::new()).collect(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.desc as u64
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail as u64
    }

    pub fn used_addr(&self) -> u64 {
        self.used as u64
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Makes a chain available to the device; returns its head, or `None`
    /// when too few descriptors are free.
    pub fn add(&mut self, buffers: &[Buffer]) -> Option<u16> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..buffers.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (b, &id)) in buffers.iter().zip(&ids).enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            // SAFETY: `id` < size; the table holds `size` 16-byte entries.
            unsafe {
                let d = self.desc.add(16 * usize::from(id));
                core::ptr::write_volatile(d as *mut u64, b.addr);
                core::ptr::write_volatile(d.add(8) as *mut u32, b.len);
                core::ptr::write_volatile(d.add(12) as *mut u16, flags);
                core::ptr::write_volatile(d.add(14) as *mut u16, next);
            }
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        // SAFETY: ring slot and index within the avail ring.
        unsafe {
            let slot = 4 + 2 * usize::from(self.avail_idx % self.size);
            core::ptr::write_volatile(self.avail.add(slot) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::ptr::write_volatile(self.avail.add(2) as *mut u16, self.avail_idx);
        }
        fence(Ordering::SeqCst);
        Some(head)
    }

    pub fn notify(&self) {
        // SAFETY: the transport's notify register.
        unsafe { core::ptr::write_volatile(self.notify_addr as *mut u32, u32::from(self.index)) };
    }

    /// A completed chain: its head and the bytes the device wrote.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        // SAFETY: the used ring's index and entries are within its pages.
        let used_idx = unsafe { core::ptr::read_volatile(self.used.add(2) as *const u16) };
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = 4 + 8 * usize::from(self.last_used % self.size);
        // SAFETY: as above.
        let (id, len) = unsafe {
            (
                core::ptr::read_volatile(self.used.add(slot) as *const u32),
                core::ptr::read_volatile(self.used.add(slot + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = (id as u16) % self.size;
        let chain = core::mem::take(&mut self.chains[usize::from(head)]);
        self.free.extend(chain.iter().rev());
        Some((head, len))
    }
}
