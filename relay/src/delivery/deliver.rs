//! One delivery attempt of one message, and what follows from its result.

use super::backoff::Backoff;
use super::control::Attempt;
use super::http::{Answer, MAX_ANSWER_BYTES, Sender};
use super::{Finish, Waiting, now_ms};
use crate::credentials::CredentialStore;
use crate::metrics::Metrics;
use crate::store::{Message, Op, OutboundMessage, Seq, Store, Target};
use crate::trace::TraceContext;
use crate::writer::Writer;
use crate::{ids, wire};
use futures::FutureExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Deliverer {
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    /// One per target: `Target::index`.
    pub senders: [Sender; 2],
    pub credentials: CredentialStore,
    pub metrics: Metrics,
    pub bot_timeout: Duration,
    pub response_timeout: Duration,
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub max_age: Duration,
    /// Replies one answer of the bot may carry (`--max-replies-per-answer`).
    pub max_replies: usize,
    /// One per target: `Target::index`.
    pub failure_logs: Arc<[FailureLog; 2]>,
    /// Traces of conversations and the clients waiting for replies.
    pub turns: Arc<crate::turns::Turns>,
}

/// Paces the warnings about failed attempts that will be retried: at most one
/// line per target per interval, which counts the failures logged only at
/// debug since the line before. With a target down and thousands of
/// conversations waiting, the log then says once a second how many attempts
/// failed, instead of a line for each. Dead letters are always logged.
#[derive(Debug)]
pub struct FailureLog {
    interval_ms: u64,
    next_ms: AtomicU64,
    quiet: AtomicU64,
}

