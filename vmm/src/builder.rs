//! Builds a ready-to-run microVM from a validated configuration: guest
//! memory, the KVM VM, the kernel and its boot structures, the devices and
//! the vCPUs, in that order.

use std::fs::OpenOptions;
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{
    self, write_linux_boot_params, write_pvh_start_info, InitrdRegion,
};
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_TIMER_MMIO_START, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT,
    I8042_PORT, IOAPIC_SIZE, IOAPIC_START, PM1_CONTROL_LEN, PM1_CONTROL_PORT, PM1_EVENT_PORT,
    PVPANIC_PORT, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::paging::Privilege;
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{acpi, cpuid, mptable, paging};
use crate::config::{DeviceConfig, DriveConfig, FileSource, RestoreConfig, SerialConfig, VmConfig};
use crate::control::ControlSocket;
use crate::devices::acpi::pm1::Pm1;
use crate::devices::acpi::pvpanic::PvPanic;
use crate::devices::boot_timer::{BootTime, BootTimer};
use crate::devices::bus::lock;
use crate::devices::guest_signals::GuestSignals;
use crate::devices::ioapic::Ioapic;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialOutput, SerialSnapshot};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::chunked::{ChunkManifest, ChunkedError, ChunkedImage};
use crate::devices::virtio::block::sealed::{
    parse_key_line, ArtifactId, DataKey, SealedError, SealedImage,
};
use crate::devices::virtio::block::{Block, BlockBackend, RawFile};
use crate::devices::virtio::mmio::{MmioTransport, COALESCED_WRITES};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{Bus, BusError};
use crate::loader::{self, LoaderError};
use crate::microvm::{MicroVm, MicroVmParts, StatefulDevices, Subscriber, VcpuSet};
use crate::snapshot::{read_snapshot, MachineState, MicroVmState, SnapshotError};
use crate::vstate::coalesced_mmio::QueuedWritesFirst;
use crate::vstate::guest_wake::GuestWake;
use crate::vstate::memory::{
    create_guest_memory, map_memory_file, FaultedHugePages, MemoryBacking, MemoryError,
};
use crate::vstate::vcpu::{BareVcpu, Vcpu, VcpuError};
use crate::vstate::vcpu_thread::{recv_soon, EarlyVcpuThread};
use crate::vstate::vm::{HypervisorKind, KvmAccess, KvmMsiRouter, KvmSystem, Vm, VmError};
use event_manager::MutEventSubscriber;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("invalid vcpus \"{requested}\": this host's KVM supports at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    #[error("cannot write the GDT to guest memory: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    #[error("invalid serial \"file:{path}\": {source}")]
    SerialFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the event loop: {0}")]
    EventManager(String),
    #[error("vsock: a connected stream: {0}")]
    ConnectedPort(std::io::Error),
    #[error("invalid drive {path:?}: {source}")]
    Drive {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("drive {path:?}: key-fd={fd}: {reason}")]
    DriveKey {
        path: std::path::PathBuf,
        fd: i32,
        reason: String,
    },
    #[error("chunked drive {path:?} (manifest {manifest}): {source}")]
    ChunkedDrive {
        path: std::path::PathBuf,
        manifest: String,
        source: ChunkedError,
    },
    #[error("sealed drive {path:?}: {source}")]
    SealedDrive {
        path: std::path::PathBuf,
        source: SealedError,
    },
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("cannot create a virtio device: {0}")]
    VirtioDevice(std::io::Error),
    #[error("cannot register a virtio queue notification: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("cannot start vCPU 0's thread: {0}")]
    VcpuThread(std::io::Error),
    #[error("vCPU 0's thread ended before its part of the build")]
    VcpuThreadEnded,
}

/// Attaches virtio-mmio devices in order: each gets the next MMIO window
/// and GSI, an irqfd, an ioeventfd per queue, a place on the event loop,
/// and a `virtio_mmio.device=` entry for the kernel command line.
struct VirtioAttacher<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    mmio_bus: &'a mut Bus,
    wake: &'a GuestWake,
    subscribers: Vec<Subscriber>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: Vec<String>,
}

