//! The contract of DESIGN.md, end to end over real HTTP.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_message_reaches_the_bot_and_its_replies_reach_the_response_endpoint_signed() {
    let bot = Peer::start(|_| {
        Answer::json(json!({"responses": [
            {"type": "text", "payload": {"text": "first"}},
            {"type": "choice", "payload": {"options": [1, 2]}},
        ]}))
    })
    .await;
    let endpoint = Peer::start(|_| Answer::status(204)).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;

    let (status, answer) = relay
        .send(&json!({"userId": "u-1", "conversationId": "c-1", "messageId": "m-1", "type": "text", "text": "hello"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let conversation = answer["conversation"]["id"].as_str().unwrap().to_owned();
    let user = answer["user"]["id"].as_str().unwrap().to_owned();
    assert_eq!(answer["conversation"]["tags"]["id"], "c-1");
    assert_eq!(answer["user"]["tags"]["id"], "u-1");
    assert_eq!(answer["message"]["tags"]["id"], "m-1");
    assert_eq!(answer["message"]["conversationId"], conversation.as_str());
    assert_eq!(
        answer["message"]["payload"],
        json!({"text": "hello"}),
        "payload defaults to the text"
    );
    assert_ne!(conversation, "c-1", "the relay has its own ids");

    let to_bot = bot
        .wait_until("the bot's delivery", WAIT, |r| !r.is_empty())
        .await;
    let got = &to_bot[0];
    assert!(
        got.signed_with(BOT_SECRET),
        "bot delivery signed with bot-signing-secret"
    );
    assert_eq!(
        got.header("webhook-id"),
        answer["message"]["id"].as_str().unwrap()
    );
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(got.body["id"], answer["message"]["id"]);
    assert_eq!(got.body["conversationId"], conversation.as_str());
    assert_eq!(got.body["userId"], user.as_str());
    assert_eq!(got.body["type"], "text");
    assert_eq!(got.body["text"], "hello");
    assert_eq!(got.body["payload"], json!({"text": "hello"}));
    assert!(got.body["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        got.body["tags"],
        json!({"conversationId": "c-1", "userId": "u-1", "messageId": "m-1"})
    );

    let replies = endpoint
        .wait_until("both replies", WAIT, |r| r.len() >= 2)
        .await;
    assert_eq!(replies.len(), 2);
    for (reply, (kind, payload)) in replies.iter().zip([
        ("text", json!({"text": "first"})),
        ("choice", json!({"options": [1, 2]})),
    ]) {
        assert!(
            reply.signed_with(&response_secret()),
            "signed with response-signing-secret"
        );
        assert!(!reply.signed_with(BOT_SECRET));
        let body = &reply.body;
        assert_eq!(body["type"], kind);
        assert_eq!(body["payload"], payload);
        assert_eq!(
            body["conversationId"], "c-1",
            "the caller's conversation id"
        );
        assert_eq!(body["botpressConversationId"], conversation.as_str());
        assert_eq!(body["botpressUserId"], user.as_str());
        assert_eq!(
            reply.header("webhook-id"),
            body["botpressMessageId"].as_str().unwrap()
        );
        let keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 6, "{keys:?}");
    }

    let metrics = relay.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "botrelay_messages_received_total",
            &[("outcome", "accepted")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "botrelay_messages_delivered_total",
            &[("target", "response")]
        ),
        2.0
    );
    assert!(metrics.contains(r#"endpoint="test""#));
}

#[tokio::test]
async fn the_same_conversation_maps_to_the_same_relay_ids() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--store=memory"]).await;
    let (_, a) = relay.send(&message("u", "conv-a", "1", "x")).await;
    let (_, b) = relay.send(&message("u", "conv-a", "2", "y")).await;
    let (_, c) = relay.send(&message("u", "conv-b", "3", "z")).await;
    assert_eq!(a["conversation"]["id"], b["conversation"]["id"]);
    assert_ne!(a["conversation"]["id"], c["conversation"]["id"]);
    assert_eq!(a["user"]["id"], c["user"]["id"]);
    assert_ne!(a["message"]["id"], b["message"]["id"]);
}

#[tokio::test]
async fn a_repeated_message_id_gets_the_first_answer_and_reaches_the_bot_once() {
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let first = relay.send(&message("u", "c", "same-id", "one")).await;
    // Even with different content, the id decides.
    let again = relay.send(&message("u", "c", "same-id", "two")).await;
    assert_eq!(first.0, 200);
    assert_eq!(again, first);
    relay.send(&message("u", "c", "other-id", "three")).await;
    endpoint
        .wait_until("two replies", WAIT, |r| r.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let texts: Vec<_> = bot
        .received()
        .iter()
        .map(|r| r.body["text"].clone())
        .collect();
    assert_eq!(texts, [json!("one"), json!("three")]);
    assert_eq!(
        relay
            .metric(
                "botrelay_messages_received_total",
                &[("outcome", "duplicate")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn dedupe_window_is_configurable() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--dedupe-window=300ms"]).await;
    let (_, first) = relay.send(&message("u", "c", "m", "x")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, later) = relay.send(&message("u", "c", "m", "x")).await;
    assert_eq!(status, 200);
    assert_ne!(
        first["message"]["id"], later["message"]["id"],
        "outside the window it is a new message"
    );
    bot.wait_until("both deliveries", WAIT, |r| r.len() == 2)
        .await;
}

async fn error_of(
    relay: &Relay,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String, http::HeaderMap) {
    let (status, headers, body) = request(method, &relay.url(path), headers, body)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).expect("errors are JSON");
    assert!(body["error"]["message"].is_string(), "{body}");
    (
        status,
        body["error"]["code"].as_str().unwrap().to_owned(),
        headers,
    )
}

#[tokio::test]
async fn every_error_is_a_json_body_with_the_right_status() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-body-bytes=1024"]).await;
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let ok = &[("authorization", auth.as_str())][..];
    let good = message("u", "c", "m", "hi").to_string().into_bytes();

    let (s, code, h) = error_of(&relay, "POST", "/v1/messages", &[], good.clone()).await;
    assert_eq!((s, code.as_str()), (401, "unauthorized"));
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    let (s, _, _) = error_of(
        &relay,
        "POST",
        "/v1/messages",
        &[("authorization", "Bearer wrong")],
        good.clone(),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _, _) = error_of(
        &relay,
        "POST",
        "/",
        &[("authorization", &format!("Basic {CLIENT_TOKEN}"))],
        good.clone(),
    )
    .await;
    assert_eq!(s, 401);
    // The bot token is not a client token.
    let (s, _, _) = error_of(
        &relay,
        "POST",
        "/v1/messages",
        &[("authorization", &format!("Bearer {BOT_TOKEN}"))],
        good.clone(),
    )
    .await;
    assert_eq!(s, 401);

    let (s, code, _) = error_of(&relay, "POST", "/v2/nothing", ok, good.clone()).await;
    assert_eq!((s, code.as_str()), (404, "not_found"));
    let (s, code, h) = error_of(&relay, "GET", "/v1/messages", ok, Vec::new()).await;
    assert_eq!((s, code.as_str()), (405, "method_not_allowed"));
    assert_eq!(h.get("allow").unwrap(), "POST");

    let big = message("u", "c", "m", &"x".repeat(2000))
        .to_string()
        .into_bytes();
    let (s, code, _) = error_of(&relay, "POST", "/v1/messages", ok, big).await;
    assert_eq!((s, code.as_str()), (413, "payload_too_large"));

    for (body, field) in [
        (
            json!({"messageId": "m", "conversationId": "c", "type": "text", "text": "x"}),
            "userId",
        ),
        (
            json!({"userId": "u", "conversationId": "c", "type": "text", "text": "x"}),
            "messageId",
        ),
        (
            json!({"userId": "u", "messageId": "m", "type": "text", "text": "x"}),
            "conversationId",
        ),
        (
            json!({"userId": "u", "messageId": "m", "conversationId": "c", "text": "x"}),
            "type",
        ),
        (
            json!({"userId": "u", "messageId": "m", "conversationId": "c", "type": "text"}),
            "text",
        ),
        (
            json!({"userId": 5, "messageId": "m", "conversationId": "c", "type": "text", "text": "x"}),
            "userId",
        ),
        (
            json!({"userId": "u", "messageId": "", "conversationId": "c", "type": "text", "text": "x"}),
            "messageId",
        ),
        (
            json!({"userId": "u", "messageId": "m", "conversationId": "c", "type": ["text"], "text": "x"}),
            "type",
        ),
    ] {
        let (status, _, raw) = request(
            "POST",
            &relay.url("/v1/messages"),
            ok,
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
        let err: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(err["error"]["code"], "invalid_request");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{err} should name {field}"
        );
    }
    for bad in [
        &b"not json"[..],
        b"[1,2,3]",
        b"\"text\"",
        b"",
        b"{\"userId\": \"\xff\xfe\"}",
        b"{\"userId\":",
    ] {
        let (s, code, _) = error_of(&relay, "POST", "/v1/messages", ok, bad.to_vec()).await;
        assert_eq!(
            (s, code.as_str()),
            (400, "invalid_request"),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let deep = format!("{{\"payload\":{}}}", "[".repeat(900));
    let (s, _, _) = error_of(&relay, "POST", "/v1/messages", ok, deep.into_bytes()).await;
    assert_eq!(s, 400);
    // Well formed, and nested deeper than serde_json reads (128), where a string
    // is expected or in the payload.
    let nested = format!("{}{}", "[".repeat(300), "]".repeat(300));
    for field in ["userId", "payload"] {
        let mut body = serde_json::json!({
            "userId": "u", "messageId": "deep", "conversationId": "c", "type": "text", "text": "x"
        });
        body.as_object_mut().unwrap().remove(field);
        let mut body = body.to_string();
        body.insert_str(1, &format!("\"{field}\":{nested},"));
        let (status, _, raw) = request("POST", &relay.url("/v1/messages"), ok, body.into_bytes())
            .await
            .unwrap();
        let err: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(status, 400, "{field}");
        assert_eq!(err["error"]["code"], "invalid_request");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{field}`")), "{message}");
    }

    // curl's default form content type is not held against the caller.
    let (status, _, _) = request(
        "POST",
        &relay.url("/"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        good,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // Nothing refused reached the bot; the relay is still healthy.
    bot.wait_until("the one good message", WAIT, |r| r.len() == 1)
        .await;
    let metrics = relay.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "botrelay_messages_received_total",
            &[("outcome", "unauthorized")]
        ),
        4.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "botrelay_messages_received_total",
            &[("outcome", "too_large")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "botrelay_http_requests_total",
            &[("route", "/v1/messages"), ("status", "400")]
        ),
        17.0
    );
}

#[tokio::test]
async fn a_bot_writes_on_its_own_to_a_known_conversation() {
    let bot = Peer::start(|_| Answer::status(204)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let (_, answer) = relay.send(&message("u-9", "c-9", "m", "hi")).await;
    let conversation = answer["conversation"]["id"].as_str().unwrap();
    bot.wait_until("delivery", WAIT, |r| r.len() == 1).await;

    let url = relay.url("/v1/bot/messages");
    let body = |conv: &str| {
        json!({"conversationId": conv, "type": "text", "payload": {"text": "later"}})
            .to_string()
            .into_bytes()
    };
    let (status, _, raw) = post(&url, Some(BOT_TOKEN), body(conversation))
        .await
        .unwrap();
    assert_eq!(status, 202);
    let id = serde_json::from_slice::<Value>(&raw).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        post(&url, Some(CLIENT_TOKEN), body(conversation))
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(post(&url, None, body(conversation)).await.unwrap().0, 401);
    let (status, _, raw) = post(&url, Some(BOT_TOKEN), body("no-such-conversation"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&raw).unwrap()["error"]["code"],
        "unknown_conversation"
    );
    let (status, _, raw) = post(
        &url,
        Some(BOT_TOKEN),
        json!({"conversationId": conversation, "type": "text"})
            .to_string()
            .into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&raw).contains("`payload`"));

    let got = endpoint
        .wait_until("the bot's own message", WAIT, |r| r.len() == 1)
        .await;
    assert_eq!(got[0].header("webhook-id"), id);
    assert_eq!(got[0].body["botpressMessageId"], id.as_str());
    assert_eq!(got[0].body["conversationId"], "c-9");
    assert_eq!(got[0].body["payload"], json!({"text": "later"}));
    assert_eq!(got[0].body["botpressUserId"], answer["user"]["id"]);
    assert!(got[0].signed_with(&response_secret()));
}

#[tokio::test]
async fn admin_port_serves_health_readiness_and_metrics() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let admin = |p: &str| format!("http://{}{p}", relay.admin);
    assert_eq!(get(&admin("/healthz")).await.unwrap().0, 200);
    assert_eq!(get(&admin("/readyz")).await.unwrap().0, 200);
    assert_eq!(get(&admin("/nope")).await.unwrap().0, 404);
    let metrics = relay.metrics().await;
    for name in [
        "botrelay_messages_received_total",
        "botrelay_delivery_attempts_total",
        "botrelay_delivery_retries_total",
        "botrelay_messages_delivered_total",
        "botrelay_messages_dead_lettered_total",
        "botrelay_queue_depth",
        "botrelay_oldest_pending_age_seconds",
        "botrelay_dead_letters",
        "botrelay_build_info",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    assert_eq!(
        get(&admin("/dead-letters")).await.unwrap().0,
        401,
        "dead letters need a token"
    );
    if nats::contract_on_nats() {
        // The NATS store has no file, and reads conversations back from the
        // stream rather than counting them: what follows is the embedded store's.
        assert_eq!(relay.send(&message("u", "c", "m1", "hi")).await.0, 200);
        return;
    }
    // The embedded store reports its file: a stored message grows it.
    let before = relay.metric("botrelay_store_file_bytes", &[]).await;
    assert_eq!(relay.send(&message("u", "c", "m1", "hi")).await.0, 200);
    let after = relay.metric("botrelay_store_file_bytes", &[]).await;
    assert!(after > before, "file bytes {before} then {after}");
    let live = relay.metric("botrelay_store_live_bytes", &[]).await;
    assert!(live > 0.0 && live <= after, "live bytes {live} of {after}");
    // Conversations are counted once each, whoever writes in them.
    assert_eq!(relay.metric("botrelay_conversations", &[]).await, 1.0);
    assert_eq!(relay.send(&message("u2", "c", "m2", "hi")).await.0, 200);
    assert_eq!(relay.send(&message("u", "c2", "m3", "hi")).await.0, 200);
    assert_eq!(relay.metric("botrelay_conversations", &[]).await, 2.0);
}

#[tokio::test]
async fn a_refused_request_on_a_kept_alive_connection_does_not_break_the_next_one() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-body-bytes=1024"]).await;
    // One client with a connection pool, as a back-end has: a body somewhat over
    // the limit is read and dropped, so the connection goes on; refusals that
    // leave the body unread close the connection and say so, so the pool opens
    // a new one instead of failing the next request.
    let client = keep_alive_client();
    let auth = format!("Bearer {CLIENT_TOKEN}");
    for i in 0..20 {
        let big = message("u", "c", "big", &"x".repeat(2000)).to_string();
        let (status, headers) = client_post(&client, &relay.url("/v1/messages"), &auth, big).await;
        assert_eq!(status, 413);
        assert!(
            headers.get("connection").is_none(),
            "a drained body keeps the connection"
        );
        let huge = message("u", "c", "huge", &"x".repeat(64 * 1024)).to_string();
        let (status, headers) = client_post(&client, &relay.url("/v1/messages"), &auth, huge).await;
        assert_eq!(status, 413);
        assert_eq!(headers.get("connection").unwrap(), "close");
        let (status, _) = client_post(
            &client,
            &relay.url("/v1/messages"),
            "Bearer wrong",
            "{}".into(),
        )
        .await;
        assert_eq!(status, 401);
        let ok = message("u", "c", &format!("m{i}"), "x").to_string();
        let (status, headers) = client_post(&client, &relay.url("/v1/messages"), &auth, ok).await;
        assert_eq!(status, 200, "request {i} after refusals");
        assert!(
            headers.get("connection").is_none(),
            "a read body keeps the connection"
        );
    }
}

/// A body far over the limit is refused before it is read, and the
/// connection closed; the client is still sending it. The relay reads and
/// drops what comes until the client is done (or for a bounded time), so
/// that its close does not reset the connection and the client gets the
/// `413` instead of a broken pipe, on a kept-alive connection as on a new one.
#[tokio::test]
async fn a_client_still_sending_a_refused_body_gets_the_answer_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &["--max-connections=1"]).await;
    let request = |body: &str| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Reads one answer: its status line, and its body by Content-Length.
    async fn answer(stream: &mut tokio::net::TcpStream) -> Result<String, std::io::Error> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.parse().unwrap())
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return Ok(head.lines().next().unwrap().to_owned());
                }
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    let huge = message("u", "c", "huge", &"x".repeat(8 << 20)).to_string();
    for kept_alive in [true, false] {
        for i in 0..3 {
            let mut stream = tokio::net::TcpStream::connect(relay.api).await.unwrap();
            if kept_alive {
                let ok = message("u", "c", &format!("m{i}"), "x").to_string();
                stream.write_all(request(&ok).as_bytes()).await.unwrap();
                assert_eq!(answer(&mut stream).await.unwrap(), "HTTP/1.1 200 OK");
            }
            let sent = stream.write_all(request(&huge).as_bytes()).await;
            let status = answer(&mut stream).await;
            assert!(
                sent.is_ok()
                    && status
                        .as_ref()
                        .is_ok_and(|s| s == "HTTP/1.1 413 Payload Too Large"),
                "kept alive: {kept_alive}, try {i}: sent {sent:?}, answer {status:?}"
            );
            // Done sending, but its connection left open: the relay lets go
            // of it once it is quiet, not after the longest linger. With one
            // connection at a time, the next client waits for that.
            let started = std::time::Instant::now();
            let mut next = tokio::net::TcpStream::connect(relay.api).await.unwrap();
            let ok = message("u", "c", &format!("n{kept_alive}{i}"), "x").to_string();
            next.write_all(request(&ok).as_bytes()).await.unwrap();
            assert_eq!(answer(&mut next).await.unwrap(), "HTTP/1.1 200 OK");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the next connection waited {:?}",
                started.elapsed()
            );
            drop(stream);
        }
    }
    // A head too large to read is answered by the HTTP layer itself: the
    // client still sending it gets the 431 all the same.
    for i in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(relay.api).await.unwrap();
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: relay\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(4 << 20)
        );
        let sent = stream.write_all(head.as_bytes()).await;
        let status = answer(&mut stream).await;
        assert!(
            sent.is_ok()
                && status
                    .as_ref()
                    .is_ok_and(|s| s == "HTTP/1.1 431 Request Header Fields Too Large"),
            "try {i}: sent {sent:?}, answer {status:?}"
        );
    }
}

/// The status line of the answer to `head` (a request line and headers,
/// without the blank line) followed by a small message, written at once.
async fn status_of_raw_request(relay: &Relay, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = message("u", "c", "raw", "x").to_string();
    let request = format!(
        "{head}\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(relay.api).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 256];
    let n = stream.read(&mut answer).await.unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or("closed")
        .to_owned()
}

/// Request heads are held to 64 KiB however they arrive: sent in one piece,
/// up to about 112 KiB used to pass.
#[tokio::test]
async fn request_heads_over_64_kib_get_431_however_they_arrive() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let head = |pad: usize| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: relay\r\nX-Pad: {}",
            "a".repeat(pad)
        )
    };
    assert_eq!(
        status_of_raw_request(&relay, &head(60 * 1024)).await,
        "HTTP/1.1 200 OK"
    );
    for kib in [65, 80, 110] {
        assert_eq!(
            status_of_raw_request(&relay, &head(kib * 1024)).await,
            "HTTP/1.1 431 Request Header Fields Too Large",
            "{kib} KiB"
        );
    }
}

/// A `405` names the methods the path takes, on both ports.
#[tokio::test]
async fn every_405_says_which_methods_are_allowed() {
    let bot = Peer::start(|_| Answer::ok()).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let with_token = [("authorization", auth.as_str())];
    let admin = |p: &str| format!("http://{}{p}", relay.admin);
    for (method, url, allowed) in [
        ("GET", relay.url("/"), "POST"),
        ("PUT", relay.url("/v1/messages"), "POST"),
        ("GET", relay.url("/v1/bot/messages"), "POST"),
        ("POST", admin("/metrics"), "GET"),
        ("POST", admin("/healthz"), "GET"),
        ("DELETE", admin("/readyz"), "GET"),
        ("POST", admin("/dead-letters"), "GET"),
        ("GET", admin("/dead-letters/redrive"), "POST"),
        ("GET", admin("/dead-letters/discard"), "POST"),
    ] {
        let (status, headers, _) = request(method, &url, &with_token, Vec::new())
            .await
            .unwrap();
        assert_eq!(status, 405, "{method} {url}");
        assert_eq!(
            headers.get("allow").map(|v| v.to_str().unwrap()),
            Some(allowed),
            "{method} {url}"
        );
    }
}
