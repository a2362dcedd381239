//! One suite, run against both stores: they must mean the same thing.

use super::*;

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

fn inbound(caller_message_id: &str, conversation: &str, at: u64) -> InboundMessage {
    InboundMessage {
        id: format!("id-{caller_message_id}"),
        conversation_id: format!("conv-{conversation}"),
        user_id: "user-1".into(),
        caller_conversation_id: conversation.into(),
        caller_user_id: "u1".into(),
        caller_message_id: caller_message_id.into(),
        kind: "text".into(),
        text: "hi".into(),
        payload: raw(r#"{"text":"hi"}"#),
        created_at_ms: at,
        queued_at_ms: at,
        trace: None,
        waited: false,
    }
}

fn reply(n: u32, conversation: &str) -> OutboundMessage {
    OutboundMessage {
        id: format!("reply-{n}"),
        conversation_id: format!("conv-{conversation}"),
        caller_conversation_id: conversation.into(),
        user_id: "user-1".into(),
        kind: "text".into(),
        payload: raw(&format!(r#"{{"n":{n}}}"#)),
        created_at_ms: 10,
        queued_at_ms: 10,
        trace: None,
    }
}

/// Everything waiting, as a restart would see it.
fn waiting(store: &dyn Store) -> Vec<Pending> {
    let mut all = Vec::new();
    store.recover(&mut |p| all.push(p)).unwrap();
    all
}

/// What the client got for `accept(_, id, at)`.
fn answer(id: &str, at: u64) -> String {
    crate::wire::accept_answer(&inbound(id, "c1", at))
}

fn accept(store: &dyn Store, id: &str, at: u64) -> Outcome {
    let op = Op::Accept {
        message: inbound(id, "c1", at),
        dedupe_window_ms: 1000,
    };
    store.commit(vec![op]).unwrap().pop().unwrap()
}

fn dedupe_returns_the_first_answer_within_the_window(store: &dyn Store) {
    let Outcome::Accepted { pending, .. } = accept(store, "m1", 100) else {
        panic!("first is accepted")
    };
    assert_eq!(pending.target, Target::Bot);
    assert_eq!(
        accept(store, "m1", 900),
        Outcome::Duplicate {
            answer: answer("m1", 100)
        }
    );
    // Two of the same id in one batch: the second is the duplicate.
    let ops = (0..2)
        .map(|_| Op::Accept {
            message: inbound("m2", "c1", 100),
            dedupe_window_ms: 1000,
        })
        .collect();
    let outcomes = store.commit(ops).unwrap();
    assert!(matches!(outcomes[0], Outcome::Accepted { .. }));
    assert_eq!(
        outcomes[1],
        Outcome::Duplicate {
            answer: answer("m2", 100)
        }
    );
    // Looked up without a write, as under back-pressure: the same answer
    // within the window, none past it or for an id never seen.
    assert_eq!(
        store.first_answer("m1", 900, 1000).unwrap(),
        Some(answer("m1", 100))
    );
    assert_eq!(store.first_answer("m1", 1100, 1000).unwrap(), None);
    assert_eq!(store.first_answer("never", 900, 1000).unwrap(), None);
    // Past the window the id is new again.
    assert!(matches!(
        accept(store, "m1", 1100),
        Outcome::Accepted { .. }
    ));
    assert_eq!(waiting(store).len(), 3);
}

fn completion_queues_replies_in_order(store: &dyn Store) {
    let Outcome::Accepted { pending, id } = accept(store, "m1", 100) else {
        panic!()
    };
    assert_eq!(store.inbound(pending.seq).unwrap().unwrap().id, id);
    assert_eq!(
        store.conversation("conv-c1").unwrap().unwrap(),
        Conversation {
            id: "conv-c1".into(),
            caller_id: "c1".into(),
            user_id: "user-1".into(),
            // Accepted at 100 ms: stored in whole seconds.
            seen_ms: Some(0),
        }
    );
    let outcome = store
        .commit(vec![Op::CompleteInbound {
            seq: pending.seq,
            replies: vec![reply(1, "c1"), reply(2, "c1")],
        }])
        .unwrap()
        .pop()
        .unwrap();
    let due = outcome.due().to_vec();
    assert_eq!(due.len(), 2);
    assert!(due[0].seq < due[1].seq);
    assert!(due.iter().all(|p| p.target == Target::Response));
    assert!(store.inbound(pending.seq).unwrap().is_none());
    assert_eq!(store.outbound(due[1].seq).unwrap().unwrap().id, "reply-2");
    // Completing again finds nothing: a late duplicate completion is harmless.
    let again = store
        .commit(vec![Op::CompleteInbound {
            seq: pending.seq,
            replies: vec![reply(3, "c1")],
        }])
        .unwrap();
    assert_eq!(again, vec![Outcome::Missing]);
    assert_eq!(waiting(store), due);
    store
        .commit(vec![Op::CompleteOutbound { seq: due[0].seq }])
        .unwrap();
    assert_eq!(waiting(store), due[1..]);
}

/// A restart hands the stored replies over before the messages still waiting
/// for the bot: delivering one of those makes new replies at once, which must
/// queue behind the older replies of the same conversation.
fn recovery_queues_stored_replies_before_messages_for_the_bot(store: &dyn Store) {
    let Outcome::Accepted { pending: first, .. } = accept(store, "m1", 100) else {
        panic!()
    };
    store
        .commit(vec![Op::CompleteInbound {
            seq: first.seq,
            replies: vec![reply(1, "c1"), reply(2, "c1")],
        }])
        .unwrap();
    // Accepted after the replies were stored, so later in seq order too.
    let Outcome::Accepted {
        pending: second, ..
    } = accept(store, "m2", 200)
    else {
        panic!()
    };
    let targets: Vec<_> = waiting(store).iter().map(|p| (p.target, p.seq)).collect();
    let replies: Vec<_> = targets
        .iter()
        .filter(|(t, _)| *t == Target::Response)
        .collect();
    assert_eq!(replies.len(), 2);
    assert!(replies[0].1 < replies[1].1, "replies in the order made");
    assert_eq!(
        targets.last(),
        Some(&(Target::Bot, second.seq)),
        "{targets:?}"
    );
}

fn dead_letters_are_kept_counted_and_redriven(store: &dyn Store) {
    let Outcome::Accepted { pending, .. } = accept(store, "m1", 100) else {
        panic!()
    };
    let op = Op::DeadLetter {
        target: Target::Bot,
        seq: pending.seq,
        reason: "25 attempts failed".into(),
        now_ms: 5000,
    };
    assert_eq!(store.commit(vec![op]).unwrap(), vec![Outcome::Done]);
    assert!(waiting(store).is_empty());
    assert_eq!(store.dead_letter_counts().unwrap().bot, 1);
    let letters = store.dead_letters(0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, "id-m1");
    assert_eq!(letters[0].reason, "25 attempts failed");

    let outcome = store
        .commit(vec![Op::Redrive {
            seqs: None,
            now_ms: 7000,
        }])
        .unwrap()
        .pop()
        .unwrap();
    let due = outcome.due().to_vec();
    assert_eq!(due.len(), 1);
    assert!(
        due[0].seq > pending.seq,
        "a redriven message queues behind what is waiting"
    );
    assert_eq!(
        due[0].queued_at_ms, 7000,
        "the age limit counts from the redrive"
    );
    assert_eq!(due[0].created_at_ms, 100);
    assert_eq!(store.dead_letter_counts().unwrap().bot, 0);
    assert!(store.dead_letters(0, 10).unwrap().is_empty());
    assert_eq!(
        store
            .inbound(due[0].seq)
            .unwrap()
            .unwrap()
            .caller_message_id,
        "m1"
    );
}

fn dead_letters_can_be_discarded(store: &dyn Store) {
    let mut letters = Vec::new();
    for (id, target) in [
        ("m1", Target::Bot),
        ("m2", Target::Bot),
        ("m3", Target::Response),
    ] {
        let Outcome::Accepted { pending, .. } = accept(store, id, 100) else {
            panic!()
        };
        let seq = match target {
            Target::Bot => pending.seq,
            Target::Response => {
                let done = store
                    .commit(vec![Op::CompleteInbound {
                        seq: pending.seq,
                        replies: vec![reply(3, "c1")],
                    }])
                    .unwrap();
                done[0].due()[0].seq
            }
        };
        let op = Op::DeadLetter {
            target,
            seq,
            reason: "gave up".into(),
            now_ms: 5000,
        };
        store.commit(vec![op]).unwrap();
        letters.push(seq);
    }
    let counts = |s: &dyn Store| {
        let c = s.dead_letter_counts().unwrap();
        (c.bot, c.response)
    };
    assert_eq!(counts(store), (2, 1));
    // Listed from a position on, a page at a time.
    let listed = |from, limit| -> Vec<Seq> {
        let letters = store.dead_letters(from, limit).unwrap();
        letters.iter().map(|l| l.seq).collect()
    };
    assert_eq!(listed(0, 10), letters);
    assert_eq!(listed(letters[0] + 1, 1), letters[1..2]);
    assert_eq!(listed(letters[2] + 1, 10), Vec::<Seq>::new());
    let discard = |seqs| store.commit(vec![Op::Discard { seqs }]).unwrap();
    // One by position; one already gone and one never there count for nothing.
    assert_eq!(
        discard(Some(vec![letters[0], letters[0], 999_999])),
        vec![Outcome::Discarded(1)]
    );
    assert_eq!(counts(store), (1, 1));
    let left: Vec<Seq> = store
        .dead_letters(0, 10)
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(left, letters[1..]);
    assert_eq!(discard(None), vec![Outcome::Discarded(2)]);
    assert_eq!(counts(store), (0, 0));
    assert!(store.dead_letters(0, 10).unwrap().is_empty());
    // Nothing comes back to be delivered.
    assert!(waiting(store).is_empty());
    assert_eq!(
        store
            .commit(vec![Op::Redrive {
                seqs: None,
                now_ms: 6000
            }])
            .unwrap(),
        vec![Outcome::Queued(vec![])]
    );
}

fn prune_forgets_only_expired_entries(store: &dyn Store) {
    accept(store, "old", 100);
    accept(store, "new", 2000);
    store
        .commit(vec![Op::PruneDedupe {
            before_ms: 1000,
            part: None,
        }])
        .unwrap();
    // "old" is forgotten even though a window of a day would still hold it.
    let op = |id: &str| Op::Accept {
        message: inbound(id, "c1", 2500),
        dedupe_window_ms: 86_400_000,
    };
    let outcomes = store.commit(vec![op("old"), op("new")]).unwrap();
    assert!(matches!(outcomes[0], Outcome::Accepted { .. }));
    assert!(matches!(outcomes[1], Outcome::Duplicate { .. }));

    // A clock that went back: entries accepted out of order are pruned by
    // their time all the same.
    accept(store, "late", 5000);
    accept(store, "early", 3000);
    accept(store, "middle", 4000);
    store
        .commit(vec![Op::PruneDedupe {
            before_ms: 4500,
            part: None,
        }])
        .unwrap();
    let op = |id: &str| Op::Accept {
        message: inbound(id, "c1", 5500),
        dedupe_window_ms: 86_400_000,
    };
    let outcomes = store
        .commit(vec![op("early"), op("middle"), op("late")])
        .unwrap();
    assert!(matches!(outcomes[0], Outcome::Accepted { .. }));
    assert!(matches!(outcomes[1], Outcome::Accepted { .. }));
    assert!(matches!(outcomes[2], Outcome::Duplicate { .. }));
}

/// A prune of one part forgets the expired entries of that part only; the
/// parts together forget them all.
fn prune_by_parts_forgets_each_part_on_its_own(store: &dyn Store) {
    let ids: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
    for id in &ids {
        accept(store, id, 100);
    }
    accept(store, "fresh", 2000);
    let part = part_of(dedupe_key(ids[0].as_bytes()));
    let prune = |part| {
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: 1000,
                part: Some(part),
            }])
            .unwrap()
    };
    prune(part);
    // Whether the id is still remembered; one that is not is accepted anew,
    // at 2500, which no prune below reaches.
    let remembered = |id: &str| {
        let op = Op::Accept {
            message: inbound(id, "c1", 2500),
            dedupe_window_ms: 86_400_000,
        };
        matches!(
            store.commit(vec![op]).unwrap()[0],
            Outcome::Duplicate { .. }
        )
    };
    let (in_part, others): (Vec<&String>, Vec<&String>) = ids
        .iter()
        .partition(|id| part_of(dedupe_key(id.as_bytes())) == part);
    assert!(!in_part.is_empty() && others.len() > 200);
    for id in &in_part {
        assert!(!remembered(id), "{id} is in the pruned part");
    }
    for id in &others {
        assert!(remembered(id), "{id} is in another part");
    }
    for part in 0..PRUNE_PARTS {
        prune(part);
    }
    for id in &others {
        assert!(!remembered(id), "{id} was pruned with its part");
    }
    for id in in_part.iter().map(|id| id.as_str()).chain(["fresh"]) {
        assert!(remembered(id), "{id} was accepted after the prunes' time");
    }
}

