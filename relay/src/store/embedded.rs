//! `--store embedded` (the default): one append-only journal file,
//! `botrelay.journal`, under `--data-dir`.
//!
//! A write appends one frame (a length, a CRC-32, and the batch's records) to
//! a buffer in memory; a sync writes the buffered frames at the end of the
//! file and flushes it with `fdatasync`. That is one sequential write, so a
//! sync costs about one disk flush however many messages and tables the
//! frames touch. The file grows in zero-filled steps, so that most syncs need
//! not record a new size; the zeros are written outside the lock that writes
//! take, so growing delays only the sync that does it.
//!
//! The tables live in memory as indexes of where each live record sits in the
//! file (or in the buffer); message bodies stay on disk and are read back when
//! needed. An accepted message is one record that is both its inbound row and
//! its dedupe entry: a duplicate's answer is made again from it. Opening the
//! store replays the file. A frame that is cut short or fails its checksum at
//! the end was written by a sync that a crash interrupted, and therefore never
//! acknowledged: it is dropped. One followed by whole frames is damage: its
//! bytes are kept aside and the replay goes on after them.
//!
//! When more than half of a large file is dead records, a background thread
//! copies the live records to a new file while writes go on, and reads the
//! copy back into indexes of its own; a later sync appends what was written
//! meanwhile and applies it to them, then renames the new file over the old
//! one and swaps the indexes in. The store's lock is held only for the frames
//! not yet written, the rename and the swap: at 359k live records, 1-2 ms,
//! where moving the live indexes to the new places took 160-290 ms. The
//! price is a second set of indexes while a compaction runs.

use super::apply::{self, First, Table, Tables, decode};
use super::keymap::KeyMap;
use super::{
    Conversation, DeadLetter, DeadLetterCounts, InboundMessage, Op, OutboundMessage, Outcome,
    PRUNE_PARTS, Pending, Seq, Store, StoreError, Usage, dedupe_key, part_of,
};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The file inside `--data-dir`.
pub const FILE_NAME: &str = "botrelay.journal";
/// A compaction in progress; deleted when found at open.
const COMPACT_NAME: &str = "botrelay.journal.compact";
/// The file starts with this (the format's name and version) and 8 reserved bytes.
const MAGIC: &[u8; 8] = b"BRJRNL\x00\x01";
const FILE_HEADER: u64 = 16;
/// A frame starts with the length of its records and their CRC-32.
const FRAME_HEADER: usize = 8;
/// Capacity of the unwritten-frames buffer kept between syncs.
const UNWRITTEN_KEPT: usize = 1 << 20;
/// Records read per lock while recovering.
const RECOVER_CHUNK: usize = 1024;
/// Compaction copies live records into frames of about this size.
const COPY_FRAME: usize = 1 << 20;

/// Record kinds.
const PUT: u8 = 1;
const DEL: u8 = 2;
const DEDUPE: u8 = 3;
const PRUNE: u8 = 4;
const CONVERSATION: u8 = 5;
const NEXT_SEQ: u8 = 6;
/// An accepted message: its inbound row and its dedupe entry in one record.
const ACCEPT: u8 = 7;
/// Removes one dedupe entry (written by compaction after an `ACCEPT` whose
/// dedupe entry was gone but whose row was not).
const FORGET: u8 = 8;
/// Removes one conversation, by its key ([`crate::ids::key`]).
const FORGET_CONVERSATION: u8 = 9;
/// A `PRUNE` of the dedupe entries of one part ([`part_keys`](super::part_keys)).
const PRUNE_PART: u8 = 10;

/// Sizes that tests shrink to exercise growth and compaction.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// The file is zero-filled this far ahead of the last frame.
    pub grow_step: u64,
    /// No compaction below this file size.
    pub compact_min_bytes: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            grow_step: 4 << 20,
            compact_min_bytes: 64 << 20,
        }
    }
}

pub struct EmbeddedStore {
    dir: PathBuf,
    tuning: Tuning,
    /// Held for a whole sync.
    syncing: Mutex<()>,
    /// Held by a write, and briefly by readers, who take a record's place and
    /// the file, then read unlocked.
    inner: Mutex<Inner>,
    /// Whether `Inner::failed` is set, read without the lock before every
    /// delivery.
    failed: AtomicBool,
}

struct Inner {
    index: Index,
    file: Arc<File>,
    /// The file holds frames up to here.
    written: u64,
    /// Frames committed but not yet in the file, which start at `written`;
    /// the next sync writes them.
    unwritten: Vec<u8>,
    /// The file holds zeros from `written` up to here.
    zeroed_end: u64,
    /// Set when a sync failed: what is on disk is then unknown, so nothing more is written.
    failed: Option<String>,
    compaction: Option<Compaction>,
    /// No compaction starts before the file reaches this size.
    compact_at: u64,
    /// The file holds bytes that did not read at open: the next sync starts
    /// a compaction whatever the file's size, so that they leave the journal
    /// (they are kept aside).
    damaged: bool,
}

impl Inner {
    /// Where the next frame goes.
    fn end(&self) -> u64 {
        self.written + self.unwritten.len() as u64
    }

    /// A record, copied from the unwritten frames, or else the file to read it from.
    fn locate(&self, loc: Loc) -> Result<Vec<u8>, Arc<File>> {
        unwritten_record(&self.unwritten, self.written, loc).ok_or_else(|| self.file.clone())
    }
}

/// Where a whole record sits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    at: u64,
    len: u32,
    /// The record is an `ACCEPT`, which an inbound row and a dedupe entry may
    /// both point at. Its bytes count as live through the dedupe entry while
    /// there is one, and through the row after it (`orphan`).
    accept: bool,
    /// An inbound row of an `ACCEPT` whose dedupe entry is gone (a message
    /// still waiting past the dedupe window): the row counts the record.
    orphan: bool,
}

/// A caller's message id as [`dedupe_key`] makes it.
type DedupeKey = u128;

#[derive(Clone, Copy, Debug)]
struct DedupeEntry {
    accepted_ms: u64,
    loc: Loc,
    /// The inbound row of the same `ACCEPT` (`loc.accept`), if it is still
    /// there: a dedupe entry that goes hands the counting of the record's
    /// bytes to it. [`NO_ROW`] for the dedupe records of older journals.
    seq: Seq,
}

/// `DedupeEntry::seq` of an entry with no row of its own.
const NO_ROW: Seq = Seq::MAX;

/// A conversation's record and what a write needs of it, in 32 bytes: the
/// parts of its [`Loc`] are kept apart so that no padding is stored.
#[derive(Clone, Copy, Debug)]
struct ConversationEntry {
    at: u64,
    len: u32,
    /// `seen_ms` in seconds: the stored value is in whole seconds.
    seen_s: u32,
    /// The relay id of the user who wrote last, as [`crate::ids::key`].
    user: u128,
}

impl ConversationEntry {
    fn loc(&self) -> Loc {
        Loc {
            at: self.at,
            len: self.len,
            accept: false,
            orphan: false,
        }
    }

    fn seen_ms(&self) -> u64 {
        u64::from(self.seen_s) * 1000
    }
}

