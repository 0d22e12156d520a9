//! Replicated topics on 3 real broker processes: commits reach every replica at the same
//! offsets, followers refuse writes and name the leader, too high a replication factor is
//! refused, and kill -9 of the leader loses no acknowledged record.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{create_request, Extra, TestCluster};
use rill_tests::Clients;
use tonic::Code;

/// The longest an election, a commit or a catch-up may take in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

async fn clients(cluster: &TestCluster, id: u64) -> Clients {
    cluster.clients(id).await.expect("connect")
}

/// Every record of partition `p` on node `id`: offset → value.
async fn read_all(cluster: &TestCluster, id: u64, topic: &str, p: u32) -> BTreeMap<u64, String> {
    cluster.read_all(id, topic, p).await.expect("read")
}

/// Waits until node `id` holds at least `n` records of partition `p`.
async fn wait_records(cluster: &TestCluster, id: u64, topic: &str, p: u32, n: u64) {
    cluster
        .wait_records(id, topic, p, n, DEADLINE)
        .await
        .expect("records")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_writes_commit_on_every_replica_and_followers_name_the_leader() {
    let cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    // Created through a broker that may not lead the controller: it forwards.
    let mut c2 = clients(&cluster, 2).await;
    c2.admin
        .create_topic(create_request("rep", 3, 3))
        .await
        .expect("create rf 3");
    let err = c2
        .admin
        .create_topic(create_request("too-many", 1, 4))
        .await
        .expect_err("rf 4 on 3 brokers");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("replication factor 4"), "{err:?}");
    let err = c2
        .admin
        .create_topic(create_request("rep", 3, 3))
        .await
        .expect_err("twice");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut leaders = Vec::new();
    for p in 0..3 {
        let leader = cluster
            .wait_partition_leader("rep", p, DEADLINE)
            .await
            .expect("partition leader");
        leaders.push(leader);
        let mut c = clients(&cluster, leader).await;
        let values: Vec<String> = (0..10).map(|i| format!("p{p}-v{i}")).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let base = c
            .produce_values("rep", p, &refs[..5])
            .await
            .expect("produce");
        assert_eq!(base, 0);
        let base = c
            .produce_values("rep", p, &refs[5..])
            .await
            .expect("produce");
        assert_eq!(base, 5, "offsets follow on");

        // A follower refuses, and names the leader.
        let follower = cluster.another(leader);
        let mut f = clients(&cluster, follower).await;
        let err = f
            .produce_values("rep", p, &["nope"])
            .await
            .expect_err("a follower refuses");
        let status = err.downcast_ref::<tonic::Status>().expect("status");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let named = status
            .metadata()
            .get("rill-leader")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(named, Some(cluster.addr(leader).to_string()));

        // Every replica holds the same records at the same offsets, and nothing else.
        for id in cluster.ids() {
            wait_records(&cluster, id, "rep", p, 10).await;
            let got = read_all(&cluster, id, "rep", p).await;
            let want: BTreeMap<u64, String> = values
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, v)| (i as u64, v))
                .collect();
            assert_eq!(got, want, "node {id} partition {p}");
        }
    }
    // `rill topic describe` shows, per partition, the leader, the replicas, and each
    // replica in sync (all caught up by now).
    let addr = cluster.addr(2).to_string();
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (ok, out, err) =
            rill_tests::rill_cli(&addr, &["--output", "json", "topic", "describe", "rep"], "")
                .await
                .expect("cli");
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let parts = v["replication"].as_array().expect("replication").clone();
        assert_eq!(parts.len(), 3, "{v}");
        let all_in_sync = parts.iter().all(|p| {
            p["replica_states"]
                .as_array()
                .is_some_and(|r| r.len() == 3 && r.iter().all(|x| x["in_sync"] == true))
        });
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p["leader"], leaders[i], "{v}");
            assert_eq!(p["replicas"].as_array().map(Vec::len), Some(3), "{v}");
        }
        if all_in_sync {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "replicas never all in sync: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, err) = rill_tests::rill_cli(&addr, &["topic", "describe", "rep"], "")
        .await
        .expect("cli");
    assert!(ok, "{err}");
    assert!(out.contains("REPLICAS") && out.contains("in-sync"), "{out}");

    // Cluster status, asked anywhere, lists each partition under its leader.
    let status = cluster.status(2).await.expect("status");
    for (p, leader) in leaders.iter().enumerate() {
        let b = status
            .brokers
            .iter()
            .find(|b| b.node_id == *leader)
            .expect("leader listed");
        assert!(b.partitions_led.contains(&format!("rep/{p}")), "{status:?}");
    }

    // Placement spreads the preferred leaders: three partitions, three different brokers.
    leaders.sort_unstable();
    leaders.dedup();
    assert_eq!(leaders.len(), 3, "leaders spread over the brokers");
}

