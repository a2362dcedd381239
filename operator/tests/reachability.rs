//! The `BotReachable` and `ResponseEndpointReachable` conditions: the real
//! operator binary reads each ready relay's `GET /targets` (served here by a
//! stand-in for the relays' admin ports, which counts what it serves) and
//! writes the conditions when, and only when, a verdict changes.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Stand-in for the relays' admin ports: `GET /<namespace>/<name>/targets`
/// answers the page set for that endpoint (404 when none), and counts.
#[derive(Clone, Default)]
struct Relays {
    pages: Arc<Mutex<HashMap<String, (u16, Value)>>>,
    served: Arc<Mutex<HashMap<String, u64>>>,
}

impl Relays {
    async fn start() -> (Relays, String) {
        let relays = Relays::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = relays.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut read = 0;
                    while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..read]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    *state
                        .served
                        .lock()
                        .unwrap()
                        .entry(path.clone())
                        .or_default() += 1;
                    let (code, body) = state
                        .pages
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or((404, json!({"error": {"code": "not_found"}})));
                    let body = body.to_string();
                    let answer = format!(
                        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (relays, base)
    }

    fn set(&self, endpoint: &str, code: u16, page: Value) {
        self.pages
            .lock()
            .unwrap()
            .insert(format!("/{NS}/{endpoint}/targets"), (code, page));
    }

    fn served(&self, endpoint: &str) -> u64 {
        self.served
            .lock()
            .unwrap()
            .get(&format!("/{NS}/{endpoint}/targets"))
            .copied()
            .unwrap_or(0)
    }
}

fn target(state: &str, probe: Value) -> Value {
    json!({"state": state, "consecutiveFailures": 0, "pausedByAdmin": state == "paused",
           "since": "2026-12-04T10:00:00Z", "lastProbe": probe, "rateLimit": null})
}

fn probe_ok(at: u32) -> Value {
    json!({"at": format!("2026-12-04T10:00:{at:02}Z"), "ok": true, "status": 200, "error": null, "durationMs": at})
}

fn probe_failed(status: Option<u16>, error: &str) -> Value {
    json!({"at": "2026-12-04T10:00:00Z", "ok": false, "status": status, "error": error, "durationMs": 3})
}

