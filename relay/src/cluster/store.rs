//! The NATS store: the I/O around [`super::log`] and [`super::leases`].

use super::NatsFlags;
use super::leases::{self, partition_key, replica_key};
use super::log::{self, Due, Handle, Names, PARTITIONS, Partition, Place, Record};
use crate::delivery::{Queues, now_ms};
use crate::store::{
    Conversation, DeadLetter, DeadLetterCounts, InboundMessage, Op, OutboundMessage, Outcome,
    Pending, Seq, Store, StoreError, Target,
};
use crate::writer::{CommitError, RemoteStore};
use async_nats::jetstream::{self, kv, stream};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use sha2::Digest;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Longest a write waits for JetStream's acknowledgement before the client
/// is told to retry (the write may still land: a retry with the same
/// `messageId` then gets the first answer).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the first request that creates or updates the stream or a
/// bucket waits; each attempt after a failed one waits twice as long, up to
/// `SETUP_TIMEOUT` (creating a replicated stream on a loaded cluster can
/// take seconds).
const SETUP_FIRST_TIMEOUT: Duration = Duration::from_secs(2);
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest a partition given back waits for its delivery attempts under
/// way to end before its lease is let go of (an attempt lasts at most
/// `--bot-timeout` or `--response-timeout`, 10 s by default).
const HAND_BACK_WAIT: Duration = Duration::from_secs(60);
/// How long a partition reader's pull requests last (see `follow`).
const READER_EXPIRES: Duration = Duration::from_secs(4);
/// Writes under way at once before clients get `503 overloaded`.
const MAX_WRITES: usize = 16 * 1024;
/// Progress records of a partition written as one, at most: a batch
/// forms while the last one waits for its acknowledgement.
const BATCH_RECORDS: usize = 128;
/// Bytes of progress records written as one, about, at most (NATS takes
/// messages of up to 1 MiB by default).
const BATCH_BYTES: usize = 256 * 1024;
/// How often the setup is tried again while NATS cannot be reached.
const SETUP_RETRY: Duration = Duration::from_secs(2);

/// How long a request of a lease round or of a partition's takeover (its
/// snapshot, its reader) waits for an answer: a fifth of the lease TTL (the
/// rounds' period), from 1 s to `ACK_TIMEOUT`. A cluster that has just
/// come back answers none until it has elected its leaders; a request sent
/// meanwhile that waited out the writes' timeout held the partitions back for
/// that long after NATS was up again. One that times out is made again at the
/// next round.
fn control_timeout(lease_ttl: Duration) -> Duration {
    (lease_ttl / 5).clamp(Duration::from_secs(1), ACK_TIMEOUT)
}

pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    flags: NatsFlags,
    names: Names,
    /// This replica's id in the lease bucket.
    replica: String,
    dedupe_window: Duration,
    conversation_retention: Duration,
    runtime: tokio::runtime::Handle,
    /// Set once the stream and buckets exist.
    conn: OnceLock<Conn>,
    /// Why the store is not usable yet, while it is not.
    problem: Mutex<Option<String>>,
    /// What the NATS client last reported going wrong on its connection
    /// (e.g. the servers refusing the credentials), until it connects.
    connection_error: Arc<Mutex<Option<String>>>,
    /// The warning of a small `max_payload` is given once, not at every setup attempt.
    warned_of_max_payload: AtomicBool,
    slots: Mutex<Vec<Slot>>,
    queues: OnceLock<Queues>,
    dead_letters: Mutex<DeadLetterCounts>,
    writes: AtomicUsize,
    closed: AtomicBool,
    /// Whether the first round of leases was taken and replayed: until then
    /// the replica is not ready.
    started: AtomicBool,
    /// When a lease round last succeeded: a connection that went quiet (a
    /// network cut) still says it is connected until its pings time out.
    last_lease_round: Mutex<Instant>,
    /// Delivery attempts under way, per partition: a partition given back
    /// to even out the replicas keeps its lease until they end.
    attempts: Vec<Arc<AtomicUsize>>,
    /// Per partition, how many times it was given up without waiting for
    /// its attempts (`revoke`): each attempt under way watches it.
    revocations: Vec<tokio::sync::watch::Sender<u64>>,
    /// Where each partition's delivery progress waits to be written (one
    /// writer task per partition, started with the store).
    progress: Vec<tokio::sync::mpsc::UnboundedSender<Progress>>,
    progress_inboxes: Mutex<Vec<tokio::sync::mpsc::UnboundedReceiver<Progress>>>,
    /// Whether a partition's progress writer has a record on its way to
    /// JetStream that is not yet applied here: no snapshot is taken then,
    /// since the record's place in the stream may fall before the snapshot's
    /// end while the snapshot lacks it.
    progress_in_flight: Vec<AtomicBool>,
    /// Told when a partition's follower applied records (one per partition).
    applied: Vec<tokio::sync::Notify>,
}

/// A progress record waiting to be written; told the sequence of the
/// record it went out in.
struct Progress {
    record: Record,
    replies: usize,
    bytes: usize,
    written: tokio::sync::oneshot::Sender<Result<u64, CommitError>>,
}

impl Progress {
    fn new(
        record: Record,
    ) -> (
        Progress,
        tokio::sync::oneshot::Receiver<Result<u64, CommitError>>,
    ) {
        let (replies, bytes) = match &record {
            Record::Delivered { replies, .. } => (
                replies.len(),
                replies.iter().map(reply_bytes).sum::<usize>() + 100,
            ),
            _ => (0, 100),
        };
        let (written, wait) = tokio::sync::oneshot::channel();
        (
            Progress {
                record,
                replies,
                bytes,
                written,
            },
            wait,
        )
    }
}

#[derive(Clone)]
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    /// The stream, for the requests of a partition's takeover: they wait
    /// for `control_timeout`, as the leases' do.
    control: stream::Stream,
    leases: kv::Store,
    dead: kv::Store,
    /// Conversations a bot can write to, once their messages left the stream.
    conversations: kv::Store,
}

/// About how many bytes a reply takes in a record.
fn reply_bytes(reply: &OutboundMessage) -> usize {
    reply.payload.get().len() + reply.kind.len() + 300
}

/// Room kept in a NATS message for its headers and a batch's framing.
const RECORD_HEADROOM: usize = 64 * 1024;

/// A dead letter picked for a redrive or a discard.
struct Chosen {
    key: String,
    target: Target,
    /// The bucket entry's revision: a new one each time the message dies.
    revision: u64,
    letter: DeadLetter,
    /// The entry as stored.
    value: bytes::Bytes,
}

/// The field a redrive adds to a dead letter's entry while it sends it back:
/// when the redrive was made. A discard or another redrive leaves such an
/// entry alone for a while (`--nats-redrive-claim-ttl`, 30 s, three lease
/// TTLs at least); after that (its redrive died half way), it is a dead
/// letter like the others again, unless it had been sent back: the
/// partition's owner then took it out of the list.
const CLAIMED_AT: &str = "redriveClaimedAtMs";
/// The field the first redrive of a dead letter adds to its entry, for good:
/// the entry's revision before that redrive claimed it. The record that
/// sends the letter back carries it in its message id, so that a redrive
/// after one that died between sending the letter back and deleting it
/// sends it with the same id, and JetStream keeps it once.
const REDRIVE_OF: &str = "redriveOf";

/// `value` (a dead letter's JSON) with `CLAIMED_AT` set to `now_ms`, or
/// taken out, and `REDRIVE_OF` set to `redrive_of` unless it is set.
fn with_claim(
    value: &[u8],
    now_ms: Option<u64>,
    redrive_of: u64,
) -> Result<bytes::Bytes, serde_json::Error> {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value)?;
    match now_ms {
        Some(ms) => object.insert(CLAIMED_AT.into(), ms.into()),
        None => object.remove(CLAIMED_AT),
    };
    object
        .entry(REDRIVE_OF)
        .or_insert_with(|| redrive_of.into());
    Ok(serde_json::to_vec(&object)?.into())
}

/// The fields redrives add to a dead letter's entry.
#[derive(Default, serde::Deserialize)]
struct RedriveFields {
    #[serde(rename = "redriveClaimedAtMs")]
    claimed_at_ms: Option<u64>,
    #[serde(rename = "redriveOf")]
    of: Option<u64>,
}

fn redrive_fields(value: &[u8]) -> RedriveFields {
    serde_json::from_slice(value).unwrap_or_default()
}

/// The revision a dead letter's redrives name in their message id: the one
/// the entry had when a redrive first claimed it, or `revision` (the entry's
/// now) when none has.
fn redrive_of(value: &[u8], revision: u64) -> u64 {
    redrive_fields(value).of.unwrap_or(revision)
}

/// Whether a dead letter's entry is claimed by a redrive under way: claimed
/// less than `ttl` ago.
fn claimed(value: &[u8], now_ms: u64, ttl: Duration) -> bool {
    redrive_fields(value)
        .claimed_at_ms
        .is_some_and(|at| now_ms.saturating_sub(at) < ttl.as_millis() as u64)
}

/// Whether a conditional write to a bucket failed because the entry changed
/// since it was read. JetStream says so with error code 10071 or, from newer
/// servers, 10164, which the client names as another error.
fn changed_meanwhile(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision
        || e.to_string().contains("wrong last sequence")
}

/// One partition as this replica sees it.
#[derive(Default)]
struct Slot {
    /// Bumped whenever ownership is taken or lost.
    generation: u8,
    owned: Option<Owned>,
}

/// How a partition's records are read: all of them to the end of the log
/// (a replay, started at that instant), or its messages only, from then on.
#[derive(Clone, Copy)]
enum Reading {
    Replay(Instant),
    Follow,
}

struct Owned {
    state: Partition,
    /// Whether the replay reached the end of the log as it was when it began:
    /// from then on, what each record makes due is queued at once.
    caught_up: bool,
    /// The stream sequence of the last record the follower applied (this
    /// replica's own progress records are applied as they are written).
    applied: u64,
    /// Records applied since the last snapshot (or the replay's start).
    since_snapshot: usize,
    /// When the snapshots still of use were taken (see [`log::expired`]).
    marks: Vec<(u64, u64)>,
    /// Conversations written to the conversations bucket: by key, the user
    /// who wrote last and when it was written.
    remembered: std::collections::HashMap<u128, (String, u64)>,
    /// The lease's revision in the bucket, for the next compare-and-set.
    revision: u64,
    /// When the last renewal was sent that succeeded.
    renewed: Instant,
    follower: tokio::task::AbortHandle,
}

