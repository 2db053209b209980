//! Routing under concurrency, against a real worker with real microVMs:
//! one invocation per environment at a time, reuse, and a bounded load
//! test in which every invocation is answered exactly once.

use std::collections::HashMap;
use std::time::Duration;

use microvm_tests::load::{self, percentile};
use microvm_tests::worker::{client_runtime, data_dir, environments_of, RunningWorker};
use microvm_tests::ECHO_WAT;

/// Checks from the worker's debug log that no environment ever ran two
/// invocations at once; returns how many each ran.
fn invocations_per_environment(log: &str) -> HashMap<String, usize> {
    let mut running: HashMap<String, Option<String>> = HashMap::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("invocation ").nth(1) else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [request, what, "in", env] = words[..] else {
            continue;
        };
        let slot = running.entry(env.to_string()).or_default();
        match what {
            "begins" => {
                assert!(
                    slot.is_none(),
                    "{env} began {request} while running {slot:?}"
                );
                *slot = Some(request.to_string());
                *count.entry(env.to_string()).or_default() += 1;
            }
            "ends" => {
                assert_eq!(slot.as_deref(), Some(request), "{env} ended {request}");
                *slot = None;
            }
            _ => {}
        }
    }
    count
}

#[test]
fn concurrent_invokes_use_one_environment_each_and_reuse_them() {
    const N: usize = 4;
    let data = data_dir("lambda-concurrency");
    let worker = RunningWorker::start(&data, &[], "info,host_services::data_plane::router=debug");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    client_runtime().block_on(async {
        client
            .create_wasm_function("spin", &wasm, 10)
            .await
            .unwrap();
        for wave in 0..2 {
            let calls: Vec<_> = (0..N)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move { client.invoke("spin", r#""spin""#.into()).await })
                })
                .collect();
            for call in calls {
                let r = call.await.unwrap().unwrap();
                assert_eq!(r.status, 200, "wave {wave}: {r:?}");
                assert_eq!(&r.body[..], br#"{"echo":"spin"}"#, "wave {wave}");
            }
        }
    });
    let log = worker.stop();
    let environments = environments_of(&log, "111111111111:spin:$LATEST");
    assert_eq!(
        environments.len(),
        N,
        "{N} concurrent invokes, then {N} more, should use exactly {N} environments: {environments:?}"
    );
    let per_environment = invocations_per_environment(&log);
    assert_eq!(per_environment.values().sum::<usize>(), 2 * N, "{log}");
    for env in &environments {
        assert_eq!(
            per_environment.get(env),
            Some(&2),
            "{env} was not reused once"
        );
    }
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn ten_thousand_invokes_at_concurrency_32_are_each_answered_exactly_once() {
    const TOTAL: usize = 10_000;
    const CONCURRENCY: usize = 32;
    const COLD_SERIES: usize = 16;
    let data = data_dir("lambda-load");
    let worker = RunningWorker::start(&data, &[], "warn");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let report = client_runtime().block_on(async {
        // Cold starts one at a time, each on a function of its own.
        let mut cold = Vec::new();
        for i in 0..COLD_SERIES {
            let name = format!("cold-{i}");
            client.create_wasm_function(&name, &wasm, 5).await.unwrap();
            let r = client.invoke(&name, "{}".into()).await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.init_duration_ms().is_some(), "not a cold start: {r:?}");
            cold.push(r.latency);
        }
        println!(
            "{COLD_SERIES} sequential cold starts: p50 {:.2} ms, max {:.2} ms",
            percentile(&cold, 50.0).as_secs_f64() * 1e3,
            percentile(&cold, 100.0).as_secs_f64() * 1e3
        );
        client.create_wasm_function("echo", &wasm, 5).await.unwrap();
        load::run(client, "echo", TOTAL, CONCURRENCY).await
    });
    report.print();
    let log = worker.stop();
    assert!(
        report.failures.is_empty(),
        "{} failed, first: {:?}\nthe worker's log:\n{log}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(
        report.not_exactly_once.is_empty(),
        "not answered exactly once: {:?}",
        &report.not_exactly_once[..report.not_exactly_once.len().min(20)]
    );
    let runs = std::fs::read_to_string(data.join("logs/111111111111/echo/LATEST.log"))
        .unwrap()
        .matches("START RequestId:")
        .count();
    assert_eq!(
        runs, TOTAL,
        "the function ran {runs} times for {TOTAL} invokes"
    );
    assert!(
        report.cold.len() <= CONCURRENCY,
        "{} cold starts at concurrency {CONCURRENCY}:\n{log}",
        report.cold.len()
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn percentiles_are_nearest_rank() {
    let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
    assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
    assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
    assert_eq!(percentile(&[], 99.0), Duration::ZERO);
}
