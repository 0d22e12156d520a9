//! A network partition on 3 real broker processes: broker-to-broker traffic goes through
//! fault-injecting proxies (`TestCluster::start_partitionable`), clients reach every broker
//! directly. The leader of a partition is cut off from the other two brokers while
//! producers keep writing: the isolated leader acknowledges nothing (a produce there fails
//! with UNAVAILABLE after its deadline), the majority elects a new leader and takes writes,
//! `ClusterStatus` reports the isolated broker down, and after healing the old leader
//! rejoins as a follower and holds exactly what the others hold. The client library's
//! producers, bootstrapped at the isolated broker first, leave it for the new leader and
//! keep the isolated leader's partition taking writes during the split, with no duplicate.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::TestCluster;
use rill_tests::Clients;
use tonic::Code;

/// The longest an election, a commit or a catch-up may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// The topic's partitions.
const PARTITIONS: u32 = 3;

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

/// The leader of partition `p` as each of `asked` reports it (0: none known).
async fn leaders_seen(cluster: &TestCluster, asked: &[u64], topic: &str, p: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for id in asked {
        let leader = cluster.metadata(*id, topic).await.ok().and_then(|m| {
            m.topics
                .first()
                .and_then(|t| t.partitions.get(p as usize))
                .map(|x| x.leader)
        });
        out.push(leader.unwrap_or(0));
    }
    out
}

/// Records every high watermark seen, per node and partition, and fails if one goes back.
#[derive(Default)]
struct Watermarks(HashMap<(u64, u32), u64>);

