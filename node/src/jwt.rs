//! App-signed JWTs as connection tokens: an app with its own user system
//! signs a token for its user and device, and a node verifies it locally,
//! without calling the app.
//!
//! A node configured with `[jwt]` keys (`[[jwt.keys]]`, or the app's JWKS
//! at `jwks_url`, see [`crate::jwks`]) accepts, wherever a rim token is
//! accepted at sign-in, a JWT signed by one of them (HS256, RS256, ES256 or
//! EdDSA). [`JwtVerifier::verify`] checks, in this order and all locally:
//! the size, the header (an algorithm among the keys', never `none`), the
//! signature (the key named by `kid`, or every configured key of the
//! header's algorithm), `exp` (required, with the configured leeway),
//! `nbf`, and `aud`/`iss` when configured. It returns the app's identity:
//! `sub` (the app's user id) and the device claim (the app's device id).
//! The only network call it can make is the JWKS refetch a `kid` no key
//! has triggers, rate-limited and bounded by the fetch timeout.
//!
//! What a node does with an identity (its own user and device ids, created
//! on first sight through Raft) is `service/identity.rs`'s business.
//!
//! # Invariants
//!
//! * Nothing is decoded beyond the header before the signature checks out,
//!   and a token over [`MAX_JWT_BYTES`] is refused unread.
//! * The algorithm comes from the key, never from the token alone: a token
//!   whose header names an algorithm no configured key has is refused, so an
//!   HMAC secret can never be tried as an RSA key or the reverse.
//! * Secrets and tokens are never logged; errors say what failed, not what
//!   the token held.

use std::path::PathBuf;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rim_proto::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::jwks::Jwks;

/// Longest JWT accepted, in bytes.
pub const MAX_JWT_BYTES: usize = 8 << 10;
/// Longest `sub` and device claim, in bytes.
pub const MAX_EXTERNAL_ID_BYTES: usize = 128;

/// App-signed tokens (`[jwt]` in a node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss` (empty: not checked).
    pub issuer: String,
    /// Required `aud` (empty: not checked, and a token carrying one is
    /// still accepted).
    pub audience: String,
    /// The claim naming the app's device (a string or a number).
    pub device_claim: String,
    /// The claim giving a new user's nickname (optional in tokens).
    pub name_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// The verification keys (`[[jwt.keys]]`).
    pub keys: Vec<JwtKeyConfig>,
    /// The app's JSON Web Key Set (empty: none); its keys verify next to
    /// `keys`, looked up by `kid` ([`crate::jwks`]).
    pub jwks_url: String,
    /// A PEM file of the CA(s) to trust for `jwks_url` instead of the
    /// system roots.
    pub jwks_ca: Option<PathBuf>,
    /// How often the set is fetched again, in seconds.
    pub jwks_refresh_secs: u64,
    /// How long one fetch may take (connect, headers, body), in ms.
    pub jwks_timeout_ms: u64,
    /// Largest set accepted, in bytes.
    pub jwks_max_bytes: usize,
    /// Most keys in a set (a larger set is refused as a whole).
    pub jwks_max_keys: usize,
    /// A token naming an unknown `kid` makes at most one fetch per this
    /// many seconds.
    pub jwks_unknown_kid_secs: u64,
    /// The algorithms a key from the set may have (RS256, ES256, EdDSA).
    pub jwks_algs: Vec<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            issuer: String::new(),
            audience: String::new(),
            device_claim: "device".into(),
            name_claim: "name".into(),
            leeway_secs: 30,
            keys: Vec::new(),
            jwks_url: String::new(),
            jwks_ca: None,
            jwks_refresh_secs: 300,
            jwks_timeout_ms: 5_000,
            jwks_max_bytes: 256 << 10,
            jwks_max_keys: 64,
            jwks_unknown_kid_secs: 30,
            jwks_algs: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
        }
    }
}

