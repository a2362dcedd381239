//! Delivery: order per conversation, retries, Retry-After, timeouts, dead
//! letters and their redrive, back-pressure.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// The caller message ids (bot) or echoed texts (endpoint) of one conversation, in arrival order, first arrival only.
fn first_arrivals(
    received: &[Received],
    conversation: impl Fn(&Value) -> String,
    item: impl Fn(&Value) -> String,
) -> HashMap<String, Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut by_conversation: HashMap<String, Vec<String>> = HashMap::new();
    for r in received {
        let it = item(&r.body);
        if seen.insert(it.clone()) {
            by_conversation
                .entry(conversation(&r.body))
                .or_default()
                .push(it);
        }
    }
    by_conversation
}

#[tokio::test]
async fn order_holds_per_conversation_under_concurrency_and_failures() {
    const CONVERSATIONS: usize = 8;
    const PER_CONVERSATION: usize = 25;
    // The bot fails one request in four and the endpoint one in three: retries
    // must not let a later message overtake an earlier one.
    let n = Arc::new(AtomicUsize::new(0));
    let bot = {
        let n = n.clone();
        Peer::start(move |r| {
            if n.fetch_add(1, Ordering::Relaxed) % 4 == 3 {
                Answer::status(500)
            } else {
                echo(r)
            }
        })
        .await
    };
    let m = Arc::new(AtomicUsize::new(0));
    let endpoint = {
        let m = m.clone();
        Peer::start(move |_| {
            if m.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
                Answer::status(503)
            } else {
                Answer::ok()
            }
        })
        .await
    };
    let relay = Arc::new(
        Relay::start(
            &bot.url(),
            &endpoint.url(),
            &["--retry-initial-backoff=5ms", "--retry-max-backoff=20ms"],
        )
        .await,
    );

    let mut senders = Vec::new();
    for c in 0..CONVERSATIONS {
        let relay = relay.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..PER_CONVERSATION {
                let (status, _) = relay
                    .send(&message(
                        "u",
                        &format!("conv-{c}"),
                        &format!("{c}-{i}"),
                        &format!("{c}-{i}"),
                    ))
                    .await;
                assert_eq!(status, 200);
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let total = CONVERSATIONS * PER_CONVERSATION;
    let replies = endpoint
        .wait_until("every reply", WAIT, |r| {
            r.iter()
                .filter(|x| x.body["payload"]["text"].is_string())
                .map(|x| x.header("webhook-id").to_owned())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= total
        })
        .await;
    let expected = |c: usize| {
        (0..PER_CONVERSATION)
            .map(|i| format!("{c}-{i}"))
            .collect::<Vec<_>>()
    };

    let at_bot = first_arrivals(
        &bot.received(),
        |b| b["tags"]["conversationId"].as_str().unwrap().into(),
        |b| b["tags"]["messageId"].as_str().unwrap().into(),
    );
    let at_endpoint = first_arrivals(
        &replies,
        |b| b["conversationId"].as_str().unwrap().into(),
        |b| {
            b["payload"]["text"]
                .as_str()
                .unwrap()
                .trim_start_matches("echo: ")
                .into()
        },
    );
    for c in 0..CONVERSATIONS {
        let key = format!("conv-{c}");
        assert_eq!(at_bot[&key], expected(c), "bot order of {key}");
        assert_eq!(at_endpoint[&key], expected(c), "endpoint order of {key}");
    }
    // Stronger: counting every attempt, retries included, no message of a
    // conversation is sent again once the next one went out.
    let mut last: HashMap<String, usize> = HashMap::new();
    for r in bot.received() {
        assert!(r.signed_with(BOT_SECRET));
        let conversation = r.body["tags"]["conversationId"]
            .as_str()
            .unwrap()
            .to_owned();
        let index: usize = r.body["tags"]["messageId"]
            .as_str()
            .unwrap()
            .split('-')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let previous = last.insert(conversation.clone(), index).unwrap_or(0);
        assert!(
            index >= previous,
            "{conversation}: message {index} sent after {previous}"
        );
    }
    let retries = relay.metric("botrelay_delivery_retries_total", &[]).await;
    assert!(retries > 0.0, "failures were retried");
}

#[tokio::test]
async fn a_response_endpoint_that_fails_then_recovers_gets_everything_with_stable_ids() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::status(503).header("retry-after", "1")).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    for i in 0..3 {
        assert_eq!(
            relay
                .send(&message("u", "c", &format!("m{i}"), &format!("t{i}")))
                .await
                .0,
            200
        );
    }
    // The first reply is retried (honouring Retry-After: 1s) and holds back the others.
    let failing = endpoint
        .wait_until("two attempts", WAIT, |r| r.len() >= 2)
        .await;
    assert_eq!(
        failing[0].header("webhook-id"),
        failing[1].header("webhook-id"),
        "webhook-id is stable across retries"
    );
    assert_eq!(failing[0].body, failing[1].body);
    assert!(!failing[0].header("webhook-timestamp").is_empty());
    let gap = failing[1].at - failing[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After honoured: {gap:?}"
    );
    assert!(
        failing
            .iter()
            .all(|r| r.body["payload"]["text"] == "echo: t0"),
        "later replies wait for the first"
    );

    endpoint.set(|_| Answer::ok());
    let before = endpoint.received().len();
    let got = endpoint
        .wait_until("all replies after recovery", WAIT, |r| {
            r.len() >= before + 3
        })
        .await;
    let texts: Vec<_> = got[before - 1..]
        .iter()
        .map(|r| r.body["payload"]["text"].as_str().unwrap().to_owned())
        .collect();
    // The first message may be attempted once more before the endpoint recovers.
    let mut deduped = texts.clone();
    deduped.dedup();
    assert_eq!(deduped, ["echo: t0", "echo: t1", "echo: t2"]);
    // The endpoint has the last reply a moment before the relay reads its answer.
    let delivered = relay
        .wait_for_metric(
            "botrelay_messages_delivered_total",
            &[("target", "response")],
            |v| v >= 3.0,
        )
        .await;
    assert_eq!(delivered, 3.0);
    let metrics = relay.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "botrelay_delivery_attempts_total",
            &[("target", "response"), ("outcome", "http_error")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn an_unreadable_answer_of_the_bot_is_counted_and_not_sent_again() {
    let bot = Peer::start(|r| {
        if r.body["tags"]["messageId"] == "unreadable" {
            Answer::json(serde_json::json!({"responses": "not a list"}))
        } else {
            echo(r)
        }
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    relay.send(&message("u", "c", "unreadable", "x")).await;
    relay.send(&message("u", "c", "readable", "x")).await;
    // In order: once the second message's reply arrives, the first is done.
    endpoint
        .wait_until("the readable reply", WAIT, |r| r.len() == 1)
        .await;
    assert_eq!(
        relay
            .metric("botrelay_unreadable_bot_answers_total", &[])
            .await,
        1.0
    );
    // The bot took the message whose answer was unreadable: it is not sent again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bot.received().len(), 2);
    assert_eq!(endpoint.received().len(), 1);
}

#[tokio::test]
async fn answers_too_large_to_read_still_count_as_delivered() {
    // Over the 4 MiB the relay reads of an answer.
    let huge = || " ".repeat(5 << 20);
    let bot = Peer::start(move |r| {
        if r.body["tags"]["messageId"] == "huge" {
            Answer {
                body: huge(),
                ..Answer::ok()
            }
        } else {
            echo(r)
        }
    })
    .await;
    let endpoint = Peer::start(move |_| Answer {
        body: huge(),
        ..Answer::ok()
    })
    .await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    relay.send(&message("u", "c", "huge", "x")).await;
    relay.send(&message("u", "c", "small", "x")).await;
    endpoint
        .wait_until("the small one's reply", WAIT, |r| r.len() == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bot.received().len(), 2, "each message once");
    assert_eq!(endpoint.received().len(), 1, "the reply once");
    assert_eq!(
        relay
            .metric("botrelay_unreadable_bot_answers_total", &[])
            .await,
        1.0
    );
    assert_eq!(
        relay.metric("botrelay_delivery_retries_total", &[]).await,
        0.0
    );
    for target in ["bot", "response"] {
        assert_eq!(
            relay
                .metric(
                    "botrelay_delivery_attempts_total",
                    &[("target", target), ("outcome", "success")]
                )
                .await,
            if target == "bot" { 2.0 } else { 1.0 },
            "{target}"
        );
    }
}

/// An answer with more replies than `--max-replies-per-answer` is taken as
/// delivered, and its replies are dropped and counted as an unreadable
/// answer's: one message of the bot cannot turn into any number of messages.
#[tokio::test]
async fn an_answer_with_too_many_replies_is_delivered_and_its_replies_dropped() {
    let bot = Peer::start(|r| {
        let n = if r.body["text"] == "many" { 4 } else { 3 };
        Answer::json(json!({"responses": (0..n)
            .map(|i| json!({"type": "text", "payload": {"n": i}}))
            .collect::<Vec<_>>()}))
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-replies-per-answer=3"]).await;
    relay.send(&message("u", "c", "m1", "many")).await;
    relay.send(&message("u", "c", "m2", "three")).await;
    endpoint
        .wait_until("the three replies to the second", WAIT, |r| r.len() == 3)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bot.received().len(), 2, "each message once");
    assert_eq!(endpoint.received().len(), 3);
    assert_eq!(
        relay
            .metric("botrelay_unreadable_bot_answers_total", &[])
            .await,
        1.0
    );
    assert!(relay.logs().contains("--max-replies-per-answer"));
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Whatever a bot sends, the answers read at once stay within a budget of
/// memory: 64 answers of nearly 4 MiB each (256 MiB if all were read at
/// once) leave the relay far below that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_of_the_bot_are_read_within_a_memory_budget() {
    let answer = Arc::new(format!(
        "{{\"responses\":[]}}{}",
        " ".repeat((4 << 20) - 64)
    ));
    let bot = Peer::start(move |_| Answer {
        body: answer.to_string(),
        ..Answer::ok()
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..64 {
        let url = relay.url("/v1/messages");
        let body = message("u", &format!("c{i}"), &format!("m{i}"), "x").to_string();
        sends.spawn(async move { post(&url, Some(CLIENT_TOKEN), body.into_bytes()).await });
    }
    while let Some(sent) = sends.join_next().await {
        assert_eq!(sent.unwrap().unwrap().0, 200);
    }
    let delivered = relay
        .wait_for_metric(
            "botrelay_messages_delivered_total",
            &[("target", "bot")],
            |n| n >= 64.0,
        )
        .await;
    assert_eq!(delivered, 64.0);
    let peak = peak_rss_mib(relay.pid());
    // 74 MiB with the default --answer-memory-bytes (16 MiB); 198 when each
    // answer was read whole as it came.
    assert!(peak < 96, "peak RSS {peak} MiB");
}

#[tokio::test]
async fn a_failing_conversation_holds_back_only_itself() {
    let bot = Peer::start(|r| {
        if r.body["tags"]["conversationId"] == "stuck" {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    relay.send(&message("u", "stuck", "s1", "x")).await;
    for i in 0..5 {
        relay
            .send(&message("u", "flowing", &format!("f{i}"), "x"))
            .await;
    }
    bot.wait_until("the healthy conversation", WAIT, |r| {
        r.iter()
            .filter(|x| x.body["tags"]["conversationId"] == "flowing")
            .count()
            == 5
    })
    .await;
    assert!(
        relay
            .metric("botrelay_queue_depth", &[("target", "bot")])
            .await
            <= 1.0 + 5.0
    );
}

#[tokio::test]
async fn a_slow_bot_times_out_and_is_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let bot = {
        let calls = calls.clone();
        Peer::start(move |r| {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                Answer::ok().after(Duration::from_secs(3))
            } else {
                echo(r)
            }
        })
        .await
    };
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--bot-timeout=300ms"]).await;
    relay.send(&message("u", "c", "m", "slow")).await;
    endpoint
        .wait_until("the reply after the retry", WAIT, |r| r.len() == 1)
        .await;
    assert_eq!(
        relay
            .metric(
                "botrelay_delivery_attempts_total",
                &[("target", "bot"), ("outcome", "timeout")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_unreachable_target_is_a_network_error_and_is_retried() {
    let down = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&format!("http://{down}/"), &endpoint.url(), &[]).await;
    relay.send(&message("u", "c", "m", "x")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        relay
            .metric(
                "botrelay_delivery_attempts_total",
                &[("target", "bot"), ("outcome", "network_error")]
            )
            .await
            >= 2.0
    );
    let bot = Peer::start_on(down, echo).await;
    bot.wait_until("delivery once the bot is up", WAIT, |r| r.len() == 1)
        .await;
    endpoint
        .wait_until("the reply", WAIT, |r| r.len() == 1)
        .await;
}

/// A response endpoint that answers one request per connection and then
/// closes it, without saying so in a header (as servers with a short
/// keep-alive timeout do). Returns its address and the requests it answered.
async fn closing_endpoint() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as many body bytes as content-length says.
                let complete = |r: &[u8]| {
                    let text = String::from_utf8_lossy(r);
                    let Some(end) = text.find("\r\n\r\n") else {
                        return false;
                    };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    r.len() >= end + 4 + length
                };
                while !complete(&request) {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    (addr, answered)
}

#[tokio::test]
async fn connections_closed_by_the_target_while_idle_are_not_reused() {
    let bot = Peer::start(echo).await;
    let (endpoint, answered) = closing_endpoint().await;
    let relay = Relay::start(&bot.url(), &format!("http://{endpoint}/"), &[]).await;
    for i in 0..5 {
        relay
            .send(&message("u", "c", &format!("m{i}"), &format!("{i}")))
            .await;
        let deadline = Instant::now() + WAIT;
        while answered.load(Ordering::SeqCst) < i + 1 {
            assert!(Instant::now() < deadline, "reply {i} never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Long enough for the endpoint to close the connection just used.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = "botrelay_delivery_attempts_total";
    let success = [("target", "response"), ("outcome", "success")];
    let failed = [("target", "response"), ("outcome", "network_error")];
    assert_eq!(relay.metric(attempts, &success).await, 5.0);
    assert_eq!(
        relay.metric(attempts, &failed).await,
        0.0,
        "no attempt went out on a closed connection"
    );
}

/// Waits until the relay holds `n` dead letters for the response endpoint.
async fn wait_for_dead_letters(relay: &Relay, n: f64) {
    let deadline = Instant::now() + WAIT;
    while relay
        .metric("botrelay_dead_letters", &[("target", "response")])
        .await
        < n
    {
        assert!(
            Instant::now() < deadline,
            "dead letters not counted:\n{}",
            relay.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exhausted_messages_are_dead_lettered_listed_and_redriven() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::status(500)).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-attempts=3"]).await;
    relay.send(&message("u", "c", "m1", "first")).await;
    relay.send(&message("u", "c", "m2", "second")).await;
    endpoint
        .wait_until("3 attempts for each reply", WAIT, |r| r.len() >= 6)
        .await;
    wait_for_dead_letters(&relay, 2.0).await;
    // The gauge is read from the store, so it can show a letter a moment
    // before the delivery task counts it: wait for the count too.
    assert_eq!(
        relay
            .wait_for_metric(
                "botrelay_messages_dead_lettered_total",
                &[("target", "response")],
                |n| n >= 2.0
            )
            .await,
        2.0
    );
    assert_eq!(endpoint.received().len(), 6, "no attempt past the limit");
    assert!(relay.logs().contains("dead-lettered"));

    let admin = |p: &str| format!("http://{}{p}", relay.admin);
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let (status, _, body) = request(
        "GET",
        &admin("/dead-letters"),
        &[("authorization", &auth)],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&body).unwrap();
    let letters = listed["deadLetters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["target"], "response");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("3 attempts failed")
    );

    endpoint.set(|_| Answer::ok());
    // Redrive one by id, then the rest.
    let first = letters[0]["id"].as_str().unwrap();
    let (status, _, body) = request(
        "POST",
        &admin("/dead-letters/redrive"),
        &[("authorization", &auth)],
        json!({"ids": [first]}).to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap()["redriven"].clone()
        ),
        (200, json!(1))
    );
    let got = endpoint
        .wait_until("the redriven reply", WAIT, |r| r.len() >= 7)
        .await;
    assert_eq!(
        got[6].header("webhook-id"),
        first,
        "a redriven message keeps its id"
    );
    let (status, _, body) = request(
        "POST",
        &admin("/dead-letters/redrive"),
        &[("authorization", &auth)],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap()["redriven"].clone()
        ),
        (200, json!(1))
    );
    endpoint
        .wait_until("the second redriven reply", WAIT, |r| r.len() >= 8)
        .await;
    assert_eq!(
        relay
            .metric("botrelay_dead_letters", &[("target", "response")])
            .await,
        0.0
    );
    let (status, _, _) = request(
        "POST",
        &admin("/dead-letters/redrive"),
        &[("authorization", "Bearer nope")],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn dead_letters_can_be_discarded_by_id_or_all_at_once() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::status(500)).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-attempts=1"]).await;
    for (i, conversation) in ["c1", "c2", "c3"].iter().enumerate() {
        relay
            .send(&message("u", conversation, &format!("m{i}"), "hi"))
            .await;
    }
    wait_for_dead_letters(&relay, 3.0).await;
    let admin = |p: &str| format!("http://{}{p}", relay.admin);
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let call = |method: &'static str, path: &'static str, body: Vec<u8>| {
        let (url, auth) = (admin(path), auth.clone());
        async move {
            let (status, _, body) = request(method, &url, &[("authorization", &auth)], body)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (_, listed) = call("GET", "/dead-letters", vec![]).await;
    let first = listed["deadLetters"][0]["id"].as_str().unwrap().to_owned();

    let (status, answer) = call(
        "POST",
        "/dead-letters/discard",
        json!({"ids": [first, "no-such-id"]})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!((status, answer), (200, json!({"discarded": 1})));
    let (_, listed) = call("GET", "/dead-letters", vec![]).await;
    let ids: Vec<&str> = listed["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&first.as_str()));

    // A body that does not name `ids` is refused, never read as "all";
    // nor is an array read as the object's fields in order.
    for typo in [
        r#"{"id": ["x"]}"#.to_string(),
        r#"{"Ids": ["x"]}"#.into(),
        r#"{"ids": null}"#.into(),
        "{}".into(),
        format!(r#"[["{}"]]"#, ids[0]),
    ] {
        for path in ["/dead-letters/discard", "/dead-letters/redrive"] {
            let (status, answer) = call("POST", path, typo.as_bytes().to_vec()).await;
            assert_eq!(status, 400, "{path} {typo}: {answer}");
        }
    }
    let (status, answer) = call("POST", "/dead-letters/discard", vec![]).await;
    assert_eq!((status, answer), (200, json!({"discarded": 2})));
    assert_eq!(
        relay
            .metric("botrelay_dead_letters", &[("target", "response")])
            .await,
        0.0
    );
    // Discarded is gone: a redrive finds nothing, and nothing more is sent.
    endpoint.set(|_| Answer::ok());
    let (status, answer) = call("POST", "/dead-letters/redrive", vec![]).await;
    assert_eq!((status, answer), (200, json!({"redriven": 0})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(endpoint.received().len(), 3, "one attempt each, no more");
    assert!(relay.logs().contains("dead letters discarded"));

    let (status, answer) = call("POST", "/dead-letters/discard", b"[1]".to_vec()).await;
    assert_eq!(status, 400, "{answer}");
    let huge = format!(r#"{{"ids": ["{}"]}}"#, "x".repeat(2 << 20));
    let (status, answer) = call("POST", "/dead-letters/discard", huge.into_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    let (status, _, _) = request(
        "POST",
        &admin("/dead-letters/discard"),
        &[("authorization", "Bearer nope")],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = call("GET", "/dead-letters/discard", vec![]).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn dead_letters_are_listed_page_by_page() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::status(500)).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-attempts=1"]).await;
    for i in 0..5 {
        relay
            .send(&message("u", &format!("c{i}"), &format!("m{i}"), "hi"))
            .await;
    }
    wait_for_dead_letters(&relay, 5.0).await;
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let list = |query: String| {
        let (url, auth) = (
            format!("http://{}/dead-letters{query}", relay.admin),
            auth.clone(),
        );
        async move {
            let (status, _, body) = request("GET", &url, &[("authorization", &auth)], vec![])
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (status, all) = list(String::new()).await;
    assert_eq!(status, 200);
    assert_eq!(all["total"], 5);
    assert!(all.get("next").is_none(), "one page holds them all: {all}");
    let every: Vec<Value> = all["deadLetters"].as_array().unwrap().clone();
    assert_eq!(every.len(), 5);

    let mut paged = Vec::new();
    let mut query = "?limit=2".to_string();
    loop {
        let (status, page) = list(query).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 5);
        paged.extend(page["deadLetters"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => query = format!("?limit=2&after={next}"),
            None => break,
        }
        assert!(paged.len() <= 5, "the pages end");
    }
    assert_eq!(
        paged, every,
        "the pages hold each dead letter once, in order"
    );

    for bad in ["?limit=0", "?limit=x", "?after=soon", "?page=2"] {
        let (status, answer) = list(bad.to_string()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
    }
}

/// Sends a client message that the relay must refuse as the first refusal
/// it counts: with `status`, `Retry-After: retry_after` and the error `code`.
async fn assert_refused(
    relay: &Relay,
    message_id: &str,
    status: u16,
    retry_after: &str,
    code: &str,
) {
    let (got, headers, body) = post(
        &relay.url("/v1/messages"),
        Some(CLIENT_TOKEN),
        message("u", "c", message_id, "x").to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(got, status);
    assert_eq!(headers.get("retry-after").unwrap(), retry_after);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["error"]["code"],
        code
    );
    // Counted, for the BotrelayRejectingMessages alert.
    assert_eq!(
        relay
            .metric(
                "botrelay_messages_received_total",
                &[("source", "client"), ("outcome", "rejected")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_loses_nothing() {
    let down = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(
        &format!("http://{down}/"),
        &endpoint.url(),
        &["--max-pending=5"],
    )
    .await;
    for i in 0..5 {
        assert_eq!(
            relay
                .send(&message("u", &format!("c{i}"), &format!("m{i}"), "x"))
                .await
                .0,
            200
        );
    }
    assert_refused(&relay, "m-late", 429, "1", "queue_full").await;
    let bot = Peer::start_on(down, |_| Answer::ok()).await;
    bot.wait_until("the five accepted messages", WAIT, |r| r.len() == 5)
        .await;
    // Room again: the late message is taken now.
    let deadline = Instant::now() + WAIT;
    loop {
        if relay.send(&message("u", "c", "m-late", "x")).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bot.wait_until("the late message", WAIT, |r| r.len() == 6)
        .await;
}

/// A duplicate stores nothing, so a full queue is no reason to refuse it: it
/// gets the first answer, as it would at any other time.
#[tokio::test]
async fn a_duplicate_gets_its_first_answer_while_the_queue_is_full() {
    let down = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(
        &format!("http://{down}/"),
        &endpoint.url(),
        &["--max-pending=2"],
    )
    .await;
    let (status, first) = relay.send(&message("u", "c0", "m0", "x")).await;
    assert_eq!(status, 200);
    assert_eq!(relay.send(&message("u", "c1", "m1", "x")).await.0, 200);
    assert_eq!(relay.send(&message("u", "c2", "m2", "x")).await.0, 429);
    let (status, again) = relay.send(&message("u", "c0", "m0", "x")).await;
    assert_eq!((status, &again), (200, &first));
    assert_eq!(
        relay
            .metric(
                "botrelay_messages_received_total",
                &[("source", "client"), ("outcome", "duplicate")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn deliveries_to_the_bot_pause_while_max_pending_replies_wait() {
    // Six messages in one conversation (so the bot gets one at a time) wait
    // for a bot that fails at first.
    let bot = Peer::start(|_| Answer::status(500)).await;
    let endpoint = Peer::start(|_| Answer::status(503)).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-pending=10"]).await;
    for i in 0..6 {
        let id = format!("m{i}");
        assert_eq!(relay.send(&message("u", "c", &id, &id)).await.0, 200);
    }
    // Then it answers each with three replies, for a response endpoint that
    // is down. After four messages, twelve replies wait: the rest stay stored.
    let failed = bot.received().len();
    bot.set(|r| {
        let text = r.body["text"].as_str().unwrap_or_default().to_owned();
        Answer::json(json!({"responses": (0..3)
            .map(|i| json!({"type": "text", "payload": {"text": format!("{text}/{i}")}}))
            .collect::<Vec<_>>()}))
    });
    let distinct = |r: &[Received]| {
        r.iter()
            .filter_map(|x| x.body["tags"]["messageId"].as_str())
            .collect::<HashSet<_>>()
            .len()
    };
    bot.wait_until("four messages", WAIT, |r| distinct(&r[failed..]) >= 4)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(distinct(&bot.received()[failed..]), 4);
    assert!(relay.logs().contains("deliveries to the bot pause"));

    // Once the replies can go, the bot gets the rest and every reply arrives.
    endpoint.set(|_| Answer::ok());
    bot.wait_until("all six", WAIT, |r| distinct(&r[failed..]) == 6)
        .await;
    let got = endpoint
        .wait_until("the 18 replies", WAIT, |r| {
            r.iter()
                .filter_map(|x| x.body["payload"]["text"].as_str())
                .collect::<HashSet<_>>()
                .len()
                == 18
        })
        .await;
    assert!(got.len() >= 18);
    assert!(relay.logs().contains("deliveries to the bot go on"));
}

#[tokio::test]
async fn a_nearly_full_disk_answers_503_and_stores_nothing() {
    if nats::contract_on_nats() {
        eprintln!("the disk reserve guards the embedded store's volume; the NATS store has none");
        return;
    }
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // A reserve no volume has: the disk counts as nearly full from the start.
    let relay = Relay::start(
        &bot.url(),
        &endpoint.url(),
        &["--disk-reserve-bytes=18446744073709551615"],
    )
    .await;
    assert_refused(&relay, "m1", 503, "5", "store_full").await;
    assert!(relay.metric("botrelay_store_disk_free_bytes", &[]).await > 0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bot.received().is_empty(),
        "nothing was stored, so nothing is delivered"
    );
}

#[tokio::test]
async fn a_null_payload_from_the_bot_is_passed_on_and_spoils_nothing_beside_it() {
    // "payload: any JSON": null included, in a synchronous answer beside a
    // good reply and in a message the bot posts.
    let bot = Peer::start(|_| {
        Answer::json(serde_json::json!({"responses": [
            {"type": "a", "payload": null},
            {"type": "b", "payload": {"x": 1}},
        ]}))
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let (status, answer) = relay.send(&message("u", "c", "m", "x")).await;
    assert_eq!(status, 200);
    let got = endpoint
        .wait_until("both replies", WAIT, |r| r.len() == 2)
        .await;
    let replies: Vec<_> = got
        .iter()
        .map(|r| (r.body["type"].clone(), r.body["payload"].clone()))
        .collect();
    assert_eq!(
        replies,
        [
            ("a".into(), serde_json::Value::Null),
            ("b".into(), serde_json::json!({"x": 1}))
        ]
    );
    assert!(got[0].body.as_object().unwrap().contains_key("payload"));
    let conversation = answer["message"]["conversationId"].as_str().unwrap();
    let body = serde_json::json!({"conversationId": conversation, "type": "c", "payload": null});
    let (status, _, _) = post(
        &relay.url("/v1/bot/messages"),
        Some(BOT_TOKEN),
        body.to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    let got = endpoint
        .wait_until("the posted message", WAIT, |r| r.len() == 3)
        .await;
    assert_eq!(got[2].body["type"], "c");
    assert_eq!(got[2].body["payload"], serde_json::Value::Null);
    assert_eq!(
        relay
            .metric("botrelay_unreadable_bot_answers_total", &[])
            .await,
        0.0
    );
}

/// The kernel's transparent huge pages are off for the relay. Its allocator
/// asks for them on its arenas, and the kernel then backs whole 2 MiB pages
/// of which the relay uses a part, and fills more of them in the background
/// (khugepaged, every 10 s): an idle relay's RSS rose by a third minutes
/// after its load ended, beyond what its memory limit was sized for.
#[tokio::test]
async fn the_relay_runs_without_transparent_huge_pages() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    relay.send(&message("u", "c", "m", "x")).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("Linux 5.0 or later shows THP_enabled");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

/// A bot that answers on its idle connections (a stray answer after the
/// real one, as a broken proxy might): what comes on an idle connection is
/// not the answer to the next request sent on it. Each connection answers
/// its first request `200` and then sends a stray `200`; any later request
/// on it gets `500`. Returns its address and, per message id, the statuses
/// it answered it with.
async fn bot_with_stray_answers() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(String, u16)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for request in 0.. {
                    // One request: its head, then content-length bytes.
                    let (end, length) = loop {
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (n, v) = l.split_once(':')?;
                                    n.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + length {
                                break (end, length);
                            }
                        }
                        let mut more = [0u8; 4096];
                        match stream.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&more[..n]),
                        }
                    };
                    let body: Value =
                        serde_json::from_slice(&buf[end + 4..end + 4 + length]).unwrap();
                    buf.drain(..end + 4 + length);
                    let id = body["tags"]["messageId"].as_str().unwrap_or("").to_owned();
                    let status = if request == 0 { 200 } else { 500 };
                    log.lock().unwrap().push((id, status));
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if request == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let stray = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(stray).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, answered)
}

#[tokio::test]
async fn an_answer_that_comes_on_an_idle_connection_is_not_taken_for_the_next() {
    let (bot, answered) = bot_with_stray_answers().await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&format!("http://{bot}/"), &endpoint.url(), &[]).await;
    for i in 0..5 {
        relay.send(&message("u", "c", &format!("m{i}"), "x")).await;
        let deadline = Instant::now() + WAIT;
        while !answered
            .lock()
            .unwrap()
            .iter()
            .any(|(id, status)| *id == format!("m{i}") && *status == 200)
        {
            assert!(
                Instant::now() < deadline,
                "m{i} never taken by the bot: {:?}",
                answered.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The stray answer is on the idle connection before the next message.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = "botrelay_delivery_attempts_total";
    let failed = relay
        .metric(attempts, &[("target", "bot"), ("outcome", "http_error")])
        .await;
    assert_eq!(failed, 0.0, "answers: {:?}", answered.lock().unwrap());
    assert_eq!(
        relay
            .metric(attempts, &[("target", "bot"), ("outcome", "success")])
            .await,
        5.0
    );
    // Said once; the bot's connections are peeked at from then on.
    let logs = relay.logs();
    assert_eq!(
        logs.matches("sent data on an idle kept-alive connection")
            .count(),
        1,
        "{logs}"
    );
}
