//! Linux runtimes through the worker: a `provided.al2023` function whose
//! ZIP holds a `bootstrap` built on the official `lambda_runtime` crate,
//! created and invoked through the Lambda API of a real `lambda-worker`,
//! each environment a Linux microVM (the project's kernel and no_std
//! init); a `python3.11` function, its handler run by the official
//! Runtime Interface Client (`awslambdaric`) in the project's Python
//! runtime image; container image functions; all of them through boto3
//! too. On a PVM host they run in the L1 machine.

use std::path::PathBuf;

use bytes::Bytes;
use serde_json::{json, Value};

use host_services::data_plane::lifecycle::DestroyReason;
use microvm_tests::lambda_client::{zip_one_executable, Invoked, LambdaClient};
use microvm_tests::worker::{
    client_runtime, client_script, data_dir, environments_of, lifecycle, RunningWorker,
};
use microvm_tests::{
    guest_kernel, linux_init_binary, on_hardware_kvm, python_runtime_image, rust_function_bootstrap,
};

/// Starts a worker with the Linux guest and `extra` flags; slow machines
/// (L1) get time.
fn linux_worker(name: &str, extra: &[&str]) -> (RunningWorker, PathBuf) {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let init = linux_init_binary();
    let python = format!(
        "python3.11={}",
        python_runtime_image()
            .unwrap_or_else(|e| panic!("{e}"))
            .display()
    );
    let flags = [
        "--linux-kernel",
        kernel.to_str().unwrap(),
        "--linux-init",
        init.to_str().unwrap(),
        "--linux-runtime",
        &python,
        "--init-timeout",
        "240",
    ];
    let flags: Vec<&str> = flags.iter().chain(extra).copied().collect();
    let data = data_dir(name);
    (RunningWorker::start(&data, &flags, "info"), data)
}

async fn invoke_json(client: &LambdaClient, payload: Value) -> (Invoked, Value) {
    let invoked = client
        .invoke(FUNCTION, Bytes::from(payload.to_string()))
        .await
        .unwrap();
    let body =
        serde_json::from_slice(&invoked.body).unwrap_or_else(|e| panic!("{e}: {:?}", invoked.body));
    (invoked, body)
}

const FUNCTION: &str = "linux-echo";
const LAYERED: &str = "linux-layered";