/// One verification key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// The key id tokens name in their `kid` header (empty: any token of
    /// this key's algorithm may be tried against it).
    pub kid: String,
    /// `HS256`, `RS256`, `ES256` or `EdDSA`.
    pub alg: String,
    /// The shared secret of an `HS256` key.
    pub secret: String,
    /// A PEM public key (`RS256`, `ES256`, `EdDSA`).
    pub public_key: Option<PathBuf>,
}

impl std::fmt::Debug for JwtKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeyConfig")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("secret", &if self.secret.is_empty() { "" } else { "<set>" })
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// The app's identity of a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalIdentity {
    /// `sub`: the app's user id.
    pub subject: String,
    /// The device claim: the app's device id.
    pub device: String,
    /// The name claim, if any (a new user's nickname).
    pub name: String,
    /// `exp`, in ms since the epoch.
    pub expires_at_ms: i64,
    /// `iat`, in ms since the epoch (0 if absent).
    pub issued_at_ms: i64,
}

/// A verification key: configured, or from the JWKS.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// Verifies app-signed tokens with the configured keys and the JWKS's.
pub struct JwtVerifier {
    keys: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
    config: JwtConfig,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("keys", &self.keys.len()).field("jwks", &self.jwks).finish()
    }
}

/// Why no key verified a token.
enum Miss {
    /// The token names a kid no key has (the JWKS may have it by now).
    UnknownKid,
    Refused(Error),
}

impl From<Error> for Miss {
    fn from(e: Error) -> Miss {
        Miss::Refused(e)
    }
}

fn refused(why: impl Into<String>) -> Error {
    Error::rejected(ErrorCode::ErrorUnauthenticated, format!("token refused: {}", why.into()))
}

