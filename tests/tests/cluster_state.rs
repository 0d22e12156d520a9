//! Group state on replicated storage, on 3 real broker processes: committed offsets and
//! memberships live in the replicated internal topic `__groups`, any broker answers for any
//! group (forwarding to the coordinator, the leader of the group's partition), and both
//! survive kill -9 of that coordinator.

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_storage::groups::{partition_for_group, DEFAULT_GROUPS_PARTITIONS, GROUPS_TOPIC};
use rill_tests::cluster::{while_unavailable, Extra, TestCluster};

const SECURITY_TOPIC: &str = "__security";

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// Retries `call` on UNAVAILABLE (the internal topic being created, an election) until the
/// deadline; any other error fails the test.
async fn retrying<T, F, Fut>(what: &str, call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    while_unavailable(DEADLINE, call)
        .await
        .unwrap_or_else(|s| panic!("{what}: {s:?}"))
}

async fn commit(
    cluster: &TestCluster,
    via: u64,
    group: &str,
    offset: u64,
    member: Option<(String, i32)>,
) {
    let c = cluster.clients(via).await.expect("connect");
    retrying("commit", || {
        let req = pb::CommitOffsetsRequest {
            group: group.into(),
            topic: "orders".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset,
                metadata: None,
            }],
            member: member
                .clone()
                .map(|(member_id, member_epoch)| pb::MemberIdentity {
                    member_id,
                    member_epoch,
                }),
        };
        let mut groups = c.groups.clone();
        async move { groups.commit_offsets(req).await }
    })
    .await;
}

async fn fetched(cluster: &TestCluster, via: u64, group: &str) -> Option<u64> {
    let c = cluster.clients(via).await.expect("connect");
    let resp = retrying("fetch offsets", || {
        let mut groups = c.groups.clone();
        let req = pb::FetchOffsetsRequest {
            group: group.into(),
            topic: "orders".into(),
            partitions: vec![0],
        };
        async move { groups.fetch_offsets(req).await }
    })
    .await
    .into_inner();
    resp.offsets.first().and_then(|o| o.offset)
}

async fn heartbeat(
    cluster: &TestCluster,
    via: u64,
    req: pb::GroupHeartbeatRequest,
) -> pb::GroupHeartbeatResponse {
    let c = cluster.clients(via).await.expect("connect");
    retrying("heartbeat", || {
        let mut groups = c.groups.clone();
        let req = req.clone();
        async move { groups.group_heartbeat(req).await }
    })
    .await
    .into_inner()
}

