//! Token-bucket rate limits per caller key (a source address, an agent's SPIFFE ID, a user
//! ID), with bounded memory.
//!
//! Each key has a bucket of `burst` tokens refilled at `per_second`; a request costs one
//! token or more (a batch of CSRs costs one per CSR). A key whose bucket is full again holds
//! no information and is dropped when the map reaches its size bound, so an attacker
//! cycling through keys cannot grow memory: over the bound, the least recently seen keys go
//! first (their buckets restart full, which errs towards letting callers in).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate: `per_second` tokens per second, at most `burst` saved up. A rate of 0 per
/// second means no limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second (0: unlimited).
    pub per_second: f64,
    /// Bucket size: the largest burst allowed after a quiet period.
    pub burst: u32,
}

impl Rate {
    /// Whether this rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.per_second > 0.0
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Rate limits per key; see the module docs.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
    /// Refusals logged at most once a second.
    log: crate::LogThrottle,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// Limits of `rate` per key, remembering at most `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
            log: crate::LogThrottle::default(),
        }
    }

    /// The rate this limiter applies.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `cost` tokens from `key`'s bucket, or says how long until they would be
    /// there (`Err(retry_after)`). A cost above the burst is never allowed: the caller must
    /// split it (the error's duration is then how long a full bucket takes).
    pub fn check(&self, key: &K, cost: u32) -> Result<(), Duration> {
        self.check_at(key, cost, Instant::now())
    }

    fn check_at(&self, key: &K, cost: u32, now: Instant) -> Result<(), Duration> {
        if !self.rate.is_limited() {
            return Ok(());
        }
        let burst = f64::from(self.rate.burst.max(1));
        let cost = f64::from(cost);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            self.evict(&mut buckets, now, burst);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate.per_second).min(burst);
        b.at = now;
        if cost > burst {
            return Err(Duration::from_secs_f64(burst / self.rate.per_second));
        }
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (cost - b.tokens) / self.rate.per_second,
            ))
        }
    }

    /// Makes room: drops every key whose bucket has refilled; if none has, the least
    /// recently seen quarter.
    fn evict(&self, buckets: &mut HashMap<K, Bucket>, now: Instant, burst: f64) {
        let per_second = self.rate.per_second;
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
        });
        if buckets.len() >= self.max_keys {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 4];
            buckets.retain(|_, b| b.at > cut);
        }
    }

    /// Whether a refusal should be logged now: true at most once a second, so that a
    /// flood of refused calls cannot flood the log too.
    pub fn log_refusal(&self) -> bool {
        self.log.ready()
    }

    /// Keys remembered now.
    pub fn keys(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A person-readable refusal: "`what`: at most N per second (burst B) for `who`; retry in …".
pub fn refusal(what: &str, rate: Rate, who: &str, retry_after: Duration) -> String {
    format!(
        "rate limit: at most {} {what} per second (burst {}) for {who}; retry in {} ms",
        rate.per_second,
        rate.burst,
        retry_after.as_millis().max(1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_key() {
        let l = RateLimiter::new(rate(2.0, 3), 100);
        let t = Instant::now();
        for _ in 0..3 {
            l.check_at(&"a", 1, t).unwrap();
        }
        let wait = l.check_at(&"a", 1, t).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another key has its own bucket.
        l.check_at(&"b", 1, t).unwrap();
        // Half a second later one token is back, not two.
        let later = t + Duration::from_millis(500);
        l.check_at(&"a", 1, later).unwrap();
        assert!(l.check_at(&"a", 1, later).is_err());
    }

    #[test]
    fn a_cost_above_the_burst_is_refused_and_batches_cost_per_item() {
        let l = RateLimiter::new(rate(10.0, 5), 100);
        let t = Instant::now();
        assert!(l.check_at(&1u32, 6, t).is_err());
        l.check_at(&1u32, 5, t).unwrap();
        assert!(l.check_at(&1u32, 1, t).is_err());
    }

    #[test]
    fn zero_per_second_means_unlimited() {
        let l = RateLimiter::new(rate(0.0, 0), 1);
        for i in 0..10_000u32 {
            l.check(&i, 1000).unwrap();
        }
        assert_eq!(l.keys(), 0);
    }

    #[test]
    fn memory_stays_bounded_when_keys_are_cycled() {
        let l = RateLimiter::new(rate(1.0, 2), 64);
        let t = Instant::now();
        for i in 0..100_000u32 {
            let _ = l.check_at(&i, 2, t + Duration::from_micros(u64::from(i)));
            assert!(l.keys() <= 64);
        }
        // A key that exhausted its bucket recently is still limited after the churn
        // unless it was among the oldest evicted: the most recent one is kept.
        assert!(l
            .check_at(&99_999u32, 1, t + Duration::from_micros(100_000))
            .is_err());
    }
}
