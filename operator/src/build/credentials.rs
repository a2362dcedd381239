//! The relay's credentials: two bearer tokens and two webhook signing secrets.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rand::RngCore;

/// The files the relay reads from its credentials directory.
pub const CREDENTIAL_KEYS: [&str; 4] = [
    "client-token",
    "bot-token",
    "bot-signing-secret",
    "response-signing-secret",
];

/// The four values, keyed by file name.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, Vec<u8>>);

// Never print secret values.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Keys a Secret lacks (or holds empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingKeys(pub Vec<String>);

impl Credentials {
    /// Fresh random credentials: 256-bit tokens (base64url) and Standard
    /// Webhooks signing secrets (`whsec_` + base64 of 32 random bytes).
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut random32 = || {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            bytes
        };
        let token = |b: [u8; 32]| URL_SAFE_NO_PAD.encode(b).into_bytes();
        let signing = |b: [u8; 32]| format!("whsec_{}", STANDARD.encode(b)).into_bytes();
        Credentials(BTreeMap::from([
            ("client-token".to_string(), token(random32())),
            ("bot-token".to_string(), token(random32())),
            ("bot-signing-secret".to_string(), signing(random32())),
            ("response-signing-secret".to_string(), signing(random32())),
        ]))
    }

    /// The credentials a Secret holds; every key must be present and non-empty.
    pub fn from_secret(secret: &Secret) -> Result<Self, MissingKeys> {
        let data = secret.data.clone().unwrap_or_default();
        let string_data = secret.string_data.clone().unwrap_or_default();
        let mut found = BTreeMap::new();
        let mut missing = vec![];
        for key in CREDENTIAL_KEYS {
            let value = data
                .get(key)
                .map(|b| b.0.clone())
                .or_else(|| string_data.get(key).map(|s| s.clone().into_bytes()));
            match value {
                Some(v) if !v.iter().all(u8::is_ascii_whitespace) => {
                    found.insert(key.to_string(), v);
                }
                _ => missing.push(key.to_string()),
            }
        }
        if missing.is_empty() {
            Ok(Credentials(found))
        } else {
            Err(MissingKeys(missing))
        }
    }

    /// The Secret's `data`.
    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), ByteString(v.clone())))
            .collect()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_have_the_right_shape_and_are_random() {
        let a = Credentials::generate();
        let b = Credentials::generate();
        assert_ne!(a, b);
        for key in ["client-token", "bot-token"] {
            let token = URL_SAFE_NO_PAD.decode(&a.0[key]).unwrap();
            assert_eq!(token.len(), 32, "{key} is 256 bits");
        }
        for key in ["bot-signing-secret", "response-signing-secret"] {
            let value = String::from_utf8(a.0[key].clone()).unwrap();
            let raw = STANDARD
                .decode(value.strip_prefix("whsec_").expect("whsec_ prefix"))
                .unwrap();
            assert_eq!(raw.len(), 32, "{key} is 32 random bytes");
        }
        assert_ne!(a.0["client-token"], a.0["bot-token"]);
    }

    #[test]
    fn a_secret_missing_keys_names_them() {
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("client-token".to_string(), ByteString(b"abc".to_vec())),
                ("bot-token".to_string(), ByteString(b"  \n".to_vec())),
            ])),
            string_data: Some(BTreeMap::from([(
                "bot-signing-secret".to_string(),
                "whsec_x".to_string(),
            )])),
            ..Secret::default()
        };
        assert_eq!(
            Credentials::from_secret(&secret),
            Err(MissingKeys(vec![
                "bot-token".into(),
                "response-signing-secret".into()
            ]))
        );
    }

    #[test]
    fn round_trip_through_a_secret_keeps_values() {
        let creds = Credentials::generate();
        let secret = Secret {
            data: Some(creds.to_data()),
            ..Secret::default()
        };
        let back = Credentials::from_secret(&secret).unwrap();
        assert_eq!(back, creds);
        assert_ne!(Credentials::generate(), creds);
        assert!(!format!("{creds:?}").contains("whsec_"));
    }
}