/// kill -9 of the partition leader, again and again, while a producer writes to whoever
/// leads: every acknowledged record is on every replica exactly once, at its acknowledged
/// offset, in order; all replicas agree offset by offset; a replica's high watermark never
/// goes back. Each broker also gets `extra`; each value is padded to at least `value_bytes`;
/// writes ask for `ack` (`None`: the default, `quorum`); the topic is flushed `always` when
/// `flush_always`. Returns the cluster, still running.
async fn kill_the_leader(
    kills: usize,
    extra: Extra,
    value_bytes: usize,
    ack: Option<pb::AckMode>,
    flush_always: bool,
) -> TestCluster {
    let mut cluster = TestCluster::start_with(3, extra).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 1).await;
    let mut topic = create_request("k", 1, 3);
    if flush_always {
        if let Some(config) = topic.config.as_mut() {
            config.flush = Some(pb::FlushPolicy {
                policy: Some(pb::flush_policy::Policy::Always(pb::Always {})),
            });
        }
    }
    c.admin.create_topic(topic).await.expect("create");
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut hwm_seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut elections = 0;
    let mut next_value = 0u64;
    let mut last_leader = 0;
    for kill in 0..=kills {
        let leader = cluster
            .wait_partition_leader("k", 0, DEADLINE)
            .await
            .expect("leader");
        if leader != last_leader {
            elections += 1;
            last_leader = leader;
        }
        let mut c = clients(&cluster, leader).await;
        // A few acknowledged writes on this leader; a write that fails is not acknowledged
        // and is not checked (it may or may not have committed).
        for _ in 0..5 {
            let values: Vec<String> = (0..4)
                .map(|_| {
                    next_value += 1;
                    format!("v{next_value:0>value_bytes$}")
                })
                .collect();
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            if let Ok(base) = c.produce_values_acked("k", 0, &refs, ack).await {
                for (i, v) in values.into_iter().enumerate() {
                    let previous = acked.insert(base + i as u64, v);
                    assert!(
                        previous.is_none(),
                        "offset {} acknowledged twice",
                        base + i as u64
                    );
                }
            }
        }
        // A consumer on every running replica: the high watermark never moves back.
        for id in cluster.running() {
            let mut r = clients(&cluster, id).await;
            if let Ok(resp) = r.fetch("k", 0, 0, 0).await {
                let before = hwm_seen.insert(id, resp.high_watermark).unwrap_or(0);
                assert!(
                    resp.high_watermark >= before,
                    "node {id}: high watermark went back from {before} to {}",
                    resp.high_watermark
                );
            }
        }
        if kill < kills {
            cluster.kill(leader).await.expect("kill -9");
            cluster
                .wait_partition_leader("k", 0, DEADLINE)
                .await
                .expect("new leader");
            cluster.restart(leader).await.expect("restart");
        }
    }
    let end = acked.keys().next_back().map_or(0, |o| o + 1);
    let mut lost = 0;
    let mut logs = Vec::new();
    for id in cluster.ids() {
        wait_records(&cluster, id, "k", 0, end).await;
        let got = read_all(&cluster, id, "k", 0).await;
        for (offset, value) in &acked {
            if got.get(offset) != Some(value) {
                lost += 1;
            }
        }
        // Exactly once: no value appears at two offsets.
        let mut seen = std::collections::HashSet::new();
        for v in got.values() {
            assert!(seen.insert(v.clone()), "node {id}: {v} appears twice");
        }
        logs.push((id, got));
    }
    // All replicas agree on every offset they share.
    for (id, log) in &logs[1..] {
        for (offset, value) in log {
            if let Some(other) = logs[0].1.get(offset) {
                assert_eq!(
                    other, value,
                    "nodes {} and {id} differ at offset {offset}",
                    logs[0].0
                );
            }
        }
    }
    println!(
        "kill -9 loop: kills {kills}, elections {elections}, records acked {}, records lost {lost}",
        acked.len()
    );
    assert_eq!(lost, 0, "acknowledged records lost");
    assert!(!acked.is_empty());
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_ten_times_loses_no_acknowledged_record() {
    kill_the_leader(10, Extra::default(), 0, None, false).await;
}

