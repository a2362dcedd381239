//! Conversation turns as this replica sees them: the trace of each
//! conversation's latest user message (for the bot's later messages), and
//! the client requests that wait inline for the bot's replies
//! (`POST /v1/messages?wait=10s`).
//!
//! A waiting request gets, in order, the bot's synchronous replies to its
//! message and the messages the bot posts to `/v1/bot/messages` for its
//! conversation while it waits. It is answered at its deadline, or earlier:
//! once its message was delivered to the bot and then [`QUIET`] went by
//! without a further reply. Nothing of it is stored: the replies go to the
//! response endpoint as always, and a request that is cut off loses nothing.

use crate::store::OutboundMessage;
use crate::trace::ConversationTraces;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a waiting request whose message reached the bot waits for one
/// more reply before it is answered.
pub const QUIET: Duration = Duration::from_secs(1);

/// One reply as the waiting client gets it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payload: Box<RawValue>,
    pub created_at: String,
}

impl Reply {
    fn of(m: &OutboundMessage) -> Self {
        Reply {
            id: m.id.clone(),
            kind: m.kind.clone(),
            payload: m.payload.clone(),
            created_at: crate::wire::rfc3339(m.created_at_ms),
        }
    }
}

#[derive(Debug, Default)]
struct Collected {
    delivered: bool,
    replies: Vec<Reply>,
    /// Replies past the bound, left out of the answer.
    left_out: usize,
}

#[derive(Debug)]
struct Waiter {
    /// The relay id of the message the client waits on.
    message_id: String,
    max_replies: usize,
    collected: Mutex<Collected>,
    /// Bumped at each change of `collected`.
    changes: watch::Sender<u64>,
}

impl Waiter {
    fn update(&self, f: impl FnOnce(&mut Collected)) {
        let mut c = self.collected.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
        drop(c);
        self.changes.send_modify(|n| *n += 1);
    }

    fn add(&self, c: &mut Collected, reply: Reply) {
        if c.replies.len() < self.max_replies {
            c.replies.push(reply);
        } else {
            c.left_out += 1;
        }
    }
}

/// What the relay knows of conversation turns in flight.
#[derive(Default)]
pub struct Turns {
    pub traces: ConversationTraces,
    /// Waiting requests per relay conversation id, oldest first.
    waiting: Mutex<HashMap<String, Vec<Arc<Waiter>>>>,
    /// Set when the relay stops: waiting requests are answered at once.
    draining: std::sync::atomic::AtomicBool,
}

/// A request's place among the waiting; it leaves when this is dropped.
pub struct Waiting {
    turns: Arc<Turns>,
    conversation_id: String,
    waiter: Arc<Waiter>,
    changes: watch::Receiver<u64>,
}

/// What a waiting request got.
#[derive(Debug)]
pub struct Collection {
    pub delivered: bool,
    pub replies: Vec<Reply>,
    pub left_out: usize,
}

