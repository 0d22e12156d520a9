//! Issue 9 over real gRPC: one topic registry (a failed deletion leaves the topic serving),
//! the connection limit, and the record timestamp bounds.

use std::time::{Duration, Instant};

use rill_proto::v1 as pb;
use rill_tests::{produce_req, record, Clients, TestBroker};
use tonic::Code;

/// Every wait in these tests ends by this deadline, with a message, instead of hanging.
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `done` holds, checking after each yield; fails with `what` at the deadline.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_failed_topic_deletion_leaves_the_topic_serving_without_a_restart() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("keep", 2).await.expect("create");
    assert_eq!(
        c.produce_values("keep", 0, &["a"]).await.expect("produce"),
        0
    );

    // The move of the topic folder into the trash fails, as on a read-only or broken disk.
    rill_storage::store::fault::fail_next_rename(broker.data_dir().join("topics").join("keep"));
    let err = c
        .admin
        .delete_topic(pb::DeleteTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect_err("the deletion fails");
    assert!(
        err.message().contains("trash") && err.message().contains("keep"),
        "the error says what failed: {err:?}"
    );

    // The topic is still there, served from live handles: no UNAVAILABLE, no restart.
    let listed = c
        .admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.topics.len(), 1);
    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert!(
        described
            .partitions
            .iter()
            .all(|p| p.fenced_reason.is_none()),
        "{described:?}"
    );
    assert_eq!(
        c.produce_values("keep", 0, &["b"])
            .await
            .expect("produce p0"),
        1
    );
    assert_eq!(
        c.produce_values("keep", 1, &["c"])
            .await
            .expect("produce p1"),
        0
    );
    let values = |r: pb::FetchResponse| -> Vec<String> {
        r.records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    };
    assert_eq!(
        values(c.fetch("keep", 0, 0, 0).await.expect("fetch p0")),
        ["a", "b"]
    );
    assert_eq!(
        values(c.fetch("keep", 1, 0, 0).await.expect("fetch p1")),
        ["c"]
    );

    // A long-poll fetch is still woken by the next append.
    let mut waiter = c.clone();
    let pending = tokio::spawn(async move { waiter.fetch("keep", 0, 2, 15_000).await });
    let state = broker.broker().clone();
    wait_until("the fetch to wait", || state.waiting_fetches() == 1).await;
    let sent = Instant::now();
    c.produce_values("keep", 0, &["d"]).await.expect("produce");
    let woken = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the fetch answers")
        .expect("join")
        .expect("fetch");
    assert_eq!(values(woken), ["d"]);
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "woken by the append, not by its 15 s wait: {:?}",
        sent.elapsed()
    );

    // Nothing stays armed: the next deletion goes through, and the topic is gone.
    c.admin
        .delete_topic(pb::DeleteTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect("delete");
    let gone = c.fetch("keep", 0, 0, 0).await.expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    broker.stop().await.expect("stop");
}

/// Year 3000, in ms since the epoch.
const YEAR_3000_MS: i64 = 32_503_680_000_000;

fn now_ms() -> i64 {
    rill_storage::log::now_ms()
}

/// A pre-encoded batch with one record per timestamp.
fn batch_of(timestamps: &[i64]) -> bytes::Bytes {
    let records: Vec<_> = timestamps
        .iter()
        .map(|&timestamp_ms| rill_storage::batch::Record {
            value: bytes::Bytes::from_static(b"pre-encoded"),
            timestamp_ms,
            ..Default::default()
        })
        .collect();
    rill_storage::batch::try_encode_batch(&records).expect("encodable")
}

fn batch_req(topic: &str, partition: u32, batch: bytes::Bytes) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        ack: pb::AckMode::Leader as i32,
        payload: Some(pb::produce_request::Payload::Batch(batch)),
        ..Default::default()
    }
}

async fn high_watermarks(c: &mut Clients, topic: &str) -> Vec<u64> {
    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await
        .expect("describe")
        .into_inner();
    described
        .partitions
        .iter()
        .map(|p| p.high_watermark)
        .collect()
}

