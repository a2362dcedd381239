//! The partition log: what the relay writes to JetStream, where, and how a
//! partition's owner turns it back into the messages waiting for delivery.
//! Pure: no I/O, so every rule is tested without a server.
//!
//! Every change of durable state is a [`Record`] appended to the endpoint's
//! stream, on a subject of the conversation's partition. Any replica appends
//! accepted messages and bot messages; the owner of a partition appends its
//! delivery progress. The owner replays the partition's records in stream
//! order into a [`Partition`], so every replica that replays the same records
//! rebuilds the same waiting messages, at the same places.

use crate::store::{InboundMessage, OutboundMessage, Seq, Target};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many partitions the conversations of an endpoint are hashed into.
/// Fixed: a conversation's records must stay in one partition for good.
pub const PARTITIONS: u16 = 32;

/// The partition of a relay conversation id.
pub fn partition_of(conversation_id: &str) -> u16 {
    (crate::ids::key(conversation_id) % u128::from(PARTITIONS)) as u16
}

/// Where a waiting message was queued: the stream sequence of the record
/// that queued it, and its index among the messages that record queued
/// (a bot's synchronous replies share one record). The same on every replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Place {
    pub record: u64,
    pub index: u16,
}

/// Bits of a [`Seq`] (as the delivery engine sees it) for each part.
const INDEX_BITS: u32 = 10;
const RECORD_BITS: u32 = 40;
const PARTITION_BITS: u32 = 8;
const GENERATION_BITS: u32 = 6;
const _: () = assert!(INDEX_BITS + RECORD_BITS + PARTITION_BITS + GENERATION_BITS == 64);
const _: () = assert!((PARTITIONS as u64) <= 1 << PARTITION_BITS);

/// Most replies a bot answer may queue: the rest are dropped, with a warning.
pub const MAX_REPLIES: usize = 1 << INDEX_BITS;

impl Place {
    /// As one number, in stream order: the dead letters' cursor.
    pub fn packed(self) -> u64 {
        (self.record << INDEX_BITS) | u64::from(self.index)
    }

    pub fn unpacked(packed: u64) -> Place {
        Place {
            record: packed >> INDEX_BITS,
            index: (packed & ((1 << INDEX_BITS) - 1)) as u16,
        }
    }
}

/// A waiting message's position as the delivery engine holds it: its place,
/// its partition, and the generation of this replica's ownership of that
/// partition. A partition lost and taken again gets a new generation, so that
/// what the delivery engine still holds from the last time finds nothing and
/// drains, instead of being delivered beside the replayed copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    pub generation: u8,
    pub partition: u16,
    pub place: Place,
}

impl Handle {
    pub fn seq(self) -> Seq {
        let generation = u64::from(self.generation) & ((1 << GENERATION_BITS) - 1);
        (generation << (64 - GENERATION_BITS))
            | (u64::from(self.partition) << (INDEX_BITS + RECORD_BITS))
            | self.place.packed()
    }

    pub fn of(seq: Seq) -> Handle {
        Handle {
            generation: (seq >> (64 - GENERATION_BITS)) as u8,
            partition: ((seq >> (INDEX_BITS + RECORD_BITS)) & ((1 << PARTITION_BITS) - 1)) as u16,
            place: Place::unpacked(seq & ((1 << (INDEX_BITS + RECORD_BITS)) - 1)),
        }
    }
}

/// The next generation after `generation`, within the bits a [`Seq`] has for it.
pub fn next_generation(generation: u8) -> u8 {
    (generation + 1) % (1 << GENERATION_BITS)
}

/// One change of durable state, as appended to the stream. Externally
/// tagged (`{"accept": {...}}`): the payloads hold raw JSON, which an
/// internally tagged enum cannot read back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// A user's message, accepted (published with its dedupe id).
    Accept { message: InboundMessage },
    /// A bot's own message to a conversation.
    AddOutbound { message: OutboundMessage },
    /// The bot took the message at `place`; its synchronous replies wait for
    /// the response endpoint.
    Delivered {
        place: Place,
        replies: Vec<OutboundMessage>,
    },
    /// The response endpoint took the message at `place`.
    Sent { place: Place },
    /// The message at `place` is now a dead letter (kept in the dead-letter bucket).
    DeadLettered { target: Target, place: Place },
    /// A dead letter back in its queue. `letter` is its key in the
    /// dead-letter bucket (absent in records of older versions): the
    /// partition's owner takes the letter out of the list if the redrive
    /// that wrote the record did not live to.
    RedrivenInbound {
        message: InboundMessage,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        letter: Option<String>,
    },
    RedrivenOutbound {
        message: OutboundMessage,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        letter: Option<String>,
    },
    /// Delivery progress of one partition written at once (`Delivered`,
    /// `Sent` and `DeadLettered` records, in the order made): the replies
    /// of its deliveries are numbered across the batch.
    Progress { records: Vec<Record> },
    /// What waited in the partition once every record up to `through` was
    /// applied: a new owner starts from it and replays only what follows.
    Snapshot {
        through: u64,
        inbound: Vec<(Place, InboundMessage)>,
        outbound: Vec<(Place, OutboundMessage)>,
        /// When this snapshot and the earlier ones still of use were taken:
        /// (through, ms since the Unix epoch), oldest first. See [`expired`].
        #[serde(default)]
        marks: Marks,
    },
}

