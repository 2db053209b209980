//! The jailer: starts the VMM with nothing around it that a guest escape
//! could use. In order:
//! 1. open `/dev/kvm` and the VMM binary, while still root;
//! 2. create the VMM's cgroup with its CPU and process limits;
//! 3. clone a child into new mount, PID, network, IPC and UTS
//!    namespaces;
//! 4. in the child: join the cgroup (on v1; see `cgroup::SelfPlacement`),
//!    make its mounts private and its root a mount point, and wait for
//!    the parent to write the PID file (and on v2 put it in the cgroup);
//! 5. in the child, with its [`Launch`]: set the memory limit, bind-mount
//!    only the files the VMM needs into the empty root and `pivot_root`
//!    into it, set resource limits, drop to the unprivileged uid and gid,
//!    place the launch's descriptors, and exec the VMM from its
//!    descriptor with the KVM descriptor inherited (`--kvm-fd`);
//! 6. in the parent: wait for the child, report how it ended, and clean
//!    up.
//!
//! The launch is on the command line, or, for a jail made ahead of time,
//! comes later on a socket (`--launch-fd`): steps 1-4 (about 3 ms, the
//! namespaces' creation the most of it) are then off a cold start's path.
//!
//! The child dies with the jailer (`PR_SET_PDEATHSIG`), so killing the
//! jailer stops the microVM.

pub mod cgroup;

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use cgroup::{Cgroup, CgroupError, CgroupLimits, MemoryLimit, SelfPlacement};
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::vstate::vm::HypervisorKind;

/// A host path made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailMount {
    pub source: PathBuf,
    /// Absolute, inside the jail.
    pub target: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for JailMount {
    type Err = String;

    /// `SOURCE:TARGET[:ro]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts[..] {
            [source, target] => (source, target, false),
            [source, target, "ro"] => (source, target, true),
            _ => return Err(format!("{s:?}: expected SOURCE:TARGET or SOURCE:TARGET:ro")),
        };
        let target = PathBuf::from(target);
        if !target.is_absolute() || target.components().any(|c| c.as_os_str() == "..") {
            return Err(format!(
                "{s:?}: the target must be an absolute path without '..'"
            ));
        }
        Ok(JailMount {
            source: source.into(),
            target,
            read_only,
        })
    }
}

/// What one VMM is given in its jail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub mounts: Vec<JailMount>,
    /// Bytes of memory, page cache included; needs a jail made with the
    /// memory controller.
    pub memory_max: Option<u64>,
    /// Arguments for the VMM, after the ones the jailer adds.
    pub vmm_args: Vec<String>,
    /// The numbers at which the VMM finds the descriptors sent with the
    /// launch, in their order.
    pub fds: Vec<RawFd>,
    /// A jail made ahead at `SCHED_IDLE` keeps its VMM there: a VMM on
    /// standby, whose start-up then never slows the microVMs that run,
    /// leaves it when its microVM's launch comes.
    #[serde(default)]
    pub keep_sched_idle: bool,
}

/// The most descriptors one launch passes.
pub const MAX_LAUNCH_FDS: usize = 12;
/// The largest launch message.
const MAX_LAUNCH_BYTES: usize = 64 << 10;
/// Received descriptors go above this before they are placed, clear of
/// every number a launch may name.
pub const FD_FLOOR: RawFd = 64;

