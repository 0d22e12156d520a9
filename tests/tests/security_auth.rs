//! Authentication and authorization end to end: the matrix of every RPC against every kind
//! of caller, prefix rules through the CLI, revocation during a long-poll, and the security
//! state surviving a restart.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use rill_client::{ConnectOptions, Connection};
use rill_proto::v1 as pb;
use rill_tests::{produce_req, record, wait_until, TestBroker};
use tonic::Code;

#[path = "security_auth/matrix.rs"]
mod matrix;

use matrix::{call, contract_rpcs, snapshot, Outcome, MATRIX};

const ADMIN: &str = "admin-token-for-tests-0123456789";

fn secured(dir: &tempfile::TempDir) -> rill_broker::Config {
    let mut config = rill_broker::Config::new(dir.path());
    config.security.auth = true;
    config.security.admin_token = Some(rill_broker::auth::Secret(ADMIN.into()));
    config
}

async fn start_secured() -> Result<TestBroker> {
    let dir = tempfile::tempdir()?;
    let config = secured(&dir);
    TestBroker::start_with(config, Some(dir)).await
}

async fn conn(broker: &TestBroker, token: Option<&str>) -> Result<Connection> {
    let mut options = ConnectOptions::new();
    if let Some(t) = token {
        options = options.token(t);
    }
    Ok(Connection::connect_with(&broker.addr().to_string(), &options).await?)
}

fn rule(principal: &str, kind: pb::ResourceType, name: &str, op: pb::Operation) -> pb::AclRule {
    pb::AclRule {
        principal: principal.into(),
        resource_type: kind as i32,
        resource_name: name.into(),
        pattern_type: pb::PatternType::Literal as i32,
        operation: op as i32,
        permission: pb::Permission::Allow as i32,
    }
}

async fn token_for(
    admin: &Connection,
    principal: &str,
    expires_in_ms: u64,
) -> Result<pb::CreateTokenResponse> {
    Ok(admin
        .security()
        .create_token(pb::CreateTokenRequest {
            principal: principal.into(),
            expires_in_ms,
        })
        .await?
        .into_inner())
}

