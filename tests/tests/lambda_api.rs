//! The worker's Lambda API, driven by boto3 against a real `lambda-worker`
//! running real microVMs (the bare-metal guest and its Wasm runtime).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm_tests::{baremetal_guest, lambda_worker_binary, python, vmm_binary, ECHO_WAT};

const CREDENTIALS: &str = r#"[
  {"AccessKeyId": "AKIDA", "SecretAccessKey": "secret-a", "AccountId": "111111111111"},
  {"AccessKeyId": "AKIDB", "SecretAccessKey": "secret-b", "AccountId": "222222222222"}
]"#;

struct RunningWorker {
    child: Child,
    endpoint: String,
    stderr: Arc<Mutex<String>>,
}

impl RunningWorker {
    fn start(data: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(lambda_worker_binary())
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--credentials")
            .arg(data.join("credentials.json"))
            .arg("--vmm")
            .arg(vmm_binary())
            .arg("--guest")
            .arg(baremetal_guest())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let lines = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                eprintln!("worker: {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the worker never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        RunningWorker {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            stderr,
        }
    }

    fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the worker exited with {status}");
        let log = self.stderr.lock().unwrap().clone();
        log
    }
}

fn boto3(endpoint: &str, wasm: &Path, extra: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/lambda_api_e2e.py");
    let out = Command::new(python())
        .arg(script)
        .arg(endpoint)
        .arg(wasm)
        .args(extra)
        .env("KEY_A", "AKIDA")
        .env("SECRET_A", "secret-a")
        .env("KEY_B", "AKIDB")
        .env("SECRET_B", "secret-b")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "boto3 checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}

/// Environment ids the worker created for `account:function:version`.
fn environments_of(log: &str, version_key: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!(" for {version_key} created")))
        .filter_map(|l| l.split("environment ").nth(1)?.split(' ').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn boto3_drives_functions_versions_aliases_and_invokes_and_a_restart_loses_nothing() {
    let data: PathBuf = std::env::temp_dir().join(format!("lambda-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("credentials.json"), CREDENTIALS).unwrap();
    let wasm = data.join("function.wasm");
    std::fs::write(&wasm, wat::parse_str(ECHO_WAT).unwrap()).unwrap();

    let worker = RunningWorker::start(&data);
    let out = boto3(&worker.endpoint, &wasm, &[]);
    let event_id = out
        .lines()
        .find_map(|l| l.strip_prefix("event-id: "))
        .expect("the script prints the event's id")
        .to_string();
    // The queued event runs in the background; its START line lands in
    // the $LATEST log.
    let log_file = data.join("logs/111111111111/echo/LATEST.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        if log.contains(&format!("START RequestId: {event_id} ")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "event {event_id} never ran:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = worker.stop();

    let v1 = environments_of(&log, "111111111111:echo:1");
    let v2 = environments_of(&log, "111111111111:echo:2");
    assert!(!v1.is_empty() && !v2.is_empty(), "{log}");
    assert!(
        v1.iter().all(|e| !v2.contains(e)),
        "versions shared an environment: {v1:?} {v2:?}"
    );
    assert!(
        environments_of(&log, "222222222222:echo:$LATEST").is_empty(),
        "account B got an environment for A's function"
    );

    let worker = RunningWorker::start(&data);
    boto3(&worker.endpoint, &wasm, &["after-restart"]);
    worker.stop();
    std::fs::remove_dir_all(&data).unwrap();
}