/// `group`'s summary in `ListGroups` as broker `via` answers it.
async fn listed(cluster: &TestCluster, via: u64, group: &str) -> Option<pb::GroupSummary> {
    let c = cluster.clients(via).await.expect("connect");
    let resp = retrying("list groups", || {
        let mut groups = c.groups.clone();
        async move { groups.list_groups(pb::ListGroupsRequest::default()).await }
    })
    .await
    .into_inner();
    resp.summaries.into_iter().find(|g| g.group == group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_and_members_survive_kill_9_of_their_coordinator() {
    let mut cluster = TestCluster::start_with_topic("orders", 1)
        .await
        .expect("start");

    // The groups topic is replicated on all three brokers.
    let group = "billing";
    let p = partition_for_group(group, DEFAULT_GROUPS_PARTITIONS);
    let coordinator = cluster
        .wait_partition_leader(GROUPS_TOPIC, p, DEADLINE)
        .await
        .expect("a leader of the group's partition");
    let md = cluster.metadata(1, GROUPS_TOPIC).await.expect("metadata");
    let replicas = &md.topics[0].partitions[p as usize].replicas;
    assert_eq!(
        replicas.len(),
        3,
        "{GROUPS_TOPIC} is replicated 3 ways: {replicas:?}"
    );

    // A commit through a broker that does not coordinate the group is forwarded; every
    // broker then answers the same offset.
    let other = cluster.another(coordinator);
    commit(&cluster, other, group, 42, None).await;
    for id in cluster.ids() {
        assert_eq!(
            fetched(&cluster, id, group).await,
            Some(42),
            "asked node {id}"
        );
    }

    // A member joins (through a non-coordinator too) and gets the partition.
    let joined = heartbeat(
        &cluster,
        other,
        pb::GroupHeartbeatRequest {
            group: group.into(),
            member_id: String::new(),
            member_epoch: 0,
            instance_id: None,
            subscribed_topics: Some(pb::TopicList {
                topics: vec!["orders".into()],
            }),
            owned_partitions: None,
            session_timeout_ms: Some(60_000),
            rebalance_timeout_ms: None,
            assignor: None,
        },
    )
    .await;
    assert!(
        !joined.member_id.is_empty() && joined.member_epoch > 0,
        "{joined:?}"
    );
    // Every broker lists the group with its member, as its coordinator counts it (the
    // membership lives only in the coordinator's memory).
    for id in cluster.ids() {
        let g = listed(&cluster, id, group).await;
        assert_eq!(
            g.as_ref().map(|g| g.member_count),
            Some(1),
            "ListGroups asked of node {id} (coordinator {coordinator}): {g:?}"
        );
    }

    // kill -9 the coordinator: a new leader of the partition takes over with the state.
    cluster.kill(coordinator).await.expect("kill");
    let survivor = cluster.running()[0];
    assert_eq!(
        fetched(&cluster, survivor, group).await,
        Some(42),
        "the offset survived"
    );
    let again = heartbeat(
        &cluster,
        survivor,
        pb::GroupHeartbeatRequest {
            group: group.into(),
            member_id: joined.member_id.clone(),
            member_epoch: joined.member_epoch,
            instance_id: None,
            subscribed_topics: None,
            owned_partitions: joined.assignment.clone(),
            session_timeout_ms: None,
            rebalance_timeout_ms: None,
            assignor: None,
        },
    )
    .await;
    assert_eq!(
        again.member_id, joined.member_id,
        "the member is still known"
    );
    assert_eq!(
        again.member_epoch, joined.member_epoch,
        "no rebalance: {again:?}"
    );
    for id in cluster.running() {
        let g = listed(&cluster, id, group).await;
        assert_eq!(
            g.as_ref().map(|g| g.member_count),
            Some(1),
            "ListGroups asked of survivor {id}: {g:?}"
        );
    }
    // Its fenced commit works on the new coordinator, and a stale epoch is refused.
    commit(
        &cluster,
        survivor,
        group,
        50,
        Some((joined.member_id.clone(), joined.member_epoch)),
    )
    .await;
    let mut c = cluster.clients(survivor).await.expect("connect");
    let stale = c
        .groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: group.into(),
            topic: "orders".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset: 60,
                metadata: None,
            }],
            member: Some(pb::MemberIdentity {
                member_id: joined.member_id.clone(),
                member_epoch: joined.member_epoch - 1,
            }),
        })
        .await
        .expect_err("a stale epoch is fenced");
    assert!(
        matches!(
            stale.code(),
            tonic::Code::FailedPrecondition | tonic::Code::Aborted
        ),
        "{stale:?}"
    );

    // The killed broker comes back and serves the latest state.
    cluster.restart(coordinator).await.expect("restart");
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        if fetched(&cluster, coordinator, group).await == Some(50) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the restarted broker never saw offset 50"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ADMIN: &str = "admin-token-for-tests-0123456789";
const CLUSTER: &str = "cluster-token-for-tests-98765432";

/// Retries `call` on UNAVAILABLE until the deadline, through the client library's errors.
async fn retrying_client<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    retrying(what, || {
        let fut = call();
        async move { fut.await.map(tonic::Response::into_inner) }
    })
    .await
}

