//! A follower that applies an idempotent producer's batch more than the producer expiry
//! after the previous one, by its own clock (it was paused with SIGSTOP meanwhile), appends
//! it as the leader did: expiry is decided by the leader's clock, which each entry carries
//! (docs/REPLICATION.md, "Producer expiry goes by the leader's clock"). Deciding by its own
//! clock, the follower refused the batch, and its log then held other records at the same
//! offsets than its peers'.
//!
//! 3 real broker processes with `--producer-id-expiration-ms 3000`. At the end the three
//! partition logs are read from the brokers' data folders and must be equal, byte for byte.

use std::time::Duration;

use rill_client::{Acks, Connection, Producer, ProducerConfig, ProducerRecord};
use rill_storage::{LogOptions, PartitionLog, TopicConfig};
use rill_tests::cluster::{Extra, TestCluster};
use rill_tests::scrape;

/// The producer expiry every broker runs with, in ms.
const EXPIRY_MS: u64 = 3000;
/// The longest an election, a commit, a catch-up or a scrape may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
const TOPIC: &str = "expiry";

/// Node `id`'s high watermark of the topic's partition 0, from its `/metrics`.
async fn high_watermark(cluster: &TestCluster, id: u64) -> Option<f64> {
    let addr = cluster.metrics_addr(id)?;
    let samples = scrape::scrape(addr).await.ok()?;
    Some(scrape::sum(
        &samples,
        "rill_partition_high_watermark",
        &[("topic", TOPIC), ("partition", "0")],
    ))
}

/// The stored batches of node `id`'s copy of the partition, read from its data folder (the
/// broker must be stopped).
fn stored_batches(cluster: &TestCluster, id: u64) -> Vec<u8> {
    let dir = cluster.data_dir(id).join("topics").join(TOPIC).join("0");
    let log = PartitionLog::open(&dir, LogOptions::new(TOPIC, 0, &TopicConfig::default()))
        .expect("open a replica's partition log");
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < log.high_watermark() {
        let read = log.read(offset, 1 << 20).expect("read");
        for chunk in &read.chunks {
            out.extend_from_slice(chunk);
        }
        assert!(read.next_offset > offset, "the read moved on");
        offset = read.next_offset;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_paused_past_the_expiry_appends_the_batch_its_leader_appended() {
    let expiry = EXPIRY_MS.to_string();
    let mut cluster = TestCluster::start_with(
        3,
        Extra::args(&[
            "--producer-id-expiration-ms",
            &expiry,
            "--metrics-listen",
            "127.0.0.1:0",
        ]),
    )
    .await
    .expect("3 brokers");
    cluster
        .create_topic(TOPIC, 1, 3, DEADLINE)
        .await
        .expect("creating the topic");
    let leader = cluster
        .wait_partition_leader(TOPIC, 0, DEADLINE)
        .await
        .expect("a leader");
    let paused = cluster.another(leader);
    let bootstrap = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let conn = Connection::connect(&bootstrap).await.expect("connect");
    let producer = Producer::new(conn, ProducerConfig::new().acks(Acks::Quorum).linger_ms(0));
    let send = |value: &'static str| {
        producer.send_and_wait(ProducerRecord::new(TOPIC, value).partition(0))
    };

    let (_, first) = send("first").await.expect("first acknowledged");
    let first_at = tokio::time::Instant::now();
    cluster.signal(paused, "STOP").await.expect("SIGSTOP");
    // Half the expiry after the first batch, by the leader's clock: the leader and the
    // other follower append it.
    tokio::time::sleep_until(first_at + Duration::from_millis(EXPIRY_MS / 2)).await;
    let (_, second) = send("second").await.expect("second acknowledged");
    assert_eq!((first, second), (0, 1));
    // The paused follower applies it only after more than the expiry has passed on its own
    // clock since the first batch: the time itself is what this test needs to pass.
    tokio::time::sleep_until(first_at + Duration::from_millis(EXPIRY_MS + EXPIRY_MS / 2)).await;
    cluster.signal(paused, "CONT").await.expect("SIGCONT");

    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut marks = Vec::new();
        for id in cluster.ids() {
            marks.push((id, high_watermark(&cluster, id).await));
        }
        if marks.iter().all(|(_, hw)| *hw == Some(2.0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the replicas' high watermarks never all reached 2 (node {paused} was paused): \
             {marks:?}; see {}",
            cluster.log_path(paused).display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in cluster.ids() {
        cluster.kill(id).await.expect("stop a broker");
    }
    let leaders_copy = stored_batches(&cluster, leader);
    assert!(!leaders_copy.is_empty());
    for id in cluster.ids() {
        assert!(
            stored_batches(&cluster, id) == leaders_copy,
            "node {id}'s copy of the partition differs from the leader's (node {leader})"
        );
    }
}
