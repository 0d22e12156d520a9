//! A *silent* network partition on 3 real broker processes: the leader of a partition is cut
//! off from the other two brokers through the harness's proxies
//! (`TestCluster::isolate_silently`), which keep every broker-to-broker connection open but
//! forward nothing on it, new ones included: no reset, no end of stream, as behind a dead
//! switch or a firewall dropping packets. Only timeouts can notice. Clients still reach every
//! broker. While the client library's producers (`quorum` acks, bootstrapped at the isolated
//! broker first) keep writing:
//! - a produce sent straight to the isolated leader is never acknowledged and then lost (it
//!   fails with UNAVAILABLE after its deadline, or is acknowledged and found on every replica);
//! - the other two elect a new leader and keep acknowledging writes;
//! - `ClusterStatus` on the majority side reports the isolated broker not live (its pings go
//!   unanswered), and the CLI says so too; the isolated broker reports the others not live;
//! - a group call at the isolated broker that it forwards to a coordinator on the other side
//!   fails with UNAVAILABLE within a bound (the peer connection's HTTP/2 keep-alive) instead
//!   of waiting forever on the held connection.
//!
//! After healing (the held connections resume, as on a real network) every partition has one
//! agreed leader, every replica is in sync, and every acknowledged record is on every broker
//! exactly once at its acknowledged offset.
//!
//! Anything in the brokers that waits on a peer connection without a deadline hangs here,
//! where the refusing partition of `cluster_partition.rs` would have broken it at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{create_request, TestCluster};
use tonic::Code;

/// The longest an election, a commit, a status change or a catch-up may take here.
const DEADLINE: Duration = Duration::from_secs(30);
/// The topic's partitions.
const PARTITIONS: u32 = 3;
/// The topic.
const TOPIC: &str = "silent";
/// The groups whose offsets are asked at the isolated broker during the split: spread over
/// the partitions of the groups topic, so some are coordinated on the other side.
const GROUPS: u32 = 12;
/// The longest a call forwarded to a peer across the silent partition may take to fail:
/// far above the peer connection's keep-alive bound (about 4 s), far below forever.
const FORWARD_BOUND: Duration = Duration::from_secs(15);

/// The leader of partition `p` as node `id` reports it, with its term (0, 0: none known or
/// no answer).
async fn leader_seen(cluster: &TestCluster, id: u64, p: u32) -> (u64, u64) {
    cluster
        .metadata(id, TOPIC)
        .await
        .ok()
        .and_then(|m| {
            m.topics
                .first()
                .and_then(|t| t.partitions.get(p as usize))
                .map(|x| (x.leader, x.leader_term))
        })
        .unwrap_or((0, 0))
}

