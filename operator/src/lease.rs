//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! - A candidate reads the Lease and takes it when it has no holder (never
//!   held, or released), when its `renewTime + leaseDurationSeconds` has
//!   passed, or when this identity already holds it (this replica restarted).
//!   Taking is a merge patch carrying the `metadata.resourceVersion` that was
//!   read, so of two candidates racing only one wins (the other gets 409).
//!   `leaseTransitions` grows by one when the holder changes.
//! - A candidate that finds no Lease creates it, holding it, but leads only
//!   one lease duration later (renewing meanwhile): the Lease may have been
//!   deleted under a leader that has not noticed yet, and such a leader stops
//!   by then (see below).
//! - The leader renews every `duration / 3`, with the same precondition. A 409
//!   or 404 means the Lease changed: it is read again, and if another replica
//!   holds it or it is gone, the Lease is lost. If no renewal has succeeded for
//!   `duration - duration / 3` (measured from when the last successful one was
//!   sent), the Lease counts as lost too: a candidate may take it `duration`
//!   after that renewal, so the leader has a third of the duration to stop.
//! - A leader stopping while it still holds the Lease releases it (clears
//!   `holderIdentity` and `renewTime`, with the precondition), so a candidate
//!   takes over at its next poll. A lost Lease is never released.
//! - Candidates poll the Lease every `duration / 3`, and just after it is due
//!   to expire. (Watching it would need the `list` and `watch` verbs, which
//!   the operator is not granted on Leases.)
//!
//! Expiry compares the holder's `renewTime` with this replica's clock, so the
//! replicas' clocks must agree to well within a third of the lease duration.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

const FIELD_MANAGER: &str = "botrelay-operator-lease";

/// Which Lease, who this replica is, and how long a Lease lasts.
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl Settings {
    /// How often the leader renews and a candidate polls.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// The time a leader has to stop between its renewal deadline and the
    /// Lease's expiry.
    pub fn grace(&self) -> Duration {
        self.duration / 3
    }

    /// How long a leader may go without a successful renewal before it must
    /// stop acting as leader.
    pub fn renew_deadline(&self) -> Duration {
        self.duration - self.grace()
    }

    /// The wait before trying again after a failed renewal.
    fn retry_interval(&self) -> Duration {
        (self.duration / 15).max(Duration::from_millis(100))
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What a candidate may do with the Lease as it read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No holder, released, expired, or already this identity's: take it.
    Take,
    /// Another replica holds it; it expires in this long unless renewed.
    Wait(Duration),
}

/// May `identity` take a Lease with this spec at `now`? `default_duration`
/// stands in for a missing `leaseDurationSeconds`.
pub fn may_take(
    spec: Option<&LeaseSpec>,
    identity: &str,
    now: SystemTime,
    default_duration: Duration,
) -> Verdict {
    let Some(spec) = spec else {
        return Verdict::Take;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => return Verdict::Take,
        Some(holder) if holder == identity => return Verdict::Take,
        Some(_) => {}
    }
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        // A holder that never wrote a time cannot be judged: treat it as released.
        return Verdict::Take;
    };
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    let renewed = SystemTime::from(renewed.0);
    let expires = renewed.checked_add(duration).unwrap_or(renewed);
    match expires.duration_since(now) {
        Ok(left) if !left.is_zero() => Verdict::Wait(left),
        _ => Verdict::Take,
    }
}

/// Is the Lease as read again after a failed renewal (None: it is gone)
/// still held by `identity`?
pub fn still_holds(lease: Option<&Lease>, identity: &str) -> bool {
    holder(lease).as_deref() == Some(identity)
}

/// Must a leader whose last successful renewal was sent at `last_renewed`
/// have stopped by `now`?
pub fn must_step_down(last_renewed: Instant, now: Instant, renew_deadline: Duration) -> bool {
    now.saturating_duration_since(last_renewed) >= renew_deadline
}

