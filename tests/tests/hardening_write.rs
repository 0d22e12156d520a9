//! The write path under hostile input and slow disks, over real gRPC on loopback:
//! - a batch larger than a segment is refused with INVALID_ARGUMENT and never fences the
//!   partition;
//! - a slow roll or a slow sync on one partition (injected through the `fault-injection`
//!   feature of rill-storage) does not stall produce or fetch on another, with the broker on
//!   one async worker thread as it runs by default on two cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_storage::batch::{encode_batch, Record};
use rill_tests::{produce_req, record, rill_cli, Clients, TestBroker};
use tonic::Code;

/// The stall injected on one partition.
const STALL: Duration = Duration::from_millis(500);
/// The most another partition's produce or fetch may take meanwhile: half the stall, which
/// is still tens of times what either takes on an idle broker.
const MAX_OTHER_LATENCY: Duration = Duration::from_millis(250);
/// Every test ends within this, or fails saying so.
const TEST_DEADLINE: Duration = Duration::from_secs(60);

fn topic_config(partitions: u32, segment_bytes: Option<u64>) -> pb::TopicConfig {
    pb::TopicConfig {
        partitions,
        segment_bytes,
        ..Default::default()
    }
}

async fn create(c: &mut Clients, name: &str, config: pb::TopicConfig) {
    c.admin
        .create_topic(pb::CreateTopicRequest {
            name: name.into(),
            config: Some(config),
            replication_factor: None,
        })
        .await
        .expect("create topic");
}

fn value_of(len: usize) -> String {
    "x".repeat(len)
}

#[tokio::test]
async fn an_oversize_batch_is_invalid_argument_and_the_partition_keeps_serving() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    create(&mut c, "tiny", topic_config(1, Some(4096))).await;

    c.produce_values("tiny", 0, &["small"])
        .await
        .expect("a small record fits");

    // 20 KB of records: more than a 4096-byte segment can ever hold.
    let big = value_of(20_000);
    let err = c
        .log
        .produce(produce_req(
            "tiny",
            Some(0),
            vec![record(None, &big, None, &[])],
        ))
        .await
        .expect_err("a batch larger than a segment is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    for part in ["\"tiny\"", "partition 0", "4096"] {
        assert!(
            err.message().contains(part),
            "names {part}: {}",
            err.message()
        );
    }
    assert!(
        err.message().contains("batch of 200"),
        "names the batch size: {}",
        err.message()
    );

    // The same as a pre-encoded batch (the storage engine's own check).
    let encoded = encode_batch(&[Record {
        key: None,
        value: Bytes::from(big.clone()),
        headers: vec![],
        timestamp_ms: 1,
    }]);
    let err = c
        .log
        .produce(pb::ProduceRequest {
            topic: "tiny".into(),
            partition: Some(0),
            ack: pb::AckMode::Leader as i32,
            payload: Some(Payload::Batch(encoded)),
            ..Default::default()
        })
        .await
        .expect_err("a pre-encoded batch larger than a segment is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("4096"), "{}", err.message());

    // The partition was not fenced: it takes writes and serves reads.
    let base = c
        .produce_values("tiny", 0, &["after"])
        .await
        .expect("the partition keeps taking writes");
    assert_eq!(base, 1, "the refused batches took no offsets");
    let fetched = c.fetch("tiny", 0, 0, 0).await.expect("fetch");
    let values: Vec<_> = fetched.records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(values, [Bytes::from("small"), Bytes::from("after")]);

    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "tiny".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.max_batch_bytes, 4096, "the effective limit");
    assert_eq!(described.partitions[0].fenced_reason, None);

    // A default topic's limit is the broker's max_batch_bytes (16 MiB).
    create(&mut c, "roomy", topic_config(1, None)).await;
    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "roomy".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.max_batch_bytes, 16 << 20);

    let (ok, out, err) = rill_cli(&broker.url(), &["topic", "describe", "tiny"], "")
        .await
        .expect("rill topic describe");
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l.contains("max batch 4 KiB")),
        "the CLI states the limit: {out}"
    );
    broker.stop().await.expect("stop");
}

