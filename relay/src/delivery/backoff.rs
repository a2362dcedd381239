//! When to try again.

use rand::Rng;
use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured; a larger one is taken as this, so
/// that a careless header (a day, a date far ahead) cannot hold a
/// conversation back for that long. The README states it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (0 for the first):
    /// `initial * 2^attempt`, capped at `max`, then "equal jitter" (a uniform
    /// pick in the upper half) so that conversations failing together do not
    /// retry together. A `Retry-After` from the target is a floor, up to
    /// [`MAX_RETRY_AFTER`].
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let exp = self
            .initial
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let half = exp / 2;
        let jittered = half + half.mul_f64(rng.random::<f64>());
        match retry_after {
            Some(floor) => jittered.max(floor.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// Reads `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for (attempt, full) in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (40, 60)] {
            for _ in 0..50 {
                let d = b.delay(attempt, None, &mut rng);
                let full = Duration::from_secs(full);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        // Jitter really spreads the waits.
        let picks: std::collections::HashSet<_> =
            (0..20).map(|_| b.delay(3, None, &mut rng)).collect();
        assert!(picks.len() > 10);
    }

    #[test]
    fn retry_after_is_a_floor_with_a_ceiling() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(30)), &mut rng),
            Duration::from_secs(30)
        );
        assert!(b.delay(0, Some(Duration::ZERO), &mut rng) >= Duration::from_millis(50));
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(86_400)), &mut rng),
            MAX_RETRY_AFTER
        );
    }

    /// The README promises the ceiling the code keeps, wherever it speaks of
    /// `Retry-After` as a floor.
    #[test]
    fn the_readme_gives_the_retry_after_ceiling() {
        // Lines joined: a paragraph may wrap anywhere.
        let readme = include_str!("../../../README.md")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let floor = format!(
            "`Retry-After` is a floor up to {} h",
            MAX_RETRY_AFTER.as_secs() / 3600
        );
        let said = readme.matches("`Retry-After` is a floor").count();
        assert!(said > 0);
        assert_eq!(readme.matches(&floor).count(), said, "{floor}");
        let retries = readme
            .split("**Retries**")
            .nth(1)
            .expect("the README's retries paragraph");
        assert!(retries.contains(&floor), "{floor}");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