async fn connect(cluster: &TestCluster, id: u64, token: &str) -> rill_client::Connection {
    let options = rill_client::ConnectOptions::new().token(token);
    rill_client::Connection::connect_with(&cluster.addr(id).to_string(), &options)
        .await
        .expect("connect")
}

/// Asks node `id` who `token` is, retrying while it is not known there yet.
async fn whoami(cluster: &TestCluster, id: u64, token: &str) -> Result<String, tonic::Status> {
    let c = connect(cluster, id, token).await;
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match c.security().who_am_i(pb::WhoAmIRequest {}).await {
            Ok(r) => return Ok(r.into_inner().principal),
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Calls `$method` of the Security service on `$conn` with `$req`, retrying on UNAVAILABLE.
macro_rules! security {
    ($conn:expr, $method:ident, $req:expr) => {
        retrying_client(stringify!($method), || {
            let mut c = $conn.security();
            let req = $req;
            async move { c.$method(req).await }
        })
        .await
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_tokens_and_acls_survive_kill_9_of_their_writer_and_hold_on_every_broker() {
    let extra = Extra {
        args: Vec::new(),
        env: vec![
            ("RILL_ADMIN_TOKEN".into(), ADMIN.into()),
            ("RILL_CLUSTER_TOKEN".into(), CLUSTER.into()),
        ],
    };
    let mut cluster = TestCluster::start_with(3, extra).await.expect("start");
    // The leader of __security, asked with the admin token (authentication is on).
    let boot = connect(&cluster, 1, ADMIN).await;
    let until = tokio::time::Instant::now() + DEADLINE;
    let writer = loop {
        let md = boot
            .cluster()
            .metadata(pb::MetadataRequest {
                topics: vec![SECURITY_TOPIC.into()],
            })
            .await
            .ok()
            .and_then(|m| {
                m.into_inner()
                    .topics
                    .first()
                    .map(|t| t.partitions[0].leader)
            });
        match md {
            Some(l) if l != 0 => break l,
            _ => {
                assert!(
                    tokio::time::Instant::now() < until,
                    "no leader of {SECURITY_TOPIC}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let other = cluster.another(writer);

    // Created through a broker that does not write the security state: forwarded.
    let admin = connect(&cluster, other, ADMIN).await;
    security!(
        admin,
        create_principal,
        pb::CreatePrincipalRequest {
            name: "alice".into()
        }
    );
    let token = security!(
        admin,
        create_token,
        pb::CreateTokenRequest {
            principal: "alice".into(),
            expires_in_ms: 0,
        }
    );
    security!(
        admin,
        add_acl,
        pb::AddAclRequest {
            rule: Some(pb::AclRule {
                principal: "alice".into(),
                resource_type: pb::ResourceType::Topic as i32,
                resource_name: "orders".into(),
                pattern_type: pb::PatternType::Literal as i32,
                operation: pb::Operation::Describe as i32,
                permission: pb::Permission::Allow as i32,
            }),
        }
    );

    // Every broker authenticates alice.
    for id in cluster.ids() {
        let who = whoami(&cluster, id, &token.token).await;
        assert_eq!(who.expect("authenticated"), "alice", "node {id}");
    }

    // kill -9 the writer: the token still works on the others, the rule survived, and a
    // revocation through a survivor takes effect on every broker, the restarted one too.
    cluster.kill(writer).await.expect("kill");
    for id in cluster.running() {
        let who = whoami(&cluster, id, &token.token).await;
        assert_eq!(who.expect("still authenticated"), "alice", "node {id}");
    }
    let survivor = cluster.running()[0];
    let admin = connect(&cluster, survivor, ADMIN).await;
    let acls = security!(
        admin,
        list_acls,
        pb::ListAclsRequest {
            principal: "alice".into()
        }
    );
    assert_eq!(acls.rules.len(), 1, "the rule survived: {acls:?}");
    security!(
        admin,
        revoke_token,
        pb::RevokeTokenRequest {
            token_id: token.token_id.clone()
        }
    );
    cluster.restart(writer).await.expect("restart");
    for id in cluster.ids() {
        let c = connect(&cluster, id, &token.token).await;
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match c.security().who_am_i(pb::WhoAmIRequest {}).await {
                Err(s) if s.code() == tonic::Code::Unauthenticated => break,
                other => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "node {id} still accepts a revoked token: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

const SUBSCRIPTIONS_TOPIC: &str = "__subscriptions";

/// Receives up to `n` records of subscription `sub` through node `via` (forwarded to the
/// leader of `__subscriptions` when that is another broker): (partition, offset) pairs.
async fn receive(cluster: &TestCluster, via: u64, sub: &str, n: u32) -> Vec<(u32, u64)> {
    let c = cluster.clients(via).await.expect("connect");
    let subs = rill_proto::v1::subscriptions_client::SubscriptionsClient::new(c.channel.clone());
    retrying("receive", || {
        let mut subs = subs.clone();
        let req = pb::ReceiveRequest {
            subscription: sub.into(),
            consumer_id: "worker".into(),
            max_records: n,
            max_wait_ms: 1_000,
            max_bytes: 0,
        };
        async move { subs.receive(req).await }
    })
    .await
    .into_inner()
    .records
    .iter()
    .map(|r| {
        (
            r.partition,
            r.record.as_ref().map_or(u64::MAX, |x| x.offset),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriptions_acks_survive_kill_9_of_its_leader_and_unacked_records_come_again() {
    let mut cluster = TestCluster::start_with_topic("jobs", 1)
        .await
        .expect("start");
    let leader = cluster
        .wait_partition_leader("jobs", 0, DEADLINE)
        .await
        .expect("leader of jobs");
    let mut producer = cluster.clients(leader).await.expect("connect");
    let values: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    producer
        .produce_values("jobs", 0, &refs)
        .await
        .expect("produce");

    let writer = cluster
        .wait_partition_leader(SUBSCRIPTIONS_TOPIC, 0, DEADLINE)
        .await
        .expect("leader of __subscriptions");
    let other = cluster.another(writer);
    let oc = cluster.clients(other).await.expect("connect");
    let subs = rill_proto::v1::subscriptions_client::SubscriptionsClient::new(oc.channel.clone());
    retrying("create subscription", || {
        let mut subs = subs.clone();
        let req = pb::CreateSubscriptionRequest {
            name: "workers".into(),
            config: Some(pb::SubscriptionConfig {
                topic: "jobs".into(),
                ack_deadline_ms: 60_000,
                ..Default::default()
            }),
            start: pb::StartPosition::Earliest as i32,
        };
        async move { subs.create(req).await }
    })
    .await;

    // Five records handed out through a non-leader, three of them acked.
    let got = receive(&cluster, other, "workers", 5).await;
    assert_eq!(got, (0..5).map(|o| (0, o)).collect::<Vec<_>>());
    retrying("ack", || {
        let mut subs = subs.clone();
        let req = pb::AcknowledgeRequest {
            subscription: "workers".into(),
            consumer_id: "worker".into(),
            ranges: vec![pb::AckRange {
                partition: 0,
                first_offset: 0,
                last_offset: 2,
            }],
            r#type: pb::AckType::Ack as i32,
            delay_ms: 0,
            error: String::new(),
        };
        async move { subs.acknowledge(req).await }
    })
    .await;

    // kill -9 the leader of __subscriptions: the acks survive, the two records that were
    // locked come again (their locks were the dead leader's), and the rest follow.
    cluster.kill(writer).await.expect("kill");
    let survivor = cluster.running()[0];
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while seen.len() < 7 {
        assert!(
            tokio::time::Instant::now() < until,
            "only {seen:?} came back"
        );
        seen.extend(receive(&cluster, survivor, "workers", 10).await);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (3..10).map(|o| (0, o)).collect::<Vec<_>>(),
        "exactly the records not acked"
    );
}
