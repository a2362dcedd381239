//! `--store memory`: the same semantics as the embedded store while the process
//! lives; nothing survives a restart.

use super::apply::{self, First, Table, Tables, decode};
use super::{
    Conversation, DeadLetter, DeadLetterCounts, InboundMessage, Op, OutboundMessage, Outcome,
    PRUNE_PARTS, Pending, Seq, Store, StoreError, dedupe_key, part_keys, part_of,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    inbound: BTreeMap<Seq, Vec<u8>>,
    outbound: BTreeMap<Seq, Vec<u8>>,
    dead_letters: BTreeMap<Seq, Vec<u8>>,
    /// (accepted at, the message as JSON).
    dedupe: HashMap<String, (u64, Vec<u8>)>,
    /// (prune part, accepted at, key), for pruning a part in acceptance order.
    dedupe_expiry: BTreeSet<(u8, u64, String)>,
    /// By [`crate::ids::key`] of their id, as the embedded store keeps them,
    /// so that a prune part is a range.
    conversations: BTreeMap<u128, Conversation>,
    next_seq: Seq,
    dead_letter_counts: DeadLetterCounts,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave a half-applied batch: `commit` works on a copy.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn table(&mut self, table: Table) -> &mut BTreeMap<Seq, Vec<u8>> {
        match table {
            Table::Inbound => &mut self.inbound,
            Table::Outbound => &mut self.outbound,
            Table::DeadLetters => &mut self.dead_letters,
        }
    }
}

/// A write transaction over the in-memory tables: changes are recorded in an
/// undo log and rolled back if an op fails, so a batch is all or nothing.
struct Txn<'a> {
    state: &'a mut State,
    undo: Vec<Undo>,
}

enum Undo {
    Row(Table, Seq, Option<Vec<u8>>),
    Dedupe(String, Option<(u64, Vec<u8>)>),
    /// An expiry entry that a prune took out.
    Expiry((u8, u64, String)),
    Conversation(u128, Option<Conversation>),
}

impl Txn<'_> {
    fn rollback(self) {
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Row(table, seq, Some(v)) => {
                    self.state.table(table).insert(seq, v);
                }
                Undo::Row(table, seq, None) => {
                    self.state.table(table).remove(&seq);
                }
                Undo::Dedupe(key, Some(v)) => {
                    self.state.dedupe.insert(key, v);
                }
                Undo::Dedupe(key, None) => {
                    self.state.dedupe.remove(&key);
                }
                Undo::Expiry(entry) => {
                    self.state.dedupe_expiry.insert(entry);
                }
                Undo::Conversation(id, Some(v)) => {
                    self.state.conversations.insert(id, v);
                }
                Undo::Conversation(id, None) => {
                    self.state.conversations.remove(&id);
                }
            }
        }
    }
}

