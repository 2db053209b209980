//! vCPU threads, started before their vCPUs exist.
//!
//! On a nested (PVM) host, starting a thread costs about 0.1 ms, installing
//! its seccomp filter as much again, and joining a helper thread up to
//! 0.2 ms: all on the path to the guest's first instruction. So the VMM
//! starts vCPU 0's thread first, before it parses its command line, and
//! the builder gives it the build's second line of work as a prelude:
//! loading the kernel image, or for a restore, checking the snapshot's
//! CPUID against KVM's. The thread sends the prelude's
//! result back, installs its filter while the main thread finishes the VM,
//! and then waits for its vCPU. During the prelude it keeps off the main
//! thread's CPU (see `placement`).

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, ThreadKind};
use crate::vstate::placement::{self, AwayFrom};
use crate::vstate::vcpu::{Vcpu, VcpuControl, VcpuStop};

/// vCPU threads run guest code and device emulation; neither needs deep
/// stacks.
const VCPU_STACK_SIZE: usize = 256 << 10;

/// What a vCPU thread needs to run its vCPU, and to say how it stopped.
pub struct VcpuStart {
    pub vcpu: Vcpu,
    pub stop: Arc<AtomicBool>,
    pub control: VcpuControl,
    pub stops: Sender<VcpuStop>,
    /// Written once the stop is sent, to wake the event loop.
    pub stopped: EventFd,
    /// For a restored VM: when the VMM started, to log how long the
    /// restore took until the vCPUs run.
    pub restored_since: Option<Instant>,
}

/// How long a wait on the build's path spins before it sleeps: about what
/// the other side has left to do.
const SPIN: Duration = Duration::from_millis(1);

/// Receives from `rx`, spinning first: waking a sleeping thread on another
/// CPU takes 50-90 us on a nested (PVM) host, as long as the work it waits
/// for. The spin yields, so on a busy host other threads still run.
pub fn recv_soon<T>(rx: &Receiver<T>) -> Result<T, RecvError> {
    let deadline = Instant::now() + SPIN;
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(value) => return Ok(value),
            Err(TryRecvError::Disconnected) => return Err(RecvError),
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.recv()
}

/// A vCPU's thread, waiting for its vCPU.
pub struct VcpuThread {
    start: Sender<VcpuStart>,
    thread: JoinHandle<()>,
}

/// The work a vCPU thread does before its vCPU, and whether it then runs
/// under its seccomp filter.
struct Prelude {
    seccomp: bool,
    work: Box<dyn FnOnce() + Send>,
}

/// A vCPU thread started before the VMM knows its work: the VMM starts
/// vCPU 0's first thing, so that the thread's start (about 0.15 ms on a
/// nested host, most of it waking the other CPU) overlaps the parsing of
/// the command line. It spins a while for its prelude, as for its vCPU.
pub struct EarlyVcpuThread {
    prelude: Sender<Prelude>,
    start: Sender<VcpuStart>,
    thread: JoinHandle<()>,
}

impl EarlyVcpuThread {
    /// Gives the thread its prelude: it runs `prelude` off the spawning
    /// thread's CPU if it can and sends the result to the returned
    /// receiver; then, with `seccomp`, it installs the vCPU filter; then it
    /// waits for [`VcpuThread::start`]. A thread that ended already leaves
    /// the receiver disconnected.
    pub fn begin<T, F>(self, seccomp: bool, prelude: F) -> (VcpuThread, Receiver<T>)
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (result, result_rx) = sync_channel(1);
        let work = Box::new(move || {
            let _ = result.send(prelude());
        });
        let _ = self.prelude.send(Prelude { seccomp, work });
        let thread = VcpuThread {
            start: self.start,
            thread: self.thread,
        };
        (thread, result_rx)
    }
}

impl VcpuThread {
    /// Starts vCPU `index`'s thread, which waits for its prelude; see
    /// [`EarlyVcpuThread`]. Dropped, the thread ends.
    pub fn spawn_early(index: usize) -> std::io::Result<EarlyVcpuThread> {
        Self::spawn_away_from(placement::current_cpu(), index)
    }

    /// Starts a thread with nothing to do before its vCPU.
    pub fn spawn_idle(index: usize, seccomp: bool) -> std::io::Result<Self> {
        Ok(Self::spawn_away_from(None, index)?.begin(seccomp, || ()).0)
    }

    fn spawn_away_from(
        spawner_cpu: Option<usize>,
        index: usize,
    ) -> std::io::Result<EarlyVcpuThread> {
        let (prelude, prelude_rx) = channel::<Prelude>();
        let (start, start_rx) = channel::<VcpuStart>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || {
                let away = spawner_cpu.and_then(AwayFrom::cpu);
                let Ok(prelude) = recv_soon(&prelude_rx) else {
                    return;
                };
                (prelude.work)();
                drop(away);
                let filtered = match prelude.seccomp {
                    true => seccomp::install(ThreadKind::Vcpu),
                    false => Ok(()),
                };
                let Ok(start) = recv_soon(&start_rx) else {
                    return;
                };
                let why = match filtered {
                    Err(e) => VcpuStop::Fault(e.to_string()),
                    Ok(()) => {
                        // Measured here, just before the first KVM_RUN:
                        // what a restore costs until the guest runs again.
                        if let Some(since) = start.restored_since {
                            tracing::info!(
                                "restored: vCPUs resume {} us after VMM start",
                                since.elapsed().as_micros()
                            );
                        }
                        start.vcpu.run(&start.stop, &start.control)
                    }
                };
                let _ = start.stops.send(why);
                let _ = start.stopped.write(1);
            })?;
        Ok(EarlyVcpuThread {
            prelude,
            start,
            thread,
        })
    }

    /// Hands the thread its vCPU, which it runs until the vCPU stops.
    pub fn start(self, start: VcpuStart) -> std::io::Result<JoinHandle<()>> {
        match self.start.send(start) {
            Ok(()) => Ok(self.thread),
            Err(_) => Err(std::io::Error::other(
                "the vCPU thread ended before its vCPU started",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_result_comes_back_and_an_unstarted_thread_ends() {
        let (thread, result) = VcpuThread::spawn_early(0).unwrap().begin(false, || 6 * 7);
        assert_eq!(recv_soon(&result), Ok(42));
        let VcpuThread { start, thread } = thread;
        drop(start);
        thread
            .join()
            .expect("the thread ends once its vCPU can never come");
    }

    #[test]
    fn recv_soon_waits_past_its_spin_and_reports_a_closed_channel() {
        let (tx, rx) = channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(SPIN * 3);
            tx.send(1u8).unwrap();
        });
        assert_eq!(recv_soon(&rx), Ok(1), "a late message still arrives");
        sender.join().unwrap();
        assert_eq!(recv_soon(&rx), Err(RecvError), "all senders are gone");
    }
}
