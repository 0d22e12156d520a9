//! The failure detector (`rill_cluster::failover`) with real broker processes: a killed
//! leader is found down through its closed connections (reported as `down_detected_ms` in
//! `ClusterStatus`) and replaced; a paused one is left to the election timers and never
//! reported that way. How fast is a benchmark (`benches/failover.py`), not a test.

use std::time::Duration;

use rill_tests::cluster::TestCluster;

/// The longest anything here may take (generous: the machine is shared).
const DEADLINE: Duration = Duration::from_secs(30);

/// Waits until node `asked` reports `node` not live, and returns its `down_detected_ms`.
async fn wait_not_live(cluster: &TestCluster, asked: u64, node: u64) -> Option<u64> {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = cluster.status(asked).await.ok();
        let broker = status
            .as_ref()
            .and_then(|s| s.brokers.iter().find(|b| b.node_id == node).cloned());
        if let Some(b) = broker.filter(|b| !b.live) {
            return b.down_detected_ms;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "node {asked} never reported node {node} down: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_detected_down_and_replaced_and_clears_on_restart() {
    let mut cluster = TestCluster::start_with_topic("fo", 1).await.expect("start");
    let leader = cluster
        .wait_partition_leader("fo", 0, DEADLINE)
        .await
        .expect("a leader");
    cluster.kill(leader).await.expect("kill -9");
    let next = cluster
        .wait_partition_leader("fo", 0, DEADLINE)
        .await
        .expect("a new leader");
    assert_ne!(next, leader, "the killed broker cannot lead");
    for id in cluster.running() {
        let detected = wait_not_live(&cluster, id, leader).await;
        assert!(
            detected.is_some(),
            "node {id} reports node {leader} down, but not through the detector"
        );
    }
    // The new leader takes writes.
    let mut clients = cluster.clients(next).await.expect("clients");
    clients
        .produce_values("fo", 0, &["after the failover"])
        .await
        .expect("produce on the new leader");

    // Back: live again, and no longer reported as found down.
    cluster.restart(leader).await.expect("restart");
    for id in cluster.ids() {
        cluster
            .wait_live(id, &[1, 2, 3], DEADLINE)
            .await
            .expect("everyone live again");
    }
    for id in cluster.ids() {
        let status = cluster.status(id).await.expect("status");
        assert!(
            status.brokers.iter().all(|b| b.down_detected_ms.is_none()),
            "node {id}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_left_to_the_timers_not_reported_found_down() {
    let cluster = TestCluster::start_with_topic("fo", 1).await.expect("start");
    let leader = cluster
        .wait_partition_leader("fo", 0, DEADLINE)
        .await
        .expect("a leader");
    cluster.signal(leader, "STOP").await.expect("SIGSTOP");
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let elected = wait_leader_among(&cluster, &others, leader).await;
    // Reported not live once its session runs out, but its sockets stayed open: the
    // detector must not call a paused process gone.
    let mut detected = Vec::new();
    for id in &others {
        detected.push((*id, wait_not_live(&cluster, *id, leader).await));
    }
    cluster.signal(leader, "CONT").await.expect("SIGCONT");
    assert!(elected, "no new leader while the old one was paused");
    assert!(
        detected.iter().all(|(_, d)| d.is_none()),
        "a paused broker was reported found down: {detected:?}"
    );
    // The cluster settles on one leader with the old one back.
    cluster
        .wait_partition_leader("fo", 0, DEADLINE)
        .await
        .expect("one leader after SIGCONT");
}

/// Waits until one of `asked` names a leader of `fo`/0 other than `old`.
async fn wait_leader_among(cluster: &TestCluster, asked: &[u64], old: u64) -> bool {
    let until = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < until {
        for id in asked {
            let leader = cluster.metadata(*id, "fo").await.ok().and_then(|m| {
                m.topics
                    .first()
                    .and_then(|t| t.partitions.first())
                    .map(|p| p.leader)
            });
            if leader.is_some_and(|l| l != 0 && l != old) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
