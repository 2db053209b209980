//! Kernel, initrd and command-line loading. The boot path follows from what
//! the kernel file is: an ELF with a PVH note enters through PVH, any other
//! ELF through the Linux 64-bit boot protocol at its entry point, and a
//! bzImage through its 64-bit entry (load address + 0x200).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::{initrd_address, InitrdRegion};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::EntryMode;
use crate::config::FileSource;
use crate::vstate::memory::{advise_huge_pages, fault_in_for_writing, FaultedHugePages};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry of a bzImage, relative to where it is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid kernel {path:?}: not a kernel (neither an ELF file nor a bzImage)")]
    NotAKernel { path: PathBuf },
    #[error("invalid kernel {path:?}: {reason}")]
    BadKernel { path: PathBuf, reason: String },
    #[error("invalid initrd {path:?}: {reason}")]
    BadInitrd { path: PathBuf, reason: String },
    #[error("invalid cmdline: {0}")]
    BadCmdline(String),
}

/// Where and how the loaded kernel is entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryMode,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
    /// The 64-bit entry the guest offers for PVM user mode, from its
    /// [`MICROVM_NOTE_NAME`] note: a guest that has one needs no privileged
    /// instruction and can run natively on a PVM host.
    pub pvm_user_entry: Option<u64>,
}

/// Name of this project's ELF notes.
pub const MICROVM_NOTE_NAME: &[u8] = b"MicroVM\0";
/// Note type whose descriptor is the guest's 64-bit entry for PVM user mode
/// (8 bytes, little-endian).
pub const MICROVM_NOTE_PVM_USER_ENTRY: u32 = 1;
/// Notes larger than this are not read: no legitimate kernel has them.
const MAX_NOTE_SEGMENT: u64 = 64 << 10;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

fn read_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError {
    let path = path.to_path_buf();
    move |source| LoaderError::Read { what, path, source }
}

pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoaderError> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut magic))
        .map_err(|_| LoaderError::NotAKernel {
            path: path.to_path_buf(),
        })?;
    if &magic == ELF_MAGIC {
        check_elf_header(file, path)?;
        return Ok(KernelFormat::Elf);
    }
    let is_bzimage = file
        .seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .and_then(|_| file.read_exact(&mut magic))
        .is_ok()
        && &magic == BZIMAGE_MAGIC;
    if is_bzimage {
        Ok(KernelFormat::BzImage)
    } else {
        Err(LoaderError::NotAKernel {
            path: path.to_path_buf(),
        })
    }
}

/// Refuses ELF files the VMM cannot boot, with the reason, before the
/// loader fails on them with a less telling one.
fn check_elf_header(file: &mut File, path: &Path) -> Result<(), LoaderError> {
    let mut ident = [0u8; 20];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut ident))
        .map_err(read_err("kernel", path))?;
    let class = ident[4];
    let e_type = u16::from_le_bytes([ident[16], ident[17]]);
    let machine = u16::from_le_bytes([ident[18], ident[19]]);
    let reason = if class != ELFCLASS64 {
        format!("ELF class {class}, expected 64-bit (2)")
    } else if machine != EM_X86_64 {
        format!("ELF machine {machine}, expected x86_64 ({EM_X86_64})")
    } else if e_type != ET_EXEC {
        format!("ELF type {e_type}, expected an executable ({ET_EXEC})")
    } else {
        return Ok(());
    };
    Err(LoaderError::BadKernel {
        path: path.to_path_buf(),
        reason,
    })
}

/// One ELF note.
struct ElfNote {
    name: Vec<u8>,
    kind: u32,
    desc: Vec<u8>,
}

/// What an ELF kernel's program headers say, bounded so that a hostile
/// file cannot make the VMM read or allocate much: its notes, and where
/// its loadable segments' file bytes go in guest memory.
struct ElfProgram {
    notes: Vec<ElfNote>,
    loads: Vec<Range<u64>>,
}

