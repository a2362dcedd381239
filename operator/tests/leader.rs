//! Leader election with the real operator binary against the test API
//! server: a deleted Lease, a Lease taken by another holder, a leader cut off
//! from renewing, and a prompt handover on SIGTERM. Throughout, the replicas'
//! `botrelay_operator_leader` gauges are sampled, and two replicas must never
//! both report 1 at once. (The tests' Lease lasts 3 s: renewals every 1 s.)

mod support;

use std::time::{Duration, Instant, SystemTime};

use botrelay_test_apiserver::{Key, TestApiServer};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LEASE_SECS: u64 = 3;

fn lease_key() -> Key {
    Key::new(
        "coordination.k8s.io",
        "leases",
        LEASE_NS,
        "botrelay-operator",
    )
}

fn lease(server: &TestApiServer) -> Option<Value> {
    server.get(&lease_key())
}

fn lease_holder(server: &TestApiServer) -> Option<String> {
    lease(server)?["spec"]["holderIdentity"]
        .as_str()
        .map(String::from)
}

/// The leader gauge of a replica; None once its admin server is gone.
async fn leader_gauge(op: &Operator) -> Option<f64> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(&op.admin).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.lines().find_map(|l| {
            l.strip_prefix("botrelay_operator_leader ")?
                .trim()
                .parse()
                .ok()
        })
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// The replicas of a test, whose leader gauges are sampled while it waits.
struct Replicas {
    ops: Vec<Operator>,
    /// The previous round of samples, one per replica.
    last: Vec<Option<f64>>,
    rounds: u64,
}

impl Replicas {
    fn new() -> Self {
        Replicas {
            ops: vec![],
            last: vec![],
            rounds: 0,
        }
    }

    fn start(&mut self, server: &TestApiServer, identity: &str) -> usize {
        self.ops.push(Operator::start(server, identity, &[]));
        self.last.push(None);
        self.ops.len() - 1
    }

    fn logs(&self) -> String {
        self.ops
            .iter()
            .map(|op| op.logs())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// One round of samples, in replica order. A replica that reported 1 in
    /// the previous round and in this one led throughout between its two
    /// reads; two such replicas led at the same time.
    async fn sample(&mut self) {
        let mut now = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            now.push(leader_gauge(op).await);
        }
        let both = |i: usize| self.last[i] == Some(1.0) && now[i] == Some(1.0);
        let leading: Vec<usize> = (0..self.ops.len()).filter(|&i| both(i)).collect();
        assert!(
            leading.len() <= 1,
            "replicas {leading:?} both reported botrelay_operator_leader 1 over one sampled interval; logs:\n{}",
            self.logs()
        );
        self.last = now;
        self.rounds += 1;
    }

