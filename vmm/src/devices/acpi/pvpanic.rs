//! QEMU's pvpanic device on its I/O port: reading it tells the guest which
//! events the host takes, and Linux's driver (found through the DSDT's
//! `QEMU0001`) writes `PANICKED` from its panic notifier.

use crate::devices::legacy::EventFdTrigger;
use crate::devices::BusDevice;
use vm_superio::Trigger;

/// The guest kernel panicked (QEMU's docs/specs/pvpanic.rst).
const PANICKED: u8 = 1 << 0;

pub struct PvPanic {
    panicked: EventFdTrigger,
}

impl PvPanic {
    pub fn new(panicked: EventFdTrigger) -> Self {
        Self { panicked }
    }
}

impl BusDevice for PvPanic {
    /// Only panics are taken: a kdump kernel being loaded, or a shutdown,
    /// are not the VMM's business (power-off is ACPI's).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PANICKED != 0) {
            if let Err(e) = self.panicked.trigger() {
                tracing::error!("pvpanic: cannot signal the panic: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn offers_panics_and_signals_one() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = PvPanic::new(EventFdTrigger::new(fd.try_clone().unwrap()));
        let mut offered = [0];
        dev.read(0, &mut offered);
        assert_eq!(offered, [PANICKED]);
        dev.write(0, &[2]);
        assert!(fd.read().is_err(), "a crash-loaded event is no panic");
        dev.write(0, &[PANICKED]);
        assert_eq!(fd.read().unwrap(), 1);
    }
}
