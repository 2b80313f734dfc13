//! Signed device tokens (design section 8), verifiable without a round trip.
//!
//! `SignIn` hands a device a token; the device presents it on every
//! long-connection sign-in and in the metadata of client gRPC calls. Any
//! gateway or node holding the cluster secret checks it locally: no shard is
//! asked whether the token is authentic or fresh.
//!
//! # Format
//!
//! A token is printable ASCII, at most [`MAX_TOKEN_LEN`] bytes:
//!
//! ```text
//! v1.<user_id>.<device_id>.<expires_at_ms>.<token_version>.<mac>
//! ```
//!
//! * the four numbers are canonical decimal: no sign (except a leading `-` on a
//!   negative expiry), no leading zeros, no `-0`; so each [`Claims`] value has
//!   exactly one token text under a key;
//! * `<mac>` is the lowercase hex HMAC-SHA256, under the [`TokenKey`], of the
//!   exact text before the last `.` (the `v1` prefix included, so a future
//!   format cannot be confused with this one).
//!
//! The key is `SHA-256("rim token key v1\0" ‖ secret)`: the same cluster
//! secret also authenticates internal gRPC calls, and the domain prefix keeps
//! the two uses apart.
//!
//! # Verification and its limits
//!
//! [`TokenKey::verify`] checks, in this order: the shape
//! ([`TokenError::Malformed`]), the MAC in constant time
//! ([`TokenError::BadSignature`]), then the expiry ([`TokenError::Expired`]:
//! expired once `now_ms >= expires_at_ms`). Claims are only returned, and
//! expiry only reported, for authentic tokens. It never panics, whatever the
//! input.
//!
//! What `verify` does **not** check, and the caller must:
//!
//! * that `user_id` / `device_id` are those the connection claims to be;
//! * **revocation**: logout and "kick device" bump the device's token version
//!   in the user's shard; at connection sign-in the caller compares
//!   [`Claims::token_version`] with the stored version and refuses a mismatch
//!   with `ERROR_TOKEN_REVOKED`. A revoked token therefore stays
//!   cryptographically valid until it expires; keep expiries finite.
//!
//! A cluster has a set of keys ([`TokenKeys`]): one signs, every one
//! verifies, so keys rotate without signing anybody out. Without configured
//! keys, a node derives one from the cluster secret (a development default:
//! the token key should not be the secret that also authenticates nodes).
//!
//! # Why a second error type
//!
//! [`TokenError`] is the crate's one error type besides [`crate::Error`],
//! which wraps it (`Error::Token`). `verify` runs on every connection
//! sign-in and every client call, so its refusal is a `Copy` reason with no
//! allocation and an exhaustive set of outcomes callers match on (metrics by
//! reason, the wire code of each); `Error` carries messages and is for the
//! rest of the crate.

use std::fmt;

use hmac::{Hmac, Mac};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// First field of every token of this format.
pub const TOKEN_FORMAT: &str = "v1";

/// Longest well-formed token, in bytes: `v1`, four numbers of at most 20
/// characters, five dots and 64 hex digits. Longer input is refused as
/// malformed before any parsing.
pub const MAX_TOKEN_LEN: usize = 2 + 4 * 20 + 5 + 64;

/// Domain separation prefix of the key derivation.
const KEY_DOMAIN: &[u8] = b"rim token key v1\0";

/// Length of the MAC in bytes (SHA-256).
const MAC_LEN: usize = 32;

/// What a token asserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claims {
    /// The signed-in user.
    pub user_id: UserId,
    /// The user's device the token was issued to.
    pub device_id: DeviceId,
    /// Expiry, Unix milliseconds; the token is refused from this instant on.
    pub expires_at_ms: i64,
    /// The device's token version when the token was issued; the caller must
    /// compare it with the device's stored version (revocation).
    pub token_version: u64,
}

impl Claims {
    /// Whether the claims are expired at `now_ms` (Unix milliseconds).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format (wrong shape, bad number, bad hex).
    #[error("malformed token")]
    Malformed,
    /// Well-formed, but not signed with this cluster's key (forged, altered,
    /// or from another cluster).
    #[error("bad token signature")]
    BadSignature,
    /// Authentic but past its expiry.
    #[error("token expired")]
    Expired,
}

