//! Issue 4: the client library against a real broker: a consumer group resumes from its last
//! commit with no loss and duplicates bounded by the uncommitted window; a producer survives
//! a broker restart with no acked record lost and order kept per partition.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rill_client::{
    Acks, Admin, AutoOffsetReset, Connection, Consumer, ConsumerConfig, ConsumerEvent, Producer,
    ProducerConfig, ProducerRecord, SeekTo, TopicSettings,
};
use rill_tests::{BrokerProcess, TestBroker};

/// A consumer without a group, starting at the first retained record, polling briefly.
async fn from_earliest(conn: &Connection, topic: &str, partitions: Option<Vec<u32>>) -> Consumer {
    let config = ConsumerConfig::new()
        .auto_offset_reset(AutoOffsetReset::Earliest)
        .max_wait_ms(100);
    Consumer::subscribe(conn.clone(), config, topic, partitions)
        .await
        .expect("subscribe")
}

/// The longest a test waits for the consumer's next event before failing: every wait has a
/// deadline, and this one is far beyond what a present record takes.
const NEXT_LIMIT: Duration = Duration::from_secs(30);

/// The consumer's next event, failing the test if none comes within [`NEXT_LIMIT`].
async fn next_event(c: &mut Consumer) -> ConsumerEvent {
    c.next_timeout(NEXT_LIMIT)
        .await
        .expect("next")
        .unwrap_or_else(|| panic!("no event within {NEXT_LIMIT:?}"))
}

