//! Where accepted messages wait until they are delivered.
//!
//! Every change of durable state is an [`Op`]; a [`Store`] applies a batch of
//! them in one transaction, durable once [`Store::sync`] returns. The
//! group-commit writer (`crate::writer`) is the only caller of `write`, so the
//! stores need no ordering logic of their own, and the HTTP layer and the
//! delivery engine never see which store is behind the trait.

mod apply;
mod embedded;
mod keymap;
mod memory;

pub use embedded::EmbeddedStore;
#[cfg(test)]
pub(crate) use embedded::Tuning;

/// The embedded store's file in its directory, for tests.
#[cfg(test)]
pub(crate) fn embedded_file_name() -> &'static str {
    embedded::FILE_NAME
}
pub use memory::MemoryStore;

use crate::json::{self, Obj};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Digest;
use std::sync::Arc;

/// Position of a message in the store; gives the delivery order within a conversation.
pub type Seq = u64;

/// Who a waiting message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A user's message on its way to the bot.
    Bot,
    /// A bot's message on its way to the back-end's response endpoint.
    Response,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Bot, Target::Response];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Bot => "bot",
            Target::Response => "response",
        }
    }

    /// Its place in `ALL`, for per-target arrays.
    pub fn index(self) -> usize {
        match self {
            Target::Bot => 0,
            Target::Response => 1,
        }
    }
}

/// A user's message, accepted from the back-end and waiting for the bot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InboundMessage {
    pub id: String,
    pub conversation_id: String,
    pub user_id: String,
    pub caller_conversation_id: String,
    pub caller_user_id: String,
    pub caller_message_id: String,
    pub kind: String,
    pub text: String,
    pub payload: Box<RawValue>,
    /// When the relay accepted it (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When it (re)entered the queue; the age limit counts from here.
    pub queued_at_ms: u64,
    /// Its W3C trace context (the client's, or one the relay started).
    /// Absent from records written before traces were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceContext>,
    /// Whether its client waits for the replies inline (`?wait=`): with
    /// `--store nats`, the replica that delivers it then tells the others
    /// the bot's answer. Absent (false) from older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waited: bool,
}

/// A bot's message, waiting for the response endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutboundMessage {
    pub id: String,
    pub conversation_id: String,
    pub caller_conversation_id: String,
    pub user_id: String,
    pub kind: String,
    pub payload: Box<RawValue>,
    pub created_at_ms: u64,
    pub queued_at_ms: u64,
    /// The trace it belongs to: that of the user message it answers, or of
    /// the bot's request. Absent from records written before traces were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceContext>,
}

impl InboundMessage {
    /// Its strings but the payload: what its memory and the bodies made of it
    /// are sized by.
    pub fn strings(&self) -> [&str; 8] {
        [
            &self.id,
            &self.conversation_id,
            &self.user_id,
            &self.caller_conversation_id,
            &self.caller_user_id,
            &self.caller_message_id,
            &self.kind,
            &self.text,
        ]
    }

    /// The stored record: what `serde_json::to_vec` makes of it, written
    /// directly ([`crate::json`]).
    pub fn record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(json::room(
            &self.strings(),
            self.payload.get().len() + trace_len(&self.trace),
        ));
        let mut o = Obj::new(&mut out);
        o.str("id", &self.id)
            .str("conversation_id", &self.conversation_id)
            .str("user_id", &self.user_id)
            .str("caller_conversation_id", &self.caller_conversation_id)
            .str("caller_user_id", &self.caller_user_id)
            .str("caller_message_id", &self.caller_message_id)
            .str("kind", &self.kind)
            .str("text", &self.text)
            .raw("payload", &self.payload)
            .u64("created_at_ms", self.created_at_ms)
            .u64("queued_at_ms", self.queued_at_ms);
        trace_field(&mut o, &self.trace);
        if self.waited {
            o.bool("waited", true);
        }
        o.end();
        out
    }
}

