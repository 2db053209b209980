//! A built microVM and its run loop: one thread per vCPU, and the
//! event-manager loop on the calling thread for everything else.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use vmm_sys_util::timerfd::TimerFd;

use crate::control::{self, ControlRequest, ControlSocket, SnapshotReport};
use crate::devices::boot_timer::BootTime;
use crate::devices::bus::lock;
use crate::devices::guest_signals::GuestSignals;
use crate::devices::ioapic::Ioapic;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::watch::{self, watch};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::snapshot::{self, MachineState, MicroVmState};
use crate::vstate::memory::{dump_guest_memory, MemoryBacking};
use crate::vstate::vcpu::{
    kick_signal_handler, Vcpu, VcpuCommand, VcpuControl, VcpuReply, VcpuState, VcpuStop,
};
use crate::vstate::vcpu_thread::{VcpuStart, VcpuThread};
use crate::vstate::vm::{HypervisorKind, KvmMsiRouter, Vm};

/// A vCPU thread answers a pause within microseconds; one that does not
/// within this long is stuck.
const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// How the guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest rebooted; for a microVM that means it is done.
    Reset(String),
    Shutdown(String),
    /// The guest kernel panicked (it said so through pvpanic).
    Panic,
    Fault(String),
}

impl VmOutcome {
    /// 0 for a guest that rebooted or shut down, 1 for an error, 2 for a
    /// guest kernel panic.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::Reset(_) | VmOutcome::Shutdown(_) => 0,
            VmOutcome::Fault(_) => 1,
            VmOutcome::Panic => 2,
        }
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Reset(why) => write!(f, "guest reset ({why})"),
            VmOutcome::Shutdown(why) => write!(f, "guest shut down ({why})"),
            VmOutcome::Panic => write!(f, "the guest kernel panicked (pvpanic)"),
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
    #[error("{0}")]
    Watch(String),
}

/// Watches for the end of the run: a vCPU that stopped, or a guest
/// signal (reset, power-off, panic).
struct ExitWatcher {
    vcpu_stopped: EventFd,
    signals: GuestSignals,
    stops: Receiver<VcpuStop>,
    /// Armed by a panic: the run ends when it fires, or sooner when the
    /// guest restarts (a kernel with `panic=N`).
    panic_grace: TimerFd,
    panicked: bool,
    outcome: Option<VmOutcome>,
}

/// How long a panicking guest gets, after telling the VMM, to finish
/// printing: Linux notifies pvpanic before it flushes the console when
/// another CPU held the console lock.
const PANIC_GRACE: Duration = Duration::from_millis(500);

/// How long the host's readers get, once the guest ended, to take what
/// the guest had sent them.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

impl ExitWatcher {
    fn record(&mut self, outcome: VmOutcome) {
        let outcome = match outcome {
            VmOutcome::Reset(_) | VmOutcome::Shutdown(_) if self.panicked => VmOutcome::Panic,
            other => other,
        };
        self.outcome.get_or_insert(outcome);
    }

