//! One signed POST to a bot or a response endpoint.

use super::backoff::parse_retry_after;
use crate::signing::{SigningKey, signature_header};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

/// Largest answer body read from a target (a bot's synchronous replies).
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of an answer that an attempt keeps without asking the
/// [`AnswerBudget`]: `--max-in-flight` attempts bound them.
pub const SMALL_ANSWER_BYTES: usize = 64 * 1024;

/// The memory shared by the answers kept past [`SMALL_ANSWER_BYTES`]: one of
/// known length takes its length, one of unknown length [`MAX_ANSWER_BYTES`]
/// once it grows past the small size; an answer that does not fit waits for
/// room before reading on. Each takes its room in one go and then waits for
/// nothing more, so answers cannot hold parts of it while waiting for each
/// other.
#[derive(Clone, Debug)]
pub struct AnswerBudget {
    bytes: Arc<Semaphore>,
}

/// An answer's room in the [`AnswerBudget`], given back when it is dropped.
pub type Room = OwnedSemaphorePermit;

impl AnswerBudget {
    /// `bytes` of at least [`MAX_ANSWER_BYTES`], so that any answer fits.
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(
                bytes.clamp(MAX_ANSWER_BYTES, Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Room for `n` bytes (at most [`MAX_ANSWER_BYTES`]); the time waited
    /// for it moves `deadline` on, since the target is not the one slow.
    async fn take(&self, n: usize, deadline: &mut tokio::time::Instant) -> Room {
        let started = tokio::time::Instant::now();
        let n = u32::try_from(n.min(MAX_ANSWER_BYTES)).expect("4 MiB fits");
        let room = self
            .bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget is never closed");
        *deadline += started.elapsed();
        room
    }
}

/// A target's 2xx answer.
#[derive(Debug)]
pub enum Answer {
    /// The body (empty from a sender that keeps no answers), and its room in
    /// the budget when it is over [`SMALL_ANSWER_BYTES`]: held as long as the
    /// answer, and what is made of it, are.
    Body(Bytes, Option<Room>),
    /// The body ran past [`MAX_ANSWER_BYTES`]; it was not read to the end.
    TooLarge,
}

/// Why an attempt failed; each is retried.
#[derive(Debug)]
pub enum Failure {
    /// The target answered with a status that is not 2xx.
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    /// No complete answer in time.
    Timeout,
    /// Connection refused or reset, DNS, TLS, or an unreadable answer.
    Network(String),
}

impl Failure {
    /// The `outcome` label of `botrelay_delivery_attempts_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Failure::Status { .. } => "http_error",
            Failure::Timeout => "timeout",
            Failure::Network(_) => "network_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status { status, .. } => write!(f, "answered {status}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Network(e) => write!(f, "{e}"),
        }
    }
}

/// Where a target's requests go: its URL, prepared once.
#[derive(Clone, Debug)]
pub struct Endpoint {
    url: Uri,
    /// The request target as sent (`/path?query`).
    path: Uri,
    host: HeaderValue,
}

impl Endpoint {
    /// `url` is an `http://` or `https://` URL with a host (as the flags require).
    pub fn new(url: &Uri) -> Self {
        let authority = url.authority().map_or("", |a| a.as_str());
        // Credentials in the URL are not sent as part of the Host header.
        let host = authority.rsplit('@').next().unwrap_or(authority);
        Self {
            url: url.clone(),
            path: url
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/")),
            host: HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("")),
        }
    }
}

type Connection = SendRequest<Full<Bytes>>;

/// Sends POSTs to one endpoint over kept-alive connections: each request takes
/// an idle connection (or opens one) and gives it back when the answer is read.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<SenderInner>,
}

struct SenderInner {
    endpoint: Endpoint,
    /// Where the answers' bodies are kept; `None`: they are read and dropped
    /// (the response endpoint's answers say nothing beyond their status).
    budget: Option<AnswerBudget>,
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    /// Extra headers and client certificate (`--bot-header` and the like).
    extras: crate::outgoing::TargetExtras,
}

