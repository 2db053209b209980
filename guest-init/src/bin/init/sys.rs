//! The Linux system calls PID 1 makes, raw: no libc. Each returns the
//! kernel's result, a negative errno on failure, as [`Errno`].

use core::arch::asm;
use core::ffi::CStr;

pub const AF_INET: i32 = 2;
pub const AF_VSOCK: i32 = 40;
pub const SOCK_STREAM: i32 = 1;
pub const SOCK_DGRAM: i32 = 2;

/// A failed system call: the kernel's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type Result<T> = core::result::Result<T, Errno>;

// x86_64 system call numbers.
const READ: usize = 0;
const WRITE: usize = 1;
const OPEN: usize = 2;
const CLOSE: usize = 3;
const ACCESS: usize = 21;
const IOCTL: usize = 16;
const SOCKET: usize = 41;
const CONNECT: usize = 42;
const BIND: usize = 49;
const LISTEN: usize = 50;
const SETSOCKOPT: usize = 54;
const POLL: usize = 7;
const ACCEPT4: usize = 288;
const FORK: usize = 57;
const EXECVE: usize = 59;
const WAIT4: usize = 61;
const CHDIR: usize = 80;
const CHROOT: usize = 161;
const PIPE2: usize = 293;
const DUP2: usize = 33;
const EXIT_GROUP: usize = 231;
const MKDIR: usize = 83;
const SYMLINK: usize = 88;
const MOUNT: usize = 165;
const REBOOT: usize = 169;
const IOPERM: usize = 173;

/// # Safety
/// The arguments must be what system call `n` expects: pointers valid for
/// the lengths it reads or writes.
unsafe fn syscall(n: usize, a: [usize; 5]) -> isize {
    let ret: isize;
    // SAFETY: the caller upholds the system call's contract; the kernel
    // clobbers only rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

fn check(ret: isize) -> Result<usize> {
    if ret < 0 {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the buffer is valid for its length.
    check(unsafe {
        syscall(
            READ,
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0],
        )
    })
}

pub fn write(fd: i32, buf: &[u8]) -> Result<usize> {
    // SAFETY: the buffer is valid for its length.
    check(unsafe { syscall(WRITE, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0]) })
}

/// Writes all of `buf`, however many writes it takes.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(Errno(5)), // EIO
            Ok(n) => buf = &buf[n..],
            Err(Errno(4)) => {} // EINTR
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn open(path: &CStr, flags: i32) -> Result<i32> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { syscall(OPEN, [path.as_ptr() as usize, flags as usize, 0, 0, 0]) })
        .map(|fd| fd as i32)
}

/// Whether `path` may be used as `mode` asks (`X_OK` = 1: executed).
pub fn access(path: &CStr, mode: i32) -> Result<()> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { syscall(ACCESS, [path.as_ptr() as usize, mode as usize, 0, 0, 0]) }).map(drop)
}

pub fn close(fd: i32) -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { syscall(CLOSE, [fd as usize, 0, 0, 0, 0]) }).map(drop)
}

pub fn dup2(old: i32, new: i32) -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { syscall(DUP2, [old as usize, new as usize, 0, 0, 0]) }).map(drop)
}

pub fn mkdir(path: &CStr, mode: u32) -> Result<()> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { syscall(MKDIR, [path.as_ptr() as usize, mode as usize, 0, 0, 0]) }).map(drop)
}

/// Makes `link` a symbolic link to `target`.
pub fn symlink(target: &CStr, link: &CStr) -> Result<()> {
    // SAFETY: NUL-terminated paths.
    check(unsafe {
        syscall(
            SYMLINK,
            [target.as_ptr() as usize, link.as_ptr() as usize, 0, 0, 0],
        )
    })
    .map(drop)
}

pub fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: usize, data: &CStr) -> Result<()> {
    // SAFETY: NUL-terminated strings.
    check(unsafe {
        syscall(
            MOUNT,
            [
                source.as_ptr() as usize,
                target.as_ptr() as usize,
                fstype.as_ptr() as usize,
                flags,
                data.as_ptr() as usize,
            ],
        )
    })
    .map(drop)
}

/// A pipe: (read end, write end), closed on exec.
pub fn pipe() -> Result<(i32, i32)> {
    const O_CLOEXEC: usize = 0o2000000;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    check(unsafe { syscall(PIPE2, [fds.as_mut_ptr() as usize, O_CLOEXEC, 0, 0, 0]) })?;
    Ok((fds[0], fds[1]))
}

/// Ok(0) in the child, Ok(pid) in the parent.
pub fn fork() -> Result<i32> {
    // SAFETY: no pointers; this process is single-threaded.
    check(unsafe { syscall(FORK, [0; 5]) }).map(|pid| pid as i32)
}

pub fn chdir(path: &CStr) -> Result<()> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { syscall(CHDIR, [path.as_ptr() as usize, 0, 0, 0, 0]) }).map(drop)
}

pub fn chroot(path: &CStr) -> Result<()> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { syscall(CHROOT, [path.as_ptr() as usize, 0, 0, 0, 0]) }).map(drop)
}

