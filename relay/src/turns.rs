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
//!
//! With `--store nats` the bot may get the message from another replica, and
//! post its replies to yet another: a replica that sees a reply for a
//! request it does not hold publishes it on core NATS (not JetStream: nothing
//! is kept), on a subject per conversation that a waiting request's replica
//! listens to while it waits.

use crate::store::OutboundMessage;
use crate::trace::ConversationTraces;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Bytes of `replies`, counted in [`Turns::held`].
    bytes: usize,
    /// The request is answered or gone: nothing more is kept for it.
    closed: bool,
}

/// Bytes of replies held for waiting requests, all together, when the relay
/// is not told otherwise (it is told `--answer-memory-bytes`).
pub const WAIT_MEMORY: usize = 16 << 20;

/// What one reply is counted as while a waiting request holds it.
fn reply_bytes(reply: &Reply) -> usize {
    reply.payload.get().len() + reply.kind.len() + reply.id.len() + reply.created_at.len() + 64
}

/// The bytes held for all waiting requests, and their bound.
#[derive(Debug)]
struct Held {
    bytes: std::sync::atomic::AtomicUsize,
    max: usize,
}

#[derive(Debug)]
struct Waiter {
    /// The relay id of the message the client waits on.
    message_id: String,
    max_replies: usize,
    collected: Mutex<Collected>,
    /// Bumped at each change of `collected`.
    changes: watch::Sender<u64>,
    /// Shared with every waiter: the bound of what they hold together.
    held: Arc<Held>,
    /// Its message was stored as a new one (not a duplicate, whose waiter
    /// must never take another request's replies).
    accepted: std::sync::atomic::AtomicBool,
}

impl Waiter {
    fn update(&self, f: impl FnOnce(&mut Collected)) {
        let mut c = self.collected.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
        drop(c);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Keeps a reply for the answer, within `--max-replies-per-answer` and
    /// the bytes all waiting requests may hold; one past either is left out
    /// (it still reaches the response endpoint).
    fn add(&self, c: &mut Collected, reply: Reply) {
        use std::sync::atomic::Ordering::Relaxed;
        if c.closed {
            return;
        }
        let size = reply_bytes(&reply);
        if c.replies.len() < self.max_replies {
            let before = self.held.bytes.fetch_add(size, Relaxed);
            if before + size <= self.held.max {
                c.bytes += size;
                c.replies.push(reply);
                return;
            }
            self.held.bytes.fetch_sub(size, Relaxed);
        }
        c.left_out += 1;
    }
}

/// What the relay knows of conversation turns in flight.
pub struct Turns {
    pub traces: ConversationTraces,
    /// Waiting requests per relay conversation id, oldest first.
    waiting: Mutex<HashMap<String, Vec<Arc<Waiter>>>>,
    /// Set when the relay stops: waiting requests are answered at once.
    draining: std::sync::atomic::AtomicBool,
    /// The other replicas, with `--store nats` once it is connected.
    replicas: std::sync::OnceLock<Replicas>,
    /// Per conversation with a request waiting here, the relay id of the
    /// message this replica last sent to the bot: the current turn, which
    /// the bot's own messages belong to.
    current: Mutex<HashMap<String, String>>,
    /// Bytes of replies the waiting requests hold, and their bound.
    held: Arc<Held>,
}

impl Default for Turns {
    fn default() -> Self {
        Self::with_memory(WAIT_MEMORY)
    }
}

/// Core NATS between the replicas of one endpoint.
struct Replicas {
    client: async_nats::Client,
    /// `botrelay-turns.<prefix>`: outside the endpoint's stream, so that
    /// nothing published here is stored.
    subjects: String,
}

impl Replicas {
    fn subject(&self, conversation_id: &str) -> String {
        format!(
            "{}.{:032x}",
            self.subjects,
            crate::ids::key(conversation_id)
        )
    }