/// When snapshots were taken: (the last record each covers, ms since the
/// Unix epoch), oldest first.
pub type Marks = Vec<(u64, u64)>;

/// The last record, by the `marks` of the snapshots, that is older than the
/// dedupe window and covered by a snapshot: the accepted messages up to it
/// are no longer read (a duplicate's answer is read only within the window,
/// a replay starts from the snapshot), so they may leave the stream.
pub fn expired(marks: &[(u64, u64)], now_ms: u64, window_ms: u64) -> Option<u64> {
    let before = now_ms.checked_sub(window_ms)?;
    marks
        .iter()
        .filter(|(_, at)| *at <= before)
        .map(|(through, _)| *through)
        .max()
}

/// `marks` and a new snapshot's, less those older than the newest expired
/// one, which alone still counts.
pub fn next_marks(
    marks: &[(u64, u64)],
    through: u64,
    now_ms: u64,
    window_ms: u64,
) -> Vec<(u64, u64)> {
    let mut next: Vec<(u64, u64)> = marks.to_vec();
    next.push((through, now_ms));
    if let Some(cut) = expired(&next, now_ms, window_ms) {
        next.retain(|(t, _)| *t >= cut);
    }
    // A bounded record: a busy partition snapshots often.
    while next.len() > 64 {
        next.remove(1);
    }
    next
}

impl Record {
    /// The dead letter a redrive record sent back: its target and key.
    pub fn redriven_letter(&self) -> Option<(Target, &str)> {
        match self {
            Record::RedrivenInbound {
                letter: Some(key), ..
            } => Some((Target::Bot, key)),
            Record::RedrivenOutbound {
                letter: Some(key), ..
            } => Some((Target::Response, key)),
            _ => None,
        }
    }

