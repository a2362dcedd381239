//! What the relay adds to its requests to a target beyond the contract: extra
//! headers (static, or read from files such as a mounted Secret) and a client
//! certificate for targets that demand mutual TLS. Files are re-read when
//! they change, as the credential files are; a file that turns unreadable
//! or invalid keeps the last good value in force, with a warning.

use crate::store::Target;
use clap::Args;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The flags of extra headers and client certificates, per target.
#[derive(Clone, Debug, Default, Args)]
pub struct OutgoingFlags {
    /// Extra header on every request to the bot, `Name: value` (repeatable;
    /// in the environment, one per line). Headers the relay sets itself
    /// cannot be given.
    #[arg(
        long = "bot-header",
        env = "BOTRELAY_BOT_HEADER",
        value_name = "NAME: VALUE",
        value_delimiter = '\n'
    )]
    pub bot_header: Vec<String>,

    /// Extra header on every request to the bot whose value is the content
    /// of a file (trimmed), `Name=PATH` (repeatable; in the environment, one
    /// per line); re-read when the file changes.
    #[arg(
        long = "bot-header-file",
        env = "BOTRELAY_BOT_HEADER_FILE",
        value_name = "NAME=PATH",
        value_delimiter = '\n'
    )]
    pub bot_header_file: Vec<String>,

    /// As --bot-header, towards the response endpoint.
    #[arg(
        long = "response-header",
        env = "BOTRELAY_RESPONSE_HEADER",
        value_name = "NAME: VALUE",
        value_delimiter = '\n'
    )]
    pub response_header: Vec<String>,

    /// As --bot-header-file, towards the response endpoint.
    #[arg(
        long = "response-header-file",
        env = "BOTRELAY_RESPONSE_HEADER_FILE",
        value_name = "NAME=PATH",
        value_delimiter = '\n'
    )]
    pub response_header_file: Vec<String>,

    /// PEM client certificate (chain) for mutual TLS with the bot; needs
    /// --bot-client-key. Re-read when it changes.
    #[arg(long, env = "BOTRELAY_BOT_CLIENT_CERT", value_name = "PATH")]
    pub bot_client_cert: Option<PathBuf>,

    /// PEM private key of --bot-client-cert.
    #[arg(long, env = "BOTRELAY_BOT_CLIENT_KEY", value_name = "PATH")]
    pub bot_client_key: Option<PathBuf>,

    /// As --bot-client-cert, towards the response endpoint.
    #[arg(long, env = "BOTRELAY_RESPONSE_CLIENT_CERT", value_name = "PATH")]
    pub response_client_cert: Option<PathBuf>,

    /// PEM private key of --response-client-cert.
    #[arg(long, env = "BOTRELAY_RESPONSE_CLIENT_KEY", value_name = "PATH")]
    pub response_client_key: Option<PathBuf>,
}

/// Headers the relay sets itself, which a user header must not change: the
/// same list as the operator's (`RESERVED_HEADERS` and `webhook-*`), so that
/// a spec the operator takes never stops a relay. `user-agent` may be given
/// and replaces the relay's.
pub const RESERVED_HEADERS: [&str; 8] = [
    "content-type",
    "content-length",
    "host",
    "connection",
    "transfer-encoding",
    "traceparent",
    "tracestate",
    "botrelay-probe",
];

fn reserved(name: &HeaderName) -> bool {
    let name = name.as_str();
    RESERVED_HEADERS.contains(&name) || name.starts_with("webhook-")
}

fn header_name(flag: &str, name: &str) -> Result<HeaderName, String> {
    let name = name.trim();
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{flag}: {name:?} is not a valid HTTP header name"))?;
    if reserved(&parsed) {
        return Err(format!(
            "{flag}: {parsed} is set by the relay itself and cannot be given"
        ));
    }
    Ok(parsed)
}

/// The longest header value taken (as the operator's inline values): a
/// longer one would make every request fail at the target (431).
pub const MAX_HEADER_VALUE: usize = 4096;

fn header_value(what: &str, value: &str) -> Result<HeaderValue, String> {
    if value.trim().len() > MAX_HEADER_VALUE {
        return Err(format!(
            "{what}: the value is over {MAX_HEADER_VALUE} bytes"
        ));
    }
    HeaderValue::from_str(value.trim())
        .map_err(|_| format!("{what}: the value is not a valid HTTP header value"))
}

