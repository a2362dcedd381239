//! One signed POST to a bot or a response endpoint.

use super::h1;
use crate::signing::{SigningKey, signature_header_into, signature_header_len};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{StatusCode, Uri, header};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
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
    pub(super) async fn take(&self, n: usize, deadline: &mut tokio::time::Instant) -> Room {
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
    path: String,
    /// The `Host` header: the URL's authority without credentials.
    host: String,
}

impl Endpoint {
    /// `url` is an `http://` or `https://` URL with a host (as the flags require).
    pub fn new(url: &Uri) -> Self {
        let authority = url.authority().map_or("", |a| a.as_str());
        // Credentials in the URL are not sent as part of the Host header.
        let host = authority.rsplit('@').next().unwrap_or(authority);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        Self {
            url: url.clone(),
            path: match path.starts_with('/') {
                true => path.to_owned(),
                false => format!("/{path}"),
            },
            host: host.to_owned(),
        }
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A connection to a target: plain TCP or TLS.
/// Boxed: with its TLS state the connection is over a kilobyte, and it moves
/// in and out of the pool and the attempt's future once or twice per request.
type Connection = Box<h1::Connection<TokioIo<<Connector as Service<Uri>>::Response>>>;

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
    connector: Connector,
    idle: Mutex<Pool>,
    /// The target has sent something on an idle connection: each of its
    /// connections is peeked at before it is reused. The runtime's readiness
    /// lags the socket until its next poll for events (round 17 of outside
    /// testing saw requests sent up to 1.7 ms after a stray answer had
    /// arrived unseen), and a stray may come at any time after the answer
    /// (round 18: 10-12 ms). A target that never does it costs nothing.
    look_closer: AtomicBool,
    max_idle: usize,
    /// Extra headers and client certificate (`--bot-header` and the like).
    extras: crate::outgoing::TargetExtras,
}

#[derive(Default)]
struct Pool {
    /// Most recently used last.
    idle: VecDeque<Idle>,
    /// Where the next look for stale connections starts.
    scan: usize,
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
                idle: Mutex::default(),
                look_closer: AtomicBool::new(false),
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
        let request = self.request(webhook_id, now, &body, keys, extra)?;
        drop(body);
        let mut deadline = tokio::time::Instant::now() + timeout;
        let budget = self.inner.budget.as_ref();
        let (mut connection, mut generation, mut reused) = self.connection(true, deadline).await?;
        let reply = loop {
            match connection
                .exchange(&request, budget, &mut deadline, now)
                .await
            {
                Ok(reply) => break reply,
                // A kept-alive connection the target closed while it was
                // idle: sent again on a new one, once.
                Err(h1::Error::Unanswered(_)) if reused => {
                    (connection, generation, reused) = self.connection(false, deadline).await?;
                }
                Err(h1::Error::Unanswered(e)) => return Err(Failure::Network(e)),
                Err(h1::Error::Failed(failure)) => return Err(failure),
            }
        };
        if reply.reusable {
            self.give_back(connection, generation);
        }
        if reply.status.is_success() {
            Ok((reply.status, reply.answer))
        } else {
            Err(Failure::Status {
                status: reply.status,
                retry_after: reply.retry_after,
            })
        }
    }

