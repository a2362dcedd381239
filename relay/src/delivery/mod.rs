//! The delivery engine: one scheduler per target (the bot, the response
//! endpoint). Messages wait in per-conversation lanes: a lane delivers its head
//! message and nothing else until that one is done (delivered or
//! dead-lettered), which keeps each conversation in order, while a failing
//! conversation holds back only itself. Up to `--max-in-flight` lanes deliver
//! at once per target. Each attempt also waits for the target's
//! [`control`]: its rate limit, its circuit breaker and a pause by hand.

pub mod backoff;
pub mod control;
mod deliver;
mod h1;
pub mod http;
pub mod probe;

pub use deliver::{Deliverer, FailureLog, log_unreported_unrecorded};

use crate::metrics::Metrics;
use crate::store::{Message, Pending, Seq, Target};
use control::{Admit, Attempt, Controls, TargetControl, TokenBucket};
use futures::FutureExt;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How an attempt ended, as the scheduler needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The message left the queue (delivered, dead-lettered, or already gone).
    Done,
    /// Try the same message again after the delay.
    Retry(Duration),
}

enum Event {
    Due(Pending),
    Finished {
        lane: LaneKey,
        finish: Finish,
        attempt: Attempt,
    },
    /// The waiting messages it picks are no longer this relay's to deliver.
    Forget(Arc<dyn Fn(Seq) -> bool + Send + Sync>),
}

/// The entry points of both schedulers, handed to the store writer and syncer.
#[derive(Clone)]
pub struct Queues {
    bot: mpsc::UnboundedSender<Event>,
    response: mpsc::UnboundedSender<Event>,
    /// Messages waiting in both directions, for back-pressure on intake.
    pending: Arc<AtomicUsize>,
    /// Of those, the replies waiting for the response endpoint: past
    /// `max_replies`, deliveries to the bot pause.
    replies: Arc<AtomicUsize>,
    /// Messages pushed that the schedulers have not taken in yet.
    unread: Arc<AtomicUsize>,
    /// Bytes of the fresh copies held, from their push to their first attempt.
    fresh: Arc<Fresh>,
}

/// The fresh copies of messages (`Pending::message`) held between their push
/// and their first attempt, so that the attempt need not read the store back.
/// Bounded in bytes: past [`FRESH_BYTES`], messages go without their copy and
/// are read from the store when due.
#[derive(Default)]
struct Fresh {
    bytes: AtomicUsize,
}

/// Bytes of fresh copies held at once, both targets together.
const FRESH_BYTES: usize = 8 << 20;

