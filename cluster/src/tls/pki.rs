//! A private certificate authority: `rim cert` writes one for operators
//! without their own CA, and tests build valid and invalid chains with it.
//!
//! Keys are ECDSA P-256. Every leaf certificate is valid for both server
//! and client authentication, so one certificate per process serves its
//! listener and answers a server's request for a client certificate
//! (mutual TLS between nodes).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// A CA that signs leaf certificates. Its key lives only in memory.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM.
pub struct Leaf {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Authority> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(failed)?;
        Ok(Authority { issuer: CertifiedIssuer::self_signed(params, key).map_err(failed)? })
    }

    /// The CA's certificate (PEM): what the other side trusts.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses; the first
    /// is also its common name), signed by this CA.
    pub fn issue(&self, names: &[String]) -> Result<Leaf> {
        if names.is_empty() {
            return Err(Error::InvalidInput("a certificate needs at least one name".into()));
        }
        let mut params = CertificateParams::new(names.to_vec()).map_err(failed)?;
        params.distinguished_name = dn(&names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "rim");
    dn
}

fn failed(e: rcgen::Error) -> Error {
    Error::InvalidInput(format!("making a certificate: {e}"))
}
