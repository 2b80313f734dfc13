//! Rate limits and load shedding of client requests (docs/security.md).
//!
//! One [`Throttle`] per node, built from [`RateLimits`], answers three
//! questions before any work is done:
//!
//! * **May this user send?** Messages and content bytes per second per user,
//!   checked where every send starts ([`crate::service::ops::send`]), so the
//!   client API, gateway sends and batched sends share one budget per node.
//!   A refusal is `ERROR_RATE_LIMITED` with `retry_after_ms`; nothing is
//!   proposed, so retrying with the same `client_msg_id` is safe.
//! * **May this address or account try to sign in or register?** Per client
//!   address (all three account calls together) and per account name
//!   (password or code guesses), before the password is hashed.
//! * **Is there room to hash a password?** Argon2 costs tens of
//!   milliseconds and ~19 MiB per hash; at most `password_hashing` run at
//!   once, and a caller that cannot get a slot within [`HASH_WAIT`] gets
//!   `ERROR_BUSY` instead of a blocking thread.
//!
//! The limits are per node: a user whose sends reach two nodes gets up to
//! twice the budget (gateways send a user's messages to its shard leader,
//! so in practice one node counts them). Limits are not replicated state:
//! they decide whether to try, never what a committed entry means.
//!
//! Invariant: a refused request changed nothing (it took no tokens from the
//! other limits checked after it, and nothing reached the log).

use std::net::IpAddr;
use std::time::Duration;

use rim_cluster::{Limiter, Rate};
use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

/// How long a sign-in or registration waits for a password-hashing slot.
pub const HASH_WAIT: Duration = Duration::from_secs(2);

/// Client rate limits (`[limits]` in the node's TOML). A rate of 0 turns
/// that limit off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Messages one user may send per second, sustained.
    pub sends_per_sec: f64,
    /// Messages one user may send at once after a quiet spell.
    pub send_burst: f64,
    /// Content bytes one user may send per second, sustained.
    pub send_bytes_per_sec: f64,
    /// Content bytes one user may send at once after a quiet spell.
    pub send_bytes_burst: f64,
    /// `Register`, `SignIn` and `SignInByPhone` calls per second from one
    /// client address.
    pub auth_per_ip_per_sec: f64,
    /// Such calls from one address at once.
    pub auth_ip_burst: f64,
    /// Apply the per-address limit to loopback clients too. Off by
    /// default: a local client is the operator's own process (a proxy in
    /// front of the node, which limits its own clients, or a tool), and
    /// every local test client shares one address.
    pub auth_limit_loopback: bool,
    /// Sign-in attempts per minute for one account (username or phone).
    pub sign_ins_per_account_per_min: f64,
    /// Such attempts at once.
    pub sign_in_account_burst: f64,
    /// Password hashes computed at once (0: one per CPU).
    pub password_hashing: usize,
    /// Keys (users, addresses, accounts) each limiter tracks at most.
    pub max_tracked: usize,
    /// Calls one client connection may have in flight on the client
    /// listener (more wait, and HTTP/2 tells the client not to open them).
    pub grpc_calls_per_connection: usize,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            sends_per_sec: 100.0,
            send_burst: 200.0,
            send_bytes_per_sec: f64::from(2 << 20),
            send_bytes_burst: f64::from(8 << 20),
            auth_per_ip_per_sec: 20.0,
            auth_ip_burst: 200.0,
            auth_limit_loopback: false,
            sign_ins_per_account_per_min: 20.0,
            sign_in_account_burst: 10.0,
            password_hashing: 0,
            max_tracked: 100_000,
            grpc_calls_per_connection: 256,
        }
    }
}

impl RateLimits {
    /// No rate limit at all (benchmarks that measure raw capacity).
    pub fn unlimited() -> RateLimits {
        RateLimits {
            sends_per_sec: 0.0,
            send_bytes_per_sec: 0.0,
            auth_per_ip_per_sec: 0.0,
            sign_ins_per_account_per_min: 0.0,
            ..RateLimits::default()
        }
    }
}

/// The node's limiters.
#[derive(Debug)]
pub struct Throttle {
    sends: Limiter<UserId>,
    send_bytes: Limiter<UserId>,
    auth_ip: Limiter<IpAddr>,
    auth_account: Limiter<String>,
    auth_limit_loopback: bool,
    hashing: Semaphore,
}

impl Throttle {
    /// Limiters for `limits`.
    pub fn new(limits: &RateLimits) -> Throttle {
        let keys = limits.max_tracked;
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let hashing = if limits.password_hashing == 0 { cpus } else { limits.password_hashing };
        Throttle {
            sends: Limiter::new(Rate::new(limits.sends_per_sec, limits.send_burst), keys),
            send_bytes: Limiter::new(Rate::new(limits.send_bytes_per_sec, limits.send_bytes_burst), keys),
            auth_ip: Limiter::new(Rate::new(limits.auth_per_ip_per_sec, limits.auth_ip_burst), keys),
            auth_account: Limiter::new(
                Rate::new(limits.sign_ins_per_account_per_min / 60.0, limits.sign_in_account_burst),
                keys,
            ),
            auth_limit_loopback: limits.auth_limit_loopback,
            hashing: Semaphore::new(hashing.max(1)),
        }
    }

