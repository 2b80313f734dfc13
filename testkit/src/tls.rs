//! Certificates for TLS tests: a private CA, a leaf for loopback, and a
//! second CA that must not be trusted, written as PEM files in a temporary
//! directory that lives as long as the [`TestPki`].

use std::path::{Path, PathBuf};

use rim_cluster::tls::pki::Authority;
use rim_cluster::{LinkTls, LinkTlsConfig};

/// PEM files of a test PKI.
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The trusted CA's certificate.
    pub ca: PathBuf,
    /// A certificate for `127.0.0.1` and `localhost`, signed by `ca`.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Another CA's certificate: trusting it must not let anyone reach a
    /// server holding `cert`.
    pub other_ca: PathBuf,
    /// A certificate for the same names, signed by the other CA.
    pub other_cert: PathBuf,
    /// Its private key.
    pub other_key: PathBuf,
}

impl TestPki {
    /// Makes both CAs and their loopback leaves.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("writing a test certificate");
            p
        };
        let ca = Authority::new("rim test").expect("a CA");
        let leaf = ca.issue(&names).expect("a leaf certificate");
        let other = Authority::new("untrusted").expect("a CA");
        let other_leaf = other.issue(&names).expect("a leaf certificate");
        TestPki {
            ca: write("ca.pem", &ca.cert_pem()),
            cert: write("cert.pem", &leaf.cert_pem),
            key: write("key.pem", &leaf.key_pem),
            other_ca: write("other-ca.pem", &other.cert_pem()),
            other_cert: write("other-cert.pem", &other_leaf.cert_pem),
            other_key: write("other-key.pem", &other_leaf.key_pem),
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Internal-link files: trust `ca`, present `cert`.
    pub fn link_config(&self, require_client_cert: bool) -> LinkTlsConfig {
        LinkTlsConfig {
            ca: self.ca.clone(),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
            require_client_cert,
            server_name: None,
        }
    }

    /// [`link_config`](Self::link_config), loaded.
    pub fn link(&self, require_client_cert: bool) -> LinkTls {
        LinkTls::load(&self.link_config(require_client_cert)).expect("loading the test PKI")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
