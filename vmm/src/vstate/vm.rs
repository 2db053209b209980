//! The KVM VM: capability checks, the interrupt controller choice, memory
//! slots and interrupt routing.
//!
//! Interrupt design: split irqchip (`KVM_CAP_SPLIT_IRQCHIP`), LAPICs in the
//! kernel, the IOAPIC in the VMM (see `devices::ioapic`), no PIC and no PIT.
//! Measured on a PVM host, a VM with the full in-kernel irqchip and PIT
//! takes about 5 ms longer to set up and 13-18 ms longer to tear down than
//! a split irqchip; the split irqchip is also what lets an exiting VMM be
//! gone in a couple of milliseconds. Linux needs neither PIC nor PIT when
//! the CPU has a TSC-deadline LAPIC timer and kvmclock, both of which the
//! in-kernel LAPIC and KVM's paravirtual CPUID provide; it finds no PIC
//! (the probe of port 0x21 reads back 0xff) and routes everything through
//! the IOAPIC described in the MP table.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, kvm_irq_routing_entry, kvm_userspace_memory_region, CpuId,
    KvmIrqRouting, KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_CPUID_ENTRIES,
};
use std::os::fd::FromRawFd;

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::memory::region_mappings;
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout::{IOAPIC_PINS, KVM_TSS_ADDRESS};
use crate::devices::ioapic::{MsiRoute, MsiRouter};

/// What provides `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HypervisorKind {
    /// KVM on hardware virtualization (VMX or SVM).
    Hardware,
    /// PVM: paravirtual KVM without hardware virtualization. Guests that are
    /// not PVM-aware run in KVM's instruction emulator.
    Pvm,
}

impl HypervisorKind {
    /// PVM is a kernel module of its own (`kvm_pvm`); hardware KVM is
    /// `kvm_intel` or `kvm_amd`.
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HypervisorKind::Pvm
        } else {
            HypervisorKind::Hardware
        }
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pvm" => Ok(HypervisorKind::Pvm),
            "hardware" => Ok(HypervisorKind::Hardware),
            other => Err(format!("{other:?} is neither pvm nor hardware")),
        }
    }
}

/// How the VMM reaches KVM: `/dev/kvm`, or a descriptor a jailer opened
/// before it dropped its privileges; and which kind of KVM it is, which a
/// jailed VMM cannot look up in `/sys`.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmAccess {
    pub fd: Option<std::os::fd::RawFd>,
    pub kind: Option<HypervisorKind>,
}

/// An open `/dev/kvm`: what the host offers before any VM exists.
pub struct KvmSystem {
    kvm: Kvm,
    hypervisor: HypervisorKind,
}

