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
use std::time::{Duration, Instant};
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

/// Gathers a batch. Under load, the requests answered by the last commit come
/// back a moment after it: starting the next commit at once would take only the
/// first few and make the rest wait a whole commit. So, while a batch is smaller
/// than recent ones, the writer waits a little for the rest: at most half the
/// last commit's duration, and never more than `MAX_GATHER`. Under light load
/// recent batches are small and the writer does not wait.
struct Gatherer {
    /// Moving average of recent batch sizes.
    typical: f64,
    /// Duration of the last commit.
    last_commit: Duration,
    /// The longest the writer waits for a batch to fill.
    max_wait: Duration,
}

/// `Gatherer::max_wait` of the writer: well under a commit's usual duration.
const MAX_GATHER: Duration = Duration::from_micros(1500);

impl Gatherer {
    /// Fills `batch`; returns false when the writer is asked to close.
    fn gather(&mut self, rx: &mut mpsc::Receiver<Message>, batch: &mut Vec<Request>) -> bool {
        match rx.blocking_recv() {
            Some(Message::Commit(first)) => batch.push(first),
            Some(Message::Close) | None => return false,
        }
        let want = ((self.typical * 0.8) as usize).clamp(1, MAX_BATCH);
        let deadline = Instant::now() + (self.last_commit / 2).min(self.max_wait);
        let mut open = true;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Message::Commit(request)) => batch.push(request),
                Ok(Message::Close) => {
                    open = false;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty)
                    if batch.len() < want && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(_) => break,
            }
        }
        self.typical = self.typical * 0.7 + batch.len() as f64 * 0.3;
        open
    }
}

fn run(mut rx: mpsc::Receiver<Message>, store: Arc<dyn Store>, queues: Queues, metrics: Metrics) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut gatherer = Gatherer {
        typical: 1.0,
        last_commit: Duration::ZERO,
        max_wait: MAX_GATHER,
    };
    let mut open = true;
    while open {
        open = gatherer.gather(&mut rx, &mut batch);
        if batch.is_empty() {
            break;
        }
        let (ops, waiters): (Vec<Op>, Vec<_>) = batch.drain(..).map(|r| (r.op, r.done)).unzip();
        metrics.store_batch_size.observe(ops.len() as f64);
        let started = Instant::now();
        let result = store.commit(ops);
        gatherer.last_commit = started.elapsed();
        metrics
            .store_commit_duration
            .observe(gatherer.last_commit.as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Message {
        let (done, _) = oneshot::channel();
        Message::Commit(Request {
            op: Op::PruneDedupe { before_ms: 0 },
            done,
        })
    }

    #[test]
    fn a_lone_request_under_light_load_is_not_held() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.try_send(request()).unwrap();
        let mut gatherer = Gatherer {
            typical: 1.0,
            last_commit: Duration::from_millis(50),
            max_wait: Duration::from_secs(5),
        };
        let mut batch = Vec::new();
        let started = Instant::now();
        assert!(gatherer.gather(&mut rx, &mut batch));
        assert_eq!(batch.len(), 1);
        assert!(
            started.elapsed() < Duration::from_millis(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn under_load_the_writer_waits_a_bounded_moment_for_the_batch_to_fill() {
        let (tx, mut rx) = mpsc::channel(256);
        // A long allowed wait, so that a slow machine cannot make this test flaky:
        // the wait ends as soon as the batch is near its typical size.
        let mut gatherer = Gatherer {
            typical: 40.0,
            last_commit: Duration::from_secs(10),
            max_wait: Duration::from_secs(5),
        };
        tx.try_send(request()).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            for _ in 0..39 {
                tx.try_send(request()).unwrap();
            }
            tx
        });
        let mut batch = Vec::new();
        let started = Instant::now();
        assert!(gatherer.gather(&mut rx, &mut batch));
        assert!(
            batch.len() >= 32,
            "gathered {} of the 40 that arrived",
            batch.len()
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "stopped waiting once the batch was full"
        );
        let tx = sender.join().unwrap();
        while rx.try_recv().is_ok() {}
        // Nothing more comes: the wait ends at max_wait.
        gatherer.max_wait = Duration::from_millis(30);
        tx.try_send(request()).unwrap();
        let mut batch = Vec::new();
        let started = Instant::now();
        assert!(gatherer.gather(&mut rx, &mut batch));
        assert_eq!(batch.len(), 1);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(30) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        tx.try_send(Message::Close).unwrap();
        assert!(!gatherer.gather(&mut rx, &mut Vec::new()));
    }
}
