//! Verification keys fetched from the app's JWKS URL (`[jwt] jwks_url`),
//! cached, refreshed in the background, looked up by `kid`.
//!
//! An app that rotates its signing keys publishes them as a JSON Web Key
//! Set; a node fetches the set at start and every `jwks_refresh_secs`, and
//! verifies tokens against the keys of the last good fetch. Rotation needs
//! no node restart: the app publishes the new key next to the old one,
//! signs with the new one, and drops the old one later.
//!
//! # Invariants
//!
//! * **Off the hot path.** A token naming a known `kid` is verified against
//!   the cached set, with no request to the app: a reconnect storm of
//!   app-signed tokens makes zero calls to it.
//! * **Unknown kids are rate-limited.** A token naming a `kid` the set does
//!   not have (a freshly rotated key, or a forgery) triggers at most one
//!   refetch per `jwks_unknown_kid_secs`; every sign-in arriving while that
//!   fetch runs waits for it (at most the fetch timeout), the ones after it
//!   are refused at once. A flood of forged kids costs the app one request
//!   per interval.
//! * **Last good set wins.** A failed fetch (unreachable, timeout, not 2xx,
//!   over `jwks_max_bytes` or `jwks_max_keys`, not JSON, or no usable key)
//!   changes nothing: the keys of the last good fetch stay valid. A good
//!   fetch replaces the whole set, so a key the app removed stops verifying
//!   after the next good fetch.
//! * **The key decides the algorithm.** A JWK's algorithm comes from its
//!   type and curve (`RSA` → RS256, `EC` P-256 → ES256, `OKP` Ed25519 →
//!   EdDSA); a JWK whose `alg` says otherwise, whose algorithm is not in
//!   `jwks_algs`, that is not a signing key (`use`/`key_ops`), or that has no
//!   `kid` is skipped. Symmetric (`oct`) keys are never taken from a URL, so
//!   an HS256 token can never be checked against a published key.
//! * **Bounded.** One fetch at a time; each bounded by `jwks_timeout_ms`
//!   (connect, headers and body together), `jwks_max_bytes` and
//!   `jwks_max_keys`; no redirects. The URL is `https` (or `http` to a
//!   loopback address, for tests and sidecars); `jwks_ca` replaces the
//!   system roots with the given CA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::jwt::{JwtConfig, Key};

/// Longest `kid` taken from a set, in bytes.
pub const MAX_KID_BYTES: usize = 256;

/// The JWKS of one URL: the cached keys and the fetcher.
pub struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    algs: Vec<Algorithm>,
    refresh: Duration,
    timeout: Duration,
    max_bytes: usize,
    max_keys: usize,
    unknown_kid_every: Duration,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Counts finished fetches (good or not): waiters watch it.
    fetched: watch::Sender<u64>,
    in_flight: AtomicBool,
    last_good: AtomicBool,
    /// When an unknown kid last started a fetch.
    last_unknown_kid: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.url.as_str()).field("keys", &self.keys().len()).finish()
    }
}

fn algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

