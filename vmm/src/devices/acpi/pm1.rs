//! The ACPI PM1 registers the FADT names: the event block (status and
//! enable) and the control register. The machine is always in ACPI mode
//! (`SCI_EN` reads set) and no fixed event ever fires, but the enable bits
//! read back as written (ACPICA checks the global lock's that way). The
//! one thing a guest does with these registers is power off, writing
//! `\_S5`'s sleep type with `SLP_EN` to PM1 control (ACPI 6.5, 4.8.3.2).

use crate::arch::x86_64::acpi::S5_SLEEP_TYPE;
use crate::arch::x86_64::layout::{PM1_CONTROL_PORT, PM1_EVENT_PORT};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::BusDevice;
use vm_superio::Trigger;

/// Offsets from the device's first port: PM1 enable, PM1 control.
const ENABLE: u64 = 2;
const CONTROL: u64 = (PM1_CONTROL_PORT - PM1_EVENT_PORT) as u64;
const SCI_ENABLE: u16 = 1 << 0;
const SLEEP_TYPE_SHIFT: u16 = 10;
const SLEEP_TYPE_MASK: u16 = 0x7;
const SLEEP_ENABLE: u16 = 1 << 13;

pub struct Pm1 {
    enable: u16,
    /// What the guest last wrote to PM1 control, which it reads back
    /// before it writes again (`SLP_EN` is write-only).
    control: u16,
    power_off: EventFdTrigger,
}

impl Pm1 {
    pub fn new(power_off: EventFdTrigger) -> Self {
        Self {
            enable: 0,
            control: SCI_ENABLE,
            power_off,
        }
    }

    /// The 16-bit register at `offset`, if there is one: status (always
    /// clear), enable, control.
    fn register(&mut self, offset: u64) -> Option<&mut u16> {
        match offset {
            ENABLE => Some(&mut self.enable),
            CONTROL => Some(&mut self.control),
            _ => None,
        }
    }
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            if let Some(register) = self.register(at & !1) {
                *byte = register.to_le_bytes()[(at & 1) as usize];
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(register) = self.register(offset) else {
            return;
        };
        let value = match *data {
            [low] => (*register & 0xff00) | u16::from(low),
            [low, high, ..] => u16::from_le_bytes([low, high]),
            [] => return,
        };
        if offset == ENABLE {
            *register = value;
            return;
        }
        *register = (value & !SLEEP_ENABLE) | SCI_ENABLE;
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        if sleep_type != u16::from(S5_SLEEP_TYPE) {
            // S1-S4 are not offered: \_S5 is the only sleep state named.
            tracing::debug!("acpi: sleep type {sleep_type} ignored");
            return;
        }
        if let Err(e) = self.power_off.trigger() {
            tracing::error!("acpi: cannot signal the power-off: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn control(dev: &mut Pm1) -> u16 {
        let mut bytes = [0; 2];
        dev.read(CONTROL, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    #[test]
    fn only_s5_with_sleep_enable_powers_off() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Pm1::new(EventFdTrigger::new(fd.try_clone().unwrap()));
        assert_eq!(control(&mut dev), SCI_ENABLE, "always in ACPI mode");
        let s5 = u16::from(S5_SLEEP_TYPE) << SLEEP_TYPE_SHIFT;
        // ACPICA writes the sleep type, reads it back, then adds SLP_EN.
        dev.write(CONTROL, &s5.to_le_bytes());
        assert_eq!(control(&mut dev), s5 | SCI_ENABLE);
        dev.write(
            CONTROL,
            &((3 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE).to_le_bytes(),
        );
        dev.write(0, &(s5 | SLEEP_ENABLE).to_le_bytes());
        assert!(fd.read().is_err(), "no power-off yet");
        dev.write(CONTROL, &(s5 | SLEEP_ENABLE).to_le_bytes());
        assert_eq!(fd.read().unwrap(), 1);
        assert_eq!(control(&mut dev) & SLEEP_ENABLE, 0, "SLP_EN reads as 0");
    }

    #[test]
    fn no_event_is_pending_and_the_enable_bits_read_back() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Pm1::new(EventFdTrigger::new(fd));
        let mut event = [0xff; 4];
        dev.read(0, &mut event);
        assert_eq!(event, [0; 4]);
        dev.write(0, &[0xff, 0xff]);
        dev.write(ENABLE, &[0x20, 0x01]);
        dev.read(0, &mut event);
        assert_eq!(event, [0, 0, 0x20, 0x01]);
        let mut high = [0];
        dev.read(ENABLE + 1, &mut high);
        assert_eq!(high, [0x01]);
    }
}