fn elf_program(file: &mut File) -> std::io::Result<ElfProgram> {
    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
    }
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    let mut program = ElfProgram {
        notes: Vec::new(),
        loads: Vec::new(),
    };
    if phentsize < 56 {
        return Ok(program);
    }
    let notes = &mut program.notes;
    for i in 0..u64::from(phnum.min(64)) {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))?;
        file.read_exact(&mut phdr)?;
        let (p_type, offset, size) = (u32_at(&phdr, 0), u64_at(&phdr, 8), u64_at(&phdr, 32));
        if p_type == PT_LOAD {
            let paddr = u64_at(&phdr, 24);
            program.loads.push(paddr..paddr.saturating_add(size));
        }
        if p_type != PT_NOTE || size > MAX_NOTE_SEGMENT {
            continue;
        }
        let mut segment = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut segment)?;
        let mut at = 0usize;
        while at + 12 <= segment.len() {
            let namesz = u32_at(&segment, at) as usize;
            let descsz = u32_at(&segment, at + 4) as usize;
            let kind = u32_at(&segment, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let end = desc_at + descsz.div_ceil(4) * 4;
            if namesz > segment.len() || descsz > segment.len() || desc_at + descsz > segment.len()
            {
                break;
            }
            notes.push(ElfNote {
                name: segment[name_at..name_at + namesz].to_vec(),
                kind,
                desc: segment[desc_at..desc_at + descsz].to_vec(),
            });
            at = end;
        }
    }
    Ok(program)
}

/// The PVM user-mode entry the guest declares among `notes`, if it
/// declares one.
fn pvm_user_entry(notes: &[ElfNote], path: &Path) -> Result<Option<u64>, LoaderError> {
    let entry = notes
        .iter()
        .find(|n| n.name.as_slice() == MICROVM_NOTE_NAME && n.kind == MICROVM_NOTE_PVM_USER_ENTRY)
        .map(|n| {
            n.desc
                .get(..8)
                .map(|d| u64::from_le_bytes(d.try_into().unwrap_or([0; 8])))
        });
    match entry {
        None => Ok(None),
        Some(Some(addr)) => Ok(Some(addr)),
        Some(None) => Err(LoaderError::BadKernel {
            path: path.to_path_buf(),
            reason: "MicroVM PVM user-mode entry note is shorter than 8 bytes".into(),
        }),
    }
}

pub fn load_kernel(
    mem: &GuestMemoryMmap,
    source: &FileSource,
    faulted: &mut FaultedHugePages,
) -> Result<LoadedKernel, LoaderError> {
    let path = &PathBuf::from(source.to_string());
    let mut file = source.open().map_err(read_err("kernel", path))?;
    let format = detect_format(&mut file, path)?;
    let bad = |e: linux_loader::loader::Error| LoaderError::BadKernel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
            let program = elf_program(&mut file).map_err(read_err("kernel", path))?;
            let pvm_user_entry = pvm_user_entry(&program.notes, path)?;
            // Bounded by the file's size, which the segments must fit in.
            let size = file.metadata().map_or(0, |m| m.len());
            let loads: Vec<Range<u64>> = program
                .loads
                .iter()
                .map(|r| r.start..r.end.min(r.start.saturating_add(size)))
                .collect();
            advise_huge_pages(mem, &loads, faulted);
            fault_in_for_writing(mem, &loads);
            let r =
                Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(bad)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh { entry: addr.0 },
                _ => EntryMode::Linux64 {
                    entry: r.kernel_load.0,
                },
            };
            Ok(LoadedKernel {
                format,
                entry,
                kernel_end: r.kernel_end,
                setup_header: None,
                pvm_user_entry,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(bad)?;
            let header = r.setup_header.ok_or_else(|| LoaderError::BadKernel {
                path: path.to_path_buf(),
                reason: "bzImage without a setup header".into(),
            })?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::BadKernel {
                    path: path.to_path_buf(),
                    reason: "bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)".into(),
                });
            }
            Ok(LoadedKernel {
                format,
                entry: EntryMode::Linux64 {
                    entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                kernel_end: r.kernel_end,
                setup_header: Some(header),
                pvm_user_entry: None,
            })
        }
    }
}

pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    source: &FileSource,
    kernel: &LoadedKernel,
) -> Result<InitrdRegion, LoaderError> {
    let path = &PathBuf::from(source.to_string());
    let mut file = source.open().map_err(read_err("initrd", path))?;
    let size = file.metadata().map_err(read_err("initrd", path))?.len();
    let addr = initrd_address(
        mem_size,
        size,
        kernel.kernel_end,
        kernel.setup_header.as_ref(),
    )
    .map_err(|e| LoaderError::BadInitrd {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoaderError::BadInitrd {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(InitrdRegion { addr, size })
}

/// Writes the command line and returns its size including the NUL. A
/// bzImage may accept less than the VMM's maximum.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel: &LoadedKernel,
) -> Result<usize, LoaderError> {
    let limit = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize + 1)
        .filter(|&n| n > 1)
        .unwrap_or(CMDLINE_MAX_SIZE)
        .min(CMDLINE_MAX_SIZE);
    let mut line = Cmdline::new(limit).map_err(|e| LoaderError::BadCmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| LoaderError::BadCmdline(format!("{e} (the kernel accepts {limit} bytes)")))?;
    let bytes = line
        .as_cstring()
        .map_err(|e| LoaderError::BadCmdline(e.to_string()))?
        .into_bytes_with_nul();
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| LoaderError::BadCmdline(e.to_string()))?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86_64 executable: one loadable segment of `load` bytes
    /// at 1 MiB and, with `note`, a MicroVM PVM user-mode entry note.
    fn elf(load: u64, note: bool) -> Vec<u8> {
        let phnum: u16 = if note { 2 } else { 1 };
        let data_at = 64 + 56 * u64::from(phnum);
        let mut out = Vec::new();
        out.extend_from_slice(ELF_MAGIC);
        out.extend_from_slice(&[ELFCLASS64, 1, 1, 0]);
        out.resize(16, 0);
        out.extend_from_slice(&ET_EXEC.to_le_bytes());
        out.extend_from_slice(&EM_X86_64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // e_version
        out.extend_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 56, phnum, 64, 0, 0] {
            out.extend_from_slice(&half.to_le_bytes());
        }
        let phdr = |out: &mut Vec<u8>, kind: u32, offset: u64, addr: u64, size: u64| {
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&4u32.to_le_bytes()); // p_flags
            for field in [offset, addr, addr, size, size, 8] {
                out.extend_from_slice(&field.to_le_bytes());
            }
        };
        let note_len = 12 + 8 + 8;
        phdr(&mut out, PT_LOAD, data_at, 0x10_0000, load);
        if note {
            phdr(&mut out, PT_NOTE, data_at + load, 0, note_len);
        }
        out.resize((data_at + load) as usize, 0x90);
        if note {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&MICROVM_NOTE_PVM_USER_ENTRY.to_le_bytes());
            out.extend_from_slice(MICROVM_NOTE_NAME);
            out.extend_from_slice(&0x10_0040u64.to_le_bytes());
        }
        out
    }

    #[test]
    fn the_load_finds_the_pvm_note() {
        let mem = crate::vstate::memory::create_guest_memory(16 << 20).unwrap();
        let load = |bytes: &[u8]| {
            let path = std::env::temp_dir().join(format!(
                "loader-note-{}-{}",
                std::process::id(),
                bytes.len()
            ));
            std::fs::write(&path, bytes).unwrap();
            let loaded = load_kernel(
                &mem,
                &FileSource::Path(path.clone()),
                &mut FaultedHugePages::none(),
            )
            .unwrap();
            std::fs::remove_file(&path).unwrap();
            loaded
        };
        assert_eq!(load(&elf(0x3000, true)).pvm_user_entry, Some(0x10_0040));
        assert_eq!(load(&elf(0x2000, false)).pvm_user_entry, None);
    }
}
