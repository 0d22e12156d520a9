//! `rill.v1.Security`: principals, tokens and ACLs. The layer already required the cluster's
//! `admin` for every RPC here but WhoAmI. Every change is written to the audit log.

use rill_proto::v1 as pb;
use rill_proto::v1::security_server::Security as SecurityRpc;
use tonic::{Request, Response, Status};

use crate::auth::acl::{AclRule, Operation, Pattern, Permission, Resource, ResourceType};
use crate::auth::{self, Security};
use crate::error::BrokerError;
use crate::internal::{self, Route};
use crate::state::Broker;
use rill_cluster::network::PeerChannel;
use rill_proto::v1::security_client::SecurityClient;

/// The Security service.
#[derive(Debug, Clone)]
pub struct SecurityService {
    broker: Broker,
    security: Security,
}

impl SecurityService {
    /// A service over the broker's security state.
    pub fn new(broker: Broker, security: Security) -> Self {
        SecurityService { broker, security }
    }

    /// A client to the broker that writes the security state when that is another one (in
    /// a cluster, the leader of `__security`); `None` when it is this one. The caller was
    /// authorized here; the leader trusts this broker's cluster token.
    fn writer_elsewhere(&self) -> Result<Option<SecurityClient<PeerChannel>>, BrokerError> {
        match internal::route(&self.broker, auth::SECURITY_TOPIC, 0)? {
            Route::Here => Ok(None),
            Route::Leader(address) => Ok(Some(SecurityClient::new(internal::channel(
                &self.broker,
                &address,
            )?))),
        }
    }

    /// The admin caller, for the audit line (the layer checked it already; checked again
    /// so the service is safe without the layer too).
    fn admin<T>(&self, request: &Request<T>) -> Result<auth::Caller, BrokerError> {
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Admin,
            Resource::cluster(),
        )
    }
}

/// The wire form of a rule into the broker's, INVALID_ARGUMENT on unset enums.
pub fn rule_from_pb(rule: Option<pb::AclRule>) -> Result<AclRule, BrokerError> {
    let r = rule.ok_or_else(|| BrokerError::invalid("the request has no rule"))?;
    let resource_type = match pb::ResourceType::try_from(r.resource_type) {
        Ok(pb::ResourceType::Topic) => ResourceType::Topic,
        Ok(pb::ResourceType::Group) => ResourceType::Group,
        Ok(pb::ResourceType::Subscription) => ResourceType::Subscription,
        Ok(pb::ResourceType::Cluster) => ResourceType::Cluster,
        _ => return Err(BrokerError::invalid("the rule needs a resource type")),
    };
    let pattern = match pb::PatternType::try_from(r.pattern_type) {
        Ok(pb::PatternType::Literal) => Pattern::Literal,
        Ok(pb::PatternType::Prefix) => Pattern::Prefix,
        _ => return Err(BrokerError::invalid("the rule needs a pattern type")),
    };
    let operation = match pb::Operation::try_from(r.operation) {
        Ok(pb::Operation::Produce) => Operation::Produce,
        Ok(pb::Operation::Consume) => Operation::Consume,
        Ok(pb::Operation::Create) => Operation::Create,
        Ok(pb::Operation::Delete) => Operation::Delete,
        Ok(pb::Operation::Describe) => Operation::Describe,
        Ok(pb::Operation::Alter) => Operation::Alter,
        Ok(pb::Operation::Admin) => Operation::Admin,
        _ => return Err(BrokerError::invalid("the rule needs an operation")),
    };
    let permission = match pb::Permission::try_from(r.permission) {
        Ok(pb::Permission::Allow) => Permission::Allow,
        Ok(pb::Permission::Deny) => Permission::Deny,
        _ => return Err(BrokerError::invalid("the rule needs a permission")),
    };
    let rule = AclRule {
        principal: r.principal,
        resource_type,
        resource_name: r.resource_name,
        pattern,
        operation,
        permission,
    };
    rule.validate().map_err(BrokerError::invalid)?;
    Ok(rule)
}

/// The broker's form of a rule into the wire's.
pub fn rule_to_pb(r: &AclRule) -> pb::AclRule {
    pb::AclRule {
        principal: r.principal.clone(),
        resource_type: match r.resource_type {
            ResourceType::Topic => pb::ResourceType::Topic,
            ResourceType::Group => pb::ResourceType::Group,
            ResourceType::Subscription => pb::ResourceType::Subscription,
            ResourceType::Cluster => pb::ResourceType::Cluster,
        } as i32,
        resource_name: r.resource_name.clone(),
        pattern_type: match r.pattern {
            Pattern::Literal => pb::PatternType::Literal,
            Pattern::Prefix => pb::PatternType::Prefix,
        } as i32,
        operation: match r.operation {
            Operation::Produce => pb::Operation::Produce,
            Operation::Consume => pb::Operation::Consume,
            Operation::Create => pb::Operation::Create,
            Operation::Delete => pb::Operation::Delete,
            Operation::Describe => pb::Operation::Describe,
            Operation::Alter => pb::Operation::Alter,
            Operation::Admin => pb::Operation::Admin,
        } as i32,
        permission: match r.permission {
            Permission::Allow => pb::Permission::Allow,
            Permission::Deny => pb::Permission::Deny,
        } as i32,
    }
}