/// Every RPC × { no token, bad token, expired, revoked, without permission, with it }: each
/// answer has the right code, and the refusals change nothing.
#[tokio::test]
async fn every_rpc_against_every_kind_of_caller() -> Result<()> {
    let contract = contract_rpcs();
    let matrix: BTreeSet<String> = MATRIX.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        contract, matrix,
        "every RPC of the contract is in the matrix"
    );
    for rpc in &contract {
        assert!(
            rill_broker::auth::layer::needs(rpc).is_some(),
            "{rpc} is in the broker's RPC table"
        );
    }

    let broker = start_secured().await?;
    let admin = conn(&broker, Some(ADMIN)).await?;
    for name in ["t", "doomed"] {
        admin
            .admin()
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                config: Some(pb::TopicConfig {
                    partitions: 1,
                    ..Default::default()
                }),
                replication_factor: None,
            })
            .await?;
    }
    call(&admin, "/rill.v1.Log/Produce", "").await?;
    call(&admin, "/rill.v1.Groups/CommitOffsets", "").await?;
    admin
        .groups()
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "doomed-group".into(),
            topic: "t".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset: 0,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    for name in ["sub", "ack-sub", "push-sub", "doomed-sub"] {
        admin
            .subscriptions()
            .create(pb::CreateSubscriptionRequest {
                name: name.into(),
                config: Some(pb::SubscriptionConfig {
                    topic: "t".into(),
                    ..Default::default()
                }),
                start: pb::StartPosition::Earliest as i32,
            })
            .await?;
    }
    let mut sec = admin.security();
    for p in ["alice", "bob", "root"] {
        sec.create_principal(pb::CreatePrincipalRequest { name: p.into() })
            .await?;
    }
    use pb::Operation as Op;
    for op in [
        Op::Produce,
        Op::Consume,
        Op::Create,
        Op::Delete,
        Op::Describe,
        Op::Alter,
    ] {
        for kind in [
            pb::ResourceType::Topic,
            pb::ResourceType::Group,
            pb::ResourceType::Subscription,
        ] {
            sec.add_acl(pb::AddAclRequest {
                rule: Some(rule("alice", kind, "*", op)),
            })
            .await?;
        }
    }
    sec.add_acl(pb::AddAclRequest {
        rule: Some(rule(
            "root",
            pb::ResourceType::Cluster,
            "cluster",
            Op::Admin,
        )),
    })
    .await?;
    sec.add_acl(pb::AddAclRequest {
        rule: Some(rule(
            "bob",
            pb::ResourceType::Topic,
            "nothing",
            Op::Describe,
        )),
    })
    .await?;
    let alice = token_for(&admin, "alice", 0).await?.token;
    let bob = token_for(&admin, "bob", 0).await?.token;
    let root = token_for(&admin, "root", 0).await?.token;
    let spare = token_for(&admin, "alice", 0).await?.token_id;
    let expired = token_for(&admin, "alice", 1).await?;
    let revoked = token_for(&admin, "alice", 0).await?;
    sec.revoke_token(pb::RevokeTokenRequest {
        token_id: revoked.token_id.clone(),
    })
    .await?;
    let expires_at = expired.expires_at_ms;
    wait_until("the token to expire", Duration::from_secs(5), || {
        rill_storage::log::now_ms() > expires_at
    })
    .await?;

    let before = snapshot(&admin).await?;
    let bad = format!("rill_{}", "00".repeat(24));
    let refusing: Vec<(&str, Connection)> = vec![
        ("no token", conn(&broker, None).await?),
        ("bad token", conn(&broker, Some(&bad)).await?),
        ("expired token", conn(&broker, Some(&expired.token)).await?),
        ("revoked token", conn(&broker, Some(&revoked.token)).await?),
    ];
    for rpc in MATRIX {
        for (who, c) in &refusing {
            let err = call(c, rpc, &spare)
                .await
                .expect_err(&format!("{rpc} with {who} must fail"));
            assert_eq!(
                err.code(),
                Code::Unauthenticated,
                "{rpc} with {who}: {err:?}"
            );
        }
        let without = conn(&broker, Some(&bob)).await?;
        match (*rpc, call(&without, rpc, &spare).await) {
            // Any authenticated caller may ask who it is, and get a producer id (the
            // produces it makes with it are authorized per topic).
            ("/rill.v1.Security/WhoAmI" | "/rill.v1.Log/InitProducer", r) => {
                assert_eq!(r?, Outcome::Done)
            }
            (
                "/rill.v1.Admin/ListTopics"
                | "/rill.v1.Groups/ListGroups"
                | "/rill.v1.Subscriptions/List",
                r,
            ) => {
                assert_eq!(r?, Outcome::Listed(0), "{rpc}: only what bob may describe")
            }
            (_, Ok(o)) => panic!("{rpc} without permission answered {o:?}"),
            (_, Err(e)) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{rpc}: {e:?}");
                let m = e.message();
                assert!(m.contains("may not") && m.contains("bob"), "{rpc}: {m}");
                assert!(
                    !m.contains("alice") && !m.contains("root"),
                    "no one else's rules: {m}"
                );
            }
        }
    }
    assert_eq!(
        snapshot(&admin).await?,
        before,
        "the refusals changed nothing"
    );

    let alice = conn(&broker, Some(&alice)).await?;
    let root = conn(&broker, Some(&root)).await?;
    for rpc in MATRIX {
        let c = if rpc.starts_with("/rill.v1.Security/") && *rpc != "/rill.v1.Security/WhoAmI" {
            &root
        } else {
            &alice
        };
        match call(c, rpc, &spare).await {
            Ok(Outcome::Listed(n)) => assert!(n > 0, "{rpc} lists what the caller may see"),
            Ok(Outcome::Done) => {}
            Err(e) => panic!("{rpc} with permission: {e:?}"),
        }
    }
    broker.stop().await?;
    Ok(())
}

/// Runs the real CLI with a token in the environment.
async fn cli(broker: &TestBroker, token: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(rill_tests::binary_path("rill")?)
        .arg("--broker")
        .arg(broker.addr().to_string())
        .args(args)
        .env("RILL_TOKEN", token)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("rill did not finish")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `orders.*` produce lets the principal produce to orders.eu but not to payments, and never
/// delete orders.eu. Principals, tokens and rules made with the CLI.
#[tokio::test]
async fn a_prefix_rule_allows_its_topics_and_only_its_operation() -> Result<()> {
    let broker = start_secured().await?;
    let admin = conn(&broker, Some(ADMIN)).await?;
    for name in ["orders.eu", "payments"] {
        admin
            .admin()
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                config: None,
                replication_factor: None,
            })
            .await?;
    }
    let (ok, _, err) = cli(&broker, ADMIN, &["principal", "create", "shop"]).await?;
    assert!(ok, "{err}");
    let (ok, token, err) = cli(
        &broker,
        ADMIN,
        &["token", "create", "--principal", "shop", "--expires", "30d"],
    )
    .await?;
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(
        token.starts_with("rill_") && token.len() >= 5 + 32,
        "{token}"
    );
    let (ok, _, err) = cli(
        &broker,
        ADMIN,
        &[
            "acl",
            "add",
            "--principal",
            "shop",
            "--operation",
            "produce",
            "--topic",
            "orders.*",
        ],
    )
    .await?;
    assert!(ok, "{err}");
    let (ok, listed, _) = cli(&broker, ADMIN, &["acl", "list"]).await?;
    assert!(ok && listed.contains("topic:orders.*"), "{listed}");
    let (ok, listed, _) = cli(&broker, ADMIN, &["token", "list"]).await?;
    assert!(
        ok && listed.contains("shop") && !listed.contains(&token),
        "{listed}"
    );

    let shop = conn(&broker, Some(&token)).await?;
    shop.log()
        .produce(produce_req(
            "orders.eu",
            None,
            vec![record(None, "o1", None, &[])],
        ))
        .await?;
    let err = shop
        .log()
        .produce(produce_req(
            "payments",
            None,
            vec![record(None, "p1", None, &[])],
        ))
        .await
        .expect_err("payments is not under orders.");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("produce") && err.message().contains("payments"),
        "{err:?}"
    );
    let err = shop
        .admin()
        .delete_topic(pb::DeleteTopicRequest {
            name: "orders.eu".into(),
        })
        .await
        .expect_err("produce is not delete");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("delete"), "{err:?}");
    let (ok, _, err) = cli(&broker, &token, &["topic", "delete", "orders.eu"]).await?;
    assert!(!ok && err.to_lowercase().contains("permission"), "{err}");
    let t = admin
        .admin()
        .describe_topic(pb::DescribeTopicRequest {
            name: "orders.eu".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        t.partitions.iter().map(|p| p.high_watermark).sum::<u64>(),
        1
    );
    broker.stop().await?;
    Ok(())
}

