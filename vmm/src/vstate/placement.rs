//! Keeping a helper thread off its spawner's CPU while both work.
//!
//! The builder runs two lines of work at once: vCPU 0's thread loads the
//! kernel while the main thread builds the VM. Linux sometimes starts the
//! new thread on the spawner's CPU with another CPU idle (a quarter of the
//! boots on a 2-CPU PVM host). The load is CPU-bound, so when the main
//! thread next blocks (KVM's memslot registration waits for an SRCU grace
//! period, and the per-CPU worker that ends it wakes the main thread onto
//! the same CPU), it waits behind the load: those boots reached the guest
//! 0.7-1.1 ms later. A thread that finds itself there moves away for the
//! length of its work, then takes back the CPUs it was given.

use std::mem::{size_of, zeroed};

/// The CPU the calling thread runs on, if the kernel says.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments; glibc reads it from rseq or the vDSO.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// The calling thread, moved off a CPU until this is dropped.
pub struct AwayFrom {
    allowed: libc::cpu_set_t,
}

impl AwayFrom {
    /// Moves the calling thread off `cpu` if it runs there and may run on
    /// another CPU; `None` when there is nothing to do or the kernel
    /// refuses (placement is a hint: the work goes on either way).
    pub fn cpu(cpu: usize) -> Option<Self> {
        if current_cpu()? != cpu {
            return None;
        }
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is empty.
        let mut allowed: libc::cpu_set_t = unsafe { zeroed() };
        // SAFETY: a valid cpu_set_t of the size passed, for this thread.
        if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) } != 0 {
            return None;
        }
        // SAFETY: `allowed` is a valid set; the macros check `cpu` against
        // its size.
        if unsafe { !libc::CPU_ISSET(cpu, &allowed) || libc::CPU_COUNT(&allowed) < 2 } {
            return None;
        }
        let mut elsewhere = allowed;
        // SAFETY: as above.
        unsafe { libc::CPU_CLR(cpu, &mut elsewhere) };
        // SAFETY: as for sched_getaffinity.
        let moved =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &elsewhere) } == 0;
        moved.then_some(Self { allowed })
    }
}

impl Drop for AwayFrom {
    fn drop(&mut self) {
        // SAFETY: a valid cpu_set_t of the size passed, for this thread.
        // Should the kernel refuse, the thread stays on the other CPUs it
        // was allowed, which is still correct.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.allowed) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_cpus() -> Vec<usize> {
        // SAFETY: as in AwayFrom::cpu.
        let mut set: libc::cpu_set_t = unsafe { zeroed() };
        // SAFETY: as in AwayFrom::cpu.
        assert_eq!(
            unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) },
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: a valid set, and `c` within its size.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }

    #[test]
    fn a_thread_on_the_cpu_moves_off_it_and_gets_its_cpus_back() {
        std::thread::spawn(|| {
            let before = allowed_cpus();
            if before.len() < 2 {
                let here = current_cpu().expect("sched_getcpu works");
                assert!(AwayFrom::cpu(here).is_none(), "one CPU: nowhere to go");
                println!("SKIPPED: the move needs two CPUs; this test process has one");
                return;
            }
            // The scheduler may move the thread between the two readings
            // of its CPU; it does not do so a hundred times running.
            let (here, away) = (0..100)
                .find_map(|_| {
                    let here = current_cpu().expect("sched_getcpu works");
                    AwayFrom::cpu(here).map(|away| (here, away))
                })
                .unwrap_or_else(|| panic!("a thread on one of {before:?} moves off it"));
            // Affinity takes effect before sched_setaffinity returns.
            assert_ne!(current_cpu(), Some(here));
            assert!(!allowed_cpus().contains(&here));
            drop(away);
            assert_eq!(allowed_cpus(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_elsewhere_stays_where_it_is() {
        std::thread::spawn(|| {
            let before = allowed_cpus();
            // No machine this runs on has the last CPU a set can name.
            assert!(AwayFrom::cpu(libc::CPU_SETSIZE as usize - 1).is_none());
            assert_eq!(allowed_cpus(), before);
        })
        .join()
        .unwrap();
    }
}
