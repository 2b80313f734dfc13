//! Standard Webhooks signatures (<https://www.standardwebhooks.com>).
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; each
//! signature is `v1,` and the standard base64 of its HMAC-SHA256 under a
//! secret; `webhook-signature` lists one per configured secret, separated
//! by spaces, so a receiver holding either secret of a rotation verifies.
//! A secret is written `whsec_` followed by the base64 of its bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Fewest bytes a webhook secret must have.
pub const MIN_SECRET_BYTES: usize = 16;
/// Most bytes a webhook secret may have.
pub const MAX_SECRET_BYTES: usize = 64;

/// The bytes of a `whsec_...` secret (the prefix is optional, as the
/// Standard Webhooks libraries allow).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let bytes = STANDARD
        .decode(b64)
        .map_err(|_| Error::Config("a webhook secret must be whsec_ followed by base64".into()))?;
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
        return Err(Error::Config(format!(
            "a webhook secret must hold {MIN_SECRET_BYTES}..={MAX_SECRET_BYTES} bytes, not {}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// `v1,<base64 HMAC-SHA256(secret, id.timestamp.body)>`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { unreachable!("hmac key of any size") };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header: one signature per secret, in order.
pub fn signature_header(secrets: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks reference libraries' tests.
        let secret = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(decode_secret("whsec_not base64!").is_err());
        assert!(decode_secret("whsec_c2hvcnQ=").is_err(), "too short");
        let two = signature_header(&[vec![1; 16], vec![2; 16]], "id", 1, b"{}");
        assert_eq!(two.split(' ').count(), 2);
    }
}
