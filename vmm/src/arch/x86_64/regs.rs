//! Initial vCPU register state for each entry protocol.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{
    self, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR, USER_CODE64_SELECTOR,
    USER_DATA_SELECTOR,
};
use super::layout::{BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_FIXED: u64 = 0x2;
const RFLAGS_IF: u64 = 1 << 9;

/// How the guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI points
    /// to `boot_params`.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode without paging, EBX points to
    /// `hvm_start_info`.
    Pvh { entry: u64 },
    /// PVM user mode: long mode at CPL 3 with interrupts enabled, on
    /// user-accessible identity page tables, RSI pointing to `boot_params`.
    /// A PVM host runs this natively instead of in its instruction emulator;
    /// only guests that declare they need no privileged instructions get it.
    PvmUser { entry: u64 },
}

impl EntryMode {
    pub fn entry_point(&self) -> u64 {
        match *self {
            EntryMode::Linux64 { entry }
            | EntryMode::Pvh { entry }
            | EntryMode::PvmUser { entry } => entry,
        }
    }
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: RFLAGS_FIXED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: RFLAGS_FIXED,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::PvmUser { entry } => kvm_regs {
            rflags: RFLAGS_FIXED | RFLAGS_IF,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Applies the segment, descriptor-table and control registers of `mode`
/// on top of the vCPU's reset state.
pub fn apply_boot_sregs(sregs: &mut kvm_sregs, mode: EntryMode, cr3: u64) {
    let data = gdt::boot_segment(match mode {
        EntryMode::PvmUser { .. } => USER_DATA_SELECTOR,
        _ => DATA_SELECTOR,
    });
    sregs.gdt = gdt::gdt_table_register();
    sregs.idt = gdt::idt_table_register();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::boot_segment(TSS_SELECTOR);
    match mode {
        EntryMode::Linux64 { .. } | EntryMode::PvmUser { .. } => {
            sregs.cs = gdt::boot_segment(match mode {
                EntryMode::PvmUser { .. } => USER_CODE64_SELECTOR,
                _ => CODE64_SELECTOR,
            });
            sregs.cr3 = cr3;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cs = gdt::boot_segment(CODE32_SELECTOR);
            sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// x87 and SSE control words at their architectural reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_enters_long_mode_with_boot_params_in_rsi() {
        let mode = EntryMode::Linux64 { entry: 0x100_0000 };
        let regs = boot_regs(mode);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );
        let mut sregs = kvm_sregs::default();
        apply_boot_sregs(&mut sregs, mode, 0x9000);
        assert_eq!(sregs.cs.selector, 0x10, "__BOOT_CS");
        assert_eq!(sregs.ds.selector, 0x18, "__BOOT_DS");
        assert_eq!(sregs.ss.selector, 0x18);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn pvm_user_mode_enters_long_mode_at_cpl3_with_interrupts_on() {
        let mode = EntryMode::PvmUser { entry: 0x100_0000 };
        let regs = boot_regs(mode);
        assert_eq!(regs.rflags, 0x202);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        let mut sregs = kvm_sregs::default();
        apply_boot_sregs(&mut sregs, mode, 0x9000);
        assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (0x33, 3, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.dpl), (0x2b, 3));
        assert_eq!(sregs.ds.dpl, 3);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn pvh_enters_protected_mode_without_paging() {
        let mode = EntryMode::Pvh { entry: 0x100_0040 };
        let regs = boot_regs(mode);
        assert_eq!((regs.rip, regs.rbx), (0x100_0040, PVH_INFO_START));
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        apply_boot_sregs(&mut sregs, mode, 0);
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(sregs.efer, 0);
    }
}
