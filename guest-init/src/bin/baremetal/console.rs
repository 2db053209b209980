//! The COM1 console: logs, results and panics.

use core::fmt::{self, Write};

use super::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const TRANSMIT_EMPTY: u8 = 1 << 5;

pub struct Console;

impl Console {
    fn put(byte: u8) {
        // A real UART needs the wait; the VMM's is always ready, so this
        // costs one read.
        while inb(LINE_STATUS) & TRANSMIT_EMPTY == 0 {}
        outb(COM1, byte);
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(Console::put);
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    let _ = Console.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
