//! Certificates for TLS tests, made by the test with rcgen (no files committed).

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that signs server and client certificates, written as PEM files into `dir`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's PEM file.
    pub pem: PathBuf,
    dir: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate written into `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem())?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
            dir: dir.to_path_buf(),
        })
    }

    /// A certificate for `common_name` (and the names in `sans`), signed by this CA: its
    /// (certificate, key) PEM files.
    pub fn issue(&self, common_name: &str, sans: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{common_name}.crt"));
        let key_path = self.dir.join(format!("{common_name}.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}
