//! What the guest can learn about, and ask of, its virtual CPU.

use core::fmt;

/// Which entry the VMM used; the value is passed from the entry stubs.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Linux64 = 0,
    Pvh = 1,
    PvmUser = 2,
}

impl EntryKind {
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            1 => EntryKind::Pvh,
            2 => EntryKind::PvmUser,
            _ => EntryKind::Linux64,
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::Linux64 => "the Linux 64-bit entry",
            EntryKind::Pvh => "the PVH entry",
            EntryKind::PvmUser => "the PVM user-mode entry",
        })
    }
}

/// How the guest's instructions are executed, from the privilege level it
/// finds itself at. Only a PVM host runs a kernel at CPL 3; there it runs
/// natively. At CPL 0 it is either hardware virtualization or, on a PVM
/// host, KVM's instruction emulator; the guest cannot tell which cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionMode {
    PvmNative,
    Privileged,
}

impl ExecutionMode {
    pub fn detect() -> Self {
        let cs: u16;
        // SAFETY: reading CS has no side effects.
        unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
        if cs & 3 == 3 {
            ExecutionMode::PvmNative
        } else {
            ExecutionMode::Privileged
        }
    }
}

impl fmt::Display for ExecutionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecutionMode::PvmNative => "pvm-native (PVM user mode, CPL 3)",
            ExecutionMode::Privileged => "cpl0 (hardware virtualization or KVM emulation)",
        })
    }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is unprivileged unless CR4.TSD is set, which no VMM does.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O goes to the VMM's device model; in PVM user mode the
    // host forwards it the same way.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
    };
}

pub fn pause() {
    core::hint::spin_loop();
}

/// The VMM's idle port: a 32-bit write gives the CPU back to the host for
/// at most that many microseconds, or until a device raises an interrupt
/// (the VMM's `vstate::guest_wake`). Without it, the write is a no-op.
const IDLE_PORT: u16 = 0x3f1;
/// The longest idle sleep: waiting for `/next` wakes the guest this often.
const IDLE_MICROS: u32 = 1_000_000;
/// How long a wait spins before it idles, in TSC cycles (30-50 us): an
/// answer often comes sooner, and idling costs two VM exits and a wake-up.
const SPIN_CYCLES: u64 = 100_000;

/// A wait for the host: spins a while, then idles until a device has
/// something, so that a guest waiting for its next event does not keep a
/// host CPU busy.
pub struct Waiter {
    spinning_since: Option<u64>,
}

impl Waiter {
    pub const fn new() -> Self {
        Self {
            spinning_since: None,
        }
    }

    /// One round of waiting; the caller looks at its rings in between.
    pub fn wait(&mut self) {
        let now = rdtsc();
        match self.spinning_since {
            Some(since) if now.wrapping_sub(since) >= SPIN_CYCLES => {
                outl(IDLE_PORT, IDLE_MICROS);
                // Whatever woke the guest may need more than one look.
                self.spinning_since = None;
            }
            Some(_) => pause(),
            None => {
                self.spinning_since = Some(now);
                pause();
            }
        }
    }
}

/// Ends the VM: the i8042 CPU reset line, which the VMM treats as exit.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        pause();
    }
}