    /// Samples until `check` holds, or fails after `secs`.
    async fn until(
        &mut self,
        secs: u64,
        what: &str,
        mut check: impl FnMut(&mut Vec<Operator>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.sample().await;
            if check(&mut self.ops) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Samples until replica `i` has exited; its exit code.
    async fn until_exit(&mut self, i: usize, secs: u64) -> Option<i32> {
        let mut code = None;
        self.until(secs, "the replica to exit", |ops| {
            match ops[i].child.try_wait().unwrap() {
                Some(status) => {
                    code = status.code();
                    true
                }
                None => false,
            }
        })
        .await;
        code
    }
}

/// A leader, and a standby that is ready, not leading and not reconciling.
async fn leader_and_standby(server: &TestApiServer, r: &mut Replicas) {
    let a = r.start(server, "op-a");
    r.until(20, "op-a leading", |_| {
        lease_holder(server).as_deref() == Some("op-a")
    })
    .await;
    let b = r.start(server, "op-b");
    create_endpoint(server, "before", json!({}));
    r.until(30, "before reconciled", |_| {
        server
            .get(&ep_key("before"))
            .and_then(|ep| condition(&ep, "Ready"))
            .is_some_and(|c| c["reason"] == "RelayReady")
    })
    .await;
    assert_eq!(r.ops[a].metric("botrelay_operator_leader").await, Some(1.0));
    assert_eq!(r.ops[b].admin_get("/readyz").await.0, 200);
    assert_eq!(r.ops[b].metric("botrelay_operator_leader").await, Some(0.0));
    assert!(r.ops[b].logs().contains("waiting to lead"));
}

/// Creates `name` and samples until it is a ready relay.
async fn reconciled_by_the_new_leader(server: &TestApiServer, r: &mut Replicas, name: &str) {
    create_endpoint(server, name, json!({}));
    r.until(30, &format!("{name} reconciled"), |_| {
        server
            .get(&ep_key(name))
            .and_then(|ep| condition(&ep, "Ready"))
            .is_some_and(|c| c["reason"] == "RelayReady")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_stops_the_leader_and_the_standby_leads_after_one_lease_duration() {
    let server = start_server().await;
    let mut r = Replicas::new();
    leader_and_standby(&server, &mut r).await;

    server.delete(&lease_key()).unwrap();
    let deleted = Instant::now();
    assert_eq!(
        r.until_exit(0, 10).await,
        Some(1),
        "the leader exits non-zero"
    );
    assert!(r.ops[0].logs().contains("lost the leader Lease; stopping"));
    // op-b re-creates the Lease, but leads only a lease duration later: by
    // then a leader that had not noticed the deletion has stopped.
    r.until(20, "op-b leading", |_| {
        lease_holder(&server).as_deref() == Some("op-b")
    })
    .await;
    let mut led = None;
    while led.is_none() {
        r.sample().await;
        if r.last[1] == Some(1.0) {
            led = Some(deleted.elapsed());
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(20),
            "op-b never led:\n{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        led.unwrap() >= Duration::from_secs(LEASE_SECS),
        "op-b led {led:?} after the deletion"
    );
    assert!(r.ops[1].logs().contains("created the leader Lease"));
    reconciled_by_the_new_leader(&server, &mut r, "after").await;
    assert!(r.rounds > 20, "too few samples: {}", r.rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_a_renewal_period_of_the_leaders_sigterm() {
    let server = start_server().await;
    let mut r = Replicas::new();
    leader_and_standby(&server, &mut r).await;
    let transitions = lease(&server).unwrap()["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap();

    assert_eq!(r.ops[0].terminate(), Some(0), "SIGTERM ends cleanly");
    // Exited: the Lease was released on the way out.
    let released = Instant::now();
    assert!(r.ops[0].logs().contains("released the leader Lease"));
    r.until(10, "op-b leading", |_| {
        lease_holder(&server).as_deref() == Some("op-b")
    })
    .await;
    let took = released.elapsed();
    // One renewal period is 1 s: a poll, plus the time to write.
    assert!(
        took < Duration::from_millis(1_800),
        "op-b took the released Lease after {took:?}"
    );
    let spec = &lease(&server).unwrap()["spec"];
    assert_eq!(spec["leaseTransitions"], transitions + 1);
    assert!(spec["renewTime"].is_string());
    reconciled_by_the_new_leader(&server, &mut r, "after").await;
    assert_eq!(r.ops[1].metric("botrelay_operator_leader").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_another_holder_took_stops_and_never_overwrites_it() {
    let server = start_server().await;
    let mut r = Replicas::new();
    leader_and_standby(&server, &mut r).await;

    // Another holder takes the Lease (as one that found it expired would).
    let now = Timestamp::now().to_string();
    server
        .merge_patch(
            &lease_key(),
            json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": LEASE_SECS}}),
            false,
        )
        .unwrap();
    assert_eq!(
        r.until_exit(0, 10).await,
        Some(1),
        "the leader exits non-zero"
    );
    assert!(r.ops[0].logs().contains("lost the leader Lease; stopping"));
    assert!(
        !r.ops[0].logs().contains("released the leader Lease"),
        "a lost Lease is never released"
    );
    assert_eq!(
        lease_holder(&server).as_deref(),
        Some("intruder"),
        "the old leader's renewals did not overwrite the new holder"
    );
    // The intruder never renews: op-b takes the Lease once it expires.
    r.until(20, "op-b leading", |_| {
        lease_holder(&server).as_deref() == Some("op-b")
    })
    .await;
    reconciled_by_the_new_leader(&server, &mut r, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_before_its_lease_expires() {
    let server = start_server().await;
    let mut r = Replicas::new();
    leader_and_standby(&server, &mut r).await;

    // Every write to the Lease fails, as if the leader were cut off.
    server.fail_until_cleared("patch", "coordination.k8s.io", "leases", 503);
    assert_eq!(
        r.until_exit(0, 10).await,
        Some(1),
        "the leader exits non-zero"
    );
    let exited = SystemTime::now();
    let renewed: Timestamp = lease(&server).unwrap()["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let expires = SystemTime::from(renewed) + Duration::from_secs(LEASE_SECS);
    assert!(
        exited < expires,
        "the leader stopped {:?} after its Lease expired",
        exited.duration_since(expires).unwrap_or_default()
    );
    assert_eq!(lease_holder(&server).as_deref(), Some("op-a"));
    assert!(r.ops[0].logs().contains("lost the leader Lease; stopping"));

    // Writes work again: op-b takes the expired Lease and leads.
    server.clear_failures();
    r.until(20, "op-b leading", |_| {
        lease_holder(&server).as_deref() == Some("op-b")
    })
    .await;
    reconciled_by_the_new_leader(&server, &mut r, "after").await;
}