#[tokio::test]
async fn a_record_from_the_year_3000_is_refused_naming_the_bound() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("ts", 2).await.expect("create");
    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest { name: "ts".into() })
        .await
        .expect("describe")
        .into_inner();
    let config = described.config.expect("config");
    assert_eq!(
        config.timestamp_after_max_ms,
        Some(3_600_000),
        "Kafka's default"
    );
    assert_eq!(
        config.timestamp_before_max_ms,
        Some(-1),
        "no bound, as in Kafka"
    );

    // As records: keyless, so round-robin spreads them over both partitions in one request,
    // one of them from the year 3000. The whole request is refused and nothing is appended
    // to either partition.
    let refused = c
        .log
        .produce(produce_req(
            "ts",
            None,
            vec![
                record(None, "fine", Some(now_ms()), &[]),
                record(None, "fine", None, &[]),
                record(None, "future", Some(YEAR_3000_MS), &[]),
                record(None, "fine", None, &[]),
            ],
        ))
        .await
        .expect_err("year 3000");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for part in [
        "timestamp_after_max_ms = 3600000",
        "\"ts\"",
        &YEAR_3000_MS.to_string(),
    ] {
        assert!(
            refused.message().contains(part),
            "{part}: {}",
            refused.message()
        );
    }
    assert_eq!(
        high_watermarks(&mut c, "ts").await,
        [0, 0],
        "nothing appended"
    );

    // As a pre-encoded batch: its max timestamp is checked the same way.
    let refused = c
        .log
        .produce(batch_req("ts", 1, batch_of(&[now_ms(), YEAR_3000_MS])))
        .await
        .expect_err("year 3000 in a batch");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("timestamp_after_max_ms")
            && refused.message().contains("partition 1"),
        "{}",
        refused.message()
    );
    assert_eq!(
        high_watermarks(&mut c, "ts").await,
        [0, 0],
        "nothing appended"
    );

    // Normal records pass: the broker's time, a producer's time a minute ahead, and old
    // times (no bound behind by default).
    let base = c.produce_values("ts", 0, &["now"]).await.expect("produce");
    assert_eq!(base, 0);
    c.log
        .produce(produce_req(
            "ts",
            Some(0),
            vec![
                record(None, "skewed", Some(now_ms() + 60_000), &[]),
                record(None, "old", Some(1_000), &[]),
            ],
        ))
        .await
        .expect("within the bounds");
    c.log
        .produce(batch_req("ts", 1, batch_of(&[now_ms(), 1_000])))
        .await
        .expect("a good batch");
    assert_eq!(high_watermarks(&mut c, "ts").await, [3, 2]);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn timestamp_bounds_are_set_per_topic_at_creation() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    let create = |name: &str, after: i64, before: i64| pb::CreateTopicRequest {
        name: name.into(),
        config: Some(pb::TopicConfig {
            partitions: 1,
            timestamp_after_max_ms: Some(after),
            timestamp_before_max_ms: Some(before),
            ..Default::default()
        }),
        replication_factor: None,
    };
    let day = 24 * 3600 * 1000;
    c.admin
        .create_topic(create("replay", -1, day))
        .await
        .expect("create");
    // No bound ahead: the far future is accepted. A day behind: older is refused.
    c.log
        .produce(produce_req(
            "replay",
            Some(0),
            vec![record(None, "future", Some(YEAR_3000_MS), &[])],
        ))
        .await
        .expect("no bound ahead");
    let refused = c
        .log
        .produce(produce_req(
            "replay",
            Some(0),
            vec![
                record(None, "recent", Some(now_ms() - 1000), &[]),
                record(None, "ancient", Some(now_ms() - 2 * day), &[]),
            ],
        ))
        .await
        .expect_err("older than a day");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains(&format!("timestamp_before_max_ms = {day}")),
        "{}",
        refused.message()
    );
    // Every record of a batch is checked against the bound behind, not only the first.
    let refused = c
        .log
        .produce(batch_req(
            "replay",
            0,
            batch_of(&[now_ms(), now_ms() - 2 * day, now_ms()]),
        ))
        .await
        .expect_err("an old record inside a batch");
    assert!(
        refused.message().contains("timestamp_before_max_ms"),
        "{}",
        refused.message()
    );
    assert_eq!(high_watermarks(&mut c, "replay").await, [1]);

    // A bound below -1 is refused at creation, naming it.
    let bad = c
        .admin
        .create_topic(create("bad", -5, -1))
        .await
        .expect_err("negative bound");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("timestamp_after_max_ms"),
        "{}",
        bad.message()
    );
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn records_whose_timestamps_overflow_are_refused_as_such() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("wide", 1).await.expect("create");
    // Both timestamps are within the default bounds (none behind), but their distance does
    // not fit the batch format's 64-bit delta.
    let refused = c
        .log
        .produce(produce_req(
            "wide",
            Some(0),
            vec![
                record(None, "now", Some(now_ms()), &[]),
                record(None, "dawn of time", Some(i64::MIN), &[]),
            ],
        ))
        .await
        .expect_err("overflow");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("overflow") && !refused.message().contains("record count"),
        "the overflow is named, not an empty batch: {}",
        refused.message()
    );
    assert_eq!(
        high_watermarks(&mut c, "wide").await,
        [0],
        "nothing appended"
    );
    broker.stop().await.expect("stop");
}

