//! A real `lambda-worker` process for the end-to-end tests and benchmarks:
//! its own data directory, two accounts, and its log captured.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_services::data_plane::lifecycle::LifecycleEvent;

use crate::lambda_client::LambdaClient;
use crate::{baremetal_guest, is_root, jailer_binary, lambda_worker_binary, vmm_binary};

/// Account A's and account B's keys, as `credentials.json` lists them.
pub const ACCOUNT_A: (&str, &str, &str) = ("AKIDA", "secret-a", "111111111111");
pub const ACCOUNT_B: (&str, &str, &str) = ("AKIDB", "secret-b", "222222222222");

/// A fresh data directory under the system's temporary directory, with
/// the two accounts' credentials in it.
pub fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the data directory");
    let table: Vec<String> = [ACCOUNT_A, ACCOUNT_B]
        .iter()
        .map(|(key, secret, account)| {
            format!(
                r#"{{"AccessKeyId":"{key}","SecretAccessKey":"{secret}","AccountId":"{account}"}}"#
            )
        })
        .collect();
    std::fs::write(
        dir.join("credentials.json"),
        format!("[{}]", table.join(",")),
    )
    .expect("write credentials.json");
    dir
}

pub struct RunningWorker {
    child: Child,
    /// `host:port` of the Lambda API.
    pub address: String,
    stderr: Arc<Mutex<String>>,
}

impl RunningWorker {
    /// Starts the worker on `data` with `extra` flags; `log_filter` is its
    /// `RUST_LOG`. Returns once the API listens.
    pub fn start(data: &Path, extra: &[&str], log_filter: &str) -> Self {
        Self::try_start(data, extra, log_filter)
            .unwrap_or_else(|stderr| panic!("the worker never listened:\n{stderr}"))
    }

    /// [`RunningWorker::start`], or the worker's stderr if it exits (or
    /// does not listen within 10 s) instead.
    pub fn try_start(data: &Path, extra: &[&str], log_filter: &str) -> Result<Self, String> {
        Self::try_start_wrapped(data, extra, log_filter, &[])
    }

    /// [`RunningWorker::try_start`] through `wrapper` (`nsenter
    /// --net=...` runs it in a network namespace). `extra` may give the API's
    /// `--listen` address.
    pub fn try_start_wrapped(
        data: &Path,
        extra: &[&str],
        log_filter: &str,
        wrapper: &[&str],
    ) -> Result<Self, String> {
        let flag = |name: &str| {
            extra
                .iter()
                .position(|a| *a == name)
                .and_then(|i| extra.get(i + 1))
                .map(|a| a.parse::<std::net::SocketAddr>().expect("an address"))
        };
        let listen = flag("--listen").unwrap_or_else(|| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        });
        let own_listen: Vec<String> = if flag("--listen").is_some() {
            vec![]
        } else {
            vec!["--listen".into(), listen.to_string()]
        };
        // The worker jails its VMMs by default, which takes root; without
        // it the tests still run, unjailed, and say so.
        let jail: Vec<std::ffi::OsString> = if extra.contains(&"--no-jail") {
            vec![]
        } else if is_root() {
            vec!["--jailer".into(), jailer_binary().into()]
        } else {
            println!("NOTE: not root: this test's microVMs run unjailed (--no-jail)");
            vec!["--no-jail".into()]
        };
        let program: Vec<std::ffi::OsString> = wrapper
            .iter()
            .map(Into::into)
            .chain([lambda_worker_binary().into()])
            .collect();
        let mut child = Command::new(&program[0])
            .args(&program[1..])
            .arg("--data-dir")
            .arg(data)
            .args(own_listen)
            .arg("--credentials")
            .arg(data.join("credentials.json"))
            .arg("--vmm")
            .arg(vmm_binary())
            .arg("--guest")
            .arg(baremetal_guest())
            .args(jail)
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lambda-worker");
        let stderr = Arc::new(Mutex::new(String::new()));
        let lines = BufReader::new(child.stderr.take().expect("piped stderr"));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        // A fleet's worker host serves no API: it is ready when it serves
        // the fleet.
        let ready = match extra.contains(&"worker-host") {
            true => flag("--fleet-listen").expect("a worker host's --fleet-listen"),
            false => listen,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(ready).is_err() {
            let exited = child.try_wait().ok().flatten().is_some();
            if Instant::now() > deadline || exited {
                let _ = child.kill();
                let _ = child.wait();
                // The reader thread has the last lines once the pipe closes.
                std::thread::sleep(Duration::from_millis(100));
                return Err(stderr.lock().unwrap_or_else(|e| e.into_inner()).clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(RunningWorker {
            child,
            address: listen.to_string(),
            stderr,
        })
    }

    /// Kills the worker outright (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the worker process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A Rust client of the API, as account A.
    pub fn client(&self) -> Arc<LambdaClient> {
        Arc::new(LambdaClient::new(&self.address, ACCOUNT_A.0, ACCOUNT_A.1))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the worker's log holds `needle`, for at most `limit`
    /// (the log says what happened instead).
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the worker's log within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the worker as an operator would (SIGINT), checks that it
    /// exited cleanly, and returns its log.
    pub fn stop(self) -> String {
        self.stop_within(Duration::from_secs(60))
    }

    /// [`RunningWorker::stop`], failing if the worker takes longer than
    /// `limit` to exit.
    pub fn stop_within(mut self, limit: Duration) -> String {
        // SAFETY: signals a child process this struct owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the worker") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit within {limit:?} of SIGINT:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread sees EOF once the process is gone.
        std::thread::sleep(Duration::from_millis(50));
        let log = self.log();
        assert!(status.success(), "the worker exited with {status}:\n{log}");
        log
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runtime for the clients, with as many threads as the machine has
/// cores.
pub fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The environments' lifecycle record (`logs/environments.jsonl`).
pub fn lifecycle(data: &Path) -> Vec<LifecycleEvent> {
    std::fs::read_to_string(data.join("logs/environments.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a lifecycle event"))
        .collect()
}

/// Environment ids the worker created for `account:function:version`.
pub fn environments_of(log: &str, version_key: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!(" for {version_key} created")))
        .filter_map(|l| l.split("environment ").nth(1)?.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Runs `tests/python/SCRIPT ARGS...` with the two accounts' keys
/// (`KEY_A`, `SECRET_A`, `KEY_B`, `SECRET_B`, `ACCOUNT_B`); its output,
/// once it says every check passed.
pub fn client_script(script: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = std::process::Command::new(crate::python())
        .arg(&script)
        .args(args)
        .env("KEY_A", ACCOUNT_A.0)
        .env("SECRET_A", ACCOUNT_A.1)
        .env("KEY_B", ACCOUNT_B.0)
        .env("SECRET_B", ACCOUNT_B.1)
        .env("ACCOUNT_B", ACCOUNT_B.2)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}
