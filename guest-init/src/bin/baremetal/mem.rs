//! The C memory functions compiled code calls, which a libc would provide,
//! for the guest's two freestanding programs (the bare-metal guest and the
//! Linux PID 1).
//! String instructions, so the compiler cannot turn them back into calls.

#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _,
            inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No overlap that a forward copy would clobber.
        // SAFETY: as memcpy.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: a backward copy from the last byte; the direction flag is
    // restored before returning, as the ABI requires.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            inout("rcx") n => _, options(nostack));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The personality routine unwinding would call. The guest aborts on panic,
/// but the precompiled `core` still refers to the symbol.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Landing pads in the precompiled `alloc` call this to continue
/// unwinding. Nothing unwinds here, so it is never reached; if it were,
/// the invalid opcode stops the program.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: raises #UD; it does not return.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
