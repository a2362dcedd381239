//! Start-up, the running relay, and its orderly stop.

use crate::admin::Admin;
use crate::api::Api;
use crate::config::{Config, StoreKind};
use crate::credentials::CredentialStore;
use crate::delivery::{
    self, Deliverer, FailureLog,
    backoff::Backoff,
    http::{AnswerBudget, Endpoint, Sender},
    now_ms,
};
use crate::disk::DiskGuard;
use crate::metrics::Metrics;
use crate::outgoing::TargetExtras;
use crate::serve::{self, Limits};
use crate::store::{EmbeddedStore, MemoryStore, Op, Outcome, PRUNE_PARTS, Store, Target};
use crate::turns::Turns;
use crate::writer::Writer;
use anyhow::{Context, anyhow};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Recovered messages read ahead of the delivery schedulers.
const RECOVERY_READ_AHEAD: usize = 4096;

/// Writes waiting for a store sync before clients get `503`.
const WRITE_QUEUE: usize = 16 * 1024;
/// How often dedupe entries older than the window are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often, after a prune round, a compaction under way is checked on.
const TIDY_EVERY: Duration = Duration::from_secs(1);

/// At shutdown, after the last sync, how long connections still open past
/// the drain timeout get to send the answers that sync made.
const LAST_ANSWERS: Duration = Duration::from_secs(1);

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs the relay until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = Metrics::new(&config.endpoint_name);
    let (credentials, credential_texts) =
        CredentialStore::open(&config.credentials_dir).map_err(|e| anyhow!("credentials: {e}"))?;
    // Refused before anything else is opened; errors name the flag.
    let bot_extras = TargetExtras::load(&config.outgoing, Target::Bot).map_err(|e| anyhow!(e))?;
    let response_extras =
        TargetExtras::load(&config.outgoing, Target::Response).map_err(|e| anyhow!(e))?;

    let mut nats = None;
    let store: Arc<dyn Store> = match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Nats => {
            let store = Arc::new(crate::cluster::NatsStore::new(
                config.nats.clone(),
                &config.endpoint_name,
                config.dedupe_window,
                config.conversation_retention,
            ));
            nats = Some(store.clone());
            store
        }
        StoreKind::Embedded => {
            let dir = config.data_dir.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir))
                    .await?
                    .context("opening the embedded store")?,
            )
        }
    };

    let memory_limit = crate::config::memory_limit();
    let (max_pending, from_memory_limit) = config.max_pending(memory_limit);
    if from_memory_limit {
        tracing::info!(
            max_pending,
            memory_limit_bytes = memory_limit,
            "at most this many messages may wait, to fit the memory limit (--max-pending sets it)"
        );
    }

    let disk = match config.store {
        StoreKind::Embedded => Some(DiskGuard::new(
            config.data_dir.clone(),
            config.disk_reserve_bytes,
            store.clone(),
            metrics.clone(),
        )),
        StoreKind::Memory | StoreKind::Nats => None,
    };
    let disk_bytes = disk.as_ref().and_then(|disk| disk.total());
    let (dedupe_max, derived) = config.dedupe_max_entries(memory_limit, disk_bytes);
    if derived {
        tracing::info!(
            dedupe_max_entries = dedupe_max,
            memory_limit_bytes = memory_limit,
            data_filesystem_bytes = disk_bytes,
            "at most this many messageIds are remembered for dedupe, to fit the memory limit and the disk (--dedupe-max-entries sets it)"
        );
    }

    // A pause by hand is stored beside the embedded store; with the memory
    // store it goes with everything else, and with NATS it is the replica's.
    let pause_dir = (config.store == StoreKind::Embedded).then_some(config.data_dir.as_path());
    let controls = Arc::new(
        delivery::control::Controls::open(&config.control, &metrics, pause_dir)
            .context("reading the pauses of the targets in --data-dir")?,
    );

    let (queues, inboxes) = delivery::queues();
    let (writer, syncer_thread) =
        Writer::start(store.clone(), queues.clone(), metrics.clone(), WRITE_QUEUE);
    let (stop_tx, stop) = watch::channel(false);
    let (answer_memory, derived) = config.answer_memory(memory_limit);
    if derived {
        tracing::info!(
            answer_memory_bytes = answer_memory,
            memory_limit_bytes = memory_limit,
            "the bots' answers in flight, and the replies held for waiting requests, each get this much memory, to fit the memory limit (--answer-memory-bytes sets it)"
        );
    }
    let answer_memory = usize::try_from(answer_memory).unwrap_or(usize::MAX);
    let answer_budget = AnswerBudget::new(answer_memory);
    // Replies held for waiting requests: as much again as the bots' answers
    // in flight (--answer-memory-bytes), beside them.
    let turns = Arc::new(Turns::with_memory(answer_memory));
    let failure_logs: Arc<[FailureLog; 2]> = Arc::default();
    let deliverer = Deliverer {
        store: store.clone(),
        writer: writer.clone(),
        // Only the bot's answers are kept: they carry its replies.
        senders: [
            (&config.bot_url, Some(answer_budget), bot_extras.clone()),
            (&config.response_url, None, response_extras.clone()),
        ]
        .map(|(url, budget, extras)| {
            Sender::with_extras(
                Endpoint::new(url),
                budget,
                config.connect_timeout,
                config.max_in_flight as usize,
                extras,
            )
        }),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        bot_timeout: config.bot_timeout,
        response_timeout: config.response_timeout,
        backoff: Backoff {
            initial: config.retry_initial_backoff,
            max: config.retry_max_backoff,
        },
        max_attempts: config.max_attempts,
        max_age: config.max_message_age,
        max_replies: config.max_replies_per_answer as usize,
        failure_logs: failure_logs.clone(),
        turns: turns.clone(),
    };
    // Probes go the way deliveries go: the same senders and keys.
    let probers = crate::store::Target::ALL.map(|target| delivery::probe::Prober {
        target,
        sender: deliverer.senders[target.index()].clone(),
        credentials: credentials.clone(),
        timeout: match target {
            crate::store::Target::Bot => deliverer.bot_timeout,
            crate::store::Target::Response => deliverer.response_timeout,
        },
        control: controls.get(target).clone(),
    });
    let mut engine = delivery::start(
        inboxes,
        &queues,
        deliverer,
        &controls,
        config.max_in_flight as usize,
        max_pending,
        stop.clone(),
        config.drain_timeout,
    );

    // The NATS store queues each partition's messages as it takes the partition.
    if let Some(nats) = &nats {
        nats.start(queues.clone());
    }

    // The schedulers are running, so they take the recovered messages as they
    // are read instead of all of them piling up in the queues' channels.
    let waiting = {
        let (store, queues) = (store.clone(), queues.clone());
        tokio::task::spawn_blocking(move || {
            let mut waiting = 0usize;
            store
                .recover(&mut |pending| {
                    waiting += 1;
                    queues.push(pending);
                    // Read no further ahead of the schedulers than this, so that a
                    // long backlog is not held twice in memory while it is read.
                    while queues.unread() > RECOVERY_READ_AHEAD {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .map(|_| waiting)
        })
        .await?
        .context("reading the stored messages")?
    };

    let api_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;

    let draining = Arc::new(AtomicBool::new(false));
    let api = Arc::new(Api {
        credentials: credentials.clone(),
        store: store.clone(),
        writer: writer.clone(),
        queues: queues.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
        max_body_bytes: config.max_body_bytes,
        body_read_timeout: config.body_read_timeout,
        max_pending,
        dedupe_window: config.dedupe_window,
        disk: disk.clone(),
        turns: turns.clone(),
        max_wait: config.max_wait,
        max_replies: config.max_replies_per_answer as usize,
    });
    let admin = Arc::new(Admin {
        store: store.clone(),
        writer: writer.clone(),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
        targets: controls.clone(),
    });

    let mut background = vec![
        tokio::spawn(credentials.clone().watch(
            credential_texts,
            config.credentials_poll_interval,
            metrics.clone(),
        )),
        tokio::spawn(prune(Pruning {
            writer: writer.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            dedupe_window: config.dedupe_window,
            dedupe_max,
            conversation_retention: config.conversation_retention,
        })),
    ];
    background.push(tokio::spawn(log_unreported_failures(failure_logs.clone())));
    if let Some(disk) = disk {
        background.push(tokio::spawn(disk.watch()));
    }
    if !config.control.probe_interval.is_zero() {
        for prober in probers {
            background.push(tokio::spawn(prober.run(config.control.probe_interval)));
        }
    }
    if let Some(nats) = &nats {
        let (nats, turns) = (nats.clone(), turns.clone());
        let prefix = config.nats.prefix(&config.endpoint_name);
        background.push(tokio::spawn(async move {
            turns.connect_replicas(nats.client().await, &prefix);
        }));
    }
    for extras in [bot_extras, response_extras] {
        if extras.watched() {
            background.push(tokio::spawn(extras.watch(config.credentials_poll_interval)));
        }
    }
    let (api_stop_tx, api_stop) = watch::channel(false);
    let api_server = tokio::spawn(serve::serve(
        api_listener,
        Limits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            drain: config.drain_timeout,
        },
        api_stop,
        move |req| api.clone().handle(req),
    ));
    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let admin_server = tokio::spawn(serve::serve(
        admin_listener,
        Limits {
            max_connections: 256,
            header_read_timeout: config.header_read_timeout,
            drain: Duration::from_secs(1),
        },
        admin_stop,
        move |req| admin.clone().handle(req),
    ));

    macro_rules! serving {
        ($($field:tt)*) => {
            tracing::info!(
                endpoint = %config.endpoint_name,
                listen = %config.listen,
                admin_listen = %config.admin_listen,
                store = ?config.store,
                waiting,
                max_pending,
                worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
                startup_ms = started.elapsed().as_millis() as u64,
                $($field)*
            )
        };
    }
    match store.unavailable() {
        None => serving!("botrelay is ready"),
        // Serving, but `/readyz` says 503 until the store is reachable (a
        // NATS that is down): the line that says ready comes then.
        Some(why) => {
            serving!(not_ready = %why, "botrelay is up, not ready yet");
            let store = store.clone();
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                while store.unavailable().is_some() {
                    tick.tick().await;
                }
                tracing::info!(
                    startup_ms = started.elapsed().as_millis() as u64,
                    "botrelay is ready"
                );
            }));
        }
    }

    shutdown.await;
    let answered_before = writer.answered();

    // 1. Refuse new messages and stop accepting; requests under way finish
    //    (their writes are still synced).
    tracing::info!("shutting down: draining requests and deliveries under way");
    draining.store(true, Ordering::Relaxed);
    turns.drain();
    let _ = api_stop_tx.send(true);
    let api_leftover = api_server.await.ok().flatten();
    // 2. Stop starting deliveries; let those under way finish.
    let _ = stop_tx.send(true);
    while engine.join_next().await.is_some() {}
    // 3. Commit what is left and close the store.
    for task in background {
        task.abort();
    }
    writer.close().await;
    tokio::task::spawn_blocking(move || syncer_thread.join())
        .await?
        .map_err(|_| anyhow!("the store syncer panicked"))?;
    // 4. Requests past the drain timeout that the last syncs covered have
    //    just been answered: their connections get a moment to send the
    //    answer (their messages are stored, and a client left without an
    //    answer would send them again). With nothing answered since the
    //    stop began, none of the open connections waits for an answer.
    if let Some(leftover) = api_leftover
        && writer.answered() > answered_before
    {
        let _ = tokio::time::timeout(LAST_ANSWERS, leftover).await;
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin_server.await;
    // The last of a burst of failures, which their once-a-second line has not
    // counted yet.
    log_unreported(&failure_logs, now_ms() + 3_600_000);
    let waiting = queues.pending();
    match config.store {
        StoreKind::Embedded => tracing::info!(
            waiting,
            "botrelay stopped; waiting messages are delivered after the next start"
        ),
        // Nothing of the memory store outlives the process.
        StoreKind::Memory if waiting > 0 => tracing::warn!(
            waiting,
            "botrelay stopped; the waiting messages are lost: the memory store keeps nothing across a restart (--store embedded does)"
        ),
        StoreKind::Memory => tracing::info!(waiting, "botrelay stopped; nothing was waiting"),
        StoreKind::Nats => tracing::info!(
            waiting,
            // Whether its leases were given back or are left to run out
            // (NATS out of reach) was said just before.
            "botrelay stopped; the other replicas (or the next start) deliver what waits, once they hold its partitions"
        ),
    }
    Ok(())
}

