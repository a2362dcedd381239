//! W3C Trace Context: a client's `traceparent` reaches the bot and the
//! response endpoint with the same trace id and new span ids, on every store
//! and across a restart; an invalid one is ignored. The fraction of
//! deliveries that carry the right trace id is printed:
//! `cargo test -p botrelay --test trace_context -- --nocapture`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `(trace id, span id, flags)` of a valid version-00 `traceparent`.
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent:?}");
    assert_eq!(fields[0], "00");
    assert!(fields[1].len() == 32 && fields[2].len() == 16 && fields[3].len() == 2);
    assert!(fields[1..].iter().all(|f| {
        f.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }));
    (fields[1].into(), fields[2].into(), fields[3].into())
}

async fn send_traced(relay: &Relay, body: &Value, headers: &[(&str, &str)]) -> u16 {
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let (status, _, _) = request(
        "POST",
        &relay.url("/v1/messages"),
        &all,
        body.to_string().into_bytes(),
    )
    .await
    .unwrap();
    status
}

/// The store flags of each store: the default embedded store, memory, and
/// NATS (its server as for `tests/nats.rs`).
fn stores() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("embedded", vec![]),
        ("memory", vec!["--store=memory".to_string()]),
        (
            "nats",
            common::nats::relay_flags(common::nats::shared(), &common::nats::fresh_prefix()),
        ),
    ]
}