fn quiet_conversations_are_forgotten(store: &dyn Store) {
    const HOUR: u64 = CONVERSATION_REFRESH_MS;
    let accept_in = |id: &str, conversation: &str, at: u64| {
        let op = Op::Accept {
            message: inbound(id, conversation, at),
            dedupe_window_ms: 1000,
        };
        assert!(matches!(
            store.commit(vec![op]).unwrap()[0],
            Outcome::Accepted { .. }
        ));
    };
    let seen = |conversation: &str| {
        store
            .conversation(&format!("conv-{conversation}"))
            .unwrap()
            .map(|c| c.seen_ms.unwrap())
    };
    let forget = |before_ms| {
        store
            .commit(vec![Op::ForgetConversations {
                before_ms,
                part: None,
            }])
            .unwrap()
    };
    accept_in("m1", "quiet", 1_500);
    accept_in("m2", "busy", 1_500);
    assert_eq!((seen("quiet"), seen("busy")), (Some(1_000), Some(1_000)));
    // Within the refresh interval the stored time stays; past it, it moves on.
    accept_in("m3", "quiet", 1_000 + HOUR - 1);
    accept_in("m4", "busy", 1_000 + HOUR + 510);
    assert_eq!(
        (seen("quiet"), seen("busy")),
        (Some(1_000), Some(1_000 + HOUR))
    );

    forget(2_000);
    assert_eq!((seen("quiet"), seen("busy")), (None, Some(1_000 + HOUR)));
    // Its messages are not the conversation: they still wait.
    assert_eq!(waiting(store).len(), 4);

    // A bot's message counts as the conversation being seen...
    let bot_message = OutboundMessage {
        created_at_ms: 1_000 + 2 * HOUR,
        queued_at_ms: 1_000 + 2 * HOUR,
        trace: None,
        ..reply(1, "busy")
    };
    store
        .commit(vec![Op::AddOutbound {
            message: bot_message,
        }])
        .unwrap();
    assert_eq!(seen("busy"), Some(1_000 + 2 * HOUR));
    // ...and the user's next message brings a forgotten one back, same id.
    accept_in("m5", "quiet", 1_000 + 2 * HOUR);
    assert_eq!(
        store.conversation("conv-quiet").unwrap().unwrap().caller_id,
        "quiet"
    );
    forget(1_000 + 2 * HOUR);
    assert_eq!(
        (seen("quiet"), seen("busy")),
        (Some(1_000 + 2 * HOUR), Some(1_000 + 2 * HOUR))
    );
    forget(1_001 + 2 * HOUR);
    assert_eq!((seen("quiet"), seen("busy")), (None, None));
}

