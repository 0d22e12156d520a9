//! Issue 3 over real gRPC on loopback: a broker on port 0, the generated clients.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::{produce_req, record, wait_until, Clients, TestBroker};
use tokio_stream::StreamExt;
use tonic::Code;

/// The deadline for a fetch to reach its wait, far beyond what it takes.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

async fn all_records(c: &mut Clients, topic: &str, partition: u32) -> Vec<pb::FetchedRecord> {
    let resp = c.fetch(topic, partition, 0, 0).await.expect("fetch");
    resp.records
}

#[tokio::test]
async fn produce_fetch_round_trip_keeps_keys_headers_and_timestamps() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("orders", 3).await.expect("create");

    // Unary, keyed: each key lands on its documented partition.
    let keys = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
    let records: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            record(
                Some(k),
                &format!("v{i}"),
                Some(1000 + i as i64),
                &[("h", k), ("n", "1")],
            )
        })
        .collect();
    let resp = c
        .log
        .produce(produce_req("orders", None, records))
        .await
        .expect("produce")
        .into_inner();
    let total: u32 = resp.appends.iter().map(|a| a.record_count).sum();
    assert_eq!(total, 6);

    // Streaming: pipelined, acked in order.
    let reqs: Vec<pb::ProduceStreamRequest> = (0..20u64)
        .map(|i| pb::ProduceStreamRequest {
            sequence: i,
            request: Some(produce_req(
                "orders",
                Some((i % 3) as u32),
                vec![record(
                    None,
                    &format!("s{i}"),
                    Some(5000 + i as i64),
                    &[("seq", &i.to_string())],
                )],
            )),
        })
        .collect();
    let mut acks = c
        .log
        .produce_stream(tokio_stream::iter(reqs))
        .await
        .expect("stream")
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.expect("ack");
        assert!(ack.error_code.is_none(), "{}", ack.error_message);
        seqs.push(ack.sequence);
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());

    let mut seen = 0;
    for p in 0..3 {
        let recs = all_records(&mut c, "orders", p).await;
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "offsets are consecutive");
            let value = std::str::from_utf8(&r.value).expect("utf-8");
            if let Some(n) = value.strip_prefix('v') {
                let i: usize = n.parse().expect("index");
                let key = keys[i];
                assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
                assert_eq!(
                    p,
                    rill_proto::partitioner::partition_for_key(key.as_bytes(), 3)
                );
                assert_eq!(r.timestamp_ms, 1000 + i as i64);
                assert_eq!(r.headers.len(), 2);
                assert_eq!(
                    (r.headers[0].key.as_str(), r.headers[0].value.as_ref()),
                    ("h", key.as_bytes())
                );
            } else {
                let i: u64 = value[1..].parse().expect("seq");
                assert_eq!(p as u64, i % 3);
                assert!(r.key.is_none());
                assert_eq!(r.timestamp_ms, 5000 + i as i64);
                assert_eq!(r.headers[0].value.as_ref(), i.to_string().as_bytes());
            }
            seen += 1;
        }
    }
    assert_eq!(seen, 26);

    // A record without a timestamp gets the broker's clock.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    c.log
        .produce(produce_req(
            "orders",
            Some(0),
            vec![record(None, "now", None, &[])],
        ))
        .await
        .expect("produce");
    let last = all_records(&mut c, "orders", 0)
        .await
        .pop()
        .expect("record");
    assert!(last.timestamp_ms >= before && last.timestamp_ms < before + 60_000);

    // The raw-batch encoding serves the stored bytes; the client decodes them itself.
    let raw = c
        .log
        .fetch(pb::FetchRequest {
            topic: "orders".into(),
            partition: 0,
            encoding: pb::FetchEncoding::RawBatches as i32,
            ..Default::default()
        })
        .await
        .expect("fetch raw")
        .into_inner();
    assert!(raw.records.is_empty() && !raw.batches.is_empty());
    let mut n = 0;
    for b in &raw.batches {
        let view = rill_storage::batch::BatchView::parse(b).expect("batch");
        view.validate().expect("valid");
        n += view.header().record_count;
    }
    assert_eq!(u64::from(n), raw.high_watermark);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_pre_encoded_batch_is_appended_as_is() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("fast", 2).await.expect("create");
    let batch = rill_storage::batch::encode_batch(&[rill_storage::batch::Record {
        key: Some(Bytes::from_static(b"k")),
        value: Bytes::from_static(b"v"),
        headers: vec![("a".into(), Bytes::from_static(b"b"))],
        timestamp_ms: 77,
    }]);
    let req = |partition| pb::ProduceRequest {
        topic: "fast".into(),
        partition,
        ack: pb::AckMode::Durable as i32,
        payload: Some(Payload::Batch(batch.clone())),
        ..Default::default()
    };
    let resp = c
        .log
        .produce(req(Some(1)))
        .await
        .expect("produce")
        .into_inner();
    assert_eq!(resp.appends[0].record_count, 1);
    let recs = all_records(&mut c, "fast", 1).await;
    assert_eq!(
        (recs[0].timestamp_ms, recs[0].key.as_deref()),
        (77, Some(&b"k"[..]))
    );
    // Without a partition, or damaged, it is refused and nothing is written.
    assert_eq!(
        c.log
            .produce(req(None))
            .await
            .expect_err("no partition")
            .code(),
        Code::InvalidArgument
    );
    let mut bad = batch.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = c
        .log
        .produce(pb::ProduceRequest {
            payload: Some(Payload::Batch(Bytes::from(bad))),
            ..req(Some(1))
        })
        .await
        .expect_err("bad crc");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        c.fetch("fast", 1, 0, 0)
            .await
            .expect("fetch")
            .high_watermark,
        1
    );
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn long_poll_wakes_on_append_times_out_empty_and_honours_min_bytes() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("poll", 1).await.expect("create");

    // Without data: empty after max_wait_ms.
    let t = Instant::now();
    let resp = c.fetch("poll", 0, 0, 300).await.expect("fetch");
    let waited = t.elapsed();
    assert!(resp.records.is_empty());
    assert!(
        waited >= Duration::from_millis(290),
        "returned early: {waited:?}"
    );

    // A waiting fetch (at the high watermark) is woken by the append itself.
    let mut waiter = c.clone();
    let pending = tokio::spawn(async move {
        let t = Instant::now();
        let resp = waiter.fetch("poll", 0, 0, 10_000).await.expect("fetch");
        (resp, t.elapsed())
    });
    // Let it reach its wait: it registers before the produce below is sent.
    wait_until("the fetch to wait", WAIT_LIMIT, || {
        broker.broker().waiting_fetches() >= 1
    })
    .await
    .expect("the fetch waits");
    let sent = Instant::now();
    c.produce_values("poll", 0, &["hello"])
        .await
        .expect("produce");
    let (resp, _) = pending.await.expect("join");
    let latency = sent.elapsed();
    assert_eq!(resp.records.len(), 1);
    // It asked to wait 10 s: an answer well before that was woken by the append.
    assert!(latency < Duration::from_secs(5), "woken late: {latency:?}");
    println!("long-poll wake-up after produce: {latency:?}");

    // min_bytes: one small record is not enough; the fetch waits for more.
    let mut waiter = c.clone();
    let pending = tokio::spawn(async move {
        waiter
            .log
            .fetch(pb::FetchRequest {
                topic: "poll".into(),
                partition: 0,
                offset: 1,
                max_wait_ms: 10_000,
                min_bytes: 2000,
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner()
    });
    wait_until("the min_bytes fetch to wait", WAIT_LIMIT, || {
        broker.broker().waiting_fetches() >= 1
    })
    .await
    .expect("the fetch waits");
    c.produce_values("poll", 0, &["small"])
        .await
        .expect("produce");
    let mut pending = pending;
    let early = tokio::time::timeout(Duration::from_millis(100), &mut pending).await;
    assert!(early.is_err(), "returned below min_bytes");
    let big = "x".repeat(3000);
    c.produce_values("poll", 0, &[&big]).await.expect("produce");
    let resp = pending.await.expect("join");
    assert_eq!(resp.records.len(), 2);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn out_of_range_offsets_name_both_bounds() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("range", 2).await.expect("create");
    c.produce_values("range", 1, &["a", "b", "c"])
        .await
        .expect("produce");
    let err = c.fetch("range", 1, 4, 0).await.expect_err("above hwm");
    assert_eq!(err.code(), Code::OutOfRange);
    for part in ["range", "partition 1", "offset 4", "0..=3"] {
        assert!(err.message().contains(part), "{part} in {}", err.message());
    }
    // At the high watermark: empty, not an error.
    let resp = c.fetch("range", 1, 3, 0).await.expect("at hwm");
    assert!(resp.records.is_empty());
    assert_eq!(
        (resp.high_watermark, resp.log_start_offset, resp.next_offset),
        (3, 0, 3)
    );
    // Mid-batch: starts exactly at the offset.
    let resp = c.fetch("range", 1, 1, 0).await.expect("mid");
    assert_eq!(
        resp.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![1, 2]
    );
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_input_gets_its_code_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = TestBroker::start_with(
        rill_broker::Config::new(dir.path()).max_batch_bytes(64 << 10),
        Some(dir),
    )
    .await
    .expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 2).await.expect("create");

    let create = |name: &str, partitions| pb::CreateTopicRequest {
        name: name.into(),
        config: Some(pb::TopicConfig {
            partitions,
            ..Default::default()
        }),
        ..Default::default()
    };
    for (name, partitions) in [("../x", 1), ("a/b", 1), ("", 1), ("..", 1), ("ok", 100_000)] {
        let err = c
            .admin
            .create_topic(create(name, partitions))
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
    }
    let err = c
        .admin
        .create_topic(create("t", 1))
        .await
        .expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);

    let cases: Vec<(pb::ProduceRequest, Code)> = vec![
        (produce_req("t", None, vec![]), Code::InvalidArgument),
        (
            pb::ProduceRequest {
                payload: None,
                ..produce_req("t", None, vec![])
            },
            Code::InvalidArgument,
        ),
        (
            produce_req(
                "t",
                Some(0),
                vec![record(None, &"x".repeat(70 << 10), None, &[])],
            ),
            Code::InvalidArgument,
        ),
        (
            produce_req(
                "t",
                Some(0),
                (0..40)
                    .map(|_| record(None, &"x".repeat(2000), None, &[]))
                    .collect(),
            ),
            Code::InvalidArgument,
        ),
        (
            produce_req("nope", None, vec![record(None, "v", None, &[])]),
            Code::NotFound,
        ),
        (
            produce_req("t", Some(2), vec![record(None, "v", None, &[])]),
            Code::NotFound,
        ),
        (
            produce_req("bad/name", None, vec![record(None, "v", None, &[])]),
            Code::InvalidArgument,
        ),
    ];
    for (req, code) in cases {
        let err = c.log.produce(req).await.expect_err("refused");
        assert_eq!(err.code(), code, "{}", err.message());
    }
    assert_eq!(
        c.fetch("nope", 0, 0, 0).await.expect_err("unknown").code(),
        Code::NotFound
    );
    assert_eq!(
        c.fetch("t", 9, 0, 0).await.expect_err("unknown").code(),
        Code::NotFound
    );
    let err = c
        .groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "../g".into(),
            topic: "t".into(),
            offsets: vec![],
            member: None,
        })
        .await
        .expect_err("bad group");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing was written anywhere.
    for p in 0..2 {
        assert_eq!(
            c.fetch("t", p, 0, 0).await.expect("fetch").high_watermark,
            0
        );
    }
    let topics = c
        .admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(topics.topics.len(), 1);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn concurrent_producers_keep_per_partition_order() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("order", 3).await.expect("create");
    let mut tasks = Vec::new();
    for producer in 0..4u32 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u32 {
                let value = format!("{producer}:{i}");
                c.produce_values("order", i % 3, &[&value])
                    .await
                    .expect("produce");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    for p in 0..3 {
        let recs = all_records(&mut c, "order", p).await;
        let mut last = [None::<u32>; 4];
        for r in recs {
            let v = std::str::from_utf8(&r.value).expect("utf-8");
            let (producer, i) = v.split_once(':').expect("pair");
            let (producer, i): (usize, u32) = (producer.parse().expect("n"), i.parse().expect("n"));
            assert!(
                last[producer].is_none_or(|l| l < i),
                "producer {producer} reordered on partition {p}"
            );
            last[producer] = Some(i);
        }
    }
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let broker = TestBroker::start().await.expect("broker");
    let c = Clients::connect(broker.url()).await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rill.v1.Log".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(c.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["rill.v1.Log", "rill.v1.Groups", "rill.v1.Admin"] {
        assert!(names.iter().any(|n| n == s), "{s} in {names:?}");
    }
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn shutdown_releases_waiting_fetches_promptly_and_restarts_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_path_buf();
    let broker = TestBroker::start_with(rill_broker::Config::new(&data), Some(dir))
        .await
        .expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("bye", 1).await.expect("create");
    c.produce_values("bye", 0, &["a"]).await.expect("produce");
    let mut waiters = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        waiters.push(tokio::spawn(
            async move { c.fetch("bye", 0, 1, 30_000).await },
        ));
    }
    wait_until("20 fetches to wait", WAIT_LIMIT, || {
        broker.broker().waiting_fetches() >= 20
    })
    .await
    .expect("all 20 fetches wait");
    let t = Instant::now();
    let dir = broker.stop().await.expect("stop");
    for w in waiters {
        let resp = w
            .await
            .expect("join")
            .expect("released with an empty answer");
        assert!(resp.records.is_empty());
    }
    let released = t.elapsed();
    // They asked to wait 30 s: released well before that means shutdown ended them.
    assert!(released < Duration::from_secs(10), "took {released:?}");
    println!("20 waiting fetches released by shutdown in {released:?}");

    let broker = TestBroker::start_with(rill_broker::Config::new(&data), dir)
        .await
        .expect("restart");
    let topic = broker.broker().topic("bye").expect("topic");
    let log = topic.log(0).expect("log");
    assert!(
        log.recovery_report().clean,
        "clean restart: no recovery scan"
    );
    assert_eq!(log.recovery_report().scanned_bytes, 0);
    assert_eq!(log.high_watermark(), 1);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn the_wait_ends_before_the_client_deadline_and_on_disconnect() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("dl", 1).await.expect("create");
    // The client allows 1 s but asks to wait 10 s: the broker answers (empty) in time
    // instead of letting the call fail with DEADLINE_EXCEEDED.
    let mut req = tonic::Request::new(pb::FetchRequest {
        topic: "dl".into(),
        max_wait_ms: 10_000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(1));
    let t = Instant::now();
    let resp = c
        .log
        .fetch(req)
        .await
        .expect("answered before the deadline")
        .into_inner();
    assert!(resp.records.is_empty());
    // It asked to wait 10 s; the answer came within the client's 1 s (the call succeeded).
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A client that goes away ends its wait at once.
    let mut waiter = c.clone();
    let call = tokio::spawn(async move { waiter.fetch("dl", 0, 0, 30_000).await });
    wait_until("the fetch to wait", WAIT_LIMIT, || {
        broker.broker().waiting_fetches() >= 1
    })
    .await
    .expect("the fetch waits");
    call.abort();
    let t = Instant::now();
    // The fetch asked for 30 s; released well before that means the disconnect ended it.
    wait_until(
        "the disconnected fetch to end",
        Duration::from_secs(10),
        || broker.broker().waiting_fetches() == 0,
    )
    .await
    .expect("the wait outlived its client");
    println!("a disconnected fetch was released in {:?}", t.elapsed());
    broker.stop().await.expect("stop");
}
