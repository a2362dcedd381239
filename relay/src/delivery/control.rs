//! What holds deliveries back from a target besides their own retries: a rate
//! limit (a token bucket per target), a circuit breaker that stops sending to
//! a target that keeps failing, and a pause by hand through the admin port.
//!
//! The schedulers ask a target's [`TargetControl`] before each attempt and
//! tell it how each ended; messages held back stay stored and wait in their
//! lanes, in order. [`TokenBucket`] and [`Breaker`] are pure state machines,
//! driven by the scheduler's clock; [`TargetControl`] adds the metrics, the
//! log line of each change and the pause that survives a restart.

use crate::metrics::Metrics;
use crate::store::Target;
use crate::wire;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Flags of the rate limits, the breaker and the reachability probes.
#[derive(Clone, Debug, clap::Args)]
pub struct ControlFlags {
    /// Most deliveries per second to the bot (a number above 0); more wait,
    /// stored and in order. Absent or 0: no limit.
    #[arg(long, env = "BOTRELAY_BOT_RATE_LIMIT", value_parser = rate)]
    pub bot_rate_limit: Option<f64>,

    /// Deliveries to the bot that may go at once after a quiet spell, above
    /// --bot-rate-limit. Default: the rate rounded up, at least 1.
    #[arg(long, env = "BOTRELAY_BOT_RATE_BURST",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub bot_rate_burst: Option<u32>,

    /// Most deliveries per second to the response endpoint; absent or 0: no limit.
    #[arg(long, env = "BOTRELAY_RESPONSE_RATE_LIMIT", value_parser = rate)]
    pub response_rate_limit: Option<f64>,

    /// Burst of --response-rate-limit. Default: the rate rounded up, at least 1.
    #[arg(long, env = "BOTRELAY_RESPONSE_RATE_BURST",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub response_rate_burst: Option<u32>,

    /// Consecutive failed attempts to one target after which the relay stops
    /// sending to it but for one delivery at a time, now and then (circuit
    /// open). 0: never.
    #[arg(long, env = "BOTRELAY_BREAKER_FAILURES", default_value_t = 10)]
    pub breaker_failures: u32,

    /// While the circuit is open, the wait before the next single delivery
    /// that tries the target; doubles after each one that fails.
    #[arg(long, env = "BOTRELAY_BREAKER_PROBE_INTERVAL", default_value = "5s",
          value_parser = crate::config::duration)]
    pub breaker_probe_interval: Duration,

    /// Longest wait between two of those deliveries.
    #[arg(long, env = "BOTRELAY_BREAKER_MAX_PROBE_INTERVAL", default_value = "5m",
          value_parser = crate::config::duration)]
    pub breaker_max_probe_interval: Duration,

    /// A reachability probe of both targets (a signed request with header
    /// `botrelay-probe: 1`) at start and then this often; 0s: none.
    #[arg(long, env = "BOTRELAY_PROBE_INTERVAL", default_value = "30s",
          value_parser = crate::config::duration)]
    pub probe_interval: Duration,
}

/// The range of a rate limit, per second (as the CRD's `perSecond`).
pub const MIN_RATE: f64 = 0.001;
pub const MAX_RATE: f64 = 1_000_000.0;

/// The longest breaker wait, and the shortest interval between probes: a
/// wait past a day is a typo, and probes much faster than ten a second
/// would hammer the very targets a rate limit protects (the operator asks
/// for 1s at least).
pub const MAX_BREAKER_WAIT: Duration = Duration::from_secs(24 * 3600);
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

fn rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .parse()
        .map_err(|_| "not a number (e.g. 50 or 0.5)".to_string())?;
    if !rate.is_finite() || rate < 0.0 {
        return Err("must be 0 (no limit) or a positive number".into());
    }
    if rate != 0.0 && !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(format!(
            "must be 0 (no limit) or between {MIN_RATE} (one delivery in about 17 minutes) and {MAX_RATE}"
        ));
    }
    Ok(rate)
}

