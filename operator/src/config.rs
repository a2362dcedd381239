//! The operator's flags; each is also an environment variable.

use std::net::SocketAddr;

use clap::Parser;

/// Reconciles MessagingEndpoints into running, observable botrelay relays.
#[derive(Debug, Clone, Parser)]
#[command(name = "botrelay-operator", version)]
pub struct Config {
    /// Relay image for endpoints that do not set spec.image.
    #[arg(long, env = "BOTRELAY_RELAY_IMAGE", default_value = concat!("botrelay/relay:", env!("CARGO_PKG_VERSION")))]
    pub relay_image: String,

    /// Namespaces to watch, comma-separated; empty watches all namespaces.
    #[arg(
        long,
        env = "BOTRELAY_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub watch_namespaces: Vec<String>,

    /// Log level or tracing filter (e.g. `info`, `debug`, `botrelay_operator=debug,kube=info`).
    #[arg(long, env = "BOTRELAY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "BOTRELAY_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,

    /// Run only while holding the leader Lease (needed with more than one replica).
    #[arg(long, env = "BOTRELAY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, env = "BOTRELAY_LEASE_NAME", default_value = "botrelay-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease; defaults to the kubeconfig's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Identity of this replica as a leader candidate; defaults to the hostname.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Lease duration in seconds: how long a dead leader blocks a new one.
    #[arg(long, env = "BOTRELAY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// Reconciliations running at once.
    #[arg(long, env = "BOTRELAY_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// How long a burst of changes to an endpoint and its objects is gathered
    /// into one reconciliation (e.g. `500ms`; `0s` turns it off).
    #[arg(long, env = "BOTRELAY_RECONCILE_DEBOUNCE", default_value = "500ms")]
    pub reconcile_debounce: humantime::Duration,

    /// Base URL of a relay's admin port, with `{name}` and `{namespace}`:
    /// the operator reads `<it>/targets` for the reachability conditions.
    /// The default reaches the relay's Service in the cluster; from outside,
    /// `kubectl proxy` serves e.g.
    /// `http://127.0.0.1:8001/api/v1/namespaces/{namespace}/services/{name}-relay:metrics/proxy`.
    #[arg(
        long,
        env = "BOTRELAY_RELAY_ADMIN_URL",
        default_value = "http://{name}-relay.{namespace}.svc:9090"
    )]
    pub relay_admin_url: String,

    /// How often each ready relay's targets are read (`0s`: never, and no
    /// `BotReachable`/`ResponseEndpointReachable` conditions).
    #[arg(long, env = "BOTRELAY_RELAY_POLL_INTERVAL", default_value = "15s")]
    pub relay_poll_interval: humantime::Duration,
}

impl Config {
    /// The namespaces to watch; empty means all.
    pub fn namespaces(&self) -> Vec<String> {
        self.watch_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// This replica's identity.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| format!("botrelay-operator-{}", std::process::id()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::try_parse_from(["botrelay-operator"]).unwrap();
        assert_eq!(c.relay_image, "botrelay/relay:0.1.0");
        assert!(c.namespaces().is_empty());
        assert_eq!(c.log_level, "info");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:8080");
        assert!(c.leader_election);
        assert_eq!(c.lease_name, "botrelay-operator");
        assert_eq!(
            c.relay_admin_url,
            "http://{name}-relay.{namespace}.svc:9090"
        );
        assert_eq!(
            std::time::Duration::from(c.relay_poll_interval),
            std::time::Duration::from_secs(15)
        );
    }

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "botrelay-operator",
            "--watch-namespaces",
            "shop, support,",
            "--leader-election",
            "false",
            "--relay-image",
            "r/relay:1",
        ])
        .unwrap();
        assert_eq!(c.namespaces(), ["shop", "support"]);
        assert!(!c.leader_election);
        assert_eq!(c.relay_image, "r/relay:1");
    }
}
