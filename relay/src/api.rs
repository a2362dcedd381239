//! The API port: clients post user messages (`POST /`, `POST /v1/messages`),
//! bots post messages of their own (`POST /v1/bot/messages`).

use crate::credentials::{CredentialStore, Tokens, bearer};
use crate::delivery::{FailureLog, Queues, now_ms};
use crate::disk::DiskGuard;
use crate::ids;
use crate::metrics::Metrics;
use crate::serve::Body;
use crate::store::{InboundMessage, Op, OutboundMessage, Outcome, Store};
use crate::trace::TraceContext;
use crate::wire::{self, BotMessage, ClientMessage, Invalid};
use crate::writer::{CommitError, Writer};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A body over the limit by at most this factor is read and dropped before the
/// `413`, so that the connection survives it.
const DRAIN_FACTOR: usize = 4;

pub struct Api {
    pub credentials: CredentialStore,
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    pub queues: Queues,
    pub metrics: Metrics,
    pub draining: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    pub max_pending: usize,
    pub dedupe_window: Duration,
    /// The embedded store's volume; `None` with the memory store.
    pub disk: Option<Arc<DiskGuard>>,
    /// Traces of conversations and the clients waiting for replies.
    pub turns: Arc<crate::turns::Turns>,
    /// The longest `?wait=` a client may ask for (`--max-wait`); zero: none.
    pub max_wait: Duration,
    /// Replies one waiting client gets at most (`--max-replies-per-answer`).
    pub max_replies: usize,
}

/// A request that is answered with an error; `code` is stable for programs,
/// `message` is for people.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// The `outcome` label of `botrelay_messages_received_total`, when the request counts as a message.
    outcome: Option<&'static str>,
    /// Whether the request body was read in full. When it was not, the
    /// connection cannot carry another request, and the answer says so.
    body_read: bool,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            outcome: None,
            body_read: false,
        }
    }

    fn after_body(mut self) -> Self {
        self.body_read = true;
        self
    }

    fn counted(mut self, outcome: &'static str) -> Self {
        self.outcome = Some(outcome);
        self
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, wire::error_body(self.code, &self.message));
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if !self.body_read {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

impl From<Invalid> for Refusal {
    fn from(invalid: Invalid) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", invalid.0)
            .counted("invalid")
            .after_body()
    }
}

/// Counts a client message the store took, when it goes out of scope: on
/// the way to its answer, or when the client went away while the message was
/// being made durable (it is stored and delivered all the same).
struct Received<'a> {
    api: &'a Api,
    outcome: Option<&'static str>,
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome {
            self.api.received("client", outcome);
        }
    }
}

pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Root,
    Messages,
    BotMessages,
    Other,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/" => Route::Root,
            "/v1/messages" => Route::Messages,
            "/v1/bot/messages" => Route::BotMessages,
            _ => Route::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Root => "/",
            Route::Messages => "/v1/messages",
            Route::BotMessages => "/v1/bot/messages",
            Route::Other => "other",
        }
    }

    fn source(self) -> &'static str {
        if self == Route::BotMessages {
            "bot"
        } else {
            "client"
        }
    }
}