impl Watermarks {
    async fn observe(&mut self, cluster: &TestCluster, topic: &str) {
        for id in cluster.ids() {
            let Ok(mut c) = Clients::connect(format!("http://{}", cluster.addr(id))).await else {
                continue;
            };
            for p in 0..PARTITIONS {
                if let Ok(resp) = c.fetch(topic, p, 0, 0).await {
                    let before = self.0.insert((id, p), resp.high_watermark).unwrap_or(0);
                    assert!(
                        resp.high_watermark >= before,
                        "node {id} {topic}/{p}: high watermark went back from {before} to {}",
                        resp.high_watermark
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_acknowledges_nothing_that_is_lost_and_rejoins_as_follower() {
    // Built now, so no build runs while the clock of the partition runs.
    rill_tests::binary_path("rill").expect("build the rill CLI");
    let cluster = TestCluster::start_partitionable(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(&cluster, 1).await;
    c.admin
        .create_topic(pb::CreateTopicRequest {
            name: "net".into(),
            config: Some(pb::TopicConfig {
                partitions: PARTITIONS,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create rf 3");
    let old = cluster
        .wait_partition_leader("net", 0, DEADLINE)
        .await
        .expect("leader");
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let mut watermarks = Watermarks::default();

    // Producers, one per partition, through the client library with every broker as
    // bootstrap, the one about to be isolated first (the broker they first connect to):
    // they find the leaders through `Metadata`, follow leader changes and retry through
    // them, and leave the isolated leader for the one the majority elects.
    let bootstrap = std::iter::once(old)
        .chain(majority.iter().copied())
        .map(|id| cluster.addr(id).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PARTITIONS {
        let conn = rill_client::Connection::connect(&bootstrap)
            .await
            .expect("connect");
        // `durable`, the strongest ack: a replicated write is acknowledged only once a
        // majority holds it.
        let producer = rill_client::Producer::new(
            conn,
            rill_client::ProducerConfig::new()
                .acks(rill_client::Acks::Durable)
                .retry_timeout_ms(DEADLINE.as_millis() as u64),
        );
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let mut acked: BTreeMap<u64, String> = BTreeMap::new();
            // When each acknowledged send started and ended.
            let mut times: Vec<(tokio::time::Instant, tokio::time::Instant)> = Vec::new();
            let mut failed = 0u64;
            let mut n = 0u64;
            let mut last_offset = None;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let value = format!("p{p}-m{n}");
                let record = rill_client::ProducerRecord::new("net", value.clone()).partition(p);
                let started = tokio::time::Instant::now();
                match producer.send_and_wait(record).await {
                    Ok((_, offset)) => {
                        let previous = acked.insert(offset, value);
                        assert!(previous.is_none(), "{p}/{offset} acknowledged twice");
                        // One send at a time: each lands after the one before.
                        assert!(
                            last_offset.is_none_or(|l| offset > l),
                            "{p}: m{n} acknowledged at {offset}, after {last_offset:?}"
                        );
                        last_offset = Some(offset);
                        times.push((started, tokio::time::Instant::now()));
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (p, acked, times, failed)
        }));
    }
    // Some writes before the partition.
    for p in 0..PARTITIONS {
        wait_records(&cluster, old, "net", p, 5).await;
    }
    watermarks.observe(&cluster, "net").await;

    // Cut the leader of partition 0 off from the other two, both directions.
    cluster.isolate(old).expect("isolate");
    let isolated_at = tokio::time::Instant::now();

    // A produce sent straight to the isolated leader has no quorum: UNAVAILABLE after the
    // deadline, never an acknowledgement.
    let mut on_old = clients(&cluster, old).await;
    let no_quorum = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let result =
            tokio::time::timeout(DEADLINE, on_old.produce_values("net", 0, &["no-quorum"]))
                .await
                .expect("the isolated leader answers within its deadline");
        (result, started.elapsed())
    });

    // The majority elects a new leader of partition 0 and takes writes.
    let mut elections = 0;
    let until = tokio::time::Instant::now() + DEADLINE;
    let new = loop {
        let seen = leaders_seen(&cluster, &majority, "net", 0).await;
        if seen[0] != 0 && seen[0] != old && seen.iter().all(|l| *l == seen[0]) {
            break seen[0];
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no new leader on the majority side: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("[{:?}] new leader", isolated_at.elapsed());
    elections += 1;
    let mut on_new = clients(&cluster, new).await;
    on_new
        .produce_values("net", 0, &["majority"])
        .await
        .expect("the new leader takes writes");
    watermarks.observe(&cluster, "net").await;

    eprintln!("[{:?}] new leader took a write", isolated_at.elapsed());
    // Cluster status tells the truth on both sides.
    for id in &majority {
        cluster
            .wait_live(*id, &majority, DEADLINE)
            .await
            .expect("the majority reports the isolated broker down");
    }
    cluster
        .wait_live(old, &[old], DEADLINE)
        .await
        .expect("the isolated broker reports the others down");
    eprintln!("[{:?}] status agreed", isolated_at.elapsed());
    let (ok, out, err) = rill_tests::rill_cli(
        &cluster.addr(majority[0]).to_string(),
        &["--output", "json", "cluster", "status"],
        "",
    )
    .await
    .expect("cli");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let listed = v["brokers"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["node_id"] == old))
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["live"], false, "rill cluster status: {v}");

    eprintln!("[{:?}] cli", isolated_at.elapsed());
    let (no_quorum, waited) = no_quorum.await.expect("task");
    let status = no_quorum
        .expect_err("no write is acknowledged without a quorum")
        .downcast::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        waited >= Duration::from_secs(1),
        "refused after {waited:?}: it should wait for a quorum until its deadline"
    );
    eprintln!("[{:?}] no quorum answered", isolated_at.elapsed());
    // Let the producers work against the new leaders a little longer while isolated.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watermarks.observe(&cluster, "net").await;
    let isolated_for = isolated_at.elapsed();

    // Heal: the old leader rejoins as a follower of the new term.
    let healed_at = tokio::time::Instant::now();
    cluster.heal().expect("heal");
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let all = cluster.ids();
        let seen = leaders_seen(&cluster, &all, "net", 0).await;
        if seen[0] != 0 && seen.iter().all(|l| *l == seen[0]) {
            if seen[0] != new {
                elections += 1;
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the brokers never agreed on a leader after healing: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("[{:?}] healed leader agreed", isolated_at.elapsed());
    for id in cluster.ids() {
        cluster
            .wait_live(id, &cluster.ids(), DEADLINE)
            .await
            .expect("everyone live again");
    }
    eprintln!("[{:?}] all live", isolated_at.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked_total = 0;
    let mut lost = 0;
    let mut duplicates = 0;
    let mut isolated_partition_acked_in_split = 0;
    for producer in producers {
        let (p, acked, times, failed) = tokio::time::timeout(DEADLINE, producer)
            .await
            .expect("producer stops")
            .expect("producer task");
        assert!(!acked.is_empty(), "partition {p}: nothing acknowledged");
        // Sends made and acknowledged while the old leader was cut off: only a leader the
        // majority elected can have committed them.
        let in_split = times
            .iter()
            .filter(|(started, done)| *started >= isolated_at && *done < healed_at)
            .count();
        if p == 0 {
            isolated_partition_acked_in_split = in_split;
        }
        acked_total += acked.len();
        // Every replica up to the furthest end any of them reports (a write whose client
        // gave up may still have committed after the last acknowledged one).
        let mut end = acked.keys().next_back().map_or(0, |o| o + 1);
        for id in cluster.ids() {
            if let Ok(r) = clients(&cluster, id).await.fetch("net", p, 0, 0).await {
                end = end.max(r.high_watermark);
            }
        }
        let mut logs = Vec::new();
        for id in cluster.ids() {
            wait_records(&cluster, id, "net", p, end).await;
            logs.push((id, read_all(&cluster, id, "net", p).await));
        }
        for (id, log) in &logs {
            for (offset, value) in &acked {
                if log.get(offset) != Some(value) {
                    lost += 1;
                    eprintln!(
                        "node {id} {p}/{offset}: want {value}, got {:?}",
                        log.get(offset)
                    );
                }
            }
            // An acknowledged value appears nowhere else; a duplicate would be a retry of a
            // write whose first attempt committed unacknowledged, which the idempotent
            // producer's sequence numbers rule out.
            for (offset, value) in log {
                if acked.values().any(|a| a == value) && acked.get(offset) != Some(value) {
                    duplicates += 1;
                }
            }
            assert!(
                !log.values().any(|v| v == "no-quorum"),
                "node {id}: the write refused for want of a quorum appeared"
            );
        }
        // Every replica holds the same records at the same offsets.
        for (id, log) in &logs[1..] {
            assert_eq!(
                log, &logs[0].1,
                "nodes {} and {id} differ on {p}",
                logs[0].0
            );
        }
        if p == 0 {
            assert!(logs[0].1.values().any(|v| v == "majority"));
        }
        println!(
            "partition {p}: {} acknowledged ({in_split} sent and acknowledged during the \
             split), {failed} sends failed",
            acked.len()
        );
    }
    watermarks.observe(&cluster, "net").await;
    println!(
        "network partition: kills 0, pauses 0, partitions 1 ({} ms), elections {elections}, \
         records acked {acked_total}, records lost {lost}, retry duplicates {duplicates}",
        isolated_for.as_millis()
    );
    assert_eq!(lost, 0, "acknowledged records lost");
    assert_eq!(
        duplicates, 0,
        "records appended twice by the idempotent producer"
    );
    // The producer left the isolated leader for the new one: partition 0 kept taking
    // writes during the split (over 10 s: the no-quorum produce above waits its deadline).
    assert!(
        isolated_partition_acked_in_split > 0,
        "partition 0 acknowledged nothing while its old leader was isolated"
    );
}