struct Idle {
    connection: Connection,
    since: Instant,
    /// The client certificate it was made with (see [`Sender::cert_generation`]).
    generation: u64,
}

/// An idle connection unused for this long is closed rather than reused: the
/// other side may have closed it already.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Sender {
    /// A sender whose 2xx answers are kept within `budget`, or, without
    /// one, read and dropped.
    pub fn new(
        endpoint: Endpoint,
        budget: Option<AnswerBudget>,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self::with_extras(
            endpoint,
            budget,
            connect_timeout,
            max_idle,
            Default::default(),
        )
    }

    /// As [`Sender::new`], adding `extras` (headers, a client certificate)
    /// to every request.
    pub fn with_extras(
        endpoint: Endpoint,
        budget: Option<AnswerBudget>,
        connect_timeout: Duration,
        max_idle: usize,
        extras: crate::outgoing::TargetExtras,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = match extras.client_cert() {
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "no system CA certificates found; https targets will fail");
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                        rustls_config_without_roots(),
                    )
                }),
            Some(cert) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(crate::outgoing::tls_config_with_client_cert(cert)),
        }
        .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            inner: Arc::new(SenderInner {
                endpoint,
                budget,
                connector,
                idle: Mutex::new(Vec::new()),
                max_idle,
                extras,
            }),
        }
    }

    /// POSTs `body` signed with every key in `keys`; returns the 2xx answer.
    pub async fn post(
        &self,
        webhook_id: &str,
        body: Vec<u8>,
        keys: &[SigningKey],
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        self.post_with(webhook_id, body, keys, timeout, &[])
            .await
            .map(|(_, answer)| answer)
    }

    /// [`Self::post`] with `extra` headers (a probe's, or a delivery's trace
    /// context); returns the 2xx status too.
    pub async fn post_with(
        &self,
        webhook_id: &str,
        body: Vec<u8>,
        keys: &[SigningKey],
        timeout: Duration,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<(StatusCode, Answer), Failure> {
        let now = SystemTime::now();
        let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let signature = signature_header(keys, webhook_id, timestamp, &body);
        let endpoint = &self.inner.endpoint;
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = endpoint.path.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, endpoint.host.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("botrelay/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert(WEBHOOK_ID, header_value(webhook_id)?);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        // Base64 and spaces: taken as they are, without a copy.
        let signature = HeaderValue::from_maybe_shared(Bytes::from(signature))
            .map_err(|e| Failure::Network(format!("cannot build request: {e}")))?;
        headers.insert(WEBHOOK_SIGNATURE, signature);
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        // None is one the relay sets (refused at start), but for
        // `user-agent`, which a user header replaces.
        for (name, value) in self.inner.extras.headers().iter() {
            headers.insert(name.clone(), value.clone());
        }
        let mut deadline = tokio::time::Instant::now() + timeout;
        let exchange = async {
            let (mut connection, mut generation) = self.connection(true).await?;
            let response = match connection.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    // Not sent: the kept-alive connection was closed by the other
                    // side while idle. Sent again on a new connection, once.
                    Some(request) => {
                        (connection, generation) = self.connection(false).await?;
                        connection
                            .send_request(request)
                            .await
                            .map_err(|e| Failure::Network(describe(&e)))?
                    }
                    None => return Err(Failure::Network(describe(e.error()))),
                },
            };
            Ok((connection, generation, response))
        };
        let (connection, generation, response) = tokio::time::timeout_at(deadline, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        // The status decides; a body too large to read does not make a 2xx a
        // failure (the target took the request), nor hide the status of one
        // that is not. Its connection is not reused.
        let budget = self.inner.budget.as_ref().filter(|_| status.is_success());
        let answer = read_answer(response.into_body(), budget, &mut deadline).await?;
        if matches!(answer, Answer::Body(..)) {
            self.give_back(connection, generation);
        }
        if status.is_success() {
            Ok((status, answer))
        } else {
            Err(Failure::Status {
                status,
                retry_after,
            })
        }
    }

    /// An idle connection ready for a request (if `reuse`), or a new one.
    /// Which client certificate new connections present: a connection
    /// made with another is not reused (a rotated certificate is in use
    /// from the next request on, even on a target that is never idle).
    fn cert_generation(&self) -> u64 {
        self.inner.extras.cert_generation()
    }

    /// A connection, and the certificate generation it was made with.
    async fn connection(&self, reuse: bool) -> Result<(Connection, u64), Failure> {
        let current = self.cert_generation();
        if reuse {
            loop {
                let idle = self.inner.idle.lock().expect("pool lock").pop();
                let Some(Idle {
                    mut connection,
                    since,
                    generation,
                }) = idle
                else {
                    break;
                };
                if since.elapsed() >= IDLE_TIMEOUT
                    || connection.is_closed()
                    || generation != current
                {
                    continue;
                }
                // Ready at once unless the last answer's end is still being read;
                // an error means the other side closed it.
                if connection.ready().await.is_ok() {
                    return Ok((connection, generation));
                }
            }
        }
        // Boxed: opening a connection is rare, and its future is large; kept
        // inline, it would make every attempt's task that much larger to move.
        Ok((Box::pin(self.open()).await?, current))
    }

    /// A new connection to the endpoint.
    async fn open(&self) -> Result<Connection, Failure> {
        let stream = self
            .inner
            .connector
            .clone()
            .call(self.inner.endpoint.url.clone())
            .await
            .map_err(|e| Failure::Network(describe(e.as_ref())))?;
        // Its read buffer holds what is read of an answer ahead of the
        // relay: kept to the size an attempt may hold without the budget.
        let (connection, driver) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(SMALL_ANSWER_BYTES)
            .handshake(stream)
            .await
            .map_err(|e| Failure::Network(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %describe(&e), "connection closed");
            }
        });
        Ok(connection)
    }

    fn give_back(&self, connection: Connection, generation: u64) {
        if connection.is_closed() || generation != self.cert_generation() {
            return;
        }
        let mut idle = self.inner.idle.lock().expect("pool lock");
        if idle.len() < self.inner.max_idle {
            idle.push(Idle {
                connection,
                since: Instant::now(),
                generation,
            });
        }
    }
}

