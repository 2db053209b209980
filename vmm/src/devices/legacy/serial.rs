//! The 8250/16550 UART on COM1.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::BusDevice;

pub type SerialOutput = Box<dyn Write + Send>;

/// The UART's registers and receive FIFO, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    /// A broken output (a closed pipe, a full disk) is reported once, not
    /// once per byte.
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(interrupt: EventFdTrigger, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(interrupt, out),
            output_failed: false,
        }
    }

    pub fn from_snapshot(
        state: &SerialSnapshot,
        interrupt: EventFdTrigger,
        out: SerialOutput,
    ) -> Result<Self, String> {
        let uart = Serial::from_state(&state.into(), interrupt, NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self {
            uart,
            output_failed: false,
        })
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Queues host input for the guest; returns how many bytes fit in the
    /// UART's FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity().min(bytes.len());
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            if !self.output_failed {
                self.output_failed = true;
                tracing::warn!("serial console output failed, further output is lost: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_and_input_reaches_the_guest() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"OK\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"OK\n");
        assert_eq!(serial.enqueue_input(b"hi").unwrap(), 2);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        serial.read(0, &mut rbr);
        assert_eq!(rbr[0], b'h');
        // Empty and out-of-range accesses are ignored.
        serial.write(0x1_0000, &[1]);
        serial.write(0, &[]);
        serial.read(0, &mut []);
    }
}