/// The `Nats-Msg-Id` of a caller's message id.
fn dedupe_id(caller_message_id: &str) -> String {
    let digest = sha2::Sha256::digest(caller_message_id.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A dead letter's key in the bucket: its target, partition and place, so
/// that the keys alone give the counts (per replica, of the partitions it
/// delivers) and the order.
fn dead_letter_key(target: Target, partition: u16, place: Place) -> String {
    format!("{}.{partition}.{:016x}", target.as_str(), place.packed())
}

/// (target, partition, place packed) of a dead letter's key.
fn parse_dead_letter_key(key: &str) -> Option<(Target, u16, u64)> {
    let mut parts = key.split('.');
    let target = match parts.next()? {
        "bot" => Target::Bot,
        "response" => Target::Response,
        _ => return None,
    };
    let partition = parts.next()?.parse().ok()?;
    let packed = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((target, partition, packed))
}

fn nats_error<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Nats(format!("{what}: {e}"))
}

impl NatsStore {
    /// A store for the endpoint; nothing is contacted before [`NatsStore::start`].
    pub fn new(
        flags: NatsFlags,
        endpoint_name: &str,
        dedupe_window: Duration,
        conversation_retention: Duration,
    ) -> NatsStore {
        let prefix = flags.prefix(endpoint_name);
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let host = log::prefix_from(&host);
        let replica = format!(
            "{}{}{}",
            host,
            if host.is_empty() { "" } else { "-" },
            &crate::ids::message_id()[..8]
        );
        let (progress_tx, progress_rx) = (0..PARTITIONS)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        NatsStore {
            inner: Arc::new(Inner {
                names: Names::new(&prefix),
                flags,
                replica,
                dedupe_window,
                conversation_retention,
                runtime: tokio::runtime::Handle::current(),
                conn: OnceLock::new(),
                problem: Mutex::new(Some("connecting to NATS".into())),
                connection_error: Arc::default(),
                warned_of_max_payload: AtomicBool::new(false),
                slots: Mutex::new((0..PARTITIONS).map(|_| Slot::default()).collect()),
                queues: OnceLock::new(),
                dead_letters: Mutex::default(),
                writes: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                started: AtomicBool::new(false),
                last_lease_round: Mutex::new(Instant::now()),
                attempts: (0..PARTITIONS).map(|_| Arc::default()).collect(),
                revocations: (0..PARTITIONS)
                    .map(|_| tokio::sync::watch::Sender::new(0))
                    .collect(),
                progress: progress_tx,
                progress_inboxes: Mutex::new(progress_rx),
                progress_in_flight: (0..PARTITIONS).map(|_| AtomicBool::new(false)).collect(),
                applied: (0..PARTITIONS)
                    .map(|_| tokio::sync::Notify::new())
                    .collect(),
            }),
        }
    }

    /// Connects, creates or updates the stream and buckets (again and again
    /// until it works), then takes and renews partition leases; what the
    /// owned partitions hold goes to `queues`.
    pub fn start(&self, queues: Queues) {
        let _ = self.inner.queues.set(queues);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let conn = inner.clone().setup().await;
            let _ = inner.conn.set(conn);
            let inboxes = std::mem::take(
                &mut *inner
                    .progress_inboxes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for (partition, inbox) in (0..PARTITIONS).zip(inboxes) {
                tokio::spawn(inner.clone().write_progress(partition, inbox));
            }
            *inner.problem() = None;
            tokio::spawn(inner.clone().fence_loop());
            inner.lease_loop().await;
        });
    }

    /// This replica's id in the lease bucket.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// The NATS connection, once the store is set up: for the replicas to
    /// tell each other about replies (`crate::turns`).
    pub async fn client(&self) -> async_nats::Client {
        loop {
            if let Some(conn) = self.inner.conn.get() {
                return conn.client.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Inner {
    fn problem(&self) -> MutexGuard<'_, Option<String>> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a lease may go unrenewed before this replica treats it as
    /// lost (another may take it at the TTL): it stops delivering that
    /// partition, and, when no lease round at all succeeded for as long,
    /// says it is not ready.
    fn stale_after(&self) -> Duration {
        self.flags.nats_lease_ttl * 4 / 5
    }

    /// Why the replica is not ready, if it is not: as `unavailable_for`,
    /// and while NATS has not answered a lease round for as long as its
    /// leases are kept without one (a network cut that leaves the connection
    /// open), so that clients are sent to another replica.
    fn unavailable(&self) -> Option<String> {
        self.unavailable_for(false).or_else(|| {
            let since = self
                .last_lease_round
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            (since > self.stale_after()).then(|| {
                format!(
                    "NATS has not answered a lease round for {}s",
                    since.as_secs()
                )
            })
        })
    }

    /// As `unavailable`; with `progress`, for the delivery records of a
    /// partition this replica owns and delivers from, which need not wait
    /// for the other partitions to be taken and replayed (refusing them made
    /// a message delivered meanwhile go again).
    fn unavailable_for(&self, progress: bool) -> Option<String> {
        if let Some(problem) = self.problem().clone() {
            return Some(problem);
        }
        let conn = self.conn.get()?;
        match conn.client.connection_state() {
            async_nats::connection::State::Connected => {}
            state => return Some(format!("NATS connection {state}")),
        }
        (!progress && !self.started.load(Ordering::Relaxed))
            .then(|| "taking partition leases and replaying them".into())
    }

    /// The connection, for a read; an error at once, rather than after the
    /// request's timeout, while it is known to be down.
    fn readable(&self) -> Result<&Conn, StoreError> {
        let conn = self
            .conn
            .get()
            .ok_or_else(|| StoreError::Nats("not connected to NATS".into()))?;
        match conn.client.connection_state() {
            async_nats::connection::State::Connected => Ok(conn),
            state => Err(StoreError::Nats(format!("NATS connection {state}"))),
        }
    }

    fn ready(&self) -> Result<&Conn, CommitError> {
        self.ready_for(false)
    }

    fn ready_for(&self, progress: bool) -> Result<&Conn, CommitError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(CommitError::Closed);
        }
        if let Some(problem) = self.unavailable_for(progress) {
            return Err(CommitError::Store(problem));
        }
        self.conn
            .get()
            .ok_or_else(|| CommitError::Store("not connected to NATS".into()))
    }

    async fn connect(&self) -> Result<async_nats::Client, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("botrelay {}", self.replica))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(ACK_TIMEOUT))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            });
        let seen = self.connection_error.clone();
        options = options.event_callback(move |event| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    async_nats::Event::Connected => *seen = None,
                    async_nats::Event::ServerError(e) => *seen = Some(e.to_string()),
                    async_nats::Event::ClientError(e) => *seen = Some(e.to_string()),
                    _ => {}
                }
            }
        });
        if let Some(path) = &self.flags.nats_credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| format!("--nats-credentials {}: {e}", path.display()))?;
        }
        if let Some(ca) = &self.flags.nats_tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        options
            .connect(self.flags.servers())
            .await
            .map_err(|e| format!("cannot connect to NATS: {e}"))
    }

    /// Creates or updates what the endpoint needs in JetStream; idempotent,
    /// so every replica does it at start. Tries until it works, saying why
    /// not in the log and on `/readyz`.
    async fn setup(self: Arc<Self>) -> Conn {
        let mut client = None;
        // Replicas starting together create the same stream at once, and
        // JetStream then left some of their requests unanswered (three
        // replicas on a fresh cluster: ready after 20 s, one alone: 1.3 s).
        // So the first attempt waits briefly and each next one longer.
        let mut timeout = SETUP_FIRST_TIMEOUT;
        loop {
            let started = Instant::now();
            let attempt = async {
                let client = match &client {
                    Some(client) => Clone::clone(client),
                    None => {
                        let connected = self.connect().await?;
                        client = Some(connected.clone());
                        connected
                    }
                };
                self.create(client, timeout).await
            };
            match attempt.await {
                Ok(conn) => {
                    tracing::info!(
                        stream = %self.names.stream,
                        replicas = self.flags.nats_stream_replicas,
                        replica = %self.replica,
                        "NATS JetStream stream and buckets are ready"
                    );
                    return conn;
                }
                Err(problem) => {
                    let mut current = self.problem();
                    if current.as_deref() != Some(problem.as_str()) {
                        tracing::error!(%problem, "the NATS store is not usable yet; clients get 503 and /readyz fails until it is (retrying every 2s)");
                    }
                    *current = Some(problem);
                }
            }
            timeout = (timeout * 2).min(SETUP_TIMEOUT);
            // An attempt that waited out a timeout goes again at once.
            tokio::time::sleep(SETUP_RETRY.saturating_sub(started.elapsed())).await;
        }
    }

    async fn create(&self, client: async_nats::Client, timeout: Duration) -> Result<Conn, String> {
        // The client connects in the background: give it a moment first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.connection_state() != async_nats::connection::State::Connected
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            let servers = self.flags.servers().join(",");
            let said = self
                .connection_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(match said {
                Some(e) if e.to_lowercase().contains("authorization") => format!(
                    "the NATS servers {servers} refuse the connection: {e} (check --nats-credentials)"
                ),
                Some(e) => format!("cannot connect to the NATS servers {servers}: {e}"),
                None => format!("cannot reach the NATS servers {servers}"),
            });
        }
        let max_payload = client.server_info().max_payload;
        let wanted = crate::delivery::http::MAX_ANSWER_BYTES + RECORD_HEADROOM;
        if max_payload < wanted && !self.warned_of_max_payload.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_payload,
                "the NATS servers take messages of at most {max_payload} bytes (max_payload): a bot's reply larger than that is dropped, and a client's message that is larger stored is refused with 413; set max_payload to 8MB on the servers to store whatever the relay reads"
            );
        }
        // The four at once: each starts a Raft group of its own.
        self.wait_for_jetstream(&client).await?;
        let mut setup = jetstream::new(client.clone());
        setup.set_timeout(timeout);
        let replicas = usize::from(self.flags.nats_stream_replicas);
        self.warn_of_other_settings(&setup).await;
        let bucket = |name: &str, max_age: Duration| kv::Config {
            bucket: name.to_owned(),
            history: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let created_bucket = |name: &str, max_age: Duration| {
            let (setup, name) = (&setup, name.to_owned());
            async move {
                setup
                    .create_or_update_key_value(bucket(&name, max_age))
                    .await
                    .map(drop)
                    .map_err(|e| format!("cannot create or update bucket {name}: {e}"))
            }
        };
        futures::try_join!(
            async {
                setup
                    .create_or_update_stream(stream::Config {
                        name: self.names.stream.clone(),
                        description: Some(
                            "botrelay: the endpoint's messages and delivery progress".into(),
                        ),
                        subjects: vec![format!("{}.>", self.names.subjects)],
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        duplicate_window: self.dedupe_window,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                    .map_err(|e| {
                        format!("cannot create or update stream {}: {e}", self.names.stream)
                    })
            },
            created_bucket(&self.names.leases, self.flags.nats_lease_ttl),
            created_bucket(&self.names.dead_letters, Duration::ZERO),
            created_bucket(&self.names.conversations, self.conversation_retention),
        )?;
        // Opened again with the usual timeout, which their requests keep.
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        let stream = js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| format!("cannot open stream {}: {e}", self.names.stream))?;
        let opened = |name: &str| {
            let (js, name) = (&js, name.to_owned());
            async move {
                js.get_key_value(&name)
                    .await
                    .map_err(|e| format!("cannot open bucket {name}: {e}"))
            }
        };
        let mut control_js = jetstream::new(client.clone());
        control_js.set_timeout(control_timeout(self.flags.nats_lease_ttl));
        let control = control_js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| format!("cannot open stream {}: {e}", self.names.stream))?;
        let leases = control_js
            .get_key_value(&self.names.leases)
            .await
            .map_err(|e| format!("cannot open bucket {}: {e}", self.names.leases))?;
        let (dead, conversations) = futures::try_join!(
            opened(&self.names.dead_letters),
            opened(&self.names.conversations),
        )?;
        Ok(Conn {
            client,
            js,
            stream,
            control,
            leases,
            dead,
            conversations,
        })
    }

    /// Waits, up to `SETUP_TIMEOUT`, for JetStream to answer: a cluster that
    /// has just formed has no metadata leader yet, and the requests made
    /// meanwhile go unanswered until they time out.
    async fn wait_for_jetstream(&self, client: &async_nats::Client) -> Result<(), String> {
        let mut probe = jetstream::new(client.clone());
        probe.set_timeout(Duration::from_secs(1));
        let deadline = Instant::now() + SETUP_TIMEOUT;
        loop {
            let asked = Instant::now();
            match probe.query_account().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("JetStream does not answer: {e}"));
                }
                Err(_) => {
                    // An error at once (no responders yet) is not retried in a tight loop.
                    let pause = Duration::from_millis(200).saturating_sub(asked.elapsed());
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Says so when the endpoint's stream or buckets were set up with other
    /// settings than this replica's flags: all replicas share them, and this
    /// one is about to set its own (the last replica started wins). Replicas
    /// started with different flags disagree, e.g. on how long a lease lasts.
    async fn warn_of_other_settings(&self, js: &jetstream::Context) {
        let mut differences = Vec::new();
        if let Ok(mut stream) = js.get_stream(&self.names.stream).await
            && let Ok(info) = stream.info().await
        {
            let config = &info.config;
            if config.num_replicas != usize::from(self.flags.nats_stream_replicas) {
                differences.push(format!(
                    "--nats-stream-replicas {} (the stream has {})",
                    self.flags.nats_stream_replicas, config.num_replicas
                ));
            }
            if config.duplicate_window != self.dedupe_window {
                differences.push(format!(
                    "--dedupe-window {} (the stream has {})",
                    humantime::format_duration(self.dedupe_window),
                    humantime::format_duration(config.duplicate_window)
                ));
            }
        }
        let buckets = [
            (
                &self.names.leases,
                self.flags.nats_lease_ttl,
                "--nats-lease-ttl",
            ),
            (
                &self.names.conversations,
                self.conversation_retention,
                "--conversation-retention",
            ),
        ];
        for (bucket, wanted, flag) in buckets {
            if let Ok(store) = js.get_key_value(bucket.as_str()).await
                && let Ok(status) = store.status().await
                && status.max_age() != wanted
            {
                differences.push(format!(
                    "{flag} {} (bucket {bucket} has {})",
                    humantime::format_duration(wanted),
                    humantime::format_duration(status.max_age())
                ));
            }
        }
        if !differences.is_empty() {
            tracing::warn!(
                stream = %self.names.stream,
                differences = %differences.join("; "),
                "this replica's flags differ from the settings the endpoint's other replicas made; it sets its own, which the others then share: start every replica with the same flags"
            );
        }
    }

    /// Publishes a record and waits until JetStream has it (a quorum of
    /// servers stored it).
    async fn append(
        &self,
        conn: &Conn,
        subject: String,
        record: &Record,
        msg_id: Option<&str>,
    ) -> Result<jetstream::publish::PublishAck, CommitError> {
        let payload = bytes::Bytes::from(record.encode());
        let max_payload = conn.client.server_info().max_payload;
        // The headers (message id, expected stream) and subject take up to
        // about 256 bytes more.
        if max_payload > 0 && payload.len() + 256 > max_payload {
            return Err(CommitError::TooLarge(format!(
                "the message takes up to {} bytes stored, with its headers, and the NATS servers take at most {max_payload} in one message (their max_payload)",
                payload.len() + 256
            )));
        }
        // Retried until the deadline: while JetStream elects a new stream
        // leader (a server died), publishes fail for a moment. A retry that
        // follows a write which did land is harmless: the records that add
        // a message carry a message id (the server drops the second), and
        // the others are idempotent when applied.
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        loop {
            let publish = async {
                let ack = match msg_id {
                    Some(id) => {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", id);
                        conn.js
                            .publish_with_headers(subject.clone(), headers, payload.clone())
                            .await
                    }
                    None => conn.js.publish(subject.clone(), payload.clone()).await,
                }
                .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            let problem = match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => return Ok(ack),
                Ok(Err(e)) => e,
                Err(_) => "NATS did not acknowledge the write in time".into(),
            };
            let retry_at = tokio::time::Instant::now() + Duration::from_millis(50);
            if retry_at >= deadline || self.closed.load(Ordering::Relaxed) {
                return Err(CommitError::Store(format!("NATS: {problem}")));
            }
            tokio::time::sleep_until(retry_at).await;
        }
    }

    async fn commit(self: Arc<Self>, op: Op, bounded: bool) -> Result<Outcome, CommitError> {
        match op {
            // JetStream forgets message ids past the stream's duplicate window
            // by itself, and conversations are read from the stream.
            Op::PruneDedupe { .. } => return Ok(Outcome::Pruned(0)),
            Op::ForgetConversations { .. } => return Ok(Outcome::Done),
            _ => {}
        }
        let progress = matches!(op, Op::CompleteInbound { .. } | Op::CompleteOutbound { .. });
        let conn = self.ready_for(progress)?;
        let writes = self.writes.fetch_add(1, Ordering::Relaxed);
        struct Release<'a>(&'a AtomicUsize);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _release = Release(&self.writes);
        if bounded && writes >= MAX_WRITES {
            return Err(CommitError::Busy);
        }
        match op {
            Op::Accept { message, .. } => self.accept(conn, message).await,
            Op::AddOutbound { message } => {
                let subject = self.names.conversation(&message.conversation_id);
                let pending = message.pending(0);
                let msg_id = format!("o-{}", message.id);
                let record = Record::AddOutbound { message };
                let ack = self.append(conn, subject, &record, Some(&msg_id)).await?;
                self.queued_through(log::partition_of(&pending.conversation_id), ack.sequence)
                    .await;
                Ok(Outcome::Queued(vec![pending]))
            }
            Op::CompleteInbound { seq, replies } => {
                let handle = Handle::of(seq);
                let replies = self.fit(conn, &handle, replies).await?;
                let record = Record::Delivered {
                    place: handle.place,
                    replies,
                };
                // Its replies are queued once it is written (`applied_own`).
                self.progress(handle.partition, record).await?;
                Ok(Outcome::Queued(Vec::new()))
            }
            Op::CompleteOutbound { seq } => {
                let handle = Handle::of(seq);
                let record = Record::Sent {
                    place: handle.place,
                };
                self.progress(handle.partition, record).await?;
                Ok(Outcome::Done)
            }
            Op::DeadLetter {
                target,
                seq,
                reason,
                now_ms,
            } => self.dead_letter(conn, target, seq, reason, now_ms).await,
            Op::Redrive { seqs, now_ms } => self.redrive(conn, seqs, now_ms).await,
            Op::Discard { seqs } => {
                let letters = self.chosen(conn, seqs.as_deref()).await?;
                let mut discarded = 0;
                for Chosen {
                    key,
                    target,
                    revision,
                    letter,
                    ..
                } in letters
                {
                    // Only if it is still the entry read: of several discards
                    // at once, one counts it, and a redrive that claimed it
                    // meanwhile keeps it.
                    match conn.dead.delete_expect_revision(&key, Some(revision)).await {
                        Ok(()) => {}
                        Err(e) if changed_meanwhile(&e) => continue,
                        Err(e) => return Err(store_failed(e)),
                    }
                    self.count_dead_letter(target, log::partition_of(&letter.conversation_id), -1);
                    discarded += 1;
                }
                Ok(Outcome::Discarded(discarded))
            }
            Op::PruneDedupe { .. } | Op::ForgetConversations { .. } => {
                unreachable!("answered above")
            }
        }
    }

    async fn accept(&self, conn: &Conn, message: InboundMessage) -> Result<Outcome, CommitError> {
        let subject = self.names.conversation(&message.conversation_id);
        let msg_id = dedupe_id(&message.caller_message_id);
        let (id, pending) = (message.id.clone(), message.pending(0));
        let ack = self
            .append(conn, subject, &Record::Accept { message }, Some(&msg_id))
            .await?;
        if !ack.duplicate {
            self.queued_through(log::partition_of(&pending.conversation_id), ack.sequence)
                .await;
            return Ok(Outcome::Accepted { id, pending });
        }
        // The first message with this id, read back: its answer is the first answer.
        let first = conn
            .stream
            .get_raw_message(ack.sequence)
            .await
            .map_err(|e| CommitError::Store(format!("NATS: reading the first message: {e}")))?;
        match Record::decode(&first.payload) {
            Ok(Record::Accept { message }) => Ok(Outcome::Duplicate {
                answer: crate::wire::accept_answer(&message),
            }),
            Ok(_) | Err(_) => Err(CommitError::Store(format!(
                "NATS: record {} is not the accepted message it should be",
                ack.sequence
            ))),
        }
    }

    /// The replies that go in the delivery record itself: all of them,
    /// unless that would make it larger than the NATS servers take in one
    /// message (`max_payload`, 1 MiB by default, where a bot's answer may
    /// be 4 MiB). Then each goes first in a record of its own, as a message
    /// the bot posts does, with an id that makes writing it again (after a
    /// takeover) a no-op; one that does not fit even alone is dropped, and
    /// said so. Without this, the delivery record could never be written and
    /// the message went to the bot again and again.
    async fn fit(
        &self,
        conn: &Conn,
        handle: &Handle,
        replies: Vec<OutboundMessage>,
    ) -> Result<Vec<OutboundMessage>, CommitError> {
        let max_payload = conn.client.server_info().max_payload;
        let limit = max_payload.saturating_sub(RECORD_HEADROOM);
        if max_payload == 0 || replies.iter().map(reply_bytes).sum::<usize>() <= limit {
            return Ok(replies);
        }
        let (partition, place) = (handle.partition, handle.place);
        let mut last = None;
        for (i, message) in replies.into_iter().enumerate() {
            let subject = self.names.conversation(&message.conversation_id);
            let msg_id = format!("s-{partition}-{}-{}-{i}", place.record, place.index);
            let record = Record::AddOutbound { message };
            match self.append(conn, subject, &record, Some(&msg_id)).await {
                Ok(ack) => last = Some(ack.sequence),
                Err(CommitError::TooLarge(problem)) => {
                    let Record::AddOutbound { message } = &record else {
                        unreachable!("made above")
                    };
                    tracing::error!(
                        conversation_id = %message.conversation_id,
                        reply = i,
                        %problem,
                        "a reply of the bot is too large to store in NATS; it is dropped (raise the servers' max_payload to 8 MiB to take any answer the relay reads)"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(seq) = last {
            self.queued_through(partition, seq).await;
        }
        Ok(Vec::new())
    }

    /// The first message published with this caller id within the stream's
    /// duplicate window, found without storing anything: a publish with the
    /// id, on a subject that never holds a record, expecting a last sequence
    /// it cannot have. JetStream answers a duplicate with the first one's
    /// sequence before it checks the expectation; anything else is refused
    /// by the expectation, and nothing is stored.
    async fn probe(&self, caller_message_id: &str) -> Result<Option<InboundMessage>, StoreError> {
        let conn = self.ready().map_err(|e| StoreError::Nats(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", dedupe_id(caller_message_id).as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            u64::MAX.to_string().as_str(),
        );
        let subject = format!("{}.probe", self.names.subjects);
        let asked = async {
            conn.js
                .publish_with_headers(subject, headers, bytes::Bytes::new())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        let ack = match tokio::time::timeout(ACK_TIMEOUT, asked).await {
            Ok(Ok(ack)) if ack.duplicate => ack,
            Ok(Ok(ack)) => {
                tracing::error!(
                    seq = ack.sequence,
                    "a dedupe probe was stored; it is ignored"
                );
                return Ok(None);
            }
            // Refused by the expectation: not a duplicate.
            Ok(Err(_)) => return Ok(None),
            Err(_) => return Err(StoreError::Nats("no answer from NATS in time".into())),
        };
        let first = conn
            .stream
            .get_raw_message(ack.sequence)
            .await
            .map_err(nats_error("reading the first message"))?;
        match Record::decode(&first.payload) {
            Ok(Record::Accept { message }) => Ok(Some(message)),
            _ => Ok(None),
        }
    }

    async fn dead_letter(
        &self,
        conn: &Conn,
        target: Target,
        seq: Seq,
        reason: String,
        now_ms: u64,
    ) -> Result<Outcome, CommitError> {
        let handle = Handle::of(seq);
        let json = {
            let slots = self.slots();
            let Some(owned) = &slots[usize::from(handle.partition)].owned else {
                return Ok(Outcome::Missing);
            };
            match target {
                Target::Bot => owned
                    .state
                    .inbound
                    .get(&handle.place)
                    .map(|m| (m.id.clone(), m.conversation_id.clone(), encode(m))),
                Target::Response => owned
                    .state
                    .outbound
                    .get(&handle.place)
                    .map(|m| (m.id.clone(), m.conversation_id.clone(), encode(m))),
            }
        };
        let Some((message_id, conversation_id, json)) = json else {
            return Ok(Outcome::Missing);
        };
        let letter = DeadLetter {
            seq: handle.place.packed(),
            target,
            reason,
            dead_at_ms: now_ms,
            message_id,
            conversation_id,
            message: serde_json::value::RawValue::from_string(json).expect("JSON"),
        };
        // Kept first, then taken out of the queue: a crash between the two
        // delivers it again rather than losing it.
        conn.dead
            .put(
                dead_letter_key(target, handle.partition, handle.place),
                serde_json::to_vec(&letter).expect("JSON").into(),
            )
            .await
            .map_err(store_failed)?;
        self.count_dead_letter(target, handle.partition, 1);
        let record = Record::DeadLettered {
            target,
            place: handle.place,
        };
        self.progress(handle.partition, record).await?;
        Ok(Outcome::Done)
    }

    /// Writes a progress record of `partition` with the others made
    /// meanwhile, in the order made; returns the sequence it went out in.
    async fn progress(&self, partition: u16, record: Record) -> Result<u64, CommitError> {
        let (progress, written) = Progress::new(record);
        self.progress[usize::from(partition)]
            .send(progress)
            .map_err(|_| CommitError::Closed)?;
        written.await.map_err(|_| CommitError::Closed)?
    }

    /// The writer of one partition's progress: each record batch is written
    /// once the last one was acknowledged, with what came meanwhile, and is
    /// applied here as soon as it is acknowledged. The owner never reads its
    /// own progress back from the stream (its follower reads only the
    /// partition's messages): only a replay does.
    async fn write_progress(
        self: Arc<Self>,
        partition: u16,
        mut inbox: tokio::sync::mpsc::UnboundedReceiver<Progress>,
    ) {
        let conn = self.conn.get().expect("set up").clone();
        let subject = self.names.progress(partition);
        let in_flight = &self.progress_in_flight[usize::from(partition)];
        let mut next: Option<Progress> = None;
        loop {
            let first = match next.take() {
                Some(first) => first,
                None => match inbox.recv().await {
                    Some(first) => first,
                    None => return,
                },
            };
            let (mut replies, mut bytes) = (first.replies, first.bytes);
            let mut batch = vec![first];
            while batch.len() < BATCH_RECORDS {
                let Ok(more) = inbox.try_recv() else {
                    break;
                };
                if replies + more.replies > log::MAX_REPLIES || bytes + more.bytes > BATCH_BYTES {
                    next = Some(more);
                    break;
                }
                replies += more.replies;
                bytes += more.bytes;
                batch.push(more);
            }
            let mut waiting = Vec::with_capacity(batch.len());
            let mut records = Vec::with_capacity(batch.len());
            for progress in batch {
                records.push(progress.record);
                waiting.push(progress.written);
            }
            let record = match records.len() {
                1 => records.pop().expect("one"),
                _ => Record::Progress { records },
            };
            in_flight.store(true, Ordering::SeqCst);
            let written = self
                .append(&conn, subject.clone(), &record, None)
                .await
                .map(|ack| ack.sequence);
            if let Ok(seq) = written {
                self.applied_own(partition, seq, record);
            }
            in_flight.store(false, Ordering::SeqCst);
            for wait in waiting {
                let _ = wait.send(written.clone());
            }
        }
    }

    /// Applies a progress record this replica wrote, at `seq`, to the
    /// partition's state, and queues the replies it made due: before the
    /// commit that asked for it returns, as the other stores have them queued.
    /// Whatever generation wrote it: a record in the stream is applied by
    /// every replay, whoever wrote it, and applying one twice changes
    /// nothing. While the partition replays, what it makes due is queued
    /// with the rest at the end of the replay.
    fn applied_own(self: &Arc<Self>, partition: u16, seq: u64, record: Record) {
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        let generation = slot.generation;
        let Some(owned) = &mut slot.owned else {
            return;
        };
        let due = owned.state.apply(seq, record);
        owned.since_snapshot += 1;
        if owned.caught_up {
            self.queue(partition, generation, &owned.state, &due);
            // Nothing of this partition's progress is in flight now.
            self.snapshot_if_due(partition, owned);
        }
    }

    /// How long a redrive's claim keeps a dead letter: at least three lease
    /// TTLs, so that if the redrive dies after sending the letter back, the
    /// partition's next owner has taken the letter out of the list (as it
    /// applies the record) before a discard could take it.
    fn claim_ttl(&self) -> Duration {
        self.flags
            .nats_redrive_claim_ttl
            .max(self.flags.nats_lease_ttl * 3)
    }

    /// The dead letters named by `seqs` (their places), or all of them,
    /// that no redrive under way has claimed.
    async fn chosen(&self, conn: &Conn, seqs: Option<&[Seq]>) -> Result<Vec<Chosen>, CommitError> {
        let keys = self.dead_letter_keys(conn).await.map_err(store_failed)?;
        let now_ms = now_ms();
        let mut chosen = Vec::new();
        for (key, target, packed) in keys {
            if seqs.is_some_and(|seqs| !seqs.contains(&packed)) {
                continue;
            }
            let Some(entry) = conn.dead.entry(&key).await.map_err(store_failed)? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue; // deleted meanwhile
            }
            if claimed(&entry.value, now_ms, self.claim_ttl()) {
                continue; // being redriven by another request
            }
            let letter: DeadLetter = serde_json::from_slice(&entry.value)
                .map_err(|e| CommitError::Store(format!("dead letter {key}: {e}")))?;
            chosen.push(Chosen {
                key,
                target,
                revision: entry.revision,
                letter,
                value: entry.value,
            });
        }
        Ok(chosen)
    }

    async fn redrive(
        &self,
        conn: &Conn,
        seqs: Option<Vec<Seq>>,
        now_ms: u64,
    ) -> Result<Outcome, CommitError> {
        let letters = self.chosen(conn, seqs.as_deref()).await?;
        let mut due = Vec::new();
        for Chosen {
            key,
            target,
            revision,
            letter,
            value,
        } in letters
        {
            let corrupt =
                |e: serde_json::Error| CommitError::Store(format!("dead letter {key}: {e}"));
            let (subject, record, pending) = match target {
                Target::Bot => {
                    let mut message: InboundMessage =
                        serde_json::from_str(letter.message.get()).map_err(corrupt)?;
                    message.queued_at_ms = now_ms;
                    let pending = message.pending(0);
                    (
                        self.names.conversation(&message.conversation_id),
                        Record::RedrivenInbound {
                            message,
                            letter: Some(key.clone()),
                        },
                        pending,
                    )
                }
                Target::Response => {
                    let mut message: OutboundMessage =
                        serde_json::from_str(letter.message.get()).map_err(corrupt)?;
                    message.queued_at_ms = now_ms;
                    let pending = message.pending(0);
                    (
                        self.names.conversation(&message.conversation_id),
                        Record::RedrivenOutbound {
                            message,
                            letter: Some(key.clone()),
                        },
                        pending,
                    )
                }
            };
            // Claimed first, if it is still the entry read: of a redrive
            // and a discard, or of several redrives, at once, one takes it.
            // The claim keeps the letter in the entry: a redrive that dies
            // before it is done leaves a dead letter, never loses one.
            let of = redrive_of(&value, revision);
            let claim = with_claim(&value, Some(now_ms), of).map_err(corrupt)?;
            let claimed = match conn.dead.update(&key, claim, revision).await {
                Ok(claimed) => claimed,
                Err(e) if changed_meanwhile(&e) => continue,
                Err(e) => return Err(store_failed(e)),
            };
            // Queued, then let go of. The record's id is the same for every
            // redrive of this death of the message: one sent again, by this
            // redrive or by the next after this one died before the delete
            // below, is kept once (within the stream's duplicate window).
            let msg_id = format!("r-{key}-{of}");
            let ack = match self.append(conn, subject, &record, Some(&msg_id)).await {
                Ok(ack) => ack,
                Err(e) => {
                    // Given back at once rather than after the claim's TTL, if it can be.
                    if let Ok(unclaimed) = with_claim(&value, None, of) {
                        let _ = conn.dead.update(&key, unclaimed, claimed).await;
                    }
                    return Err(e);
                }
            };
            if self.flags.nats_exit_mid_redrive {
                tracing::warn!(key = %key, "--nats-exit-mid-redrive: exiting with the letter sent back and still listed");
                std::process::exit(137);
            }
            // The partition's owner may have taken it out already, as it
            // applied the record (it then counted it out).
            match conn.dead.delete_expect_revision(&key, Some(claimed)).await {
                Ok(()) => {
                    let partition = log::partition_of(&letter.conversation_id);
                    self.count_dead_letter(target, partition, -1);
                }
                Err(e) if changed_meanwhile(&e) => {}
                Err(e) => return Err(store_failed(e)),
            }
            if ack.duplicate {
                // Sent back already, by a redrive that died before it could
                // take the letter out of the list.
                tracing::info!(key = %key, "a dead letter already sent back by an earlier redrive is taken out of the list");
                continue;
            }
            due.push(pending);
        }
        Ok(Outcome::Queued(due))
    }

    /// (key, target, place packed) of every dead letter, in stream order.
    async fn dead_letter_keys(&self, conn: &Conn) -> Result<Vec<(String, Target, u64)>, String> {
        let keys: Vec<String> = match conn.dead.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        let mut parsed: Vec<_> = keys
            .into_iter()
            .filter_map(|key| {
                let (target, _, packed) = parse_dead_letter_key(&key)?;
                Some((key, target, packed))
            })
            .collect();
        parsed.sort_by_key(|(_, _, packed)| *packed);
        Ok(parsed)
    }

    /// Counts a dead letter in or out of `botrelay_dead_letters`, when this
    /// replica delivers its partition: so that the replicas' gauges add up
    /// to the endpoint's dead letters.
    fn count_dead_letter(&self, target: Target, partition: u16, n: i64) {
        if self.slots()[usize::from(partition)].owned.is_none() {
            return;
        }
        let mut counts = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match target {
            Target::Bot => &mut counts.bot,
            Target::Response => &mut counts.response,
        };
        *slot = slot.saturating_add_signed(n);
    }

    async fn refresh_dead_letter_counts(&self, conn: &Conn) {
        if let Ok(keys) = self.dead_letter_keys(conn).await {
            let owned: Vec<bool> = self.slots().iter().map(|s| s.owned.is_some()).collect();
            let mut counts = DeadLetterCounts::default();
            for (key, target, _) in keys {
                let partition = parse_dead_letter_key(&key).map_or(0, |(_, p, _)| p);
                if !owned[usize::from(partition)] {
                    continue;
                }
                match target {
                    Target::Bot => counts.bot += 1,
                    Target::Response => counts.response += 1,
                }
            }
            *self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        }
    }

    /// Takes, renews and gives back partition leases, every fifth of the TTL,
    /// until the relay stops.
    async fn lease_loop(self: Arc<Self>) {
        let conn = self.conn.get().expect("set up").clone();
        let ttl = self.flags.nats_lease_ttl;
        let mut tick = tokio::time::interval(ttl / 5);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut order: Vec<u16> = Vec::new();
        let mut disconnected = false;
        loop {
            tick.tick().await;
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            // A replica that cannot reach NATS can record no progress:
            // it stops delivering at once; its leases run out meanwhile.
            // (After a whole period: the client moves to another server
            // within milliseconds when one dies.)
            if conn.client.connection_state() != async_nats::connection::State::Connected {
                if disconnected {
                    if !order.is_empty() {
                        tracing::warn!(
                            "lost the connection to NATS: deliveries pause until it is back"
                        );
                    }
                    for partition in std::mem::take(&mut order) {
                        self.let_go(partition);
                    }
                }
                disconnected = true;
                continue;
            }
            disconnected = false;
            let balanced = self.balance(&conn, &mut order, ttl).await;
            if balanced.is_ok() {
                *self
                    .last_lease_round
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
            if let Err(e) = balanced {
                tracing::warn!(error = %e, "could not renew or take partition leases");
            } else if !self.started.load(Ordering::Relaxed) {
                self.wait_for_replays(&order).await;
                self.started.store(true, Ordering::Relaxed);
            }
            // Whatever could not be renewed for most of the TTL may be
            // someone else's by now. (What is no longer owned, given up by
            // the fence loop or a stopped reader, just leaves the order.)
            let stale: Vec<u16> = {
                let slots = self.slots();
                order.retain(|&p| slots[usize::from(p)].owned.is_some());
                order
                    .iter()
                    .copied()
                    .filter(|&p| {
                        slots[usize::from(p)]
                            .owned
                            .as_ref()
                            .is_some_and(|o| o.renewed.elapsed() > self.stale_after())
                    })
                    .collect()
            };
            for partition in stale {
                tracing::warn!(
                    partition,
                    "partition lease not renewed in time; giving it up"
                );
                order.retain(|&p| p != partition);
                self.let_go(partition);
            }
            self.refresh_dead_letter_counts(&conn).await;
        }
    }

    /// Gives up, every tenth of the TTL, each partition whose lease was not
    /// renewed for most of the TTL, whatever the lease round is doing: one
    /// waiting on a NATS connection that went quiet (a network cut rather
    /// than a closed socket) takes up to a timeout per request, and the lease
    /// may be someone else's well before it gives up.
    async fn fence_loop(self: Arc<Self>) {
        let ttl = self.flags.nats_lease_ttl;
        let mut tick = tokio::time::interval(ttl / 10);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.closed.load(Ordering::Relaxed) {
            tick.tick().await;
            let stale: Vec<u16> = self
                .slots()
                .iter()
                .enumerate()
                .filter(|(_, slot)| {
                    slot.owned
                        .as_ref()
                        .is_some_and(|o| o.renewed.elapsed() > self.stale_after())
                })
                .map(|(p, _)| p as u16)
                .collect();
            for partition in stale {
                tracing::warn!(
                    partition,
                    "partition lease not renewed in time; giving it up"
                );
                self.let_go(partition);
            }
        }
    }

    async fn balance(
        self: &Arc<Self>,
        conn: &Conn,
        order: &mut Vec<u16>,
        ttl: Duration,
    ) -> Result<(), String> {
        let id = bytes::Bytes::from(self.replica.clone());
        conn.leases
            .put(replica_key(&self.replica), id.clone())
            .await
            .map_err(|e| e.to_string())?;
        // Renew what this replica holds.
        for &partition in order.iter() {
            let revision = match &self.slots()[usize::from(partition)].owned {
                Some(owned) => owned.revision,
                None => continue,
            };
            let sent = Instant::now();
            match conn
                .leases
                .update(partition_key(partition), id.clone(), revision)
                .await
            {
                Ok(revision) => {
                    let renewed = match &mut self.slots()[usize::from(partition)].owned {
                        Some(owned) => {
                            owned.revision = revision;
                            owned.renewed = sent;
                            true
                        }
                        None => false,
                    };
                    if !renewed {
                        // Its reader stopped while the renewal was on its way,
                        // and the stop's delete came too early: the renewal
                        // wrote a lease that nobody here follows. Let go of it.
                        self.delete_lease(partition, revision).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "lost the lease of a partition");
                    self.revoke(partition);
                }
            }
        }
        order.retain(|&p| self.slots()[usize::from(p)].owned.is_some());

        let keys: Vec<String> = conn
            .leases
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let live = keys.iter().filter(|k| k.starts_with("replica.")).count();
        let (give_back, take) = leases::rebalance(order, leases::share(live));
        for partition in give_back {
            tracing::info!(
                partition,
                live,
                "giving a partition back to even out the replicas"
            );
            order.retain(|&p| p != partition);
            if let Some(revision) = self.release(partition) {
                tokio::spawn(self.clone().hand_back(partition, revision));
            }
        }
        let mut wanted = take;
        for partition in leases::preference(&self.replica) {
            if wanted == 0 {
                break;
            }
            if order.contains(&partition) {
                continue;
            }
            let key = partition_key(partition);
            let sent = Instant::now();
            let taken = if keys.contains(&key) {
                // Still this replica's lease (its follower stopped, or NATS
                // was briefly away): take it back rather than wait for it to
                // expire.
                match conn.leases.entry(key.clone()).await {
                    Ok(Some(entry)) if entry.value == id => conn
                        .leases
                        .update(&key, id.clone(), entry.revision)
                        .await
                        .ok(),
                    _ => None,
                }
            } else {
                conn.leases.create(&key, id.clone()).await.ok()
            };
            let Some(revision) = taken else {
                continue;
            };
            if sent.elapsed() > ttl / 2 {
                // Too slow to be sure of it: let go of it; taken next round,
                // by this replica or another.
                self.delete_lease(partition, revision).await;
                continue;
            }
            self.acquire(partition, revision, sent);
            order.push(partition);
            wanted -= 1;
        }
        Ok(())
    }

    /// Lets go of the lease of a partition this replica gave back, once the
    /// delivery attempts it had under way have ended (no new ones start: it
    /// was released), renewing the lease meanwhile: the replica that takes
    /// it next would otherwise send a message that is still on its way to
    /// the bot again, at the same time. A partition whose attempts outlast
    /// `HAND_BACK_WAIT` is let go of then.
    async fn hand_back(self: Arc<Self>, partition: u16, mut revision: u64) {
        let conn = self.conn.get().expect("set up").clone();
        let key = partition_key(partition);
        let id = bytes::Bytes::from(self.replica.clone());
        let started = Instant::now();
        let mut renewed = started;
        let attempts = &self.attempts[usize::from(partition)];
        while attempts.load(Ordering::SeqCst) > 0 && started.elapsed() < HAND_BACK_WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if renewed.elapsed() > self.flags.nats_lease_ttl / 5 {
                renewed = Instant::now();
                match conn.leases.update(&key, id.clone(), revision).await {
                    Ok(next) => revision = next,
                    Err(_) => return, // no longer this replica's
                }
            }
        }
        let _ = conn
            .leases
            .delete_expect_revision(&key, Some(revision))
            .await;
    }

    /// Waits (a TTL at most) until the partitions in `order` are replayed.
    async fn wait_for_replays(&self, order: &[u16]) {
        let deadline = Instant::now() + self.flags.nats_lease_ttl;
        while Instant::now() < deadline {
            let replaying = {
                let slots = self.slots();
                order.iter().any(|&p| {
                    slots[usize::from(p)]
                        .owned
                        .as_ref()
                        .is_some_and(|o| !o.caught_up)
                })
            };
            if !replaying {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts delivering a partition: replays its log, then follows it.
    fn acquire(self: &Arc<Self>, partition: u16, revision: u64, renewed: Instant) {
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        slot.generation = log::next_generation(slot.generation);
        let generation = slot.generation;
        let follower = tokio::spawn(self.clone().follow(partition, generation)).abort_handle();
        slot.owned = Some(Owned {
            state: Partition::default(),
            caught_up: false,
            applied: 0,
            since_snapshot: 0,
            marks: Vec::new(),
            remembered: Default::default(),
            revision,
            renewed,
            follower,
        });
        tracing::info!(partition, replica = %self.replica, "took a partition: replaying its log");
    }

    /// Gives a partition up without waiting for its deliveries under way,
    /// as when its lease is lost or may be another replica's soon: that
    /// replica sends the same messages again, so the attempts under way here
    /// are cut short (`Store::revoked`) rather than left to go on beside its
    /// own, for as long as a slow target takes.
    fn revoke(&self, partition: u16) {
        if self.release(partition).is_some() {
            self.cut_short(partition);
        }
    }

    /// `revoke`, and the lease deleted, if it is still at this replica's
    /// revision, so that any replica may take the partition at its next
    /// round rather than wait for the lease to run out. A delete that cannot
    /// reach NATS changes nothing: the lease runs out as before.
    fn let_go(self: &Arc<Self>, partition: u16) {
        let Some(revision) = self.release(partition) else {
            return;
        };
        self.cut_short(partition);
        let inner = self.clone();
        tokio::spawn(async move { inner.delete_lease(partition, revision).await });
    }

    async fn delete_lease(&self, partition: u16, revision: u64) {
        if let Some(conn) = self.conn.get() {
            let _ = conn
                .leases
                .delete_expect_revision(partition_key(partition), Some(revision))
                .await;
        }
    }

    /// Cuts short the deliveries under way of a partition given up.
    fn cut_short(&self, partition: u16) {
        let under_way = self.attempts[usize::from(partition)].load(Ordering::SeqCst);
        if under_way > 0 {
            // Some may have had their answer already and wait to record it:
            // those end as "delivered but could not record it" instead.
            tracing::warn!(
                partition,
                under_way,
                "giving up a partition with deliveries under way: those still waiting for their target are cut short; its next owner sends them all again"
            );
        }
        self.revocations[usize::from(partition)].send_modify(|n| *n += 1);
    }

    /// Stops delivering a partition; returns the lease's last revision if it
    /// was held. Its waiting messages leave the schedulers (they are another
    /// replica's to deliver now, and would count as waiting here too); all
    /// were queued under the slot's lock, so before this.
    fn release(&self, partition: u16) -> Option<u64> {
        let (revision, follower) = self.give_up(partition, None)?;
        follower.abort();
        Some(revision)
    }

    /// What `release` and a follower that fails share: the partition's
    /// generation moves on (what it queued leaves the schedulers), and it is
    /// no longer owned. With `generation`, only if it is still held as that
    /// (a follower's own; a release meanwhile moved it on). Returns the
    /// lease's last revision and the follower's task, if it was owned.
    fn give_up(
        &self,
        partition: u16,
        generation: Option<u8>,
    ) -> Option<(u64, tokio::task::AbortHandle)> {
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        match generation {
            Some(generation) if generation != slot.generation => return None,
            None if slot.owned.is_none() => return None,
            _ => {}
        }
        let held = slot.generation;
        slot.generation = log::next_generation(held);
        let owned = slot.owned.take()?;
        self.forget_queued(partition, held);
        Some((owned.revision, owned.follower))
    }

    /// Drops from the schedulers the messages of `partition` queued while
    /// it was held as `generation`.
    fn forget_queued(&self, partition: u16, generation: u8) {
        if let Some(queues) = self.queues.get() {
            queues.forget(move |seq| {
                let handle = Handle::of(seq);
                handle.partition == partition && handle.generation == generation
            });
        }
    }

    /// Replays a partition's records into its state, then follows new ones,
    /// queueing what becomes due.
    async fn follow(self: Arc<Self>, partition: u16, generation: u8) {
        let conn = self.conn.get().expect("set up").clone();
        let started = Instant::now();
        let result: Result<(), String> = async {
            let start = self.restore(&conn, partition, generation).await?;
            // The replay: every record of the partition, to the end of the log.
            let Some(next) = self
                .read(
                    &conn,
                    partition,
                    generation,
                    start,
                    Reading::Replay(started),
                )
                .await?
            else {
                return Ok(());
            };
            // Then only its messages: this replica applies its own progress
            // as it writes it, and nobody else writes any while it holds the
            // lease.
            self.read(&conn, partition, generation, next, Reading::Follow)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(partition, error = %e, "stopped following a partition; it is taken again when NATS allows");
            // Given up here, unless released meanwhile; the lease loop sees
            // it no longer owned. This task is the follower: it goes on, to
            // delete the lease.
            let Some((revision, _this_task)) = self.give_up(partition, Some(generation)) else {
                return;
            };
            self.cut_short(partition);
            // And its lease let go of (as `let_go`): any replica may take the
            // partition at its next round (this one too, within its share),
            // rather than wait for the lease to run out. A replica over its
            // share after a takeover that failed (NATS electing its leaders)
            // held such partitions, undelivered, for a whole TTL.
            self.delete_lease(partition, revision).await;
        }
    }

    /// Applies the partition's records from `start` on: for a replay, all of
    /// them until the end of the log, then returns the sequence after the
    /// last one read; to follow, its messages, as long as the partition is
    /// owned. `None` once it no longer is.
    async fn read(
        self: &Arc<Self>,
        conn: &Conn,
        partition: u16,
        generation: u8,
        start: u64,
        reading: Reading,
    ) -> Result<Option<u64>, String> {
        let filter_subject = match reading {
            Reading::Replay(_) => self.names.partition(partition),
            Reading::Follow => self.names.messages(partition),
        };
        let consumer = conn
            .control
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                // Its pull requests last this long, with a heartbeat every
                // half of it: two missed heartbeats (the server holding the
                // reader died) and the reader is made again elsewhere. The
                // client's default, 30 s, stalled the partition as long.
                max_expires: READER_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Reading::Replay(started) = reading
            && consumer.cached_info().num_pending == 0
        {
            self.caught_up(partition, generation, started);
            return Ok(Some(start));
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let info = message.info().map_err(|e| e.to_string())?;
            let (seq, last) = (info.stream_sequence, info.pending == 0);
            match Record::decode(&message.payload) {
                Ok(record) => {
                    if !self.applied(partition, generation, seq, record) {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    tracing::error!(partition, seq, error = %e, "skipping a record that does not read");
                }
            }
            if let Reading::Replay(started) = reading
                && last
            {
                self.caught_up(partition, generation, started);
                return Ok(Some(seq + 1));
            }
        }
        Err("the partition's consumer ended".into())
    }

    /// Loads the partition's last snapshot, if it has one; returns the
    /// stream sequence the replay goes on from.
    async fn restore(&self, conn: &Conn, partition: u16, generation: u8) -> Result<u64, String> {
        let last = conn
            .control
            .get_last_raw_message_by_subject(&self.names.snapshots(partition))
            .await;
        let snapshot = match last {
            Ok(message) => message,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(1),
            Err(e) => return Err(format!("reading the partition's snapshot: {e}")),
        };
        let restored = Record::decode(&snapshot.payload)
            .ok()
            .and_then(Partition::from_snapshot);
        let Some((state, through, marks)) = restored else {
            tracing::error!(
                partition,
                seq = snapshot.sequence,
                "the partition's snapshot does not read; replaying its whole log"
            );
            return Ok(1);
        };
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        if slot.generation == generation
            && let Some(owned) = &mut slot.owned
        {
            owned.state = state;
            owned.applied = through;
            owned.marks = marks;
        }
        Ok(through + 1)
    }

    /// Writes a snapshot of a partition as of the record at `through`, then
    /// drops from the stream the older snapshots, the delivery records that
    /// the previous snapshot covers, and the accepted messages up to
    /// `expired`. The delivery records go one snapshot late: a replica that
    /// took the partition meanwhile (this one gave it back with this write
    /// under way) may be replaying from the previous snapshot.
    async fn snapshot(
        self: Arc<Self>,
        partition: u16,
        through: u64,
        record: Record,
        expired: Option<u64>,
    ) {
        let Some(conn) = self.conn.get() else {
            return;
        };
        let payload = record.encode();
        let room = conn.client.server_info().max_payload * 3 / 4;
        if payload.len() > room {
            tracing::warn!(
                partition,
                bytes = payload.len(),
                "too many messages wait in the partition for a snapshot; a new owner replays its whole log"
            );
            return;
        }
        let published = async {
            let previous = match conn
                .stream
                .get_last_raw_message_by_subject(&self.names.snapshots(partition))
                .await
            {
                Ok(last) => Record::decode(&last.payload)
                    .ok()
                    .and_then(Partition::from_snapshot)
                    .map(|(_, through, _)| through),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
                Err(e) => return Err(e.to_string()),
            };
            conn.js
                .publish(self.names.snapshots(partition), payload.into())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            if let Some(previous) = previous.filter(|&p| p < through) {
                conn.stream
                    .purge()
                    .filter(self.names.progress(partition))
                    .sequence(previous + 1)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            conn.stream
                .purge()
                .filter(self.names.snapshots(partition))
                .keep(1)
                .await
                .map_err(|e| e.to_string())?;
            // The accepted messages past the dedupe window that a snapshot
            // covers: their conversations are in the bucket.
            if let Some(expired) = expired {
                conn.stream
                    .purge()
                    .filter(self.names.messages(partition))
                    .sequence(expired + 1)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(ACK_TIMEOUT, published).await {
            Ok(Ok(_)) => tracing::debug!(partition, through, "partition snapshot written"),
            Ok(Err(e)) => {
                tracing::warn!(partition, error = %e, "could not write a partition snapshot")
            }
            Err(_) => tracing::warn!(partition, "writing a partition snapshot timed out"),
        }
    }

    /// Applies one record of an owned partition; false once the partition is
    /// no longer owned under `generation`.
    fn applied(self: &Arc<Self>, partition: u16, generation: u8, seq: u64, record: Record) -> bool {
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        if slot.generation != generation {
            return false;
        }
        let Some(owned) = &mut slot.owned else {
            return false;
        };
        if seq <= owned.applied {
            return true; // in the snapshot the replay started from
        }
        if let Some(conversation) = record.conversation() {
            self.remember(owned, conversation);
        }
        if let Some((target, key)) = record.redriven_letter() {
            tokio::spawn(
                self.clone()
                    .take_out_redriven(partition, target, key.to_owned()),
            );
        }
        let due = owned.state.apply(seq, record);
        owned.applied = seq;
        owned.since_snapshot += 1;
        if owned.caught_up {
            self.queue(partition, generation, &owned.state, &due);
            if !self.progress_in_flight[usize::from(partition)].load(Ordering::SeqCst) {
                self.snapshot_if_due(partition, owned);
            }
        }
        self.applied[usize::from(partition)].notify_waiters();
        true
    }

    /// Takes a dead letter out of the list once the record that sent it back
    /// is in its partition's log. The redrive that wrote the record does so
    /// too, but one that died before it could leaves the letter listed:
    /// claimed for a while, then free to be discarded, or sent back once
    /// more, though it was delivered.
    async fn take_out_redriven(self: Arc<Self>, partition: u16, target: Target, key: String) {
        let Some(conn) = self.conn.get() else {
            return;
        };
        let entry = match conn.dead.entry(&key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return, // taken out already
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "could not read a dead letter that was sent back, to take it out of the list");
                return;
            }
        };
        match conn
            .dead
            .delete_expect_revision(&key, Some(entry.revision))
            .await
        {
            Ok(()) => {
                self.count_dead_letter(target, partition, -1);
                tracing::debug!(key = %key, "a dead letter sent back is taken out of the list");
            }
            Err(e) if changed_meanwhile(&e) => {} // by the redrive itself
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "could not take a dead letter that was sent back out of the list")
            }
        }
    }

    /// Writes a snapshot of an owned, caught-up partition once enough
    /// records were applied since the last one. It covers the records up to
    /// the last one the follower applied; the caller makes sure that none of
    /// this replica's progress is in flight, so that every progress record
    /// before that point is in the state (those after it are in it too, and
    /// a replay applies them again, which changes nothing).
    fn snapshot_if_due(self: &Arc<Self>, partition: u16, owned: &mut Owned) {
        // Only a holder sure of its lease writes one: a snapshot also
        // removes records that a new owner replaying them still reads.
        let sure = owned.renewed.elapsed() < self.flags.nats_lease_ttl / 2;
        // At least --nats-snapshot-records apart, and more when many
        // messages wait (a snapshot holds them all), so that snapshots
        // cost a bounded share of the writes.
        let every = (self.flags.nats_snapshot_records as usize).max(2 * owned.state.len());
        if !sure || owned.since_snapshot < every {
            return;
        }
        let through = owned.applied;
        owned.since_snapshot = 0;
        let (now, window) = (now_ms(), self.dedupe_window.as_millis() as u64);
        owned.marks = log::next_marks(&owned.marks, through, now, window);
        owned
            .remembered
            .retain(|_, (_, at)| now.saturating_sub(*at) < crate::store::CONVERSATION_REFRESH_MS);
        let expired = log::expired(&owned.marks, now, window);
        let snapshot = owned.state.snapshot(through, owned.marks.clone());
        tokio::spawn(Arc::clone(self).snapshot(partition, through, snapshot, expired));
    }

    /// Writes a conversation to the bucket when it is new here, another user
    /// wrote, or it was written over an hour ago, so that a bot can write to
    /// it after its messages left the stream. In the background: until it is
    /// written, the conversation is read from the stream.
    fn remember(self: &Arc<Self>, owned: &mut Owned, conversation: Conversation) {
        let key = crate::ids::key(&conversation.id);
        let seen = conversation.seen_ms.unwrap_or_default();
        let fresh = owned.remembered.get(&key).is_some_and(|(user, at)| {
            *user == conversation.user_id
                && seen.saturating_sub(*at) < crate::store::CONVERSATION_REFRESH_MS
        });
        if fresh {
            return;
        }
        owned
            .remembered
            .insert(key, (conversation.user_id.clone(), seen));
        let Some(conn) = self.conn.get() else {
            return;
        };
        let bucket = conn.conversations.clone();
        tokio::spawn(async move {
            let value = serde_json::to_vec(&conversation).expect("JSON");
            if let Err(e) = bucket.put(format!("{key:032x}"), value.into()).await {
                tracing::warn!(error = %e, "could not remember a conversation; it is read from the stream meanwhile");
            }
        });
    }

    /// Waits until this replica's follower of `partition` applied the record
    /// at `seq`, when this replica delivers that partition: what the record
    /// made due is then queued, as the other stores have it queued when a
    /// commit returns (the bot's replies before the next message's, the
    /// message counted against --max-pending before its 200).
    async fn queued_through(&self, partition: u16, seq: u64) {
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        loop {
            let notified = self.applied[usize::from(partition)].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match &self.slots()[usize::from(partition)].owned {
                Some(owned) if owned.caught_up && owned.applied < seq => {}
                // Not delivered here, or still replaying (it queues all at the end).
                _ => return,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    fn caught_up(&self, partition: u16, generation: u8, started: Instant) {
        let mut slots = self.slots();
        let slot = &mut slots[usize::from(partition)];
        if slot.generation != generation {
            return;
        }
        let Some(owned) = &mut slot.owned else {
            return;
        };
        if owned.caught_up {
            return;
        }
        owned.caught_up = true;
        let waiting = owned.state.waiting();
        self.queue(partition, generation, &owned.state, &waiting);
        tracing::info!(
            partition,
            waiting = waiting.len(),
            replay_ms = started.elapsed().as_millis() as u64,
            "partition replayed; delivering it"
        );
    }

    fn queue(&self, partition: u16, generation: u8, state: &Partition, due: &[Due]) {
        let Some(queues) = self.queues.get() else {
            return;
        };
        for due in due {
            let seq = Handle {
                generation,
                partition,
                place: due.place,
            }
            .seq();
            let pending: Option<Pending> = match due.target {
                Target::Bot => state.inbound.get(&due.place).map(|m| m.pending(seq)),
                Target::Response => state.outbound.get(&due.place).map(|m| m.pending(seq)),
            };
            if let Some(pending) = pending {
                queues.push(pending);
            }
        }
    }

    /// The message waiting at `seq`, if this replica still delivers its partition.
    fn waiting<T: Clone>(
        &self,
        seq: Seq,
        pick: impl Fn(&Partition, &Place) -> Option<T>,
    ) -> Option<T> {
        let handle = Handle::of(seq);
        let slots = self.slots();
        let slot = slots.get(usize::from(handle.partition))?;
        if slot.generation != handle.generation {
            return None;
        }
        pick(&slot.owned.as_ref()?.state, &handle.place)
    }

    /// The conversation, from its last message in the stream, or from the
    /// conversations bucket once its messages left the stream.
    async fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let conn = self.readable()?;
        let found = match conn
            .stream
            .get_last_raw_message_by_subject(&self.names.conversation(id))
            .await
        {
            Ok(last) => Record::decode(&last.payload)
                .map_err(nats_error("a conversation record"))?
                .conversation(),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                let key = format!("{:032x}", crate::ids::key(id));
                match conn
                    .conversations
                    .get(key)
                    .await
                    .map_err(nats_error("reading a conversation"))?
                {
                    Some(bytes) => Some(
                        serde_json::from_slice::<Conversation>(&bytes)
                            .map_err(nats_error("a remembered conversation"))?,
                    ),
                    None => None,
                }
            }
            Err(e) => return Err(nats_error("reading a conversation")(e)),
        };
        let retention = self.conversation_retention.as_millis() as u64;
        Ok(found.filter(|c| {
            retention == 0 || now_ms().saturating_sub(c.seen_ms.unwrap_or_default()) <= retention
        }))
    }

    /// Stops delivering and gives every lease back at once, so that the other
    /// replicas take over without waiting for the TTL. Giving them back is a
    /// courtesy, given one lease round's requests' time at most: with NATS
    /// out of reach the stop waited for it to come back (for as long as it
    /// stayed away), and the leases run out within the TTL anyway.
    async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let Some(conn) = self.conn.get() else {
            return;
        };
        let released: Vec<(u16, u64)> = (0..PARTITIONS)
            .filter_map(|p| Some((p, self.release(p)?)))
            .collect();
        if let Some(why) = self.unavailable_for(true) {
            tracing::info!(reason = %why, leases = released.len(), "the leases are not given back at the stop: they run out within --nats-lease-ttl");
            return;
        }
        let give_back = async {
            let deletes = released.iter().map(|&(partition, revision)| {
                conn.leases
                    .delete_expect_revision(partition_key(partition), Some(revision))
            });
            let _ = futures::future::join(
                futures::future::join_all(deletes),
                conn.leases.delete(replica_key(&self.replica)),
            )
            .await;
            let _ = conn.client.flush().await;
        };
        if tokio::time::timeout(control_timeout(self.flags.nats_lease_ttl), give_back)
            .await
            .is_err()
        {
            tracing::warn!(
                leases = released.len(),
                "NATS did not take the leases back in time at the stop: they run out within --nats-lease-ttl"
            );
        }
    }
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("JSON")
}

fn store_failed(e: impl std::fmt::Display) -> CommitError {
    CommitError::Store(format!("NATS: {e}"))
}

impl RemoteStore for Inner {
    fn commit(
        self: Arc<Self>,
        op: Op,
        bounded: bool,
    ) -> BoxFuture<'static, Result<Outcome, CommitError>> {
        Box::pin(Inner::commit(self, op, bounded))
    }

    fn close(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { Inner::close(&self).await })
    }
}

impl Store for NatsStore {
    fn write(&self, _ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        Err(StoreError::Nats(
            "the NATS store is written through its remote commits".into(),
        ))
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn needs_sync(&self) -> bool {
        false
    }

    fn remote(&self) -> Option<Arc<dyn RemoteStore>> {
        Some(self.inner.clone())
    }

    fn attempting(&self, seq: Seq) -> Option<crate::store::Attempting> {
        let partition = usize::from(Handle::of(seq).partition);
        let count = self.inner.attempts.get(partition)?;
        Some(crate::store::Attempting::start(count))
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.unavailable()
    }

    fn progress_unavailable(&self) -> Option<String> {
        self.inner.unavailable_for(true)
    }

    fn revoked(&self, seq: Seq) -> Option<futures::future::BoxFuture<'static, ()>> {
        let partition = usize::from(Handle::of(seq).partition);
        let mut revocations = self.inner.revocations.get(partition)?.subscribe();
        Some(Box::pin(async move {
            if revocations.changed().await.is_err() {
                // The store is gone: nothing revokes the attempt any more.
                std::future::pending::<()>().await;
            }
        }))
    }

    /// Nothing to hand over here: each partition's messages are queued as
    /// its log is replayed, once this replica holds its lease.
    fn recover(&self, _each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError> {
        Ok(DeadLetterCounts::default())
    }

    fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError> {
        Ok(self
            .inner
            .waiting(seq, |state, place| state.inbound.get(place).cloned()))
    }

    fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError> {
        Ok(self
            .inner
            .waiting(seq, |state, place| state.outbound.get(place).cloned()))
    }

    /// Read from the stream (the conversation's last record), so that a
    /// bot's message reaches any replica. Called from a blocking thread.
    fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        self.inner.runtime.block_on(self.inner.conversation(id))
    }

    /// Called from a blocking thread.
    fn dead_letters(&self, from: Seq, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead_letter_page(from, limit)?.0)
    }

    /// Called from a blocking thread. The counts are the endpoint's, from
    /// the same listing of the bucket as the letters.
    fn dead_letter_page(
        &self,
        from: Seq,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, DeadLetterCounts), StoreError> {
        let inner = &self.inner;
        inner.runtime.block_on(async {
            let conn = inner.readable()?;
            let keys = inner
                .dead_letter_keys(conn)
                .await
                .map_err(|e| StoreError::Nats(e.to_string()))?;
            let mut counts = DeadLetterCounts::default();
            for (_, target, _) in &keys {
                match target {
                    Target::Bot => counts.bot += 1,
                    Target::Response => counts.response += 1,
                }
            }
            let mut letters = Vec::new();
            for (key, _, _) in keys.into_iter().filter(|(_, _, packed)| *packed >= from) {
                if letters.len() >= limit {
                    break;
                }
                let Some(bytes) = conn
                    .dead
                    .get(&key)
                    .await
                    .map_err(nats_error("dead letter"))?
                else {
                    continue;
                };
                letters.push(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| StoreError::Corrupt(format!("dead letter {key}: {e}")))?,
                );
            }
            Ok((letters, counts))
        })
    }

    /// Asks JetStream whether the id was published within the window,
    /// without storing anything (see [`Inner::probe`]). Called on the API's
    /// request task: the wait happens in place on the multi-threaded runtime
    /// the relay runs on (elsewhere the answer is "not known").
    fn first_answer(
        &self,
        caller_message_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread {
            return Ok(None);
        }
        let inner = &self.inner;
        let first =
            tokio::task::block_in_place(|| inner.runtime.block_on(inner.probe(caller_message_id)))?;
        Ok(first
            .filter(|m| now_ms.saturating_sub(m.created_at_ms) < window_ms)
            .map(|m| crate::wire::accept_answer(&m)))
    }

    /// The dead letters of the partitions this replica delivers (the
    /// `botrelay_dead_letters` gauge), so that the replicas' gauges add up to
    /// the endpoint's; the admin API's total is the endpoint's.
    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError> {
        Ok(*self
            .inner
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// Conversations are read from the stream as needed, not counted.
    fn conversation_count(&self) -> u64 {
        0
    }

    /// Message ids are remembered by JetStream (the stream's duplicate window).
    fn dedupe_count(&self) -> u64 {
        0
    }

    fn dedupe_cutoff(&self, _part: u8, _keep: usize) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_and_takeover_requests_wait_a_round_at_most() {
        let s = Duration::from_secs;
        assert_eq!(control_timeout(s(10)), s(2), "the default TTL: one round");
        assert_eq!(control_timeout(s(2)), s(1), "not under a second");
        assert_eq!(
            control_timeout(s(60)),
            ACK_TIMEOUT,
            "never past the writes'"
        );
    }

    #[test]
    fn dead_letter_keys_give_target_and_order() {
        let place = Place {
            record: 7,
            index: 2,
        };
        let key = dead_letter_key(Target::Response, 31, place);
        assert_eq!(
            parse_dead_letter_key(&key),
            Some((Target::Response, 31, place.packed()))
        );
        assert_eq!(parse_dead_letter_key("replica.x"), None);
        assert_eq!(dedupe_id("m-1"), dedupe_id("m-1"));
        assert_ne!(dedupe_id("m-1"), dedupe_id("m-2"));
    }

    #[test]
    fn every_redrive_of_a_dead_letter_names_the_revision_of_the_first() {
        let ttl = Duration::from_secs(30);
        let letter = br#"{"seq":1,"messageId":"m"}"#;
        assert_eq!(redrive_of(letter, 7), 7, "no redrive yet: the entry's own");
        // A first redrive claims revision 7; the claim is written as 8.
        let first = with_claim(letter, Some(1_000), redrive_of(letter, 7)).unwrap();
        assert!(claimed(&first, 1_000 + 29_999, ttl));
        assert!(!claimed(&first, 1_000 + 30_000, ttl), "the claim runs out");
        assert_eq!(redrive_of(&first, 8), 7);
        // It died; the next claims revision 8, or gives its claim back.
        let second = with_claim(&first, Some(40_000), redrive_of(&first, 8)).unwrap();
        assert_eq!(redrive_of(&second, 9), 7);
        let given_back = with_claim(&second, None, redrive_of(&second, 9)).unwrap();
        assert!(!claimed(&given_back, 40_000, ttl));
        assert_eq!(redrive_of(&given_back, 10), 7);
        let kept: DeadLetterFields = serde_json::from_slice(&given_back).unwrap();
        assert_eq!((kept.seq, kept.message_id.as_str()), (1, "m"));
    }

    #[derive(serde::Deserialize)]
    struct DeadLetterFields {
        seq: u64,
        #[serde(rename = "messageId")]
        message_id: String,
    }
}
