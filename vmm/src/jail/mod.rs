//! The jailer: starts the VMM with nothing around it that a guest escape
//! could use. In order:
//! 1. open `/dev/kvm` and the VMM binary, while still root;
//! 2. create the VMM's cgroup with its memory, CPU and process limits;
//! 3. clone a child into new mount, PID, network, IPC and UTS
//!    namespaces;
//! 4. in the child: join the cgroup (on v1; see `cgroup::SelfPlacement`),
//!    bind-mount only the files the VMM needs into an empty root and
//!    `pivot_root` into it; then, once the parent has written the PID file
//!    (and on v2 put it in the cgroup), set resource limits, drop to the
//!    unprivileged uid and gid, and exec the VMM from its descriptor with
//!    the KVM descriptor inherited (`--kvm-fd`);
//! 5. in the parent: on v2 put the child in the cgroup, let it go, wait
//!    for it, report how it ended, and clean up.
//!
//! The child dies with the jailer (`PR_SET_PDEATHSIG`), so killing the
//! jailer stops the microVM.

pub mod cgroup;

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use cgroup::{Cgroup, CgroupError, CgroupLimits, SelfPlacement};

use crate::vstate::vm::HypervisorKind;

/// A host path made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Names the jail directory and the cgroup.
    pub id: String,
    pub exec_file: PathBuf,
    /// Where jails are made: `<chroot_base>/<id>/root`.
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub mounts: Vec<JailMount>,
    pub cgroup_parent: String,
    pub limits: CgroupLimits,
    pub max_open_files: u64,
    pub max_processes: u64,
    /// Arguments for the VMM, after the ones the jailer adds.
    pub vmm_args: Vec<OsString>,
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
        let kvm = open("/dev/kvm", Path::new("/dev/kvm"), libc::O_RDWR)?;
        let exec = open(
            "--exec-file",
            &self.config.exec_file,
            libc::O_RDONLY | libc::O_CLOEXEC,
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
        let result = self.spawn(&kvm, &exec, &cgroup);
        cgroup.remove();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove the jail {}: {e}", self.dir.display());
        }
        result
    }

    fn spawn(&self, kvm: &OwnedFd, exec: &OwnedFd, cgroup: &Cgroup) -> Result<VmmExit, JailError> {
        let argv = self.vmm_argv(kvm.as_raw_fd());
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
            let error = self.enter(go[0], exec.as_raw_fd(), &argv, placement.as_ref());
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

    fn vmm_argv(&self, kvm_fd: RawFd) -> Vec<CString> {
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
            CString::new(match HypervisorKind::detect() {
                HypervisorKind::Pvm => "pvm",
                HypervisorKind::Hardware => "hardware",
            })
            .unwrap_or_default(),
        ];
        argv.extend(
            self.config
                .vmm_args
                .iter()
                .map(|a| CString::new(a.as_bytes()).unwrap_or_default()),
        );
        argv
    }

    /// The child's side: joins its cgroup (v1), builds the root, waits for
    /// the parent (which on v2 moves it into its cgroup), drops privileges
    /// and execs. Returns only on failure.
    fn enter(
        &self,
        go: RawFd,
        exec: RawFd,
        argv: &[CString],
        placement: Option<&SelfPlacement>,
    ) -> JailError {
        if let Some(Err(e)) = placement.map(SelfPlacement::join) {
            return JailError::Sys("joining the cgroup", e);
        }
        // On v2 the root is built while the parent moves this process into
        // its cgroup, which can wait for an RCU grace period (about 10 ms
        // on an otherwise idle host); mounts need no limits. The VMM
        // itself starts only inside the cgroup.
        if let Err(e) = self.build_root() {
            return e;
        }
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into a local buffer.
        if unsafe { libc::read(go, byte.as_mut_ptr().cast(), 1) } != 1 {
            return JailError::Sys("waiting for the cgroup", std::io::Error::last_os_error());
        }
        if let Err(e) = self.drop_privileges() {
            return e;
        }
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

    fn build_root(&self) -> Result<(), JailError> {
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
        for m in &self.config.mounts {
            self.bind(m)?;
        }
        let old = root.join(".old-root");
        std::fs::create_dir_all(&old).map_err(|e| JailError::Sys("creating .old-root", e))?;
        let c_old = c_path(&old);
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
        std::fs::remove_dir("/.old-root").map_err(|e| JailError::Sys("removing .old-root", e))?;
        // SAFETY: a static NUL-terminated name.
        unsafe { libc::sethostname(c"microvm".as_ptr(), 7) };
        Ok(())
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
