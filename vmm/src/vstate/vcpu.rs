//! vCPUs: boot-time register setup and the `KVM_RUN` loop that dispatches
//! port I/O and MMIO exits to the device buses.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::SIGRTMIN;

use super::coalesced_mmio::CoalescedMmio;
use super::guest_wake::GuestWake;
use crate::arch::x86_64::layout::GUEST_IDLE_PORT;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::Bus;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// Set by KVM when `emulation_failure` carries the instruction bytes.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
const X86_MAX_INSTRUCTION_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot set {what}: {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {total} boot MSRs")]
    PartialMsrs { index: u8, set: usize, total: usize },
    #[error("vCPU {index}: {source}")]
    Msrs { index: u8, source: msr::MsrError },
    #[error("vCPU {index}: cannot read {what}: {source}")]
    Save {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: the snapshot's {what} list: {source}")]
    List {
        index: u8,
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error("vCPU {index}: KVM took only {set} of the snapshot's {total} MSRs")]
    PartialRestoreMsrs { index: u8, set: usize, total: usize },
    #[error("cannot map the coalesced MMIO ring: {0}")]
    CoalescedMmio(std::io::Error),
}

/// Everything KVM holds for one vCPU, as a snapshot keeps it. The FPU
/// and SSE state are inside `xsave`.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

/// What the VMM asks of a paused vCPU thread.
pub enum VcpuCommand {
    /// Read the vCPU's state; the MSRs are those of this list that KVM
    /// can read.
    Save(Arc<Vec<u32>>),
    Resume,
}

pub enum VcpuReply {
    /// Out of `KVM_RUN`, with any emulated I/O completed.
    Paused,
    Saved(Result<Box<VcpuState>, VcpuError>),
}

/// The VMM's line to a vCPU thread: the shared pause flag, set before
/// the thread is kicked, and a command channel that only a paused thread
/// reads.
pub struct VcpuControl {
    pub pause: Arc<AtomicBool>,
    pub commands: Receiver<VcpuCommand>,
    pub replies: Sender<VcpuReply>,
}

/// MSRs are read in batches of this many.
const MSR_BATCH: usize = 64;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest rebooted (triple fault or a reset system event).
    Reset(&'static str),
    /// The guest powered off or halted for good.
    Shutdown(&'static str),
    /// The VMM asked the vCPU to stop.
    Kicked,
    /// Something went wrong that the guest cannot recover from.
    Fault(String),
}

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick signal.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal handler that makes this thread's vCPU leave (or not enter)
/// `KVM_RUN`. Only touches an initialized thread-local, which is
/// async-signal-safe.
pub extern "C" fn kick_signal_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: set by `Vcpu::run` to a byte of this thread's live
            // kvm_run mapping, and cleared before that mapping goes away.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Applies the MMIO writes KVM queued, before anything else reaches the
/// devices.
fn apply_queued_writes(ring: Option<&CoalescedMmio>, mmio_bus: &Bus) {
    if let Some(ring) = ring {
        ring.drain(mmio_bus);
    }
}

/// A vCPU before its devices: created and configured, on whichever thread
/// has the time (the boot vCPU's own, during a boot), and attached to the
/// device buses by the builder.
pub struct BareVcpu {
    fd: VcpuFd,
    index: u8,
    /// What `configure` or `restore` gave the vCPU, kept for snapshots.
    cpuid: Vec<kvm_cpuid_entry2>,
}

impl BareVcpu {
    pub fn create(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            fd,
            index,
            cpuid: Vec::new(),
        })
    }

    /// The guest TSC rate KVM runs this vCPU at.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&khz| khz > 0)
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    }

    /// Programs CPUID, MSRs, FPU and LAPIC: everything but where the vCPU
    /// starts, which needs the loaded kernel (see [`BareVcpu::set_boot_entry`],
    /// for the boot vCPU only). Other vCPUs wait for INIT/SIPI, which the
    /// in-kernel LAPIC handles. Without `supported_cpuid` the vCPU gets no
    /// CPUID table, for a guest that cannot read one: at CPL 3 in PVM user
    /// mode CPUID is the host's instruction, not a VM exit.
    pub fn configure(
        &mut self,
        supported_cpuid: Option<&CpuId>,
        vcpu_count: u8,
    ) -> Result<(), VcpuError> {
        if let Some(supported) = supported_cpuid {
            let mut cpuid = supported.clone();
            cpuid::filter_cpuid(&mut cpuid, self.index, vcpu_count);
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(self.setup_err("CPUID"))?;
            self.cpuid = cpuid.as_slice().to_vec();
        }

        let msrs = msr::boot_msrs().map_err(|source| VcpuError::Msrs {
            index: self.index,
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.setup_err("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set,
                total: msrs.as_slice().len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.setup_err("FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.setup_err("LAPIC"))?;
        set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(self.setup_err("LAPIC"))?;
        Ok(())
    }

    /// Points the boot vCPU at the kernel's entry, in `mode`, with the
    /// page tables at `cr3`. After [`BareVcpu::configure`]: KVM checks the
    /// control registers against the vCPU's CPUID.
    pub fn set_boot_entry(&mut self, mode: regs::EntryMode, cr3: u64) -> Result<(), VcpuError> {
        self.fd
            .set_regs(&regs::boot_regs(mode))
            .map_err(self.setup_err("registers"))?;
        let mut sregs = self.fd.get_sregs().map_err(self.setup_err("sregs"))?;
        regs::apply_boot_sregs(&mut sregs, mode, cr3);
        self.fd.set_sregs(&sregs).map_err(self.setup_err("sregs"))
    }

    /// Puts a saved state back, in the order KVM needs: CPUID before
    /// anything that depends on it, the LAPIC before the MSRs (the TSC
    /// deadline lives in both), pending events last.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        // Empty for a guest that had none (see `configure`).
        if !state.cpuid.is_empty() {
            let cpuid = CpuId::from_entries(&state.cpuid).map_err(|source| VcpuError::List {
                index: self.index,
                what: "CPUID",
                source,
            })?;
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(self.setup_err("CPUID"))?;
        }
        self.cpuid = state.cpuid.clone();
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.setup_err("MP state"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.setup_err("registers"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.setup_err("sregs"))?;
        // SAFETY: the buffer is a whole kvm_xsave, as KVM_GET_XSAVE wrote
        // it; KVM validates its contents.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.setup_err("XSAVE state"))?;
        // On a host without XSAVE, KVM saves no XCRs and refuses to set
        // any (EINVAL), even none: every restore there failed.
        if state.xcrs.nr_xcrs > 0 {
            self.fd
                .set_xcrs(&state.xcrs)
                .map_err(self.setup_err("XCRs"))?;
        }
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(self.setup_err("debug registers"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.setup_err("LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|source| VcpuError::List {
            index: self.index,
            what: "MSR",
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.setup_err("MSRs"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::PartialRestoreMsrs {
                index: self.index,
                set,
                total: state.msrs.len(),
            });
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.setup_err("pending events"))
    }
}

pub struct Vcpu {
    bare: BareVcpu,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    mem: GuestMemoryMmap,
    /// The VM's queue of MMIO writes, applied each time `KVM_RUN` returns.
    coalesced_mmio: Option<Arc<CoalescedMmio>>,
    wake: GuestWake,
}

impl Vcpu {
    pub fn attach(
        bare: BareVcpu,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        mem: GuestMemoryMmap,
        wake: GuestWake,
    ) -> Self {
        Self {
            bare,
            io_bus,
            mmio_bus,
            mem,
            coalesced_mmio: None,
            wake,
        }
    }

    /// Maps the VM's coalesced MMIO ring through this vCPU.
    pub fn map_coalesced_mmio(&self) -> Result<CoalescedMmio, VcpuError> {
        CoalescedMmio::map(&self.bare.fd).map_err(VcpuError::CoalescedMmio)
    }

    pub fn use_coalesced_mmio(&mut self, ring: Arc<CoalescedMmio>) {
        self.coalesced_mmio = Some(ring);
    }

    pub fn coalesced_mmio(&self) -> Option<&Arc<CoalescedMmio>> {
        self.coalesced_mmio.as_ref()
    }

    pub fn index(&self) -> u8 {
        self.bare.index
    }

    /// Runs the guest until it stops, or until `stop` is set and the thread
    /// is kicked with the signal whose handler is [`kick_signal_handler`].
    /// While `control.pause` is set, the thread leaves `KVM_RUN` and
    /// serves `control`'s commands instead.
    pub fn run(mut self, stop: &AtomicBool, control: &VcpuControl) -> VcpuStop {
        let immediate_exit = std::ptr::addr_of_mut!(self.bare.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let result = loop {
            if stop.load(Ordering::Acquire) {
                break VcpuStop::Kicked;
            }
            if control.pause.load(Ordering::Acquire) {
                if self.paused(control).is_err() {
                    break VcpuStop::Kicked;
                }
                continue;
            }
            if let Some(stopped) = self.run_once() {
                break stopped;
            }
        };
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    /// Serves commands until told to resume. `Err` when the VMM hung up.
    fn paused(&mut self, control: &VcpuControl) -> Result<(), ()> {
        // KVM finishes an emulated port or MMIO read on the next KVM_RUN;
        // with immediate_exit set that run does nothing else, so the
        // registers saved below hold the read's result.
        self.bare.fd.set_kvm_immediate_exit(1);
        let _ = self.bare.fd.run();
        self.bare.fd.set_kvm_immediate_exit(0);
        apply_queued_writes(self.coalesced_mmio.as_deref(), &self.mmio_bus);
        control.replies.send(VcpuReply::Paused).map_err(|_| ())?;
        loop {
            match control.commands.recv().map_err(|_| ())? {
                VcpuCommand::Save(msr_indices) => {
                    let state = self.save_state(&msr_indices).map(Box::new);
                    control
                        .replies
                        .send(VcpuReply::Saved(state))
                        .map_err(|_| ())?;
                }
                VcpuCommand::Resume => return Ok(()),
            }
        }
    }

    fn save_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.bare.index;
        move |source| VcpuError::Save {
            index,
            what,
            source,
        }
    }

    /// Reads the vCPU's state. Of `msr_indices`, the MSRs KVM refuses to
    /// read (absent on this CPU) are left out.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let fd = &self.bare.fd;
        Ok(VcpuState {
            cpuid: self.bare.cpuid.clone(),
            msrs: self.read_msrs(msr_indices)?,
            regs: fd.get_regs().map_err(self.save_err("registers"))?,
            sregs: fd.get_sregs().map_err(self.save_err("sregs"))?,
            xsave: fd.get_xsave().map_err(self.save_err("XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(self.save_err("XCRs"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(self.save_err("debug registers"))?,
            lapic: fd.get_lapic().map_err(self.save_err("LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(self.save_err("MP state"))?,
            events: fd
                .get_vcpu_events()
                .map_err(self.save_err("pending events"))?,
        })
    }

    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut saved = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSR_BATCH)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuError::List {
                index: self.bare.index,
                what: "MSR",
                source,
            })?;
            let read = self
                .bare
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.save_err("MSRs"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
            // KVM stops at the first MSR it cannot read: skip that one.
            rest = &rest[(read + 1).min(rest.len())..];
        }
        Ok(saved)
    }

    /// The guest has nothing to do for up to `timeout` (see `guest_wake`).
    /// A kick ends the sleep as it would end `KVM_RUN`.
    fn idle(&self, timeout: Duration) {
        self.wake.wait(timeout, SIGRTMIN(), || {
            IMMEDIATE_EXIT.with(|p| {
                let p = p.get();
                // SAFETY: as in the kick handler.
                !p.is_null() && unsafe { std::ptr::read_volatile(p) } != 0
            })
        });
    }

    /// One `KVM_RUN`; `Some` when the vCPU must not run again.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let index = self.bare.index;
        let exit = self.bare.fd.run();
        // The queued writes came before the access that ended this run.
        apply_queued_writes(self.coalesced_mmio.as_deref(), &self.mmio_bus);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(GUEST_IDLE_PORT, data)) => {
                let mut micros = [0u8; 4];
                let n = data.len().min(4);
                micros[..n].copy_from_slice(&data[..n]);
                self.idle(Duration::from_micros(u64::from(u32::from_le_bytes(micros))));
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.io_bus.write(u64::from(port), data) {
                    tracing::trace!("vCPU {index}: unhandled write to port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio_bus.write(addr, data) {
                    tracing::trace!("vCPU {index}: unhandled MMIO write to {addr:#x}");
                }
                None
            }
            // Edge-triggered pins need no EOI handling.
            Ok(VcpuExit::IoapicEoi(_)) => None,
            Ok(VcpuExit::Hlt) => Some(VcpuStop::Shutdown("the guest halted")),
            Ok(VcpuExit::Shutdown) => {
                // A reboot (Linux's reboot=t) or a crash: which one, the
                // state at the fault tells.
                tracing::info!("{}", self.describe_triple_fault());
                Some(VcpuStop::Reset("triple fault"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::Shutdown("system event: shutdown"),
                KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset("system event: reset"),
                KVM_SYSTEM_EVENT_CRASH => {
                    VcpuStop::Fault(format!("vCPU {index}: the guest crashed"))
                }
                other => VcpuStop::Fault(format!("vCPU {index}: unknown system event {other}")),
            }),
            Ok(VcpuExit::InternalError) => Some(VcpuStop::Fault(self.describe_internal_error())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VcpuStop::Fault(format!(
                "vCPU {index}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ))),
            Ok(other) => Some(VcpuStop::Fault(format!(
                "vCPU {index}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.bare.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VcpuStop::Fault(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` with everything needed to
    /// tell what the guest was doing: suberror, RIP and the instruction.
    fn describe_internal_error(&mut self) -> String {
        let run = self.bare.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // (and, for emulation failures, its `emulation_failure` view) is the
        // active member of the union.
        let (suberror, ndata, data) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let kvm_bytes = if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: as above.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            // SAFETY: plain bytes; valid whichever union member is live.
            let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            (ef.flags & EMULATION_FLAG_INSTRUCTION_BYTES != 0).then(|| {
                let n = usize::from(insn.insn_size).min(X86_MAX_INSTRUCTION_LEN);
                insn.insn_bytes[..n].to_vec()
            })
        } else {
            None
        };
        let name = match suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "event delivery failure",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        let rip = self.bare.fd.get_regs().map(|r| r.rip).ok();
        let bytes = kvm_bytes.or_else(|| rip.and_then(|rip| self.instruction_bytes(rip)));
        let rip = rip.map_or_else(|| "unknown".to_string(), |r| format!("{r:#x}"));
        let bytes = bytes.map_or_else(
            || "unreadable".to_string(),
            |b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        );
        let extra: Vec<String> = data
            .iter()
            .take(ndata.min(16) as usize)
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "vCPU {}: KVM internal error: exit reason KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({name}), RIP {rip}, instruction bytes at RIP: {bytes}, data: [{}]",
            self.bare.index,
            extra.join(", ")
        )
    }

    /// Where the guest was when it triple-faulted: RIP, the mode it ran
    /// in and the control registers.
    fn describe_triple_fault(&self) -> String {
        let index = self.bare.index;
        match (self.bare.fd.get_regs(), self.bare.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => format!(
                "vCPU {index}: triple fault at RIP {:#x} (CS {:#x}, long mode {}), RSP {:#x}, CR0 {:#x}, CR2 {:#x}, CR3 {:#x}, CR4 {:#x}, EFER {:#x}",
                regs.rip,
                sregs.cs.selector,
                sregs.cs.l,
                regs.rsp,
                sregs.cr0,
                sregs.cr2,
                sregs.cr3,
                sregs.cr4,
                sregs.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("vCPU {index}: triple fault (registers unreadable: {e})"),
        }
    }

    /// Reads the bytes at a guest virtual address, through the guest's
    /// page tables.
    fn instruction_bytes(&self, rip: u64) -> Option<Vec<u8>> {
        let gpa = match self.bare.fd.translate_gva(rip) {
            Ok(t) if t.valid != 0 => t.physical_address,
            _ => rip,
        };
        let mut bytes = vec![0u8; X86_MAX_INSTRUCTION_LEN];
        self.mem
            .read_slice(&mut bytes, GuestAddress(gpa))
            .ok()
            .map(|_| bytes)
    }
}

fn set_lvt_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let raw = &mut lapic.regs[reg..reg + 4];
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(raw.iter()) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in raw.iter_mut().zip(value.to_le_bytes()) {
        *r = b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_changes_only_bits_8_to_10() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x31;
        lapic.regs[APIC_LVT0 + 1] = 0x07;
        lapic.regs[APIC_LVT0 + 2] = 0x01; // masked
        set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x31);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x04);
        assert_eq!(lapic.regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
