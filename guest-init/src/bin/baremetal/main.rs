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
mod entry;
mod heap;
mod mem;

use bootinfo::BootInfo;
use clock::Clock;
use cpu::{EntryKind, ExecutionMode};

extern "C" fn rust_main(info: u64, kind: u32) -> ! {
    let kind = EntryKind::from_raw(kind);
    // SAFETY: `info` is what the entry stub received for `kind`.
    let boot = unsafe { BootInfo::parse(info, kind) };
    let heap = heap::init(&boot);
    let mode = ExecutionMode::detect();
    let clock = Clock::from_boot(&boot);
    println!("baremetal: entered through {kind}; mode: {mode}");
    println!(
        "baremetal: heap {} KiB, tsc {} kHz",
        heap >> 10,
        clock.tsc_khz().unwrap_or(0)
    );
    if let Some(n) = boot.param("spin").and_then(|v| v.parse::<u64>().ok()) {
        spin(&clock, n);
    }
    cpu::reset()
}

/// A counted loop, timed with the TSC: how fast the guest really runs.
fn spin(clock: &Clock, iterations: u64) {
    let start = clock.now();
    let mut i = 0u64;
    while core::hint::black_box(i) < iterations {
        i += 1;
    }
    let cycles = clock.now() - start;
    match clock.micros(cycles) {
        Some(us) => println!("baremetal: spin {iterations} iterations: {cycles} cycles, {us} us"),
        None => println!("baremetal: spin {iterations} iterations: {cycles} cycles"),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("baremetal: panic: {info}");
    cpu::reset()
}
