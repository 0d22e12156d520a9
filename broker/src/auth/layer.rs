//! [`AuthLayer`]: the one place where callers are authenticated, in front of every service.
//!
//! It looks the RPC path up in [`RPCS`]: health stays open, and reflection too unless
//! `open_reflection` is off; every `rill.v1` RPC needs an authenticated caller; the internal
//! replication service (`rill.v1.Raft`) accepts only brokers, which authenticate with the
//! cluster token. A path in no row is refused: a service added without a row cannot be
//! reached unauthenticated by accident. A caller is, in order: the bearer token in
//! `authorization`, else a verified client certificate's principal. The [`super::Caller`]
//! goes into the request's extensions for [`super::check`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::acl::{Operation, Resource};
use super::{tls, AuthMethod, Caller, Security};
use crate::error::BrokerError;

/// What an RPC needs from its caller before its own [`super::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: open to all (health, reflection).
    Open,
    /// An authenticated caller; the RPC checks its operation on its resource itself.
    Caller(Operation),
    /// The cluster's `admin`, checked here.
    ClusterAdmin,
    /// A peer broker (the cluster token), checked here.
    Broker,
}

/// Every service path prefix and RPC, with what it needs. The operation in a
/// [`Needs::Caller`] row is the one the RPC checks on its resource (documentation for the
/// matrix test and operators; the RPC's own check is what enforces it).
pub const RPCS: &[(&str, Needs)] = &[
    ("/grpc.health.v1.Health/", Needs::Open),
    ("/grpc.reflection.v1.ServerReflection/", Needs::Open),
    ("/grpc.reflection.v1alpha.ServerReflection/", Needs::Open),
    ("/rill.v1.Log/Produce", Needs::Caller(Operation::Produce)),
    (
        "/rill.v1.Log/ProduceStream",
        Needs::Caller(Operation::Produce),
    ),
    ("/rill.v1.Log/Fetch", Needs::Caller(Operation::Consume)),
    (
        "/rill.v1.Log/InitProducer",
        Needs::Caller(Operation::Produce),
    ),
    (
        "/rill.v1.Log/ListOffsets",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Admin/CreateTopic",
        Needs::Caller(Operation::Create),
    ),
    (
        "/rill.v1.Admin/DeleteTopic",
        Needs::Caller(Operation::Delete),
    ),
    (
        "/rill.v1.Admin/ListTopics",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Admin/DescribeTopic",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Groups/CommitOffsets",
        Needs::Caller(Operation::Consume),
    ),
    (
        "/rill.v1.Groups/FetchOffsets",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Groups/ListGroups",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Groups/DescribeGroup",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Groups/ResetGroupOffsets",
        Needs::Caller(Operation::Alter),
    ),
    (
        "/rill.v1.Groups/GroupHeartbeat",
        Needs::Caller(Operation::Consume),
    ),
    (
        "/rill.v1.Groups/DeleteGroup",
        Needs::Caller(Operation::Delete),
    ),
    (
        "/rill.v1.Subscriptions/Create",
        Needs::Caller(Operation::Create),
    ),
    (
        "/rill.v1.Subscriptions/List",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Subscriptions/Describe",
        Needs::Caller(Operation::Describe),
    ),
    (
        "/rill.v1.Subscriptions/Delete",
        Needs::Caller(Operation::Delete),
    ),
    (
        "/rill.v1.Subscriptions/Seek",
        Needs::Caller(Operation::Alter),
    ),
    (
        "/rill.v1.Subscriptions/Receive",
        Needs::Caller(Operation::Consume),
    ),
    (
        "/rill.v1.Subscriptions/Acknowledge",
        Needs::Caller(Operation::Consume),
    ),
    (
        "/rill.v1.Subscriptions/Subscribe",
        Needs::Caller(Operation::Consume),
    ),
    (
        "/rill.v1.Security/WhoAmI",
        Needs::Caller(Operation::Describe),
    ),
    ("/rill.v1.Security/", Needs::ClusterAdmin),
    ("/rill.v1.Raft/", Needs::Broker),
    // The cluster's shape (brokers, leaders) is what any client needs to route its calls.
    ("/rill.v1.Cluster/", Needs::Caller(Operation::Describe)),
];

/// Whether `path` is a gRPC reflection call (open by default, closed by
/// `open_reflection = false`).
pub fn is_reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.")
}

/// What `path` needs: the first row whose path equals it or, for a row ending in `/`,
/// starts it. `None`: no row, refused.
pub fn needs(path: &str) -> Option<Needs> {
    RPCS.iter()
        .find(|(p, _)| *p == path || (p.ends_with('/') && path.starts_with(p)))
        .map(|(_, n)| *n)
}

/// The tower layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    security: Option<Security>,
    open_reflection: bool,
}

