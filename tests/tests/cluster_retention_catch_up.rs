//! Snapshot catch-up past retention, on 3 real broker processes: a follower that was down
//! while the leader purged its Raft log behind a snapshot *and* every live replica deleted
//! the records it lacks by retention cannot pull them from anyone. It restarts its log empty
//! at the other replicas' log start and pulls from there: it ends with exactly the leader's
//! records, from the same log start.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{Extra, TestCluster};
use rill_tests::Clients;

/// The longest an election, a commit, a retention pass or a catch-up may take here.
const DEADLINE: Duration = Duration::from_secs(30);
/// Tiny segments and a retention of four of them (about 70 records), so a few hundred writes
/// delete most, while the log start stays well behind the leader's newest Raft snapshot.
const SEGMENT_BYTES: u64 = 4096;
const RETENTION_BYTES: i64 = 16384;

async fn clients(cluster: &TestCluster, id: u64) -> Clients {
    cluster.clients(id).await.expect("connect")
}

/// 3 brokers with a Raft snapshot every `snapshot_entries` entries and retention checked
/// every 100 ms, and `topic`: 1 partition, replication factor 3, tiny segments and retention.
async fn start_cluster(snapshot_entries: &str, topic: &str) -> TestCluster {
    let cluster = TestCluster::start_with(
        3,
        Extra::args(&[
            "--raft-snapshot-entries",
            snapshot_entries,
            "--retention-check-ms",
            "100",
        ]),
    )
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
            name: topic.into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                segment_bytes: Some(SEGMENT_BYTES),
                retention_bytes: Some(RETENTION_BYTES),
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create");
    cluster
}

/// A new idempotent producer's id and epoch (retried while the cluster settles).
async fn init_producer(cluster: &TestCluster) -> (i64, i32) {
    let c = clients(cluster, 1).await;
    let r = rill_tests::cluster::while_unavailable(DEADLINE, || {
        let mut log = c.log.clone();
        async move {
            log.init_producer(pb::InitProducerRequest {
                producer_name: None,
            })
            .await
        }
    })
    .await
    .expect("init producer")
    .into_inner();
    (r.producer_id, r.producer_epoch)
}

/// A follower of partition 0 of `topic`, once it holds the first `records` records.
async fn a_follower_holding(cluster: &TestCluster, topic: &str, records: u64) -> u64 {
    let leader = cluster
        .wait_partition_leader(topic, 0, DEADLINE)
        .await
        .expect("leader");
    let follower = cluster.another(leader);
    cluster
        .wait_records(follower, topic, 0, records, DEADLINE)
        .await
        .expect("records");
    follower
}

/// The value of record `i`: about 200 bytes, so a segment holds a dozen batches.
fn value(i: u64) -> String {
    format!("r{i}-{}", "x".repeat(200))
}

/// Node `id`'s log start and high watermark of partition 0.
async fn offsets(cluster: &TestCluster, id: u64, topic: &str) -> (u64, u64) {
    try_offsets(cluster, id, topic).await.expect("list offsets")
}

/// Node `id`'s log start and high watermark of partition 0, if it answers.
async fn try_offsets(cluster: &TestCluster, id: u64, topic: &str) -> Option<(u64, u64)> {
    let resp = cluster
        .clients(id)
        .await
        .ok()?
        .log
        .list_offsets(pb::ListOffsetsRequest {
            topic: topic.into(),
            partition: 0,
            spec: Some(pb::list_offsets_request::Spec::Position(
                pb::OffsetSpec::Earliest as i32,
            )),
        })
        .await
        .ok()?
        .into_inner();
    Some((resp.log_start_offset, resp.high_watermark))
}

