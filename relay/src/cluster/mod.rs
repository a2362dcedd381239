//! `--store nats`: several relay replicas of one endpoint share NATS
//! JetStream.
//!
//! - **One stream per endpoint** (`botrelay-<prefix>`), replicated
//!   (`--nats-stream-replicas`), holds every change of state as a record
//!   ([`log`]). A conversation belongs to one of [`log::PARTITIONS`]
//!   partitions; its records go to subjects of that partition, so the
//!   partition's log is in stream order.
//! - **Accept**: any replica publishes the message with the caller's
//!   `messageId` (hashed) as `Nats-Msg-Id`, and answers `200` once JetStream
//!   acknowledged it, i.e. once a quorum of servers stored it. The stream's
//!   duplicate window is `--dedupe-window`: a second publish of the same id,
//!   from any replica, is acknowledged as a duplicate with the first one's
//!   sequence, and the answer is made from the first message read back, so it
//!   is the same byte for byte.
//! - **Ownership** ([`leases`]): each partition is delivered by one replica at
//!   a time, the one holding its lease in the `botrelay-<prefix>-leases`
//!   bucket (compare-and-set on the revision; entries expire after
//!   `--nats-lease-ttl`). Replicas take free partitions up to their share of
//!   the live replicas and give back what is over it.
//! - **Delivery**: the owner replays the partition's records from its last
//!   snapshot into the messages still waiting, queues them, and follows the
//!   partition's messages. It appends its delivery progress to the same log
//!   and applies it as JetStream acknowledges it, without reading it back
//!   (each record would cost the servers a delivery). A new owner replays the
//!   same records, so nothing is lost and the order holds; a message whose
//!   delivery was not yet recorded is delivered again with the same
//!   `webhook-id`.
//! - **Dead letters** live in the `botrelay-<prefix>-dead-letters` bucket,
//!   so that every replica's admin port lists and redrives all of them.
//! - **Compaction**: the owner snapshots its partition every
//!   `--nats-snapshot-records` records and drops the delivery records the
//!   snapshot covers, and the accepted messages once they are past the dedupe
//!   window; conversations stay in the `botrelay-<prefix>-conversations`
//!   bucket for `--conversation-retention`.

pub mod leases;
pub mod log;
mod store;

pub use store::NatsStore;

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// The flags of `--store nats`.
#[derive(Clone, Debug, Args)]
pub struct NatsFlags {
    /// NATS servers, comma separated (e.g. nats://nats-0:4222,nats://nats-1:4222).
    #[arg(long, env = "BOTRELAY_NATS_URL")]
    pub nats_url: Option<String>,

    /// A NATS credentials file (.creds: a user JWT and its NKey seed).
    #[arg(long, env = "BOTRELAY_NATS_CREDENTIALS")]
    pub nats_credentials: Option<PathBuf>,

    /// PEM file of the CA that signed the NATS servers' certificates; TLS is
    /// then required.
    #[arg(long, env = "BOTRELAY_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// JetStream replicas of the endpoint's stream and buckets (1 for a
    /// single server; 3 survives the loss of any one server of three).
    #[arg(long, env = "BOTRELAY_NATS_STREAM_REPLICAS", default_value_t = 3,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,

    /// Names the endpoint's stream and buckets, so that endpoints never share
    /// data: letters, digits, `-` and `_`. Default: --endpoint-name, with any
    /// other character made `_`. The operator sets it to `<namespace>_<name>` (a longer one: its first 47 characters, `-` and a digest).
    #[arg(long, env = "BOTRELAY_NATS_PREFIX")]
    pub nats_prefix: Option<String>,

