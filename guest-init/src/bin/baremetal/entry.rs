//! The three ways in, each of which signals the boot timer first:
//!
//! * `_start`, the ELF entry: the Linux 64-bit boot protocol (long mode,
//!   CPL 0, RSI = `boot_params`), as Firecracker and this VMM use it;
//! * `pvh_start`, named by the PVH note: 32-bit protected mode without
//!   paging, EBX = `hvm_start_info`. It builds its own identity page tables
//!   for the first 4 GiB, the device hole included, and enters long mode;
//! * `pvm_user_start`, named by the MicroVM note: long mode at CPL 3 with the
//!   VMM's user-accessible identity tables, RSI = `boot_params`. A PVM host
//!   runs the guest natively there; no privileged instruction may follow.
//!
//! All three end in `rust_main(boot_info, entry_kind)` on the guest's own
//! stack. At CPL 0 the stubs enable SSE, which compiled Rust uses; at CPL 3
//! the host has it on already.

use super::cpu::EntryKind;

/// Size of the boot stack: the Wasm interpreter and the HTTP parser are
/// the deepest users.
const STACK_SIZE: usize = 1 << 20;

core::arch::global_asm!(
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18", // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".long pvh_start",
    ".popsection",
    ".pushsection .note.MicroVM, \"a\", @note",
    ".balign 4",
    ".long 8",
    ".long 8",
    ".long 1", // MICROVM_NOTE_PVM_USER_ENTRY
    ".asciz \"MicroVM\"",
    ".quad pvm_user_start",
    ".popsection",
    //
    ".pushsection .text.entry, \"ax\"",
    ".code64",
    ".global _start",
    "_start:",
    "mov eax, {boot_timer}",
    "mov byte ptr [rax], 123",
    "mov rax, cr4",
    "or eax, 0x600", // OSFXSR | OSXMMEXCPT
    "mov cr4, rax",
    "mov rax, cr0",
    "and eax, ~0x4", // EM off
    "or eax, 0x2",   // MP on
    "mov cr0, rax",
    "mov rdi, rsi",
    "mov esi, {linux64}",
    "jmp 3f",
    //
    ".global pvm_user_start",
    "pvm_user_start:",
    "mov eax, {boot_timer}",
    "mov byte ptr [rax], 123",
    "mov rdi, rsi",
    "mov esi, {pvm_user}",
    "jmp 3f",
    //
    "3:",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "xor ebp, ebp",
    "call {main}",
    "ud2",
    //
    ".code32",
    ".global pvh_start",
    "pvh_start:",
    "mov byte ptr [{boot_timer}], 123",
    "mov esi, ebx",
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages.
    "mov eax, offset boot_pdpt",
    "or eax, 3",
    "mov dword ptr [boot_pml4], eax",
    "xor ecx, ecx",
    "4:",
    "mov eax, ecx",
    "shl eax, 12",
    "add eax, offset boot_pd",
    "or eax, 3",
    "mov dword ptr [boot_pdpt + ecx * 8], eax",
    "inc ecx",
    "cmp ecx, 4",
    "jb 4b",
    "xor ecx, ecx",
    "5:",
    "mov eax, ecx",
    "shl eax, 21",
    "or eax, 0x83",
    "mov dword ptr [boot_pd + ecx * 8], eax",
    "mov eax, ecx",
    "shr eax, 11",
    "mov dword ptr [boot_pd + ecx * 8 + 4], eax",
    "inc ecx",
    "cmp ecx, 2048",
    "jb 5b",
    "mov eax, offset boot_pml4",
    "mov cr3, eax",
    "mov eax, cr4",
    "or eax, 0x620", // PAE | OSFXSR | OSXMMEXCPT
    "mov cr4, eax",
    "mov ecx, 0xc0000080", // EFER
    "rdmsr",
    "or eax, 0x100", // LME
    "wrmsr",
    "mov eax, cr0",
    "and eax, ~0x4",
    "or eax, 0x80000003", // PG | MP | PE
    "mov cr0, eax",
    "lgdt [boot_gdt_ptr]",
    // ljmp 0x10:pvh_long_mode, encoded by hand: EA, offset32, selector16.
    ".byte 0xea",
    ".long pvh_long_mode",
    ".word 0x10",
    ".code64",
    "pvh_long_mode:",
    "mov eax, 0x18",
    "mov ds, eax",
    "mov es, eax",
    "mov ss, eax",
    "mov edi, esi",
    "mov esi, {pvh}",
    "jmp 3b",
    ".popsection",
    //
    ".pushsection .rodata.boot_gdt, \"a\"",
    ".balign 16",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00cf9b000000ffff",
    ".quad 0x00af9b000000ffff", // 0x10: 64-bit code
    ".quad 0x00cf93000000ffff", // 0x18: data
    "boot_gdt_ptr:",
    ".word 31",
    ".long boot_gdt",
    ".popsection",
    //
    ".pushsection .bss.boot_tables, \"aw\", @nobits",
    ".balign 4096",
    "boot_pml4: .skip 4096",
    "boot_pdpt: .skip 4096",
    "boot_pd: .skip 4096 * 4",
    ".popsection",
    boot_timer = const 0xd000_0000u32,
    linux64 = const EntryKind::Linux64 as u32,
    pvm_user = const EntryKind::PvmUser as u32,
    pvh = const EntryKind::Pvh as u32,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym super::rust_main,
);

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

static mut STACK: Stack = Stack([0; STACK_SIZE]);