/// The live records: what a replay of the file up to `Inner::end` yields.
#[derive(Default)]
struct Index {
    rows: [BTreeMap<Seq, Loc>; 3],
    /// A hash map per prune part ([`KeyMap`]): each grows on its own.
    dedupe: KeyMap<DedupeEntry>,
    /// A [`KeyMap`] too, as this can grow large. Keyed by the relay id as
    /// [`crate::ids::key`]: 48 bytes an entry and no allocation, where two
    /// strings took about 100 more.
    conversations: KeyMap<ConversationEntry>,
    /// What a conversation record without `seen_ms` (written before
    /// conversations were forgotten) counts as: the time the store was opened.
    opened_ms: u64,
    next_seq: Seq,
    /// Bytes of live records, to tell when compaction pays.
    live_bytes: u64,
    dead_letter_counts: DeadLetterCounts,
}

/// How to take back one record's effect on the index.
enum Undo {
    Row(Table, Seq, Option<Loc>),
    Dedupe(DedupeKey, Option<DedupeEntry>),
    Pruned(Vec<(DedupeKey, DedupeEntry)>),
    Conversation(u128, Option<ConversationEntry>),
    Accept {
        key: DedupeKey,
        dedupe: Option<DedupeEntry>,
        seq: Seq,
        row: Option<Loc>,
    },
    /// A record with nothing to take back (`next_seq` is restored as a whole).
    Nothing,
}

fn table_code(table: Table) -> u8 {
    match table {
        Table::Inbound => 0,
        Table::Outbound => 1,
        Table::DeadLetters => 2,
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("journal: {what}"))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Embedded(format!("{what} {}: {e}", path.display()))
}