impl FailureLog {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            quiet: AtomicU64::new(0),
        }
    }

    /// Whether a failure at `now_ms` gets a warning, and if so how many went
    /// without one since the last.
    pub fn admit(&self, now_ms: u64) -> Option<u64> {
        if self.take_line(now_ms) {
            return Some(self.quiet.swap(0, Ordering::Relaxed));
        }
        self.quiet.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// The failures at `now_ms` that went without a line, once the interval
    /// has passed since the last line: a burst's last failures are reported
    /// even when no other follows them.
    pub fn unreported(&self, now_ms: u64) -> Option<u64> {
        if self.quiet.load(Ordering::Relaxed) == 0 {
            return None;
        }
        if !self.take_line(now_ms) {
            return None;
        }
        Some(self.quiet.swap(0, Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Whether a line may be written at `now_ms` (the interval since the
    /// last is over); if so, the next waits for the interval again. Of
    /// several callers at once, one gets it.
    fn take_line(&self, now_ms: u64) -> bool {
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

impl Default for FailureLog {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

/// Deliveries made that the store could not record, as logged.
static UNRECORDED: FailureLog = FailureLog::new(Duration::from_secs(1));

/// Logs the deliveries the store could not record that went without a line,
/// once the second since the last is over.
pub fn log_unreported_unrecorded(now: u64) {
    if let Some(unlogged) = UNRECORDED.unreported(now) {
        tracing::error!(
            unlogged,
            "more deliveries could not be recorded since the last line; they will be delivered again"
        );
    }
}

/// A message on the way out: the stored message (shared with the
/// scheduler's fresh copy, when there is one) and the body made of it.
struct Outgoing {
    message: Arc<Message>,
    body: Vec<u8>,
}

impl Outgoing {
    fn of(message: Arc<Message>) -> Self {
        let body = match &*message {
            Message::Inbound(m) => wire::bot_request(m),
            Message::Outbound(m) => wire::response_request(m),
        };
        Outgoing { message, body }
    }

    fn id(&self) -> &str {
        match &*self.message {
            Message::Inbound(m) => &m.id,
            Message::Outbound(m) => &m.id,
        }
    }

    fn conversation_id(&self) -> &str {
        match &*self.message {
            Message::Inbound(m) => &m.conversation_id,
            Message::Outbound(m) => &m.conversation_id,
        }
    }

    fn trace(&self) -> Option<&TraceContext> {
        match &*self.message {
            Message::Inbound(m) => m.trace.as_ref(),
            Message::Outbound(m) => m.trace.as_ref(),
        }
    }

    /// Whether its client waits for the replies inline (user messages only).
    fn waited(&self) -> bool {
        matches!(&*self.message, Message::Inbound(m) if m.waited)
    }
}

impl Deliverer {
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Attempts a message once; `failures` attempts of it have failed before.
    /// `fresh` is the message as it was stored, if the scheduler still has it.
    /// Says what follows for the message, and how the attempt went for the
    /// target's breaker.
    pub async fn attempt(
        &self,
        target: Target,
        pending: &Waiting,
        failures: u32,
        fresh: Option<Arc<Message>>,
    ) -> (Finish, Attempt) {
        let label = target.as_str();
        // Counted before the message is read: a store that hands its
        // partition over meanwhile then waits for this attempt to end.
        let _attempting = self.store.attempting(pending.seq);
        let loaded = match fresh {
            Some(message) => Ok(Some(Outgoing::of(message))),
            None => self.load(target, pending.seq),
        };
        let mut outgoing = match loaded {
            Ok(Some(outgoing)) => outgoing,
            // Completed by an earlier attempt whose result was not seen (or redriven elsewhere).
            Ok(None) => return (Finish::Done, Attempt::NotMade),
            Err(e) => {
                tracing::error!(to = label, seq = pending.seq, error = %e, "cannot read a waiting message from the store");
                return (Finish::Retry(self.backoff.max), Attempt::NotMade);
            }
        };
        if failures > 0 {
            self.metrics
                .delivery_retries
                .with_label_values(&[label])
                .inc();
        }
        let credentials = self.credentials.current();
        let (keys, timeout) = match target {
            Target::Bot => (&credentials.bot_signing, self.bot_timeout),
            Target::Response => (&credentials.response_signing, self.response_timeout),
        };
        // A new span of the message's trace per attempt; a message stored
        // before traces were kept gets a trace of its own per attempt.
        let hop = outgoing
            .trace()
            .map_or_else(TraceContext::fresh, TraceContext::child);
        let trace_id = hop.trace_id();
        // Before the bot has the message: a message it posts meanwhile, or
        // later, is in this message's trace.
        if let (Target::Bot, Some(trace)) = (target, outgoing.trace()) {
            self.turns.traces.note(outgoing.conversation_id(), trace);
        }
        if target == Target::Bot {
            self.turns
                .turn_started(outgoing.conversation_id(), outgoing.id());
        }
        let started = Instant::now();
        // Watched from before the request: a replica that gives up the
        // message's partition meanwhile cuts the attempt short.
        let mut revoked = self.store.revoked(pending.seq);
        let headers = hop.headers();
        let body = std::mem::take(&mut outgoing.body);
        let post =
            self.senders[target.index()].post_with(outgoing.id(), body, keys, timeout, &headers);
        let result = match &mut revoked {
            None => post.await,
            Some(revoked) => tokio::select! {
                result = post => result,
                () = revoked.as_mut() => {
                    // Another replica delivers it now; what is left of this
                    // attempt (its connection) is dropped. Done here, as a
                    // message completed elsewhere is: a retry would hold its
                    // conversation's lane, which the partition's next
                    // replay here (a healed cut) queues into, for a backoff.
                    tracing::debug!(to = label, message_id = %outgoing.id(), %trace_id, "delivery cut short: its partition was given up");
                    return (Finish::Done, Attempt::NotMade);
                }
            },
        }
        .map(|(_, answer)| answer);
        self.metrics
            .delivery_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());

        let failure = match result {
            Ok(answer) => {
                self.metrics
                    .delivery_attempts
                    .with_label_values(&[label, "success"])
                    .inc();
                // The lane goes on once the completion is written, without
                // waiting for it to be durable. Writes become durable in the
                // order they are made, and the replies they store are queued
                // for the response endpoint only then, in that order: so the
                // replies to a message still go before those to the next one,
                // and none leaves before it is durable. After a crash, the
                // completions not yet durable are the lane's last few: those
                // messages are sent again, in order, with the same webhook-id.
                let recorded = match target {
                    Target::Bot => {
                        let replies = self.replies(&answer, &outgoing);
                        // Copied only for a client waiting inline.
                        let waited = (outgoing.waited()
                            || self.turns.waiting_here(outgoing.conversation_id()))
                        .then(|| replies.clone());
                        let op = Op::CompleteInbound {
                            seq: pending.seq,
                            replies,
                        };
                        let recorded = self.writer.submit(op).await;
                        if let (Ok(_), Some(replies)) = (&recorded, waited) {
                            self.turns.delivered(
                                outgoing.conversation_id(),
                                outgoing.id(),
                                outgoing.waited(),
                                &replies,
                            );
                        }
                        recorded
                    }
                    Target::Response => {
                        self.writer
                            .submit(Op::CompleteOutbound { seq: pending.seq })
                            .await
                    }
                };
                let finish = match recorded {
                    Ok(_) => {
                        self.metrics
                            .messages_delivered
                            .with_label_values(&[label])
                            .inc();
                        self.metrics
                            .end_to_end_latency
                            .with_label_values(&[label])
                            .observe(
                                now_ms().saturating_sub(pending.created_at_ms) as f64 / 1000.0,
                            );
                        tracing::debug!(to = label, message_id = %outgoing.id(), %trace_id, attempts = failures + 1, "delivered");
                        Finish::Done
                    }
                    // Its partition was given up while the delivery was being
                    // recorded: the message is another replica's to send again
                    // now. Done here, as for an attempt cut short: a retry would
                    // hold its conversation's lane for a backoff.
                    Err(e)
                        if revoked
                            .as_mut()
                            .is_some_and(|r| r.as_mut().now_or_never().is_some()) =>
                    {
                        tracing::debug!(to = label, message_id = %outgoing.id(), %trace_id, error = %e, "delivered, but its partition was given up before it was recorded; its next owner sends it again");
                        Finish::Done
                    }
                    Err(e) => {
                        // Not recorded as delivered: the message is sent again (same
                        // webhook-id), which receivers dedupe on. With the store
                        // down, every delivery under way ends here: one line a
                        // second says how many.
                        match UNRECORDED.admit(now_ms()) {
                            Some(unlogged) => {
                                tracing::error!(to = label, message_id = %outgoing.id(), %trace_id, error = %e, unlogged, "delivered but could not record it; will deliver again")
                            }
                            None => {
                                tracing::debug!(to = label, message_id = %outgoing.id(), %trace_id, error = %e, "delivered but could not record it; will deliver again")
                            }
                        }
                        Finish::Retry(self.backoff.delay(failures, None, &mut rand::rng()))
                    }
                };
                return (finish, Attempt::Succeeded);
            }
            Err(failure) => failure,
        };

        self.metrics
            .delivery_attempts
            .with_label_values(&[label, failure.metric_label()])
            .inc();
        let attempts = failures + 1;
        let age = Duration::from_millis(now_ms().saturating_sub(pending.queued_at_ms));
        let give_up = if attempts >= self.max_attempts {
            Some(format!("{attempts} attempts failed; last: {failure}"))
        } else if age >= self.max_age {
            Some(format!(
                "still failing after {}; last: {failure}",
                humantime::format_duration(Duration::from_secs(age.as_secs()))
            ))
        } else {
            None
        };
        let Some(reason) = give_up else {
            let delay = self
                .backoff
                .delay(failures, failure.retry_after(), &mut rand::rng());
            match self.failure_logs[target.index()].admit(now_ms()) {
                Some(unlogged) => tracing::warn!(
                    to = label,
                    message_id = %outgoing.id(),
                    conversation_id = %outgoing.conversation_id(),
                    %trace_id,
                    attempt = attempts,
                    error = %failure,
                    retry_in_ms = delay.as_millis() as u64,
                    failed_since_last_warning = unlogged,
                    "delivery failed; will retry"
                ),
                None => tracing::debug!(
                    to = label,
                    message_id = %outgoing.id(),
                    conversation_id = %outgoing.conversation_id(),
                    %trace_id,
                    attempt = attempts,
                    error = %failure,
                    retry_in_ms = delay.as_millis() as u64,
                    "delivery failed; will retry"
                ),
            }
            return (Finish::Retry(delay), Attempt::Failed);
        };
        let op = Op::DeadLetter {
            target,
            seq: pending.seq,
            reason: reason.clone(),
            now_ms: now_ms(),
        };
        let finish = match self.writer.commit(op).await {
            Ok(_) => {
                self.metrics
                    .messages_dead_lettered
                    .with_label_values(&[label])
                    .inc();
                self.metrics.dead_letters.with_label_values(&[label]).inc();
                tracing::error!(
                    to = label,
                    message_id = %outgoing.id(),
                    conversation_id = %outgoing.conversation_id(),
                    %trace_id,
                    %reason,
                    "message dead-lettered; redrive it with POST /dead-letters/redrive on the admin port"
                );
                Finish::Done
            }
            Err(e) => {
                tracing::error!(to = label, message_id = %outgoing.id(), %trace_id, error = %e, "cannot dead-letter; will retry");
                Finish::Retry(self.backoff.max)
            }
        };
        (finish, Attempt::Failed)
    }

    fn load(&self, target: Target, seq: Seq) -> Result<Option<Outgoing>, crate::store::StoreError> {
        Ok(match target {
            Target::Bot => self
                .store
                .inbound(seq)?
                .map(|m| Outgoing::of(Arc::new(Message::Inbound(m)))),
            Target::Response => self
                .store
                .outbound(seq)?
                .map(|m| Outgoing::of(Arc::new(Message::Outbound(m)))),
        })
    }

    /// The bot's synchronous replies as messages for the response endpoint.
    fn replies(&self, answer: &Answer, to: &Outgoing) -> Vec<OutboundMessage> {
        let parsed = match answer {
            Answer::Body(body, _) => wire::parse_sync_replies(body),
            Answer::TooLarge => Err(wire::Invalid(format!(
                "the answer is over {} MiB",
                MAX_ANSWER_BYTES >> 20
            ))),
        };
        // Each reply is a message to store and deliver: a bot must not turn
        // one message into more than the relay was sized for.
        let parsed = parsed.and_then(|replies| match replies.len() {
            n if n > self.max_replies => Err(wire::Invalid(format!(
                "{n} replies, over --max-replies-per-answer ({})",
                self.max_replies
            ))),
            _ => Ok(replies),
        });
        let replies = match parsed {
            Ok(replies) => replies,
            Err(problem) => {
                // The bot took the message (2xx); sending it again would duplicate
                // it, so the unreadable answer is logged and dropped.
                let trace_id = to.trace().map(TraceContext::trace_id).unwrap_or_default();
                tracing::warn!(message_id = %to.id(), %trace_id, %problem, "bot answered 2xx with unreadable replies; ignoring them");
                self.metrics.unreadable_bot_answers.inc();
                return Vec::new();
            }
        };
        let now = now_ms();
        let (user_id, caller_conversation_id) = match &*to.message {
            Message::Inbound(m) => (&m.user_id, &m.caller_conversation_id),
            Message::Outbound(m) => (&m.user_id, &m.caller_conversation_id),
        };
        replies
            .into_iter()
            .map(|reply| OutboundMessage {
                id: ids::message_id(),
                conversation_id: to.conversation_id().to_owned(),
                caller_conversation_id: caller_conversation_id.clone(),
                user_id: user_id.clone(),
                kind: reply.kind,
                payload: reply.payload,
                created_at_ms: now,
                queued_at_ms: now,
                // The reply belongs to the trace of the message it answers.
                trace: to.trace().cloned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::FailureLog;
    use std::time::Duration;

    #[test]
    fn failure_log_warns_once_per_interval_and_counts_the_rest() {
        let log = FailureLog::new(Duration::from_secs(1));
        assert_eq!(
            log.admit(10_000),
            Some(0),
            "the first failure is warned about"
        );
        for at in [10_001, 10_500, 10_999] {
            assert_eq!(log.admit(at), None);
        }
        assert_eq!(
            log.admit(11_000),
            Some(3),
            "the next warning counts the three that went without one"
        );
        assert_eq!(log.admit(11_200), None);
        assert_eq!(log.admit(15_000), Some(1));
        assert_eq!(
            log.admit(15_000),
            None,
            "one warning per interval, however close the calls"
        );
        // The last of a burst: reported once the interval is over, once.
        assert_eq!(log.admit(15_500), None);
        assert_eq!(log.unreported(15_900), None, "not before the interval");
        assert_eq!(log.unreported(16_000), Some(2));
        assert_eq!(log.unreported(17_500), None, "nothing new");
        assert_eq!(log.admit(17_600), Some(0), "the next failure gets its line");
    }
}
