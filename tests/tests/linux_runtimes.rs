//! Linux runtimes through the worker: a `provided.al2023` function whose
//! ZIP holds a `bootstrap` built on the official `lambda_runtime` crate,
//! created and invoked through the Lambda API of a real `lambda-worker`,
//! each environment a Linux microVM (the project's kernel and no_std
//! init). On a PVM host they run in the L1 machine.

use std::path::PathBuf;

use bytes::Bytes;
use serde_json::{json, Value};

use host_services::data_plane::lifecycle::DestroyReason;
use microvm_tests::lambda_client::{zip_one_executable, Invoked, LambdaClient};
use microvm_tests::worker::{client_runtime, data_dir, environments_of, lifecycle, RunningWorker};
use microvm_tests::{guest_kernel, linux_init_binary, on_hardware_kvm, rust_function_bootstrap};

/// Starts a worker with the Linux guest; slow machines (L1) get time.
fn linux_worker(name: &str) -> (RunningWorker, PathBuf) {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let init = linux_init_binary();
    let flags = [
        "--linux-kernel",
        kernel.to_str().unwrap(),
        "--linux-init",
        init.to_str().unwrap(),
        "--init-timeout",
        "240",
    ];
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

#[test]
fn a_provided_al2023_function_serves_events_restores_and_survives_a_crash_through_the_worker() {
    on_hardware_kvm(
        "a_provided_al2023_function_serves_events_restores_and_survives_a_crash_through_the_worker",
        || {
            let (worker, data) = linux_worker("linux-runtime");
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
                let sealed = std::time::Instant::now();
                while !worker.log().contains("snapshot taken at the first /next") {
                    assert!(
                        sealed.elapsed() < std::time::Duration::from_secs(300),
                        "no snapshot:\n{}",
                        worker.log()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
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