    fn publish(&self, conversation_id: &str, event: &Event) {
        let (client, subject) = (self.client.clone(), self.subject(conversation_id));
        let payload = serde_json::to_vec(event).expect("events serialize");
        tokio::spawn(async move {
            if let Err(e) = client.publish(subject, payload.into()).await {
                tracing::debug!(error = %e, "could not tell the other replicas about a reply");
            }
        });
    }
}

/// What one replica tells the others about a turn.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Event {
    /// The bot took the message and answered with these replies.
    Delivered {
        message_id: String,
        replies: Vec<Reply>,
    },
    /// The bot posted a message to the conversation.
    Posted { reply: Reply },
}

/// A request's place among the waiting; it leaves when this is dropped.
pub struct Waiting {
    turns: Arc<Turns>,
    conversation_id: String,
    waiter: Arc<Waiter>,
    changes: watch::Receiver<u64>,
    /// What the other replicas say about the conversation, while it waits.
    listener: Option<tokio::task::JoinHandle<()>>,
}

/// What a waiting request got.
#[derive(Debug)]
pub struct Collection {
    pub delivered: bool,
    pub replies: Vec<Reply>,
    pub left_out: usize,
}

impl Turns {
    /// Turns whose waiting requests hold at most `bytes` of replies together.
    pub fn with_memory(bytes: usize) -> Self {
        Turns {
            traces: ConversationTraces::default(),
            waiting: Mutex::default(),
            draining: Default::default(),
            replicas: Default::default(),
            current: Mutex::default(),
            held: Arc::new(Held {
                bytes: Default::default(),
                max: bytes,
            }),
        }
    }