/// Waits until node `id`'s high watermark of partition 0 reaches `end` (reading no records:
/// its log may start past 0).
async fn wait_end(cluster: &TestCluster, id: u64, topic: &str, end: u64) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = try_offsets(cluster, id, topic).await;
        if got.is_some_and(|(_, high_watermark)| high_watermark >= end) {
            return;
        }
        if tokio::time::Instant::now() >= until {
            // The broker's log goes with the test's folder: show its end here.
            let log = std::fs::read_to_string(cluster.log_path(id)).unwrap_or_default();
            let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
            panic!("node {id} never reached {end} records (now {got:?}); its log, newest first:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of partition 0 on node `id`, from its log start: offset → value.
async fn read_from_start(cluster: &TestCluster, id: u64, topic: &str) -> BTreeMap<u64, String> {
    let (mut offset, _) = offsets(cluster, id, topic).await;
    let mut c = clients(cluster, id).await;
    let mut out = BTreeMap::new();
    loop {
        let resp = c.fetch(topic, 0, offset, 0).await.expect("fetch");
        for r in &resp.records {
            out.insert(r.offset, String::from_utf8_lossy(&r.value).into_owned());
        }
        if resp.next_offset >= resp.high_watermark || resp.records.is_empty() {
            return out;
        }
        offset = resp.next_offset;
    }
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
        c.produce_values(topic, 0, &[&value(i)])
            .await
            .expect("produce");
    }
}

/// Waits until node `id`'s log of partition 0 starts past `offset` and ends at `end`.
async fn wait_start_past(cluster: &TestCluster, id: u64, topic: &str, offset: u64, end: u64) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (start, high_watermark) = offsets(cluster, id, topic).await;
        if start > offset && high_watermark == end {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "node {id}: log start {start} never passed {offset} (high watermark {high_watermark}, want {end})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_retention_restarts_its_log_at_the_leaders_log_start() {
    // A Raft snapshot every 20 entries, and retention every 100 ms.
    let mut cluster = start_cluster("20", "ret").await;
    let topic = "ret";
    write(&cluster, topic, 0, 5).await;
    let follower = a_follower_holding(&cluster, topic, 5).await;

    // Down (kill -9) while 200 entries are written: the Raft log is purged behind snapshots,
    // and retention deletes everything from the follower's end on, on both live replicas.
    cluster.kill(follower).await.expect("kill");
    let total = 205;
    write(&cluster, topic, 5, total - 5).await;
    for id in cluster.ids().into_iter().filter(|id| *id != follower) {
        wait_start_past(&cluster, id, topic, 5, total).await;
    }

    cluster.restart(follower).await.expect("restart");
    // Writes go on while it catches up (the snapshot it gets may end below the live
    // replicas' log start: the entries between are applied as already held).
    let more = 60;
    write(&cluster, topic, total, more).await;
    let total = total + more;
    wait_end(&cluster, follower, topic, total).await;
    let leader = cluster
        .wait_partition_leader_among(topic, 0, DEADLINE)
        .await
        .expect("leader");
    // Retention keeps running on every replica: wait until the two agree on the start (the
    // follower's own pass may trail by a tick).
    let until = tokio::time::Instant::now() + DEADLINE;
    let leader_start = loop {
        let (leader_start, _) = offsets(&cluster, leader, topic).await;
        let (follower_start, follower_end) = offsets(&cluster, follower, topic).await;
        if leader_start == follower_start {
            assert_eq!(follower_end, total);
            break leader_start;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "log starts differ: leader {leader_start}, follower {follower_start}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        leader_start > 5,
        "retention deleted nothing: {leader_start}"
    );
    let want = read_from_start(&cluster, leader, topic).await;
    let want_values: Vec<String> = (leader_start..total).map(value).collect();
    assert_eq!(want.values().cloned().collect::<Vec<_>>(), want_values);
    assert_eq!(want.keys().next(), Some(&leader_start));
    assert_eq!(read_from_start(&cluster, follower, topic).await, want);

    // And it follows new writes as an ordinary replica.
    write(&cluster, topic, total, 1).await;
    wait_end(&cluster, follower, topic, total + 1).await;
}

/// Whether a file named `name` is anywhere under `dir`.
fn holds_file(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                holds_file(&path, name)
            } else {
                path.file_name().is_some_and(|n| n == name)
            }
        })
}

