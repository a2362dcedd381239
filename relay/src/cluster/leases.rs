//! Who delivers which partition. Pure rules here; the store renews and
//! takes the leases in the bucket (`store.rs`).
//!
//! Each live replica heartbeats a `replica.<id>` key, and each owned
//! partition is a `partition.<n>` key holding its owner's id. The bucket's
//! entries expire after the lease TTL, so a replica that stops renewing loses
//! its partitions; a lease is taken with create-if-absent and renewed with
//! compare-and-set on its revision, so that two replicas never both believe
//! they hold it.

use super::log::PARTITIONS;

pub fn partition_key(partition: u16) -> String {
    format!("partition.{partition}")
}

pub fn replica_key(replica: &str) -> String {
    format!("replica.{replica}")
}

/// How many partitions each of `live` replicas should deliver: an even
/// share, rounded up so that every partition has room somewhere.
pub fn share(live: usize) -> usize {
    let live = live.max(1);
    usize::from(PARTITIONS).div_ceil(live)
}

/// The order in which a replica tries to take free partitions: from a
/// place of its own (its id hashed), so that replicas starting together do
/// not all race for partition 0 first.
pub fn preference(replica: &str) -> impl Iterator<Item = u16> {
    let start = (crate::ids::key(replica) % u128::from(PARTITIONS)) as u16;
    (0..PARTITIONS).map(move |i| (start + i) % PARTITIONS)
}

/// What a replica owning `owned` should do with a share of `share`: the
/// partitions to give back (the last taken first, `owned` being in the order
/// taken), or how many more to take.
pub fn rebalance(owned: &[u16], share: usize) -> (Vec<u16>, usize) {
    if owned.len() > share {
        (owned[share..].iter().rev().copied().collect(), 0)
    } else {
        (Vec::new(), share - owned.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_partition_and_spread_evenly() {
        for live in 1..=10 {
            assert!(share(live) * live >= usize::from(PARTITIONS), "{live}");
            // And no more than that: one less would leave a partition out.
            assert!((share(live) - 1) * live < usize::from(PARTITIONS), "{live}");
        }
        assert_eq!(share(1), 32);
        assert_eq!(share(2), 16);
        assert_eq!(share(3), 11);
        assert_eq!(share(0), 32, "no heartbeat seen yet: this replica alone");
    }

    #[test]
    fn a_replica_over_its_share_gives_back_the_last_it_took() {
        assert_eq!(rebalance(&[4, 5, 6, 7], 2), (vec![7, 6], 0));
        assert_eq!(rebalance(&[4, 5], 5), (vec![], 3));
        assert_eq!(rebalance(&[], 3), (vec![], 3));
    }

    #[test]
    fn preference_visits_every_partition_once() {
        let mut seen: Vec<u16> = preference("relay-a").collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..PARTITIONS).collect::<Vec<_>>());
    }
}