impl OutboundMessage {
    /// Its strings but the payload, as [`InboundMessage::strings`].
    pub fn strings(&self) -> [&str; 5] {
        [
            &self.id,
            &self.conversation_id,
            &self.caller_conversation_id,
            &self.user_id,
            &self.kind,
        ]
    }

    /// The stored record, as [`InboundMessage::record`].
    pub fn record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(json::room(
            &self.strings(),
            self.payload.get().len() + trace_len(&self.trace),
        ));
        let mut o = Obj::new(&mut out);
        o.str("id", &self.id)
            .str("conversation_id", &self.conversation_id)
            .str("caller_conversation_id", &self.caller_conversation_id)
            .str("user_id", &self.user_id)
            .str("kind", &self.kind)
            .raw("payload", &self.payload)
            .u64("created_at_ms", self.created_at_ms)
            .u64("queued_at_ms", self.queued_at_ms);
        trace_field(&mut o, &self.trace);
        o.end();
        out
    }
}

/// Room for a record's trace.
fn trace_len(trace: &Option<crate::trace::TraceContext>) -> usize {
    trace.as_ref().map_or(0, |t| {
        40 + t.parent.len() + t.state.as_ref().map_or(0, String::len)
    })
}

/// `"trace":{"parent":..,"state":..}`, absent without a trace, as serde
/// writes it.
fn trace_field(o: &mut Obj<'_>, trace: &Option<crate::trace::TraceContext>) {
    if let Some(trace) = trace {
        o.obj("trace", |t| {
            t.str("parent", &trace.parent);
            if let Some(state) = &trace.state {
                t.str("state", state);
            }
        });
    }
}

/// What the relay remembers of a conversation, so that a bot can write to it later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub caller_id: String,
    /// The relay id of the user who wrote last.
    pub user_id: String,
    /// When a message last went either way in it (ms since the Unix epoch, in
    /// whole seconds), to within [`CONVERSATION_REFRESH_MS`]. Absent from records written
    /// before conversations were forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_ms: Option<u64>,
}

/// A conversation's `seen_ms` is written again when a message comes more than
/// this long after it: often enough for a retention of hours or more, and at
/// most one small record an hour for a busy conversation.
pub const CONVERSATION_REFRESH_MS: u64 = 3_600_000;

/// The prunes go through the dedupe entries, and the conversations, in this
/// many parts by key, one commit each, so that no write waits behind a scan
/// of them all under the store's lock (a whole scan took 15 ms at 500k
/// dedupe entries, and grows with them).
pub const PRUNE_PARTS: u8 = 1 << PART_BITS;
const PART_BITS: u32 = 6;

/// The keys of one prune part: those whose top bits are `part`. Keys are
/// hashes or hash-derived UUIDs, so parts are about the same size.
pub(super) fn part_keys(part: u8) -> std::ops::RangeInclusive<u128> {
    let shift = 128 - PART_BITS;
    let low = u128::from(part) << shift;
    low..=low | ((1u128 << shift) - 1)
}

/// The part a key is pruned with.
pub(super) fn part_of(key: u128) -> u8 {
    (key >> (128 - PART_BITS)) as u8
}

/// A caller's message id in the dedupe tables: the first 16 bytes of its SHA-256.
pub(super) fn dedupe_key(caller_message_id: &[u8]) -> u128 {
    let digest = sha2::Sha256::digest(caller_message_id);
    u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// `ms` rounded down to a whole second: how `seen_ms` is stored, so that the
/// embedded store can keep it in 32 bits.
fn whole_seconds(ms: u64) -> u64 {
    ms - ms % 1000
}

/// A message that is waiting, as the delivery engine tracks it: its place, not
/// its body, so that a long queue costs little memory; the body is read from
/// the store when due, unless a copy came along (`message`).
#[derive(Clone, Debug)]
pub struct Pending {
    pub target: Target,
    pub seq: Seq,
    pub conversation_id: String,
    pub created_at_ms: u64,
    pub queued_at_ms: u64,
    /// The message itself, when the write that queued it had it at hand: the
    /// first attempt then need not read it back. A copy of what the store
    /// holds at `seq`; the delivery engine keeps only a bounded number.
    pub message: Option<Arc<Message>>,
}

/// Two `Pending` are equal when they name the same message the same way,
/// whether or not they carry it.
impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (
            self.target,
            self.seq,
            &self.conversation_id,
            self.created_at_ms,
            self.queued_at_ms,
        ) == (
            other.target,
            other.seq,
            &other.conversation_id,
            other.created_at_ms,
            other.queued_at_ms,
        )
    }
}

