//! The endpoint's status: what a person reads to know whether the relay works
//! and what to do if not. Pure functions of what the reconcile observed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::build::webhook_url;
use crate::crd::{MessagingEndpoint, MessagingEndpointStatus};
use crate::targets::Reach;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the reconcile found, as far as status is concerned.
#[derive(Debug, Clone)]
pub enum Observation {
    /// The spec breaks a rule; nothing was applied.
    InvalidSpec(String),
    /// The credentials cannot be used (`reason`: `SecretNotFound`, `MissingSecretKey`).
    CredentialsUnusable {
        reason: &'static str,
        message: String,
    },
    /// Applying an object failed (the API server said why).
    ApplyFailed(String),
    /// Everything was applied; this is the Deployment as the API server returned it.
    Applied(Box<Deployment>),
}

struct Verdict {
    status: &'static str,
    reason: &'static str,
    message: String,
}

fn verdict(status: &'static str, reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict {
        status,
        reason,
        message: message.into(),
    }
}

/// The status the endpoint should have. `credentials_secret` is the Secret the
/// relay mounts; `now` stamps conditions whose status changed.
pub fn desired_status(
    endpoint: &MessagingEndpoint,
    observation: &Observation,
    credentials_secret: Option<String>,
    now: Time,
) -> MessagingEndpointStatus {
    let name = endpoint.name_any();
    let namespace = endpoint.namespace().unwrap_or_default();
    let url = webhook_url(&name, &namespace);
    let desired = endpoint.spec.replicas;
    let mut ready_replicas = 0;

    let (ready, progressing, degraded) = match observation {
        Observation::InvalidSpec(message) => (
            verdict("False", "InvalidSpec", message.clone()),
            verdict("False", "InvalidSpec", "fix the spec to continue"),
            verdict("True", "InvalidSpec", message.clone()),
        ),
        Observation::CredentialsUnusable { reason, message } => (
            verdict("False", reason, message.clone()),
            verdict("False", reason, "waiting for usable credentials"),
            verdict("True", reason, message.clone()),
        ),
        Observation::ApplyFailed(message) => (
            verdict("False", "ApplyFailed", message.clone()),
            verdict("False", "ApplyFailed", "retrying with backoff"),
            verdict("True", "ApplyFailed", message.clone()),
        ),
        Observation::Applied(deployment) => {
            let status = deployment.status.clone().unwrap_or_default();
            ready_replicas = status.ready_replicas.unwrap_or(0);
            let updated = status.updated_replicas.unwrap_or(0);
            let current_generation = status.observed_generation.unwrap_or(0)
                >= deployment.metadata.generation.unwrap_or(0);
            let stuck = status.conditions.unwrap_or_default().into_iter().find(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            });
            let rolled_out = current_generation && updated >= desired && ready_replicas >= desired;
            let counts = format!("{ready_replicas} of {desired} relay pods ready");
            if desired == 0 {
                (
                    verdict(
                        "False",
                        "ScaledToZero",
                        "spec.replicas is 0; the relay is stopped",
                    ),
                    verdict("False", "ScaledToZero", "spec.replicas is 0"),
                    verdict("False", "AsExpected", "no problems"),
                )
            } else if let Some(stuck) = stuck {
                let message = format!(
                    "rollout stuck: {} ({counts})",
                    stuck.message.unwrap_or_default()
                );
                (
                    verdict(
                        if rolled_out { "True" } else { "False" },
                        if rolled_out {
                            "RelayReady"
                        } else {
                            "RelayNotReady"
                        },
                        counts.clone(),
                    ),
                    verdict("False", "RolloutStuck", message.clone()),
                    verdict("True", "RolloutStuck", message),
                )
            } else if rolled_out {
                (
                    verdict(
                        "True",
                        "RelayReady",
                        format!("relay accepts messages at {url}"),
                    ),
                    verdict("False", "RolloutComplete", counts),
                    verdict("False", "AsExpected", "no problems"),
                )
            } else {
                (
                    verdict("False", "RelayNotReady", counts.clone()),
                    verdict("True", "RolloutInProgress", counts),
                    verdict("False", "AsExpected", "no problems"),
                )
            }
        }
    };

    let generation = endpoint.metadata.generation;
    let old = endpoint
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [
        (READY, ready),
        (PROGRESSING, progressing),
        (DEGRADED, degraded),
    ]
    .into_iter()
    .map(|(type_, v)| {
        // lastTransitionTime moves only when the status flips.
        let last_transition_time = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == v.status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.to_string(),
            status: v.status.to_string(),
            reason: v.reason.to_string(),
            message: v.message,
            observed_generation: generation,
            last_transition_time,
        }
    })
    .collect();

    MessagingEndpointStatus {
        observed_generation: generation,
        webhook_url: Some(url),
        credentials_secret,
        ready_replicas,
        replicas: desired,
        conditions,
    }
}

