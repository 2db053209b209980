//! The worker's Lambda API, driven by boto3 against a real `lambda-worker`
//! running real microVMs (the bare-metal guest and its Wasm runtime).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use microvm_tests::worker::{
    client_runtime, client_script, data_dir, environments_of, RunningWorker,
};
use microvm_tests::ECHO_WAT;

fn boto3(endpoint: &str, wasm: &Path, extra: &[&str]) -> String {
    let wasm = wasm.display().to_string();
    let args: Vec<&str> = [endpoint, &wasm]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    client_script("lambda_api_e2e.py", &args)
}

#[test]
fn the_aws_cli_drives_the_api_unchanged() {
    let data = data_dir("lambda-api-cli");
    let wasm = data.join("function.wasm");
    std::fs::write(&wasm, wat::parse_str(ECHO_WAT).unwrap()).unwrap();
    let worker = RunningWorker::start(&data, &[], "info");
    client_script(
        "aws_cli_e2e.py",
        &[&worker.endpoint(), &wasm.display().to_string()],
    );
    worker.stop();
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn boto3_drives_functions_versions_aliases_and_invokes_and_a_restart_loses_nothing() {
    let data = data_dir("lambda-api");
    let wasm = data.join("function.wasm");
    std::fs::write(&wasm, wat::parse_str(ECHO_WAT).unwrap()).unwrap();

    let worker = RunningWorker::start(&data, &["--backup-every", "1"], "info");
    let out = boto3(&worker.endpoint(), &wasm, &[]);
    let changes_done = std::time::SystemTime::now();
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
    // Each configured event's record reaches its destination function as
    // an event of its own, which runs.
    for (line, condition, destination) in [
        ("failed-event-id: ", "RetriesExhausted", "failures"),
        ("succeeded-event-id: ", "Success", "successes"),
    ] {
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .expect("the script prints the event's id");
        let prefix = format!("event {id}: {condition}; its record went to ");
        worker.wait_for_log(&prefix, Duration::from_secs(60));
        let log = worker.log();
        let record_id = log
            .lines()
            .find_map(|l| l.split(&prefix).nth(1))
            .and_then(|rest| rest.split(" as event ").nth(1))
            .expect("the record's event id")
            .trim()
            .to_string();
        let destination_log = data.join(format!("logs/111111111111/{destination}/LATEST.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&destination_log)
            .unwrap_or_default()
            .contains(&format!("START RequestId: {record_id} "))
        {
            assert!(
                Instant::now() < deadline,
                "the record of {id} never ran in {destination}:\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A backup begun after the last change holds all of it.
    let backup = newest_backup_after(&data.join("backups"), changes_done);
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

    // The backup restored into a new data directory serves it all: its
    // state file and key files are all a restore takes.
    let restored = data_dir("lambda-api-restored");
    std::fs::copy(backup.join("state.redb"), restored.join("state.redb")).unwrap();
    std::fs::create_dir_all(restored.join("keys")).unwrap();
    for key in std::fs::read_dir(backup.join("keys")).unwrap() {
        let key = key.unwrap().path();
        std::fs::copy(&key, restored.join("keys").join(key.file_name().unwrap())).unwrap();
    }
    let worker = RunningWorker::start(&restored, &[], "info");
    boto3(&worker.endpoint(), &wasm, &["after-restart"]);
    worker.stop();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_dir_all(&restored).unwrap();
}

/// The newest complete backup in `backups` begun after `after` (its name
/// is its start in milliseconds), waiting up to 10 s for one.
fn newest_backup_after(backups: &Path, after: std::time::SystemTime) -> std::path::PathBuf {
    let after_ms = after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let newest = std::fs::read_dir(backups)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| Some((name.parse::<u128>().ok()?, name)))
            .filter(|(ms, _)| *ms > after_ms)
            .max();
        if let Some((_, name)) = newest {
            return backups.join(name);
        }
        assert!(
            Instant::now() < deadline,
            "no backup in {}",
            backups.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// A damaged state file, flipped byte by byte across its pages, never
/// takes the worker down with a panic: it refuses to start with one line
/// that names the file and leaves it as it was, or it starts and serves.
#[test]
fn a_damaged_state_file_is_refused_by_name_or_served_never_a_crash() {
    let data = data_dir("damaged-state");
    let worker = RunningWorker::start(&data, &[], "info");
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let client = worker.client();
    client_runtime().block_on(async {
        for i in 0..40 {
            let name = format!("f{i}");
            client.create_wasm_function(&name, &wasm, 3).await.unwrap();
            client.publish_version(&name).await.unwrap();
        }
    });
    worker.stop();
    let file = data.join("state.redb");
    let pristine = std::fs::read(&file).unwrap();
    let (mut refused, mut served) = (0, 0);
    for offset in (0..pristine.len()).step_by(4096 * 3).map(|page| page + 100) {
        let mut damaged = pristine.clone();
        damaged[offset] ^= 0xa5;
        std::fs::write(&file, &damaged).unwrap();
        let out = Command::new(microvm_tests::lambda_worker_binary())
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "192.0.2.1:9000", "--credentials"])
            .arg(data.join("credentials.json"))
            .arg("--vmm")
            .arg(microvm_tests::vmm_binary())
            .arg("--guest")
            .arg(microvm_tests::baremetal_guest())
            .arg("--no-jail")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        // 192.0.2.1 (TEST-NET-1) is no address of this host: a worker that
        // got past its state stops there, with an error of its own.
        if last.contains("--listen") {
            served += 1;
        } else {
            assert_eq!(out.status.code(), Some(1), "byte {offset}: {stderr}");
            assert!(
                last.contains("the state file") && last.contains("state.redb is damaged"),
                "byte {offset}: {stderr}"
            );
            assert!(
                std::fs::read(&file).unwrap() == damaged,
                "byte {offset}: the refused file was changed: {stderr}"
            );
            refused += 1;
        }
    }
    println!("{refused} damaged copies refused by name, {served} started");
    assert!(refused > 0, "no damage was noticed");
    std::fs::remove_dir_all(&data).unwrap();
}

/// Every kind of file the worker keeps in its data directory (key files,
/// the issuer's key, sealed code disks, sealed snapshots), each with one
/// byte flipped in a copy of the directory: the worker refuses to start
/// naming the file, or it answers the function's invocation right, or
/// fails it with an error; never a wrong answer, never a crash. (The
/// state file has a test of its own above.)
#[test]
fn a_flipped_byte_in_any_data_file_gets_a_clear_error_or_the_right_answer() {
    let data = data_dir("damaged-files");
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let payload = bytes::Bytes::from_static(br#"{"n":1}"#);
    let expected: &[u8] = br#"{"echo":{"n":1}}"#;
    // Every version snapshotted, so that the copies' cold starts restore.
    let flags = ["--snapshots", "every-version"];
    let worker = RunningWorker::start(&data, &flags, "info");
    let client = worker.client();
    client_runtime().block_on(async {
        client.create_wasm_function("f", &wasm, 3).await.unwrap();
        // The first boots and leaves a snapshot, sealed in the background.
        for _ in 0..2 {
            let r = client.invoke("f", payload.clone()).await.unwrap();
            assert_eq!((r.status, &r.body[..]), (200, expected));
        }
    });
    // A worker that stops abandons a snapshot still being sealed.
    worker.wait_for_log("snapshot taken at the first /next", Duration::from_secs(60));
    worker.stop();
    let files = data_files(&data, &data);
    for kind in ["keys/", "issuer.key", "artifacts/", "snapshots/"] {
        assert!(
            files.iter().any(|f| f.starts_with(kind)),
            "no {kind} file in {files:?}"
        );
    }
    let mut outcomes = Vec::new();
    for file in &files {
        let copy = data_dir("damaged-files-copy");
        std::fs::copy(data.join("state.redb"), copy.join("state.redb")).unwrap();
        for f in &files {
            let to = copy.join(f);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(data.join(f), &to).unwrap();
        }
        let mut bytes = std::fs::read(copy.join(file)).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(copy.join(file), &bytes).unwrap();
        let outcome = match RunningWorker::try_start(&copy, &flags, "info") {
            Err(stderr) => {
                let last = stderr.lines().last().unwrap_or_default();
                let name = std::path::Path::new(file)
                    .file_name()
                    .unwrap()
                    .to_string_lossy();
                assert!(
                    last.contains(&*name),
                    "{file}: refused without naming it: {stderr}"
                );
                "refused at start, named"
            }
            Ok(mut worker) => {
                let client = worker.client();
                let r = client_runtime()
                    .block_on(client.invoke("f", payload.clone()))
                    .unwrap();
                assert!(
                    worker.is_running(),
                    "{file}: the worker died:\n{}",
                    worker.log()
                );
                let log = worker.stop();
                if r.status == 200 && r.function_error.is_none() {
                    assert_eq!(&r.body[..], expected, "{file}: a wrong answer");
                    "served right"
                } else {
                    assert!(
                        log.contains("authentication") || log.contains("ERROR"),
                        "{file}: failed ({}) without a reason in the log:\n{log}",
                        r.status
                    );
                    "failed the call, logged why"
                }
            }
        };
        outcomes.push(format!("{file}: {outcome}"));
        std::fs::remove_dir_all(&copy).unwrap();
    }
    println!("{}", outcomes.join("\n"));
    std::fs::remove_dir_all(&data).unwrap();
}

/// The files under `dir` the worker reads back, relative to `root`: all
/// but its logs, backups and the state file.
fn data_files(root: &Path, dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let relative = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if ["logs", "backups", "run", "state.redb", "credentials.json"].contains(&relative.as_str())
        {
            continue;
        }
        if path.is_dir() {
            files.extend(data_files(root, &path));
        } else {
            files.push(relative);
        }
    }
    files.sort();
    files
}

/// A caller that stops waiting mid-invocation (a client timing out, a
/// fleet's front end lost) does not take the environment with it: the
/// invocation runs to its end and the environment goes back to its
/// worker, so a worker of one environment still serves the next call.
#[test]
fn a_caller_that_stops_waiting_costs_the_worker_no_environment() {
    use bytes::Bytes;
    use microvm_tests::lambda_client::LambdaClient;
    let data = data_dir("caller-gone");
    let worker = RunningWorker::start(
        &data,
        &["--no-jail", "--workers", "1", "--max-environments", "1"],
        "info",
    );
    let (key, secret, _) = microvm_tests::worker::ACCOUNT_A;
    let client = LambdaClient::new(&worker.address, key, secret);
    let runtime = client_runtime();
    runtime.block_on(async {
        let wasm = wat::parse_str(ECHO_WAT).unwrap();
        client
            .create_wasm_function("echo", &wasm, 10)
            .await
            .unwrap();
        for round in 0..3 {
            // A busy invocation (about 100 ms), abandoned after 5 ms: in
            // its cold start the first time, while it runs after.
            let abandoned = tokio::time::timeout(
                Duration::from_millis(5),
                client.invoke("echo", Bytes::from_static(br#""spin""#)),
            )
            .await;
            assert!(abandoned.is_err(), "round {round}: it answered in 5 ms");
            // Throttled while the abandoned one still runs; served after.
            let started = Instant::now();
            let next = loop {
                let next = client
                    .invoke("echo", Bytes::from(format!("{round}")))
                    .await
                    .unwrap();
                if next.status != 429 || started.elapsed() > Duration::from_secs(5) {
                    break next;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(
                next.body,
                format!("{{\"echo\":{round}}}"),
                "round {round}: {next:?}\n{}",
                worker.log()
            );
        }
    });
    let _ = std::fs::remove_dir_all(&data);
}

/// An abandoned invocation keeps its share of the function's reserved
/// concurrency until it ends: with one reserved, a call made while the
/// abandoned one still runs is throttled, not run beside it.
#[test]
fn an_abandoned_invocation_holds_its_reserved_concurrency_until_it_ends() {
    use bytes::Bytes;
    use hyper::Method;
    use microvm_tests::lambda_client::LambdaClient;
    let data = data_dir("abandoned-reserved");
    let worker = RunningWorker::start(&data, &["--no-jail"], "info");
    let (key, secret, _) = microvm_tests::worker::ACCOUNT_A;
    let client = LambdaClient::new(&worker.address, key, secret);
    client_runtime().block_on(async {
        let wasm = wat::parse_str(ECHO_WAT).unwrap();
        client
            .create_wasm_function("echo", &wasm, 10)
            .await
            .unwrap();
        client
            .call(
                Method::PUT,
                "/2017-10-31/functions/echo/concurrency",
                None,
                serde_json::json!({ "ReservedConcurrentExecutions": 1 }),
                200,
            )
            .await
            .unwrap();
        // About 100 ms busy after its cold start; abandoned after 5 ms.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(5),
            client.invoke("echo", Bytes::from_static(br#""spin""#)),
        )
        .await;
        assert!(abandoned.is_err(), "it answered in 5 ms");
        let beside = client
            .invoke("echo", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(
            beside.status, 429,
            "a second invocation ran beside the abandoned one: {beside:?}"
        );
        let body = String::from_utf8_lossy(&beside.body).into_owned();
        assert!(
            body.contains("ReservedFunctionConcurrentInvocationLimitExceeded"),
            "{body}"
        );
        let started = Instant::now();
        let after = loop {
            let after = client
                .invoke("echo", Bytes::from_static(b"2"))
                .await
                .unwrap();
            if after.status != 429 || started.elapsed() > Duration::from_secs(5) {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(after.body, "{\"echo\":2}", "{after:?}\n{}", worker.log());
    });
    let _ = std::fs::remove_dir_all(&data);
}
