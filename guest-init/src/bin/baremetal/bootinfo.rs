//! The command line and RAM map the VMM handed over, read from Linux
//! `boot_params` or PVH `hvm_start_info` in identity-mapped memory.

use super::cpu::EntryKind;

const MAX_RAM_RANGES: usize = 32;
const CMDLINE_MAX: usize = 4096;
const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, Clone, Copy, Default)]
pub struct RamRange {
    pub start: u64,
    pub end: u64,
}

pub struct BootInfo {
    pub cmdline: &'static str,
    ram: [RamRange; MAX_RAM_RANGES],
    ram_count: usize,
}

/// Reads a `T` at a guest physical address.
///
/// # Safety
/// The address must be identity mapped and hold a `T`.
unsafe fn read<T: Copy>(addr: u64) -> T {
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// # Safety
/// `addr` must be 0 or point to identity-mapped memory.
unsafe fn c_string(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    // SAFETY: per the caller; the scan is bounded.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, CMDLINE_MAX) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(0);
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

impl BootInfo {
    /// # Safety
    /// `info` must be what the entry stub received for `kind`.
    pub unsafe fn parse(info: u64, kind: EntryKind) -> Self {
        let mut boot = BootInfo {
            cmdline: "",
            ram: [RamRange::default(); MAX_RAM_RANGES],
            ram_count: 0,
        };
        // SAFETY: the offsets are those of the two boot protocols; the VMM
        // identity-maps the structures.
        unsafe {
            match kind {
                EntryKind::Pvh => {
                    if read::<u32>(info) != XEN_HVM_START_MAGIC {
                        return boot;
                    }
                    boot.cmdline = c_string(read::<u64>(info + 24));
                    let map: u64 = read(info + 40);
                    let entries: u32 = read(info + 48);
                    for i in 0..u64::from(entries) {
                        let e = map + i * 24;
                        boot.add(read(e), read(e + 8), read(e + 16));
                    }
                }
                EntryKind::Linux64 | EntryKind::PvmUser => {
                    let ptr = u64::from(read::<u32>(info + 0x228))
                        | (u64::from(read::<u32>(info + 0xc8)) << 32);
                    boot.cmdline = c_string(ptr);
                    let entries: u8 = read(info + 0x1e8);
                    for i in 0..u64::from(entries.min(128)) {
                        let e = info + 0x2d0 + i * 20;
                        boot.add(read(e), read(e + 8), read(e + 16));
                    }
                }
            }
        }
        boot
    }

    fn add(&mut self, start: u64, size: u64, kind: u32) {
        if kind == E820_RAM && self.ram_count < MAX_RAM_RANGES {
            self.ram[self.ram_count] = RamRange {
                start,
                end: start.saturating_add(size),
            };
            self.ram_count += 1;
        }
    }

    pub fn ram(&self) -> &[RamRange] {
        &self.ram[..self.ram_count]
    }

    /// The value of `key=value` on the command line.
    /// Whether the command line holds the bare word `flag`.
    pub fn flag(&self, flag: &str) -> bool {
        self.cmdline.split_ascii_whitespace().any(|w| w == flag)
    }

    pub fn param(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
    }
}