    /// The whole request, head and body, signed with every key in `keys`.
    fn request(
        &self,
        webhook_id: &str,
        now: SystemTime,
        body: &[u8],
        keys: &[SigningKey],
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<Vec<u8>, Failure> {
        // The id is the relay's own; checked all the same, since it is
        // written into the head as it is.
        if !webhook_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Failure::Network(format!(
                "cannot build request: the message id {webhook_id:?} is not a header value"
            )));
        }
        let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let endpoint = &self.inner.endpoint;
        let user = self.inner.extras.headers();
        let headers = || extra.iter().map(|(n, v)| (n, v)).chain(user.iter());
        let extra_len: usize = headers().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        let mut head = String::with_capacity(
            256 + endpoint.path.len()
                + endpoint.host.len()
                + webhook_id.len()
                + signature_header_len(keys.len())
                + extra_len
                + body.len(),
        );
        // Pieced together rather than formatted: this runs for every request.
        head.push_str("POST ");
        head.push_str(&endpoint.path);
        head.push_str(" HTTP/1.1\r\nhost: ");
        head.push_str(&endpoint.host);
        head.push_str("\r\ncontent-type: application/json\r\n");
        if !user.contains_key(header::USER_AGENT) {
            head.push_str(concat!(
                "user-agent: botrelay/",
                env!("CARGO_PKG_VERSION"),
                "\r\n"
            ));
        }
        head.push_str("webhook-id: ");
        head.push_str(webhook_id);
        head.push_str("\r\nwebhook-timestamp: ");
        head.push_str(itoa::Buffer::new().format(timestamp));
        head.push_str("\r\nwebhook-signature: ");
        signature_header_into(&mut head, keys, webhook_id, timestamp, body);
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        // None is one the relay sets (refused at start), but for
        // `user-agent`, which a user header replaces. Values may hold any
        // byte but controls: written as they are.
        for (name, value) in headers() {
            raw.extend_from_slice(name.as_str().as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(value.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"content-length: ");
        raw.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        raw.extend_from_slice(b"\r\n\r\n");
        raw.extend_from_slice(body);
        Ok(raw)
    }

    /// Which client certificate new connections present: a connection
    /// made with another is not reused (a rotated certificate is in use
    /// from the next request on, even on a target that is never idle).
    fn cert_generation(&self) -> u64 {
        self.inner.extras.cert_generation()
    }

    /// An idle connection (if `reuse` and there is one) or a new one, the
    /// certificate generation it was made with, and whether it was idle.
    async fn connection(
        &self,
        reuse: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(Connection, u64, bool), Failure> {
        let current = self.cert_generation();
        if reuse {
            loop {
                let idle = self.inner.idle.lock().expect("pool lock").idle.pop_back();
                let Some(Idle {
                    connection,
                    since,
                    generation,
                }) = idle
                else {
                    break;
                };
                let mut connection = connection;
                if since.elapsed() >= IDLE_TIMEOUT || generation != current {
                    continue;
                }
                let peek = self.inner.look_closer.load(Ordering::Relaxed);
                if self.usable(&mut connection, peek) {
                    return Ok((connection, generation, true));
                }
            }
        }
        // Boxed: opening a connection is rare, and its future is large; kept
        // inline, it would make every attempt's task that much larger to move.
        let opened = tokio::time::timeout_at(deadline, Box::pin(self.open()))
            .await
            .unwrap_or(Err(Failure::Timeout))?;
        Ok((opened, current, false))
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
        let socket = match &stream {
            MaybeHttpsStream::Http(tcp) => tcp.inner().as_raw_fd(),
            MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner().as_raw_fd(),
        };
        Ok(Box::new(h1::Connection::with_socket(
            TokioIo::new(stream),
            socket,
        )))
    }

    /// Whether an idle connection can carry a request (see
    /// [`h1::Connection::idle_state`]). The first time the target is found
    /// to have sent something on one, its connections are peeked at from
    /// then on, and a warning says so.
    fn usable(&self, connection: &mut Connection, peek: bool) -> bool {
        match connection.idle_state(peek) {
            h1::IdleState::Idle => true,
            h1::IdleState::Closed => false,
            h1::IdleState::Spoke => {
                if !self.inner.look_closer.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        target_host = %self.inner.endpoint.host,
                        "the target sent data on an idle kept-alive connection, with no request to answer; \
                         such connections are closed, and each connection is now checked before it is reused"
                    );
                }
                false
            }
        }
    }

    fn give_back(&self, connection: Connection, generation: u64) {
        if generation != self.cert_generation() {
            return;
        }
        let mut pool = self.inner.idle.lock().expect("pool lock");
        let Pool { idle, scan } = &mut *pool;
        let now = Instant::now();
        // Each return looks at two more of the idle connections, in turn, and
        // lets go of those stale or closed by the target, rather than hold
        // their sockets until a burst reaches that deep into the pool.
        for _ in 0..2.min(idle.len()) {
            let at = *scan % idle.len();
            let entry = &mut idle[at];
            if now.saturating_duration_since(entry.since) >= IDLE_TIMEOUT
                || !self.usable(&mut entry.connection, false)
            {
                idle.remove(at);
            } else {
                *scan = at + 1;
            }
        }
        if idle.len() < self.inner.max_idle {
            idle.push_back(Idle {
                connection,
                since: now,
                generation,
            });
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_written_whole_with_its_signature() {
        let url: Uri = "http://user:pw@bot.example:8080/hook?x=1".parse().unwrap();
        let sender = Sender::new(Endpoint::new(&url), None, Duration::from_secs(1), 1);
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_614_265_330);
        let body = br#"{"test": 2432232314}"#;
        let trace = [(
            HeaderName::from_static("traceparent"),
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )];
        let raw = sender
            .request("msg_p5jXN8AQM9LWM0D4loKWxJek", at, body, &[key], &trace)
            .unwrap();
        let expected = format!(
            "POST /hook?x=1 HTTP/1.1\r\nhost: bot.example:8080\r\ncontent-type: application/json\r\n\
             user-agent: botrelay/{}\r\nwebhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\r\n\
             webhook-timestamp: 1614265330\r\n\
             webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\r\n\
             traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
             content-length: 20\r\n\r\n{{\"test\": 2432232314}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(String::from_utf8(raw).unwrap(), expected);
        // Nothing that would end a header line goes into the head.
        assert!(sender.request("id\r\nx: y", at, body, &[], &[]).is_err());
        let bare: Uri = "http://bot".parse().unwrap();
        let sender = Sender::new(Endpoint::new(&bare), None, Duration::from_secs(1), 1);
        let raw = sender.request("id", at, b"", &[], &[]).unwrap();
        assert!(raw.starts_with(b"POST / HTTP/1.1\r\nhost: bot\r\n"));
    }
}
