//! The VMM process behind an execution environment, started through the
//! jailer (the default) or directly. Jailed, a guest that escapes into its
//! VMM finds a root holding only its own sockets and the sealed chunk
//! store (its kernel and disks are open descriptors), no network, an
//! unprivileged uid, seccomp filters and a cgroup sized from the
//! function's memory.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use vmm::jail::cgroup::{Cgroup, CgroupError};
use vmm::jail::{place_fds, seqpacket_pair, set_policy, set_process_policy, JailMount, Launch};
use vmm::standby::{await_ready, has_spoken};

use crate::control_plane::model::MAX_MEMORY_MIB;

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
    /// Where each jail's run directory is made, shown to its VMM as
    /// `/run`: the environment's sockets go there.
    pub run_dir: PathBuf,
    /// The container images' chunk store, shown read-only to every VMM
    /// (it holds only sealed chunks; their keys come with a launch).
    pub chunk_store: Option<PathBuf>,
}

/// VMMs started ahead of time in their jails, each waiting for its
/// microVM's launch: a jailer has built the namespaces, cgroup and root
/// and exec'd the VMM on standby (`--standby-fd`), which made its VM. A
/// cold start then skips the jailer's start, the namespaces' creation,
/// the VMM's exec and the VM's creation.
#[derive(Debug)]
pub struct JailPool {
    /// How many wait.
    size: usize,
    /// The VMM binary they exec.
    vmm: PathBuf,
    idle: Mutex<Vec<StandbyVmm>>,
    /// Numbers the jails.
    made: AtomicU64,
    /// A refill is under way: cold starts that end together ask for one
    /// each, and would otherwise each fill the pool.
    refilling: AtomicBool,
    /// Cold starts under way. While there is one, the VMMs of the pool
    /// that are still starting are stopped, and no refill starts more:
    /// the kernel's work of making a jail and a VM, even at SCHED_IDLE,
    /// slowed the boot it overlapped by 1-4 ms.
    cold_starts: Mutex<usize>,
}

/// A cold start under way ([`JailSettings::cold_start`]); the last to end
/// lets the pool's stopped VMMs go on.
pub struct ColdStartUnderWay(Arc<JailPool>);

impl Drop for ColdStartUnderWay {
    fn drop(&mut self) {
        let mut cold_starts = self.0.cold_starts();
        *cold_starts -= 1;
        if *cold_starts == 0 {
            self.0.pause_idle(false);
        }
    }
}

/// A VMM on standby in its jail. Dropped, its socket closes: the VMM
/// ends, and the jailer removes its jail and cgroup and ends.
#[derive(Debug)]
pub struct StandbyVmm {
    /// The jailer.
    child: Child,
    /// Where the microVM's launch goes, to the VMM itself.
    launch: UnixStream,
    jailed: Jailed,
    /// The jail's `/run`, as the host sees it.
    dir: PathBuf,
    /// Stopped while it was starting, for a cold start.
    paused: bool,
}

impl StandbyVmm {
    /// Stops (SIGSTOP) or resumes (SIGCONT) the jailer and, once it has
    /// one, its VMM, if they are still starting: one that is ready waits
    /// in a system call and costs nothing.
    fn pause(&mut self, paused: bool) {
        if paused == self.paused || (paused && has_spoken(&self.launch)) {
            return;
        }
        let Some(jailer) = self.child.id() else {
            return;
        };
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // The jailer, which this process has not reaped, holds the VMM's
        // pid: neither can be another process's.
        for pid in [Some(jailer), self.jailed.vmm_pid()].into_iter().flatten() {
            // SAFETY: signals a process named above.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
        self.paused = paused;
    }
}

/// Where an environment's VMM runs: on standby in a jail, or unjailed
/// (then the environment's directory is its own).
pub enum VmmSlot {
    Jailed(Box<StandbyVmm>),
    Unjailed { dir: PathBuf },
}

impl VmmSlot {
    /// A VMM on standby from the pool, or one started now; unjailed
    /// without `jail`, with `dir` as the environment's directory.
    pub fn take(
        jail: Option<&JailSettings>,
        vmm: &Path,
        dir: PathBuf,
    ) -> Result<Self, VmmProcessError> {
        let Some(jail) = jail else {
            return Ok(VmmSlot::Unjailed { dir });
        };
        let standby = match jail.pool.take(vmm) {
            Some(standby) => standby,
            None => jail.start_standby(vmm, false)?,
        };
        Ok(VmmSlot::Jailed(Box::new(standby)))
    }

