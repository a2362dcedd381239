//! The admin port: `/metrics`, `/healthz`, `/readyz`, and the dead letters
//! (`GET /dead-letters`, `POST /dead-letters/redrive`, `POST
//! /dead-letters/discard`, behind a client token), and the targets' state
//! (`GET /targets`; `POST /targets/{bot|response}/{pause|resume}`, behind a
//! client token).

use crate::api::json;
use crate::credentials::{CredentialStore, bearer};
use crate::delivery::control::Controls;
use crate::delivery::now_ms;
use crate::metrics::Metrics;
use crate::serve::Body;
use crate::store::{Op, Outcome, Seq, Store, Target};
use crate::wire;
use crate::writer::Writer;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Dead letters listed by one `GET /dead-letters`: by default, and at most.
const LIST_LIMIT: usize = 1000;
const LIST_LIMIT_MAX: usize = 10_000;

pub struct Admin {
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    pub credentials: CredentialStore,
    pub metrics: Metrics,
    pub draining: Arc<AtomicBool>,
    pub targets: Arc<Controls>,
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, wire::error_body(code, message))
}

/// Largest body of a redrive or discard: room for thousands of ids.
const MAX_ADMIN_BODY: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChosenBody {
    /// Message ids of the dead letters to act on. Required in a body: a
    /// mistyped key must not read as "all of them" (that is no body at all).
    ids: Vec<String>,
}

const DEAD_LETTER_PATHS: [&str; 3] = [
    "/dead-letters",
    "/dead-letters/redrive",
    "/dead-letters/discard",
];

