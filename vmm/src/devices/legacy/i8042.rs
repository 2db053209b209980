//! The i8042 keyboard controller, kept for one job: a guest that reboots
//! through it (Linux `reboot=k`) makes the VMM exit.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::BusDevice;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.0.write(offset, value) {
            tracing::error!("i8042: cannot signal the reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn cpu_reset_command_signals_the_reset_event() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(reset.try_clone().unwrap()));
        dev.write(4, &[0x01]);
        assert!(reset.read().is_err(), "no reset for other commands");
        dev.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
