//! `rill principal …`, `rill token …`, `rill acl …` and `rill whoami`.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use rill_proto::v1 as pb;
use serde_json::json;

use super::{parse_duration, print_json, print_table, Ctx, Output};
use crate::connection::Connection;
use crate::error::ClientError;

/// `rill principal …`.
#[derive(Debug, Subcommand)]
pub enum PrincipalCommand {
    /// Create a principal (a name tokens and rules refer to).
    #[command(after_help = "Example:\n  rill principal create billing")]
    Create {
        /// The name: [a-zA-Z0-9._@=,-]{1,249}.
        name: String,
    },
    /// List principals.
    #[command(after_help = "Example:\n  rill principal list")]
    List,
}

/// `rill token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a principal and print it, once: the broker keeps only its hash.
    #[command(
        after_help = "Example:\n  rill token create --principal billing --expires 30d\n  \
                      RILL_TOKEN=<the printed token> rill topic list"
    )]
    Create {
        /// The principal the token authenticates as.
        #[arg(long)]
        principal: String,
        /// Lifetime (30d, 12h) [default: never expires].
        #[arg(long, value_parser = parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// List tokens (ids, principals, expiry; never the tokens).
    #[command(after_help = "Example:\n  rill token list --principal billing")]
    List {
        /// Only this principal's tokens.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Revoke a token at once.
    #[command(after_help = "Example:\n  rill token revoke 3f9a1c0d2b4e6f80")]
    Revoke {
        /// The token's id (from `rill token list`).
        token_id: String,
    },
}

/// `rill acl …`.
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Add a rule.
    #[command(
        after_help = "Example:\n  rill acl add --principal billing --operation produce --topic 'orders.*'\n  \
                            rill acl add --principal '*' --operation consume --topic audit --deny\n  \
                            rill acl add --principal ops --operation admin --cluster"
    )]
    Add(AclArgs),
    /// List rules.
    #[command(after_help = "Example:\n  rill acl list --principal billing")]
    List {
        /// Only this principal's rules.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Remove a rule (give it as it was added).
    #[command(
        after_help = "Example:\n  rill acl remove --principal billing --operation produce --topic 'orders.*'"
    )]
    Remove(AclArgs),
}

/// A rule on the command line. A name ending in `*` is a prefix (`orders.*` matches
/// `orders.eu`); `*` alone matches every name.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("resource").required(true).args(["topic", "group", "subscription", "cluster"])))]
pub struct AclArgs {
    /// The principal, or `*` for every authenticated principal.
    #[arg(long)]
    pub principal: String,
    /// The operation: produce, consume, create, delete, describe, alter or admin.
    #[arg(long)]
    pub operation: String,
    /// A topic name, prefix (`orders.*`) or `*`.
    #[arg(long)]
    pub topic: Option<String>,
    /// A group name, prefix or `*`.
    #[arg(long)]
    pub group: Option<String>,
    /// A subscription name, prefix or `*`.
    #[arg(long)]
    pub subscription: Option<String>,
    /// The cluster (for `admin`).
    #[arg(long)]
    pub cluster: bool,
    /// Deny instead of allow (deny wins).
    #[arg(long)]
    pub deny: bool,
}

fn operation(s: &str) -> Result<pb::Operation> {
    Ok(match s {
        "produce" => pb::Operation::Produce,
        "consume" => pb::Operation::Consume,
        "create" => pb::Operation::Create,
        "delete" => pb::Operation::Delete,
        "describe" => pb::Operation::Describe,
        "alter" => pb::Operation::Alter,
        "admin" => pb::Operation::Admin,
        other => bail!(
            "unknown operation {other:?}: use produce, consume, create, delete, describe, \
             alter or admin"
        ),
    })
}

fn operation_name(op: i32) -> &'static str {
    match pb::Operation::try_from(op) {
        Ok(pb::Operation::Produce) => "produce",
        Ok(pb::Operation::Consume) => "consume",
        Ok(pb::Operation::Create) => "create",
        Ok(pb::Operation::Delete) => "delete",
        Ok(pb::Operation::Describe) => "describe",
        Ok(pb::Operation::Alter) => "alter",
        Ok(pb::Operation::Admin) => "admin",
        _ => "?",
    }
}

