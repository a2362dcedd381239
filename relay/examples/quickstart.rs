//! The quick start: a relay on its embedded store, a sample bot that echoes
//! each message back, and a sample response endpoint that prints what it gets.
//!
//!     cargo run --release -p botrelay --example quickstart
//!
//! Then send a message with the curl line it prints.

use botrelay::config::Config;
use botrelay::credentials::{BOT_SIGNING_SECRET, BOT_TOKEN, CLIENT_TOKEN, RESPONSE_SIGNING_SECRET};
use botrelay::signing::SigningKey;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rand::RngCore;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;

const RELAY: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9090";
const BOT: &str = "127.0.0.1:8081";
const RESPONSES: &str = "127.0.0.1:8082";
const DATA: &str = "quickstart-data";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let credentials = Path::new(DATA).join("credentials");
    let client_token = write_credentials(&credentials)?;
    let bot_key = read_key(&credentials.join(BOT_SIGNING_SECRET))?;
    let response_key = read_key(&credentials.join(RESPONSE_SIGNING_SECRET))?;

    let bot = TcpListener::bind(BOT).await?;
    tokio::spawn(serve(bot, move |req| echo_bot(req, bot_key.clone())));
    let responses = TcpListener::bind(RESPONSES).await?;
    tokio::spawn(serve(responses, move |req| {
        print_response(req, response_key.clone())
    }));

    // The relay's own defaults, with the addresses and folders of the quick start.
    let config = Config::try_parse_from([
        "botrelay".to_string(),
        format!("--listen={RELAY}"),
        format!("--admin-listen={ADMIN}"),
        format!("--bot-url=http://{BOT}/"),
        format!("--response-url=http://{RESPONSES}/"),
        format!("--credentials-dir={}", credentials.display()),
        "--store=embedded".into(),
        format!("--data-dir={DATA}/store"),
        "--endpoint-name=quickstart".into(),
        "--drain-timeout=5s".into(),
        "--log-level=warn".into(),
        "--log-format=text".into(),
    ])?;
    botrelay::logging::init(&config.log_level, config.log_format).map_err(anyhow::Error::msg)?;
    println!(
        "\nbotrelay is running on http://{RELAY} (metrics on http://{ADMIN}/metrics), store in ./{DATA}/store\n\
         sample bot on http://{BOT}/ (echoes your text back), sample response endpoint on http://{RESPONSES}/\n\n\
         Send a message from another terminal:\n\n  \
         curl -s http://{RELAY}/v1/messages -H 'Authorization: Bearer {client_token}' \\\n    \
         -d '{{\"userId\":\"user-1\",\"conversationId\":\"conv-1\",\"messageId\":\"msg-1\",\"type\":\"text\",\"text\":\"hello\"}}'\n\n\
         The bot's reply arrives at the response endpoint and is printed here. Ctrl-C stops everything.\n"
    );
    botrelay::app::run(config, botrelay::app::shutdown_signal()).await
}

/// Writes fresh credentials on the first run; returns the client token.
fn write_credentials(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let random = |n: usize| {
        let mut bytes = vec![0u8; n];
        rand::rng().fill_bytes(&mut bytes);
        bytes
    };
    let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    use base64::Engine;
    let whsec = |b: Vec<u8>| {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    };
    for (name, value) in [
        (CLIENT_TOKEN, hex(random(32))),
        (BOT_TOKEN, hex(random(32))),
        (BOT_SIGNING_SECRET, whsec(random(32))),
        (RESPONSE_SIGNING_SECRET, whsec(random(32))),
    ] {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, format!("{value}\n"))?;
        }
    }
    Ok(std::fs::read_to_string(dir.join(CLIENT_TOKEN))?
        .trim()
        .to_owned())
}

fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    SigningKey::parse(std::fs::read_to_string(path)?.trim()).map_err(anyhow::Error::msg)
}

/// Checks the Standard Webhooks signature as a receiver would.
fn verified(headers: &http::HeaderMap, body: &[u8], key: &SigningKey) -> bool {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let Ok(timestamp) = get("webhook-timestamp").parse::<u64>() else {
        return false;
    };
    let expected = key.sign(get("webhook-id"), timestamp, body);
    get("webhook-signature").split(' ').any(|s| s == expected)
}

async fn read(req: Request<Incoming>) -> (http::HeaderMap, Bytes) {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (parts.headers, body)
}

/// The relay's reachability probes (header `botrelay-probe: 1`, signed like
/// any delivery) get a 2xx and are otherwise ignored; the first is shown.
fn probe(who: &str, headers: &http::HeaderMap, signed: bool) -> Option<Response<Full<Bytes>>> {
    static SHOWN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    headers.get("botrelay-probe")?;
    let mut shown = SHOWN.lock().unwrap();
    if !shown.iter().any(|w| w == who) {
        shown.push(who.to_string());
        let signature = if signed {
            "signature ok"
        } else {
            "BAD SIGNATURE"
        };
        println!(
            "[{who}] the relay checks it can reach me ({signature}); further probes are not shown"
        );
    }
    Some(reply(StatusCode::NO_CONTENT, String::new()))
}

async fn echo_bot(req: Request<Incoming>, key: SigningKey) -> Response<Full<Bytes>> {
    let (headers, body) = read(req).await;
    let signed = verified(&headers, &body, &key);
    if let Some(answer) = probe("bot", &headers, signed) {
        return answer;
    }
    if !signed {
        return reply(StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    let message: Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = message["text"].as_str().unwrap_or_default();
    println!(
        "[bot] got {:?} in conversation {}",
        text, message["tags"]["conversationId"]
    );
    let answer = json!({ "responses": [{ "type": "text", "payload": { "text": format!("echo: {text}") } }] });
    reply(StatusCode::OK, answer.to_string())
}

async fn print_response(req: Request<Incoming>, key: SigningKey) -> Response<Full<Bytes>> {
    let (headers, body) = read(req).await;
    let ok = verified(&headers, &body, &key);
    if let Some(answer) = probe("response endpoint", &headers, ok) {
        return answer;
    }
    let signed = if ok { "signature ok" } else { "BAD SIGNATURE" };
    println!(
        "[response endpoint] {signed}: {}",
        String::from_utf8_lossy(&body)
    );
    reply(StatusCode::OK, String::new())
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((stream, _)): std::io::Result<(_, SocketAddr)> = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
