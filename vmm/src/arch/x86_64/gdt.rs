//! The boot GDT and the segment registers built from it.
//!
//! The table has Linux's own layout, so every selector means what a Linux
//! guest, and a PVM host, expect: the 64-bit boot protocol asks for flat
//! `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18); PVH for any flat 32-bit code
//! segment (`__KERNEL32_CS`, 0x08); and a PVM guest in user mode runs on the
//! host's `__USER_CS` (0x33) and `__USER_DS` (0x2b), which must be DPL 3
//! descriptors at those indices.

use kvm_bindings::{kvm_dtable, kvm_segment};

/// `__KERNEL32_CS`: the 32-bit code segment of the PVH entry.
pub const CODE32_SELECTOR: u16 = 0x08;
/// `__BOOT_CS` / `__KERNEL_CS`.
pub const CODE64_SELECTOR: u16 = 0x10;
/// `__BOOT_DS` / `__KERNEL_DS`.
pub const DATA_SELECTOR: u16 = 0x18;
/// `__USER_DS`, with RPL 3.
pub const USER_DATA_SELECTOR: u16 = 0x2b;
/// `__USER_CS`, with RPL 3.
pub const USER_CODE64_SELECTOR: u16 = 0x33;
/// The TSS, which KVM requires to be valid in long mode. A 64-bit TSS
/// descriptor takes two slots (8 and 9).
pub const TSS_SELECTOR: u16 = 0x40;

/// The table, as written to guest memory.
pub const BOOT_GDT: [u64; 10] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // __KERNEL32_CS: code, 32-bit, DPL 0
    gdt_entry(0xa09b, 0, 0xfffff), // __KERNEL_CS: code, 64-bit, DPL 0
    gdt_entry(0xc093, 0, 0xfffff), // __KERNEL_DS: data, writable, DPL 0
    gdt_entry(0xc0fb, 0, 0xfffff), // __USER32_CS: code, 32-bit, DPL 3
    gdt_entry(0xc0f3, 0, 0xfffff), // __USER_DS: data, writable, DPL 3
    gdt_entry(0xa0fb, 0, 0xfffff), // __USER_CS: code, 64-bit, DPL 3
    0,
    gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS, low half
    0,                             // TSS, high half: base bits 63:32
];

/// Packs a descriptor from its flags (the type/S/DPL/P byte in bits 0-7 and
/// the AVL/L/D/G nibble in bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Unpacks a descriptor into the form KVM wants in `kvm_sregs`.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With 4 KiB granularity KVM wants the limit in bytes.
        limit: if granular == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The segment for a selector of [`BOOT_GDT`], keeping the selector's RPL.
pub fn boot_segment(selector: u16) -> kvm_segment {
    let index = usize::from(selector / 8);
    kvm_segment {
        selector,
        ..kvm_segment_from_gdt(BOOT_GDT[index], index as u8)
    }
}

pub fn gdt_table_register() -> kvm_dtable {
    kvm_dtable {
        base: super::layout::BOOT_GDT_START,
        limit: (std::mem::size_of_val(&BOOT_GDT) - 1) as u16,
        padding: [0; 3],
    }
}

pub fn idt_table_register() -> kvm_dtable {
    kvm_dtable {
        base: super::layout::BOOT_IDT_START,
        limit: 7,
        padding: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_is_a_flat_long_mode_code_segment() {
        let cs = boot_segment(CODE64_SELECTOR);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.dpl), (1, 0, 1, 1, 0));
        assert_eq!(cs.type_, 0xb, "execute/read, accessed");
    }

    #[test]
    fn data_is_flat_and_writable() {
        let ds = boot_segment(DATA_SELECTOR);
        assert_eq!(ds.selector, 0x18);
        assert_eq!(ds.limit, 0xffff_ffff);
        assert_eq!(ds.type_, 0x3, "read/write, accessed");
        assert_eq!((ds.db, ds.g, ds.unusable), (1, 1, 0));
    }

    #[test]
    fn code32_is_a_flat_protected_mode_code_segment() {
        let cs = boot_segment(CODE32_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.g), (0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn gdt_ends_before_the_idt() {
        let end = super::super::layout::BOOT_GDT_START + std::mem::size_of_val(&BOOT_GDT) as u64;
        assert!(end <= super::super::layout::BOOT_IDT_START);
    }

    #[test]
    fn user_segments_are_dpl3_at_the_linux_indices() {
        let cs = boot_segment(USER_CODE64_SELECTOR);
        assert_eq!(
            (cs.selector & !3, cs.dpl, cs.l, cs.type_),
            (0x30, 3, 1, 0xb)
        );
        let ds = boot_segment(USER_DATA_SELECTOR);
        assert_eq!((ds.selector & !3, ds.dpl, ds.type_), (0x28, 3, 0x3));
    }

    #[test]
    fn tss_is_a_busy_system_descriptor() {
        let tr = boot_segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }

    #[test]
    fn entry_encoding_matches_the_architecture_manual() {
        // A flat 32-bit code segment, as every OS writes it.
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
