//! The servers beside the relay in the load benchmark (tests/bench/run):
//!
//!     bench_server bot ADDR       a bot that answers each message with one reply
//!     bench_server sink ADDR      a response endpoint that answers 200
//!     bench_server baseline ADDR  the baseline: parses a client message as the relay's
//!                                 API does, answers 200, stores nothing
//!     bench_server durable ADDR DIR
//!                                 the least a relay must do to accept a message
//!                                 durably: parses it as the baseline does, appends
//!                                 the body to a journal file in DIR, and answers
//!                                 200 once a sync covers it (one syncer thread
//!                                 writes and syncs all that was appended since its
//!                                 last sync, at once); no index, no dedupe, no ids,
//!                                 no queue. One worker thread, as the relay runs on
//!                                 2 CPUs: on the benchmark machine this was faster
//!                                 than two, and faster without the relay's pacing
//!                                 of syncs than with it
//!     bench_server forward ADDR BOT SINK
//!                                 the relay's three exchanges and nothing else: parses
//!                                 a client message, answers 200, then POSTs it to BOT
//!                                 and the bot's answer to SINK, over kept-alive
//!                                 connections of 64 workers; no store, no signatures,
//!                                 no order per conversation
//!     bench_server durable-forward ADDR DIR BOT SINK
//!                                 the least a relay must do end to end durably: the
//!                                 `forward` mode with the `durable` mode's journal.
//!                                 It answers the client once the message's append is
//!                                 synced, sends the bot's answer to SINK only once
//!                                 its append is synced (as the relay sends no reply
//!                                 before it is durable), and appends a completion
//!                                 after SINK answers, without waiting for its sync;
//!                                 no index, no dedupe, no signatures, no order per
//!                                 conversation. A worker thread per CPU: on the
//!                                 benchmark machine, two did more than one (25-26k
//!                                 against 23-24k delivered/s), unlike `durable`
//!
//!     bench_server jetstream URLS SECONDS IN_FLIGHT BYTES [follow]
//!                                 no HTTP: what the NATS servers at URLS take, as
//!                                 a ceiling for `--store nats`. Publishes records of
//!                                 BYTES to a stream made as the relay makes its own
//!                                 (file storage, 3 replicas, a duplicate window, a
//!                                 `Nats-Msg-Id` on each, a subject per conversation
//!                                 under one of 32 partitions), IN_FLIGHT at a time,
//!                                 each waiting for its acknowledgement, for SECONDS;
//!                                 prints the acknowledged writes per second. With
//!                                 `follow`, also reads every record back as the relay
//!                                 does, with an ordered consumer per partition
//!
//! The HTTP modes count the POSTs they answered; `GET /count` returns the count.

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
    Durable,
    DurableForward,
}

/// Workers of the `forward` mode, each with a connection to the bot and one to the sink.
const FORWARD_WORKERS: usize = 64;

type Forwarding = tokio::sync::mpsc::UnboundedSender<Bytes>;

const REPLY: &str = r#"{"responses":[{"type":"text","payload":{"text":"ok"}}]}"#;

