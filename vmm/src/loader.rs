//! Kernel, initrd and command-line loading. The boot path follows from what
//! the kernel file is: an ELF with a PVH note enters through PVH, any other
//! ELF through the Linux 64-bit boot protocol at its entry point, and a
//! bzImage through its 64-bit entry (load address + 0x200).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::{initrd_address, InitrdRegion};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::EntryMode;

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
}

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

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(read_err("kernel", path))?;
    let format = detect_format(&mut file, path)?;
    let bad = |e: linux_loader::loader::Error| LoaderError::BadKernel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
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
            })
        }
    }
}

pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdRegion, LoaderError> {
    let mut file = File::open(path).map_err(read_err("initrd", path))?;
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