impl KvmSystem {
    pub fn open(access: KvmAccess) -> Result<Self, VmError> {
        let kvm = match access.fd {
            // SAFETY: the caller hands this process the descriptor to own;
            // KVM_GET_API_VERSION below checks that it is KVM.
            Some(fd) => unsafe { Kvm::from_raw_fd(fd) },
            None => Kvm::new().map_err(VmError::OpenKvm)?,
        };
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(VmError::NotKvm(access.fd));
        }
        Ok(Self {
            kvm,
            hypervisor: access.kind.unwrap_or_else(HypervisorKind::detect),
        })
    }

    /// KVM_GET_SUPPORTED_CPUID: slow (0.3-0.4 ms on a PVM host), and
    /// independent of any VM, so callers run it beside other set-up.
    ///
    /// KVM leaves out the TSC-deadline timer, which its in-kernel LAPIC
    /// emulates, and has it announced by `KVM_CAP_TSC_DEADLINE_TIMER`
    /// instead (Documentation/virt/kvm/api.rst). Without it and without a
    /// PIT, Linux cannot calibrate its LAPIC timer and has no clock event
    /// device: nothing that sleeps wakes.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        if self.kvm.check_extension(Cap::TscDeadlineTimer) {
            cpuid::offer_tsc_deadline_timer(&mut cpuid);
        }
        Ok(cpuid)
    }
}

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypervisorKind::Hardware => "hardware KVM",
            HypervisorKind::Pvm => "PVM (paravirtual KVM)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("descriptor {0:?} is not /dev/kvm (KVM_GET_API_VERSION failed)")]
    NotKvm(Option<std::os::fd::RawFd>),
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot enable the split irqchip: {0}")]
    SplitIrqchip(kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("cannot register guest memory with KVM: {0}")]
    MemoryRegion(kvm_ioctls::Error),
    #[error("cannot read the supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot {0} the VM's clock: {1}")]
    Clock(&'static str, kvm_ioctls::Error),
    #[error("cannot list the MSRs KVM saves: {0}")]
    MsrList(kvm_ioctls::Error),
    #[error("cannot register an irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot queue MMIO writes to {addr:#x}+{len:#x}: {source}")]
    CoalescedZone {
        addr: u64,
        len: u32,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    system: Arc<KvmSystem>,
    fd: Arc<VmFd>,
    max_vcpus: usize,
    /// Whether KVM can queue MMIO writes (`KVM_CAP_COALESCED_MMIO`).
    coalesced_mmio: bool,
}

impl Vm {
    /// A VM with its interrupt controller and no memory yet.
    pub fn new(system: Arc<KvmSystem>) -> Result<Self, VmError> {
        let kvm = &system.kvm;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;

        // VMX needs a TSS for real-mode emulation; other hosts ignore it.
        if kvm.check_extension(Cap::SetTssAddr) {
            fd.set_tss_address(KVM_TSS_ADDRESS as usize)
                .map_err(VmError::TssAddress)?;
        }
        let mut split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        split.args[0] = u64::from(IOAPIC_PINS);
        fd.enable_cap(&split).map_err(VmError::SplitIrqchip)?;

        // Ask for the instruction bytes with emulation failures, so they can
        // be reported even when RIP's page is unreadable. Optional.
        if fd.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) > 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                ..Default::default()
            };
            cap.args[0] = 1;
            if let Err(e) = fd.enable_cap(&cap) {
                tracing::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not enabled: {e}");
            }
        }

        let max_vcpus = kvm.get_max_vcpus();
        let coalesced_mmio = kvm.check_extension(Cap::CoalescedMmio);
        Ok(Self {
            system,
            fd: Arc::new(fd),
            max_vcpus,
            coalesced_mmio,
        })
    }

    /// Gives the guest `mem`, whose mappings must outlive the VM.
    pub fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, (host, guest, size)) in region_mappings(mem).into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: guest,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping of guest memory, owned by
            // `mem`, which outlives the VM in every caller.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    pub fn hypervisor(&self) -> HypervisorKind {
        self.system.hypervisor
    }

    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    pub fn has_coalesced_mmio(&self) -> bool {
        self.coalesced_mmio
    }

    /// Has KVM queue guest writes to `addr..addr + len` in the coalesced
    /// MMIO ring (see `vstate::coalesced_mmio`). Without the capability
    /// the writes leave `KVM_RUN` as usual.
    pub fn queue_mmio_writes(&self, addr: u64, len: u32) -> Result<(), VmError> {
        if !self.coalesced_mmio {
            return Ok(());
        }
        self.fd
            .register_coalesced_mmio(kvm_ioctls::IoEventAddress::Mmio(addr), len)
            .map_err(|source| VmError::CoalescedZone { addr, len, source })
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.system.supported_cpuid()
    }

    /// The MSRs that make up a vCPU's state, as KVM lists them for
    /// migration.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        self.system
            .kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(VmError::MsrList)
    }

    /// kvmclock's reference point, which a restored VM continues from.
    pub fn clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(|e| VmError::Clock("read", e))
    }

    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), VmError> {
        // Only the time: the flags KVM reports back are not for setting.
        let clock = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmError::Clock("set", e))
    }

    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}

/// Programs IOAPIC pin routes into KVM's GSI routing table.
pub struct KvmMsiRouter(pub Arc<VmFd>);

impl MsiRouter for KvmMsiRouter {
    fn set_routes(&mut self, routes: &[MsiRoute]) -> std::io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|route| {
                let mut entry = kvm_irq_routing_entry {
                    gsi: route.gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi.address_lo = route.address as u32;
                entry.u.msi.address_hi = (route.address >> 32) as u32;
                entry.u.msi.data = route.data;
                entry
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        self.0
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