/// Once a second, the refused messages, the failed deliveries and the
/// deliveries the store could not record that went without a log line (one
/// a second at most is written as they happen), so that the last of a burst
/// are reported too.
async fn log_unreported_failures(failure_logs: Arc<[FailureLog; 2]>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        log_unreported(&failure_logs, now_ms());
    }
}

/// The failures that went without a line, if the second since the last line
/// is over at `now` (at the exit: any time after).
fn log_unreported(failure_logs: &[FailureLog; 2], now: u64) {
    crate::api::log_unreported_refusals(now);
    crate::writer::log_unreported_failures(now);
    delivery::log_unreported_unrecorded(now);
    for target in Target::ALL {
        if let Some(unlogged) = failure_logs[target.index()].unreported(now) {
            tracing::warn!(
                to = target.as_str(),
                failed_since_last_warning = unlogged,
                "more deliveries failed since the last warning; they will be retried"
            );
        }
    }
}

/// What the minute's prune needs.
struct Pruning {
    writer: Writer,
    store: Arc<dyn Store>,
    metrics: Metrics,
    dedupe_window: Duration,
    /// `--dedupe-max-entries`; `None`: no limit.
    dedupe_max: Option<u64>,
    conversation_retention: Duration,
}

/// Forgets, once a minute, the message ids past the dedupe window (and the
/// oldest beyond `--dedupe-max-entries`) and the conversations past their
/// retention (none when it is zero), one part of the keys per commit.
async fn prune(pruning: Pruning) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        pruning.round(now_ms()).await;
        pruning.tidy().await;
    }
}