/// A header whose value is read from a file.
#[derive(Clone, Debug)]
struct HeaderFile {
    name: HeaderName,
    path: PathBuf,
    flag: &'static str,
}

impl HeaderFile {
    fn read(&self) -> Result<HeaderValue, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("{}: cannot read {}: {e}", self.flag, self.path.display()))?;
        if text.trim().is_empty() {
            return Err(format!("{}: {} is empty", self.flag, self.path.display()));
        }
        header_value(&format!("{} ({})", self.flag, self.path.display()), &text)
    }
}

/// The bytes of a certificate file and its key file.
type PemPair = (Vec<u8>, Vec<u8>);

/// A client certificate and its key, as files.
#[derive(Clone, Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    flags: (&'static str, &'static str),
}

impl CertFiles {
    /// The files' bytes and what they make; errors name the flag.
    fn read(&self) -> Result<(PemPair, CertifiedKey), String> {
        let (cert_flag, key_flag) = self.flags;
        let cert_pem = std::fs::read(&self.cert)
            .map_err(|e| format!("{cert_flag}: cannot read {}: {e}", self.cert.display()))?;
        let key_pem = std::fs::read(&self.key)
            .map_err(|e| format!("{key_flag}: cannot read {}: {e}", self.key.display()))?;
        let certified = certified_key(&cert_pem, &key_pem, self.flags)?;
        Ok(((cert_pem, key_pem), certified))
    }
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    (cert_flag, key_flag): (&str, &str),
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_flag}: not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_flag}: no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("{key_flag}: not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("{key_flag}: unusable with {cert_flag}: {e}"))?;
    // `from_der` lets a consistency it cannot tell pass; a mismatch it can
    // tell is an error there already.
    Ok(certified)
}

/// The client certificate in force, handed to rustls at each handshake.
#[derive(Debug)]
pub struct ClientCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// Bumped when the certificate changes: connections made with an older
    /// one are not reused.
    generation: std::sync::atomic::AtomicU64,
}

impl ClientCert {
    /// Which certificate is in force (it changes with each rotation).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS configuration of a target with a client certificate: the system's
/// CA certificates (a private CA through `SSL_CERT_FILE`, as without one),
/// and the certificate in force at each handshake.
pub fn tls_config_with_client_cert(cert: Arc<ClientCert>) -> rustls::ClientConfig {
    use hyper_rustls::ConfigBuilderExt;
    let builder = || {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
    };
    let roots = builder().with_native_roots().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no system CA certificates found; https targets will fail");
        builder().with_root_certificates(rustls::RootCertStore::empty())
    });
    let mut config = roots.with_client_cert_resolver(cert);
    // No session resumption: a resumed session keeps the identity of the
    // handshake it resumes, so a rotated certificate would never be shown.
    // Connections are kept alive anyway; a new one costs a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// The extras of one target: its headers in force and its client
/// certificate, shared by its sender and by the task that re-reads them.
#[derive(Clone, Debug, Default)]
pub struct TargetExtras {
    target: Option<Target>,
    fixed: Vec<(HeaderName, HeaderValue)>,
    files: Vec<HeaderFile>,
    headers: Arc<RwLock<Arc<HeaderMap>>>,
    cert_files: Option<CertFiles>,
    client_cert: Option<Arc<ClientCert>>,
}