    fn panic(&mut self, ops: &mut EventOps) {
        if self.panicked {
            return;
        }
        self.panicked = true;
        let armed = self
            .panic_grace
            .reset(PANIC_GRACE, None)
            .map_err(|e| format!("{e}"))
            .and_then(|_| {
                ops.add(Events::new(&self.panic_grace, EventSet::IN))
                    .map_err(|e| format!("{e:?}"))
            });
        if let Err(e) = armed {
            tracing::warn!("the guest panicked; ending the run now (no grace timer: {e})");
            self.record(VmOutcome::Panic);
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.reset.as_raw_fd() {
            let _ = self.signals.reset.read();
            self.record(VmOutcome::Reset("i8042 reset".into()));
        } else if fd == self.signals.power_off.as_raw_fd() {
            let _ = self.signals.power_off.read();
            self.record(VmOutcome::Shutdown("ACPI power-off".into()));
        } else if fd == self.signals.panic.as_raw_fd() {
            let _ = self.signals.panic.read();
            self.panic(ops);
        } else if fd == self.panic_grace.as_raw_fd() {
            let _ = self.panic_grace.wait();
            self.record(VmOutcome::Panic);
        } else {
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
    }

    fn init(&mut self, ops: &mut EventOps) {
        let signals = &self.signals;
        for fd in [
            &self.vcpu_stopped,
            &signals.reset,
            &signals.power_off,
            &signals.panic,
        ] {
            watch(ops, Events::new(fd, EventSet::IN), "for the end of the run");
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

/// The devices whose state a snapshot keeps, next to their place on the
/// buses.
pub struct StatefulDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ioapic: Arc<Mutex<Ioapic<KvmMsiRouter>>>,
    /// In attach order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// A microVM's vCPUs and their threads.
pub struct VcpuSet {
    pub vcpus: Vec<Vcpu>,
    /// Threads the build started for the first vCPUs, in order; the
    /// others start with the run.
    pub threads: Vec<VcpuThread>,
    /// Whether every thread runs under its seccomp filter.
    pub seccomp: bool,
}

/// Everything a built or restored microVM is made of.
pub struct MicroVmParts {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub backing: MemoryBacking,
    pub machine: MachineState,
    pub vcpus: VcpuSet,
    pub signals: GuestSignals,
    pub console: Option<Arc<Mutex<SerialDevice>>>,
    pub devices: StatefulDevices,
    pub subscribers: Vec<Subscriber>,
    pub control: Option<ControlSocket>,
    pub boot_time: BootTime,
    /// For a restored VM: when the VMM started, to log how long the
    /// restore took.
    pub restored_since: Option<Instant>,
}

/// A running vCPU thread and the VMM's line to it.
struct VcpuHandle {
    thread: JoinHandle<()>,
    commands: Sender<VcpuCommand>,
    replies: Receiver<VcpuReply>,
}

pub struct MicroVm {
    // Field order is drop order: vCPUs before the VM, the VM before the
    // memory it maps.
    vcpus: Vec<Vcpu>,
    vcpu_threads: Vec<VcpuThread>,
    seccomp: bool,
    vm: Vm,
    mem: GuestMemoryMmap,
    backing: MemoryBacking,
    machine: MachineState,
    devices: StatefulDevices,
    event_manager: EventManager<Subscriber>,
    /// The devices' and sockets' subscribers, which the run loop
    /// registers once the vCPUs run: registering binds the host sockets.
    unregistered: Vec<Subscriber>,
    exit_watcher: Arc<Mutex<ExitWatcher>>,
    control: Option<Arc<Mutex<ControlSocket>>>,
    vcpu_stopped: EventFd,
    stops: Sender<VcpuStop>,
    boot_time: BootTime,
    restored_since: Option<Instant>,
}

impl MicroVm {
    pub(crate) fn new(parts: MicroVmParts) -> std::io::Result<Self> {
        let mut event_manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let vcpu_stopped = EventFd::new(libc::EFD_NONBLOCK)?;
        let (stops, stops_rx) = channel();
        let exit_watcher = Arc::new(Mutex::new(ExitWatcher {
            vcpu_stopped: vcpu_stopped.try_clone()?,
            signals: parts.signals,
            stops: stops_rx,
            panic_grace: TimerFd::new()?,
            panicked: false,
            outcome: None,
        }));
        event_manager.add_subscriber(exit_watcher.clone());
        if let Some(failure) = watch::take_failures().into_iter().next() {
            return Err(std::io::Error::other(failure));
        }
        let mut unregistered = parts.subscribers;
        if let Some(serial) = parts.console {
            unregistered.push(Arc::new(Mutex::new(ConsoleInput { serial })));
        }
        let control = parts.control.map(|c| Arc::new(Mutex::new(c)));
        if let Some(control) = &control {
            unregistered.push(control.clone());
        }
        Ok(Self {
            vcpus: parts.vcpus.vcpus,
            vcpu_threads: parts.vcpus.threads,
            seccomp: parts.vcpus.seccomp,
            vm: parts.vm,
            mem: parts.mem,
            backing: parts.backing,
            machine: parts.machine,
            devices: parts.devices,
            event_manager,
            unregistered,
            exit_watcher,
            control,
            vcpu_stopped,
            stops,
            boot_time: parts.boot_time,
            restored_since: parts.restored_since,
        })
    }

    pub fn hypervisor(&self) -> HypervisorKind {
        self.vm.hypervisor()
    }

    /// The VM's descriptor, open for as long as this is held.
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm.fd().clone()
    }

    pub fn boot_time(&self) -> BootTime {
        self.boot_time.clone()
    }

    /// Runs the guest to its end and returns how it ended. Built with
    /// seccomp, each thread runs under its filter from its first guest exit
    /// on.
    pub fn run(mut self) -> Result<VmOutcome, RunError> {
        register_signal_handler(SIGRTMIN(), kick_signal_handler).map_err(RunError::Signal)?;
        // Read before the filters are in: KVM_GET_MSR_INDEX_LIST is a
        // system ioctl the running VMM has no other use for. Only a VMM
        // that takes snapshot requests needs it.
        let msr_indices = match &self.control {
            Some(_) => self.vm.msr_index_list().unwrap_or_else(|e| {
                tracing::warn!("snapshots will lack MSRs: {e}");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let msr_indices = Arc::new(msr_indices);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        let mut started = std::mem::take(&mut self.vcpu_threads).into_iter();
        for (index, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            match self.start_vcpu(index, vcpu, started.next(), &stop, &pause) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    stop_vcpus(&stop, handles);
                    return Err(RunError::Spawn(e));
                }
            }
        }

        // Device events that came meanwhile wait in their eventfds.
        for subscriber in std::mem::take(&mut self.unregistered) {
            self.event_manager.add_subscriber(subscriber);
        }
        if let Some(failure) = watch::take_failures().into_iter().next() {
            stop_vcpus(&stop, handles);
            return Err(RunError::Watch(failure));
        }
        if self.seccomp {
            if let Err(e) = seccomp::install(ThreadKind::Vmm) {
                stop_vcpus(&stop, handles);
                return Err(e.into());
            }
        }
        let outcome = loop {
            if let Err(e) = self.event_manager.run() {
                stop_vcpus(&stop, handles);
                return Err(RunError::EventLoop(format!("{e:?}")));
            }
            if let Some(outcome) = lock(&self.exit_watcher).outcome.take() {
                break outcome;
            }
            let request = self.control.as_ref().and_then(|c| lock(c).take_pending());
            if let Some((ControlRequest::Snapshot { state, memory }, stream)) = request {
                let result = self.snapshot(&handles, &pause, &msr_indices, &state, &memory);
                match &result {
                    Ok(r) => tracing::info!(
                        "snapshot written to {state:?} and {memory:?}: paused {} us, {} bytes of state, {} of memory",
                        r.paused_us, r.state_bytes, r.memory_bytes
                    ),
                    Err(e) => tracing::warn!("snapshot failed: {e}"),
                }
                control::reply(stream, result);
            }
        };
        stop_vcpus(&stop, handles);
        self.deliver_last_output();
        Ok(outcome)
    }

    /// Hands the host what the guest sent before it ended: packets still
    /// in its queues and bytes buffered for a slow reader, which would
    /// be lost with the process.
    fn deliver_last_output(&mut self) {
        let deadline = Instant::now() + OUTPUT_GRACE;
        // Events already signalled (a queue's last notification) first.
        let mut timeout = Duration::ZERO;
        loop {
            if self
                .event_manager
                .run_with_timeout(timeout.as_millis() as i32)
                .is_err()
            {
                return;
            }
            let transports = &self.devices.transports;
            if !transports.iter().any(|t| lock(t).has_undelivered_output()) {
                return;
            }
            timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                tracing::warn!(
                    "guest output the host did not read within {OUTPUT_GRACE:?} of the end is lost"
                );
                return;
            }
        }
    }

    /// Runs `vcpu` on `thread`, started during the build, or on a thread
    /// started now.
    fn start_vcpu(
        &self,
        index: usize,
        vcpu: Vcpu,
        thread: Option<VcpuThread>,
        stop: &Arc<AtomicBool>,
        pause: &Arc<AtomicBool>,
    ) -> std::io::Result<VcpuHandle> {
        let thread = match thread {
            Some(thread) => thread,
            None => VcpuThread::spawn_idle(index, self.seccomp)?,
        };
        let (commands, commands_rx) = channel();
        let (replies_tx, replies) = channel();
        let thread = thread.start(VcpuStart {
            vcpu,
            stop: stop.clone(),
            control: VcpuControl {
                pause: pause.clone(),
                commands: commands_rx,
                replies: replies_tx,
            },
            stops: self.stops.clone(),
            stopped: self.vcpu_stopped.try_clone()?,
            restored_since: self.restored_since.filter(|_| index == 0),
        })?;
        Ok(VcpuHandle {
            thread,
            commands,
            replies,
        })
    }

    /// Pauses the vCPUs, saves the VM, and lets the vCPUs run on.
    fn snapshot(
        &self,
        handles: &[VcpuHandle],
        pause: &AtomicBool,
        msr_indices: &Arc<Vec<u32>>,
        state_path: &Path,
        memory_path: &Path,
    ) -> Result<SnapshotReport, String> {
        let started = Instant::now();
        pause.store(true, Ordering::Release);
        let result = pause_vcpus(handles)
            .and_then(|_| self.write_snapshot(handles, msr_indices, state_path, memory_path));
        pause.store(false, Ordering::Release);
        for handle in handles {
            let _ = handle.commands.send(VcpuCommand::Resume);
        }
        let (state_bytes, memory_bytes) = result?;
        Ok(SnapshotReport {
            paused_us: started.elapsed().as_micros() as u64,
            state_bytes,
            memory_bytes,
        })
    }

    fn write_snapshot(
        &self,
        handles: &[VcpuHandle],
        msr_indices: &Arc<Vec<u32>>,
        state_path: &Path,
        memory_path: &Path,
    ) -> Result<(u64, u64), String> {
        let mut vcpus: Vec<VcpuState> = Vec::with_capacity(handles.len());
        for (index, handle) in handles.iter().enumerate() {
            let _ = handle.commands.send(VcpuCommand::Save(msr_indices.clone()));
            match handle.replies.recv_timeout(VCPU_REPLY_TIMEOUT) {
                Ok(VcpuReply::Saved(state)) => vcpus.push(*state.map_err(|e| e.to_string())?),
                Ok(VcpuReply::Paused) => return Err(format!("vCPU {index} answered out of turn")),
                Err(_) => return Err(format!("vCPU {index} stopped before it was saved")),
            }
        }
        let state = MicroVmState {
            machine: self.machine.clone(),
            clock: self.vm.clock().map_err(|e| e.to_string())?,
            vcpus,
            serial: lock(&self.devices.serial).snapshot(),
            ioapic: lock(&self.devices.ioapic).state(),
            virtio: self
                .devices
                .transports
                .iter()
                .map(|t| lock(t).state())
                .collect(),
        };
        let memory = File::create(memory_path)
            .map_err(|e| format!("cannot create the memory file {memory_path:?}: {e}"))?;
        let memory_bytes =
            dump_guest_memory(&self.mem, self.backing, &memory).map_err(|e| e.to_string())?;
        let state_bytes =
            snapshot::write_snapshot(state_path, &state).map_err(|e| e.to_string())?;
        Ok((state_bytes, memory_bytes))
    }
}

/// Kicks every vCPU out of `KVM_RUN` (the pause flag is already set) and
/// waits until each has stopped.
fn pause_vcpus(handles: &[VcpuHandle]) -> Result<(), String> {
    for handle in handles {
        if let Err(e) = handle.thread.kill(SIGRTMIN()) {
            return Err(format!("cannot kick a vCPU thread: {e}"));
        }
    }
    for (index, handle) in handles.iter().enumerate() {
        match handle.replies.recv_timeout(VCPU_REPLY_TIMEOUT) {
            Ok(VcpuReply::Paused) => {}
            Ok(VcpuReply::Saved(_)) => return Err(format!("vCPU {index} answered out of turn")),
            Err(_) => return Err(format!("vCPU {index} did not pause: it has stopped")),
        }
    }
    Ok(())
}

/// Asks every vCPU thread to stop, kicks it out of `KVM_RUN` (or out of
/// a pause, by hanging up), and waits.
fn stop_vcpus(stop: &AtomicBool, handles: Vec<VcpuHandle>) {
    stop.store(true, Ordering::Release);
    for VcpuHandle {
        thread, commands, ..
    } in handles
    {
        drop(commands);
        if !thread.is_finished() {
            if let Err(e) = thread.kill(SIGRTMIN()) {
                tracing::warn!("cannot kick a vCPU thread: {e}");
            }
        }
        let _ = thread.join();
    }
}
