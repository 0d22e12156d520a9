//! Security: who a caller is (bearer tokens, client certificates), what it may do (ACLs), and
//! where that state lives (the internal `__security` topic). `docs/SECURITY.md` describes it
//! for operators.
//!
//! # Where the checks happen
//! Authentication happens in one place, [`layer::AuthLayer`], a tower layer in front of every
//! service: it maps each RPC path to what it needs (open, any authenticated caller, the
//! cluster's `admin`, or a peer broker), refuses a missing or bad credential with
//! UNAUTHENTICATED, and puts the [`Caller`] into the request's extensions. Authorization
//! needs the resource, which is in the request body (a topic name, a group), so the layer
//! does not decode bodies: each RPC calls [`check`] first thing, through one helper, with its
//! operation and resource. The table of every RPC's operation is [`layer::RPCS`]; the
//! end-to-end matrix test runs every RPC of the contract against it.
//!
//! # Modules
//! - [`acl`]: rules and the allow/deny decision.
//! - [`records`]: the `__security` topic's record codec.
//! - [`state`]: principals, token hashes and rules, replayed from the topic and appended to.
//! - [`layer`]: the authenticating tower layer and the RPC table.
//! - [`tls`]: the server's TLS config and a certificate's principal.

pub mod acl;
pub mod layer;
pub mod records;
pub mod state;
pub mod tls;

use std::path::PathBuf;

pub use acl::{AclRule, Operation, Resource, ResourceType};
pub use state::Security;

use crate::error::BrokerError;
use crate::state::Broker;

/// The name of the internal topic that holds the security state.
pub const SECURITY_TOPIC: &str = "__security";
/// The principal of the bootstrap admin token.
pub const ADMIN_PRINCIPAL: &str = "admin";
/// The principal of a peer broker (authenticated by the cluster token).
pub const BROKER_PRINCIPAL: &str = "broker";
/// The principal every caller is when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// A secret that never shows in `Debug` output (configs are logged).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The security settings of a broker.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// The server's certificate chain (PEM). With `tls_key`, the broker serves TLS only.
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates. When set, a client may present
    /// a certificate; a verified one's subject common name is its principal.
    pub tls_client_ca: Option<PathBuf>,
    /// Whether callers must authenticate. Turned on by `auth = true` or by configuring an
    /// admin token.
    pub auth: bool,
    /// The bootstrap admin token (from `RILL_ADMIN_TOKEN` or `admin_token_file`).
    pub admin_token: Option<Secret>,
    /// Allows a non-loopback listen address with authentication off.
    pub insecure_no_auth: bool,
    /// Whether gRPC reflection stays open to unauthenticated callers when authentication is
    /// on (it lists the services and message types, nothing else). `false` makes it need an
    /// authenticated caller. Default true.
    pub open_reflection: bool,
    /// The cluster token (from `RILL_CLUSTER_TOKEN` or `cluster_token_file`): brokers of a
    /// cluster send it to each other, and only it opens the internal replication service.
    pub cluster_token: Option<Secret>,
    /// CA certificates (PEM) that signed the peer brokers' certificates, for broker-to-broker
    /// TLS; `tls_client_ca` when not set.
    pub tls_peer_ca: Option<PathBuf>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth: false,
            admin_token: None,
            insecure_no_auth: false,
            open_reflection: true,
            cluster_token: None,
            tls_peer_ca: None,
        }
    }
}

impl SecurityConfig {
    /// Whether TLS is configured.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// Authentication is off.
    None,
    /// A token created through the Security service.
    Token,
    /// The bootstrap admin token.
    AdminToken,
    /// A verified client certificate.
    Certificate,
    /// The cluster token: a peer broker.
    Broker,
    /// A peer broker forwarding its own caller's request (see [`ON_BEHALF_OF`]).
    Forwarded,
}

/// The metadata key in which a broker forwarding a request names its caller's principal.
/// Honoured only on calls that carry the cluster token, so only brokers can act for others.
pub const ON_BEHALF_OF: &str = "rill-on-behalf-of";
/// The metadata key, beside [`ON_BEHALF_OF`], that marks the forwarded caller a superuser
/// (the admin token, or authentication off at the forwarding broker).
pub const ON_BEHALF_OF_SUPERUSER: &str = "rill-on-behalf-of-superuser";

impl AuthMethod {
    /// The lowercase name, as WhoAmI reports it.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Token => "token",
            AuthMethod::AdminToken => "admin-token",
            AuthMethod::Certificate => "certificate",
            AuthMethod::Broker => "broker",
            AuthMethod::Forwarded => "forwarded",
        }
    }
}

/// An authenticated caller, as the layer puts it into a request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The principal's name.
    pub principal: String,
    /// How it authenticated.
    pub method: AuthMethod,
    /// The admin token and callers with authentication off may do everything.
    pub superuser: bool,
}

impl Caller {
    /// The caller when authentication is off.
    pub fn anonymous() -> Self {
        Caller {
            principal: ANONYMOUS.to_string(),
            method: AuthMethod::None,
            superuser: true,
        }
    }
}

/// The one authorization helper every RPC calls first: the caller the layer authenticated
/// may do `op` on `resource`, or the call fails PERMISSION_DENIED (UNAUTHENTICATED when no
/// caller is attached while authentication is on). Returns the caller.
pub fn check(
    broker: &Broker,
    extensions: &tonic::Extensions,
    op: Operation,
    resource: Resource,
) -> Result<Caller, BrokerError> {
    let caller = caller(broker, extensions)?;
    if let Some(security) = broker.security() {
        security.authorize(&caller, op, &resource)?;
    }
    Ok(caller)
}

/// The caller attached by the layer: anonymous when authentication is off, UNAUTHENTICATED
/// when it is on and none is attached.
pub fn caller(broker: &Broker, extensions: &tonic::Extensions) -> Result<Caller, BrokerError> {
    match (extensions.get::<Caller>(), broker.security()) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(s)) if s.enabled() => Err(BrokerError::Unauthenticated(
            "no credentials: send `authorization: Bearer <token>`".into(),
        )),
        (None, _) => Ok(Caller::anonymous()),
    }
}