/// Reads an answer's body by `deadline`: kept within `budget`, or without
/// one read and dropped. Past [`MAX_ANSWER_BYTES`] it is not read on.
async fn read_answer(
    mut body: Incoming,
    budget: Option<&AnswerBudget>,
    deadline: &mut tokio::time::Instant,
) -> Result<Answer, Failure> {
    let known = body.size_hint().exact();
    if known.is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
        return Ok(Answer::TooLarge);
    }
    let mut room = None;
    if let (Some(budget), Some(n)) = (budget, known)
        && n as usize > SMALL_ANSWER_BYTES
    {
        room = Some(budget.take(n as usize, deadline).await);
    }
    let mut joined = BytesMut::with_capacity(match (budget, known) {
        (Some(_), Some(n)) if n as usize > SMALL_ANSWER_BYTES => n as usize,
        _ => 0,
    });
    // Most answers come in one piece: kept without copying.
    let mut first: Option<Bytes> = None;
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(*deadline, body.frame()).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Failure::Network(format!("reading the answer: {e}")));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        if total > MAX_ANSWER_BYTES {
            return Ok(Answer::TooLarge);
        }
        let Some(budget) = budget else {
            continue;
        };
        if total > SMALL_ANSWER_BYTES && room.is_none() {
            room = Some(budget.take(MAX_ANSWER_BYTES, deadline).await);
        }
        match first.take() {
            None if joined.is_empty() && joined.capacity() == 0 => first = Some(data),
            held => {
                if let Some(held) = held {
                    joined.extend_from_slice(&held);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(Answer::Body(first.unwrap_or_else(|| joined.freeze()), room))
}

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

fn header_value(text: &str) -> Result<HeaderValue, Failure> {
    HeaderValue::from_str(text).map_err(|e| Failure::Network(format!("cannot build request: {e}")))
}

/// The error and its causes on one line ("client error (Connect): tcp connect error: Connection refused").
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn rustls_config_without_roots() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth()
}