    /// Whether `user` may send a message of `bytes` content bytes now.
    pub fn send(&self, user: UserId, bytes: usize) -> Result<()> {
        // Bytes first: a message too big for the byte budget must not use
        // up a message token it never gets to spend.
        self.send_bytes
            .check(&user, bytes as f64)
            .map_err(|l| Error::rate_limited("content bytes per user", l))?;
        self.sends.check(&user, 1.0).map_err(|l| Error::rate_limited("messages per user", l))
    }

    /// Whether a client at `ip` (unknown: not limited by address) may call
    /// an account method, for `account` (a login name or phone) if given.
    pub fn auth(&self, ip: Option<IpAddr>, account: Option<&str>) -> Result<()> {
        if let Some(ip) = ip.filter(|ip| self.auth_limit_loopback || !ip.is_loopback()) {
            self.auth_ip.check(&ip, 1.0).map_err(|l| Error::rate_limited("account calls per address", l))?;
        }
        if let Some(account) = account {
            self.auth_account
                .check(&account.to_string(), 1.0)
                .map_err(|l| Error::rate_limited("sign-ins per account", l))?;
        }
        Ok(())
    }

    /// A slot for one password hash, waiting at most [`HASH_WAIT`].
    pub async fn hashing(&self) -> Result<SemaphorePermit<'_>> {
        match tokio::time::timeout(HASH_WAIT, self.hashing.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Unavailable("shutting down".into())),
            Err(_) => Err(Error::Overloaded {
                code: ErrorCode::ErrorBusy,
                message: "too many sign-ins at once".into(),
                retry_after_ms: 500,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<()>) -> ErrorCode {
        r.map_or_else(|e| e.code(), |()| ErrorCode::Ok)
    }

    #[test]
    fn sends_are_limited_per_user_by_count_and_bytes() {
        let t = Throttle::new(&RateLimits {
            sends_per_sec: 0.01,
            send_burst: 3.0,
            send_bytes_per_sec: 0.01,
            send_bytes_burst: 1000.0,
            ..RateLimits::default()
        });
        let (a, b) = (UserId(1), UserId(2));
        for _ in 0..3 {
            assert_eq!(code(t.send(a, 10)), ErrorCode::Ok);
        }
        let e = t.send(a, 10).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ErrorRateLimited);
        assert!(e.to_status().metadata().get(rim_proto::error::RETRY_AFTER_METADATA_KEY).is_some());
        assert_eq!(code(t.send(b, 900)), ErrorCode::Ok, "another user has their own budget");
        assert_eq!(code(t.send(b, 200)), ErrorCode::ErrorRateLimited, "bytes: 900 + 200 > 1000");
        assert_eq!(code(t.send(b, 50)), ErrorCode::Ok, "the refusal spent no message token");
    }

    #[test]
    fn account_calls_are_limited_per_address_and_per_account() {
        let t = Throttle::new(&RateLimits {
            auth_per_ip_per_sec: 0.01,
            auth_ip_burst: 2.0,
            sign_ins_per_account_per_min: 0.01,
            sign_in_account_burst: 1.0,
            ..RateLimits::default()
        });
        let (ip1, ip2): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(code(t.auth(Some(local), None)), ErrorCode::Ok, "loopback is exempt by default");
        }
        assert_eq!(code(t.auth(Some(ip1), Some("u:alice"))), ErrorCode::Ok);
        assert_eq!(code(t.auth(Some(ip2), Some("u:alice"))), ErrorCode::ErrorRateLimited, "per account");
        assert_eq!(code(t.auth(Some(ip1), None)), ErrorCode::Ok);
        assert_eq!(code(t.auth(Some(ip1), None)), ErrorCode::ErrorRateLimited, "per address");
        assert_eq!(code(t.auth(None, Some("u:bob"))), ErrorCode::Ok, "no address: only the account");
    }

    #[test]
    fn zero_turns_limits_off() {
        let t = Throttle::new(&RateLimits::unlimited());
        for _ in 0..10_000 {
            assert_eq!(code(t.send(UserId(1), 1 << 20)), ErrorCode::Ok);
            assert_eq!(code(t.auth(Some("10.0.0.1".parse().unwrap()), Some("u:a"))), ErrorCode::Ok);
        }
    }

    #[tokio::test]
    async fn hashing_slots_are_bounded_and_refusals_are_busy() {
        let t = Throttle::new(&RateLimits { password_hashing: 1, ..RateLimits::default() });
        let held = t.hashing().await.unwrap();
        // Waits HASH_WAIT for the one slot, then gives up.
        let e = t.hashing().await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ErrorBusy);
        drop(held);
        assert!(t.hashing().await.is_ok());
    }
}
