//! Group state on replicated storage, on 3 real broker processes: committed offsets and
//! memberships live in the replicated internal topic `__groups`, any broker answers for any
//! group (forwarding to the coordinator, the leader of the group's partition), and both
//! survive kill -9 of that coordinator.

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_storage::groups::{partition_for_group, DEFAULT_GROUPS_PARTITIONS, GROUPS_TOPIC};
use rill_tests::cluster::TestCluster;

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// Retries `call` on UNAVAILABLE (the internal topic being created, an election) until the
/// deadline; any other error fails the test.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(s)
                if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{what}: {s:?}"),
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_and_members_survive_kill_9_of_their_coordinator() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut admin = cluster.clients(1).await.expect("connect").admin;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create");

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
    let other = cluster
        .ids()
        .into_iter()
        .find(|id| *id != coordinator)
        .expect("another");
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