impl Eq for Pending {}

/// A waiting message of either direction.
#[derive(Debug)]
pub enum Message {
    Inbound(InboundMessage),
    Outbound(OutboundMessage),
}

impl Message {
    /// About the memory it takes: its strings, and 200 bytes for the rest.
    pub fn size(&self) -> usize {
        let (strings, payload) = match self {
            Message::Inbound(m) => (&m.strings()[..], &m.payload),
            Message::Outbound(m) => (&m.strings()[..], &m.payload),
        };
        strings.iter().map(|s| s.len()).sum::<usize>() + payload.get().len() + 200
    }
}

impl InboundMessage {
    pub fn pending(&self, seq: Seq) -> Pending {
        Pending {
            target: Target::Bot,
            seq,
            conversation_id: self.conversation_id.clone(),
            created_at_ms: self.created_at_ms,
            queued_at_ms: self.queued_at_ms,
            message: None,
        }
    }

    /// As [`Self::pending`], carrying the message along.
    pub fn into_pending(self, seq: Seq) -> Pending {
        self.pending(seq).carrying(Message::Inbound(self))
    }
}

impl OutboundMessage {
    pub fn pending(&self, seq: Seq) -> Pending {
        Pending {
            target: Target::Response,
            seq,
            conversation_id: self.conversation_id.clone(),
            created_at_ms: self.created_at_ms,
            queued_at_ms: self.queued_at_ms,
            message: None,
        }
    }

    /// As [`Self::pending`], carrying the message along.
    pub fn into_pending(self, seq: Seq) -> Pending {
        self.pending(seq).carrying(Message::Outbound(self))
    }
}

impl Pending {
    fn carrying(mut self, message: Message) -> Self {
        self.message = Some(Arc::new(message));
        self
    }
}

/// A delivery attempt under way, counted until dropped.
pub struct Attempting(Arc<std::sync::atomic::AtomicUsize>);

impl Attempting {
    pub fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Attempting {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Attempting(count.clone())
    }
}

impl Drop for Attempting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A message that ran out of attempts or age, kept until it is redriven.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: Seq,
    pub target: Target,
    pub reason: String,
    pub dead_at_ms: u64,
    pub message_id: String,
    pub conversation_id: String,
    /// The stored message (an [`InboundMessage`] or [`OutboundMessage`] as JSON).
    pub message: Box<RawValue>,
}

/// One change of durable state.
#[derive(Debug)]
pub enum Op {
    /// Store a user's message unless its `caller_message_id` was accepted within
    /// the dedupe window. The message is stored once: as the one waiting for the
    /// bot and as the dedupe entry, from which the first answer
    /// ([`crate::wire::accept_answer`]) is made again for a duplicate.
    Accept {
        message: InboundMessage,
        dedupe_window_ms: u64,
    },
    /// The bot took an inbound message; its synchronous replies wait for the response endpoint.
    CompleteInbound {
        seq: Seq,
        replies: Vec<OutboundMessage>,
    },
    /// A bot sent a message on its own.
    AddOutbound { message: OutboundMessage },
    /// The response endpoint took a message.
    CompleteOutbound { seq: Seq },
    /// Give up on a message: move it to the dead letters.
    DeadLetter {
        target: Target,
        seq: Seq,
        reason: String,
        now_ms: u64,
    },
    /// Put dead letters back in their queues (all of them, or those listed).
    Redrive { seqs: Option<Vec<Seq>>, now_ms: u64 },
    /// Delete dead letters for good (all of them, or those listed).
    Discard { seqs: Option<Vec<Seq>> },
    /// Forget dedupe entries accepted before `before_ms`: all of them, or
    /// those of one part (below [`PRUNE_PARTS`]).
    PruneDedupe { before_ms: u64, part: Option<u8> },
    /// Forget the conversations last seen before `before_ms` (all, or those
    /// of one part): a bot can no longer write to them, until their user
    /// writes again.
    ForgetConversations { before_ms: u64, part: Option<u8> },
}