/// The method a path of the admin port takes; `None` for an unknown path.
fn allowed_method(path: &str) -> Option<&'static str> {
    match path {
        "/metrics" | "/healthz" | "/readyz" | "/dead-letters" | "/targets" => Some("GET"),
        "/dead-letters/redrive" | "/dead-letters/discard" => Some("POST"),
        _ => None,
    }
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => self.metrics_page(),
            // A store that failed takes no more writes until a restart: the
            // relay is neither alive nor ready then, so that it gets restarted.
            (&Method::GET, "/healthz" | "/readyz") if self.store.failure().is_some() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "store failed\n")
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if let Some(problem) = self.store.unavailable() {
                    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "");
                    *r.body_mut() =
                        Full::new(Bytes::from(format!("store unavailable: {problem}\n")));
                    r
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::GET, "/targets") => json(StatusCode::OK, self.targets.describe().to_string()),
            (_, path) if target_action(path).is_some() => self.target_action(req).await,
            (_, path) if DEAD_LETTER_PATHS.contains(&path) && !self.authorized(&req) => error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the dead-letter API needs `Authorization: Bearer <client-token>`",
            ),
            (&Method::GET, "/dead-letters") => self.list(req.uri().query()).await,
            (&Method::POST, "/dead-letters/redrive") => self.redrive(req).await,
            (&Method::POST, "/dead-letters/discard") => self.discard(req).await,
            (_, path) => match allowed_method(path) {
                Some(allowed) => {
                    let mut answer = error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        &format!("{path} takes {allowed} only"),
                    );
                    answer
                        .headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static(allowed));
                    answer
                }
                None => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
            },
        }
    }

    /// `POST /targets/{bot|response}/{pause|resume}`: answers with the
    /// target's object of `GET /targets`.
    async fn target_action(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        let Some((target, action)) = target_action(path) else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such path");
        };
        if !self.authorized(&req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "pausing and resuming a target needs `Authorization: Bearer <client-token>`",
            );
        }
        if req.method() != Method::POST {
            let mut answer = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{path} takes POST only"),
            );
            answer
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return answer;
        }
        let control = self.targets.get(target);
        let done = match action {
            TargetAction::Pause => control.pause().await,
            TargetAction::Resume => control.resume().await,
        };
        match done {
            Ok(body) => json(StatusCode::OK, body.to_string()),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &match action {
                    TargetAction::Pause => format!("cannot store the pause: {e}"),
                    TargetAction::Resume => format!("cannot remove the stored pause: {e}"),
                },
            ),
        }
    }

    fn metrics_page(&self) -> Response<Body> {
        // The dead-letter gauge is read from the store, so it is right after a
        // restart and after redrives without bookkeeping elsewhere.
        if let Ok(counts) = self.store.dead_letter_counts() {
            for target in Target::ALL {
                self.metrics
                    .dead_letters
                    .with_label_values(&[target.as_str()])
                    .set(counts.get(target) as i64);
            }
        }
        self.metrics
            .conversations
            .set(self.store.conversation_count() as i64);
        self.metrics
            .dedupe_entries
            .set(self.store.dedupe_count() as i64);
        if let Some(usage) = self.store.usage() {
            self.metrics.store_file_bytes.set(usage.file_bytes as i64);
            self.metrics.store_live_bytes.set(usage.live_bytes as i64);
        }
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8"
                .parse()
                .expect("valid"),
        );
        r
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        bearer(req.headers().get(header::AUTHORIZATION))
            .is_some_and(|token| self.credentials.current().client_tokens.accepts(token))
    }

    /// `GET /dead-letters[?limit=N][&after=CURSOR]`: a page of dead letters,
    /// oldest first, with `next` (the cursor of the following page) when
    /// more may follow, and `total`, how many are held.
    async fn list(&self, query: Option<&str>) -> Response<Body> {
        let (from, limit) = match page(query) {
            Ok(page) => page,
            Err(problem) => return error(StatusCode::BAD_REQUEST, "invalid_request", &problem),
        };
        let store = self.store.clone();
        let listed = tokio::task::spawn_blocking(move || page_of(&*store, from, limit)).await;
        match listed {
            Ok(Ok((letters, total))) => {
                let items: Vec<_> = letters
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "id": l.message_id,
                            "target": l.target,
                            "conversationId": l.conversation_id,
                            "reason": l.reason,
                            "deadAt": wire::rfc3339(l.dead_at_ms),
                        })
                    })
                    .collect();
                let mut body = serde_json::json!({
                    "deadLetters": items,
                    "total": total,
                });
                if letters.len() == limit
                    && let Some(last) = letters.last()
                {
                    body["next"] = (last.seq + 1).to_string().into();
                }
                json(StatusCode::OK, body.to_string())
            }
            Ok(Err(e)) => store_unavailable(e),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            ),
        }
    }

    /// The dead letters a redrive or discard is for: `None` for all of them
    /// (no body), or those whose message ids the body lists. An error answer
    /// when the body is not one of those or the store cannot list them.
    async fn chosen(&self, req: Request<Incoming>) -> Result<Option<Vec<Seq>>, Response<Body>> {
        let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                // Not read to its end: the connection is not reused.
                let mut refused = error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!("body is larger than {MAX_ADMIN_BODY} bytes"),
                );
                refused.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Err(refused);
            }
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &e.to_string(),
                ));
            }
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        // An array would be read into the struct field by field.
        let object = body.trim_ascii_start().starts_with(b"{");
        let parsed = match object {
            true => serde_json::from_slice::<ChosenBody>(&body).map_err(|e| e.to_string()),
            false => Err("the body is not a JSON object".into()),
        };
        let ids: HashSet<String> = match parsed {
            Ok(ChosenBody { ids }) => ids.into_iter().collect(),
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("expected {{\"ids\": [\"<message id>\", ...]}} or no body: {e}"),
                ));
            }
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.dead_letters(0, usize::MAX)).await {
            Ok(Ok(letters)) => Ok(Some(
                letters
                    .into_iter()
                    .filter(|l| ids.contains(&l.message_id))
                    .map(|l| l.seq)
                    .collect(),
            )),
            _ => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "cannot list dead letters",
            )),
        }
    }

    async fn redrive(&self, req: Request<Incoming>) -> Response<Body> {
        let seqs = match self.chosen(req).await {
            Ok(seqs) => seqs,
            Err(answer) => return answer,
        };
        let redriven = match self
            .writer
            .commit(Op::Redrive {
                seqs,
                now_ms: now_ms(),
            })
            .await
        {
            Ok(Outcome::Queued(due)) => due.len(),
            Ok(_) => 0,
            Err(e) => return store_unavailable(e),
        };
        tracing::info!(count = redriven, "dead letters redriven");
        json(
            StatusCode::OK,
            serde_json::json!({ "redriven": redriven }).to_string(),
        )
    }

    async fn discard(&self, req: Request<Incoming>) -> Response<Body> {
        let seqs = match self.chosen(req).await {
            Ok(seqs) => seqs,
            Err(answer) => return answer,
        };
        let discarded = match self.writer.commit(Op::Discard { seqs }).await {
            Ok(Outcome::Discarded(n)) => n,
            Ok(_) => 0,
            Err(e) => return store_unavailable(e),
        };
        if discarded > 0 {
            tracing::warn!(count = discarded, "dead letters discarded for good");
        } else {
            tracing::info!("a discard found no dead letter to take");
        }
        json(
            StatusCode::OK,
            serde_json::json!({ "discarded": discarded }).to_string(),
        )
    }
}