impl Api {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let route = Route::of(req.uri().path());
        let result = match (route, req.method()) {
            (Route::Other, _) => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such path: {}; messages go to POST /v1/messages",
                    req.uri().path()
                ),
            )),
            (_, &Method::POST) => match route {
                Route::BotMessages => self.bot_message(req).await,
                _ => self.client_message(req).await,
            },
            (_, method) => Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here; use POST"),
            )),
        };
        let response = match result {
            Ok(response) => response,
            Err(refusal) => {
                if let Some(outcome) = refusal.outcome {
                    self.received(route.source(), outcome);
                }
                tracing::debug!(route = route.label(), status = refusal.status.as_u16(), code = refusal.code, message = %refusal.message, "request refused");
                refusal.into_response()
            }
        };
        self.metrics
            .http_requests
            .with_label_values(&[route.label(), response.status().as_str()])
            .inc();
        self.metrics
            .http_request_duration
            .with_label_values(&[route.label()])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    fn received(&self, source: &str, outcome: &str) {
        self.metrics
            .messages_received
            .with_label_values(&[source, outcome])
            .inc();
    }

    /// The checks every message goes through before its body is read:
    /// not draining, and the right token.
    fn admit(
        &self,
        req: &Request<Incoming>,
        tokens: impl Fn(&crate::credentials::Credentials) -> &Tokens,
    ) -> Result<(), Refusal> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the relay is shutting down; retry against another instance or shortly",
            )
            .retry_after(5)
            .counted("rejected"));
        }
        let credentials = self.credentials.current();
        match bearer(req.headers().get(header::AUTHORIZATION)) {
            None => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing `Authorization: Bearer <token>` header",
                )
                .counted("unauthorized"));
            }
            Some(token) if !tokens(&credentials).accepts(token) => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "invalid token",
                )
                .counted("unauthorized"));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The back-pressure refusal due now, if any: the store's disk is nearly
    /// full, or `--max-pending` messages wait.
    fn pressure(&self) -> Result<(), Refusal> {
        if self.disk.as_ref().is_some_and(|disk| disk.low()) {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_full",
                "the relay's disk is nearly full; retry later",
            )
            .retry_after(5)
            .counted("rejected"));
        }
        if self.queues.pending() >= self.max_pending {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "{} messages are waiting for delivery; retry later",
                    self.max_pending
                ),
            )
            .retry_after(1)
            .counted("rejected"));
        }
        Ok(())
    }

    /// Reads the body up to `--max-body-bytes`. A body over the limit but within
    /// `DRAIN_FACTOR` times it is read to its end and dropped before the `413`,
    /// so the connection stays usable and the client, still sending, gets the
    /// answer rather than a reset; a larger one is refused at once and the
    /// connection closed.
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Refusal> {
        let limit = self.max_body_bytes;
        let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("body is larger than {limit} bytes"),
            )
            .counted("too_large")
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > drain_limit as u64) {
            return Err(too_large());
        }
        let read = async {
            let mut body = req.into_body();
            let mut first: Option<Bytes> = None;
            let mut joined = BytesMut::new();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("could not read the body: {e}"),
                    )
                    .counted("invalid")
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len();
                if total > drain_limit {
                    return Err(too_large());
                }
                if total > limit {
                    continue; // read to the end, keep nothing
                }
                // Most bodies come in one piece: keep it without copying.
                match first.take() {
                    None if joined.is_empty() => first = Some(data),
                    held => {
                        if let Some(held) = held {
                            joined.extend_from_slice(&held);
                        }
                        joined.extend_from_slice(&data);
                    }
                }
            }
            if total > limit {
                return Err(too_large().after_body());
            }
            Ok(first.unwrap_or_else(|| joined.freeze()))
        };
        match tokio::time::timeout(self.body_read_timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the body did not arrive in time",
            )
            .counted("invalid")),
        }
    }

    /// A duplicate stores nothing, so back-pressure is no reason to refuse
    /// it: under pressure, its first answer if it is one, else `refusal`.
    fn duplicate_or(
        &self,
        message_id: &str,
        now: u64,
        refusal: Refusal,
    ) -> Result<Response<Body>, Refusal> {
        let window = self.dedupe_window.as_millis() as u64;
        match self.store.first_answer(message_id, now, window) {
            Ok(Some(answer)) => {
                self.received("client", "duplicate");
                Ok(json(StatusCode::OK, answer))
            }
            Ok(None) => Err(refusal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a messageId under back-pressure");
                Err(refusal)
            }
        }
    }

    async fn client_message(&self, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        self.admit(&req, |c| &c.client_tokens)?;
        let wait = crate::turns::wait_param(req.uri().query(), self.max_wait);
        // An invalid trace context is ignored: the message starts a trace.
        let trace = TraceContext::from_headers(req.headers()).unwrap_or_else(TraceContext::fresh);
        let body = self.read_body(req).await?;
        let wait = wait.map_err(Invalid)?;
        let m = ClientMessage::parse(&body)?;
        let now = now_ms();
        if let Err(refusal) = self.pressure() {
            return self.duplicate_or(&m.message_id, now, refusal.after_body());
        }
        let message = InboundMessage {
            id: ids::message_id(),
            conversation_id: ids::conversation_id(&m.conversation_id),
            user_id: ids::user_id(&m.user_id),
            caller_conversation_id: m.conversation_id,
            caller_user_id: m.user_id,
            caller_message_id: m.message_id,
            kind: m.kind,
            text: m.text,
            payload: m.payload,
            created_at_ms: now,
            queued_at_ms: now,
            trace: Some(trace),
            waited: wait.is_some(),
        };
        let answer = wire::accept_answer(&message);
        // Registered before the message is stored, so that no reply can
        // come before it.
        let mut waiting = wait.map(|wait| {
            let waiting =
                self.turns
                    .wait_for(&message.conversation_id, &message.id, self.max_replies);
            (waiting, tokio::time::Instant::now() + wait)
        });
        if let Some((waiting, _)) = &mut waiting {
            waiting.listen_to_replicas().await;
        }
        let trace_id = message
            .trace
            .as_ref()
            .map(|t| t.trace_id().to_owned())
            .unwrap_or_default();
        // Kept for a lookup when the store is too busy to take the message.
        let caller_message_id = message.caller_message_id.clone();
        let op = Op::Accept {
            message,
            dedupe_window_ms: self.dedupe_window.as_millis() as u64,
        };
        let mut received = Received {
            api: self,
            outcome: None,
        };
        let committed = self
            .writer
            .try_commit_noting(op, |outcome| {
                received.outcome = Some(match outcome {
                    Outcome::Duplicate { .. } => "duplicate",
                    _ => "accepted",
                });
            })
            .await;
        match committed {
            // The first answer, at once: its replies went to whoever waited then.
            Ok(Outcome::Duplicate { answer }) => Ok(json(StatusCode::OK, answer)),
            Ok(_) => {
                tracing::debug!(message_id = %caller_message_id, %trace_id, "message accepted");
                let Some((waiting, deadline)) = waiting else {
                    return Ok(json(StatusCode::OK, answer));
                };
                waiting.accepted();
                // The message is stored: the client sees it even if it goes
                // away now, so the received count is settled first.
                drop(received);
                let got = waiting.collect(deadline).await;
                if got.left_out > 0 {
                    tracing::debug!(message_id = %caller_message_id, left_out = got.left_out, "more replies than --max-replies-per-answer; the answer has the first ones");
                }
                Ok(json(
                    StatusCode::OK,
                    crate::turns::answer_with_replies(&answer, &got.replies),
                ))
            }
            Err(CommitError::Busy) => {
                received.outcome = None;
                drop(received);
                self.duplicate_or(&caller_message_id, now, unavailable(CommitError::Busy))
            }
            Err(e) => {
                received.outcome = None;
                Err(unavailable(e))
            }
        }
    }

    async fn bot_message(&self, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        self.admit(&req, |c| &c.bot_tokens)?;
        self.pressure()?;
        let trace = TraceContext::from_headers(req.headers());
        let body = self.read_body(req).await?;
        let m = BotMessage::parse(&body)?;
        let store = self.store.clone();
        let id = m.conversation_id.clone();
        let conversation = tokio::task::spawn_blocking(move || store.conversation(&id))
            .await
            .map_err(|e| unavailable(CommitError::Store(e.to_string())))?
            .map_err(|e| unavailable(CommitError::Store(e.to_string())))?
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    "unknown_conversation",
                    format!("no conversation {}; use the relay's conversationId from the message the bot received", m.conversation_id),
                )
                .counted("unknown_conversation")
                .after_body()
            })?;
        let now = now_ms();
        // The bot's own trace context, or the trace of the conversation's
        // latest user message (as this replica saw it), or a new one.
        let trace = trace
            .or_else(|| self.turns.traces.latest(&conversation.id))
            .unwrap_or_else(TraceContext::fresh);
        let message = OutboundMessage {
            id: ids::message_id(),
            conversation_id: conversation.id,
            caller_conversation_id: conversation.caller_id,
            user_id: conversation.user_id,
            kind: m.kind,
            payload: m.payload,
            created_at_ms: now,
            queued_at_ms: now,
            trace: Some(trace),
        };
        let id = message.id.clone();
        let waited = self
            .turns
            .post_wanted(&message.conversation_id)
            .then(|| message.clone());
        self.writer
            .try_commit(Op::AddOutbound { message })
            .await
            .map_err(unavailable)?;
        if let Some(message) = waited {
            self.turns.bot_posted(&message);
        }
        self.received("bot", "accepted");
        Ok(json(
            StatusCode::ACCEPTED,
            serde_json::json!({ "id": id }).to_string(),
        ))
    }
}