fn holder(lease: Option<&Lease>) -> Option<String> {
    lease?
        .spec
        .as_ref()?
        .holder_identity
        .clone()
        .filter(|h| !h.is_empty())
}

/// Why a leader lost its Lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("the Lease is held by {0}")]
    Taken(String),
    #[error("the Lease was deleted")]
    Deleted,
    #[error("no renewal succeeded for {0:?}")]
    NotRenewed(Duration),
}

/// The Lease as this replica holds it: the resourceVersion of its last
/// write, and when that write was sent.
#[derive(Debug, Clone)]
pub struct Held {
    resource_version: String,
    renewed_at: Instant,
}

enum Attempt {
    /// Took an existing Lease: lead now.
    Took(Held),
    /// Created the Lease: lead one lease duration from now.
    Created(Held),
    /// Another replica holds it, for at most this long.
    Wait(Duration),
}

enum Renewal {
    Lost(Lost),
    Failed(String),
}

/// Runs the election for one replica.
pub struct Elector {
    api: Api<Lease>,
    settings: Settings,
}

impl Elector {
    pub fn new(client: Client, settings: Settings) -> Self {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Stands by until this replica may lead, or `stop` resolves (None).
    pub async fn acquire(&self, stop: impl Future<Output = ()>) -> Option<Held> {
        tokio::pin!(stop);
        loop {
            let attempt = tokio::select! {
                _ = &mut stop => return None,
                a = tokio::time::timeout(self.settings.renew_interval(), self.try_acquire()) => a,
            };
            let wait = match attempt {
                Ok(Ok(Attempt::Took(held))) => return Some(held),
                Ok(Ok(Attempt::Created(mut held))) => {
                    tracing::info!(
                        lease = %self.settings.name,
                        wait = ?self.settings.duration,
                        "created the leader Lease; holding it one lease duration before leading"
                    );
                    let lead_at = held.renewed_at + self.settings.duration;
                    let mut stopped = false;
                    let kept = self
                        .keep(&mut held, async {
                            tokio::select! {
                                _ = &mut stop => stopped = true,
                                _ = tokio::time::sleep_until(lead_at.into()) => {}
                            }
                        })
                        .await;
                    match kept {
                        Ok(()) if stopped => {
                            self.release(held).await;
                            return None;
                        }
                        Ok(()) => return Some(held),
                        Err(lost) => {
                            tracing::warn!(%lost, "lost the Lease this replica created before leading");
                            Duration::ZERO
                        }
                    }
                }
                Ok(Ok(Attempt::Wait(expires_in))) => expires_in + Duration::from_millis(50),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not read or take the leader Lease");
                    self.settings.renew_interval()
                }
                Err(_) => {
                    tracing::warn!("reading or taking the leader Lease timed out");
                    Duration::ZERO
                }
            };
            let wait = wait.min(self.settings.renew_interval());
            tokio::select! {
                _ = &mut stop => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One look at the Lease: take it or create it if allowed.
    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let name = &self.settings.name;
        let identity = &self.settings.identity;
        // A second round when the Lease changed between the read and the write.
        for _ in 0..2 {
            let Some(lease) = self.api.get_opt(name).await? else {
                let (now, sent) = (SystemTime::now(), Instant::now());
                let lease: Lease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": self.settings.namespace},
                    "spec": {
                        "holderIdentity": identity,
                        "leaseDurationSeconds": self.settings.duration_seconds(),
                        "acquireTime": micro_time(now),
                        "renewTime": micro_time(now),
                        "leaseTransitions": 0,
                    },
                }))
                .expect("a Lease");
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => return Ok(Attempt::Created(held(&created, sent))),
                    Err(e) if status_code(&e) == Some(409) => continue,
                    Err(e) => return Err(e),
                }
            };
            let spec = lease.spec.as_ref();
            if let Verdict::Wait(left) =
                may_take(spec, identity, SystemTime::now(), self.settings.duration)
            {
                return Ok(Attempt::Wait(left));
            }
            let previous = holder(Some(&lease));
            let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
            let transitions = if previous.as_deref() == Some(identity.as_str()) {
                transitions
            } else {
                transitions.saturating_add(1)
            };
            let (now, sent) = (SystemTime::now(), Instant::now());
            let patch = json!({
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {
                    "holderIdentity": identity,
                    "leaseDurationSeconds": self.settings.duration_seconds(),
                    "acquireTime": micro_time(now),
                    "renewTime": micro_time(now),
                    "leaseTransitions": transitions,
                },
            });
            match self.patch(patch).await {
                Ok(taken) => {
                    tracing::info!(previous = ?previous, transitions, "took the leader Lease");
                    return Ok(Attempt::Took(held(&taken, sent)));
                }
                Err(e) if matches!(status_code(&e), Some(404 | 409)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Attempt::Wait(self.settings.renew_interval()))
    }

