//! Waiting in tests: one lock that runs heavy tests one at a time, and
//! loops that poll a condition under a deadline.
//!
//! A test never sleeps a fixed time to "let the cluster settle": it waits
//! for the condition it needs ([`wait_for`], [`eventually`]) or repeats a
//! call until it is served ([`retry`]), and fails with the name of what did
//! not happen once the deadline passed. Deadlines are generous (tens of
//! seconds): they bound a broken test, not a slow machine.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::grpc::code;

/// How long the cluster helpers wait for a condition by default (a leader,
/// a delivery, a node to catch up) on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// How often [`wait_for`] polls its (cheap, synchronous) probe.
const SYNC_POLL: Duration = Duration::from_millis(20);
/// How often [`eventually`] polls its (async, usually remote) probe, and how
/// long [`retry`] waits between attempts.
const ASYNC_POLL: Duration = Duration::from_millis(100);

/// The lock of heavy tests: a test that starts a cluster (or node
/// processes) holds it for its whole run, so tests of one test binary run
/// one at a time (the test machines have 2 cores).
///
/// ```ignore
/// let _g = serial().await;
/// ```
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Polls the synchronous probe `f` until it returns `Some`, and returns
/// that value.
///
/// # Panics
///
/// After `timeout`, naming `what`.
pub async fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(SYNC_POLL).await;
    }
}

/// Polls the async probe `f` until it returns `Some`, and returns that
/// value.
///
/// # Panics
///
/// After `timeout`, naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(ASYNC_POLL).await;
    }
}

/// Runs the call `f` until it succeeds and returns its value. A failure
/// whose `rim-code` is retryable (`ErrorCode::is_retryable`: no leader yet,
/// unavailable, a timeout, ...) is retried until `timeout`.
///
/// # Panics
///
/// On a failure that is not retryable (at once: a retry must not hide a
/// wrong answer), or when `timeout` passed, naming `what`.
pub async fn retry<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(code(&e).is_retryable(), "{what}: non-retryable error {:?}: {e:?}", code(&e));
                assert!(Instant::now() < deadline, "{what}: still failing after {timeout:?}: {e:?}");
                tokio::time::sleep(ASYNC_POLL).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_for_returns_the_first_value() {
        let mut n = 0;
        let v = wait_for(Duration::from_secs(5), "n reaches 3", || {
            n += 1;
            (n >= 3).then_some(n)
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "never: not within")]
    async fn wait_for_names_what_did_not_happen() {
        wait_for(Duration::from_millis(50), "never", || None::<()>).await;
    }

    #[tokio::test]
    async fn eventually_polls_an_async_probe() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "n reaches 2", || {
            n += 1;
            let now = n;
            async move { (now >= 2).then_some(now) }
        })
        .await;
        assert_eq!(v, 2);
    }

    #[tokio::test]
    async fn retry_retries_retryable_codes() {
        let mut n = 0;
        let v = retry(Duration::from_secs(5), "flaky", || {
            n += 1;
            let now = n;
            async move { if now < 3 { Err(tonic::Status::unavailable("no leader yet")) } else { Ok(now) } }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "wrong: non-retryable error")]
    async fn retry_fails_at_once_on_other_codes() {
        retry(Duration::from_secs(60), "wrong", || async {
            Err::<(), _>(tonic::Status::invalid_argument("bad request"))
        })
        .await;
    }
}
