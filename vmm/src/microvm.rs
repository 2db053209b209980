//! A built microVM and its run loop: one thread per vCPU, and the
//! event-manager loop on the calling thread for everything else.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::boot_timer::BootTime;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::vstate::vcpu::{kick_signal_handler, Vcpu, VcpuStop};
use crate::vstate::vm::{HypervisorKind, Vm};

/// vCPU threads run guest code and device emulation; neither needs deep
/// stacks.
const VCPU_STACK_SIZE: usize = 256 << 10;

/// How the guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest rebooted; for a microVM that means it is done.
    Reset(String),
    Shutdown(String),
    Fault(String),
}

impl VmOutcome {
    /// 0 for a guest that rebooted or shut down, 1 for an error.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::Reset(_) | VmOutcome::Shutdown(_) => 0,
            VmOutcome::Fault(_) => 1,
        }
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Reset(why) => write!(f, "guest reset ({why})"),
            VmOutcome::Shutdown(why) => write!(f, "guest shut down ({why})"),
            VmOutcome::Fault(why) => write!(f, "{why}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Watches for the end of the run: a vCPU that stopped, or an i8042 reset.
struct ExitWatcher {
    vcpu_stopped: EventFd,
    reset: EventFd,
    stops: Receiver<VcpuStop>,
    outcome: Option<VmOutcome>,
}

impl ExitWatcher {
    fn record(&mut self, outcome: VmOutcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.record(VmOutcome::Reset("i8042 reset".into()));
            return;
        }
        let _ = self.vcpu_stopped.read();
        while let Ok(stop) = self.stops.try_recv() {
            match stop {
                VcpuStop::Reset(why) => self.record(VmOutcome::Reset(why.into())),
                VcpuStop::Shutdown(why) => self.record(VmOutcome::Shutdown(why.into())),
                VcpuStop::Fault(why) => self.record(VmOutcome::Fault(why)),
                VcpuStop::Kicked => {}
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.vcpu_stopped, &self.reset] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch for the end of the run: {e:?}");
            }
        }
    }
}

/// Feeds host stdin to the guest's serial console.
struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // End of input, or an error: stop watching stdin.
            let _ = ops.remove(events);
            return;
        }
        if let Err(e) = lock(&self.serial).enqueue_input(&buf[..n]) {
            tracing::warn!("serial input dropped: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A regular file cannot be polled; console input is then off.
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            tracing::debug!("console input off: {e:?}");
        }
    }
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct MicroVm {
    // Field order is drop order: vCPUs before the VM, the VM before the
    // memory it maps.
    vcpus: Vec<Vcpu>,
    vm: Vm,
    _mem: GuestMemoryMmap,
    event_manager: EventManager<Subscriber>,
    exit_watcher: Arc<Mutex<ExitWatcher>>,
    vcpu_stopped: EventFd,
    stops: Sender<VcpuStop>,
    boot_time: BootTime,
}

impl MicroVm {
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vec<Vcpu>,
        reset: EventFd,
        console: Option<Arc<Mutex<SerialDevice>>>,
        devices: Vec<Subscriber>,
        boot_time: BootTime,
    ) -> std::io::Result<Self> {
        let mut event_manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let vcpu_stopped = EventFd::new(libc::EFD_NONBLOCK)?;
        let (stops, stops_rx) = channel();
        let exit_watcher = Arc::new(Mutex::new(ExitWatcher {
            vcpu_stopped: vcpu_stopped.try_clone()?,
            reset,
            stops: stops_rx,
            outcome: None,
        }));
        event_manager.add_subscriber(exit_watcher.clone());
        for device in devices {
            event_manager.add_subscriber(device);
        }
        if let Some(serial) = console {
            event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput { serial })));
        }
        Ok(Self {
            vcpus,
            vm,
            _mem: mem,
            event_manager,
            exit_watcher,
            vcpu_stopped,
            stops,
            boot_time,
        })
    }

    pub fn hypervisor(&self) -> HypervisorKind {
        self.vm.hypervisor()
    }

    pub fn boot_time(&self) -> BootTime {
        self.boot_time.clone()
    }

    /// Runs the guest to its end and returns how it ended. With `seccomp`,
    /// each thread runs under its filter from its first guest exit on.
    pub fn run(mut self, seccomp: bool) -> Result<VmOutcome, RunError> {
        register_signal_handler(SIGRTMIN(), kick_signal_handler).map_err(RunError::Signal)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let thread_stop = stop.clone();
            let stops = self.stops.clone();
            let stopped = self.vcpu_stopped.try_clone().map_err(RunError::Spawn)?;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(VCPU_STACK_SIZE)
                .spawn(move || {
                    let why = match seccomp.then(|| seccomp::install(ThreadKind::Vcpu)) {
                        Some(Err(e)) => VcpuStop::Fault(e.to_string()),
                        _ => vcpu.run(&thread_stop),
                    };
                    let _ = stops.send(why);
                    let _ = stopped.write(1);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    stop_vcpus(&stop, threads);
                    return Err(RunError::Spawn(e));
                }
            }
        }

        if seccomp {
            if let Err(e) = seccomp::install(ThreadKind::Vmm) {
                stop_vcpus(&stop, threads);
                return Err(e.into());
            }
        }
        let outcome = loop {
            if let Err(e) = self.event_manager.run() {
                stop_vcpus(&stop, threads);
                return Err(RunError::EventLoop(format!("{e:?}")));
            }
            if let Some(outcome) = lock(&self.exit_watcher).outcome.take() {
                break outcome;
            }
        };
        stop_vcpus(&stop, threads);
        Ok(outcome)
    }
}

/// Asks every vCPU thread to stop, kicks it out of `KVM_RUN`, and waits.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for thread in threads {
        if !thread.is_finished() {
            if let Err(e) = thread.kill(SIGRTMIN()) {
                tracing::warn!("cannot kick a vCPU thread: {e}");
            }
        }
        let _ = thread.join();
    }
}
