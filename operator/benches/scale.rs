//! Scale benchmark: a cold start of N MessagingEndpoints (default 1,000, in 10
//! namespaces) against the test API server, then a takeover by a new leader.
//!
//! 1. cold start: the endpoints exist before the operator starts (as after an
//!    install on a busy cluster, or an operator upgrade); prints the time from
//!    when the operator leads until every endpoint has a status for its
//!    generation (reconciled) and until every one is Ready (the simulated
//!    Deployment controller reports pods ready `BOTRELAY_BENCH_READY_DELAY_MS`
//!    after each Deployment write, default 2,000), the operator's peak RSS
//!    (VmHWM), and the requests it made: applies per owned object, status
//!    writes, event writes and reads per endpoint;
//! 2. takeover: the operator is killed and a new one starts with all N
//!    endpoints in place (what a new leader does); prints the time until it
//!    has reconciled each of them once, its peak RSS and its writes.
//!
//! ```sh
//! cargo bench -p botrelay-operator --bench scale
//! BOTRELAY_BENCH_ENDPOINTS=200 cargo bench -p botrelay-operator --bench scale
//! ```
//!
//! Writes to a real API server are not free: on a real control plane sharing
//! 2 cores (kube-apiserver, kube-controller-manager and etcd), a cold start
//! of 1,000 endpoints that made about 20,000 writes took 93-110 s, about 5 ms
//! a write. The test API server therefore charges each request a cost, served
//! one at a time: `BOTRELAY_BENCH_WRITE_COST_MS` (default 4.5) per write,
//! `BOTRELAY_BENCH_READ_COST_MS` (default 0.5) per get or list; watches are
//! free. This is a model of that machine, not a measurement of it: the times
//! printed are as good as the model; the request counts are exact.
//!
//! The test API server runs in this process (its CPU is not the operator's);
//! the operator is the release binary, with leader election on, as deployed.
//! Target (issue 15): all reconciled within 30 s, peak RSS under 100 MiB.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use botrelay_test_apiserver::{Key, TestApiServer};
use serde_json::json;

// The integration tests' harness: starts the real binary against the server.
#[path = "../tests/support/mod.rs"]
mod support;
use support::{LEASE_NS, Operator};

const NAMESPACES: usize = 10;
/// Quiet logs while measuring; the admin line tells the harness its address.
const LOG_LEVEL: (&str, &str) = ("BOTRELAY_LOG_LEVEL", "warn,botrelay_operator::admin=info");

fn peak_rss_mib(operator: &Operator) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", operator.child.id()))
        .unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn successful_reconciliations(operator: &Operator) -> f64 {
    operator
        .metric("botrelay_operator_reconciliations_total{result=\"success\"}")
        .await
        .unwrap_or(0.0)
}

