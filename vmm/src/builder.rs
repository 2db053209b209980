//! Builds a ready-to-run microVM from a validated configuration: guest
//! memory, the KVM VM, the kernel and its boot structures, the devices and
//! the vCPUs, in that order.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{self, write_linux_boot_params, write_pvh_start_info};
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_TIMER_MMIO_START, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT,
    I8042_PORT, IOAPIC_SIZE, IOAPIC_START, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::paging::Privilege;
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{mptable, paging};
use crate::config::{SerialConfig, VmConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::ioapic::Ioapic;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialOutput};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::sealed::{
    parse_key_line, ArtifactId, DataKey, SealedError, SealedImage,
};
use crate::devices::virtio::block::{Block, BlockBackend, RawFile};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{Bus, BusError};
use crate::loader::{self, LoaderError};
use crate::microvm::MicroVm;
use crate::microvm::Subscriber;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{HypervisorKind, KvmAccess, KvmMsiRouter, Vm, VmError};
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
}

/// Attaches virtio-mmio devices in order: each gets the next MMIO window
/// and GSI, an irqfd, an ioeventfd per queue, a place on the event loop,
/// and a `virtio_mmio.device=` entry for the kernel command line.
struct VirtioAttacher<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    mmio_bus: &'a mut Bus,
    subscribers: Vec<Subscriber>,
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
        let transport = MmioTransport::new(self.mem.clone(), device.clone(), Interrupt::new(irqfd));
        transport
            .register_ioevents(self.vm.fd(), base)
            .map_err(BuildError::IoEvent)?;
        self.mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)?;
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
    config: &VmConfig,
) -> Result<(), BuildError> {
    for (i, drive) in config.drives.iter().enumerate() {
        let drive_error = |source| BuildError::Drive {
            path: drive.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!drive.read_only)
            .open(&drive.path)
            .map_err(drive_error)?;
        let backend: Box<dyn BlockBackend> = match drive.key_fd {
            None => Box::new(RawFile::new(file).map_err(drive_error)?),
            Some(fd) => {
                let (artifact, key) =
                    read_drive_key(fd).map_err(|reason| BuildError::DriveKey {
                        path: drive.path.clone(),
                        fd,
                        reason,
                    })?;
                Box::new(SealedImage::open(file, &artifact, &key).map_err(|source| {
                    BuildError::SealedDrive {
                        path: drive.path.clone(),
                        source,
                    }
                })?)
            }
        };
        let block = Block::new(backend, drive.read_only, &format!("drive{i}"))
            .map_err(BuildError::VirtioDevice)?;
        attacher.attach(block)?;
    }
    if let Some(vsock) = &config.vsock {
        attacher.attach(Vsock::new(vsock.guest_cid, &vsock.uds_path)?)?;
    }
    attacher.attach(Rng::new().map_err(BuildError::VirtioDevice)?)
}

/// Reads a sealed drive's artifact id and key from descriptor `fd`, which
/// the VMM's owner left open for it, and closes it.
fn read_drive_key(fd: i32) -> Result<(ArtifactId, DataKey), String> {
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err("not an open descriptor".into());
    }
    // SAFETY: an open descriptor nothing else in this process uses: the
    // owner passed it for this drive alone.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut line = String::new();
    file.take(256)
        .read_to_string(&mut line)
        .map_err(|e| e.to_string())?;
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

