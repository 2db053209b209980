//! The Linux guest's PID 1: no libc, raw system calls only. It writes the
//! boot timer's byte, mounts /proc, /dev and a size-limited /tmp, brings
//! up `lo`, mounts the function's code (the first virtio-blk disk, EROFS)
//! read-only at /var/task, runs its `bootstrap` to its end, and restarts
//! the machine. The Runtime API relay over vsock comes next (issue 4).
#![no_std]
#![no_main]

// The C memory functions, shared with the bare-metal guest: neither has
// a libc.
mod function;
#[path = "../baremetal/mem.rs"]
mod mem;
mod sys;

extern crate alloc;

use linked_list_allocator::LockedHeap;

/// The heap: PID 1's messages from the host are small; 1 MiB of `.bss`,
/// touched only as it is used.
#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();
const HEAP_SIZE: usize = 1 << 20;
static mut HEAP_SPACE: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

use core::arch::global_asm;
use core::fmt::Write;

// The process entry: the kernel leaves argc at the stack pointer, which
// the System V ABI wants 16-byte aligned before a call.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym init_main,
);

/// The console: stdout once /dev/console is set up.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            match sys::write(1, rest) {
                Ok(0) | Err(_) => return Err(core::fmt::Error),
                Ok(n) => rest = &rest[n..],
            }
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(Console, $($arg)*);
    }};
}

const O_RDWR: i32 = 2;
const MS_RDONLY: usize = 1;
const MS_NOSUID: usize = 2;
const MS_NODEV: usize = 4;
const MS_NOEXEC: usize = 8;

/// The boot timer's port and magic byte (Firecracker's convention).
const BOOT_TIMER_PORT: u16 = 0x3f0;
const BOOT_TIMER_MAGIC: u8 = 123;

fn mount_all() -> Result<(), (&'static str, sys::Errno)> {
    // devtmpfs first: it gives the console for everything after.
    for (dir, what) in [
        (c"/dev", "mkdir /dev"),
        (c"/proc", "mkdir /proc"),
        (c"/tmp", "mkdir /tmp"),
    ] {
        match sys::mkdir(dir, 0o755) {
            Ok(()) | Err(sys::Errno(17)) => {} // EEXIST
            Err(e) => return Err((what, e)),
        }
    }
    sys::mount(c"devtmpfs", c"/dev", c"devtmpfs", MS_NOSUID, c"mode=0755")
        .map_err(|e| ("mount /dev", e))?;
    let console = sys::open(c"/dev/console", O_RDWR).map_err(|e| ("open /dev/console", e))?;
    for fd in 0..3 {
        sys::dup2(console, fd).map_err(|e| ("dup2 console", e))?;
    }
    if console > 2 {
        let _ = sys::close(console);
    }
    sys::mount(
        c"proc",
        c"/proc",
        c"proc",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        c"",
    )
    .map_err(|e| ("mount /proc", e))?;
    sys::mount(
        c"tmpfs",
        c"/tmp",
        c"tmpfs",
        MS_NOSUID | MS_NODEV,
        c"size=64m,mode=1777",
    )
    .map_err(|e| ("mount /tmp", e))?;
    Ok(())
}

const ENOENT: i32 = 2;
const ENXIO: i32 = 6;
const X_OK: i32 = 1;

/// Mounts the code disk at /var/task; Ok(false) when there is none.
fn mount_code() -> Result<bool, (&'static str, sys::Errno)> {
    for (dir, what) in [(c"/var", "mkdir /var"), (c"/var/task", "mkdir /var/task")] {
        match sys::mkdir(dir, 0o755) {
            Ok(()) | Err(sys::Errno(17)) => {}
            Err(e) => return Err((what, e)),
        }
    }
    match sys::mount(
        c"/dev/vda",
        c"/var/task",
        c"erofs",
        MS_RDONLY | MS_NOSUID | MS_NODEV,
        c"",
    ) {
        Ok(()) => Ok(true),
        Err(sys::Errno(ENOENT | ENXIO)) => Ok(false),
        Err(e) => Err(("mount /dev/vda at /var/task", e)),
    }
}

const AF_INET: i32 = 2;
const SOCK_DGRAM: i32 = 2;
const SIOCGIFFLAGS: usize = 0x8913;
const SIOCSIFFLAGS: usize = 0x8914;
const IFF_UP: u16 = 1;

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: u16,
    _pad: [u8; 22],
}

/// Brings up the loopback interface: runtimes talk HTTP to 127.0.0.1.
fn loopback_up() -> Result<(), sys::Errno> {
    let fd = sys::socket(AF_INET, SOCK_DGRAM, 0)?;
    let mut req = IfreqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    let ptr = (&mut req as *mut IfreqFlags).cast();
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write a struct ifreq,
    // which `req` is (40 bytes, the flags at offset 16).
    let result = unsafe { sys::ioctl(fd, SIOCGIFFLAGS, ptr) }.and_then(|_| {
        req.flags |= IFF_UP;
        // SAFETY: as above.
        unsafe { sys::ioctl(fd, SIOCSIFFLAGS, ptr) }
    });
    let _ = sys::close(fd);
    result.map(drop)
}

extern "C" fn init_main(_stack: *const usize) -> ! {
    // SAFETY: the heap's memory is a static only the allocator uses, given
    // to it once, before any allocation.
    unsafe {
        HEAP.lock()
            .init(core::ptr::addr_of_mut!(HEAP_SPACE).cast(), HEAP_SIZE)
    };
    // First: the VMM logs the time to here. Without the device (QEMU) the
    // write goes nowhere.
    if sys::ioperm(BOOT_TIMER_PORT, 1, true).is_ok() {
        sys::outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
    }
    if let Err((what, e)) = mount_all() {
        // The console may be missing; say it where the kernel can.
        say!("init: {what} failed: errno {}", e.0);
        halt();
    }
    say!("init: mounted /dev (devtmpfs), /proc, /tmp (tmpfs, 64 MiB)");
    match loopback_up() {
        Ok(()) => say!("init: lo is up"),
        Err(e) => say!("init: bringing up lo failed: errno {}", e.0),
    }
    match mount_code() {
        Ok(true) => {
            say!("init: mounted the code disk read-only at /var/task (erofs)");
            match sys::access(function::BOOTSTRAP, X_OK) {
                Ok(()) => run_function(),
                Err(e) => say!("init: no executable /var/task/bootstrap: errno {}", e.0),
            }
        }
        Ok(false) => say!("init: no code disk (/dev/vda)"),
        Err((what, e)) => say!("init: {what} failed: errno {}", e.0),
    }
    say!("init: nothing more to run yet; restarting the machine");
    halt();
}

/// Runs the function's bootstrap; its lines go to the console for now,
/// to the host's log stream once vsock is up.
fn run_function() {
    let ended = function::run(|line| {
        say!(
            "function: {}",
            core::str::from_utf8(line).unwrap_or("(not UTF-8)")
        );
    });
    match ended {
        Ok(function::Ended::Exited(code)) => say!("init: bootstrap exited with status {code}"),
        Ok(function::Ended::Killed(signal)) => {
            say!("init: bootstrap was killed by signal {signal}")
        }
        Err((what, e)) => say!("init: {what} failed: errno {}", e.0),
    }
}

fn halt() -> ! {
    let _ = sys::reboot();
    sys::exit(1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("init: panic: {info}");
    halt()
}