/// One idempotent single-record produce to partition 0 through its current leader, retried
/// (the same sequence: the broker deduplicates) through elections until `DEADLINE`; returns
/// the offset the broker gave the record.
async fn produce_idempotent(
    cluster: &TestCluster,
    topic: &str,
    (id, epoch): (i64, i32),
    sequence: i32,
    value: &str,
) -> u64 {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leader = cluster
            .wait_partition_leader_among(topic, 0, DEADLINE)
            .await
            .expect("leader");
        let mut c = clients(cluster, leader).await;
        let request = pb::ProduceRequest {
            topic: topic.into(),
            partition: Some(0),
            ack: pb::AckMode::Quorum as i32,
            payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
                records: vec![pb::Record {
                    value: value.as_bytes().to_vec().into(),
                    ..Default::default()
                }],
            })),
            producer_id: Some(id),
            producer_epoch: Some(epoch),
            base_sequence: Some(sequence),
            ..Default::default()
        };
        match c.log.produce(request).await {
            Ok(resp) => {
                let appends = resp.into_inner().appends;
                assert_eq!(appends.len(), 1, "{appends:?}");
                return appends[0].base_offset;
            }
            Err(s) => assert!(
                tokio::time::Instant::now() < until,
                "idempotent produce of sequence {sequence}: {s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes records `first..first + n` (record `i` has sequence `i`) from the idempotent
/// producer `producer`, each its own Raft entry, and sends every `retry_every`-th batch a
/// second time, as a producer whose answer was lost does: the retry is a Raft entry too,
/// which appends nothing and is answered with the original offset.
async fn write_idempotent(
    cluster: &TestCluster,
    topic: &str,
    producer: (i64, i32),
    first: u64,
    n: u64,
    retry_every: u64,
) {
    for i in first..first + n {
        let sequence = i32::try_from(i).expect("small");
        let offset = produce_idempotent(cluster, topic, producer, sequence, &value(i)).await;
        assert_eq!(offset, i, "record {i}");
        if i % retry_every == 0 {
            let again = produce_idempotent(cluster, topic, producer, sequence, &value(i)).await;
            assert_eq!(again, i, "the retry of record {i} was not deduplicated");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_retention_replays_an_idempotent_producers_entries_below_the_log_start() {
    // A Raft snapshot every 200 entries: every write below is at least one entry, and fewer
    // than 400 are made, so the newest snapshot ends at or below offset 200, while retention
    // (every 100 ms, about 70 records kept) moves the log start well past it. The follower
    // then restarts its log past the snapshot's end, and the idempotent entries between are
    // below its log start.
    let mut cluster = start_cluster("200", "idem").await;
    let topic = "idem";
    let producer = init_producer(&cluster).await;
    write_idempotent(&cluster, topic, producer, 0, 5, 1000).await;
    let follower = a_follower_holding(&cluster, topic, 5).await;

    // Down (kill -9) while 300 records are written, with a retried batch every 20: the
    // leader snapshots and purges its Raft log, and retention deletes everything from the
    // follower's end on, and past the snapshot's end, on both live replicas.
    cluster.kill(follower).await.expect("kill");
    let total = 305;
    write_idempotent(&cluster, topic, producer, 5, total - 5, 20).await;
    for id in cluster.ids().into_iter().filter(|id| *id != follower) {
        wait_start_past(&cluster, id, topic, 200, total).await;
    }

    cluster.restart(follower).await.expect("restart");
    let more = 40;
    write_idempotent(&cluster, topic, producer, total, more, 20).await;
    let total = total + more;
    wait_end(&cluster, follower, topic, total).await;
    let until = tokio::time::Instant::now() + DEADLINE;
    let leader = cluster
        .wait_partition_leader_among(topic, 0, DEADLINE)
        .await
        .expect("leader");
    let leader_start = loop {
        let (leader_start, _) = offsets(&cluster, leader, topic).await;
        let (follower_start, follower_end) = offsets(&cluster, follower, topic).await;
        if leader_start == follower_start {
            assert_eq!(follower_end, total);
            break leader_start;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "log starts differ: leader {leader_start}, follower {follower_start}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let want = read_from_start(&cluster, leader, topic).await;
    let want_values: Vec<String> = (leader_start..total).map(value).collect();
    assert_eq!(want.values().cloned().collect::<Vec<_>>(), want_values);
    assert_eq!(read_from_start(&cluster, follower, topic).await, want);
    // The case under test happened: idempotent entries lay below the follower's restarted
    // log start, so it learned (and kept) another replica's applied point. The snapshot
    // install's adoption can pull the log to its end before the entries after the snapshot
    // are applied, so the file may come a moment after the records: polled on disk, where
    // there is nothing to await, with a deadline.
    let until = tokio::time::Instant::now() + DEADLINE;
    while !holds_file(cluster.data_dir(follower), "applied_point") {
        assert!(
            tokio::time::Instant::now() < until,
            "node {follower} never learned an applied point: no idempotent entry was below its log start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Its group still runs: it applies a write made now, at the leader's offset.
    let offset = produce_idempotent(
        &cluster,
        topic,
        producer,
        i32::try_from(total).expect("small"),
        &value(total),
    )
    .await;
    assert_eq!(offset, total);
    wait_end(&cluster, follower, topic, total + 1).await;
    let mut c = clients(&cluster, follower).await;
    let resp = c.fetch(topic, 0, total, 0).await.expect("fetch");
    assert_eq!(
        resp.records.first().map(|r| (r.offset, r.value.to_vec())),
        Some((total, value(total).into_bytes()))
    );
}

/// Node `id`'s high watermark of partition 0 and its records from `offset` on, values only.
async fn records_from(cluster: &TestCluster, id: u64, topic: &str, offset: u64) -> Vec<String> {
    let mut c = clients(cluster, id).await;
    let resp = c.fetch(topic, 0, offset, 0).await.expect("fetch");
    resp.records
        .iter()
        .filter(|r| r.offset >= offset)
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_retention_adopts_the_producer_state_of_the_records_it_never_got() {
    // As in the first test: a Raft snapshot every 20 entries, retention every 100 ms.
    let mut cluster = start_cluster("20", "early").await;
    let topic = "early";
    let producer = init_producer(&cluster).await;
    // The "early" producer's only batches: records 0..3, sequences 0..3.
    write_idempotent(&cluster, topic, producer, 0, 3, 1000).await;
    let follower = a_follower_holding(&cluster, topic, 3).await;

    // Down while 200 plain records are written: retention deletes the early producer's
    // batches on both live replicas (their producer state keeps it).
    cluster.kill(follower).await.expect("kill");
    let total = 203;
    write(&cluster, topic, 3, total - 3).await;
    for id in cluster.ids().into_iter().filter(|id| *id != follower) {
        wait_start_past(&cluster, id, topic, 3, total).await;
    }
    cluster.restart(follower).await.expect("restart");
    wait_end(&cluster, follower, topic, total).await;
    let (follower_start, _) = offsets(&cluster, follower, topic).await;
    assert!(
        follower_start > 3,
        "the follower's log did not restart past the early batches: it starts at {follower_start}"
    );

    // The early producer retries its first batch (its answer was lost) and goes on. Every
    // replica must answer the retry as a duplicate (appending nothing) and put the next
    // batch at the same offset: a replica without the producer's state would append the
    // retry as a new producer's first batch, and refuse the next batch as a sequence gap.
    let retry = produce_idempotent(&cluster, topic, producer, 0, &value(0)).await;
    assert_eq!(
        retry, 0,
        "the retry was not answered with its original offset"
    );
    let next = produce_idempotent(&cluster, topic, producer, 3, &value(total)).await;
    assert_eq!(next, total);
    write(&cluster, topic, total + 1, 1).await;
    let want = vec![value(total), value(total + 1)];
    for id in cluster.ids() {
        wait_end(&cluster, id, topic, total + 2).await;
        assert_eq!(
            offsets(&cluster, id, topic).await.1,
            total + 2,
            "node {id}: its log holds other records than its peers'"
        );
        assert_eq!(
            records_from(&cluster, id, topic, total).await,
            want,
            "node {id} (the follower is {follower}): the records after the catch-up differ"
        );
    }
}
