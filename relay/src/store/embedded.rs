//! `--store embedded` (the default): one redb file under `--data-dir`. redb's
//! copy-on-write B-trees make every committed transaction crash-safe; the
//! writer batches many ops into one transaction, so one fsync covers them all.

use super::apply::{self, Table, Tables, decode};
use super::{
    Conversation, DeadLetter, DeadLetterCounts, InboundMessage, Op, OutboundMessage, Outcome,
    Pending, Seq, Store, StoreError,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Mutex;

const INBOUND: TableDefinition<u64, &[u8]> = TableDefinition::new("inbound");
const OUTBOUND: TableDefinition<u64, &[u8]> = TableDefinition::new("outbound");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// caller message id → accepted-at (8 bytes, little endian) followed by the first answer.
const DEDUPE: TableDefinition<&str, &[u8]> = TableDefinition::new("dedupe");
/// (accepted-at, caller message id), to prune the dedupe table in acceptance order.
const DEDUPE_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("dedupe_expiry");
const CONVERSATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("conversations");

/// The file inside `--data-dir`.
pub const FILE_NAME: &str = "botrelay.redb";

pub struct EmbeddedStore {
    db: Database,
    /// Next position to hand out and the running dead-letter counts; only the
    /// writer commits, so this lock is never contended on the hot path.
    state: Mutex<(Seq, DeadLetterCounts)>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds redb's page cache.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Embedded(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| StoreError::Embedded(format!("cannot open {}: {e}", path.display())))?;
        // Create every table up front so that readers never meet a missing one.
        let txn = db.begin_write().map_err(err)?;
        let mut next_seq = 0;
        {
            for def in [INBOUND, OUTBOUND, DEAD_LETTERS] {
                let table = txn.open_table(def).map_err(err)?;
                if let Some((last, _)) = table.last().map_err(err)? {
                    next_seq = next_seq.max(last.value() + 1);
                }
            }
            txn.open_table(DEDUPE).map_err(err)?;
            txn.open_table(DEDUPE_EXPIRY).map_err(err)?;
            txn.open_table(CONVERSATIONS).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Self {
            db,
            state: Mutex::new((next_seq, DeadLetterCounts::default())),
        })
    }

    fn read_row(
        &self,
        def: TableDefinition<u64, &[u8]>,
        seq: Seq,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(def).map_err(err)?;
        Ok(table.get(seq).map_err(err)?.map(|v| v.value().to_vec()))
    }
}

fn definition(table: Table) -> TableDefinition<'static, u64, &'static [u8]> {
    match table {
        Table::Inbound => INBOUND,
        Table::Outbound => OUTBOUND,
        Table::DeadLetters => DEAD_LETTERS,
    }
}

struct WriteTables<'t> {
    inbound: redb::Table<'t, u64, &'static [u8]>,
    outbound: redb::Table<'t, u64, &'static [u8]>,
    dead_letters: redb::Table<'t, u64, &'static [u8]>,
    dedupe: redb::Table<'t, &'static str, &'static [u8]>,
    dedupe_expiry: redb::Table<'t, (u64, &'static str), ()>,
    conversations: redb::Table<'t, &'static str, &'static [u8]>,
}

impl<'t> WriteTables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            inbound: txn.open_table(INBOUND).map_err(err)?,
            outbound: txn.open_table(OUTBOUND).map_err(err)?,
            dead_letters: txn.open_table(DEAD_LETTERS).map_err(err)?,
            dedupe: txn.open_table(DEDUPE).map_err(err)?,
            dedupe_expiry: txn.open_table(DEDUPE_EXPIRY).map_err(err)?,
            conversations: txn.open_table(CONVERSATIONS).map_err(err)?,
        })
    }

    fn rows(&mut self, table: Table) -> &mut redb::Table<'t, u64, &'static [u8]> {
        match table {
            Table::Inbound => &mut self.inbound,
            Table::Outbound => &mut self.outbound,
            Table::DeadLetters => &mut self.dead_letters,
        }
    }
}

