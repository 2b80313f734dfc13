//! TLS of every rim link: one place that loads certificates, builds the
//! rustls and tonic configurations, and dials gRPC endpoints.
//!
//! # Two kinds of links
//!
//! * **Internal links** are gRPC: node to node (Raft, forwarding, relay),
//!   gateway to node, the admin CLI and the business push API to a node.
//!   [`LinkTls`] holds their material, loaded once from PEM files
//!   ([`LinkTlsConfig`]): a CA bundle that verifies the other side, this
//!   process's certificate and key (served by a node; presented as a client
//!   certificate where the server asks for one), and whether the server
//!   requires client certificates (mutual TLS). [`endpoint`] is the one
//!   function that turns an address into a tonic endpoint, `https` with
//!   `Some(tls)` and `http` without.
//! * **Client-facing listeners** (the gateway's TCP and WebSocket ports)
//!   take a plain rustls [`ServerConfig`](rustls::ServerConfig) from
//!   [`server_config`]; the gateway drives it (sans-IO on its mio loop,
//!   tokio-rustls for WebSocket).
//!
//! Every configuration uses the ring provider explicitly, so the process
//! never depends on a process-wide default provider being installed.
//!
//! [`pki`] makes a private CA and certificates signed by it: `rim cert`
//! writes them for operators who have no CA of their own, and tests use it
//! to build valid and invalid chains.
//!
//! # Invariants
//!
//! * A configuration is checked when it is loaded: a missing file, a file
//!   without a certificate, or a key that does not parse is refused there
//!   (naming the file, never printing its contents), not at the first
//!   connection.
//! * With TLS configured, nothing is dialled in plaintext: [`endpoint`]
//!   returns only `https` endpoints verified against the configured CA,
//!   whose expected name is the address's host unless
//!   [`LinkTlsConfig::server_name`] overrides it.
//! * Key material is never logged: [`LinkTls`]'s `Debug` shows paths'
//!   effects (whether an identity is present), not bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

pub mod pki;

/// Longest TLS handshake a server waits for before dropping the connection.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Files of an internal link's TLS (`[tls]` of a node's TOML, `--tls-*`
/// flags of a gateway or the admin CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTlsConfig {
    /// PEM bundle of the CAs that verify the other side: the servers this
    /// process dials and, with `require_client_cert`, its clients.
    pub ca: PathBuf,
    /// This process's certificate chain (PEM). Required to serve (a node);
    /// presented as a client certificate where the server asks for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM, PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Serve only clients presenting a certificate signed by `ca` (mutual
    /// TLS on the internal listener; default off).
    #[serde(default)]
    pub require_client_cert: bool,
    /// The name every server's certificate must carry, when certificates
    /// name a service (`rim-node`) rather than each address (default: the
    /// host of the address dialled).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Loaded TLS material of the internal links. Cheap to clone.
#[derive(Clone)]
pub struct LinkTls {
    ca: Certificate,
    identity: Option<Identity>,
    require_client_cert: bool,
    server_name: Option<String>,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("identity", &self.identity.is_some())
            .field("require_client_cert", &self.require_client_cert)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl LinkTls {
    /// Reads and checks the files `config` names.
    pub fn load(config: &LinkTlsConfig) -> Result<LinkTls> {
        let ca = read(&config.ca)?;
        if parse_certs(&ca, &config.ca)?.is_empty() {
            return Err(invalid(&config.ca, "holds no certificate"));
        }
        let identity = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (read(cert)?, read(key)?);
                if parse_certs(&cert_pem, cert)?.is_empty() {
                    return Err(invalid(cert, "holds no certificate"));
                }
                parse_key(&key_pem, key)?;
                Some(Identity::from_pem(cert_pem, key_pem))
            }
            (None, None) => None,
            _ => return Err(Error::InvalidInput("TLS: set both `cert` and `key`, or neither".into())),
        };
        if config.require_client_cert && identity.is_none() {
            return Err(Error::InvalidInput(
                "TLS: `require_client_cert` needs this node's `cert` and `key`".into(),
            ));
        }
        Ok(LinkTls {
            ca: Certificate::from_pem(ca),
            identity,
            require_client_cert: config.require_client_cert,
            server_name: config.server_name.clone().filter(|n| !n.is_empty()),
        })
    }

    /// Whether this process has a certificate (can serve, and can answer a
    /// server's request for a client certificate).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Whether servers built from this require client certificates.
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }

    /// The configuration of a listener serving this identity. With
    /// `verify_clients` and `require_client_cert`, clients must present a
    /// certificate signed by the CA (the internal listener); without, any
    /// client may connect (a node's client API).
    pub fn server(&self, verify_clients: bool) -> Result<ServerTlsConfig> {
        let Some(identity) = &self.identity else {
            return Err(Error::InvalidInput("TLS: serving needs `cert` and `key`".into()));
        };
        let mut c = ServerTlsConfig::new().identity(identity.clone()).timeout(HANDSHAKE_TIMEOUT);
        if verify_clients && self.require_client_cert {
            c = c.client_ca_root(self.ca.clone());
        }
        Ok(c)
    }

    /// The configuration of a connection to a server at `host`.
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        let name = self.server_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        let mut c = ClientTlsConfig::new().ca_certificate(self.ca.clone()).domain_name(name);
        if let Some(identity) = &self.identity {
            c = c.identity(identity.clone());
        }
        c
    }
}