/// One record, borrowed from a frame.
enum Record<'a> {
    Put {
        table: Table,
        seq: Seq,
        value: &'a [u8],
    },
    Del {
        table: Table,
        seq: Seq,
    },
    /// The dedupe entry of a message, with the first answer itself (written
    /// before `Accept` existed).
    Dedupe {
        accepted_ms: u64,
        key: &'a [u8],
        answer: &'a [u8],
    },
    /// The dedupe entry of `key` is gone.
    Forget {
        key: &'a [u8],
    },
    /// An accepted message: the inbound row `seq` and the dedupe entry of `key`.
    Accept {
        accepted_ms: u64,
        key: &'a [u8],
        seq: Seq,
        value: &'a [u8],
    },
    /// Removes the dedupe entries accepted before `before_ms`: those of one
    /// part, or all.
    Prune {
        before_ms: u64,
        part: Option<u8>,
    },
    /// A [`Conversation`] as JSON.
    Conversation {
        value: &'a [u8],
    },
    /// The conversation of this key is gone.
    ForgetConversation {
        key: u128,
    },
    NextSeq(Seq),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| corrupt("record runs past its frame"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn table(&mut self) -> Result<Table, StoreError> {
        match self.u8()? {
            0 => Ok(Table::Inbound),
            1 => Ok(Table::Outbound),
            2 => Ok(Table::DeadLetters),
            other => Err(corrupt(format!("unknown table {other}"))),
        }
    }

    fn record(&mut self) -> Result<Record<'a>, StoreError> {
        Ok(match self.u8()? {
            PUT => Record::Put {
                table: self.table()?,
                seq: self.u64()?,
                value: self.bytes()?,
            },
            DEL => Record::Del {
                table: self.table()?,
                seq: self.u64()?,
            },
            DEDUPE => Record::Dedupe {
                accepted_ms: self.u64()?,
                key: self.bytes()?,
                answer: self.bytes()?,
            },
            FORGET => Record::Forget { key: self.bytes()? },
            ACCEPT => Record::Accept {
                accepted_ms: self.u64()?,
                key: self.bytes()?,
                seq: self.u64()?,
                value: self.bytes()?,
            },
            PRUNE => Record::Prune {
                before_ms: self.u64()?,
                part: None,
            },
            PRUNE_PART => Record::Prune {
                before_ms: self.u64()?,
                part: match self.u8()? {
                    part if part < PRUNE_PARTS => Some(part),
                    other => return Err(corrupt(format!("prune of unknown part {other}"))),
                },
            },
            CONVERSATION => Record::Conversation {
                value: self.bytes()?,
            },
            NEXT_SEQ => Record::NextSeq(self.u64()?),
            FORGET_CONVERSATION => Record::ForgetConversation {
                key: u128::from_le_bytes(self.take(16)?.try_into().expect("16 bytes")),
            },
            other => return Err(corrupt(format!("unknown record kind {other}"))),
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a stored value is under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The value a record holds, as the tables hand it out.
fn value_of(record: &[u8]) -> Result<&[u8], StoreError> {
    match (Reader {
        buf: record,
        pos: 0,
    })
    .record()?
    {
        Record::Put { value, .. }
        | Record::Conversation { value }
        | Record::Accept { value, .. } => Ok(value),
        _ => Err(corrupt("an index points at a record without a value")),
    }
}

/// What a dedupe entry's record holds to answer a duplicate with.
fn first_of(record: &[u8]) -> Result<First, StoreError> {
    Ok(
        match (Reader {
            buf: record,
            pos: 0,
        })
        .record()?
        {
            Record::Accept { value, .. } => First::Message(value.to_vec()),
            Record::Dedupe { answer, .. } => First::Answer(
                String::from_utf8(answer.to_vec())
                    .map_err(|e| corrupt(format!("dedupe answer: {e}")))?,
            ),
            _ => return Err(corrupt("a dedupe entry points at another kind of record")),
        },
    )
}

/// A copy of the record at `loc` when it is among the frames not yet written,
/// which start at `written` in the file.
fn unwritten_record(unwritten: &[u8], written: u64, loc: Loc) -> Option<Vec<u8>> {
    let start = loc.at.checked_sub(written)? as usize;
    Some(unwritten[start..start + loc.len as usize].to_vec())
}

fn read_at(file: &File, loc: Loc) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0; loc.len as usize];
    file.read_exact_at(&mut buf, loc.at)
        .map_err(|e| StoreError::Embedded(format!("reading the journal at {}: {e}", loc.at)))?;
    Ok(buf)
}

impl Index {
    fn set_row(&mut self, table: Table, seq: Seq, loc: Option<Loc>) -> Option<Loc> {
        let rows = &mut self.rows[table_code(table) as usize];
        let counted = |loc: &Loc| {
            if loc.accept && !loc.orphan {
                0
            } else {
                u64::from(loc.len)
            }
        };
        let old = match loc {
            Some(loc) => {
                self.live_bytes += counted(&loc);
                rows.insert(seq, loc)
            }
            None => rows.remove(&seq),
        };
        if let Some(old) = &old {
            self.live_bytes -= counted(old);
        }
        old
    }

    fn set_dedupe(&mut self, key: DedupeKey, entry: Option<DedupeEntry>) -> Option<DedupeEntry> {
        let old = match entry {
            Some(entry) => {
                self.live_bytes += u64::from(entry.loc.len);
                self.dedupe.insert(key, entry)
            }
            None => self.dedupe.remove(&key),
        };
        if let Some(old) = old {
            self.live_bytes -= u64::from(old.loc.len);
            self.set_orphan(&old, true);
        }
        if let Some(entry) = entry {
            self.set_orphan(&entry, false);
        }
        old
    }

    /// Whether the row of an accepted message (if it is still there) counts
    /// the record's bytes: it does once the message's dedupe entry is gone.
    fn set_orphan(&mut self, entry: &DedupeEntry, orphan: bool) {
        if !entry.loc.accept {
            return;
        }
        let rows = &mut self.rows[table_code(Table::Inbound) as usize];
        let Some(row) = rows.get_mut(&entry.seq) else {
            return;
        };
        if row.at != entry.loc.at || row.orphan == orphan {
            return;
        }
        row.orphan = orphan;
        if orphan {
            self.live_bytes += u64::from(row.len);
        } else {
            self.live_bytes -= u64::from(row.len);
        }
    }

    fn set_conversation(
        &mut self,
        id: u128,
        entry: Option<ConversationEntry>,
    ) -> Option<ConversationEntry> {
        let old = match entry {
            Some(entry) => {
                self.live_bytes += u64::from(entry.len);
                self.conversations.insert(id, entry)
            }
            None => self.conversations.remove(&id),
        };
        if let Some(old) = &old {
            self.live_bytes -= u64::from(old.len);
        }
        old
    }

    /// The effect of one record, the same whether it is being committed or replayed.
    fn apply(&mut self, record: Record<'_>, loc: Loc) -> Result<Undo, StoreError> {
        Ok(match record {
            Record::Put { table, seq, .. } => {
                self.next_seq = self.next_seq.max(seq + 1);
                Undo::Row(table, seq, self.set_row(table, seq, Some(loc)))
            }
            Record::Del { table, seq } => Undo::Row(table, seq, self.set_row(table, seq, None)),
            Record::Dedupe {
                accepted_ms, key, ..
            } => {
                let key = dedupe_key(key);
                let entry = DedupeEntry {
                    accepted_ms,
                    loc,
                    seq: NO_ROW,
                };
                Undo::Dedupe(key, self.set_dedupe(key, Some(entry)))
            }
            Record::Accept {
                accepted_ms,
                key,
                seq,
                ..
            } => {
                self.next_seq = self.next_seq.max(seq + 1);
                let loc = Loc {
                    accept: true,
                    ..loc
                };
                let row = self.set_row(Table::Inbound, seq, Some(loc));
                let key = dedupe_key(key);
                let entry = DedupeEntry {
                    accepted_ms,
                    loc,
                    seq,
                };
                Undo::Accept {
                    key,
                    dedupe: self.set_dedupe(key, Some(entry)),
                    seq,
                    row,
                }
            }
            Record::Forget { key } => {
                let key = dedupe_key(key);
                Undo::Dedupe(key, self.set_dedupe(key, None))
            }
            Record::Prune { before_ms, part } => {
                let expired: Vec<DedupeKey> = self
                    .dedupe
                    .iter_part(part)
                    .filter(|(_, entry)| entry.accepted_ms < before_ms)
                    .map(|(key, _)| *key)
                    .collect();
                let mut removed = Vec::with_capacity(expired.len());
                for key in expired {
                    if let Some(entry) = self.set_dedupe(key, None) {
                        removed.push((key, entry));
                    }
                }
                Undo::Pruned(removed)
            }
            Record::Conversation { value } => {
                let conversation: Conversation = decode("conversation", value)?;
                let id = crate::ids::key(&conversation.id);
                let seen_ms = conversation.seen_ms.unwrap_or(self.opened_ms);
                let entry = ConversationEntry {
                    at: loc.at,
                    len: loc.len,
                    seen_s: u32::try_from(seen_ms / 1000).unwrap_or(u32::MAX),
                    user: crate::ids::key(&conversation.user_id),
                };
                Undo::Conversation(id, self.set_conversation(id, Some(entry)))
            }
            Record::ForgetConversation { key } => {
                Undo::Conversation(key, self.set_conversation(key, None))
            }
            Record::NextSeq(next) => {
                self.next_seq = self.next_seq.max(next);
                Undo::Nothing
            }
        })
    }

    /// Applies the prunes met in a replay, `(place, before_ms, part)` in file
    /// order, all at once at its end: one pass over the dedupe entries instead
    /// of one per prune (a journal holds dozens a minute since its last
    /// compaction; with 500k entries, reopening a journal with 500 prunes took
    /// 7.6 s). A prune removes what was accepted before it both in the file
    /// and in time: an entry goes if a prune of its part after its place has a
    /// later `before_ms`.
    fn prune_as_replayed(&mut self, prunes: &[(u64, u64, Option<u8>)]) {
        if prunes.is_empty() {
            return;
        }
        // Per part, its prunes in file order: (place, the latest `before_ms`
        // among this prune and those after it).
        let mut by_part: Vec<Vec<(u64, u64)>> = vec![Vec::new(); usize::from(PRUNE_PARTS)];
        for &(place, before_ms, part) in prunes {
            match part {
                Some(part) => by_part[usize::from(part)].push((place, before_ms)),
                None => by_part.iter_mut().for_each(|p| p.push((place, before_ms))),
            }
        }
        for prunes in &mut by_part {
            let mut max = 0;
            for (_, before_ms) in prunes.iter_mut().rev() {
                max = max.max(*before_ms);
                *before_ms = max;
            }
        }
        let expired: Vec<DedupeKey> = self
            .dedupe
            .iter_part(None)
            .filter(|(key, entry)| {
                let prunes = &by_part[usize::from(part_of(**key))];
                let next = prunes.partition_point(|(place, _)| *place < entry.loc.at);
                next < prunes.len() && prunes[next].1 > entry.accepted_ms
            })
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.set_dedupe(key, None);
        }
    }

    fn undo(&mut self, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Row(table, seq, loc) => {
                    self.set_row(table, seq, loc);
                }
                Undo::Dedupe(key, entry) => {
                    self.set_dedupe(key, entry);
                }
                Undo::Pruned(removed) => {
                    for (key, entry) in removed {
                        self.set_dedupe(key, Some(entry));
                    }
                }
                Undo::Conversation(id, entry) => {
                    self.set_conversation(id, entry);
                }
                Undo::Accept {
                    key,
                    dedupe,
                    seq,
                    row,
                } => {
                    self.set_dedupe(key, dedupe);
                    self.set_row(Table::Inbound, seq, row);
                }
                Undo::Nothing => {}
            }
        }
    }

    fn rows(&self, table: Table) -> &BTreeMap<Seq, Loc> {
        &self.rows[table_code(table) as usize]
    }

    /// Every live record's place and what points at it (`AS_ROW`,
    /// `AS_DEDUPE`), in no particular order: an `ACCEPT` may be listed twice.
    fn live(&self) -> impl Iterator<Item = (Loc, u8)> + '_ {
        self.rows
            .iter()
            .flat_map(|rows| rows.values().map(|loc| (*loc, AS_ROW)))
            .chain(self.dedupe.values().map(|e| (e.loc, AS_DEDUPE)))
            .chain(self.conversations.values().map(|e| (e.loc(), 0)))
    }
}

/// The ops of one commit, turned into records of a frame and applied to the index.
struct Txn<'a> {
    index: &'a mut Index,
    /// The unwritten frames, this one being built at their end.
    frames: &'a mut Vec<u8>,
    /// Where `frames` start in the file.
    base: u64,
    file: &'a File,
    undo: Vec<Undo>,
}