/// Loads the kernel, initrd and command line, and writes every structure
/// the chosen entry protocol needs. A guest that offers a PVM user-mode
/// entry is entered there on a PVM host, where it then runs natively.
///
/// Such a guest may run at CPL 3, where it can read neither a virtualized
/// CPUID nor kvmclock, so it gets the TSC rate as `tsc_early_khz=`, the
/// parameter Linux takes for the same purpose.
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    hypervisor: HypervisorKind,
    tsc_khz: Option<u32>,
    device_cmdline: &[String],
) -> Result<(EntryMode, u64), BuildError> {
    let mem_size = config.mem_mib << 20;
    let mut kernel = loader::load_kernel(mem, &config.kernel)?;
    if let (Some(entry), HypervisorKind::Pvm) = (kernel.pvm_user_entry, hypervisor) {
        kernel.entry = EntryMode::PvmUser { entry };
    }
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| loader::load_initrd(mem, mem_size, path, &kernel))
        .transpose()?;
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
    let e820 = boot_params::e820_map(mem_size);
    match kernel.entry {
        EntryMode::Linux64 { .. } | EntryMode::PvmUser { .. } => {
            write_linux_boot_params(mem, &e820, cmdline_size, initrd, kernel.setup_header)?
        }
        EntryMode::Pvh { .. } => write_pvh_start_info(mem, &e820, initrd)?,
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

pub fn build_microvm(
    config: &VmConfig,
    kvm: KvmAccess,
    vmm_start: Instant,
) -> Result<MicroVm, BuildError> {
    let mem = create_guest_memory(config.mem_mib << 20)?;
    let vm = Vm::new(kvm, &mem)?;
    if usize::from(config.vcpus) > vm.max_vcpus() {
        return Err(BuildError::TooManyVcpus {
            requested: config.vcpus,
            max: vm.max_vcpus(),
        });
    }
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();

    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFdTrigger::new(serial_irq),
        serial_output(&config.serial)?,
    )));
    io_bus.insert(serial.clone(), u64::from(COM1_PORT), 8)?;

    let reset_evt = eventfd()?;
    let i8042 = I8042::new(EventFdTrigger::new(
        reset_evt.try_clone().map_err(BuildError::EventFd)?,
    ));
    io_bus.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_PORT), 5)?;

    let boot_timer = BootTimer::new(vmm_start);
    let boot_time = boot_timer.boot_time();
    let boot_timer = Arc::new(Mutex::new(boot_timer));
    io_bus.insert(boot_timer.clone(), u64::from(BOOT_TIMER_PORT), 1)?;
    mmio_bus.insert(boot_timer, BOOT_TIMER_MMIO_START, 0x1000)?;

    let ioapic = Ioapic::new(
        mptable::ioapic_id(config.vcpus),
        KvmMsiRouter(vm.fd().clone()),
    );
    mmio_bus.insert(Arc::new(Mutex::new(ioapic)), IOAPIC_START, IOAPIC_SIZE)?;

    let mut attacher = VirtioAttacher {
        vm: &vm,
        mem: &mem,
        mmio_bus: &mut mmio_bus,
        subscribers: Vec::new(),
        cmdline: Vec::new(),
    };
    attach_virtio_devices(&mut attacher, config)?;
    let VirtioAttacher {
        subscribers,
        cmdline: device_cmdline,
        ..
    } = attacher;

    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let vcpus = (0..config.vcpus)
        .map(|index| {
            Vcpu::new(
                vm.fd(),
                index,
                io_bus.clone(),
                mmio_bus.clone(),
                mem.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tsc_khz = vcpus[0].tsc_khz();

    let (entry, cr3) = load_guest(config, &mem, vm.hypervisor(), tsc_khz, &device_cmdline)?;
    if let EntryMode::PvmUser { .. } = entry {
        tracing::info!("the guest runs in PVM user mode, natively");
    }
    let supported_cpuid = vm.supported_cpuid()?;
    for vcpu in &vcpus {
        let boot = (vcpu.index() == 0).then_some((entry, cr3));
        vcpu.configure(&supported_cpuid, config.vcpus, boot)?;
    }

    let console_input = matches!(config.serial, SerialConfig::Stdout).then_some(serial);
    MicroVm::new(
        vm,
        mem,
        vcpus,
        reset_evt,
        console_input,
        subscribers,
        boot_time,
    )
    .map_err(|e| BuildError::EventManager(e.to_string()))
}
