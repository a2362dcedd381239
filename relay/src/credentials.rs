//! The four credential files of `--credentials-dir` (a mounted Secret), read at
//! start and again whenever they change, so tokens and secrets rotate without
//! a restart.

use crate::signing::SigningKey;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

pub const CLIENT_TOKEN: &str = "client-token";
pub const BOT_TOKEN: &str = "bot-token";
pub const BOT_SIGNING_SECRET: &str = "bot-signing-secret";
pub const RESPONSE_SIGNING_SECRET: &str = "response-signing-secret";
const FILES: [&str; 4] = [
    CLIENT_TOKEN,
    BOT_TOKEN,
    BOT_SIGNING_SECRET,
    RESPONSE_SIGNING_SECRET,
];

/// Accepted bearer tokens, kept as SHA-256 digests: comparing fixed-length
/// digests in constant time reveals neither a token nor its length.
#[derive(Clone, Default)]
pub struct Tokens(Vec<[u8; 32]>);

impl Tokens {
    fn parse(text: &str) -> Self {
        Tokens(
            lines(text)
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
        )
    }

    /// Whether `presented` is one of the tokens; looks at every one of them.
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, t| found | t.ct_eq(&digest))
            .into()
    }
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// One consistent reading of the credential files.
#[derive(Clone)]
pub struct Credentials {
    pub client_tokens: Tokens,
    pub bot_tokens: Tokens,
    pub bot_signing: Vec<SigningKey>,
    pub response_signing: Vec<SigningKey>,
}

impl Credentials {
    /// Reads and checks all four files; any problem names the file.
    pub fn load(dir: &Path) -> Result<(Self, Vec<String>), String> {
        let mut texts = Vec::with_capacity(FILES.len());
        for name in FILES {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if lines(&text).next().is_none() {
                return Err(format!("{} is empty", path.display()));
            }
            texts.push(text);
        }
        let keys = |i: usize| -> Result<Vec<SigningKey>, String> {
            lines(&texts[i])
                .map(SigningKey::parse)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", dir.join(FILES[i]).display()))
        };
        let credentials = Credentials {
            client_tokens: Tokens::parse(&texts[0]),
            bot_tokens: Tokens::parse(&texts[1]),
            bot_signing: keys(2)?,
            response_signing: keys(3)?,
        };
        Ok((credentials, texts))
    }
}

/// The credentials in force, swapped whole when the files change.
#[derive(Clone)]
pub struct CredentialStore {
    dir: PathBuf,
    current: Arc<RwLock<Arc<Credentials>>>,
}