#[test]
fn a_provided_al2023_function_serves_events_restores_survives_a_crash_and_runs_from_a_layer() {
    on_hardware_kvm(
        "a_provided_al2023_function_serves_events_restores_survives_a_crash_and_runs_from_a_layer",
        || {
            // A clone of the version's first boot restores.
            let (worker, data) = linux_worker("linux-runtime", &["--snapshots", "every-version"]);
            let client = worker.client();
            let zip = zip_one_executable(
                "bootstrap",
                &std::fs::read(rust_function_bootstrap()).unwrap(),
            );
            let rt = client_runtime();
            rt.block_on(async {
                use base64::Engine as _;
                let created = client
                    .call(
                        hyper::Method::POST,
                        "/2015-03-31/functions",
                        None,
                        json!({
                            "FunctionName": FUNCTION,
                            "Runtime": "provided.al2023",
                            "Role": "arn:aws:iam::111111111111:role/linux",
                            "Handler": "bootstrap",
                            "MemorySize": 256,
                            "Timeout": 120,
                            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
                        }),
                        201,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()));
                assert_eq!(created["Runtime"], "provided.al2023");

                // One environment, booted once, serves events and errors.
                for n in 0..3 {
                    let (invoked, body) = invoke_json(&client, json!({ "n": n })).await;
                    assert_eq!(invoked.status, 200, "{body}\n{}", worker.log());
                    assert_eq!(invoked.function_error, None, "{body}");
                    assert_eq!(body, json!({ "echo": { "n": n } }));
                    assert!(
                        invoked.log_tail.contains("handling request"),
                        "the function's stdout reaches its log: {}",
                        invoked.log_tail
                    );
                    assert_eq!(
                        invoked.log_tail.contains("Init Duration"),
                        n == 0,
                        "a cold start first, then the same environment: {}",
                        invoked.log_tail
                    );
                }
                let (failed, error) = invoke_json(&client, json!({ "fail": "no" })).await;
                assert_eq!(failed.function_error.as_deref(), Some("Unhandled"));
                assert_eq!(error["errorType"], "Function.Refused", "{error}");

                // Two at once: the busy environment's twin is restored from
                // the snapshot the first boot left (sealed in the
                // background: slow under emulation), and draws its own
                // randomness.
                worker.wait_for_log(
                    "snapshot taken at the first /next",
                    std::time::Duration::from_secs(300),
                );
                let ((a, a_body), (b, b_body)) = tokio::join!(
                    invoke_json(&client, json!({ "random": true })),
                    invoke_json(&client, json!({ "random": true })),
                );
                assert_eq!((a.status, b.status), (200, 200), "{a_body} {b_body}");
                assert_ne!(a_body["random"], b_body["random"], "clones draw distinct randomness");
                let restored = [&a, &b]
                    .iter()
                    .filter(|i| i.log_tail.contains("Restore Duration"))
                    .count();
                assert_eq!(restored, 1, "{}\n{}\n{}", a.log_tail, b.log_tail, worker.log());

                // A runtime that exits mid-invocation: Lambda's error, and
                // a new environment for the next event.
                let (crashed, error) = invoke_json(&client, json!({ "exit": 3 })).await;
                assert_eq!(crashed.function_error.as_deref(), Some("Unhandled"), "{error}");
                assert_eq!(error["errorType"], "Runtime.ExitError", "{error}");
                let (after, body) = invoke_json(&client, json!({ "n": 9 })).await;
                assert_eq!(after.status, 200, "{body}");
                assert_eq!(body, json!({ "echo": { "n": 9 } }));

                // A custom runtime in a layer: the function's ZIP has no
                // bootstrap, the layer at /opt has.
                let layer = client
                    .call(
                        hyper::Method::POST,
                        "/2018-10-31/layers/rust-runtime/versions",
                        None,
                        json!({ "Content": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip) } }),
                        201,
                    )
                    .await
                    .unwrap();
                let readme = microvm_tests::lambda_client::zip_one("README", b"code in a layer\n");
                client
                    .call(
                        hyper::Method::POST,
                        "/2015-03-31/functions",
                        None,
                        json!({
                            "FunctionName": LAYERED,
                            "Runtime": "provided.al2",
                            "Role": "arn:aws:iam::111111111111:role/linux",
                            "Handler": "unused",
                            "MemorySize": 256,
                            "Timeout": 120,
                            "Layers": [layer["LayerVersionArn"]],
                            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(&readme)},
                        }),
                        201,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()));
                let invoked = client
                    .invoke(LAYERED, Bytes::from(r#"{"from":"opt"}"#))
                    .await
                    .unwrap();
                let body: Value = serde_json::from_slice(&invoked.body).unwrap();
                assert_eq!(body, json!({ "echo": { "from": "opt" } }), "{}", worker.log());
            });
            let log = worker.stop();
            let environments = environments_of(&log, "111111111111:linux-echo:$LATEST");
            assert_eq!(
                environments.len(),
                2,
                "the first and its restored twin:\n{log}"
            );
            let failed: Vec<_> = lifecycle(&data)
                .into_iter()
                .filter(|e| e.destroyed == Some(DestroyReason::InvocationFailed))
                .collect();
            assert_eq!(
                failed.len(),
                1,
                "the crashed environment is replaced: {failed:?}"
            );
        },
    );
}

const PYTHON_HANDLER: &str = r#"
import sys
import time

def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("hog"):
        # Touched pages, 16 MiB at a time, until the kernel's OOM killer
        # ends it: one allocation larger than memory would only raise
        # MemoryError.
        held = []
        while True:
            held.append(b"x" * (16 << 20))
    print("hello from python", event.get("n"))
    return {
        "n": event.get("n"),
        "request_id": context.aws_request_id,
        "function_arn": context.invoked_function_arn,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "log_group": context.log_group_name,
        "python": sys.version_info[:2],
    }
"#;