/// Runs `path` with `argv` and `envp`, NUL-terminated strings in
/// null-terminated arrays; returns only on failure.
pub fn execve(path: &CStr, argv: &[*const u8], envp: &[*const u8]) -> Errno {
    if argv.last() != Some(&core::ptr::null()) || envp.last() != Some(&core::ptr::null()) {
        return Errno(22); // EINVAL
    }
    // SAFETY: the arrays end with a null pointer and point at C strings
    // the caller keeps alive.
    let ret = unsafe {
        syscall(
            EXECVE,
            [
                path.as_ptr() as usize,
                argv.as_ptr() as usize,
                envp.as_ptr() as usize,
                0,
                0,
            ],
        )
    };
    Errno(-ret as i32)
}

/// Waits for a child (`pid` -1: any); returns its pid and wait status.
pub fn wait(pid: i32) -> Result<(i32, i32)> {
    let mut status = 0i32;
    // SAFETY: wait4 writes the status into `status`; no rusage.
    let pid = check(unsafe {
        syscall(
            WAIT4,
            [pid as usize, &mut status as *mut i32 as usize, 0, 0, 0],
        )
    })?;
    Ok((pid as i32, status))
}

/// A socket, closed on exec.
pub fn socket(domain: i32, kind: i32, protocol: i32) -> Result<i32> {
    const SOCK_CLOEXEC: i32 = 0o2000000;
    let kind = kind | SOCK_CLOEXEC;
    // SAFETY: no pointers.
    check(unsafe {
        syscall(
            SOCKET,
            [domain as usize, kind as usize, protocol as usize, 0, 0],
        )
    })
    .map(|fd| fd as i32)
}

/// # Safety
/// `addr` must point to a socket address of `len` bytes.
pub unsafe fn connect(fd: i32, addr: *const u8, len: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    check(unsafe { syscall(CONNECT, [fd as usize, addr as usize, len, 0, 0]) }).map(drop)
}

/// # Safety
/// `addr` must point to a socket address of `len` bytes.
pub unsafe fn bind(fd: i32, addr: *const u8, len: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    check(unsafe { syscall(BIND, [fd as usize, addr as usize, len, 0, 0]) }).map(drop)
}

pub fn listen(fd: i32, backlog: i32) -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { syscall(LISTEN, [fd as usize, backlog as usize, 0, 0, 0]) }).map(drop)
}

/// A connection from `fd`'s queue, closed on exec.
pub fn accept(fd: i32) -> Result<i32> {
    const SOCK_CLOEXEC: usize = 0o2000000;
    // SAFETY: no address is asked for.
    check(unsafe { syscall(ACCEPT4, [fd as usize, 0, 0, SOCK_CLOEXEC, 0]) }).map(|fd| fd as i32)
}

pub fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    check(unsafe {
        syscall(
            SETSOCKOPT,
            [
                fd as usize,
                level as usize,
                name as usize,
                &value as *const i32 as usize,
                4,
            ],
        )
    })
    .map(drop)
}

/// `struct pollfd`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PollFd {
    pub fd: i32,
    pub events: i16,
    pub revents: i16,
}

pub const POLLIN: i16 = 1;
pub const POLLERR: i16 = 8;
pub const POLLHUP: i16 = 16;

/// Waits until one of `fds` is ready; -1 waits for ever.
pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> Result<usize> {
    // SAFETY: poll reads and writes the array, `fds.len()` entries.
    check(unsafe {
        syscall(
            POLL,
            [
                fds.as_mut_ptr() as usize,
                fds.len(),
                timeout_ms as usize,
                0,
                0,
            ],
        )
    })
}

/// # Safety
/// `arg` must point to what `request` reads and writes.
pub unsafe fn ioctl(fd: i32, request: usize, arg: *mut u8) -> Result<usize> {
    // SAFETY: the caller's contract.
    check(unsafe { syscall(IOCTL, [fd as usize, request, arg as usize, 0, 0]) })
}

pub fn ioperm(from: u16, count: u16, on: bool) -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { syscall(IOPERM, [from as usize, count as usize, on as usize, 0, 0]) }).map(drop)
}

/// Writes `value` to I/O port `port`, which [`ioperm`] opened.
pub fn outb(port: u16, value: u8) {
    // SAFETY: an I/O port write the kernel allowed this process; it does
    // not touch memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem)) };
}

const REBOOT_MAGIC1: usize = 0xfee1_dead;
const REBOOT_MAGIC2: usize = 0x2812_1969;
const REBOOT_RESTART: usize = 0x0123_4567;

/// Restarts the machine: the VMM (and QEMU with `-no-reboot`) takes that
/// as the guest's end.
pub fn reboot() -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { syscall(REBOOT, [REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_RESTART, 0, 0]) })
        .map(drop)
}

pub fn exit(code: i32) -> ! {
    // SAFETY: no pointers; it does not return.
    unsafe { syscall(EXIT_GROUP, [code as usize, 0, 0, 0, 0]) };
    loop {
        core::hint::spin_loop();
    }
}