    /// The conversation a record that carries a message names, as a bot
    /// can write to it: (relay id, caller id, user id, when).
    pub fn conversation(&self) -> Option<crate::store::Conversation> {
        let (id, caller_id, user_id, at) = match self {
            Record::Accept { message } | Record::RedrivenInbound { message, .. } => (
                &message.conversation_id,
                &message.caller_conversation_id,
                &message.user_id,
                message.created_at_ms,
            ),
            Record::AddOutbound { message } | Record::RedrivenOutbound { message, .. } => (
                &message.conversation_id,
                &message.caller_conversation_id,
                &message.user_id,
                message.created_at_ms,
            ),
            _ => return None,
        };
        Some(crate::store::Conversation {
            id: id.clone(),
            caller_id: caller_id.clone(),
            user_id: user_id.clone(),
            seen_ms: Some(at),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The names of an endpoint's stream, subjects and buckets, from its prefix.
#[derive(Clone, Debug)]
pub struct Names {
    pub stream: String,
    /// Every subject of the stream starts with this and a dot.
    pub subjects: String,
    pub leases: String,
    pub dead_letters: String,
    pub conversations: String,
}

impl Names {
    /// `prefix` is checked by [`valid_prefix`].
    pub fn new(prefix: &str) -> Names {
        Names {
            stream: format!("botrelay-{prefix}"),
            subjects: format!("botrelay.{prefix}"),
            leases: format!("botrelay-{prefix}-leases"),
            dead_letters: format!("botrelay-{prefix}-dead-letters"),
            conversations: format!("botrelay-{prefix}-conversations"),
        }
    }

    /// Every record of a partition.
    pub fn partition(&self, partition: u16) -> String {
        format!("{}.{partition}.>", self.subjects)
    }

    /// The records that name a conversation (its messages): the last of them
    /// tells who wrote last and when.
    pub fn conversation(&self, conversation_id: &str) -> String {
        format!(
            "{}.{}.c.{:032x}",
            self.subjects,
            partition_of(conversation_id),
            crate::ids::key(conversation_id)
        )
    }

    /// Delivery progress of a partition.
    pub fn progress(&self, partition: u16) -> String {
        format!("{}.{partition}.d", self.subjects)
    }

    /// The accepted and bot messages of a partition.
    pub fn messages(&self, partition: u16) -> String {
        format!("{}.{partition}.c.>", self.subjects)
    }

    /// Snapshots of a partition; the last one is where a replay starts.
    pub fn snapshots(&self, partition: u16) -> String {
        format!("{}.{partition}.s", self.subjects)
    }
}

/// Whether `prefix` can name streams, subjects and buckets: letters, digits,
/// `-` and `_`, at most 64 of them.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The prefix made from an endpoint name: anything a stream name cannot
/// hold becomes `_`.
pub fn prefix_from(name: &str) -> String {
    let mut prefix: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    prefix.truncate(64);
    prefix
}

/// A message that became due as a record was applied.
#[derive(Debug, PartialEq, Eq)]
pub struct Due {
    pub target: Target,
    pub place: Place,
}

/// The waiting messages of one partition, rebuilt from its records.
#[derive(Default, Debug)]
pub struct Partition {
    pub inbound: BTreeMap<Place, InboundMessage>,
    pub outbound: BTreeMap<Place, OutboundMessage>,
}

impl Partition {
    /// Applies the record at stream sequence `seq`; returns what it made due,
    /// in delivery order.
    pub fn apply(&mut self, seq: u64, record: Record) -> Vec<Due> {
        self.apply_from(seq, 0, record).0
    }

    /// Applies a record whose messages are numbered from `first`; returns
    /// what became due and how many numbers it took.
    fn apply_from(&mut self, seq: u64, first: usize, record: Record) -> (Vec<Due>, usize) {
        let at = |index: usize| Place {
            record: seq,
            index: (first + index) as u16,
        };
        let due = match record {
            Record::Accept { message } | Record::RedrivenInbound { message, .. } => {
                self.inbound.insert(at(0), message);
                vec![Due {
                    target: Target::Bot,
                    place: at(0),
                }]
            }
            Record::AddOutbound { message } | Record::RedrivenOutbound { message, .. } => {
                self.outbound.insert(at(0), message);
                vec![Due {
                    target: Target::Response,
                    place: at(0),
                }]
            }
            Record::Delivered { place, replies } => {
                // The numbers are taken whether or not the replies count, so
                // that every replay numbers the rest of a batch alike.
                let room = MAX_REPLIES.saturating_sub(first);
                let taken = replies.len().min(room);
                // Only the first record of a delivery counts: one written by
                // a replica that lost the partition meanwhile comes second.
                if self.inbound.remove(&place).is_none() {
                    return (Vec::new(), taken);
                }
                let due = replies
                    .into_iter()
                    .take(room)
                    .enumerate()
                    .map(|(i, reply)| {
                        self.outbound.insert(at(i), reply);
                        Due {
                            target: Target::Response,
                            place: at(i),
                        }
                    })
                    .collect();
                return (due, taken);
            }
            Record::Sent { place } => {
                self.outbound.remove(&place);
                return (Vec::new(), 0);
            }
            Record::DeadLettered { target, place } => {
                match target {
                    Target::Bot => self.inbound.remove(&place).map(drop),
                    Target::Response => self.outbound.remove(&place).map(drop),
                };
                return (Vec::new(), 0);
            }
            Record::Progress { records } => {
                let (mut due, mut next) = (Vec::new(), first);
                for record in records {
                    let (more, taken) = self.apply_from(seq, next, record);
                    due.extend(more);
                    next += taken;
                }
                return (due, next - first);
            }
            // A replay that meets one has applied everything it holds already.
            Record::Snapshot { .. } => Vec::new(),
        };
        (due, 1)
    }

    /// The partition as a snapshot record, after the record at `through`.
    pub fn snapshot(&self, through: u64, marks: Marks) -> Record {
        Record::Snapshot {
            through,
            inbound: self.inbound.iter().map(|(p, m)| (*p, m.clone())).collect(),
            outbound: self.outbound.iter().map(|(p, m)| (*p, m.clone())).collect(),
            marks,
        }
    }

    /// The partition a snapshot holds, the last record it covers, and its marks.
    pub fn from_snapshot(record: Record) -> Option<(Partition, u64, Marks)> {
        match record {
            Record::Snapshot {
                through,
                inbound,
                outbound,
                marks,
            } => Some((
                Partition {
                    inbound: inbound.into_iter().collect(),
                    outbound: outbound.into_iter().collect(),
                },
                through,
                marks,
            )),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.inbound.len() + self.outbound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every waiting message, in the order to queue them after a replay: the
    /// replies first (the bot's deliveries make new ones at once, which must
    /// queue behind them), each target in stream order.
    pub fn waiting(&self) -> Vec<Due> {
        let replies = self.outbound.keys().map(|&place| Due {
            target: Target::Response,
            place,
        });
        let messages = self.inbound.keys().map(|&place| Due {
            target: Target::Bot,
            place,
        });
        replies.chain(messages).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string(s.to_owned()).unwrap()
    }

    fn inbound(id: &str) -> InboundMessage {
        InboundMessage {
            id: id.into(),
            conversation_id: "conv".into(),
            user_id: "user".into(),
            caller_conversation_id: "c".into(),
            caller_user_id: "u".into(),
            caller_message_id: id.into(),
            kind: "text".into(),
            text: "hi".into(),
            payload: raw(r#"{"text":"hi"}"#),
            created_at_ms: 1,
            queued_at_ms: 1,
            trace: None,
            waited: false,
        }
    }

    fn outbound(id: &str) -> OutboundMessage {
        OutboundMessage {
            id: id.into(),
            conversation_id: "conv".into(),
            caller_conversation_id: "c".into(),
            user_id: "user".into(),
            kind: "text".into(),
            payload: raw(r#"{"text":"echo"}"#),
            created_at_ms: 1,
            queued_at_ms: 1,
            trace: None,
        }
    }

    fn place(record: u64, index: u16) -> Place {
        Place { record, index }
    }

    #[test]
    fn handles_round_trip_through_a_seq() {
        for handle in [
            Handle {
                generation: 0,
                partition: 0,
                place: place(1, 0),
            },
            Handle {
                generation: 63,
                partition: PARTITIONS - 1,
                place: place((1 << 40) - 1, (MAX_REPLIES - 1) as u16),
            },
            Handle {
                generation: 5,
                partition: 17,
                place: place(123_456, 3),
            },
        ] {
            assert_eq!(Handle::of(handle.seq()), handle);
        }
        assert_eq!(next_generation(63), 0);
        // Dead-letter cursors sort in stream order.
        assert!(place(2, 0).packed() > place(1, 1000).packed());
        assert_eq!(Place::unpacked(place(9, 7).packed()), place(9, 7));
    }

    #[test]
    fn a_replay_keeps_what_waits_in_order_and_a_second_completion_changes_nothing() {
        let mut p = Partition::default();
        let due = p.apply(
            1,
            Record::Accept {
                message: inbound("m1"),
            },
        );
        assert_eq!(
            due,
            [Due {
                target: Target::Bot,
                place: place(1, 0)
            }]
        );
        p.apply(
            2,
            Record::Accept {
                message: inbound("m2"),
            },
        );
        let due = p.apply(
            3,
            Record::Delivered {
                place: place(1, 0),
                replies: vec![outbound("r1"), outbound("r2")],
            },
        );
        assert_eq!(
            due.iter().map(|d| d.place).collect::<Vec<_>>(),
            [place(3, 0), place(3, 1)]
        );
        // The same delivery recorded again (by a replica that lost the
        // partition): its replies are not queued twice.
        let again = p.apply(
            4,
            Record::Delivered {
                place: place(1, 0),
                replies: vec![outbound("r1-again")],
            },
        );
        assert!(again.is_empty());
        p.apply(5, Record::Sent { place: place(3, 0) });
        p.apply(
            6,
            Record::DeadLettered {
                target: Target::Bot,
                place: place(2, 0),
            },
        );
        assert_eq!(
            p.waiting(),
            [Due {
                target: Target::Response,
                place: place(3, 1)
            }]
        );
        p.apply(
            7,
            Record::RedrivenInbound {
                message: inbound("m2"),
                letter: None,
            },
        );
        assert_eq!(
            p.waiting(),
            [
                Due {
                    target: Target::Response,
                    place: place(3, 1)
                },
                Due {
                    target: Target::Bot,
                    place: place(7, 0)
                }
            ],
            "replies first, then the messages for the bot"
        );
    }

    /// Records 1 to 6 of a partition, those from `from` on applied to `p`.
    fn history(p: &mut Partition, from: u64, to: u64) {
        let all = [
            Record::Accept {
                message: inbound("m1"),
            },
            Record::Accept {
                message: inbound("m2"),
            },
            Record::Delivered {
                place: place(1, 0),
                replies: vec![outbound("r1")],
            },
            Record::Accept {
                message: inbound("m3"),
            },
            Record::Sent { place: place(3, 0) },
            Record::Delivered {
                place: place(2, 0),
                replies: vec![outbound("r2")],
            },
        ];
        for (seq, record) in (1..).zip(all) {
            if (from..=to).contains(&seq) {
                p.apply(seq, record);
            }
        }
    }

    #[test]
    fn a_snapshot_then_the_records_after_it_rebuild_what_a_full_replay_does() {
        let mut full = Partition::default();
        history(&mut full, 1, 6);
        let mut head = Partition::default();
        history(&mut head, 1, 3);
        let snapshot = Record::decode(&head.snapshot(3, vec![(3, 1000)]).encode()).unwrap();
        let (mut resumed, through, marks) = Partition::from_snapshot(snapshot).unwrap();
        assert_eq!((through, marks), (3, vec![(3, 1000)]));
        history(&mut resumed, through + 1, 6);
        assert_eq!(resumed.waiting(), full.waiting());
        assert_eq!(resumed.len(), 2, "m3 and r2 wait");
        assert!(Partition::from_snapshot(Record::Sent { place: place(1, 0) }).is_none());
    }

    #[test]
    fn accepted_messages_expire_once_a_snapshot_covers_them_and_the_window_passed() {
        let window = 1000;
        assert_eq!(expired(&[], 5000, window), None);
        let marks = next_marks(&[], 10, 1000, window);
        assert_eq!(expired(&marks, 1500, window), None, "within the window");
        assert_eq!(expired(&marks, 2000, window), Some(10));
        let marks = next_marks(&marks, 20, 1800, window);
        let marks = next_marks(&marks, 30, 3000, window);
        // At 3000 the snapshots of 1000 and 1800 are past the window: the
        // later one alone counts, the earlier is dropped.
        assert_eq!(marks, [(20, 1800), (30, 3000)]);
        assert_eq!(expired(&marks, 3000, window), Some(20));
        assert_eq!(
            expired(&marks, 500, window),
            None,
            "a clock before the window"
        );
        let many = (0..100).fold(Vec::new(), |m, i| next_marks(&m, i, 5000 + i, window));
        assert_eq!(many.len(), 64);
        assert_eq!(many[0], (0, 5000), "the oldest mark is kept");
    }

    #[test]
    fn a_batch_of_progress_numbers_its_replies_across_the_batch() {
        let mut p = Partition::default();
        p.apply(
            1,
            Record::Accept {
                message: inbound("m1"),
            },
        );
        p.apply(
            2,
            Record::Accept {
                message: inbound("m2"),
            },
        );
        let due = p.apply(
            3,
            Record::Progress {
                records: vec![
                    Record::Delivered {
                        place: place(1, 0),
                        replies: vec![outbound("r1a"), outbound("r1b")],
                    },
                    // Already done: its number is taken all the same.
                    Record::Delivered {
                        place: place(9, 0),
                        replies: vec![outbound("x")],
                    },
                    Record::Delivered {
                        place: place(2, 0),
                        replies: vec![outbound("r2")],
                    },
                    Record::Sent { place: place(3, 0) },
                ],
            },
        );
        assert_eq!(
            due.iter().map(|d| d.place).collect::<Vec<_>>(),
            [place(3, 0), place(3, 1), place(3, 3)]
        );
        assert_eq!(p.outbound[&place(3, 3)].id, "r2");
        assert!(
            !p.outbound.contains_key(&place(3, 0)),
            "sent in the same batch"
        );
        assert!(p.inbound.is_empty());
    }

    #[test]
    fn records_survive_the_stream_as_json() {
        let record = Record::Delivered {
            place: place(3, 1),
            replies: vec![outbound("r")],
        };
        let back = Record::decode(&record.encode()).unwrap();
        assert!(
            matches!(back, Record::Delivered { place: p, replies } if p == place(3, 1) && replies[0].id == "r")
        );
    }

    #[test]
    fn names_keep_endpoints_apart_and_conversations_in_their_partition() {
        let names = Names::new("shop-support");
        assert_eq!(names.stream, "botrelay-shop-support");
        let id = crate::ids::conversation_id("c-1");
        let subject = names.conversation(&id);
        let p = partition_of(&id);
        assert!(subject.starts_with(&format!("botrelay.shop-support.{p}.c.")));
        assert_ne!(
            Names::new("other-support").conversation(&id),
            subject,
            "another namespace's endpoint of the same name"
        );
        // Any string a bot sends still makes a valid subject token.
        assert!(!names.conversation("a.b *>").contains(' '));
        assert_eq!(prefix_from("shop.support/x"), "shop_support_x");
        assert!(valid_prefix("shop-support_1"));
        assert!(!valid_prefix("shop.support") && !valid_prefix(""));
    }
}
