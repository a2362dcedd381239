//! One signed POST to a bot or a response endpoint.

use super::backoff::parse_retry_after;
use crate::signing::{SigningKey, signature_header};
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest answer body read from a target (a bot's synchronous replies).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

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

#[derive(Clone)]
pub struct Sender {
    client: HttpsClient,
}

impl Sender {
    pub fn new(connect_timeout: Duration, max_idle_per_host: usize) -> Self {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self { client }
    }

    /// POSTs `body` signed with every key in `keys`; returns the 2xx answer's body.
    pub async fn post(
        &self,
        url: &Uri,
        webhook_id: &str,
        body: Vec<u8>,
        keys: &[SigningKey],
        timeout: Duration,
    ) -> Result<Bytes, Failure> {
        let now = SystemTime::now();
        let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let signature = signature_header(keys, webhook_id, timestamp, &body);
        let request = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("botrelay/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Network(format!("cannot build request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Failure::Network(describe(&e)))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now));
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| Failure::Network(format!("reading the answer: {e}")))?
                .to_bytes();
            if status.is_success() {
                Ok(body)
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