enum TargetAction {
    Pause,
    Resume,
}

/// The target and action of a `/targets/{bot|response}/{pause|resume}` path.
fn target_action(path: &str) -> Option<(Target, TargetAction)> {
    let (target, action) = path.strip_prefix("/targets/")?.split_once('/')?;
    let target = match target {
        "bot" => Target::Bot,
        "response" => Target::Response,
        _ => return None,
    };
    let action = match action {
        "pause" => TargetAction::Pause,
        "resume" => TargetAction::Resume,
        _ => return None,
    };
    Some((target, action))
}

/// A page of dead letters and how many are held in all.
fn page_of(
    store: &dyn Store,
    from: Seq,
    limit: usize,
) -> Result<(Vec<crate::store::DeadLetter>, u64), crate::store::StoreError> {
    let (letters, counts) = store.dead_letter_page(from, limit)?;
    Ok((letters, counts.bot + counts.response))
}

/// The first position and the size of the page a list query asks for.
fn page(query: Option<&str>) -> Result<(Seq, usize), String> {
    let (mut from, mut limit) = (0, LIST_LIMIT);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
                    .ok_or(format!("limit must be a number from 1 to {LIST_LIMIT_MAX}"))?
            }
            "after" => {
                from = value
                    .parse()
                    .map_err(|_| "after must be the `next` of the page before".to_string())?
            }
            other => return Err(format!("unknown parameter `{other}`; use limit and after")),
        }
    }
    Ok((from, limit))
}

fn store_unavailable(e: impl std::fmt::Display) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        &e.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, InboundMessage, Pending};

    fn waiting(id: &str) -> Op {
        let raw = |s: &str| serde_json::value::RawValue::from_string(s.to_owned()).unwrap();
        Op::Accept {
            message: InboundMessage {
                id: format!("id-{id}"),
                conversation_id: format!("conv-{id}"),
                user_id: "user".into(),
                caller_conversation_id: id.into(),
                caller_user_id: "u".into(),
                caller_message_id: id.into(),
                kind: "text".into(),
                text: "hi".into(),
                payload: raw(r#"{"text":"hi"}"#),
                created_at_ms: 1,
                queued_at_ms: 1,
                trace: None,
                waited: false,
            },
            dedupe_window_ms: 1000,
        }
    }

    fn dead(due: &[Pending]) -> Vec<Op> {
        due.iter()
            .map(|p| Op::DeadLetter {
                target: p.target,
                seq: p.seq,
                reason: "test".into(),
                now_ms: 2,
            })
            .collect()
    }

    /// While dead letters are redriven and fail again, a listing of them all
    /// counts exactly what it lists: `total` and the items come from one
    /// moment of the store.
    #[test]
    fn a_listing_counts_what_it_lists_while_letters_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let accepted = store
            .commit((0..20).map(|i| waiting(&format!("m{i}"))).collect())
            .unwrap();
        let due: Vec<Pending> = accepted.iter().flat_map(|o| o.due().to_vec()).collect();
        store.commit(dead(&due)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let redriven = store
                        .commit(vec![Op::Redrive {
                            seqs: None,
                            now_ms: 2,
                        }])
                        .unwrap();
                    store.commit(dead(redriven[0].due())).unwrap();
                }
            })
        };
        let mut contradictions = 0;
        for _ in 0..30_000 {
            let (letters, total) = page_of(&*store, 0, LIST_LIMIT).unwrap();
            if letters.len() as u64 != total {
                contradictions += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        assert_eq!(
            contradictions, 0,
            "listings whose total was not their length"
        );
    }
}