impl TargetExtras {
    /// Reads and checks the flags of `target`; any problem names the flag.
    pub fn load(flags: &OutgoingFlags, target: Target) -> Result<Self, String> {
        let (headers, files, cert, key, names) = match target {
            Target::Bot => (
                &flags.bot_header,
                &flags.bot_header_file,
                &flags.bot_client_cert,
                &flags.bot_client_key,
                [
                    "--bot-header",
                    "--bot-header-file",
                    "--bot-client-cert",
                    "--bot-client-key",
                ],
            ),
            Target::Response => (
                &flags.response_header,
                &flags.response_header_file,
                &flags.response_client_cert,
                &flags.response_client_key,
                [
                    "--response-header",
                    "--response-header-file",
                    "--response-client-cert",
                    "--response-client-key",
                ],
            ),
        };
        let mut seen: Vec<HeaderName> = Vec::new();
        let mut unique = |flag: &str, name: HeaderName| {
            if seen.contains(&name) {
                return Err(format!("{flag}: {name} is given more than once"));
            }
            seen.push(name.clone());
            Ok(name)
        };
        let mut fixed = Vec::new();
        for item in headers.iter().filter(|s| !s.trim().is_empty()) {
            let flag = names[0];
            let (name, value) = item
                .split_once(':')
                .ok_or_else(|| format!("{flag}: {item:?} is not `Name: value`"))?;
            let name = unique(flag, header_name(flag, name)?)?;
            let value = header_value(&format!("{flag} {name}"), value)?;
            fixed.push((name, value));
        }
        let (mut header_files, mut values) = (Vec::new(), Vec::new());
        for item in files.iter().filter(|s| !s.trim().is_empty()) {
            let flag = names[1];
            let (name, path) = item
                .split_once('=')
                .ok_or_else(|| format!("{flag}: {item:?} is not `Name=PATH`"))?;
            let name = unique(flag, header_name(flag, name)?)?;
            let file = HeaderFile {
                name,
                path: PathBuf::from(path.trim()),
                flag: names[1],
            };
            values.push(file.read()?);
            header_files.push(file);
        }
        let cert_files = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => return Err(format!("{} needs {}", names[2], names[3])),
            (None, Some(_)) => return Err(format!("{} needs {}", names[3], names[2])),
            (Some(cert), Some(key)) => Some(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                flags: (names[2], names[3]),
            }),
        };
        let client_cert = match &cert_files {
            None => None,
            Some(files) => {
                let (_, certified) = files.read()?;
                Some(Arc::new(ClientCert {
                    current: RwLock::new(Arc::new(certified)),
                    generation: std::sync::atomic::AtomicU64::new(0),
                }))
            }
        };
        let extras = Self {
            target: Some(target),
            fixed,
            files: header_files,
            headers: Arc::default(),
            cert_files,
            client_cert,
        };
        extras.set_headers(values);
        Ok(extras)
    }

    fn set_headers(&self, file_values: Vec<HeaderValue>) {
        let mut map = HeaderMap::new();
        for (name, value) in &self.fixed {
            map.insert(name.clone(), value.clone());
        }
        for (file, value) in self.files.iter().zip(file_values) {
            map.insert(file.name.clone(), value);
        }
        *self.headers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// The extra headers in force.
    pub fn headers(&self) -> Arc<HeaderMap> {
        self.headers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The client certificate's resolver, for the TLS configuration.
    pub fn client_cert(&self) -> Option<Arc<ClientCert>> {
        self.client_cert.clone()
    }

    /// Which client certificate is in force (0 without one): it changes
    /// with each rotation.
    pub fn cert_generation(&self) -> u64 {
        self.client_cert
            .as_ref()
            .map_or(0, |cert| cert.generation())
    }

    /// Whether anything needs re-reading.
    pub fn watched(&self) -> bool {
        !self.files.is_empty() || self.cert_files.is_some()
    }

    /// Re-reads the header files and the certificate every `interval`; a
    /// change takes effect for the next request (a new certificate: for the
    /// next connection). A problem is logged once (again after
    /// [`REPEAT_PROBLEM`] if it lasts) and the last good value stays.
    pub async fn watch(self, interval: Duration) {
        let target = self.target.map_or("", Target::as_str);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // In file order (the map's order may differ).
        let current = self.headers();
        let mut values: Vec<HeaderValue> = self
            .files
            .iter()
            .map(|f| {
                current
                    .get(&f.name)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(""))
            })
            .collect();
        let mut cert_bytes = self
            .cert_files
            .as_ref()
            .and_then(|f| f.read().ok())
            .map(|(b, _)| b);
        let mut failing: Vec<(String, Instant)> = Vec::new();
        let mut report = |problem: String| {
            failing.retain(|(_, at)| at.elapsed() < REPEAT_PROBLEM);
            if !failing.iter().any(|(p, _)| *p == problem) {
                tracing::warn!(to = target, %problem, "could not re-read; keeping the value in force");
                failing.push((problem, Instant::now()));
            }
        };
        loop {
            tick.tick().await;
            let mut changed = false;
            for (i, file) in self.files.iter().enumerate() {
                let file = file.clone();
                match tokio::task::spawn_blocking(move || file.read()).await {
                    Ok(Ok(value)) if value != values[i] => {
                        values[i] = value;
                        changed = true;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(problem)) => report(problem),
                    Err(_) => {}
                }
            }
            if changed {
                self.set_headers(values.clone());
                tracing::info!(
                    to = target,
                    "a header file changed; its new value is in force"
                );
            }
            if let (Some(files), Some(resolver)) = (&self.cert_files, &self.client_cert) {
                let files = files.clone();
                match tokio::task::spawn_blocking(move || files.read()).await {
                    Ok(Ok((bytes, certified))) if Some(&bytes) != cert_bytes.as_ref() => {
                        *resolver.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(certified);
                        resolver
                            .generation
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        cert_bytes = Some(bytes);
                        tracing::info!(
                            to = target,
                            "the client certificate changed; new connections use it, kept-alive ones are closed after their request"
                        );
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(problem)) => report(problem),
                    Err(_) => {}
                }
            }
        }
    }
}