impl VirtioAttacher<'_> {
    fn attach<D>(&mut self, device: D) -> Result<(), BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let n = self.cmdline.len() as u64;
        let base = VIRTIO_MMIO_START + n * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + n as u32;
        let irqfd = eventfd()?;
        self.vm.register_irqfd(&irqfd, irq)?;
        let device = Arc::new(Mutex::new(device));
        let interrupt = Interrupt::new(irqfd).waking(self.wake.clone());
        let transport = MmioTransport::new(self.mem.clone(), device.clone(), interrupt);
        transport
            .register_ioevents(self.vm.fd(), base)
            .map_err(BuildError::IoEvent)?;
        for (offset, len) in COALESCED_WRITES {
            self.vm.queue_mmio_writes(base + offset, len)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.transports.push(transport);
        self.subscribers.push(device);
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(())
    }
}

/// Drives first, so the first drive is the guest's first disk; then vsock;
/// then entropy.
fn attach_virtio_devices(
    attacher: &mut VirtioAttacher,
    config: &DeviceConfig,
) -> Result<(), BuildError> {
    for (i, drive) in config.drives.iter().enumerate() {
        let backend = drive_backend(drive)?;
        let block = Block::new(backend, drive.read_only, &format!("drive{i}"))
            .map_err(BuildError::VirtioDevice)?;
        attacher.attach(block)?;
    }
    if let Some(vsock) = &config.vsock {
        let connected = vsock
            .connected
            .iter()
            .map(|c| c.take().map(|stream| (c.port, stream)))
            .collect::<Result<_, _>>()
            .map_err(BuildError::ConnectedPort)?;
        attacher.attach(Vsock::new(vsock.guest_cid, &vsock.uds_path, connected)?)?;
    }
    attacher.attach(Rng::new().map_err(BuildError::VirtioDevice)?)
}

/// A drive's storage: a chunked image, a sealed one, or a raw file.
fn drive_backend(drive: &DriveConfig) -> Result<Box<dyn BlockBackend>, BuildError> {
    let shown = PathBuf::from(drive.path.to_string());
    let drive_error = |source| BuildError::Drive {
        path: shown.clone(),
        source,
    };
    if let Some(manifest) = &drive.manifest {
        let chunked = match &drive.path {
            FileSource::Path(store) => manifest
                .open()
                .map_err(ChunkedError::Io)
                .and_then(ChunkManifest::read_from)
                .and_then(|m| ChunkedImage::open(store, m)),
            // Refused by the configuration's validation.
            FileSource::Fd(_) => Err(ChunkedError::Io(std::io::ErrorKind::IsADirectory.into())),
        }
        .map_err(|source| BuildError::ChunkedDrive {
            path: shown.clone(),
            manifest: manifest.to_string(),
            source,
        })?;
        return Ok(Box::new(chunked));
    }
    let file = match &drive.path {
        FileSource::Path(path) => OpenOptions::new()
            .read(true)
            .write(!drive.read_only)
            .open(path),
        FileSource::Fd(_) => drive.path.open(),
    }
    .map_err(drive_error)?;
    let Some(fd) = drive.key_fd else {
        return Ok(Box::new(RawFile::new(file).map_err(drive_error)?));
    };
    let (artifact, key) = read_drive_key(fd).map_err(|reason| BuildError::DriveKey {
        path: shown.clone(),
        fd,
        reason,
    })?;
    let sealed =
        SealedImage::open(file, &artifact, &key).map_err(|source| BuildError::SealedDrive {
            path: shown.clone(),
            source,
        })?;
    Ok(Box::new(sealed))
}