#[tokio::test]
async fn the_clients_trace_reaches_the_bot_and_the_response_endpoint_on_every_store() {
    for (store, flags) in stores() {
        let bot = Peer::start(echo).await;
        let endpoint = Peer::start(|_| Answer::ok()).await;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
        let status = send_traced(
            &relay,
            &message("u", "c-trace", "m1", "hi"),
            &[("traceparent", PARENT), ("tracestate", "vendor=abc,x=1")],
        )
        .await;
        assert_eq!(status, 200, "{store}");
        let at_bot = bot
            .wait_until("the message", Duration::from_secs(15), |r| r.len() == 1)
            .await;
        let at_endpoint = endpoint
            .wait_until("the reply", Duration::from_secs(15), |r| r.len() == 1)
            .await;
        let (bot_trace, bot_span, flags) = parts(at_bot[0].header("traceparent"));
        let (reply_trace, reply_span, _) = parts(at_endpoint[0].header("traceparent"));
        assert_eq!(
            (bot_trace.as_str(), flags.as_str()),
            (TRACE_ID, "01"),
            "{store}"
        );
        assert_eq!(
            reply_trace, TRACE_ID,
            "{store}: the reply is in the same trace"
        );
        let spans: HashSet<_> = ["00f067aa0ba902b7", bot_span.as_str(), reply_span.as_str()]
            .into_iter()
            .collect();
        assert_eq!(spans.len(), 3, "{store}: a new span per hop");
        assert_eq!(at_bot[0].header("tracestate"), "vendor=abc,x=1");
        assert_eq!(at_endpoint[0].header("tracestate"), "vendor=abc,x=1");
        // The signature still covers the body as before.
        assert!(at_bot[0].signed_with(BOT_SECRET));
        // Log lines about the message carry the trace id.
        let logs = relay.logs();
        assert!(
            logs.lines()
                .any(|l| l.contains("\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"")),
            "{store}: no log line with the trace id:\n{logs}"
        );
    }
}

#[tokio::test]
async fn each_attempt_is_a_new_span_of_the_same_trace() {
    let mut failures = 2;
    let bot = Peer::start(move |r| {
        if failures > 0 {
            failures -= 1;
            Answer::status(503)
        } else {
            echo(r)
        }
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let status = send_traced(
        &relay,
        &message("u", "c", "m1", "hi"),
        &[("traceparent", PARENT)],
    )
    .await;
    assert_eq!(status, 200);
    let got = bot
        .wait_until("three attempts", Duration::from_secs(15), |r| r.len() == 3)
        .await;
    let spans: HashSet<String> = got
        .iter()
        .map(|r| {
            let (trace, span, _) = parts(r.header("traceparent"));
            assert_eq!(trace, TRACE_ID);
            span
        })
        .collect();
    assert_eq!(spans.len(), 3, "one span per attempt");
}

#[tokio::test]
async fn an_invalid_traceparent_is_ignored_and_a_trace_started() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    for (i, bad) in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ]
    .iter()
    .enumerate()
    {
        let status = send_traced(
            &relay,
            &message("u", &format!("c{i}"), &format!("m{i}"), "hi"),
            &[("traceparent", bad), ("tracestate", "a=1")],
        )
        .await;
        assert_eq!(status, 200, "never a 400 for a trace context");
    }
    // No traceparent at all: a trace too.
    assert_eq!(relay.send(&message("u", "c9", "m9", "hi")).await.0, 200);
    let at_bot = bot
        .wait_until("four messages", Duration::from_secs(15), |r| r.len() == 4)
        .await;
    let at_endpoint = endpoint
        .wait_until("four replies", Duration::from_secs(15), |r| r.len() == 4)
        .await;
    let mut traces = HashSet::new();
    for r in &at_bot {
        let (trace, _, _) = parts(r.header("traceparent"));
        assert_ne!(trace, TRACE_ID);
        assert_eq!(
            r.header("tracestate"),
            "",
            "no state without a valid parent"
        );
        // The reply of that message is in the same, new trace.
        let conversation = r.body["conversationId"].as_str().unwrap();
        let reply = at_endpoint
            .iter()
            .find(|e| e.body["botpressConversationId"] == conversation)
            .unwrap();
        assert_eq!(parts(reply.header("traceparent")).0, trace);
        traces.insert(trace);
    }
    assert_eq!(traces.len(), 4, "a trace of its own per message");
}

#[tokio::test]
async fn a_bots_message_takes_its_own_traceparent_or_the_conversations_latest() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    assert_eq!(
        send_traced(
            &relay,
            &message("u", "c", "m1", "hi"),
            &[("traceparent", PARENT)]
        )
        .await,
        200
    );
    let got = bot
        .wait_until("the message", Duration::from_secs(15), |r| r.len() == 1)
        .await;
    let conversation = got[0].body["conversationId"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {BOT_TOKEN}");
    let body =
        json!({"conversationId": conversation, "type": "text", "payload": {"text": "later"}});
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    for headers in [vec![], vec![("traceparent", own)]] {
        let mut all = vec![("authorization", auth.as_str())];
        all.extend(headers);
        let (status, _, _) = request(
            "POST",
            &relay.url("/v1/bot/messages"),
            &all,
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status, 202);
    }
    let got = endpoint
        .wait_until("two bot messages", Duration::from_secs(15), |r| {
            r.len() == 2
        })
        .await;
    assert_eq!(parts(got[0].header("traceparent")).0, TRACE_ID);
    let (trace, span, _) = parts(got[1].header("traceparent"));
    assert_eq!(trace, "11111111111111111111111111111111");
    assert_ne!(span, "2222222222222222");
}

#[tokio::test]
async fn the_trace_survives_a_restart_while_the_message_waits() {
    // The bot is down: the message waits in the store.
    let bot_addr = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let mut relay = Relay::start(&format!("http://{bot_addr}/"), &endpoint.url(), &[]).await;
    assert_eq!(
        send_traced(
            &relay,
            &message("u", "c", "m1", "hi"),
            &[("traceparent", PARENT), ("tracestate", "k=v")]
        )
        .await,
        200
    );
    relay.kill();
    relay.restart().await;
    let bot = Peer::start_on(bot_addr, echo).await;
    let got = bot
        .wait_until("the message", Duration::from_secs(15), |r| !r.is_empty())
        .await;
    assert_eq!(parts(got[0].header("traceparent")).0, TRACE_ID);
    assert_eq!(got[0].header("tracestate"), "k=v");
    let replies = endpoint
        .wait_until("the reply", Duration::from_secs(15), |r| !r.is_empty())
        .await;
    assert_eq!(parts(replies[0].header("traceparent")).0, TRACE_ID);
}

/// The figure for the report: of many messages with their own trace, the
/// fraction of deliveries (to the bot and to the response endpoint) that
/// carried the right trace id.
#[tokio::test]
async fn fraction_of_deliveries_with_the_right_trace_id() {
    const N: usize = 200;
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let trace_of = |i: usize| format!("{:032x}", 0xabc0000 + i);
    for i in 0..N {
        let parent = format!("00-{}-00f067aa0ba902b7-01", trace_of(i));
        let status = send_traced(
            &relay,
            &message("u", &format!("c{i}"), &format!("m{i}"), &i.to_string()),
            &[("traceparent", &parent)],
        )
        .await;
        assert_eq!(status, 200);
    }
    let at_bot = bot
        .wait_until("all messages", Duration::from_secs(30), |r| r.len() >= N)
        .await;
    let at_endpoint = endpoint
        .wait_until("all replies", Duration::from_secs(30), |r| r.len() >= N)
        .await;
    let right = |r: &Received, text: &str| {
        let i: usize = text.trim_start_matches("echo: ").parse().unwrap();
        parts(r.header("traceparent")).0 == trace_of(i)
    };
    let good = at_bot
        .iter()
        .filter(|r| right(r, r.body["text"].as_str().unwrap()))
        .count()
        + at_endpoint
            .iter()
            .filter(|r| right(r, r.body["payload"]["text"].as_str().unwrap()))
            .count();
    let total = at_bot.len() + at_endpoint.len();
    println!(
        "trace context: {good}/{total} deliveries carried the right trace id ({:.1}%)",
        100.0 * good as f64 / total as f64
    );
    assert_eq!(good, total);
}