    /// Bytes of replies held for waiting requests now.
    pub fn held_bytes(&self) -> usize {
        self.held.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

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
            held: self.held.clone(),
            accepted: std::sync::atomic::AtomicBool::new(false),
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
            listener: None,
        }
    }

    /// Tells the replicas' events (`--store nats`) to this replica's requests.
    pub fn connect_replicas(&self, client: async_nats::Client, prefix: &str) {
        let _ = self.replicas.set(Replicas {
            client,
            subjects: format!("botrelay-turns.{prefix}"),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Waiter>>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request waits on `conversation_id` here (cheap: checked
    /// before copying replies for it).
    pub fn waiting_here(&self, conversation_id: &str) -> bool {
        self.lock().contains_key(conversation_id)
    }

    /// Whether a message the bot posts to `conversation_id` may be wanted by
    /// a waiting request, here or, with `--store nats`, on another replica.
    pub fn post_wanted(&self, conversation_id: &str) -> bool {
        self.replicas.get().is_some() || self.waiting_here(conversation_id)
    }

    /// The bot took the message `message_id` and answered with `replies`.
    /// `waited`: its client waits inline, perhaps on another replica.
    pub fn delivered(
        &self,
        conversation_id: &str,
        message_id: &str,
        waited: bool,
        replies: &[OutboundMessage],
    ) {
        let replies: Vec<Reply> = replies.iter().map(Reply::of).collect();
        if !self.apply_delivered(conversation_id, message_id, &replies)
            && waited
            && let Some(replicas) = self.replicas.get()
        {
            let message_id = message_id.to_owned();
            replicas.publish(
                conversation_id,
                &Event::Delivered {
                    message_id,
                    replies,
                },
            );
        }
    }

    /// Gives the replies to the request here waiting on `message_id`, if
    /// there is one.
    fn apply_delivered(&self, conversation_id: &str, message_id: &str, replies: &[Reply]) -> bool {
        let waiter = self
            .lock()
            .get(conversation_id)
            .and_then(|ws| ws.iter().find(|w| w.message_id == message_id).cloned());
        let Some(waiter) = waiter else {
            return false;
        };
        // Delivered: its message was stored as a new one.
        waiter
            .accepted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        waiter.update(|c| {
            c.delivered = true;
            for reply in replies {
                waiter.add(c, reply.clone());
            }
        });
        true
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

    /// The message `message_id` of `conversation_id` goes to the bot now:
    /// the bot's own messages that follow belong to it (and to a request
    /// waiting on it), not to an earlier one.
    pub fn turn_started(&self, conversation_id: &str, message_id: &str) {
        let waiting = self.lock();
        if waiting.contains_key(conversation_id) {
            self.current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(conversation_id.to_owned(), message_id.to_owned());
        }
    }

    /// The request here that the bot's own messages to `conversation_id` go
    /// to: the one waiting on the current turn; when this replica did not
    /// send that turn (`--store nats`), the latest accepted one.
    fn turn_waiter(&self, conversation_id: &str) -> Option<Arc<Waiter>> {
        let waiting = self.lock();
        let ws = waiting.get(conversation_id)?;
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match current.get(conversation_id) {
            Some(id) => ws.iter().find(|w| &w.message_id == id).cloned(),
            None => ws
                .iter()
                .rev()
                .find(|w| w.accepted.load(std::sync::atomic::Ordering::Relaxed))
                .cloned(),
        }
    }

    /// The bot posted `message` on its own: it goes to the request waiting
    /// on the conversation's current turn here, or, with none here, to the
    /// other replicas'.
    pub fn bot_posted(&self, message: &OutboundMessage) {
        let reply = Reply::of(message);
        let waiter = self.turn_waiter(&message.conversation_id);
        match (waiter, self.replicas.get()) {
            (Some(waiter), _) => waiter.update(|c| waiter.add(c, reply)),
            (None, Some(replicas)) => {
                replicas.publish(&message.conversation_id, &Event::Posted { reply })
            }
            (None, None) => {}
        }
    }

    /// An event of another replica, for `waiter` (one of this replica's).
    fn apply_event(&self, conversation_id: &str, waiter: &Arc<Waiter>, event: Event) {
        match event {
            Event::Delivered {
                message_id,
                replies,
            } => {
                if message_id == waiter.message_id {
                    self.apply_delivered(conversation_id, &message_id, &replies);
                }
            }
            // To the request of the current turn, as a post to this replica goes.
            Event::Posted { reply } => {
                let latest = self.turn_waiter(conversation_id);
                if latest.is_some_and(|latest| Arc::ptr_eq(&latest, waiter)) {
                    waiter.update(|c| waiter.add(c, reply));
                }
            }
        }
    }
}

impl Waiting {
    /// Its message was stored as a new one: it may take the bot's messages.
    pub fn accepted(&self) {
        self.waiter
            .accepted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// With `--store nats`, listens to what the other replicas see of the
    /// conversation until the request is answered. Call before the message
    /// is stored: the subscription is then in place before the message can
    /// be delivered.
    pub async fn listen_to_replicas(&mut self) {
        let Some(replicas) = self.turns.replicas.get() else {
            return;
        };
        let subject = replicas.subject(&self.conversation_id);
        let mut subscription = match replicas.client.subscribe(subject).await {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hear the other replicas; this request sees the replies of this replica only");
                return;
            }
        };
        // The server has the subscription before the message is written.
        let _ = replicas.client.flush().await;
        let (turns, waiter) = (self.turns.clone(), self.waiter.clone());
        let conversation_id = self.conversation_id.clone();
        self.listener = Some(tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                match serde_json::from_slice::<Event>(&message.payload) {
                    Ok(event) => turns.apply_event(&conversation_id, &waiter, event),
                    Err(e) => tracing::debug!(error = %e, "unreadable event of another replica"),
                }
            }
        }));
    }

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
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
        {
            let mut c = self
                .waiter
                .collected
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            c.closed = true;
            self.turns.held.bytes.fetch_sub(
                std::mem::take(&mut c.bytes),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut waiting = self.turns.lock();
        if let Some(ws) = waiting.get_mut(&self.conversation_id) {
            ws.retain(|w| !Arc::ptr_eq(w, &self.waiter));
            if ws.is_empty() {
                waiting.remove(&self.conversation_id);
                self.turns
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.conversation_id);
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
    let value = &percent_decoded(value);
    let wait = humantime::parse_duration(value).map_err(|_| {
        format!("query parameter `wait` must be a duration such as 10s or 500ms, not `{value}`")
    })?;
    if wait > max {
        return Err(format!(
            "query parameter `wait` is over the longest wait allowed, {} (--max-wait)",
            humantime::format_duration(max)
        ));
    }
    Ok(Some(wait))
}

/// A query value as a client library encodes it: `%XX` escapes and `+` for
/// a space; a malformed escape is kept as written (and then refused).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
            t.delivered(
                "conv",
                "msg",
                true,
                &[reply("r1", "conv"), reply("r2", "conv")],
            );
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
        assert!(!turns.waiting_here("conv"), "it left when answered");
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
        turns.delivered(
            "conv",
            "msg",
            true,
            &[reply("r1", "conv"), reply("r2", "conv")],
        );
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
        // The value is shown as sent (decoded), not with Rust's escapes.
        assert_eq!(
            wait_param(Some("wait=%01%22x"), max).unwrap_err(),
            "query parameter `wait` must be a duration such as 10s or 500ms, not `\u{1}\"x`"
        );
        assert!(
            wait_param(Some("wait=1s"), Duration::ZERO)
                .unwrap_err()
                .contains("--max-wait 0s")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_bots_messages_go_to_the_current_turn_only() {
        let turns = Arc::new(Turns::default());
        // A request waits on m1; a repeat of it (a duplicate, never accepted)
        // waits too, and must take nothing.
        let first = turns.wait_for("conv", "m1", 10);
        first.accepted();
        let repeat = turns.wait_for("conv", "m1-again", 10);
        turns.turn_started("conv", "m1");
        turns.bot_posted(&reply("p1", "conv"));
        // A later message nobody waits on becomes the turn: what the bot
        // posts now belongs to it, not to the request on m1.
        turns.turn_started("conv", "m2");
        turns.bot_posted(&reply("p2", "conv"));
        drop(repeat);
        let start = Instant::now();
        let got = first.collect(start + Duration::from_millis(10)).await;
        let ids: Vec<_> = got.replies.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["p1"]);
        // Without a turn seen here (another replica sent it), the latest
        // accepted request takes them, never a duplicate's.
        let turns = Arc::new(Turns::default());
        let first = turns.wait_for("conv", "m1", 10);
        first.accepted();
        let _repeat = turns.wait_for("conv", "m1-again", 10);
        turns.bot_posted(&reply("p3", "conv"));
        let got = first
            .collect(Instant::now() + Duration::from_millis(10))
            .await;
        assert_eq!(got.replies.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_hold_replies_within_a_bound_in_bytes() {
        // Room for about three replies of 1 KiB, all requests together.
        let turns = Arc::new(Turns::with_memory(3 * 1200));
        let big = |id: &str, conversation: &str| {
            let mut r = reply(id, conversation);
            r.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(1024))).unwrap();
            r
        };
        let a = turns.wait_for("a", "ma", 100);
        let b = turns.wait_for("b", "mb", 100);
        turns.delivered("a", "ma", true, &[big("a1", "a"), big("a2", "a")]);
        turns.delivered("b", "mb", true, &[big("b1", "b"), big("b2", "b")]);
        assert!(turns.held_bytes() <= 3 * 1200, "{}", turns.held_bytes());
        let got_a = a.collect(Instant::now()).await;
        let got_b = b.collect(Instant::now()).await;
        assert_eq!(got_a.replies.len() + got_b.replies.len(), 3);
        assert_eq!(got_a.left_out + got_b.left_out, 1);
        // Answered: what they held is given back.
        assert_eq!(turns.held_bytes(), 0);
        let c = turns.wait_for("c", "mc", 100);
        turns.delivered(
            "c",
            "mc",
            true,
            &[big("c1", "c"), big("c2", "c"), big("c3", "c")],
        );
        assert_eq!(c.collect(Instant::now()).await.replies.len(), 3);
        assert_eq!(turns.held_bytes(), 0);
    }

    #[test]
    fn wait_is_read_as_a_client_library_encodes_it() {
        let max = Duration::from_secs(30);
        assert_eq!(
            wait_param(Some("wait=%35s"), max),
            Ok(Some(Duration::from_secs(5)))
        );
        assert_eq!(
            wait_param(Some("x=1&wait=1s%20500ms"), max),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            wait_param(Some("wait=1s+500ms"), max),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert!(
            wait_param(Some("wait=%zzs"), max)
                .unwrap_err()
                .contains("`wait`")
        );
        assert!(
            wait_param(Some("wait=5s%"), max)
                .unwrap_err()
                .contains("`wait`")
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
