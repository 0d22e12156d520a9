//! A lagging replica's lag, as its partition's leader reports it: in Raft entries and in
//! records, through `Cluster.Metadata` and `rill topic describe` (table and JSON), on 3 real
//! broker processes with one follower paused by SIGSTOP.

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::TestCluster;

/// The longest an election, a commit or a catch-up may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// Node `follower`'s state in partition 0 of `topic`, as the leader `leader` reports it.
async fn state_of(
    cluster: &TestCluster,
    leader: u64,
    topic: &str,
    follower: u64,
) -> Option<pb::ReplicaState> {
    let m = cluster.metadata(leader, topic).await.ok()?;
    m.topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .find(|p| p.partition == 0)?
        .replica_states
        .iter()
        .find(|r| r.node_id == follower)
        .copied()
}

/// Waits until the leader reports `follower` as `want` says, and returns that state.
async fn wait_state(
    cluster: &TestCluster,
    leader: u64,
    topic: &str,
    follower: u64,
    want: impl Fn(&pb::ReplicaState) -> bool,
) -> pb::ReplicaState {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let state = state_of(cluster, leader, topic, follower).await;
        if let Some(s) = state.as_ref().filter(|s| want(s)) {
            return *s;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "node {follower} never reached the state wanted: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_is_reported_lagging_by_the_entries_and_records_it_lacks() {
    let cluster = TestCluster::start_with_topic("lag", 1)
        .await
        .expect("3 brokers and an RF 3 topic");
    let leader = cluster
        .wait_partition_leader("lag", 0, DEADLINE)
        .await
        .expect("leader");
    let follower = cluster.another(leader);
    let mut c = cluster.clients(leader).await.expect("connect");
    c.produce_values("lag", 0, &["first"])
        .await
        .expect("produce");
    let caught_up = wait_state(&cluster, leader, "lag", follower, |s| {
        s.in_sync && s.lag_entries == 0
    })
    .await;
    assert_eq!(caught_up.lag_records, Some(0));

    cluster.signal(follower, "STOP").await.expect("SIGSTOP");
    let values: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    // 5 requests of 10 records each, committed by the leader and the other follower.
    for _ in 0..5 {
        c.produce_values("lag", 0, &refs).await.expect("produce");
    }
    let behind = wait_state(&cluster, leader, "lag", follower, |s| !s.in_sync).await;
    assert_eq!(
        (behind.lag_entries, behind.lag_records),
        (5, Some(50)),
        "{behind:?}"
    );

    let addr = cluster.addr(leader).to_string();
    let (ok, out, err) = rill_tests::rill_cli(&addr, &["topic", "describe", "lag"], "")
        .await
        .expect("cli");
    assert!(ok, "{err}");
    let shown = format!("{follower}:lagging(5 entries, 50 records behind)");
    assert!(out.contains(&shown), "{out}");
    let (ok, out, err) =
        rill_tests::rill_cli(&addr, &["--output", "json", "topic", "describe", "lag"], "")
            .await
            .expect("cli");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let states = v["replication"][0]["replica_states"]
        .as_array()
        .expect("replica states")
        .clone();
    let paused = states
        .iter()
        .find(|s| s["node_id"] == follower)
        .expect("the paused follower listed");
    assert_eq!(
        (
            &paused["in_sync"],
            &paused["lag_entries"],
            &paused["lag_records"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!(5),
            &serde_json::json!(50)
        ),
        "{v}"
    );

    cluster.signal(follower, "CONT").await.expect("SIGCONT");
    let resumed = wait_state(&cluster, leader, "lag", follower, |s| {
        s.in_sync && s.lag_entries == 0
    })
    .await;
    assert_eq!(resumed.lag_records, Some(0));
}