impl Jwks {
    /// The JWKS of `config.jwks_url`; `None` if none is set. Nothing is
    /// fetched yet (see [`Jwks::run`]).
    pub fn from_config(config: &JwtConfig) -> Result<Option<Arc<Jwks>>> {
        if config.jwks_url.is_empty() {
            return Ok(None);
        }
        let bad = |why: String| Error::Config(format!("jwt.jwks_url: {why}"));
        let url = reqwest::Url::parse(&config.jwks_url).map_err(|e| bad(e.to_string()))?;
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            other => {
                return Err(bad(format!("must be https (http only to a loopback address), not {other}")));
            }
        }
        let mut algs = Vec::new();
        for a in &config.jwks_algs {
            algs.push(algorithm(a).ok_or_else(|| {
                Error::Config(format!("jwt.jwks_algs: {a:?} is not RS256, ES256 or EdDSA"))
            })?);
        }
        if algs.is_empty() {
            return Err(Error::Config("jwt.jwks_algs must allow at least one algorithm".into()));
        }
        if config.jwks_refresh_secs == 0 || config.jwks_timeout_ms == 0 || config.jwks_unknown_kid_secs == 0 {
            return Err(Error::Config(
                "jwt.jwks_refresh_secs, jwks_timeout_ms and jwks_unknown_kid_secs must be > 0".into(),
            ));
        }
        if config.jwks_max_bytes == 0 || config.jwks_max_keys == 0 {
            return Err(Error::Config("jwt.jwks_max_bytes and jwks_max_keys must be > 0".into()));
        }
        let timeout = Duration::from_millis(config.jwks_timeout_ms);
        let client = crate::http_client::client("jwt.jwks_url", timeout, config.jwks_ca.as_deref())?;
        Ok(Some(Arc::new(Jwks {
            url,
            client,
            algs,
            refresh: Duration::from_secs(config.jwks_refresh_secs),
            timeout,
            max_bytes: config.jwks_max_bytes,
            max_keys: config.jwks_max_keys,
            unknown_kid_every: Duration::from_secs(config.jwks_unknown_kid_secs),
            keys: RwLock::new(Arc::new(Vec::new())),
            fetched: watch::Sender::new(0),
            in_flight: AtomicBool::new(false),
            last_good: AtomicBool::new(false),
            last_unknown_kid: Mutex::new(None),
        })))
    }

    /// The keys of the last good fetch (none before the first).
    pub(crate) fn keys(&self) -> Arc<Vec<Key>> {
        self.keys.read().expect("jwks lock").clone()
    }

    /// Refreshes the set every `jwks_refresh_secs` (after a failure: after
    /// 1, 2, 4, ... s, up to that interval), forever; the node aborts it at
    /// shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut after_failure = Duration::from_secs(1);
        loop {
            let mut done = self.fetched.subscribe();
            done.borrow_and_update();
            self.start_fetch();
            let _ = done.changed().await;
            let wait = if self.last_good.load(Ordering::SeqCst) {
                after_failure = Duration::from_secs(1);
                self.refresh
            } else {
                let w = after_failure;
                after_failure = (after_failure * 2).min(self.refresh);
                w.min(self.refresh)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// For a token naming a kid the set lacks: waits for the running fetch,
    /// or starts one if the last unknown-kid fetch is older than
    /// `jwks_unknown_kid_secs`; `false` (at once) if neither. Never waits
    /// longer than the fetch timeout. `true` means a fetch finished: look
    /// the kid up again.
    pub(crate) async fn refetch_for_unknown_kid(self: &Arc<Self>) -> bool {
        let mut done = self.fetched.subscribe();
        done.borrow_and_update();
        if !self.in_flight.load(Ordering::SeqCst) {
            {
                let mut last = self.last_unknown_kid.lock().expect("jwks lock");
                if last.is_some_and(|t| t.elapsed() < self.unknown_kid_every) {
                    metrics::counter!("rim_jwks_unknown_kid_refused_total").increment(1);
                    return false;
                }
                *last = Some(Instant::now());
            }
            self.start_fetch();
        }
        // The fetch itself gives up after `timeout`; a little margin for
        // the task to report.
        tokio::time::timeout(self.timeout + Duration::from_millis(100), done.changed()).await.is_ok()
    }

    /// Starts a fetch in its own task unless one runs.
    fn start_fetch(self: &Arc<Self>) {
        if self.in_flight.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.fetch().await;
            match result {
                Ok(keys) => {
                    tracing::debug!(url = %me.url, keys = keys.len(), "JWKS fetched");
                    metrics::counter!("rim_jwks_fetches_total", "result" => "ok").increment(1);
                    *me.keys.write().expect("jwks lock") = Arc::new(keys);
                    me.last_good.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!(url = %me.url, error = %e, "JWKS fetch failed; keeping the last good keys");
                    metrics::counter!("rim_jwks_fetches_total", "result" => "error").increment(1);
                    me.last_good.store(false, Ordering::SeqCst);
                }
            }
            me.in_flight.store(false, Ordering::SeqCst);
            me.fetched.send_modify(|n| *n += 1);
        });
    }

    async fn fetch(&self) -> std::result::Result<Vec<Key>, String> {
        let mut resp = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes as u64) {
            return Err(format!("over {} bytes", self.max_bytes));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("body: {e}"))? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(format!("over {} bytes", self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        parse_set(&body, &self.algs, self.max_keys)
    }
}

/// The usable keys of a JWKS document (see the module docs); an error if
/// it is not one, holds over `max_keys` keys, or none is usable.
pub(crate) fn parse_set(
    body: &[u8],
    algs: &[Algorithm],
    max_keys: usize,
) -> std::result::Result<Vec<Key>, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    if raw.keys.len() > max_keys {
        return Err(format!("{} keys, over the limit of {max_keys}", raw.keys.len()));
    }
    let mut keys = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let key = serde_json::from_value::<Jwk>(value)
            .map_err(|e| format!("not a JWK: {e}"))
            .and_then(|jwk| usable_key(&jwk, algs));
        match key {
            Ok(k) => keys.push(k),
            Err(why) => {
                tracing::debug!(index = i, why, "JWKS key skipped");
                metrics::counter!("rim_jwks_keys_skipped_total").increment(1);
            }
        }
    }
    if keys.is_empty() {
        return Err("no usable key".into());
    }
    Ok(keys)
}

