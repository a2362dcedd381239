//! Standard Webhooks signatures: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing key, decoded from `whsec_<base64>`, with its HMAC state keyed
/// once: each signature starts from a copy of it.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
    keyed: Hmac<Sha256>,
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for SigningKey {}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Accepts `whsec_<base64>` (the Standard Webhooks form) or the bare base64.
    pub fn parse(secret: &str) -> Result<Self, String> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| format!("not `whsec_` followed by base64 ({e})"))?;
        if key.len() < 16 {
            return Err(format!(
                "key is {} bytes; at least 16 are needed",
                key.len()
            ));
        }
        let keyed = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        Ok(Self { key, keyed })
    }

    /// Appends the `v1,<signature>` of one message to `out`.
    fn sign_into(&self, out: &mut String, id: &str, timestamp: u64, body: &[u8]) {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(itoa::Buffer::new().format(timestamp).as_bytes());
        mac.update(b".");
        mac.update(body);
        out.push_str("v1,");
        STANDARD.encode_string(mac.finalize().into_bytes(), out);
    }

    /// The `v1,<signature>` of one message.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut out = String::with_capacity(SIGNATURE_LEN);
        self.sign_into(&mut out, id, timestamp, body);
        out
    }
}

/// `v1,` and 44 characters of base64.
const SIGNATURE_LEN: usize = 47;

/// The length of the `webhook-signature` value for `keys` keys.
pub fn signature_header_len(keys: usize) -> usize {
    keys * (SIGNATURE_LEN + 1)
}

/// The `webhook-signature` header: one signature per key, space separated, so
/// that a receiver holding either the old or the new secret accepts the message
/// while a secret rotates.
/// Written at the end of `out` (a request's head).
pub fn signature_header_into(
    out: &mut String,
    keys: &[SigningKey],
    id: &str,
    timestamp: u64,
    body: &[u8],
) {
    out.reserve(signature_header_len(keys.len()));
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        key.sign_into(out, id, timestamp, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_key_signs_during_a_rotation() {
        let a = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = SigningKey::parse(&format!("whsec_{}", STANDARD.encode([7u8; 32]))).unwrap();
        let mut header = String::new();
        signature_header_into(&mut header, &[a.clone(), b.clone()], "id", 5, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts, [a.sign("id", 5, b"{}"), b.sign("id", 5, b"{}")]);
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(
            SigningKey::parse("whsec_c2hvcnQ=")
                .unwrap_err()
                .contains("at least 16")
        );
    }
}