/// Reads a sealed drive's artifact id and key from descriptor `fd`, which
/// the VMM's owner left open for it, and closes it, unless it is a
/// standard stream (the worker passes the key on stdin): a freed 0 went to
/// the next file the VMM opened, which the console then watched as stdin,
/// and the control socket, landing there, could not be watched at all.
fn read_drive_key(fd: i32) -> Result<(ArtifactId, DataKey), String> {
    let mut file = FileSource::Fd(fd).open().map_err(|e| e.to_string())?;
    let mut line = String::new();
    (&mut file)
        .take(256)
        .read_to_string(&mut line)
        .map_err(|e| e.to_string())?;
    if fd <= libc::STDERR_FILENO {
        // Drained, it reads as end of file from now on.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(file);
    }
    parse_key_line(&line)
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, BuildError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    })
}

/// The kernel and initrd, read into guest memory.
struct GuestImages {
    kernel: loader::LoadedKernel,
    initrd: Option<InitrdRegion>,
}

/// Reads the kernel and initrd into guest memory: a slow step of a boot
/// (fresh guest memory), which needs nothing from KVM and so runs beside
/// the VM's set-up.
fn load_images(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    mut faulted: FaultedHugePages,
) -> Result<GuestImages, BuildError> {
    let kernel = loader::load_kernel(mem, &config.kernel, &mut faulted)?;
    let initrd = config
        .initrd
        .as_ref()
        .map(|path| loader::load_initrd(mem, config.mem_mib << 20, path, &kernel))
        .transpose()?;
    Ok(GuestImages { kernel, initrd })
}