impl TokenError {
    /// The wire code: `ERROR_UNAUTHENTICATED` for malformed or forged tokens,
    /// `ERROR_TOKEN_EXPIRED` for expired ones.
    pub fn code(self) -> ErrorCode {
        match self {
            TokenError::Malformed | TokenError::BadSignature => ErrorCode::ErrorUnauthenticated,
            TokenError::Expired => ErrorCode::ErrorTokenExpired,
        }
    }
}

/// The cluster's token signing key, derived from the cluster secret.
///
/// `Debug` never prints the key.
#[derive(Clone)]
pub struct TokenKey {
    key: [u8; 32],
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Derives the key from the cluster secret (see the module docs).
    ///
    /// Refuses an empty or all-whitespace secret with
    /// [`Error::InvalidInput`]. Anything else is accepted, but a secret that
    /// can be guessed lets anyone mint tokens: use at least 16 random bytes.
    pub fn from_secret(secret: &str) -> Result<TokenKey> {
        if secret.trim().is_empty() {
            return Err(Error::InvalidInput("the cluster secret must not be empty".into()));
        }
        let mut h = Sha256::new();
        h.update(KEY_DOMAIN);
        h.update(secret.as_bytes());
        Ok(TokenKey { key: h.finalize().into() })
    }

    /// Signs `claims` into a token (format in the module docs).
    pub fn sign(&self, claims: &Claims) -> String {
        let mut token = format!(
            "{TOKEN_FORMAT}.{}.{}.{}.{}",
            claims.user_id, claims.device_id, claims.expires_at_ms, claims.token_version
        );
        let tag = self.mac_of(token.as_bytes()).finalize().into_bytes();
        token.push('.');
        push_hex(&mut token, &tag);
        token
    }

    /// Checks `token` at time `now_ms` (Unix milliseconds) and returns its
    /// claims. Revocation and identity are the caller's checks (module docs).
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
        let (body, claims, tag) = parse(token).ok_or(TokenError::Malformed)?;
        self.mac_of(body.as_bytes()).verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        if claims.is_expired(now_ms) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn mac_of(&self, body: &[u8]) -> HmacSha256 {
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(body);
        mac
    }
}

/// The token keys of a cluster: one signs, all verify. Rotating keys is
/// adding the new key, making it the signing key, and removing the old one
/// once the tokens it signed have expired (or their devices signed in
/// again). Each key has an operator-chosen id, for configuration and logs;
/// tokens do not name their key: verification tries the signing key first,
/// then the others (a handful at most), so a token signed by any configured
/// key verifies.
///
/// `Debug` prints the ids only.
#[derive(Clone)]
pub struct TokenKeys {
    /// `(id, key)`, the signing key first.
    keys: Vec<(String, TokenKey)>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

impl TokenKeys {
    /// Most keys in a set (each verification may try them all).
    pub const MAX_KEYS: usize = 4;

    /// The keys `(id, secret)`, signing with the one whose id is `signing`.
    /// Refuses an empty set, duplicate or empty ids, more than
    /// [`TokenKeys::MAX_KEYS`] keys, a secret shorter than 16 bytes, and a
    /// signing id that is not in the set.
    pub fn new(keys: &[(String, String)], signing: &str) -> Result<TokenKeys> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        if keys.is_empty() || keys.len() > TokenKeys::MAX_KEYS {
            return bad(format!("1 to {} token keys, got {}", TokenKeys::MAX_KEYS, keys.len()));
        }
        let mut out: Vec<(String, TokenKey)> = Vec::with_capacity(keys.len());
        for (id, secret) in keys {
            if id.is_empty() || out.iter().any(|(seen, _)| seen == id) {
                return bad(format!("token key ids must be unique and non-empty: {id:?}"));
            }
            if secret.len() < 16 {
                return bad(format!("token key {id:?}: the secret must be at least 16 bytes"));
            }
            out.push((id.clone(), TokenKey::from_secret(secret)?));
        }
        let Some(at) = out.iter().position(|(id, _)| id == signing) else {
            return bad(format!("the signing token key {signing:?} is not among the keys"));
        };
        out.swap(0, at);
        Ok(TokenKeys { keys: out })
    }