/// What an [`Op`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new message was stored.
    Accepted { id: String, pending: Pending },
    /// The message id was seen within the window: the first answer.
    Duplicate { answer: String },
    /// The op stored messages that are now due for delivery (possibly none).
    Queued(Vec<Pending>),
    /// The op changed nothing that needs delivering.
    Done,
    /// This many dead letters were deleted.
    Discarded(usize),
    /// A prune forgot this many message ids.
    Pruned(u64),
    /// A completion or dead-lettering found nothing to act on (already done).
    Missing,
}

impl Outcome {
    /// The deliveries this outcome makes due, in the order they must happen.
    pub fn due(&self) -> &[Pending] {
        match self {
            Outcome::Accepted { pending, .. } => std::slice::from_ref(pending),
            Outcome::Queued(pending) => pending,
            _ => &[],
        }
    }
}

/// Disk use of a store that keeps its records in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of records, dead ones included.
    pub file_bytes: u64,
    /// Bytes of the records still needed; compaction frees the rest.
    pub live_bytes: u64,
}

/// How many dead letters are held per target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterCounts {
    pub bot: u64,
    pub response: u64,
}

impl DeadLetterCounts {
    pub fn get(&self, target: Target) -> u64 {
        match target {
            Target::Bot => self.bot,
            Target::Response => self.response,
        }
    }

    fn add(&mut self, target: Target, n: i64) {
        let slot = match target {
            Target::Bot => &mut self.bot,
            Target::Response => &mut self.response,
        };
        *slot = slot.saturating_add_signed(n);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("store is closed")]
    Closed,
    #[error("NATS store: {0}")]
    Nats(String),
}

