//! The VMM process behind an execution environment, started through the
//! jailer (the default) or directly. Jailed, a guest that escapes into its
//! VMM finds an empty root holding only its kernel, its code disk and its
//! own sockets, no network, an unprivileged uid, seccomp filters and a
//! cgroup sized from the function's memory.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use vmm::jail::{place_fds, seqpacket_pair, set_policy, JailMount, Launch};

/// How the worker jails its VMMs.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The `jailer` binary.
    pub jailer: PathBuf,
    pub ids: Arc<JailIds>,
    /// Where jail roots are made, one directory per environment.
    pub chroot_base: PathBuf,
    pub cgroup_parent: String,
    /// Prefixes jail names, so that workers sharing a host (and its
    /// cgroup tree) never pick the same one.
    pub id_prefix: String,
    pub pool: Arc<JailPool>,
}

/// Jails made ahead of time, each a jailer that has built its namespaces,
/// cgroup and root and waits for its VMM's [`Launch`]: a cold start then
/// skips the jailer's start and the namespaces' creation (3-7 ms here).
#[derive(Debug)]
pub struct JailPool {
    /// How many wait.
    size: usize,
    /// The VMM binary they exec.
    vmm: PathBuf,
    idle: Mutex<Vec<IdleJail>>,
    /// Numbers the jails.
    made: AtomicU64,
    /// A refill is under way: cold starts that end together ask for one
    /// each, and would otherwise each fill the pool.
    refilling: AtomicBool,
}

/// A jailer waiting for its launch. Dropped, its socket closes, and the
/// jailer removes its jail and cgroup and ends.
#[derive(Debug)]
struct IdleJail {
    child: Child,
    launch: UnixStream,
    jailed: Jailed,
}

impl JailPool {
    /// A pool of `size` jails for the VMM binary `vmm`, empty until
    /// [`JailSettings::refill`]ed.
    pub fn new(size: usize, vmm: &Path) -> Arc<Self> {
        Arc::new(JailPool {
            size,
            vmm: vmm.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            made: AtomicU64::new(0),
            refilling: AtomicBool::new(false),
        })
    }