    /// One key, with id `id`.
    pub fn single(id: &str, key: TokenKey) -> TokenKeys {
        TokenKeys { keys: vec![(id.to_string(), key)] }
    }

    /// The ids, the signing key's first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// Signs `claims` with the signing key.
    pub fn sign(&self, claims: &Claims) -> String {
        self.keys[0].1.sign(claims)
    }

    /// Checks `token` against every key (module docs): the claims if one
    /// key signed it and it has not expired.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
        for (_, key) in &self.keys {
            match key.verify(token, now_ms) {
                Err(TokenError::BadSignature) => continue,
                other => return other,
            }
        }
        Err(TokenError::BadSignature)
    }
}

/// Splits a token into (signed text, claims, MAC) if it has the right shape.
fn parse(token: &str) -> Option<(&str, Claims, [u8; MAC_LEN])> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (body, hex) = token.rsplit_once('.')?;
    let tag = decode_hex(hex)?;
    let mut fields = body.split('.');
    if fields.next()? != TOKEN_FORMAT {
        return None;
    }
    let claims = Claims {
        user_id: UserId(parse_u64(fields.next()?)?),
        device_id: DeviceId(parse_u64(fields.next()?)?),
        expires_at_ms: parse_i64(fields.next()?)?,
        token_version: parse_u64(fields.next()?)?,
    };
    if fields.next().is_some() {
        return None;
    }
    Some((body, claims, tag))
}

/// Canonical unsigned decimal: digits only, no leading zero unless "0".
fn parse_u64(s: &str) -> Option<u64> {
    if !canonical_digits(s) {
        return None;
    }
    s.parse().ok()
}

/// Canonical signed decimal: an optional `-`, canonical digits, never `-0`.
fn parse_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !canonical_digits(digits) || (digits.len() < s.len() && digits == "0") {
        return None;
    }
    s.parse().ok()
}

fn canonical_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