    /// How long a partition's lease lasts without renewal: a replica that
    /// dies loses its partitions to the others after about this long (plus
    /// a fifth of it, the renewal period).
    #[arg(long, env = "BOTRELAY_NATS_LEASE_TTL", default_value = "10s",
          value_parser = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string()))]
    pub nats_lease_ttl: Duration,

    /// Records a partition's owner applies between two snapshots, at least
    /// (more when many messages wait). For tests.
    #[arg(long, env = "BOTRELAY_NATS_SNAPSHOT_RECORDS", default_value_t = 1000, hide = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nats_snapshot_records: u32,

    /// How long a redrive's claim on a dead letter keeps other redrives and
    /// discards off it (a redrive that died half way leaves its claims); three
    /// --nats-lease-ttl at least. For tests.
    #[arg(long, env = "BOTRELAY_NATS_REDRIVE_CLAIM_TTL", default_value = "30s", hide = true,
          value_parser = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string()))]
    pub nats_redrive_claim_ttl: Duration,

    /// Exits at once (status 137, as a SIGKILL) once a redrive has sent its
    /// first dead letter back, before it takes it out of the list: a crash
    /// at the worst moment, for tests.
    #[arg(long, hide = true)]
    pub nats_exit_mid_redrive: bool,
}

impl NatsFlags {
    /// The prefix in force: `--nats-prefix`, or the one made from the endpoint name.
    pub fn prefix(&self, endpoint_name: &str) -> String {
        self.nats_prefix
            .clone()
            .unwrap_or_else(|| log::prefix_from(endpoint_name))
    }

    /// The servers, one per comma-separated item.
    pub fn servers(&self) -> Vec<String> {
        self.nats_url
            .iter()
            .flat_map(|urls| urls.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn validate(&self, endpoint_name: &str) -> Result<(), String> {
        if self.servers().is_empty() {
            return Err(
                "--store nats needs --nats-url (one or more servers, comma separated)".into(),
            );
        }
        for url in self.servers() {
            let parsed = url
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| e.to_string())
                .and_then(|addr| match addr.host() {
                    "" => Err("no host".to_owned()),
                    _ => Ok(()),
                });
            if let Err(e) = parsed {
                return Err(format!(
                    "--nats-url {url:?} is not a NATS server address (nats://host:port, tls://host:port or host:port): {e}"
                ));
            }
        }
        let prefix = self.prefix(endpoint_name);
        if !log::valid_prefix(&prefix) {
            return Err(format!(
                "--nats-prefix {prefix:?} must be 1 to 64 letters, digits, `-` or `_`"
            ));
        }
        if self.nats_lease_ttl < Duration::from_secs(2) {
            return Err("--nats-lease-ttl must be at least 2s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, StoreKind};
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut args = vec![
            "botrelay",
            "--bot-url=http://bot:8080/events",
            "--response-url=https://backend.example/r",
            "--credentials-dir=/creds",
            "--store=nats",
        ];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn nats_flags_have_their_defaults_and_are_checked() {
        let e = parse(&[]).unwrap_err();
        assert!(e.contains("--nats-url"), "{e}");
        let c = parse(&[
            "--nats-url=nats://a:4222, nats://b:4222",
            "--endpoint-name=shop.support",
        ])
        .unwrap();
        assert_eq!(c.store, StoreKind::Nats);
        assert_eq!(c.nats.servers(), ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(c.nats.nats_stream_replicas, 3);
        assert_eq!(c.nats.nats_lease_ttl, std::time::Duration::from_secs(10));
        assert_eq!(
            c.nats.prefix(&c.endpoint_name),
            "shop_support",
            "from the endpoint name"
        );
        let c = parse(&["--nats-url=nats://a:4222", "--nats-prefix=shop-support"]).unwrap();
        assert_eq!(c.nats.prefix(&c.endpoint_name), "shop-support");
        let e = parse(&["--nats-url=nats://a:4222", "--nats-prefix=shop.support"]).unwrap_err();
        assert!(e.contains("--nats-prefix"), "{e}");
        assert!(parse(&["--nats-url=nats://a:4222", "--nats-stream-replicas=0"]).is_err());
        // An address the client cannot use is refused at start, not retried forever.
        for bad in [
            "http://a:4222",
            "garbage::",
            "nats://a:99999",
            "nats://",
            "tls://",
        ] {
            let e = parse(&[&format!("--nats-url=nats://b:4222,{bad}")]).unwrap_err();
            assert!(e.contains("--nats-url") && e.contains(bad), "{bad}: {e}");
        }
        assert!(parse(&["--nats-url=tls://a:4222,b:4222"]).is_ok());
    }
}