/// Durable state behind one interface. Implementations apply a batch atomically:
/// either every op of a `write` takes effect, or none does.
pub trait Store: Send + Sync + 'static {
    /// Applies a batch atomically. Its effects are visible at once, and durable
    /// once a later [`Store::sync`] returns `Ok`.
    fn write(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError>;
    /// Makes every batch written so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Why the store takes no more writes, once it cannot: the relay must
    /// restart to recover.
    fn failure(&self) -> Option<String> {
        None
    }
    /// Why the store cannot take writes for now, while it cannot (a store
    /// over the network that lost it): the relay is not ready meanwhile, and
    /// recovers by itself.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Why a delivery made now could not be recorded, while that is so (a
    /// store over the network that lost it): no delivery starts meanwhile,
    /// since its target would only get it again later.
    fn progress_unavailable(&self) -> Option<String> {
        None
    }
    /// Resolves when a delivery of `seq` under way should be cut short: its
    /// message is no longer this replica's to deliver (a store shared by
    /// replicas that gave the message's partition up without waiting, its
    /// lease lost or about to be), and another replica sends it again. None:
    /// never.
    fn revoked(&self, _seq: Seq) -> Option<futures::future::BoxFuture<'static, ()>> {
        None
    }
    /// A store that commits each op itself, over the network: the writer
    /// hands it every op instead of writing and syncing here.
    fn remote(&self) -> Option<Arc<dyn crate::writer::RemoteStore>> {
        None
    }
    /// Called as a delivery attempt of `seq` starts; the attempt lasts as
    /// long as what this returns. A store shared by replicas counts the
    /// attempts under way of what it hands over to another.
    fn attempting(&self, _seq: Seq) -> Option<Attempting> {
        None
    }
    /// How much disk the store uses, when it uses any.
    fn usage(&self) -> Option<Usage> {
        None
    }
    /// Gives disk back while no writes come: finishes a compaction whose
    /// copy is done, and starts one when most of the file is dead. Returns
    /// whether a compaction is under way, so that the caller knows to call
    /// again. Syncs do the same at every write; this is for a relay that is
    /// idle.
    fn maintain(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Whether a write needs a `sync` to be durable (false when writes are
    /// durable at once, or never).
    fn needs_sync(&self) -> bool {
        true
    }
    /// `write`, then `sync`.
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        let outcomes = self.write(ops)?;
        self.sync()?;
        Ok(outcomes)
    }
    /// Hands every waiting message to `each`, in delivery order per target and
    /// all those for the response endpoint first (see `apply::recover`), and
    /// returns how many dead letters are held; called once, at start.
    fn recover(&self, each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError>;
    fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError>;
    fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError>;
    fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError>;
    /// Dead letters at positions from `from` on, in order, at most `limit`.
    fn dead_letters(&self, from: Seq, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError>;
    /// `dead_letters` and `dead_letter_counts` as of one moment, so that the
    /// counts never contradict the letters (as two calls may, with a redrive
    /// between them).
    fn dead_letter_page(
        &self,
        from: Seq,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, DeadLetterCounts), StoreError>;
    /// How many conversations are remembered.
    fn conversation_count(&self) -> u64;
    /// How many message ids the dedupe table holds.
    fn dedupe_count(&self) -> u64;
    /// The first answer to `caller_message_id`, when it was accepted less
    /// than `window_ms` before `now_ms`: what an `Op::Accept` of it would
    /// answer as a duplicate, read without writing anything.
    fn first_answer(
        &self,
        caller_message_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Option<String>, StoreError>;
    /// The acceptance time before which the dedupe entries of `part` (of
    /// [`PRUNE_PARTS`]) must be forgotten for at most `keep` of them to
    /// remain: `None` when the part holds no more than `keep`.
    fn dedupe_cutoff(&self, part: u8, keep: usize) -> Option<u64>;
}

/// The `keep` newest of `accepted` (acceptance times, in any order) are
/// those accepted at or after the time returned; ties at the boundary are
/// forgotten too, so that at most `keep` remain.
fn newest_cutoff(mut accepted: Vec<u64>, keep: usize) -> Option<u64> {
    if accepted.len() <= keep {
        return None;
    }
    // The newest one that must go, then everything accepted up to it.
    let (_, &mut oldest_gone, _) = accepted.select_nth_unstable_by(keep, |a, b| b.cmp(a));
    Some(oldest_gone + 1)
}

/// Rebuilds a dead letter's queue entry and stored record for a redrive.
fn redriven(letter: &DeadLetter, seq: Seq, now_ms: u64) -> Result<Redriven, StoreError> {
    let corrupt =
        |e: serde_json::Error| StoreError::Corrupt(format!("dead letter {}: {e}", letter.seq));
    Ok(match letter.target {
        Target::Bot => {
            let mut message: InboundMessage =
                serde_json::from_str(letter.message.get()).map_err(corrupt)?;
            message.queued_at_ms = now_ms;
            Redriven::Inbound(message.pending(seq), message)
        }
        Target::Response => {
            let mut message: OutboundMessage =
                serde_json::from_str(letter.message.get()).map_err(corrupt)?;
            message.queued_at_ms = now_ms;
            Redriven::Outbound(message.pending(seq), message)
        }
    })
}

enum Redriven {
    Inbound(Pending, InboundMessage),
    Outbound(Pending, OutboundMessage),
}

#[cfg(test)]
pub(crate) mod tests;
