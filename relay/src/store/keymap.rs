//! A map from 128-bit keys that are hashes already (SHA-256 prefixes, or
//! UUIDs derived from hashes) to small entries, split into the prune parts
//! ([`part_keys`](super::part_keys)): one hash map per part.
//!
//! One hash map would grow by moving all its entries at once, under the
//! store's lock (85 ms at 229k entries here); a part holds a 64th of them, so
//! a part's growth moves a 64th. A B-tree grows a node at a time but costs a
//! cache miss or more per level on every lookup: with 250k dedupe entries,
//! looking a key up took 3% of the relay's CPU when accepting messages.

use super::{PRUNE_PARTS, part_of};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a key that is uniformly distributed already: its two halves folded
/// and multiplied, so that every bit of the 64 counts (a UUID's fixed version
/// and variant bits among them).
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys are hashed here; any other input still hashes
        // well enough (FNV-1a).
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, key: u128) {
        let folded = (key as u64) ^ ((key >> 64) as u64).rotate_left(29);
        self.0 = folded.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Part<V> = HashMap<u128, V, BuildHasherDefault<KeyHasher>>;

pub(super) struct KeyMap<V> {
    parts: Vec<Part<V>>,
    len: usize,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        Self {
            parts: (0..PRUNE_PARTS).map(|_| Part::default()).collect(),
            len: 0,
        }
    }
}

impl<V> KeyMap<V> {
    pub fn get(&self, key: &u128) -> Option<&V> {
        self.parts[usize::from(part_of(*key))].get(key)
    }

    pub fn insert(&mut self, key: u128, value: V) -> Option<V> {
        let old = self.parts[usize::from(part_of(key))].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, key: &u128) -> Option<V> {
        let old = self.parts[usize::from(part_of(*key))].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The entries of one part, or of all, in no particular order.
    pub fn iter_part(&self, part: Option<u8>) -> impl Iterator<Item = (&u128, &V)> {
        let parts = match part {
            Some(p) => &self.parts[usize::from(p)..=usize::from(p)],
            None => &self.parts[..],
        };
        parts.iter().flat_map(|p| p.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.parts.iter().flat_map(|p| p.values())
    }
}

#[cfg(test)]
mod tests {
    use super::super::part_keys;
    use super::*;

    #[test]
    fn entries_are_found_counted_and_listed_by_part() {
        let mut map = KeyMap::default();
        // Keys at both ends of every part, and one in its middle.
        let keys: Vec<u128> = (0..PRUNE_PARTS)
            .flat_map(|p| {
                let r = part_keys(p);
                [
                    *r.start(),
                    *r.start() + (*r.end() - *r.start()) / 2,
                    *r.end(),
                ]
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.insert(*k, i), None);
        }
        assert_eq!(map.insert(keys[5], 500), Some(5));
        assert_eq!(map.len(), keys.len());
        assert_eq!(map.get(&keys[5]), Some(&500));
        for p in 0..PRUNE_PARTS {
            let mut listed: Vec<u128> = map.iter_part(Some(p)).map(|(k, _)| *k).collect();
            listed.sort_unstable();
            let mut expected: Vec<u128> = keys
                .iter()
                .copied()
                .filter(|k| part_keys(p).contains(k))
                .collect();
            expected.sort_unstable();
            assert_eq!(listed, expected, "part {p}");
        }
        assert_eq!(map.iter_part(None).count(), keys.len());
        assert_eq!(map.remove(&keys[0]), Some(0));
        assert_eq!(map.remove(&keys[0]), None);
        assert_eq!(map.len(), keys.len() - 1);
        assert_eq!(map.values().count(), keys.len() - 1);
        assert_eq!(map.get(&keys[0]), None);
    }

    #[test]
    fn keys_differing_only_in_their_high_half_hash_apart() {
        let hash = |k: u128| {
            let mut h = KeyHasher::default();
            h.write_u128(k);
            h.finish()
        };
        let low = 0x1234_5678_9abc_def0_u128;
        assert_ne!(hash(low), hash(low | (1 << 100)));
        assert_ne!(hash(low), hash(low | 1));
    }
}
