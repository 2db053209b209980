//! Guest physical memory layout.
//!
//! Low memory follows the PC conventions Linux relies on (real-mode IVT and
//! BDA below 0x500, EBDA below 640 KiB, the kernel at 1 MiB). Devices live in
//! a 768 MiB hole below 4 GiB, like Firecracker's, so that guests written for
//! Firecracker (its boot-timer address in particular) work unchanged.

/// GDT written by the VMM for guests that reload their segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT, after the GDT: nothing may be delivered before the guest
/// installs its own.
pub const BOOT_IDT_START: u64 = 0x580;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Room for the PVH memory map: up to 0x6800.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x6800 - 0x6100) / 24;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, and four page directories
/// (0xb000-0xefff), one per GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line, NUL terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area; the MP table lives here, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, from the RSDP on, in the BIOS area where Linux also scans
/// for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of memory above the legacy hole; where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit device hole.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The boot timer's MMIO page: first in the device area, as in Firecracker.
pub const BOOT_TIMER_MMIO_START: u64 = MMIO_GAP_START;
/// virtio-mmio device windows follow the boot timer, one page each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM's TSS for real-mode emulation on VMX: three pages in the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const APIC_START: u64 = 0xfee0_0000;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const I8042_PORT: u16 = 0x60;
/// Firecracker's boot-timer port.
pub const BOOT_TIMER_PORT: u16 = 0x3f0;
/// A 32-bit write here idles the vCPU for at most that many microseconds
/// (see `vstate::guest_wake`).
pub const GUEST_IDLE_PORT: u16 = 0x3f1;

/// QEMU's pvpanic port, which the DSDT names.
pub const PVPANIC_PORT: u16 = 0x505;
/// The ACPI PM1 event block (status and enable, two bytes each), then
/// the PM1 control register (two bytes).
pub const PM1_EVENT_PORT: u16 = 0x600;
pub const PM1_EVENT_LEN: u8 = 4;
pub const PM1_CONTROL_PORT: u16 = 0x604;
pub const PM1_CONTROL_LEN: u8 = 2;
/// The ACPI SCI's line, as on PCs; the VMM never raises it.
pub const ACPI_SCI_IRQ: u16 = 9;

/// Legacy interrupt lines.
pub const COM1_IRQ: u32 = 4;
/// First GSI handed to virtio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Number of IOAPIC pins, and so of GSIs the split irqchip reserves.
pub const IOAPIC_PINS: u32 = 24;

/// Smallest guest the VMM accepts: room for the low-memory structures and a
/// kernel loaded at 1 MiB.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