/// The wire rule of the command line's.
pub fn rule(args: &AclArgs) -> Result<pb::AclRule> {
    let (kind, name) = match (&args.topic, &args.group, &args.subscription, args.cluster) {
        (Some(t), _, _, _) => (pb::ResourceType::Topic, t.as_str()),
        (_, Some(g), _, _) => (pb::ResourceType::Group, g.as_str()),
        (_, _, Some(s), _) => (pb::ResourceType::Subscription, s.as_str()),
        _ => (pb::ResourceType::Cluster, "cluster"),
    };
    let (pattern, name) = match name.strip_suffix('*') {
        Some(prefix) if !prefix.is_empty() => (pb::PatternType::Prefix, prefix),
        _ => (pb::PatternType::Literal, name),
    };
    Ok(pb::AclRule {
        principal: args.principal.clone(),
        resource_type: kind as i32,
        resource_name: name.to_string(),
        pattern_type: pattern as i32,
        operation: operation(&args.operation)? as i32,
        permission: if args.deny {
            pb::Permission::Deny
        } else {
            pb::Permission::Allow
        } as i32,
    })
}

fn resource_text(r: &pb::AclRule) -> String {
    let kind = match pb::ResourceType::try_from(r.resource_type) {
        Ok(pb::ResourceType::Topic) => "topic",
        Ok(pb::ResourceType::Group) => "group",
        Ok(pb::ResourceType::Subscription) => "subscription",
        Ok(pb::ResourceType::Cluster) => return "cluster".into(),
        _ => "?",
    };
    let star = if r.pattern_type == pb::PatternType::Prefix as i32 {
        "*"
    } else {
        ""
    };
    format!("{kind}:{}{star}", r.resource_name)
}

fn status(e: tonic::Status) -> anyhow::Error {
    ClientError::broker(None, None, e).into()
}

