//! Group commit: one thread owns all writes to the store. Requests that arrive
//! while a commit is being made durable wait in the channel and go together
//! into the next transaction, so one fsync covers a whole batch and throughput
//! does not pay for durability request by request.
//!
//! The writer also hands what each commit made due to the delivery queues, in
//! commit order: that is what keeps the messages of a conversation in order.

use crate::delivery::Queues;
use crate::metrics::Metrics;
use crate::store::{Op, Outcome, Store};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Most ops in one transaction; bounds the latency a huge backlog can add.
const MAX_BATCH: usize = 2048;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("store write failed: {0}")]
    Store(String),
    #[error("too many writes waiting")]
    Busy,
    #[error("the relay is shutting down")]
    Closed,
}

struct Request {
    op: Op,
    done: oneshot::Sender<Result<Outcome, CommitError>>,
}

// `Close` is sent once per process; boxing `Commit` would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
enum Message {
    Commit(Request),
    /// Commit what came before, then stop.
    Close,
}

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Message>,
}

impl Writer {
    /// Starts the writer thread. It ends at `close` or once every `Writer` clone
    /// is dropped, after committing the requests already sent.
    pub fn start(
        store: Arc<dyn Store>,
        queues: Queues,
        metrics: Metrics,
        capacity: usize,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(rx, store, queues, metrics))
            .expect("spawn the store writer thread");
        (Writer { tx }, thread)
    }

    /// Commits `op`, waiting for room in the queue if needed.
    pub async fn commit(&self, op: Op) -> Result<Outcome, CommitError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Message::Commit(Request { op, done }))
            .await
            .map_err(|_| CommitError::Closed)?;
        wait.await.map_err(|_| CommitError::Closed)?
    }

    /// Queues `op` for the next commit without waiting for it to be durable; a
    /// failure to commit is logged by the writer.
    pub async fn submit(&self, op: Op) -> Result<(), CommitError> {
        let (done, _) = oneshot::channel();
        self.tx
            .send(Message::Commit(Request { op, done }))
            .await
            .map_err(|_| CommitError::Closed)
    }

    /// Commits `op`, or fails at once with `Busy` when the queue is full, so a
    /// client can be told to come back rather than pile up in memory.
    pub async fn try_commit(&self, op: Op) -> Result<Outcome, CommitError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .try_send(Message::Commit(Request { op, done }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => CommitError::Busy,
                mpsc::error::TrySendError::Closed(_) => CommitError::Closed,
            })?;
        wait.await.map_err(|_| CommitError::Closed)?
    }

    /// Stops the writer once everything sent before is committed; later
    /// commits fail with `Closed`.
    pub async fn close(&self) {
        let _ = self.tx.send(Message::Close).await;
    }
}

fn run(mut rx: mpsc::Receiver<Message>, store: Arc<dyn Store>, queues: Queues, metrics: Metrics) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut open = true;
    while open {
        match rx.blocking_recv() {
            Some(Message::Commit(first)) => batch.push(first),
            Some(Message::Close) | None => break,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Message::Commit(request)) => batch.push(request),
                Ok(Message::Close) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let (ops, waiters): (Vec<Op>, Vec<_>) = batch.drain(..).map(|r| (r.op, r.done)).unzip();
        metrics.store_batch_size.observe(ops.len() as f64);
        let started = Instant::now();
        let result = store.commit(ops);
        metrics
            .store_commit_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) => {
                for (outcome, done) in outcomes.into_iter().zip(waiters) {
                    for pending in outcome.due() {
                        queues.push(pending.clone());
                    }
                    // The requester may have gone (client disconnected); the commit stands.
                    let _ = done.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; the batch was not stored");
                let e = CommitError::Store(e.to_string());
                for done in waiters {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("store writer stopped");
}
