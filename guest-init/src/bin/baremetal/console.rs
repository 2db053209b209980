//! The COM1 console: logs, results and panics.
//!
//! Every byte costs a VM exit or two, about 30 us each on a PVM host, so a
//! function runtime booted with `quiet` on its command line prints only
//! errors: the boot banner alone would cost milliseconds.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

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

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn print(args: fmt::Arguments) {
    let _ = Console.write_fmt(args);
}

/// Prints what is informational only, unless the console is quiet.
pub fn print_info(args: fmt::Arguments) {
    if !QUIET.load(Ordering::Relaxed) {
        print(args);
    }
}

/// A line that `quiet` suppresses; `println!` is for errors and results.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::console::print_info(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