/// The same with Raft log files of 4 KiB, values of 300 bytes and a snapshot every 8
/// entries: every leader term seals files, purges delete them, and each kill -9 lands among them (a crash mid-seal,
/// sealed files not yet synced, deletions pending), so a restart replays several files.
/// The topic is flushed `always` and the writes ask for `durable` acks: a batch of a topic
/// flushed `always` is kept whole in the Raft log, where any other plain batch is written to
/// the partition log with only a 29-byte stub in the Raft log (docs/REPLICATION.md, "The
/// partition log as the Raft log"), and the files would hardly fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_with_small_raft_log_files_loses_no_acknowledged_record() {
    let extra = Extra::args(&[
        "--raft-log-segment-bytes",
        "4096",
        "--raft-snapshot-entries",
        "8",
    ]);
    let cluster = kill_the_leader(6, extra, 300, Some(pb::AckMode::Durable), true).await;
    // The test did what it is for: some group sealed several files and deleted the first.
    let mut sealed_and_deleted = false;
    for id in cluster.ids() {
        let raft = cluster.data_dir(id).join("raft");
        for group in std::fs::read_dir(&raft).expect("raft folder").flatten() {
            let seqs: Vec<u64> = std::fs::read_dir(group.path())
                .map(|files| {
                    files
                        .flatten()
                        .filter_map(|f| {
                            let name = f.file_name().into_string().ok()?;
                            match name.as_str() {
                                "log" => Some(0),
                                other => other.strip_prefix("log.")?.parse().ok(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            if seqs.iter().max().is_some_and(|&m| m >= 3) && !seqs.contains(&0) {
                sealed_and_deleted = true;
            }
        }
    }
    assert!(
        sealed_and_deleted,
        "no group sealed and deleted Raft log files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 50 leader kills"]
async fn kill_9_of_the_leader_fifty_times_loses_no_acknowledged_record() {
    kill_the_leader(50, Extra::default(), 0, None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_steps_down_and_its_late_writes_are_not_acknowledged_then_lost() {
    let cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 1).await;
    c.admin
        .create_topic(create_request("pause", 1, 3))
        .await
        .expect("create");
    let old = cluster
        .wait_partition_leader("pause", 0, DEADLINE)
        .await
        .expect("leader");
    let mut on_old = clients(&cluster, old).await;
    on_old
        .produce_values("pause", 0, &["before"])
        .await
        .expect("produce before the pause");

    cluster.signal(old, "STOP").await.expect("SIGSTOP");
    // A write sent to the paused leader waits in its socket until it runs again.
    let late = tokio::spawn(async move { on_old.produce_values("pause", 0, &["late"]).await });
    // The others elect a new leader and take writes.
    let until = tokio::time::Instant::now() + DEADLINE;
    let new = loop {
        let mut found = None;
        for id in cluster.ids().into_iter().filter(|id| *id != old) {
            if let Ok(m) = cluster.metadata(id, "pause").await {
                let l = m
                    .topics
                    .first()
                    .and_then(|t| t.partitions.first())
                    .map_or(0, |p| p.leader);
                if l != 0 && l != old {
                    found = Some(l);
                }
            }
        }
        if let Some(l) = found {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no new leader while paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut on_new = clients(&cluster, new).await;
    on_new
        .produce_values("pause", 0, &["during"])
        .await
        .expect("the new leader takes writes");

    cluster.signal(old, "CONT").await.expect("SIGCONT");
    let late = tokio::time::timeout(DEADLINE, late)
        .await
        .expect("the late write is answered")
        .expect("task");
    // The old leader stepped down: it now refuses writes and names the new leader.
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut c = clients(&cluster, old).await;
        match c.produce_values("pause", 0, &["refused"]).await {
            Err(e) => {
                let status = e.downcast_ref::<tonic::Status>().expect("status");
                if status.code() == Code::FailedPrecondition {
                    break;
                }
            }
            Ok(_) => panic!("the old leader took a write after the new one was elected"),
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the old leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every replica agrees; "before" and "during" are there; "late" is there exactly where
    // it was acknowledged, or nowhere if it was refused.
    for id in cluster.ids() {
        wait_records(&cluster, id, "pause", 0, 2).await;
    }
    let logs: Vec<_> = {
        let mut v = Vec::new();
        for id in cluster.ids() {
            v.push(read_all(&cluster, id, "pause", 0).await);
        }
        v
    };
    let longest = logs.iter().max_by_key(|l| l.len()).expect("logs").clone();
    for log in &logs {
        for (o, v) in log {
            assert_eq!(longest.get(o), Some(v), "replicas differ at offset {o}");
        }
    }
    let values: Vec<&String> = longest.values().collect();
    assert_eq!(values[0], "before");
    assert!(values.iter().any(|v| *v == "during"));
    match late {
        Ok(offset) => assert_eq!(longest.get(&offset).map(String::as_str), Some("late")),
        Err(_) => assert!(
            !values.iter().any(|v| *v == "late"),
            "a refused write appeared"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_data_folder_rebuilds_from_the_others() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 1).await;
    c.admin
        .create_topic(create_request("lost", 1, 3))
        .await
        .expect("create");
    let leader = cluster
        .wait_partition_leader("lost", 0, DEADLINE)
        .await
        .expect("leader");
    let mut on_leader = clients(&cluster, leader).await;
    let values: Vec<String> = (0..30).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    for chunk in refs.chunks(10) {
        on_leader
            .produce_values("lost", 0, chunk)
            .await
            .expect("produce");
    }
    let victim = cluster.another(leader);
    cluster.kill(victim).await.expect("kill");
    cluster.wipe(victim).expect("wipe");
    cluster.restart(victim).await.expect("restart");
    wait_records(&cluster, victim, "lost", 0, 30).await;
    let got = read_all(&cluster, victim, "lost", 0).await;
    let want: BTreeMap<u64, String> = values
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, v)| (i as u64, v))
        .collect();
    assert_eq!(got, want, "the rebuilt replica holds the same records");
    // And it follows new writes.
    let leader = cluster
        .wait_partition_leader("lost", 0, DEADLINE)
        .await
        .expect("leader");
    clients(&cluster, leader)
        .await
        .produce_values("lost", 0, &["after"])
        .await
        .expect("produce after");
    wait_records(&cluster, victim, "lost", 0, 31).await;
}

/// The client library, given several bootstrap addresses (the first dead), follows the
/// partition leader as it is killed and re-elected: every record is acknowledged, in order,
/// at consecutive offsets, and each is in the log once at its acknowledged offset (a retry
/// after a lost acknowledgement could duplicate; none is lost or reordered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_leader_changes_without_reordering() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 1).await;
    c.admin
        .create_topic(create_request("follow", 1, 3))
        .await
        .expect("create");
    let first = cluster
        .wait_partition_leader("follow", 0, DEADLINE)
        .await
        .expect("leader");
    // Bootstrap through a dead address, then every broker, the leader first: the broker
    // the producer first connects to is killed too.
    let dead = rill_tests::cluster::free_ports(1).expect("port")[0];
    let mut list = format!("127.0.0.1:{dead}");
    let mut order = vec![first];
    order.extend(cluster.ids().into_iter().filter(|id| *id != first));
    for id in order {
        list.push_str(&format!(",{}", cluster.addr(id)));
    }
    let conn = rill_client::Connection::connect(&list)
        .await
        .expect("connect through the list");
    let producer = rill_client::Producer::new(
        conn,
        rill_client::ProducerConfig::new().retry_timeout_ms(30_000),
    );
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut n = 0;
    for round in 0..4 {
        for _ in 0..10 {
            n += 1;
            let value = format!("m{n}");
            let (_, offset) = producer
                .send_and_wait(
                    rill_client::ProducerRecord::new("follow", value.clone()).partition(0),
                )
                .await
                .expect("acknowledged through leader changes");
            if let Some((last, _)) = acked.iter().next_back() {
                assert!(offset > *last, "offsets only grow: {offset} after {last}");
            }
            acked.insert(offset, value);
        }
        if round < 3 {
            let leader = cluster
                .wait_partition_leader("follow", 0, DEADLINE)
                .await
                .expect("leader");
            cluster.kill(leader).await.expect("kill");
            cluster.restart(leader).await.expect("restart");
        }
    }
    let end = acked.keys().next_back().map_or(0, |o| o + 1);
    for id in cluster.ids() {
        wait_records(&cluster, id, "follow", 0, end).await;
        let got = read_all(&cluster, id, "follow", 0).await;
        for (offset, value) in &acked {
            assert_eq!(got.get(offset), Some(value), "node {id} offset {offset}");
        }
        // In order: the acknowledged values appear in the log in the order they were sent.
        let order: Vec<&String> = got
            .values()
            .filter(|v| acked.values().any(|a| a == *v))
            .collect();
        let sent: Vec<&String> = acked.values().collect();
        let mut dedup = order.clone();
        dedup.dedup();
        assert_eq!(dedup, sent, "node {id}: acknowledged records out of order");
    }
}

/// Replication factor 2 on 3 brokers: each partition has a broker without a replica, which
/// refuses both produce and fetch for it and points at a replica, instead of serving its
/// empty copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_replica_refuses_reads_and_writes_and_points_at_one() {
    let cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 3).await;
    c.admin
        .create_topic(create_request("two", 3, 2))
        .await
        .expect("create rf 2");
    for p in 0..3 {
        let leader = cluster
            .wait_partition_leader_among("two", p, DEADLINE)
            .await
            .expect("leader");
        clients(&cluster, leader)
            .await
            .produce_values("two", p, &["x"])
            .await
            .expect("produce at the leader");
        let m = cluster.metadata(leader, "two").await.expect("metadata");
        let replicas = m.topics[0].partitions[p as usize].replicas.clone();
        assert_eq!(replicas.len(), 2);
        let outsider = cluster
            .ids()
            .into_iter()
            .find(|id| !replicas.contains(id))
            .expect("a broker without a replica");
        let mut o = clients(&cluster, outsider).await;
        let err = o.fetch("two", p, 0, 0).await.expect_err("no replica here");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let named = err
            .metadata()
            .get("rill-leader")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("a replica named");
        assert!(
            replicas
                .iter()
                .any(|r| cluster.addr(*r).to_string() == named),
            "{named} is a replica"
        );
        assert!(o.produce_values("two", p, &["y"]).await.is_err());
        // It still names the leader, asked from a replica: in `Metadata` and in the
        // cluster status, so `rill topic describe` and `rill cluster status` tell the truth
        // anywhere.
        let seen = cluster.metadata(outsider, "two").await.expect("metadata");
        let part = &seen.topics[0].partitions[p as usize];
        assert_eq!(
            (part.leader, part.leader_address.clone()),
            (leader, cluster.addr(leader).to_string()),
            "the outsider's view of two/{p}: {part:?}"
        );
        let status = cluster.status(outsider).await.expect("status");
        let listed = status
            .brokers
            .iter()
            .find(|b| b.node_id == leader)
            .is_some_and(|b| b.partitions_led.contains(&format!("two/{p}")));
        assert!(listed, "two/{p} under its leader {leader}: {status:?}");
        for r in replicas {
            wait_records(&cluster, r, "two", p, 1).await;
        }
    }
}
