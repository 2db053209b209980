//! A fleet on etcd, end to end, on one machine: etcd, a front end and
//! three worker hosts, each a process in a network namespace of its own
//! with its own address (`microvm_tests::fleet`), every connection between
//! them mutual TLS. Placement, provisioned concurrency, functions and
//! reserved concurrency shared by two front ends, a host killed or cut
//! off, etcd and the front end restarted under load, strangers refused,
//! and boto3 against the front end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use host_services::data_plane::lifecycle::{CreateReason, DestroyReason};
use host_services::fleet::testing::fleet_certs;
use hyper::Method;
use microvm_tests::fleet::TestFleet;
use microvm_tests::lambda_client::{LambdaClient, NOT_CONNECTED};
use microvm_tests::worker::{client_runtime, client_script, lifecycle, RunningWorker};
use microvm_tests::{is_root, skip, ECHO_WAT};

/// What the echo function answers to `payload`.
fn echoed(payload: &str) -> String {
    format!("{{\"echo\":{payload}}}")
}

/// Environments a host created, from its lifecycle log.
fn created_on(host: &microvm_tests::fleet::FleetHost) -> usize {
    created_in(&host.data)
}

fn created_in(data: &std::path::Path) -> usize {
    lifecycle(data)
        .iter()
        .filter(|e| e.created.is_some())
        .count()
}

/// Network namespaces take root.
fn needs_root(test: &str) -> bool {
    if !is_root() {
        skip(test, "network namespaces need root");
        return false;
    }
    true
}

