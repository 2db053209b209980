//! x86_64 boot-time machine setup: the guest physical layout and the
//! structures the Linux and PVH boot protocols expect to find in memory
//! and in the vCPU registers.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
