//! Diagnostics and benchmarks the guest runs when the command line asks
//! with `baremetal.run=<command>`: they exercise the devices end to end.
//!
//! * `spin:N`: N loop iterations, timed;
//! * `vsock-echo:PORT`: connect to the host's PORT, echo until it closes;
//! * `vsock-serve:PORT`: accept one host connection on PORT, echo it;
//! * `blk-check`: hash the first disk, then write, read back and compare
//!   a pattern at sector 8.

use alloc::vec;

use crate::clock::Clock;
use crate::virtio::blk::{BlockDevice, SECTOR};
use crate::virtio::mmio::Transport;
use crate::virtio::vsock::VsockDriver;
use crate::virtio::{Devices, DEVICE_BLOCK, DEVICE_VSOCK};

pub fn run(command: &str, clock: &Clock, devices: &Devices) {
    let (name, arg) = command.split_once(':').unwrap_or((command, ""));
    let number = arg.parse::<u64>().ok();
    match (name, number) {
        ("spin", Some(n)) => spin(clock, n),
        ("vsock-echo", Some(port)) => vsock_echo(devices, port as u32, false),
        ("vsock-serve", Some(port)) => vsock_echo(devices, port as u32, true),
        ("blk-check", _) => blk_check(clock, devices),
        ("touch", Some(mib)) => touch(mib),
        _ => println!("baremetal: unknown command {command:?}"),
    }
}

/// Writes one byte in every page of `mib` MiB of heap, so that the host
/// backs all of it: the memory a guest can make its VMM use.
fn touch(mib: u64) {
    let Ok(bytes) = usize::try_from(mib << 20) else {
        return println!("baremetal: touch: {mib} MiB is too much");
    };
    let mut memory: alloc::vec::Vec<u8> = alloc::vec::Vec::new();
    if memory.try_reserve_exact(bytes).is_err() {
        return println!("baremetal: touch: no {mib} MiB of heap");
    }
    let base = memory.as_mut_ptr();
    for offset in (0..bytes).step_by(4096) {
        // SAFETY: within the reserved capacity; volatile so that every
        // page is really written.
        unsafe { base.add(offset).write_volatile(1) };
    }
    println!("baremetal: touched {mib} MiB");
}

fn device(devices: &Devices, id: u32) -> Option<Transport> {
    let found = devices.find(id);
    if found.is_none() {
        println!("baremetal: no virtio device of type {id}");
    }
    found
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

fn vsock_echo(devices: &Devices, port: u32, serve: bool) {
    let Some(transport) = device(devices, DEVICE_VSOCK) else {
        return;
    };
    let mut vsock = match VsockDriver::new(transport) {
        Ok(v) => v,
        Err(e) => return println!("baremetal: vsock init failed: {e}"),
    };
    let stream = if serve {
        vsock.listen(port);
        println!(
            "baremetal: vsock cid {} listening on {port}",
            vsock.guest_cid()
        );
        vsock.accept()
    } else {
        match vsock.connect(port) {
            Ok(s) => s,
            Err(e) => return println!("baremetal: vsock connect to {port} failed: {e}"),
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        let n = vsock.recv(stream, &mut buf);
        if n == 0 {
            break;
        }
        if let Err(e) = vsock.send(stream, &buf[..n]) {
            println!("baremetal: vsock send failed: {e}");
            break;
        }
        total += n;
    }
    vsock.close(stream);
    println!("baremetal: vsock echoed {total} bytes");
}

/// FNV-1a, 64-bit.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn blk_check(clock: &Clock, devices: &Devices) {
    let Some(transport) = device(devices, DEVICE_BLOCK) else {
        return;
    };
    let mut disk = match BlockDevice::new(transport) {
        Ok(d) => d,
        Err(e) => return println!("baremetal: block init failed: {e}"),
    };
    let capacity = disk.capacity();
    let mut buf = vec![0u8; 64 << 10];
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut offset = 0u64;
    let start = clock.now();
    while offset < capacity {
        let n = (capacity - offset).min(buf.len() as u64) as usize;
        if let Err(e) = disk.read(offset / SECTOR as u64, &mut buf[..n]) {
            return println!("baremetal: block read at {offset} failed: {e}");
        }
        hash = fnv1a(hash, &buf[..n]);
        offset += n as u64;
    }
    let us = clock.micros(clock.now() - start).unwrap_or(0);
    println!("baremetal: block read {capacity} bytes, fnv1a64 {hash:016x}, in {us} us");
    let pattern: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
    match disk.write(8, &pattern) {
        Ok(()) => {
            let mut back = vec![0u8; 4096];
            match disk.read(8, &mut back) {
                Ok(()) if back == pattern => println!("baremetal: block write verified"),
                Ok(()) => println!("baremetal: block write read back different bytes"),
                Err(e) => println!("baremetal: block read-back failed: {e}"),
            }
        }
        Err(e) => println!("baremetal: block write refused: {e}"),
    }
}
