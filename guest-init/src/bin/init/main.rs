//! The Linux guest's PID 1: no libc, raw system calls only. It writes the
//! boot timer's byte, mounts /proc, /dev and a size-limited /tmp, brings
//! up `lo`, mounts the function's code (the first virtio-blk disk, EROFS)
//! read-only at /var/task, takes the function's variables from the host
//! over vsock, and runs its `bootstrap` with them: the output goes to the
//! host's log stream line by line, and 127.0.0.1:9001 is relayed to the
//! host's Runtime API. When bootstrap ends the init reports it to the
//! host and restarts the machine, which ends the microVM.
#![no_std]
#![no_main]

// The C memory functions, shared with the bare-metal guest: neither has
// a libc.
mod function;
mod host;
#[path = "../baremetal/mem.rs"]
mod mem;
mod relay;
mod sys;

extern crate alloc;

use alloc::ffi::CString;
use alloc::string::String;
use alloc::vec::Vec;

use linked_list_allocator::LockedHeap;

/// The heap: PID 1's messages from the host are small; 1 MiB of `.bss`,
/// touched only as it is used.
#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();
const HEAP_SIZE: usize = 1 << 20;
static mut HEAP_SPACE: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

use core::arch::global_asm;
use core::ffi::CStr;
use core::fmt::Write;

use guest_init::disks::{self, Disk};
use guest_init::environ;

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
const MS_BIND: usize = 4096;
const MS_REC: usize = 16384;

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
const F_OK: i32 = 0;

/// Mounts the virtio-blk disk `device` (EROFS) read-only at `dir`;
/// Ok(false) when there is no such disk.
fn mount_disk(device: &CStr, dir: &CStr) -> Result<bool, sys::Errno> {
    match sys::mkdir(dir, 0o755) {
        Ok(()) | Err(sys::Errno(17)) => {}
        Err(e) => return Err(e),
    }
    match sys::mount(device, dir, c"erofs", MS_RDONLY | MS_NOSUID | MS_NODEV, c"") {
        Ok(()) => Ok(true),
        Err(sys::Errno(ENOENT | ENXIO)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where a runtime's root file system is mounted.
const ROOT_DISK: &CStr = c"/runtime";
/// Where a container image is mounted: the function's root.
const IMAGE_ROOT: &CStr = c"/image";

/// Gives a container image's root the guest's /dev, /proc and /tmp (the
/// worker makes their mount points in every image it builds).
fn mount_into_image() -> Result<(), (&'static str, sys::Errno)> {
    for (from, to) in [
        (c"/dev", c"/image/dev"),
        (c"/proc", c"/image/proc"),
        (c"/tmp", c"/image/tmp"),
    ] {
        sys::mount(from, to, c"", MS_BIND | MS_REC, c"").map_err(|e| (text(to), e))?;
    }
    Ok(())
}

/// Where the function's process starts: a container image's command line
/// (from the host's variables), or a `bootstrap`.
enum Target {
    Image,
    Bootstrap(&'static CStr),
}

/// The image's command line and working directory, taken out of the
/// host's `variables`, and its executable found in the image's root (by
/// `PATH` when it names no directory, as a shell would).
fn image_program(variables: &mut Vec<(String, String)>) -> Result<function::Program, String> {
    let mut args: Vec<(usize, String)> = Vec::new();
    let mut cwd = String::from("/");
    variables.retain(|(k, v)| {
        if let Some(n) = k.strip_prefix(environ::IMAGE_ARG) {
            if let Ok(n) = n.parse() {
                args.push((n, v.clone()));
            }
            false
        } else if k == environ::IMAGE_WORKDIR {
            cwd = v.clone();
            false
        } else {
            true
        }
    });
    args.sort_by_key(|(n, _)| *n);
    let c_string =
        |s: String, what: &str| CString::new(s).map_err(|_| alloc::format!("{what} holds a NUL"));
    let first = args
        .first()
        .map(|(_, a)| a.clone())
        .ok_or_else(|| String::from("the image gives no command to run"))?;
    let search = variables
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(function::DEFAULT_PATH, |(_, v)| v.as_str());
    let candidates: Vec<String> = if first.contains('/') {
        alloc::vec![first.clone()]
    } else {
        search
            .split(':')
            .map(|dir| alloc::format!("{dir}/{first}"))
            .collect()
    };
    let executable = |path: &String| {
        CString::new(alloc::format!("{}{path}", text(IMAGE_ROOT)))
            .is_ok_and(|p| sys::access(&p, X_OK).is_ok())
    };
    let path =
        candidates
            .into_iter()
            .find(executable)
            .ok_or_else(|| match first.contains('/') {
                true => alloc::format!("{first} is not an executable in the image"),
                false => alloc::format!("{first:?} is in none of the image's PATH ({search})"),
            })?;
    Ok(function::Program {
        path: c_string(path, "the command")?,
        argv: args
            .into_iter()
            .map(|(_, a)| c_string(a, "an argument"))
            .collect::<Result<_, _>>()?,
        root: Some(IMAGE_ROOT),
        cwd: c_string(cwd, "the working directory")?,
    })
}

/// Makes a runtime's root file system the guest's: its top-level
/// directories (Debian's, /bin and /lib being links into /usr) and its
/// /var/runtime, linked from the init's own root, which has none of them.
fn link_root() {
    for name in ["usr", "bin", "sbin", "lib", "lib64", "etc", "var/runtime"] {
        let target = CString::new(alloc::format!("{}/{name}", text(ROOT_DISK)));
        let link = CString::new(alloc::format!("/{name}"));
        let (Ok(target), Ok(link)) = (target, link) else {
            continue;
        };
        if sys::access(&target, F_OK).is_err() {
            continue;
        }
        if let Err(e) = sys::symlink(&target, &link) {
            say!(
                "init: linking /{name} into {} failed: errno {}",
                text(ROOT_DISK),
                e.0
            );
        }
    }
}

const SIGKILL: i32 = 9;

/// How many processes the kernel's OOM killer has killed since boot
/// (`oom_kill` in /proc/vmstat); `None` where the kernel does not count.
fn oom_kills() -> Option<u64> {
    let fd = sys::open(c"/proc/vmstat", O_RDONLY).ok()?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = sys::read(fd, &mut buf) {
        text.extend_from_slice(&buf[..n]);
    }
    let _ = sys::close(fd);
    text.split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"oom_kill "))
        .and_then(|count| core::str::from_utf8(count).ok()?.parse().ok())
}

/// A path for the console.
fn text(path: &CStr) -> &str {
    path.to_str().unwrap_or("(not UTF-8)")
}

/// The value of `name` in the environment the kernel started PID 1 with:
/// the command line's parameters that the kernel does not know.
fn kernel_env(stack: *const usize, name: &str) -> Option<&'static str> {
    // SAFETY: `stack` is the kernel's initial stack: argc, that many
    // argument pointers and a null, then environment pointers up to a
    // null, each to a NUL-terminated string that lives as long as PID 1.
    unsafe {
        let argc = *stack;
        let mut entry = stack.add(argc + 2);
        while *entry != 0 {
            // By hand: CStr::from_ptr calls strlen, and there is no libc.
            let start = *entry as *const u8;
            let mut len = 0;
            while *start.add(len) != 0 {
                len += 1;
            }
            let bytes = core::slice::from_raw_parts(start, len);
            if let Some(value) = bytes
                .strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return core::str::from_utf8(value).ok();
            }
            entry = entry.add(1);
        }
    }
    None
}

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

