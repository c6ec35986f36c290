//! Per-app token buckets for the sender API: `per_second` sustained, bursts up to `burst`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use longlink_common::apps::RateLimit;
use tokio::time::Instant;

/// One bucket. Tokens are fractional so that slow rates (1/s) refill smoothly.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// The limit the bucket was filled under; a config change resets the bucket to it.
    limit: RateLimit,
}

/// Token buckets of every app, created on first use. Held under a std mutex for a few
/// arithmetic operations only, never across an await.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token from `app`'s bucket, or says how long until one is available.
    pub fn take(&self, app: &str, limit: RateLimit) -> Result<(), Duration> {
        self.take_n(app, limit, 1)
    }

    /// Takes `n` tokens at once (all or none), or says how long until `n` are available.
    pub fn take_n(&self, app: &str, limit: RateLimit, n: u32) -> Result<(), Duration> {
        let n = f64::from(n);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(app.to_owned()).or_insert_with(|| Bucket {
            tokens: f64::from(limit.burst),
            last: now,
            limit,
        });
        if bucket.limit != limit {
            bucket.limit = limit;
            bucket.tokens = bucket.tokens.min(f64::from(limit.burst));
        }
        let rate = f64::from(limit.per_second);
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(f64::from(limit.burst));
        bucket.last = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            return Ok(());
        }
        if rate <= 0.0 {
            // A zero rate is a closed door; say "a minute" rather than "never".
            return Err(Duration::from_secs(60));
        }
        Err(Duration::from_secs_f64((n - bucket.tokens) / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit {
        per_second: 2,
        burst: 3,
    };

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_at_the_rate() {
        let rl = RateLimiter::default();
        for _ in 0..3 {
            rl.take("a", LIMIT).unwrap();
        }
        let wait = rl.take("a", LIMIT).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another app has its own bucket.
        rl.take("b", LIMIT).unwrap();
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(rl.take("a", LIMIT).is_err());
        tokio::time::advance(Duration::from_millis(2)).await;
        rl.take("a", LIMIT).unwrap();
        // A long pause refills only up to the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            rl.take("a", LIMIT).unwrap();
        }
        assert!(rl.take("a", LIMIT).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_applies_at_once() {
        let rl = RateLimiter::default();
        rl.take("a", LIMIT).unwrap();
        let tight = RateLimit {
            per_second: 1,
            burst: 1,
        };
        rl.take("a", tight).unwrap();
        assert!(rl.take("a", tight).is_err());
        let closed = RateLimit {
            per_second: 0,
            burst: 0,
        };
        assert_eq!(rl.take("a", closed), Err(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn take_n_is_all_or_nothing() {
        let rl = RateLimiter::default();
        rl.take_n("a", LIMIT, 2).unwrap();
        // One token left: three cannot be taken, and the failed try takes none.
        assert_eq!(rl.take_n("a", LIMIT, 3), Err(Duration::from_secs(1)));
        rl.take("a", LIMIT).unwrap();
        assert!(rl.take("a", LIMIT).is_err());
    }
}