impl Txn<'_> {
    /// Appends one record, written by `encode`, and applies it.
    fn record(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<usize, StoreError> {
        let start = self.frames.len();
        encode(self.frames);
        let loc = Loc {
            at: self.base + start as u64,
            len: u32::try_from(self.frames.len() - start)
                .map_err(|_| StoreError::Embedded("a record over 4 GiB".into()))?,
            accept: false,
            orphan: false,
        };
        let record = Reader {
            buf: &self.frames[start..],
            pos: 0,
        }
        .record()?;
        let undo = self.index.apply(record, loc)?;
        let touched = match &undo {
            Undo::Pruned(removed) => removed.len(),
            _ => 1,
        };
        self.undo.push(undo);
        Ok(touched)
    }

    /// A whole record, from the unwritten frames or from the file.
    fn raw(&self, loc: Loc) -> Result<Vec<u8>, StoreError> {
        match unwritten_record(self.frames, self.base, loc) {
            Some(record) => Ok(record),
            None => read_at(self.file, loc),
        }
    }

    /// A record's value.
    fn value(&self, loc: Loc) -> Result<Vec<u8>, StoreError> {
        Ok(value_of(&self.raw(loc)?)?.to_vec())
    }
}

impl Tables for Txn<'_> {
    fn put(&mut self, table: Table, seq: Seq, value: &[u8]) -> Result<(), StoreError> {
        self.record(|out| {
            out.push(PUT);
            out.push(table_code(table));
            out.extend_from_slice(&seq.to_le_bytes());
            put_bytes(out, value);
        })?;
        Ok(())
    }

    fn get(&mut self, table: Table, seq: Seq) -> Result<Option<Vec<u8>>, StoreError> {
        match self.index.rows(table).get(&seq) {
            Some(loc) => Ok(Some(self.value(*loc)?)),
            None => Ok(None),
        }
    }

    fn remove(&mut self, table: Table, seq: Seq) -> Result<bool, StoreError> {
        if !self.index.rows(table).contains_key(&seq) {
            return Ok(false);
        }
        self.record(|out| {
            out.push(DEL);
            out.push(table_code(table));
            out.extend_from_slice(&seq.to_le_bytes());
        })?;
        Ok(true)
    }

    fn dedupe_get(&mut self, key: &str) -> Result<Option<(u64, First)>, StoreError> {
        let Some(entry) = self.index.dedupe.get(&dedupe_key(key.as_bytes())).copied() else {
            return Ok(None);
        };
        Ok(Some((entry.accepted_ms, first_of(&self.raw(entry.loc)?)?)))
    }

    fn accept(
        &mut self,
        key: &str,
        accepted_ms: u64,
        seq: Seq,
        message: &[u8],
    ) -> Result<(), StoreError> {
        self.record(|out| {
            out.push(ACCEPT);
            out.extend_from_slice(&accepted_ms.to_le_bytes());
            put_bytes(out, key.as_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            put_bytes(out, message);
        })?;
        Ok(())
    }

    fn dedupe_prune(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError> {
        // A prune that would remove nothing is not written (a replay would
        // find nothing for it either): an idle relay's journal stays still.
        if !self
            .index
            .dedupe
            .iter_part(part)
            .any(|(_, entry)| entry.accepted_ms < before_ms)
        {
            return Ok(0);
        }
        let removed = self.record(|out| {
            out.push(if part.is_some() { PRUNE_PART } else { PRUNE });
            out.extend_from_slice(&before_ms.to_le_bytes());
            out.extend(part);
        })?;
        Ok(removed as u64)
    }

    fn conversation_seen(&mut self, id: &str, user_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .index
            .conversations
            .get(&crate::ids::key(id))
            .filter(|c| c.user == crate::ids::key(user_id))
            .map(ConversationEntry::seen_ms))
    }

    fn conversation_put(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        let value = apply::encode(conversation);
        self.record(|out| {
            out.push(CONVERSATION);
            put_bytes(out, &value);
        })?;
        Ok(())
    }

    fn conversation_forget(&mut self, before_ms: u64, part: Option<u8>) -> Result<u64, StoreError> {
        let stale: Vec<u128> = self
            .index
            .conversations
            .iter_part(part)
            .filter(|(_, c)| c.seen_ms() < before_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in &stale {
            self.record(|out| {
                out.push(FORGET_CONVERSATION);
                out.extend_from_slice(&key.to_le_bytes());
            })?;
        }
        Ok(stale.len() as u64)
    }

    fn keys(&mut self, table: Table) -> Result<Vec<Seq>, StoreError> {
        Ok(self.index.rows(table).keys().copied().collect())
    }
}

/// Seals a frame built after `FRAME_HEADER` reserved bytes: its length and checksum.
fn seal(frame: &mut [u8]) {
    let payload = &frame[FRAME_HEADER..];
    let len = u32::try_from(payload.len()).expect("a frame is under 4 GiB");
    let crc = crc32fast::hash(payload);
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Writes zeros over `[from, to)`.
fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Copies what lies between `from` and the last byte before `to` that is not
/// zero into `botrelay.journal.dropped-<from>`, unless it is all zeros.
fn set_aside(dir: &Path, file: &File, from: u64, to: u64) -> Result<(), StoreError> {
    let path = dir.join(FILE_NAME);
    let read = |at: u64, buf: &mut [u8]| {
        file.read_exact_at(buf, at)
            .map_err(|e| io("cannot read", &path, e))
    };
    // The end of the non-zero bytes, found from the end of the file backwards.
    let mut chunk = vec![0u8; COPY_FRAME];
    let mut last = to;
    let used_end = loop {
        if last <= from {
            return Ok(());
        }
        let start = last.saturating_sub(COPY_FRAME as u64).max(from);
        let buf = &mut chunk[..(last - start) as usize];
        read(start, buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b != 0) {
            break start + i as u64 + 1;
        }
        last = start;
    };
    let aside = dir.join(format!("{FILE_NAME}.dropped-{from}"));
    copy_out(dir, file, from, used_end, &aside)?;
    tracing::warn!(
        bytes = used_end - from,
        kept_in = %aside.display(),
        "the bytes after the journal's last whole commit were dropped from it and kept aside; \
         after a crash they are a commit that was never acknowledged, and the file can be deleted; \
         if the journal was cut short some other way (a copy or a disk fault), it may hold the \
         rest of the last acknowledged commit"
    );
    Ok(())
}

/// Copies `from..to` of the journal into the file `aside`, flushed, and syncs
/// the directory.
fn copy_out(dir: &Path, file: &File, from: u64, to: u64, aside: &Path) -> Result<(), StoreError> {
    let copy = || -> std::io::Result<()> {
        let out = File::create(aside)?;
        let mut chunk = vec![0u8; COPY_FRAME];
        let mut at = from;
        while at < to {
            let n = (to - at).min(COPY_FRAME as u64) as usize;
            file.read_exact_at(&mut chunk[..n], at)?;
            out.write_all_at(&chunk[..n], at - from)?;
            at += n as u64;
        }
        out.sync_all()
    };
    copy().map_err(|e| io("cannot keep journal bytes in", aside, e))?;
    sync_dir(dir)
}

/// Looks for the first whole frame after `from`, where one did not read:
/// the first place before `len` at which a frame's length fits, its
/// checksum matches and its records read. None when there is none.
fn next_frame(file: &File, from: u64, len: u64) -> Result<Option<u64>, StoreError> {
    const WINDOW: usize = 1 << 20;
    let mut window = vec![0u8; WINDOW + FRAME_HEADER];
    let mut payload = Vec::new();
    let mut start = from;
    while start + (FRAME_HEADER as u64) < len {
        let n = (len - start).min(window.len() as u64) as usize;
        file.read_exact_at(&mut window[..n], start)
            .map_err(|e| StoreError::Embedded(format!("reading the journal at {start}: {e}")))?;
        for i in 0..n.saturating_sub(FRAME_HEADER).min(WINDOW) {
            let at = start + i as u64;
            let size = u32::from_le_bytes(window[i..i + 4].try_into().expect("4 bytes")) as u64;
            if size == 0 || size > len - at - FRAME_HEADER as u64 {
                continue;
            }
            let crc = u32::from_le_bytes(window[i + 4..i + 8].try_into().expect("4 bytes"));
            let body = i + FRAME_HEADER;
            let candidate = if body + size as usize <= n {
                &window[body..body + size as usize]
            } else {
                payload.resize(size as usize, 0);
                file.read_exact_at(&mut payload, at + FRAME_HEADER as u64)
                    .map_err(|e| {
                        StoreError::Embedded(format!("reading the journal at {at}: {e}"))
                    })?;
                &payload[..]
            };
            if crc32fast::hash(candidate) == crc && records_read(candidate) {
                return Ok(Some(at));
            }
        }
        start += WINDOW as u64;
    }
    Ok(None)
}

/// Whether a frame's payload reads as whole records.
fn records_read(payload: &[u8]) -> bool {
    let mut records = Reader {
        buf: payload,
        pos: 0,
    };
    while records.pos < payload.len() {
        if records.record().is_err() {
            return false;
        }
    }
    true
}

fn file_header() -> [u8; FILE_HEADER as usize] {
    let mut header = [0u8; FILE_HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    header
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot sync the directory", dir, e))
}

/// A copy of the live records, made by a background thread.
struct Compaction {
    /// The old file's end when the copy began; later frames are appended to the copy as they are.
    snapshot_end: u64,
    worker: JoinHandle<Result<Copied, StoreError>>,
}

struct Copied {
    file: File,
    /// The copy read back: the index of what it holds, built by the worker
    /// so that the swap need not move the live index record by record.
    index: Index,
    end: u64,
}

/// What points at a live record, for compaction.
const AS_ROW: u8 = 1;
const AS_DEDUPE: u8 = 2;

/// Writes a new journal holding `next_seq` and the records at `live` (in file
/// order, each once), read from `old`. An `ACCEPT` of which only the row or
/// only the dedupe entry is live is followed by the removal of the other, so
/// that a replay of the copy brings back only what was live.
fn copy_live(
    path: &Path,
    old: &File,
    live: Vec<(Loc, u8)>,
    next_seq: Seq,
    opened_ms: u64,
) -> Result<Copied, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io("cannot create", path, e))?;
    let write = |bytes: &[u8], at: u64| {
        file.write_all_at(bytes, at)
            .map_err(|e| io("cannot write", path, e))
    };
    write(&file_header(), 0)?;
    let mut end = FILE_HEADER;
    let mut frame = Vec::with_capacity(COPY_FRAME + FRAME_HEADER);
    frame.resize(FRAME_HEADER, 0);
    frame.push(NEXT_SEQ);
    frame.extend_from_slice(&next_seq.to_le_bytes());
    for (loc, roles) in &live {
        if frame.len() + loc.len as usize > COPY_FRAME && frame.len() > FRAME_HEADER {
            seal(&mut frame);
            write(&frame, end)?;
            end += frame.len() as u64;
            frame.truncate(FRAME_HEADER);
        }
        let start = frame.len();
        frame.resize(start + loc.len as usize, 0);
        old.read_exact_at(&mut frame[start..], loc.at)
            .map_err(|e| StoreError::Embedded(format!("compaction: reading the journal: {e}")))?;
        if loc.accept && *roles != AS_ROW | AS_DEDUPE {
            let Record::Accept { seq, key, .. } = (Reader {
                buf: &frame[start..],
                pos: 0,
            })
            .record()?
            else {
                return Err(corrupt("an accepted message's place holds another record"));
            };
            let key = key.to_vec();
            if roles & AS_ROW == 0 {
                frame.push(DEL);
                frame.push(table_code(Table::Inbound));
                frame.extend_from_slice(&seq.to_le_bytes());
            }
            if roles & AS_DEDUPE == 0 {
                frame.push(FORGET);
                put_bytes(&mut frame, &key);
            }
        }
    }
    if frame.len() > FRAME_HEADER {
        seal(&mut frame);
        write(&frame, end)?;
        end += frame.len() as u64;
    }
    file.sync_data().map_err(|e| io("cannot sync", path, e))?;
    // The list goes before the copy's index is built: the two are the
    // compaction's own memory, on top of the live index.
    drop(live);
    let mut index = Index {
        opened_ms,
        ..Index::default()
    };
    if replay(&file, path, end, &mut index)? != end {
        return Err(corrupt("the compacted journal does not read back whole"));
    }
    Ok(Copied { file, index, end })
}

fn check_header(file: &File, path: &Path) -> Result<(), StoreError> {
    let mut header = [0u8; FILE_HEADER as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| io("cannot read", path, e))?;
    if &header[..8] != MAGIC {
        return Err(StoreError::Embedded(format!(
            "{} is not a botrelay journal of a version this relay reads",
            path.display()
        )));
    }
    Ok(())
}

/// Reads a journal from the start, applying every whole frame to `index`,
/// up to the first that is not. Returns where that is.
fn replay(file: &File, path: &Path, len: u64, index: &mut Index) -> Result<u64, StoreError> {
    check_header(file, path)?;
    let mut prunes = Vec::new();
    let (end, _) = replay_frames(file, FILE_HEADER, len, index, Some(&mut prunes))?;
    index.prune_as_replayed(&prunes);
    Ok(end)
}

/// How a journal read back at open.
struct Replayed {
    /// Where its last whole frame ends.
    end: u64,
    /// Whether a frame that did not read was followed by whole ones.
    damaged: bool,
}

/// Reads the journal in `dir` from the start, applying every whole frame to
/// `index`. A frame that does not read (or zeros where one should be) is
/// either the end, cut short by a crash while it was written (never
/// acknowledged), or damage: when whole frames follow, the bytes up to them
/// are kept in `botrelay.journal.damaged-<offset>` and the replay goes on
/// after them, so that damage costs what it hit and not everything written
/// after it.
fn replay_journal(
    dir: &Path,
    file: &File,
    len: u64,
    index: &mut Index,
) -> Result<Replayed, StoreError> {
    let path = dir.join(FILE_NAME);
    check_header(file, &path)?;
    let mut prunes = Vec::new();
    let mut at = FILE_HEADER;
    let mut damaged = false;
    loop {
        let (end, torn) = replay_frames(file, at, len, index, Some(&mut prunes))?;
        // After the last commit come zeros (the file grows zero-filled), or
        // a commit cut short: whole frames after either are past damage.
        let resume = match end < len {
            true => next_frame(file, end + 1, len)?,
            false => None,
        };
        let Some(resume) = resume else {
            if torn {
                tracing::warn!(
                    file = %path.display(),
                    offset = end,
                    "the journal ends with an incomplete commit, which is dropped; a crash while \
                     writing it leaves this, and then it was never acknowledged, but a file cut \
                     short some other way (a copy or a disk fault) may have lost an acknowledged one"
                );
            }
            at = end;
            break;
        };
        let aside = dir.join(format!("{FILE_NAME}.damaged-{end}"));
        copy_out(dir, file, end, resume, &aside)?;
        tracing::error!(
            file = %path.display(),
            offset = end,
            bytes = resume - end,
            kept_in = %aside.display(),
            "part of the journal does not read (damage on disk, or a commit cut short by a crash \
             with later ones written whole); it was skipped and kept aside, and what follows it \
             was read: messages stored in those bytes may be lost"
        );
        damaged = true;
        at = resume;
    }
    index.prune_as_replayed(&prunes);
    Ok(Replayed { end: at, damaged })
}

/// A file read from a place of its own, whatever its cursor.
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A prune met in a replay: (its place, `before_ms`, its part).
type ReplayedPrune = (u64, u64, Option<u8>);

/// Applies the whole frames of `file` from `from` up to `len` to `index`,
/// prunes as they come or, given `prunes`, left there to apply at the end.
/// Returns where the last whole frame ends, and whether a frame was cut
/// short there (rather than followed by zeros or nothing).
fn replay_frames(
    file: &File,
    from: u64,
    len: u64,
    index: &mut Index,
    mut prunes: Option<&mut Vec<ReplayedPrune>>,
) -> Result<(u64, bool), StoreError> {
    let mut reader = BufReader::with_capacity(1 << 20, ReadAt { file, at: from });
    let mut at = from;
    let mut payload = Vec::new();
    loop {
        let mut frame_header = [0u8; FRAME_HEADER];
        if len - at < FRAME_HEADER as u64 || reader.read_exact(&mut frame_header).is_err() {
            return Ok((at, false));
        }
        if frame_header == [0; FRAME_HEADER] {
            return Ok((at, false));
        }
        let size = u32::from_le_bytes(frame_header[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(frame_header[4..].try_into().expect("4 bytes"));
        let whole = len - at - FRAME_HEADER as u64 >= size && {
            payload.resize(size as usize, 0);
            reader.read_exact(&mut payload).is_ok() && crc32fast::hash(&payload) == crc
        };
        if !whole {
            return Ok((at, true));
        }
        let base = at + FRAME_HEADER as u64;
        apply_payload(&payload, base, index, prunes.as_deref_mut())?;
        at = base + size;
    }
}

/// Applies the records of one frame, whose payload starts at `base`.
fn apply_payload(
    payload: &[u8],
    base: u64,
    index: &mut Index,
    mut prunes: Option<&mut Vec<ReplayedPrune>>,
) -> Result<(), StoreError> {
    let mut records = Reader {
        buf: payload,
        pos: 0,
    };
    while records.pos < payload.len() {
        let start = records.pos;
        let record = records.record()?;
        let loc = Loc {
            at: base + start as u64,
            len: (records.pos - start) as u32,
            accept: false,
            orphan: false,
        };
        match (record, prunes.as_deref_mut()) {
            (Record::Prune { before_ms, part }, Some(prunes)) => {
                prunes.push((loc.at, before_ms, part))
            }
            (record, _) => {
                index.apply(record, loc)?;
            }
        }
    }
    Ok(())
}

/// Applies sealed frames held in memory, the first starting at `base`.
fn apply_frames(frames: &[u8], base: u64, index: &mut Index) -> Result<(), StoreError> {
    let mut at = 0;
    while at < frames.len() {
        let size = u32::from_le_bytes(frames[at..at + 4].try_into().expect("4 bytes")) as usize;
        let payload = &frames[at + FRAME_HEADER..at + FRAME_HEADER + size];
        apply_payload(payload, base + (at + FRAME_HEADER) as u64, index, None)?;
        at += FRAME_HEADER + size;
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    pub fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let compact_path = dir.join(COMPACT_NAME);
        match std::fs::remove_file(&compact_path) {
            Ok(()) => tracing::info!("removed an unfinished compaction of the journal"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &compact_path, e)),
        }
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io("cannot read", &path, e))?
            .len();
        let mut index = Index {
            opened_ms: super::whole_seconds(crate::delivery::now_ms()),
            ..Index::default()
        };
        let Replayed { end, damaged } = if len == 0 {
            file.write_all_at(&file_header(), 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("cannot write", &path, e))?;
            sync_dir(dir)?;
            Replayed {
                end: FILE_HEADER,
                damaged: false,
            }
        } else {
            replay_journal(dir, &file, len, &mut index)?
        };
        // Whatever follows the last whole frame (zeros, or an interrupted
        // commit) becomes zeros, so that no stale bytes can ever pass for a
        // frame. Bytes that are not zeros are first kept in a file of their
        // own: normally an unacknowledged commit, but after damage to the
        // disk's last written stretch they may be acknowledged messages,
        // which must not be destroyed.
        if end < len {
            set_aside(dir, &file, end, len)?;
            zero_fill(&file, end, len)
                .and_then(|()| file.sync_data())
                .map_err(|e| io("cannot write", &path, e))?;
        }
        let compact_at = tuning.compact_min_bytes;
        let store = Self {
            dir: dir.to_owned(),
            tuning,
            syncing: Mutex::new(()),
            failed: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                index,
                file: Arc::new(file),
                written: end,
                unwritten: Vec::new(),
                zeroed_end: len.max(end),
                failed: None,
                compaction: None,
                compact_at,
                damaged: false,
            }),
        };
        // A journal left mostly dead starts its copy now, while the relay
        // reads back what waits; the first sync swaps it in. One with damage
        // is copied at the first write, which sets off a copy of any size.
        {
            let mut inner = store.lock();
            store.maybe_compact(&mut inner);
            inner.damaged = damaged;
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// A record's value and nothing else held while reading it.
    fn read_value(
        &self,
        find: impl FnOnce(&Index) -> Option<Loc>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (file, loc) = {
            let inner = self.lock();
            let Some(loc) = find(&inner.index) else {
                return Ok(None);
            };
            match inner.locate(loc) {
                Ok(record) => return Ok(Some(value_of(&record)?.to_vec())),
                Err(file) => (file, loc),
            }
        };
        Ok(Some(value_of(&read_at(&file, loc)?)?.to_vec()))
    }

    /// Marks the store failed: after a failed write or sync, what the disk
    /// holds is unknown, so nothing more is written.
    fn fail(&self, inner: &mut Inner, what: &str, e: std::io::Error) -> StoreError {
        let message = format!(
            "cannot {what} {}: {e}; the store takes no more writes until the relay restarts",
            self.path().display()
        );
        self.set_failed(inner, message.clone());
        StoreError::Embedded(message)
    }

    /// Takes no more writes from now on, for the reason `message` gives.
    fn set_failed(&self, inner: &mut Inner, message: String) {
        tracing::error!("{message}");
        inner.failed = Some(message);
        self.failed.store(true, Ordering::Relaxed);
    }

    /// What a failed sync does, for tests.
    #[cfg(test)]
    pub(super) fn fail_as_a_sync_would(&self, e: std::io::Error) {
        self.fail(&mut self.lock(), "sync", e);
    }

    /// Starts a compaction when more than half of a large file is dead.
    fn maybe_compact(&self, inner: &mut Inner) {
        if inner.compaction.is_some()
            || !inner.unwritten.is_empty()
            || (!inner.damaged
                && (inner.written < inner.compact_at || inner.index.live_bytes * 2 > inner.written))
        {
            return;
        }
        // Sorted by the worker, not under the lock.
        let mut live: Vec<(Loc, u8)> = inner.index.live().collect();
        let next_seq = inner.index.next_seq;
        let opened_ms = inner.index.opened_ms;
        let old = inner.file.clone();
        let path = self.dir.join(COMPACT_NAME);
        tracing::info!(
            file_bytes = inner.written,
            live_bytes = inner.index.live_bytes,
            "compacting the journal"
        );
        let worker = std::thread::Builder::new()
            .name("botrelay-compact".into())
            .spawn(move || {
                live.sort_unstable_by_key(|(loc, _)| loc.at);
                // An accepted message is listed once for its row and once for its dedupe entry.
                live.dedup_by(|later, first| {
                    let same = later.0.at == first.0.at;
                    if same {
                        first.1 |= later.1;
                    }
                    same
                });
                copy_live(&path, &old, live, next_seq, opened_ms)
            });
        match worker {
            Ok(worker) => {
                inner.compaction = Some(Compaction {
                    snapshot_end: inner.written,
                    worker,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start compacting the journal");
                inner.compact_at = inner.written + self.tuning.compact_min_bytes;
                inner.damaged = false;
            }
        }
    }

    /// Swaps in a finished compaction: appends the frames committed since it
    /// began, renames it over the journal and puts in the copy's index. Called
    /// by a sync, which holds `syncing`: only syncs write to the journal, so
    /// the frames to append hold still while they are copied and applied to
    /// the copy's index, without the lock that writes take. Under the lock
    /// are only the frames not yet written, the rename, and the swap.
    fn finish_compaction<'a>(&'a self, guard: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        if !guard
            .compaction
            .as_ref()
            .is_some_and(|c| c.worker.is_finished())
        {
            return guard;
        }
        let mut guard = guard;
        let compaction = guard.compaction.take().expect("checked above");
        let (old, written) = (guard.file.clone(), guard.written);
        drop(guard);
        let snapshot_end = compaction.snapshot_end;
        let copied = compaction
            .worker
            .join()
            .unwrap_or_else(|_| {
                Err(StoreError::Embedded(
                    "the compaction thread panicked".into(),
                ))
            })
            .and_then(|copied| self.append_tail(&old, snapshot_end, written, copied));
        let mut guard = self.lock();
        let inner = &mut *guard;
        match copied.and_then(|copied| self.swap_in(inner, written, copied)) {
            Ok(old_index) => {
                tracing::info!(
                    before_bytes = written,
                    after_bytes = inner.written,
                    "compacted the journal"
                );
                // Freeing the old index takes a while: not under the lock.
                drop(guard);
                drop(old_index);
                self.lock()
            }
            Err(e) => {
                tracing::warn!(error = %e, "compacting the journal failed; the journal is unchanged");
                let _ = std::fs::remove_file(self.dir.join(COMPACT_NAME));
                inner.compact_at = inner.written + self.tuning.compact_min_bytes;
                inner.damaged = false;
                guard
            }
        }
    }

    /// Appends to the copy the frames written to `old` between the snapshot
    /// and `written`, flushes it, and applies them to its index.
    fn append_tail(
        &self,
        old: &File,
        snapshot_end: u64,
        written: u64,
        mut copied: Copied,
    ) -> Result<Copied, StoreError> {
        let path = self.dir.join(COMPACT_NAME);
        let mut chunk = vec![0u8; COPY_FRAME];
        let mut at = snapshot_end;
        while at < written {
            let n = (written - at).min(COPY_FRAME as u64) as usize;
            old.read_exact_at(&mut chunk[..n], at)
                .map_err(|e| io("cannot read", &self.path(), e))?;
            copied
                .file
                .write_all_at(&chunk[..n], at - snapshot_end + copied.end)
                .map_err(|e| io("cannot write", &path, e))?;
            at += n as u64;
        }
        copied
            .file
            .sync_data()
            .map_err(|e| io("cannot sync", &path, e))?;
        let end = copied.end + (written - snapshot_end);
        let (applied, _) = replay_frames(&copied.file, copied.end, end, &mut copied.index, None)?;
        if applied != end {
            return Err(corrupt(
                "the frames appended to the compacted journal do not read back",
            ));
        }
        copied.end = end;
        Ok(copied)
    }

    /// Moves the store to a copy that holds everything up to `written`;
    /// returns the index it had.
    fn swap_in(
        &self,
        inner: &mut Inner,
        written: u64,
        copied: Copied,
    ) -> Result<Index, StoreError> {
        let path = self.dir.join(COMPACT_NAME);
        let Copied {
            file,
            mut index,
            end,
        } = copied;
        if inner.written != written {
            return Err(StoreError::Embedded(
                "the journal was written to while its tail was copied".into(),
            ));
        }
        // The frames committed but not yet written go to the copy next.
        apply_frames(&inner.unwritten, end, &mut index)?;
        let old = &inner.index;
        let holds_the_same = (0..old.rows.len()).all(|t| index.rows[t].len() == old.rows[t].len())
            && index.dedupe.len() == old.dedupe.len()
            && index.conversations.len() == old.conversations.len()
            && index.live_bytes == old.live_bytes;
        if !holds_the_same {
            return Err(StoreError::Embedded(
                "the compacted journal does not hold what the journal holds".into(),
            ));
        }
        index.next_seq = index.next_seq.max(old.next_seq);
        index.dead_letter_counts = old.dead_letter_counts;
        std::fs::rename(&path, self.path()).map_err(|e| io("cannot rename", &path, e))?;
        // From here on the journal is the copy, whatever follows.
        let old_index = std::mem::replace(&mut inner.index, index);
        inner.damaged = false;
        inner.written = end;
        inner.zeroed_end = end;
        inner.file = Arc::new(file);
        inner.compact_at = self.tuning.compact_min_bytes;
        if let Err(e) = sync_dir(&self.dir) {
            // The rename may not survive a crash, which would bring back the
            // old file without what is written from now on: take no more writes.
            self.set_failed(
                inner,
                format!("{e}; the store takes no more writes until the relay restarts"),
            );
        }
        Ok(old_index)
    }
}

impl Store for EmbeddedStore {
    fn maintain(&self) -> Result<bool, StoreError> {
        // As a sync does, with nothing to write: only syncs touch the file.
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = self.lock();
        if let Some(e) = &guard.failed {
            return Err(StoreError::Embedded(e.clone()));
        }
        guard = self.finish_compaction(guard);
        if let Some(e) = &guard.failed {
            return Err(StoreError::Embedded(e.clone()));
        }
        if guard.unwritten.is_empty() {
            self.maybe_compact(&mut guard);
        }
        Ok(guard.compaction.is_some())
    }

    fn write(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(e) = &inner.failed {
            return Err(StoreError::Embedded(e.clone()));
        }
        let frame_start = inner.unwritten.len();
        inner.unwritten.resize(frame_start + FRAME_HEADER, 0);
        let next_seq_before = inner.index.next_seq;
        let mut next_seq = next_seq_before;
        let mut txn = Txn {
            index: &mut inner.index,
            frames: &mut inner.unwritten,
            base: inner.written,
            file: &inner.file,
            undo: Vec::new(),
        };
        let applied = apply::apply(&mut txn, ops, &mut next_seq);
        let undo = std::mem::take(&mut txn.undo);
        match applied {
            Ok((outcomes, delta)) => {
                if inner.unwritten.len() == frame_start + FRAME_HEADER {
                    inner.unwritten.truncate(frame_start);
                } else {
                    seal(&mut inner.unwritten[frame_start..]);
                }
                inner.index.next_seq = inner.index.next_seq.max(next_seq);
                delta.apply_to(&mut inner.index.dead_letter_counts);
                Ok(outcomes)
            }
            Err(e) => {
                inner.unwritten.truncate(frame_start);
                inner.index.undo(undo);
                inner.index.next_seq = next_seq_before;
                Err(e)
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        // One sync at a time: one that finds nothing new to write must still
        // wait for one in progress, which may be flushing its writes.
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let file = {
            let mut guard = self.lock();
            if let Some(e) = &guard.failed {
                return Err(StoreError::Embedded(e.clone()));
            }
            guard = self.finish_compaction(guard);
            if let Some(e) = &guard.failed {
                return Err(StoreError::Embedded(e.clone()));
            }
            if guard.unwritten.is_empty() {
                return Ok(());
            }
            // Growing the file means writing a step of zeros, which takes
            // milliseconds: that happens without the lock, so that writes go on
            // meanwhile (into the buffer). Only a sync writes to the file, and
            // this one holds `syncing`, so nothing else touches the stretch.
            while guard.end() > guard.zeroed_end {
                let (file, from) = (guard.file.clone(), guard.zeroed_end);
                let to = guard.end() + self.tuning.grow_step;
                drop(guard);
                let filled = zero_fill(&file, from, to);
                guard = self.lock();
                if let Err(e) = filled {
                    return Err(self.fail(&mut guard, "extend", e));
                }
                guard.zeroed_end = to;
            }
            let inner = &mut *guard;
            let end = inner.end();
            if let Err(e) = inner.file.write_all_at(&inner.unwritten, inner.written) {
                return Err(self.fail(inner, "write", e));
            }
            inner.written = end;
            inner.unwritten.clear();
            if inner.unwritten.capacity() > UNWRITTEN_KEPT {
                inner.unwritten.shrink_to(UNWRITTEN_KEPT);
            }
            self.maybe_compact(inner);
            inner.file.clone()
        };
        // The flush happens outside the lock, so that readers and the next
        // writes go on meanwhile.
        file.sync_data()
            .map_err(|e| self.fail(&mut self.lock(), "sync", e))
    }

    fn recover(&self, each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError> {
        // In chunks, each taken under the lock and read without it, so that the
        // deliveries that `each` sets going can read their messages meanwhile.
        // Messages those deliveries store (their replies) are queued by the
        // writer: only what was there at the start is recovered.
        let limit = self.lock().index.next_seq;
        let scan = |table: Table, f: &mut apply::Visit| -> Result<(), StoreError> {
            let mut after = None;
            loop {
                let (file, chunk): (Arc<File>, Vec<(Seq, Loc)>) = {
                    let inner = self.lock();
                    let rows = inner.index.rows(table);
                    let rest = match after {
                        None => rows.range(..limit),
                        Some(seq) => rows.range((Bound::Excluded(seq), Bound::Excluded(limit))),
                    };
                    let chunk = rest.take(RECOVER_CHUNK).map(|(s, l)| (*s, *l)).collect();
                    (inner.file.clone(), chunk)
                };
                let Some(&(last, _)) = chunk.last() else {
                    return Ok(());
                };
                // Records that were there at the start are all in the file.
                for (seq, loc) in chunk {
                    f(seq, value_of(&read_at(&file, loc)?)?)?;
                }
                after = Some(last);
            }
        };
        let counts = apply::recover(scan, each)?;
        self.lock().index.dead_letter_counts = counts;
        Ok(counts)
    }

    fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError> {
        self.read_value(|index| index.rows(Table::Inbound).get(&seq).copied())?
            .map(|b| decode("inbound message", &b))
            .transpose()
    }

    fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError> {
        self.read_value(|index| index.rows(Table::Outbound).get(&seq).copied())?
            .map(|b| decode("outbound message", &b))
            .transpose()
    }

    fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        self.read_value(|index| {
            index
                .conversations
                .get(&crate::ids::key(id))
                .map(|c| c.loc())
        })?
        .map(|b| decode("conversation", &b))
        .transpose()
    }

    fn dead_letters(&self, from: Seq, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead_letter_page(from, limit)?.0)
    }

    fn dead_letter_page(
        &self,
        from: Seq,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, DeadLetterCounts), StoreError> {
        // Records still unwritten are copied under the lock; the rest are read
        // after, from the file of that moment (a compaction leaves it whole).
        let (file, records, counts): (Arc<File>, Vec<Result<Vec<u8>, Loc>>, _) = {
            let inner = self.lock();
            let records = inner
                .index
                .rows(Table::DeadLetters)
                .range(from..)
                .map(|(_, loc)| loc)
                .take(limit)
                .map(|loc| inner.locate(*loc).map_err(|_| *loc))
                .collect();
            (inner.file.clone(), records, inner.index.dead_letter_counts)
        };
        let letters = records
            .into_iter()
            .map(|record| {
                let record = match record {
                    Ok(record) => record,
                    Err(loc) => read_at(&file, loc)?,
                };
                decode("dead letter", value_of(&record)?)
            })
            .collect::<Result<_, _>>()?;
        Ok((letters, counts))
    }

    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError> {
        Ok(self.lock().index.dead_letter_counts)
    }

    fn conversation_count(&self) -> u64 {
        self.lock().index.conversations.len() as u64
    }

    fn dedupe_count(&self) -> u64 {
        self.lock().index.dedupe.len() as u64
    }

    fn first_answer(
        &self,
        caller_message_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        // The record is copied under the lock when it is not written yet, and
        // read from the file after it otherwise.
        let (file, loc) = {
            let inner = self.lock();
            let key = dedupe_key(caller_message_id.as_bytes());
            let Some(entry) = inner
                .index
                .dedupe
                .get(&key)
                .filter(|e| now_ms.saturating_sub(e.accepted_ms) < window_ms)
                .copied()
            else {
                return Ok(None);
            };
            match inner.locate(entry.loc) {
                Ok(record) => return first_of(&record)?.answer().map(Some),
                Err(file) => (file, entry.loc),
            }
        };
        first_of(&read_at(&file, loc)?)?.answer().map(Some)
    }

    fn dedupe_cutoff(&self, part: u8, keep: usize) -> Option<u64> {
        let accepted = {
            let inner = self.lock();
            let entries = inner.index.dedupe.iter_part(Some(part));
            entries.map(|(_, e)| e.accepted_ms).collect()
        };
        super::newest_cutoff(accepted, keep)
    }

    fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// A failed store records nothing more: a delivery made now would only
    /// be made again after the restart, so none starts.
    fn progress_unavailable(&self) -> Option<String> {
        if self.failed.load(Ordering::Relaxed) {
            self.failure()
        } else {
            None
        }
    }

    fn usage(&self) -> Option<Usage> {
        let inner = self.lock();
        Some(Usage {
            file_bytes: inner.end(),
            live_bytes: inner.index.live_bytes + FILE_HEADER,
        })
    }
}