/// Waits until every node of `asked` names the same leader of partition `p`, one that is
/// not `not`, and returns it.
async fn wait_agreed_leader(cluster: &TestCluster, asked: &[u64], p: u32, not: u64) -> u64 {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut seen = Vec::new();
        for id in asked {
            seen.push(leader_seen(cluster, *id, p).await.0);
        }
        if seen[0] != 0 && seen[0] != not && seen.iter().all(|l| *l == seen[0]) {
            return seen[0];
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{asked:?} never agreed on a leader of {TOPIC}/{p} (other than {not}): {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every high watermark seen, per node and partition; fails if one goes back.
#[derive(Default)]
struct Watermarks(HashMap<(u64, u32), u64>);

impl Watermarks {
    async fn observe(&mut self, cluster: &TestCluster) {
        for id in cluster.ids() {
            let Ok(mut c) = cluster.clients(id).await else {
                continue;
            };
            for p in 0..PARTITIONS {
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(2), c.fetch(TOPIC, p, 0, 0)).await
                else {
                    continue;
                };
                let before = self.0.insert((id, p), resp.high_watermark).unwrap_or(0);
                assert!(
                    resp.high_watermark >= before,
                    "node {id} {TOPIC}/{p}: high watermark went back from {before} to {}",
                    resp.high_watermark
                );
            }
        }
    }
}

/// One producer's outcome: partition, offset → value acknowledged, when each acknowledged
/// send started and ended, and how many sends failed.
type Outcome = (
    u32,
    BTreeMap<u64, String>,
    Vec<(tokio::time::Instant, tokio::time::Instant)>,
    u64,
);

/// A producer of the client library with `quorum` acks writing to partition `p` one record
/// at a time until `stop`.
fn spawn_producer(
    conn: rill_client::Connection,
    p: u32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Outcome> {
    let producer = rill_client::Producer::new(
        conn,
        rill_client::ProducerConfig::new()
            .acks(rill_client::Acks::Quorum)
            .retry_timeout_ms(DEADLINE.as_millis() as u64),
    );
    tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        let mut times = Vec::new();
        let mut failed = 0u64;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let value = format!("p{p}-m{n}");
            let record = rill_client::ProducerRecord::new(TOPIC, value.clone()).partition(p);
            let started = tokio::time::Instant::now();
            match producer.send_and_wait(record).await {
                Ok((_, offset)) => {
                    let previous = acked.insert(offset, value);
                    assert!(previous.is_none(), "{p}/{offset} acknowledged twice");
                    times.push((started, tokio::time::Instant::now()));
                }
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (p, acked, times, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_isolated_leader_loses_no_acknowledged_record_and_the_majority_carries_on() {
    // Built now, so no build runs while the clock of the partition runs.
    let test_start = tokio::time::Instant::now();
    rill_tests::binary_path("rill").expect("build the rill CLI");
    eprintln!("[{:?}] cli", test_start.elapsed());
    let cluster = TestCluster::start_partitionable(3).await.expect("start");
    eprintln!("[{:?}] started", test_start.elapsed());
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    eprintln!("[{:?}] controller", test_start.elapsed());
    let mut c = cluster.clients(1).await.expect("connect");
    c.admin
        .create_topic(create_request(TOPIC, PARTITIONS, 3))
        .await
        .expect("create rf 3");
    let old = cluster
        .wait_partition_leader(TOPIC, 0, DEADLINE)
        .await
        .expect("leader");
    eprintln!("[{:?}] leader", test_start.elapsed());
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let mut watermarks = Watermarks::default();

    // The isolated broker first among the bootstrap addresses: the producers start there and
    // must leave it for the leader the majority elects.
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
        producers.push(spawn_producer(conn, p, stop.clone()));
    }
    eprintln!("[{:?}] producers", test_start.elapsed());
    for p in 0..PARTITIONS {
        cluster
            .wait_records(old, TOPIC, p, 5, DEADLINE)
            .await
            .expect("writes before the partition");
    }
    watermarks.observe(&cluster).await;

    eprintln!("[{:?}] isolating node {old}", test_start.elapsed());
    cluster.isolate_silently(old).expect("isolate silently");
    let isolated_at = tokio::time::Instant::now();

    // Straight to the isolated leader: it cannot reach a quorum, and nothing tells it so
    // but its own deadline.
    let mut on_old = cluster.clients(old).await.expect("connect to the isolated");
    let direct = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(DEADLINE, on_old.produce_values(TOPIC, 0, &["direct"]))
            .await
            .expect("the isolated leader answers within its deadline");
        (result, started.elapsed())
    });

    // Group calls at the isolated broker for groups coordinated on the other side are
    // forwarded over a held connection; they must fail (UNAVAILABLE, for the client to
    // retry elsewhere) within a bound rather than wait forever.
    let group_calls = {
        let c = cluster.clients(old).await.expect("connect to the isolated");
        let mut calls = Vec::new();
        for g in 0..GROUPS {
            let mut c = c.clone();
            calls.push(tokio::spawn(async move {
                let request = pb::FetchOffsetsRequest {
                    group: format!("g{g}"),
                    topic: TOPIC.into(),
                    ..Default::default()
                };
                let started = tokio::time::Instant::now();
                let answer = tokio::time::timeout(FORWARD_BOUND, c.groups.fetch_offsets(request))
                    .await
                    .map(|a| a.map(|_| ()).map_err(|s| s.code()));
                (g, answer, started.elapsed())
            }));
        }
        calls
    };

    // The majority elects a new leader of partition 0, which takes writes.
    let new = wait_agreed_leader(&cluster, &majority, 0, old).await;
    let elected_after = isolated_at.elapsed();
    let mut on_new = cluster
        .clients(new)
        .await
        .expect("connect to the new leader");
    let majority_offset = on_new
        .produce_values(TOPIC, 0, &["majority"])
        .await
        .expect("the new leader takes writes");
    watermarks.observe(&cluster).await;

    // Cluster status on the majority side tells the truth: the isolated broker's pings go
    // unanswered, so it is not live; the CLI says the same.
    for id in &majority {
        cluster
            .wait_live(*id, &majority, DEADLINE)
            .await
            .expect("the majority reports the silently isolated broker not live");
    }
    let status_after = isolated_at.elapsed();
    // And the isolated broker, whose pings go unanswered too, reports the others not live.
    cluster
        .wait_live(old, &[old], DEADLINE)
        .await
        .expect("the isolated broker reports the others not live");
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
    assert_ne!(v["controller_leader"], old, "rill cluster status: {v}");

    let (direct, waited) = direct.await.expect("task");
    let direct_offset = match direct {
        Ok(offset) => Some(offset),
        Err(e) => {
            let status = e.downcast::<tonic::Status>().expect("a gRPC status");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                waited >= Duration::from_secs(1),
                "refused after {waited:?}: it should wait for a quorum until its deadline"
            );
            None
        }
    };
    let mut forwarded_failed = 0;
    for call in group_calls {
        let (g, answer, took) = call.await.expect("task");
        match answer {
            Err(_) => panic!(
                "FetchOffsets of group g{g} at the isolated broker hung past {FORWARD_BOUND:?} \
                 (a call waiting on a silent peer connection)"
            ),
            Ok(Ok(())) => {}
            Ok(Err(Code::Unavailable)) => forwarded_failed += 1,
            Ok(Err(code)) => panic!("FetchOffsets of group g{g}: {code:?} after {took:?}"),
        }
    }
    // The producers keep working against the new leaders a little longer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watermarks.observe(&cluster).await;
    let isolated_for = isolated_at.elapsed();

    eprintln!("[{:?}] healing", test_start.elapsed());
    // Heal: the held connections resume.
    let healed_at = tokio::time::Instant::now();
    cluster.heal().expect("heal");
    let all = cluster.ids();
    let mut leaders = Vec::new();
    for p in 0..PARTITIONS {
        leaders.push(wait_agreed_leader(&cluster, &all, p, 0).await);
    }
    eprintln!(
        "[{:?}] healed: leaders agreed {leaders:?}",
        healed_at.elapsed()
    );
    for id in &all {
        cluster
            .wait_live(*id, &all, DEADLINE)
            .await
            .expect("every broker live again");
    }
    eprintln!("[{:?}] healed: all live", healed_at.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked_total = 0;
    let mut lost = 0;
    let mut in_split_total = 0;
    let mut p0_in_split = 0;
    for producer in producers {
        let (p, acked, times, failed) = tokio::time::timeout(DEADLINE, producer)
            .await
            .expect("producer stops")
            .expect("producer task");
        assert!(!acked.is_empty(), "partition {p}: nothing acknowledged");
        let in_split = times
            .iter()
            .filter(|(started, done)| *started >= isolated_at && *done < healed_at)
            .count();
        in_split_total += in_split;
        if p == 0 {
            p0_in_split = in_split;
        }
        acked_total += acked.len();

        // Every replica in sync, as the agreed leader sees it.
        let leader = leaders[p as usize];
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let in_sync = cluster
                .metadata(leader, TOPIC)
                .await
                .ok()
                .and_then(|m| {
                    m.topics
                        .first()
                        .and_then(|t| t.partitions.get(p as usize))
                        .map(|x| x.in_sync.clone())
                })
                .unwrap_or_default();
            if all.iter().all(|id| in_sync.contains(id)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{TOPIC}/{p}: leader {leader} reports in sync only {in_sync:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        eprintln!("[{:?}] {p}: in sync", healed_at.elapsed());
        // Every replica up to the furthest end any of them reports.
        let mut end = acked.keys().next_back().map_or(0, |o| o + 1);
        for id in &all {
            if let Ok(r) = cluster
                .clients(*id)
                .await
                .expect("connect")
                .fetch(TOPIC, p, 0, 0)
                .await
            {
                end = end.max(r.high_watermark);
            }
        }
        let mut logs = Vec::new();
        for id in &all {
            cluster
                .wait_records(*id, TOPIC, p, end, DEADLINE)
                .await
                .expect("caught up");
            logs.push((*id, cluster.read_all(*id, TOPIC, p).await.expect("read")));
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
            // Exactly once: an acknowledged value appears at its offset and nowhere else.
            for (offset, value) in log {
                assert!(
                    !acked.values().any(|a| a == value) || acked.get(offset) == Some(value),
                    "node {id} {p}: {value} at {offset} as well"
                );
            }
            if p == 0 {
                let at = |v: &str| {
                    log.iter()
                        .filter(|(_, x)| *x == v)
                        .map(|(o, _)| *o)
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    at("majority"),
                    vec![majority_offset],
                    "node {id}: the new leader's write"
                );
                // The direct write: acknowledged means kept, at its offset; refused means it
                // never committed (the isolated leader's log tail, in an older term, gave way
                // to the new leader's when the network healed).
                let want: Vec<u64> = direct_offset.into_iter().collect();
                assert_eq!(
                    at("direct"),
                    want,
                    "node {id}: the write sent to the isolated leader"
                );
            }
        }
        eprintln!("[{:?}] {p}: read", healed_at.elapsed());
        for (id, log) in &logs[1..] {
            assert_eq!(
                log, &logs[0].1,
                "nodes {} and {id} differ on {p}",
                logs[0].0
            );
        }
        println!(
            "partition {p}: {} acknowledged ({in_split} sent and acknowledged during the \
             split), {failed} sends failed",
            acked.len()
        );
    }
    watermarks.observe(&cluster).await;
    println!(
        "silent network partition: kills 0, pauses 0, partitions 1 ({} ms), elections 1 \
         (new leader after {} ms, isolated broker not live after {} ms), records acked \
         {acked_total} ({in_split_total} during the split), records lost {lost}, direct \
         write to the isolated leader {}, group calls forwarded from it failed \
         {forwarded_failed} of {GROUPS}",
        isolated_for.as_millis(),
        elected_after.as_millis(),
        status_after.as_millis(),
        match direct_offset {
            Some(o) => format!("acknowledged at {o}"),
            None => format!("UNAVAILABLE after {} ms", waited.as_millis()),
        }
    );
    assert_eq!(lost, 0, "acknowledged records lost");
    assert!(
        p0_in_split > 0,
        "partition 0 acknowledged nothing while its old leader was silently isolated"
    );
}