impl CredentialStore {
    pub fn open(dir: &Path) -> Result<(Self, Vec<String>), String> {
        let (credentials, texts) = Credentials::load(dir)?;
        Ok((
            Self {
                dir: dir.to_owned(),
                current: Arc::new(RwLock::new(Arc::new(credentials))),
            },
            texts,
        ))
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Polls the files every `interval` and swaps in a new reading when their
    /// content changed. Content, not mtime: a mounted Secret changes by an
    /// atomic symlink swap that mtime-based watching can miss. A broken new
    /// version is logged and the last good one stays in force; while it stays
    /// broken the same way, it is logged (and counted) again only every
    /// [`REPEAT_PROBLEM`].
    pub async fn watch(
        self,
        mut last: Vec<String>,
        interval: Duration,
        metrics: crate::metrics::Metrics,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The problem last logged, and when.
        let mut failing: Option<(String, Instant)> = None;
        loop {
            tick.tick().await;
            let dir = self.dir.clone();
            let loaded = tokio::task::spawn_blocking(move || Credentials::load(&dir)).await;
            match loaded {
                Ok(Ok((credentials, texts))) => {
                    if texts != last {
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(credentials);
                        last = texts;
                        metrics
                            .credential_reloads
                            .with_label_values(&["success"])
                            .inc();
                        tracing::info!(dir = %self.dir.display(), "credentials changed; new tokens and secrets in force");
                    } else if failing.is_some() {
                        tracing::info!(dir = %self.dir.display(), "credentials can be read again, unchanged");
                    }
                    failing = None;
                }
                Ok(Err(problem)) => {
                    let logged = failing
                        .as_ref()
                        .is_some_and(|(p, at)| *p == problem && at.elapsed() < REPEAT_PROBLEM);
                    if !logged {
                        metrics
                            .credential_reloads
                            .with_label_values(&["error"])
                            .inc();
                        tracing::warn!(%problem, "credentials could not be re-read; keeping the ones in force");
                        failing = Some((problem, Instant::now()));
                    }
                }
                Err(e) => tracing::error!(error = %e, "credential reload task failed"),
            }
        }
    }
}

/// How often a problem with the credential files that lasts is logged again.
const REPEAT_PROBLEM: Duration = Duration::from_secs(300);

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(header: Option<&http::HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_token_is_accepted_and_nothing_else() {
        let tokens = Tokens::parse("old-token\n\n  new-token  \n");
        assert!(tokens.accepts("old-token"));
        assert!(tokens.accepts("new-token"));
        assert!(!tokens.accepts("new-toke"));
        assert!(!tokens.accepts(""));
        assert!(!Tokens::default().accepts("anything"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(Some(&h("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("bearer  abc "))), Some("abc"));
        assert_eq!(bearer(Some(&h("BEARER abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("Basic abc"))), None);
        assert_eq!(bearer(Some(&h("Bearer"))), None);
        assert_eq!(bearer(None), None);
    }

    #[tokio::test]
    async fn a_lasting_problem_is_reported_once_and_each_new_one_again() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(CLIENT_TOKEN, "a");
        write(BOT_TOKEN, "b");
        write(BOT_SIGNING_SECRET, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        write(
            RESPONSE_SIGNING_SECRET,
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        );
        let (store, texts) = CredentialStore::open(dir.path()).unwrap();
        let metrics = crate::metrics::Metrics::new("test");
        let count = |outcome| {
            metrics
                .credential_reloads
                .with_label_values(&[outcome])
                .get()
        };
        let watching = tokio::spawn(store.clone().watch(
            texts,
            Duration::from_millis(5),
            metrics.clone(),
        ));
        let settle = || tokio::time::sleep(Duration::from_millis(100));
        write(CLIENT_TOKEN, "");
        settle().await;
        assert_eq!(count("error"), 1, "about 20 polls saw it; reported once");
        write(BOT_TOKEN, "");
        settle().await;
        assert_eq!(count("error"), 1, "the first broken file still comes first");
        write(CLIENT_TOKEN, "c");
        settle().await;
        assert_eq!(count("error"), 2, "a new problem: bot-token");
        write(BOT_TOKEN, "b");
        settle().await;
        assert_eq!((count("error"), count("success")), (2, 1));
        assert!(store.current().client_tokens.accepts("c"));
        watching.abort();
    }

    #[test]
    fn load_names_the_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (CLIENT_TOKEN, "a\n"),
            (BOT_TOKEN, "b\n"),
            (
                BOT_SIGNING_SECRET,
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
            ),
            (RESPONSE_SIGNING_SECRET, "nope\n"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let err = Credentials::load(dir.path()).err().unwrap();
        assert!(err.contains(RESPONSE_SIGNING_SECRET), "{err}");
        std::fs::write(
            dir.path().join(RESPONSE_SIGNING_SECRET),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .unwrap();
        std::fs::write(dir.path().join(BOT_TOKEN), "\n \n").unwrap();
        assert!(
            Credentials::load(dir.path())
                .err()
                .unwrap()
                .contains("bot-token is empty")
        );
        std::fs::write(dir.path().join(BOT_TOKEN), "b").unwrap();
        let (c, _) = Credentials::load(dir.path()).unwrap();
        assert!(c.client_tokens.accepts("a") && c.bot_tokens.accepts("b"));
    }
}