impl Pruning {
    /// Lets the store give back the disk that the round (or anything before
    /// it) made dead, even if no write follows: a compaction it starts is
    /// checked once a second until it is swapped in, up to the next round.
    async fn tidy(&self) {
        for _ in 1..PRUNE_EVERY.as_secs() {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.maintain()).await {
                Ok(Ok(true)) => tokio::time::sleep(TIDY_EVERY).await,
                Ok(Ok(false)) | Err(_) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not compact the journal");
                    return;
                }
            }
        }
    }

    async fn round(&self, now: u64) {
        let before = |d: Duration| now.saturating_sub(d.as_millis() as u64);
        let dedupe_before = before(self.dedupe_window);
        let conversations_before =
            (!self.conversation_retention.is_zero()).then(|| before(self.conversation_retention));
        // Over the limit, each part keeps its share of nine tenths of it,
        // which leaves room for the minute until the next round.
        let keep = self
            .dedupe_max
            .filter(|&max| self.store.dedupe_count() > max)
            .map(|max| {
                usize::try_from((max - max / 10) / u64::from(PRUNE_PARTS)).unwrap_or(usize::MAX)
            });
        let (mut forgotten_early, mut latest_cutoff) = (0u64, None::<u64>);
        for part in (0..PRUNE_PARTS).map(Some) {
            let prune = Op::PruneDedupe {
                before_ms: dedupe_before,
                part,
            };
            if let Err(e) = self.writer.commit(prune).await {
                tracing::warn!(error = %e, "could not prune the dedupe table");
                break;
            }
            let early = keep
                .and_then(|keep| self.store.dedupe_cutoff(part.expect("a part"), keep))
                .filter(|&cutoff| cutoff > dedupe_before);
            if let Some(before_ms) = early {
                match self
                    .writer
                    .commit(Op::PruneDedupe { before_ms, part })
                    .await
                {
                    Ok(Outcome::Pruned(n)) => {
                        forgotten_early += n;
                        latest_cutoff = latest_cutoff.max(Some(before_ms));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not prune the dedupe table");
                        break;
                    }
                }
            }
            let Some(before_ms) = conversations_before else {
                continue;
            };
            if let Err(e) = self
                .writer
                .commit(Op::ForgetConversations { before_ms, part })
                .await
            {
                tracing::warn!(error = %e, "could not forget quiet conversations");
                break;
            }
        }
        if forgotten_early > 0 {
            self.metrics.dedupe_forgotten_early.inc_by(forgotten_early);
            let remembered =
                Duration::from_secs(now.saturating_sub(latest_cutoff.unwrap_or(now)) / 1000);
            tracing::warn!(
                forgotten = forgotten_early,
                max_entries = self.dedupe_max,
                remembered_for_at_least = %humantime::format_duration(remembered),
                "the dedupe table is full: forgot the oldest messageIds before the end of --dedupe-window; a messageId sent again after that is taken as new (raise --dedupe-max-entries, with memory and disk to match, or shorten the window)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InboundMessage;

    fn accept(id: &str, at: u64) -> Op {
        let raw = |s: &str| serde_json::value::RawValue::from_string(s.to_owned()).unwrap();
        Op::Accept {
            message: InboundMessage {
                id: format!("id-{id}"),
                conversation_id: "conv".into(),
                user_id: "user".into(),
                caller_conversation_id: "c".into(),
                caller_user_id: "u".into(),
                caller_message_id: id.into(),
                kind: "text".into(),
                text: "hi".into(),
                payload: raw(r#"{"text":"hi"}"#),
                created_at_ms: at,
                queued_at_ms: at,
                trace: None,
                waited: false,
            },
            dedupe_window_ms: 86_400_000,
        }
    }

    /// Once the window passes over the ids of messages long delivered, most
    /// of the journal is dead: the prune round gives the disk back, though
    /// no write follows it.
    #[tokio::test]
    async fn an_idle_relay_compacts_the_journal_its_prune_made_dead() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = crate::store::Tuning {
            grow_step: 4096,
            compact_min_bytes: 16 * 1024,
        };
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open_tuned(dir.path(), tuning).unwrap());
        let metrics = Metrics::new("test");
        let (queues, _inboxes) = delivery::queues();
        let (writer, syncer) = Writer::start(store.clone(), queues, metrics.clone(), 1024);
        let now = 100_000_000;
        // Ids of the last prune part only: the round's last write is the
        // prune that makes the journal dead, and no sync follows it.
        let ids = (0u64..)
            .map(|i| format!("m{i}"))
            .filter(|id| {
                crate::store::part_of(crate::store::dedupe_key(id.as_bytes())) == PRUNE_PARTS - 1
            })
            .take(500);
        for (i, id) in ids.enumerate() {
            let Outcome::Accepted { pending, .. } =
                writer.commit(accept(&id, now + i as u64)).await.unwrap()
            else {
                panic!("accepted")
            };
            let done = Op::CompleteInbound {
                seq: pending.seq,
                replies: Vec::new(),
            };
            writer.commit(done).await.unwrap();
        }
        let journal = dir.path().join(crate::store::embedded_file_name());
        let before = std::fs::metadata(&journal).unwrap().len();
        let pruning = Pruning {
            writer: writer.clone(),
            store: store.clone(),
            metrics,
            dedupe_window: Duration::from_secs(3600),
            dedupe_max: None,
            conversation_retention: Duration::ZERO,
        };
        // Two hours on: every id is past the window.
        pruning.round(now + 7_200_000).await;
        pruning.tidy().await;
        let after = std::fs::metadata(&journal).unwrap().len();
        assert!(
            after < before / 4,
            "the journal went from {before} to {after} bytes"
        );
        assert_eq!(store.dedupe_count(), 0);
        writer.close().await;
        syncer.join().unwrap();
    }

    #[tokio::test]
    async fn a_full_dedupe_table_forgets_its_oldest_ids_and_says_so() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let metrics = Metrics::new("test");
        let (queues, _inboxes) = delivery::queues();
        let (writer, syncer) = Writer::start(store.clone(), queues, metrics.clone(), 1024);
        let now = 10_000_000;
        // 2,000 ids over the last 2,000 seconds, the oldest first.
        for i in 0..2000u64 {
            writer
                .commit(accept(&format!("m{i}"), now - 2_000_000 + i * 1000))
                .await
                .unwrap();
        }
        let pruning = |dedupe_max| Pruning {
            writer: writer.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            dedupe_window: Duration::from_secs(24 * 3600),
            dedupe_max,
            conversation_retention: Duration::ZERO,
        };
        // Without a limit, or under it, a round within the window forgets nothing.
        pruning(None).round(now).await;
        pruning(Some(2000)).round(now).await;
        assert_eq!(store.dedupe_count(), 2000);
        assert_eq!(metrics.dedupe_forgotten_early.get(), 0);

        pruning(Some(640)).round(now).await;
        let left = store.dedupe_count();
        assert!(
            (500..=576).contains(&left),
            "nine tenths of the limit, give or take a part's rounding: {left}"
        );
        assert_eq!(metrics.dedupe_forgotten_early.get(), 2000 - left);
        let taken_as_new = |id: &str| {
            let (writer, id) = (writer.clone(), id.to_owned());
            async move {
                matches!(
                    writer.commit(accept(&id, now)).await.unwrap(),
                    Outcome::Accepted { .. }
                )
            }
        };
        assert!(taken_as_new("m0").await, "the oldest was forgotten");
        assert!(!taken_as_new("m1999").await, "the newest is remembered");
        writer.close().await;
        syncer.join().unwrap();
    }
}