/// The cutoff of a part keeps its newest entries: pruning each part at its
/// cutoff leaves at most `keep` per part, and they are the newest.
fn dedupe_cutoff_keeps_the_newest_of_each_part(store: &dyn Store) {
    // Accepted at 1000..1600, ten per millisecond.
    let ids: Vec<(String, u64)> = (0..6000)
        .map(|i| (format!("c{i}"), 1000 + i / 10))
        .collect();
    for (id, at) in &ids {
        accept(store, id, *at);
    }
    assert_eq!(store.dedupe_count(), 6000);
    let part = part_of(dedupe_key(ids[0].0.as_bytes()));
    let in_part: Vec<u64> = ids
        .iter()
        .filter(|(id, _)| part_of(dedupe_key(id.as_bytes())) == part)
        .map(|(_, at)| *at)
        .collect();
    assert!(in_part.len() > 40, "{} in the part", in_part.len());
    assert_eq!(
        store.dedupe_cutoff(part, in_part.len()),
        None,
        "nothing to forget"
    );
    let keep = 20;
    let cutoff = store.dedupe_cutoff(part, keep).expect("over");
    let kept = in_part.iter().filter(|&&at| at >= cutoff).count();
    // At most `keep`, and no fewer than ties at the boundary make it (the
    // part's entries are about a millisecond apart).
    assert!(kept <= keep && kept + 3 > keep, "{kept} kept of {keep}");
    let mut pruned = 0;
    for part in 0..PRUNE_PARTS {
        if let Some(before_ms) = store.dedupe_cutoff(part, keep) {
            let outcome = store
                .commit(vec![Op::PruneDedupe {
                    before_ms,
                    part: Some(part),
                }])
                .unwrap();
            let [Outcome::Pruned(n)] = outcome[..] else {
                panic!("a prune says how many it forgot: {outcome:?}")
            };
            pruned += n;
        }
    }
    let left = store.dedupe_count();
    assert_eq!(left + pruned, 6000);
    assert!(left <= keep as u64 * u64::from(PRUNE_PARTS), "{left} left");
    assert!(left >= 64, "each part keeps some: {left} left");
    // The newest is remembered; the oldest is taken as new.
    let again = |id: &str| {
        let op = Op::Accept {
            message: inbound(id, "c1", 1700),
            dedupe_window_ms: 86_400_000,
        };
        store.commit(vec![op]).unwrap().pop().unwrap()
    };
    assert!(matches!(again("c5999"), Outcome::Duplicate { .. }));
    assert!(matches!(again("c0"), Outcome::Accepted { .. }));
}