/// Writes the command line and every structure the chosen entry protocol
/// needs. A guest that offers a PVM user-mode entry is entered there on a
/// PVM host, where it then runs natively.
///
/// Such a guest may run at CPL 3, where it can read neither a virtualized
/// CPUID nor kvmclock, so it gets the TSC rate as `tsc_early_khz=`, the
/// parameter Linux takes for the same purpose.
fn write_boot_structures(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    images: GuestImages,
    hypervisor: HypervisorKind,
    tsc_khz: Option<u32>,
    device_cmdline: &[String],
) -> Result<(EntryMode, u64), BuildError> {
    let GuestImages { mut kernel, initrd } = images;
    if let (Some(entry), HypervisorKind::Pvm) = (kernel.pvm_user_entry, hypervisor) {
        kernel.entry = EntryMode::PvmUser { entry };
    }
    let mut cmdline = config.cmdline.clone();
    if let (Some(_), Some(khz)) = (kernel.pvm_user_entry, tsc_khz) {
        if !cmdline.contains("tsc_early_khz=") {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    for entry in device_cmdline {
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    let cmdline_size = loader::load_cmdline(mem, &cmdline, &kernel)?;
    let e820 = boot_params::e820_map(config.mem_mib << 20);
    // A guest in PVM user mode has no ACPI to read: it is not a PC.
    let rsdp = match kernel.entry {
        EntryMode::PvmUser { .. } => None,
        _ => Some(acpi::write_acpi_tables(
            mem,
            config.vcpus,
            mptable::ioapic_id(config.vcpus),
        )?),
    };
    match kernel.entry {
        EntryMode::Linux64 { .. } | EntryMode::PvmUser { .. } => {
            write_linux_boot_params(mem, &e820, cmdline_size, initrd, kernel.setup_header, rsdp)?
        }
        EntryMode::Pvh { .. } => write_pvh_start_info(mem, &e820, initrd, rsdp)?,
    }
    mem.write_obj(BOOT_GDT, GuestAddress(BOOT_GDT_START))
        .and_then(|_| mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)))
        .map_err(BuildError::Gdt)?;
    let privilege = match kernel.entry {
        EntryMode::PvmUser { .. } => Privilege::User,
        _ => Privilege::Supervisor,
    };
    let cr3 = paging::write_identity_page_tables(mem, privilege)?;
    mptable::write_mptable(mem, config.vcpus)?;
    tracing::debug!(
        "loaded {:?} kernel, entry {:?}, ends at {:#x}",
        kernel.format,
        kernel.entry,
        kernel.kernel_end
    );
    Ok((kernel.entry, cr3))
}

/// A microVM's devices, on their buses and wired to the VM's interrupts.
struct DeviceSet {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    wake: GuestWake,
    signals: GuestSignals,
    console: Option<Arc<Mutex<SerialDevice>>>,
    stateful: StatefulDevices,
    subscribers: Vec<Subscriber>,
    boot_time: BootTime,
    /// `virtio_mmio.device=` entries for a kernel command line.
    cmdline: Vec<String>,
}

/// Creates the devices of `config`. A restore passes the snapshot's
/// serial state, which the UART starts from.
fn create_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    vcpus: u8,
    config: &DeviceConfig,
    serial_state: Option<&SerialSnapshot>,
    vmm_start: Instant,
) -> Result<DeviceSet, BuildError> {
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();

    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let (trigger, output) = (
        EventFdTrigger::new(serial_irq),
        serial_output(&config.serial)?,
    );
    let serial = match serial_state {
        None => SerialDevice::new(trigger, output),
        Some(state) => {
            SerialDevice::from_snapshot(state, trigger, output).map_err(BuildError::Restore)?
        }
    };
    let serial = Arc::new(Mutex::new(serial));
    io_bus.insert(serial.clone(), u64::from(COM1_PORT), 8)?;

    let signals = GuestSignals::new().map_err(BuildError::EventFd)?;
    let trigger = |signal| GuestSignals::trigger(signal).map_err(BuildError::EventFd);
    let i8042 = I8042::new(trigger(&signals.reset)?);
    io_bus.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_PORT), 5)?;
    let pm1 = Pm1::new(trigger(&signals.power_off)?);
    let pm1_ports = u64::from(PM1_CONTROL_PORT - PM1_EVENT_PORT) + u64::from(PM1_CONTROL_LEN);
    io_bus.insert(
        Arc::new(Mutex::new(pm1)),
        u64::from(PM1_EVENT_PORT),
        pm1_ports,
    )?;
    let pvpanic = PvPanic::new(trigger(&signals.panic)?);
    io_bus.insert(Arc::new(Mutex::new(pvpanic)), u64::from(PVPANIC_PORT), 1)?;

    let boot_timer = BootTimer::new(vmm_start);
    let boot_time = boot_timer.boot_time();
    let boot_timer = Arc::new(Mutex::new(boot_timer));
    io_bus.insert(boot_timer.clone(), u64::from(BOOT_TIMER_PORT), 1)?;
    mmio_bus.insert(boot_timer, BOOT_TIMER_MMIO_START, 0x1000)?;

    let ioapic = Arc::new(Mutex::new(Ioapic::new(
        mptable::ioapic_id(vcpus),
        KvmMsiRouter(vm.fd().clone()),
    )));
    mmio_bus.insert(ioapic.clone(), IOAPIC_START, IOAPIC_SIZE)?;

    let wake = GuestWake::new().map_err(BuildError::EventFd)?;
    let mut attacher = VirtioAttacher {
        vm,
        mem,
        mmio_bus: &mut mmio_bus,
        wake: &wake,
        subscribers: Vec::new(),
        transports: Vec::new(),
        cmdline: Vec::new(),
    };
    attach_virtio_devices(&mut attacher, config)?;
    let VirtioAttacher {
        subscribers,
        transports,
        cmdline,
        ..
    } = attacher;

    Ok(DeviceSet {
        io_bus: Arc::new(io_bus),
        mmio_bus: Arc::new(mmio_bus),
        wake,
        signals,
        console: matches!(config.serial, SerialConfig::Stdout).then(|| serial.clone()),
        stateful: StatefulDevices {
            serial,
            ioapic,
            transports,
        },
        subscribers,
        boot_time,
        cmdline,
    })
}