impl ControlFlags {
    pub fn validate(&self) -> Result<(), String> {
        if self.breaker_probe_interval.is_zero() {
            return Err("--breaker-probe-interval must be greater than zero".into());
        }
        if self.breaker_max_probe_interval > MAX_BREAKER_WAIT {
            return Err("--breaker-max-probe-interval must be at most 24h".into());
        }
        if !self.probe_interval.is_zero() && self.probe_interval < MIN_PROBE_INTERVAL {
            return Err("--probe-interval must be 0s (no probes) or at least 100ms".into());
        }
        if self.breaker_max_probe_interval < self.breaker_probe_interval {
            return Err(
                "--breaker-max-probe-interval must not be shorter than --breaker-probe-interval"
                    .into(),
            );
        }
        Ok(())
    }

    /// A target's rate limit, if it has one. A burst without a rate means nothing.
    pub fn rate_limit(&self, target: Target) -> Option<RateLimit> {
        let (rate, burst) = match target {
            Target::Bot => (self.bot_rate_limit, self.bot_rate_burst),
            Target::Response => (self.response_rate_limit, self.response_rate_burst),
        };
        let per_second = rate.filter(|r| *r > 0.0)?;
        Some(RateLimit {
            per_second,
            burst: burst.unwrap_or_else(|| (per_second.ceil() as u32).max(1)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// A token bucket: `burst` tokens at most, refilled at `per_second`; each
/// delivery takes one.
#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            per_second: limit.per_second,
            burst: f64::from(limit.burst),
            tokens: f64::from(limit.burst),
            at: now,
        }
    }

    /// Takes a token, or says how long until there is one (at least 1 ms, so
    /// that a caller woken by a timer never spins on rounding).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if now > self.at {
            let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.burst);
            self.at = now;
        }
        // A token to within rounding: a timer set for the exact refill may
        // fire a hair before it.
        if self.tokens >= 1.0 - 1e-6 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / self.per_second;
        // Bounded whatever the rate: never a panic on a huge wait.
        let wait = Duration::try_from_secs_f64(wait).unwrap_or(MAX_BREAKER_WAIT);
        Err(wait.clamp(Duration::from_millis(1), MAX_BREAKER_WAIT))
    }
}

/// How an attempt went, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The target answered 2xx.
    Succeeded,
    /// A status that is not 2xx, a timeout or a network error.
    Failed,
    /// Nothing was sent (the message was gone, or could not be read).
    NotMade,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Deliveries go as usual.
    Closed,
    /// Nothing goes until the next probe delivery is due.
    Open,
    /// One probe delivery is under way; nothing else goes.
    HalfOpen,
}

/// Whether the scheduler may start an attempt now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Go, as the one probe delivery of an open circuit; call
    /// [`Breaker::probe_started`] when it goes.
    Probe,
    /// Not now; ask again at this time (`None`: when something changes).
    Hold(Option<Instant>),
}

/// The circuit breaker of one target.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    first_interval: Duration,
    max_interval: Duration,
    state: BreakerState,
    failures: u32,
    interval: Duration,
    next_probe: Instant,
}

/// `now + wait`, or as late as can be said when that overflows.
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(MAX_BREAKER_WAIT))
        .unwrap_or(now)
}

