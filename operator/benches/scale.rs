//! Scale benchmark: N MessagingEndpoints (default 1,000) against the test API
//! server, in two phases:
//!
//! 1. load: the endpoints are created while the operator runs; prints the time
//!    from the first create until every endpoint has a Ready status for its
//!    generation, and the operator's peak RSS (VmHWM);
//! 2. takeover: the operator is killed and a new one starts with all N
//!    endpoints in place (what a new leader does); prints the time until it
//!    has reconciled each of them once, and its peak RSS.
//!
//! ```sh
//! cargo bench -p botrelay-operator --bench scale
//! BOTRELAY_BENCH_ENDPOINTS=200 cargo bench -p botrelay-operator --bench scale
//! ```
//!
//! The test API server runs in this process (its CPU is not the operator's);
//! the operator is the release binary, with leader election on, as deployed.
//! Target (issue 3): all reconciled within 60 s, peak RSS under 100 MiB.

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

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: only run under bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: usize = std::env::var("BOTRELAY_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let server = TestApiServer::start().await;

        // Phase 1: load.
        let first = Operator::start(&server, "bench-1", &[LOG_LEVEL]);
        wait_leading(&server, "bench-1").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_mib = peak_rss_mib(&first);
        let started = Instant::now();
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
        let created = started.elapsed();
        let mut last_report = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(600);
        while ready_count(&server) < n {
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("  {}/{n} ready after {:.1} s", ready_count(&server), started.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            assert!(Instant::now() < deadline, "not all endpoints ready after 600 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all_ready = started.elapsed();
        // Let the follow-up reconciles triggered by our own writes settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let load_peak_mib = peak_rss_mib(&first);
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
        let takeover_writes = server.resource_version() - writes;
        let mut takeover_changes = server.changes_by_resource();
        for (what, count) in &changes {
            if let Some(after) = takeover_changes.get_mut(what) {
                *after -= count;
            }
        }
        takeover_changes.retain(|_, count| *count > 0);

        drop(second);
        println!("scale benchmark: {n} MessagingEndpoints in {NAMESPACES} namespaces");
        println!("load (endpoints created while the operator runs):");
        println!("  created in                         {:>8.2} s", created.as_secs_f64());
        println!(
            "  all Ready (status written) after   {:>8.2} s   (target: 60 s)",
            all_ready.as_secs_f64()
        );
        println!(
            "  throughput                         {:>8.1} endpoints/s",
            n as f64 / all_ready.as_secs_f64()
        );
        println!(
            "  operator peak RSS (VmHWM)          {load_peak_mib:>8.1} MiB (idle before load: {idle_mib:.1} MiB; target: 100 MiB)"
        );
        println!("  API server writes                  {writes:>8}");
        for (what, count) in &changes {
            println!("    {what:<48} {count}");
        }
        println!("takeover (a new leader with {n} endpoints in place):");
        println!(
            "  all reconciled once after          {:>8.2} s from leading",
            resynced.as_secs_f64()
        );
        println!("  operator peak RSS (VmHWM)          {takeover_peak_mib:>8.1} MiB");
        println!("  API server writes meanwhile        {takeover_writes:>8}");
        for (what, count) in takeover_changes {
            println!("    {what:<48} {count}");
        }
    });
}