/// Creates the vCPUs `indices`, unconfigured.
fn create_vcpus(vm: &Vm, indices: Range<u8>, count: u8) -> Result<Vec<BareVcpu>, BuildError> {
    if usize::from(count) > vm.max_vcpus() {
        return Err(BuildError::TooManyVcpus {
            requested: count,
            max: vm.max_vcpus(),
        });
    }
    indices
        .map(|index| BareVcpu::create(vm.fd(), index).map_err(BuildError::from))
        .collect()
}

/// Attaches `vcpus`, in index order, to the devices' buses and the VM's
/// coalesced MMIO ring.
fn attach_vcpus(
    vm: &Vm,
    vcpus: Vec<BareVcpu>,
    devices: &DeviceSet,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Vcpu>, BuildError> {
    let mut vcpus: Vec<Vcpu> = vcpus
        .into_iter()
        .map(|bare| {
            Vcpu::attach(
                bare,
                devices.io_bus.clone(),
                devices.mmio_bus.clone(),
                mem.clone(),
                devices.wake.clone(),
            )
        })
        .collect();
    if let Some(first) = vcpus.first().filter(|_| vm.has_coalesced_mmio()) {
        let ring = Arc::new(first.map_coalesced_mmio()?);
        for vcpu in &mut vcpus {
            vcpu.use_coalesced_mmio(ring.clone());
        }
    }
    Ok(vcpus)
}

/// Creates and configures the boot vCPU, on its own thread once the kernel
/// is loaded. Asking KVM for the CPUID it supports takes 0.3 ms on a PVM
/// host, for a table a guest in PVM user mode never reads; the table, when
/// asked for, comes back for the other vCPUs.
fn boot_vcpu(
    vm: &VmFd,
    system: &KvmSystem,
    hypervisor: HypervisorKind,
    images: &GuestImages,
    count: u8,
) -> Result<(BareVcpu, Option<CpuId>), BuildError> {
    let mut vcpu = BareVcpu::create(vm, 0)?;
    let pvm_user = hypervisor == HypervisorKind::Pvm && images.kernel.pvm_user_entry.is_some();
    let supported_cpuid = (!pvm_user).then(|| system.supported_cpuid()).transpose()?;
    vcpu.configure(supported_cpuid.as_ref(), count)?;
    Ok((vcpu, supported_cpuid))
}

fn control_socket(config: &DeviceConfig) -> Option<ControlSocket> {
    config.control_sock.as_deref().map(ControlSocket::new)
}

fn machine_state(config: &DeviceConfig, mem_mib: u64, vcpus: u8, vm: &Vm) -> MachineState {
    MachineState {
        mem_mib,
        vcpus,
        hypervisor: vm.hypervisor(),
        drives_read_only: config.drives.iter().map(|d| d.read_only).collect(),
        vsock: config.vsock.is_some(),
    }
}

impl DeviceSet {
    /// The microVM's parts, without a control socket and not restored.
    fn into_parts(
        self,
        vm: Vm,
        mem: GuestMemoryMmap,
        backing: MemoryBacking,
        machine: MachineState,
        vcpus: VcpuSet,
    ) -> MicroVmParts {
        let subscribers = match vcpus.vcpus.first().and_then(Vcpu::coalesced_mmio) {
            Some(ring) => self
                .subscribers
                .into_iter()
                .map(|device| -> Subscriber {
                    Arc::new(Mutex::new(QueuedWritesFirst::new(
                        ring.clone(),
                        self.mmio_bus.clone(),
                        device,
                    )))
                })
                .collect(),
            None => self.subscribers,
        };
        MicroVmParts {
            vm,
            mem,
            backing,
            machine,
            vcpus,
            signals: self.signals,
            console: self.console,
            devices: self.stateful,
            subscribers,
            control: None,
            boot_time: self.boot_time,
            restored_since: None,
        }
    }
}

fn assemble(parts: MicroVmParts) -> Result<MicroVm, BuildError> {
    MicroVm::new(parts).map_err(|e| BuildError::EventManager(e.to_string()))
}

/// KVM as a build finds it.
pub enum KvmStart {
    /// To be opened; the VM is made beside the loading of the guest.
    Open(KvmAccess),
    /// Opened, with an empty VM made ahead by a VMM on standby.
    Prepared(PreparedVm),
}

/// KVM opened, a VM made and huge pages for a kernel image faulted in,
/// before the microVM is known.
pub struct PreparedVm {
    system: Arc<KvmSystem>,
    vm: Vm,
    kernel_pages: FaultedHugePages,
}

/// Huge pages a VMM on standby faults in for its kernel image: the
/// bare-metal runtime's fits in one; a Linux kernel's first 4 MiB, of its
/// 10 or more, take the other.
const STANDBY_KERNEL_HUGE_PAGES: usize = 2;

impl PreparedVm {
    pub fn make(kvm: KvmAccess) -> Result<Self, BuildError> {
        let system = Arc::new(KvmSystem::open(kvm)?);
        let vm = Vm::new(system.clone())?;
        let kernel_pages = FaultedHugePages::fault_in(STANDBY_KERNEL_HUGE_PAGES)?;
        Ok(PreparedVm {
            system,
            vm,
            kernel_pages,
        })
    }
}

/// What a microVM's set-up starts from: KVM, and what was made ahead.
struct Opened {
    system: Arc<KvmSystem>,
    vm: Option<Vm>,
    kernel_pages: FaultedHugePages,
}

impl KvmStart {
    fn open(self) -> Result<Opened, BuildError> {
        match self {
            KvmStart::Open(access) => Ok(Opened {
                system: Arc::new(KvmSystem::open(access)?),
                vm: None,
                kernel_pages: FaultedHugePages::none(),
            }),
            KvmStart::Prepared(prepared) => Ok(Opened {
                system: prepared.system,
                vm: Some(prepared.vm),
                kernel_pages: prepared.kernel_pages,
            }),
        }
    }
}

/// The VM `made` ahead, or one made now, with `mem` as its memory.
fn vm_with_memory(
    system: Arc<KvmSystem>,
    made: Option<Vm>,
    mem: &GuestMemoryMmap,
) -> Result<Vm, VmError> {
    let vm = match made {
        Some(vm) => vm,
        None => Vm::new(system)?,
    };
    vm.map_memory(mem)?;
    Ok(vm)
}

/// Builds the microVM of `config`, with `vcpu0` as vCPU 0's thread; with
/// `seccomp`, its threads will run under their filters.
pub fn build_microvm(
    config: &VmConfig,
    kvm: KvmStart,
    vmm_start: Instant,
    seccomp: bool,
    vcpu0: EarlyVcpuThread,
) -> Result<MicroVm, BuildError> {
    let mem = create_guest_memory(config.mem_mib << 20)?;
    let Opened {
        system,
        vm: made,
        kernel_pages,
    } = kvm.open()?;
    // Two lines of work that meet at the boot vCPU's entry point, within
    // about 0.1 ms of each other (traced): vCPU 0's thread loads the kernel
    // image, then creates and configures its vCPU in the VM the main
    // thread made; the main thread builds the VM, its devices and any
    // other vCPUs.
    let (vm_sender, vm_made) = sync_channel::<Option<(Arc<VmFd>, HypervisorKind)>>(1);
    let (vcpu0_thread, prelude) = vcpu0.begin(seccomp, {
        let (mem, config, system) = (mem.clone(), config.clone(), system.clone());
        move || {
            let images = load_images(&config, &mem, kernel_pages);
            // Without a kernel or a VM the main thread has an error to
            // report, and vCPU 0's thread makes no vCPU.
            let vcpu = match (&images, vm_made.recv()) {
                (Ok(images), Ok(Some((vm, hypervisor)))) => {
                    Some(boot_vcpu(&vm, &system, hypervisor, images, config.vcpus))
                }
                _ => None,
            };
            (images, vcpu)
        }
    });
    let vm = vm_with_memory(system, made, &mem);
    let _ = vm_sender.send(
        vm.as_ref()
            .ok()
            .map(|vm| (vm.fd().clone(), vm.hypervisor())),
    );
    let kvm_side = vm.map_err(BuildError::from).and_then(|vm| {
        let devices = create_devices(&vm, &mem, config.vcpus, &config.devices, None, vmm_start)?;
        let others = create_vcpus(&vm, 1..config.vcpus, config.vcpus)?;
        Ok((vm, devices, others))
    });
    let (images, vcpu0) = recv_soon(&prelude).map_err(|_| BuildError::VcpuThreadEnded)?;
    // A bad kernel is the likelier mistake, and the one to report.
    let images = images?;
    let (vm, devices, others) = kvm_side?;
    let (mut vcpu0, supported_cpuid) = vcpu0.ok_or(BuildError::VcpuThreadEnded)??;
    let (entry, cr3) = write_boot_structures(
        config,
        &mem,
        images,
        vm.hypervisor(),
        vcpu0.tsc_khz(),
        &devices.cmdline,
    )?;
    if let EntryMode::PvmUser { .. } = entry {
        tracing::info!("the guest runs in PVM user mode, natively");
    }
    vcpu0.set_boot_entry(entry, cr3)?;
    let mut bare = vec![vcpu0];
    for mut vcpu in others {
        vcpu.configure(supported_cpuid.as_ref(), config.vcpus)?;
        bare.push(vcpu);
    }
    let vcpus = attach_vcpus(&vm, bare, &devices, &mem)?;
    let machine = machine_state(&config.devices, config.mem_mib, config.vcpus, &vm);
    let vcpus = VcpuSet {
        vcpus,
        threads: vec![vcpu0_thread],
        seccomp,
    };
    assemble(MicroVmParts {
        control: control_socket(&config.devices),
        ..devices.into_parts(vm, mem, MemoryBacking::Anonymous, machine, vcpus)
    })
}

/// The devices and vCPUs of a restored microVM, with the snapshot's state.
fn restore_devices_and_vcpus(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    state: &MicroVmState,
    config: &RestoreConfig,
    vmm_start: Instant,
) -> Result<(DeviceSet, Vec<Vcpu>), BuildError> {
    let restore_error =
        |reason: String| BuildError::Restore(format!("snapshot {}: {reason}", config.state));
    let machine = &state.machine;
    let devices = create_devices(
        vm,
        mem,
        machine.vcpus,
        &config.devices,
        Some(&state.serial),
        vmm_start,
    )?;
    lock(&devices.stateful.ioapic)
        .restore(&state.ioapic)
        .map_err(restore_error)?;
    let mut vcpus = create_vcpus(vm, 0..machine.vcpus, machine.vcpus)?;
    for (vcpu, saved) in vcpus.iter_mut().zip(&state.vcpus) {
        vcpu.restore_state(saved)?;
    }
    // After the LAPICs: a restored device may interrupt at once (vsock's
    // transport reset), and KVM_SET_LAPIC would overwrite the request an
    // earlier interrupt left in the LAPIC; an edge lost so is never seen.
    for (transport, saved) in devices.stateful.transports.iter().zip(&state.virtio) {
        lock(transport).restore(saved).map_err(restore_error)?;
    }
    let vcpus = attach_vcpus(vm, vcpus, &devices, mem)?;
    Ok((devices, vcpus))
}

/// Rebuilds the microVM a snapshot was taken of, with new host ends for
/// its devices, and its memory mapped from the snapshot's memory file.
/// Everything that can refuse the snapshot (its format, the machine it
/// describes, this host's CPU) is checked before a vCPU runs. `vcpu0` is
/// vCPU 0's thread; with `seccomp`, its threads will run under their
/// filters.
pub fn restore_microvm(
    config: &RestoreConfig,
    kvm: KvmStart,
    vmm_start: Instant,
    seccomp: bool,
    vcpu0: EarlyVcpuThread,
) -> Result<MicroVm, BuildError> {
    let state_name = PathBuf::from(config.state.to_string());
    let state_file = config.state.open().map_err(|source| {
        BuildError::Snapshot(SnapshotError::Io {
            path: state_name.clone(),
            source,
        })
    })?;
    let state = read_snapshot(state_file, &state_name)?;
    let machine = &state.machine;
    let restore_error =
        |reason: String| BuildError::Restore(format!("snapshot {:?}: {reason}", config.state));
    let drives: Vec<bool> = config.devices.drives.iter().map(|d| d.read_only).collect();
    if drives != machine.drives_read_only {
        return Err(restore_error(format!(
            "the snapshot's VM had drives {:?} (read-only or not, in order), this one {drives:?}",
            machine.drives_read_only
        )));
    }
    if config.devices.vsock.is_some() != machine.vsock {
        return Err(restore_error(format!(
            "the snapshot's VM {} a vsock device; give --vsock {}",
            if machine.vsock { "had" } else { "had no" },
            if machine.vsock {
                "for it"
            } else {
                "not at all"
            },
        )));
    }
    if state.vcpus.len() != usize::from(machine.vcpus)
        || state.virtio.len() != drives.len() + usize::from(machine.vsock) + 1
    {
        return Err(restore_error(
            "its vCPU or device states do not match its machine".into(),
        ));
    }
    let memory = config
        .memory
        .open()
        .map_err(|e| restore_error(format!("memory file {}: {e}", config.memory)))?;
    let mem = map_memory_file(&memory, machine.mem_mib << 20)?;
    // A restored guest's memory is the snapshot's: nothing to move in.
    let Opened {
        system, vm: made, ..
    } = kvm.open()?;
    let vm = vm_with_memory(system.clone(), made, &mem)?;
    if vm.hypervisor() != machine.hypervisor {
        return Err(restore_error(format!(
            "taken on {}, this host has {}",
            machine.hypervisor,
            vm.hypervisor()
        )));
    }
    // KVM_GET_SUPPORTED_CPUID is slow (about 0.4 ms here): vCPU 0's thread
    // checks the snapshot's CPUID against it beside the devices' and vCPUs'
    // set-up, before any vCPU runs.
    let (vcpu0_thread, cpuid_check) = vcpu0.begin(seccomp, {
        let saved: Vec<_> = state.vcpus.iter().map(|v| v.cpuid.clone()).collect();
        let vcpu_count = machine.vcpus;
        let snapshot = format!("snapshot {:?}", config.state);
        move || {
            // A guest that ran without a CPUID table (in PVM user mode)
            // has nothing to check.
            if saved.iter().all(Vec::is_empty) {
                return Ok(());
            }
            let supported = system.supported_cpuid().map_err(BuildError::from)?;
            for (index, saved) in saved.iter().enumerate() {
                let mut host = supported.clone();
                cpuid::filter_cpuid(&mut host, index as u8, vcpu_count);
                cpuid::check_compatible(saved, &host)
                    .map_err(|e| BuildError::Restore(format!("{snapshot}: vCPU {index}: {e}")))?;
            }
            Ok::<(), BuildError>(())
        }
    });
    let restored = restore_devices_and_vcpus(&vm, &mem, &state, config, vmm_start);
    cpuid_check
        .recv()
        .map_err(|_| BuildError::VcpuThreadEnded)??;
    let (devices, vcpus) = restored?;
    vm.set_clock(&state.clock)?;
    let vcpus = VcpuSet {
        vcpus,
        threads: vec![vcpu0_thread],
        seccomp,
    };
    assemble(MicroVmParts {
        control: control_socket(&config.devices),
        restored_since: Some(vmm_start),
        ..devices.into_parts(vm, mem, MemoryBacking::SnapshotFile, state.machine, vcpus)
    })
}
