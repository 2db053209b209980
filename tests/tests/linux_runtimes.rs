//! Linux runtimes through the worker: a `provided.al2023` function whose
//! ZIP holds a `bootstrap` built on the official `lambda_runtime` crate,
//! created and invoked through the Lambda API of a real `lambda-worker`,
//! each environment a Linux microVM (the project's kernel and no_std
//! init). On a PVM host they run in the L1 machine.

use bytes::Bytes;
use serde_json::{json, Value};

use microvm_tests::lambda_client::zip_one_executable;
use microvm_tests::worker::{client_runtime, data_dir, environments_of, RunningWorker};
use microvm_tests::{guest_kernel, linux_init_binary, on_hardware_kvm, rust_function_bootstrap};

/// Starts a worker with the Linux guest; slow machines (L1) get time.
fn linux_worker(name: &str, extra: &[&str]) -> RunningWorker {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let init = linux_init_binary();
    let mut flags = vec![
        "--linux-kernel",
        kernel.to_str().unwrap(),
        "--linux-init",
        init.to_str().unwrap(),
        "--init-timeout",
        "240",
    ];
    flags.extend_from_slice(extra);
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    RunningWorker::start(&data_dir(name), &flags, "info")
}

#[test]
fn a_provided_al2023_function_serves_events_through_the_worker() {
    on_hardware_kvm(
        "a_provided_al2023_function_serves_events_through_the_worker",
        || {
            let worker = linux_worker("linux-runtime", &["--no-snapshots"]);
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
                            "FunctionName": "linux-echo",
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
                for n in 0..3 {
                    let invoked = client
                        .invoke("linux-echo", Bytes::from(json!({ "n": n }).to_string()))
                        .await
                        .unwrap();
                    let body: Value = serde_json::from_slice(&invoked.body).unwrap_or_else(|e| {
                        panic!("{e}: {:?}\n{}", invoked.body, worker.log())
                    });
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
                let failed = client
                    .invoke("linux-echo", Bytes::from(r#"{"fail":"no"}"#))
                    .await
                    .unwrap();
                assert_eq!(failed.function_error.as_deref(), Some("Unhandled"));
                let error: Value = serde_json::from_slice(&failed.body).unwrap();
                assert_eq!(error["errorType"], "Function.Refused", "{error}");
            });
            let log = worker.stop();
            let environments = environments_of(&log, "111111111111:linux-echo:$LATEST");
            assert_eq!(
                environments.len(),
                1,
                "one environment served them all:\n{log}"
            );
        },
    );
}
