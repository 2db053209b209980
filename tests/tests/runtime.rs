//! The bare-metal guest as a function runtime: it boots under this VMM,
//! reads a WAT-authored function from its code disk, and serves events
//! from the host's Runtime API over vsock.

use std::process::Stdio;
use std::time::Duration;

use host_services::runtime_api::{Outcome, RuntimeApi};
use host_services::wasm_image;
use microvm_tests::{baremetal_guest, vmm_binary, ECHO_WAT};

/// Fuel for the runaway-loop check: far more than an echo needs.
const FUEL: u64 = 50_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_round_trip_and_traps_and_runaway_loops_are_function_errors() {
    let dir = std::env::temp_dir().join(format!("runtime-test-{}", std::process::id()));
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
        use tokio::io::AsyncReadExt;
        let (mut stream, _) = log_listener.accept().await.unwrap();
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        all
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
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            println!("guest: {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

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
