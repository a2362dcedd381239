//! Command-line flags; each is also an environment variable (`BOTRELAY_` + the
//! flag in upper snake case).

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Messages wait in memory: nothing survives a restart.
    Memory,
    /// Messages wait in a crash-safe file under --data-dir.
    Embedded,
    /// Messages wait in NATS JetStream (--nats-url), shared by several relay
    /// replicas of one endpoint.
    Nats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when standard error is not a terminal, text otherwise.
    Auto,
    Json,
    Text,
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
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

    #[command(flatten)]
    pub nats: crate::cluster::NatsFlags,

    #[command(flatten)]
    pub control: crate::delivery::control::ControlFlags,

    #[command(flatten)]
    pub outgoing: crate::outgoing::OutgoingFlags,

    /// The longest `?wait=` a client may ask for on POST /v1/messages: the
    /// answer then carries the bot's replies. 0s refuses `wait`.
    #[arg(long, env = "BOTRELAY_MAX_WAIT", default_value = "30s", value_parser = duration)]
    pub max_wait: Duration,

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

    /// Most messageIds remembered at once. Past it, the oldest are forgotten
    /// before the end of --dedupe-window (counted, and logged as a warning),
    /// rather than the relay outgrowing its memory or disk. 0: no limit.
    /// Default: what fits in a quarter of the memory limit at 160 bytes each
    /// and in a quarter of the data directory's file system at 1 KiB each,
    /// the smaller; no limit when neither is known.
    #[arg(long, env = "BOTRELAY_DEDUPE_MAX_ENTRIES")]
    pub dedupe_max_entries: Option<u64>,

    /// How long a conversation with no message either way is remembered (to
    /// within an hour). After it, a bot's message to it gets 404 until its
    /// user writes again, which brings it back with the same id. 0 keeps
    /// conversations for good.
    #[arg(long, env = "BOTRELAY_CONVERSATION_RETENTION", default_value = "30d", value_parser = duration)]
    pub conversation_retention: Duration,

    /// Free space kept on the embedded store's volume, in bytes: client and bot
    /// messages get 503 while the file system has less free than this plus
    /// the journal's live bytes (the room a compaction needs), instead of the
    /// store failing on a full disk. Deliveries go on meanwhile.
    #[arg(long, env = "BOTRELAY_DISK_RESERVE_BYTES", default_value_t = 64 << 20)]
    pub disk_reserve_bytes: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BOTRELAY_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Messages that may wait at once (both directions); past it clients get
    /// 429. Default: 1000000, or fewer under a memory limit (a cgroup's, as in
    /// a container): as many as fit in half of it at 600 bytes each.
    #[arg(long, env = "BOTRELAY_MAX_PENDING")]
    pub max_pending: Option<usize>,

    /// Deliveries under way at once, per target.
    #[arg(long, env = "BOTRELAY_MAX_IN_FLIGHT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// Memory for the bot's answers over 64 KiB, all deliveries together,
    /// in bytes (at least 4 MiB). One of known length takes its length, one
    /// of unknown length 4 MiB once it passes 64 KiB; an answer that does
    /// not fit waits for room, and the wait does not count against
    /// --bot-timeout. Smaller answers need none: --max-in-flight bounds them.
    /// Default: 16 MiB, or a sixteenth of a memory limit (a cgroup's, as in
    /// a container), at least 4 MiB: 16 MiB under 256 MiB.
    #[arg(long, env = "BOTRELAY_ANSWER_MEMORY_BYTES",
          value_parser = clap::value_parser!(u64).range((ANSWER_MEMORY_MIN)..))]
    pub answer_memory_bytes: Option<u64>,

    /// Replies one answer of the bot may carry. An answer with more still
    /// counts as delivered, and its replies are dropped, logged and counted
    /// as an unreadable answer's are.
    #[arg(long, env = "BOTRELAY_MAX_REPLIES_PER_ANSWER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_replies_per_answer: u32,

    /// Threads that serve requests and run deliveries. Default: one fewer
    /// than the CPUs the process may use (a cgroup's quota counts), at least
    /// one: the store's sync thread and the kernel's network work get the
    /// rest. One thread runs a single-threaded runtime, which costs less per
    /// task, except with --store nats.
    #[arg(long, env = "BOTRELAY_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

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

/// The longest `--max-wait`: a request held longer holds a connection
/// past any sensible client timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// `--max-pending` when it is not given.
pub const MAX_PENDING: usize = 1_000_000;

/// Memory a waiting message may take, for the default `--max-pending` under a
/// memory limit. Measured with the benchmark (peak RSS less an idle relay's,
/// over the messages waiting): about 270 bytes a message (its place in the
/// queues, its index entries, its dedupe entry) with 1,000 conversations,
/// about 520 with every message in a conversation of its own.
const BYTES_PER_PENDING: u64 = 600;

/// `--answer-memory-bytes` without a memory limit.
pub const ANSWER_MEMORY: u64 = 16 << 20;