/// Produce and fetch on `partition` in a loop until `stop` is set, returning the slowest
/// round trip of either.
async fn probe(mut c: Clients, topic: String, partition: u32, stop: Arc<AtomicBool>) -> Duration {
    let mut slowest = Duration::ZERO;
    let mut rounds = 0u32;
    while !stop.load(Ordering::Acquire) || rounds < 10 {
        let started = Instant::now();
        let offset = c
            .produce_values(&topic, partition, &["probe"])
            .await
            .expect("probe produce");
        slowest = slowest.max(started.elapsed());
        let started = Instant::now();
        let fetched = c
            .fetch(&topic, partition, offset, 0)
            .await
            .expect("probe fetch");
        slowest = slowest.max(started.elapsed());
        assert_eq!(fetched.records.len(), 1, "the probe reads its own record");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    slowest
}

/// Runs `stalled` (work on the slow partition, returning how long its slowest call took)
/// beside a probe of partition 1, and checks that the stall was real and the probe never
/// waited for it.
async fn assert_other_partition_unaffected<F>(c: &Clients, topic: &str, stalled: F)
where
    F: std::future::Future<Output = Duration> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe(c.clone(), topic.to_string(), 1, Arc::clone(&stop)));
    let slowest_stalled = stalled.await;
    stop.store(true, Ordering::Release);
    let slowest_probe = probe.await.expect("probe task");
    eprintln!(
        "slowest call on the stalled partition: {slowest_stalled:?}; on the other: {slowest_probe:?}"
    );
    assert!(
        slowest_stalled >= STALL - Duration::from_millis(50),
        "the injected stall happened (slowest call on partition 0: {slowest_stalled:?})"
    );
    assert!(
        slowest_probe < MAX_OTHER_LATENCY,
        "partition 1 waited {slowest_probe:?} while partition 0 stalled for {STALL:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_roll_on_one_partition_does_not_stall_another() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = TestBroker::start().await.expect("broker");
        let mut c = Clients::connect(broker.url()).await.expect("connect");
        create(&mut c, "rolls", topic_config(2, Some(4096))).await;
        let log = broker
            .broker()
            .topic("rolls")
            .and_then(|t| t.log(0))
            .expect("partition 0");
        log.inject_roll_delay(STALL);

        // Records of 3000 bytes: each one fills a 4096-byte segment, so every produce after
        // the first rolls, and every roll waits for the injected delay.
        let mut p0 = c.clone();
        let stalled = async move {
            let big = value_of(3000);
            let mut slowest = Duration::ZERO;
            for _ in 0..3 {
                let started = Instant::now();
                p0.produce_values("rolls", 0, &[big.as_str()])
                    .await
                    .expect("produce with a slow roll");
                slowest = slowest.max(started.elapsed());
            }
            slowest
        };
        assert_other_partition_unaffected(&c, "rolls", stalled).await;
        broker.stop().await.expect("stop");
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_sync_on_one_partition_does_not_stall_another() {
    tokio::time::timeout(TEST_DEADLINE, async {
        // A clean restart leaves each partition a clean-shutdown marker, which the first
        // write removes with a folder sync; durable acks sync on every produce.
        let broker = TestBroker::start().await.expect("broker");
        let mut c = Clients::connect(broker.url()).await.expect("connect");
        create(&mut c, "syncs", topic_config(2, None)).await;
        c.produce_values("syncs", 0, &["before"]).await.expect("p0");
        c.produce_values("syncs", 1, &["before"]).await.expect("p1");
        let dir = broker.stop().await.expect("stop").expect("temp dir");
        let config = rill_broker::Config::new(dir.path());
        let broker = TestBroker::start_with(config, Some(dir))
            .await
            .expect("restart");
        let c = Clients::connect(broker.url()).await.expect("connect");
        let log = broker
            .broker()
            .topic("syncs")
            .and_then(|t| t.log(0))
            .expect("partition 0");
        log.inject_sync_delay(STALL);

        let mut p0 = c.clone();
        let stalled = async move {
            let mut slowest = Duration::ZERO;
            for i in 0..3 {
                let started = Instant::now();
                p0.log
                    .produce(pb::ProduceRequest {
                        ack: pb::AckMode::Durable as i32,
                        ..produce_req(
                            "syncs",
                            Some(0),
                            vec![record(None, &i.to_string(), None, &[])],
                        )
                    })
                    .await
                    .expect("durable produce with a slow sync");
                slowest = slowest.max(started.elapsed());
            }
            slowest
        };
        assert_other_partition_unaffected(&c, "syncs", stalled).await;
        log.inject_sync_delay(Duration::ZERO);
        broker.stop().await.expect("stop");
    })
    .await
    .expect("the test finished in time");
}