impl Turns {
    /// Registers a request that waits for the replies to the message
    /// `message_id` of `conversation_id` (relay ids), keeping at most
    /// `max_replies` of them. Call before the message is stored, so that no
    /// reply can come before.
    pub fn wait_for(
        self: &Arc<Self>,
        conversation_id: &str,
        message_id: &str,
        max_replies: usize,
    ) -> Waiting {
        let (changes, receiver) = watch::channel(0);
        let waiter = Arc::new(Waiter {
            message_id: message_id.to_owned(),
            max_replies,
            collected: Mutex::default(),
            changes,
        });
        self.lock()
            .entry(conversation_id.to_owned())
            .or_default()
            .push(waiter.clone());
        Waiting {
            turns: self.clone(),
            conversation_id: conversation_id.to_owned(),
            waiter,
            changes: receiver,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Waiter>>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request waits on `conversation_id` (cheap: checked before
    /// copying replies for it).
    pub fn anyone_waiting(&self, conversation_id: &str) -> bool {
        self.lock().contains_key(conversation_id)
    }

    /// The bot took the message `message_id` and answered with `replies`.
    pub fn delivered(&self, conversation_id: &str, message_id: &str, replies: &[OutboundMessage]) {
        let waiter = self
            .lock()
            .get(conversation_id)
            .and_then(|ws| ws.iter().find(|w| w.message_id == message_id).cloned());
        if let Some(waiter) = waiter {
            waiter.update(|c| {
                c.delivered = true;
                for reply in replies {
                    waiter.add(c, Reply::of(reply));
                }
            });
        }
    }

    /// Answers every waiting request now, with what it has, and every later
    /// one at once: the relay is stopping, and a wait must not hold it up.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for waiter in self.lock().values().flatten() {
            waiter.changes.send_modify(|n| *n += 1);
        }
    }

    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bot posted `message` on its own: it goes to the latest request
    /// waiting in its conversation (the current turn), if any.
    pub fn bot_posted(&self, message: &OutboundMessage) {
        let waiter = self
            .lock()
            .get(&message.conversation_id)
            .and_then(|ws| ws.last().cloned());
        if let Some(waiter) = waiter {
            waiter.update(|c| waiter.add(c, Reply::of(message)));
        }
    }
}

impl Waiting {
    /// Waits until `deadline`, or until the message was delivered and
    /// [`QUIET`] passed without a further reply; returns what came.
    pub async fn collect(mut self, deadline: Instant) -> Collection {
        let mut last_change = Instant::now();
        while !self.turns.draining() {
            let delivered = self.snapshot(|c| c.delivered);
            let until = if delivered {
                deadline.min(last_change + QUIET)
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, self.changes.changed()).await {
                Ok(Ok(())) => last_change = Instant::now(),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let mut c = self
            .waiter
            .collected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Collection {
            delivered: c.delivered,
            replies: std::mem::take(&mut c.replies),
            left_out: c.left_out,
        }
    }

    fn snapshot<T>(&self, f: impl FnOnce(&Collected) -> T) -> T {
        f(&self
            .waiter
            .collected
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self.turns.lock();
        if let Some(ws) = waiting.get_mut(&self.conversation_id) {
            ws.retain(|w| !Arc::ptr_eq(w, &self.waiter));
            if ws.is_empty() {
                waiting.remove(&self.conversation_id);
            }
        }
    }
}

/// The `wait` query parameter: `None` when absent; an error, naming it, when
/// it is not a duration, over `max`, or when `max` is zero (`--max-wait 0s`).
pub fn wait_param(query: Option<&str>, max: Duration) -> Result<Option<Duration>, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| match pair.split_once('=') {
            Some(("wait", value)) => Some(value),
            None if pair == "wait" => Some(""),
            _ => None,
        })
    else {
        return Ok(None);
    };
    if max.is_zero() {
        return Err("query parameter `wait` is not available: this relay answers without waiting for replies (--max-wait 0s)".into());
    }
    let wait = humantime::parse_duration(value).map_err(|_| {
        format!("query parameter `wait` must be a duration such as 10s or 500ms, not {value:?}")
    })?;
    if wait > max {
        return Err(format!(
            "query parameter `wait` is over the longest wait allowed, {} (--max-wait)",
            humantime::format_duration(max)
        ));
    }
    Ok(Some(wait))
}

/// The accept answer with `"responses"` added: `answer` is the JSON object
/// of [`crate::wire::accept_answer`].
pub fn answer_with_replies(answer: &str, replies: &[Reply]) -> String {
    let head = answer.trim_end().strip_suffix('}').unwrap_or(answer);
    let replies = serde_json::to_string(replies).expect("replies serialize");
    let comma = if head.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    format!("{head}{comma}\"responses\":{replies}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: &str, conversation: &str) -> OutboundMessage {
        OutboundMessage {
            id: id.into(),
            conversation_id: conversation.into(),
            caller_conversation_id: "c".into(),
            user_id: "u".into(),
            kind: "text".into(),
            payload: RawValue::from_string(format!("{{\"n\":\"{id}\"}}")).unwrap(),
            created_at_ms: 0,
            queued_at_ms: 0,
            trace: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replies_come_in_order_and_the_answer_comes_a_quiet_second_after_delivery() {
        let turns = Arc::new(Turns::default());
        let waiting = turns.wait_for("conv", "msg", 10);
        let start = Instant::now();
        let t = turns.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            t.delivered("conv", "msg", &[reply("r1", "conv"), reply("r2", "conv")]);
            tokio::time::sleep(Duration::from_millis(700)).await;
            t.bot_posted(&reply("r3", "conv"));
            t.bot_posted(&reply("elsewhere", "other"));
        });
        let got = waiting.collect(start + Duration::from_secs(10)).await;
        let ids: Vec<_> = got.replies.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2", "r3"]);
        assert!(got.delivered);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(2000),
            "1 s after the last reply"
        );
        assert!(!turns.anyone_waiting("conv"), "it left when answered");
    }

    #[tokio::test(start_paused = true)]
    async fn an_undelivered_message_waits_to_the_deadline_and_replies_are_bounded() {
        let turns = Arc::new(Turns::default());
        let start = Instant::now();
        let got = turns
            .wait_for("conv", "msg", 1)
            .collect(start + Duration::from_secs(3))
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(!got.delivered && got.replies.is_empty());
        let waiting = turns.wait_for("conv", "msg", 1);
        turns.delivered("conv", "msg", &[reply("r1", "conv"), reply("r2", "conv")]);
        let got = waiting
            .collect(Instant::now() + Duration::from_secs(3))
            .await;
        assert_eq!((got.replies.len(), got.left_out), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_relay_answers_the_waiting_at_once() {
        let turns = Arc::new(Turns::default());
        let waiting = turns.wait_for("conv", "msg", 10);
        let start = Instant::now();
        let t = turns.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            t.drain();
        });
        waiting.collect(start + Duration::from_secs(30)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        let later = turns.wait_for("conv", "msg", 10);
        later
            .collect(Instant::now() + Duration::from_secs(30))
            .await;
        assert_eq!(start.elapsed(), Duration::from_millis(200));
    }

    #[test]
    fn wait_is_read_from_the_query_and_bounded() {
        let max = Duration::from_secs(30);
        assert_eq!(wait_param(None, max), Ok(None));
        assert_eq!(wait_param(Some("x=1"), max), Ok(None));
        assert_eq!(
            wait_param(Some("x=1&wait=10s"), max),
            Ok(Some(Duration::from_secs(10)))
        );
        assert_eq!(
            wait_param(Some("wait=500ms"), max),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(wait_param(Some("wait=30s"), max), Ok(Some(max)));
        for bad in ["wait=31s", "wait=soon", "wait=", "wait", "wait=10"] {
            let e = wait_param(Some(bad), max).unwrap_err();
            assert!(e.contains("`wait`"), "{bad}: {e}");
        }
        assert!(
            wait_param(Some("wait=1s"), Duration::ZERO)
                .unwrap_err()
                .contains("--max-wait 0s")
        );
    }

    #[test]
    fn the_answer_gains_responses() {
        let r = Reply::of(&reply("r1", "conv"));
        assert_eq!(
            answer_with_replies(r#"{"message":{}}"#, &[r]),
            r#"{"message":{},"responses":[{"id":"r1","type":"text","payload":{"n":"r1"},"createdAt":"1970-01-01T00:00:00.000Z"}]}"#
        );
        assert_eq!(answer_with_replies("{}", &[]), r#"{"responses":[]}"#);
    }
}
