//! The VM's destruction after the VMM's exit.
//!
//! KVM frees a VM at the last close of its descriptor, and `kvm_destroy_vm`
//! first waits (`srcu_barrier`) for the SRCU callbacks the VM queued: each
//! ioeventfd and coalesced MMIO zone registered queues one on Linux 6.18
//! (`kvm_io_bus_register_dev`). A normal SRCU grace period advances on
//! timer ticks, and its delays grow with its age, so a VM that lived less
//! than a few ticks (a few ms since its devices were registered) waits
//! out the rest at its close: 8-15 ms at this host's HZ=250, most of
//! `boot_bench`'s spawn -> exit. A helper process made at the end, sharing
//! the VMM's memory and holding only the VM's descriptor, takes the last
//! references: the VMM exits, and its parent learns how the guest ended,
//! without that wait; the helper frees the VM and the guest memory when it
//! sees the VMM gone.
//!
//! Not for the first process of a PID namespace (a jailed VMM): the kernel
//! ends every other process of the namespace, and waits for them, before
//! that one's exit is reported, so a helper there would gain nothing.

use std::io;
use std::os::fd::RawFd;

/// The helper's stack: it makes four system calls.
const HELPER_STACK: usize = 16 * 1024;

/// Leaves the last close of the VM behind `vm_fd` to a helper that ends
/// after this process. Call it last: every descriptor the process holds
/// stays open until its exit (the helper closes its copies at once).
pub fn after_process_exit(vm_fd: RawFd) -> io::Result<()> {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        return Ok(());
    }
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: a two-element array for the pipe's ends. Neither end is
    // closed here: the write end closes with this process, which is what
    // the helper waits for.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh private mapping, never unmapped: it goes with the
    // address space the helper shares, after both have ended.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HELPER_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // The descriptors travel in the argument's value, not in memory this
    // process may reuse before the helper reads it.
    let kept = (vm_fd as usize) << 32 | pipe[0] as usize;
    // SAFETY: CLONE_VM without a signal: the helper shares this address
    // space on its own stack and runs only `hold_until_exit`, which
    // touches no memory but its stack. The stack grows down from its end.
    let pid = unsafe {
        libc::clone(
            hold_until_exit,
            stack.cast::<u8>().add(HELPER_STACK).cast(),
            libc::CLONE_VM,
            kept as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::debug!("process {pid} frees the VM after this one's exit");
    Ok(())
}

/// The helper: closes every descriptor but the VM's and the pipe's read
/// end, waits for the pipe's end-of-file (the VMM's exit closed its write
/// end), and returns, which ends it; its exit is the VM's last close and
/// the address space's last user. Raw system calls only, which set no
/// errno on success: errno lives in the VMM's thread-local storage.
extern "C" fn hold_until_exit(kept: *mut libc::c_void) -> libc::c_int {
    let kept = kept as usize;
    let vm = (kept >> 32) as libc::c_uint;
    let read_end = kept as u32;
    let (low, high) = (vm.min(read_end), vm.max(read_end));
    let close = |first: libc::c_uint, last: libc::c_uint| {
        if first <= last {
            // SAFETY: closes this process's copies of descriptors the VMM
            // no longer needs here; the VMM's own stay open.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        }
    };
    if low > 0 {
        close(0, low - 1);
    }
    if high > low + 1 {
        close(low + 1, high - 1);
    }
    close(high + 1, libc::c_uint::MAX);
    let mut byte = 0u8;
    // SAFETY: reads into a byte on the helper's stack. Only a signal sent
    // to the helper could end the wait early; the VMM's exit would then
    // free the VM, as without a helper.
    unsafe { libc::syscall(libc::SYS_read, read_end, &mut byte as *mut u8, 1) };
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> [RawFd; 2] {
        let mut fds = [0; 2];
        // SAFETY: a two-element array for the pipe's ends.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        fds
    }

    /// Whether the pipe's write ends are all closed, waiting up to
    /// `timeout_ms`.
    fn hung_up(read_end: RawFd, timeout_ms: libc::c_int) -> bool {
        let mut poll = libc::pollfd {
            fd: read_end,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, on the stack.
        unsafe { libc::poll(&mut poll, 1, timeout_ms) };
        poll.revents & libc::POLLHUP != 0
    }

    /// The helper keeps the "VM" (a pipe's write end here) open while the
    /// process lives, though the process closed its own, lets it go once
    /// the process has ended, and holds none of the process's other
    /// descriptors.
    #[test]
    fn the_helper_holds_only_the_vm_and_only_until_the_process_ends() {
        let vm = pipe();
        let ready = pipe();
        let go = pipe();
        // SAFETY: the child makes system calls and exits; it takes no lock
        // another thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the child's own copies; it ends with _exit.
            unsafe {
                libc::close(vm[0]);
                libc::close(ready[0]);
                libc::close(go[1]);
                let code = match after_process_exit(vm[1]) {
                    Ok(()) => 0,
                    Err(_) => 3,
                };
                libc::close(vm[1]);
                libc::write(ready[1], b"r".as_ptr().cast(), 1);
                let mut byte = 0u8;
                libc::read(go[0], (&mut byte as *mut u8).cast(), 1);
                libc::_exit(code);
            }
        }
        // SAFETY: the test's copies of the child's ends.
        unsafe {
            libc::close(vm[1]);
            libc::close(ready[1]);
            libc::close(go[0]);
        }
        let mut byte = 0u8;
        // SAFETY: reads a byte into the stack.
        assert_eq!(
            unsafe { libc::read(ready[0], (&mut byte as *mut u8).cast(), 1) },
            1
        );
        assert!(!hung_up(vm[0], 0), "the VM was closed before the exit");
        // SAFETY: closes the test's write end: the child's read returns.
        unsafe { libc::close(go[1]) };
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 0)
        );
        assert!(
            hung_up(ready[0], 5_000),
            "the helper kept another descriptor"
        );
        assert!(
            hung_up(vm[0], 5_000),
            "the helper did not end after the process"
        );
        // SAFETY: the test's read ends.
        unsafe {
            libc::close(vm[0]);
            libc::close(ready[0]);
        }
    }
}
