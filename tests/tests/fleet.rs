//! A fleet on etcd, end to end: etcd over the fleet's mutual TLS, a front
//! end serving the Lambda API, and worker hosts running the microVMs, each
//! its own `lambda-worker` process. Invocations are placed on the hosts
//! (warm where an environment of the version waits), a host killed
//! outright is passed over and leaves the fleet when its lease lapses, and
//! a host without the fleet's certificate gets nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use host_services::fleet::test_etcd::EtcdServer;
use host_services::fleet::testing::fleet_certs;
use microvm_tests::worker::{client_runtime, data_dir, lifecycle, RunningWorker};
use microvm_tests::ECHO_WAT;

fn free_address() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A fleet host's flags.
fn fleet_flags(role: &str, name: &str, etcd: &str, certs: &Path, listen: &str) -> Vec<String> {
    [
        "--role",
        role,
        "--etcd",
        etcd,
        "--host-name",
        name,
        "--fleet-tls",
        certs.to_str().unwrap(),
        "--fleet-listen",
        listen,
    ]
    .map(String::from)
    .to_vec()
}

fn start(data: &Path, flags: &[String]) -> RunningWorker {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    RunningWorker::start(data, &flags, "info")
}

/// What the echo function answers to `payload`.
fn echoed(payload: &str) -> String {
    format!("{{\"echo\":{payload}}}")
}

/// Environments a worker host created, from its lifecycle log.
fn created_on(data: &Path) -> usize {
    lifecycle(data)
        .iter()
        .filter(|e| e.created.is_some())
        .count()
}

#[test]
fn a_front_end_places_invocations_on_worker_hosts_and_passes_over_a_lost_one() {
    let root = data_dir("fleet");
    let certs = root.join("certs");
    fleet_certs(&certs, &["etcd=127.0.0.1", "fe", "h1", "h2"]);
    let etcd = EtcdServer::start(Some(&certs));
    let hosts: Vec<(std::path::PathBuf, RunningWorker)> = ["h1", "h2"]
        .iter()
        .map(|name| {
            let data = data_dir(&format!("fleet-{name}"));
            let mut flags =
                fleet_flags("worker-host", name, &etcd.endpoint, &certs, &free_address());
            flags.extend(["--max-environments", "2"].map(String::from));
            let host = start(&data, &flags);
            (data, host)
        })
        .collect();
    let front_end = start(
        &root,
        &fleet_flags("front-end", "fe", &etcd.endpoint, &certs, &free_address()),
    );
    let client = front_end.client();
    let runtime = client_runtime();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    runtime
        .block_on(client.create_wasm_function("echo", &wasm, 10))
        .unwrap();

    // A cold start, then the same environment warm.
    let first = runtime
        .block_on(client.invoke("echo", Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    assert_eq!(first.status, 200, "{first:?}\n{}", front_end.log());
    assert_eq!(first.body, echoed("{\"n\":1}"));
    assert!(first.init_duration_ms().is_some(), "{}", first.log_tail);
    let second = runtime
        .block_on(client.invoke("echo", Bytes::from_static(b"{\"n\":2}")))
        .unwrap();
    assert_eq!(second.body, echoed("{\"n\":2}"));
    assert_eq!(second.init_duration_ms(), None, "{}", second.log_tail);
    let created: Vec<usize> = hosts.iter().map(|(data, _)| created_on(data)).collect();
    assert_eq!(created.iter().sum::<usize>(), 1, "{created:?}");

    // Four at once, each busy for about 100 ms, need both hosts (two
    // environments each).
    let together = runtime.block_on(async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(
                    async move { client.invoke("echo", Bytes::from_static(b"\"spin\"")).await },
                )
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap().unwrap());
        }
        answers
    });
    for answer in &together {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.body, echoed("\"spin\""));
    }
    let created: Vec<usize> = hosts.iter().map(|(data, _)| created_on(data)).collect();
    assert!(
        created.iter().all(|&n| n > 0),
        "{created:?}\nfront end:\n{}\nh1:\n{}\nh2:\n{}",
        front_end.log(),
        hosts[0].1.log(),
        hosts[1].1.log()
    );

    // h1 is killed outright: every invocation still gets its answer, from
    // h2, and h1 leaves the fleet when its lease lapses.
    let mut hosts = hosts;
    let (h2_data, _h2) = hosts.pop().unwrap();
    let (_, mut h1) = hosts.pop().unwrap();
    h1.kill();
    let killed = Instant::now();
    for i in 0..20 {
        let payload = format!("{{\"after\":{i}}}");
        let answer = runtime
            .block_on(client.invoke("echo", Bytes::from(payload.clone())))
            .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}\n{}", front_end.log());
        assert_eq!(answer.body, echoed(&payload));
    }
    assert!(created_on(&h2_data) >= 1);
    let left = loop {
        let log = front_end.log();
        if log.contains("fleet: host h1 left") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "h1 never left:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "h1 left the fleet {:.1} s after it was killed",
        left.as_secs_f64()
    );

    // A host whose certificate is not the fleet's cannot reach etcd.
    let strangers = root.join("strangers");
    fleet_certs(&strangers, &["h3"]);
    let data = data_dir("fleet-h3");
    let flags = fleet_flags(
        "worker-host",
        "h3",
        &etcd.endpoint,
        &strangers,
        &free_address(),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let refused = RunningWorker::try_start(&data, &flags, "info")
        .err()
        .unwrap();
    assert!(refused.contains("--etcd"), "{refused}");
    front_end.stop();
}
