//! Group commit. A request writes its op to the store itself, under one lock
//! that orders all writes; the write is visible at once but not yet durable.
//! One thread, the syncer, makes writes durable: each sync covers every write
//! made while the previous one was under way, so throughput does not pay for
//! durability request by request, and no request waits on another thread to
//! have its op applied.
//!
//! Nothing is answered before it is durable. Once a sync returns, the syncer
//! hands what its writes made due to the delivery queues, in write order (that
//! is what keeps the messages of a conversation in order), then hands the
//! answers to the requests it covered to the runtime in one batch. A store
//! whose writes are durable at once (`memory`) skips the syncer. A remote
//! store (`nats`) takes each op as it comes and queues deliveries itself,
//! from its log.

use crate::delivery::{FailureLog, Queues, now_ms};
use crate::metrics::Metrics;
use crate::store::{Op, Outcome, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("the store takes no writes: {0}")]
    Store(String),
    #[error("too many writes waiting")]
    Busy,
    #[error("the relay is shutting down")]
    Closed,
    /// The op is larger than the store takes in one write (`--store nats`:
    /// the servers' `max_payload`); sending it again cannot help.
    #[error("{0}")]
    TooLarge(String),
}

/// Failed writes, as logged.
static WRITE_FAILURES: FailureLog = FailureLog::new(Duration::from_secs(1));

/// Logs the failed writes that went without a line, once the second since
/// the last is over: the last of a burst are reported too.
pub fn log_unreported_failures(now: u64) {
    if let Some(unlogged) = WRITE_FAILURES.unreported(now) {
        tracing::error!(
            unlogged,
            "more store writes failed since the last line; their ops were not stored"
        );
    }
}