impl Launch {
    /// Sends the launch and its descriptors (`fds[i]` goes to
    /// `self.fds[i]`) to a jail waiting on the other end of `socket`, a
    /// `SOCK_SEQPACKET` pair's end.
    pub fn send(&self, socket: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
        if fds.len() != self.fds.len() || fds.len() > MAX_LAUNCH_FDS {
            return Err(std::io::Error::other(format!(
                "{} descriptors for {} numbers (at most {MAX_LAUNCH_FDS})",
                fds.len(),
                self.fds.len()
            )));
        }
        let message = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        if message.len() > MAX_LAUNCH_BYTES {
            return Err(std::io::Error::other(format!(
                "a launch of {} bytes (at most {MAX_LAUNCH_BYTES})",
                message.len()
            )));
        }
        socket
            .send_with_fds(&[message.as_slice()], fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(())
    }

    /// Waits for a launch on `socket`; `None` when its sender closed it
    /// without sending one (a pool of jails shrinking).
    pub fn receive(socket: &UnixStream) -> Result<Option<(Launch, Vec<OwnedFd>)>, JailError> {
        let mut buf = vec![0u8; MAX_LAUNCH_BYTES];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut raw = [-1 as RawFd; MAX_LAUNCH_FDS];
        // SAFETY: the iovec covers `buf`, alive and writable; the
        // descriptors received are owned below.
        let (len, count) = unsafe { socket.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| JailError::Launch(format!("reading the launch: {e}")))?;
        // SAFETY: descriptors this process just received and owns.
        let fds: Vec<OwnedFd> = raw[..count]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if len == 0 && count == 0 {
            return Ok(None);
        }
        let launch: Launch = serde_json::from_slice(&buf[..len])
            .map_err(|e| JailError::Launch(format!("a malformed launch: {e}")))?;
        if launch.fds.len() != fds.len() {
            return Err(JailError::Launch(format!(
                "the launch names {} descriptors but carries {}",
                launch.fds.len(),
                fds.len()
            )));
        }
        if let Some(number) = launch.fds.iter().find(|n| !(0..FD_FLOOR).contains(*n)) {
            return Err(JailError::Launch(format!(
                "descriptor number {number} (0 to {} only)",
                FD_FLOOR - 1
            )));
        }
        Ok(Some((launch, fds)))
    }
}

/// Where the jail's launch comes from.
#[derive(Debug)]
pub enum LaunchSource {
    Given(Launch),
    /// A `SOCK_SEQPACKET` socket the owner sends it on, once.
    Socket(UnixStream),
}

#[derive(Debug)]
pub struct JailConfig {
    /// Names the jail directory and the cgroup.
    pub id: String,
    pub exec_file: PathBuf,
    /// Where jails are made: `<chroot_base>/<id>/root`.
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_parent: String,
    pub limits: CgroupLimits,
    pub max_open_files: u64,
    pub max_processes: u64,
    pub launch: LaunchSource,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid --id {0:?}: 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("the jailer must run as root to build a jail (it runs as uid {0})")]
    NotRoot(u32),
    #[error("--uid 0 or --gid 0 would leave the VMM privileged")]
    PrivilegedTarget,
    #[error("{what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the jail directory {path}: {source}")]
    JailDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
    #[error("launch: {0}")]
    Launch(String),
}

fn sys(what: &'static str, result: libc::c_int) -> Result<libc::c_int, JailError> {
    if result < 0 {
        Err(JailError::Sys(what, std::io::Error::last_os_error()))
    } else {
        Ok(result)
    }
}

