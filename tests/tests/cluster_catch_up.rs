//! Snapshot catch-up on 3 real broker processes with a tiny Raft snapshot interval: a
//! follower that was down (and then one that lost its data folder) while the leader's Raft
//! log was purged behind a snapshot receives that snapshot, pulls the records it lacks from
//! another replica's partition log, and ends with exactly the leader's records.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{Extra, TestCluster};
use rill_tests::Clients;

/// The longest an election, a commit or a catch-up may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

async fn clients(cluster: &TestCluster, id: u64) -> Clients {
    cluster.clients(id).await.expect("connect")
}

/// Every record of partition 0 on node `id`: offset → value.
async fn read_all(cluster: &TestCluster, id: u64, topic: &str) -> BTreeMap<u64, String> {
    cluster.read_all(id, topic, 0).await.expect("read")
}

/// Waits until node `id` holds at least `n` records of partition 0.
async fn wait_records(cluster: &TestCluster, id: u64, topic: &str, n: u64) {
    cluster
        .wait_records(id, topic, 0, n, DEADLINE)
        .await
        .expect("records")
}

/// Writes `n` single-record batches (one Raft entry each) through the leader, numbered from
/// `first`.
async fn write(cluster: &TestCluster, topic: &str, first: u64, n: u64) {
    let leader = cluster
        .wait_partition_leader_among(topic, 0, DEADLINE)
        .await
        .expect("leader");
    let mut c = clients(cluster, leader).await;
    for i in first..first + n {
        c.produce_values(topic, 0, &[&format!("r{i}")])
            .await
            .expect("produce");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_purged_raft_log_pulls_the_records_with_the_snapshot() {
    // A snapshot every 20 entries, 4 kept: 100 writes leave the leader's log purged far past
    // where the stopped follower ended.
    let mut cluster = TestCluster::start_with(3, Extra::args(&["--raft-snapshot-entries", "20"]))
        .await
        .expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    clients(&cluster, 1)
        .await
        .admin
        .create_topic(pb::CreateTopicRequest {
            name: "snap".into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create");
    write(&cluster, "snap", 0, 5).await;
    let leader = cluster
        .wait_partition_leader("snap", 0, DEADLINE)
        .await
        .expect("leader");
    let follower = cluster.another(leader);
    wait_records(&cluster, follower, "snap", 5).await;

    // 1. Down while 100 entries were written and purged: it keeps its first 5 records and
    //    pulls the other 100.
    cluster.kill(follower).await.expect("kill");
    write(&cluster, "snap", 5, 100).await;
    cluster.restart(follower).await.expect("restart");
    wait_records(&cluster, follower, "snap", 105).await;
    let want = read_all(&cluster, leader, "snap").await;
    assert_eq!(want.len(), 105);
    assert_eq!(read_all(&cluster, follower, "snap").await, want);

    // 2. Its whole data folder lost meanwhile: it pulls everything.
    cluster.kill(follower).await.expect("kill");
    cluster.wipe(follower).expect("wipe");
    write(&cluster, "snap", 105, 50).await;
    cluster.restart(follower).await.expect("restart");
    wait_records(&cluster, follower, "snap", 155).await;
    let leader = cluster
        .wait_partition_leader_among("snap", 0, DEADLINE)
        .await
        .expect("leader");
    let want = read_all(&cluster, leader, "snap").await;
    assert_eq!(want.len(), 155);
    let want_values: Vec<String> = (0..155).map(|i| format!("r{i}")).collect();
    assert_eq!(want.values().cloned().collect::<Vec<_>>(), want_values);
    assert_eq!(read_all(&cluster, follower, "snap").await, want);

    // And it follows new writes as an ordinary replica.
    write(&cluster, "snap", 155, 1).await;
    wait_records(&cluster, follower, "snap", 156).await;
}