fn reach(ep: &Value, type_: &str) -> Option<(String, String, String)> {
    let c = condition(ep, type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

fn status_writes(server: &botrelay_test_apiserver::TestApiServer) -> u64 {
    server.call_count("patch", "botrelay.dev", "messagingendpoints/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachability_conditions_follow_the_relays_and_are_written_only_on_change() {
    let server = start_server().await;
    let (relays, base) = Relays::start().await;
    relays.set(
        "support",
        200,
        json!({"bot": target("closed", probe_ok(1)),
               "response": target("closed", probe_failed(Some(404), "answered 404 Not Found"))}),
    );
    let operator = Operator::start(
        &server,
        "op-1",
        &[
            (
                "BOTRELAY_RELAY_ADMIN_URL",
                &format!("{base}/{{namespace}}/{{name}}"),
            ),
            ("BOTRELAY_RELAY_POLL_INTERVAL", "200ms"),
        ],
    );
    let created = Instant::now();
    create_endpoint(&server, "support", json!({}));

    // A wrong response URL shows without any message sent.
    let ep = eventually(20, "the probe verdicts", &operator, || {
        let ep = server.get(&ep_key("support"))?;
        (reach(&ep, "ResponseEndpointReachable")?.1 == "ProbeFailed").then_some(ep)
    })
    .await;
    println!(
        "endpoint created -> ResponseEndpointReachable=False in the status: {:?} (poll every 200ms)",
        created.elapsed()
    );
    assert_eq!(
        reach(&ep, "BotReachable").unwrap(),
        (
            "True".into(),
            "ProbeSucceeded".into(),
            "http://support-bot.shop.svc:8080/events answers".into()
        )
    );
    assert_eq!(
        reach(&ep, "ResponseEndpointReachable").unwrap(),
        (
            "False".into(),
            "ProbeFailed".into(),
            "probe of https://backend.example/bot-responses: answered 404 Not Found".into()
        )
    );
    let gen_ = ep["metadata"]["generation"].clone();
    assert_eq!(
        condition(&ep, "BotReachable").unwrap()["observedGeneration"],
        gen_
    );

    // Polls that find the same verdicts (new probe times and durations) write nothing.
    let writes = status_writes(&server);
    let polls = relays.served("support");
    for at in 2..12 {
        relays.set(
            "support",
            200,
            json!({"bot": target("closed", probe_ok(at)),
                   "response": target("closed", probe_failed(Some(404), "answered 404 Not Found"))}),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let polled = relays.served("support") - polls;
    assert!(polled >= 5, "the relay was read {polled} times in 2 s");
    assert_eq!(
        status_writes(&server),
        writes,
        "{polled} polls with the same verdicts wrote the status"
    );

    // The bot's circuit opens: the condition says so, and names the last probe.
    let changed = Instant::now();
    relays.set(
        "support",
        200,
        json!({"bot": target("open", probe_failed(None, "connection refused")),
               "response": target("closed", probe_ok(1))}),
    );
    let ep = eventually(20, "CircuitOpen", &operator, || {
        let ep = server.get(&ep_key("support"))?;
        (reach(&ep, "BotReachable")?.1 == "CircuitOpen").then_some(ep)
    })
    .await;
    println!(
        "relay state changed -> condition written: {:?}",
        changed.elapsed()
    );
    let (status, _, message) = reach(&ep, "BotReachable").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.ends_with("last probe: connection refused"),
        "{message}"
    );
    assert_eq!(
        reach(&ep, "ResponseEndpointReachable").unwrap().1,
        "ProbeSucceeded"
    );

    // Paused by hand.
    relays.set(
        "support",
        200,
        json!({"bot": target("paused", Value::Null), "response": target("closed", probe_ok(1))}),
    );
    let ep = eventually(20, "PausedByHand", &operator, || {
        let ep = server.get(&ep_key("support"))?;
        (reach(&ep, "BotReachable")?.1 == "PausedByHand").then_some(ep)
    })
    .await;
    assert!(
        reach(&ep, "BotReachable")
            .unwrap()
            .2
            .contains("POST /targets/bot/resume")
    );

    // A relay that cannot say (an old image without /targets): Unknown.
    relays.set("support", 404, json!({"error": {"code": "not_found"}}));
    let ep = eventually(20, "RelayNotReporting", &operator, || {
        let ep = server.get(&ep_key("support"))?;
        (reach(&ep, "BotReachable")?.1 == "RelayNotReporting").then_some(ep)
    })
    .await;
    assert_eq!(reach(&ep, "BotReachable").unwrap().0, "Unknown");
    assert!(
        reach(&ep, "ResponseEndpointReachable")
            .unwrap()
            .2
            .contains("404")
    );
    // The other conditions are untouched by all this.
    assert_eq!(condition(&ep, "Ready").unwrap()["status"], "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_without_ready_pods_are_not_polled() {
    let server = start_server().await;
    server.simulate_deployments(false);
    let (relays, base) = Relays::start().await;
    relays.set(
        "cold",
        200,
        json!({"bot": target("closed", probe_ok(1)), "response": target("closed", probe_ok(1))}),
    );
    let operator = Operator::start(
        &server,
        "op-1",
        &[
            (
                "BOTRELAY_RELAY_ADMIN_URL",
                &format!("{base}/{{namespace}}/{{name}}"),
            ),
            ("BOTRELAY_RELAY_POLL_INTERVAL", "100ms"),
        ],
    );
    create_endpoint(&server, "cold", json!({}));
    let ep = wait_reason(&server, &operator, "cold", "RelayNotReady").await;
    assert_eq!(reach(&ep, "BotReachable").unwrap().1, "NotChecked");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        relays.served("cold"),
        0,
        "a relay without ready pods was read"
    );
    // Its pod comes up: it is read, and the conditions follow.
    report_one_pod_ready(&server, "cold-relay");
    eventually(20, "ProbeSucceeded", &operator, || {
        let ep = server.get(&ep_key("cold"))?;
        (reach(&ep, "BotReachable")?.1 == "ProbeSucceeded").then_some(ep)
    })
    .await;
    assert!(relays.served("cold") > 0);
}