const O_RDONLY: i32 = 0;
/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)`.
const RNDADDENTROPY: usize = 0x4008_5203;
const RNDRESEEDCRNG: usize = 0x5207;

/// `struct rand_pool_info` with 32 bytes.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: i32,
    buf_size: i32,
    buf: [u8; 32],
}

/// Credits fresh bytes from the host's entropy device (virtio-rng) to the
/// kernel's random generator and reseeds it now: a restored clone must
/// not go on from the state its snapshot's other clones share.
fn reseed_random() -> Result<(), sys::Errno> {
    let mut info = RandPoolInfo {
        entropy_count: 256,
        buf_size: 32,
        buf: [0; 32],
    };
    let hwrng = sys::open(c"/dev/hwrng", O_RDONLY)?;
    let read = sys::read(hwrng, &mut info.buf);
    let _ = sys::close(hwrng);
    if read? != info.buf.len() {
        return Err(sys::Errno(5)); // EIO
    }
    let urandom = sys::open(c"/dev/urandom", O_RDWR)?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info with `buf_size` bytes,
    // which `info` is; RNDRESEEDCRNG takes no argument.
    let result = unsafe {
        sys::ioctl(
            urandom,
            RNDADDENTROPY,
            (&mut info as *mut RandPoolInfo).cast(),
        )
        .and_then(|_| sys::ioctl(urandom, RNDRESEEDCRNG, core::ptr::null_mut()))
    };
    let _ = sys::close(urandom);
    result.map(drop)
}

/// Brings up the loopback interface: runtimes talk HTTP to 127.0.0.1.
fn loopback_up() -> Result<(), sys::Errno> {
    let fd = sys::socket(sys::AF_INET, sys::SOCK_DGRAM, 0)?;
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

extern "C" fn init_main(stack: *const usize) -> ! {
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
    let _ = sys::mkdir(c"/var", 0o755);
    let named = kernel_env(stack, disks::PARAM);
    let Some((disks, count)) = disks::parse(named.unwrap_or(disks::DEFAULT)) else {
        let message = "the kernel command line names unknown disks";
        say!("init: {message}: {}={:?}", disks::PARAM, named);
        report("Runtime.InvalidEntrypoint", message);
        halt();
    };
    let (mut code, mut image) = (false, false);
    for (index, disk) in disks[..count].iter().flatten().enumerate() {
        let device = disks::device(index);
        let Ok(device) = CStr::from_bytes_with_nul(&device) else {
            continue;
        };
        let dir = match disk {
            Disk::Task => c"/var/task",
            Disk::Root => ROOT_DISK,
            Disk::Opt => c"/opt",
            Disk::Image => IMAGE_ROOT,
        };
        match mount_disk(device, dir) {
            Ok(true) => {
                say!(
                    "init: mounted {} read-only at {} (erofs)",
                    text(device),
                    text(dir)
                );
                match disk {
                    Disk::Task => code = true,
                    Disk::Root => link_root(),
                    Disk::Opt => {}
                    Disk::Image => match mount_into_image() {
                        Ok(()) => image = true,
                        Err((what, e)) => say!("init: mounting {what} failed: errno {}", e.0),
                    },
                }
            }
            Ok(false) => say!("init: no disk {} for {}", text(device), text(dir)),
            Err(e) => say!(
                "init: mounting {} at {} failed: errno {}",
                text(device),
                text(dir),
                e.0
            ),
        }
    }
    if image {
        run_function(Target::Image);
    } else if code {
        // A managed runtime's bootstrap, else the code's, else a runtime
        // layer's.
        match [
            function::RUNTIME_BOOTSTRAP,
            function::BOOTSTRAP,
            function::LAYER_BOOTSTRAP,
        ]
        .into_iter()
        .find(|path| sys::access(path, X_OK).is_ok())
        {
            Some(bootstrap) => run_function(Target::Bootstrap(bootstrap)),
            None => {
                let message = "no executable bootstrap in /var/task or /opt";
                say!("init: {message}");
                report("Runtime.InvalidEntrypoint", message);
            }
        }
    } else {
        say!("init: no code disk");
    }
    say!("init: restarting the machine");
    halt();
}

/// Reports a failure to the host's Runtime API, if there is a host.
fn report(error_type: &str, message: &str) {
    if let Err(e) = host::report_failure(error_type, message) {
        say!("init: cannot report {error_type} to the host: {e}");
    }
}

/// Runs the function's process with the host's variables, its lines to
/// the host's log stream (the console when there is no host), its
/// Runtime API relayed, until it ends; then says how it ended.
fn run_function(target: Target) {
    let (mut variables, log) = match host::read_environ() {
        Ok(variables) => {
            say!("init: {} variables from the host", variables.len());
            let log = host::connect(host::LOG_PORT)
                .map_err(|e| say!("init: no log stream: errno {}", e.0))
                .ok();
            (variables, log)
        }
        Err(host::EnvironFailure::Unreachable(e)) => {
            say!(
                "init: no host over vsock (errno {}): output goes to the console",
                e.0
            );
            (Vec::new(), None)
        }
        Err(host::EnvironFailure::Malformed(message)) => {
            say!("init: {message}");
            report("Runtime.InvalidEnvironment", &message);
            return;
        }
    };
    let listener = relay::listen_runtime_api()
        .map_err(|e| say!("init: cannot listen on 127.0.0.1:9001: errno {}", e.0))
        .ok();
    let program = match target {
        Target::Bootstrap(path) => function::Program::bootstrap(path),
        Target::Image => match image_program(&mut variables) {
            Ok(program) => program,
            Err(message) => {
                say!("init: {message}");
                return report("Runtime.InvalidEntrypoint", &message);
            }
        },
    };
    let oom_kills_before = oom_kills();
    let process = match function::spawn(&program, &variables) {
        Ok(p) => p,
        Err((what, e)) => return say!("init: {what} failed: errno {}", e.0),
    };
    let log = core::cell::Cell::new(log);
    relay::serve(
        process.output,
        listener,
        |line| {
            let sent = log.get().is_some_and(|fd| {
                sys::write_all(fd, line)
                    .and_then(|_| sys::write_all(fd, b"\n"))
                    .is_ok()
            });
            if !sent {
                log.set(None);
                say!(
                    "function: {}",
                    core::str::from_utf8(line).unwrap_or("(not UTF-8)")
                );
            }
        },
        || {
            say!("init: the host's vsock transport was reset (a restored snapshot): reconnecting");
            if let Err(e) = reseed_random() {
                say!("init: reseeding the random generator failed: errno {}", e.0);
            }
            if let Some(fd) = log.take() {
                let _ = sys::close(fd);
            }
            log.set(host::connect(host::LOG_PORT).ok());
        },
    );
    let log = log.take();
    let mut error_type = "Runtime.ExitError";
    let message = match function::reap(process.pid) {
        Ok(function::Ended::Exited(code)) => alloc::format!("bootstrap exited with status {code}"),
        // The guest runs nothing else: an OOM kill since the start was
        // the function's.
        Ok(function::Ended::Killed(SIGKILL)) if oom_kills() > oom_kills_before => {
            error_type = "Runtime.OutOfMemory";
            alloc::format!("bootstrap was killed by signal {SIGKILL}: out of memory")
        }
        Ok(function::Ended::Killed(signal)) => {
            alloc::format!("bootstrap was killed by signal {signal}")
        }
        Err((what, e)) => alloc::format!("{what} failed: errno {}", e.0),
    };
    say!("init: {message}");
    if let Some(fd) = log {
        let _ = sys::write_all(fd, alloc::format!("init: {message}\n").as_bytes());
        let _ = sys::close(fd);
    }
    if !variables.is_empty() {
        report(error_type, &message);
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