    /// Renews the Lease every renewal interval until `until` resolves while
    /// it is held (Ok), or it is lost.
    pub async fn keep(&self, held: &mut Held, until: impl Future<Output = ()>) -> Result<(), Lost> {
        tokio::pin!(until);
        let deadline_after = self.settings.renew_deadline();
        let mut next = held.renewed_at + self.settings.renew_interval();
        loop {
            let deadline = held.renewed_at + deadline_after;
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline.into()) => return Err(Lost::NotRenewed(deadline_after)),
                _ = &mut until => return Ok(()),
                _ = tokio::time::sleep_until(next.into()) => {}
            }
            if must_step_down(held.renewed_at, Instant::now(), deadline_after) {
                return Err(Lost::NotRenewed(deadline_after));
            }
            let renewal = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline.into()) => return Err(Lost::NotRenewed(deadline_after)),
                _ = &mut until => return Ok(()),
                r = self.renew(held) => r,
            };
            match renewal {
                Ok(()) => next = held.renewed_at + self.settings.renew_interval(),
                Err(Renewal::Lost(lost)) => return Err(lost),
                Err(Renewal::Failed(error)) => {
                    tracing::warn!(%error, "could not renew the leader Lease; retrying");
                    next = Instant::now() + self.settings.retry_interval();
                }
            }
        }
    }

    async fn renew(&self, held: &mut Held) -> Result<(), Renewal> {
        let timeout = self.settings.renew_interval();
        let (now, sent) = (SystemTime::now(), Instant::now());
        let patch = json!({
            "metadata": {"resourceVersion": held.resource_version},
            "spec": {
                "holderIdentity": self.settings.identity,
                "leaseDurationSeconds": self.settings.duration_seconds(),
                "renewTime": micro_time(now),
            },
        });
        match tokio::time::timeout(timeout, self.patch(patch)).await {
            Err(_) => Err(Renewal::Failed("timed out".into())),
            Ok(Ok(lease)) => {
                *held = self::held(&lease, sent);
                Ok(())
            }
            Ok(Err(e)) if matches!(status_code(&e), Some(404 | 409)) => {
                // Changed or gone since our last write: whose is it now?
                match tokio::time::timeout(timeout, self.api.get_opt(&self.settings.name)).await {
                    Ok(Ok(lease)) if still_holds(lease.as_ref(), &self.settings.identity) => {
                        // Still ours (a write of ours whose answer was lost):
                        // renew again from what is stored now.
                        if let Some(rv) = lease.and_then(|l| l.metadata.resource_version) {
                            held.resource_version = rv;
                        }
                        Err(Renewal::Failed(format!("the Lease changed ({e})")))
                    }
                    Ok(Ok(None)) => Err(Renewal::Lost(Lost::Deleted)),
                    Ok(Ok(lease)) => Err(Renewal::Lost(Lost::Taken(
                        holder(lease.as_ref()).unwrap_or_else(|| "no one".into()),
                    ))),
                    Ok(Err(e)) => Err(Renewal::Failed(format!("reading the Lease: {e}"))),
                    Err(_) => Err(Renewal::Failed("reading the Lease timed out".into())),
                }
            }
            Ok(Err(e)) => Err(Renewal::Failed(e.to_string())),
        }
    }

    /// Hands the Lease over: clears its holder, unless it changed since this
    /// replica's last write (then it is released only if still ours).
    pub async fn release(&self, held: Held) {
        let timeout = self.settings.renew_interval();
        let mut rv = held.resource_version;
        for _ in 0..3 {
            let patch = json!({
                "metadata": {"resourceVersion": rv},
                "spec": {"holderIdentity": null, "renewTime": null},
            });
            match tokio::time::timeout(timeout, self.patch(patch)).await {
                Ok(Ok(_)) => {
                    tracing::info!(lease = %self.settings.name, "released the leader Lease");
                    return;
                }
                Ok(Err(e)) if status_code(&e) == Some(409) => {
                    match tokio::time::timeout(timeout, self.api.get_opt(&self.settings.name)).await
                    {
                        Ok(Ok(Some(lease)))
                            if still_holds(Some(&lease), &self.settings.identity) =>
                        {
                            match lease.metadata.resource_version {
                                Some(now) => rv = now,
                                None => return,
                            }
                        }
                        Ok(Ok(_)) => return,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "could not release the Lease");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!("releasing the Lease timed out");
                            return;
                        }
                    }
                }
                Ok(Err(e)) if status_code(&e) == Some(404) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not release the Lease");
                    return;
                }
                Err(_) => {
                    tracing::warn!("releasing the Lease timed out");
                    return;
                }
            }
        }
    }

    async fn patch(&self, patch: Value) -> Result<Lease, kube::Error> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        self.api
            .patch(&self.settings.name, &params, &Patch::Merge(&patch))
            .await
    }
}

