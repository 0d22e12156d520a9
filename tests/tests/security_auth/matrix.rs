//! The RPC matrix of `security_auth.rs`: every RPC of the contract, a call of each that
//! succeeds for an allowed caller, and a snapshot of what any of them could change.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use prost::Message;
use rill_client::Connection;
use rill_proto::v1 as pb;
use rill_tests::{produce_req, record};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::rule;

/// What a call answered, beyond success or a status.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    /// A list RPC, with how many entries it listed.
    Listed(usize),
}

/// Every RPC of the contract but health and reflection, as `/package.Service/Method`.
/// The services a single broker serves. `rill.v1.Raft` and `rill.v1.Cluster` exist only in a
/// cluster (started with `--node-id`/`--peers`); the broker's path table covers them (unit
/// tests in `rill_broker::auth::layer`).
pub(crate) fn single_broker_service(path: &str) -> bool {
    !path.starts_with("/rill.v1.Raft/") && !path.starts_with("/rill.v1.Cluster/")
}

pub(crate) fn contract_rpcs() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(rill_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    fds.file
        .iter()
        .flat_map(|f| {
            let pkg = f.package().to_string();
            f.service.iter().flat_map(move |s| {
                let pkg = pkg.clone();
                s.method
                    .iter()
                    .map(move |m| format!("/{pkg}.{}/{}", s.name(), m.name()))
            })
        })
        .filter(|path| single_broker_service(path))
        .collect()
}

/// The RPCs the matrix calls; a new RPC of the contract must be added here (and to the
/// broker's table in `rill_broker::auth::layer::RPCS`).
pub(crate) const MATRIX: &[&str] = &[
    "/rill.v1.Log/Produce",
    "/rill.v1.Log/ProduceStream",
    "/rill.v1.Log/Fetch",
    "/rill.v1.Log/ListOffsets",
    "/rill.v1.Log/InitProducer",
    "/rill.v1.Admin/CreateTopic",
    "/rill.v1.Admin/DeleteTopic",
    "/rill.v1.Admin/ListTopics",
    "/rill.v1.Admin/DescribeTopic",
    "/rill.v1.Groups/CommitOffsets",
    "/rill.v1.Groups/FetchOffsets",
    "/rill.v1.Groups/ListGroups",
    "/rill.v1.Groups/DescribeGroup",
    "/rill.v1.Groups/ResetGroupOffsets",
    "/rill.v1.Groups/GroupHeartbeat",
    "/rill.v1.Groups/DeleteGroup",
    "/rill.v1.Subscriptions/Create",
    "/rill.v1.Subscriptions/List",
    "/rill.v1.Subscriptions/Describe",
    "/rill.v1.Subscriptions/Delete",
    "/rill.v1.Subscriptions/Seek",
    "/rill.v1.Subscriptions/Receive",
    "/rill.v1.Subscriptions/Acknowledge",
    "/rill.v1.Subscriptions/Subscribe",
    "/rill.v1.Security/WhoAmI",
    "/rill.v1.Security/CreatePrincipal",
    "/rill.v1.Security/ListPrincipals",
    "/rill.v1.Security/CreateToken",
    "/rill.v1.Security/ListTokens",
    "/rill.v1.Security/RevokeToken",
    "/rill.v1.Security/AddAcl",
    "/rill.v1.Security/ListAcls",
    "/rill.v1.Security/RemoveAcl",
];

