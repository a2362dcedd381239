//! The relay's own ids.
//!
//! Conversation and user ids are derived from the caller's ids, so the same
//! caller `conversationId` maps to the same relay conversation id on every
//! request, across restarts and without a lookup on the hot path. Message ids
//! are random.

use sha2::{Digest, Sha256};
use uuid::Uuid;

fn derived(kind: &str, caller_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update([0])
        .chain_update(caller_id.as_bytes())
        .finalize();
    let bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    Uuid::new_v8(bytes).to_string()
}

pub fn conversation_id(caller_conversation_id: &str) -> String {
    derived("conversation", caller_conversation_id)
}

pub fn user_id(caller_user_id: &str) -> String {
    derived("user", caller_user_id)
}

/// A relay id as 16 bytes, for in-memory indexes: the UUID itself when the id
/// is one in the form the relay writes (hyphenated, lower case), and otherwise
/// (ids in tests, or whatever a bot sends) the first 16 bytes of its SHA-256,
/// so that two different strings never share a key. No allocation, and a
/// fixed size.
pub fn key(id: &str) -> u128 {
    let canonical = id.len() == 36 && !id.bytes().any(|b| b.is_ascii_uppercase());
    match Uuid::try_parse(id) {
        Ok(uuid) if canonical => uuid.as_u128(),
        _ => {
            let digest = Sha256::digest(id.as_bytes());
            u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"))
        }
    }
}

/// A random (version 4) UUID from the thread's RNG: no system call per id.
pub fn message_id() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(conversation_id("c-1"), conversation_id("c-1"));
        assert_ne!(conversation_id("c-1"), conversation_id("c-2"));
        // A user and a conversation sharing a caller id still get different relay ids.
        assert_ne!(conversation_id("same"), user_id("same"));
        assert_eq!(conversation_id("c-1").len(), 36);
    }

    #[test]
    fn keys_tell_apart_every_string_and_take_a_uuid_as_it_is() {
        let id = conversation_id("c-1");
        assert_eq!(key(&id), Uuid::parse_str(&id).unwrap().as_u128());
        // The same UUID written otherwise is another string, so another key.
        assert_ne!(key(&id.to_uppercase()), key(&id));
        assert_ne!(key(&id.replace('-', "")), key(&id));
        assert_eq!(key("conv-c1"), key("conv-c1"));
        assert_ne!(key("conv-c1"), key("conv-c2"));
    }

    #[test]
    fn message_ids_are_unique_version_4_uuids() {
        let id = message_id();
        assert_ne!(id, message_id());
        assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    }
}
