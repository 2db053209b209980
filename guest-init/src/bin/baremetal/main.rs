//! The bare-metal guest: no kernel, just the function runtime, booted by
//! the VMM like a kernel. See `entry.rs` for how it starts.
#![no_std]
#![no_main]

extern crate alloc;

mod bootinfo;
#[macro_use]
mod console;
mod clock;
mod cpu;
mod diag;
mod entry;
mod heap;
mod mem;
mod runtime;
mod virtio;
mod wasi;

use bootinfo::BootInfo;
use clock::Clock;
use cpu::{EntryKind, ExecutionMode};

extern "C" fn rust_main(info: u64, kind: u32) -> ! {
    let entered_at = cpu::rdtsc();
    let kind = EntryKind::from_raw(kind);
    // SAFETY: `info` is what the entry stub received for `kind`.
    let boot = unsafe { BootInfo::parse(info, kind) };
    console::set_quiet(boot.flag("quiet"));
    let heap = heap::init(&boot);
    let mode = ExecutionMode::detect();
    let clock = Clock::from_boot(&boot);
    info!("baremetal: entered through {kind}; mode: {mode}");
    info!(
        "baremetal: heap {} KiB, tsc {} kHz",
        heap >> 10,
        clock.tsc_khz().unwrap_or(0)
    );
    // Leaked: it lives as long as the guest, and the entropy device is
    // looked for in it on a function's first random_get.
    let devices: &'static virtio::Devices = alloc::boxed::Box::leak(alloc::boxed::Box::new(
        virtio::Devices::discover(boot.cmdline),
    ));
    match boot.param("baremetal.run") {
        Some(command) => diag::run(command, &clock, devices),
        None => runtime::serve(&clock, devices, entered_at),
    }
    cpu::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("baremetal: panic: {info}");
    cpu::reset()
}
