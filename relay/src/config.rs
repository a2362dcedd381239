//! Command-line flags; each is also an environment variable (`BOTRELAY_` + the
//! flag in upper snake case).

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Messages wait in memory: nothing survives a restart.
    Memory,
    /// Messages wait in a crash-safe file under --data-dir.
    Embedded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when standard error is not a terminal, text otherwise.
    Auto,
    Json,
    Text,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 500ms, 10s, 5m, 24h)"))
}

fn url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err("must be an http:// or https:// URL with a host".into()),
    }
}

/// botrelay: a durable, signed message relay between a back-end and a bot.
#[derive(Clone, Debug, Parser)]
#[command(name = "botrelay", version, about)]
pub struct Config {
    /// Address of the client and bot API.
    #[arg(long, env = "BOTRELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of /metrics, /healthz, /readyz and the dead-letter admin API.
    #[arg(long, env = "BOTRELAY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Where user messages are delivered (the bot).
    #[arg(long, env = "BOTRELAY_BOT_URL", value_parser = url)]
    pub bot_url: http::Uri,

    /// Where bot messages are delivered (the back-end's response endpoint).
    #[arg(long, env = "BOTRELAY_RESPONSE_URL", value_parser = url)]
    pub response_url: http::Uri,

    /// Directory with the files client-token, bot-token, bot-signing-secret and
    /// response-signing-secret; re-read when they change.
    #[arg(long, env = "BOTRELAY_CREDENTIALS_DIR")]
    pub credentials_dir: PathBuf,

    /// Where accepted messages wait.
    #[arg(long, env = "BOTRELAY_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,

    /// Location of the embedded store.
    #[arg(long, env = "BOTRELAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Name of this endpoint, the `endpoint` label of every metric and log line.
    #[arg(long, env = "BOTRELAY_ENDPOINT_NAME", default_value = "default")]
    pub endpoint_name: String,

    /// Time allowed for the bot to answer one delivery.
    #[arg(long, env = "BOTRELAY_BOT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub bot_timeout: Duration,

    /// Time allowed for the response endpoint to answer one delivery.
    #[arg(long, env = "BOTRELAY_RESPONSE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub response_timeout: Duration,

    /// Time allowed to open a connection to the bot or the response endpoint.
    #[arg(long, env = "BOTRELAY_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// Wait before the first retry; doubles with each further one (with jitter).
    #[arg(long, env = "BOTRELAY_RETRY_INITIAL_BACKOFF", default_value = "1s", value_parser = duration)]
    pub retry_initial_backoff: Duration,

    /// Longest wait between two attempts.
    #[arg(long, env = "BOTRELAY_RETRY_MAX_BACKOFF", default_value = "5m", value_parser = duration)]
    pub retry_max_backoff: Duration,

    /// Attempts per message before it is dead-lettered.
    #[arg(long, env = "BOTRELAY_MAX_ATTEMPTS", default_value_t = 25,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Age after which a message that still fails is dead-lettered.
    #[arg(long, env = "BOTRELAY_MAX_MESSAGE_AGE", default_value = "24h", value_parser = duration)]
    pub max_message_age: Duration,

    /// How long a messageId is remembered: the same id again within it gets the first answer.
    #[arg(long, env = "BOTRELAY_DEDUPE_WINDOW", default_value = "24h", value_parser = duration)]
    pub dedupe_window: Duration,

    /// How long a conversation with no message either way is remembered (to
    /// within an hour). After it, a bot's message to it gets 404 until its
    /// user writes again, which brings it back with the same id. 0 keeps
    /// conversations for good.
    #[arg(long, env = "BOTRELAY_CONVERSATION_RETENTION", default_value = "30d", value_parser = duration)]
    pub conversation_retention: Duration,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BOTRELAY_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Messages that may wait at once (both directions); past it clients get 429.
    #[arg(long, env = "BOTRELAY_MAX_PENDING", default_value_t = 1_000_000)]
    pub max_pending: usize,

    /// Deliveries under way at once, per target.
    #[arg(long, env = "BOTRELAY_MAX_IN_FLIGHT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// Connections served at once on the API port; more wait in the kernel's backlog.
    /// Each open connection can hold a request body of up to --max-body-bytes.
    #[arg(long, env = "BOTRELAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Time allowed for a client to send a request's headers (also the keep-alive idle limit).
    #[arg(long, env = "BOTRELAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,

    /// Time allowed for a client to send a request's body.
    #[arg(long, env = "BOTRELAY_BODY_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub body_read_timeout: Duration,

    /// On SIGTERM, how long in-flight requests and deliveries may take to finish.
    #[arg(long, env = "BOTRELAY_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// How often the credential files are checked for changes.
    #[arg(long, env = "BOTRELAY_CREDENTIALS_POLL_INTERVAL", default_value = "2s", value_parser = duration)]
    pub credentials_poll_interval: Duration,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info` or `botrelay=debug`).
    #[arg(long, env = "BOTRELAY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "BOTRELAY_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
}

impl Config {
    /// Checks that span flags; clap checks each flag on its own.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_initial_backoff.is_zero() {
            return Err("--retry-initial-backoff must be greater than zero".into());
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return Err(
                "--retry-max-backoff must not be shorter than --retry-initial-backoff".into(),
            );
        }
        for (flag, d) in [
            ("--bot-timeout", self.bot_timeout),
            ("--response-timeout", self.response_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--body-read-timeout", self.body_read_timeout),
            (
                "--credentials-poll-interval",
                self.credentials_poll_interval,
            ),
        ] {
            if d.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        let refresh = Duration::from_millis(crate::store::CONVERSATION_REFRESH_MS);
        if !self.conversation_retention.is_zero() && self.conversation_retention < refresh {
            return Err("--conversation-retention must be 0 (keep for good) or at least 1h".into());
        }
        if self.max_body_bytes == 0 || self.max_pending == 0 || self.max_connections == 0 {
            return Err(
                "--max-body-bytes, --max-pending and --max-connections must be at least 1".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut args = vec![
            "botrelay",
            "--bot-url=http://bot:8080/events",
            "--response-url=https://backend.example/r",
            "--credentials-dir=/creds",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(c.store, StoreKind::Embedded);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.endpoint_name, "default");
        assert_eq!(c.dedupe_window, Duration::from_secs(24 * 3600));
        assert_eq!(
            c.conversation_retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(c.max_body_bytes, 256 * 1024);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let e = parse(&["--bot-timeout=soon"]).unwrap_err().to_string();
        assert!(e.contains("--bot-timeout"), "{e}");
        let e = Config::try_parse_from([
            "botrelay",
            "--bot-url=ftp://x",
            "--response-url=http://y",
            "--credentials-dir=/c",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--bot-url"), "{e}");
        let c = parse(&["--retry-initial-backoff=10s", "--retry-max-backoff=1s"]).unwrap();
        assert!(c.validate().unwrap_err().contains("--retry-max-backoff"));
        let c = parse(&["--conversation-retention=10m"]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("--conversation-retention")
        );
        parse(&["--conversation-retention=0"])
            .unwrap()
            .validate()
            .unwrap();
    }
}