fn usable_key(jwk: &Jwk, algs: &[Algorithm]) -> std::result::Result<Key, String> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty()).ok_or("no kid")?;
    if kid.len() > MAX_KID_BYTES {
        return Err(format!("kid over {MAX_KID_BYTES} bytes"));
    }
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return Err("not a signature key (use)".into());
    }
    if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return Err("not a verification key (key_ops)".into());
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never taken from a JWKS".into()),
        _ => return Err("unsupported key type or curve".into()),
    };
    if let Some(named) = jwk.common.key_algorithm
        && named.to_string() != format!("{alg:?}")
    {
        return Err(format!("alg {named} does not match the key type ({alg:?})"));
    }
    if !algs.contains(&alg) {
        return Err(format!("{alg:?} is not in jwks_algs"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key: {e}"))?;
    Ok(Key { kid: Some(kid), alg, key })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::EncodingKey;
    use jsonwebtoken::jwk::Jwk;
    use serde_json::json;

    use super::*;

    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt-rs256-test-private.pem");
    const ALL: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

    fn jwk(alg: Algorithm, kid: &str) -> serde_json::Value {
        let mut v = match alg {
            Algorithm::RS256 => {
                let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
                serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap()
            }
            Algorithm::ES256 => {
                let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let key = EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
                serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap()
            }
            _ => {
                use base64::Engine as _;
                let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
                let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.public_key_raw());
                json!({"kty": "OKP", "crv": "Ed25519", "x": x})
            }
        };
        v["kid"] = json!(kid);
        v
    }

    fn parse(keys: Vec<serde_json::Value>, algs: &[Algorithm]) -> std::result::Result<Vec<Key>, String> {
        parse_set(json!({ "keys": keys }).to_string().as_bytes(), algs, 8)
    }

    #[test]
    fn every_public_key_type_is_read_with_its_algorithm() {
        let keys = parse(
            vec![jwk(Algorithm::RS256, "r"), jwk(Algorithm::ES256, "e"), jwk(Algorithm::EdDSA, "d")],
            &ALL,
        )
        .unwrap();
        let got: Vec<_> = keys.iter().map(|k| (k.kid.clone().unwrap(), k.alg)).collect();
        assert_eq!(
            got,
            [("r".into(), Algorithm::RS256), ("e".into(), Algorithm::ES256), ("d".into(), Algorithm::EdDSA)]
        );
    }

    #[test]
    fn unusable_keys_are_skipped_and_bad_sets_refused() {
        let edited = |alg, kid: &str, field: &str, value: serde_json::Value| {
            let mut k = jwk(alg, kid);
            k[field] = value;
            k
        };
        let mut no_kid = jwk(Algorithm::ES256, "");
        no_kid.as_object_mut().unwrap().remove("kid");
        let unusable = [
            no_kid,
            // The classic confusion: an RSA key said to be an HMAC one.
            edited(Algorithm::RS256, "wrong-alg", "alg", json!("HS256")),
            edited(Algorithm::RS256, "enc", "use", json!("enc")),
            edited(Algorithm::RS256, "ops", "key_ops", json!(["encrypt"])),
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}),
            json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}),
            json!({"kty": 7, "kid": "junk"}),
            jwk(Algorithm::ES256, &"k".repeat(MAX_KID_BYTES + 1)),
        ];
        for bad in &unusable {
            assert_eq!(parse(vec![bad.clone()], &ALL).err().as_deref(), Some("no usable key"), "{bad}");
            // Next to a usable key, only the usable one is kept.
            let keys = parse(vec![bad.clone(), jwk(Algorithm::ES256, "good")], &ALL).unwrap();
            assert_eq!(keys.iter().map(|k| k.kid.as_deref()).collect::<Vec<_>>(), [Some("good")]);
        }
        // An algorithm left out of jwks_algs.
        assert!(parse(vec![jwk(Algorithm::RS256, "r")], &[Algorithm::ES256]).is_err());
        // Too many keys: the whole set is refused.
        let nine: Vec<_> = (0..9).map(|i| jwk(Algorithm::EdDSA, &format!("k{i}"))).collect();
        assert!(parse(nine, &ALL).err().unwrap().contains("over the limit of 8"));
        assert!(parse_set(b"not json", &ALL, 8).is_err());
        assert!(parse_set(b"{\"keys\": 3}", &ALL, 8).is_err());
    }

    #[test]
    fn urls_and_limits_are_checked_at_start() {
        let with = |url: &str| JwtConfig { jwks_url: url.into(), ..JwtConfig::default() };
        assert!(Jwks::from_config(&JwtConfig::default()).unwrap().is_none());
        assert!(Jwks::from_config(&with("https://app.example/jwks.json")).unwrap().is_some());
        assert!(Jwks::from_config(&with("http://127.0.0.1:9/jwks")).unwrap().is_some());
        assert!(Jwks::from_config(&with("http://localhost:9/jwks")).unwrap().is_some());
        for bad in ["http://app.example/jwks", "ftp://127.0.0.1/x", "not a url"] {
            assert!(Jwks::from_config(&with(bad)).is_err(), "{bad}");
        }
        let unlimited = JwtConfig { jwks_unknown_kid_secs: 0, ..with("https://a.example/") };
        assert!(Jwks::from_config(&unlimited).is_err(), "unknown kids must be rate-limited");
        let no_algs = JwtConfig { jwks_algs: vec![], ..with("https://a.example/") };
        assert!(Jwks::from_config(&no_algs).is_err());
        let hs = JwtConfig { jwks_algs: vec!["HS256".into()], ..with("https://a.example/") };
        assert!(Jwks::from_config(&hs).unwrap_err().to_string().contains("HS256"));
        let missing_ca =
            JwtConfig { jwks_ca: Some("/nonexistent/ca.pem".into()), ..with("https://a.example/") };
        assert!(Jwks::from_config(&missing_ca).is_err());
    }
}
