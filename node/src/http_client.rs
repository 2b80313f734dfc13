//! The one place the node builds its outgoing HTTP clients (the app's JWKS,
//! its `before_send` hook, webhook endpoints): rustls with the ring provider
//! like every other link, no redirects (a redirect could send a signed
//! event or a token check somewhere else), one deadline for the whole
//! exchange, and trust roots from the system or, when `ca` names a PEM
//! bundle, from that bundle only.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// A client for `what` (named in configuration errors) whose requests end
/// after `timeout`.
pub fn client(what: &str, timeout: Duration, ca: Option<&Path>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("rim/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca {
        let bad = |e: &dyn std::fmt::Display| Error::Config(format!("{what}: CA file {}: {e}", ca.display()));
        let pem = std::fs::read(ca).map_err(|e| bad(&e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?;
        if certs.is_empty() {
            return Err(bad(&"holds no certificate"));
        }
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().map_err(|e| Error::Config(format!("{what}: HTTP client: {e}")))
}
