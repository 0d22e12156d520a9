//! Client-side security: TLS settings ([`ConnectOptions`]) and the bearer token added to
//! every call ([`Auth`]).

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use crate::error::{ClientError, Result};

/// How to reach a broker that serves TLS and wants credentials.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// CA certificates (PEM) to trust for the broker's certificate. Setting it turns TLS on.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate chain (PEM), for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The bearer token sent in `authorization` on every call.
    pub token: Option<String>,
}

impl ConnectOptions {
    /// No TLS, no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in this PEM file (turns TLS on).
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Presents this client certificate and key (PEM files) for mutual TLS.
    pub fn tls_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_cert = Some(cert.into());
        self.tls_key = Some(key.into());
        self
    }

    /// Sends this bearer token on every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The TLS config, or `None` without a CA.
    pub(crate) async fn tls_config(&self, addr: &str) -> Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(bad(addr, "a client certificate needs --tls-ca too".into()));
            }
            return Ok(None);
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(addr, ca, "TLS CA file").await?));
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read(addr, cert, "client certificate").await?,
                    read(addr, key, "client key").await?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    addr,
                    "mutual TLS needs both a client certificate and its key".into(),
                ))
            }
        }
        Ok(Some(tls))
    }
}

fn bad(addr: &str, message: String) -> ClientError {
    ClientError::BadAddress {
        addr: addr.to_string(),
        message,
    }
}

async fn read(addr: &str, path: &Path, what: &str) -> Result<Vec<u8>> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::read(p))
        .await
        .map_err(|e| bad(addr, format!("reading the {what}: {e}")))?
        .map_err(|e| bad(addr, format!("reading the {what} {}: {e}", path.display())))
}

/// Adds `authorization: Bearer <token>` to every call, when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    /// With `token`, or nothing. A token that is not printable ASCII is refused.
    pub fn new(token: Option<&str>) -> std::result::Result<Auth, String> {
        let header = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "the token must be printable ASCII".to_string())
            })
            .transpose()?;
        Ok(Auth { header })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}
