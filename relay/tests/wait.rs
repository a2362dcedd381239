//! `POST /v1/messages?wait=DUR`: the answer carries the bot's replies to the
//! message, synchronous and posted, in order; they reach the response
//! endpoint as always. The time to the answer is printed:
//! `cargo test -p botrelay --test wait -- --nocapture`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn send_waiting(relay: &Relay, path: &str, body: &Value) -> (u16, Value, Duration) {
    let started = Instant::now();
    let (status, _, raw) = post(
        &relay.url(path),
        Some(CLIENT_TOKEN),
        body.to_string().into_bytes(),
    )
    .await
    .unwrap();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    (status, body, started.elapsed())
}

/// A bot that answers with two replies and posts a third one `after` later.
async fn chatty_bot(after: Duration) -> (Peer, Arc<Mutex<String>>) {
    let relay_url = Arc::new(Mutex::new(String::new()));
    let url = relay_url.clone();
    let bot = Peer::start(move |r| {
        let conversation = r.body["conversationId"].as_str().unwrap().to_owned();
        let text = r.body["text"].as_str().unwrap_or_default().to_owned();
        let url = url.lock().unwrap().clone();
        let later = format!("later: {text}");
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let body =
                json!({"conversationId": conversation, "type": "text", "payload": {"text": later}});
            let (status, _, _) = post(
                &format!("{url}/v1/bot/messages"),
                Some(BOT_TOKEN),
                body.to_string().into_bytes(),
            )
            .await
            .unwrap();
            assert_eq!(status, 202);
        });
        Answer::json(json!({"responses": [
            {"type": "text", "payload": {"text": format!("first: {text}")}},
            {"type": "choice", "payload": {"text": "second", "options": [1, 2]}}
        ]}))
    })
    .await;
    (bot, relay_url)
}

fn texts(responses: &Value) -> Vec<String> {
    responses
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"]["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_answer_carries_the_sync_and_posted_replies_in_order_on_every_store() {
    let stores: Vec<(&str, Vec<String>)> = vec![
        ("embedded", vec![]),
        ("memory", vec!["--store=memory".into()]),
        (
            "nats",
            common::nats::relay_flags(common::nats::shared(), &common::nats::fresh_prefix()),
        ),
    ];
    for (store, flags) in stores {
        let (bot, relay_url) = chatty_bot(Duration::from_millis(300)).await;
        let endpoint = Peer::start(|_| Answer::ok()).await;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
        *relay_url.lock().unwrap() = relay.url("");
        let (status, body, took) = send_waiting(
            &relay,
            "/v1/messages?wait=2s",
            &message("u", "c", "m1", "hi"),
        )
        .await;
        assert_eq!(status, 200, "{store}: {body}");
        assert_eq!(
            texts(&body["responses"]),
            ["first: hi", "second", "later: hi"],
            "{store}"
        );
        let responses = body["responses"].as_array().unwrap();
        assert_eq!(responses[1]["type"], "choice");
        assert_eq!(responses[1]["payload"]["options"], json!([1, 2]));
        for r in responses {
            let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["createdAt", "id", "payload", "type"], "{store}");
        }
        // The accept answer is all there too.
        assert_eq!(body["message"]["tags"]["id"], "m1");
        assert_eq!(body["conversation"]["tags"]["id"], "c");
        // Answered a quiet second after the last reply, before the deadline.
        assert!(took < Duration::from_millis(1900), "{store}: took {took:?}");
        assert!(
            took >= Duration::from_millis(1300),
            "{store}: took {took:?}"
        );
        // The same replies reach the response endpoint, with the same ids.
        let got = endpoint
            .wait_until("three replies", Duration::from_secs(10), |r| r.len() == 3)
            .await;
        let ids: Vec<&str> = responses
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        let delivered: Vec<&str> = got
            .iter()
            .map(|r| r.body["botpressMessageId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, delivered, "{store}");
    }
}

#[tokio::test]
async fn wait_works_on_the_root_path_and_without_it_the_answer_is_unchanged() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let (status, body, _) =
        send_waiting(&relay, "/?wait=1500ms", &message("u", "c", "m1", "root")).await;
    assert_eq!(status, 200);
    assert_eq!(texts(&body["responses"]), ["echo: root"]);
    let (status, body, _) =
        send_waiting(&relay, "/v1/messages", &message("u", "c", "m2", "plain")).await;
    assert_eq!(status, 200);
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["conversation", "message", "user"],
        "no responses without wait"
    );
}