/// Refusals for want of a store, as logged.
static STORE_REFUSALS: FailureLog = FailureLog::new(Duration::from_secs(1));

/// Logs the refusals for want of a store that went without a line, once the
/// second since the last is over: the last of a burst are reported too.
pub fn log_unreported_refusals(now: u64) {
    if let Some(unlogged) = STORE_REFUSALS.unreported(now) {
        tracing::warn!(
            unlogged,
            "more messages could not be stored since the last line; their clients were told to retry"
        );
    }
}

fn unavailable(e: CommitError) -> Refusal {
    let refusal = match e {
        CommitError::Busy => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many messages arriving at once; retry shortly",
        ),
        CommitError::Closed => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the relay is shutting down; retry shortly",
        ),
        CommitError::TooLarge(problem) => {
            return Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", problem)
                .counted("too_large")
                .after_body();
        }
        CommitError::Store(problem) => {
            // Every request meets it while the store is unavailable (NATS
            // down, or a replica starting): one line a second says so.
            if let Some(unlogged) = STORE_REFUSALS.admit(now_ms()) {
                tracing::warn!(
                    %problem,
                    unlogged,
                    "a message could not be stored; the client was told to retry (one line a second at most: unlogged counts those since the last)"
                );
            }
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the message could not be stored; retry shortly",
            )
        }
    };
    // Only reached once the body was read.
    refusal.retry_after(1).counted("rejected").after_body()
}
