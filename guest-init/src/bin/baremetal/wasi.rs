//! The WASI preview1 subset a function gets, so that modules from
//! ordinary toolchains, or written in WAT, run unchanged: the event is its
//! stdin, its stdout is the response, its stderr goes to the log, and its
//! environment is what the host sent at start. No files, no arguments.
//! Unknown imports fail instantiation with their name.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use wasmi::{Caller, Error, Extern, Linker, Memory};

use crate::clock::Clock;
use crate::virtio::rng::{Entropy, EntropyError};

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_IO: i32 = 29;
const ERRNO_NOTSUP: i32 = 58;
const ERRNO_SPIPE: i32 = 70;
const MODULE: &str = "wasi_snapshot_preview1";
/// Output a function may write, the response and the log together.
pub const MAX_OUTPUT: usize = 6 * 1024 * 1024;

/// What one invocation reads and writes.
pub struct Io {
    pub stdin: Vec<u8>,
    pub stdin_pos: usize,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub clock: Clock,
    /// The host's entropy device: `random_get` reads straight from it.
    pub entropy: Rc<RefCell<Entropy>>,
    /// The function's environment, each `KEY=VALUE\0`.
    pub environ: Rc<Vec<Vec<u8>>>,
}

impl Io {
    /// An invocation's I/O: `stdin` to read, nothing written yet.
    pub fn new(
        stdin: Vec<u8>,
        clock: Clock,
        entropy: Rc<RefCell<Entropy>>,
        environ: Rc<Vec<Vec<u8>>>,
    ) -> Self {
        Io {
            stdin,
            stdin_pos: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            clock,
            entropy,
            environ,
        }
    }
}

