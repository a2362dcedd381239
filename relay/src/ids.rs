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
    fn message_ids_are_unique_version_4_uuids() {
        let id = message_id();
        assert_ne!(id, message_id());
        assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    }
}
