//! Scale benchmark: N MessagingEndpoints (default 1,000) against the test API
//! server. Prints the time from the first create until every endpoint has a
//! Ready status for its generation, and the operator's peak RSS (VmHWM).
//!
//!     cargo bench -p botrelay-operator --bench scale
//!     BOTRELAY_BENCH_ENDPOINTS=200 cargo bench -p botrelay-operator --bench scale
//!
//! The test API server runs in this process (its CPU is not the operator's);
//! the operator is the release binary, with leader election on, as deployed.
//! Target (issue 3): all reconciled within 60 s, peak RSS under 100 MiB.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use botrelay_test_apiserver::TestApiServer;
use serde_json::json;

const NAMESPACES: usize = 10;

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
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
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: only run under bench.
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
        let dir = std::env::temp_dir().join(format!("botrelay-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, "default").unwrap();
        let admin = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut operator = Command::new(env!("CARGO_BIN_EXE_botrelay-operator"))
            .env("KUBECONFIG", &kubeconfig)
            .env("BOTRELAY_ADMIN_LISTEN", &admin)
            .env("BOTRELAY_LOG_LEVEL", "warn")
            .env("POD_NAMESPACE", "botrelay-system")
            .env("POD_NAME", "bench")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start botrelay-operator");
        let pid = operator.id();

        // Wait until the operator leads (its Lease names it).
        let lease = botrelay_test_apiserver::Key::new(
            "coordination.k8s.io",
            "leases",
            "botrelay-system",
            "botrelay-operator",
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while server
            .get(&lease)
            .is_none_or(|l| l["spec"]["holderIdentity"] != "bench")
        {
            assert!(Instant::now() < deadline, "operator did not start leading");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_kib = vm_hwm_kib(pid).unwrap_or(0);

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
        loop {
            let ready = ready_count(&server);
            if ready == n {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  {ready}/{n} ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            assert!(Instant::now() < deadline, "not all endpoints ready after 600 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all_ready = started.elapsed();
        // Let the follow-up reconciles triggered by our own writes settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peak_kib = vm_hwm_kib(pid).unwrap_or(0);
        let objects = server.resource_version();
        let changes = server.changes_by_resource();
        let _ = operator.kill();
        let _ = operator.wait();

        println!("scale benchmark: {n} MessagingEndpoints in {NAMESPACES} namespaces");
        println!(
            "  created in                       {:>8.2} s",
            created.as_secs_f64()
        );
        println!(
            "  all Ready (status written) after {:>8.2} s   (target: 60 s)",
            all_ready.as_secs_f64()
        );
        println!(
            "  throughput                       {:>8.1} endpoints/s",
            n as f64 / all_ready.as_secs_f64()
        );
        println!(
            "  operator peak RSS (VmHWM)        {:>8.1} MiB (idle before load: {:.1} MiB; target: 100 MiB)",
            peak_kib as f64 / 1024.0,
            idle_kib as f64 / 1024.0
        );
        println!("  API server writes (resourceVersion) {objects}");
        for (what, count) in changes {
            println!("    {what:<48} {count}");
        }
    });
}
