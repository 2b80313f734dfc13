//! gim's way of plugging an app's users in: the app implements
//! `business.UserIntService.Auth(user_id, device_id, token)` (gRPC), and a
//! node with `[auth_callback]` asks it whether a token it cannot verify
//! itself is the app's valid token of that user and device.
//!
//! A sign-in whose token is neither a rim token nor an app-signed JWT (when
//! `[jwt]` is on) goes to the callback; what the node then does with the
//! app's ids (its own user and device, created on first sight) is
//! `service/identity.rs`'s business, exactly as for a JWT whose `sub` is the
//! app's user id in decimal and whose device claim is the app's device id.
//!
//! # Invariants
//!
//! * **Fail closed.** Only an OK answer within `timeout_ms` signs in. An
//!   answer of any error status is `ERROR_UNAUTHENTICATED`; no answer (the
//!   app unreachable, `Unavailable`, the deadline passed) is
//!   `ERROR_UNAVAILABLE` (retryable: the app may be back soon). Neither
//!   ever falls back to letting the sign-in through.
//! * **Bounded.** At most `max_in_flight` calls are outstanding; a sign-in
//!   beyond that is refused `ERROR_BUSY` with a retry hint, without a call.
//!   Tokens over [`MAX_TOKEN_BYTES`] are refused without a call.
//! * **Positive cache.** An OK is remembered for `cache_secs` under (user,
//!   device, SHA-256 of the token), so a reconnect storm within that window
//!   calls the app once per device; refusals are never cached. The cache
//!   holds at most `cache_entries` entries (when full, expired entries are
//!   dropped, and if none had expired, all are). Tokens are never stored,
//!   logged or compared other than through their hash.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_proto::ErrorCode;
use rim_proto::gim_business::AuthRequest;
use rim_proto::gim_business::user_int_service_client::UserIntServiceClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// Longest token sent to the app, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4 << 10;
/// How long a sign-in refused for `max_in_flight` is told to wait.
const BUSY_RETRY_MS: u32 = 200;

/// The app's `UserIntService.Auth` (`[auth_callback]` in a node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthCallbackConfig {
    /// The app's gRPC endpoint, `http://host:port` or `https://host:port`
    /// (empty: no callback).
    pub url: String,
    /// A PEM file of the CA to trust for an `https` URL (required for one).
    pub ca: Option<PathBuf>,
    /// How long one call may take, in ms.
    pub timeout_ms: u64,
    /// How long an OK is remembered, in seconds (0: never).
    pub cache_secs: u64,
    /// Most remembered OKs.
    pub cache_entries: usize,
    /// Most calls outstanding at once.
    pub max_in_flight: usize,
}

impl Default for AuthCallbackConfig {
    fn default() -> Self {
        AuthCallbackConfig {
            url: String::new(),
            ca: None,
            timeout_ms: 1_000,
            cache_secs: 30,
            cache_entries: 100_000,
            max_in_flight: 256,
        }
    }
}

type CacheKey = (u64, u64, [u8; 32]);

/// A client of the app's `UserIntService.Auth`.
pub struct AuthCallback {
    client: UserIntServiceClient<Channel>,
    timeout: Duration,
    ttl: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<CacheKey, Instant>>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for AuthCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCallback").field("timeout", &self.timeout).finish()
    }
}

/// Whether `token` is a rim token (those never go to the app).
pub fn is_rim_token(token: &str) -> bool {
    token.strip_prefix(rim_cluster::TOKEN_FORMAT).is_some_and(|rest| rest.starts_with('.'))
}

impl AuthCallback {
    /// Checks `config` (the URL, the CA file) without connecting.
    pub fn check_config(config: &AuthCallbackConfig) -> Result<()> {
        Self::endpoint(config).map(drop)
    }

    fn endpoint(config: &AuthCallbackConfig) -> Result<Option<Endpoint>> {
        if config.url.is_empty() {
            return Ok(None);
        }
        let bad = |why: String| Error::Config(format!("auth_callback: {why}"));
        if config.timeout_ms == 0 || config.max_in_flight == 0 {
            return Err(bad("timeout_ms and max_in_flight must be > 0".into()));
        }
        let uri: http::Uri = config.url.parse().map_err(|e| bad(format!("url {:?}: {e}", config.url)))?;
        let host = uri.host().ok_or_else(|| bad("url needs a host".into()))?.to_string();
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut endpoint = Endpoint::from(uri.clone()).connect_timeout(timeout).timeout(timeout);
        match (uri.scheme_str(), &config.ca) {
            (Some("http"), None) => {}
            (Some("https"), Some(ca)) => {
                let pem = std::fs::read(ca).map_err(|e| bad(format!("ca {}: {e}", ca.display())))?;
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(host.trim_matches(['[', ']']));
                endpoint = endpoint.tls_config(tls).map_err(|e| bad(format!("tls: {e}")))?;
            }
            (Some("https"), None) => return Err(bad("an https url needs `ca` (a PEM file)".into())),
            (Some("http"), Some(_)) => return Err(bad("`ca` is for an https url".into())),
            _ => return Err(bad(format!("url {:?} must be http:// or https://", config.url))),
        }
        Ok(Some(endpoint))
    }