    /// The environment's directory: the VMM makes its vsock socket there
    /// and connects to the worker's listeners next to it.
    pub fn dir(&self) -> &Path {
        match self {
            VmmSlot::Jailed(standby) => &standby.dir,
            VmmSlot::Unjailed { dir } => dir,
        }
    }
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
            cold_starts: Mutex::new(0),
        })
    }

    fn take(&self, vmm: &Path) -> Option<StandbyVmm> {
        if vmm != self.vmm {
            return None;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // One whose jailer died meanwhile (killed by hand, say) is passed
        // over.
        idle.retain_mut(|standby| {
            let alive = matches!(standby.child.try_wait(), Ok(None));
            if !alive {
                let _ = std::fs::remove_dir_all(&standby.dir);
            }
            alive
        });
        // The first that is ready, else the oldest: the newest, refilled
        // after the last cold start, may still be starting, and back-to-back
        // cold starts that took it waited for its jailer (3-13 ms) while a
        // ready one sat in the pool.
        let at = idle
            .iter()
            .position(|standby| has_spoken(&standby.launch))
            .or((!idle.is_empty()).then_some(0))?;
        let mut standby = idle.remove(at);
        standby.pause(false);
        Some(standby)
    }

    fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn cold_starts(&self) -> std::sync::MutexGuard<'_, usize> {
        self.cold_starts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops or resumes every VMM waiting in the pool that is still
    /// starting ([`StandbyVmm::pause`]).
    fn pause_idle(&self, paused: bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter_mut().for_each(|standby| standby.pause(paused));
    }
}

impl JailSettings {
    /// A cold start begins: until what this returns is dropped, the
    /// pool's VMMs that are still starting stop, and no refill starts.
    pub fn cold_start(&self) -> ColdStartUnderWay {
        let mut cold_starts = self.pool.cold_starts();
        if *cold_starts == 0 {
            self.pool.pause_idle(true);
        }
        *cold_starts += 1;
        ColdStartUnderWay(self.pool.clone())
    }

    /// Makes jails until the pool is full. Each costs a jailer's start,
    /// so this runs off a cold start's path.
    pub fn refill(&self) {
        if self.pool.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        self.fill();
        self.pool.refilling.store(false, Ordering::Release);
    }

