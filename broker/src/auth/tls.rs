//! TLS: the server's rustls config (through tonic) from PEM files, and the principal of a
//! verified client certificate.

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::SecurityConfig;

/// The server's TLS config, or `None` when no certificate and key are configured. With a
/// client CA, clients may present a certificate (it is verified against the CA); those
/// without one go on to authenticate with a token.
pub async fn server_config(config: &SecurityConfig) -> Result<Option<ServerTlsConfig>> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => return Ok(None),
        _ => anyhow::bail!("TLS needs both tls_cert and tls_key (PEM files); only one is set"),
    };
    let read = |path: std::path::PathBuf, what: &'static str| async move {
        let shown = path.display().to_string();
        tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .context("reading a TLS file")?
            .with_context(|| format!("reading the {what} {shown}"))
    };
    let cert_pem = read(cert.clone(), "TLS certificate (tls_cert)").await?;
    let key_pem = read(key.clone(), "TLS private key (tls_key)").await?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    if let Some(ca) = &config.tls_client_ca {
        let ca_pem = read(ca.clone(), "client CA (tls_client_ca)").await?;
        tls = tls
            .client_ca_root(Certificate::from_pem(ca_pem))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// The principal of a client certificate (DER): its subject's common name, or the whole
/// subject when it has none. `None` when the certificate does not parse (it was verified
/// by rustls already, so this does not happen in practice).
pub fn principal_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.or_else(|| Some(subject.to_string()))
        .filter(|s| !s.is_empty())
}