fn c_path(path: &Path) -> CString {
    // Paths from the command line hold no NUL; a component that did
    // becomes an empty path that the system call refuses.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn open(what: &'static str, path: &Path, flags: libc::c_int) -> Result<OwnedFd, JailError> {
    let c = c_path(path);
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(JailError::Open {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a descriptor this process just opened and owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves `fd` to the lowest free number at or above [`FD_FLOOR`].
fn relocate(fd: OwnedFd, cloexec: bool) -> Result<OwnedFd, JailError> {
    let command = if cloexec {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    // SAFETY: duplicates a descriptor this process owns.
    let moved = sys("moving a descriptor", unsafe {
        libc::fcntl(fd.as_raw_fd(), command, FD_FLOOR)
    })?;
    // SAFETY: the new descriptor is this process's own.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// Puts each `(fd, number)`'s descriptor at `number`, where the program
/// about to be exec'd finds it: first a close-on-exec copy of each above
/// [`FD_FLOOR`] with the original closed, then the copies placed, so that
/// placing one never closes another still to be placed. System calls
/// only, no allocation: for a child between fork and exec. The numbers
/// must be below [`FD_FLOOR`].
pub fn place_fds(fds: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    let mut copies = [-1; MAX_LAUNCH_FDS];
    if fds.len() > copies.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (copy, &(fd, _)) in copies.iter_mut().zip(fds) {
        // SAFETY: duplicates, then closes, a descriptor the caller handed
        // over.
        *copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FD_FLOOR) };
        if *copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    for (&copy, &(_, number)) in copies.iter().zip(fds) {
        // SAFETY: dup2 onto a number below the copies; the target stays
        // open across exec.
        if unsafe { libc::dup2(copy, number) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A connected `SOCK_SEQPACKET` pair: messages keep their bounds, and
/// the jailer (or a VMM on standby) sees its end close. Both ends are
/// close-on-exec: see [`inheritable`]. Held as `UnixStream`s, whose reads,
/// writes and descriptor passing work on it alike.
pub fn seqpacket_pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array; checked.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two new descriptors, owned here.
    Ok(unsafe {
        (
            UnixStream::from_raw_fd(fds[0]),
            UnixStream::from_raw_fd(fds[1]),
        )
    })
}

/// Lets `socket` pass to a program this process execs.
pub fn inheritable(socket: &UnixStream) -> std::io::Result<()> {
    // SAFETY: clears the close-on-exec flag of a descriptor this process
    // holds.
    if unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor above the standard streams close-on-exec but
/// `kept`: the VMM inherits what its launch gives it and nothing the
/// jailer's own parent left open (a stray one also took a number a
/// launch then named). System calls only, for a child before exec.
fn close_on_exec_all_but(kept: &mut [RawFd]) -> std::io::Result<()> {
    kept.sort_unstable();
    let mut from: libc::c_uint = 3;
    for &fd in kept.iter() {
        let fd = fd as libc::c_uint;
        if fd > from {
            // SAFETY: only changes descriptor flags of this process.
            if unsafe { libc::close_range(from, fd - 1, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) }
                < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    if unsafe {
        libc::close_range(
            from,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets process `pid`'s (0: this one's) scheduling policy, keeping its
/// nice value. A system call only, for a child between fork and exec too.
pub fn set_policy(pid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain system call with a local parameter block.
    if unsafe { libc::sched_setscheduler(pid, policy, &param) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the scheduling policy of every thread of process `pid`: threads it
/// starts afterwards take its main thread's.
pub fn set_process_policy(pid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
            set_policy(tid, policy)?;
        }
    }
    Ok(())
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::Relaxed);
}

/// How the jailed VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    Code(i32),
    Signal(i32),
}

impl VmmExit {
    /// The jailer's own exit code: the VMM's, or 128 + the signal, as a
    /// shell reports it.
    pub fn code(self) -> i32 {
        match self {
            VmmExit::Code(c) => c,
            VmmExit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            VmmExit::Code(c) => write!(f, "exited with {c}"),
            VmmExit::Signal(libc::SIGSYS) => {
                f.write_str("killed by SIGSYS: its seccomp filter caught a forbidden system call")
            }
            VmmExit::Signal(libc::SIGKILL) => {
                f.write_str("killed by SIGKILL (the cgroup's memory limit, or its owner)")
            }
            VmmExit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

pub struct Jail {
    config: JailConfig,
    dir: PathBuf,
}

impl Jail {
    pub fn new(config: JailConfig) -> Result<Self, JailError> {
        let id_ok = (1..=64).contains(&config.id.len())
            && config
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(JailError::BadId(config.id));
        }
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        if uid != 0 {
            return Err(JailError::NotRoot(uid));
        }
        if config.uid == 0 || config.gid == 0 {
            return Err(JailError::PrivilegedTarget);
        }
        let dir = config.chroot_base.join(&config.id);
        Ok(Jail { config, dir })
    }

    /// The jail's root, as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where the jailer writes the VMM's host PID, for its owner to
    /// signal or measure it.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }

    /// Runs the VMM in the jail until it ends. SIGTERM or SIGINT to the
    /// jailer stops the VMM and still cleans the jail up.
    pub fn run(self) -> Result<VmmExit, JailError> {
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: installs an async-signal-safe handler, without
            // SA_RESTART so that waitpid returns to look at the flag.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = request_stop as *const () as libc::sighandler_t;
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        // Above every number a launch places descriptors at.
        let kvm = relocate(
            open("/dev/kvm", Path::new("/dev/kvm"), libc::O_RDWR)?,
            false,
        )?;
        let exec = relocate(
            open(
                "--exec-file",
                &self.config.exec_file,
                libc::O_RDONLY | libc::O_CLOEXEC,
            )?,
            true,
        )?;
        let root = self.root();
        let jail_dir = |source| JailError::JailDir {
            path: root.clone(),
            source,
        };
        if root.exists() {
            std::fs::remove_dir_all(&root).map_err(jail_dir)?;
        }
        std::fs::create_dir_all(&root).map_err(jail_dir)?;
        let cgroup = Cgroup::create(
            &self.config.cgroup_parent,
            &self.config.id,
            &self.config.limits,
        )?;
        let result = cgroup
            .memory_limit()
            .map_err(JailError::from)
            .and_then(|memory| self.spawn(&kvm, &exec, &cgroup, memory.as_ref()));
        cgroup.remove();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove the jail {}: {e}", self.dir.display());
        }
        result
    }

    fn spawn(
        &self,
        kvm: &OwnedFd,
        exec: &OwnedFd,
        cgroup: &Cgroup,
        memory: Option<&MemoryLimit>,
    ) -> Result<VmmExit, JailError> {
        // Read from the host's /sys, which the child leaves behind.
        let hypervisor = HypervisorKind::detect();
        let mut placement = cgroup.self_placement()?;
        let mut go = [0 as RawFd; 2];
        // SAFETY: a two-element array for the pipe's ends.
        sys("pipe", unsafe {
            libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC)
        })?;
        // A raw clone, like fork but into new namespaces: the child is the
        // first process of its PID namespace; the jailer stays in the
        // host's. SAFETY: the jailer is single-threaded; the child only
        // makes system calls and execs, or exits.
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::SIGCHLD;
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0, 0, 0, 0) };
        let pid = sys("clone", pid as libc::c_int)?;
        if pid == 0 {
            // SAFETY: closes the child's copy of the write end.
            unsafe { libc::close(go[1]) };
            let error = self.enter(
                go[0],
                kvm.as_raw_fd(),
                exec.as_raw_fd(),
                placement.as_ref(),
                memory,
                hypervisor,
            );
            // Only reached when something failed before exec.
            eprintln!("jailer: {error}");
            // SAFETY: leaves the child without running the parent's
            // destructors.
            unsafe { libc::_exit(125) };
        }
        // SAFETY: closes the parent's copy of the read end.
        unsafe { libc::close(go[0]) };
        // The child joins a v1 group itself; the files' ends here close.
        let added = match placement.take() {
            Some(_) => Ok(()),
            None => cgroup.add(pid as u32),
        };
        let placed = added.and_then(|()| {
            std::fs::write(self.pid_file(), pid.to_string()).map_err(|source| CgroupError::Io {
                path: self.pid_file(),
                source,
            })
        });
        if let Err(e) = placed {
            // SAFETY: kills and reaps the child this process forked.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e.into());
        }
        // SAFETY: one byte from a static buffer, then the write end closes.
        unsafe {
            libc::write(go[1], b"g".as_ptr().cast(), 1);
            libc::close(go[1]);
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for the child this process forked.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(JailError::Sys("waitpid", std::io::Error::last_os_error()));
            }
            if STOP_REQUESTED.load(Ordering::Relaxed) {
                // The VMM is PID 1 of its namespace and would ignore a
                // forwarded SIGTERM; the jailer's owner wants it gone.
                // SAFETY: signals the child this process forked.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        Ok(if libc::WIFSIGNALED(status) {
            VmmExit::Signal(libc::WTERMSIG(status))
        } else {
            VmmExit::Code(libc::WEXITSTATUS(status))
        })
    }

    fn vmm_argv(
        &self,
        kvm_fd: RawFd,
        hypervisor: HypervisorKind,
        vmm_args: &[String],
    ) -> Vec<CString> {
        let name = self
            .config
            .exec_file
            .file_name()
            .unwrap_or(OsStr::new("vmm"));
        let mut argv: Vec<CString> = vec![
            CString::new(name.as_bytes()).unwrap_or_default(),
            c"--kvm-fd".into(),
            CString::new(kvm_fd.to_string()).unwrap_or_default(),
            c"--hypervisor".into(),
            CString::new(match hypervisor {
                HypervisorKind::Pvm => "pvm",
                HypervisorKind::Hardware => "hardware",
            })
            .unwrap_or_default(),
        ];
        argv.extend(
            vmm_args
                .iter()
                .map(|a| CString::new(a.as_bytes()).unwrap_or_default()),
        );
        argv
    }

    /// The child's side: joins its cgroup (v1), makes its root a mount
    /// point, waits for the parent (which on v2 moves it into its cgroup)
    /// and for its launch, then finishes the root, drops privileges and
    /// execs. Returns only on failure; exits 0 when its owner closed the
    /// launch socket without launching.
    fn enter(
        &self,
        go: RawFd,
        kvm: RawFd,
        exec: RawFd,
        placement: Option<&SelfPlacement>,
        memory: Option<&MemoryLimit>,
        hypervisor: HypervisorKind,
    ) -> JailError {
        if let Some(Err(e)) = placement.map(SelfPlacement::join) {
            return JailError::Sys("joining the cgroup", e);
        }
        // On v2 the root is begun while the parent moves this process into
        // its cgroup, which can wait for an RCU grace period (about 10 ms
        // on an otherwise idle host); mounts need no limits. The VMM
        // itself starts only inside the cgroup.
        if let Err(e) = self.prepare_root() {
            return e;
        }
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into a local buffer.
        if unsafe { libc::read(go, byte.as_mut_ptr().cast(), 1) } != 1 {
            return JailError::Sys("waiting for the cgroup", std::io::Error::last_os_error());
        }
        let (launch, fds) = match &self.config.launch {
            LaunchSource::Given(launch) => (launch.clone(), Vec::new()),
            LaunchSource::Socket(socket) => match Launch::receive(socket) {
                Ok(Some(received)) => {
                    // A jail made ahead of time may have waited at
                    // SCHED_IDLE; its VMM runs at the normal policy (and
                    // the nice value it was given), unless it waits too.
                    if !received.0.keep_sched_idle {
                        if let Err(e) = set_policy(0, libc::SCHED_OTHER) {
                            return JailError::Sys("leaving SCHED_IDLE", e);
                        }
                    }
                    received
                }
                // SAFETY: leaves without running the parent's destructors.
                Ok(None) => unsafe { libc::_exit(0) },
                Err(e) => return e,
            },
        };
        if let Err(e) = self.finish_root(&launch, memory) {
            return e;
        }
        if let Err(e) = self.drop_privileges() {
            return e;
        }
        let placed: Vec<(RawFd, RawFd)> = fds
            .into_iter()
            .map(IntoRawFd::into_raw_fd)
            .zip(launch.fds.iter().copied())
            .collect();
        if let Err(e) = place_fds(&placed) {
            return JailError::Sys("placing the launch's descriptors", e);
        }
        let mut kept: Vec<RawFd> = launch.fds.clone();
        kept.push(kvm);
        if let Err(e) = close_on_exec_all_but(&mut kept) {
            return JailError::Sys("closing the jailer's other descriptors", e);
        }
        let argv = self.vmm_argv(kvm, hypervisor, &launch.vmm_args);
        let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        pointers.push(std::ptr::null());
        let env: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: NUL-terminated argv and envp arrays that outlive the
        // call; on success it does not return.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                exec,
                c"".as_ptr(),
                pointers.as_ptr(),
                env.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        JailError::Sys("execveat", std::io::Error::last_os_error())
    }

    /// Sets the launch's memory limit and mounts its files in the root,
    /// then pivots into it.
    fn finish_root(&self, launch: &Launch, memory: Option<&MemoryLimit>) -> Result<(), JailError> {
        match (launch.memory_max, memory) {
            (Some(bytes), Some(limit)) => limit.set(bytes)?,
            (Some(_), None) => {
                return Err(JailError::Launch(
                    "a memory limit for a jail made without the memory controller".into(),
                ))
            }
            (None, _) => {}
        }
        for m in &launch.mounts {
            self.bind(m)?;
        }
        self.pivot()
    }

    /// Makes the child's mounts private and its root a mount point.
    fn prepare_root(&self) -> Result<(), JailError> {
        let root = self.root();
        let c_root = c_path(&root);
        // SAFETY: mount(2) with NUL-terminated strings; results checked.
        unsafe {
            // Nothing mounted here propagates back to the host.
            sys(
                "making mounts private",
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
            )?;
            // pivot_root needs the new root to be a mount point.
            sys(
                "bind-mounting the jail root",
                libc::mount(
                    c_root.as_ptr(),
                    c_root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
            )?;
        }
        std::fs::create_dir_all(root.join(".old-root"))
            .map_err(|e| JailError::Sys("creating .old-root", e))?;
        // SAFETY: a static NUL-terminated name.
        unsafe { libc::sethostname(c"microvm".as_ptr(), 7) };
        Ok(())
    }

    fn pivot(&self) -> Result<(), JailError> {
        let root = self.root();
        let c_root = c_path(&root);
        let c_old = c_path(&root.join(".old-root"));
        // SAFETY: pivot_root/umount2/chdir with NUL-terminated paths.
        unsafe {
            sys(
                "pivot_root",
                libc::syscall(libc::SYS_pivot_root, c_root.as_ptr(), c_old.as_ptr()) as libc::c_int,
            )?;
            sys("chdir /", libc::chdir(c"/".as_ptr()))?;
            sys(
                "detaching the host's root",
                libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH),
            )?;
        }
        std::fs::remove_dir("/.old-root").map_err(|e| JailError::Sys("removing .old-root", e))
    }

    /// Bind-mounts `m.source` at `m.target` inside the (not yet pivoted)
    /// root.
    fn bind(&self, m: &JailMount) -> Result<(), JailError> {
        let target = self
            .root()
            .join(m.target.strip_prefix("/").unwrap_or(&m.target));
        let io = |source| JailError::Open {
            what: "--mount",
            path: m.source.clone(),
            source,
        };
        let meta = std::fs::metadata(&m.source).map_err(io)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io)?;
        } else {
            std::fs::write(&target, b"").map_err(io)?;
        }
        let (source, c_target) = (c_path(&m.source), c_path(&target));
        // SAFETY: mount(2) with NUL-terminated paths; results checked.
        unsafe {
            sys(
                "bind mount",
                libc::mount(
                    source.as_ptr(),
                    c_target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
            )?;
            if m.read_only {
                sys(
                    "read-only remount",
                    libc::mount(
                        std::ptr::null(),
                        c_target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ),
                )?;
            }
        }
        Ok(())
    }

    fn drop_privileges(&self) -> Result<(), JailError> {
        let limit = |n: u64| libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: plain system calls on local values; results checked.
        unsafe {
            let files = limit(self.config.max_open_files);
            sys(
                "RLIMIT_NOFILE",
                libc::setrlimit(libc::RLIMIT_NOFILE, &files),
            )?;
            let procs = limit(self.config.max_processes);
            sys("RLIMIT_NPROC", libc::setrlimit(libc::RLIMIT_NPROC, &procs))?;
            sys("setgroups", libc::setgroups(0, std::ptr::null()))?;
            sys("setgid", libc::setgid(self.config.gid))?;
            sys("setuid", libc::setuid(self.config.uid))?;
            // After the uid change, which would clear it: the VMM dies
            // with the jailer.
            sys(
                "PR_SET_PDEATHSIG",
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_and_refuse_relative_or_escaping_targets() {
        assert_eq!(
            "/a/b:/kernel:ro".parse::<JailMount>().unwrap(),
            JailMount {
                source: "/a/b".into(),
                target: "/kernel".into(),
                read_only: true
            }
        );
        assert!(!"/a:/run".parse::<JailMount>().unwrap().read_only);
        for bad in ["/a", "/a:run", "/a:/../etc", "/a:/b:rw", "/a:/b:ro:x"] {
            assert!(bad.parse::<JailMount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn exits_report_seccomp_kills_by_name() {
        assert_eq!(VmmExit::Signal(libc::SIGSYS).code(), 128 + libc::SIGSYS);
        assert!(VmmExit::Signal(libc::SIGSYS)
            .to_string()
            .contains("seccomp"));
        assert_eq!(VmmExit::Code(3).code(), 3);
    }
}
