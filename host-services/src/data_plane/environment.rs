//! An execution environment: one microVM serving one function version,
//! one invocation at a time, through the Runtime API on its vsock socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::artifacts::cpio;
use guest_init::disks::{self, Disk};

use crate::artifacts::sealed::{ArtifactError, GrantedArtifact};
use crate::control_plane::functions::CodeDrive;
use crate::control_plane::model::runtime;
use crate::data_plane::log_stream::{read_lines, Lines};
use crate::data_plane::runtime_api::{tokio_stream, InvokeError, Outcome, RuntimeApi};
use crate::data_plane::snapshots::{self, SnapshotStore};
use crate::data_plane::start_trace::StartTrace;
use crate::data_plane::vmm_process::{
    request_snapshot, CodeDisk, GuestStart, JailSettings, VmmFiles, VmmProcess, VmmProcessError,
    VmmSlot, CONTROL_SOCKET, SNAPSHOT_MEMORY, SNAPSHOT_STATE,
};
use crate::ids::VersionKey;
use crate::security::key_service::ArtifactKeys;

/// What starting an environment for a version takes.
#[derive(Clone)]
pub struct Launch {
    pub key: VersionKey,
    /// The version's ARN, as the runtime sees it.
    pub function_arn: String,
    pub memory_mib: u32,
    /// The function's code disk, and what reads it.
    pub code: CodeDrive,
    /// A Linux guest's layers disk, for /opt.
    pub layers: Option<GrantedArtifact>,
    /// The function's environment variables: the runtime's, the execution
    /// role's credentials and the user's.
    pub variables: Vec<(String, String)>,
    /// The function's runtime, which says what guest boots.
    pub runtime: String,
    /// A SnapStart version: its cold starts restore the snapshot taken
    /// when it was published.
    pub snap_start: bool,
}

/// What a Linux guest boots: the kernel, an initramfs holding only
/// guest-init's PID 1, and the root file system images of the runtimes
/// that have one.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub roots: BTreeMap<String, PathBuf>,
}

impl LinuxGuest {
    /// Packs `init` into an initramfs in `dir`, for guests of `kernel`
    /// with the runtimes' `roots`.
    pub fn prepare(
        kernel: &Path,
        init: &Path,
        roots: BTreeMap<String, PathBuf>,
        dir: &Path,
    ) -> std::io::Result<Self> {
        let data = std::fs::read(init)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", init.display())))?;
        std::fs::create_dir_all(dir)?;
        let initrd = dir.join("linux-initrd.cpio");
        std::fs::write(&initrd, cpio::init_only(&data))?;
        Ok(LinuxGuest {
            kernel: kernel.to_path_buf(),
            initrd,
            roots,
        })
    }
}

/// Whether an environment was started for an invocation or ahead of them,
/// as `AWS_LAMBDA_INITIALIZATION_TYPE` tells the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitializationType {
    OnDemand,
    ProvisionedConcurrency,
    /// A SnapStart version's environments: the one its publication
    /// snapshots, and every clone of that snapshot.
    SnapStart,
}

impl InitializationType {
    fn as_str(self) -> &'static str {
        match self {
            InitializationType::OnDemand => "on-demand",
            InitializationType::ProvisionedConcurrency => "provisioned-concurrency",
            InitializationType::SnapStart => "snap-start",
        }
    }
}

/// The worker's microVM ingredients.
#[derive(Clone)]
pub struct MicroVmImage {
    pub vmm: PathBuf,
    /// The bare-metal guest.
    pub guest_kernel: PathBuf,
    /// The Linux guest, where the worker has one.
    pub linux: Option<LinuxGuest>,
    /// Where environments keep their sockets.
    pub run_dir: PathBuf,
    /// How long a runtime may take to reach its first `/next`.
    pub init_timeout: Duration,
    /// Jails every VMM; None starts them directly.
    pub jail: Option<JailSettings>,
    /// Unwraps code disks' keys for the grants environments present.
    pub keys: Arc<dyn ArtifactKeys>,
    /// Snapshots of initialized versions, which on-demand cold starts
    /// restore; None boots every environment.
    pub snapshots: Option<Arc<SnapshotStore>>,
    /// Snapshot every version at its first on-demand boot, not only
    /// SnapStart versions.
    pub snapshot_every_version: bool,
}