/// A held Lease, renewed in the background until it is released or lost.
pub struct Leadership {
    elector: Arc<Elector>,
    lost: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(Held, Result<(), Lost>)>,
}

impl Leadership {
    /// Starts renewing `held`.
    pub fn start(elector: Arc<Elector>, mut held: Held) -> Self {
        let (lost_tx, lost) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let elector = elector.clone();
            async move {
                let result = elector
                    .keep(&mut held, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                if let Err(lost) = &result {
                    tracing::error!(reason = %lost, "the leader Lease is lost");
                    let _ = lost_tx.send(true);
                }
                (held, result)
            }
        });
        Leadership {
            elector,
            lost,
            stop,
            task,
        }
    }

    /// The time between the renewal deadline and the Lease's expiry.
    pub fn grace(&self) -> Duration {
        self.elector.settings.grace()
    }

    /// Resolves once the Lease is lost; never while it is held.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            if lost.wait_for(|l| *l).await.is_err() {
                futures::future::pending::<()>().await;
            }
        }
    }

    /// Stops renewing; releases the Lease if it is still held, else says why
    /// it was lost.
    pub async fn release(self) -> Result<(), Lost> {
        let _ = self.stop.send(());
        let (held, result) = match self.task.await {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, "the Lease renewal task failed");
                return Err(Lost::NotRenewed(self.elector.settings.renew_deadline()));
            }
        };
        result?;
        self.elector.release(held).await;
        Ok(())
    }
}

fn held(lease: &Lease, sent: Instant) -> Held {
    Held {
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        renewed_at: sent,
    }
}