macro_rules! suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn dedupe() {
                let (store, _dir) = $make;
                dedupe_returns_the_first_answer_within_the_window(&store);
            }
            #[test]
            fn completion() {
                let (store, _dir) = $make;
                completion_queues_replies_in_order(&store);
            }
            #[test]
            fn recovery_order() {
                let (store, _dir) = $make;
                recovery_queues_stored_replies_before_messages_for_the_bot(&store);
            }
            #[test]
            fn dead_letters() {
                let (store, _dir) = $make;
                dead_letters_are_kept_counted_and_redriven(&store);
            }
            #[test]
            fn discard() {
                let (store, _dir) = $make;
                dead_letters_can_be_discarded(&store);
            }
            #[test]
            fn prune() {
                let (store, _dir) = $make;
                prune_forgets_only_expired_entries(&store);
            }
            #[test]
            fn prune_by_parts() {
                let (store, _dir) = $make;
                prune_by_parts_forgets_each_part_on_its_own(&store);
            }
            #[test]
            fn dedupe_cutoff() {
                let (store, _dir) = $make;
                dedupe_cutoff_keeps_the_newest_of_each_part(&store);
            }
            #[test]
            fn conversations() {
                let (store, _dir) = $make;
                quiet_conversations_are_forgotten(&store);
            }
        }
    };
}

suite!(memory, (MemoryStore::new(), ()));
suite!(embedded, {
    let dir = tempfile::tempdir().unwrap();
    (EmbeddedStore::open(dir.path()).unwrap(), dir)
});

#[test]
fn embedded_store_keeps_everything_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (first, dead) = {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let Outcome::Accepted { pending: first, .. } = accept(&store, "m1", 100) else {
            panic!()
        };
        let Outcome::Accepted { pending: dead, .. } = accept(&store, "m2", 100) else {
            panic!()
        };
        store
            .commit(vec![Op::DeadLetter {
                target: Target::Bot,
                seq: dead.seq,
                reason: "r".into(),
                now_ms: 1,
            }])
            .unwrap();
        (first, dead)
    };
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["botrelay.journal"],
        "a clean reopen sets nothing aside"
    );
    let mut recovered = Vec::new();
    let counts = store.recover(&mut |p| recovered.push(p)).unwrap();
    assert_eq!(recovered, vec![first.clone()]);
    assert_eq!(counts.bot, 1);
    assert_eq!(
        accept(&store, "m1", 200),
        Outcome::Duplicate {
            answer: answer("m1", 100)
        }
    );
    let Outcome::Accepted { pending, .. } = accept(&store, "m3", 200) else {
        panic!()
    };
    assert!(
        pending.seq > dead.seq,
        "positions are never reused after a reopen"
    );
}

mod journal {
    use super::*;
    use crate::store::embedded::{FILE_NAME, Tuning};
    use std::io::Write;

    fn small() -> Tuning {
        Tuning {
            grow_step: 4096,
            compact_min_bytes: 16 * 1024,
        }
    }