/// Runs `rill principal …`.
pub async fn principal(conn: Connection, ctx: Ctx, command: PrincipalCommand) -> Result<()> {
    let mut client = conn.security();
    match command {
        PrincipalCommand::Create { name } => {
            client
                .create_principal(pb::CreatePrincipalRequest { name: name.clone() })
                .await
                .map_err(status)?;
            match ctx.output {
                Output::Json => print_json(&json!({ "principal": name })),
                Output::Table => {
                    println!("principal {name} created");
                    Ok(())
                }
            }
        }
        PrincipalCommand::List => {
            let names = client
                .list_principals(pb::ListPrincipalsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .names;
            match ctx.output {
                Output::Json => print_json(&json!(names)),
                Output::Table => {
                    let rows: Vec<Vec<String>> = names.into_iter().map(|n| vec![n]).collect();
                    print_table(&["PRINCIPAL"], &rows)
                }
            }
        }
    }
}

/// Runs `rill token …`.
pub async fn token(conn: Connection, ctx: Ctx, command: TokenCommand) -> Result<()> {
    let mut client = conn.security();
    match command {
        TokenCommand::Create { principal, expires } => {
            let expires_in_ms =
                expires.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let resp = client
                .create_token(pb::CreateTokenRequest {
                    principal,
                    expires_in_ms,
                })
                .await
                .map_err(status)?
                .into_inner();
            match ctx.output {
                Output::Json => print_json(&json!({
                    "token": resp.token,
                    "token_id": resp.token_id,
                    "expires_at_ms": resp.expires_at_ms,
                })),
                Output::Table => {
                    // The token alone on stdout, so `$(rill token create ...)` captures it;
                    // the rest on stderr.
                    println!("{}", resp.token);
                    eprintln!(
                        "token id {} (shown once: the broker keeps only its hash)",
                        resp.token_id
                    );
                    Ok(())
                }
            }
        }
        TokenCommand::List { principal } => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {
                    principal: principal.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            match ctx.output {
                Output::Json => print_json(&json!(tokens
                    .iter()
                    .map(|t| json!({
                        "token_id": t.token_id,
                        "principal": t.principal,
                        "created_at_ms": t.created_at_ms,
                        "expires_at_ms": t.expires_at_ms,
                        "revoked": t.revoked,
                    }))
                    .collect::<Vec<_>>())),
                Output::Table => {
                    let rows: Vec<Vec<String>> = tokens
                        .iter()
                        .map(|t| {
                            vec![
                                t.token_id.clone(),
                                t.principal.clone(),
                                time(t.created_at_ms),
                                if t.expires_at_ms == 0 {
                                    "never".into()
                                } else {
                                    time(t.expires_at_ms)
                                },
                                if t.revoked { "revoked" } else { "active" }.into(),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "PRINCIPAL", "CREATED", "EXPIRES", "STATE"], &rows)
                }
            }
        }
        TokenCommand::Revoke { token_id } => {
            client
                .revoke_token(pb::RevokeTokenRequest {
                    token_id: token_id.clone(),
                })
                .await
                .map_err(status)?;
            match ctx.output {
                Output::Json => print_json(&json!({ "revoked": token_id })),
                Output::Table => {
                    println!("token {token_id} revoked");
                    Ok(())
                }
            }
        }
    }
}

fn time(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Runs `rill acl …`.
pub async fn acl(conn: Connection, ctx: Ctx, command: AclCommand) -> Result<()> {
    let mut client = conn.security();
    match command {
        AclCommand::Add(args) => {
            let rule = rule(&args)?;
            client
                .add_acl(pb::AddAclRequest { rule: Some(rule) })
                .await
                .map_err(status)?;
            match ctx.output {
                Output::Json => print_json(&json!({ "added": true })),
                Output::Table => {
                    println!("rule added");
                    Ok(())
                }
            }
        }
        AclCommand::Remove(args) => {
            let rule = rule(&args)?;
            let removed = client
                .remove_acl(pb::RemoveAclRequest { rule: Some(rule) })
                .await
                .map_err(status)?
                .into_inner()
                .removed;
            match ctx.output {
                Output::Json => print_json(&json!({ "removed": removed })),
                Output::Table => {
                    println!("{removed} rule(s) removed");
                    Ok(())
                }
            }
        }
        AclCommand::List { principal } => {
            let rules = client
                .list_acls(pb::ListAclsRequest {
                    principal: principal.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .rules;
            let rows: Vec<Vec<String>> = rules
                .iter()
                .map(|r| {
                    vec![
                        r.principal.clone(),
                        operation_name(r.operation).into(),
                        resource_text(r),
                        if r.permission == pb::Permission::Deny as i32 {
                            "deny"
                        } else {
                            "allow"
                        }
                        .into(),
                    ]
                })
                .collect();
            match ctx.output {
                Output::Json => print_json(&json!(rows
                    .iter()
                    .map(|r| json!({
                        "principal": r[0],
                        "operation": r[1],
                        "resource": r[2],
                        "permission": r[3],
                    }))
                    .collect::<Vec<_>>())),
                Output::Table => {
                    print_table(&["PRINCIPAL", "OPERATION", "RESOURCE", "PERMISSION"], &rows)
                }
            }
        }
    }
}

/// Runs `rill whoami`.
pub async fn whoami(conn: Connection, ctx: Ctx) -> Result<()> {
    let resp = conn
        .security()
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match ctx.output {
        Output::Json => print_json(&json!({ "principal": resp.principal, "method": resp.method })),
        Output::Table => {
            println!("{} ({})", resp.principal, resp.method);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(topic: &str) -> AclArgs {
        AclArgs {
            principal: "app".into(),
            operation: "produce".into(),
            topic: Some(topic.into()),
            group: None,
            subscription: None,
            cluster: false,
            deny: false,
        }
    }

    #[test]
    fn a_trailing_star_is_a_prefix_and_a_lone_star_every_name() {
        let r = rule(&args("orders.*")).expect("rule");
        assert_eq!(r.pattern_type, pb::PatternType::Prefix as i32);
        assert_eq!(r.resource_name, "orders.");
        let r = rule(&args("*")).expect("rule");
        assert_eq!(r.pattern_type, pb::PatternType::Literal as i32);
        assert_eq!(r.resource_name, "*");
        assert_eq!(
            resource_text(&rule(&args("orders.*")).expect("rule")),
            "topic:orders.*"
        );
        let mut bad = args("t");
        bad.operation = "write".into();
        assert!(rule(&bad).is_err());
    }
}