impl Tables for WriteTables<'_> {
    fn put(&mut self, table: Table, seq: Seq, value: &[u8]) -> Result<(), StoreError> {
        self.rows(table).insert(seq, value).map_err(err)?;
        Ok(())
    }

    fn remove(&mut self, table: Table, seq: Seq) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .rows(table)
            .remove(seq)
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }

    fn dedupe_get(&mut self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        let Some(value) = self.dedupe.get(key).map_err(err)? else {
            return Ok(None);
        };
        let bytes = value.value();
        if bytes.len() < 8 {
            return Err(StoreError::Corrupt(format!(
                "dedupe entry of {key:?} is too short"
            )));
        }
        let accepted = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let answer = std::str::from_utf8(&bytes[8..])
            .map_err(|e| StoreError::Corrupt(format!("dedupe entry of {key:?}: {e}")))?;
        Ok(Some((accepted, answer.to_owned())))
    }

    fn dedupe_put(&mut self, key: &str, accepted_ms: u64, answer: &str) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(8 + answer.len());
        value.extend_from_slice(&accepted_ms.to_le_bytes());
        value.extend_from_slice(answer.as_bytes());
        self.dedupe.insert(key, value.as_slice()).map_err(err)?;
        self.dedupe_expiry
            .insert((accepted_ms, key), ())
            .map_err(err)?;
        Ok(())
    }

    fn dedupe_prune(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let mut expired = Vec::new();
        for entry in self
            .dedupe_expiry
            .range((0, "")..(before_ms, ""))
            .map_err(err)?
        {
            let (key, _) = entry.map_err(err)?;
            let (accepted, id) = key.value();
            expired.push((accepted, id.to_owned()));
        }
        let mut removed = 0;
        for (accepted, id) in expired {
            self.dedupe_expiry
                .remove((accepted, id.as_str()))
                .map_err(err)?;
            // The id may have been accepted again since; only the old entry goes.
            if self.dedupe_get(&id)?.is_some_and(|(at, _)| at == accepted) {
                self.dedupe.remove(id.as_str()).map_err(err)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn conversation_get(&mut self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conversations
            .get(id)
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }

    fn conversation_put(&mut self, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.conversations.insert(id, value).map_err(err)?;
        Ok(())
    }

    fn keys(&mut self, table: Table) -> Result<Vec<Seq>, StoreError> {
        let mut keys = Vec::new();
        for entry in self.rows(table).iter().map_err(err)? {
            keys.push(entry.map_err(err)?.0.value());
        }
        Ok(keys)
    }
}

impl Store for EmbeddedStore {
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next_seq = state.0;
        let txn = self.db.begin_write().map_err(err)?;
        let (outcomes, delta) = {
            let mut tables = WriteTables::open(&txn)?;
            apply::apply(&mut tables, ops, &mut next_seq)?
            // On error the transaction is dropped, which aborts it.
        };
        txn.commit().map_err(err)?;
        state.0 = next_seq;
        delta.apply_to(&mut state.1);
        Ok(outcomes)
    }

    fn recover(&self, each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let counts = apply::recover(
            |table, f| {
                let rows = txn.open_table(definition(table)).map_err(err)?;
                for entry in rows.iter().map_err(err)? {
                    let (seq, bytes) = entry.map_err(err)?;
                    f(seq.value(), bytes.value())?;
                }
                Ok(())
            },
            each,
        )?;
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = counts;
        Ok(counts)
    }

    fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError> {
        self.read_row(INBOUND, seq)?
            .map(|b| decode("inbound message", &b))
            .transpose()
    }

    fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError> {
        self.read_row(OUTBOUND, seq)?
            .map(|b| decode("outbound message", &b))
            .transpose()
    }

    fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(CONVERSATIONS).map_err(err)?;
        let row = table.get(id).map_err(err)?;
        row.map(|v| decode("conversation", v.value())).transpose()
    }

    fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(DEAD_LETTERS).map_err(err)?;
        let mut letters = Vec::new();
        for entry in table.iter().map_err(err)?.take(limit) {
            let (_, bytes) = entry.map_err(err)?;
            letters.push(decode("dead letter", bytes.value())?);
        }
        Ok(letters)
    }

    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}
