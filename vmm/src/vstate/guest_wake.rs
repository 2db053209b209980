//! How a guest with nothing to do gives its CPU back until a device has
//! something for it.
//!
//! A guest at CPL 0 can HLT with interrupts on. The bare-metal guest in
//! PVM user mode has neither HLT nor an interrupt entry, and one that
//! polls its rings keeps a host CPU busy for as long as it waits: a warm
//! environment waiting for `/next` would burn a core, and a device's event
//! loop woken on that CPU would wait for the poller's time slice to end.
//! So such a guest writes the longest it will wait, in microseconds, to
//! [`GUEST_IDLE_PORT`](crate::arch::x86_64::layout::GUEST_IDLE_PORT); its
//! vCPU thread then sleeps until a virtio device raises an interrupt, the
//! VMM kicks the thread, or the time is up. A device that raised one since
//! the guest last slept ends the sleep at once, so the guest, which looks
//! at its rings before it sleeps, cannot miss an answer.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Raised with every virtio interrupt; waited on by idle vCPUs.
#[derive(Clone)]
pub struct GuestWake(Arc<EventFd>);

impl GuestWake {
    pub fn new() -> std::io::Result<Self> {
        EventFd::new(libc::EFD_NONBLOCK).map(|fd| Self(Arc::new(fd)))
    }

    pub fn notify(&self) {
        // Only a counter at its maximum refuses a write, and then a wake
        // is pending anyway.
        let _ = self.0.write(1);
    }

    /// Sleeps until [`notify`](Self::notify) has been called since the
    /// last wait, `timeout` is over, or `signal` arrives. `signal` is
    /// blocked while `cancelled` is read, and unblocked only inside the
    /// sleep, so a kick just before the sleep still ends it.
    pub fn wait(&self, timeout: Duration, signal: libc::c_int, cancelled: impl FnOnce() -> bool) {
        // SAFETY: sigset_t is plain data that sigemptyset initializes.
        let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid sigset pointers; `signal` comes from the caller's
        // own handler registration.
        unsafe {
            libc::sigemptyset(&mut blocked);
            libc::sigaddset(&mut blocked, signal);
            libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut previous);
        }
        if !cancelled() {
            let mut pollfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
            };
            // SAFETY: one valid pollfd, a valid timeout, and the mask this
            // thread had before, under which `signal` is deliverable.
            let ready = unsafe { libc::ppoll(&mut pollfd, 1, &timeout, &previous) };
            if ready > 0 {
                // Consumes the wake; another idle vCPU may have done so.
                let _ = self.0.read();
            }
        }
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const UNUSED_SIGNAL: libc::c_int = libc::SIGURG;

    #[test]
    fn a_wake_before_the_wait_ends_it_at_once_and_is_consumed() {
        let wake = GuestWake::new().unwrap();
        wake.notify();
        let started = Instant::now();
        wake.wait(Duration::from_secs(10), UNUSED_SIGNAL, || false);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Consumed: the next wait runs to its timeout.
        let started = Instant::now();
        wake.wait(Duration::from_millis(30), UNUSED_SIGNAL, || false);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        let wake = GuestWake::new().unwrap();
        let waker = wake.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.notify();
        });
        let started = Instant::now();
        wake.wait(Duration::from_secs(10), UNUSED_SIGNAL, || false);
        assert!(started.elapsed() < Duration::from_secs(5));
        thread.join().unwrap();
    }

    #[test]
    fn a_cancelled_wait_does_not_sleep() {
        let wake = GuestWake::new().unwrap();
        let started = Instant::now();
        wake.wait(Duration::from_secs(10), UNUSED_SIGNAL, || true);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
