//! The device model: a port I/O bus and an MMIO bus, and the devices on
//! them.

pub mod acpi;
pub mod boot_timer;
pub mod bus;
pub mod guest_signals;
pub mod host_socket;
pub mod ioapic;
pub mod legacy;
pub mod virtio;
pub mod watch;

pub use bus::{Bus, BusDevice, BusError};
