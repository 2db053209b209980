//! The VMM process behind an execution environment, started through the
//! jailer (the default) or directly. Jailed, a guest that escapes into its
//! VMM finds an empty root holding only its kernel, its code disk and its
//! own sockets, no network, an unprivileged uid, seccomp filters and a
//! cgroup sized from the function's memory.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

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
    /// artifact id and data key it reads from its standard input: never
    /// on its command line or on disk.
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
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// What a jailed VMM holds while it runs.
struct Jailed {
    /// The jail's name.
    id: String,
    /// Where the jailer writes the VMM's pid.
    pid_file: PathBuf,
    /// The uid and gid the VMM runs as; given back once it ended.
    _uid: JailId,
}

pub struct VmmProcess {
    /// The jailer, or when not jailed the VMM itself.
    child: Child,
    jailed: Option<Jailed>,
    vmm_pid: Option<u32>,
}

impl VmmProcess {
    /// Starts the VMM for environment `id`, with its stdout and stderr
    /// piped.
    pub fn spawn(
        jail: Option<&JailSettings>,
        id: &str,
        files: &VmmFiles<'_>,
        memory_mib: u32,
        start: GuestStart<'_>,
    ) -> Result<Self, VmmProcessError> {
        let seen = |jailed: &'static str, host: &Path| match jail {
            Some(_) => PathBuf::from(jailed),
            None => host.to_path_buf(),
        };
        let boot_initrd = match &start {
            GuestStart::Boot { initrd, .. } => *initrd,
            GuestStart::Restore { .. } => None,
        };
        let (mut vmm_args, restore_fds): (Vec<std::ffi::OsString>, _) = match &start {
            GuestStart::Boot { cmdline, initrd } => (
                [
                    "--kernel".into(),
                    seen(JAIL_KERNEL, files.kernel).into_os_string(),
                ]
                .into_iter()
                .chain(initrd.iter().flat_map(|initrd| {
                    [
                        "--initrd".into(),
                        seen(JAIL_INITRD, initrd).into_os_string(),
                    ]
                }))
                .chain([
                    "--mem-mib".into(),
                    memory_mib.to_string().into(),
                    "--cmdline".into(),
                    (*cmdline).into(),
                    "--control-sock".into(),
                    seen(JAIL_DIR, files.dir)
                        .join(CONTROL_SOCKET)
                        .into_os_string(),
                ])
                .collect(),
                None,
            ),
            GuestStart::Restore { state, memory } => (
                vec![
                    "--restore".into(),
                    format!("fd:{RESTORE_STATE_FD}").into(),
                    "--restore-memory".into(),
                    format!("fd:{RESTORE_MEMORY_FD}").into(),
                ],
                Some((state.as_raw_fd(), memory.as_raw_fd())),
            ),
        };
        // The drive as the VMM is told it, and the jail's mount of it.
        let (code_drive, code_mount) = match files.code {
            CodeDisk::Sealed { path, .. } => (
                format!("{},ro,key-fd=0", seen(JAIL_CODE_DISK, path).display()),
                format!("{}:{JAIL_CODE_DISK}:ro", path.display()),
            ),
            CodeDisk::Chunked { store, .. } => (
                format!(
                    "{},ro,manifest=fd:{MANIFEST_FD}",
                    seen(JAIL_CHUNKS, store).display()
                ),
                format!("{}:{JAIL_CHUNKS}:ro", store.display()),
            ),
        };
        vmm_args.extend([
            "--log-level".into(),
            "warn".into(),
            "--drive".into(),
            code_drive.into(),
        ]);
        // The order the guest's init is told (guest_init::disks).
        if let Some(disk) = files.root_disk {
            vmm_args.extend([
                "--drive".into(),
                format!("{},ro", seen(JAIL_ROOT_DISK, disk).display()).into(),
            ]);
        }
        if let Some((disk, _)) = files.layers_disk {
            vmm_args.extend([
                "--drive".into(),
                format!(
                    "{},ro,key-fd={LAYERS_KEY_FD}",
                    seen(JAIL_LAYERS_DISK, disk).display()
                )
                .into(),
            ]);
        }
        vmm_args.extend([
            "--vsock".into(),
            format!(
                "cid=3,uds={}",
                seen(JAIL_DIR, files.dir).join("vsock").display()
            )
            .into(),
        ]);
        let (mut command, jailed) = match jail {
            None => (Command::new(files.vmm), None),
            Some(jail) => {
                let uid = jail
                    .ids
                    .take()
                    .ok_or_else(|| VmmProcessError::NoFreeJailId(jail.ids.range()))?;
                hand_over(files.dir, uid.id)?;
                let jail_id = format!("{}{id}", jail.id_prefix);
                let mut command = Command::new(&jail.jailer);
                command
                    .arg("--id")
                    .arg(&jail_id)
                    .arg("--exec-file")
                    .arg(files.vmm)
                    .arg("--uid")
                    .arg(uid.id.to_string())
                    .arg("--gid")
                    .arg(uid.id.to_string())
                    .arg("--chroot-base")
                    .arg(&jail.chroot_base)
                    .arg("--cgroup-parent")
                    .arg(&jail.cgroup_parent)
                    .arg("--memory-mib")
                    .arg((u64::from(memory_mib) + VMM_OVERHEAD_MIB).to_string())
                    // One vCPU, and the device thread beside it.
                    .arg("--cpus")
                    .arg("1")
                    .arg("--mount")
                    .arg(format!("{}:{JAIL_KERNEL}:ro", files.kernel.display()))
                    .args(files.root_disk.iter().flat_map(|disk| {
                        [
                            "--mount".into(),
                            format!("{}:{JAIL_ROOT_DISK}:ro", disk.display()),
                        ]
                    }))
                    .args(files.layers_disk.iter().flat_map(|(disk, _)| {
                        [
                            "--mount".into(),
                            format!("{}:{JAIL_LAYERS_DISK}:ro", disk.display()),
                        ]
                    }))
                    .args(boot_initrd.iter().flat_map(|initrd| {
                        [
                            "--mount".into(),
                            format!("{}:{JAIL_INITRD}:ro", initrd.display()),
                        ]
                    }))
                    .arg("--mount")
                    .arg(&code_mount)
                    .arg("--mount")
                    .arg(format!("{}:{JAIL_DIR}", files.dir.display()))
                    .arg("--");
                let jailed = Jailed {
                    pid_file: jail.chroot_base.join(&jail_id).join("vmm.pid"),
                    id: jail_id,
                    _uid: uid,
                };
                (command, Some(jailed))
            }
        };
        command
            .args(vmm_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A worker that dies takes its microVMs with it; a jailer is asked
        // to stop, so that it still removes its jail and cgroup.
        let parent_death_signal = if jail.is_some() {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        };
        let spawn_error = |source| VmmProcessError::Spawn {
            program: files.vmm.to_path_buf(),
            source,
        };
        let layers_key = match files.layers_disk {
            Some((_, key)) => Some(secret_file(key.as_bytes()).map_err(spawn_error)?),
            None => None,
        };
        let manifest = match files.code {
            CodeDisk::Chunked { manifest, .. } => Some(secret_file(manifest).map_err(spawn_error)?),
            CodeDisk::Sealed { .. } => None,
        };
        // Descriptors the VMM finds at the numbers it is told.
        let passed: Vec<(RawFd, RawFd)> = [
            layers_key.as_ref().map(|f| (f.as_raw_fd(), LAYERS_KEY_FD)),
            manifest.as_ref().map(|f| (f.as_raw_fd(), MANIFEST_FD)),
        ]
        .into_iter()
        .flatten()
        .collect();
        // SAFETY: setpriority, prctl, fcntl and dup2 are async-signal-safe
        // and touch only the child, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Guests that poll their devices spin while they wait for
                // the host; below the host's own threads, they cannot
                // starve the worker that answers them. The jailer's VMM
                // inherits the priority.
                libc::setpriority(libc::PRIO_PROCESS, 0, VMM_NICE);
                libc::prctl(libc::PR_SET_PDEATHSIG, parent_death_signal);
                // The snapshot's descriptors at the numbers the VMM is
                // told, through copies above them in case they sit there
                // already; dup2 leaves the targets open across exec.
                if let Some((state, memory)) = restore_fds {
                    let state = libc::fcntl(state, libc::F_DUPFD_CLOEXEC, 10);
                    let memory = libc::fcntl(memory, libc::F_DUPFD_CLOEXEC, 10);
                    if state < 0
                        || memory < 0
                        || libc::dup2(state, RESTORE_STATE_FD) < 0
                        || libc::dup2(memory, RESTORE_MEMORY_FD) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for &(fd, number) in &passed {
                    let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if copy < 0 || libc::dup2(copy, number) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let program = jail.map_or(files.vmm, |j| &j.jailer).to_path_buf();
        let mut child = command.spawn().map_err(|source| VmmProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        // The child has its copies.
        drop(start);
        drop(layers_key);
        drop(manifest);
        // 97 bytes fit in a pipe's buffer: the write cannot block.
        if let Some(stdin) = child.stdin.take() {
            let mut stdin = stdin
                .into_owned_fd()
                .map(std::fs::File::from)
                .map_err(|source| VmmProcessError::Spawn {
                    program: program.clone(),
                    source,
                })?;
            if let CodeDisk::Sealed { key, .. } = files.code {
                stdin
                    .write_all(key.as_bytes())
                    .map_err(|source| VmmProcessError::Spawn { program, source })?;
            }
        }
        let vmm_pid = if jailed.is_none() { child.id() } else { None };
        Ok(VmmProcess {
            child,
            jailed,
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
