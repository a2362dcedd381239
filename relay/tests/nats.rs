//! `--store nats` with several relay replicas on a real 3-server JetStream
//! cluster: order per conversation across replicas, replicas and NATS
//! servers killed under load, NATS down altogether, and dedupe across
//! replicas. Needs `nats-server` (see `common/nats.rs`). The failover
//! figures are printed: `cargo test -p botrelay --test nats -- --nocapture`.

mod common;

use common::nats::{Cluster, fresh_prefix, relay_flags};
use common::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts `n` replicas of one endpoint (one prefix) on `cluster`; a flag in
/// `extra` replaces the one of the same name that `relay_flags` sets.
async fn replicas(
    n: usize,
    cluster: &Cluster,
    prefix: &str,
    bot: &Peer,
    endpoint: &Peer,
    extra: &[&str],
) -> Vec<Relay> {
    let mut relays = Vec::new();
    for _ in 0..n {
        let mut flags = relay_flags(cluster, prefix);
        let name = |flag: &str| flag.split('=').next().unwrap_or_default().to_owned();
        flags.retain(|f| !extra.iter().any(|e| name(e) == name(f)));
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        relays.push(Relay::start(&bot.url(), &endpoint.url(), &flags).await);
    }
    relays
}

/// What the clients had acknowledged: (conversation, number in it) → when.
type Acked = Arc<Mutex<HashMap<(usize, usize), Instant>>>;