/// How an environment came to be ready, and how long it took: Lambda's
/// REPORT line gives `Init Duration` for a boot, `Restore Duration` for
/// a snapshot restore (as SnapStart does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdStart {
    Init(Duration),
    Restore(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("cannot prepare the environment directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vmm(#[from] VmmProcessError),
    #[error("the code disk: {0}")]
    Code(#[from] ArtifactError),
    #[error("the microVM exited during init ({status}); VMM said: {stderr}")]
    ExitedDuringInit { status: String, stderr: String },
    #[error("the runtime did not ask for work within {0:?} of boot")]
    InitTimeout(Duration),
    #[error("{0}")]
    Runtime(#[from] InvokeError),
    #[error("the function's environment cannot be sent: {0}")]
    Environ(String),
    #[error("this worker has no Linux guest (lambda-worker --linux-kernel)")]
    NoLinuxGuest,
}

/// What one invocation produced.
#[derive(Debug)]
pub struct Invocation {
    pub outcome: Outcome,
    /// The function's own log lines.
    pub log: Vec<String>,
    pub duration: Duration,
    /// The microVM's peak resident memory: what the guest touched, plus
    /// the VMM's own.
    pub max_memory_mib: Option<u64>,
    /// When the runtime took the event, and when its answer came.
    pub delivered: Option<Instant>,
    pub answered: Instant,
}

pub struct ExecutionEnvironment {
    pub id: String,
    pub key: VersionKey,
    pub memory_mib: u32,
    pub created: Instant,
    pub last_used: Instant,
    /// Boot or restore to the runtime's first `/next`.
    pub cold_start: ColdStart,
    /// Set until the first invocation reports it.
    pub fresh: bool,
    /// When each step of its start ended.
    pub trace: StartTrace,
    /// Kept ready for a provisioned concurrency config.
    pub provisioned: bool,
    /// The snapshot this environment's boot took, being sealed: it
    /// answers whether it was kept.
    pub snapshot_sealing: Option<tokio::task::JoinHandle<Result<(), String>>>,
    vmm: VmmProcess,
    api: RuntimeApi,
    log: Arc<Lines>,
    /// The serial console and the VMM's own messages.
    diagnostics: Arc<Lines>,
    dir: PathBuf,
}

impl ExecutionEnvironment {
    /// Starts a microVM for `launch` and waits for its runtime to be
    /// ready. A start of a version that is snapshotted (SnapStart, or
    /// every version if the worker says so), other than a provisioned
    /// one, restores the version's snapshot when there is one for the
    /// same start-up variables; otherwise it boots, and then snapshots
    /// the guest at its first `/next` for the next.
    pub async fn start(
        image: &MicroVmImage,
        launch: &Launch,
        id: String,
        initialization: InitializationType,
    ) -> Result<Self, EnvironmentError> {
        let started = Instant::now();
        let _under_way = image.jail.as_ref().map(JailSettings::cold_start);
        let mut trace = StartTrace::default();
        trace.mark_at("environment begun", started);
        let variables: Vec<(String, String)> = launch
            .variables
            .iter()
            .cloned()
            .chain([(
                "AWS_LAMBDA_INITIALIZATION_TYPE".to_string(),
                initialization.as_str().to_string(),
            )])
            .collect();
        let environ =
            guest_init::environ::encode(variables.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| EnvironmentError::Environ(e.to_string()))?;
        let fingerprint = snapshots::fingerprint(&variables);
        let snapshots = image.snapshots.as_ref().filter(|_| {
            initialization != InitializationType::ProvisionedConcurrency
                && (launch.snap_start || image.snapshot_every_version)
        });
        let snapshot = snapshots.and_then(|store| {
            store.get(&launch.key, &fingerprint).unwrap_or_else(|e| {
                tracing::warn!("{}: snapshot unusable, booting instead: {e}", launch.key);
                None
            })
        });
        trace.mark("snapshot looked up");
        let container = matches!(launch.code, CodeDrive::Image { .. });
        let (kernel, initrd, cmdline, root) = if container || runtime::on_linux(&launch.runtime) {
            let linux = image.linux.as_ref().ok_or(EnvironmentError::NoLinuxGuest)?;
            let root = linux.roots.get(&launch.runtime);
            // The disks in the order the VMM is given them.
            let disks: Vec<&str> = [
                Some(if container { Disk::Image } else { Disk::Task }),
                root.map(|_| Disk::Root),
                launch.layers.as_ref().map(|_| Disk::Opt),
            ]
            .into_iter()
            .flatten()
            .map(Disk::name)
            .collect();
            (
                &linux.kernel,
                Some(linux.initrd.as_path()),
                format!("{LINUX_CMDLINE} {}={}", disks::PARAM, disks.join(",")),
                root,
            )
        } else {
            (&image.guest_kernel, None, GUEST_CMDLINE.to_string(), None)
        };
        // The grant is checked first: a refused one leaves nothing behind.
        let code_key;
        let code = match &launch.code {
            CodeDrive::Sealed(code) => {
                code_key = code.drive_key(&*image.keys).await?;
                CodeDisk::Sealed {
                    path: &code.artifact.path,
                    key: &code_key,
                }
            }
            CodeDrive::Image { store, launch } => CodeDisk::Chunked {
                store,
                manifest: &launch.manifest,
            },
        };
        let layers = match &launch.layers {
            Some(layers) => Some((
                layers.artifact.path.as_path(),
                layers.drive_key(&*image.keys).await?,
            )),
            None => None,
        };
        trace.mark("keys unwrapped");
        let slot = VmmSlot::take(image.jail.as_ref(), &image.vmm, image.run_dir.join(&id))?;
        trace.mark("vmm taken");
        let dir = slot.dir().to_path_buf();
        let dir_error = |source| EnvironmentError::Directory {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(dir_error)?;
        trace.mark("directory made");
        let uds = dir.join("vsock");
        // The guest's first connections are made here, ahead: the VMM hands
        // them over when the guest asks, with the start-up message already
        // in its stream, and nothing of the worker's wakes on the boot's
        // path until the runtime's first `/next`.
        let mut connected = Vec::new();
        let mut made_ahead = |port: u32| {
            let (ours, guests) = std::os::unix::net::UnixStream::pair().map_err(dir_error)?;
            connected.push((port, guests));
            Ok::<_, EnvironmentError>(ours)
        };
        let api = RuntimeApi::bind(
            &PathBuf::from(format!("{}_{RUNTIME_API_PORT}", uds.display())),
            Some(made_ahead(RUNTIME_API_PORT)?),
            &launch.function_arn,
        )
        .await
        .map_err(dir_error)?;
        trace.mark("runtime API bound");
        // No socket for the log stream: a second connection to its port is
        // refused, so that nothing else can write into the function's log.
        let log = Arc::new(Lines::log_stream());
        read_lines(
            tokio_stream(made_ahead(LOG_PORT)?).map_err(dir_error)?,
            log.clone(),
            None,
        );
        let start = match &snapshot {
            Some(snapshot) => {
                let (state, memory) = snapshot.read_only().map_err(dir_error)?;
                trace.mark("snapshot opened");
                GuestStart::Restore { state, memory }
            }
            None => {
                // It holds credentials: no socket for it either, so it
                // goes to one connection only.
                write_ahead(made_ahead(guest_init::environ::ENVIRON_PORT)?, &environ)?;
                trace.mark("start-up message written");
                GuestStart::Boot {
                    cmdline: &cmdline,
                    initrd,
                }
            }
        };
        let mut vmm = VmmProcess::spawn(
            slot,
            &VmmFiles {
                vmm: &image.vmm,
                kernel,
                code,
                root_disk: root.map(PathBuf::as_path),
                layers_disk: layers.as_ref().map(|(path, key)| (*path, key.as_str())),
            },
            launch.memory_mib,
            start,
            connected,
        )?;
        trace.mark("vmm spawned");
        let child = vmm.child();
        let diagnostics = Arc::new(Lines::default());
        if let Some(out) = child.stdout.take() {
            read_lines(out, diagnostics.clone(), None);
        }
        if let Some(err) = child.stderr.take() {
            // The VMM runs at --log-level warn: what it says matters.
            read_lines(
                err,
                diagnostics.clone(),
                Some(format!("environment {id}: vmm")),
            );
        }
        let ready = tokio::select! {
            r = api.ready() => r.map_err(EnvironmentError::from),
            status = child.wait() => {
                // Let the readers drain what the VMM said last.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(EnvironmentError::ExitedDuringInit {
                    status: status.map_or_else(|e| e.to_string(), |s| vmm.describe_exit(s)),
                    stderr: diagnostics.tail(),
                })
            }
            _ = tokio::time::sleep(image.init_timeout) => Err(EnvironmentError::InitTimeout(image.init_timeout)),
        };
        if let Err(e) = ready {
            vmm.stop().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let now = Instant::now();
        trace.mark_at("first /next", now);
        let cold_start = match snapshot {
            Some(_) => ColdStart::Restore(now - started),
            None => ColdStart::Init(now - started),
        };
        let mut snapshot_sealing = None;
        if let (Some(store), ColdStart::Init(_)) = (snapshots, cold_start) {
            match take_snapshot(store, &launch.key, fingerprint, &vmm, &dir).await {
                Ok(sealing) => snapshot_sealing = sealing,
                Err(e) => tracing::warn!("environment {id}: no snapshot of {}: {e}", launch.key),
            }
            trace.mark("snapshot taken");
        }
        api.resume();
        vmm.freeze(true);
        Ok(ExecutionEnvironment {
            id,
            key: launch.key.clone(),
            memory_mib: launch.memory_mib,
            created: started,
            last_used: now,
            cold_start,
            fresh: true,
            trace,
            provisioned: false,
            snapshot_sealing,
            vmm,
            api,
            log,
            diagnostics,
            dir,
        })
    }

    /// Runs one invocation. An error means the environment is no longer
    /// usable and must be destroyed.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Invocation, InvokeError> {
        let started = Instant::now();
        self.log.take_function_lines();
        self.vmm.freeze(false);
        let outcome = tokio::select! {
            r = self.api.invoke(request_id, payload, timeout) => r?,
            status = self.vmm.child().wait() => {
                if let Ok(status) = status {
                    tracing::warn!("environment {}: the VMM exited: {}", self.id, self.vmm.describe_exit(status));
                }
                return Err(InvokeError::EnvironmentGone);
            }
        };
        let answered = Instant::now();
        let duration = answered - started;
        self.log.wait_for_end(request_id).await;
        self.vmm.freeze(true);
        self.last_used = Instant::now();
        Ok(Invocation {
            outcome,
            log: self.log.take_function_lines(),
            duration,
            max_memory_mib: self.vmm.peak_rss_mib(),
            delivered: self.api.handed_out(),
            answered,
        })
    }

    /// The VMM's jail, or None when it runs unjailed.
    pub fn jail_id(&self) -> Option<&str> {
        self.vmm.jail_id()
    }

    /// What the VMM last said, for error reports.
    pub fn vmm_log_tail(&self) -> String {
        self.diagnostics.tail()
    }

    /// Stops the microVM and removes its sockets.
    pub async fn destroy(self) {
        self.vmm.stop().await;
        remove_dir(&self.dir);
    }
}

/// Asks the VMM for a snapshot of its guest, which waits at its first
/// `/next`, and has the store seal it in the background, whose task this
/// returns; the guest runs on. The files leave the environment's
/// directory before this returns. While another environment's snapshot
/// of the version is being taken, this one takes none.
async fn take_snapshot(
    store: &Arc<SnapshotStore>,
    key: &VersionKey,
    fingerprint: [u8; 32],
    vmm: &VmmProcess,
    dir: &Path,
) -> Result<Option<tokio::task::JoinHandle<Result<(), String>>>, String> {
    let Some(claim) = store.claim(key) else {
        return Ok(None);
    };
    let reply = request_snapshot(
        &dir.join(CONTROL_SOCKET),
        &vmm.path_in_vmm(dir, SNAPSHOT_STATE),
        &vmm.path_in_vmm(dir, SNAPSHOT_MEMORY),
    )
    .await?;
    let (state, memory) = store
        .stage(&dir.join(SNAPSHOT_STATE), &dir.join(SNAPSHOT_MEMORY))
        .map_err(|e| e.to_string())?;
    let (store, key) = (store.clone(), key.clone());
    Ok(Some(tokio::task::spawn_blocking(move || {
        let sealing = std::time::Instant::now();
        let kept = store.put(&key, fingerprint, &state, &memory);
        drop(claim);
        match kept {
            Ok(()) => {
                tracing::info!(
                    "{key}: snapshot taken at the first /next ({} us paused, {} bytes of memory, sealed and kept in {} ms)",
                    reply["paused_us"],
                    reply["memory_bytes"],
                    sealing.elapsed().as_millis()
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!("{key}: snapshot not kept: {e}");
                Err(e.to_string())
            }
        }
    })))
}

/// The console stays on for errors; `quiet` keeps the guest from
/// spending milliseconds of VM exits on its boot banner.
const GUEST_CMDLINE: &str = "console=ttyS0 quiet";
/// A panicking Linux guest resets at once, which ends its VMM.
const LINUX_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";

/// The vsock ports of the Runtime API and the function's log stream, as
/// the guest knows them.
const RUNTIME_API_PORT: u32 = 9001;
const LOG_PORT: u32 = 9002;

/// Writes the start-up message into the worker's end of the guest's
/// connection made ahead, and closes it: the guest reads the message,
/// then the end of the stream.
fn write_ahead(
    stream: std::os::unix::net::UnixStream,
    message: &[u8],
) -> Result<(), EnvironmentError> {
    // Nobody reads before the launch: a message larger than the socket
    // holds is refused rather than waited on.
    let written = stream
        .set_nonblocking(true)
        .and_then(|()| std::io::Write::write_all(&mut &stream, message));
    written.map_err(|e| {
        EnvironmentError::Environ(format!(
            "the start-up message ({} bytes) does not fit in its socket: {e}",
            message.len()
        ))
    })
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("cannot remove {}: {e}", dir.display());
    }
}