/// The least `--answer-memory-bytes`: one answer of the largest size read.
const ANSWER_MEMORY_MIN: u64 = 4 << 20;

/// The default `--max-pending` under a memory limit of `limit` bytes: half of
/// the limit is left to the rest (dedupe entries of delivered messages,
/// conversations, a compaction's second index, buffers).
pub fn max_pending_for_memory(limit: u64) -> usize {
    let fits = limit / 2 / BYTES_PER_PENDING;
    usize::try_from(fits)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_PENDING)
}

/// The memory limit of the relay's cgroup, from the contents of cgroup v2's
/// `memory.max` or v1's `memory.limit_in_bytes`: `None` when there is none
/// ("max", or v1's "no limit", a number near `u64::MAX`).
pub fn parse_memory_limit(contents: &str) -> Option<u64> {
    let limit: u64 = contents.trim().parse().ok()?;
    (limit < 1 << 60).then_some(limit)
}

/// The memory limit this process runs under, if any.
pub fn memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit_in(&cgroups, Path::new("/sys/fs/cgroup"))
}

/// The memory limit of the cgroup that `cgroups` (the contents of
/// `/proc/<pid>/cgroup`) names, read under `root`: cgroup v2's `memory.max`,
/// or v1's `memory/…/memory.limit_in_bytes`.
fn memory_limit_in(cgroups: &str, root: &Path) -> Option<u64> {
    cgroups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let dir = path.trim_start_matches('/');
        let file = if controllers.is_empty() {
            root.join(dir).join("memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            root.join("memory").join(dir).join("memory.limit_in_bytes")
        } else {
            return None;
        };
        parse_memory_limit(&std::fs::read_to_string(file).ok()?)
    })
}

/// Memory a remembered messageId may take, for the default
/// `--dedupe-max-entries`: its index entry (about 77 bytes) and, while a
/// compaction finishes, its place in the second index (about as much).
const BYTES_PER_DEDUPE_ENTRY: u64 = 160;

/// Disk a remembered messageId may take, for the default
/// `--dedupe-max-entries`: an accepted message is about 0.42 KiB of journal
/// with a short text, and the journal may hold twice its live records, and a
/// compaction a third copy.
const DISK_BYTES_PER_DEDUPE_ENTRY: u64 = 1024;

/// The default `--dedupe-max-entries` under a memory limit and on a file
/// system of the given sizes, when either is known.
pub fn dedupe_max_entries_for(memory_limit: Option<u64>, disk_bytes: Option<u64>) -> Option<u64> {
    let by_memory = memory_limit.map(|m| m / 4 / BYTES_PER_DEDUPE_ENTRY);
    let by_disk = disk_bytes.map(|d| d / 4 / DISK_BYTES_PER_DEDUPE_ENTRY);
    [by_memory, by_disk]
        .into_iter()
        .flatten()
        .min()
        .map(|n| n.max(1))
}

impl Config {
    /// `--dedupe-max-entries` (`None`: no limit), or its default under
    /// `memory_limit` and on a file system of `disk_bytes` (the embedded
    /// store's); and whether it was derived.
    pub fn dedupe_max_entries(
        &self,
        memory_limit: Option<u64>,
        disk_bytes: Option<u64>,
    ) -> (Option<u64>, bool) {
        match self.dedupe_max_entries {
            Some(0) => (None, false),
            Some(n) => (Some(n), false),
            None => {
                let derived = dedupe_max_entries_for(memory_limit, disk_bytes);
                (derived, derived.is_some())
            }
        }
    }

    /// `--max-pending`, or its default under `memory_limit`; and whether it
    /// was derived from that limit.
    pub fn max_pending(&self, memory_limit: Option<u64>) -> (usize, bool) {
        match (self.max_pending, memory_limit) {
            (Some(n), _) => (n, false),
            (None, Some(limit)) => (max_pending_for_memory(limit), true),
            (None, None) => (MAX_PENDING, false),
        }
    }

    /// `--answer-memory-bytes`, or its default under `memory_limit`; and
    /// whether it was derived from the limit.
    pub fn answer_memory(&self, memory_limit: Option<u64>) -> (u64, bool) {
        match (self.answer_memory_bytes, memory_limit) {
            (Some(n), _) => (n, false),
            (None, Some(limit)) => ((limit / 16).max(ANSWER_MEMORY_MIN), true),
            (None, None) => (ANSWER_MEMORY, false),
        }
    }

    /// `--worker-threads`, or its default for `cpus` CPUs.
    pub fn worker_threads(&self, cpus: usize) -> usize {
        self.worker_threads
            .map_or(cpus.saturating_sub(1).max(1), usize::from)
    }

