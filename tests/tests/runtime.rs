//! The bare-metal guest as a function runtime: it boots under this VMM,
//! reads a WAT-authored function from its code disk, and serves events
//! from the host's Runtime API over vsock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_init::environ::encode;
use host_services::data_plane::runtime_api::{InvokeError, Outcome, RuntimeApi};
use microvm_tests::guest_ports::{echo_code_disk, spawn_vmm, test_dir, wat_code_disk, GuestPorts};
use microvm_tests::{baremetal_guest, ECHO_WAT};

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
        let dir = test_dir(name);
        let image = echo_code_disk(&dir, FUEL);
        Self::boot(dir, &image, environ).await
    }

    /// Boots the guest with the code disk `image`, in `dir`.
    async fn boot(dir: PathBuf, image: &Path, environ: Vec<u8>) -> Guest {
        let GuestPorts { uds, api, log } = GuestPorts::bind(&dir, Some(environ)).await;

        let (vmm, console) = spawn_vmm(
            &[
                "--kernel".into(),
                baremetal_guest().display().to_string(),
                "--drive".into(),
                format!("{},ro", image.display()),
                "--vsock".into(),
                format!("cid=3,uds={}", uds.display()),
            ],
            "guest",
        );
        Guest {
            dir,
            api,
            vmm,
            console,
            log,
        }
    }
}

enum Stop {
    /// The runtime has reported an init error; the API stays open.
    AfterReporting,
    WhenTheApiCloses,
}

impl Guest {
    /// Expects the runtime's init to fail with `error_type`, the body
    /// naming `detail`.
    async fn init_fails(&self, error_type: &str, detail: &str) {
        match tokio::time::timeout(Duration::from_secs(30), self.api.ready()).await {
            Ok(Err(InvokeError::InitFailed {
                error_type: e,
                body,
            })) => {
                assert_eq!(e, error_type);
                assert!(body.contains(detail), "{body}");
            }
            other => panic!("expected {error_type}, got {other:?}"),
        }
    }

    /// Expects the VM to stop cleanly, by itself or once the Runtime API
    /// closes, which ends the runtime; removes the test's files.
    async fn stops(self, how: Stop) {
        let Guest {
            dir,
            api,
            vmm,
            console,
            log: _,
        } = self;
        let why = match how {
            Stop::AfterReporting => "the guest stops after reporting",
            Stop::WhenTheApiCloses => {
                drop(api);
                "the VM stops once its Runtime API is gone"
            }
        };
        let out = tokio::time::timeout(Duration::from_secs(30), vmm.wait_with_output())
            .await
            .expect(why)
            .unwrap();
        let console = console.await.unwrap();
        assert!(!console.contains("panic"), "{console}");
        assert_eq!(out.status.code(), Some(0), "{console}");
        std::fs::remove_dir_all(&dir).unwrap();
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
    guest
        .init_fails("Runtime.InvalidEnvironment", "runs past the end")
        .await;
    guest.stops(Stop::AfterReporting).await;
}

/// The guest reads its code disk's header with up to 64 KiB after it;
/// a longer module takes a second read, and one that runs past the end of
/// the disk is an init error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_longer_than_the_first_read_arrives_whole_or_is_an_init_error() {
    let dir = test_dir("runtime-long-module");
    let image = wat_code_disk(&dir, ECHO_WAT, FUEL, 300 << 10);
    let guest = Guest::boot(dir, &image, encode([]).unwrap()).await;
    let outcome = guest
        .api
        .invoke("long", "{}".into(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Response("{\"echo\":{}}".into()));
    guest.stops(Stop::WhenTheApiCloses).await;

    // The same disk cut short: the header still claims 300 KiB.
    let dir = test_dir("runtime-cut-module");
    let image = wat_code_disk(&dir, ECHO_WAT, FUEL, 300 << 10);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len(100 << 10).unwrap();
    let guest = Guest::boot(dir, &image, encode([]).unwrap()).await;
    guest
        .init_fails("Runtime.InvalidFunction", "code disk read")
        .await;
    guest.stops(Stop::AfterReporting).await;
}

/// A module with a start function, as toolchains that run top-level code
/// emit: it runs at instantiation, before `_start`, on the function's fuel.
const STARTED_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $started (mut i32) (i32.const 0))
  (data (i32.const 16) "started\n")
  (func $init (global.set $started (i32.const 1)))
  (start $init)
  (func (export "_start")
    (if (global.get $started)
      (then
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 8))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_function_runs_before_each_event() {
    let dir = test_dir("runtime-start-function");
    let image = wat_code_disk(&dir, STARTED_WAT, FUEL, 0);
    let guest = Guest::boot(dir, &image, encode([]).unwrap()).await;
    for i in 0..2 {
        let outcome = guest
            .api
            .invoke(&format!("start-{i}"), "{}".into(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Response("started\n".into()), "event {i}");
    }
    guest.stops(Stop::WhenTheApiCloses).await;
}

/// CPU time the process has used so far, all its threads together.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_waiting_for_its_next_event_leaves_the_cpu_idle() {
    let guest = Guest::start("runtime-idle", encode([]).unwrap()).await;
    let timeout = Duration::from_secs(30);
    let outcome = guest
        .api
        .invoke("first", "{}".into(), timeout)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Response("{\"echo\":{}}".into()));
    // Back at /next by now, with nothing to do.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = guest.vmm.id().unwrap();
    let before = cpu_time(pid);
    let watched = Duration::from_secs(2);
    tokio::time::sleep(watched).await;
    let used = cpu_time(pid) - before;
    println!("VMM CPU time over {watched:?} waiting for /next: {used:?}");
    assert!(
        used < watched / 10,
        "the guest kept {used:?} of CPU busy in {watched:?} while waiting for an event"
    );
    // And it still answers at once.
    let outcome = guest
        .api
        .invoke("second", "[]".into(), timeout)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Response("{\"echo\":[]}".into()));
    guest.stops(Stop::WhenTheApiCloses).await;
}