fn memory(caller: &Caller<'_, Io>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn write_bytes(data: &mut [u8], at: usize, bytes: &[u8]) -> bool {
    match at
        .checked_add(bytes.len())
        .and_then(|end| data.get_mut(at..end))
    {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

/// `*_sizes_get` for a list of NUL-terminated strings: their count and
/// their total size.
fn strings_sizes(caller: &mut Caller<'_, Io>, strings: &[Vec<u8>], count: i32, size: i32) -> i32 {
    let Some(mem) = memory(caller) else {
        return ERRNO_FAULT;
    };
    let data = mem.data_mut(caller);
    let total: usize = strings.iter().map(Vec::len).sum();
    let ok = write_bytes(
        data,
        count as u32 as usize,
        &(strings.len() as u32).to_le_bytes(),
    ) && write_bytes(data, size as u32 as usize, &(total as u32).to_le_bytes());
    if ok {
        ERRNO_SUCCESS
    } else {
        ERRNO_FAULT
    }
}

/// `*_get`: the strings into `buffer`, a pointer to each into `pointers`.
fn strings_get(
    caller: &mut Caller<'_, Io>,
    strings: &[Vec<u8>],
    pointers: i32,
    buffer: i32,
) -> i32 {
    let Some(mem) = memory(caller) else {
        return ERRNO_FAULT;
    };
    let data = mem.data_mut(caller);
    let mut at = buffer as u32 as usize;
    for (i, string) in strings.iter().enumerate() {
        let slot = (pointers as u32 as usize).saturating_add(i * 4);
        let Ok(address) = u32::try_from(at) else {
            return ERRNO_FAULT;
        };
        if !write_bytes(data, slot, &address.to_le_bytes()) || !write_bytes(data, at, string) {
            return ERRNO_FAULT;
        }
        at += string.len();
    }
    ERRNO_SUCCESS
}

/// The (address, length) pairs of an iovec array, bounds-checked.
fn iovecs(data: &[u8], iovs: u32, count: u32) -> Option<Vec<(usize, usize)>> {
    (0..count as usize)
        .map(|i| {
            let at = (iovs as usize).checked_add(i.checked_mul(8)?)?;
            let addr = read_u32(data, at)? as usize;
            let len = read_u32(data, at + 4)? as usize;
            addr.checked_add(len).filter(|&end| end <= data.len())?;
            Some((addr, len))
        })
        .collect()
}

pub fn link(linker: &mut Linker<Io>) -> Result<(), Error> {
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut caller: Caller<'_, Io>, fd: i32, iovs: i32, count: i32, nwritten: i32| -> i32 {
            let Some(mem) = memory(&caller) else {
                return ERRNO_FAULT;
            };
            let (data, io) = mem.data_and_store_mut(&mut caller);
            let Some(bufs) = iovecs(data, iovs as u32, count as u32) else {
                return ERRNO_FAULT;
            };
            let sink = match fd {
                1 => &mut io.stdout,
                2 => &mut io.stderr,
                _ => return ERRNO_BADF,
            };
            let mut total = 0usize;
            for (addr, len) in bufs {
                if sink.len() + len > MAX_OUTPUT {
                    return ERRNO_INVAL;
                }
                sink.extend_from_slice(&data[addr..addr + len]);
                total += len;
            }
            if write_bytes(
                data,
                nwritten as u32 as usize,
                &(total as u32).to_le_bytes(),
            ) {
                ERRNO_SUCCESS
            } else {
                ERRNO_FAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut caller: Caller<'_, Io>, fd: i32, iovs: i32, count: i32, nread: i32| -> i32 {
            if fd != 0 {
                return ERRNO_BADF;
            }
            let Some(mem) = memory(&caller) else {
                return ERRNO_FAULT;
            };
            let (data, io) = mem.data_and_store_mut(&mut caller);
            let Some(bufs) = iovecs(data, iovs as u32, count as u32) else {
                return ERRNO_FAULT;
            };
            let mut total = 0usize;
            for (addr, len) in bufs {
                let rest = &io.stdin[io.stdin_pos..];
                let n = len.min(rest.len());
                data[addr..addr + n].copy_from_slice(&rest[..n]);
                io.stdin_pos += n;
                total += n;
            }
            if write_bytes(data, nread as u32 as usize, &(total as u32).to_le_bytes()) {
                ERRNO_SUCCESS
            } else {
                ERRNO_FAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |_: Caller<'_, Io>, code: i32| -> Result<(), Error> { Err(Error::i32_exit(code)) },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut caller: Caller<'_, Io>, count: i32, size: i32| -> i32 {
            let environ = caller.data().environ.clone();
            strings_sizes(&mut caller, &environ, count, size)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |mut caller: Caller<'_, Io>, pointers: i32, buffer: i32| -> i32 {
            let environ = caller.data().environ.clone();
            strings_get(&mut caller, &environ, pointers, buffer)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "args_sizes_get",
        |mut caller: Caller<'_, Io>, count: i32, size: i32| -> i32 {
            strings_sizes(&mut caller, &[], count, size)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |mut caller: Caller<'_, Io>, pointers: i32, buffer: i32| -> i32 {
            strings_get(&mut caller, &[], pointers, buffer)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, Io>, _id: i32, _precision: i64, out: i32| -> i32 {
            let clock = caller.data().clock;
            let nanos = clock.micros(clock.now()).unwrap_or(0).saturating_mul(1000);
            let Some(mem) = memory(&caller) else {
                return ERRNO_FAULT;
            };
            if write_bytes(
                mem.data_mut(&mut caller),
                out as u32 as usize,
                &nanos.to_le_bytes(),
            ) {
                ERRNO_SUCCESS
            } else {
                ERRNO_FAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut caller: Caller<'_, Io>, buf: i32, len: i32| -> i32 {
            let Some(mem) = memory(&caller) else {
                return ERRNO_FAULT;
            };
            let (data, io) = mem.data_and_store_mut(&mut caller);
            let Some(dst) = (buf as u32 as usize)
                .checked_add(len as u32 as usize)
                .and_then(|end| data.get_mut(buf as u32 as usize..end))
            else {
                return ERRNO_FAULT;
            };
            match io.entropy.borrow_mut().fill(dst) {
                Ok(()) => ERRNO_SUCCESS,
                Err(EntropyError::Failed) => ERRNO_IO,
                Err(EntropyError::Absent) => ERRNO_NOTSUP,
            }
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |_: Caller<'_, Io>, _: i32| -> i32 {
        ERRNO_SUCCESS
    })?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: Caller<'_, Io>, _: i32, _: i64, _: i32, _: i32| -> i32 { ERRNO_SPIPE },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut caller: Caller<'_, Io>, fd: i32, out: i32| -> i32 {
            if !(0..=2).contains(&fd) {
                return ERRNO_BADF;
            }
            let Some(mem) = memory(&caller) else {
                return ERRNO_FAULT;
            };
            // A character device with no flags and every right.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            if write_bytes(mem.data_mut(&mut caller), out as u32 as usize, &stat) {
                ERRNO_SUCCESS
            } else {
                ERRNO_FAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_: Caller<'_, Io>, _: i32, _: i32| -> i32 { ERRNO_BADF },
    )?;
    Ok(())
}