impl Fresh {
    /// Takes on a copy of `size` bytes, if there is room.
    fn admit(&self, size: usize) -> bool {
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > FRESH_BYTES {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Lets go of a copy taken on with `admit`.
    fn release(&self, message: &Message) {
        self.bytes.fetch_sub(message.size(), Ordering::Relaxed);
    }
}

impl Queues {
    /// Queues a message that is now durable.
    pub fn push(&self, pending: Pending) {
        self.push_counted(pending, false);
    }

    /// Counts the replies among `due` as waiting from the moment they are
    /// written, before they are durable and pushed (with
    /// [`Self::push_announced`]): deliveries to the bot pause on them at
    /// once, and a conversation that goes on before its last completion is
    /// durable cannot slip past `max_replies`.
    pub fn announce(&self, due: &[Pending]) {
        let n = due.iter().filter(|p| p.target == Target::Response).count();
        if n > 0 {
            self.replies.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes back [`Self::announce`] for writes that never became durable.
    pub fn withdraw(&self, due: &[Pending]) {
        let n = due.iter().filter(|p| p.target == Target::Response).count();
        if n > 0 {
            self.replies.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// [`Self::push`] for a message whose reply count was announced.
    pub fn push_announced(&self, pending: Pending) {
        self.push_counted(pending, true);
    }

    fn push_counted(&self, mut pending: Pending, announced: bool) {
        if let Some(message) = &pending.message
            && !self.fresh.admit(message.size())
        {
            pending.message = None;
        }
        let tx = match pending.target {
            Target::Bot => &self.bot,
            Target::Response => &self.response,
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        if pending.target == Target::Response && !announced {
            self.replies.fetch_add(1, Ordering::Relaxed);
        }
        self.unread.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(Event::Due(pending))) = tx.send(Event::Due(pending)) {
            // Shutting down: the message is stored and is delivered after the
            // restart. It still counts as waiting.
            self.unread.fetch_sub(1, Ordering::Relaxed);
            if let Some(message) = &pending.message {
                self.fresh.release(message);
            }
        }
    }

    /// Drops the waiting messages that `gone` picks, in both directions: with
    /// `--store nats`, those of a partition another replica delivers now.
    /// They stop counting as waiting (queue depth, back-pressure) at once,
    /// and are never attempted; one under way finishes.
    pub fn forget(&self, gone: impl Fn(Seq) -> bool + Send + Sync + 'static) {
        let gone: Arc<dyn Fn(Seq) -> bool + Send + Sync> = Arc::new(gone);
        let _ = self.bot.send(Event::Forget(gone.clone()));
        let _ = self.response.send(Event::Forget(gone));
    }

    /// Messages pushed that the schedulers have not taken in yet: what the
    /// queues' channels hold.
    pub fn unread(&self) -> usize {
        self.unread.load(Ordering::Relaxed)
    }

    /// Messages waiting in both directions.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// The receiving ends, until `Engine::start` takes them.
pub struct Inboxes {
    bot: mpsc::UnboundedReceiver<Event>,
    response: mpsc::UnboundedReceiver<Event>,
}

pub fn queues() -> (Queues, Inboxes) {
    let (bot, bot_rx) = mpsc::unbounded_channel();
    let (response, response_rx) = mpsc::unbounded_channel();
    (
        Queues {
            bot,
            response,
            pending: Arc::default(),
            replies: Arc::default(),
            unread: Arc::default(),
            fresh: Arc::default(),
        },
        Inboxes {
            bot: bot_rx,
            response: response_rx,
        },
    )
}

/// Starts both schedulers; they run until `stop` turns true, then wait up to
/// `drain` for deliveries under way. While `max_replies` replies or more wait
/// for the response endpoint, no new delivery to the bot starts: each could
/// add replies that nothing drains, past what memory was sized for.
#[allow(clippy::too_many_arguments)]
pub fn start(
    inboxes: Inboxes,
    queues: &Queues,
    deliverer: Deliverer,
    controls: &Controls,
    max_in_flight: usize,
    max_replies: usize,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> JoinSet<()> {
    let deliverer = Arc::new(deliverer);
    let mut set = JoinSet::new();
    for (target, inbox, tx) in [
        (Target::Bot, inboxes.bot, queues.bot.clone()),
        (Target::Response, inboxes.response, queues.response.clone()),
    ] {
        let scheduler = Scheduler {
            target,
            lanes: HashMap::new(),
            fresh: HashMap::new(),
            fresh_bytes: queues.fresh.clone(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: 0,
            max_in_flight,
            depth: 0,
            deliverer: deliverer.clone(),
            metrics: deliverer.metrics().clone(),
            events: tx,
            pending: queues.pending.clone(),
            replies: queues.replies.clone(),
            max_replies,
            paused: false,
            unread: queues.unread.clone(),
            tasks: JoinSet::new(),
            control: controls.get(target).clone(),
            bucket: controls
                .get(target)
                .rate_limit()
                .map(|limit| TokenBucket::new(limit, Instant::now())),
            rate_waiting: None,
            probe_lane: None,
            held_until: None,
        };
        set.spawn(scheduler.run(inbox, stop.clone(), drain));
    }
    set
}

/// A waiting message as a lane holds it: its conversation and target are the
/// lane's, so 24 bytes a message is all a long queue costs.
#[derive(Clone, Copy, Debug)]
pub struct Waiting {
    pub seq: crate::store::Seq,
    pub created_at_ms: u64,
    pub queued_at_ms: u64,
}

/// A conversation as the scheduler knows it ([`crate::ids::key`]): sixteen
/// bytes and no allocation, where the id as a string took two.
type LaneKey = u128;

#[derive(Default)]
struct Lane {
    queue: VecDeque<Waiting>,
    /// Failed attempts of the head message.
    failures: u32,
    /// Attempting the head now.
    attempting: bool,
    /// When its retry of the head is due, while it waits for one: a timer
    /// that finds another time is that of a lane let go of meanwhile.
    retry_at: Option<Instant>,
}

impl Lane {
    /// Attempting the head, or waiting to retry it: nothing else of the
    /// lane goes meanwhile.
    fn busy(&self) -> bool {
        self.attempting || self.retry_at.is_some()
    }
}

struct Scheduler {
    target: Target,
    lanes: HashMap<LaneKey, Lane>,
    /// Waiting messages not yet attempted that came with their content.
    fresh: HashMap<Seq, Arc<Message>>,
    /// Shared with `Queues::fresh`.
    fresh_bytes: Arc<Fresh>,
    /// Lanes with a head message that may be attempted now.
    ready: VecDeque<LaneKey>,
    /// Lanes waiting for a retry, by due time.
    timers: BinaryHeap<Reverse<(Instant, LaneKey)>>,
    in_flight: usize,
    max_in_flight: usize,
    depth: usize,
    deliverer: Arc<Deliverer>,
    metrics: Metrics,
    events: mpsc::UnboundedSender<Event>,
    pending: Arc<AtomicUsize>,
    /// Shared with `Queues::replies`.
    replies: Arc<AtomicUsize>,
    max_replies: usize,
    /// Whether the bot's deliveries wait for replies to drain.
    paused: bool,
    /// Shared with `Queues::unread`.
    unread: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
    /// The target's breaker and pause.
    control: Arc<TargetControl>,
    /// The target's rate limit, if it has one.
    bucket: Option<TokenBucket>,
    /// The lane at the head of `ready` that waits for a token, counted once
    /// in `botrelay_rate_limited_total`.
    rate_waiting: Option<LaneKey>,
    /// The lane whose attempt is the open breaker's probe delivery.
    probe_lane: Option<LaneKey>,
    /// When the rate limit or the breaker let the next attempt go.
    held_until: Option<Instant>,
}

/// How often a scheduler held back by a store that cannot record deliveries
/// looks again.
const STORE_RECHECK: Duration = Duration::from_millis(200);

impl Scheduler {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let control = self.control.clone();
        loop {
            self.dispatch();
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let held_until = self.held_until;
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => break,
                event = inbox.recv() => match event {
                    Some(event) => {
                        self.handle(event);
                        // Take whatever else is waiting before dispatching again.
                        while let Ok(event) = inbox.try_recv() {
                            self.handle(event);
                        }
                    }
                    None => break,
                },
                _ = sleep_until(next_timer) => self.wake_due_lanes(),
                // Dispatch again: a token is due, or the breaker's probe delivery.
                _ = sleep_until(held_until) => {}
                _ = control.woken() => {}
                _ = gauges.tick() => self.update_gauges(),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        // Draining: no new attempts; let those under way finish (their messages
        // stay stored either way and are retried after a restart if cut short).
        let target = self.target.as_str();
        if !self.tasks.is_empty() {
            tracing::info!(
                to = target,
                in_flight = self.tasks.len(),
                "waiting for deliveries under way"
            );
            if tokio::time::timeout(drain, async {
                while self.tasks.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                tracing::warn!(
                    to = target,
                    "deliveries still under way at the drain timeout; they will be retried after restart"
                );
                self.tasks.abort_all();
            }
        }
        // What the deliveries that ended meanwhile reported, so that the count
        // of waiting messages is right at the stop.
        while let Ok(event) = inbox.try_recv() {
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Due(pending) => {
                self.unread.fetch_sub(1, Ordering::Relaxed);
                let waiting = Waiting {
                    seq: pending.seq,
                    created_at_ms: pending.created_at_ms,
                    queued_at_ms: pending.queued_at_ms,
                };
                self.depth += 1;
                let key = crate::ids::key(&pending.conversation_id);
                let lane = self.lanes.entry(key).or_insert_with(|| Lane {
                    // Most lanes hold one message at a time: room for one.
                    queue: VecDeque::with_capacity(1),
                    ..Lane::default()
                });
                let next_up = lane.queue.is_empty() && !lane.busy();
                lane.queue.push_back(waiting);
                if next_up {
                    self.ready.push_back(key);
                }
                // The copy is kept for a message attempted next in its lane;
                // one that waits behind others is read from the store when
                // due. Kept behind others too, the copies of a backlog (a bot
                // down) would hold their whole bound for as long as it lasts:
                // 19 MiB more at 140k waiting (`tests/bench/run`).
                if let Some(message) = pending.message {
                    if !next_up {
                        self.fresh_bytes.release(&message);
                    } else if let Some(before) = self.fresh.insert(pending.seq, message) {
                        // The same message queued twice: one copy is counted.
                        self.fresh_bytes.release(&before);
                    }
                }
            }
            Event::Finished {
                lane: key,
                finish,
                attempt,
            } => {
                self.in_flight -= 1;
                let probe = self.probe_lane == Some(key);
                if probe {
                    self.probe_lane = None;
                }
                self.control.record(attempt, probe, Instant::now());
                let Some(lane) = self.lanes.get_mut(&key) else {
                    return;
                };
                lane.attempting = false;
                match finish {
                    Finish::Done => {
                        lane.queue.pop_front();
                        lane.failures = 0;
                        let empty = lane.queue.is_empty();
                        self.left(1);
                        if empty {
                            self.lanes.remove(&key);
                        } else {
                            self.ready.push_back(key);
                        }
                    }
                    Finish::Retry(delay) => {
                        lane.failures += 1;
                        let at = Instant::now() + delay;
                        lane.retry_at = Some(at);
                        self.timers.push(Reverse((at, key)));
                    }
                }
            }
            Event::Forget(gone) => self.forget(&*gone),
        }
    }

    /// Drops the waiting messages `gone` picks, but the head of a lane
    /// attempting it: that attempt ends as usual.
    fn forget(&mut self, gone: &dyn Fn(Seq) -> bool) {
        let mut dropped = 0;
        let (fresh, fresh_bytes) = (&mut self.fresh, &self.fresh_bytes);
        self.lanes.retain(|_, lane| {
            let before = lane.queue.len();
            let head = lane.queue.front().map(|w| w.seq);
            let under_way = if lane.attempting {
                lane.queue.pop_front()
            } else {
                None
            };
            lane.queue.retain(|w| {
                let keep = !gone(w.seq);
                if !keep && let Some(message) = fresh.remove(&w.seq) {
                    fresh_bytes.release(&message);
                }
                keep
            });
            if let Some(head) = under_way {
                lane.queue.push_front(head);
            }
            dropped += before - lane.queue.len();
            if lane.queue.front().map(|w| w.seq) != head {
                lane.failures = 0;
            }
            // A lane waiting to retry a message forgotten now goes too:
            // left until its timer, it held back the conversation's next
            // messages for as long, once the partition came back here.
            !lane.queue.is_empty()
        });
        if dropped == 0 {
            return;
        }
        let lanes = &self.lanes;
        self.ready
            .retain(|key| lanes.get(key).is_some_and(|lane| !lane.busy()));
        self.left(dropped);
        tracing::debug!(
            to = self.target.as_str(),
            dropped,
            "waiting messages another replica delivers now let go of"
        );
        self.update_gauges();
    }

    /// `n` messages left the queue (delivered, dead-lettered, or forgotten):
    /// they no longer count as waiting.
    fn left(&mut self, n: usize) {
        self.depth -= n;
        self.pending.fetch_sub(n, Ordering::Relaxed);
        if self.target == Target::Response {
            self.replies.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn wake_due_lanes(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((at, key)) = self.timers.pop().expect("peeked");
            if let Some(lane) = self.lanes.get_mut(&key)
                && lane.retry_at == Some(at)
            {
                // Still holding its head: a lane whose messages were all
                // forgotten while it waited was let go of then.
                lane.retry_at = None;
                self.ready.push_back(key);
            }
        }
    }

    fn dispatch(&mut self) {
        self.held_until = None;
        if self.target == Target::Bot && self.replies_overflow() {
            return;
        }
        let now = Instant::now();
        // A delivery made now could not be recorded (the store lost its
        // connection): none starts, and the lanes keep their place until
        // the store is back or their partitions are given up.
        if self.in_flight < self.max_in_flight
            && !self.ready.is_empty()
            && self.deliverer.store.progress_unavailable().is_some()
        {
            self.held_until = Some(now + STORE_RECHECK);
            return;
        }
        while self.in_flight < self.max_in_flight {
            let Some(&key) = self.ready.front() else {
                return;
            };
            if self
                .lanes
                .get(&key)
                .is_none_or(|lane| lane.queue.is_empty())
            {
                self.ready.pop_front();
                continue;
            }
            // Held back, the lane stays at the head of `ready` (its message
            // stored, its conversation in order) until the hold ends.
            let probe = match self.control.admit(now) {
                Admit::Go => false,
                Admit::Probe => true,
                Admit::Hold(until) => {
                    self.held_until = until;
                    return;
                }
            };
            if let Some(bucket) = &mut self.bucket
                && let Err(wait) = bucket.take(now)
            {
                if self.rate_waiting != Some(key) {
                    self.rate_waiting = Some(key);
                    self.control.rate_limited();
                }
                self.held_until = Some(now + wait);
                return;
            }
            self.ready.pop_front();
            if self.rate_waiting == Some(key) {
                self.rate_waiting = None;
            }
            if probe {
                self.control.probe_started();
                self.probe_lane = Some(key);
            }
            let lane = self.lanes.get_mut(&key).expect("checked above");
            let head = *lane.queue.front().expect("checked above");
            lane.attempting = true;
            self.in_flight += 1;
            let failures = lane.failures;
            let fresh = self.fresh.remove(&head.seq);
            if let Some(message) = &fresh {
                self.fresh_bytes.release(message);
            }
            let deliverer = self.deliverer.clone();
            let events = self.events.clone();
            let target = self.target;
            self.tasks.spawn(async move {
                // The attempt (about 3 KB of future) is boxed once, so that
                // the task, moved about as it is spawned, polled and reaped,
                // stays small.
                let attempt = Box::pin(deliverer.attempt(target, &head, failures, fresh));
                // A panic would leave the lane busy and its slot taken for
                // good: it ends the attempt as a failure instead.
                let (finish, attempt) = std::panic::AssertUnwindSafe(attempt)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(
                            to = target.as_str(),
                            seq = head.seq,
                            "a delivery attempt failed on a bug (see the panic above); it is tried again after the longest backoff"
                        );
                        (Finish::Retry(deliverer.backoff.max), Attempt::Failed)
                    });
                let _ = events.send(Event::Finished {
                    lane: key,
                    finish,
                    attempt,
                });
            });
        }
    }

    /// Whether too many replies wait to deliver more to the bot; says so when
    /// that changes. Checked again at every event and every second.
    fn replies_overflow(&mut self) -> bool {
        let replies = self.replies.load(Ordering::Relaxed);
        let over = replies >= self.max_replies;
        if over != self.paused {
            self.paused = over;
            if over {
                tracing::warn!(
                    replies,
                    "deliveries to the bot pause: --max-pending replies wait for the response endpoint"
                );
            } else {
                tracing::info!(replies, "deliveries to the bot go on: replies have drained");
            }
        }
        over
    }

    fn update_gauges(&self) {
        let target = self.target.as_str();
        self.metrics
            .queue_depth
            .with_label_values(&[target])
            .set(self.depth as i64);
        let now_ms = now_ms();
        let oldest = self
            .lanes
            .values()
            .filter_map(|lane| lane.queue.front())
            .map(|p| p.created_at_ms)
            .min()
            .map_or(0.0, |created| {
                now_ms.saturating_sub(created) as f64 / 1000.0
            });
        self.metrics
            .oldest_pending_age
            .with_label_values(&[target])
            .set(oldest);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::OutboundMessage;

    /// The positions of the messages queued for the response endpoint, in
    /// the order they were queued.
    pub(crate) fn drain_response(inboxes: &mut Inboxes) -> Vec<Seq> {
        let mut seqs = Vec::new();
        while let Ok(Event::Due(pending)) = inboxes.response.try_recv() {
            seqs.push(pending.seq);
        }
        seqs
    }

    fn reply(seq: Seq, payload_bytes: usize) -> Pending {
        let payload = format!("\"{}\"", "x".repeat(payload_bytes));
        OutboundMessage {
            id: format!("m{seq}"),
            conversation_id: "conv".into(),
            caller_conversation_id: "c".into(),
            user_id: "user".into(),
            kind: "text".into(),
            payload: serde_json::value::RawValue::from_string(payload).unwrap(),
            created_at_ms: 1,
            queued_at_ms: 1,
            trace: None,
        }
        .into_pending(seq)
    }

    #[test]
    fn fresh_copies_are_bounded_in_bytes_and_released_at_the_first_attempt() {
        let (queues, mut inboxes) = queues();
        // Three messages of 3 MiB: the third would pass the 8 MiB bound.
        for seq in 1..=3 {
            queues.push(reply(seq, 3 << 20));
        }
        let mut carried = Vec::new();
        while let Ok(Event::Due(pending)) = inboxes.response.try_recv() {
            carried.push((pending.seq, pending.message.is_some()));
        }
        assert_eq!(carried, [(1, true), (2, true), (3, false)]);
        let held = queues.fresh.bytes.load(Ordering::Relaxed);
        assert!((6 << 20..7 << 20).contains(&held), "{held}");

        // A small one still fits; once the copies are let go, large ones do again.
        queues.push(reply(4, 100));
        let Ok(Event::Due(small)) = inboxes.response.try_recv() else {
            panic!("queued")
        };
        assert!(small.message.is_some());
        for message in [reply(1, 3 << 20), reply(2, 3 << 20), small] {
            queues.fresh.release(message.message.as_deref().unwrap());
        }
        assert_eq!(queues.fresh.bytes.load(Ordering::Relaxed), 0);
        queues.push(reply(5, 3 << 20));
        let Ok(Event::Due(again)) = inboxes.response.try_recv() else {
            panic!("queued")
        };
        assert!(again.message.is_some());
    }
}
