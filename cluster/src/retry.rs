//! The one retry policy for following a group's leader.
//!
//! A node forwarding a write, a read barrier, a forwarded read or an
//! online push, and a gateway calling a node, all do the same thing: try
//! the node believed to lead the group, follow a `NotLeader` hint at once,
//! and otherwise wait a little longer before each new round, never past the
//! request's deadline. [`Backoff`] is that wait; [`retryable`] says which
//! outcomes are worth another round.
//!
//! Invariants: a wait never exceeds [`Backoff::MAX`] nor the time left
//! before the deadline, and grows geometrically from [`Backoff::MIN`].

use std::time::{Duration, Instant};

use rim_proto::ErrorCode;

/// Exponential backoff between rounds of attempts, bounded by a deadline.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    deadline: Instant,
}

impl Backoff {
    /// The first wait.
    pub const MIN: Duration = Duration::from_millis(20);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_millis(300);

    /// A backoff for a request that must be done by `deadline`.
    pub fn until(deadline: Instant) -> Backoff {
        Backoff { next: Backoff::MIN, deadline }
    }

    /// A backoff for a request that has `budget` from now.
    pub fn within(budget: Duration) -> Backoff {
        Backoff::until(Instant::now() + budget)
    }

    /// Time left before the deadline (zero once it passed).
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline passed.
    pub fn expired(&self) -> bool {
        self.left().is_zero()
    }

    /// The next wait (capped by the time left), and grows the one after.
    pub fn step(&mut self) -> Duration {
        let wait = self.next.min(self.left());
        self.next = (self.next * 2).min(Backoff::MAX);
        wait
    }

    /// Sleeps for the next wait; `false` if the deadline has passed.
    pub async fn wait(&mut self) -> bool {
        let wait = self.step();
        if wait.is_zero() {
            return false;
        }
        tokio::time::sleep(wait).await;
        !self.expired()
    }
}

/// Whether an outcome with this code is worth retrying elsewhere or later:
/// the group had no (reachable) leader, or this node was not it. A timeout
/// is not here: its outcome is unknown, and only the caller (with its
/// idempotency key) may decide to repeat it.
pub fn retryable(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::ErrorNotLeader | ErrorCode::ErrorUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap() {
        let mut b = Backoff::within(Duration::from_secs(60));
        let waits: Vec<Duration> = (0..6).map(|_| b.step()).collect();
        assert_eq!(waits[0], Backoff::MIN);
        assert_eq!(waits[1], Backoff::MIN * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), Backoff::MAX);
    }

    #[test]
    fn waits_never_pass_the_deadline() {
        let mut b = Backoff::within(Duration::from_millis(30));
        for _ in 0..10 {
            let left = b.left();
            let wait = b.step();
            assert!(wait <= left, "{wait:?} > {left:?}");
        }
        let mut gone = Backoff::until(Instant::now());
        assert_eq!(gone.step(), Duration::ZERO);
        assert!(gone.expired());
    }

    #[tokio::test]
    async fn wait_reports_the_deadline() {
        let mut gone = Backoff::until(Instant::now());
        assert!(!gone.wait().await, "no wait past the deadline");
        let mut b = Backoff::within(Duration::from_secs(60));
        assert!(b.wait().await, "time is left after the first wait");
    }

    #[test]
    fn only_leadership_outcomes_are_retryable() {
        assert!(retryable(ErrorCode::ErrorNotLeader));
        assert!(retryable(ErrorCode::ErrorUnavailable));
        assert!(!retryable(ErrorCode::ErrorTimeout));
        assert!(!retryable(ErrorCode::ErrorBadRequest));
    }
}