/// A change of the breaker's state and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub state: BreakerState,
    pub reason: String,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures (0: never).
    pub fn new(threshold: u32, first_interval: Duration, max_interval: Duration) -> Self {
        Self {
            threshold,
            first_interval,
            max_interval,
            state: BreakerState::Closed,
            failures: 0,
            interval: first_interval,
            next_probe: Instant::now(),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Consecutive failed attempts.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn admit(&self, now: Instant) -> Admit {
        match self.state {
            BreakerState::Closed => Admit::Go,
            BreakerState::Open if now >= self.next_probe => Admit::Probe,
            BreakerState::Open => Admit::Hold(Some(self.next_probe)),
            BreakerState::HalfOpen => Admit::Hold(None),
        }
    }

    /// The target answered a reachability probe: while the circuit is open,
    /// the next probing delivery goes now rather than at the end of its wait
    /// (which may have grown to minutes), so a target that is back is found
    /// within a probe interval. Says whether that moved it.
    pub fn target_answered(&mut self, now: Instant) -> bool {
        if self.state == BreakerState::Open && self.next_probe > now {
            self.next_probe = now;
            return true;
        }
        false
    }

    /// The probe delivery that [`Admit::Probe`] allowed is under way.
    pub fn probe_started(&mut self) -> Option<Change> {
        (self.state == BreakerState::Open).then(|| {
            self.state = BreakerState::HalfOpen;
            Change {
                state: BreakerState::HalfOpen,
                reason: "one delivery tries the target".into(),
            }
        })
    }

    /// Counts an attempt that ended; `probe` when it was the probe delivery.
    /// Any success closes the circuit (an attempt started before it opened
    /// counts too: the target answered). While open, only the probe's
    /// failure counts for the next wait.
    pub fn record(&mut self, attempt: Attempt, probe: bool, now: Instant) -> Option<Change> {
        match attempt {
            Attempt::Succeeded => {
                self.failures = 0;
                (self.state != BreakerState::Closed).then(|| {
                    self.state = BreakerState::Closed;
                    self.interval = self.first_interval;
                    Change {
                        state: BreakerState::Closed,
                        reason: "a delivery succeeded".into(),
                    }
                })
            }
            Attempt::Failed => {
                self.failures = self.failures.saturating_add(1);
                match self.state {
                    BreakerState::Closed
                        if self.threshold > 0 && self.failures >= self.threshold =>
                    {
                        self.state = BreakerState::Open;
                        self.interval = self.first_interval;
                        self.next_probe = later(now, self.interval);
                        Some(Change {
                            state: BreakerState::Open,
                            reason: format!("{} consecutive failed attempts", self.failures),
                        })
                    }
                    BreakerState::HalfOpen if probe => {
                        self.interval = self.interval.saturating_mul(2).min(self.max_interval);
                        self.next_probe = later(now, self.interval);
                        self.state = BreakerState::Open;
                        Some(Change {
                            state: BreakerState::Open,
                            reason: format!(
                                "the probe delivery failed; next in {}",
                                humantime::format_duration(self.interval)
                            ),
                        })
                    }
                    _ => None,
                }
            }
            // The probe was not made: another lane's head tries at once.
            Attempt::NotMade if probe && self.state == BreakerState::HalfOpen => {
                self.state = BreakerState::Open;
                self.next_probe = now;
                Some(Change {
                    state: BreakerState::Open,
                    reason: "the probe delivery was not made".into(),
                })
            }
            Attempt::NotMade => None,
        }
    }

    /// Closes the circuit (a resume by hand).
    pub fn reset(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.interval = self.first_interval;
    }
}

/// A target's state as `/targets` and the metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    Closed,
    Open,
    HalfOpen,
    Paused,
}

impl TargetState {
    pub const ALL: [TargetState; 4] = [
        TargetState::Closed,
        TargetState::Open,
        TargetState::HalfOpen,
        TargetState::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Closed => "closed",
            TargetState::Open => "open",
            TargetState::HalfOpen => "half_open",
            TargetState::Paused => "paused",
        }
    }
}

/// The last reachability probe of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub at_ms: u64,
    pub ok: bool,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The metrics of this module, registered with the relay's others.
#[derive(Clone)]
pub struct ControlMetrics {
    pub rate_limited: IntCounterVec,
    pub target_state: IntGaugeVec,
    pub state_changes: IntCounterVec,
    pub probes: IntCounterVec,
    pub reachable: IntGaugeVec,
}