fn micro_time(t: SystemTime) -> String {
    let t = Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH);
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(t))
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    const D: Duration = Duration::from_secs(15);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn spec(holder: Option<&str>, renewed: Option<u64>, secs: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: renewed.map(|s| MicroTime(Timestamp::try_from(at(s)).unwrap())),
            lease_duration_seconds: secs,
            ..LeaseSpec::default()
        }
    }

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            spec: Some(spec(holder, Some(0), Some(15))),
            ..Lease::default()
        }
    }

    #[test]
    fn a_free_or_released_lease_may_be_taken() {
        assert_eq!(may_take(None, "b", at(0), D), Verdict::Take);
        assert_eq!(
            may_take(Some(&spec(None, None, None)), "b", at(0), D),
            Verdict::Take
        );
        // Released: holder cleared (or empty), renewTime too.
        assert_eq!(
            may_take(Some(&spec(Some(""), None, Some(15))), "b", at(0), D),
            Verdict::Take
        );
        assert_eq!(
            may_take(Some(&spec(None, Some(0), Some(15))), "b", at(1), D),
            Verdict::Take
        );
    }

    #[test]
    fn a_held_lease_may_be_taken_only_once_expired() {
        let held = spec(Some("a"), Some(100), Some(15));
        assert_eq!(
            may_take(Some(&held), "b", at(100), D),
            Verdict::Wait(Duration::from_secs(15))
        );
        assert_eq!(
            may_take(Some(&held), "b", at(114), D),
            Verdict::Wait(Duration::from_secs(1))
        );
        assert_eq!(may_take(Some(&held), "b", at(115), D), Verdict::Take);
        assert_eq!(may_take(Some(&held), "b", at(500), D), Verdict::Take);
        // A renewTime ahead of this replica's clock only makes it wait longer.
        assert_eq!(
            may_take(Some(&held), "b", at(90), D),
            Verdict::Wait(Duration::from_secs(25))
        );
    }

    #[test]
    fn the_leases_own_duration_counts_and_ours_stands_in_for_a_missing_one() {
        let short = spec(Some("a"), Some(100), Some(3));
        assert_eq!(may_take(Some(&short), "b", at(103), D), Verdict::Take);
        let unset = spec(Some("a"), Some(100), None);
        assert_eq!(
            may_take(Some(&unset), "b", at(110), D),
            Verdict::Wait(Duration::from_secs(5))
        );
        assert_eq!(may_take(Some(&unset), "b", at(115), D), Verdict::Take);
    }

    #[test]
    fn a_lease_already_ours_is_taken_back_at_once() {
        let mine = spec(Some("b"), Some(100), Some(15));
        assert_eq!(may_take(Some(&mine), "b", at(101), D), Verdict::Take);
    }

    #[test]
    fn the_lease_is_lost_when_another_holds_it_or_it_is_gone() {
        assert!(still_holds(Some(&lease(Some("a"))), "a"));
        assert!(!still_holds(Some(&lease(Some("b"))), "a"));
        assert!(!still_holds(Some(&lease(None)), "a"));
        assert!(!still_holds(Some(&lease(Some(""))), "a"));
        assert!(!still_holds(None, "a"));
    }

    #[test]
    fn a_leader_steps_down_once_renewals_failed_for_the_deadline() {
        let s = Settings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            duration: D,
        };
        assert_eq!(s.renew_interval(), Duration::from_secs(5));
        assert_eq!(s.renew_deadline(), Duration::from_secs(10));
        // The deadline comes a whole grace before a candidate may take the Lease.
        assert_eq!(s.renew_deadline() + s.grace(), s.duration);
        let t0 = Instant::now();
        let deadline = s.renew_deadline();
        assert!(!must_step_down(t0, t0, deadline));
        assert!(!must_step_down(
            t0,
            t0 + Duration::from_millis(9_999),
            deadline
        ));
        assert!(must_step_down(t0, t0 + Duration::from_secs(10), deadline));
        assert!(must_step_down(t0, t0 + Duration::from_secs(60), deadline));
        // A clock read before the renewal was sent never counts as late.
        assert!(!must_step_down(t0 + Duration::from_secs(1), t0, deadline));
    }

    #[test]
    fn times_are_written_as_micro_times() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(micro_time(t), "2023-11-14T22:13:20.123456Z");
    }
}