    /// Checks that span flags; clap checks each flag on its own.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_wait > MAX_WAIT {
            return Err("--max-wait must be at most 1h".into());
        }
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
        if self.store == StoreKind::Nats {
            self.nats.validate(&self.endpoint_name)?;
        }
        self.control.validate()?;
        if self.max_body_bytes == 0 || self.max_pending == Some(0) || self.max_connections == 0 {
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
    fn max_wait_is_bounded_so_no_deadline_overflows() {
        assert!(parse(&["--max-wait=1h"]).unwrap().validate().is_ok());
        for huge in ["2h", "18446744073709551615s"] {
            let e = parse(&[&format!("--max-wait={huge}")])
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.contains("--max-wait must be at most 1h"), "{huge}: {e}");
        }
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
        assert_eq!(c.max_pending(None), (MAX_PENDING, false));
        c.validate().unwrap();
    }

    #[test]
    fn worker_threads_leave_a_cpu_to_the_rest_unless_given() {
        let c = parse(&[]).unwrap();
        let defaults: Vec<usize> = [1, 2, 4, 16].map(|cpus| c.worker_threads(cpus)).to_vec();
        assert_eq!(defaults, [1, 1, 3, 15]);
        let c = parse(&["--worker-threads=2"]).unwrap();
        assert_eq!(c.worker_threads(1), 2);
        assert!(parse(&["--worker-threads=0"]).is_err());
    }

    #[test]
    fn dedupe_max_entries_fits_memory_and_disk_unless_given() {
        const MIB: u64 = 1 << 20;
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.dedupe_max_entries(None, None),
            (None, false),
            "nothing known: no limit"
        );
        // The operator's defaults: a 256 MiB limit and a 1 GiB volume.
        assert_eq!(
            c.dedupe_max_entries(Some(256 * MIB), None),
            (Some(419_430), true)
        );
        assert_eq!(
            c.dedupe_max_entries(None, Some(1024 * MIB)),
            (Some(262_144), true)
        );
        assert_eq!(
            c.dedupe_max_entries(Some(256 * MIB), Some(1024 * MIB)),
            (Some(262_144), true),
            "the smaller of the two"
        );
        let given = parse(&["--dedupe-max-entries=5000000"]).unwrap();
        assert_eq!(
            given.dedupe_max_entries(Some(MIB), Some(MIB)),
            (Some(5_000_000), false)
        );
        let unlimited = parse(&["--dedupe-max-entries=0"]).unwrap();
        assert_eq!(
            unlimited.dedupe_max_entries(Some(MIB), Some(MIB)),
            (None, false)
        );
    }

    #[test]
    fn max_pending_fits_a_memory_limit_unless_given() {
        const MIB: u64 = 1 << 20;
        let c = parse(&[]).unwrap();
        // The operator's default limit, 256 MiB: 128 MiB at 600 bytes each.
        assert_eq!(c.max_pending(Some(256 * MIB)), (223_696, true));
        assert_eq!(c.max_pending(Some(64 * MIB)).0, 55_924);
        // A limit large enough changes nothing; a tiny one still lets one wait.
        assert_eq!(c.max_pending(Some(1 << 40)).0, MAX_PENDING);
        assert_eq!(c.max_pending(Some(1000)).0, 1);
        let given = parse(&["--max-pending=5000000"]).unwrap();
        assert_eq!(given.max_pending(Some(64 * MIB)), (5_000_000, false));
        assert!(parse(&["--max-pending=0"]).unwrap().validate().is_err());

        // Read from the process's own cgroup, v2 or v1.
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("kubepods/pod1/c1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "268435456\n").unwrap();
        assert_eq!(
            memory_limit_in("0::/kubepods/pod1/c1\n", root.path()),
            Some(256 * MIB)
        );
        let v1 = root.path().join("memory/docker/c2");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "67108864\n").unwrap();
        let v1_cgroups = "5:cpu,cpuacct:/docker/c2\n4:memory:/docker/c2\n0::/\n";
        assert_eq!(memory_limit_in(v1_cgroups, root.path()), Some(64 * MIB));
        assert_eq!(memory_limit_in("0::/elsewhere\n", root.path()), None);

        assert_eq!(parse_memory_limit("268435456\n"), Some(256 * MIB));
        assert_eq!(parse_memory_limit("max\n"), None);
        // cgroup v1 without a limit.
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit(""), None);
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
        // Room for one answer of the largest size read, at least.
        let e = parse(&["--answer-memory-bytes=65536"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--answer-memory-bytes"), "{e}");
        let c = parse(&[]).unwrap();
        assert_eq!(c.answer_memory(None), (16 << 20, false));
        // Under a memory limit, a sixteenth of it, 4 MiB at least.
        assert_eq!(c.answer_memory(Some(256 << 20)), (16 << 20, true));
        assert_eq!(c.answer_memory(Some(64 << 20)), (4 << 20, true));
        assert_eq!(c.answer_memory(Some(16 << 20)), (4 << 20, true));
        assert_eq!(c.answer_memory(Some(1 << 30)), (64 << 20, true));
        let given = parse(&["--answer-memory-bytes=8388608"]).unwrap();
        assert_eq!(given.answer_memory(Some(1 << 30)), (8 << 20, false));
        assert_eq!(c.max_replies_per_answer, 100);
        assert!(parse(&["--max-replies-per-answer=0"]).is_err());
    }
}