/// A store that commits ops itself, over the network, each as it comes: the
/// store's own log, not this writer, then orders what becomes due.
pub trait RemoteStore: Send + Sync {
    /// Commits `op`; with `bounded`, fails with `Busy` rather than let too
    /// many writes pile up.
    fn commit(
        self: Arc<Self>,
        op: Op,
        bounded: bool,
    ) -> futures::future::BoxFuture<'static, Result<Outcome, CommitError>>;
    /// Called once, at shutdown, after the last delivery.
    fn close(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()>;
}

type Done = oneshot::Sender<Result<Outcome, CommitError>>;

/// The answers to the commits one sync covered, in write order.
type Answers = Vec<(Done, Result<Outcome, CommitError>)>;

/// A write waiting for the sync that makes it durable.
struct Unsynced {
    outcome: Outcome,
    /// None for `submit`, whose caller does not wait.
    done: Option<Done>,
}

struct State {
    /// Writes since the last sync began, in write order.
    unsynced: Vec<Unsynced>,
    /// When the first of them was written (one clock read per sync, not per write).
    oldest: Option<Instant>,
    closed: bool,
}

struct Shared {
    store: Arc<dyn Store>,
    queues: Queues,
    metrics: Metrics,
    /// Taken by every write, so that `unsynced` is in write order.
    state: Mutex<State>,
    wake: Condvar,
    /// Most writes waiting for a sync before `try_commit` answers `Busy`.
    capacity: usize,
    /// Whether the store needs a sync to make a write durable.
    syncs: bool,
    /// Commits answered by the syncer so far.
    answered: AtomicU64,
}

#[derive(Clone)]
pub struct Writer {
    shared: Arc<Shared>,
    remote: Option<Arc<dyn RemoteStore>>,
}

impl Writer {
    /// Starts the syncer thread. It ends at `close`, after syncing every write made before.
    pub fn start(
        store: Arc<dyn Store>,
        queues: Queues,
        metrics: Metrics,
        capacity: usize,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        // Answering a commit wakes the task that waits for it. Woken from the
        // syncer's thread, each such wake is a cross-thread schedule that
        // rouses the runtime with a system call of its own; handed over as
        // one batch, a sync's answers cost one such wake, and the tasks they
        // wake are scheduled from within the runtime.
        let answerer = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(answer(rx));
            tx
        });
        Self::start_answering(store, queues, metrics, capacity, answerer)
    }

    /// [`Self::start`], with the answers of each sync sent to `answerer`, or
    /// from the syncer's thread without one.
    fn start_answering(
        store: Arc<dyn Store>,
        queues: Queues,
        metrics: Metrics,
        capacity: usize,
        answerer: Option<mpsc::UnboundedSender<Answers>>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let syncs = store.needs_sync();
        let remote = store.remote();
        let shared = Arc::new(Shared {
            store,
            queues,
            metrics,
            state: Mutex::new(State {
                unsynced: Vec::new(),
                oldest: None,
                closed: false,
            }),
            wake: Condvar::new(),
            capacity,
            syncs,
            answered: AtomicU64::new(0),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-syncer".into())
                .spawn(move || sync_loop(&shared, answerer))
                .expect("spawn the store syncer thread")
        };
        (Writer { shared, remote }, thread)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `op`, then tells `written` what it did; `done` is answered once
    /// it is durable.
    fn write(
        &self,
        op: Op,
        done: Option<Done>,
        bounded: bool,
        written: impl FnOnce(&Outcome),
    ) -> Result<(), CommitError> {
        let shared = &*self.shared;
        let mut state = self.lock();
        if state.closed {
            return Err(CommitError::Closed);
        }
        if bounded && state.unsynced.len() >= shared.capacity {
            return Err(CommitError::Busy);
        }
        let outcome = match shared.store.write(vec![op]) {
            Ok(mut outcomes) => outcomes.pop().expect("one outcome per op"),
            Err(e) => {
                // Once the store has failed, every write meets it: one line
                // a second says so.
                if let Some(unlogged) = WRITE_FAILURES.admit(now_ms()) {
                    tracing::error!(
                        error = %e,
                        unlogged,
                        "store write failed; the op was not stored (one line a second at most: unlogged counts those since the last)"
                    );
                }
                return Err(CommitError::Store(e.to_string()));
            }
        };
        written(&outcome);
        shared.queues.announce(outcome.due());
        if !shared.syncs {
            // Durable already; the lock still orders the queue pushes.
            shared.metrics.store_batch_size.observe(1.0);
            for pending in outcome.due() {
                shared.queues.push_announced(pending.clone());
            }
            drop(state);
            if let Some(done) = done {
                let _ = done.send(Ok(outcome));
            }
            return Ok(());
        }
        state.unsynced.push(Unsynced { outcome, done });
        if state.unsynced.len() == 1 {
            state.oldest = Some(Instant::now());
            shared.wake.notify_one();
        }
        Ok(())
    }

    async fn wait(
        &self,
        op: Op,
        bounded: bool,
        written: impl FnOnce(&Outcome),
    ) -> Result<Outcome, CommitError> {
        if let Some(remote) = &self.remote {
            if self.lock().closed {
                return Err(CommitError::Closed);
            }
            let outcome = remote.clone().commit(op, bounded).await?;
            written(&outcome);
            return Ok(outcome);
        }
        let (done, wait) = oneshot::channel();
        self.write(op, Some(done), bounded, written)?;
        wait.await.map_err(|_| CommitError::Closed)?
    }

    /// Commits `op` and waits until it is durable.
    pub async fn commit(&self, op: Op) -> Result<Outcome, CommitError> {
        self.wait(op, false, |_| {}).await
    }

    /// Writes `op` without waiting for it to be durable; a failure to sync is
    /// logged by the syncer.
    pub async fn submit(&self, op: Op) -> Result<(), CommitError> {
        if self.remote.is_some() {
            // A remote store's write is durable once it is written: waiting
            // for it keeps a lane's completions in its log in the order made.
            return self.wait(op, false, |_| {}).await.map(drop);
        }
        self.write(op, None, false, |_| {})
    }

    /// Commits `op`, or fails at once with `Busy` when too many writes wait for
    /// the disk, so a client can be told to come back rather than pile up in memory.
    pub async fn try_commit(&self, op: Op) -> Result<Outcome, CommitError> {
        self.wait(op, true, |_| {}).await
    }

    /// `try_commit`, telling `written` what the op did as soon as it is
    /// written, before it is durable: a caller dropped while it waits (a
    /// client gone) still knows what was stored.
    pub async fn try_commit_noting(
        &self,
        op: Op,
        written: impl FnOnce(&Outcome),
    ) -> Result<Outcome, CommitError> {
        self.wait(op, true, written).await
    }

    /// How many commits the syncer has answered so far.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// Stops the syncer once everything written before is durable; later
    /// commits fail with `Closed`.
    pub async fn close(&self) {
        self.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(remote) = &self.remote {
            remote.clone().close().await;
        }
    }
}

/// When the next sync may start. Under load, the requests a sync answers come
/// back as new writes a moment after it ends; a sync started on the first of
/// them would leave the rest to wait for the one after. So a sync starts no
/// sooner than about one sync's duration after the previous one ended (at most
/// `MAX_PAUSE`); under light load the previous sync is long over and nothing waits.
#[derive(Default)]
struct Pacing {
    /// Moving average of recent syncs' durations.
    typical: Duration,
    ended: Option<Instant>,
}

/// The longest the syncer holds back a sync.
const MAX_PAUSE: Duration = Duration::from_millis(1);

impl Pacing {
    fn pause(&self) -> Option<Duration> {
        let since = self.ended?.elapsed();
        let pause = self.typical.min(MAX_PAUSE).checked_sub(since)?;
        (pause >= Duration::from_micros(20)).then_some(pause)
    }

    fn synced(&mut self, started: Instant) {
        let now = Instant::now();
        self.typical = (self.typical * 3 + (now - started)) / 4;
        self.ended = Some(now);
    }
}

/// Sends the answers of one sync, on the runtime's side.
async fn answer(mut batches: mpsc::UnboundedReceiver<Answers>) {
    while let Some(answers) = batches.recv().await {
        send(answers);
    }
}

fn send(answers: Answers) {
    for (done, result) in answers {
        // The requester may have gone (client disconnected); the commit stands.
        let _ = done.send(result);
    }
}

/// Makes writes durable, as many per sync as were made meanwhile, then queues
/// their deliveries in write order and answers them, through `answerer` when
/// the writer was started on a runtime.
fn sync_loop(shared: &Shared, answerer: Option<mpsc::UnboundedSender<Answers>>) {
    let hand_over = |answers: Answers| {
        if answers.is_empty() {
            return;
        }
        shared
            .answered
            .fetch_add(answers.len() as u64, Ordering::Relaxed);
        match &answerer {
            Some(tx) => {
                if let Err(unsent) = tx.send(answers) {
                    // The runtime is gone: whoever still waits is answered here.
                    send(unsent.0);
                }
            }
            None => send(answers),
        }
    };
    let mut batch = Vec::new();
    let mut pacing = Pacing::default();
    loop {
        let oldest;
        {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while state.unsynced.is_empty() && !state.closed {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.unsynced.is_empty() {
                break;
            }
            if let Some(pause) = pacing.pause() {
                drop(state);
                std::thread::sleep(pause);
                state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            }
            std::mem::swap(&mut batch, &mut state.unsynced);
            oldest = state.oldest.take();
        }
        shared.metrics.store_batch_size.observe(batch.len() as f64);
        let started = Instant::now();
        let synced = shared.store.sync();
        pacing.synced(started);
        if let Some(oldest) = oldest {
            shared
                .metrics
                .store_commit_duration
                .observe(oldest.elapsed().as_secs_f64());
        }
        let mut answers = Vec::with_capacity(batch.len());
        match synced {
            Ok(()) => {
                for unsynced in batch.drain(..) {
                    for pending in unsynced.outcome.due() {
                        shared.queues.push_announced(pending.clone());
                    }
                    if let Some(done) = unsynced.done {
                        answers.push((done, Ok(unsynced.outcome)));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store sync failed; the writes it covered were not acknowledged");
                let e = CommitError::Store(e.to_string());
                for unsynced in batch.drain(..) {
                    shared.queues.withdraw(unsynced.outcome.due());
                    if let Some(done) = unsynced.done {
                        answers.push((done, Err(e.clone())));
                    }
                }
            }
        }
        hand_over(answers);
    }
    tracing::debug!("store syncer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        Conversation, DeadLetter, DeadLetterCounts, InboundMessage, MemoryStore, OutboundMessage,
        Pending, Seq, StoreError,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory store whose syncs wait for the test to let them through.
    struct Gated {
        inner: MemoryStore,
        open: Mutex<bool>,
        opened: Condvar,
        syncs: AtomicUsize,
    }

    impl Gated {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                inner: MemoryStore::new(),
                open: Mutex::new(false),
                opened: Condvar::new(),
                syncs: AtomicUsize::new(0),
            })
        }

        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Store for Gated {
        fn needs_sync(&self) -> bool {
            true
        }
        fn write(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
            self.inner.write(ops)
        }
        fn sync(&self) -> Result<(), StoreError> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn recover(&self, each: &mut dyn FnMut(Pending)) -> Result<DeadLetterCounts, StoreError> {
            self.inner.recover(each)
        }
        fn inbound(&self, seq: Seq) -> Result<Option<InboundMessage>, StoreError> {
            self.inner.inbound(seq)
        }
        fn outbound(&self, seq: Seq) -> Result<Option<OutboundMessage>, StoreError> {
            self.inner.outbound(seq)
        }
        fn conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
            self.inner.conversation(id)
        }
        fn dead_letters(&self, from: Seq, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
            self.inner.dead_letters(from, limit)
        }
        fn dead_letter_counts(&self) -> Result<DeadLetterCounts, StoreError> {
            self.inner.dead_letter_counts()
        }
        fn dead_letter_page(
            &self,
            from: Seq,
            limit: usize,
        ) -> Result<(Vec<DeadLetter>, DeadLetterCounts), StoreError> {
            self.inner.dead_letter_page(from, limit)
        }
        fn conversation_count(&self) -> u64 {
            self.inner.conversation_count()
        }
        fn dedupe_count(&self) -> u64 {
            self.inner.dedupe_count()
        }
        fn first_answer(
            &self,
            id: &str,
            now_ms: u64,
            window_ms: u64,
        ) -> Result<Option<String>, StoreError> {
            self.inner.first_answer(id, now_ms, window_ms)
        }
        fn dedupe_cutoff(&self, part: u8, keep: usize) -> Option<u64> {
            self.inner.dedupe_cutoff(part, keep)
        }
    }

    #[test]
    fn a_sync_waits_about_one_sync_after_the_last_under_load_and_never_when_idle() {
        assert_eq!(Pacing::default().pause(), None, "nothing synced yet");
        let just_ended = |typical| Pacing {
            typical,
            ended: Some(Instant::now()),
        };
        let pause = just_ended(Duration::from_micros(300)).pause().unwrap();
        assert!(pause <= Duration::from_micros(300), "{pause:?}");
        let capped = just_ended(Duration::from_millis(50)).pause().unwrap();
        assert!(capped <= MAX_PAUSE, "{capped:?}");
        let long_ago = Pacing {
            typical: Duration::from_millis(50),
            ended: Instant::now().checked_sub(Duration::from_secs(1)),
        };
        assert_eq!(long_ago.pause(), None, "the last sync is long over");
        let mut pacing = Pacing::default();
        pacing.synced(Instant::now() - Duration::from_millis(4));
        assert!(
            pacing.typical >= Duration::from_millis(1),
            "{:?}",
            pacing.typical
        );
    }

    fn op() -> Op {
        Op::PruneDedupe {
            before_ms: 0,
            part: None,
        }
    }

    fn start(store: Arc<Gated>, capacity: usize) -> (Writer, std::thread::JoinHandle<()>) {
        let (queues, _inboxes) = crate::delivery::queues();
        Writer::start(store, queues, Metrics::new("test"), capacity)
    }

    #[tokio::test]
    async fn no_commit_is_answered_before_the_sync_and_one_sync_covers_many() {
        let store = Gated::new();
        let (writer, thread) = start(store.clone(), 100);
        let mut commits = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let writer = writer.clone();
            commits.spawn(async move { writer.commit(op()).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(commits.len(), 20);
        assert!(
            commits.try_join_next().is_none(),
            "a commit was answered while its sync was held back"
        );
        store.open();
        while let Some(done) = commits.join_next().await {
            assert_eq!(done.unwrap().unwrap(), Outcome::Pruned(0));
        }
        let syncs = store.syncs.load(Ordering::SeqCst);
        assert!(
            (1..=3).contains(&syncs),
            "20 commits made while a sync was held took {syncs} syncs"
        );
        writer.close().await;
        thread.join().unwrap();
    }

    /// A sync's answers leave the syncer as one batch, so that the runtime
    /// is roused once per sync rather than once per commit; a writer started
    /// outside a runtime answers from the syncer itself.
    #[tokio::test]
    async fn the_answers_of_one_sync_reach_the_runtime_together() {
        let store = Gated::new();
        let (queues, _inboxes) = crate::delivery::queues();
        let (tx, mut batches) = mpsc::unbounded_channel();
        let (writer, thread) =
            Writer::start_answering(store.clone(), queues, Metrics::new("test"), 100, Some(tx));
        let mut commits = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let writer = writer.clone();
            commits.spawn(async move { writer.commit(op()).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.open();
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 20 {
            let answers = batches.recv().await.expect("the syncer hands over answers");
            if sizes.is_empty() {
                assert!(
                    commits.try_join_next().is_none(),
                    "a commit was answered outside its batch"
                );
            }
            sizes.push(answers.len());
            send(answers);
        }
        let syncs = store.syncs.load(Ordering::SeqCst);
        assert_eq!(sizes.len(), syncs, "batches {sizes:?} for {syncs} syncs");
        while let Some(done) = commits.join_next().await {
            assert_eq!(done.unwrap().unwrap(), Outcome::Pruned(0));
        }
        writer.close().await;
        thread.join().unwrap();

        let store = Gated::new();
        store.open();
        let outside = std::thread::spawn(move || {
            let (queues, _inboxes) = crate::delivery::queues();
            Writer::start(store, queues, Metrics::new("test"), 100)
        });
        let (writer, thread) = outside.join().unwrap();
        assert_eq!(writer.commit(op()).await.unwrap(), Outcome::Pruned(0));
        writer.close().await;
        thread.join().unwrap();
    }

    fn reply(n: u32) -> Op {
        Op::AddOutbound {
            message: OutboundMessage {
                id: format!("r{n}"),
                conversation_id: "conv".into(),
                caller_conversation_id: "c".into(),
                user_id: "user".into(),
                kind: "text".into(),
                payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                created_at_ms: 1,
                queued_at_ms: 1,
                trace: None,
            },
        }
    }

    /// What a submitted write makes due (a bot's replies, as the delivery
    /// engine submits them without waiting) is queued only once a sync made
    /// it durable, and in the order of the writes: the next message of a
    /// conversation may go before the last one's completion is durable.
    #[tokio::test]
    async fn submitted_writes_queue_what_they_make_due_after_their_sync_in_order() {
        let store = Gated::new();
        let (queues, mut inboxes) = crate::delivery::queues();
        let (writer, thread) =
            Writer::start(store.clone(), queues.clone(), Metrics::new("test"), 100);
        for n in 0..5 {
            writer.submit(reply(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(queues.unread(), 0, "queued before the sync");
        store.open();
        let deadline = Instant::now() + Duration::from_secs(5);
        while queues.unread() < 5 {
            assert!(Instant::now() < deadline, "{} queued", queues.unread());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seqs = crate::delivery::tests::drain_response(&mut inboxes);
        assert_eq!(seqs.len(), 5);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        writer.close().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn try_commit_is_refused_while_too_many_writes_wait_for_the_disk() {
        let store = Gated::new();
        let (writer, thread) = start(store.clone(), 2);
        let spawn = |writer: &Writer| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.try_commit(op()).await })
        };
        let first = spawn(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The syncer took the first write into a sync that is held; the next
        // two wait for the next sync and fill the queue.
        let second = spawn(&writer);
        let third = spawn(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fourth = writer.try_commit(op()).await;
        assert!(matches!(fourth, Err(CommitError::Busy)), "{fourth:?}");
        store.open();
        for commit in [first, second, third] {
            assert_eq!(commit.await.unwrap().unwrap(), Outcome::Pruned(0));
        }
        writer.close().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn close_syncs_what_came_before_and_refuses_what_comes_after() {
        let store = Gated::new();
        let (writer, thread) = start(store.clone(), 100);
        let before = tokio::spawn({
            let writer = writer.clone();
            async move { writer.commit(op()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.close().await;
        assert!(matches!(
            writer.commit(op()).await,
            Err(CommitError::Closed)
        ));
        store.open();
        assert_eq!(before.await.unwrap().unwrap(), Outcome::Pruned(0));
        thread.join().unwrap();
    }
}
