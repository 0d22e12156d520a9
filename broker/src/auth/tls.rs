//! TLS: the server's rustls config (through tonic) from PEM files, the acceptor that answers
//! refused connections, and the principal of a verified client certificate.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::SecurityConfig;

/// The server's TLS settings: tonic's config for the connections it serves, and an
/// acceptor with the same certificate for connections refused before tonic sees them (over
/// `max_connections`), so those get an answer a TLS client can read.
pub struct ServerTls {
    /// For tonic's server.
    pub tonic: ServerTlsConfig,
    /// For refusals (see `crate::connections`).
    pub refusals: TlsAcceptor,
}

/// Reads a PEM file off the async worker threads.
async fn read(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>> {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::read(&path))
        .await
        .context("reading a TLS file")?
        .with_context(|| format!("reading the {what} {shown}"))
}

/// The server's TLS settings, or `None` when no certificate and key are configured. With a
/// client CA, clients may present a certificate (it is verified against the CA); those
/// without one go on to authenticate with a token.
pub async fn server_config(config: &SecurityConfig) -> Result<Option<ServerTls>> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => return Ok(None),
        _ => anyhow::bail!("TLS needs both tls_cert and tls_key (PEM files); only one is set"),
    };
    let cert_pem = read(cert, "TLS certificate (tls_cert)").await?;
    let key_pem = read(key, "TLS private key (tls_key)").await?;
    let refusals = refusal_acceptor(&cert_pem, &key_pem).with_context(|| {
        format!(
            "loading the TLS certificate {} and key {}",
            cert.display(),
            key.display()
        )
    })?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    if let Some(ca) = &config.tls_client_ca {
        let ca_pem = read(ca, "client CA (tls_client_ca)").await?;
        tls = tls
            .client_ca_root(Certificate::from_pem(ca_pem))
            .client_auth_optional(true);
    }
    Ok(Some(ServerTls {
        tonic: tls,
        refusals,
    }))
}

/// A rustls acceptor with the server's certificate, speaking HTTP/2 (ALPN `h2`) as tonic's
/// does. It asks for no client certificate: a refused connection is never authenticated.
fn refusal_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("reading the private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("pairing the certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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
