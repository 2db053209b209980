//! The bare-metal guest as a function runtime: it boots under this VMM,
//! reads a WAT-authored function from its code disk, and serves events
//! from the host's Runtime API over vsock.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use guest_init::environ::{encode, ENVIRON_PORT};
use host_services::runtime_api::{InvokeError, Outcome, RuntimeApi};
use host_services::wasm_image;
use microvm_tests::{baremetal_guest, vmm_binary, ECHO_WAT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Fuel for the runaway-loop check: far more than an echo needs.
const FUEL: u64 = 50_000_000;

/// A bare-metal guest serving the echo function, and the host's side of
/// its vsock ports.
struct Guest {
    dir: PathBuf,
    api: RuntimeApi,
    vmm: tokio::process::Child,
    console: tokio::task::JoinHandle<String>,
    log: tokio::task::JoinHandle<String>,
}

impl Guest {
    /// Boots the guest; the host sends it `environ` as its start-up
    /// message.
    async fn start(name: &str, environ: Vec<u8>) -> Guest {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let module = wat::parse_str(ECHO_WAT).unwrap();
        let image = dir.join("code.img");
        std::fs::write(&image, wasm_image::build(&module, FUEL).unwrap()).unwrap();
        let uds = dir.join("vsock");
        let api = RuntimeApi::bind(
            &dir.join("vsock_9001"),
            "arn:aws:lambda:local:000000000000:function:echo",
        )
        .await
        .unwrap();
        // The function's log stream: its stderr, and an END line per event.
        let log_listener = tokio::net::UnixListener::bind(dir.join("vsock_9002")).unwrap();
        let log = tokio::spawn(async move {
            let (mut stream, _) = log_listener.accept().await.unwrap();
            let mut all = String::new();
            let _ = stream.read_to_string(&mut all).await;
            all
        });
        let environ_listener =
            tokio::net::UnixListener::bind(dir.join(format!("vsock_{ENVIRON_PORT}"))).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = environ_listener.accept().await.unwrap();
            stream.write_all(&environ).await.unwrap();
        });

        let mut vmm = tokio::process::Command::new(vmm_binary())
            .arg("--kernel")
            .arg(baremetal_guest())
            .arg("--drive")
            .arg(format!("{},ro", image.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        // The guest's console, echoed as it comes and kept for the checks.
        let stdout = vmm.stdout.take().unwrap();
        let console = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut all = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("guest: {line}");
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        Guest {
            dir,
            api,
            vmm,
            console,
            log,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_round_trip_and_traps_and_runaway_loops_are_function_errors() {
    let environ = encode([("GREETING", "hello"), ("AWS_REGION", "local")]).unwrap();
    let Guest {
        dir,
        api,
        vmm,
        console,
        log,
    } = Guest::start("runtime-test", environ).await;
    let timeout = Duration::from_secs(30);
    for i in 0..3 {
        let event = format!("{{\"n\":{i}}}");
        let outcome = api
            .invoke(&format!("event-{i}"), event.clone().into(), timeout)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Response(format!("{{\"echo\":{event}}}").into()),
            "event {i}"
        );
    }
    match api
        .invoke("trap", "\"trap\"".into(), timeout)
        .await
        .unwrap()
    {
        Outcome::FunctionError { error_type, body } => {
            assert_eq!(error_type, "Runtime.Trap");
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("\"errorType\":\"Runtime.Trap\""), "{body}");
            assert!(body.contains("unreachable"), "{body}");
        }
        other => panic!("a trap gave {other:?}"),
    }
    match api
        .invoke("loop", "\"loop\"".into(), timeout)
        .await
        .unwrap()
    {
        Outcome::FunctionError { error_type, body } => {
            assert_eq!(error_type, "Runtime.FuelExhausted");
            assert!(String::from_utf8_lossy(&body).contains("50000000 units"));
        }
        other => panic!("an endless loop gave {other:?}"),
    }
    match api.invoke("env", "\"env\"".into(), timeout).await.unwrap() {
        Outcome::Response(body) => assert_eq!(
            String::from_utf8_lossy(&body),
            "GREETING=hello\nAWS_REGION=local\n",
            "the function sees the environment the host sent"
        ),
        other => panic!("environ gave {other:?}"),
    }
    // The environment still serves after both failures.
    let outcome = api.invoke("after", "{}".into(), timeout).await.unwrap();
    assert_eq!(outcome, Outcome::Response("{\"echo\":{}}".into()));

    // Closing the API ends the runtime, and with it the VM.
    drop(api);
    let out = tokio::time::timeout(Duration::from_secs(30), vmm.wait_with_output())
        .await
        .expect("the VM stops once its Runtime API is gone")
        .unwrap();
    let stdout = console.await.unwrap();
    assert!(stdout.contains("runtime: ready "), "{stdout}");
    let log = log.await.unwrap();
    for expected in [
        "echo: handling an event\nEND RequestId: event-0\n",
        "END RequestId: event-2\n",
        "Runtime.Trap: ",
        "Runtime.FuelExhausted: the function used all of its 50000000 units of fuel\nEND RequestId: loop\n",
    ] {
        assert!(log.contains(expected), "{expected:?} is not in the log stream:\n{log}");
    }
    assert!(
        !stdout.contains("handling an event"),
        "function output on the console"
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_environment_message_is_an_init_error_not_a_crash() {
    let mut garbage = encode([("KEY", "value")]).unwrap();
    // A variable length far past the end of the message.
    garbage[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let guest = Guest::start("runtime-bad-environ", garbage).await;
    match tokio::time::timeout(Duration::from_secs(30), guest.api.ready()).await {
        Ok(Err(InvokeError::InitFailed { error_type, body })) => {
            assert_eq!(error_type, "Runtime.InvalidEnvironment");
            assert!(body.contains("runs past the end"), "{body}");
        }
        other => panic!("a malformed environment gave {other:?}"),
    }
    let out = tokio::time::timeout(Duration::from_secs(30), guest.vmm.wait_with_output())
        .await
        .expect("the guest stops after reporting")
        .unwrap();
    let console = guest.console.await.unwrap();
    assert!(!console.contains("panic"), "{console}");
    assert_eq!(out.status.code(), Some(0), "{console}");
    std::fs::remove_dir_all(&guest.dir).unwrap();
}
