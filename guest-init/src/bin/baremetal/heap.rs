//! The heap: the RAM from the end of the image to the end of its e820
//! range, managed by `linked_list_allocator`.

use linked_list_allocator::LockedHeap;

use super::bootinfo::BootInfo;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

unsafe extern "C" {
    /// End of the image, from the linker script.
    static _end: u8;
}

/// Hands the free RAM after the image to the allocator; returns its size.
pub fn init(boot: &BootInfo) -> usize {
    let image_end = core::ptr::addr_of!(_end) as u64;
    let start = image_end.next_multiple_of(4096);
    let Some(range) = boot
        .ram()
        .iter()
        .find(|r| r.start <= start && start < r.end)
    else {
        return 0;
    };
    let size = (range.end - start) as usize;
    // SAFETY: the range is RAM the e820 map gives the guest, past the
    // image, used by nothing else.
    unsafe { HEAP.lock().init(start as *mut u8, size) };
    size
}
