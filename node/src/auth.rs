//! Passwords and sign-in codes.
//!
//! * Passwords are hashed with argon2id (PHC strings, random salt). Hashing
//!   is deliberately slow, so callers run it on a blocking thread.
//! * Phone sign-in (gim's flow) asks a [`CodeVerifier`]. Deployments plug in
//!   their SMS provider; [`FixedCodeVerifier`] accepts one configured code and
//!   exists for development only: it logs a warning when created.
//!
//! Device tokens themselves are signed and verified in `rim-cluster`'s
//! `token` module, which gateways share.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Hashes a password into a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches a PHC string (false for malformed hashes).
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// Checks sign-in codes sent to phones.
pub trait CodeVerifier: Send + Sync + std::fmt::Debug {
    /// Whether `code` is the valid code for `phone` right now.
    fn verify(&self, phone: &str, code: &str) -> bool;
}

/// Development verifier: accepts one fixed code for every phone.
#[derive(Debug)]
pub struct FixedCodeVerifier {
    code: String,
}

impl FixedCodeVerifier {
    /// Accepts `code` for every phone. Logs a warning: never use in production.
    pub fn new(code: impl Into<String>) -> FixedCodeVerifier {
        let code = code.into();
        tracing::warn!("DEV MODE: phone sign-in accepts the fixed code {code:?} for every phone number");
        FixedCodeVerifier { code }
    }
}

impl CodeVerifier for FixedCodeVerifier {
    fn verify(&self, _phone: &str, code: &str) -> bool {
        !code.is_empty() && rim_proto::metadata::secrets_equal(code.as_bytes(), self.code.as_bytes())
    }
}

/// Refuses every code (phone sign-in disabled).
#[derive(Debug, Default)]
pub struct NoCodeVerifier;

impl CodeVerifier for NoCodeVerifier {
    fn verify(&self, _phone: &str, _code: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("hunter2").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("hunter2", &h));
        assert!(!verify_password("hunter3", &h));
        assert!(!verify_password("hunter2", "not a hash"));
        assert_ne!(hash_password("hunter2").unwrap(), h, "salted");
    }

    #[test]
    fn fixed_code_verifier() {
        let v = FixedCodeVerifier::new("123456");
        assert!(v.verify("+1555", "123456"));
        assert!(!v.verify("+1555", "000000"));
        assert!(!NoCodeVerifier.verify("+1555", "123456"));
    }
}
