//! The meaning of each [`Op`], written once over a small table interface that
//! both stores provide, so that `memory` and `embedded` cannot drift apart.

use super::{
    CONVERSATION_REFRESH_MS, Conversation, DeadLetter, DeadLetterCounts, InboundMessage, Op,
    OutboundMessage, Outcome, Pending, Redriven, Seq, StoreError, Target, redriven, whole_seconds,
};
use serde::{Serialize, de::DeserializeOwned};

/// The tables of a store, as seen from inside one write transaction.
pub(super) trait Tables {
    fn put(&mut self, table: Table, seq: Seq, value: &[u8]) -> Result<(), StoreError>;
    fn get(&mut self, table: Table, seq: Seq) -> Result<Option<Vec<u8>>, StoreError>;
    /// Removes a row; whether it was there.
    fn remove(&mut self, table: Table, seq: Seq) -> Result<bool, StoreError>;
    /// Dedupe entry of a caller message id: (accepted at, what makes the first answer).
    fn dedupe_get(&mut self, key: &str) -> Result<Option<(u64, First)>, StoreError>;
    /// Stores an accepted message (JSON) at `seq` of the inbound table and as
    /// the dedupe entry of `key`.
    fn accept(
        &mut self,
        key: &str,
        accepted_ms: u64,
        seq: Seq,
        message: &[u8],
    ) -> Result<(), StoreError>;
    /// Removes the dedupe entries accepted before `before_ms`, of one part
    /// ([`super::part_keys`]) or all; returns how many.
    fn dedupe_prune(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError>;
    /// When the conversation was last seen, if it is known with `user_id` as
    /// the user who wrote last.
    fn conversation_seen(&mut self, id: &str, user_id: &str) -> Result<Option<u64>, StoreError>;
    fn conversation_put(&mut self, conversation: &Conversation) -> Result<(), StoreError>;
    /// Removes the conversations last seen before `before_ms`, of one part
    /// (by [`crate::ids::key`]) or all; returns how many.
    fn conversation_forget(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError>;
    /// Every key of a table, in order.
    fn keys(&mut self, table: Table) -> Result<Vec<Seq>, StoreError>;
}

/// What a dedupe entry holds.
pub(super) enum First {
    /// The accepted message as JSON; the answer is made from it.
    Message(Vec<u8>),
    /// The answer itself, as journals written before messages were stored
    /// once hold it.
    Answer(String),
}

impl First {
    pub(super) fn answer(self) -> Result<String, StoreError> {
        Ok(match self {
            First::Message(bytes) => {
                crate::wire::accept_answer(&decode::<InboundMessage>("accepted message", &bytes)?)
            }
            First::Answer(answer) => answer,
        })
    }
}

/// The seq-keyed tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Table {
    Inbound,
    Outbound,
    DeadLetters,
}

impl Table {
    pub(super) fn of(target: Target) -> Table {
        match target {
            Target::Bot => Table::Inbound,
            Target::Response => Table::Outbound,
        }
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("stored records serialize")
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Applies `ops` in order. `next_seq` hands out positions; the caller persists
/// nothing about it: on open, a store resumes after its highest key.
pub(super) fn apply(
    tables: &mut impl Tables,
    ops: Vec<Op>,
    next_seq: &mut Seq,
) -> Result<(Vec<Outcome>, DeadLetterDelta), StoreError> {
    let mut outcomes = Vec::with_capacity(ops.len());
    let mut delta = DeadLetterDelta::default();
    let mut take_seq = || {
        let seq = *next_seq;
        *next_seq += 1;
        seq
    };
    for op in ops {
        let outcome = match op {
            Op::Accept {
                message,
                dedupe_window_ms,
            } => {
                let key = &message.caller_message_id;
                let now = message.created_at_ms;
                match tables.dedupe_get(key)? {
                    Some((accepted, first)) if now.saturating_sub(accepted) < dedupe_window_ms => {
                        Outcome::Duplicate {
                            answer: first.answer()?,
                        }
                    }
                    _ => {
                        let seq = take_seq();
                        tables.accept(key, now, seq, &message.record())?;
                        remember_conversation(
                            tables,
                            &message.conversation_id,
                            &message.caller_conversation_id,
                            &message.user_id,
                            now,
                        )?;
                        Outcome::Accepted {
                            id: message.id.clone(),
                            pending: message.into_pending(seq),
                        }
                    }
                }
            }
            Op::CompleteInbound { seq, replies } => {
                if !tables.remove(Table::Inbound, seq)? {
                    Outcome::Missing
                } else {
                    let mut due = Vec::with_capacity(replies.len());
                    for reply in replies {
                        let seq = take_seq();
                        tables.put(Table::Outbound, seq, &reply.record())?;
                        due.push(reply.into_pending(seq));
                    }
                    Outcome::Queued(due)
                }
            }
            Op::AddOutbound { message } => {
                remember_conversation(
                    tables,
                    &message.conversation_id,
                    &message.caller_conversation_id,
                    &message.user_id,
                    message.created_at_ms,
                )?;
                let seq = take_seq();
                tables.put(Table::Outbound, seq, &message.record())?;
                Outcome::Queued(vec![message.into_pending(seq)])
            }
            Op::CompleteOutbound { seq } => match tables.remove(Table::Outbound, seq)? {
                true => Outcome::Done,
                false => Outcome::Missing,
            },
            Op::DeadLetter {
                target,
                seq,
                reason,
                now_ms,
            } => match tables.get(Table::of(target), seq)? {
                None => Outcome::Missing,
                Some(bytes) => {
                    tables.remove(Table::of(target), seq)?;
                    // Both kinds of message carry these; the record itself is kept as it is.
                    #[derive(serde::Deserialize)]
                    struct Ids {
                        id: String,
                        conversation_id: String,
                    }
                    let ids: Ids = decode("waiting message", &bytes)?;
                    let json = String::from_utf8(bytes)
                        .map_err(|e| StoreError::Corrupt(format!("waiting message: {e}")))?;
                    let letter = DeadLetter {
                        seq,
                        target,
                        reason,
                        dead_at_ms: now_ms,
                        message_id: ids.id,
                        conversation_id: ids.conversation_id,
                        message: serde_json::value::RawValue::from_string(json)
                            .map_err(|e| StoreError::Corrupt(format!("waiting message: {e}")))?,
                    };
                    tables.put(Table::DeadLetters, seq, &encode(&letter))?;
                    delta.add(target, 1);
                    Outcome::Done
                }
            },
            Op::Redrive { seqs, now_ms } => {
                let seqs = match seqs {
                    Some(seqs) => seqs,
                    None => tables.keys(Table::DeadLetters)?,
                };
                let mut due = Vec::new();
                for old in seqs {
                    let Some(bytes) = tables.get(Table::DeadLetters, old)? else {
                        continue;
                    };
                    tables.remove(Table::DeadLetters, old)?;
                    let letter: DeadLetter = decode("dead letter", &bytes)?;
                    let seq = take_seq();
                    match redriven(&letter, seq, now_ms)? {
                        Redriven::Inbound(pending, message) => {
                            tables.put(Table::Inbound, seq, &message.record())?;
                            due.push(pending);
                        }
                        Redriven::Outbound(pending, message) => {
                            tables.put(Table::Outbound, seq, &message.record())?;
                            due.push(pending);
                        }
                    }
                    delta.add(letter.target, -1);
                }
                Outcome::Queued(due)
            }
            Op::Discard { seqs } => {
                let seqs = match seqs {
                    Some(seqs) => seqs,
                    None => tables.keys(Table::DeadLetters)?,
                };
                let mut discarded = 0;
                for seq in seqs {
                    let Some(bytes) = tables.get(Table::DeadLetters, seq)? else {
                        continue;
                    };
                    #[derive(serde::Deserialize)]
                    struct Of {
                        target: Target,
                    }
                    let of: Of = decode("dead letter", &bytes)?;
                    tables.remove(Table::DeadLetters, seq)?;
                    delta.add(of.target, -1);
                    discarded += 1;
                }
                Outcome::Discarded(discarded)
            }
            Op::PruneDedupe { before_ms, part } => {
                Outcome::Pruned(tables.dedupe_prune(before_ms, part)?)
            }
            Op::ForgetConversations { before_ms, part } => {
                tables.conversation_forget(before_ms, part)?;
                Outcome::Done
            }
        };
        outcomes.push(outcome);
    }
    Ok((outcomes, delta))
}

/// Records that a message went through a conversation at `now`: writes the
/// conversation when it is new, when another user wrote, or when its stored
/// `seen_ms` is over [`CONVERSATION_REFRESH_MS`] old.
fn remember_conversation(
    tables: &mut impl Tables,
    id: &str,
    caller_id: &str,
    user_id: &str,
    now: u64,
) -> Result<(), StoreError> {
    if let Some(seen) = tables.conversation_seen(id, user_id)?
        && now.saturating_sub(seen) < CONVERSATION_REFRESH_MS
    {
        return Ok(());
    }
    tables.conversation_put(&Conversation {
        id: id.to_owned(),
        caller_id: caller_id.to_owned(),
        user_id: user_id.to_owned(),
        seen_ms: Some(whole_seconds(now)),
    })
}

/// How a commit changed the number of dead letters, for the store's running count.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct DeadLetterDelta {
    bot: i64,
    response: i64,
}

impl DeadLetterDelta {
    fn add(&mut self, target: Target, n: i64) {
        match target {
            Target::Bot => self.bot += n,
            Target::Response => self.response += n,
        }
    }

