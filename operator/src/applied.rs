//! Deciding whether an owned object needs an apply at all.
//!
//! Every owned object the operator writes carries the annotation
//! `botrelay.dev/applied-hash`: a digest of the body it applied. A reconcile
//! builds the desired object, digests it, and applies it only when
//! - the watch cache does not show the object with that digest (new, changed
//!   spec, or deleted), or
//! - someone else changed its spec since our write (its `generation` moved
//!   past the one our apply returned; kinds without a generation, such as
//!   Services, are then re-applied at the next change of what we would write),
//!   or, for an object this process has not written yet, its spec changed at
//!   all since it was made (`generation` above 1): one apply then tells.
//!
//! The operator also remembers what it applied, so that a reconcile that runs
//! before the watch has delivered our own write does not write it again.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::hex;

/// Annotation holding the digest of the applied body.
pub const APPLIED_HASH_ANNOTATION: &str = "botrelay.dev/applied-hash";

/// The digest of a body to apply (without the annotation itself).
pub fn digest<T: Serialize>(object: &T) -> String {
    let bytes = serde_json::to_vec(object).expect("an object serializes");
    hex(&Sha256::digest(&bytes)[..12])
}

/// Stamps `metadata` with the digest of the body it belongs to.
pub fn stamp(metadata: &mut ObjectMeta, hash: &str) {
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), hash.to_string());
}

/// What our last apply of one object returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub hash: String,
    pub generation: Option<i64>,
}

/// Whether the object needs no apply: `cached` is the watch cache's view of
/// it, `record` what our own last apply of it returned (if this process made one).
pub fn up_to_date(record: Option<&Record>, cached: Option<&ObjectMeta>, hash: &str) -> bool {
    let cached_hash = cached
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
        .map(String::as_str);
    match (record, cached) {
        // Our own write is the newest we know of, unless the cache shows a
        // later change of the spec by someone else.
        (Some(r), Some(c)) if r.hash == hash => match (c.generation, r.generation) {
            (Some(seen), Some(ours)) => seen <= ours,
            _ => true,
        },
        // Applied by us a moment ago; the watch has not shown it yet. (A
        // deletion forgets the record, so a deleted object is made again.)
        (Some(r), None) => r.hash == hash,
        // Written by an earlier operator process: its stamp says what it
        // wrote, but not whether someone changed the spec since, unless the
        // spec never changed at all (generation 1). Otherwise one apply
        // finds out (and undoes a change made while no operator ran).
        (None, Some(c)) => cached_hash == Some(hash) && c.generation.is_none_or(|g| g == 1),
        _ => false,
    }
}

/// Kind, namespace and name of an owned object.
pub type ObjectKey = (&'static str, String, String);

/// The records of this process's applies.
#[derive(Default)]
pub struct Records(Mutex<HashMap<ObjectKey, Record>>);

impl Records {
    pub fn get(&self, key: &ObjectKey) -> Option<Record> {
        self.0.lock().unwrap().get(key).cloned()
    }

    pub fn insert(&self, key: ObjectKey, record: Record) {
        self.0.lock().unwrap().insert(key, record);
    }

    /// Forgets an object (it was deleted, or a re-list no longer shows it).
    pub fn forget(&self, key: &ObjectKey) {
        self.0.lock().unwrap().remove(key);
    }

    /// Forgets every object of `kind` that `keep` rejects.
    pub fn retain(&self, kind: &str, keep: impl Fn(&str, &str) -> bool) {
        self.0
            .lock()
            .unwrap()
            .retain(|(k, ns, name), _| *k != kind || keep(ns, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(hash: Option<&str>, generation: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            annotations: hash
                .map(|h| BTreeMap::from([(APPLIED_HASH_ANNOTATION.to_string(), h.to_string())])),
            generation,
            ..ObjectMeta::default()
        }
    }

    fn record(hash: &str, generation: Option<i64>) -> Record {
        Record {
            hash: hash.into(),
            generation,
        }
    }

    #[test]
    fn nothing_known_means_apply() {
        assert!(!up_to_date(None, None, "h"));
    }

    #[test]
    fn an_earlier_process_stamp_is_trusted_when_nothing_can_have_changed_since() {
        assert!(up_to_date(None, Some(&meta(Some("h"), Some(1))), "h"));
        assert!(up_to_date(None, Some(&meta(Some("h"), None)), "h"));
        assert!(!up_to_date(None, Some(&meta(Some("old"), Some(1))), "h"));
        assert!(!up_to_date(None, Some(&meta(None, Some(1))), "h"));
        // Changed since it was made, by us or by a `kubectl scale` while no
        // operator ran: one apply tells (and undoes the latter).
        assert!(!up_to_date(None, Some(&meta(Some("h"), Some(4))), "h"));
    }

    #[test]
    fn our_own_write_counts_while_the_cache_lags() {
        assert!(up_to_date(Some(&record("h", Some(2))), None, "h"));
        // The cache still shows the version before our write.
        assert!(up_to_date(
            Some(&record("h", Some(2))),
            Some(&meta(Some("old"), Some(1))),
            "h"
        ));
        // What we would write changed since.
        assert!(!up_to_date(Some(&record("old", Some(2))), None, "h"));
    }

    #[test]
    fn a_spec_change_by_someone_else_is_undone() {
        // kubectl scale: generation 3 after our write returned 2.
        assert!(!up_to_date(
            Some(&record("h", Some(2))),
            Some(&meta(Some("h"), Some(3))),
            "h"
        ));
        // Kinds without a generation: the stamp decides.
        assert!(up_to_date(
            Some(&record("h", None)),
            Some(&meta(Some("h"), None)),
            "h"
        ));
    }

    #[test]
    fn digests_differ_with_content_and_stamps_land_in_annotations() {
        assert_eq!(digest(&"a"), digest(&"a"));
        assert_ne!(digest(&"a"), digest(&"b"));
        assert_eq!(digest(&"a").len(), 24);
        let mut m = ObjectMeta::default();
        stamp(&mut m, "abc");
        assert_eq!(m.annotations.unwrap()[APPLIED_HASH_ANNOTATION], "abc");
    }
}