fn describe_rule(r: &AclRule) -> String {
    format!(
        "{:?} {} {} {}{} {:?}",
        r.permission,
        r.principal,
        r.operation,
        r.resource_type.name(),
        match r.pattern {
            Pattern::Literal => "",
            Pattern::Prefix => " prefix",
        },
        r.resource_name
    )
}

#[tonic::async_trait]
impl SecurityRpc for SecurityService {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = auth::caller(&self.broker, request.extensions())?;
        Ok(Response::new(pb::WhoAmIResponse {
            principal: caller.principal,
            method: caller.method.name().to_string(),
        }))
    }

    async fn create_principal(
        &self,
        request: Request<pb::CreatePrincipalRequest>,
    ) -> Result<Response<pb::CreatePrincipalResponse>, Status> {
        let caller = self.admin(&request)?;
        if let Some(mut leader) = self.writer_elsewhere()? {
            return internal::relayed(leader.create_principal(request.into_inner()).await);
        }
        let name = request.into_inner().name;
        self.security.create_principal(&self.broker, &name).await?;
        tracing::info!(target: "rill::audit", by = %caller.principal, principal = %name, "principal created");
        Ok(Response::new(pb::CreatePrincipalResponse {}))
    }

    async fn list_principals(
        &self,
        request: Request<pb::ListPrincipalsRequest>,
    ) -> Result<Response<pb::ListPrincipalsResponse>, Status> {
        self.admin(&request)?;
        Ok(Response::new(pb::ListPrincipalsResponse {
            names: self.security.principals(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = self.admin(&request)?;
        if let Some(mut leader) = self.writer_elsewhere()? {
            return internal::relayed(leader.create_token(request.into_inner()).await);
        }
        let req = request.into_inner();
        let (token, entry) = self
            .security
            .create_token(
                &self.broker,
                &req.principal,
                req.expires_in_ms,
                rill_storage::log::now_ms(),
            )
            .await?;
        tracing::info!(
            target: "rill::audit",
            by = %caller.principal,
            principal = %entry.principal,
            token_id = %entry.id,
            expires_at_ms = entry.expires_at_ms,
            "token created"
        );
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            token_id: entry.id,
            expires_at_ms: entry.expires_at_ms,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.admin(&request)?;
        let tokens = self
            .security
            .tokens(&request.get_ref().principal)
            .into_iter()
            .map(|t| pb::TokenInfo {
                token_id: t.id,
                principal: t.principal,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
                revoked: t.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = self.admin(&request)?;
        if let Some(mut leader) = self.writer_elsewhere()? {
            return internal::relayed(leader.revoke_token(request.into_inner()).await);
        }
        let id = request.into_inner().token_id;
        self.security.revoke_token(&self.broker, &id).await?;
        tracing::info!(target: "rill::audit", by = %caller.principal, token_id = %id, "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn add_acl(
        &self,
        request: Request<pb::AddAclRequest>,
    ) -> Result<Response<pb::AddAclResponse>, Status> {
        let caller = self.admin(&request)?;
        if let Some(mut leader) = self.writer_elsewhere()? {
            return internal::relayed(leader.add_acl(request.into_inner()).await);
        }
        let rule = rule_from_pb(request.into_inner().rule)?;
        let text = describe_rule(&rule);
        self.security.add_acl(&self.broker, rule).await?;
        tracing::info!(target: "rill::audit", by = %caller.principal, rule = %text, "acl added");
        Ok(Response::new(pb::AddAclResponse {}))
    }

    async fn list_acls(
        &self,
        request: Request<pb::ListAclsRequest>,
    ) -> Result<Response<pb::ListAclsResponse>, Status> {
        self.admin(&request)?;
        let rules = self
            .security
            .acls(&request.get_ref().principal)
            .iter()
            .map(rule_to_pb)
            .collect();
        Ok(Response::new(pb::ListAclsResponse { rules }))
    }

    async fn remove_acl(
        &self,
        request: Request<pb::RemoveAclRequest>,
    ) -> Result<Response<pb::RemoveAclResponse>, Status> {
        let caller = self.admin(&request)?;
        if let Some(mut leader) = self.writer_elsewhere()? {
            return internal::relayed(leader.remove_acl(request.into_inner()).await);
        }
        let rule = rule_from_pb(request.into_inner().rule)?;
        let text = describe_rule(&rule);
        let removed = self.security.remove_acl(&self.broker, rule).await?;
        tracing::info!(target: "rill::audit", by = %caller.principal, rule = %text, removed, "acl removed");
        Ok(Response::new(pb::RemoveAclResponse { removed }))
    }
}
