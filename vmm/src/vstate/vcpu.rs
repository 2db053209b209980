//! vCPUs: boot-time register setup and the `KVM_RUN` loop that dispatches
//! port I/O and MMIO exits to the device buses.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_lapic_state, CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
}

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

pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    mem: GuestMemoryMmap,
}

impl Vcpu {
    pub fn new(
        vm: &VmFd,
        index: u8,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            fd,
            index,
            io_bus,
            mmio_bus,
            mem,
        })
    }

    pub fn index(&self) -> u8 {
        self.index
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

    /// Programs CPUID, MSRs, FPU and LAPIC for every vCPU, and the entry
    /// registers for the boot vCPU. Other vCPUs wait for INIT/SIPI, which
    /// the in-kernel LAPIC handles.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        boot: Option<(regs::EntryMode, u64)>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter_cpuid(&mut cpuid, self.index, vcpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("CPUID"))?;

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

        if let Some((mode, cr3)) = boot {
            self.fd
                .set_regs(&regs::boot_regs(mode))
                .map_err(self.setup_err("registers"))?;
            let mut sregs = self.fd.get_sregs().map_err(self.setup_err("sregs"))?;
            regs::apply_boot_sregs(&mut sregs, mode, cr3);
            self.fd.set_sregs(&sregs).map_err(self.setup_err("sregs"))?;
        }
        Ok(())
    }

    /// Runs the guest until it stops, or until `stop` is set and the thread
    /// is kicked with the signal whose handler is [`kick_signal_handler`].
    pub fn run(mut self, stop: &AtomicBool) -> VcpuStop {
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let result = loop {
            if stop.load(Ordering::Acquire) {
                break VcpuStop::Kicked;
            }
            if let Some(stopped) = self.run_once() {
                break stopped;
            }
        };
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    /// One `KVM_RUN`; `Some` when the vCPU must not run again.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
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
            Ok(VcpuExit::Shutdown) => Some(VcpuStop::Reset("triple fault")),
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
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VcpuStop::Fault(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` with everything needed to
    /// tell what the guest was doing: suberror, RIP and the instruction.
    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
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
        let rip = self.fd.get_regs().map(|r| r.rip).ok();
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
            self.index,
            extra.join(", ")
        )
    }

    /// Reads the bytes at a guest virtual address, through the guest's
    /// page tables.
    fn instruction_bytes(&self, rip: u64) -> Option<Vec<u8>> {
        let gpa = match self.fd.translate_gva(rip) {
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