impl ControlMetrics {
    pub fn register(registry: &Registry) -> Self {
        let register = |metric: Box<dyn prometheus::core::Collector>| {
            registry.register(metric).expect("unique metric");
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let metrics = Self {
            rate_limited: counter(
                "botrelay_rate_limited_total",
                "Deliveries that waited for the target's rate limit, by target.",
                &["target"],
            ),
            target_state: gauge(
                "botrelay_target_state",
                "1 for the target's current state (closed, open, half_open, paused), 0 for the others.",
                &["target", "state"],
            ),
            state_changes: counter(
                "botrelay_target_state_changes_total",
                "Changes of a target's state, by the state changed to.",
                &["target", "state"],
            ),
            probes: counter(
                "botrelay_probes_total",
                "Reachability probes of the targets, by outcome (ok: a 2xx answer).",
                &["target", "outcome"],
            ),
            reachable: gauge(
                "botrelay_target_reachable",
                "1 when the target's last reachability probe got a 2xx answer, else 0.",
                &["target"],
            ),
        };
        for target in Target::ALL {
            let t = target.as_str();
            metrics.rate_limited.with_label_values(&[t]);
            for state in TargetState::ALL {
                metrics
                    .state_changes
                    .with_label_values(&[t, state.as_str()]);
            }
            for outcome in ["ok", "failed"] {
                metrics.probes.with_label_values(&[t, outcome]);
            }
        }
        metrics
    }
}

struct ControlState {
    breaker: Breaker,
    paused: bool,
    /// The state last shown, and since when (ms since the epoch).
    shown: TargetState,
    since_ms: u64,
    last_probe: Option<ProbeResult>,
}

impl ControlState {
    fn state(&self) -> TargetState {
        if self.paused {
            return TargetState::Paused;
        }
        match self.breaker.state() {
            BreakerState::Closed => TargetState::Closed,
            BreakerState::Open => TargetState::Open,
            BreakerState::HalfOpen => TargetState::HalfOpen,
        }
    }
}

/// What holds deliveries to one target back, shared by its scheduler, its
/// prober and the admin port.
pub struct TargetControl {
    target: Target,
    state: Mutex<ControlState>,
    rate: Option<RateLimit>,
    metrics: ControlMetrics,
    /// Where a pause by hand is stored, if anywhere.
    pause_file: Option<PathBuf>,
    /// Wakes the scheduler after a resume.
    wake: Notify,
    /// One pause or resume at a time, so that the stored pause and the one
    /// in memory end the same.
    by_hand: tokio::sync::Mutex<()>,
}

impl TargetControl {
    fn new(
        target: Target,
        flags: &ControlFlags,
        metrics: &Metrics,
        pause_dir: Option<&Path>,
    ) -> std::io::Result<Self> {
        let pause_file = pause_dir.map(|dir| dir.join(format!("paused-{}", target.as_str())));
        let paused = match &pause_file {
            Some(file) => file.try_exists()?,
            None => false,
        };
        let control = Self {
            target,
            state: Mutex::new(ControlState {
                breaker: Breaker::new(
                    flags.breaker_failures,
                    flags.breaker_probe_interval,
                    flags.breaker_max_probe_interval,
                ),
                paused,
                shown: TargetState::Closed,
                since_ms: super::now_ms(),
                last_probe: None,
            }),
            rate: flags.rate_limit(target),
            metrics: metrics.control.clone(),
            pause_file,
            wake: Notify::new(),
            by_hand: tokio::sync::Mutex::new(()),
        };
        let mut state = control.state.lock().expect("control lock");
        state.shown = state.state();
        control.show(state.shown);
        if paused {
            tracing::warn!(
                to = target.as_str(),
                state = "paused",
                reason = "paused by hand before the restart",
                "deliveries to the target stay paused until POST /targets/{}/resume on the admin port",
                target.as_str()
            );
        }
        drop(state);
        Ok(control)
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.rate
    }

    /// Whether the scheduler may start an attempt now.
    pub fn admit(&self, now: Instant) -> Admit {
        let state = self.state.lock().expect("control lock");
        if state.paused {
            return Admit::Hold(None);
        }
        state.breaker.admit(now)
    }

    pub fn probe_started(&self) {
        let mut state = self.state.lock().expect("control lock");
        let change = state.breaker.probe_started();
        self.changed(&mut state, change);
    }

    pub fn record(&self, attempt: Attempt, probe: bool, now: Instant) {
        let mut state = self.state.lock().expect("control lock");
        let change = state.breaker.record(attempt, probe, now);
        self.changed(&mut state, change);
    }

    /// A delivery waits for the rate limit.
    pub fn rate_limited(&self) {
        self.metrics
            .rate_limited
            .with_label_values(&[self.target.as_str()])
            .inc();
    }

