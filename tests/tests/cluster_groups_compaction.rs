//! Compaction of the replicated groups topic on 3 real broker processes: the coordinator (the
//! leader of a `__groups` partition) commits a snapshot through Raft once the partition has
//! grown by a segment, and every replica deletes its own segments before it, so the topic
//! stays bounded; the offsets survive kill -9 of a follower and of the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_storage::groups::{partition_for_group, DEFAULT_GROUPS_PARTITIONS, GROUPS_TOPIC};
use rill_tests::cluster::{while_unavailable, Extra, TestCluster};

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// The longest compaction may take to show on disk: the compaction loop runs every 10 s.
const COMPACTION_DEADLINE: Duration = Duration::from_secs(90);
/// Tiny groups segments (the smallest accepted), so a few dozen commits make a partition due.
const GROUPS_SEGMENT_BYTES: &str = "16384";
/// Partitions of the committed topic; every commit names all of them.
const PARTITIONS: u32 = 8;
const GROUPS: [&str; 6] = ["billing", "audit", "search", "mailer", "ledger", "reports"];

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

/// Commits `offset + p` for every partition `p` of `orders` for `group`, through `via`,
/// with a few hundred bytes of metadata each, so the groups topic grows quickly.
async fn commit(cluster: &TestCluster, via: u64, group: &str, offset: u64) {
    let c = cluster.clients(via).await.expect("connect");
    retrying("commit", || {
        let req = pb::CommitOffsetsRequest {
            group: group.into(),
            topic: "orders".into(),
            offsets: (0..PARTITIONS)
                .map(|p| pb::PartitionOffset {
                    partition: p,
                    offset: offset + u64::from(p),
                    metadata: Some(format!("{group}-{offset}-{}", "m".repeat(200))),
                })
                .collect(),
            member: None,
        };
        let mut groups = c.groups.clone();
        async move { groups.commit_offsets(req).await }
    })
    .await;
}

/// `group`'s offsets of `orders` as broker `via` answers them.
async fn fetched(cluster: &TestCluster, via: u64, group: &str) -> Vec<Option<u64>> {
    let c = cluster.clients(via).await.expect("connect");
    let resp = retrying("fetch offsets", || {
        let mut groups = c.groups.clone();
        let req = pb::FetchOffsetsRequest {
            group: group.into(),
            topic: "orders".into(),
            partitions: (0..PARTITIONS).collect(),
        };
        async move { groups.fetch_offsets(req).await }
    })
    .await
    .into_inner();
    resp.offsets.iter().map(|o| o.offset).collect()
}

/// Commits `rounds` rounds of every group through brokers in turn; returns each group's last
/// offset.
async fn commit_rounds(
    cluster: &TestCluster,
    from: u64,
    rounds: u64,
    latest: &mut BTreeMap<&'static str, u64>,
) {
    let running = cluster.running();
    for round in from..from + rounds {
        for (i, group) in GROUPS.iter().enumerate() {
            let via = running[(round as usize + i) % running.len()];
            let offset = round * 100;
            commit(cluster, via, group, offset).await;
            latest.insert(group, offset);
        }
    }
}

/// Waits until every running replica's copy of each partition of `partitions` starts past
/// `past[(node, p)]` (0 when absent), polling the data folders (nothing to await: the deletion
/// is on disk). Returns each (node, partition)'s log start.
async fn wait_compacted(
    cluster: &TestCluster,
    partitions: &BTreeSet<u32>,
    past: &BTreeMap<(u64, u32), u64>,
) -> BTreeMap<(u64, u32), u64> {
    let until = tokio::time::Instant::now() + COMPACTION_DEADLINE;
    loop {
        let starts: BTreeMap<(u64, u32), u64> = cluster
            .running()
            .into_iter()
            .flat_map(|id| partitions.iter().map(move |&p| (id, p)))
            .map(|(id, p)| ((id, p), cluster.log_start_on_disk(id, GROUPS_TOPIC, p)))
            .collect();
        if starts
            .iter()
            .all(|(key, start)| *start > past.get(key).copied().unwrap_or(0))
        {
            return starts;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "every replica's {GROUPS_TOPIC} log start should move past {past:?}: (node, partition) → start {starts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn assert_latest(cluster: &TestCluster, via: u64, latest: &BTreeMap<&'static str, u64>) {
    for (group, offset) in latest {
        let expected: Vec<Option<u64>> = (0..PARTITIONS)
            .map(|p| Some(offset + u64::from(p)))
            .collect();
        assert_eq!(
            fetched(cluster, via, group).await,
            expected,
            "group {group} asked of node {via}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_groups_partitions_compact_on_every_replica_and_survive_kill_9() {
    let mut cluster = TestCluster::start_with(
        3,
        Extra::args(&["--groups-segment-bytes", GROUPS_SEGMENT_BYTES]),
    )
    .await
    .expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("a controller leader");
    let mut admin = cluster.clients(1).await.expect("connect").admin;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            config: Some(pb::TopicConfig {
                partitions: PARTITIONS,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create orders");
    let partitions: BTreeSet<u32> = GROUPS
        .iter()
        .map(|g| partition_for_group(g, DEFAULT_GROUPS_PARTITIONS))
        .collect();

    // Each commit is about 2 KiB: 30 rounds of 6 groups put several segments' worth in
    // every groups partition that holds one.
    let mut latest = BTreeMap::new();
    commit_rounds(&cluster, 1, 30, &mut latest).await;
    let starts = wait_compacted(&cluster, &partitions, &BTreeMap::new()).await;
    println!("log starts after the first commits: {starts:?}");
    for id in cluster.ids() {
        assert_latest(&cluster, id, &latest).await;
    }

    // kill -9 a follower of the first group's partition during more commits (and more
    // compaction), then restart it: it answers the latest offsets, and its copy compacts too.
    let p = partition_for_group(GROUPS[0], DEFAULT_GROUPS_PARTITIONS);
    let leader = cluster
        .wait_partition_leader(GROUPS_TOPIC, p, DEADLINE)
        .await
        .expect("a leader");
    let follower = cluster.another(leader);
    cluster.kill(follower).await.expect("kill follower");
    commit_rounds(&cluster, 31, 30, &mut latest).await;
    // The live replicas compact again while the follower is down...
    let during = wait_compacted(&cluster, &partitions, &starts).await;
    println!("log starts while node {follower} is down: {during:?}");
    cluster.restart(follower).await.expect("restart follower");
    assert_latest(&cluster, follower, &latest).await;
    // ... and the restarted follower, given the snapshots it missed, deletes past its own
    // start of before the kill.
    let after = wait_compacted(&cluster, &partitions, &starts).await;
    println!("log starts after node {follower}'s restart: {after:?}");

    // kill -9 the leader: the new leader answers the latest offsets, and so does every other.
    cluster.kill(leader).await.expect("kill leader");
    let new_leader = cluster
        .wait_partition_leader_among(GROUPS_TOPIC, p, DEADLINE)
        .await
        .expect("a new leader");
    assert_ne!(new_leader, leader);
    for id in cluster.running() {
        assert_latest(&cluster, id, &latest).await;
    }
    cluster.restart(leader).await.expect("restart leader");
    assert_latest(&cluster, leader, &latest).await;
}