/// A token revoked while its long-poll waits: the next request fails.
#[tokio::test]
async fn a_token_revoked_during_a_long_poll_fails_the_next_request() -> Result<()> {
    let broker = start_secured().await?;
    let admin = conn(&broker, Some(ADMIN)).await?;
    admin
        .admin()
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
            replication_factor: None,
        })
        .await?;
    let mut sec = admin.security();
    sec.create_principal(pb::CreatePrincipalRequest { name: "app".into() })
        .await?;
    sec.add_acl(pb::AddAclRequest {
        rule: Some(rule(
            "app",
            pb::ResourceType::Topic,
            "t",
            pb::Operation::Consume,
        )),
    })
    .await?;
    let token = token_for(&admin, "app", 0).await?;
    let app = conn(&broker, Some(&token.token)).await?;
    let mut log = app.log();
    let poll = tokio::spawn(async move {
        log.fetch(pb::FetchRequest {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            max_wait_ms: 2_000,
            ..Default::default()
        })
        .await
    });
    let b = broker.broker().clone();
    wait_until("the fetch to wait", Duration::from_secs(10), || {
        b.waiting_fetches() == 1
    })
    .await?;
    sec.revoke_token(pb::RevokeTokenRequest {
        token_id: token.token_id.clone(),
    })
    .await?;
    // The waiting fetch was authorized when it began; it ends as a fetch does.
    let _ = tokio::time::timeout(Duration::from_secs(10), poll).await??;
    let err = app
        .log()
        .fetch(pb::FetchRequest {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            max_wait_ms: 0,
            ..Default::default()
        })
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    broker.stop().await?;
    Ok(())
}

/// Principals, tokens, revocations and rules live in the `__security` topic and survive a
/// restart.
#[tokio::test]
async fn the_security_state_survives_a_restart() -> Result<()> {
    let broker = start_secured().await?;
    let admin = conn(&broker, Some(ADMIN)).await?;
    admin
        .admin()
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            config: None,
            replication_factor: None,
        })
        .await?;
    let mut sec = admin.security();
    sec.create_principal(pb::CreatePrincipalRequest { name: "app".into() })
        .await?;
    sec.add_acl(pb::AddAclRequest {
        rule: Some(rule(
            "app",
            pb::ResourceType::Topic,
            "t",
            pb::Operation::Describe,
        )),
    })
    .await?;
    let kept = token_for(&admin, "app", 0).await?;
    let gone = token_for(&admin, "app", 0).await?;
    sec.revoke_token(pb::RevokeTokenRequest {
        token_id: gone.token_id.clone(),
    })
    .await?;
    let dir = broker.stop().await?.context("the temp dir")?;

    let config = secured(&dir);
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let app = conn(&broker, Some(&kept.token)).await?;
    app.admin()
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await?;
    let err = app
        .admin()
        .delete_topic(pb::DeleteTopicRequest { name: "t".into() })
        .await
        .expect_err("only describe");
    assert_eq!(err.code(), Code::PermissionDenied);
    let revoked = conn(&broker, Some(&gone.token)).await?;
    let err = revoked
        .security()
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect_err("still revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    let me = app
        .security()
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (me.principal.as_str(), me.method.as_str()),
        ("app", "token")
    );
    broker.stop().await?;
    Ok(())
}