    /// Resolves after a resume by hand (or at once if one came since the last call).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    pub fn set_probe(&self, result: ProbeResult) {
        let label = self.target.as_str();
        self.metrics
            .probes
            .with_label_values(&[label, if result.ok { "ok" } else { "failed" }])
            .inc();
        self.metrics
            .reachable
            .with_label_values(&[label])
            .set(i64::from(result.ok));
        let mut state = self.state.lock().expect("control lock");
        let sooner = result.ok && state.breaker.target_answered(Instant::now());
        state.last_probe = Some(result);
        drop(state);
        if sooner {
            tracing::info!(
                to = label,
                "the target answers its reachability probe: a delivery tries it now"
            );
            self.wake.notify_one();
        }
    }

    /// Stops deliveries to the target until [`Self::resume`]; stored first
    /// where pauses are stored.
    pub async fn pause(&self) -> std::io::Result<serde_json::Value> {
        let _one_at_a_time = self.by_hand.lock().await;
        if let Some(file) = self.pause_file.clone() {
            let stamp = wire::rfc3339(super::now_ms());
            tokio::task::spawn_blocking(move || write_atomically(&file, stamp.as_bytes()))
                .await
                .map_err(std::io::Error::other)??;
        }
        let mut state = self.state.lock().expect("control lock");
        state.paused = true;
        self.changed(&mut state, None);
        Ok(describe(&state, self.rate))
    }

    /// Lets deliveries go again, with the breaker closed: a resume by hand
    /// says the target is back. If it is not, the breaker opens again after
    /// --breaker-failures attempts.
    pub async fn resume(&self) -> std::io::Result<serde_json::Value> {
        let _one_at_a_time = self.by_hand.lock().await;
        if let Some(file) = self.pause_file.clone() {
            tokio::task::spawn_blocking(move || remove_durably(&file))
                .await
                .map_err(std::io::Error::other)??;
        }
        let mut state = self.state.lock().expect("control lock");
        state.paused = false;
        state.breaker.reset();
        self.changed(&mut state, None);
        drop(state);
        self.wake.notify_one();
        Ok(self.describe())
    }

    /// The target's object of `GET /targets`.
    pub fn describe(&self) -> serde_json::Value {
        describe(&self.state.lock().expect("control lock"), self.rate)
    }

    /// Shows a change of the state, if there is one: metrics and a log line.
    fn changed(&self, state: &mut ControlState, change: Option<Change>) {
        let now = state.state();
        if now == state.shown {
            return;
        }
        let reason = match (change, now) {
            (Some(change), _) => change.reason,
            (None, TargetState::Paused) => "paused by hand".into(),
            (None, _) => "resumed by hand".into(),
        };
        let from = state.shown;
        state.shown = now;
        state.since_ms = super::now_ms();
        self.show(now);
        self.metrics
            .state_changes
            .with_label_values(&[self.target.as_str(), now.as_str()])
            .inc();
        let (target, state_name, from) = (self.target.as_str(), now.as_str(), from.as_str());
        let failures = state.breaker.failures();
        match now {
            TargetState::Open | TargetState::Paused => tracing::warn!(
                to = target,
                state = state_name,
                from,
                %reason,
                consecutive_failures = failures,
                "deliveries to the target stop"
            ),
            TargetState::HalfOpen => {
                tracing::info!(to = target, state = state_name, from, %reason, "one delivery tries the target")
            }
            TargetState::Closed => {
                tracing::info!(to = target, state = state_name, from, %reason, "deliveries to the target go on")
            }
        }
    }

    fn show(&self, now: TargetState) {
        for state in TargetState::ALL {
            self.metrics
                .target_state
                .with_label_values(&[self.target.as_str(), state.as_str()])
                .set(i64::from(state == now));
        }
    }
}

fn describe(state: &ControlState, rate: Option<RateLimit>) -> serde_json::Value {
    serde_json::json!({
        "state": state.state().as_str(),
        "consecutiveFailures": state.breaker.failures(),
        "pausedByAdmin": state.paused,
        "since": wire::rfc3339(state.since_ms),
        "lastProbe": state.last_probe.as_ref().map(|p| serde_json::json!({
            "at": wire::rfc3339(p.at_ms),
            "ok": p.ok,
            "status": p.status,
            "error": p.error,
            "durationMs": p.duration_ms,
        })),
        "rateLimit": rate.map(|r| serde_json::json!({
            "perSecond": r.per_second,
            "burst": r.burst,
        })),
    })
}

