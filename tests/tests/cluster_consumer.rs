//! The client library's `Consumer` in a cluster, on 3 real broker processes: it reads a
//! partition through a broker that holds no replica of it (that broker names a replica, and
//! the fetch moves there), and it goes on reading, exactly once and in order, after kill -9
//! of the broker it was reading from (the fetch moves to the next broker of its list). A
//! group member's heartbeats and commits move the same way, keeping its membership.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_client::{
    AutoOffsetReset, Connection, Consumer, ConsumerConfig, ConsumerEvent, Producer, ProducerConfig,
    ProducerRecord,
};
use rill_tests::cluster::{create_request, TestCluster};

/// The longest an election, a commit or a move to another broker may take here.
const DEADLINE: Duration = Duration::from_secs(40);

/// Sends `n` values to `topic`/`p` and waits for each ack.
async fn produce(producer: &Producer, topic: &str, p: u32, first: u32, n: u32) {
    for i in first..first + n {
        producer
            .send_and_wait(ProducerRecord::new(topic, format!("{topic}-{p}-{i}")).partition(p))
            .await
            .unwrap_or_else(|e| panic!("produce {topic}/{p} #{i}: {e}"));
    }
}

/// Takes records from `consumer` until `want` (topic, partition) → count are reached,
/// recording each at its offset; a record seen twice, or out of order, fails the test.
async fn take(
    consumer: &mut Consumer,
    seen: &mut BTreeMap<(String, u32), Vec<(u64, String)>>,
    want: &BTreeMap<(String, u32), usize>,
) {
    let until = tokio::time::Instant::now() + DEADLINE;
    while want
        .iter()
        .any(|(k, n)| seen.get(k).map_or(0, Vec::len) < *n)
    {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "records missing after {DEADLINE:?}: have {:?}, want {want:?}",
            seen.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        );
        match consumer.next_timeout(left).await.expect("consume") {
            Some(ConsumerEvent::Record(r)) => {
                let got = seen.entry((r.topic.clone(), r.partition)).or_default();
                let expected = got.last().map_or(0, |(o, _)| o + 1);
                assert_eq!(
                    r.offset, expected,
                    "{}/{}: offsets must come once each, in order",
                    r.topic, r.partition
                );
                got.push((r.offset, String::from_utf8_lossy(&r.value).into_owned()));
            }
            Some(ConsumerEvent::Skipped { .. }) => {
                panic!("the consumer reset its position instead of moving to another broker")
            }
            Some(_) | None => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_reads_from_replicas_elsewhere_and_through_the_loss_of_its_broker() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut admin = cluster.clients(2).await.expect("connect").admin;
    // Replication factor 2 over 3 brokers: some partition has no replica on broker 1.
    admin
        .create_topic(create_request("two", 3, 2))
        .await
        .expect("create two");
    admin
        .create_topic(create_request("three", 1, 3))
        .await
        .expect("create three");
    let md = cluster.metadata(2, "two").await.expect("metadata");
    let outside: Vec<u32> = md.topics[0]
        .partitions
        .iter()
        .filter(|p| !p.replicas.contains(&1))
        .map(|p| p.partition)
        .collect();
    assert!(
        !outside.is_empty(),
        "a partition without a replica on broker 1: {md:?}"
    );
    for p in 0..3 {
        cluster
            .wait_partition_leader_among("two", p, DEADLINE)
            .await
            .expect("leader of two");
    }
    cluster
        .wait_partition_leader("three", 0, DEADLINE)
        .await
        .expect("leader of three");

    // Broker 1 first in every list: the consumer reads through it until it dies.
    let list = [1, 2, 3]
        .iter()
        .map(|id| cluster.addr(*id).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let producer = Producer::new(
        Connection::connect(&list).await.expect("connect producer"),
        ProducerConfig::new().retry_timeout_ms(30_000),
    );
    for p in 0..3 {
        produce(&producer, "two", p, 0, 5).await;
    }
    produce(&producer, "three", 0, 0, 5).await;

    let conn = Connection::connect(&list).await.expect("connect consumer");
    assert_eq!(
        conn.addr(),
        cluster.addr(1).to_string(),
        "reads through broker 1"
    );
    let mut consumer = Consumer::subscribe_topics(
        conn,
        ConsumerConfig::new().auto_offset_reset(AutoOffsetReset::Earliest),
        &["two", "three"],
    )
    .await
    .expect("subscribe");
    let mut seen = BTreeMap::new();
    let mut want: BTreeMap<(String, u32), usize> = (0..3).map(|p| (("two".into(), p), 5)).collect();
    want.insert(("three".into(), 0), 5);
    take(&mut consumer, &mut seen, &want).await;
    // A group member, also through broker 1.
    let mut member = Consumer::subscribe(
        Connection::connect(&list).await.expect("connect member"),
        ConsumerConfig::new()
            .group("g")
            .auto_offset_reset(AutoOffsetReset::Earliest)
            .auto_commit_interval_ms(None),
        "three",
        None,
    )
    .await
    .expect("join");
    let mut member_seen = BTreeMap::new();
    let mut member_want = BTreeMap::from([(("three".to_string(), 0), 5)]);
    take(&mut member, &mut member_seen, &member_want).await;

    // kill -9 the consumer's broker; records written after it are read from the others.
    cluster.kill(1).await.expect("kill broker 1");
    produce(&producer, "three", 0, 5, 5).await;
    want.insert(("three".into(), 0), 10);
    take(&mut consumer, &mut seen, &want).await;
    member_want.insert(("three".into(), 0), 10);
    take(&mut member, &mut member_seen, &member_want).await;
    // Its commit reaches the coordinator through a broker that answers (the first try may
    // meet the coordinator's election: UNAVAILABLE, retried).
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match member.commit().await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("commit after the kill: {e}"),
        }
    }
    let committed = rill_client::Admin::new(
        Connection::connect(&cluster.addr(2).to_string())
            .await
            .expect("connect 2"),
    )
    .fetch_offsets("g", "three", &[0])
    .await
    .expect("fetch offsets");
    assert_eq!(
        committed.first().and_then(|c| c.offset),
        Some(10),
        "{committed:?}"
    );
    let three: Vec<String> = seen[&("three".to_string(), 0)]
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let sent: Vec<String> = (0..10).map(|i| format!("three-0-{i}")).collect();
    assert_eq!(three, sent, "every record once, in the order sent");
    for p in &outside {
        let got: Vec<String> = seen[&("two".to_string(), *p)]
            .iter()
            .map(|(_, v)| v.clone())
            .collect();
        let sent: Vec<String> = (0..5).map(|i| format!("two-{p}-{i}")).collect();
        assert_eq!(got, sent, "partition {p}, read from a replica elsewhere");
    }
}