/// Decodes exactly `MAC_LEN` bytes of lowercase hex.
fn decode_hex(s: &str) -> Option<[u8; MAC_LEN]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if bytes.len() != 2 * MAC_LEN {
        return None;
    }
    let mut out = [0u8; MAC_LEN];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::from_secret("test cluster secret").unwrap()
    }

    fn claims() -> Claims {
        Claims { user_id: UserId(42), device_id: DeviceId(7), expires_at_ms: 2_000, token_version: 3 }
    }

    #[test]
    fn round_trip() {
        let t = key().sign(&claims());
        assert!(t.starts_with("v1.42.7.2000.3."), "{t}");
        assert_eq!(t.len(), "v1.42.7.2000.3.".len() + 64);
        assert_eq!(key().verify(&t, 1_999), Ok(claims()));
    }

    #[test]
    fn extremes_round_trip() {
        for c in [
            Claims { user_id: UserId(0), device_id: DeviceId(0), expires_at_ms: i64::MIN, token_version: 0 },
            Claims {
                user_id: UserId(u64::MAX),
                device_id: DeviceId(u64::MAX),
                expires_at_ms: i64::MAX,
                token_version: u64::MAX,
            },
            Claims { user_id: UserId(1), device_id: DeviceId(2), expires_at_ms: -5, token_version: 9 },
        ] {
            let t = key().sign(&c);
            assert!(t.len() <= MAX_TOKEN_LEN, "{t}");
            assert_eq!(
                key().verify(&t, i64::MIN),
                if c.expires_at_ms == i64::MIN { Err(TokenError::Expired) } else { Ok(c) }
            );
        }
    }

    #[test]
    fn expiry_boundary() {
        let t = key().sign(&claims());
        assert_eq!(key().verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(key().verify(&t, i64::MAX), Err(TokenError::Expired));
    }

    #[test]
    fn a_key_set_signs_with_one_key_and_verifies_with_all() {
        let pair = |id: &str, secret: &str| (id.to_string(), secret.to_string());
        let old = TokenKeys::new(&[pair("old", "the old secret, 16+")], "old").unwrap();
        let rotating =
            TokenKeys::new(&[pair("old", "the old secret, 16+"), pair("new", "the new secret, 16+")], "new")
                .unwrap();
        let new = TokenKeys::new(&[pair("new", "the new secret, 16+")], "new").unwrap();
        let from_old = old.sign(&claims());
        let from_new = rotating.sign(&claims());
        assert_ne!(from_old, from_new, "the rotating set signs with the new key");
        assert_eq!(rotating.verify(&from_old, 0), Ok(claims()), "old tokens still verify");
        assert_eq!(rotating.verify(&from_new, 0), Ok(claims()));
        assert_eq!(new.verify(&from_new, 0), Ok(claims()));
        assert_eq!(new.verify(&from_old, 0), Err(TokenError::BadSignature), "the old key is gone");
        assert_eq!(rotating.verify(&from_old, 2_000), Err(TokenError::Expired), "authentic but expired");
        assert_eq!(rotating.verify("v1.nope", 0), Err(TokenError::Malformed));
        assert_eq!(rotating.ids().collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(format!("{rotating:?}"), r#"["new", "old"]"#, "Debug shows ids, never secrets");
    }

    #[test]
    fn a_key_set_refuses_bad_configurations() {
        let pair = |id: &str, secret: &str| (id.to_string(), secret.to_string());
        let good = pair("a", "sixteen bytes ok");
        assert!(TokenKeys::new(&[], "a").is_err(), "empty");
        assert!(TokenKeys::new(&[good.clone(), good.clone()], "a").is_err(), "duplicate id");
        assert!(TokenKeys::new(&[pair("", "sixteen bytes ok")], "").is_err(), "empty id");
        assert!(TokenKeys::new(&[pair("a", "short")], "a").is_err(), "short secret");
        assert!(TokenKeys::new(std::slice::from_ref(&good), "b").is_err(), "unknown signing id");
        let five: Vec<_> = (0..5).map(|i| pair(&i.to_string(), "sixteen bytes ok")).collect();
        assert!(TokenKeys::new(&five, "0").is_err(), "too many keys");
        assert!(TokenKeys::new(&[good], "a").is_ok());
    }

    #[test]
    fn other_key_is_bad_signature() {
        let t = key().sign(&claims());
        let other = TokenKey::from_secret("another secret").unwrap();
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_forgery_is_bad_signature_not_expired() {
        let t = key().sign(&claims());
        let forged = t.replace("v1.42.", "v1.43.");
        assert_eq!(key().verify(&forged, 5_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_shapes() {
        let good = key().sign(&claims());
        let mac = good.rsplit_once('.').unwrap().1.to_string();
        for bad in [
            String::new(),
            ".".into(),
            "v1".into(),
            format!("v2.42.7.2000.3.{mac}"),
            format!("v1.42.7.2000.{mac}"),
            format!("v1.42.7.2000.3.4.{mac}"),
            format!("v1.042.7.2000.3.{mac}"),
            format!("v1.+42.7.2000.3.{mac}"),
            format!("v1.42.7.-0.3.{mac}"),
            format!("v1.42.7.--1.3.{mac}"),
            format!("v1.42.-7.2000.3.{mac}"),
            format!("v1.18446744073709551616.7.2000.3.{mac}"),
            format!("v1.42.7.2000.3.{}", mac.to_uppercase()),
            format!("v1.42.7.2000.3.{}", &mac[..62]),
            format!("v1.42.7.2000.3.{mac}00"),
            format!("v1..7.2000.3.{mac}"),
            format!("{good}."),
        ] {
            assert_eq!(key().verify(&bad, 0), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn empty_secret_refused() {
        assert!(matches!(TokenKey::from_secret(""), Err(Error::InvalidInput(_))));
        assert!(matches!(TokenKey::from_secret(" \t\n"), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn debug_hides_key() {
        assert_eq!(format!("{:?}", key()), "TokenKey(..)");
    }

    #[test]
    fn codes() {
        assert_eq!(TokenError::Malformed.code(), ErrorCode::ErrorUnauthenticated);
        assert_eq!(TokenError::BadSignature.code(), ErrorCode::ErrorUnauthenticated);
        assert_eq!(TokenError::Expired.code(), ErrorCode::ErrorTokenExpired);
    }
}
