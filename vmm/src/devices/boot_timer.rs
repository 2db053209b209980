//! Firecracker-compatible boot timer: the first time the guest writes the
//! magic byte 123 (to its MMIO page or to port 0x3f0) the VMM records how
//! long the guest took to boot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::BusDevice;

pub const MAGIC_BOOT_COMPLETE: u8 = 123;

/// Shared view of the recorded boot time, in microseconds since VMM start;
/// `u64::MAX` until the guest signals.
#[derive(Clone, Debug)]
pub struct BootTime(Arc<AtomicU64>);

impl BootTime {
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(us),
        }
    }
}

pub struct BootTimer {
    vmm_start: Instant,
    recorded: Arc<AtomicU64>,
}

impl BootTimer {
    pub fn new(vmm_start: Instant) -> Self {
        Self {
            vmm_start,
            recorded: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    pub fn boot_time(&self) -> BootTime {
        BootTime(self.recorded.clone())
    }
}

/// Now on CLOCK_MONOTONIC, in microseconds: the clock of the boot timer's
/// log line.
pub fn monotonic_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into `now`; CLOCK_MONOTONIC is
    // always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC_BOOT_COMPLETE) {
            return;
        }
        let us = self.vmm_start.elapsed().as_micros() as u64;
        if self
            .recorded
            .compare_exchange(u64::MAX, us, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            // The clock reading lets whoever spawned the VMM, on the same
            // clock, add what process creation cost before the VMM started.
            tracing::info!(
                "guest boot time: {us} us since VMM start, at CLOCK_MONOTONIC {} us",
                monotonic_us()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_first_magic_write() {
        let mut timer = BootTimer::new(Instant::now());
        let time = timer.boot_time();
        timer.write(0, &[1]);
        timer.write(1, &[MAGIC_BOOT_COMPLETE]);
        assert_eq!(time.get(), None);
        timer.write(0, &[MAGIC_BOOT_COMPLETE]);
        let first = time.get().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[MAGIC_BOOT_COMPLETE]);
        assert_eq!(time.get(), Some(first));
    }
}
