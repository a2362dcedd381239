//! The servers beside the relay in the load benchmark (tests/bench/run):
//!
//!     bench_server bot ADDR       a bot that answers each message with one reply
//!     bench_server sink ADDR      a response endpoint that answers 200
//!     bench_server baseline ADDR  the baseline: parses a client message as the relay's
//!                                 API does, answers 200, stores nothing
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
}

const REPLY: &str = r#"{"responses":[{"type":"text","payload":{"text":"ok"}}]}"#;

async fn handle(
    mode: Mode,
    count: Arc<AtomicU64>,
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
        Mode::Baseline => match botrelay::wire::ClientMessage::parse(&body) {
            Ok(_) => (StatusCode::OK, "{}"),
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
        _ => anyhow::bail!("usage: bench_server bot|sink|baseline ADDR"),
    };
    let listener = TcpListener::bind(addr).await?;
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let count = count.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let count = count.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(mode, count, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
