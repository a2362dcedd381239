//! The harness of the black-box tests: the real `botrelay` binary on loopback,
//! with a test bot and a test response endpoint that are real HTTP servers.
#![allow(dead_code)] // each test file uses part of the harness

pub mod nats;

use base64::Engine;
use botrelay::signing::SigningKey;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub const CLIENT_TOKEN: &str = "client-token-1";
pub const BOT_TOKEN: &str = "bot-token-1";
pub const BOT_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub fn response_secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([42u8; 32])
    )
}

/// One request a test peer received.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub raw: Bytes,
    pub body: Value,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Whether this is a reachability probe rather than a delivery.
    pub fn is_probe(&self) -> bool {
        self.header("botrelay-probe") == "1"
    }

    /// Whether the Standard Webhooks signature verifies with `secret`.
    pub fn signed_with(&self, secret: &str) -> bool {
        let key = SigningKey::parse(secret).unwrap();
        let Ok(ts) = self.header("webhook-timestamp").parse::<u64>() else {
            return false;
        };
        let expected = key.sign(self.header("webhook-id"), ts, &self.raw);
        self.header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
    }
}

/// How a test peer answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn ok() -> Self {
        Self::status(200)
    }

    pub fn status(status: u16) -> Self {
        Answer {
            status,
            body: String::new(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(body: Value) -> Self {
        Answer {
            body: body.to_string(),
            ..Self::ok()
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// The bot's usual answer: one echo reply per message.
pub fn echo(r: &Received) -> Answer {
    let text = r.body["text"].as_str().unwrap_or_default();
    Answer::json(serde_json::json!({
        "responses": [{"type": "text", "payload": {"text": format!("echo: {text}")}}]
    }))
}

type Behaviour = Box<dyn FnMut(&Received) -> Answer + Send>;

/// A test bot or response endpoint.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// When each request's handling ended, by its index in `received`:
    /// answered, or dropped unanswered (its connection closed first).
    ended: Arc<Mutex<Vec<Ended>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

#[derive(Clone, Debug)]
pub struct Ended {
    /// The request's index in [`Peer::received`].
    pub index: usize,
    pub at: Instant,
    pub answered: bool,
}

/// Records when a request's handling ends, however it does.
struct Ending {
    ended: Arc<Mutex<Vec<Ended>>>,
    index: usize,
    answered: bool,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.ended.lock().unwrap().push(Ended {
            index: self.index,
            at: Instant::now(),
            answered: self.answered,
        });
    }
}

impl Peer {
    pub async fn start(behaviour: impl FnMut(&Received) -> Answer + Send + 'static) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Box::new(behaviour))
    }

    /// A peer on a given port (to bring a "down" target up later).
    pub async fn start_on(
        addr: SocketAddr,
        behaviour: impl FnMut(&Received) -> Answer + Send + 'static,
    ) -> Peer {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, Box::new(behaviour))
    }

    fn serve(listener: TcpListener, behaviour: Behaviour) -> Peer {
        let peer = Peer {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            ended: Arc::default(),
            behaviour: Arc::new(Mutex::new(behaviour)),
        };
        let p = peer.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let p = p.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let p = p.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let raw = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let received = Received {
                                    headers: parts.headers,
                                    body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                                    raw,
                                    at: Instant::now(),
                                };
                                let answer = (p.behaviour.lock().unwrap())(&received);
                                let mut ending = {
                                    let mut all = p.received.lock().unwrap();
                                    all.push(received);
                                    Ending {
                                        ended: p.ended.clone(),
                                        index: all.len() - 1,
                                        answered: false,
                                    }
                                };
                                tokio::time::sleep(answer.delay).await;
                                ending.answered = true;
                                let mut response =
                                    Response::new(Full::new(Bytes::from(answer.body)));
                                *response.status_mut() =
                                    StatusCode::from_u16(answer.status).unwrap();
                                for (name, value) in answer.headers {
                                    response.headers_mut().insert(name, value.parse().unwrap());
                                }
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        peer
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn set(&self, behaviour: impl FnMut(&Received) -> Answer + Send + 'static) {
        *self.behaviour.lock().unwrap() = Box::new(behaviour);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// When the requests received so far ended, in the order they did.
    pub fn ended(&self) -> Vec<Ended> {
        self.ended.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was received; panics with `what` after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes the test credentials (the four files of `--credentials-dir`) in
/// `dir/credentials`, and returns that directory.
pub fn write_credentials(dir: &Path) -> PathBuf {
    let creds = dir.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    write(&creds, "client-token", CLIENT_TOKEN);
    write(&creds, "bot-token", BOT_TOKEN);
    write(&creds, "bot-signing-secret", BOT_SECRET);
    write(&creds, "response-signing-secret", &response_secret());
    creds
}

/// A port that was free a moment ago, for a process that binds it later.
///
/// Taken below Linux's ephemeral range (32768 and up), so that an outgoing
/// connection of the relay, a NATS server or a client can never take it in the
/// gap between this check and the bind; and never the same port twice in one
/// test process. The start is spread by the process id.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = (std::process::id() % 200) * 100;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        if let Ok(listener) = StdListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free port below the ephemeral range");
}

pub struct Relay {
    child: Option<Child>,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A command the relay runs under (`strace` injecting faults), if any.
    wrap: Vec<String>,
}

impl Relay {
    /// Starts the relay with `extra` flags, fast retries, the embedded store in a temp dir.
    pub async fn start(bot_url: &str, response_url: &str, extra: &[&str]) -> Relay {
        Self::start_with_env(bot_url, response_url, extra, &[]).await
    }

    /// As `start`, with environment variables for the relay process.
    pub async fn start_with_env(
        bot_url: &str,
        response_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        Self::start_wrapped(&[], bot_url, response_url, extra, env).await
    }

    /// As `start_with_env`, run as the last argument of `wrap` (`strace -f
    /// ... --`, say); signals go to the relay itself, and its exit code is
    /// the wrapper's.
    pub async fn start_wrapped(
        wrap: &[&str],
        bot_url: &str,
        response_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let creds = write_credentials(dir.path());
        let (api, admin) = (free_addr(), free_addr());
        let mut args: Vec<String> = vec![
            format!("--listen={api}"),
            format!("--admin-listen={admin}"),
            format!("--bot-url={bot_url}"),
            format!("--response-url={response_url}"),
            format!("--credentials-dir={}", creds.display()),
            format!("--data-dir={}", dir.path().join("data").display()),
            "--endpoint-name=test".into(),
            "--retry-initial-backoff=50ms".into(),
            "--retry-max-backoff=400ms".into(),
            "--credentials-poll-interval=200ms".into(),
            "--drain-timeout=5s".into(),
            // Reachability probes would add requests that most tests do not
            // expect; the tests of probes turn them on.
            "--probe-interval=0s".into(),
            "--log-format=json".into(),
            "--log-level=debug".into(),
        ];
        // With BOTRELAY_TEST_STORE=nats, a relay whose test picks no store
        // runs on the shared NATS cluster, under a prefix of its own.
        if nats::contract_on_nats() && !extra.iter().any(|e| e.starts_with("--store")) {
            args.extend(nats::relay_flags(nats::shared(), &nats::fresh_prefix()));
        }
        // A flag given by the test replaces the harness's default for it.
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_owned();
        args.retain(|a| !extra.iter().any(|e| flag(e) == flag(a)));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut relay = Relay {
            child: None,
            api,
            admin,
            dir,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrap: wrap.iter().map(|s| s.to_string()).collect(),
        };
        relay.spawn().await;
        relay
    }

    pub fn credentials_dir(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = match self.wrap.split_first() {
            None => Command::new(env!("CARGO_BIN_EXE_botrelay")),
            Some((wrapper, args)) => {
                let mut command = Command::new(wrapper);
                command.args(args).arg(env!("CARGO_BIN_EXE_botrelay"));
                command
            }
        };
        let child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start botrelay");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _, _)) = get(&format!("http://{}/readyz", self.admin)).await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("botrelay exited with {status} at start:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "botrelay not ready in time:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The relay's process id (under a wrapper, the wrapper's child).
    pub fn pid(&self) -> u32 {
        let pid = self.child.as_ref().expect("running").id();
        if self.wrap.is_empty() {
            return pid;
        }
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("the wrapper's children");
        children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .expect("the wrapper runs the relay")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if !self.wrap.is_empty() && self.child.is_some() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid().to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.pid(), "TERM");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "botrelay did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the relay to exit by itself; returns its
    /// exit code, `None` if it still runs (or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the relay again with the same flags, ports and data dir.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Posts a user message with the client token.
    pub async fn send(&self, body: &Value) -> (u16, Value) {
        let (status, _, body) = post(
            &self.url("/v1/messages"),
            Some(CLIENT_TOKEN),
            body.to_string().into_bytes(),
        )
        .await
        .expect("relay reachable");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        let (_, _, body) = get(&format!("http://{}/metrics", self.admin))
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits until the metric's value satisfies `done` (10 s at most), and returns it.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        done: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(name, labels).await;
            if done(value) || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of one series of /metrics (0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), format!("{text}\n")).unwrap();
}

pub fn message(user: &str, conversation: &str, id: &str, text: &str) -> Value {
    serde_json::json!({"userId": user, "conversationId": conversation, "messageId": id, "type": "text", "text": text})
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, HeaderMap, Bytes), String> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(Full::new(Bytes::from(body))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

pub async fn post(
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, HeaderMap, Bytes), String> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    request("POST", url, &headers, body).await
}

pub async fn get(url: &str) -> Result<(u16, HeaderMap, Bytes), String> {
    request("GET", url, &[], Vec::new()).await
}

/// A client that keeps connections alive between requests, as a back-end's would.
pub fn keep_alive_client() -> Client<HttpConnector, Full<Bytes>> {
    client()
}

pub async fn client_post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    auth: &str,
    body: String,
) -> (u16, HeaderMap) {
    let req = Request::post(url)
        .header("authorization", auth)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client
        .request(req)
        .await
        .expect("the pooled client gets an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let _ = response.into_body().collect().await;
    (status, headers)
}