/// Calls `rpc` with a request that succeeds for a caller allowed to make it.
pub(crate) async fn call(
    c: &Connection,
    rpc: &str,
    spare_token_id: &str,
) -> Result<Outcome, Status> {
    use Outcome::*;
    let dummy = || {
        rule(
            "bob",
            pb::ResourceType::Topic,
            "nothing",
            pb::Operation::Describe,
        )
    };
    match rpc {
        "/rill.v1.Log/Produce" => {
            c.log()
                .produce(produce_req(
                    "t",
                    Some(0),
                    vec![record(None, "x", None, &[])],
                ))
                .await?;
        }
        "/rill.v1.Log/ProduceStream" => {
            let req = pb::ProduceStreamRequest {
                sequence: 1,
                request: Some(produce_req(
                    "t",
                    Some(0),
                    vec![record(None, "x", None, &[])],
                )),
            };
            let mut out = c
                .log()
                .produce_stream(tokio_stream::iter(vec![req]))
                .await?
                .into_inner();
            let ack = out
                .message()
                .await?
                .ok_or_else(|| Status::internal("no ack"))?;
            if let Some(code) = ack.error_code {
                return Err(Status::new(Code::from(code), ack.error_message));
            }
        }
        "/rill.v1.Log/Fetch" => {
            c.log()
                .fetch(pb::FetchRequest {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    max_wait_ms: 0,
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Log/ListOffsets" => {
            c.log()
                .list_offsets(pb::ListOffsetsRequest {
                    topic: "t".into(),
                    partition: 0,
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Log/InitProducer" => {
            c.log()
                .init_producer(pb::InitProducerRequest {
                    producer_name: None,
                })
                .await?;
        }
        "/rill.v1.Admin/CreateTopic" => {
            c.admin()
                .create_topic(pb::CreateTopicRequest {
                    name: "created".into(),
                    config: None,
                    replication_factor: None,
                })
                .await?;
        }
        "/rill.v1.Admin/DeleteTopic" => {
            c.admin()
                .delete_topic(pb::DeleteTopicRequest {
                    name: "doomed".into(),
                })
                .await?;
        }
        "/rill.v1.Admin/ListTopics" => {
            let r = c.admin().list_topics(pb::ListTopicsRequest {}).await?;
            return Ok(Listed(r.into_inner().topics.len()));
        }
        "/rill.v1.Admin/DescribeTopic" => {
            c.admin()
                .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
                .await?;
        }
        "/rill.v1.Groups/CommitOffsets" => {
            c.groups()
                .commit_offsets(pb::CommitOffsetsRequest {
                    group: "g".into(),
                    topic: "t".into(),
                    offsets: vec![pb::PartitionOffset {
                        partition: 0,
                        offset: 0,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Groups/FetchOffsets" => {
            c.groups()
                .fetch_offsets(pb::FetchOffsetsRequest {
                    group: "g".into(),
                    topic: "t".into(),
                    partitions: vec![],
                })
                .await?;
        }
        "/rill.v1.Groups/ListGroups" => {
            let r = c.groups().list_groups(pb::ListGroupsRequest {}).await?;
            return Ok(Listed(r.into_inner().groups.len()));
        }
        "/rill.v1.Groups/DescribeGroup" => {
            c.groups()
                .describe_group(pb::DescribeGroupRequest { group: "g".into() })
                .await?;
        }
        "/rill.v1.Groups/ResetGroupOffsets" => {
            c.groups()
                .reset_group_offsets(pb::ResetGroupOffsetsRequest {
                    group: "g".into(),
                    topic: "t".into(),
                    target: Some(pb::reset_group_offsets_request::Target::ToEarliest(true)),
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Groups/GroupHeartbeat" => {
            c.groups()
                .group_heartbeat(pb::GroupHeartbeatRequest {
                    group: "members".into(),
                    member_epoch: 0,
                    subscribed_topics: Some(pb::TopicList {
                        topics: vec!["t".into()],
                    }),
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Groups/DeleteGroup" => {
            c.groups()
                .delete_group(pb::DeleteGroupRequest {
                    group: "doomed-group".into(),
                })
                .await?;
        }
        "/rill.v1.Subscriptions/Create" => {
            c.subscriptions()
                .create(pb::CreateSubscriptionRequest {
                    name: "created-sub".into(),
                    config: Some(pb::SubscriptionConfig {
                        topic: "t".into(),
                        ..Default::default()
                    }),
                    start: 0,
                })
                .await?;
        }
        "/rill.v1.Subscriptions/List" => {
            let r = c
                .subscriptions()
                .list(pb::ListSubscriptionsRequest {})
                .await?;
            return Ok(Listed(r.into_inner().subscriptions.len()));
        }
        "/rill.v1.Subscriptions/Describe" => {
            c.subscriptions()
                .describe(pb::DescribeSubscriptionRequest { name: "sub".into() })
                .await?;
        }
        "/rill.v1.Subscriptions/Delete" => {
            c.subscriptions()
                .delete(pb::DeleteSubscriptionRequest {
                    name: "doomed-sub".into(),
                })
                .await?;
        }
        "/rill.v1.Subscriptions/Seek" => {
            c.subscriptions()
                .seek(pb::SeekSubscriptionRequest {
                    name: "sub".into(),
                    target: Some(pb::seek_subscription_request::Target::ToOffset(0)),
                    partition: None,
                })
                .await?;
        }
        "/rill.v1.Subscriptions/Receive" => {
            c.subscriptions()
                .receive(pb::ReceiveRequest {
                    subscription: "sub".into(),
                    consumer_id: "c".into(),
                    max_records: 1,
                    max_wait_ms: 0,
                    max_bytes: 0,
                })
                .await?;
        }
        "/rill.v1.Subscriptions/Acknowledge" => {
            // Receives on its own subscription first, so there is a record to ack.
            let got = c
                .subscriptions()
                .receive(pb::ReceiveRequest {
                    subscription: "ack-sub".into(),
                    consumer_id: "c".into(),
                    max_records: 1,
                    max_wait_ms: 1_000,
                    max_bytes: 0,
                })
                .await?
                .into_inner()
                .records;
            let offset = got
                .first()
                .and_then(|r| r.record.as_ref())
                .map(|r| r.offset)
                .ok_or_else(|| Status::internal("nothing received to ack"))?;
            c.subscriptions()
                .acknowledge(pb::AcknowledgeRequest {
                    subscription: "ack-sub".into(),
                    consumer_id: "c".into(),
                    ranges: vec![pb::AckRange {
                        partition: 0,
                        first_offset: offset,
                        last_offset: offset,
                    }],
                    r#type: pb::AckType::Ack as i32,
                    ..Default::default()
                })
                .await?;
        }
        "/rill.v1.Subscriptions/Subscribe" => {
            let start = pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Start(pb::SubscribeStart {
                    target: Some(pb::subscribe_start::Target::Subscription("push-sub".into())),
                    consumer_id: "c".into(),
                })),
            };
            let credits = pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Credits(pb::Credits {
                    records: 1,
                    bytes: 1 << 20,
                })),
            };
            let mut out = c
                .subscriptions()
                .subscribe(tokio_stream::iter(vec![start, credits]).chain(tokio_stream::pending()))
                .await?
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), out.message())
                .await
                .map_err(|_| Status::internal("nothing pushed"))??;
            if !matches!(
                first.and_then(|m| m.kind),
                Some(pb::subscribe_response::Kind::Record(_))
            ) {
                return Err(Status::internal("no record pushed"));
            }
        }
        "/rill.v1.Security/WhoAmI" => {
            c.security().who_am_i(pb::WhoAmIRequest {}).await?;
        }
        "/rill.v1.Security/CreatePrincipal" => {
            c.security()
                .create_principal(pb::CreatePrincipalRequest {
                    name: "carol".into(),
                })
                .await?;
        }
        "/rill.v1.Security/ListPrincipals" => {
            let r = c
                .security()
                .list_principals(pb::ListPrincipalsRequest {})
                .await?;
            return Ok(Listed(r.into_inner().names.len()));
        }
        "/rill.v1.Security/CreateToken" => {
            c.security()
                .create_token(pb::CreateTokenRequest {
                    principal: "alice".into(),
                    expires_in_ms: 0,
                })
                .await?;
        }
        "/rill.v1.Security/ListTokens" => {
            let r = c
                .security()
                .list_tokens(pb::ListTokensRequest::default())
                .await?;
            return Ok(Listed(r.into_inner().tokens.len()));
        }
        "/rill.v1.Security/RevokeToken" => {
            c.security()
                .revoke_token(pb::RevokeTokenRequest {
                    token_id: spare_token_id.into(),
                })
                .await?;
        }
        "/rill.v1.Security/AddAcl" => {
            c.security()
                .add_acl(pb::AddAclRequest {
                    rule: Some(rule(
                        "carol",
                        pb::ResourceType::Topic,
                        "t",
                        pb::Operation::Consume,
                    )),
                })
                .await?;
        }
        "/rill.v1.Security/ListAcls" => {
            let r = c
                .security()
                .list_acls(pb::ListAclsRequest::default())
                .await?;
            return Ok(Listed(r.into_inner().rules.len()));
        }
        "/rill.v1.Security/RemoveAcl" => {
            let r = c
                .security()
                .remove_acl(pb::RemoveAclRequest {
                    rule: Some(dummy()),
                })
                .await?;
            if r.into_inner().removed != 1 {
                return Err(Status::internal("the rule was not removed"));
            }
        }
        other => panic!("the matrix has no call for {other}"),
    }
    Ok(Done)
}

/// What the broker holds that any RPC could change, to show refusals change nothing.
pub(crate) async fn snapshot(admin: &Connection) -> Result<String> {
    let mut a = admin.admin();
    let topics = a.list_topics(pb::ListTopicsRequest {}).await?.into_inner();
    let t = a
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await?
        .into_inner();
    let offsets = admin
        .groups()
        .fetch_offsets(pb::FetchOffsetsRequest {
            group: "g".into(),
            topic: "t".into(),
            partitions: vec![],
        })
        .await?
        .into_inner();
    let groups = admin
        .groups()
        .list_groups(pb::ListGroupsRequest {})
        .await?
        .into_inner()
        .groups;
    let mut s = admin.security();
    let principals = s
        .list_principals(pb::ListPrincipalsRequest {})
        .await?
        .into_inner();
    let tokens = s
        .list_tokens(pb::ListTokensRequest::default())
        .await?
        .into_inner();
    let acls = s
        .list_acls(pb::ListAclsRequest::default())
        .await?
        .into_inner();
    let subs = admin
        .subscriptions()
        .list(pb::ListSubscriptionsRequest {})
        .await?
        .into_inner()
        .subscriptions;
    let mut described = Vec::new();
    for sub in &subs {
        described.push(
            admin
                .subscriptions()
                .describe(pb::DescribeSubscriptionRequest {
                    name: sub.name.clone(),
                })
                .await?
                .into_inner()
                .partitions,
        );
    }
    Ok(format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        subs,
        described,
        groups,
        topics.topics,
        t.partitions
            .iter()
            .map(|p| p.high_watermark)
            .collect::<Vec<_>>(),
        offsets.offsets,
        principals.names,
        tokens.tokens,
        acls.rules
    ))
}