impl Tables for Txn<'_> {
    fn put(&mut self, table: Table, seq: Seq, value: &[u8]) -> Result<(), StoreError> {
        let old = self.state.table(table).insert(seq, value.to_vec());
        self.undo.push(Undo::Row(table, seq, old));
        Ok(())
    }

    fn get(&mut self, table: Table, seq: Seq) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state.table(table).get(&seq).cloned())
    }

    fn remove(&mut self, table: Table, seq: Seq) -> Result<bool, StoreError> {
        let old = self.state.table(table).remove(&seq);
        let found = old.is_some();
        if found {
            self.undo.push(Undo::Row(table, seq, old));
        }
        Ok(found)
    }

    fn dedupe_get(&mut self, key: &str) -> Result<Option<(u64, First)>, StoreError> {
        Ok(self
            .state
            .dedupe
            .get(key)
            .map(|(at, message)| (*at, First::Message(message.clone()))))
    }

    fn accept(
        &mut self,
        key: &str,
        accepted_ms: u64,
        seq: Seq,
        message: &[u8],
    ) -> Result<(), StoreError> {
        self.put(Table::Inbound, seq, message)?;
        let old = self
            .state
            .dedupe
            .insert(key.to_owned(), (accepted_ms, message.to_vec()));
        self.undo.push(Undo::Dedupe(key.to_owned(), old));
        // An expiry entry left behind by a rollback only causes a harmless extra check.
        let part = part_of(dedupe_key(key.as_bytes()));
        self.state
            .dedupe_expiry
            .insert((part, accepted_ms, key.to_owned()));
        Ok(())
    }

    fn dedupe_prune(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError> {
        let parts = part.map_or(0..=PRUNE_PARTS - 1, |part| part..=part);
        let mut removed = 0;
        for part in parts {
            let expired: Vec<(u8, u64, String)> = self
                .state
                .dedupe_expiry
                .range((part, 0, String::new())..(part, before_ms, String::new()))
                .cloned()
                .collect();
            for entry in expired {
                self.state.dedupe_expiry.remove(&entry);
                let (_, accepted, key) = &entry;
                // The key may have been accepted again since; only the old entry goes.
                if self
                    .state
                    .dedupe
                    .get(key)
                    .is_some_and(|(at, _)| at == accepted)
                {
                    let old = self.state.dedupe.remove(key);
                    self.undo.push(Undo::Dedupe(key.clone(), old));
                    removed += 1;
                }
                self.undo.push(Undo::Expiry(entry));
            }
        }
        Ok(removed)
    }

    fn conversation_seen(&mut self, id: &str, user_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .state
            .conversations
            .get(&crate::ids::key(id))
            .filter(|c| c.user_id == user_id)
            .map(|c| c.seen_ms.unwrap_or(0)))
    }

    fn conversation_put(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        let key = crate::ids::key(&conversation.id);
        let old = self.state.conversations.insert(key, conversation.clone());
        self.undo.push(Undo::Conversation(key, old));
        Ok(())
    }

    fn conversation_forget(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError> {
        let stale: Vec<u128> = self
            .state
            .conversations
            .range(part.map_or(0..=u128::MAX, part_keys))
            .filter(|(_, c)| c.seen_ms.unwrap_or(0) < before_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in &stale {
            let old = self.state.conversations.remove(key);
            self.undo.push(Undo::Conversation(*key, old));
        }
        Ok(stale.len() as u64)
    }

    fn keys(&mut self, table: Table) -> Result<Vec<Seq>, StoreError> {
        Ok(self.state.table(table).keys().copied().collect())
    }
}

impl Store for MemoryStore {
    fn write(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        let mut state = self.lock();
        let mut next_seq = state.next_seq;
        let mut txn = Txn {
            state: &mut state,
            undo: Vec::new(),
        };
        match apply::apply(&mut txn, ops, &mut next_seq) {
            Ok((outcomes, delta)) => {
                state.next_seq = next_seq;
                delta.apply_to(&mut state.dead_letter_counts);
                Ok(outcomes)
            }
            Err(e) => {
                txn.rollback();
                Err(e)
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn needs_sync(&self) -> bool {
        false
    }

    fn recover(&self, each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError> {
        let mut state = self.lock();
        let counts = apply::recover(
            |table, f| {
                for (seq, bytes) in state.table(table).iter() {
                    f(*seq, bytes)?;
                }
                Ok(())
            },
            each,
        )?;
        state.dead_letter_counts = counts;
        Ok(counts)
    }

    fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError> {
        let state = self.lock();
        state
            .inbound
            .get(&seq)
            .map(|b| decode("inbound message", b))
            .transpose()
    }

    fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError> {
        let state = self.lock();
        state
            .outbound
            .get(&seq)
            .map(|b| decode("outbound message", b))
            .transpose()
    }

    fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        Ok(self.lock().conversations.get(&crate::ids::key(id)).cloned())
    }

    fn dead_letters(&self, from: Seq, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead_letter_page(from, limit)?.0)
    }

    fn dead_letter_page(
        &self,
        from: Seq,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, DeadLetterCounts), StoreError> {
        let state = self.lock();
        let letters = state
            .dead_letters
            .range(from..)
            .map(|(_, b)| b)
            .take(limit)
            .map(|b| decode("dead letter", b))
            .collect::<Result<_, _>>()?;
        Ok((letters, state.dead_letter_counts))
    }

    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError> {
        Ok(self.lock().dead_letter_counts)
    }

    fn conversation_count(&self) -> u64 {
        self.lock().conversations.len() as u64
    }

    fn dedupe_count(&self) -> u64 {
        self.lock().dedupe.len() as u64
    }

    fn first_answer(
        &self,
        caller_message_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let first = self
            .lock()
            .dedupe
            .get(caller_message_id)
            .filter(|(accepted, _)| now_ms.saturating_sub(*accepted) < window_ms)
            .map(|(_, message)| First::Message(message.clone()));
        first.map(First::answer).transpose()
    }

    fn dedupe_cutoff(&self, part: u8, keep: usize) -> Option<u64> {
        let accepted = {
            let state = self.lock();
            let entries = state.dedupe_expiry.range((part, 0, String::new())..);
            let in_part = entries.take_while(|(p, _, _)| *p == part);
            in_part.map(|(_, at, _)| *at).collect()
        };
        super::newest_cutoff(accepted, keep)
    }
}
