//! Snapshot and restore with the bare-metal guest: one VM is snapshotted
//! once its runtime asks for its first event, then clones are restored
//! from that one snapshot, each with new host sockets and a new vsock
//! CID. Each must reconnect, answer its own event, and draw its own
//! randomness. Bad snapshots are refused before anything runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_init::environ::encode;
use host_services::data_plane::runtime_api::{Outcome, RuntimeApi};
use host_services::data_plane::vmm_process::{control_request, request_snapshot};
use microvm_tests::guest_ports::{echo_code_disk, spawn_vmm, test_dir, GuestPorts};
use microvm_tests::worker::{client_runtime, data_dir, RunningWorker};
use microvm_tests::{baremetal_guest, files_under, run_vmm};

const CLONES: u64 = 20;
const FUEL: u64 = 50_000_000;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends an echo event and a random one; returns the random answer.
async fn echo_and_random(api: &RuntimeApi, name: &str) -> String {
    let event = format!("{{\"from\":\"{name}\"}}");
    let outcome = api
        .invoke(&format!("{name}-echo"), event.clone().into(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Response(format!("{{\"echo\":{event}}}").into()),
        "{name}"
    );
    match api
        .invoke(&format!("{name}-random"), "\"random\"".into(), TIMEOUT)
        .await
        .unwrap()
    {
        Outcome::Response(body) => {
            let hex = String::from_utf8(body.to_vec()).unwrap();
            assert_eq!(hex.len(), 34, "{name}: {hex}");
            hex
        }
        other => panic!("{name}: random gave {other:?}"),
    }
}

fn restore_args(state: &Path, memory: &Path, image: &Path, uds: &Path, cid: u64) -> Vec<String> {
    vec![
        "--restore".into(),
        state.display().to_string(),
        "--restore-memory".into(),
        memory.display().to_string(),
        "--drive".into(),
        format!("{},ro", image.display()),
        "--vsock".into(),
        format!("cid={cid},uds={}", uds.display()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_snapshot_reconnect_answer_and_draw_their_own_randomness() {
    let dir = test_dir("snapshot-clones");
    let image = echo_code_disk(&dir, FUEL);
    let original_dir = dir.join("original");
    std::fs::create_dir(&original_dir).unwrap();
    let environ = encode([("AWS_REGION", "local")]).unwrap();
    let ports = GuestPorts::bind(&original_dir, Some(environ)).await;
    let control_sock = original_dir.join("control");
    let (mut original, _console) = spawn_vmm(
        &[
            "--kernel".into(),
            baremetal_guest().display().to_string(),
            "--drive".into(),
            format!("{},ro", image.display()),
            "--vsock".into(),
            format!("cid=3,uds={}", ports.uds.display()),
            "--control-sock".into(),
            control_sock.display().to_string(),
        ],
        "original",
    );
    tokio::time::timeout(TIMEOUT, ports.api.ready())
        .await
        .expect("the original reaches its first /next")
        .unwrap();

    let state = dir.join("vm.snap");
    let memory = dir.join("vm.mem");
    let reply = request_snapshot(&control_sock, &state, &memory)
        .await
        .unwrap();
    println!(
        "snapshot: paused {} us, {} bytes of state, {} bytes of memory written",
        reply["paused_us"], reply["state_bytes"], reply["memory_bytes"]
    );
    let bad = control_request(&control_sock, &serde_json::json!({"action": "reboot"}))
        .await
        .unwrap();
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant `reboot`"),
        "{bad}"
    );

    // The snapshotted VM runs on as if nothing happened.
    let mut randoms = HashSet::from([echo_and_random(&ports.api, "original").await]);
    drop(ports);
    let status = tokio::time::timeout(TIMEOUT, original.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    for i in 0..CLONES {
        let clone_dir = dir.join(format!("clone{i}"));
        std::fs::create_dir(&clone_dir).unwrap();
        // No environment port: a restored guest already has its own.
        let ports = GuestPorts::bind(&clone_dir, None).await;
        let started = Instant::now();
        let (mut clone, console) = spawn_vmm(
            &restore_args(&state, &memory, &image, &ports.uds, 4 + i),
            "clone",
        );
        let random = echo_and_random(&ports.api, &format!("clone{i}")).await;
        println!(
            "clone {i}: restore to first answer {:.2} ms, random {random}",
            started.elapsed().as_secs_f64() * 1e3
        );
        assert!(
            randoms.insert(random),
            "clone {i} repeated another VM's randomness"
        );
        let api = ports.api;
        drop(api);
        let status = tokio::time::timeout(TIMEOUT, clone.wait())
            .await
            .unwrap()
            .unwrap();
        let console = console.await.unwrap();
        assert!(console.contains("reconnected"), "{console}");
        assert_eq!(status.code(), Some(0), "clone {i}: {console}");
        let log = ports.log.await.unwrap();
        assert!(
            log.contains(&format!("END RequestId: clone{i}-random")),
            "{log}"
        );
    }
    assert_eq!(randoms.len() as u64, CLONES + 1);

    refuses_bad_snapshots(&dir, &state, &memory, &image);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each bad snapshot or mismatched restore is refused with an error that
/// names what is wrong, before the guest runs.
fn refuses_bad_snapshots(dir: &Path, state: &Path, memory: &Path, image: &Path) {
    let good = std::fs::read(state).unwrap();
    let variant = |name: &str, bytes: &[u8]| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut other_version = good.clone();
    other_version[8] = 99;
    let short_memory = variant("short.mem", &std::fs::read(memory).unwrap()[..4096]);
    let uds = dir.join("refused.vsock");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            restore_args(
                &variant("cut.snap", &good[..good.len() / 2]),
                memory,
                image,
                &uds,
                3,
            ),
            "is truncated or extended",
        ),
        (
            restore_args(&variant("flipped.snap", &flipped), memory, image, &uds, 3),
            "checksum does not match",
        ),
        (
            restore_args(
                &variant("version.snap", &other_version),
                memory,
                image,
                &uds,
                3,
            ),
            "has format version 99",
        ),
        (
            restore_args(
                &variant("garbage.snap", b"not a snapshot at all"),
                memory,
                image,
                &uds,
                3,
            ),
            "is not a snapshot",
        ),
        (
            restore_args(state, &short_memory, image, &uds, 3),
            "the memory file holds 4096 bytes",
        ),
        (
            restore_args(state, memory, image, &uds, 3)[..6].to_vec(),
            "had a vsock device",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = run_vmm(&args, TIMEOUT);
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(expected),
            "{expected:?} not in {}",
            run.stderr
        );
    }
    let both = run_vmm(
        &["--restore", "x", "--restore-memory", "y", "--kernel", "z"],
        TIMEOUT,
    );
    assert!(
        both.stderr.contains("kernel") && both.stderr.contains("cannot be given with a snapshot"),
        "{}",
        both.stderr
    );
}

/// With `--snapshots every-version` the worker snapshots a version's
/// first on-demand environment and restores it for the version's later
/// cold starts (the idle timeout of 0 reaps every idle environment, so
/// each invocation here starts one). A configuration change makes a new
/// revision: its cold start boots again.
#[test]
fn the_worker_restores_a_versions_snapshot_for_its_later_cold_starts() {
    let data = data_dir("lambda-snapshots");
    let flags = ["--idle-timeout", "0", "--snapshots", "every-version"];
    let worker = RunningWorker::start(&data, &flags, "info");
    let client = worker.client();
    let wasm = wat::parse_str(microvm_tests::ECHO_WAT).unwrap();
    let reaped = Duration::from_millis(400);
    client_runtime().block_on(async {
        client.create_wasm_function("snap", &wasm, 5).await.unwrap();
        let first = client.invoke("snap", r#""random""#.into()).await.unwrap();
        assert_eq!(first.status, 200, "{first:?}");
        assert!(first.init_duration_ms().is_some(), "{}", first.log_tail);
        // The worker seals the snapshot in the background.
        let sealed = || {
            files_under(&data.join("snapshots"))
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "sealed"))
        };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !sealed() {
            assert!(
                std::time::Instant::now() < deadline,
                "no snapshot was sealed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut randoms = HashSet::from([first.body.clone()]);
        for i in 0..3 {
            tokio::time::sleep(reaped).await;
            let r = client.invoke("snap", r#""random""#.into()).await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            let restore = r.restore_duration_ms();
            assert!(
                restore.is_some(),
                "cold start {i} did not restore: {}\nworker log:\n{}",
                r.log_tail,
                worker.log()
            );
            println!(
                "restored cold start {i}: Restore Duration {restore:?} ms, Invoke -> answer {:?}",
                r.latency
            );
            assert!(
                randoms.insert(r.body.clone()),
                "a restored clone repeated randomness"
            );
            let echo = client
                .invoke("snap", r#"{"after":"restore"}"#.into())
                .await
                .unwrap();
            assert_eq!(&echo.body[..], br#"{"echo":{"after":"restore"}}"#);
        }

        // No plaintext at rest: the function's bytes are not in any file.
        let marker = b"echo: handling an event";
        for entry in files_under(&data.join("snapshots")) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{entry:?} holds plaintext"
            );
        }

        client
            .call(
                hyper::Method::PUT,
                "/2015-03-31/functions/snap/configuration",
                None,
                serde_json::json!({"Environment": {"Variables": {"NEW": "1"}}}),
                200,
            )
            .await
            .unwrap();
        tokio::time::sleep(reaped).await;
        let r = client.invoke("snap", r#""env""#.into()).await.unwrap();
        assert!(
            r.init_duration_ms().is_some(),
            "a new revision boots: {}",
            r.log_tail
        );
        assert!(String::from_utf8_lossy(&r.body).contains("NEW=1"), "{r:?}");
    });
    let log = worker.stop();
    assert!(log.contains("snapshot taken at the first /next"), "{log}");
    // Each invocation that met a new environment left its trace: a boot's
    // has the start-up message, a restore's does not.
    let traces: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" cold_start: "))
        .collect();
    let boot = traces
        .iter()
        .find(|l| l.contains("start-up message written"))
        .unwrap_or_else(|| panic!("no boot's trace in {log}"));
    let restore = traces
        .iter()
        .find(|l| !l.contains("start-up message written"))
        .unwrap_or_else(|| panic!("no restore's trace in {log}"));
    for trace in [boot, restore] {
        for step in ["vmm spawned", "first /next", "event delivered", "answered"] {
            assert!(trace.contains(step), "{step} missing from {trace}");
        }
    }
    std::fs::remove_dir_all(&data).unwrap();
}
