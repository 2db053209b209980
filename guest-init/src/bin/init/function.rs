//! The function's process: `bootstrap` (the code's, or a runtime
//! layer's) in /var/task, or a container image's command line in the
//! image's root and working directory, started with Lambda's standard
//! environment and the host's variables, its stdout and stderr split
//! into lines, and reaped. Lines longer than [`MAX_LINE`] are cut, as
//! Lambda cuts them.

use alloc::ffi::CString;
use alloc::string::String;
use alloc::vec::Vec;

use core::ffi::CStr;

use crate::sys::{self, Errno};

pub const BOOTSTRAP: &CStr = c"/var/task/bootstrap";
/// A managed runtime's, from its root file system.
pub const RUNTIME_BOOTSTRAP: &CStr = c"/var/runtime/bootstrap";
/// A runtime layer's.
pub const LAYER_BOOTSTRAP: &CStr = c"/opt/bootstrap";
const TASK_ROOT: &CStr = c"/var/task";
const MAX_LINE: usize = 256 << 10;

/// What every runtime finds; the host's variables (function name,
/// memory, credentials, the user's) come over vsock and win.
const ENVIRONMENT: [&str; 6] = [
    "PATH=/usr/local/bin:/usr/bin:/bin:/opt/bin",
    "LD_LIBRARY_PATH=/var/task:/var/task/lib:/opt/lib",
    "LAMBDA_TASK_ROOT=/var/task",
    "LAMBDA_RUNTIME_DIR=/var/runtime",
    "AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001",
    "TZ=:UTC",
];

/// The `PATH` a function gets when nothing sets one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/opt/bin";

/// How `bootstrap` ended.
pub enum Ended {
    Exited(i32),
    Killed(i32),
}

/// A running `bootstrap`: its pid and the read end of its output.
pub struct Process {
    pub pid: i32,
    pub output: i32,
}

/// What the function's process runs: an executable, its arguments, the
/// root it sees (a container image's, or the guest's) and its working
/// directory there.
pub struct Program {
    pub path: CString,
    pub argv: Vec<CString>,
    pub root: Option<&'static CStr>,
    pub cwd: CString,
}

impl Program {
    /// A `bootstrap`, run in /var/task.
    pub fn bootstrap(path: &CStr) -> Program {
        Program {
            path: path.into(),
            argv: alloc::vec![c"bootstrap".into()],
            root: None,
            cwd: TASK_ROOT.into(),
        }
    }
}

/// Starts `program` with `variables` over the standard environment.
pub fn spawn(
    program: &Program,
    variables: &[(String, String)],
) -> Result<Process, (&'static str, Errno)> {
    let mut environment: Vec<Vec<u8>> = variables
        .iter()
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat())
        .collect();
    for base in ENVIRONMENT {
        let key = base.split('=').next().unwrap_or(base);
        if !variables.iter().any(|(k, _)| k == key) {
            environment.push([base.as_bytes(), b"\0"].concat());
        }
    }
    let (read_end, write_end) = sys::pipe().map_err(|e| ("pipe", e))?;
    let pid = sys::fork().map_err(|e| ("fork", e))?;
    if pid == 0 {
        exec(program, write_end, &environment);
    }
    let _ = sys::close(write_end);
    Ok(Process {
        pid,
        output: read_end,
    })
}

/// Reaps children until `pid` has ended: PID 1 reaps every orphan, and
/// bootstrap's status is the one it reports.
pub fn reap(pid: i32) -> Result<Ended, (&'static str, Errno)> {
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

/// Splits a byte stream into lines.
#[derive(Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    pub fn feed(&mut self, bytes: &[u8], mut line: impl FnMut(&[u8])) {
        for &byte in bytes {
            if byte == b'\n' {
                line(&self.pending);
                self.pending.clear();
            } else if self.pending.len() < MAX_LINE {
                self.pending.push(byte);
            }
        }
    }

    /// The last line, if it had no newline.
    pub fn finish(&mut self, line: impl FnOnce(&[u8])) {
        if !self.pending.is_empty() {
            line(&self.pending);
            self.pending.clear();
        }
    }
}

/// The child's side: its output into the pipe, into its root, then
/// exec. Never returns.
fn exec(program: &Program, output: i32, environment: &[Vec<u8>]) -> ! {
    let _ = sys::dup2(output, 1);
    let _ = sys::dup2(output, 2);
    let fail = |what: &str, Errno(e)| -> ! {
        let _ = core::fmt::write(
            &mut crate::Console,
            format_args!("init: cannot run {:?}: {what}: errno {e}\n", program.path),
        );
        sys::exit(127)
    };
    if let Some(root) = program.root {
        if let Err(e) = sys::chroot(root) {
            fail("chroot", e);
        }
    }
    if let Err(e) = sys::chdir(&program.cwd) {
        fail("chdir to its working directory", e);
    }
    let argv: Vec<*const u8> = program
        .argv
        .iter()
        .map(|a| a.as_ptr().cast())
        .chain([core::ptr::null()])
        .collect();
    let envp: Vec<*const u8> = environment
        .iter()
        .map(|v| v.as_ptr())
        .chain([core::ptr::null()])
        .collect();
    fail("execve", sys::execve(&program.path, &argv, &envp))
}