/// Clients that write to `conversations` conversations at once, each its
/// messages one after the other (the next once the last got its `200`),
/// spread over the relays in `targets`; a refused or failed request is sent
/// again, with the same messageId, to the next relay. Runs until `stop`.
struct Load {
    acked: Acked,
    refused: Arc<Mutex<u64>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(conversations: usize, targets: Arc<Mutex<Vec<String>>>, pause: Duration) -> Load {
        let acked: Acked = Arc::default();
        let refused = Arc::new(Mutex::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..conversations {
            let (acked, refused, targets, stopped) = (
                acked.clone(),
                refused.clone(),
                targets.clone(),
                stopped.clone(),
            );
            tasks.spawn(async move {
                let mut next_target = c;
                for k in 0.. {
                    if *stopped.borrow() {
                        return;
                    }
                    let body = message(
                        &format!("u{c}"),
                        &format!("c{c}"),
                        &format!("c{c}-m{k}"),
                        &k.to_string(),
                    );
                    loop {
                        let url = {
                            let targets = targets.lock().unwrap();
                            next_target += 1;
                            targets[next_target % targets.len()].clone()
                        };
                        match post(&url, Some(CLIENT_TOKEN), body.to_string().into_bytes()).await {
                            Ok((200, _, _)) => break,
                            _ => {
                                *refused.lock().unwrap() += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                    acked.lock().unwrap().insert((c, k), Instant::now());
                    tokio::time::sleep(pause).await;
                }
            });
        }
        Load {
            acked,
            refused,
            stop,
            tasks,
        }
    }

    async fn stop(mut self) -> (HashMap<(usize, usize), Instant>, u64) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let acked = self.acked.lock().unwrap().clone();
        let refused = *self.refused.lock().unwrap();
        (acked, refused)
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// (conversation, number) of a message the bot received, from its caller ids.
fn bot_key(r: &Received) -> Option<(usize, usize)> {
    let id = r.body["tags"]["messageId"].as_str()?;
    let (c, k) = id.strip_prefix('c')?.split_once("-m")?;
    Some((c.parse().ok()?, k.parse().ok()?))
}

/// (conversation, number) of a reply, from the echoed text.
fn reply_key(r: &Received) -> Option<(usize, usize)> {
    let c = r.body["conversationId"]
        .as_str()?
        .strip_prefix('c')?
        .parse()
        .ok()?;
    let k = r.body["payload"]["text"]
        .as_str()?
        .strip_prefix("echo: ")?
        .parse()
        .ok()?;
    Some((c, k))
}

/// How many first arrivals came after a later message of their conversation.
fn out_of_order(keys: impl Iterator<Item = (usize, usize)>) -> usize {
    let mut seen = HashSet::new();
    let mut highest: HashMap<usize, usize> = HashMap::new();
    let mut late = 0;
    for (c, k) in keys {
        if !seen.insert((c, k)) {
            continue; // a redelivery
        }
        let top = highest.entry(c).or_insert(k);
        if k < *top {
            late += 1;
        }
        *top = (*top).max(k);
    }
    late
}

/// Waits until every acknowledged message reached the bot and its reply the
/// endpoint; then checks order, webhook-ids, and returns (duplicates at the
/// bot, the longest wait from a 200 to the bot).
async fn check_everything_arrived(
    what: &str,
    acked: &HashMap<(usize, usize), Instant>,
    bot: &Peer,
    endpoint: &Peer,
    timeout: Duration,
) -> (usize, Duration) {
    let wanted: HashSet<(usize, usize)> = acked.keys().copied().collect();
    bot.wait_until(
        &format!("{what}: every acknowledged message at the bot"),
        timeout,
        |r| {
            let got: HashSet<_> = r.iter().filter_map(bot_key).collect();
            wanted.is_subset(&got)
        },
    )
    .await;
    endpoint
        .wait_until(
            &format!("{what}: every reply at the endpoint"),
            timeout,
            |r| {
                let got: HashSet<_> = r.iter().filter_map(reply_key).collect();
                wanted.is_subset(&got)
            },
        )
        .await;
    let at_bot = bot.received();
    let at_endpoint = endpoint.received();
    assert_eq!(
        out_of_order(at_bot.iter().filter_map(bot_key)),
        0,
        "{what}: messages reached the bot out of order"
    );
    assert_eq!(
        out_of_order(at_endpoint.iter().filter_map(reply_key)),
        0,
        "{what}: replies reached the endpoint out of order"
    );
    // A message delivered twice (across a takeover) keeps its webhook-id.
    let mut ids: HashMap<(usize, usize), HashSet<String>> = HashMap::new();
    for r in &at_bot {
        if let Some(key) = bot_key(r) {
            ids.entry(key)
                .or_default()
                .insert(r.header("webhook-id").to_owned());
        }
    }
    assert!(
        ids.values().all(|ids| ids.len() == 1),
        "{what}: a redelivered message changed its webhook-id"
    );
    let duplicates = at_bot.iter().filter_map(bot_key).count() - ids.len();
    let mut first_arrival: HashMap<(usize, usize), Instant> = HashMap::new();
    for r in &at_bot {
        if let Some(key) = bot_key(r) {
            first_arrival.entry(key).or_insert(r.at);
        }
    }
    let longest = acked
        .iter()
        .map(|(key, at)| first_arrival[key].saturating_duration_since(*at))
        .max()
        .unwrap_or_default();
    (duplicates, longest)
}

/// The longest pause in any partition's deliveries to the bot that began
/// after `killed_at`, cut at `until`: under steady load a partition gets
/// deliveries every few milliseconds, so the pause of the partitions the
/// killed replica held is the time the others took to take them over.
fn takeover_time(at_bot: &[Received], killed_at: Instant, until: Instant) -> Duration {
    let partition = |c: usize| {
        botrelay::cluster::log::partition_of(&botrelay::ids::conversation_id(&format!("c{c}")))
    };
    let mut seen = HashSet::new();
    let mut arrivals: HashMap<u16, Vec<Instant>> = HashMap::new();
    for r in at_bot {
        if let Some(key) = bot_key(r)
            && seen.insert(key)
        {
            arrivals.entry(partition(key.0)).or_default().push(r.at);
        }
    }
    let mut longest = Duration::ZERO;
    for times in arrivals.values_mut() {
        times.push(killed_at);
        times.sort();
        for pair in times.windows(2) {
            if pair[0] >= killed_at && pair[1] <= until {
                longest = longest.max(pair[1] - pair[0]);
            }
        }
    }
    longest
}

async fn delivered_by(relay: &Relay) -> f64 {
    relay
        .metric("botrelay_messages_delivered_total", &[("target", "bot")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_then_three_replicas_keep_every_conversation_in_order() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let mut relays = replicas(2, &cluster, &prefix, &bot, &endpoint, &[]).await;
    let targets = Arc::new(Mutex::new(
        relays.iter().map(|r| r.url("/v1/messages")).collect(),
    ));
    let load = Load::start(40, targets.clone(), Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A third replica joins under load: partitions move to it.
    relays.extend(replicas(1, &cluster, &prefix, &bot, &endpoint, &[]).await);
    targets.lock().unwrap().push(relays[2].url("/v1/messages"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (acked, _) = load.stop().await;
    let (duplicates, longest) = check_everything_arrived(
        "2 then 3 replicas",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(30),
    )
    .await;
    let mut shares = Vec::new();
    for relay in &relays {
        shares.push(delivered_by(relay).await);
    }
    println!(
        "2 then 3 replicas: {} messages acknowledged, delivered in order; duplicates at the bot {duplicates}; longest 200-to-bot {longest:?}; delivered per replica {shares:?}",
        acked.len()
    );
    assert!(
        shares.iter().all(|&n| n > 0.0),
        "every replica delivers a share: {shares:?}"
    );
}

/// `--nats-snapshot-records` of the test that kills replicas under load.
const SNAPSHOT_RECORDS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_killed_under_load_lose_nothing_and_keep_order() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // The default lease TTL (10s): the takeover printed is the one users get.
    let mut relays: Vec<Relay> = Vec::new();
    for _ in 0..3 {
        let mut flags = relay_flags(&cluster, &prefix);
        flags.retain(|f| !f.starts_with("--nats-lease-ttl"));
        // A snapshot every 200 records of a partition (not 1,000): what the
        // last snapshots have not covered yet (up to 32 partitions x that)
        // then stays well under the messages of even a slow run, so the
        // compaction check below does not hang on how many got through.
        flags.push(format!("--nats-snapshot-records={SNAPSHOT_RECORDS}"));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        relays.push(Relay::start(&bot.url(), &endpoint.url(), &flags).await);
    }
    let targets = Arc::new(Mutex::new(
        relays
            .iter()
            .map(|r| r.url("/v1/messages"))
            .collect::<Vec<_>>(),
    ));
    let load = Load::start(20, targets.clone(), Duration::from_millis(20));
    let mut figures = Vec::new();
    for victim in [0, 1] {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let url = relays[victim].url("/v1/messages");
        targets.lock().unwrap().retain(|t| *t != url);
        let before = load.acked_count();
        let killed_at = Instant::now();
        relays[victim].kill();
        // Under load until the others took over (the TTL and a renewal).
        tokio::time::sleep(Duration::from_secs(14)).await;
        figures.push((victim, before, killed_at));
    }
    let (acked, refused) = load.stop().await;
    let (duplicates, longest) = check_everything_arrived(
        "replicas killed",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(40),
    )
    .await;
    let at_bot = bot.received();
    let mut slowest_takeover = Duration::ZERO;
    for (victim, before, killed_at) in figures {
        let after = at_bot.iter().filter(|r| r.at > killed_at).count();
        let takeover = takeover_time(&at_bot, killed_at, killed_at + Duration::from_secs(14));
        slowest_takeover = slowest_takeover.max(takeover);
        println!(
            "replica {victim} SIGKILLed: {before} messages acknowledged before; {after} deliveries to the bot after; taken over in (the longest pause of a partition's deliveries) {takeover:?}"
        );
    }
    println!(
        "replicas killed: {} acknowledged in all, every one delivered, out of order 0; duplicates at the bot {duplicates} (same webhook-id); longest 200-to-bot {longest:?}; client retries {refused}",
        acked.len()
    );
    // Snapshots drop the delivery records they cover: without them the
    // stream would hold about three records per message.
    let records = stream_records(&cluster, &prefix).await;
    println!(
        "the stream holds {records} records for {} messages and their replies",
        acked.len()
    );
    // At most: a record per message (its accept), the records not yet in a
    // snapshot (fewer than SNAPSHOT_RECORDS per partition) and the snapshots.
    let bound = acked.len() as u64 + 2 * 32 * SNAPSHOT_RECORDS;
    assert!(
        records < bound,
        "{records} records for {} messages: not compacted (bound {bound})",
        acked.len()
    );
    assert!(
        slowest_takeover < Duration::from_secs(15),
        "taken over within 15s (the default TTL, a renewal and the replay): {slowest_takeover:?}"
    );
}

/// How many records the endpoint's stream holds.
async fn stream_records(cluster: &Cluster, prefix: &str) -> u64 {
    let client = async_nats::connect(cluster.url(2)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("botrelay-{prefix}")).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// How many accepted and bot messages the endpoint's stream holds.
async fn message_records(cluster: &Cluster, prefix: &str) -> u64 {
    use futures::TryStreamExt;
    let client = async_nats::connect(cluster.url(2)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("botrelay-{prefix}")).await.unwrap();
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(format!("botrelay.{prefix}.*.c.>"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    subjects.iter().map(|(_, n)| *n as u64).sum()
}

/// The server that leads the endpoint's stream, by JetStream's account of it.
async fn stream_leader(cluster: &Cluster, prefix: &str) -> usize {
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = js.get_stream(format!("botrelay-{prefix}")).await
            && let Ok(info) = stream.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            && let Some(i) = cluster.index_of(&leader)
        {
            return i;
        }
        assert!(Instant::now() < deadline, "no stream leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_leader_killed_under_load_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(2, &cluster, &prefix, &bot, &endpoint, &[]).await;
    let targets = Arc::new(Mutex::new(
        relays
            .iter()
            .map(|r| r.url("/v1/messages"))
            .collect::<Vec<_>>(),
    ));
    let load = Load::start(20, targets, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = stream_leader(&cluster, &prefix).await;
    let before = load.acked_count();
    cluster.kill(leader);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (acked, refused) = load.stop().await;
    let (duplicates, longest) = check_everything_arrived(
        "stream leader killed",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(40),
    )
    .await;
    let after = bot.received().iter().filter(|r| r.at > killed_at).count();
    println!(
        "NATS stream leader (server {leader}) killed: {before} acknowledged before, {} in all, every one delivered in order; {after} deliveries after the kill; duplicates {duplicates}; longest 200-to-bot {longest:?}; client retries {refused}",
        acked.len()
    );
}

/// A TCP proxy to a NATS server that can go quiet: once cut, it forwards
/// nothing either way but keeps the connections open, as a network cut does
/// (no FIN, no RST), so the client sees no disconnection.
struct CutProxy {
    addr: std::net::SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    async fn start(upstream: u16) -> CutProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cutting = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(server_read) as _, Box::new(client_write) as _),
                ] {
                    let cut = cutting.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if cut.load(Ordering::SeqCst) {
                                continue; // into the void
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        CutProxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forwards again. What was sent during the cut is lost, so the
    /// connections it kept open break, and the client connects anew.
    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Message `m` of each of `conversations` conversations, `c0` on, through
/// `relay`, each acknowledged.
async fn send_to_each(relay: &Relay, conversations: usize, m: usize) {
    for c in 0..conversations {
        let (status, _) = relay
            .send(&message(
                "u",
                &format!("c{c}"),
                &format!("c{c}-m{m}"),
                &m.to_string(),
            ))
            .await;
        assert_eq!(status, 200, "message {m} of conversation c{c}");
    }
}

/// Two replicas of one endpoint: `near`, connected to the first NATS server,
/// and `far`, connected to it through a proxy that can cut it off. Each tells
/// the bot which it is (header `x-replica`). `far_flags` are the far one's own.
async fn near_and_far(
    cluster: &Cluster,
    prefix: &str,
    bot: &Peer,
    endpoint: &Peer,
    far_flags: &[&str],
) -> (Relay, CutProxy, Relay) {
    let proxy = CutProxy::start(cluster.port(0)).await;
    let mut relays = Vec::new();
    for (name, url) in [
        ("near", cluster.urls()),
        ("far", format!("nats://{}", proxy.addr)),
    ] {
        let mut flags = relay_flags(cluster, prefix);
        for flag in flags.iter_mut() {
            if flag.starts_with("--nats-url=") {
                *flag = format!("--nats-url={url}");
            }
        }
        flags.push(format!("--bot-header=x-replica: {name}"));
        if name == "far" {
            flags.extend(far_flags.iter().map(|f| f.to_string()));
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        relays.push(Relay::start(&bot.url(), &endpoint.url(), &flags).await);
    }
    let far = relays.pop().expect("two relays");
    let near = relays.pop().expect("two relays");
    (near, proxy, far)
}

/// A replica whose network to NATS goes quiet (no disconnection to see)
/// stops delivering before its leases can be taken: once another replica
/// delivers a conversation, the cut-off one sends nothing more of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_nats_stops_delivering_before_its_conversations_move() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let (near, proxy, far) = near_and_far(&cluster, &prefix, &bot, &endpoint, &[]).await;
    // Both deliver a share before the load starts; clients write to `near` only.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(delivered_by(&far).await == 0.0);
    let targets = Arc::new(Mutex::new(vec![near.url("/v1/messages")]));
    let load = Load::start(20, targets, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        delivered_by(&far).await > 0.0,
        "the far replica delivers a share"
    );
    proxy.cut();
    let cut_at = Instant::now();
    // Its connection stays open and silent, yet it must stop saying it is
    // ready (it said so for the whole of a 71 s cut), so that clients go to
    // the other replica.
    let mut not_ready_after = None;
    while cut_at.elapsed() < Duration::from_secs(25) {
        let ready = get(&format!("http://{}/readyz", far.admin)).await;
        if not_ready_after.is_none() && !matches!(ready, Ok((200, _, _))) {
            not_ready_after = Some(cut_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (acked, _) = load.stop().await;
    let (_, longest) = check_everything_arrived(
        "one replica cut off from NATS",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(40),
    )
    .await;
    // Per conversation, when `near` first delivered it after the cut; any
    // delivery of `far` after that is two replicas delivering at once.
    let at_bot = bot.received();
    let mut taken: HashMap<usize, Instant> = HashMap::new();
    let mut far_last = cut_at;
    for r in &at_bot {
        let Some((c, _)) = bot_key(r) else { continue };
        if r.at > cut_at && r.header("x-replica") == "near" {
            taken.entry(c).or_insert(r.at);
        }
        if r.header("x-replica") == "far" {
            far_last = far_last.max(r.at);
        }
    }
    let overlapping: Vec<(usize, usize)> = at_bot
        .iter()
        .filter(|r| r.header("x-replica") == "far")
        .filter_map(|r| {
            let key = bot_key(r)?;
            taken.get(&key.0).is_some_and(|t| r.at > *t).then_some(key)
        })
        .collect();
    println!(
        "one replica cut off from NATS: {} acknowledged, all delivered in order; its last delivery {:?} after the cut; {} conversations taken over; longest 200-to-bot {longest:?}; not ready {not_ready_after:?} after the cut",
        acked.len(),
        far_last - cut_at,
        taken.len()
    );
    // The lease TTL is 3 s here: not ready once no lease round succeeded for 2.4 s.
    assert!(
        not_ready_after.is_some_and(|t| t < Duration::from_secs(6)),
        "the cut-off replica's /readyz: not ready {not_ready_after:?} after the cut"
    );
    assert!(
        overlapping.is_empty(),
        "the cut-off replica delivered after another took over: {overlapping:?}"
    );
}

/// A replica cut off from NATS while its deliveries wait on a slow bot: it
/// gives their partitions up before another replica may take them, and its
/// requests still under way must end then, not when the bot answers. Left
/// to go on, each overlapped the next owner's copy of the same message at
/// the bot, for as long as the bot took. Once the cut heals, the replica
/// takes its share back, and the conversations whose deliveries it cut short,
/// could not record for the cut, or was to retry, go on at once: each once
/// held its conversation for a retry's backoff (5 min at most by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_nats_cuts_short_its_deliveries_under_way() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    // The bot answers the far replica after 8 s (under --bot-timeout, 10 s)
    // in odd conversations, after 1 s in even ones: those answers come
    // during the cut, and cannot be recorded. It refuses the far replica the
    // first message of every fourth, which then waits for its retry across
    // the cut. The near one it answers at once.
    let bot = Peer::start(|r: &Received| {
        let answer = echo(r);
        match (r.header("x-replica"), bot_key(r)) {
            ("far", Some((c, 0))) if c % 4 == 3 => Answer::status(500),
            ("far", Some((c, _))) if c % 2 == 0 => answer.after(Duration::from_secs(1)),
            ("far", _) => answer.after(Duration::from_secs(8)),
            _ => answer,
        }
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // A retry of the far replica waits a minute: longer than the test.
    let (near, proxy, far) = near_and_far(
        &cluster,
        &prefix,
        &bot,
        &endpoint,
        &["--retry-initial-backoff=60s", "--retry-max-backoff=60s"],
    )
    .await;
    // Both hold a share of the partitions before the messages come.
    tokio::time::sleep(Duration::from_secs(4)).await;
    send_to_each(&near, 40, 0).await;
    bot.wait_until(
        "deliveries of the far replica under way",
        Duration::from_secs(20),
        |got| {
            got.iter()
                .filter(|r| r.header("x-replica") == "far")
                .count()
                >= 3
        },
    )
    .await;
    proxy.cut();
    let cut_at = Instant::now();
    bot.wait_until(
        "every message at the bot from the near replica",
        Duration::from_secs(30),
        |got| {
            (0..40).all(|c| {
                got.iter()
                    .any(|r| r.header("x-replica") == "near" && bot_key(r) == Some((c, 0)))
            })
        },
    )
    .await;
    // Every request of the far replica under way at the cut ended before
    // the near replica's copy of its message reached the bot.
    let (received, ended) = (bot.received(), bot.ended());
    let mut overlaps = Vec::new();
    let (mut cut_short, mut last_cut) = (0, Duration::ZERO);
    for (i, r) in received.iter().enumerate() {
        if r.header("x-replica") != "far" || r.at > cut_at {
            continue;
        }
        let Some(key) = bot_key(r) else { continue };
        let end = ended.iter().find(|e| e.index == i);
        if let Some(e) = end.filter(|e| !e.answered) {
            cut_short += 1;
            last_cut = last_cut.max(e.at - cut_at);
        }
        let taken_over = received
            .iter()
            .find(|n| n.header("x-replica") == "near" && n.at > cut_at && bot_key(n) == Some(key))
            .map(|n| n.at);
        if let Some(taken_over) = taken_over
            && end.is_none_or(|e| e.at > taken_over)
        {
            overlaps.push((key, end.map(|e| e.at - cut_at), taken_over - cut_at));
        }
    }
    println!(
        "a replica cut off with deliveries under way on a slow bot: {cut_short} of them cut short, the last {last_cut:?} after the cut; overlaps {overlaps:?}"
    );
    assert!(
        overlaps.is_empty(),
        "the far replica's request was still under way when the near one sent the same message \
         (conversation and message, its end and the near one's send after the cut): {overlaps:?}"
    );
    assert!(
        cut_short > 0,
        "no delivery of the far replica was cut short"
    );

    // The cut heals.
    proxy.heal();
    let healed_at = Instant::now();
    while !matches!(
        get(&format!("http://{}/readyz", far.admin)).await,
        Ok((200, _, _))
    ) {
        assert!(
            healed_at.elapsed() < Duration::from_secs(30),
            "the far replica is not ready 30 s after the cut healed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A few lease rounds (3 s TTL): it takes its share of the partitions back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let sent_at = Instant::now();
    send_to_each(&near, 40, 1).await;
    bot.wait_until(
        "every second message at the bot, after the cut healed",
        Duration::from_secs(30),
        |got| {
            (0..40).all(|c| {
                got.iter()
                    .any(|r| r.at > sent_at && bot_key(r) == Some((c, 1)))
            })
        },
    )
    .await;
    let received = bot.received();
    let far_cut_short: HashSet<usize> = received
        .iter()
        .filter(|r| r.header("x-replica") == "far" && r.at < cut_at)
        .filter_map(bot_key)
        .map(|(c, _)| c)
        .collect();
    let back_on_far = received
        .iter()
        .filter(|r| r.at > sent_at && r.header("x-replica") == "far")
        .filter_map(bot_key)
        .filter(|(c, m)| *m == 1 && far_cut_short.contains(c))
        .count();
    let unrecorded = far
        .logs()
        .matches("its partition was given up before it was recorded")
        .count();
    println!(
        "after the cut healed: all 40 second messages at the bot within {:?}; {back_on_far} of them through the far replica, in conversations whose first it had cut short or could not record ({unrecorded})",
        sent_at.elapsed()
    );
    assert!(
        back_on_far > 0,
        "the far replica took back none of the conversations it had cut short: the test shows nothing"
    );
}

/// Each NATS server in turn killed (then started again) under a light load:
/// one of them is the server the relay is connected to, which also holds
/// the readers of the partitions' logs. Its conversations must go on within
/// seconds, not wait for the readers to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_nats_server_killed_in_turn_stalls_no_conversation_for_long() {
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(1, &cluster, &prefix, &bot, &endpoint, &[]).await;
    let targets = Arc::new(Mutex::new(vec![relays[0].url("/v1/messages")]));
    let load = Load::start(20, targets, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for server in 0..cluster.len() {
        cluster.kill(server);
        tokio::time::sleep(Duration::from_secs(12)).await;
        cluster.restart(server);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let (acked, refused) = load.stop().await;
    let (duplicates, longest) = check_everything_arrived(
        "each NATS server killed in turn",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(60),
    )
    .await;
    println!(
        "each NATS server killed for 12 s in turn: {} acknowledged, every one delivered in order; duplicates {duplicates}; longest 200-to-bot {longest:?}; client retries {refused}",
        acked.len()
    );
    assert!(
        longest < Duration::from_secs(15),
        "a message waited {longest:?} from its 200 to the bot while a NATS server was down"
    );
}

/// What a log paced to a line a second says of one kind of event: (lines,
/// events). A line with `first` stands for its own event and the `unlogged`
/// it counts; a line with `tail` (a second after a burst) for its
/// `unlogged` alone. Only lines at `level` count: those a relay logging at
/// `info` writes.
fn paced_log_count(logs: &str, level: &str, first: &str, tail: &str) -> (u64, u64) {
    let (mut lines, mut events) = (0, 0);
    for line in logs.lines() {
        if !line.contains(&format!(r#""level":"{level}""#)) {
            continue;
        }
        let own = line.contains(first);
        if own || line.contains(tail) {
            let fields: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            events += fields["unlogged"].as_u64().unwrap_or(0) + u64::from(own);
            lines += 1;
        }
    }
    (lines, events)
}

/// Sends `each` messages to each of `conversations` conversations, waits
/// until the bot holds the first of each, then kills every NATS server: the
/// deliveries of those messages are under way as NATS goes.
async fn kill_nats_with_deliveries_under_way(
    cluster: &mut Cluster,
    relay: &Relay,
    bot: &Peer,
    conversations: usize,
    each: usize,
) {
    for k in 0..conversations {
        for m in 0..each {
            let (status, _) = relay
                .send(&message("u", &format!("c{k}"), &format!("c{k}-m{m}"), "x"))
                .await;
            assert_eq!(status, 200);
        }
    }
    bot.wait_until(
        "a message of each conversation on its way",
        Duration::from_secs(10),
        |r| r.len() >= conversations,
    )
    .await;
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
}

/// With NATS gone, every delivery under way that the bot answers ends as
/// "delivered but could not record it" (the message goes again later, with
/// the same webhook-id): the log says so once a second with a count, not
/// once a delivery, and its counts account for every one. (The bot answers
/// before the replica gives its partitions up, which would cut the
/// deliveries short: a 20 s lease TTL puts that 4 s or more after NATS went.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_that_cannot_be_recorded_are_logged_once_a_second() {
    const N: usize = 40;
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(|r| echo(r).after(Duration::from_millis(1500))).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let ttl = ["--nats-lease-ttl=20s"];
    let relays = replicas(1, &cluster, &prefix, &bot, &endpoint, &ttl).await;
    kill_nats_with_deliveries_under_way(&mut cluster, &relays[0], &bot, N, 1).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let (lines, reported) = loop {
        let (lines, reported) = paced_log_count(
            &relays[0].logs(),
            "ERROR",
            "delivered but could not record it",
            "could not be recorded since the last line",
        );
        if reported >= N as u64 || Instant::now() > deadline {
            break (lines, reported);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        reported >= N as u64,
        "{reported} deliveries that could not be recorded in the log, of {N} under way:\n{}",
        relays[0].logs()
    );
    assert!(
        lines <= started.elapsed().as_secs() + 3,
        "{lines} log lines for {reported} deliveries in {:?}:\n{}",
        started.elapsed(),
        relays[0].logs()
    );
}

/// A replica that lost NATS starts no delivery: it could not record it, so
/// the bot would only get the message again later. Only the deliveries under
/// way when NATS went end unrecorded; the partitions are given up later
/// (after one to two fifths of the lease TTL, here 2 to 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lost_nats_starts_no_delivery_it_could_not_record() {
    const N: usize = 20;
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(|r| echo(r).after(Duration::from_millis(300))).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // The default lease TTL (10 s).
    let mut flags = relay_flags(&cluster, &prefix);
    flags.retain(|f| !f.starts_with("--nats-lease-ttl"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relays = [Relay::start(&bot.url(), &endpoint.url(), &flags).await];
    kill_nats_with_deliveries_under_way(&mut cluster, &relays[0], &bot, N, 2).await;
    let at_kill = bot.received().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = bot.received().len() - at_kill;
    let unrecorded = relays[0]
        .logs()
        .lines()
        .filter(|l| l.contains("delivered but could not record it"))
        .count();
    // Deliveries that started in the instant before the client saw the
    // connection go are the only ones allowed.
    assert!(
        after <= 3,
        "{after} deliveries to the bot started after NATS went ({unrecorded} could not be recorded)"
    );
    assert!(
        relays[0]
            .logs()
            .contains("lost the connection to NATS: deliveries pause"),
        "{}",
        relays[0].logs()
    );
}

/// A replica started while NATS is down serves, but its log says it is ready
/// only once it is (as `/readyz` does), not while it still refuses messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_while_nats_is_down_logs_ready_only_once_it_is() {
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    let flags = relay_flags(&cluster, &prefix);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (bot_url, endpoint_url) = (bot.url(), endpoint.url());
    let mut back_at = String::new();
    // The harness waits for `/readyz` to answer 200, which needs NATS back.
    let (relay, ()) = tokio::join!(Relay::start(&bot_url, &endpoint_url, &flags), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        back_at = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        for i in 0..cluster.len() {
            cluster.restart(i);
        }
    });
    let line = |message: &str| {
        relay
            .logs()
            .lines()
            .find(|l| l.contains(&format!(r#""message":"{message}""#)))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
    };
    // The line comes within a moment of /readyz's 200 (it looks every 200 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    while line("botrelay is ready").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = relay.logs();
    let up = line("botrelay is up, not ready yet").unwrap_or_else(|| panic!("{logs}"));
    assert!(
        up["not_ready"]
            .as_str()
            .unwrap_or_default()
            .contains("NATS"),
        "{up}"
    );
    let ready = line("botrelay is ready").unwrap_or_else(|| panic!("{logs}"));
    let ready_at = ready["timestamp"].as_str().unwrap().to_owned();
    assert!(
        ready_at > back_at,
        "said ready at {ready_at}, NATS restarted at {back_at}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_down_means_503_and_not_ready_then_everything_resumes() {
    let mut cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(2, &cluster, &prefix, &bot, &endpoint, &[]).await;
    let mut acked = HashMap::new();
    for k in 0..10 {
        let relay = &relays[k % 2];
        let (status, _) = relay
            .send(&message("u", "c0", &format!("c0-m{k}"), &k.to_string()))
            .await;
        assert_eq!(status, 200);
        acked.insert((0, k), Instant::now());
    }
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    // Clients are told to come back, at once; the replicas are not ready.
    for relay in &relays {
        let started = Instant::now();
        let (status, headers, body) = post(
            &relay.url("/v1/messages"),
            Some(CLIENT_TOKEN),
            message("u", "c0", "c0-m-down", "x")
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(headers.get("retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while get(&format!("http://{}/readyz", relay.admin))
            .await
            .unwrap()
            .0
            != 503
        {
            assert!(Instant::now() < deadline, "still ready with NATS down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Known down now: a bot's post and the dead-letter list are refused
        // at once too, not after a request's timeout (5 s).
        let started = Instant::now();
        let (status, headers, body) = post(
            &relay.url("/v1/bot/messages"),
            Some(BOT_TOKEN),
            serde_json::json!({"conversationId": "any", "type": "text", "payload": {"text": "x"}})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(headers.get("retry-after").is_some());
        let (status, _) = admin(relay, "GET", "/dead-letters").await;
        assert_eq!(status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused after {:?}",
            started.elapsed()
        );
    }
    // Each refusal is counted, but the log says so once a second, not once
    // a request.
    let started = Instant::now();
    for k in 0..50 {
        let (status, _) = relays[0]
            .send(&message("u", "c1", &format!("c1-down{k}"), "x"))
            .await;
        assert_eq!(status, 503);
    }
    let lines = relays[0]
        .logs()
        .lines()
        .filter(|l| l.contains("a message could not be stored"))
        .count();
    assert!(
        lines as u64 <= started.elapsed().as_secs() + 8,
        "{lines} log lines after 50 refusals in {:?}",
        started.elapsed()
    );
    // Those that went without a line are counted in the next, or in one of
    // their own a second later: the log accounts for every refusal.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, reported) = paced_log_count(
        &relays[0].logs(),
        "WARN",
        "a message could not be stored",
        "more messages could not be stored since the last line",
    );
    let rejected = relays[0]
        .metric(
            "botrelay_messages_received_total",
            &[("outcome", "rejected")],
        )
        .await;
    assert_eq!(reported as f64, rejected, "refusals in the log and counted");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..cluster.len() {
        cluster.restart(i);
    }
    let back = Instant::now();
    for relay in &relays {
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&format!("http://{}/readyz", relay.admin))
            .await
            .unwrap()
            .0
            != 200
        {
            assert!(
                Instant::now() < deadline,
                "not ready again:\n{}",
                relay.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for k in 10..20 {
        let relay = &relays[k % 2];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) = relay
                .send(&message("u", "c0", &format!("c0-m{k}"), &k.to_string()))
                .await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "writes do not resume");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked.insert((0, k), Instant::now());
        if k == 10 {
            let written = back.elapsed();
            bot.wait_until(
                "the first message after the restart",
                Duration::from_secs(30),
                |got| got.iter().any(|r| bot_key(r) == Some((0, 10))),
            )
            .await;
            println!(
                "after the restart: the first write taken {written:?}, and delivered {:?}",
                back.elapsed()
            );
        }
    }
    let (duplicates, _) = check_everything_arrived(
        "NATS down and back",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(40),
    )
    .await;
    println!(
        "all NATS servers down then up: 503s meanwhile; ready again {:?} after the restart; 20 acknowledged, all delivered in order; duplicates {duplicates}",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_id_sent_to_two_replicas_at_once_is_one_message_with_one_answer() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(2, &cluster, &prefix, &bot, &endpoint, &[]).await;
    for k in 0..20 {
        let body = message("u", &format!("c{k}"), &format!("dup-{k}"), "hello").to_string();
        let (url_a, url_b) = (relays[0].url("/v1/messages"), relays[1].url("/v1/messages"));
        let (a, b) = tokio::join!(
            post(&url_a, Some(CLIENT_TOKEN), body.clone().into_bytes()),
            post(&url_b, Some(CLIENT_TOKEN), body.into_bytes()),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.0, b.0), (200, 200));
        assert_eq!(a.2, b.2, "the same answer, byte for byte");
    }
    bot.wait_until("20 messages", Duration::from_secs(20), |r| r.len() >= 20)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<_> = bot
        .received()
        .iter()
        .map(|r| r.body["tags"]["messageId"].to_string())
        .collect();
    assert_eq!(
        ids.len(),
        20,
        "each messageId reached the bot once: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_refused_for_back_pressure_is_taken_when_sent_again() {
    // Asking JetStream whether a refused message is a duplicate must not
    // make it one.
    let cluster = Cluster::start(3);
    let down = free_addr();
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let mut flags = relay_flags(&cluster, &fresh_prefix());
    flags.push("--max-pending=2".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = Relay::start(&format!("http://{down}/"), &endpoint.url(), &flags).await;
    let (status, first) = relay.send(&message("u", "c0", "m0", "x")).await;
    assert_eq!(status, 200);
    assert_eq!(relay.send(&message("u", "c1", "m1", "x")).await.0, 200);
    assert_eq!(relay.send(&message("u", "c2", "m2", "x")).await.0, 429);
    // A duplicate still gets its first answer meanwhile.
    assert_eq!(
        relay.send(&message("u", "c0", "m0", "x")).await,
        (200, first)
    );
    let bot = Peer::start_on(down, echo).await;
    bot.wait_until("m0 and m1", Duration::from_secs(20), |r| r.len() >= 2)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = relay.send(&message("u", "c2", "m2", "x")).await;
        if status == 200 {
            assert_eq!(answer["message"]["tags"]["id"], "m2");
            break;
        }
        assert_eq!(status, 429, "{answer}");
        assert!(Instant::now() < deadline, "m2 is never taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = bot
        .wait_until("m2", Duration::from_secs(20), |r| {
            r.iter().any(|x| x.body["tags"]["messageId"] == "m2")
        })
        .await;
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.body["tags"]["messageId"].clone())
        .collect();
    assert_eq!(ids.len(), 3, "each message once: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_add_up_over_replicas_and_any_replica_redrives_them() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(|_| Answer::status(500)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(2, &cluster, &prefix, &bot, &endpoint, &["--max-attempts=1"]).await;
    // Both replicas deliver a share of the partitions before the messages come.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for c in 0..12 {
        let relay = &relays[c % 2];
        let (status, _) = relay
            .send(&message("u", &format!("c{c}"), &format!("c{c}-m0"), "0"))
            .await;
        assert_eq!(status, 200);
    }
    let list = |relay| async move {
        let (status, body) = admin(relay, "GET", "/dead-letters").await;
        assert_eq!(status, 200);
        body
    };
    wait_for_dead_letters(
        &relays[0],
        12,
        Duration::from_secs(20),
        "not all dead-lettered",
    )
    .await;
    // Every replica lists all of them; the gauges add up to them.
    assert_eq!(
        list(&relays[1]).await["deadLetters"]
            .as_array()
            .unwrap()
            .len(),
        12
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let gauges = loop {
        let mut gauges = Vec::new();
        for relay in &relays {
            gauges.push(
                relay
                    .metric("botrelay_dead_letters", &[("target", "bot")])
                    .await,
            );
        }
        if gauges.iter().sum::<f64>() == 12.0 || Instant::now() > deadline {
            break gauges;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(gauges.iter().sum::<f64>(), 12.0, "{gauges:?}");
    assert!(
        gauges.iter().all(|&g| g > 0.0),
        "each replica holds a share: {gauges:?}"
    );

    // One replica redrives them all; the bot now takes them.
    bot.set(echo);
    let (status, body) = admin(&relays[1], "POST", "/dead-letters/redrive").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 12);
    endpoint
        .wait_until("12 replies", Duration::from_secs(20), |r| r.len() >= 12)
        .await;
    assert_eq!(list(&relays[0]).await["total"], 0);
}

/// `method` on a replica's admin port at `path`, with the client token:
/// the status and the JSON answer (`null` when the answer is not JSON).
/// Waits until the admin port of `relay` lists `n` dead letters; panics
/// with `what` after `within`.
async fn wait_for_dead_letters(relay: &Relay, n: usize, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while admin(relay, "GET", "/dead-letters").await.1["total"] != n {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin(relay: &Relay, method: &str, path: &str) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", relay.admin);
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let (status, _, body) = request(method, &url, &[("authorization", &auth)], vec![])
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// Three replicas of an endpoint whose `n` messages (one per conversation)
/// are dead letters, and whose bot now answers: (cluster, bot, response
/// endpoint, replicas, the bot's deliveries so far).
async fn dead_letters_on_three_replicas(n: usize) -> (Cluster, Peer, Peer, Vec<Relay>, usize) {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(|_| Answer::status(500)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    // No circuit breaker: past its 10 failures in a row, the rest would die
    // one probe interval after the other.
    let flags = ["--max-attempts=1", "--breaker-failures=0"];
    let relays = replicas(3, &cluster, &prefix, &bot, &endpoint, &flags).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for c in 0..n {
        let (status, _) = relays[c % 3]
            .send(&message("u", &format!("c{c}"), &format!("c{c}-m0"), "0"))
            .await;
        assert_eq!(status, 200);
    }
    wait_for_dead_letters(
        &relays[0],
        n,
        Duration::from_secs(20),
        "not all dead-lettered",
    )
    .await;
    bot.set(echo);
    let failed = bot.received().len();
    (cluster, bot, endpoint, relays, failed)
}

/// A discard sent to two replicas and a redrive to the third, at once: each
/// dead letter is either discarded or redriven, the answers add up to the
/// dead letters, and only the redriven reach the bot. (A redrive sent a
/// dead letter back before taking it out of the bucket, so a discard of it
/// meanwhile succeeded too: "discarded 100" and "redriven 100" of 100, and all
/// delivered; and a discard that lost a race to another answered 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discards_and_a_redrive_at_once_take_each_dead_letter_once() {
    let n = 30;
    let (_cluster, bot, _endpoint, relays, failed) = dead_letters_on_three_replicas(n).await;
    let ops = ["discard", "redrive", "discard"];
    let paths = ops.map(|op| format!("/dead-letters/{op}"));
    let requests = relays
        .iter()
        .zip(&paths)
        .map(|(relay, path)| admin(relay, "POST", path));
    let (mut discarded, mut redriven) = (0, 0);
    for ((status, body), op) in futures::future::join_all(requests)
        .await
        .into_iter()
        .zip(ops)
    {
        assert_eq!(status, 200, "{op}: {body}");
        match op {
            "discard" => discarded += body["discarded"].as_u64().unwrap(),
            _ => redriven += body["redriven"].as_u64().unwrap(),
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // deliveries of the redriven
    let at_bot = bot.received().len() - failed;
    println!(
        "discard, redrive, discard at once: {discarded} discarded, {redriven} redriven, {at_bot} deliveries to the bot"
    );
    assert_eq!(
        discarded + redriven,
        n as u64,
        "each dead letter taken once"
    );
    assert_eq!(at_bot as u64, redriven, "only the redriven reach the bot");
    assert_eq!(
        admin(&relays[1], "GET", "/dead-letters").await.1["total"],
        0
    );
}

/// Dead letters redriven through three replicas at the same instant go back
/// once: each message reaches the bot once more, and its reply the
/// endpoint once, not once per replica under new webhook-ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_sent_to_every_replica_at_once_sends_each_message_once() {
    let n = 15;
    let (_cluster, bot, endpoint, relays, failed) = dead_letters_on_three_replicas(n).await;
    let redrives = relays
        .iter()
        .map(|relay| admin(relay, "POST", "/dead-letters/redrive"));
    let mut redriven = 0;
    for (status, body) in futures::future::join_all(redrives).await {
        assert_eq!(status, 200, "{body}");
        redriven += body["redriven"].as_u64().unwrap();
    }
    endpoint
        .wait_until("the replies", Duration::from_secs(20), |r| r.len() >= n)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // any copies would be here by now
    let at_bot = bot.received().len() - failed;
    let replies: HashSet<String> = endpoint
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_owned())
        .collect();
    println!(
        "redrive sent to 3 replicas at once: {redriven} redriven in all, {at_bot} deliveries to the bot, {} replies under {} webhook-ids",
        endpoint.received().len(),
        replies.len()
    );
    assert_eq!(
        redriven, n as u64,
        "the three answers add up to the dead letters"
    );
    assert_eq!(at_bot, n, "each redriven message reaches the bot once");
    assert_eq!(endpoint.received().len(), n, "one reply each");
}

/// NATS takes 1 MiB in one message by default, where a bot's answer may be
/// 4 MiB: replies too many for one record go in records of their own, one
/// too large for any is dropped, and the message goes to the bot once. A
/// client's message too large to store is refused with 413, not 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_larger_than_nats_takes_in_one_message_is_stored_in_parts() {
    let cluster = common::nats::shared();
    let prefix = fresh_prefix();
    let text = |n: usize, tag: &str| format!("{tag}{}", "x".repeat(n));
    let bot = Peer::start(move |_| {
        Answer::json(serde_json::json!({"responses": [
            {"type": "text", "payload": {"text": text(400_000, "a")}},
            {"type": "text", "payload": {"text": text(400_000, "b")}},
            {"type": "text", "payload": {"text": text(1_500_000, "too large")}},
            {"type": "text", "payload": {"text": text(400_000, "c")}},
        ]}))
    })
    .await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relays = replicas(
        1,
        cluster,
        &prefix,
        &bot,
        &endpoint,
        &["--max-body-bytes=2000000"],
    )
    .await;
    let (status, _) = relays[0].send(&message("u", "c", "m1", "hi")).await;
    assert_eq!(status, 200);
    endpoint
        .wait_until("three replies", Duration::from_secs(20), |r| r.len() >= 3)
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await; // a resend would be here by now
    assert_eq!(bot.received().len(), 1, "the message went to the bot once");
    let firsts: Vec<char> = endpoint
        .received()
        .iter()
        .map(|r| {
            r.body["payload"]["text"]
                .as_str()
                .unwrap()
                .chars()
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(firsts, ['a', 'b', 'c'], "the replies that fit, in order");

    let big = message("u", "c", "m2", &"y".repeat(1_200_000));
    let (status, body) = relays[0].send(&big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.to_string().contains("max_payload"), "{body}");
}

/// Replicas share the stream and buckets: one started with other settings
/// says which, rather than change them silently under the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_with_other_settings_says_which() {
    let cluster = common::nats::shared();
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let first = replicas(1, cluster, &prefix, &bot, &endpoint, &[]).await;
    assert!(
        !first[0].logs().contains("flags differ"),
        "{}",
        first[0].logs()
    );
    let same = replicas(1, cluster, &prefix, &bot, &endpoint, &[]).await;
    assert!(
        !same[0].logs().contains("flags differ"),
        "{}",
        same[0].logs()
    );
    let mut flags = relay_flags(cluster, &prefix);
    flags.retain(|f| !f.starts_with("--nats-lease-ttl"));
    flags.extend(["--nats-lease-ttl=4s".into(), "--dedupe-window=1h".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let other = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    let logs = other.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("flags differ"))
        .unwrap_or_else(|| panic!("no warning: {logs}"));
    assert!(
        warning.contains("--nats-lease-ttl 4s") && warning.contains("--dedupe-window 1h"),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_leave_the_stream_past_the_window_and_their_conversations_stay() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let flags = ["--dedupe-window=2s", "--nats-snapshot-records=20"];
    let relays = replicas(1, &cluster, &prefix, &bot, &endpoint, &flags).await;
    let relay = &relays[0];
    let conversations: Vec<String> = (0..20).map(|c| format!("c{c}")).collect();
    let mut sent = 0;
    for round in 0..10 {
        for c in &conversations {
            let id = format!("{c}-m{round}");
            assert_eq!(
                relay
                    .send(&message("u", c, &id, &round.to_string()))
                    .await
                    .0,
                200
            );
            sent += 1;
        }
    }
    endpoint
        .wait_until("every reply", Duration::from_secs(30), |r| r.len() >= sent)
        .await;
    // Past the window, more traffic makes snapshots that let the first
    // messages go.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for round in 10..20 {
        for c in &conversations {
            let id = format!("{c}-m{round}");
            assert_eq!(
                relay
                    .send(&message("u", c, &id, &round.to_string()))
                    .await
                    .0,
                200
            );
            sent += 1;
        }
    }
    endpoint
        .wait_until("every reply", Duration::from_secs(30), |r| r.len() >= sent)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The 200 of the second round are within the window: they stay.
    let messages = loop {
        let messages = message_records(&cluster, &prefix).await;
        if messages < 300 || Instant::now() > deadline {
            break messages;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let records = stream_records(&cluster, &prefix).await;
    println!(
        "{sent} messages with their replies: the stream holds {messages} of the messages, {records} records in all"
    );
    assert!(
        (200..300).contains(&messages),
        "{messages} messages held, of {sent}: the first 200 are past the window"
    );
    // A bot still writes to a conversation whose messages left the stream,
    // and the next owner, replaying from the snapshot, still delivers.
    let conversation = bot.received()[0].body["conversationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, body) = post(
        &relay.url("/v1/bot/messages"),
        Some(BOT_TOKEN),
        serde_json::json!({"conversationId": conversation, "type": "text", "payload": {"text": "later"}})
            .to_string()
            .into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    endpoint
        .wait_until("the bot's own message", Duration::from_secs(20), |r| {
            r.iter().any(|x| x.body["payload"]["text"] == "later")
        })
        .await;
    let mut again = replicas(1, &cluster, &prefix, &bot, &endpoint, &flags).await;
    drop(relays);
    assert_eq!(
        again[0].send(&message("u", "c0", "c0-m99", "99")).await.0,
        200
    );
    bot.wait_until(
        "the message after the takeover",
        Duration::from_secs(30),
        |r| r.iter().any(|x| x.body["tags"]["messageId"] == "c0-m99"),
    )
    .await;
    let repeats = bot.received().len() - (sent + 1);
    println!("after a restart from the snapshot: {repeats} messages sent to the bot again");
    assert!(repeats < 10, "{repeats} messages delivered again");
    again[0].kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reaches_nats_over_tls_trusting_the_ca_it_is_given() {
    // A private CA, and a certificate for localhost signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    let (cert_file, key_file) = (path("cert.pem"), path("key.pem"));
    let cluster = Cluster::start_with(
        1,
        &["--tls", "--tlscert", &cert_file, "--tlskey", &key_file],
    );

    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let flags = [
        "--store=nats".to_string(),
        format!("--nats-url=tls://localhost:{}", cluster.port(0)),
        format!("--nats-prefix={}", fresh_prefix()),
        "--nats-stream-replicas=1".to_string(),
        format!("--nats-tls-ca={}", path("ca.pem")),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    assert_eq!(relay.send(&message("u", "c", "m1", "hello")).await.0, 200);
    endpoint
        .wait_until("the reply", Duration::from_secs(20), |r| r.len() == 1)
        .await;
}

/// A replica told to stop while NATS is out of reach stops within its drain
/// time: giving its leases back is a courtesy, which it once waited to make
/// for as long as NATS stayed away (11 min in one outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stops_while_nats_is_out_of_reach() {
    let mut cluster = Cluster::start(1);
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let flags = relay_flags(&cluster, &fresh_prefix());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    let (status, body) = relay.send(&message("u", "c", "m", "hello")).await;
    assert_eq!(status, 200, "{body}");
    bot.wait_until("the message", Duration::from_secs(10), |r| !r.is_empty())
        .await;
    cluster.kill(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let told = Instant::now();
    signal(relay.pid(), "TERM");
    let code = relay.wait_exit(Duration::from_secs(20));
    println!(
        "a replica told to stop with NATS out of reach: exit code {code:?} after {:?}",
        told.elapsed()
    );
    assert_eq!(
        code,
        Some(0),
        "still running 20 s after SIGTERM with NATS out of reach (--drain-timeout is 5 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_delivers_each_waiting_message_once() {
    let cluster = Cluster::start(1);
    let bot = Peer::start(|_| Answer::status(500)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let flags = relay_flags(&cluster, &fresh_prefix());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    for c in 0..3 {
        for i in 0..2 {
            let id = format!("{c}-{i}");
            let (status, body) = relay
                .send(&message("u", &format!("conv-{c}"), &id, &id))
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    bot.wait_until("a failed attempt", Duration::from_secs(10), |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(relay.terminate(), Some(0));
    // The bot is fine when the relay comes back: while the replica takes its
    // partitions one after the other, deliveries from those it has must be
    // recorded, not refused and sent again.
    let before = bot.received().len();
    bot.set(echo);
    relay.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoint.received().len() < 6 {
        assert!(
            Instant::now() < deadline,
            "{} of 6 replies; bot got {} after the restart\n{}",
            endpoint.received().len(),
            bot.received().len() - before,
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = bot.received()[before..]
        .iter()
        .map(|r| {
            r.body["tags"]["messageId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let distinct: HashSet<_> = after.iter().collect();
    assert_eq!(
        (after.len(), distinct.len()),
        (6, 6),
        "each waiting message goes once after the restart: {after:?}\n{}",
        relay.logs()
    );
    assert!(!relay.logs().contains("delivered but could not record it"));
}

/// Replicas started together create the endpoint's stream and buckets at
/// the same moment; JetStream left some of those requests unanswered, and
/// each waited out its timeout: three replicas on a new cluster were ready
/// after 7 to 40 s, where one alone took about 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_started_together_on_a_new_cluster_are_ready_in_seconds() {
    let cluster = Cluster::start(3);
    // The cluster's own start (electing its JetStream leader) is not timed.
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.query_account().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "JetStream never answered:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefix = fresh_prefix();
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let started = Instant::now();
    let flags = relay_flags(&cluster, &prefix);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (bot_url, endpoint_url) = (bot.url(), endpoint.url());
    let relays =
        futures::future::join_all((0..3).map(|_| Relay::start(&bot_url, &endpoint_url, &flags)))
            .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "three replicas ready after {took:?}:\n{}",
        relays
            .iter()
            .map(Relay::logs)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And they work: a message through each is delivered.
    for (i, relay) in relays.iter().enumerate() {
        let (status, _) = relay
            .send(&message(
                "u",
                &format!("c{i}"),
                &format!("together-{i}"),
                "hi",
            ))
            .await;
        assert_eq!(status, 200);
    }
    bot.wait_until("3 messages", Duration::from_secs(20), |r| r.len() >= 3)
        .await;
}

/// A replica joining takes partitions from the others, which give them back
/// once the deliveries they have under way end: with a slow bot, the new
/// owner sent a message that was still on its way from the old one again,
/// at the same time (10 of 40 conversations with a 3 s bot, when a fourth
/// replica joined three).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_given_back_to_a_new_replica_is_never_delivered_by_two_at_once() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let slow = Duration::from_millis(1500);
    let bot = Peer::start(move |r| echo(r).after(slow)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let tagged = |name: &str| {
        let mut flags = relay_flags(&cluster, &prefix);
        flags.push(format!("--bot-header=x-replica: {name}"));
        flags
    };
    let mut relays = Vec::new();
    for name in ["a", "b"] {
        let flags = tagged(name);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        relays.push(Relay::start(&bot.url(), &endpoint.url(), &flags).await);
    }
    let targets = Arc::new(Mutex::new(
        relays.iter().map(|r| r.url("/v1/messages")).collect(),
    ));
    // A message per conversation every 2 s or so: most of the time, each
    // conversation has a delivery under way.
    let load = Load::start(30, targets.clone(), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let flags = tagged("c");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    relays.push(Relay::start(&bot.url(), &endpoint.url(), &flags).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (acked, _) = load.stop().await;
    check_everything_arrived(
        "a replica joining, slow bot",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(60),
    )
    .await;
    // Two deliveries of one conversation by two replicas less than the
    // bot's answer time apart were under way at once.
    let mut by_conversation: HashMap<usize, Vec<(Instant, String)>> = HashMap::new();
    for r in bot.received() {
        if let Some((c, _)) = bot_key(&r) {
            by_conversation
                .entry(c)
                .or_default()
                .push((r.at, r.header("x-replica").to_owned()));
        }
    }
    let mut overlapping = Vec::new();
    for (c, deliveries) in &mut by_conversation {
        deliveries.sort();
        for pair in deliveries.windows(2) {
            if pair[0].1 != pair[1].1 && pair[1].0 - pair[0].0 < slow {
                overlapping.push((*c, pair[0].1.clone(), pair[1].1.clone()));
            }
        }
    }
    let shares: Vec<f64> = futures::future::join_all(relays.iter().map(delivered_by)).await;
    println!(
        "a replica joining two, 1.5 s bot: {} acknowledged, delivered in order; delivered per replica {shares:?}; conversations delivered by two replicas at once: {}",
        acked.len(),
        overlapping.len()
    );
    assert!(
        shares[2] > 0.0,
        "the new replica delivers a share: {shares:?}"
    );
    assert!(
        overlapping.is_empty(),
        "delivered by two replicas at once: {overlapping:?}"
    );
}

/// Records the endpoint's stream delivered to readers, over every consumer
/// it has (the owners' readers of their partitions).
async fn records_read(cluster: &Cluster, prefix: &str) -> u64 {
    use futures::TryStreamExt;
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("botrelay-{prefix}")).await.unwrap();
    let consumers: Vec<_> = stream.consumers().try_collect().await.unwrap();
    consumers
        .iter()
        .map(|c| c.delivered.consumer_sequence)
        .sum()
}

/// Each record a reader gets costs the servers about as much CPU as a
/// write: an owner that read its own delivery records back made every
/// message cost three reads (the message, its delivery, its reply sent).
/// Now it reads only the messages and applies its own records as it writes
/// them, and the replies still go out in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_reads_back_only_the_messages_not_its_own_delivery_records() {
    let cluster = Cluster::start(3);
    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let prefix = fresh_prefix();
    let relays = replicas(1, &cluster, &prefix, &bot, &endpoint, &[]).await;
    let targets = Arc::new(Mutex::new(vec![relays[0].url("/v1/messages")]));
    let load = Load::start(16, targets, Duration::ZERO);
    while load.acked_count() < 600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (acked, _) = load.stop().await;
    let (duplicates, _) = check_everything_arrived(
        "one replica",
        &acked,
        &bot,
        &endpoint,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(duplicates, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = records_read(&cluster, &prefix).await;
    let written = stream_records(&cluster, &prefix).await;
    println!(
        "{} messages delivered with a reply each: {written} records in the stream, {read} read back",
        acked.len()
    );
    assert!(
        written as usize >= 2 * acked.len(),
        "the deliveries are recorded too: {written} records for {} messages",
        acked.len()
    );
    assert!(
        (read as usize) <= acked.len() + acked.len() / 10 + 50,
        "{read} records read back for {} messages",
        acked.len()
    );
}

/// A replica that dies between sending a dead letter back and taking it out
/// of the list used to leave it listed: once its claim ran out, a discard
/// took it too (it was both redriven and discarded), or a redrive sent it
/// back once more. The partition's owner now takes it out as it applies the
/// record that sent it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_letter_sent_back_by_a_redrive_that_died_half_way_leaves_the_list() {
    let n = 5;
    let cluster = Cluster::start(1);
    let prefix = fresh_prefix();
    let bot = Peer::start(|_| Answer::status(500)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let flags = [
        "--max-attempts=1",
        "--breaker-failures=0",
        "--nats-redrive-claim-ttl=1s",
    ];
    let survivor = replicas(1, &cluster, &prefix, &bot, &endpoint, &flags).await;
    let mut dying_flags = flags.to_vec();
    dying_flags.push("--nats-exit-mid-redrive");
    let mut dying = replicas(1, &cluster, &prefix, &bot, &endpoint, &dying_flags).await;
    let (survivor, dying) = (&survivor[0], &mut dying[0]);
    for c in 0..n {
        let (status, _) = survivor
            .send(&message("u", &format!("c{c}"), &format!("c{c}-m0"), "0"))
            .await;
        assert_eq!(status, 200);
    }
    wait_for_dead_letters(
        survivor,
        n,
        Duration::from_secs(20),
        "not all dead-lettered",
    )
    .await;
    bot.set(echo);
    let failed = bot.received().len();
    // The dying replica sends one letter back, then exits.
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let url = format!("http://{}/dead-letters/redrive", dying.admin);
    let _ = request("POST", &url, &[("authorization", &auth)], vec![]).await;
    assert_eq!(dying.wait_exit(Duration::from_secs(10)), Some(137));
    // Its partitions move to the survivor, which delivers the letter and
    // takes it out of the list.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bot.received().len() == failed {
        assert!(
            Instant::now() < deadline,
            "the letter sent back never reached the bot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = |r: &Received| {
        r.body["tags"]["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let sent_back = id(&bot.received()[failed]);
    wait_for_dead_letters(
        survivor,
        n - 1,
        Duration::from_secs(10),
        "the letter sent back is still listed",
    )
    .await;
    // A discard takes the others only, and a redrive finds nothing left.
    let (status, discard) = admin(survivor, "POST", "/dead-letters/discard").await;
    assert_eq!(status, 200, "{discard}");
    let (status, redrive) = admin(survivor, "POST", "/dead-letters/redrive").await;
    assert_eq!(status, 200, "{redrive}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_bot: Vec<String> = bot.received()[failed..].iter().map(id).collect();
    println!(
        "after a redrive that died half way: the bot got {at_bot:?}; then a discard {discard}, a redrive {redrive}"
    );
    assert_eq!(
        at_bot,
        [sent_back],
        "the letter sent back reached the bot once"
    );
    assert_eq!(
        discard["discarded"],
        n - 1,
        "the letter sent back is not discarded too"
    );
    assert_eq!(redrive["redriven"], 0);
    assert_eq!(admin(survivor, "GET", "/dead-letters").await.1["total"], 0);
    assert_eq!(
        survivor
            .metric("botrelay_dead_letters", &[("target", "bot")])
            .await,
        0.0
    );
}

/// The waiting messages of a partition given back to another replica leave
/// the first one's queues at once: `botrelay_queue_depth` summed over the
/// replicas is what waits, and back-pressure counts only what the replica
/// delivers. They used to stay until the replica tried them, which a paused
/// or unreachable target puts off for as long as it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_of_a_partition_given_away_leave_the_queue_depth_of_the_replica() {
    let cluster = Cluster::start(3);
    let prefix = fresh_prefix();
    let bot = Peer::start(|_| Answer::status(503)).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let quick = [
        "--retry-initial-backoff=100ms",
        "--retry-max-backoff=1s",
        "--max-attempts=1000",
    ];
    let mut relays = replicas(1, &cluster, &prefix, &bot, &endpoint, &quick).await;
    let (status, _) = admin(&relays[0], "POST", "/targets/bot/pause").await;
    assert_eq!(status, 200);
    let n = 120;
    for i in 0..n {
        let (status, body) = relays[0]
            .send(&message("u", &format!("c{i}"), &format!("m{i}"), "hi"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        relays[0]
            .wait_for_metric("botrelay_queue_depth", &[("target", "bot")], |d| d
                == n as f64)
            .await,
        n as f64
    );
    // A second replica takes about half of the partitions; its bot answers
    // 503, so nothing is delivered meanwhile.
    relays.extend(replicas(1, &cluster, &prefix, &bot, &endpoint, &quick).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = (0.0, 0.0);
    let mut settled_since = None;
    while Instant::now() < deadline {
        seen = (depth(&relays[0]).await, depth(&relays[1]).await);
        if seen.1 > 0.0 && seen.0 + seen.1 == n as f64 {
            let since = *settled_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(4) {
                break;
            }
        } else {
            settled_since = None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{n} messages waiting: queue depth {} + {}", seen.0, seen.1);
    assert!(seen.1 > 0.0, "the second replica took partitions: {seen:?}");
    assert_eq!(
        seen.0 + seen.1,
        n as f64,
        "the replicas' queue depths add up to what waits: {seen:?}"
    );
    // Both deliver their share once the bot answers and the first resumes.
    bot.set(echo);
    let (status, _) = admin(&relays[0], "POST", "/targets/bot/resume").await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delivered = 0.0;
    while delivered < n as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        delivered = delivered_by(&relays[0]).await + delivered_by(&relays[1]).await;
    }
    assert_eq!(delivered, n as f64);
    for relay in &relays {
        let left = relay
            .wait_for_metric("botrelay_queue_depth", &[("target", "bot")], |d| d == 0.0)
            .await;
        assert_eq!(left, 0.0);
    }
}

async fn depth(relay: &Relay) -> f64 {
    relay
        .metric("botrelay_queue_depth", &[("target", "bot")])
        .await
}
