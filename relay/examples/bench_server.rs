//! The servers beside the relay in the load benchmark (tests/bench/run):
//!
//!     bench_server bot ADDR       a bot that answers each message with one reply
//!     bench_server sink ADDR      a response endpoint that answers 200
//!     bench_server baseline ADDR  the baseline: parses a client message as the relay's
//!                                 API does, answers 200, stores nothing
//!     bench_server forward ADDR BOT SINK
//!                                 the relay's three exchanges and nothing else: parses
//!                                 a client message, answers 200, then POSTs it to BOT
//!                                 and the bot's answer to SINK, over kept-alive
//!                                 connections of 64 workers; no store, no signatures,
//!                                 no order per conversation
//!
//! Each counts the POSTs it answered; `GET /count` returns the count.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Mode {
    Bot,
    Sink,
    Baseline,
    Forward,
}

/// Workers of the `forward` mode, each with a connection to the bot and one to the sink.
const FORWARD_WORKERS: usize = 64;

type Forwarding = tokio::sync::mpsc::UnboundedSender<Bytes>;

const REPLY: &str = r#"{"responses":[{"type":"text","payload":{"text":"ok"}}]}"#;

async fn handle(
    mode: Mode,
    count: Arc<AtomicU64>,
    forward: Option<Forwarding>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET {
        return Response::new(Full::new(Bytes::from(
            count.load(Ordering::Relaxed).to_string(),
        )));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, answer) = match mode {
        Mode::Bot => (StatusCode::OK, REPLY),
        Mode::Sink => (StatusCode::OK, ""),
        Mode::Baseline | Mode::Forward => match botrelay::wire::ClientMessage::parse(&body) {
            Ok(_) => {
                if let Some(forward) = forward {
                    let _ = forward.send(body);
                }
                (StatusCode::OK, "{}")
            }
            Err(_) => (StatusCode::BAD_REQUEST, "{}"),
        },
    };
    count.fetch_add(1, Ordering::Relaxed);
    let mut response = Response::new(Full::new(Bytes::from_static(answer.as_bytes())));
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr) = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("bot"), Some(a)) => (Mode::Bot, a),
        (Some("sink"), Some(a)) => (Mode::Sink, a),
        (Some("baseline"), Some(a)) => (Mode::Baseline, a),
        (Some("forward"), Some(a)) if args.len() == 5 => (Mode::Forward, a),
        _ => anyhow::bail!("usage: bench_server bot|sink|baseline ADDR | forward ADDR BOT SINK"),
    };
    let forward = match mode {
        Mode::Forward => Some(forwarder(&args[3], &args[4]).await?),
        _ => None,
    };
    let listener = TcpListener::bind(addr).await?;
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (count, forward) = (count.clone(), forward.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (count, forward) = (count.clone(), forward.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(mode, count, forward, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the `forward` mode's workers; messages sent to the returned channel
/// go to the bot, and the bot's answers to the sink.
async fn forwarder(bot: &str, sink: &str) -> anyhow::Result<Forwarding> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..FORWARD_WORKERS {
        let mut to_bot = connect(bot).await?;
        let mut to_sink = connect(sink).await?;
        let rx = rx.clone();
        tokio::spawn(async move {
            loop {
                let Some(body) = rx.lock().await.recv().await else {
                    return;
                };
                let Ok(answer) = exchange(&mut to_bot, body).await else {
                    continue;
                };
                let _ = exchange(&mut to_sink, answer).await;
            }
        });
    }
    Ok(tx)
}

type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> anyhow::Result<Connection> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (connection, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(driver);
    Ok(connection)
}

/// One POST on `connection`; the answer's body.
async fn exchange(connection: &mut Connection, body: Bytes) -> anyhow::Result<Bytes> {
    connection.ready().await?;
    let request = Request::post("/")
        .header(http::header::HOST, "bench")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let response = connection.send_request(request).await?;
    Ok(response.into_body().collect().await?.to_bytes())
}