#[tokio::test]
async fn a_wait_over_the_maximum_or_unreadable_is_refused_naming_wait() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-wait=5s"]).await;
    for (i, query) in ["wait=6s", "wait=soon", "wait=", "wait=10"]
        .iter()
        .enumerate()
    {
        let (status, body, _) = send_waiting(
            &relay,
            &format!("/v1/messages?{query}"),
            &message("u", "c", &format!("m{i}"), "hi"),
        )
        .await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["error"]["code"], "invalid_request");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains("`wait`"), "{query}: {text}");
    }
    let (status, _, _) = send_waiting(
        &relay,
        "/v1/messages?wait=5s",
        &message("u", "c", "ok", "hi"),
    )
    .await;
    assert_eq!(status, 200, "the maximum itself is fine");
    let refused = Relay::start(&bot.url(), &endpoint.url(), &["--max-wait=0s"]).await;
    let (status, body, _) = send_waiting(
        &refused,
        "/v1/messages?wait=1s",
        &message("u", "c", "z", "hi"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-wait 0s")
    );
    // Refused messages are not stored: only "ok" reached the bot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = bot.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["tags"]["messageId"], "ok");
}

#[tokio::test]
async fn with_the_bot_down_the_answer_comes_at_the_deadline_and_a_duplicate_gets_the_first_answer()
{
    let bot_addr = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&format!("http://{bot_addr}/"), &endpoint.url(), &[]).await;
    let (status, body, took) = send_waiting(
        &relay,
        "/v1/messages?wait=1s",
        &message("u", "c", "m1", "hi"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["responses"], json!([]));
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The same messageId again, with wait: the first answer at once.
    let (status, again, took) = send_waiting(
        &relay,
        "/v1/messages?wait=5s",
        &message("u", "c", "m1", "hi"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(500), "{took:?}");
    let mut first = body.clone();
    first.as_object_mut().unwrap().remove("responses");
    assert_eq!(again, first);
    // The message still reaches the bot once it is up, and its reply the endpoint.
    let bot = Peer::start_on(bot_addr, echo).await;
    bot.wait_until("the message", Duration::from_secs(15), |r| r.len() == 1)
        .await;
    endpoint
        .wait_until("the reply", Duration::from_secs(15), |r| r.len() == 1)
        .await;
}

/// The figure for the report: the time from the request to the `?wait`
/// answer with a bot that answers synchronously at once.
#[tokio::test]
async fn time_to_a_waiting_answer() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let mut times = Vec::new();
    for i in 0..10 {
        let (status, body, took) = send_waiting(
            &relay,
            "/v1/messages?wait=5s",
            &message("u", &format!("c{i}"), &format!("m{i}"), "hi"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(texts(&body["responses"]), ["echo: hi"]);
        times.push(took);
    }
    times.sort();
    println!(
        "wait: with a bot answering synchronously, ?wait=5s answered in {} ms median (min {} ms, max {} ms) over 10 requests: the delivery plus the 1 s quiet period",
        times[5].as_millis(),
        times[0].as_millis(),
        times[9].as_millis()
    );
    assert!(times[9] < Duration::from_secs(2));
}

/// With `--store nats` and two replicas, the request waits on one replica
/// while the other may deliver the message, and the bot posts to the other:
/// the replies reach the waiting request all the same.
#[tokio::test]
async fn with_two_nats_replicas_the_replies_seen_elsewhere_reach_the_waiting_request() {
    let prefix = common::nats::fresh_prefix();
    let flags = common::nats::relay_flags(common::nats::shared(), &prefix);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (bot, relay_url) = chatty_bot(Duration::from_millis(200)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let waiting_on = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    let posted_to = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    // The bot posts its later replies to the other replica.
    *relay_url.lock().unwrap() = posted_to.url("");
    // Let the partitions spread over both replicas.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut delivered_by_other = 0;
    for i in 0..8 {
        let (status, body, _) = send_waiting(
            &waiting_on,
            "/v1/messages?wait=3s",
            &message("u", &format!("c{i}"), &format!("m{i}"), "hi"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            texts(&body["responses"]),
            ["first: hi", "second", "later: hi"],
            "conversation c{i}"
        );
        let id = body["message"]["id"].as_str().unwrap();
        let delivered_here = |relay: &Relay| {
            relay.logs().lines().any(|l| {
                l.contains(id)
                    && l.contains("\"message\":\"delivered\"")
                    && l.contains("\"to\":\"bot\"")
            })
        };
        if delivered_here(&posted_to) {
            delivered_by_other += 1;
        } else {
            assert!(delivered_here(&waiting_on), "delivered by neither?");
        }
    }
    println!(
        "wait on nats: {delivered_by_other} of 8 messages were delivered to the bot by the other replica"
    );
    assert!(
        delivered_by_other > 0,
        "no message crossed replicas: the test proved nothing"
    );
}
