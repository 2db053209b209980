//! Provisioned concurrency and worker leases, against a real worker with
//! real microVMs: environments kept ready ahead of invocations, spill-over
//! to on-demand ones, and workers drained at the end of their lease with
//! nothing in flight lost.

use std::time::{Duration, Instant};

use host_services::data_plane::lifecycle::{CreateReason, DestroyReason, LifecycleEvent};
use microvm_tests::lambda_client::LambdaClient;
use microvm_tests::load;
use microvm_tests::worker::{client_runtime, data_dir, lifecycle, RunningWorker};
use microvm_tests::ECHO_WAT;

fn created(events: &[LifecycleEvent], version: &str, why: CreateReason) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.version == version && e.created == Some(why))
        .map(|e| e.environment.clone())
        .collect()
}

fn destroyed(events: &[LifecycleEvent], why: DestroyReason) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.destroyed == Some(why))
        .map(|e| e.environment.clone())
        .collect()
}

/// Polls GetProvisionedConcurrencyConfig until its status is `status`.
async fn wait_for_status(
    client: &LambdaClient,
    function: &str,
    qualifier: &str,
    status: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client
            .provisioned_concurrency(function, qualifier, None)
            .await
            .unwrap();
        if got["Status"] == status {
            return got;
        }
        assert!(Instant::now() < deadline, "never {status}: {got}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn provisioned_environments_are_ready_ahead_and_invocations_above_them_spill_over() {
    const PROVISIONED: u32 = 2;
    const CONCURRENT: usize = 4;
    let data = data_dir("lambda-provisioned");
    let worker = RunningWorker::start(&data, &[], "info");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    client_runtime().block_on(async {
        client.create_wasm_function("pc", &wasm, 10).await.unwrap();
        let version = client.publish_version("pc").await.unwrap();
        let put = client
            .provisioned_concurrency("pc", &version, Some(PROVISIONED))
            .await
            .unwrap();
        assert_eq!(put["RequestedProvisionedConcurrentExecutions"], PROVISIONED);
        let ready = wait_for_status(&client, "pc", &version, "READY").await;
        assert_eq!(
            ready["AvailableProvisionedConcurrentExecutions"],
            PROVISIONED
        );

        let calls: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let client = client.clone();
                let function = format!("pc:{version}");
                tokio::spawn(async move { client.invoke(&function, r#""spin""#.into()).await })
            })
            .collect();
        let mut cold = 0;
        for call in calls {
            let r = call.await.unwrap().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(&r.body[..], br#"{"echo":"spin"}"#);
            cold += usize::from(r.cold_start_ms().is_some());
        }
        assert_eq!(
            cold,
            CONCURRENT - PROVISIONED as usize,
            "only the invocations above the provisioned environments start one"
        );

        client
            .provisioned_concurrency("pc", &version, Some(0))
            .await
            .unwrap();
        let gone = client
            .provisioned_concurrency("pc", &version, None)
            .await
            .unwrap_err();
        assert!(
            gone.contains("404") && gone.contains("ProvisionedConcurrencyConfigNotFound"),
            "{gone}"
        );
        let latest = client
            .provisioned_concurrency("pc", "$LATEST", Some(1))
            .await
            .unwrap_err();
        assert!(
            latest.contains("400") && latest.contains("unpublished"),
            "{latest}"
        );
        // The provisioner trims within a pass or two.
        let deadline = Instant::now() + Duration::from_secs(10);
        while destroyed(
            &lifecycle(&data),
            DestroyReason::ProvisionedConcurrencyChange,
        )
        .len()
            < PROVISIONED as usize
        {
            assert!(Instant::now() < deadline, "{}", worker.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    worker.stop();
    let events = lifecycle(&data);
    let provisioned = created(&events, "1", CreateReason::ProvisionedConcurrency);
    let on_demand = created(&events, "1", CreateReason::NewInvocation);
    assert_eq!(provisioned.len(), PROVISIONED as usize, "{events:#?}");
    assert_eq!(
        on_demand.len(),
        CONCURRENT - PROVISIONED as usize,
        "{events:#?}"
    );
    let trimmed = destroyed(&events, DestroyReason::ProvisionedConcurrencyChange);
    assert!(
        provisioned.iter().all(|e| trimmed.contains(e)),
        "deleting the config stops exactly its environments: {events:#?}"
    );
    assert!(on_demand.iter().all(|e| !trimmed.contains(e)));
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn provisioned_concurrency_is_restored_after_a_restart() {
    let data = data_dir("lambda-provisioned-restart");
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let worker = RunningWorker::start(&data, &[], "info");
    let client = worker.client();
    client_runtime().block_on(async {
        client.create_wasm_function("pc", &wasm, 10).await.unwrap();
        let version = client.publish_version("pc").await.unwrap();
        client
            .provisioned_concurrency("pc", &version, Some(1))
            .await
            .unwrap();
        wait_for_status(&client, "pc", &version, "READY").await;
    });
    worker.stop();
    let worker = RunningWorker::start(&data, &[], "info");
    let client = worker.client();
    client_runtime().block_on(async {
        wait_for_status(&client, "pc", "1", "READY").await;
        let r = client.invoke("pc:1", "{}".into()).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.cold_start_ms(),
            None,
            "a provisioned environment was initialized ahead: {}",
            r.log_tail
        );
    });
    worker.stop();
    let events = lifecycle(&data);
    assert_eq!(
        created(&events, "1", CreateReason::ProvisionedConcurrency).len(),
        2,
        "one before the restart, one after: {events:#?}"
    );
    assert!(created(&events, "1", CreateReason::NewInvocation).is_empty());
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn workers_at_the_end_of_their_lease_drain_and_lose_no_invocation() {
    const LEASE_S: &str = "2";
    const DRAINS: usize = 3;
    let data = data_dir("lambda-lease");
    let worker = RunningWorker::start(
        &data,
        &["--workers", "2", "--worker-lease", LEASE_S],
        "info",
    );
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let mut invokes = 0;
    let started = Instant::now();
    client_runtime().block_on(async {
        client.create_wasm_function("echo", &wasm, 5).await.unwrap();
        while worker.log().matches("drained and exited").count() < DRAINS {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "workers never drained:\n{}",
                worker.log()
            );
            let report = load::run(client.clone(), "echo", 200, 4).await;
            assert!(
                report.failures.is_empty(),
                "{:?}\n{}",
                report.failures,
                worker.log()
            );
            assert!(
                report.not_exactly_once.is_empty(),
                "{:?}",
                report.not_exactly_once
            );
            invokes += report.total;
        }
    });
    let log = worker.stop();
    println!("{invokes} invokes answered exactly once across {DRAINS} worker drains");
    let events = lifecycle(&data);
    let drained = destroyed(&events, DestroyReason::WorkerLeaseExpired);
    assert!(!drained.is_empty(), "{log}");
    // Every environment a drained worker had lived on that worker only.
    for env in &drained {
        let worker_of = env.split("-env-").next().unwrap();
        assert!(
            log.contains(&format!("{worker_of} drained and exited")),
            "{env}: its worker never finished draining\n{log}"
        );
    }
    std::fs::remove_dir_all(&data).unwrap();
}