impl AuthLayer {
    /// Authenticates against `security`; `None` lets every call through as anonymous.
    /// Reflection stays open to all with `open_reflection`, and otherwise needs an
    /// authenticated caller.
    pub fn new(security: Option<Security>, open_reflection: bool) -> Self {
        AuthLayer {
            security,
            open_reflection,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            security: self.security.clone().map(Arc::new),
            open_reflection: self.open_reflection,
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    security: Option<Arc<Security>>,
    open_reflection: bool,
}

/// The bearer token of a request's `authorization` header, if any.
fn bearer(req: &http::Request<Body>) -> Option<Result<&str, BrokerError>> {
    let value = req.headers().get(http::header::AUTHORIZATION)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                BrokerError::Unauthenticated(
                    "the authorization header must be `Bearer <token>`".into(),
                )
            }),
    )
}

/// Who sent `req`, or UNAUTHENTICATED.
fn authenticate(security: &Security, req: &http::Request<Body>) -> Result<Caller, BrokerError> {
    if let Some(token) = bearer(req) {
        let caller = security.authenticate_token(token?, rill_storage::log::now_ms())?;
        if caller.method == AuthMethod::Broker {
            // A peer forwarding its caller's request: that caller is checked here.
            let header = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
            if let Some(principal) = header(super::ON_BEHALF_OF) {
                return Ok(Caller {
                    principal: principal.to_string(),
                    method: AuthMethod::Forwarded,
                    superuser: header(super::ON_BEHALF_OF_SUPERUSER) == Some("1"),
                });
            }
        }
        return Ok(caller);
    }
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    if let Some(principal) = certs
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| tls::principal_of(c.as_ref()))
    {
        return Ok(Caller {
            principal,
            method: AuthMethod::Certificate,
            superuser: false,
        });
    }
    Err(BrokerError::Unauthenticated(
        "no credentials: send `authorization: Bearer <token>` or a client certificate".into(),
    ))
}

fn refuse(e: BrokerError) -> http::Response<Body> {
    tonic::Status::from(e).into_http()
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let Some(security) = self.security.as_deref().filter(|s| s.enabled()) else {
            req.extensions_mut().insert(Caller::anonymous());
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_string();
        let outcome = match needs(&path) {
            Some(Needs::Open) if !self.open_reflection && is_reflection(&path) => {
                authenticate(security, &req).map(Some)
            }
            Some(Needs::Open) => Ok(None),
            None => Err(BrokerError::Unauthenticated(format!(
                "{path} is not open to any caller"
            ))),
            Some(Needs::Caller(_)) => authenticate(security, &req).map(Some),
            Some(Needs::Broker) => authenticate(security, &req).and_then(|caller| {
                if caller.method == AuthMethod::Broker {
                    Ok(Some(caller))
                } else {
                    tracing::warn!(principal = %caller.principal, %path, "denied: only brokers may call the replication service");
                    Err(BrokerError::PermissionDenied {
                        principal: caller.principal,
                        operation: Operation::Admin,
                        resource: "the internal replication service (brokers only)".into(),
                    })
                }
            }),
            Some(Needs::ClusterAdmin) => authenticate(security, &req).and_then(|caller| {
                security
                    .authorize(&caller, Operation::Admin, &Resource::cluster())
                    .map(|()| Some(caller))
            }),
        };
        match outcome {
            Ok(caller) => {
                if let Some(caller) = caller {
                    req.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(req))
            }
            Err(e) => {
                if matches!(e, BrokerError::Unauthenticated(_)) {
                    tracing::info!(%path, reason = %e, "call refused: not authenticated");
                }
                Box::pin(std::future::ready(Ok(refuse(e))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_maps_to_what_it_needs() {
        assert_eq!(needs("/grpc.health.v1.Health/Check"), Some(Needs::Open));
        assert_eq!(
            needs("/rill.v1.Log/Produce"),
            Some(Needs::Caller(Operation::Produce))
        );
        assert_eq!(
            needs("/rill.v1.Log/ProduceStream"),
            Some(Needs::Caller(Operation::Produce))
        );
        assert_eq!(
            needs("/rill.v1.Security/WhoAmI"),
            Some(Needs::Caller(Operation::Describe))
        );
        assert_eq!(needs("/rill.v1.Security/AddAcl"), Some(Needs::ClusterAdmin));
        assert_eq!(needs("/rill.v1.Raft/AppendEntries"), Some(Needs::Broker));
        assert_eq!(
            needs("/rill.v1.Cluster/Metadata"),
            Some(Needs::Caller(Operation::Describe))
        );
        assert_eq!(needs("/rill.v1.Unknown/Call"), None);
        assert_eq!(needs("/rill.v1.Log/ProduceX"), None);
    }
}