impl JwtVerifier {
    /// A verifier of `config`'s keys and JWKS; `None` if it has neither.
    pub fn from_config(config: &JwtConfig) -> Result<Option<JwtVerifier>> {
        let jwks = Jwks::from_config(config)?;
        if config.keys.is_empty() && jwks.is_none() {
            return Ok(None);
        }
        if config.device_claim.is_empty() {
            return Err(Error::Config("jwt.device_claim must name a claim".into()));
        }
        let mut keys = Vec::new();
        for (i, k) in config.keys.iter().enumerate() {
            let bad = |why: String| Error::Config(format!("jwt.keys[{i}] ({}): {why}", k.alg));
            let pem = || -> Result<Vec<u8>> {
                let path =
                    k.public_key.as_ref().ok_or_else(|| bad("needs public_key (a PEM file)".into()))?;
                std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))
            };
            let (alg, key) = match k.alg.as_str() {
                "HS256" => {
                    if k.secret.len() < 32 {
                        return Err(bad("an HS256 secret must be at least 32 bytes".into()));
                    }
                    (
                        Algorithm::HS256,
                        DecodingKey::from_secret(k.secret.as_bytes()).map_err(|e| bad(e.to_string()))?,
                    )
                }
                "RS256" => {
                    (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem()?).map_err(|e| bad(e.to_string()))?)
                }
                "ES256" => {
                    (Algorithm::ES256, DecodingKey::from_ec_pem(&pem()?).map_err(|e| bad(e.to_string()))?)
                }
                "EdDSA" => {
                    (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem()?).map_err(|e| bad(e.to_string()))?)
                }
                other => {
                    return Err(bad(format!("unknown algorithm {other:?} (HS256, RS256, ES256, EdDSA)")));
                }
            };
            if k.alg != "HS256" && !k.secret.is_empty() {
                return Err(bad("a secret is for HS256 keys only".into()));
            }
            keys.push(Key { kid: (!k.kid.is_empty()).then(|| k.kid.clone()), alg, key });
        }
        Ok(Some(JwtVerifier { keys, jwks, config: config.clone() }))
    }

    /// Whether `token` has a JWT's shape (three dot-separated parts, the
    /// first a JSON header): the sign-in paths try [`verify`](Self::verify)
    /// on those and rim's own verification on the others.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.len() <= MAX_JWT_BYTES
            && token.split('.').count() == 3
            && jsonwebtoken::decode_header(token).is_ok()
    }

    /// The JWKS, if `jwks_url` is set (the node runs its refresh loop).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// The app's identity in `token`, if one of the keys signed it and its
    /// claims hold (see the module docs). A `kid` no key has makes the
    /// JWKS fetch again, rate-limited ([`crate::jwks`]), and is looked up
    /// once more.
    pub async fn verify(&self, token: &str) -> Result<ExternalIdentity> {
        match self.verify_with_keys(token) {
            Err(Miss::UnknownKid) => {}
            other => return Self::outcome(other),
        }
        if let Some(jwks) = &self.jwks
            && jwks.refetch_for_unknown_kid().await
        {
            return Self::outcome(self.verify_with_keys(token));
        }
        Err(refused("unknown key id"))
    }

    /// [`verify`](Self::verify) with the keys at hand: an unknown kid is
    /// refused without fetching.
    pub fn verify_cached(&self, token: &str) -> Result<ExternalIdentity> {
        Self::outcome(self.verify_with_keys(token))
    }

    fn outcome(r: std::result::Result<ExternalIdentity, Miss>) -> Result<ExternalIdentity> {
        r.map_err(|m| match m {
            Miss::UnknownKid => refused("unknown key id"),
            Miss::Refused(e) => e,
        })
    }

    fn verify_with_keys(&self, token: &str) -> std::result::Result<ExternalIdentity, Miss> {
        if token.len() > MAX_JWT_BYTES {
            return Err(refused(format!("over {MAX_JWT_BYTES} bytes")).into());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused("not a JWT"))?;
        let fetched = self.jwks.as_ref().map(|j| j.keys()).unwrap_or_default();
        // JWKS keys always have a kid, so a token without one is tried
        // against the configured keys only.
        let all = || self.keys.iter().chain(fetched.iter());
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) if all().any(|k| k.kid.as_ref() == Some(kid)) => {
                all().filter(|k| k.kid.as_ref() == Some(kid) && k.alg == header.alg).collect()
            }
            Some(_) => return Err(Miss::UnknownKid),
            None => self.keys.iter().filter(|k| k.alg == header.alg).collect(),
        };
        if candidates.is_empty() {
            return Err(refused(format!("no key for algorithm {:?}", header.alg)).into());
        }
        let mut last = refused("bad signature");
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &self.validation(key.alg),
            ) {
                Ok(data) => return Ok(self.identity(&data.claims)?),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature => {
                            Error::rejected(ErrorCode::ErrorTokenExpired, "token refused: expired")
                        }
                        K::InvalidSignature => refused("bad signature"),
                        K::ImmatureSignature => refused("not valid yet (nbf)"),
                        K::InvalidAudience => refused("wrong audience"),
                        K::InvalidIssuer => refused("wrong issuer"),
                        K::MissingRequiredClaim(c) => refused(format!("claim {c} missing")),
                        _ => refused("malformed"),
                    };
                    // Only a bad signature may be another key's token.
                    if !matches!(e.kind(), K::InvalidSignature) {
                        return Err(last.into());
                    }
                }
            }
        }
        Err(last.into())
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.config.leeway_secs;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        v.validate_aud = !self.config.audience.is_empty();
        if v.validate_aud {
            v.set_audience(&[&self.config.audience]);
        }
        if !self.config.issuer.is_empty() {
            v.set_issuer(&[&self.config.issuer]);
        }
        v
    }

    fn identity(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Result<ExternalIdentity> {
        let text = |name: &str| -> Option<String> {
            match claims.get(name)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let subject =
            text("sub").filter(|s| !s.is_empty()).ok_or_else(|| refused("sub must be a non-empty string"))?;
        let device = text(&self.config.device_claim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| refused(format!("claim {} missing", self.config.device_claim)))?;
        for (what, v) in [("sub", &subject), (self.config.device_claim.as_str(), &device)] {
            if v.len() > MAX_EXTERNAL_ID_BYTES {
                return Err(refused(format!("{what} over {MAX_EXTERNAL_ID_BYTES} bytes")));
            }
        }
        let secs = |name: &str| claims.get(name).and_then(serde_json::Value::as_i64).unwrap_or(0);
        Ok(ExternalIdentity {
            subject,
            device,
            name: text(&self.config.name_claim).unwrap_or_default(),
            expires_at_ms: secs("exp").saturating_mul(1000),
            issued_at_ms: secs("iat").saturating_mul(1000),
        })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt-rs256-test-private.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/jwt-rs256-test-public.pem");

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn hs_config(kid: &str) -> JwtConfig {
        JwtConfig {
            issuer: "https://app.example".into(),
            audience: "rim".into(),
            keys: vec![JwtKeyConfig {
                kid: kid.into(),
                alg: "HS256".into(),
                secret: SECRET.into(),
                ..Default::default()
            }],
            ..JwtConfig::default()
        }
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "app-user-7", "device": "phone-1", "name": "Ann", "exp": now() + 600, "iat": now(),
               "iss": "https://app.example", "aud": "rim"})
    }

    fn hs(header: Header, claims: &serde_json::Value, secret: &str) -> String {
        encode(&header, claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
    }

    /// Unpadded base64url, for hand-made tokens.
    fn encode_no_pad(bytes: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn code(r: Result<ExternalIdentity>) -> ErrorCode {
        match r {
            Ok(_) => ErrorCode::Ok,
            Err(Error::Rejected { code, .. }) => code,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn hs256_token_gives_the_apps_identity() {
        let v = JwtVerifier::from_config(&hs_config("")).unwrap().unwrap();
        let t = hs(Header::new(Algorithm::HS256), &claims(), SECRET);
        assert!(JwtVerifier::looks_like_jwt(&t));
        let id = v.verify_cached(&t).unwrap();
        assert_eq!(
            (id.subject.as_str(), id.device.as_str(), id.name.as_str()),
            ("app-user-7", "phone-1", "Ann")
        );
        assert!(id.expires_at_ms > now() * 1000);
        // A numeric device claim is its decimal text.
        let mut c = claims();
        c["device"] = json!(42);
        assert_eq!(v.verify_cached(&hs(Header::new(Algorithm::HS256), &c, SECRET)).unwrap().device, "42");
    }

    #[test]
    fn every_broken_claim_is_refused_with_its_code() {
        let v = JwtVerifier::from_config(&hs_config("k1")).unwrap().unwrap();
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            edit(&mut c);
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("k1".into());
            v.verify_cached(&hs(h, &c, SECRET))
        };
        let unauth = ErrorCode::ErrorUnauthenticated;
        assert_eq!(code(with(&|_| {})), ErrorCode::Ok);
        assert_eq!(code(with(&|c| c["exp"] = json!(now() - 3600))), ErrorCode::ErrorTokenExpired);
        assert_eq!(code(with(&|c| c["nbf"] = json!(now() + 3600))), unauth);
        assert_eq!(code(with(&|c| c["aud"] = json!("another-app"))), unauth);
        assert_eq!(code(with(&|c| c["iss"] = json!("https://evil.example"))), unauth);
        assert_eq!(code(with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))), unauth);
        assert_eq!(code(with(&|c| drop(c.as_object_mut().unwrap().remove("sub")))), unauth);
        assert_eq!(code(with(&|c| drop(c.as_object_mut().unwrap().remove("device")))), unauth);
        assert_eq!(code(with(&|c| c["sub"] = json!("x".repeat(MAX_EXTERNAL_ID_BYTES + 1)))), unauth);
        // Another secret, another kid, alg none, a tampered payload.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        assert_eq!(
            code(v.verify_cached(&hs(h.clone(), &claims(), "another-secret-of-at-least-32-bytes!!"))),
            unauth
        );
        let mut other_kid = h.clone();
        other_kid.kid = Some("k2".into());
        assert_eq!(code(v.verify_cached(&hs(other_kid, &claims(), SECRET))), unauth);
        let good = hs(h, &claims(), SECRET);
        let parts: Vec<&str> = good.split('.').collect();
        let none_header = encode_no_pad(br#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(code(v.verify_cached(&format!("{none_header}.{}.", parts[1]))), unauth);
        let mut forged = claims();
        forged["sub"] = json!("admin");
        let tampered = format!("{}.{}.{}", parts[0], encode_no_pad(forged.to_string().as_bytes()), parts[2]);
        assert_eq!(code(v.verify_cached(&tampered)), unauth);
        assert_eq!(code(v.verify_cached(&"a".repeat(MAX_JWT_BYTES + 1))), unauth);
    }

    #[test]
    fn public_key_algorithms_verify_and_never_mix_with_hmac() {
        let dir = tempfile::tempdir().unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let config = JwtConfig {
            keys: vec![
                JwtKeyConfig {
                    kid: "ec".into(),
                    alg: "ES256".into(),
                    public_key: Some(write("ec.pem", ec.public_key_pem())),
                    ..Default::default()
                },
                JwtKeyConfig {
                    kid: "ed".into(),
                    alg: "EdDSA".into(),
                    public_key: Some(write("ed.pem", ed.public_key_pem())),
                    ..Default::default()
                },
                JwtKeyConfig {
                    kid: "rs".into(),
                    alg: "RS256".into(),
                    public_key: Some(write("rs.pem", RSA_PUBLIC.into())),
                    ..Default::default()
                },
            ],
            ..JwtConfig::default()
        };
        let v = JwtVerifier::from_config(&config).unwrap().unwrap();
        let c = json!({"sub": "u1", "device": "d1", "exp": now() + 600});
        let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
            let mut h = Header::new(alg);
            h.kid = Some(kid.into());
            encode(&h, &c, key).unwrap()
        };
        let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
        let ed_key = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
        assert_eq!(v.verify_cached(&sign(Algorithm::ES256, "ec", &ec_key)).unwrap().subject, "u1");
        assert_eq!(v.verify_cached(&sign(Algorithm::EdDSA, "ed", &ed_key)).unwrap().subject, "u1");
        let rs_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        assert_eq!(v.verify_cached(&sign(Algorithm::RS256, "rs", &rs_key)).unwrap().subject, "u1");
        // The EC key's token under the Ed key's id: refused.
        assert_eq!(
            code(v.verify_cached(&sign(Algorithm::ES256, "ed", &ec_key))),
            ErrorCode::ErrorUnauthenticated
        );
        // An HS256 token "signed" with the public key's PEM as the secret
        // (the classic algorithm confusion): no HS256 key, refused.
        let confused = hs(Header::new(Algorithm::HS256), &c, &ec.public_key_pem());
        assert_eq!(code(v.verify_cached(&confused)), ErrorCode::ErrorUnauthenticated);
    }

    #[test]
    fn bad_configurations_are_refused_at_start() {
        let short = JwtConfig {
            keys: vec![JwtKeyConfig { alg: "HS256".into(), secret: "short".into(), ..Default::default() }],
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::from_config(&short).unwrap_err().to_string().contains("32 bytes"));
        let unknown = JwtConfig {
            keys: vec![JwtKeyConfig { alg: "HS1".into(), ..Default::default() }],
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::from_config(&unknown).unwrap_err().to_string().contains("unknown algorithm"));
        let no_file = JwtConfig {
            keys: vec![JwtKeyConfig { alg: "RS256".into(), ..Default::default() }],
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::from_config(&no_file).unwrap_err().to_string().contains("public_key"));
        assert!(JwtVerifier::from_config(&JwtConfig::default()).unwrap().is_none());
        let shown = format!("{:?}", hs_config(""));
        assert!(!shown.contains(SECRET), "the secret is never printed: {shown}");
    }
}
