//! The ways a guest ends its run through a device, each an eventfd the
//! device writes and the VMM's exit watcher reads: a reset through the
//! i8042, a power-off through the ACPI sleep registers, a panic through
//! pvpanic.

use vmm_sys_util::eventfd::EventFd;

use super::legacy::EventFdTrigger;

pub struct GuestSignals {
    pub reset: EventFd,
    pub power_off: EventFd,
    pub panic: EventFd,
}

impl GuestSignals {
    pub fn new() -> std::io::Result<Self> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(Self {
            reset: eventfd()?,
            power_off: eventfd()?,
            panic: eventfd()?,
        })
    }

    /// A trigger for the device that raises `signal`.
    pub fn trigger(signal: &EventFd) -> std::io::Result<EventFdTrigger> {
        Ok(EventFdTrigger::new(signal.try_clone()?))
    }
}