async fn handle(
    mode: Mode,
    count: Arc<AtomicU64>,
    forward: Option<Forwarding>,
    journal: Option<Arc<Journal>>,
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
        Mode::Baseline | Mode::Forward | Mode::Durable | Mode::DurableForward => {
            match botrelay::wire::ClientMessage::parse(&body) {
                Ok(_) => {
                    if let Some(journal) = journal
                        && journal.append(&body).await.is_err()
                    {
                        return empty(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    if let Some(forward) = forward {
                        let _ = forward.send(body);
                    }
                    (StatusCode::OK, "{}")
                }
                Err(_) => (StatusCode::BAD_REQUEST, "{}"),
            }
        }
    };
    count.fetch_add(1, Ordering::Relaxed);
    let mut response = Response::new(Full::new(Bytes::from_static(answer.as_bytes())));
    *response.status_mut() = status;
    response
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = match args.get(1).map(String::as_str) {
        // As the relay runs on 2 CPUs: one worker, the other CPU left to the
        // syncer and the kernel.
        Some("durable") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    if args.get(1).map(String::as_str) == Some("jetstream") {
        let number = |i: usize| -> anyhow::Result<u64> {
            let usage = "usage: bench_server jetstream URLS SECONDS IN_FLIGHT BYTES";
            Ok(args.get(i).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?)
        };
        let (seconds, in_flight, bytes) = (number(3)?, number(4)?, number(5)?);
        let follow = match args.get(6).map(String::as_str) {
            Some("follow") => 32,
            Some("follow1") => 1,
            _ => 0,
        };
        let rate = jetstream_ceiling(
            &args[2],
            seconds,
            in_flight as usize,
            bytes as usize,
            follow,
        )
        .await?;
        println!("{rate:.0}");
        return Ok(());
    }
    let (mode, addr) = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("bot"), Some(a)) => (Mode::Bot, a),
        (Some("sink"), Some(a)) => (Mode::Sink, a),
        (Some("baseline"), Some(a)) => (Mode::Baseline, a),
        (Some("forward"), Some(a)) if args.len() == 5 => (Mode::Forward, a),
        (Some("durable"), Some(a)) if args.len() == 4 => (Mode::Durable, a),
        (Some("durable-forward"), Some(a)) if args.len() == 6 => (Mode::DurableForward, a),
        _ => anyhow::bail!(
            "usage: bench_server bot|sink|baseline ADDR | forward ADDR BOT SINK | durable ADDR DIR \
             | durable-forward ADDR DIR BOT SINK"
        ),
    };
    let journal = match mode {
        Mode::Durable | Mode::DurableForward => {
            Some(Journal::open(std::path::Path::new(&args[3]))?)
        }
        _ => None,
    };
    let forward = match mode {
        Mode::Forward => Some(forwarder(&args[3], &args[4], None).await?),
        Mode::DurableForward => Some(forwarder(&args[4], &args[5], journal.clone()).await?),
        _ => None,
    };
    let listener = TcpListener::bind(addr).await?;
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (count, forward, journal) = (count.clone(), forward.clone(), journal.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (count, forward, journal) = (count.clone(), forward.clone(), journal.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(mode, count, forward, journal, req).await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The `durable` mode's journal: appends go to a buffer; one syncer thread
/// writes what was appended since its last sync, syncs it, and answers those
/// appends. The file is zero-filled ahead of the writes, as the relay's
/// store does, so that a sync does not also change the file's size.
struct Journal {
    state: std::sync::Mutex<Appended>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct Appended {
    bytes: Vec<u8>,
    waiting: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// How far ahead of the writes the file is zero-filled (as the relay's store grows its file).
const ZEROED_AHEAD: u64 = 4 << 20;

impl Journal {
    fn open(dir: &std::path::Path) -> anyhow::Result<Arc<Journal>> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("journal"))?;
        let journal = Arc::new(Journal {
            state: Default::default(),
            wake: Default::default(),
        });
        let syncer = journal.clone();
        std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || syncer.sync_loop(file))?;
        Ok(journal)
    }

    /// Appends `record`; returns once a sync covers it.
    async fn append(&self, record: &[u8]) -> Result<(), tokio::sync::oneshot::error::RecvError> {
        let (done, synced) = tokio::sync::oneshot::channel();
        self.push(record, Some(done));
        synced.await
    }

    /// Appends `record` to go with the next sync, without waiting for it.
    fn note(&self, record: &[u8]) {
        self.push(record, None);
    }

    fn push(&self, record: &[u8], done: Option<tokio::sync::oneshot::Sender<()>>) {
        let mut state = self.state.lock().unwrap();
        state
            .bytes
            .extend_from_slice(&(record.len() as u32).to_le_bytes());
        state.bytes.extend_from_slice(record);
        if let Some(done) = done {
            state.waiting.push(done);
            if state.waiting.len() == 1 {
                self.wake.notify_one();
            }
        }
    }

    fn sync_loop(&self, file: std::fs::File) {
        use std::os::unix::fs::FileExt;
        let (mut written, mut zeroed) = (0u64, 0u64);
        let mut batch = Appended::default();
        loop {
            {
                let mut state = self.state.lock().unwrap();
                while state.waiting.is_empty() {
                    state = self.wake.wait(state).unwrap();
                }
                std::mem::swap(&mut batch, &mut *state);
            }
            let end = written + batch.bytes.len() as u64;
            while end > zeroed {
                let zeros = vec![0u8; ZEROED_AHEAD as usize];
                file.write_all_at(&zeros, zeroed)
                    .expect("zero-fill the journal");
                zeroed += ZEROED_AHEAD;
            }
            file.write_all_at(&batch.bytes, written)
                .expect("write the journal");
            file.sync_data().expect("sync the journal");
            written = end;
            batch.bytes.clear();
            for done in batch.waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Starts the `forward` mode's workers; messages sent to the returned channel
/// go to the bot, and the bot's answers to the sink. With a journal (the
/// `durable-forward` mode), an answer goes to the sink once its append is
/// synced, and its completion is appended after.
async fn forwarder(
    bot: &str,
    sink: &str,
    journal: Option<Arc<Journal>>,
) -> anyhow::Result<Forwarding> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..FORWARD_WORKERS {
        let mut to_bot = connect(bot).await?;
        let mut to_sink = connect(sink).await?;
        let (rx, journal) = (rx.clone(), journal.clone());
        tokio::spawn(async move {
            loop {
                let Some(body) = rx.lock().await.recv().await else {
                    return;
                };
                let Ok(answer) = exchange(&mut to_bot, body).await else {
                    continue;
                };
                if let Some(journal) = &journal
                    && journal.append(&answer).await.is_err()
                {
                    continue;
                }
                if exchange(&mut to_sink, answer).await.is_ok()
                    && let Some(journal) = &journal
                {
                    journal.note(b"done");
                }
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

/// Acknowledged JetStream writes per second: `in_flight` publishers, each
/// waiting for its write's acknowledgement before the next, for `seconds`.
async fn jetstream_ceiling(
    urls: &str,
    seconds: u64,
    in_flight: usize,
    bytes: usize,
    follow: u64,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, consumer, stream};
    use futures::StreamExt;
    const PARTITIONS: u64 = 32;
    let servers = urls
        .split(',')
        .map(str::parse::<async_nats::ServerAddr>)
        .collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(servers).await?;
    let js = jetstream::new(client);
    let name = format!("ceiling-{}", std::process::id());
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        num_replicas: 3,
        duplicate_window: std::time::Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let read = Arc::new(AtomicU64::new(0));
    if follow > 0 {
        let stream = js.get_stream(&name).await?;
        for partition in 0..follow {
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: match follow {
                        1 => String::new(),
                        _ => format!("{name}.{partition}.>"),
                    },
                    ..Default::default()
                })
                .await?;
            let read = read.clone();
            tokio::spawn(async move {
                let mut messages = consumer.messages().await?;
                while let Some(message) = messages.next().await {
                    message?;
                    read.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
    }
    let acked = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![b'x'; bytes]);
    let started = std::time::Instant::now();
    let end = started + std::time::Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let (js, acked, payload, name) = (js.clone(), acked.clone(), payload.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while std::time::Instant::now() < end {
                n += 1;
                // As the relay: a subject per conversation, under its
                // partition, and a message id on each.
                let conversation = (worker as u64 * 7919 + n) % 1000;
                let subject = format!("{name}.{}.c.{conversation:032x}", conversation % PARTITIONS);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{worker}-{n}").as_str());
                let ack = js
                    .publish_with_headers(subject, headers, payload.clone())
                    .await?;
                ack.await?;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    if follow > 0 {
        // Every record read back before the stream goes.
        let written = acked.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while read.load(Ordering::Relaxed) < written && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::ensure!(
            read.load(Ordering::Relaxed) >= written,
            "only {} of {written} records were read back",
            read.load(Ordering::Relaxed)
        );
    }
    js.delete_stream(&name).await?;
    Ok(rate)
}
