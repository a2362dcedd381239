//! Start-up, the running relay, and its orderly stop.

use crate::admin::Admin;
use crate::api::Api;
use crate::config::{Config, StoreKind};
use crate::credentials::CredentialStore;
use crate::delivery::{
    self, Deliverer,
    backoff::Backoff,
    http::{Endpoint, Sender},
    now_ms,
};
use crate::metrics::Metrics;
use crate::serve::{self, Limits};
use crate::store::{EmbeddedStore, MemoryStore, Op, PRUNE_PARTS, Store};
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

    let store: Arc<dyn Store> = match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
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

    let (queues, inboxes) = delivery::queues();
    let (writer, syncer_thread) =
        Writer::start(store.clone(), queues.clone(), metrics.clone(), WRITE_QUEUE);
    let (stop_tx, stop) = watch::channel(false);
    let deliverer = Deliverer {
        store: store.clone(),
        writer: writer.clone(),
        senders: [&config.bot_url, &config.response_url].map(|url| {
            Sender::new(
                Endpoint::new(url),
                config.connect_timeout,
                config.max_in_flight as usize,
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
        failure_logs: Default::default(),
    };
    let mut engine = delivery::start(
        inboxes,
        &queues,
        deliverer,
        config.max_in_flight as usize,
        stop.clone(),
        config.drain_timeout,
    );

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
    });
    let admin = Arc::new(Admin {
        store: store.clone(),
        writer: writer.clone(),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
    });

    let background = [
        tokio::spawn(credentials.clone().watch(
            credential_texts,
            config.credentials_poll_interval,
            metrics.clone(),
        )),
        tokio::spawn(prune(
            writer.clone(),
            config.dedupe_window,
            config.conversation_retention,
        )),
    ];
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

    tracing::info!(
        endpoint = %config.endpoint_name,
        listen = %config.listen,
        admin_listen = %config.admin_listen,
        store = ?config.store,
        waiting,
        max_pending,
        startup_ms = started.elapsed().as_millis() as u64,
        "botrelay is ready"
    );

    shutdown.await;

    // 1. Refuse new messages and stop accepting; requests under way finish
    //    (their writes are still synced).
    tracing::info!("shutting down: draining requests and deliveries under way");
    draining.store(true, Ordering::Relaxed);
    let _ = api_stop_tx.send(true);
    let _ = api_server.await;
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
    let _ = admin_stop_tx.send(true);
    let _ = admin_server.await;
    tracing::info!(
        waiting = queues.pending(),
        "botrelay stopped; waiting messages are delivered after the next start"
    );
    Ok(())
}

/// Forgets, once a minute, the message ids past the dedupe window and the
/// conversations past their retention (none when it is zero), one part of
/// the keys per commit.
async fn prune(writer: Writer, dedupe_window: Duration, conversation_retention: Duration) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        let before = |d: Duration| now_ms().saturating_sub(d.as_millis() as u64);
        let dedupe_before = before(dedupe_window);
        let conversations_before =
            (!conversation_retention.is_zero()).then(|| before(conversation_retention));
        for part in (0..PRUNE_PARTS).map(Some) {
            let prune = Op::PruneDedupe {
                before_ms: dedupe_before,
                part,
            };
            if let Err(e) = writer.commit(prune).await {
                tracing::warn!(error = %e, "could not prune the dedupe table");
                break;
            }
            let Some(before_ms) = conversations_before else {
                continue;
            };
            if let Err(e) = writer
                .commit(Op::ForgetConversations { before_ms, part })
                .await
            {
                tracing::warn!(error = %e, "could not forget quiet conversations");
                break;
            }
        }
    }
}