#[test]
fn a_python311_function_runs_its_handler_with_lambdas_context_and_errors_timeouts_and_oom() {
    on_hardware_kvm(
        "a_python311_function_runs_its_handler_with_lambdas_context_and_errors_timeouts_and_oom",
        || {
            let (worker, data) = linux_worker("python-runtime", &[]);
            let client = worker.client();
            let zip = microvm_tests::lambda_client::zip_one("app.py", PYTHON_HANDLER.as_bytes());
            let rt = client_runtime();
            rt.block_on(async {
                use base64::Engine as _;
                let create = |name: &'static str, timeout: u32| {
                    let request = json!({
                        "FunctionName": name,
                        "Runtime": "python3.11",
                        "Role": "arn:aws:iam::111111111111:role/python",
                        "Handler": "app.handler",
                        "MemorySize": 256,
                        "Timeout": timeout,
                        "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
                    });
                    let (client, worker) = (&client, &worker);
                    async move {
                        client
                            .call(
                                hyper::Method::POST,
                                "/2015-03-31/functions",
                                None,
                                request,
                                201,
                            )
                            .await
                            .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()))
                    }
                };
                let created = create("python-app", 120).await;
                let arn = created["FunctionArn"].as_str().unwrap().to_string();
                for n in 0..2 {
                    let invoked = client
                        .invoke("python-app", Bytes::from(json!({ "n": n }).to_string()))
                        .await
                        .unwrap();
                    let body: Value = serde_json::from_slice(&invoked.body)
                        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", invoked.body, worker.log()));
                    assert_eq!(invoked.status, 200, "{body}");
                    assert_eq!(invoked.function_error, None, "{body}\n{}", worker.log());
                    let request_id = body["request_id"].as_str().unwrap();
                    assert!(
                        invoked
                            .log_tail
                            .contains(&format!("START RequestId: {request_id}")),
                        "the context's request id is the invocation's: {}",
                        invoked.log_tail
                    );
                    assert!(
                        invoked.log_tail.contains(&format!("hello from python {n}")),
                        "print reaches the log: {}",
                        invoked.log_tail
                    );
                    assert_eq!(body["n"], n);
                    assert_eq!(body["function_arn"], arn.as_str());
                    assert_eq!(body["log_group"], "/aws/lambda/python-app");
                    assert_eq!(body["python"], json!([3, 11]));
                    // The deadline is the host's wall clock; the guest
                    // reads its own (kvmclock's, from boot), which the
                    // emulated L1 machine lets drift by a fraction of a
                    // second.
                    let remaining = body["remaining_ms"].as_u64().unwrap();
                    assert!(
                        remaining > 60_000 && remaining <= 121_000,
                        "remaining time within the 120 s timeout: {remaining}"
                    );
                }
                let failed = client
                    .invoke("python-app", Bytes::from(r#"{"fail":true}"#))
                    .await
                    .unwrap();
                let error: Value = serde_json::from_slice(&failed.body).unwrap();
                assert_eq!(failed.status, 200);
                assert_eq!(
                    failed.function_error.as_deref(),
                    Some("Unhandled"),
                    "{error}"
                );
                assert_eq!(error["errorType"], "ValueError", "{error}");
                assert_eq!(error["errorMessage"], "asked to fail", "{error}");
                assert!(
                    error["stackTrace"]
                        .as_array()
                        .is_some_and(|t| !t.is_empty()),
                    "{error}"
                );

                // Out of memory: the guest's OOM killer ends the runtime,
                // the init tells it from other deaths.
                let hog = client
                    .invoke("python-app", Bytes::from(r#"{"hog":true}"#))
                    .await
                    .unwrap();
                let error: Value = serde_json::from_slice(&hog.body).unwrap();
                assert_eq!(hog.function_error.as_deref(), Some("Unhandled"), "{error}");
                assert_eq!(
                    error["errorType"],
                    "Runtime.OutOfMemory",
                    "{error}\n{}",
                    worker.log()
                );

                // Past its timeout: Lambda's Sandbox.Timedout.
                create("python-slow", 5).await;
                let slow = client
                    .invoke("python-slow", Bytes::from(r#"{"sleep":60}"#))
                    .await
                    .unwrap();
                let error: Value = serde_json::from_slice(&slow.body).unwrap();
                assert_eq!(slow.function_error.as_deref(), Some("Unhandled"), "{error}");
                assert_eq!(error["errorType"], "Sandbox.Timedout", "{error}");
                assert!(
                    error["errorMessage"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("Task timed out after 5.00 seconds")),
                    "{error}"
                );
            });
            let log = worker.stop();
            assert_eq!(
                environments_of(&log, "111111111111:python-app:$LATEST").len(),
                1,
                "one environment served the events and the error, until the OOM:\n{log}"
            );
            let ended: Vec<_> = lifecycle(&data)
                .into_iter()
                .filter(|e| e.destroyed == Some(DestroyReason::InvocationFailed))
                .map(|e| e.destroyed)
                .collect();
            assert_eq!(
                ended.len(),
                2,
                "the OOM-killed and the timed-out environments are replaced: {ended:?}"
            );
        },
    );
}

/// A container image layer: `files` (made executable) under their parent
/// directories.
fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _) in files {
        let mut parent = std::path::Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    let header = |kind, size| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_mtime(0);
        h
    };
    for dir in dirs {
        let mut h = header(tar::EntryType::Directory, 0);
        builder.append_data(&mut h, dir, &[][..]).unwrap();
    }
    for (path, data) in files {
        let mut h = header(tar::EntryType::Regular, data.len() as u64);
        builder.append_data(&mut h, path, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Writes an image layout of the `lambda_runtime` test function to `dir`:
/// a base layer any two such images share (the function, 6 MB, run by
/// name from PATH), then a layer with `own` file (sorted after the
/// base's, so that the base's chunks stay aligned), with `GREETING` set to
/// `greeting`, CMD `app.handler` and WORKDIR /var/task.
fn function_image(dir: &std::path::Path, own: (&str, &[u8]), greeting: &str) {
    use host_services::artifacts::oci::{write_layout, ImageRunConfig};
    let handler = std::fs::read(rust_function_bootstrap()).unwrap();
    let base = layer(&[("usr/local/bin/handler", &handler)]);
    let run = ImageRunConfig {
        entrypoint: Some(vec!["handler".into()]),
        cmd: Some(vec!["app.handler".into()]),
        env: Some(vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".into(),
            format!("GREETING={greeting}"),
        ]),
        working_dir: Some("/var/task".into()),
    };
    write_layout(dir, &[base, layer(&[own])], &run).unwrap();
}

/// `image ... as N chunks, M of them new` from the worker's log, per image
/// imported.
fn imported_chunks(log: &str) -> Vec<(usize, usize)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.split(" bytes as ").nth(1)?;
            let total = rest.split(' ').next()?.parse().ok()?;
            let new = rest
                .split("chunks, ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some((total, new))
        })
        .collect()
}

/// boto3 against Linux functions of every kind, in one L1 machine: the
/// script's checks, then the chunk store's sharing of the two images'
/// base layer. Named to sort first: the longest of these tests starts
/// first when they run two at a time.
#[test]
fn a_boto3_user_runs_zip_python_and_image_functions_cold_warm_and_restored() {
    on_hardware_kvm(
        "a_boto3_user_runs_zip_python_and_image_functions_cold_warm_and_restored",
        || {
            let (worker, data) = linux_worker("linux-boto3", &[]);
            let (image, other) = (data.join("image"), data.join("other-image"));
            function_image(&image, ("var/task/a.txt", b"a"), "from the image");
            function_image(&other, ("var/task/b.txt", b"bb"), "from the other image");
            // The second as a tar archive of its layout.
            let other_tar = data.join("other-image.tar");
            let mut archive = tar::Builder::new(std::fs::File::create(&other_tar).unwrap());
            archive.append_dir_all(".", &other).unwrap();
            archive.finish().unwrap();
            client_script(
                "linux_e2e.py",
                &[
                    &worker.endpoint(),
                    &rust_function_bootstrap().display().to_string(),
                    &image.display().to_string(),
                    &other_tar.display().to_string(),
                ],
            );
            let imported = imported_chunks(&worker.log());
            assert_eq!(imported.len(), 2, "{}", worker.log());
            let (referenced, stored) = imported
                .iter()
                .fold((0, 0), |(r, s), (total, new)| (r + total, s + new));
            println!(
                "two images sharing a base layer: {referenced} chunks referenced, {stored} stored (dedup ratio {:.2})",
                referenced as f64 / stored as f64
            );
            assert_eq!(imported[0].0, imported[0].1, "the first image stores all");
            assert!(
                imported[1].1 * 2 < imported[1].0,
                "the second image stored {} of {} chunks",
                imported[1].1,
                imported[1].0
            );
            worker.stop();
            std::fs::remove_dir_all(&data).unwrap();
        },
    );
}
