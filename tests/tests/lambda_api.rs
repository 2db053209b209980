//! The worker's Lambda API, driven by boto3 against a real `lambda-worker`
//! running real microVMs (the bare-metal guest and its Wasm runtime).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use microvm_tests::worker::{data_dir, environments_of, RunningWorker, ACCOUNT_A, ACCOUNT_B};
use microvm_tests::{python, ECHO_WAT};

fn boto3(endpoint: &str, wasm: &Path, extra: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/lambda_api_e2e.py");
    let out = Command::new(python())
        .arg(script)
        .arg(endpoint)
        .arg(wasm)
        .args(extra)
        .env("KEY_A", ACCOUNT_A.0)
        .env("SECRET_A", ACCOUNT_A.1)
        .env("KEY_B", ACCOUNT_B.0)
        .env("SECRET_B", ACCOUNT_B.1)
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

#[test]
fn boto3_drives_functions_versions_aliases_and_invokes_and_a_restart_loses_nothing() {
    let data = data_dir("lambda-api");
    let wasm = data.join("function.wasm");
    std::fs::write(&wasm, wat::parse_str(ECHO_WAT).unwrap()).unwrap();

    let worker = RunningWorker::start(&data, &[], "info");
    let out = boto3(&worker.endpoint(), &wasm, &[]);
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

    let worker = RunningWorker::start(&data, &[], "info");
    boto3(&worker.endpoint(), &wasm, &["after-restart"]);
    worker.stop();
    std::fs::remove_dir_all(&data).unwrap();
}

/// SIGINT waits for requests in flight, but only for `--shutdown-grace`:
/// a request that never completes cannot keep the worker running.
#[test]
fn sigint_stops_the_worker_even_with_a_request_stuck_in_flight() {
    use std::io::Write;
    let data = data_dir("shutdown-grace");
    let worker = RunningWorker::start(&data, &["--no-jail", "--shutdown-grace", "1"], "info");
    // Headers promise a body that never comes: the request stays in flight.
    let mut stuck = std::net::TcpStream::connect(&worker.address).unwrap();
    stuck
        .write_all(
            b"POST /2015-03-31/functions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"Func",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let log = worker.stop_within(Duration::from_secs(20));
    assert!(
        log.contains("stopping with requests still in flight"),
        "{log}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the grace was not given"
    );
    drop(stuck);
    let _ = std::fs::remove_dir_all(&data);
}
