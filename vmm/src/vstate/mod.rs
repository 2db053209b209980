//! KVM state: the VM, its guest memory and its vCPUs.

pub mod coalesced_mmio;
pub mod guest_wake;
pub mod memory;
pub mod placement;
pub mod release;
pub mod vcpu;
pub mod vcpu_thread;
pub mod vm;