/// Adds the `BotReachable` and `ResponseEndpointReachable` conditions, as
/// the relay last reported its targets (see [`crate::targets`]).
pub fn add_reachability(
    endpoint: &MessagingEndpoint,
    status: &mut MessagingEndpointStatus,
    verdicts: [(&'static str, Reach); 2],
    now: Time,
) {
    let old = endpoint
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    for (type_, reach) in verdicts {
        let last_transition_time = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == reach.status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        status.conditions.retain(|c| c.type_ != type_);
        status.conditions.push(Condition {
            type_: type_.to_string(),
            status: reach.status.to_string(),
            reason: reach.reason.to_string(),
            message: reach.message,
            observed_generation: endpoint.metadata.generation,
            last_transition_time,
        });
    }
}

/// Whether two statuses say the same, transition times aside.
pub fn same_but_times(a: &MessagingEndpointStatus, b: &MessagingEndpointStatus) -> bool {
    let untimed = |s: &MessagingEndpointStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    untimed(a) == untimed(b)
}

/// Whether the endpoint's Ready condition is True.
pub fn is_ready(endpoint: &MessagingEndpoint) -> bool {
    endpoint
        .condition(READY)
        .is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::endpoint;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn deployment(generation: i64, observed: i64, ready: i32, updated: i32) -> Box<Deployment> {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            ..DeploymentStatus::default()
        });
        Box::new(d)
    }

    fn cond<'a>(s: &'a MessagingEndpointStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_relay_reports_url_secret_and_generation() {
        let ep = endpoint();
        let s = desired_status(
            &ep,
            &Observation::Applied(deployment(2, 2, 1, 1)),
            Some("support-credentials".into()),
            at(100),
        );
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(
            s.webhook_url.as_deref(),
            Some("http://support-relay.shop.svc:8080/v1/messages")
        );
        assert_eq!(s.credentials_secret.as_deref(), Some("support-credentials"));
        assert_eq!(s.ready_replicas, 1);
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "RelayReady")
        );
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(cond(&s, DEGRADED).status, "False");
    }

    #[test]
    fn rollout_in_progress_is_not_ready_but_progressing() {
        let s = desired_status(
            &endpoint(),
            &Observation::Applied(deployment(3, 2, 1, 0)),
            None,
            at(100),
        );
        assert_eq!(cond(&s, READY).reason, "RelayNotReady");
        assert_eq!(cond(&s, READY).message, "1 of 1 relay pods ready");
        assert_eq!(cond(&s, PROGRESSING).status, "True");
    }

    #[test]
    fn stuck_rollout_is_degraded() {
        let mut d = deployment(2, 2, 0, 1);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"support-relay-1\" has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]);
        let s = desired_status(&endpoint(), &Observation::Applied(d), None, at(100));
        let degraded = cond(&s, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "RolloutStuck")
        );
        assert!(degraded.message.contains("timed out progressing"));
        assert_eq!(cond(&s, READY).status, "False");
    }

    #[test]
    fn invalid_spec_and_credentials_problems_name_the_cause() {
        let s = desired_status(
            &endpoint(),
            &Observation::InvalidSpec("spec.bot.url: bad".into()),
            None,
            at(100),
        );
        assert_eq!(cond(&s, READY).reason, "InvalidSpec");
        assert_eq!(cond(&s, DEGRADED).message, "spec.bot.url: bad");

        let s = desired_status(
            &endpoint(),
            &Observation::CredentialsUnusable {
                reason: "MissingSecretKey",
                message: "Secret mine lacks bot-token".into(),
            },
            Some("mine".into()),
            at(100),
        );
        assert_eq!(cond(&s, READY).reason, "MissingSecretKey");
        assert_eq!(cond(&s, DEGRADED).status, "True");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut ep = endpoint();
        let first = desired_status(
            &ep,
            &Observation::Applied(deployment(1, 1, 0, 1)),
            None,
            at(100),
        );
        ep.status = Some(first.clone());
        // Same statuses, new message: time kept, so a re-reconcile writes nothing.
        let again = desired_status(
            &ep,
            &Observation::Applied(deployment(1, 1, 0, 1)),
            None,
            at(200),
        );
        assert_eq!(again, first);
        // Ready flips: its time moves, Degraded's does not.
        let ready = desired_status(
            &ep,
            &Observation::Applied(deployment(1, 1, 1, 1)),
            None,
            at(300),
        );
        assert_eq!(cond(&ready, READY).last_transition_time, at(300));
        assert_eq!(cond(&ready, DEGRADED).last_transition_time, at(100));
    }

    #[test]
    fn zero_replicas_is_reported_as_stopped() {
        let mut ep = endpoint();
        ep.spec.replicas = 0;
        let s = desired_status(
            &ep,
            &Observation::Applied(deployment(1, 1, 0, 0)),
            None,
            at(1),
        );
        assert_eq!(cond(&s, READY).reason, "ScaledToZero");
        assert_eq!(cond(&s, DEGRADED).status, "False");
    }
}