    /// The callback of `config`; `None` if it has no URL. Connects lazily
    /// (so a node starts while the app is down); call inside a runtime.
    pub fn from_config(config: &AuthCallbackConfig) -> Result<Option<AuthCallback>> {
        let Some(endpoint) = Self::endpoint(config)? else { return Ok(None) };
        Ok(Some(AuthCallback {
            client: UserIntServiceClient::new(endpoint.connect_lazy()),
            timeout: Duration::from_millis(config.timeout_ms),
            ttl: Duration::from_secs(config.cache_secs),
            max_entries: config.cache_entries,
            cache: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
        }))
    }

    /// Whether the app says `token` is its valid token of its user `user`
    /// on its device `device` (see the module docs for the refusals).
    pub async fn check(&self, user: u64, device: u64, token: &str) -> Result<()> {
        if user == 0 || device == 0 {
            return Err(Error::rejected(
                ErrorCode::ErrorInvalidId,
                "a sign-in checked by the app's callback needs the app's user_id and device_id",
            ));
        }
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Error::rejected(
                ErrorCode::ErrorUnauthenticated,
                format!("token refused: empty or over {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let key = (user, device, Sha256::digest(token.as_bytes()).into());
        if self.cached(&key) {
            metrics::counter!("rim_auth_callback_total", "result" => "cached").increment(1);
            return Ok(());
        }
        let Ok(_permit) = self.slots.clone().try_acquire_owned() else {
            metrics::counter!("rim_auth_callback_total", "result" => "busy").increment(1);
            return Err(Error::Overloaded {
                code: ErrorCode::ErrorBusy,
                message: "too many sign-ins waiting for the app's auth callback".into(),
                retry_after_ms: BUSY_RETRY_MS,
            });
        };
        let mut req =
            tonic::Request::new(AuthRequest { user_id: user, device_id: device, token: token.into() });
        req.set_timeout(self.timeout);
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(self.timeout, client.auth(req)).await;
        match answer {
            Ok(Ok(_)) => {
                metrics::counter!("rim_auth_callback_total", "result" => "ok").increment(1);
                self.remember(key);
                Ok(())
            }
            Ok(Err(status)) if !unanswered(status.code()) => {
                metrics::counter!("rim_auth_callback_total", "result" => "refused").increment(1);
                Err(Error::rejected(ErrorCode::ErrorUnauthenticated, "token refused by the app"))
            }
            Ok(Err(status)) => {
                metrics::counter!("rim_auth_callback_total", "result" => "unavailable").increment(1);
                tracing::warn!(code = ?status.code(), error = %status.message(), "auth callback failed");
                Err(Error::Unavailable("the app's auth callback did not answer; sign-in refused".into()))
            }
            Err(_) => {
                metrics::counter!("rim_auth_callback_total", "result" => "timeout").increment(1);
                tracing::warn!(timeout = ?self.timeout, "auth callback timed out");
                Err(Error::Unavailable("the app's auth callback timed out; sign-in refused".into()))
            }
        }
    }

    fn cached(&self, key: &CacheKey) -> bool {
        let mut cache = self.cache.lock().expect("auth cache lock");
        match cache.get(key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: CacheKey) {
        if self.ttl.is_zero() || self.max_entries == 0 {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().expect("auth cache lock");
        if cache.len() >= self.max_entries {
            cache.retain(|_, until| *until > now);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        cache.insert(key, now + self.ttl);
    }
}

/// Whether a status means the app did not answer (rather than said no).
fn unanswered(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(code, C::Unavailable | C::DeadlineExceeded | C::Cancelled | C::ResourceExhausted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rim_tokens_are_told_apart() {
        assert!(is_rim_token("v1.1.2.3.4.abc"));
        assert!(!is_rim_token("v1"));
        assert!(!is_rim_token("v1x.1"));
        assert!(!is_rim_token("a-gim-token"));
        assert!(!is_rim_token(""));
    }

    #[test]
    fn configurations_are_checked_at_start() {
        let with = |url: &str, ca: Option<&str>| AuthCallbackConfig {
            url: url.into(),
            ca: ca.map(PathBuf::from),
            ..AuthCallbackConfig::default()
        };
        assert!(AuthCallback::check_config(&AuthCallbackConfig::default()).is_ok());
        assert!(AuthCallback::check_config(&with("http://127.0.0.1:8000", None)).is_ok());
        for (url, ca) in [
            ("https://app.example:8000", None),
            ("http://app.example:8000", Some("/nonexistent/ca.pem")),
            ("https://app.example:8000", Some("/nonexistent/ca.pem")),
            ("ftp://app.example", None),
            ("not a url", None),
        ] {
            assert!(AuthCallback::check_config(&with(url, ca)).is_err(), "{url} {ca:?}");
        }
        let zero = AuthCallbackConfig { timeout_ms: 0, ..with("http://127.0.0.1:1", None) };
        assert!(AuthCallback::check_config(&zero).is_err());
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_forgets() {
        let config = AuthCallbackConfig { cache_entries: 3, ..AuthCallbackConfig::default() };
        let cb =
            AuthCallback::from_config(&AuthCallbackConfig { url: "http://127.0.0.1:1".into(), ..config })
                .unwrap()
                .unwrap();
        let key = |i: u64| (i, i, [0u8; 32]);
        for i in 0..3 {
            cb.remember(key(i));
        }
        assert!((0..3).all(|i| cb.cached(&key(i))));
        // Full of live entries: the next one starts a fresh cache.
        cb.remember(key(3));
        assert!(cb.cached(&key(3)) && !cb.cached(&key(0)));
        assert!(cb.cache.lock().unwrap().len() <= 3);
    }
}