async fn wait_leading(server: &TestApiServer, identity: &str) {
    let lease = Key::new(
        "coordination.k8s.io",
        "leases",
        LEASE_NS,
        "botrelay-operator",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while server
        .get(&lease)
        .is_none_or(|l| l["spec"]["holderIdentity"] != identity)
    {
        assert!(
            Instant::now() < deadline,
            "{identity} did not start leading"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ready_count(server: &TestApiServer) -> usize {
    server
        .list("botrelay.dev", "messagingendpoints", None)
        .iter()
        .filter(|ep| {
            ep["status"]["observedGeneration"] == ep["metadata"]["generation"]
                && ep["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .count()
}

fn env_number(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Endpoints whose status is for their current generation.
fn reconciled_count(server: &TestApiServer) -> usize {
    server
        .list("botrelay.dev", "messagingendpoints", None)
        .iter()
        .filter(|ep| ep["status"]["observedGeneration"] == ep["metadata"]["generation"])
        .count()
}

async fn wait_until(what: &str, n: usize, count: impl Fn() -> usize, started: Instant) -> Duration {
    let mut last_report = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let done = count();
        if done >= n {
            return started.elapsed();
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {done}/{n} {what} after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "not all endpoints {what} after 900 s"
        );
        // Each look lists every endpoint under the server's lock: not too often.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Requests per kind, summed over the objects of each resource.
fn request_summary(server: &TestApiServer) -> BTreeMap<(String, String), (u64, usize)> {
    let mut summary: BTreeMap<(String, String), (u64, usize)> = BTreeMap::new();
    for ((kind, key), count) in server.object_requests() {
        let entry = summary.entry((key.resource.clone(), kind)).or_default();
        entry.0 += count;
        entry.1 += 1;
    }
    summary
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: only run under bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = env_number("BOTRELAY_BENCH_ENDPOINTS", 1000.0) as usize;
    let write_cost =
        Duration::from_secs_f64(env_number("BOTRELAY_BENCH_WRITE_COST_MS", 4.5) / 1000.0);
    let read_cost =
        Duration::from_secs_f64(env_number("BOTRELAY_BENCH_READ_COST_MS", 0.5) / 1000.0);
    let ready_delay =
        Duration::from_millis(env_number("BOTRELAY_BENCH_READY_DELAY_MS", 2000.0) as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let server = TestApiServer::start().await;
        let crd = serde_json::to_value(botrelay_operator::crd()).unwrap();
        server.install_crd(&crd).unwrap();
        server.set_deployment_ready_delay(ready_delay);
        for i in 0..n {
            let namespace = format!("team-{}", i % NAMESPACES);
            server
                .create(
                    "botrelay.dev",
                    "messagingendpoints",
                    json!({
                        "apiVersion": "botrelay.dev/v1alpha1",
                        "kind": "MessagingEndpoint",
                        "metadata": {"name": format!("ep-{i:04}"), "namespace": namespace},
                        "spec": {
                            "bot": {"url": format!("http://bot-{i}.{namespace}.svc:8080/events")},
                            "responseEndpoint": {"url": "https://backend.example/bot-responses"},
                        },
                    }),
                )
                .unwrap();
        }
        server.set_request_costs(write_cost, read_cost);

        // Phase 1: cold start, timed from when the operator leads (a first
        // replica waits one lease duration after making the Lease).
        let first = Operator::start(&server, "bench-1", &[LOG_LEVEL]);
        wait_leading(&server, "bench-1").await;
        let started = Instant::now();
        let reconciled = wait_until("reconciled", n, || reconciled_count(&server), started).await;
        let all_ready = wait_until("Ready", n, || ready_count(&server), started).await;
        // Let the follow-up reconciles triggered by our own writes settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cold_peak_mib = peak_rss_mib(&first);
        let cold_requests = request_summary(&server);
        let events = server.call_count("create", "events.k8s.io", "events")
            + server.call_count("patch", "events.k8s.io", "events");
        let writes = server.resource_version();
        let changes = server.changes_by_resource();
        drop(first); // SIGKILL: the Lease is not released

        // Phase 2: a new leader takes over N existing endpoints.
        let second = Operator::start(&server, "bench-2", &[LOG_LEVEL]);
        wait_leading(&server, "bench-2").await;
        let leading = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(600);
        while successful_reconciliations(&second).await < n as f64 {
            assert!(Instant::now() < deadline, "the new leader did not reconcile all endpoints in 600 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resynced = leading.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let takeover_peak_mib = peak_rss_mib(&second);
        let mut takeover_changes = server.changes_by_resource();
        for (what, count) in &changes {
            if let Some(after) = takeover_changes.get_mut(what) {
                *after -= count;
            }
        }
        takeover_changes.retain(|what, count| *count > 0 && !what.starts_with("coordination.k8s.io/leases"));
        drop(second);

        println!("scale benchmark: {n} MessagingEndpoints in {NAMESPACES} namespaces");
        println!(
            "  API server model: {:.1} ms a write, {:.1} ms a read, one at a time; pods ready {:.1} s after a Deployment write",
            write_cost.as_secs_f64() * 1000.0,
            read_cost.as_secs_f64() * 1000.0,
            ready_delay.as_secs_f64()
        );
        println!("cold start (endpoints in place, then the operator starts):");
        println!(
            "  all reconciled (status at generation) {:>7.2} s   (target: 30 s)",
            reconciled.as_secs_f64()
        );
        println!("  all Ready                             {:>7.2} s", all_ready.as_secs_f64());
        println!(
            "  operator peak RSS (VmHWM)             {cold_peak_mib:>7.1} MiB (target: 100 MiB)"
        );
        let owned = ["secrets", "services", "persistentvolumeclaims", "deployments"];
        let (applies, objects) = cold_requests
            .iter()
            .filter(|((resource, kind), _)| kind == "apply" && owned.contains(&resource.as_str()))
            .fold((0, 0), |(a, o), (_, (count, objs))| (a + count, o + objs));
        println!(
            "  applies per owned object              {:>7.2}   ({applies} for {objects})",
            applies as f64 / objects as f64
        );
        let per_endpoint = |resource: &str, kind: &str| {
            cold_requests
                .get(&(resource.to_string(), kind.to_string()))
                .map(|(count, _)| *count as f64 / n as f64)
                .unwrap_or(0.0)
        };
        println!(
            "  status writes per endpoint            {:>7.2}",
            per_endpoint("messagingendpoints", "apply")
        );
        println!("  event writes per endpoint             {:>7.2}", events as f64 / n as f64);
        println!("  Secret reads per endpoint             {:>7.2}", per_endpoint("secrets", "get"));
        println!("  requests by resource and kind (count, objects):");
        for ((resource, kind), (count, objs)) in &cold_requests {
            println!("    {resource:<24} {kind:<12} {count:>7} {objs:>7}");
        }
        println!("  stored changes                        {writes:>7}");
        println!("takeover (a new leader with {n} endpoints in place):");
        println!(
            "  all reconciled once after             {:>7.2} s from leading",
            resynced.as_secs_f64()
        );
        println!("  operator peak RSS (VmHWM)             {takeover_peak_mib:>7.1} MiB");
        println!(
            "  changes meanwhile (Lease aside)       {:>7}",
            takeover_changes.values().sum::<usize>()
        );
        for (what, count) in takeover_changes {
            println!("    {what:<48} {count}");
        }
    });
}