/// How often a lasting problem with a file is logged again.
const REPEAT_PROBLEM: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        outgoing: OutgoingFlags,
    }

    fn load(args: &[&str], target: Target) -> Result<TargetExtras, String> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        TargetExtras::load(&Flags::try_parse_from(all).unwrap().outgoing, target)
    }

    #[test]
    fn static_headers_are_checked_and_named_by_flag() {
        let extras = load(
            &[
                "--bot-header",
                "X-Api-Key: abc ",
                "--bot-header",
                "Authorization: Basic x",
            ],
            Target::Bot,
        )
        .unwrap();
        let h = extras.headers();
        assert_eq!(h["x-api-key"], "abc");
        assert_eq!(h["authorization"], "Basic x");
        assert!(
            load(&["--bot-header", "X-A: 1"], Target::Response)
                .unwrap()
                .headers()
                .is_empty()
        );
        for (args, needle) in [
            (["--bot-header", "no colon"], "--bot-header"),
            (
                ["--bot-header", "Bad Name: 1"],
                "not a valid HTTP header name",
            ),
            (
                ["--bot-header", "X-A: a\u{1}b"],
                "not a valid HTTP header value",
            ),
            (
                ["--bot-header", "Content-Type: text/plain"],
                "content-type is set by the relay",
            ),
            (
                ["--response-header", "webhook-id: x"],
                "--response-header: webhook-id",
            ),
            (["--bot-header", "traceparent: x"], "traceparent"),
            (["--bot-header", "Host: x"], "host"),
        ] {
            let target = if args[0].starts_with("--bot") {
                Target::Bot
            } else {
                Target::Response
            };
            let e = load(&args, target).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let e = load(
            &["--bot-header", "X-A: 1", "--bot-header", "x-a: 2"],
            Target::Bot,
        )
        .unwrap_err();
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn header_files_are_read_at_start_and_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "s3cret\n").unwrap();
        let arg = format!("X-Api-Key={}", path.display());
        let extras = load(&["--response-header-file", &arg], Target::Response).unwrap();
        assert_eq!(extras.headers()["x-api-key"], "s3cret");
        let missing = format!("X-Api-Key={}", dir.path().join("nope").display());
        let e = load(&["--response-header-file", &missing], Target::Response).unwrap_err();
        assert!(e.starts_with("--response-header-file: cannot read"), "{e}");
        let e = load(&["--bot-header-file", "X-Api-Key"], Target::Bot).unwrap_err();
        assert!(
            e.contains("--bot-header-file") && e.contains("Name=PATH"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key_and_must_match_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["relay".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let (c, k, o) = (
            write("c.pem", &cert.pem()),
            write("k.pem", &key.serialize_pem()),
            write("o.pem", &other.serialize_pem()),
        );
        assert!(
            load(
                &["--bot-client-cert", &c, "--bot-client-key", &k],
                Target::Bot
            )
            .unwrap()
            .client_cert()
            .is_some()
        );
        let e = load(&["--bot-client-cert", &c], Target::Bot).unwrap_err();
        assert_eq!(e, "--bot-client-cert needs --bot-client-key");
        let e = load(
            &["--response-client-cert", &c, "--response-client-key", &o],
            Target::Response,
        )
        .unwrap_err();
        assert!(e.starts_with("--response-client-key"), "{e}");
        let e = load(
            &["--bot-client-cert", &k, "--bot-client-key", &k],
            Target::Bot,
        )
        .unwrap_err();
        assert!(e.starts_with("--bot-client-cert"), "{e}");
        let e = load(
            &["--bot-client-cert", &c, "--bot-client-key", &c],
            Target::Bot,
        )
        .unwrap_err();
        assert!(e.starts_with("--bot-client-key"), "{e}");
    }
}