    pub(super) fn apply_to(self, counts: &mut DeadLetterCounts) {
        counts.add(Target::Bot, self.bot);
        counts.add(Target::Response, self.response);
    }
}

/// What `recover`'s scan calls for each row of a table, in seq order.
pub(super) type Visit<'a> = dyn FnMut(Seq, &[u8]) -> Result<(), StoreError> + 'a;

/// Hands every waiting message to `each`, one table at a time in seq order, so
/// each target's queue is rebuilt in delivery order without holding the whole
/// backlog twice. Returns the dead-letter counts.
///
/// The replies go first: the relay delivers while it recovers, and a message
/// delivered to the bot makes new replies at once. Those must queue behind the
/// stored replies of the same conversation, so every stored reply has to be
/// handed over before any message for the bot is.
pub(super) fn recover(
    mut scan: impl FnMut(Table, &mut Visit) -> Result<(), StoreError>,
    each: &mut dyn FnMut(Pending),
) -> Result<DeadLetterCounts, StoreError> {
    scan(Table::Outbound, &mut |seq, bytes| {
        let m: OutboundMessage = decode("outbound message", bytes)?;
        each(m.pending(seq));
        Ok(())
    })?;
    scan(Table::Inbound, &mut |seq, bytes| {
        let m: InboundMessage = decode("inbound message", bytes)?;
        each(m.pending(seq));
        Ok(())
    })?;
    let mut counts = DeadLetterCounts::default();
    scan(Table::DeadLetters, &mut |_, bytes| {
        let letter: DeadLetter = decode("dead letter", bytes)?;
        counts.add(letter.target, 1);
        Ok(())
    })?;
    Ok(counts)
}