    fn take(&self, vmm: &Path) -> Option<IdleJail> {
        if vmm != self.vmm {
            return None;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // One whose jailer died meanwhile (killed by hand, say) is passed
        // over.
        while let Some(mut jail) = idle.pop() {
            if matches!(jail.child.try_wait(), Ok(None)) {
                return Some(jail);
            }
        }
        None
    }

    fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl JailSettings {
    /// Makes jails until the pool is full. Each costs a jailer's start,
    /// so this runs off a cold start's path.
    pub fn refill(&self) {
        if self.pool.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        self.fill();
        self.pool.refilling.store(false, Ordering::Release);
    }

    /// Lets the jails waiting in the pool go, each removing its jail and
    /// cgroup, and waits for them: a worker that stops leaves none behind.
    pub async fn empty_pool(&self) {
        // No refill starts from now on.
        self.pool.refilling.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *self.pool.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for IdleJail {
            mut child, launch, ..
        } in idle
        {
            // Its socket closed without a launch, the jailer cleans up.
            drop(launch);
            if tokio::time::timeout(JAILER_STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    fn fill(&self) {
        while self.pool.idle() < self.pool.size {
            match self.make_jail(&self.pool.vmm, true) {
                Ok(jail) => self
                    .pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(jail),
                Err(e) => {
                    tracing::warn!("no jail made ahead: {e}");
                    return;
                }
            }
        }
    }

    /// Starts a jailer that builds a jail for `vmm` and waits for its
    /// launch; `ahead` of need at `SCHED_IDLE`, so that making it never
    /// slows the microVMs that run (the jail's VMM runs at the normal
    /// policy).
    fn make_jail(&self, vmm: &Path, ahead: bool) -> Result<IdleJail, VmmProcessError> {
        let uid = self
            .ids
            .take()
            .ok_or_else(|| VmmProcessError::NoFreeJailId(self.ids.range()))?;
        let n = self.pool.made.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}j{n}", self.id_prefix);
        let spawn_error = |source| VmmProcessError::Spawn {
            program: self.jailer.clone(),
            source,
        };
        let (launch, theirs) = seqpacket_pair().map_err(spawn_error)?;
        let mut command = Command::new(&self.jailer);
        command
            .arg("--id")
            .arg(&id)
            .arg("--exec-file")
            .arg(vmm)
            .arg("--uid")
            .arg(uid.id.to_string())
            .arg("--gid")
            .arg(uid.id.to_string())
            .arg("--chroot-base")
            .arg(&self.chroot_base)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            // One vCPU, and the device thread beside it.
            .arg("--cpus")
            .arg("1")
            .arg("--launch-fd")
            .arg(LAUNCH_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Asked to stop instead (see VmmProcess's Drop), it still
            // removes its jail and cgroup.
            .kill_on_drop(false);
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: async-signal-safe calls on the child between fork and
        // exec (see `child_setup`).
        unsafe {
            command.pre_exec(move || {
                child_setup(libc::SIGTERM, &[(theirs_fd, LAUNCH_FD)])?;
                if ahead {
                    set_policy(0, libc::SCHED_IDLE)?;
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(spawn_error)?;
        Ok(IdleJail {
            child,
            launch,
            jailed: Jailed {
                pid_file: self.chroot_base.join(&id).join("vmm.pid"),
                id,
                uid,
            },
        })
    }
}

/// In a VMM's or jailer's child, between fork and exec: below the host's
/// own threads, the VMM's guests (which poll their devices and spin while
/// they wait for the host) cannot starve the worker that answers them;
/// the child dies with the worker (`death_signal`); and each `(fd,
/// number)` is placed at its number.
fn child_setup(death_signal: libc::c_int, fds: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    // SAFETY: setpriority and prctl are async-signal-safe and touch only
    // this process.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, VMM_NICE);
        libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
    }
    place_fds(fds)
}

/// Gives each jailed VMM a uid, and a gid of the same number, of its own
/// while it runs: its files, its processes and its process-count limit
/// (which Linux counts per uid) are then its own, not shared with every
/// other microVM on the host.
#[derive(Debug)]
pub struct JailIds {
    first: u32,
    count: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl JailIds {
    /// The ids `first .. first + count`; none of them may be 0.
    pub fn new(first: u32, count: u32) -> Result<Arc<Self>, String> {
        if first == 0 || first.checked_add(count).is_none() || count == 0 {
            return Err(format!(
                "jail ids {first}..{first}+{count}: must be non-empty, above 0 and below 2^32"
            ));
        }
        Ok(Arc::new(JailIds {
            first,
            count,
            used: Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn range(&self) -> std::ops::Range<u32> {
        self.first..self.first + self.count
    }

    /// The lowest free id, held until the returned guard drops.
    fn take(self: &Arc<Self>) -> Option<JailId> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.range().find(|id| !used.contains(id))?;
        used.insert(id);
        Some(JailId {
            ids: self.clone(),
            id,
        })
    }
}

/// A uid and gid held by one jailed VMM.
#[derive(Debug)]
struct JailId {
    ids: Arc<JailIds>,
    id: u32,
}

impl Drop for JailId {
    fn drop(&mut self) {
        let mut used = self.ids.used.lock().unwrap_or_else(|e| e.into_inner());
        used.remove(&self.id);
    }
}

/// A microVM's code disk.
pub enum CodeDisk<'a> {
    /// Sealed: the VMM decrypts it as the guest reads it, with the
    /// artifact id and data key it reads from [`CODE_KEY_FD`]: never on
    /// its command line or on disk.
    Sealed { path: &'a Path, key: &'a str },
    /// A container image in the chunk store: the VMM fetches a chunk when
    /// the guest first reads it, with the keys in the image's manifest,
    /// which it reads from [`MANIFEST_FD`].
    Chunked { store: &'a Path, manifest: &'a [u8] },
}

/// One microVM's files, as the host sees them.
pub struct VmmFiles<'a> {
    pub vmm: &'a Path,
    pub kernel: &'a Path,
    pub code: CodeDisk<'a>,
    /// A runtime's root file system image, public and read-only.
    pub root_disk: Option<&'a Path>,
    /// A sealed disk of the function's layers and its key line, which the
    /// VMM reads from [`LAYERS_KEY_FD`].
    pub layers_disk: Option<(&'a Path, &'a str)>,
    /// The environment's directory: the VMM makes its vsock socket here
    /// and connects to the worker's listeners next to it.
    pub dir: &'a Path,
}

/// How the VMM starts its guest.
pub enum GuestStart<'a> {
    /// Boots the kernel, with this initramfs if any, and this command
    /// line. The VMM takes snapshot requests on [`CONTROL_SOCKET`] in the
    /// environment's directory.
    Boot {
        cmdline: &'a str,
        initrd: Option<&'a Path>,
    },
    /// Restores a snapshot from these read-only descriptors, which the
    /// VMM inherits as `fd:3` and `fd:4`.
    Restore { state: File, memory: File },
}

/// Where the jailed VMM sees its files.
const JAIL_KERNEL: &str = "/kernel";
const JAIL_INITRD: &str = "/initrd";
const JAIL_CODE_DISK: &str = "/code.img";
const JAIL_CHUNKS: &str = "/chunks";
const JAIL_ROOT_DISK: &str = "/root.img";
const JAIL_LAYERS_DISK: &str = "/layers.img";
const JAIL_DIR: &str = "/run";
/// The VMM's control socket, in the environment's directory.
pub const CONTROL_SOCKET: &str = "control";
/// Where a VMM writes a snapshot, in the environment's directory.
pub const SNAPSHOT_STATE: &str = "snapshot.state";
pub const SNAPSHOT_MEMORY: &str = "snapshot.mem";
/// The descriptors a restoring VMM finds its snapshot on.
const RESTORE_STATE_FD: RawFd = 3;
const RESTORE_MEMORY_FD: RawFd = 4;
/// The descriptor a VMM reads its layers disk's key from.
pub const LAYERS_KEY_FD: RawFd = 5;
/// The descriptor a VMM reads a chunked code disk's manifest from.
pub const MANIFEST_FD: RawFd = 6;
/// The descriptor a VMM reads its sealed code disk's key from.
pub const CODE_KEY_FD: RawFd = 7;
/// Where a jailer made ahead of time finds the socket its launch comes on.
const LAUNCH_FD: RawFd = 3;

/// What a VMM needs beyond its guest's memory: its own text, heap and
/// KVM's page tables, plus the page cache of the kernel and code disk
/// that the memory cgroup charges to it.
pub const VMM_OVERHEAD_MIB: u64 = 32;

/// The VMMs' scheduling priority (nice value), below the worker's.
const VMM_NICE: libc::c_int = 10;

/// How long a jailer has to stop its VMM and clean up before it is killed.
const JAILER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    #[error("every jail uid in {0:?} is taken")]
    NoFreeJailId(std::ops::Range<u32>),
    #[error("cannot hand {path} to the jail's uid: {source}")]
    HandOver {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM argument {0:?} is not UTF-8, which a jail's launch needs")]
    NotUtf8(OsString),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// What a jailed VMM holds while it runs.
#[derive(Debug)]
struct Jailed {
    /// The jail's name.
    id: String,
    /// Where the jailer writes the VMM's pid.
    pid_file: PathBuf,
    /// The uid and gid the VMM runs as; given back once it ended.
    uid: JailId,
}

pub struct VmmProcess {
    /// The jailer, or when not jailed the VMM itself.
    child: Child,
    jailed: Option<Jailed>,
    vmm_pid: Option<u32>,
}

impl VmmProcess {
    /// Starts the VMM, with its stdout and stderr piped: jailed, in a jail
    /// from the pool or, when none waits, one made now.
    pub fn spawn(
        jail: Option<&JailSettings>,
        files: &VmmFiles<'_>,
        memory_mib: u32,
        start: GuestStart<'_>,
    ) -> Result<Self, VmmProcessError> {
        let seen = |jailed: &str, host: &Path| match jail {
            Some(_) => PathBuf::from(jailed),
            None => host.to_path_buf(),
        };
        let spawn_error = |source| VmmProcessError::Spawn {
            program: files.vmm.to_path_buf(),
            source,
        };
        let mut vmm_args: Vec<OsString> = vec!["--log-level".into(), "warn".into()];
        // What the jail shows the VMM.
        let mut mounts = Vec::new();
        let mut mount = |source: &Path, target: &str, read_only: bool| {
            mounts.push(JailMount {
                source: source.to_path_buf(),
                target: target.into(),
                read_only,
            })
        };
        // Descriptors the VMM finds at the numbers it is told.
        let mut passed: Vec<(File, RawFd)> = Vec::new();
        match start {
            GuestStart::Boot { cmdline, initrd } => {
                vmm_args.extend(["--kernel".into(), seen(JAIL_KERNEL, files.kernel).into()]);
                mount(files.kernel, JAIL_KERNEL, true);
                if let Some(initrd) = initrd {
                    vmm_args.extend(["--initrd".into(), seen(JAIL_INITRD, initrd).into()]);
                    mount(initrd, JAIL_INITRD, true);
                }
                vmm_args.extend([
                    "--mem-mib".into(),
                    memory_mib.to_string().into(),
                    "--cmdline".into(),
                    cmdline.into(),
                    "--control-sock".into(),
                    seen(JAIL_DIR, files.dir).join(CONTROL_SOCKET).into(),
                ]);
            }
            GuestStart::Restore { state, memory } => {
                vmm_args.extend([
                    "--restore".into(),
                    format!("fd:{RESTORE_STATE_FD}").into(),
                    "--restore-memory".into(),
                    format!("fd:{RESTORE_MEMORY_FD}").into(),
                ]);
                passed.extend([(state, RESTORE_STATE_FD), (memory, RESTORE_MEMORY_FD)]);
            }
        }
        // The drives, in the order the guest's init is told
        // (guest_init::disks): the host's file, where the jail shows it,
        // and the options after `ro`.
        let mut drives: Vec<(&Path, &str, String)> = Vec::new();
        match files.code {
            CodeDisk::Sealed { path, key } => {
                drives.push((path, JAIL_CODE_DISK, format!(",key-fd={CODE_KEY_FD}")));
                passed.push((
                    secret_file(key.as_bytes()).map_err(spawn_error)?,
                    CODE_KEY_FD,
                ));
            }
            CodeDisk::Chunked { store, manifest } => {
                drives.push((store, JAIL_CHUNKS, format!(",manifest=fd:{MANIFEST_FD}")));
                passed.push((secret_file(manifest).map_err(spawn_error)?, MANIFEST_FD));
            }
        }
        if let Some(disk) = files.root_disk {
            drives.push((disk, JAIL_ROOT_DISK, String::new()));
        }
        if let Some((disk, key)) = files.layers_disk {
            drives.push((disk, JAIL_LAYERS_DISK, format!(",key-fd={LAYERS_KEY_FD}")));
            passed.push((
                secret_file(key.as_bytes()).map_err(spawn_error)?,
                LAYERS_KEY_FD,
            ));
        }
        for (host, jailed, options) in drives {
            let drive = seen(jailed, host);
            vmm_args.extend([
                "--drive".into(),
                format!("{},ro{options}", drive.display()).into(),
            ]);
            mount(host, jailed, true);
        }
        let vsock = seen(JAIL_DIR, files.dir).join("vsock");
        vmm_args.extend([
            "--vsock".into(),
            format!("cid=3,uds={}", vsock.display()).into(),
        ]);
        mount(files.dir, JAIL_DIR, false);
        match jail {
            None => Self::spawn_unjailed(files.vmm, vmm_args, &passed),
            Some(jail) => Self::launch_jailed(jail, files, memory_mib, vmm_args, mounts, &passed),
        }
    }

    fn spawn_unjailed(
        vmm: &Path,
        vmm_args: Vec<OsString>,
        passed: &[(File, RawFd)],
    ) -> Result<Self, VmmProcessError> {
        let mut command = Command::new(vmm);
        command
            .args(vmm_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A worker that dies takes its microVMs with it.
            .kill_on_drop(true);
        let fds: Vec<(RawFd, RawFd)> = passed.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
        // SAFETY: async-signal-safe calls on the child between fork and
        // exec (see `child_setup`).
        unsafe {
            command.pre_exec(move || child_setup(libc::SIGKILL, &fds));
        }
        let child = command.spawn().map_err(|source| VmmProcessError::Spawn {
            program: vmm.to_path_buf(),
            source,
        })?;
        Ok(VmmProcess {
            vmm_pid: child.id(),
            child,
            jailed: None,
        })
    }

    fn launch_jailed(
        jail: &JailSettings,
        files: &VmmFiles<'_>,
        memory_mib: u32,
        vmm_args: Vec<OsString>,
        mounts: Vec<JailMount>,
        passed: &[(File, RawFd)],
    ) -> Result<Self, VmmProcessError> {
        let (ready, from_pool) = match jail.pool.take(files.vmm) {
            Some(ready) => (ready, true),
            None => (jail.make_jail(files.vmm, false)?, false),
        };
        hand_over(files.dir, ready.jailed.uid.id)?;
        let launch = Launch {
            mounts,
            memory_max: Some((u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20),
            vmm_args: vmm_args
                .into_iter()
                .map(|a| a.into_string().map_err(VmmProcessError::NotUtf8))
                .collect::<Result<_, _>>()?,
            fds: passed.iter().map(|(_, number)| *number).collect(),
        };
        let fds: Vec<RawFd> = passed.iter().map(|(f, _)| f.as_raw_fd()).collect();
        // Queued whole before the socket closes here: the jailer reads the
        // launch, then the end.
        launch
            .send(&ready.launch, &fds)
            .map_err(|source| VmmProcessError::Spawn {
                program: jail.jailer.clone(),
                source,
            })?;
        if let (true, Some(pid)) = (from_pool, ready.child.id()) {
            // The jailer reports its VMM's end; its child, the VMM, leaves
            // SCHED_IDLE itself once launched.
            if let Err(e) = set_policy(pid as libc::pid_t, libc::SCHED_OTHER) {
                tracing::warn!("the jailer {pid} stays at SCHED_IDLE: {e}");
            }
        }
        Ok(VmmProcess {
            child: ready.child,
            jailed: Some(ready.jailed),
            vmm_pid: None,
        })
    }

    /// Where the VMM sees `name` in the environment's directory `dir`.
    pub fn path_in_vmm(&self, dir: &Path, name: &str) -> PathBuf {
        match self.jailed {
            Some(_) => Path::new(JAIL_DIR).join(name),
            None => dir.join(name),
        }
    }

    /// The jail's name, or None when the VMM runs unjailed.
    pub fn jail_id(&self) -> Option<&str> {
        self.jailed.as_ref().map(|j| j.id.as_str())
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The VMM's pid on the host, once it runs; None after the child has
    /// been reaped, so that a reused pid is never signalled.
    fn vmm_pid(&mut self) -> Option<u32> {
        self.child.id()?;
        if self.vmm_pid.is_none() {
            self.vmm_pid = self
                .jailed
                .as_ref()
                .and_then(|j| std::fs::read_to_string(&j.pid_file).ok())
                .and_then(|s| s.trim().parse().ok());
        }
        self.vmm_pid
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the VMM. Lambda freezes an
    /// environment between invocations; here that also matters for the
    /// host, since the bare-metal guest polls its devices and would
    /// otherwise spin on a host CPU while it waits for work.
    pub fn freeze(&mut self, frozen: bool) {
        if let Some(pid) = self.vmm_pid() {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: signals the VMM while its parent (this process, or
            // the jailer this process has not reaped) still holds it.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// The VMM's peak resident memory (`VmHWM`), in MiB: what the guest
    /// touched, plus the VMM's own.
    pub fn peak_rss_mib(&mut self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.vmm_pid()?)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib.div_ceil(1024))
    }

    /// Stops the VMM. A jailer is asked first, so that it removes its
    /// jail and cgroup; it kills its VMM even when that is frozen.
    pub async fn stop(mut self) {
        if self.jailed.is_some() {
            if let Some(pid) = self.child.id() {
                // SAFETY: signals the jailer, a child not yet reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                if tokio::time::timeout(JAILER_STOP_TIMEOUT, self.child.wait())
                    .await
                    .is_ok()
                {
                    return;
                }
                tracing::warn!("jailer {pid} ignored SIGTERM; killing it");
            }
        }
        let _ = self.child.kill().await;
    }

    /// How the VMM ended, naming a seccomp kill as such. A jailer reports
    /// the VMM's signal as 128 + its number, as a shell does.
    pub fn describe_exit(&self, status: ExitStatus) -> String {
        let signal = match (status.signal(), status.code()) {
            (Some(s), _) => Some(s),
            (None, Some(c)) if self.jailed.is_some() && c > 128 => Some(c - 128),
            _ => None,
        };
        if signal == Some(libc::SIGSYS) {
            format!("{status}: its seccomp filter killed the VMM for a forbidden system call")
        } else {
            status.to_string()
        }
    }
}

impl Drop for VmmProcess {
    /// A jailer, which is not killed on drop, is asked to stop: it kills
    /// its VMM and removes the jail and cgroup.
    fn drop(&mut self) {
        if let (Some(_), Some(pid)) = (&self.jailed, self.child.id()) {
            // SAFETY: signals the jailer, a child not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// Sends one request to a VMM's control socket (`sock`) and returns its
/// JSON reply.
pub async fn control_request(
    sock: &Path,
    request: &impl serde::Serialize,
) -> Result<serde_json::Value, String> {
    control_request_within(sock, request, CONTROL_TIMEOUT).await
}

/// How long a VMM may take to answer a control request. A snapshot at the
/// first `/next` writes the few MiB the guest touched; a VMM that has not
/// answered in this long never will (one that could not watch its control
/// socket once kept an environment's start waiting forever).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

async fn control_request_within(
    sock: &Path,
    request: &impl serde::Serialize,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    tokio::time::timeout(timeout, exchange(sock, request))
        .await
        .map_err(|_| {
            format!(
                "the VMM's control socket {} gave no answer within {timeout:?}",
                sock.display()
            )
        })?
}

async fn exchange(
    sock: &Path,
    request: &impl serde::Serialize,
) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = serde_json::to_string(request).map_err(|e| e.to_string())?;
    let mut stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("the VMM's control socket {}: {e}", sock.display()))?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&reply).map_err(|e| format!("reply {reply:?}: {e}"))
}

/// Asks the VMM behind `sock` for a snapshot into `state` and `memory`
/// (paths as the VMM sees them); returns its report.
pub async fn request_snapshot(
    sock: &Path,
    state: &Path,
    memory: &Path,
) -> Result<serde_json::Value, String> {
    let request = vmm::control::ControlRequest::Snapshot {
        state: state.to_path_buf(),
        memory: memory.to_path_buf(),
    };
    let reply = control_request(sock, &request).await?;
    if reply["ok"] != true {
        return Err(format!("the VMM refused the snapshot: {}", reply["error"]));
    }
    Ok(reply)
}

/// A file in memory holding `bytes`, at its start, for a VMM to read a
/// key or a manifest from: never on disk, and of any size (a pipe's
/// buffer would hold 64 KiB before its reader runs).
fn secret_file(bytes: &[u8]) -> std::io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor it
    // returns is owned here.
    let mut file = unsafe {
        let fd = libc::memfd_create(c"vmm-secret".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        File::from(OwnedFd::from_raw_fd(fd))
    };
    file.write_all(bytes)?;
    std::io::Seek::rewind(&mut file)?;
    Ok(file)
}

/// Gives the environment's directory and the worker's sockets in it to
/// the jail's uid: the VMM makes its own socket there and connects to the
/// worker's.
fn hand_over(dir: &Path, id: u32) -> Result<(), VmmProcessError> {
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(id), Some(id)).map_err(|source| {
            VmmProcessError::HandOver {
                path: path.to_path_buf(),
                source,
            }
        })
    };
    chown(dir)?;
    let entries = std::fs::read_dir(dir).map_err(|source| VmmProcessError::HandOver {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        chown(&entry.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_control_socket_that_never_answers_times_out() {
        let sock = std::env::temp_dir().join(format!("silent-control-{}", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        // Bound and listening, so the connect succeeds, but never served:
        // a VMM whose event loop does not watch the socket.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let request = serde_json::json!({"action": "snapshot"});
        let started = std::time::Instant::now();
        let err = control_request_within(&sock, &request, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("gave no answer within 100ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::fs::remove_file(&sock).unwrap();
    }
}