async fn list_topics(c: &mut Clients) -> Result<usize, tonic::Status> {
    c.admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .map(|r| r.into_inner().topics.len())
}

#[tokio::test]
async fn a_connection_over_the_limit_is_refused_clearly_and_a_freed_slot_serves_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = rill_broker::Config::new(dir.path()).max_connections(2);
    let broker = TestBroker::start_with(config, Some(dir))
        .await
        .expect("broker");
    let state = broker.broker().clone();
    let mut first = Clients::connect(broker.url()).await.expect("connect 1");
    let mut second = Clients::connect(broker.url()).await.expect("connect 2");
    first.create_topic("busy", 1).await.expect("create");
    assert_eq!(list_topics(&mut second).await.expect("second serves"), 1);
    assert_eq!(state.open_connections(), 2);

    // The third connection is answered, not dropped: its call fails with RESOURCE_EXHAUSTED
    // naming the limit, which a client can tell apart from a broken network.
    let mut extra = Clients::connect(broker.url())
        .await
        .expect("the connection itself is accepted");
    let refused = list_topics(&mut extra).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_connections") && refused.message().contains('2'),
        "{}",
        refused.message()
    );
    assert_eq!(state.open_connections(), 2, "the refused one holds no slot");

    // The two served connections keep working.
    assert_eq!(
        first
            .produce_values("busy", 0, &["a"])
            .await
            .expect("first"),
        0
    );
    assert_eq!(
        second
            .produce_values("busy", 0, &["b"])
            .await
            .expect("second"),
        1
    );

    // Closing one frees its slot for a new connection.
    drop(first);
    wait_until("the closed connection's slot to be freed", || {
        state.open_connections() == 1
    })
    .await;
    let mut third = Clients::connect(broker.url()).await.expect("connect 3");
    assert_eq!(
        third
            .fetch("busy", 0, 0, 0)
            .await
            .expect("served")
            .records
            .len(),
        2
    );
    assert_eq!(
        list_topics(&mut second).await.expect("second still serves"),
        1
    );
    drop((second, third, extra));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn calls_over_max_concurrent_streams_wait_for_a_free_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = rill_broker::Config::new(dir.path()).max_concurrent_streams(2);
    let broker = TestBroker::start_with(config, Some(dir))
        .await
        .expect("broker");
    let state = broker.broker().clone();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("streams", 1).await.expect("create");

    // Two long-poll fetches fill the connection's two streams.
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let mut w = c.clone();
            tokio::spawn(async move { w.fetch("streams", 0, 0, 15_000).await })
        })
        .collect();
    wait_until("both fetches to wait", || state.waiting_fetches() == 2).await;

    // A third call on the same connection waits for a stream; another connection is served.
    let mut queued_client = c.clone();
    let mut queued = tokio::spawn(async move { list_topics(&mut queued_client).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut queued)
            .await
            .is_err(),
        "the third call got a stream beyond the limit"
    );
    let mut other = Clients::connect(broker.url()).await.expect("connect");
    assert_eq!(list_topics(&mut other).await.expect("other connection"), 1);

    // An append ends both fetches, and the queued call then runs.
    other
        .produce_values("streams", 0, &["go"])
        .await
        .expect("produce");
    for waiter in waiters {
        let resp = tokio::time::timeout(DEADLINE, waiter)
            .await
            .expect("the fetch answers")
            .expect("join")
            .expect("fetch");
        assert_eq!(resp.records.len(), 1);
    }
    let listed = tokio::time::timeout(DEADLINE, queued)
        .await
        .expect("the queued call runs")
        .expect("join")
        .expect("list");
    assert_eq!(listed, 1);
    broker.stop().await.expect("stop");
}
