//! What holds deliveries back from a target: rate limits, the circuit
//! breaker, a pause by hand (`POST /targets/{bot|response}/{pause|resume}`),
//! and the reachability probes that `GET /targets` reports.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

async fn targets(relay: &Relay) -> Value {
    let (status, _, body) = get(&format!("http://{}/targets", relay.admin))
        .await
        .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Waits until `/targets` satisfies `done`; returns it and when it did.
async fn wait_for_targets(
    relay: &Relay,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (Value, Instant) {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = targets(relay).await;
        if done(&t) {
            return (t, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {t}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn admin_post(
    relay: &Relay,
    path: &str,
    token: Option<&str>,
) -> (u16, http::HeaderMap, Value) {
    let (status, headers, body) = post(&format!("http://{}{path}", relay.admin), token, Vec::new())
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Sends `per_conversation` messages in each of `conversations`, the
/// conversations side by side; message `i` of conversation `c` is `c-i`.
async fn send_many(relay: &std::sync::Arc<Relay>, conversations: usize, per_conversation: usize) {
    let mut senders = Vec::new();
    for c in 0..conversations {
        let relay = relay.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..per_conversation {
                let id = format!("{c}-{i}");
                let (status, body) = relay
                    .send(&message("u", &format!("conv-{c}"), &id, &id))
                    .await;
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
}

/// The deliveries (not probes) the bot received, first arrival of each message.
fn deliveries(received: &[Received]) -> Vec<Received> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|r| !r.is_probe())
        .filter(|r| seen.insert(r.header("webhook-id").to_owned()))
        .cloned()
        .collect()
}

/// Checks that each conversation's messages (`c-i`, from `text`) came in order.
fn assert_in_order(received: &[Received], text: impl Fn(&Value) -> String) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in received {
        let text = text(&r.body);
        let (c, i) = text.split_once('-').unwrap();
        let i: i64 = i.parse().unwrap();
        let previous = last.insert(c.to_owned(), i).unwrap_or(-1);
        assert_eq!(
            i,
            previous + 1,
            "conversation {c}: {i} came after {previous}"
        );
    }
}

/// Checks the arrivals against the limit: in any stretch of them, no more than
/// the burst plus the rate times the stretch's length (and the deliveries of
/// 50 ms more, for the jitter of a busy machine: a receiver that stalls gets
/// what was sent meanwhile at once); returns the rate measured from the first to the last,
/// and from the end of the first burst to the last.
fn assert_under_limit(arrivals: &[Instant], per_second: f64, burst: usize) -> (f64, f64) {
    let jitter = 2.0 + per_second * 0.05;
    for i in 0..arrivals.len() {
        for j in i + 1..arrivals.len() {
            let stretch = (arrivals[j] - arrivals[i]).as_secs_f64();
            let allowed = burst as f64 + per_second * stretch + jitter;
            assert!(
                (j - i + 1) as f64 <= allowed,
                "{} deliveries in {stretch:.3}s, over {per_second}/s with a burst of {burst}",
                j - i + 1
            );
        }
    }
    let last = *arrivals.last().unwrap();
    let overall = (arrivals.len() - 1) as f64 / (last - arrivals[0]).as_secs_f64();
    let steady = (arrivals.len() - 1 - burst) as f64 / (last - arrivals[burst]).as_secs_f64();
    (overall, steady)
}

#[tokio::test]
async fn a_rate_limit_holds_deliveries_to_the_bot_under_it_in_order() {
    const RATE: f64 = 50.0;
    const BURST: usize = 5;
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = std::sync::Arc::new(
        Relay::start(
            &bot.url(),
            &endpoint.url(),
            &["--bot-rate-limit=50", "--bot-rate-burst=5"],
        )
        .await,
    );
    let limit = &targets(&relay).await["bot"]["rateLimit"];
    assert_eq!(limit["perSecond"], 50.0);
    assert_eq!(limit["burst"], 5);
    assert!(targets(&relay).await["response"]["rateLimit"].is_null());

    // 200 messages in 40 conversations, sent faster than the limit.
    let sent = Instant::now();
    send_many(&relay, 40, 5).await;
    let sending = sent.elapsed();
    let received = bot
        .wait_until("every message", WAIT, |r| deliveries(r).len() >= 200)
        .await;
    let delivered = deliveries(&received);
    let arrivals: Vec<Instant> = delivered.iter().map(|r| r.at).collect();
    let (rate, steady) = assert_under_limit(&arrivals, RATE, BURST);
    println!(
        "bot limit 50/s, burst 5: 200 deliveries at {rate:.1}/s overall, {steady:.1}/s after the burst (sent in {:.2}s)",
        sending.as_secs_f64()
    );
    assert!(rate <= RATE * 1.1, "{rate:.1}/s");
    assert!(
        rate >= RATE * 0.5,
        "the limit, not something else, paces them: {rate:.1}/s"
    );
    assert_in_order(&delivered, |b| b["text"].as_str().unwrap().to_owned());
    let waited = relay
        .metric("botrelay_rate_limited_total", &[("target", "bot")])
        .await;
    assert!(
        (100.0..=200.0).contains(&waited),
        "most deliveries waited for the limit: {waited}"
    );
    assert_eq!(
        relay
            .metric("botrelay_rate_limited_total", &[("target", "response")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_rate_limit_of_100_per_second_holds_replies_to_the_response_endpoint() {
    const RATE: f64 = 100.0;
    const BURST: usize = 10;
    let bot = Peer::start(|r| {
        let text = r.body["text"].as_str().unwrap_or_default();
        Answer::json(
            serde_json::json!({"responses": [{"type": "text", "payload": {"text": text}}]}),
        )
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = std::sync::Arc::new(
        Relay::start(
            &bot.url(),
            &endpoint.url(),
            &["--response-rate-limit=100", "--response-rate-burst=10"],
        )
        .await,
    );
    send_many(&relay, 60, 5).await;
    let received = endpoint
        .wait_until("every reply", WAIT, |r| deliveries(r).len() >= 300)
        .await;
    let delivered = deliveries(&received);
    let arrivals: Vec<Instant> = delivered.iter().map(|r| r.at).collect();
    let (rate, steady) = assert_under_limit(&arrivals, RATE, BURST);
    println!(
        "response limit 100/s, burst 10: 300 replies at {rate:.1}/s overall, {steady:.1}/s after the burst"
    );
    assert!(rate <= RATE * 1.1, "{rate:.1}/s");
    assert!(rate >= RATE * 0.5, "{rate:.1}/s");
    assert_in_order(&delivered, |b| {
        b["payload"]["text"].as_str().unwrap().to_owned()
    });
    assert!(
        relay
            .metric("botrelay_rate_limited_total", &[("target", "response")])
            .await
            > 0.0
    );
}

#[tokio::test]
async fn a_dead_bot_opens_the_breaker_and_one_delivery_at_a_time_tries_it_until_it_is_back() {
    let bot_addr = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = std::sync::Arc::new(
        Relay::start(
            &format!("http://{bot_addr}/"),
            &endpoint.url(),
            &[
                "--breaker-failures=5",
                "--breaker-probe-interval=200ms",
                "--breaker-max-probe-interval=800ms",
                // Without the breaker, a lane would fail this often within
                // the first second; with it, attempts not made do not count.
                "--max-attempts=4",
            ],
        )
        .await,
    );
    let t = targets(&relay).await;
    assert_eq!(t["bot"]["state"], "closed");
    assert_eq!(
        relay
            .metric(
                "botrelay_target_state",
                &[("target", "bot"), ("state", "closed")]
            )
            .await,
        1.0
    );

    // Nothing listens on the bot's port: connections are refused.
    let dead = Instant::now();
    send_many(&relay, 10, 3).await;
    let (t, opened) = wait_for_targets(&relay, "the breaker to open", |t| {
        t["bot"]["state"] == "open"
    })
    .await;
    let to_open = opened - dead;
    assert!(
        t["bot"]["consecutiveFailures"].as_u64().unwrap() >= 5,
        "{t}"
    );
    assert_eq!(t["bot"]["pausedByAdmin"], false);
    assert_eq!(t["response"]["state"], "closed");
    for (state, value) in [
        ("open", 1.0),
        ("closed", 0.0),
        ("half_open", 0.0),
        ("paused", 0.0),
    ] {
        assert_eq!(
            relay
                .metric(
                    "botrelay_target_state",
                    &[("target", "bot"), ("state", state)]
                )
                .await,
            value,
            "{state}"
        );
    }
    assert!(
        relay
            .metric(
                "botrelay_target_state_changes_total",
                &[("target", "bot"), ("state", "open")]
            )
            .await
            >= 1.0
    );
    // A JSON log line says the breaker opened and for which target (a field
    // of its own, not hidden by the log's own "target", the Rust module).
    let opened_line = relay
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["state"] == "open" && l["message"] == "deliveries to the target stop");
    let opened_line = opened_line.expect("a log line says the breaker opened");
    assert_eq!(opened_line["to"], "bot", "{opened_line}");

    // The bot comes back failing, slowly: while open, the attempts it gets
    // come one at a time, none while another is under way.
    const SLOW: Duration = Duration::from_millis(100);
    let bot = Peer::start_on(bot_addr, |_| Answer::status(503).after(SLOW)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let tries = bot.received();
    assert!(
        (2..=12).contains(&tries.len()),
        "a probe delivery now and then: {}",
        tries.len()
    );
    for pair in tries.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= SLOW + Duration::from_millis(150),
            "a try {gap:?} after the one before: not one at a time with a wait between"
        );
    }
    let distinct: HashSet<_> = tries.iter().map(|r| r.header("webhook-id")).collect();
    assert!(
        distinct.len() >= 2,
        "the probe delivery moves between lanes"
    );
    let state = targets(&relay).await["bot"]["state"].clone();
    assert!(state == "open" || state == "half_open", "{state}");
    assert_eq!(
        relay
            .metric("botrelay_messages_dead_lettered_total", &[])
            .await,
        0.0
    );

    // Back for good: the next probe delivery closes the breaker, and every
    // message goes, in order.
    let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let taken = taken.clone();
        bot.set(move |r| {
            let id = r.body["tags"]["messageId"].as_str().unwrap_or_default();
            let mut taken = taken.lock().unwrap();
            if !taken.iter().any(|t| t == id) {
                taken.push(id.to_owned());
            }
            Answer::ok()
        });
    }
    let back = Instant::now();
    let (_, closed) = wait_for_targets(&relay, "the breaker to close", |t| {
        t["bot"]["state"] == "closed"
    })
    .await;
    let to_close = closed - back;
    println!(
        "breaker (5 failures, probe wait 200ms doubling to 800ms): dead target to open in {} ms; target back to closed in {} ms",
        to_open.as_millis(),
        to_close.as_millis()
    );
    let deadline = Instant::now() + WAIT;
    while taken.lock().unwrap().len() < 30 {
        assert!(
            Instant::now() < deadline,
            "{} of 30 delivered",
            taken.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last: HashMap<String, i64> = HashMap::new();
    for id in taken.lock().unwrap().iter() {
        let (c, i) = id.split_once('-').unwrap();
        let i: i64 = i.parse().unwrap();
        let previous = last.insert(c.to_owned(), i).unwrap_or(-1);
        assert_eq!(
            i,
            previous + 1,
            "conversation {c}: {i} taken after {previous}"
        );
    }
    assert_eq!(
        relay
            .metric(
                "botrelay_target_state",
                &[("target", "bot"), ("state", "closed")]
            )
            .await,
        1.0
    );
    assert!(relay.logs().contains(r#""state":"closed""#));
    assert_eq!(
        relay
            .metric("botrelay_messages_dead_lettered_total", &[])
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_pause_by_hand_stops_deliveries_survives_a_restart_and_a_resume_delivers_in_order() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let mut relay = Relay::start(&bot.url(), &endpoint.url(), &["--store=embedded"]).await;

    let (status, _, body) = admin_post(&relay, "/targets/bot/pause", Some(CLIENT_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["state"], "paused");
    assert_eq!(body["pausedByAdmin"], true);
    assert!(body["since"].as_str().unwrap().ends_with('Z'));
    for c in 0..2 {
        for i in 0..3 {
            let id = format!("{c}-{i}");
            assert_eq!(
                relay
                    .send(&message("u", &format!("c{c}"), &id, &id))
                    .await
                    .0,
                200
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(bot.received().is_empty(), "nothing goes while paused");
    assert_eq!(
        relay
            .metric(
                "botrelay_target_state",
                &[("target", "bot"), ("state", "paused")]
            )
            .await,
        1.0
    );
    assert!(relay.logs().contains(r#""state":"paused""#));

    assert_eq!(relay.terminate(), Some(0));
    relay.restart().await;
    let t = targets(&relay).await;
    assert_eq!(t["bot"]["state"], "paused", "{t}");
    assert_eq!(t["bot"]["pausedByAdmin"], true);
    assert_eq!(t["response"]["state"], "closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bot.received().is_empty(), "still paused after the restart");

    let (status, _, body) = admin_post(&relay, "/targets/bot/resume", Some(CLIENT_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["state"], "closed");
    assert_eq!(body["pausedByAdmin"], false);
    let received = bot
        .wait_until("every message", WAIT, |r| deliveries(r).len() >= 6)
        .await;
    assert_in_order(&deliveries(&received), |b| {
        b["text"].as_str().unwrap().to_owned()
    });

    // The resume is stored too.
    assert_eq!(relay.terminate(), Some(0));
    relay.restart().await;
    assert_eq!(targets(&relay).await["bot"]["state"], "closed");
}

#[tokio::test]
async fn probes_are_signed_and_marked_and_their_results_are_in_targets_and_metrics() {
    let bot = Peer::start(|_| Answer::status(204)).await;
    let endpoint = Peer::start(|_| Answer::status(404)).await;
    let relay = Relay::start(
        &bot.url(),
        &endpoint.url(),
        // One failed attempt would open the breaker: failed probes must not.
        &["--probe-interval=200ms", "--breaker-failures=1"],
    )
    .await;
    let (t, _) = wait_for_targets(&relay, "a probe of each target", |t| {
        !t["bot"]["lastProbe"].is_null() && !t["response"]["lastProbe"].is_null()
    })
    .await;
    let probe = &t["bot"]["lastProbe"];
    assert_eq!(probe["ok"], true, "{t}");
    assert_eq!(probe["status"], 204);
    assert!(probe["error"].is_null());
    assert!(probe["durationMs"].is_u64());
    assert!(probe["at"].as_str().unwrap().ends_with('Z'));
    let probe = &t["response"]["lastProbe"];
    assert_eq!(probe["ok"], false, "{t}");
    assert_eq!(probe["status"], 404);
    assert_eq!(probe["error"], "answered 404 Not Found");

    let seen = bot.wait_until("two probes", WAIT, |r| r.len() >= 2).await;
    for r in &seen {
        assert!(r.is_probe(), "only probes: {:?}", r.body);
        assert!(r.signed_with(BOT_SECRET));
        assert_eq!(r.body["type"], "botrelay.probe");
        let id = r.body["id"].as_str().unwrap();
        assert!(id.starts_with("probe_"), "{id}");
        assert_eq!(r.header("webhook-id"), id);
        assert!(r.body["createdAt"].as_str().unwrap().ends_with('Z'));
    }
    assert_ne!(seen[0].body["id"], seen[1].body["id"]);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(150),
        "every --probe-interval: {gap:?}"
    );
    let at_endpoint = endpoint
        .wait_until("a probe", WAIT, |r| !r.is_empty())
        .await;
    assert!(at_endpoint[0].is_probe());
    assert!(at_endpoint[0].signed_with(&response_secret()));

    // Probes are counted apart from deliveries, and leave the breaker alone.
    endpoint
        .wait_until("three probes", WAIT, |r| r.len() >= 3)
        .await;
    assert!(
        relay
            .metric(
                "botrelay_probes_total",
                &[("target", "bot"), ("outcome", "ok")]
            )
            .await
            >= 2.0
    );
    assert!(
        relay
            .metric(
                "botrelay_probes_total",
                &[("target", "response"), ("outcome", "failed")]
            )
            .await
            >= 2.0
    );
    assert_eq!(
        relay
            .metric("botrelay_target_reachable", &[("target", "bot")])
            .await,
        1.0
    );
    let text = relay.metrics().await;
    assert!(
        text.contains(r#"botrelay_target_reachable{target="response",endpoint="test"} 0"#),
        "{text}"
    );
    assert_eq!(
        relay.metric("botrelay_delivery_attempts_total", &[]).await,
        0.0
    );
    assert_eq!(targets(&relay).await["response"]["state"], "closed");
    assert_eq!(targets(&relay).await["response"]["consecutiveFailures"], 0);

    // A refused connection has no status, and says so.
    let dead = Relay::start(
        &bot.url(),
        &format!("http://{}/", free_addr()),
        &["--probe-interval=200ms"],
    )
    .await;
    let (t, _) =
        wait_for_targets(&dead, "a probe", |t| !t["response"]["lastProbe"].is_null()).await;
    let probe = &t["response"]["lastProbe"];
    assert_eq!(probe["ok"], false);
    assert!(probe["status"].is_null(), "{t}");
    assert_eq!(probe["error"], "connection refused");
    assert_eq!(
        dead.metric("botrelay_target_reachable", &[("target", "response")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_target_routes_need_the_client_token_and_name_their_method() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let admin = |path: &str| format!("http://{}{path}", relay.admin);

    // GET /targets needs nothing, like /metrics.
    let t = targets(&relay).await;
    for target in ["bot", "response"] {
        let o = &t[target];
        assert_eq!(o["state"], "closed");
        assert_eq!(o["consecutiveFailures"], 0);
        assert_eq!(o["pausedByAdmin"], false);
        assert!(o["since"].is_string());
        assert!(o["lastProbe"].is_null());
        assert!(o["rateLimit"].is_null());
    }

    for path in ["/targets/bot/pause", "/targets/response/resume"] {
        let (status, _, body) = admin_post(&relay, path, None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _, _) = admin_post(&relay, path, Some("wrong")).await;
        assert_eq!(status, 401, "{path}");
        let (status, headers, _) = request(
            "GET",
            &admin(path),
            &[("authorization", &format!("Bearer {CLIENT_TOKEN}"))],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(status, 405, "{path}");
        assert_eq!(headers["allow"], "POST");
    }
    let (status, headers, _) = post(&admin("/targets"), Some(CLIENT_TOKEN), Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET");
    for path in ["/targets/nope/pause", "/targets/bot/stop", "/targets/bot"] {
        let (status, _, _) = admin_post(&relay, path, Some(CLIENT_TOKEN)).await;
        assert_eq!(status, 404, "{path}");
    }
    // Nothing was paused by the refused calls.
    assert_eq!(targets(&relay).await["bot"]["state"], "closed");
    let (status, _, body) = admin_post(&relay, "/targets/response/pause", Some(CLIENT_TOKEN)).await;
    assert_eq!((status, &body["state"]), (200, &Value::from("paused")));
    assert_eq!(targets(&relay).await["response"]["pausedByAdmin"], true);
}

/// CPU time (user and system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command's closing parenthesis; utime and stime
    // are the 14th and 15th of the line, in clock ticks (100 a second).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn messages_held_back_cost_no_cpu_while_they_wait() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // The bot at one delivery every two seconds; the response endpoint paused.
    let relay = std::sync::Arc::new(
        Relay::start(
            &bot.url(),
            &endpoint.url(),
            &["--bot-rate-limit=0.5", "--bot-rate-burst=1"],
        )
        .await,
    );
    admin_post(&relay, "/targets/response/pause", Some(CLIENT_TOKEN)).await;
    send_many(&relay, 20, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_time(relay.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time(relay.pid()) - before;
    let delivered = deliveries(&bot.received()).len();
    println!("40 messages held back by a limit of 0.5/s and a pause: {used:?} of CPU in 3 s");
    assert!(
        (1..=4).contains(&delivered),
        "one delivery every two seconds: {delivered}"
    );
    assert!(
        endpoint.received().is_empty(),
        "the paused endpoint gets nothing"
    );
    assert!(
        used < Duration::from_millis(500),
        "waiting must not spin: {used:?} of CPU in 3 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_tries_a_delivery_as_soon_as_the_target_answers_its_probe() {
    let bot_addr = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = std::sync::Arc::new(
        Relay::start(
            &format!("http://{bot_addr}/"),
            &endpoint.url(),
            &[
                "--breaker-failures=3",
                // Left to itself, the next probing delivery would be a minute away.
                "--breaker-probe-interval=1m",
                "--breaker-max-probe-interval=5m",
                "--probe-interval=300ms",
            ],
        )
        .await,
    );
    send_many(&relay, 3, 2).await;
    wait_for_targets(&relay, "the breaker to open", |t| {
        t["bot"]["state"] == "open"
    })
    .await;

    // The bot comes back: its next reachability probe, not the minute, sends
    // a delivery, which closes the breaker; everything then goes.
    let back = Instant::now();
    let bot = Peer::start_on(bot_addr, |_| Answer::ok()).await;
    let (_, closed) = wait_for_targets(&relay, "the breaker to close", |t| {
        t["bot"]["state"] == "closed"
    })
    .await;
    let to_close = closed - back;
    println!(
        "breaker open with a 1m probe wait, reachability probes every 300ms: bot back to closed in {} ms",
        to_close.as_millis()
    );
    assert!(
        to_close < Duration::from_secs(10),
        "the delivery waited for its own probe wait: {to_close:?}"
    );
    bot.wait_until("the 6 messages", WAIT, |r| {
        r.iter()
            .filter(|r| r.header("botrelay-probe").is_empty())
            .count()
            >= 6
    })
    .await;
    assert!(
        relay
            .logs()
            .contains("the target answers its reachability probe")
    );
}