    /// A journal as the relay wrote it before accepted messages were stored
    /// once: a dedupe record holding the answer, and the message as a row.
    #[test]
    fn a_journal_with_answers_in_its_dedupe_records_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let put_bytes = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        let mut records = Vec::new();
        records.push(3); // dedupe: accepted at, key, answer
        records.extend_from_slice(&100u64.to_le_bytes());
        put_bytes(&mut records, b"m1");
        put_bytes(&mut records, b"the first answer");
        records.push(1); // put: table, seq, value
        records.push(0);
        records.extend_from_slice(&0u64.to_le_bytes());
        put_bytes(
            &mut records,
            &serde_json::to_vec(&inbound("m1", "c1", 100)).unwrap(),
        );
        records.push(5); // conversation, without the time it was seen
        put_bytes(
            &mut records,
            br#"{"id":"conv-c1","caller_id":"c1","user_id":"user-1"}"#,
        );
        let mut file = b"BRJRNL\x00\x01".to_vec();
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&(records.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&records).to_le_bytes());
        file.extend_from_slice(&records);
        std::fs::write(dir.path().join(FILE_NAME), file).unwrap();

        let opened = crate::delivery::now_ms();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), vec![0]);
        // The conversation counts as seen when the store was opened: a
        // retention that it would long have run out of keeps it all the same.
        store
            .commit(vec![Op::ForgetConversations {
                before_ms: opened - 1000,
                part: None,
            }])
            .unwrap();
        assert_eq!(
            store.conversation("conv-c1").unwrap().unwrap().seen_ms,
            None
        );
        assert_eq!(
            accept(&store, "m1", 200),
            Outcome::Duplicate {
                answer: "the first answer".into()
            }
        );
        let Outcome::Accepted { pending, .. } = accept(&store, "m2", 200) else {
            panic!()
        };
        assert_eq!(pending.seq, 1);
        assert_eq!(
            accept(&store, "m2", 300),
            Outcome::Duplicate {
                answer: answer("m2", 200)
            }
        );
    }

    /// Prunes are applied all at once at the end of a replay: each must still
    /// remove only what was accepted before it in the file.
    #[test]
    fn a_reopened_journal_prunes_only_what_came_before_each_prune() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        accept(&store, "before", 1000);
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: 2000,
                part: None,
            }])
            .unwrap();
        // Accepted after the prune, with a clock that went back.
        accept(&store, "after", 1500);
        accept(&store, "kept", 3000);
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: 1200,
                part: None,
            }])
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let op = |id: &str| Op::Accept {
            message: inbound(id, "c1", 3500),
            dedupe_window_ms: 86_400_000,
        };
        let outcomes = store
            .commit(vec![op("before"), op("after"), op("kept")])
            .unwrap();
        assert!(matches!(outcomes[0], Outcome::Accepted { .. }));
        assert!(
            matches!(outcomes[1], Outcome::Duplicate { .. }),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[2], Outcome::Duplicate { .. }));
    }

    /// A prune of one part, replayed, removes entries of that part only, and
    /// only those before it in the file.
    #[test]
    fn a_reopened_journal_prunes_each_part_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let part = |id: &str| part_of(dedupe_key(id.as_bytes()));
        let ids: Vec<String> = (0..).map(|i| format!("q{i}")).take(200).collect();
        let pruned = &ids[0];
        let other = ids.iter().find(|id| part(id) != part(pruned)).unwrap();
        let late = ids[1..].iter().find(|id| part(id) == part(pruned)).unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        accept(&store, pruned, 1000);
        accept(&store, other, 1000);
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: 2000,
                part: Some(part(pruned)),
            }])
            .unwrap();
        // After the prune in the file, before it in time.
        accept(&store, late, 1500);
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let op = |id: &str| Op::Accept {
            message: inbound(id, "c1", 3000),
            dedupe_window_ms: 86_400_000,
        };
        let outcomes = store.commit(vec![op(pruned), op(other), op(late)]).unwrap();
        assert!(matches!(outcomes[0], Outcome::Accepted { .. }));
        assert!(
            matches!(outcomes[1], Outcome::Duplicate { .. }),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Outcome::Duplicate { .. }),
            "{outcomes:?}"
        );
    }

    fn file_len(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join(FILE_NAME)).unwrap().len()
    }

    fn seqs(store: &dyn Store) -> Vec<Seq> {
        waiting(store).into_iter().map(|p| p.seq).collect()
    }

    #[test]
    fn a_torn_last_commit_is_dropped_and_what_came_before_survives() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
            accept(&store, "m1", 100);
            accept(&store, "m2", 100);
            seqs(&store)
        };
        // A crash in the middle of the next commit leaves part of a frame: a
        // length and checksum, and some of the records.
        {
            let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
            drop(store);
            let bytes = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
            let end = bytes.iter().rposition(|b| *b != 0).map(|i| i + 1).unwrap();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(FILE_NAME))
                .unwrap();
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(end as u64)).unwrap();
            file.write_all(&500u32.to_le_bytes()).unwrap();
            file.write_all(&0xdead_beefu32.to_le_bytes()).unwrap();
            file.write_all(&[1, 0, 9, 9, 9, 9]).unwrap();
        }
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), kept);
        // The torn bytes are kept aside, not destroyed.
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(&format!("{FILE_NAME}.dropped-")))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let kept_bytes = std::fs::read(dir.path().join(&aside[0])).unwrap();
        assert_eq!(kept_bytes.len(), 14);
        assert_eq!(&kept_bytes[..4], &500u32.to_le_bytes());
        let Outcome::Accepted { pending, .. } = accept(&store, "m3", 200) else {
            panic!("a new message is accepted after the torn commit")
        };
        drop(store);
        // The new commit took the torn one's place, and nothing of the torn
        // bytes is read as a frame after it.
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let mut expected = kept.clone();
        expected.push(pending.seq);
        assert_eq!(seqs(&store), expected);
        assert_eq!(
            accept(&store, "m1", 300),
            Outcome::Duplicate {
                answer: answer("m1", 100)
            }
        );
    }

    #[test]
    fn a_compaction_cut_short_by_a_crash_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
            accept(&store, "m1", 100);
            seqs(&store)
        };
        // A crash before the rename leaves the copy beside the journal.
        let copy = dir.path().join(format!("{FILE_NAME}.compact"));
        std::fs::write(&copy, b"a partial copy").unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), kept);
        assert!(!copy.exists(), "the partial copy is removed");
    }

    #[test]
    fn after_a_failed_sync_nothing_more_is_written_and_the_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        accept(&store, "m1", 100);
        assert_eq!(store.failure(), None);
        store.fail_as_a_sync_would(std::io::Error::other("EIO"));
        let failure = store.failure().expect("reported");
        assert!(
            failure.contains("EIO") && failure.contains("restart"),
            "{failure}"
        );
        let refused = store.commit(vec![Op::PruneDedupe {
            before_ms: 0,
            part: None,
        }]);
        assert!(refused.is_err(), "a failed store takes no writes");
        assert!(store.sync().is_err());
        // What was durable before is there after the restart.
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store).len(), 1);
        assert_eq!(store.failure(), None);
    }

    #[test]
    fn after_damage_inside_the_journal_what_follows_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let all = {
            let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
            for i in 0..20 {
                accept(&store, &format!("m{i}"), 100);
            }
            seqs(&store)
        };
        let path = dir.path().join(FILE_NAME);
        let clean = std::fs::read(&path).unwrap();
        // Where each frame starts: one commit, one frame.
        let mut frames = vec![16usize];
        while frames.len() < 20 {
            let at = *frames.last().unwrap();
            let size = u32::from_le_bytes(clean[at..at + 4].try_into().unwrap()) as usize;
            frames.push(at + 8 + size);
        }
        let damaged_open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n != FILE_NAME)
                .collect();
            for name in &names {
                std::fs::remove_file(dir.path().join(name)).unwrap();
            }
            (store, names)
        };

        // A flipped byte in the first frame's records: that commit is lost,
        // kept aside byte for byte, and every later one is read.
        let mut bytes = clean.clone();
        bytes[16 + 8 + 20] ^= 0xff;
        let aside = dir.path().join(format!("{FILE_NAME}.damaged-16"));
        std::fs::write(&path, &bytes).unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), all[1..]);
        assert_eq!(std::fs::read(&aside).unwrap(), bytes[16..frames[1]]);
        drop(store);
        std::fs::remove_file(&aside).unwrap();

        // A length that no longer fits, in the middle: the frames on both
        // sides are read.
        let mut length_hit = clean.clone();
        length_hit[frames[5] + 3] = 0x7f;
        let (store, aside) = damaged_open(&length_hit);
        let mut expected = all.clone();
        expected.remove(5);
        assert_eq!(seqs(&store), expected);
        assert_eq!(aside, [format!("{FILE_NAME}.damaged-{}", frames[5])]);
        drop(store);

        // A stretch of zeros where two commits were.
        let mut zeroed = clean.clone();
        zeroed[frames[9]..frames[11]].fill(0);
        let (store, aside) = damaged_open(&zeroed);
        let mut expected = all.clone();
        expected.drain(9..11);
        assert_eq!(seqs(&store), expected);
        assert_eq!(aside, [format!("{FILE_NAME}.damaged-{}", frames[9])]);
        drop(store);

        // The first commit after an open that found damage compacts it away:
        // the next open finds none.
        let (store, _) = damaged_open(&length_hit);
        accept(&store, "after", 200);
        for _ in 0..200 {
            store.sync().unwrap();
            if file_len(dir.path()) < clean.len() as u64 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store).len(), 20);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing more is set aside"
        );
        assert!(matches!(
            accept(&store, "m7", 300),
            Outcome::Duplicate { .. }
        ));
        assert!(matches!(
            accept(&store, "m5", 300),
            Outcome::Accepted { .. }
        ));
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"something else entirely").unwrap();
        let Err(e) = EmbeddedStore::open(dir.path()) else {
            panic!("opened a file that is not a journal")
        };
        assert!(e.to_string().contains("not a botrelay journal"), "{e}");
    }

    /// Many messages come and go; every tenth stays waiting. Dedupe entries and
    /// the conversation stay live throughout. Returns the waiting positions and
    /// the highest position handed out.
    fn churn(store: &dyn Store) -> (Vec<Seq>, Seq) {
        let mut waiting_seqs = Vec::new();
        let mut highest = 0;
        for i in 0..2000u64 {
            let Outcome::Accepted { pending, .. } = accept(store, &format!("m{i}"), 100 + i) else {
                panic!()
            };
            highest = highest.max(pending.seq);
            if i % 10 == 0 {
                waiting_seqs.push(pending.seq);
                continue;
            }
            let done = store
                .commit(vec![Op::CompleteInbound {
                    seq: pending.seq,
                    replies: vec![reply(i as u32, "c1")],
                }])
                .unwrap();
            let Outcome::Queued(due) = &done[0] else {
                panic!()
            };
            highest = highest.max(due[0].seq);
            store
                .commit(vec![Op::CompleteOutbound { seq: due[0].seq }])
                .unwrap();
        }
        // The first thousand ids are forgotten: among them are waiting messages
        // whose dedupe entries are gone, and delivered ones of which nothing is left.
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: 1100,
                part: None,
            }])
            .unwrap();
        (waiting_seqs, highest)
    }

    fn holds_what_churn_left(store: &dyn Store, waiting_seqs: &[Seq]) {
        assert_eq!(seqs(store), waiting_seqs);
        // Every tenth message was left waiting.
        for (k, seq) in waiting_seqs.iter().enumerate() {
            let message = store
                .inbound(*seq)
                .unwrap()
                .expect("waiting message readable");
            assert_eq!(message.caller_message_id, format!("m{}", k * 10));
        }
        assert_eq!(
            store.conversation("conv-c1").unwrap().unwrap().caller_id,
            "c1"
        );
        assert_eq!(
            accept(store, "m1234", 1800),
            Outcome::Duplicate {
                answer: answer("m1234", 1334)
            }
        );
    }

    /// An accepted message's record counts as live once, through its dedupe
    /// entry or, once that is gone while the message still waits, through
    /// its row; the count is the same after a reopen.
    #[test]
    fn live_bytes_count_a_waiting_message_after_its_dedupe_entry_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let live = |store: &EmbeddedStore| store.usage().unwrap().live_bytes;
        let prune = || Op::PruneDedupe {
            before_ms: u64::MAX,
            part: None,
        };
        let complete = |seq| Op::CompleteInbound {
            seq,
            replies: vec![],
        };
        // What stays live without the messages: their conversation.
        let Outcome::Accepted { pending, .. } = accept(&store, "first", 99) else {
            panic!("accepted")
        };
        store.commit(vec![complete(pending.seq), prune()]).unwrap();
        let empty = live(&store);
        let mut seqs = Vec::new();
        for i in 0..10 {
            let Outcome::Accepted { pending, .. } = accept(&store, &format!("w{i}"), 100 + i)
            else {
                panic!("accepted")
            };
            seqs.push(pending.seq);
        }
        let waiting = live(&store);
        assert!(waiting > empty + 10 * 100, "{waiting}");
        store.commit(vec![prune()]).unwrap();
        assert_eq!(live(&store), waiting, "the rows count their records now");
        store
            .commit(seqs[..5].iter().map(|&s| complete(s)).collect())
            .unwrap();
        let half = live(&store);
        assert!(
            half < waiting && half > empty,
            "{empty} < {half} < {waiting}"
        );
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(live(&store), half, "a replay counts the same");
        store
            .commit(seqs[5..].iter().map(|&s| complete(s)).collect())
            .unwrap();
        assert_eq!(live(&store), empty, "nothing of the messages is live");
    }

    /// Messages still waiting after their dedupe entries are gone (a bot down
    /// for longer than the window) are live: a journal of them is not dead,
    /// and copying it would free nothing. When they were not counted, every
    /// write started another compaction of the whole journal.
    #[test]
    fn messages_waiting_past_their_window_set_off_no_compactions() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        for i in 0..300 {
            accept(&store, &format!("waiting-{i}"), 100 + i);
        }
        let inode = || std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().ino();
        let (mut last, mut compactions) = (inode(), 0);
        for i in 0..300 {
            // The window passes over the waiting messages, one by one.
            let prune = Op::PruneDedupe {
                before_ms: 100 + i,
                part: None,
            };
            store.commit(vec![prune]).unwrap();
            accept(&store, &format!("new-{i}"), 1000 + i);
            std::thread::sleep(std::time::Duration::from_millis(3));
            if inode() != last {
                (last, compactions) = (inode(), compactions + 1);
            }
        }
        // None in three runs; 14 when the rows of such messages did not count
        // their records.
        assert!(compactions <= 1, "{compactions} compactions");
        assert_eq!(seqs(&store).len(), 600, "every waiting message is kept");
    }

    /// A journal that is mostly dead when it is opened (the relay was
    /// stopped before it compacted) starts its compaction at the open: any
    /// sync then swaps it in, even one that writes nothing.
    #[test]
    fn a_mostly_dead_journal_starts_compacting_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let waiting_seqs = {
            let never = Tuning {
                compact_min_bytes: u64::MAX,
                ..small()
            };
            let store = EmbeddedStore::open_tuned(dir.path(), never).unwrap();
            let (waiting_seqs, _) = churn(&store);
            store
                .commit(vec![Op::PruneDedupe {
                    before_ms: u64::MAX,
                    part: None,
                }])
                .unwrap();
            waiting_seqs
        };
        let before = file_len(dir.path());
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            store.sync().unwrap();
            if file_len(dir.path()) < before / 3 {
                break;
            }
        }
        let after = file_len(dir.path());
        assert!(after < before / 3, "from {before} to {after} bytes");
        assert_eq!(seqs(&store), waiting_seqs);
    }

    /// A write that leaves the journal mostly dead starts a compaction, which
    /// a later sync swaps in; when no write follows, `maintain` does it.
    #[test]
    fn an_idle_journal_is_compacted_by_maintain() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let (waiting_seqs, _) = churn(&store);
        for _ in 0..100 {
            store.commit(vec![]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: u64::MAX,
                part: None,
            }])
            .unwrap();
        let before = store.usage().unwrap().file_bytes;
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            store.usage().unwrap().file_bytes,
            before,
            "nothing is swapped in without a sync"
        );
        for _ in 0..200 {
            if !store.maintain().unwrap() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = store.usage().unwrap().file_bytes;
        assert!(after < before / 2, "from {before} to {after} bytes");
        assert_eq!(seqs(&store), waiting_seqs);
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), waiting_seqs);
    }

    #[test]
    fn compaction_keeps_every_live_record_and_frees_the_rest() {
        let never = tempfile::tempdir().unwrap();
        let uncompacted = EmbeddedStore::open_tuned(
            never.path(),
            Tuning {
                compact_min_bytes: u64::MAX,
                ..small()
            },
        )
        .unwrap();
        let (expected, _) = churn(&uncompacted);
        holds_what_churn_left(&uncompacted, &expected);
        let full = file_len(never.path());

        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        let (waiting_seqs, highest) = churn(&store);
        assert_eq!(waiting_seqs, expected);
        // A compaction under way swaps in at a write once its copy is done.
        for _ in 0..100 {
            store.commit(vec![]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let compacted = file_len(dir.path());
        let usage = store.usage().unwrap();
        assert!(usage.live_bytes <= usage.file_bytes && usage.file_bytes <= compacted);
        assert!(
            usage.file_bytes < uncompacted.usage().unwrap().file_bytes / 3,
            "{usage:?}"
        );
        assert!(
            compacted < full / 3,
            "the file holds {compacted} bytes; without compaction it holds {full}"
        );
        holds_what_churn_left(&store, &waiting_seqs);
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        holds_what_churn_left(&store, &waiting_seqs);

        // Forgetting every dedupe entry leaves only the waiting messages live,
        // all below the highest position handed out: the next compaction keeps
        // no record at that position, and a reopen must not hand it out again.
        assert!(highest > *waiting_seqs.last().unwrap());
        store
            .commit(vec![Op::PruneDedupe {
                before_ms: u64::MAX,
                part: None,
            }])
            .unwrap();
        let before = store.usage().unwrap().file_bytes;
        for _ in 0..100 {
            store.commit(vec![]).unwrap();
            if store.usage().unwrap().file_bytes < before / 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = store.usage().unwrap().file_bytes;
        assert!(after < before / 2, "compacted from {before} to {after}");
        drop(store);
        let store = EmbeddedStore::open_tuned(dir.path(), small()).unwrap();
        assert_eq!(seqs(&store), waiting_seqs);
        let Outcome::Accepted { pending, .. } = accept(&store, "new", 9000) else {
            panic!()
        };
        assert!(
            pending.seq > highest,
            "positions are never reused after compaction: {} after {highest}",
            pending.seq
        );
    }
}

/// Random batches of every op, applied to the embedded store (with small
/// sizes, so that it grows, compacts and is reopened many times) and to the
/// memory store as the model: every outcome, and what each would recover,
/// must be the same.
#[test]
fn the_journal_behaves_as_the_memory_store_through_compactions_and_reopens() {
    use crate::store::embedded::Tuning;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let tuning = Tuning {
        grow_step: 4096,
        compact_min_bytes: 8 * 1024,
    };
    const CONVERSATIONS: u32 = 12;
    // Half the prunes and forgets are of one part of the keys.
    let some_part = |rng: &mut StdRng| {
        rng.random_bool(0.5)
            .then(|| rng.random_range(0..PRUNE_PARTS))
    };
    let mut reopens = 0;
    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let model = MemoryStore::new();
        let mut journal = EmbeddedStore::open_tuned(dir.path(), tuning).unwrap();
        // The same, never compacted, to tell that compaction happened.
        let never_dir = tempfile::tempdir().unwrap();
        let never = EmbeddedStore::open_tuned(
            never_dir.path(),
            Tuning {
                compact_min_bytes: u64::MAX,
                ..tuning
            },
        )
        .unwrap();
        let mut now = 1_000u64;
        for step in 0..1200 {
            now += rng.random_range(0..40);
            if rng.random_range(0..100) == 0 {
                // Time enough for conversations to be written again.
                now += CONVERSATION_REFRESH_MS;
            }
            let waiting_now = waiting(&model);
            let letters_now: Vec<Seq> = model
                .dead_letters(0, 10_000)
                .unwrap()
                .iter()
                .map(|l| l.seq)
                .collect();
            let pick = |target: Target, rng: &mut StdRng| {
                let of: Vec<_> = waiting_now.iter().filter(|p| p.target == target).collect();
                (!of.is_empty()).then(|| of[rng.random_range(0..of.len())].seq)
            };
            let ops_for = |rng: &mut StdRng| -> Vec<Op> {
                (0..rng.random_range(1..4))
                    .map(|_| match rng.random_range(0..100) {
                        0..42 => Op::Accept {
                            message: inbound(
                                &format!("m{}", rng.random_range(0..400)),
                                &format!("c{}", rng.random_range(0..CONVERSATIONS)),
                                now,
                            ),
                            dedupe_window_ms: 2_000,
                        },
                        42..45 => Op::AddOutbound {
                            message: OutboundMessage {
                                created_at_ms: now,
                                queued_at_ms: now,
                                trace: None,
                                ..reply(
                                    rng.random(),
                                    &format!("c{}", rng.random_range(0..CONVERSATIONS)),
                                )
                            },
                        },
                        45..70 => Op::CompleteInbound {
                            seq: pick(Target::Bot, rng).unwrap_or(u64::MAX),
                            replies: (0..rng.random_range(0..3))
                                .map(|_| reply(rng.random(), "c1"))
                                .collect(),
                        },
                        70..88 => Op::CompleteOutbound {
                            seq: pick(Target::Response, rng).unwrap_or(u64::MAX),
                        },
                        88..94 => {
                            let target = if rng.random_bool(0.5) {
                                Target::Bot
                            } else {
                                Target::Response
                            };
                            Op::DeadLetter {
                                target,
                                seq: pick(target, rng).unwrap_or(u64::MAX),
                                reason: "gave up".into(),
                                now_ms: now,
                            }
                        }
                        94..96 => Op::Redrive {
                            seqs: None,
                            now_ms: now,
                        },
                        96..97 => Op::Discard {
                            seqs: rng.random_bool(0.5).then(|| {
                                letters_now
                                    .get(rng.random_range(0..letters_now.len().max(1)))
                                    .into_iter()
                                    .copied()
                                    .collect()
                            }),
                        },
                        97..99 => Op::PruneDedupe {
                            before_ms: now.saturating_sub(1_500),
                            part: some_part(rng),
                        },
                        _ => Op::ForgetConversations {
                            before_ms: now.saturating_sub(rng.random_range(0..2) * 60_000),
                            part: some_part(rng),
                        },
                    })
                    .collect()
            };
            // Ops hold no clones, so each store gets its own copy from the same seed.
            let state: [u8; 32] = rng.random();
            let expected = model
                .commit(ops_for(&mut StdRng::from_seed(state)))
                .unwrap();
            let got = journal
                .commit(ops_for(&mut StdRng::from_seed(state)))
                .unwrap();
            assert_eq!(got, expected, "seed {seed}, step {step}");
            never
                .commit(ops_for(&mut StdRng::from_seed(state)))
                .unwrap();
            let reopen = rng.random_range(0..150) == 0;
            if reopen {
                drop(journal);
                journal = EmbeddedStore::open_tuned(dir.path(), tuning).unwrap();
                reopens += 1;
            }
            if reopen || step % 50 == 0 {
                assert_eq!(
                    waiting(&journal),
                    waiting(&model),
                    "seed {seed}, step {step}"
                );
                assert_eq!(
                    journal.dead_letter_counts().unwrap(),
                    model.dead_letter_counts().unwrap()
                );
                let letters = |s: &dyn Store| -> Vec<(Seq, String)> {
                    s.dead_letters(0, 10_000)
                        .unwrap()
                        .into_iter()
                        .map(|l| (l.seq, l.message_id))
                        .collect()
                };
                assert_eq!(letters(&journal), letters(&model));
                for c in 0..CONVERSATIONS {
                    let id = format!("conv-c{c}");
                    assert_eq!(
                        journal.conversation(&id).unwrap(),
                        model.conversation(&id).unwrap(),
                        "seed {seed}, step {step}"
                    );
                }
                for pending in waiting(&model) {
                    let id = |s: &dyn Store| match pending.target {
                        Target::Bot => s.inbound(pending.seq).unwrap().map(|m| m.id),
                        Target::Response => s.outbound(pending.seq).unwrap().map(|m| m.id),
                    };
                    assert_eq!(id(&journal), id(&model), "seed {seed}, step {step}");
                }
            }
        }
        // A compaction still under way swaps in at a write once its copy is done.
        for _ in 0..100 {
            let usage = journal.usage().unwrap();
            if usage.file_bytes <= 2 * usage.live_bytes {
                break;
            }
            journal.commit(vec![]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let usage = journal.usage().unwrap();
        let (kept, live) = (usage.file_bytes, usage.live_bytes);
        let full = never.usage().unwrap().file_bytes;
        // A compaction starts once half of the journal is dead, so it holds at
        // most about twice its live records.
        assert!(
            kept <= 2 * live + 16 * 1024 && kept < full * 3 / 5,
            "seed {seed}: the journal holds {kept} bytes, {live} of them live ({full} without compaction)"
        );
    }
    assert!(reopens > 0, "the journal was reopened along the way");
}

#[test]
fn records_are_written_as_serde_writes_them() {
    let traced = crate::trace::TraceContext::parse(
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        Some("a=\"1\",b=2"),
    )
    .unwrap();
    let untraced_state = crate::trace::TraceContext {
        state: None,
        ..traced.clone()
    };
    let mut odd = inbound("m\"1\\\n\u{1}é😀", "c\t<1>", u64::MAX);
    odd.text = "line one\nline \"two\"\u{7f}\u{1f}".into();
    odd.payload = raw(r#"{ "nested" : ["x\"y", 1.5e3, null] }"#);
    for (trace, waited) in [
        (None, false),
        (Some(traced.clone()), true),
        (Some(untraced_state.clone()), false),
    ] {
        for mut message in [inbound("m1", "c1", 5), odd.clone()] {
            message.trace = trace.clone();
            message.waited = waited;
            assert_eq!(
                String::from_utf8(message.record()).unwrap(),
                serde_json::to_string(&message).unwrap()
            );
        }
        let mut out = reply(3, "c\"2");
        out.trace = trace;
        out.kind = "image\u{0}".into();
        assert_eq!(
            String::from_utf8(out.record()).unwrap(),
            serde_json::to_string(&out).unwrap()
        );
    }
}