    /// Ends the jailers of a worker before this one with the same jail
    /// roots, killed outright (SIGKILL) while it held its pool's starting
    /// VMMs for a cold start: a stopped jailer keeps its death signal
    /// (SIGTERM) pending, and with it its jail, cgroup and VMM. Each is
    /// asked again and continued, so that it ends its VMM and removes its
    /// jail and cgroup, and waited for; one still there after
    /// `JAILER_STOP_TIMEOUT` is killed.
    pub fn end_orphaned_jailers(&self) {
        let mut orphans: Vec<i32> = jailers_of(&self.jailer, &self.chroot_base)
            .into_iter()
            .map(|(pid, _)| pid)
            .collect();
        for &pid in &orphans {
            for signal in [libc::SIGTERM, libc::SIGCONT] {
                // SAFETY: signals a jailer of these jail roots.
                unsafe { libc::kill(pid, signal) };
            }
        }
        let deadline = std::time::Instant::now() + JAILER_STOP_TIMEOUT;
        while !orphans.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            // An orphan that ended stays a zombie until init reaps it.
            orphans.retain(|&pid| !matches!(process_state(pid), None | Some('Z' | 'X')));
        }
        for pid in orphans {
            tracing::warn!("jailer {pid} of a worker before this one ignored SIGTERM; killing it");
            // SAFETY: signals the jailer found above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Lets the jails waiting in the pool go, each removing its jail and
    /// cgroup, and waits for them: a worker that stops leaves none behind.
    pub async fn empty_pool(&self) {
        // No refill starts from now on.
        self.pool.refilling.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *self.pool.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for mut standby in idle {
            // A stopped one would not see its socket close.
            standby.pause(false);
            let StandbyVmm {
                mut child,
                launch,
                dir,
                ..
            } = standby;
            // Its socket closed without a launch, the VMM ends and the
            // jailer cleans up its jail; its run directory is the
            // worker's.
            drop(launch);
            if tokio::time::timeout(JAILER_STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    fn fill(&self) {
        while self.pool.idle() < self.pool.size && *self.pool.cold_starts() == 0 {
            match self.start_standby(&self.pool.vmm, true) {
                Ok(mut standby) => {
                    // A cold start that began meanwhile stops it too; held
                    // until it is in the pool, where the last cold start's
                    // end finds it.
                    let cold_starts = self.pool.cold_starts();
                    if *cold_starts > 0 {
                        standby.pause(true);
                    }
                    self.pool
                        .idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(standby);
                }
                Err(e) => {
                    tracing::warn!("no VMM started ahead: {e}");
                    return;
                }
            }
        }
    }

    /// Starts a jailer that builds a jail for `vmm` and execs it there on
    /// standby, with the jail's own launch: its run directory and the
    /// chunk store mounted, a memory limit no microVM exceeds (its own is
    /// set at its launch). `ahead` of need, the jailer builds the jail and
    /// the VMM makes its VM at `SCHED_IDLE`, so that neither slows the
    /// microVMs that run (back-to-back cold starts each overlapped the
    /// start of the VMM that refilled the pool); the worker raises the
    /// VMM to the normal policy before its launch (an unprivileged VMM
    /// cannot leave SCHED_IDLE by itself without RLIMIT_NICE, which a host
    /// may not let root raise).
    fn start_standby(&self, vmm: &Path, ahead: bool) -> Result<StandbyVmm, VmmProcessError> {
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
        drop(theirs);
        let dir = self.run_dir.join(&id);
        std::fs::create_dir_all(&dir).map_err(|source| VmmProcessError::RunDir {
            path: dir.clone(),
            source,
        })?;
        hand_over(&dir, uid.id)?;
        let mut mounts = vec![JailMount {
            source: dir.clone(),
            target: JAIL_DIR.into(),
            read_only: false,
        }];
        // A worker host of a fleet keeps no images.
        if let Some(store) = self.chunk_store.as_ref().filter(|s| s.is_dir()) {
            mounts.push(JailMount {
                source: store.clone(),
                target: JAIL_CHUNKS.into(),
                read_only: true,
            });
        }
        let (vmm_launch, vmm_end) = seqpacket_pair().map_err(spawn_error)?;
        let standby = Launch {
            mounts,
            memory_max: Some(memory_limit(MAX_MEMORY_MIB)),
            vmm_args: [
                "--standby-fd",
                &STANDBY_FD.to_string(),
                "--log-level",
                "warn",
            ]
            .map(str::to_string)
            .to_vec(),
            fds: vec![STANDBY_FD],
            keep_sched_idle: ahead,
        };
        // Queued whole before the socket closes here: the jailer reads the
        // launch, then the end.
        standby
            .send(&launch, &[vmm_end.as_raw_fd()])
            .map_err(spawn_error)?;
        Ok(StandbyVmm {
            child,
            launch: vmm_launch,
            jailed: Jailed {
                pid_file: self.chroot_base.join(&id).join("vmm.pid"),
                id,
                cgroup_parent: self.cgroup_parent.clone(),
                uid,
            },
            dir,
            paused: false,
        })
    }
}

/// The processes running `jailer` for jails under `chroot_base`, each
/// with its arguments, as /proc shows them.
pub fn jailers_of(jailer: &Path, chroot_base: &Path) -> Vec<(i32, Vec<OsString>)> {
    let (Ok(jailer), Ok(processes)) = (std::fs::canonicalize(jailer), std::fs::read_dir("/proc"))
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !std::fs::read_link(process.path().join("exe")).is_ok_and(|exe| exe == jailer) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(process.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<OsString> = cmdline
            .split(|b| *b == 0)
            .map(|a| OsStr::from_bytes(a).to_os_string())
            .collect();
        if args
            .windows(2)
            .any(|a| a[0] == "--chroot-base" && a[1] == chroot_base.as_os_str())
        {
            found.push((pid, args));
        }
    }
    found
}

/// Process `pid`'s state letter in /proc (R, S, T, Z...), if it exists.
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis (a command may hold one).
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Caps the memory of `jailed`'s cgroup for a guest of `memory_mib`.
fn set_jail_memory_limit(jailed: &Jailed, memory_mib: u32) -> Result<(), VmmProcessError> {
    let limit_error = |e: CgroupError| VmmProcessError::MemoryLimit {
        jail: jailed.id.clone(),
        reason: e.to_string(),
    };
    match Cgroup::memory_limit_of(&jailed.cgroup_parent, &jailed.id).map_err(limit_error)? {
        Some(files) => files.set(memory_limit(memory_mib)).map_err(limit_error),
        None => Ok(()),
    }
}

/// The memory cgroup limit of a VMM whose guest has `memory_mib`.
fn memory_limit(memory_mib: u32) -> u64 {
    (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20
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
    /// Restores a snapshot from these read-only descriptors.
    Restore { state: File, memory: File },
}

/// Where the jailed VMM sees its directories.
const JAIL_CHUNKS: &str = "/chunks";
const JAIL_DIR: &str = "/run";
/// The VMM's control socket, in the environment's directory.
pub const CONTROL_SOCKET: &str = "control";
/// Where a VMM writes a snapshot, in the environment's directory.
pub const SNAPSHOT_STATE: &str = "snapshot.state";
pub const SNAPSHOT_MEMORY: &str = "snapshot.mem";
/// Where a jailer made ahead of time finds the socket its launch comes on.
const LAUNCH_FD: RawFd = 3;
/// Where a VMM on standby finds the socket its microVM's launch comes on.
const STANDBY_FD: RawFd = 3;
/// The descriptors a VMM finds its files on: above the standard streams
/// and the standby socket.
const KERNEL_FD: RawFd = 10;
const INITRD_FD: RawFd = 11;
const CODE_DISK_FD: RawFd = 12;
/// The descriptor a VMM reads its sealed code disk's key from.
pub const CODE_KEY_FD: RawFd = 13;
/// The descriptor a VMM reads a chunked code disk's manifest from.
pub const MANIFEST_FD: RawFd = 14;
const ROOT_DISK_FD: RawFd = 15;
const LAYERS_DISK_FD: RawFd = 16;
/// The descriptor a VMM reads its layers disk's key from.
pub const LAYERS_KEY_FD: RawFd = 17;
const RESTORE_STATE_FD: RawFd = 18;
const RESTORE_MEMORY_FD: RawFd = 19;
/// The host ends of the guest's first vsock connections, made ahead,
/// from this number up.
const CONNECTED_FDS: RawFd = 20;

/// What a VMM needs beyond its guest's memory: its own text, heap and
/// KVM's page tables, plus the page cache of the kernel and code disk
/// that the memory cgroup charges to it.
pub const VMM_OVERHEAD_MIB: u64 = 32;

/// The VMMs' scheduling priority (nice value), below the worker's.
const VMM_NICE: libc::c_int = 10;

/// How long a VMM started on standby may take to make its VM.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a jailer has to stop its VMM and clean up before it is killed.
const JAILER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    #[error("every jail uid in {0:?} is taken")]
    NoFreeJailId(std::ops::Range<u32>),
    #[error("cannot make the jail's run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hand {path} to the jail's uid: {source}")]
    HandOver {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {path} for the VMM: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jail {jail}: the VMM on standby is not ready: {reason}")]
    NotReady { jail: String, reason: String },
    #[error("jail {jail}: the memory limit: {reason}")]
    MemoryLimit { jail: String, reason: String },
    #[error("jail {jail}: sending the launch to its VMM: {source}")]
    Launch {
        jail: String,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// What a jailed VMM holds while it runs.
#[derive(Debug)]
struct Jailed {
    /// The jail's name, and its cgroup's under `cgroup_parent`.
    id: String,
    cgroup_parent: String,
    /// Where the jailer writes the VMM's pid.
    pid_file: PathBuf,
    /// The uid and gid the VMM runs as; given back once it ended.
    uid: JailId,
}

impl Jailed {
    /// The VMM's pid, as this host sees it, once its jailer wrote it.
    fn vmm_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

pub struct VmmProcess {
    /// The jailer, or when not jailed the VMM itself.
    child: Child,
    jailed: Option<Jailed>,
    vmm_pid: Option<u32>,
}

impl VmmProcess {
    /// Starts the environment's microVM in `slot`, with the VMM's stdout
    /// and stderr piped. Its files go to it as descriptors, which a
    /// jailed VMM (whose root was made before its microVM was known) can
    /// open where no path of the host's is.
    ///
    /// `connected` are the host ends of the guest's first connections to
    /// their vsock ports, made ahead (`vmm::config::ConnectedPort`).
    pub fn spawn(
        slot: VmmSlot,
        files: &VmmFiles<'_>,
        memory_mib: u32,
        start: GuestStart<'_>,
        connected: Vec<(u32, UnixStream)>,
    ) -> Result<Self, VmmProcessError> {
        let jailed = matches!(slot, VmmSlot::Jailed(_));
        let dir = match jailed {
            true => PathBuf::from(JAIL_DIR),
            false => slot.dir().to_path_buf(),
        };
        let spawn_error = |source| VmmProcessError::Spawn {
            program: files.vmm.to_path_buf(),
            source,
        };
        let mut vmm_args: Vec<String> = Vec::new();
        // Descriptors the VMM finds at the numbers it is told.
        let mut passed: Vec<(File, RawFd)> = Vec::new();
        let mut pass = |file: File, number: RawFd| {
            passed.push((file, number));
            format!("fd:{number}")
        };
        let open = |path: &Path| {
            File::open(path).map_err(|source| VmmProcessError::Open {
                path: path.to_path_buf(),
                source,
            })
        };
        match start {
            GuestStart::Boot { cmdline, initrd } => {
                vmm_args.extend(["--kernel".into(), pass(open(files.kernel)?, KERNEL_FD)]);
                if let Some(initrd) = initrd {
                    vmm_args.extend(["--initrd".into(), pass(open(initrd)?, INITRD_FD)]);
                }
                vmm_args.extend([
                    "--mem-mib".into(),
                    memory_mib.to_string(),
                    "--cmdline".into(),
                    cmdline.into(),
                    "--control-sock".into(),
                    dir.join(CONTROL_SOCKET).display().to_string(),
                ]);
            }
            GuestStart::Restore { state, memory } => {
                vmm_args.extend([
                    "--restore".into(),
                    pass(state, RESTORE_STATE_FD),
                    "--restore-memory".into(),
                    pass(memory, RESTORE_MEMORY_FD),
                ]);
            }
        }
        // The drives, in the order the guest's init is told
        // (guest_init::disks), read-only, with their options.
        let mut drives: Vec<String> = Vec::new();
        match files.code {
            CodeDisk::Sealed { path, key } => {
                let disk = pass(open(path)?, CODE_DISK_FD);
                let key = secret_file(key.as_bytes()).map_err(spawn_error)?;
                drives.push(format!("{disk},ro,key-fd={CODE_KEY_FD}"));
                pass(key, CODE_KEY_FD);
            }
            CodeDisk::Chunked { store, manifest } => {
                // A directory: shown to a jailed VMM by its jail.
                let store = match jailed {
                    true => PathBuf::from(JAIL_CHUNKS),
                    false => store.to_path_buf(),
                };
                let manifest = secret_file(manifest).map_err(spawn_error)?;
                drives.push(format!(
                    "{},ro,manifest={}",
                    store.display(),
                    pass(manifest, MANIFEST_FD)
                ));
            }
        }
        if let Some(disk) = files.root_disk {
            drives.push(format!("{},ro", pass(open(disk)?, ROOT_DISK_FD)));
        }
        if let Some((disk, key)) = files.layers_disk {
            let disk = pass(open(disk)?, LAYERS_DISK_FD);
            let key = secret_file(key.as_bytes()).map_err(spawn_error)?;
            drives.push(format!("{disk},ro,key-fd={LAYERS_KEY_FD}"));
            pass(key, LAYERS_KEY_FD);
        }
        for drive in drives {
            vmm_args.extend(["--drive".into(), drive]);
        }
        let mut vsock = format!("cid=3,uds={}", dir.join("vsock").display());
        for ((port, stream), number) in connected.into_iter().zip(CONNECTED_FDS..) {
            let fd = pass(File::from(OwnedFd::from(stream)), number);
            vsock.push_str(&format!(",connected={port}:{fd}"));
        }
        vmm_args.extend(["--vsock".into(), vsock]);
        match slot {
            VmmSlot::Unjailed { .. } => Self::spawn_unjailed(files.vmm, vmm_args, &passed),
            VmmSlot::Jailed(standby) => {
                Self::launch_jailed(*standby, memory_mib, vmm_args, &passed)
            }
        }
    }

    fn spawn_unjailed(
        vmm: &Path,
        vmm_args: Vec<String>,
        passed: &[(File, RawFd)],
    ) -> Result<Self, VmmProcessError> {
        let mut command = Command::new(vmm);
        command
            .args(["--log-level", "warn"])
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

    /// Sends the microVM's launch to the VMM on standby, once its jail's
    /// memory limit is the microVM's and its directory its uid's.
    fn launch_jailed(
        standby: StandbyVmm,
        memory_mib: u32,
        vmm_args: Vec<String>,
        passed: &[(File, RawFd)],
    ) -> Result<Self, VmmProcessError> {
        let StandbyVmm {
            child,
            launch: socket,
            jailed,
            dir,
            ..
        } = standby;
        // Its jailer set the jail's own limit before the VMM made its VM:
        // the microVM's is set after.
        // At once for one from the pool, a jailer's start for one started
        // now.
        await_ready(&socket, STANDBY_TIMEOUT).map_err(|reason| VmmProcessError::NotReady {
            jail: jailed.id.clone(),
            reason,
        })?;
        hand_over(&dir, jailed.uid.id)?;
        set_jail_memory_limit(&jailed, memory_mib)?;
        // Made ahead, the VMM waited at SCHED_IDLE; its microVM runs at the
        // normal policy, and so do the threads it starts.
        let vmm_pid = jailed.vmm_pid();
        let raised = vmm_pid
            .ok_or_else(|| "no pid file".to_string())
            .and_then(|pid| {
                set_process_policy(pid as libc::pid_t, libc::SCHED_OTHER).map_err(|e| e.to_string())
            });
        if let Err(e) = raised {
            tracing::warn!("the VMM in jail {} stays at SCHED_IDLE: {e}", jailed.id);
        }
        let launch = Launch {
            vmm_args,
            fds: passed.iter().map(|(_, number)| *number).collect(),
            ..Launch::default()
        };
        let fds: Vec<RawFd> = passed.iter().map(|(f, _)| f.as_raw_fd()).collect();
        launch
            .send(&socket, &fds)
            .map_err(|source| VmmProcessError::Launch {
                jail: jailed.id.clone(),
                source,
            })?;
        if let Some(pid) = child.id() {
            // The jailer, made ahead at SCHED_IDLE, reports its VMM's end.
            if let Err(e) = set_policy(pid as libc::pid_t, libc::SCHED_OTHER) {
                tracing::warn!("the jailer {pid} stays at SCHED_IDLE: {e}");
            }
        }
        Ok(VmmProcess {
            child,
            jailed: Some(jailed),
            vmm_pid,
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
            self.vmm_pid = self.jailed.as_ref().and_then(Jailed::vmm_pid);
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