/// A fleet of `hosts` worker hosts with the echo function created, a
/// client of its front end and a runtime to drive it; None where the test
/// cannot run (it says so).
fn fleet_with_echo(
    test: &str,
    hosts: usize,
    host_flags: &[&str],
) -> Option<(TestFleet, Arc<LambdaClient>, tokio::runtime::Runtime)> {
    if !needs_root(test) {
        return None;
    }
    let fleet = TestFleet::start(hosts, host_flags, "info");
    let client = fleet.client();
    let runtime = client_runtime();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    runtime
        .block_on(client.create_wasm_function("echo", &wasm, 10))
        .unwrap();
    Some((fleet, client, runtime))
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_front_end_places_invocations_on_worker_hosts_and_strangers_get_nothing() {
    let Some((fleet, client, runtime)) = fleet_with_echo(
        "fleet::a_front_end_places_invocations_on_worker_hosts",
        3,
        &["--max-environments", "2"],
    ) else {
        return;
    };

    // A cold start, then the same environment warm.
    let first = runtime
        .block_on(client.invoke("echo", Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    assert_eq!(
        first.status,
        200,
        "{first:?}\n{}",
        fleet.front_end().process.log()
    );
    assert_eq!(first.body, echoed("{\"n\":1}"));
    assert!(first.init_duration_ms().is_some(), "{}", first.log_tail);
    let second = runtime
        .block_on(client.invoke("echo", Bytes::from_static(b"{\"n\":2}")))
        .unwrap();
    assert_eq!(second.body, echoed("{\"n\":2}"));
    assert_eq!(second.init_duration_ms(), None, "{}", second.log_tail);
    let created: Vec<usize> = fleet.worker_hosts.iter().map(created_on).collect();
    assert_eq!(created.iter().sum::<usize>(), 1, "{created:?}");

    // Six at once, each busy for about 100 ms, need all three hosts (two
    // environments each): cold starts go where there is room.
    let together = runtime.block_on(async {
        let calls: Vec<_> = (0..6)
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
    // (One whose spin ended before the last arrived may have served two.)
    let created: Vec<usize> = fleet.worker_hosts.iter().map(created_on).collect();
    assert!(created.iter().all(|&n| (1..=2).contains(&n)), "{created:?}");

    // A host whose certificate is not the fleet's: etcd refuses it, and so
    // does every host it calls.
    let strangers = fleet.certs.join("strangers");
    fleet_certs(&strangers, &["h1", "fe"]);
    let data = fleet.certs.join("stranger-data");
    let flags = [
        "--role",
        "worker-host",
        "--etcd",
        &fleet.etcd.endpoint,
        "--host-name",
        "h1",
        "--fleet-tls",
        strangers.to_str().unwrap(),
        "--fleet-listen",
        "127.0.0.1:7444",
    ];
    let refused = RunningWorker::try_start(&data, &flags, "info")
        .err()
        .unwrap();
    assert!(refused.contains("--etcd"), "{refused}");
    let stranger = host_services::fleet::tls::FleetTls::load(&strangers, "fe")
        .expect("the stranger's certificates");
    let h1 = &fleet.worker_hosts[0];
    let address = format!("{}:7443", h1.namespace.address).parse().unwrap();
    let peer = host_services::fleet::transport::Peer::new("h1", address, &stranger);
    let called = runtime.block_on(peer.post("/fleet/v1/invoke", Bytes::from_static(b"x")));
    assert!(called.unwrap_err().unreachable());
    // The real h1 was not displaced by the stranger of its name.
    let after = runtime
        .block_on(client.invoke("echo", Bytes::from_static(b"{\"n\":3}")))
        .unwrap();
    assert_eq!(after.body, echoed("{\"n\":3}"));
    assert!(!fleet.front_end().process.log().contains("host h1 left"));
}

/// Outcomes of the load's invocations, by kind.
#[derive(Default, Debug)]
struct Outcomes {
    /// RequestResponse: answered with the right body.
    answered: usize,
    /// RequestResponse: answered with Lambda's error, by status and error
    /// type (a host lost under the invocation, the fleet full).
    errors: BTreeMap<String, usize>,
    /// RequestResponse: sent, and no HTTP answer (in flight on the front
    /// end when it was killed, or sent on a connection the kill closed).
    unanswered: usize,
    /// Event: accepted (202), by request id.
    accepted: BTreeSet<String>,
    /// Event: refused, or in flight on the front end when it was killed.
    not_accepted: usize,
    /// Answers that were wrong: must stay empty.
    wrong: Vec<String>,
}

#[test]
fn under_load_a_killed_host_a_cut_off_host_and_restarts_of_etcd_and_the_front_end_lose_nothing() {
    const TOTAL: usize = 5000;
    const CONCURRENCY: usize = 32;
    let Some((mut fleet, client, runtime)) =
        fleet_with_echo("fleet::under_load_faults_lose_nothing", 3, &[])
    else {
        return;
    };
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let load = {
        let (outcomes, next) = (outcomes.clone(), next.clone());
        runtime.spawn(async move {
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    let (client, outcomes, next) = (client.clone(), outcomes.clone(), next.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= TOTAL {
                                return;
                            }
                            let payload = format!("{{\"i\":{i}}}");
                            let event = i % 2 == 1;
                            let kind = if event { "Event" } else { "RequestResponse" };
                            // As an SDK does, a request that found no
                            // front end to connect to is sent again.
                            let answer = loop {
                                let answer = client
                                    .request(
                                        Method::POST,
                                        "/2015-03-31/functions/echo/invocations",
                                        None,
                                        &[("x-amz-invocation-type", kind)],
                                        Bytes::from(payload.clone()),
                                    )
                                    .await;
                                match answer {
                                    Err(e) if e.starts_with(NOT_CONNECTED) => {
                                        tokio::time::sleep(Duration::from_millis(100)).await
                                    }
                                    answer => break answer,
                                }
                            };
                            let mut o = outcomes.lock().unwrap();
                            match (event, answer) {
                                (true, Ok(r)) if r.status == 202 => {
                                    let id = r.headers["x-amzn-requestid"].to_str().unwrap();
                                    o.accepted.insert(id.to_string());
                                }
                                (true, _) => o.not_accepted += 1,
                                (false, Ok(r))
                                    if r.status == 200
                                        && !r.headers.contains_key("x-amz-function-error") =>
                                {
                                    if r.body == echoed(&payload).as_bytes() {
                                        o.answered += 1;
                                    } else {
                                        o.wrong.push(format!("{i}: {:?}", r.body));
                                    }
                                }
                                (false, Ok(r)) => {
                                    let kind = r
                                        .headers
                                        .get("x-amz-function-error")
                                        .or(r.headers.get("x-amzn-errortype"))
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_string();
                                    let body = String::from_utf8_lossy(&r.body);
                                    let what = if body.contains("Runtime.ExitError") {
                                        "Runtime.ExitError"
                                    } else {
                                        ""
                                    };
                                    *o.errors
                                        .entry(format!("{} {kind} {what}", r.status))
                                        .or_default() += 1;
                                }
                                (false, Err(_)) => o.unanswered += 1,
                            }
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        })
    };
    let progress = |at: usize| {
        wait_for("the load to progress", Duration::from_secs(120), || {
            next.load(Ordering::Relaxed) >= at
        });
    };
    // The faults, one after another, while the load runs.
    progress(TOTAL / 10);
    println!(
        "h1 killed with SIGKILL at request {}",
        next.load(Ordering::Relaxed)
    );
    fleet.worker_hosts[0].process.kill();
    progress(TOTAL / 5);
    println!("h2 cut off at request {}", next.load(Ordering::Relaxed));
    fleet.worker_hosts[1].namespace.connect(false);
    let left = wait_for("h2 to leave the fleet", Duration::from_secs(20), || {
        fleet
            .front_end()
            .process
            .log()
            .contains("fleet: host h2 left")
    });
    println!(
        "h2 left the fleet {:.1} s after it was cut off",
        left.as_secs_f64()
    );
    fleet.worker_hosts[1].namespace.connect(true);
    println!("etcd restarted at request {}", next.load(Ordering::Relaxed));
    fleet.etcd.restart();
    progress(TOTAL * 3 / 5);
    println!(
        "front end killed and restarted at request {}",
        next.load(Ordering::Relaxed)
    );
    fleet.front_ends[0].restart("info");
    runtime.block_on(load).unwrap();

    // Every accepted event runs, the restarted front end finishing what
    // the killed one had accepted.
    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    let log = fleet
        .front_end()
        .data
        .join("logs/111111111111/echo/LATEST.log");
    let ran = wait_for(
        "every accepted event to run",
        Duration::from_secs(120),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let started: BTreeSet<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("START RequestId: "))
                .filter_map(|l| l.split(' ').next())
                .collect();
            outcomes
                .accepted
                .iter()
                .all(|id| started.contains(id.as_str()))
        },
    );
    println!(
        "RequestResponse: {} answered, errors {:?}, {} unanswered; Event: {} accepted, {} not",
        outcomes.answered,
        outcomes.errors,
        outcomes.unanswered,
        outcomes.accepted.len(),
        outcomes.not_accepted
    );
    println!(
        "the last accepted event ran {:.1} s after the load",
        ran.as_secs_f64()
    );
    assert!(outcomes.wrong.is_empty(), "{:?}", outcomes.wrong);
    let requests = TOTAL / 2;
    let sync_total =
        outcomes.answered + outcomes.errors.values().sum::<usize>() + outcomes.unanswered;
    assert_eq!(sync_total, requests);
    assert_eq!(outcomes.accepted.len() + outcomes.not_accepted, requests);
    // Only what was in flight on the killed front end went unanswered: for
    // each client task, the request it had there, and one sent on a
    // pooled connection the kill had closed.
    assert!(
        outcomes.unanswered + outcomes.not_accepted <= 2 * CONCURRENCY,
        "{outcomes:?}"
    );
    for error in outcomes.errors.keys() {
        assert!(
            error.contains("Runtime.ExitError")
                || error.starts_with("429")
                || error.starts_with("500"),
            "{error}"
        );
    }

    // h2 joined again once it could reach etcd.
    let h2 = &fleet.worker_hosts[1].process;
    let started = Instant::now();
    while !h2.log().contains("lapsed; joining again") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "h2 did not join again:\n{}",
            h2.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn boto3_drives_a_fleet_through_its_front_end() {
    if !needs_root("fleet::boto3_drives_a_fleet_through_its_front_end") {
        return;
    }
    let fleet = TestFleet::start(3, &[], "info");
    let wasm = fleet.front_end().data.join("function.wasm");
    std::fs::write(&wasm, wat::parse_str(ECHO_WAT).unwrap()).unwrap();
    let out = client_script(
        "fleet_e2e.py",
        &[&fleet.endpoint(), &wasm.display().to_string()],
    );
    let event_id = out
        .lines()
        .find_map(|l| l.strip_prefix("event-id: "))
        .expect("the script prints the event's id")
        .to_string();
    let log = fleet
        .front_end()
        .data
        .join("logs/111111111111/echo/LATEST.log");
    wait_for(
        "the Event invocation to run",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("START RequestId: {event_id} "))
        },
    );
    // The update retired $LATEST's idle environment on its host.
    let retired = fleet.worker_hosts.iter().any(|host| {
        lifecycle(&host.data)
            .iter()
            .any(|e| e.destroyed == Some(DestroyReason::FunctionUpdated))
    });
    assert!(retired, "no host retired an environment of the old code");
}

/// Provisioned environments each host keeps, from its lifecycle log:
/// created for provisioned concurrency, less those destroyed.
fn provisioned_on(host: &microvm_tests::fleet::FleetHost) -> usize {
    let events = lifecycle(&host.data);
    let provisioned: BTreeSet<&str> = events
        .iter()
        .filter(|e| {
            e.created == Some(CreateReason::ProvisionedConcurrency)
                || e.created == Some(CreateReason::EnvironmentFailed)
        })
        .map(|e| e.environment.as_str())
        .collect();
    let gone = events
        .iter()
        .filter(|e| e.destroyed.is_some() && provisioned.contains(e.environment.as_str()))
        .count();
    provisioned.len() - gone
}

#[test]
fn provisioned_concurrency_is_spread_over_the_hosts_and_refilled_when_one_dies() {
    let Some((mut fleet, client, runtime)) = fleet_with_echo(
        "fleet::provisioned_concurrency_is_spread_and_refilled",
        3,
        &[],
    ) else {
        return;
    };
    let version = runtime.block_on(async {
        let version = client.publish_version("echo").await.unwrap();
        client
            .provisioned_concurrency("echo", &version, Some(4))
            .await
            .unwrap();
        version
    });
    let status = |client: &LambdaClient| {
        runtime
            .block_on(client.provisioned_concurrency("echo", &version, None))
            .unwrap()
    };
    wait_for("the config to be READY", Duration::from_secs(60), || {
        status(&client)["Status"] == "READY"
    });
    assert_eq!(
        status(&client)["AllocatedProvisionedConcurrentExecutions"],
        4
    );
    let spread: Vec<usize> = fleet.worker_hosts.iter().map(provisioned_on).collect();
    assert_eq!(spread, [2, 1, 1]);
    // The version's invocations meet them warm.
    let warm = runtime
        .block_on(client.invoke(&format!("echo:{version}"), Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(warm.init_duration_ms(), None, "{}", warm.log_tail);

    // h1 dies: once it has left the fleet, h2 and h3 hold all four.
    fleet.worker_hosts[0].process.kill();
    let refilled = wait_for(
        "h2 and h3 to hold all four",
        Duration::from_secs(30),
        || provisioned_on(&fleet.worker_hosts[1]) + provisioned_on(&fleet.worker_hosts[2]) == 4,
    );
    println!(
        "refilled {:.1} s after h1 was killed",
        refilled.as_secs_f64()
    );
    assert_eq!(
        status(&client)["AllocatedProvisionedConcurrentExecutions"],
        4
    );
}

#[test]
fn a_worker_host_stopped_with_sigint_drains_and_no_invocation_fails() {
    let Some((mut fleet, client, runtime)) =
        fleet_with_echo("fleet::a_worker_host_stopped_with_sigint_drains", 2, &[])
    else {
        return;
    };
    let load = runtime.spawn(microvm_tests::load::run(client.clone(), "echo", 3000, 16));
    std::thread::sleep(Duration::from_millis(500));
    // The operator stops h1: it leaves the fleet, finishes what it runs,
    // stops its microVMs and exits cleanly.
    let h1 = fleet.worker_hosts.remove(0);
    let h1_data = h1.data.clone();
    let stopping = Instant::now();
    let log = h1.process.stop();
    println!(
        "h1 stopped {:.1} s after SIGINT",
        stopping.elapsed().as_secs_f64()
    );
    assert!(log.contains("leaving the fleet"), "{log}");
    let report = runtime.block_on(load).unwrap();
    report.print();
    assert!(
        report.failures.is_empty(),
        "{:?}",
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.not_exactly_once.is_empty());
    assert!(created_in(&h1_data) > 0 && created_on(&fleet.worker_hosts[0]) > 0);
}

/// The most invocations that ran at once across `logs` (worker hosts'
/// debug logs, whose timestamps come from one clock), from each
/// invocation's `begins` and `ends` lines.
fn most_at_once(logs: &[String]) -> usize {
    let mut events: Vec<(&str, i32)> = logs
        .iter()
        .flat_map(|log| log.lines())
        .filter_map(|line| {
            let at = line.split_whitespace().next()?;
            let rest = line.split("invocation ").nth(1)?;
            match rest.split_whitespace().nth(1)? {
                "begins" => Some((at, 1)),
                "ends" => Some((at, -1)),
                _ => None,
            }
        })
        .collect();
    // An end before a begin at the same instant.
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn reserved_concurrency_is_counted_across_front_ends() {
    const RESERVED: usize = 3;
    const CALLERS: usize = 4;
    const LOADED_FOR: Duration = Duration::from_secs(4);
    if !needs_root("fleet::reserved_concurrency_is_counted_across_front_ends") {
        return;
    }
    let fleet =
        TestFleet::start_with_front_ends(2, 2, &[], "info,host_services::data_plane::router=debug");
    let clients = [fleet.client_of(0), fleet.client_of(1)];
    let runtime = client_runtime();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    // Made through one front end, the function and its reservation are
    // the other's too.
    runtime.block_on(async {
        clients[0]
            .create_wasm_function("echo", &wasm, 10)
            .await
            .unwrap();
        clients[0]
            .call(
                Method::PUT,
                "/2017-10-31/functions/echo/concurrency",
                None,
                serde_json::json!({ "ReservedConcurrentExecutions": RESERVED }),
                200,
            )
            .await
            .unwrap();
        until_on(&clients[1], "/2019-09-30/functions/echo/concurrency", |v| {
            v["ReservedConcurrentExecutions"] == RESERVED
        })
        .await;
    });
    // Both front ends at once, each with more callers than the
    // reservation, each invoking one after another for a while: busy ("spin",
    // about 100 ms each) invocations overlap, and a front end counting
    // alone would let twice the reservation run.
    let outcomes: Vec<(usize, u16, String)> = runtime.block_on(async {
        let callers: Vec<_> = (0..2 * CALLERS)
            .map(|i| {
                let client = clients[i % 2].clone();
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let started = Instant::now();
                    while started.elapsed() < LOADED_FOR {
                        let r = client
                            .invoke("echo", Bytes::from_static(br#""spin""#))
                            .await
                            .unwrap();
                        if r.status == 429 {
                            // A throttled caller backs off, as SDKs do.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        outcomes.push((
                            i % 2,
                            r.status,
                            String::from_utf8_lossy(&r.body).into_owned(),
                        ));
                    }
                    outcomes
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for caller in callers {
            outcomes.extend(caller.await.unwrap());
        }
        outcomes
    });
    let ran = |fe: usize| {
        outcomes
            .iter()
            .filter(|(at, status, _)| *at == fe && *status == 200)
            .count()
    };
    let throttled = outcomes
        .iter()
        .filter(|(_, status, body)| {
            *status == 429 && body.contains("ReservedFunctionConcurrentInvocationLimitExceeded")
        })
        .count();
    println!(
        "fe ran {}, fe2 ran {}, {throttled} throttled",
        ran(0),
        ran(1)
    );
    assert_eq!(
        ran(0) + ran(1) + throttled,
        outcomes.len(),
        "every invocation ran or was throttled: {outcomes:?}"
    );
    assert!(ran(0) > 0 && ran(1) > 0 && throttled > 0, "{outcomes:?}");
    let logs: Vec<String> = fleet.worker_hosts.iter().map(|h| h.process.log()).collect();
    let most = most_at_once(&logs);
    assert!(
        (1..=RESERVED).contains(&most),
        "{most} invocations ran at once with {RESERVED} reserved across the front ends"
    );
    // Every slot was given back: the reservation is whole again.
    let again: Vec<u16> = runtime.block_on(async {
        let calls: Vec<_> = (0..RESERVED)
            .map(|_| {
                let client = clients[1].clone();
                tokio::spawn(async move {
                    client
                        .invoke("echo", Bytes::from_static(br#""spin""#))
                        .await
                        .unwrap()
                        .status
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for call in calls {
            statuses.push(call.await.unwrap());
        }
        statuses
    });
    assert_eq!(again, [200; RESERVED]);
    // Callers that stop waiting keep their slots until their invocations
    // end on the hosts: one more call meanwhile is throttled.
    runtime.block_on(async {
        let abandoned: Vec<_> = (0..RESERVED)
            .map(|i| {
                let client = clients[i % 2].clone();
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_millis(30),
                        client.invoke("echo", Bytes::from_static(br#""spin""#)),
                    )
                    .await
                    .is_err()
                })
            })
            .collect();
        for call in abandoned {
            assert!(call.await.unwrap(), "a spin answered within 30 ms");
        }
        let beside = clients[0]
            .invoke("echo", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&beside.body).into_owned();
        assert!(
            beside.status == 429
                && body.contains("ReservedFunctionConcurrentInvocationLimitExceeded"),
            "a call beside {RESERVED} abandoned ones: {} {body}",
            beside.status
        );
    });
}

/// Polls GET `path` on `client` until its answer passes `done`; returns
/// how long that took.
async fn until_on(
    client: &LambdaClient,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let started = Instant::now();
    let (path, query) = match path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path, None),
    };
    loop {
        let answer = client
            .call(Method::GET, path, query, serde_json::json!({}), 200)
            .await;
        match answer {
            Ok(v) if done(&v) => return started.elapsed(),
            other => assert!(
                started.elapsed() < Duration::from_secs(10),
                "GET {path}: still {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn front_ends_share_functions_versions_aliases_and_code() {
    if !needs_root("fleet::front_ends_share_functions_versions_aliases_and_code") {
        return;
    }
    let mut fleet = TestFleet::start_with_front_ends(1, 2, &[], "info");
    let (fe, fe2) = (fleet.client_of(0), fleet.client_of(1));
    let runtime = client_runtime();
    let echo = wat::parse_str(ECHO_WAT).unwrap();
    // The same function answering {"ohce":...} instead.
    let ohce = wat::parse_str(ECHO_WAT.replace(r#""{\"echo\":""#, r#""{\"ohce\":""#)).unwrap();
    assert_ne!(echo, ohce);
    runtime.block_on(async {
        // Made on fe, served by fe2, which fetches the code from fe (it
        // has none of its own) and starts the environment on a host.
        fe.create_wasm_function("echo", &echo, 10).await.unwrap();
        let seen = until_on(&fe2, "/2015-03-31/functions/echo", |_| true).await;
        println!("a new function reached the other front end in {seen:?}");
        let first = fe2
            .invoke("echo", Bytes::from_static(b"{\"n\":1}"))
            .await
            .unwrap();
        assert_eq!(
            first.status,
            200,
            "{first:?}\n{}",
            fleet.front_ends[1].process.log()
        );
        assert_eq!(first.body, echoed("{\"n\":1}"));

        // Both front ends create the same function at once: one does.
        let racing: Vec<_> = [fe.clone(), fe2.clone()]
            .into_iter()
            .map(|client| {
                let wasm = echo.clone();
                tokio::spawn(async move { client.create_wasm_function("race", &wasm, 10).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in racing {
            outcomes.push(call.await.unwrap());
        }
        let created = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(created, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| o.as_ref().is_err_and(|e| e.contains("409"))),
            "{outcomes:?}"
        );

        // New code through fe2 is what fe runs next.
        let zip = microvm_tests::lambda_client::zip_one("function.wasm", &ohce);
        let updated = fe2
            .call(
                Method::PUT,
                "/2015-03-31/functions/echo/code",
                None,
                serde_json::json!({
                    "ZipFile": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &zip)
                }),
                200,
            )
            .await
            .unwrap();
        let sha = updated["CodeSha256"].clone();
        until_on(&fe, "/2015-03-31/functions/echo", |v| {
            v["Configuration"]["CodeSha256"] == sha
        })
        .await;
        let after = fe.invoke("echo", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(after.body, "{\"ohce\":2}", "{after:?}");

        // A version published on fe, an alias to it made on fe2, invoked
        // through fe.
        let version = fe.publish_version("echo").await.unwrap();
        until_on(
            &fe2,
            &format!("/2015-03-31/functions/echo/configuration?Qualifier={version}"),
            |_| true,
        )
        .await;
        fe2.call(
            Method::POST,
            "/2015-03-31/functions/echo/aliases",
            None,
            serde_json::json!({ "Name": "live", "FunctionVersion": version }),
            201,
        )
        .await
        .unwrap();
        until_on(&fe, "/2015-03-31/functions/echo/aliases/live", |_| true).await;
        let live = fe
            .invoke("echo:live", Bytes::from_static(b"3"))
            .await
            .unwrap();
        assert_eq!(live.body, "{\"ohce\":3}", "{live:?}");

        // Provisioned concurrency set through fe2 is kept by the one front
        // end leading provisioning; both report it READY.
        fe2.provisioned_concurrency("echo", "live", Some(2))
            .await
            .unwrap();
        for client in [&fe, &fe2] {
            until_on(
                client,
                "/2019-09-30/functions/echo/provisioned-concurrency?Qualifier=live",
                |v| v["Status"] == "READY" && v["AllocatedProvisionedConcurrentExecutions"] == 2,
            )
            .await;
        }
        assert_eq!(provisioned_on(&fleet.worker_hosts[0]), 2);

        // Deleted on fe2, gone on fe.
        fe2.call(
            Method::DELETE,
            "/2015-03-31/functions/echo",
            None,
            serde_json::json!({}),
            204,
        )
        .await
        .unwrap();
        let started = Instant::now();
        loop {
            let gone = fe.invoke("echo", Bytes::from_static(b"4")).await.unwrap();
            if gone.status == 404 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{gone:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // The deleted function's provisioned environments are let go.
    wait_for(
        "the provisioned environments to go",
        Duration::from_secs(15),
        || provisioned_on(&fleet.worker_hosts[0]) == 0,
    );
    // A front end started again reads the fleet's functions from etcd,
    // including those made while it was down.
    fleet.front_ends[1].process.kill();
    runtime
        .block_on(fe.create_wasm_function("later", &echo, 10))
        .unwrap();
    fleet.front_ends[1].restart("info");
    let fe2 = fleet.client_of(1);
    runtime.block_on(async {
        for name in ["race", "later"] {
            until_on(&fe2, &format!("/2015-03-31/functions/{name}"), |_| true).await;
        }
        let later = fe2.invoke("later", Bytes::from_static(b"5")).await.unwrap();
        assert_eq!(later.body, echoed("5"), "{later:?}");
    });
}

/// The requests whose `START` lines a front end's log of `function` holds.
fn started_on(front_end: &microvm_tests::fleet::FleetHost, function: &str) -> BTreeSet<String> {
    let log = front_end
        .data
        .join(format!("logs/111111111111/{function}/LATEST.log"));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("START RequestId: "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_lost_front_ends_event_invocations_run_on_another() {
    const EVENTS: usize = 20;
    if !needs_root("fleet::a_lost_front_ends_event_invocations_run_on_another") {
        return;
    }
    // One environment at a time, each event busy for about 100 ms: most
    // of them are still queued when the front end that took them dies.
    let mut fleet = TestFleet::start_with_front_ends(1, 2, &["--max-environments", "1"], "info");
    let (fe, fe2) = (fleet.client_of(0), fleet.client_of(1));
    let runtime = client_runtime();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let accepted: BTreeSet<String> = runtime.block_on(async {
        fe.create_wasm_function("echo", &wasm, 10).await.unwrap();
        until_on(&fe2, "/2015-03-31/functions/echo", |_| true).await;
        let mut accepted = BTreeSet::new();
        for _ in 0..EVENTS {
            let r = fe
                .request(
                    Method::POST,
                    "/2015-03-31/functions/echo/invocations",
                    None,
                    &[("x-amz-invocation-type", "Event")],
                    Bytes::from_static(br#""spin""#),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 202);
            accepted.insert(r.headers["x-amzn-requestid"].to_str().unwrap().to_string());
        }
        // Their mirrors in etcd go out within milliseconds.
        tokio::time::sleep(Duration::from_millis(300)).await;
        accepted
    });
    fleet.front_ends[0].process.kill();
    let killed = Instant::now();
    let ran_on_fe = started_on(&fleet.front_ends[0], "echo");
    loop {
        let mut ran = started_on(&fleet.front_ends[1], "echo");
        ran.extend(ran_on_fe.iter().cloned());
        if accepted.is_subset(&ran) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "{} of {EVENTS} accepted events ran on fe, {} on fe2 within 30 s:\n{}\nh1:\n{}",
            ran_on_fe.intersection(&accepted).count(),
            started_on(&fleet.front_ends[1], "echo")
                .intersection(&accepted)
                .count(),
            fleet.front_ends[1].process.log(),
            fleet.worker_hosts[0].process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken_over = started_on(&fleet.front_ends[1], "echo");
    println!(
        "{} of {EVENTS} events ran on fe before it was killed, {} on fe2, all {:.1} s after the kill",
        ran_on_fe.intersection(&accepted).count(),
        taken_over.intersection(&accepted).count(),
        killed.elapsed().as_secs_f64()
    );
    assert!(
        !taken_over.is_empty(),
        "fe2 took none over:\n{}",
        fleet.front_ends[1].process.log()
    );
    assert!(fleet.front_ends[1]
        .process
        .log()
        .contains("taken over from a front end that left"));
    // fe, back, runs none of those fe2 took over.
    fleet.front_ends[0].restart("info");
    let log = fleet.front_ends[0].process.log();
    std::thread::sleep(Duration::from_secs(2));
    let again: Vec<String> = started_on(&fleet.front_ends[0], "echo")
        .difference(&ran_on_fe)
        .filter(|id| taken_over.contains(*id))
        .cloned()
        .collect();
    assert!(again.is_empty(), "run again on fe: {again:?}\n{log}");
}