/// Both targets' controls.
pub struct Controls {
    pub bot: Arc<TargetControl>,
    pub response: Arc<TargetControl>,
}

impl Controls {
    /// `pause_dir`: where pauses by hand are stored (the embedded store's
    /// directory); `None`: they last as long as the process.
    pub fn open(
        flags: &ControlFlags,
        metrics: &Metrics,
        pause_dir: Option<&Path>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            bot: Arc::new(TargetControl::new(Target::Bot, flags, metrics, pause_dir)?),
            response: Arc::new(TargetControl::new(
                Target::Response,
                flags,
                metrics,
                pause_dir,
            )?),
        })
    }

    pub fn get(&self, target: Target) -> &Arc<TargetControl> {
        match target {
            Target::Bot => &self.bot,
            Target::Response => &self.response,
        }
    }

    /// The body of `GET /targets`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "bot": self.bot.describe(),
            "response": self.response.describe(),
        })
    }
}

/// Writes `file` whole or not at all: a temporary file, synced, renamed
/// over it, and the directory synced.
fn write_atomically(file: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, file)?;
    sync_parent(file)
}

fn remove_durably(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file) {
        Ok(()) => sync_parent(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_parent(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(50.0, 5), t0);
        for _ in 0..5 {
            bucket.take(t0).unwrap();
        }
        let wait = bucket.take(t0).unwrap_err();
        assert!((19 * MS..=21 * MS).contains(&wait), "{wait:?}");
        assert!(bucket.take(t0 + 10 * MS).is_err(), "half a token");
        bucket.take(t0 + 20 * MS).unwrap();
        assert!(bucket.take(t0 + 20 * MS).is_err());
        // A long quiet spell fills it up to the burst, not beyond.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..5 {
            bucket.take(later).unwrap();
        }
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn a_bucket_holds_its_rate_over_a_long_run() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(100.0, 10), t0);
        // Take whenever told to, as the scheduler does: 1,010 tokens take
        // ten seconds (the burst, then 100 a second).
        let (mut now, mut taken) = (t0, 0);
        while taken < 1010 {
            match bucket.take(now) {
                Ok(()) => taken += 1,
                Err(wait) => now += wait,
            }
        }
        let took = now - t0;
        assert!(
            (Duration::from_millis(9_990)..=Duration::from_millis(10_020)).contains(&took),
            "{took:?}"
        );
    }

    #[test]
    fn a_slow_bucket_asks_for_a_long_wait_and_never_for_none() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(0.5, 1), t0);
        bucket.take(t0).unwrap();
        assert_eq!(bucket.take(t0).unwrap_err(), Duration::from_secs(2));
        let mut fast = TokenBucket::new(limit(1e9, 1), t0);
        fast.take(t0).unwrap();
        assert!(fast.take(t0).unwrap_err() >= MS);
    }

    #[test]
    fn burst_defaults_to_the_rate_rounded_up() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: ControlFlags,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.flags)
        };
        let f = parse(&["--bot-rate-limit=2.5"]).unwrap();
        assert_eq!(f.rate_limit(Target::Bot), Some(limit(2.5, 3)));
        assert_eq!(f.rate_limit(Target::Response), None);
        let f = parse(&["--response-rate-limit=0.2", "--bot-rate-limit=0"]).unwrap();
        assert_eq!(f.rate_limit(Target::Response), Some(limit(0.2, 1)));
        assert_eq!(f.rate_limit(Target::Bot), None, "0 is no limit");
        let f = parse(&["--bot-rate-limit=100", "--bot-rate-burst=7"]).unwrap();
        assert_eq!(f.rate_limit(Target::Bot), Some(limit(100.0, 7)));
        assert!(parse(&["--bot-rate-limit=-1"]).is_err());
        assert!(parse(&["--bot-rate-limit=fast"]).is_err());
        assert!(parse(&["--bot-rate-burst=0"]).is_err());
        // Rates that would make a wait no clock can hold are refused at start.
        for tiny in ["1e-30", "0.0001", "1e7"] {
            let e = parse(&[&format!("--bot-rate-limit={tiny}")]).unwrap_err();
            assert!(e.to_string().contains("between 0.001"), "{tiny}: {e}");
        }
        for (args, says) in [
            (&["--breaker-max-probe-interval=25h"][..], "at most 24h"),
            (
                &[
                    "--breaker-probe-interval=10000000000000000000s",
                    "--breaker-max-probe-interval=10000000000000000000s",
                ][..],
                "at most 24h",
            ),
            (&["--probe-interval=1ns"][..], "at least 100ms"),
            (&["--probe-interval=30ms"][..], "at least 100ms"),
        ] {
            let e = parse(args).unwrap().validate().unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
        assert!(parse(&["--probe-interval=0s"]).unwrap().validate().is_ok());
        let f = parse(&[]).unwrap();
        assert_eq!(f.breaker_failures, 10);
        assert_eq!(f.breaker_probe_interval, Duration::from_secs(5));
        assert_eq!(f.breaker_max_probe_interval, Duration::from_secs(300));
        assert_eq!(f.probe_interval, Duration::from_secs(30));
        f.validate().unwrap();
        let f = parse(&[
            "--breaker-probe-interval=10s",
            "--breaker-max-probe-interval=5s",
        ])
        .unwrap();
        assert!(f.validate().is_err());
    }

    fn breaker() -> Breaker {
        Breaker::new(3, Duration::from_secs(1), Duration::from_secs(4))
    }

    #[test]
    fn a_breaker_opens_after_the_threshold_of_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = breaker();
        assert_eq!(b.record(Attempt::Failed, false, t0), None);
        assert_eq!(b.record(Attempt::Failed, false, t0), None);
        assert_eq!(
            b.record(Attempt::Succeeded, false, t0),
            None,
            "closed stays closed"
        );
        assert_eq!(b.failures(), 0, "a success starts the count over");
        b.record(Attempt::Failed, false, t0);
        b.record(Attempt::Failed, false, t0);
        assert_eq!(b.admit(t0), Admit::Go);
        let change = b.record(Attempt::Failed, false, t0).unwrap();
        assert_eq!(change.state, BreakerState::Open);
        assert!(change.reason.contains("3 consecutive"), "{}", change.reason);
        assert_eq!(b.admit(t0), Admit::Hold(Some(t0 + Duration::from_secs(1))));
        // Attempts under way when it opened fail too: no change, no shorter wait.
        assert_eq!(b.record(Attempt::Failed, false, t0 + MS), None);
        assert_eq!(
            b.admit(t0 + MS),
            Admit::Hold(Some(t0 + Duration::from_secs(1)))
        );
    }

    #[test]
    fn an_open_breaker_lets_one_probe_delivery_go_with_doubling_waits() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Attempt::Failed, false, t0);
        }
        let mut at = t0;
        // The waits: 1 s, then 2 s, 4 s, and 4 s again (the cap).
        for wait in [1, 2, 4, 4] {
            assert_eq!(b.admit(at), Admit::Hold(Some(at + wait * s)));
            at += wait * s;
            assert_eq!(b.admit(at), Admit::Probe);
            assert_eq!(b.probe_started().unwrap().state, BreakerState::HalfOpen);
            assert_eq!(b.admit(at), Admit::Hold(None), "one probe at a time");
            // Another lane's failure, from before the circuit opened, is not the probe's.
            assert_eq!(b.record(Attempt::Failed, false, at), None);
            assert_eq!(b.admit(at), Admit::Hold(None));
            let change = b.record(Attempt::Failed, true, at).unwrap();
            assert_eq!(change.state, BreakerState::Open);
        }
        assert_eq!(b.admit(at), Admit::Hold(Some(at + 4 * s)));
        at += 4 * s;
        assert_eq!(b.admit(at), Admit::Probe);
        b.probe_started();
        let change = b.record(Attempt::Succeeded, true, at).unwrap();
        assert_eq!(change.state, BreakerState::Closed);
        assert_eq!(b.admit(at), Admit::Go);
        assert_eq!(b.failures(), 0);
        // Opened again, it starts over from the first wait.
        for _ in 0..3 {
            b.record(Attempt::Failed, false, at);
        }
        assert_eq!(b.admit(at), Admit::Hold(Some(at + s)));
    }

    #[test]
    fn huge_waits_neither_panic_nor_spin() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(
            RateLimit {
                per_second: 1e-30,
                burst: 1,
            },
            now,
        );
        assert_eq!(bucket.take(now), Ok(()));
        assert_eq!(bucket.take(now), Err(MAX_BREAKER_WAIT));
        let huge = Duration::from_secs(u64::MAX / 4);
        let mut b = Breaker::new(1, huge, huge);
        assert!(b.record(Attempt::Failed, false, now).is_some());
        assert_eq!(b.state(), BreakerState::Open);
        b.probe_started();
        assert!(b.record(Attempt::Failed, true, now).is_some());
    }

    #[test]
    fn a_target_answering_its_probe_is_tried_at_once_while_open() {
        let mut b = breaker();
        let now = Instant::now();
        assert!(!b.target_answered(now), "closed: nothing to hurry");
        for _ in 0..3 {
            b.record(Attempt::Failed, false, now);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(now), Admit::Hold(Some(_))));
        assert!(b.target_answered(now));
        assert_eq!(b.admit(now), Admit::Probe);
        // Half open (a delivery under way): one at a time still.
        b.probe_started();
        assert!(!b.target_answered(now));
        assert_eq!(b.admit(now), Admit::Hold(None));
    }

    #[test]
    fn a_probe_not_made_hands_over_to_the_next_lane_at_once() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Attempt::Failed, false, t0);
        }
        let at = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(at), Admit::Probe);
        b.probe_started();
        assert_eq!(b.record(Attempt::NotMade, false, at), None);
        assert_eq!(
            b.record(Attempt::NotMade, true, at).unwrap().state,
            BreakerState::Open
        );
        assert_eq!(b.admit(at), Admit::Probe);
    }

    #[test]
    fn a_late_success_closes_an_open_breaker_and_a_reset_closes_it_by_hand() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Attempt::Failed, false, t0);
        }
        assert_eq!(
            b.record(Attempt::Succeeded, false, t0).unwrap().state,
            BreakerState::Closed
        );
        for _ in 0..3 {
            b.record(Attempt::Failed, false, t0);
        }
        b.reset();
        assert_eq!((b.state(), b.failures()), (BreakerState::Closed, 0));
        let mut never = Breaker::new(0, Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..1000 {
            assert_eq!(never.record(Attempt::Failed, false, t0), None);
        }
        assert_eq!(never.admit(t0), Admit::Go, "0: the breaker never opens");
    }

    #[tokio::test]
    async fn a_pause_is_stored_and_read_back_and_a_resume_wakes_the_scheduler() {
        let dir = tempfile::tempdir().unwrap();
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: ControlFlags,
        }
        let flags = Cli::try_parse_from(["x"]).unwrap().flags;
        let metrics = Metrics::new("test");
        let controls = Controls::open(&flags, &metrics, Some(dir.path())).unwrap();
        let body = controls.bot.pause().await.unwrap();
        assert_eq!(body["state"], "paused");
        assert_eq!(body["pausedByAdmin"], true);
        assert_eq!(controls.bot.admit(Instant::now()), Admit::Hold(None));
        assert_eq!(controls.response.admit(Instant::now()), Admit::Go);
        assert!(dir.path().join("paused-bot").exists());

        let again = Controls::open(&flags, &Metrics::new("test"), Some(dir.path())).unwrap();
        assert_eq!(again.describe()["bot"]["state"], "paused");
        assert_eq!(again.describe()["response"]["state"], "closed");
        let body = again.bot.resume().await.unwrap();
        assert_eq!(body["state"], "closed");
        assert!(!dir.path().join("paused-bot").exists());
        // The resume left a wake-up for the scheduler.
        tokio::time::timeout(Duration::from_secs(1), again.bot.woken())
            .await
            .unwrap();
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(
                r#"botrelay_target_state{state="paused",target="bot",endpoint="test"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"botrelay_target_state_changes_total{state="paused",target="bot",endpoint="test"} 1"#
        ));
    }
}
