//! Exponential backoff with jitter for reconnects and retries.

use std::time::Duration;

/// Doubling delays from `base` up to `max`, each with up to 25% random jitter subtracted, so
/// many clients that lost the same node do not come back in lock step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// State of the jitter generator (xorshift); never zero.
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let seed = xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes()) | 1;
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            seed,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter_permille = self.seed % 251; // 0..=250 ‰ = up to 25%
        full - full.mul_f64(jitter_permille as f64 / 1000.0)
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

impl Default for Backoff {
    /// 50 ms doubling to 2 s: reconnects to a restarted node within a couple of seconds.
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_max_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let expected_full = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for full in expected_full {
            let d = b.next_delay().as_millis() as u64;
            assert!(d <= full, "{d} > {full}");
            assert!(d >= full * 3 / 4, "{d} < 75% of {full}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(10));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_the_delay() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(100));
        let start = tokio::time::Instant::now();
        b.wait().await;
        let slept = start.elapsed();
        assert!(slept >= Duration::from_millis(75) && slept <= Duration::from_millis(101));
    }
}