async fn produce_n(conn: &Connection, topic: &str, n: u64) {
    let producer = Producer::new(conn.clone(), ProducerConfig::new());
    let mut acks = Vec::new();
    for i in 0..n {
        let record = ProducerRecord::new(topic, format!("v{i}")).key(format!("k{}", i % 7));
        acks.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    for ack in acks {
        ack.await.expect("ack");
    }
}

#[tokio::test]
async fn a_restarted_group_consumer_resumes_from_its_last_commit() {
    let broker = TestBroker::start().await.expect("broker");
    let conn = Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect");
    Admin::new(conn.clone())
        .create_topic("jobs", TopicSettings::new().partitions(2))
        .await
        .expect("create");
    produce_n(&conn, "jobs", 1000).await;

    let config = || {
        ConsumerConfig::new()
            .group("workers")
            .auto_offset_reset(AutoOffsetReset::Earliest)
            .max_wait_ms(200)
    };
    // Both partitions given explicitly: the consumer manages them itself (no membership), so
    // the "crashed" consumer below holds nothing for a session timeout.
    let both = || Some(vec![0, 1]);
    let mut seen: Vec<String> = Vec::new();
    let mut since_commit = 0usize;
    {
        let mut c = Consumer::subscribe(conn.clone(), config(), "jobs", both())
            .await
            .expect("subscribe");
        while seen.len() < 450 {
            match next_event(&mut c).await {
                ConsumerEvent::Record(r) => {
                    seen.push(String::from_utf8(r.value.to_vec()).expect("utf-8"));
                    since_commit += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
            if seen.len().is_multiple_of(100) {
                c.commit().await.expect("commit");
                since_commit = 0;
            }
        }
        // Dropped mid-stream: the last 50 records were never committed.
    }
    assert_eq!(since_commit, 50);

    let mut c = Consumer::subscribe(conn.clone(), config(), "jobs", both())
        .await
        .expect("resubscribe");
    let mut second: Vec<String> = Vec::new();
    // It stops at 1050 records; the idle timeout only ends it early when records are missing,
    // so it can be long without slowing the test.
    while let Some(event) = c.next_timeout(Duration::from_secs(10)).await.expect("next") {
        if let ConsumerEvent::Record(r) = event {
            second.push(String::from_utf8(r.value.to_vec()).expect("utf-8"));
        }
        if seen.len() + second.len() >= 1050 {
            break;
        }
    }
    let all: HashSet<&String> = seen.iter().chain(&second).collect();
    assert_eq!(all.len(), 1000, "no record lost");
    let duplicates = seen.len() + second.len() - all.len();
    assert_eq!(
        duplicates, since_commit,
        "only the uncommitted window is read twice"
    );
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn consumer_seeks_and_reports_skipped_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = rill_broker::Config::new(dir.path()).retention_check_ms(3_600_000);
    let broker = TestBroker::start_with(config, Some(dir))
        .await
        .expect("broker");
    let conn = Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect");
    let admin = Admin::new(conn.clone());
    admin
        .create_topic(
            "short",
            TopicSettings::new()
                .partitions(1)
                .segment_bytes(4096)
                .retention_bytes(Some(8192)),
        )
        .await
        .expect("create");
    produce_n(&conn, "short", 10).await;
    let mut c = from_earliest(&conn, "short", None).await;
    assert_eq!(c.seek(0, SeekTo::Offset(7)).await.expect("seek"), 7);
    match next_event(&mut c).await {
        ConsumerEvent::Record(r) => assert_eq!(r.offset, 7),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.seek(0, SeekTo::End).await.expect("seek end"), 10);
    assert_eq!(c.seek(0, SeekTo::Beginning).await.expect("seek start"), 0);

    // Retention deletes the data under the consumer's position: it resets and says so.
    let mut slow = from_earliest(&conn, "short", None).await;
    slow.seek(0, SeekTo::Offset(0)).await.expect("seek");
    let big = "x".repeat(3000);
    let producer = Producer::new(conn.clone(), ProducerConfig::new());
    for _ in 0..12 {
        producer
            .send_and_wait(ProducerRecord::new("short", big.clone()).partition(0))
            .await
            .expect("send");
    }
    rill_broker::tasks::run_retention(broker.broker()).await;
    let start = admin
        .list_offsets("short", 0, rill_client::OffsetQuery::Earliest)
        .await
        .expect("earliest")
        .offset;
    assert!(start > 0, "retention deleted the beginning");
    // A fresh consumer positioned at 0 now finds offset 0 gone.
    drop(slow);
    let mut late = from_earliest(&conn, "short", None).await;
    late.seek(0, SeekTo::Offset(0)).await.expect("seek");
    match next_event(&mut late).await {
        ConsumerEvent::Skipped {
            partition,
            from,
            to,
            reason,
            ..
        } => {
            assert_eq!((partition, from, to), (0, 0, start));
            assert!(reason.contains("out of range"), "{reason}");
        }
        other => panic!("expected a reported skip, got {other:?}"),
    }
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_broker_restart_under_a_producer_loses_no_acked_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
    let addr = broker.addr().to_string();
    let conn = Connection::connect(&addr).await.expect("connect");
    Admin::new(conn.clone())
        .create_topic("steady", TopicSettings::new().partitions(3))
        .await
        .expect("create");
    let producer = Producer::new(
        conn.clone(),
        ProducerConfig::new().acks(Acks::Durable).linger_ms(2),
    );
    let (midway_tx, midway) = tokio::sync::oneshot::channel();
    let sender = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut midway_tx = Some(midway_tx);
            let mut acked = Vec::new();
            let mut pending = Vec::new();
            for i in 0..3000u64 {
                let p = (i % 3) as u32;
                let ack = producer
                    .send(ProducerRecord::new("steady", format!("{p}-{i}")).partition(p))
                    .await
                    .expect("send");
                pending.push((i, ack));
                if pending.len() == 30 {
                    for (i, ack) in pending.drain(..) {
                        acked.push((i, ack.await.expect("acked despite the restart")));
                    }
                    if acked.len() >= 300 {
                        if let Some(tx) = midway_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            for (i, ack) in pending {
                acked.push((i, ack.await.expect("acked")));
            }
            acked
        })
    };
    // Restart the broker on the same port while the producer runs.
    midway.await.expect("the producer got going");
    assert!(broker.stop().await.expect("stop").success());
    let broker = BrokerProcess::spawn_at(dir.path(), &addr, &[])
        .await
        .expect("restart");
    let acked = sender.await.expect("sender");
    assert_eq!(acked.len(), 3000);

    // Every acked record is at its offset; acked offsets follow send order per partition.
    let conn = Connection::connect(&addr).await.expect("reconnect");
    let mut by_partition: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for (i, (p, offset)) in &acked {
        by_partition.entry(*p).or_default().push((*offset, *i));
    }
    let described = Admin::new(conn.clone())
        .describe_topic("steady")
        .await
        .expect("describe");
    for (p, mut entries) in by_partition {
        let high_watermark = described.partitions[p as usize].high_watermark;
        let mut c = from_earliest(&conn, "steady", Some(vec![p])).await;
        let mut stored = BTreeMap::new();
        // Read everything stored, up to the high watermark (not until the consumer idles,
        // which a slow machine could mistake for the end).
        while stored.len() < high_watermark as usize {
            match next_event(&mut c).await {
                ConsumerEvent::Record(r) => stored.insert(
                    r.offset,
                    String::from_utf8(r.value.to_vec()).expect("utf-8"),
                ),
                other => panic!("unexpected {other:?}"),
            };
        }
        entries.sort_unstable();
        let mut last_i = None;
        for (offset, i) in entries {
            assert_eq!(
                stored.get(&offset),
                Some(&format!("{p}-{i}")),
                "acked record at {p}/{offset}"
            );
            assert!(last_i.is_none_or(|l| l < i), "order kept in partition {p}");
            last_i = Some(i);
        }
    }
    assert!(broker.stop().await.expect("stop").success());
}