/// A tonic endpoint for `addr` (`host:port`, or a URL whose scheme is
/// replaced): `https` verified with `tls`, or plain `http` without.
pub fn endpoint(addr: &str, tls: Option<&LinkTls>) -> Result<Endpoint> {
    let authority = addr.split_once("://").map_or(addr, |(_, rest)| rest).trim_end_matches('/');
    let bad = |e: &dyn std::fmt::Display| Error::InvalidInput(format!("address {addr:?}: {e}"));
    match tls {
        None => Endpoint::from_shared(format!("http://{authority}")).map_err(|e| bad(&e)),
        Some(tls) => {
            let ep = Endpoint::from_shared(format!("https://{authority}")).map_err(|e| bad(&e))?;
            let host = ep.uri().host().unwrap_or_default().to_string();
            ep.tls_config(tls.client(&host)).map_err(|e| bad(&e))
        }
    }
}

/// A rustls server configuration for a client-facing listener: the
/// certificate chain and key from PEM files, no client certificates.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let chain = parse_certs(&read(cert)?, cert)?;
    if chain.is_empty() {
        return Err(invalid(cert, "holds no certificate"));
    }
    let key_der = parse_key(&read(key)?, key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidInput(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| Error::InvalidInput(format!("TLS: {} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(config))
}

/// A rustls client configuration trusting the CAs in the PEM bundle `ca`
/// (for clients of the client-facing listeners: the SDK, tests, tools).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(&read(ca)?, ca)? {
        roots.add(cert).map_err(|e| invalid(ca, &e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid(ca, "holds no certificate"));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidInput(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The crypto provider of every configuration here: ring, as tonic's
/// `tls-ring` uses. rustls 0.23.48 deprecates it for lacking post-quantum
/// key exchange and steers to aws-lc-rs, whose build needs more than a C
/// compiler; see docs/security.md ("Transport security").
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(path, &e.to_string()))
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, &format!("not a PEM certificate bundle ({e})")))
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| invalid(path, "holds no PEM private key"))
}

fn invalid(path: &Path, why: &str) -> Error {
    Error::InvalidInput(format!("TLS file {}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::Authority;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_a_valid_set_and_refuses_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test").unwrap();
        let leaf = ca.issue(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        let ca_path = write(dir.path(), "ca.pem", &ca.cert_pem());
        let cert = write(dir.path(), "cert.pem", &leaf.cert_pem);
        let key = write(dir.path(), "key.pem", &leaf.key_pem);
        let good = LinkTlsConfig {
            ca: ca_path.clone(),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ..Default::default()
        };
        let tls = LinkTls::load(&good).unwrap();
        assert!(tls.has_identity());
        assert!(tls.server(true).is_ok());
        assert!(server_config(&cert, &key).is_ok());
        assert!(client_config(&ca_path).is_ok());

        let err = |c: &LinkTlsConfig| LinkTls::load(c).unwrap_err().to_string();
        let missing = LinkTlsConfig { ca: dir.path().join("nope.pem"), ..good.clone() };
        assert!(err(&missing).contains("nope.pem"), "{}", err(&missing));
        let key_as_ca = LinkTlsConfig { ca: key.clone(), ..good.clone() };
        assert!(err(&key_as_ca).contains("no certificate"), "{}", err(&key_as_ca));
        let cert_as_key = LinkTlsConfig { key: Some(cert.clone()), ..good.clone() };
        let e = err(&cert_as_key);
        assert!(
            e.contains("no PEM private key") && !e.contains("BEGIN"),
            "names the file, never the bytes: {e}"
        );
        let half = LinkTlsConfig { key: None, ..good.clone() };
        assert!(err(&half).contains("both"));
        let mtls_without_identity =
            LinkTlsConfig { cert: None, key: None, require_client_cert: true, ..good };
        assert!(err(&mtls_without_identity).contains("require_client_cert"));
    }

    #[test]
    fn endpoints_follow_the_configuration() {
        let plain = endpoint("127.0.0.1:7000", None).unwrap();
        assert_eq!(plain.uri().to_string(), "http://127.0.0.1:7000/");
        let replaced = endpoint("http://127.0.0.1:7000", None).unwrap();
        assert_eq!(replaced.uri().to_string(), "http://127.0.0.1:7000/");

        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test").unwrap();
        let ca_path = write(dir.path(), "ca.pem", &ca.cert_pem());
        let tls = LinkTls::load(&LinkTlsConfig { ca: ca_path, ..Default::default() }).unwrap();
        assert!(!tls.has_identity());
        assert!(tls.server(false).is_err(), "serving needs an identity");
        let secure = endpoint("127.0.0.1:7000", Some(&tls)).unwrap();
        assert_eq!(secure.uri().scheme_str(), Some("https"));
    }
}
