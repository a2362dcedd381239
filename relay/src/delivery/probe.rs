//! Reachability probes: at start and every `--probe-interval`, one signed
//! request to each target that carries no message, so that `/targets` and
//! the metrics say whether a target answers before (or without) any delivery.
//! A probe does not open or close the breaker: that follows deliveries only,
//! since a target may answer a probe and still fail real messages (or the
//! other way round).

use super::control::{ProbeResult, TargetControl};
use super::http::{Failure, Sender};
use super::now_ms;
use crate::credentials::CredentialStore;
use crate::store::Target;
use crate::{ids, wire};
use http::{HeaderName, HeaderValue};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The header that marks a probe, for receivers to tell it apart.
pub const PROBE_HEADER: HeaderName = HeaderName::from_static("botrelay-probe");

pub struct Prober {
    pub target: Target,
    pub sender: Sender,
    pub credentials: CredentialStore,
    pub timeout: Duration,
    pub control: Arc<TargetControl>,
}

impl Prober {
    /// Probes now and then every `interval`, for good.
    pub async fn run(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = self.probe().await;
            let label = self.target.as_str();
            match &result.error {
                None => tracing::debug!(
                    to = label,
                    status = result.status,
                    duration_ms = result.duration_ms,
                    "probe answered"
                ),
                Some(error) => {
                    tracing::info!(to = label, status = result.status, %error, "probe failed")
                }
            }
            self.control.set_probe(result);
        }
    }

    /// One probe: `POST <url>` with `{"type": "botrelay.probe", "id", "createdAt"}`,
    /// signed like a delivery, with `botrelay-probe: 1`.
    pub async fn probe(&self) -> ProbeResult {
        let at_ms = now_ms();
        let id = format!("probe_{}", ids::message_id().replace('-', ""));
        let body = serde_json::json!({
            "type": "botrelay.probe",
            "id": id,
            "createdAt": wire::rfc3339(at_ms),
        })
        .to_string()
        .into_bytes();
        let credentials = self.credentials.current();
        let keys = match self.target {
            Target::Bot => &credentials.bot_signing,
            Target::Response => &credentials.response_signing,
        };
        let started = Instant::now();
        let outcome = self
            .sender
            .post_with(
                &id,
                body,
                keys,
                self.timeout,
                &[(PROBE_HEADER, HeaderValue::from_static("1"))],
            )
            .await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let (ok, status, error) = match outcome {
            Ok((status, _)) => (true, Some(status.as_u16()), None),
            Err(failure) => {
                let status = match &failure {
                    Failure::Status { status, .. } => Some(status.as_u16()),
                    _ => None,
                };
                (false, status, Some(short(&failure)))
            }
        };
        ProbeResult {
            at_ms,
            ok,
            status,
            error,
            duration_ms,
        }
    }
}

/// The failure in a few words ("connection refused", "timed out",
/// "answered 404 Not Found"); the whole chain when it is none of the usual.
fn short(failure: &Failure) -> String {
    let text = failure.to_string();
    let lower = text.to_lowercase();
    for usual in ["connection refused", "connection reset", "timed out"] {
        if lower.contains(usual) && !matches!(failure, Failure::Status { .. }) {
            return usual.to_string();
        }
    }
    text
}
