//! `--secure`: a certificate authority and a server certificate made for the run (rcgen), an
//! admin token file, and a principal whose ACLs allow the benchmark topics, so the figures
//! include TLS and the per-call token and ACL checks.

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rill_client::{ConnectOptions, Connection};
use rill_proto::v1 as pb;

/// The files of a secured run, in a temp folder removed on drop.
pub struct Secure {
    dir: tempfile::TempDir,
    admin_token: String,
}

impl Secure {
    /// Makes the CA, the broker's certificate (for 127.0.0.1 and localhost) and the admin
    /// token file.
    pub fn new() -> Result<Secure> {
        let dir = tempfile::Builder::new()
            .prefix("rill-bench-tls.")
            .tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "rill-bench CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "rill-bench broker");
        let cert = server.signed_by(&key, &issuer)?;
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        std::fs::write(dir.path().join("server.pem"), cert.pem())?;
        std::fs::write(dir.path().join("server.key"), key.serialize_pem())?;
        // Random enough for a throwaway broker: the run's clock and process id.
        let admin_token = format!(
            "bench-admin-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        std::fs::write(dir.path().join("admin.token"), &admin_token)?;
        Ok(Secure { dir, admin_token })
    }

    /// The broker's flags.
    pub fn broker_args(&self) -> Vec<String> {
        let p = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            "--tls-cert".into(),
            p("server.pem"),
            "--tls-key".into(),
            p("server.key"),
            "--admin-token-file".into(),
            p("admin.token"),
        ]
    }

    /// Makes the principal `bench`, allowed every topic operation on topics starting with
    /// `rill-bench`, and returns the options of a client that uses its token.
    pub async fn client_options(&self, url: &str) -> Result<ConnectOptions> {
        let ca = self.dir.path().join("ca.pem");
        let admin = Connection::connect_with(
            url,
            &ConnectOptions::new().tls_ca(&ca).token(&self.admin_token),
        )
        .await
        .context("connecting as the admin")?;
        let mut security = admin.security();
        security
            .create_principal(pb::CreatePrincipalRequest {
                name: "bench".into(),
            })
            .await?;
        for op in [
            pb::Operation::Produce,
            pb::Operation::Consume,
            pb::Operation::Create,
            pb::Operation::Delete,
            pb::Operation::Describe,
        ] {
            security
                .add_acl(pb::AddAclRequest {
                    rule: Some(pb::AclRule {
                        principal: "bench".into(),
                        resource_type: pb::ResourceType::Topic as i32,
                        resource_name: "rill-bench".into(),
                        pattern_type: pb::PatternType::Prefix as i32,
                        operation: op as i32,
                        permission: pb::Permission::Allow as i32,
                    }),
                })
                .await?;
        }
        let token = security
            .create_token(pb::CreateTokenRequest {
                principal: "bench".into(),
                expires_in_ms: 0,
            })
            .await?
            .into_inner()
            .token;
        Ok(ConnectOptions::new().tls_ca(ca).token(token))
    }
}
