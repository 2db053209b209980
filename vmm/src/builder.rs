//! Builds a ready-to-run microVM from a validated configuration: guest
//! memory, the KVM VM, the kernel and its boot structures, the devices and
//! the vCPUs, in that order.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{self, write_linux_boot_params, write_pvh_start_info};
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_TIMER_MMIO_START, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT,
    I8042_PORT, IOAPIC_SIZE, IOAPIC_START,
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
use crate::devices::{Bus, BusError};
use crate::loader::{self, LoaderError};
use crate::microvm::MicroVm;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{HypervisorKind, KvmMsiRouter, Vm, VmError};

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
    let cmdline = match (kernel.pvm_user_entry, tsc_khz) {
        (Some(_), Some(khz)) if !config.cmdline.contains("tsc_early_khz=") => {
            format!("{} tsc_early_khz={khz}", config.cmdline)
        }
        _ => config.cmdline.clone(),
    };
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

pub fn build_microvm(config: &VmConfig, vmm_start: Instant) -> Result<MicroVm, BuildError> {
    let mem = create_guest_memory(config.mem_mib << 20)?;
    let vm = Vm::new(&mem)?;
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

    let (entry, cr3) = load_guest(config, &mem, vm.hypervisor(), tsc_khz)?;
    if let EntryMode::PvmUser { .. } = entry {
        tracing::info!("the guest runs in PVM user mode, natively");
    }
    let supported_cpuid = vm.supported_cpuid()?;
    for vcpu in &vcpus {
        let boot = (vcpu.index() == 0).then_some((entry, cr3));
        vcpu.configure(&supported_cpuid, config.vcpus, boot)?;
    }

    let console_input = matches!(config.serial, SerialConfig::Stdout).then_some(serial);
    MicroVm::new(vm, mem, vcpus, reset_evt, console_input, boot_time)
        .map_err(|e| BuildError::EventManager(e.to_string()))
}
