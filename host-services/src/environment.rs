//! An execution environment: one microVM serving one function version,
//! one invocation at a time, through the Runtime API on its vsock socket.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::auth::AccountId;
use crate::runtime_api::{InvokeError, Outcome, RuntimeApi};

/// The only version an environment may serve: one function version of one
/// account, at one code and configuration revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VersionKey {
    pub account: AccountId,
    pub function: String,
    pub version: String,
    pub revision: String,
}

impl fmt::Display for VersionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.account, self.function, self.version)
    }
}

/// What starting an environment for a version takes.
#[derive(Debug, Clone)]
pub struct Launch {
    pub key: VersionKey,
    /// The version's ARN, as the runtime sees it.
    pub function_arn: String,
    pub memory_mib: u32,
    pub code_disk: PathBuf,
}

/// The worker's microVM ingredients.
#[derive(Debug, Clone)]
pub struct MicroVmImage {
    pub vmm: PathBuf,
    pub guest_kernel: PathBuf,
    /// Where environments keep their sockets.
    pub run_dir: PathBuf,
    /// How long a runtime may take to reach its first `/next`.
    pub init_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("cannot prepare the environment directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the VMM {vmm}: {source}")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("the microVM exited during init ({status}); VMM said: {stderr}")]
    ExitedDuringInit { status: String, stderr: String },
    #[error("the runtime did not ask for work within {0:?} of boot")]
    InitTimeout(Duration),
    #[error("{0}")]
    Runtime(#[from] InvokeError),
}

/// The guest's console as it arrives: the function's log lines, and the
/// `END RequestId:` line the guest writes before it posts each result.
#[derive(Default)]
struct Console {
    lines: Mutex<ConsoleLines>,
    changed: Notify,
}

#[derive(Default)]
struct ConsoleLines {
    function: Vec<String>,
    ended: Option<String>,
    /// The last lines of anything else, for error reports.
    tail: VecDeque<String>,
}

const CONSOLE_TAIL: usize = 20;
const FUNCTION_PREFIX: &str = "function: ";
const END_PREFIX: &str = "END RequestId: ";
/// How long the console may lag behind a result; the guest writes the END
/// line before it posts, so this only covers the reader's scheduling.
const CONSOLE_LAG: Duration = Duration::from_millis(200);

impl Console {
    fn take_function_lines(&self) -> Vec<String> {
        std::mem::take(
            &mut self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .function,
        )
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    async fn wait_for_end(&self, request_id: &str) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self
                    .lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ended
                    .as_deref()
                    == Some(request_id)
                {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(CONSOLE_LAG, wait).await;
    }

    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(text) = line.strip_prefix(FUNCTION_PREFIX) {
            lines.function.push(text.to_string());
        } else if let Some(id) = line.strip_prefix(END_PREFIX) {
            lines.ended = Some(id.trim().to_string());
        }
        if lines.tail.len() == CONSOLE_TAIL {
            lines.tail.pop_front();
        }
        lines.tail.push_back(line);
        drop(lines);
        self.changed.notify_waiters();
    }
}

fn read_lines(stream: impl AsyncRead + Unpin + Send + 'static, console: Arc<Console>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            console.push(line);
        }
    });
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
}

pub struct ExecutionEnvironment {
    pub id: String,
    pub key: VersionKey,
    pub memory_mib: u32,
    pub created: Instant,
    pub last_used: Instant,
    /// Boot to the runtime's first `/next`.
    pub init_duration: Duration,
    /// Set until the first invocation reports it.
    pub fresh: bool,
    child: Child,
    api: RuntimeApi,
    console: Arc<Console>,
    stderr: Arc<Console>,
    dir: PathBuf,
}

impl ExecutionEnvironment {
    /// Boots a microVM for `launch` and waits for its runtime to be ready.
    pub async fn start(
        image: &MicroVmImage,
        launch: &Launch,
        id: String,
    ) -> Result<Self, EnvironmentError> {
        let started = Instant::now();
        let dir = image.run_dir.join(&id);
        let dir_error = |source| EnvironmentError::Directory {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(dir_error)?;
        let uds = dir.join("vsock");
        let api = RuntimeApi::bind(
            &PathBuf::from(format!("{}_9001", uds.display())),
            &launch.function_arn,
        )
        .await
        .map_err(dir_error)?;
        let mut child = Command::new(&image.vmm)
            .arg("--kernel")
            .arg(&image.guest_kernel)
            .arg("--mem-mib")
            .arg(launch.memory_mib.to_string())
            .arg("--drive")
            .arg(format!("{},ro", launch.code_disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EnvironmentError::Spawn {
                vmm: image.vmm.clone(),
                source,
            })?;
        let console = Arc::new(Console::default());
        let stderr = Arc::new(Console::default());
        if let Some(out) = child.stdout.take() {
            read_lines(out, console.clone());
        }
        if let Some(err) = child.stderr.take() {
            read_lines(err, stderr.clone());
        }
        let ready = tokio::select! {
            r = api.ready() => r.map_err(EnvironmentError::from),
            status = child.wait() => {
                // Let the readers drain what the VMM said last.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(EnvironmentError::ExitedDuringInit {
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    stderr: stderr.tail(),
                })
            }
            _ = tokio::time::sleep(image.init_timeout) => Err(EnvironmentError::InitTimeout(image.init_timeout)),
        };
        if let Err(e) = ready {
            let _ = child.kill().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let now = Instant::now();
        Ok(ExecutionEnvironment {
            id,
            key: launch.key.clone(),
            memory_mib: launch.memory_mib,
            created: started,
            last_used: now,
            init_duration: now - started,
            fresh: true,
            child,
            api,
            console,
            stderr,
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
        self.console.take_function_lines();
        let outcome = tokio::select! {
            r = self.api.invoke(request_id, payload, timeout) => r?,
            _ = self.child.wait() => return Err(InvokeError::EnvironmentGone),
        };
        let duration = started.elapsed();
        self.console.wait_for_end(request_id).await;
        self.last_used = Instant::now();
        Ok(Invocation {
            outcome,
            log: self.console.take_function_lines(),
            duration,
            max_memory_mib: self.child.id().and_then(peak_rss_mib),
        })
    }

    /// What the VMM last said, for error reports.
    pub fn vmm_log_tail(&self) -> String {
        self.stderr.tail()
    }

    /// Stops the microVM and removes its sockets.
    pub async fn destroy(mut self) {
        let _ = self.child.kill().await;
        remove_dir(&self.dir);
    }
}

/// `VmHWM` of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
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

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("cannot remove {}: {e}", dir.display());
    }
}
