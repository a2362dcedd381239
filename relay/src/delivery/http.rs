//! One signed POST to a bot or a response endpoint.

use super::backoff::parse_retry_after;
use crate::signing::{SigningKey, signature_header};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tower_service::Service;

/// Largest answer body read from a target (a bot's synchronous replies).
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// A target's 2xx answer.
#[derive(Debug)]
pub enum Answer {
    Body(Bytes),
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
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
}

struct Idle {
    connection: Connection,
    since: Instant,
}

/// An idle connection unused for this long is closed rather than reused: the
/// other side may have closed it already.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Sender {
    pub fn new(endpoint: Endpoint, connect_timeout: Duration, max_idle: usize) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no system CA certificates found; https targets will fail");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    rustls_config_without_roots(),
                )
            })
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            inner: Arc::new(SenderInner {
                endpoint,
                connector,
                idle: Mutex::new(Vec::new()),
                max_idle,
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
        headers.insert(WEBHOOK_SIGNATURE, header_value(&signature)?);
        let exchange = async {
            let mut connection = self.connection(true).await?;
            let response = match connection.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    // Not sent: the kept-alive connection was closed by the other
                    // side while idle. Sent again on a new connection, once.
                    Some(request) => {
                        connection = self.connection(false).await?;
                        connection
                            .send_request(request)
                            .await
                            .map_err(|e| Failure::Network(describe(&e)))?
                    }
                    None => return Err(Failure::Network(describe(e.error()))),
                },
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now));
            // The status decides; a body too large to read does not make a
            // 2xx a failure (the target took the request), nor hide the status
            // of one that is not. Its connection is not reused.
            let answer = match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
            {
                Ok(body) => {
                    self.give_back(connection);
                    Answer::Body(body.to_bytes())
                }
                Err(e) if e.is::<LengthLimitError>() => Answer::TooLarge,
                Err(e) => return Err(Failure::Network(format!("reading the answer: {e}"))),
            };
            if status.is_success() {
                Ok(answer)
            } else {
                Err(Failure::Status {
                    status,
                    retry_after,
                })
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// An idle connection ready for a request (if `reuse`), or a new one.
    async fn connection(&self, reuse: bool) -> Result<Connection, Failure> {
        if reuse {
            loop {
                let idle = self.inner.idle.lock().expect("pool lock").pop();
                let Some(Idle {
                    mut connection,
                    since,
                }) = idle
                else {
                    break;
                };
                if since.elapsed() >= IDLE_TIMEOUT || connection.is_closed() {
                    continue;
                }
                // Ready at once unless the last answer's end is still being read;
                // an error means the other side closed it.
                if connection.ready().await.is_ok() {
                    return Ok(connection);
                }
            }
        }
        // Boxed: opening a connection is rare, and its future is large; kept
        // inline, it would make every attempt's task that much larger to move.
        Box::pin(self.open()).await
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
        let (connection, driver) = hyper::client::conn::http1::handshake(stream)
            .await
            .map_err(|e| Failure::Network(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %describe(&e), "connection closed");
            }
        });
        Ok(connection)
    }

    fn give_back(&self, connection: Connection) {
        if connection.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().expect("pool lock");
        if idle.len() < self.inner.max_idle {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }
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
