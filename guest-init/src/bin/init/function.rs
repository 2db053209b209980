//! The function's process: `bootstrap`, started with Lambda's standard
//! environment in /var/task, its stdout and stderr forwarded line by line,
//! and reaped. Lines longer than [`MAX_LINE`] are cut, as Lambda cuts them.

use alloc::vec::Vec;

use core::ffi::CStr;

use crate::sys::{self, Errno};

pub const BOOTSTRAP: &CStr = c"/var/task/bootstrap";
const TASK_ROOT: &CStr = c"/var/task";
const MAX_LINE: usize = 256 << 10;

/// What every runtime finds, before the host's own variables (function
/// name, memory, credentials, the user's), which come over vsock.
const ENVIRONMENT: [&CStr; 6] = [
    c"PATH=/usr/local/bin:/usr/bin:/bin:/opt/bin",
    c"LD_LIBRARY_PATH=/var/task:/var/task/lib:/opt/lib",
    c"LAMBDA_TASK_ROOT=/var/task",
    c"LAMBDA_RUNTIME_DIR=/var/runtime",
    c"AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001",
    c"TZ=:UTC",
];

/// How `bootstrap` ended.
pub enum Ended {
    Exited(i32),
    Killed(i32),
}

/// Runs `bootstrap` to its end, handing each line it writes to `line`.
pub fn run(mut line: impl FnMut(&[u8])) -> Result<Ended, (&'static str, Errno)> {
    let (read_end, write_end) = sys::pipe().map_err(|e| ("pipe", e))?;
    let pid = sys::fork().map_err(|e| ("fork", e))?;
    if pid == 0 {
        exec_bootstrap(write_end);
    }
    let _ = sys::close(write_end);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match sys::read(read_end, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(Errno(4)) => continue, // EINTR
            Err(e) => return Err(("reading bootstrap's output", e)),
        };
        for &byte in &buf[..n] {
            if byte == b'\n' {
                line(&pending);
                pending.clear();
            } else if pending.len() < MAX_LINE {
                pending.push(byte);
            }
        }
    }
    if !pending.is_empty() {
        line(&pending);
    }
    let _ = sys::close(read_end);
    // PID 1 reaps every orphan; bootstrap's status is the one it reports.
    loop {
        match sys::wait(-1) {
            Ok((reaped, status)) if reaped == pid => {
                return Ok(if status & 0x7f == 0 {
                    Ended::Exited((status >> 8) & 0xff)
                } else {
                    Ended::Killed(status & 0x7f)
                });
            }
            Ok(_) | Err(Errno(4)) => continue,
            Err(e) => return Err(("waiting for bootstrap", e)),
        }
    }
}

/// The child's side: its output into the pipe, then exec. Never returns.
fn exec_bootstrap(output: i32) -> ! {
    let _ = sys::dup2(output, 1);
    let _ = sys::dup2(output, 2);
    let _ = sys::chdir(TASK_ROOT);
    let argv = [c"bootstrap".as_ptr().cast(), core::ptr::null()];
    let mut envp = [core::ptr::null(); ENVIRONMENT.len() + 1];
    for (slot, var) in envp.iter_mut().zip(ENVIRONMENT) {
        *slot = var.as_ptr().cast();
    }
    let Errno(e) = sys::execve(BOOTSTRAP, &argv, &envp);
    let _ = core::fmt::write(
        &mut crate::Console,
        format_args!("init: cannot run /var/task/bootstrap: errno {e}\n"),
    );
    sys::exit(127)
}
