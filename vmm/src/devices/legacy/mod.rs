//! PC legacy devices: the COM1 UART and the i8042 controller, both from
//! vm-superio, adapted to the bus and to irqfd/eventfd signalling.

pub mod i8042;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt or an event by writing to an eventfd: an irqfd for
/// interrupts, a plain eventfd watched by the event loop otherwise.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
