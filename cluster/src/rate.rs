//! The one rate limiter: keyed token buckets with bounded memory.
//!
//! Nodes use it to limit sign-ins and registrations per client address and
//! per account, and sends per user (messages and bytes); gateways may use it
//! per connection. A [`Rate`] is `per_sec` tokens refilled continuously up to
//! a `burst`; a request costs tokens and is refused, with how long to wait,
//! when the bucket lacks them.
//!
//! # Bounded memory
//!
//! A [`Limiter`] tracks at most `max_keys` keys. When full, it first forgets
//! every key whose bucket has refilled (it carries no information: a fresh
//! bucket is full too); if every tracked key is still being limited, a new
//! key is refused for a second rather than let a flood of distinct keys
//! (spoofed addresses, made-up accounts) grow the table without bound.
//!
//! # Invariants
//!
//! * Over any window of `t` seconds a key is granted at most
//!   `burst + per_sec * t` tokens.
//! * A refusal takes no tokens, and its `retry_after` is the time until the
//!   bucket holds the cost (at least 1 ms, at most the time to refill
//!   `burst`); a cost above `burst` can never pass and gets the full refill
//!   time.
//! * A `per_sec` of 0 disables the limit: every request passes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A refill rate and a burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second; 0 disables the limit.
    pub per_sec: f64,
    /// Most tokens a bucket holds (what a quiet key may spend at once).
    pub burst: f64,
}

impl Rate {
    /// `per_sec` tokens a second with a burst of `burst`.
    pub fn new(per_sec: f64, burst: f64) -> Rate {
        Rate { per_sec, burst: burst.max(1.0) }
    }

    /// No limit.
    pub const UNLIMITED: Rate = Rate { per_sec: 0.0, burst: 0.0 };

    fn is_unlimited(&self) -> bool {
        self.per_sec <= 0.0
    }

    /// Time to refill `tokens`.
    fn time_for(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64((tokens / self.per_sec).min(3600.0)).max(Duration::from_millis(1))
    }
}

/// A request refused by a [`Limiter`]: retry after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// How long until the request would pass.
    pub retry_after: Duration,
}

impl Limited {
    /// `retry_after` in whole milliseconds (at least 1), for the wire.
    pub fn retry_after_ms(&self) -> u32 {
        u32::try_from(self.retry_after.as_millis()).unwrap_or(u32::MAX).max(1)
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by `K`, at most `max_keys` of them.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter granting `rate` to each key, tracking at most `max_keys`.
    pub fn new(rate: Rate, max_keys: usize) -> Limiter<K> {
        Limiter { rate, max_keys: max_keys.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// The rate of every key.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `cost` tokens from `key`'s bucket now, or says how long to wait.
    pub fn check(&self, key: &K, cost: f64) -> Result<(), Limited> {
        self.check_at(key, cost, Instant::now())
    }

    /// [`Limiter::check`] at a given time (for tests and simulations).
    pub fn check_at(&self, key: &K, cost: f64, now: Instant) -> Result<(), Limited> {
        let rate = self.rate;
        if rate.is_unlimited() {
            return Ok(());
        }
        if cost > rate.burst {
            return Err(Limited { retry_after: rate.time_for(rate.burst) });
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            buckets.retain(|_, b| refill(rate, *b, now) < rate.burst);
            if buckets.len() >= self.max_keys {
                return Err(Limited { retry_after: Duration::from_secs(1) });
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: rate.burst, at: now });
        let tokens = refill(rate, *bucket, now);
        if tokens < cost {
            *bucket = Bucket { tokens, at: now };
            return Err(Limited { retry_after: rate.time_for(cost - tokens) });
        }
        *bucket = Bucket { tokens: tokens - cost, at: now };
        Ok(())
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The tokens in `b` at `now`.
fn refill(rate: Rate, b: Bucket, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate.per_sec).min(rate.burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let l = Limiter::new(Rate::new(10.0, 5.0), 100);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check_at(&1, 1.0, t0).is_ok());
        }
        let refused = l.check_at(&1, 1.0, t0).unwrap_err();
        assert!(refused.retry_after >= 99 * MS && refused.retry_after <= 101 * MS, "{refused:?}");
        assert!(l.check_at(&2, 1.0, t0).is_ok(), "other keys are not affected");
        assert!(l.check_at(&1, 1.0, t0 + 100 * MS).is_ok(), "one token back after 100 ms");
        assert!(l.check_at(&1, 1.0, t0 + 100 * MS).is_err());
    }

    #[test]
    fn grants_stay_within_burst_plus_rate() {
        let l = Limiter::new(Rate::new(100.0, 20.0), 10);
        let t0 = Instant::now();
        let mut granted = 0;
        for i in 0..10_000u32 {
            if l.check_at(&"k", 1.0, t0 + i * Duration::from_micros(100)).is_ok() {
                granted += 1;
            }
        }
        // One second: at most 20 + 100.
        assert!((115..=120).contains(&granted), "{granted}");
    }

    #[test]
    fn oversized_costs_never_pass_and_refusals_take_nothing() {
        let l = Limiter::new(Rate::new(1000.0, 1000.0), 10);
        let t0 = Instant::now();
        assert_eq!(l.check_at(&1, 1001.0, t0).unwrap_err().retry_after, Duration::from_secs(1));
        assert!(l.check_at(&1, 1000.0, t0).is_ok(), "the refusal took no tokens");
        assert!(l.check_at(&1, 500.0, t0 + 400 * MS).is_err());
        assert!(l.check_at(&1, 400.0, t0 + 400 * MS).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_idle_keys_are_forgotten() {
        let l = Limiter::new(Rate::new(1.0, 1.0), 3);
        let t0 = Instant::now();
        for k in 0..3 {
            assert!(l.check_at(&k, 1.0, t0).is_ok());
        }
        let full = l.check_at(&3, 1.0, t0).unwrap_err();
        assert_eq!(full.retry_after, Duration::from_secs(1), "a full table refuses new keys");
        assert_eq!(l.tracked(), 3);
        // Two seconds later every bucket refilled: the table makes room.
        assert!(l.check_at(&3, 1.0, t0 + 2000 * MS).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = Limiter::new(Rate::UNLIMITED, 1);
        for k in 0..100 {
            assert!(l.check(&k, 1e9).is_ok());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn retry_after_ms_is_at_least_one() {
        assert_eq!(Limited { retry_after: Duration::from_micros(10) }.retry_after_ms(), 1);
        assert_eq!(Limited { retry_after: Duration::from_millis(250) }.retry_after_ms(), 250);
    }
}
