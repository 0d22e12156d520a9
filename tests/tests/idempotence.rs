//! Issue 12, the idempotent producer over real gRPC: retries return the original offsets and
//! append nothing (also across a restart); sequence gaps, stale epochs, unknown ids and bad
//! fields are refused; and 10,000 records sent through a proxy that drops acknowledgements at
//! random land exactly once, in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rill_client::{Connection, Producer, ProducerConfig, ProducerRecord};
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::{Clients, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn req(topic: &str, id: i64, epoch: i32, seq: i32, values: &[&str]) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(0),
        ack: pb::AckMode::Leader as i32,
        payload: Some(Payload::Records(pb::RecordList {
            records: values
                .iter()
                .map(|v| pb::Record {
                    value: Bytes::copy_from_slice(v.as_bytes()),
                    ..Default::default()
                })
                .collect(),
        })),
        producer_id: Some(id),
        producer_epoch: Some(epoch),
        base_sequence: Some(seq),
        ..Default::default()
    }
}

async fn init(c: &mut Clients, name: Option<&str>) -> (i64, i32) {
    let r = c
        .log
        .init_producer(pb::InitProducerRequest {
            producer_name: name.map(str::to_string),
        })
        .await
        .expect("init")
        .into_inner();
    (r.producer_id, r.producer_epoch)
}

async fn values(c: &mut Clients, topic: &str, partition: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let r = c.fetch(topic, partition, offset, 0).await.expect("fetch");
        if r.records.is_empty() {
            return out;
        }
        for rec in &r.records {
            out.push(String::from_utf8(rec.value.to_vec()).expect("utf8"));
        }
        offset = r.next_offset;
    }
}

#[tokio::test]
async fn a_retry_gets_the_original_offsets_and_bad_sequences_are_refused() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("i", 1).await.expect("create");
    let (id, epoch) = init(&mut c, None).await;
    let first = c
        .log
        .produce(req("i", id, epoch, 0, &["a", "b"]))
        .await
        .expect("first");
    c.log
        .produce(req("i", id, epoch, 2, &["c"]))
        .await
        .expect("second");
    // The retry of the first batch: same offsets, nothing appended.
    let retry = c
        .log
        .produce(req("i", id, epoch, 0, &["a", "b"]))
        .await
        .expect("retry");
    assert_eq!(retry.into_inner(), first.into_inner());
    // A gap: FAILED_PRECONDITION naming both sequences, and the expected one as metadata.
    let err = c
        .log
        .produce(req("i", id, epoch, 5, &["x"]))
        .await
        .expect_err("gap");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("expected 3, received 5"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("\"i\" partition 0"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata()
            .get("rill-expected-sequence")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    // An id the broker never gave.
    let err = c
        .log
        .produce(req("i", id + 1000, 0, 0, &["x"]))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("unknown producer id"),
        "{}",
        err.message()
    );
    // Bad fields: a negative sequence, an epoch past i16, only some of the three, and
    // records spread over partitions.
    for bad in [
        req("i", id, epoch, -5, &["x"]),
        req("i", id, 40_000, 0, &["x"]),
        pb::ProduceRequest {
            base_sequence: None,
            ..req("i", id, epoch, 3, &["x"])
        },
        pb::ProduceRequest {
            partition: None,
            ..req("i", id, epoch, 3, &["x"])
        },
    ] {
        let err = c.log.produce(bad).await.expect_err("bad fields");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    assert_eq!(
        values(&mut c, "i", 0).await,
        ["a", "b", "c"],
        "nothing else appended"
    );
    broker.stop().await.expect("stop");
}

/// Two batches of one producer in flight at once may reach the partition in the wrong order
/// (each call is its own task): the early one waits for its predecessor instead of being
/// refused, and both land in the producer's order.
#[tokio::test]
async fn a_batch_that_overtook_its_predecessor_waits_for_it_and_both_land_in_order() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("o", 1).await.expect("create");
    let (id, epoch) = init(&mut c, None).await;
    let mut early = c.log.clone();
    let second =
        tokio::spawn(async move { early.produce(req("o", id, epoch, 2, &["c", "d"])).await });
    // Give the second batch a head start (if it still arrives second, the order is simply
    // the natural one and the test proves less, never wrongly).
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let first = c
        .log
        .produce(req("o", id, epoch, 0, &["a", "b"]))
        .await
        .expect("the first batch")
        .into_inner();
    let second = second
        .await
        .expect("task")
        .expect("the second batch waited for the first, not refused")
        .into_inner();
    assert_eq!(first.appends[0].base_offset, 0, "{first:?}");
    assert_eq!(second.appends[0].base_offset, 2, "{second:?}");
    assert_eq!(values(&mut c, "o", 0).await, vec!["a", "b", "c", "d"]);

    // A batch whose predecessor never comes is still refused (after the wait), and nothing
    // of it is appended.
    let err = c
        .log
        .produce(req("o", id, epoch, 9, &["x"]))
        .await
        .expect_err("a real gap");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(values(&mut c, "o", 0).await, vec!["a", "b", "c", "d"]);
}

#[tokio::test]
async fn a_named_producer_fences_its_older_instance() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("n", 1).await.expect("create");
    let (id, old) = init(&mut c, Some("billing")).await;
    c.log
        .produce(req("n", id, old, 0, &["old"]))
        .await
        .expect("old");
    let (same, new) = init(&mut c, Some("billing")).await;
    assert_eq!((same, new), (id, old + 1));
    let err = c
        .log
        .produce(req("n", id, old, 1, &["stale"]))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("fenced"), "{}", err.message());
    // The new instance starts its sequence at 0.
    c.log
        .produce(req("n", id, new, 0, &["new"]))
        .await
        .expect("new");
    let err = c
        .log
        .produce(req("n", id, old, 1, &["stale"]))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(values(&mut c, "n", 0).await, ["old", "new"]);
    broker.stop().await.expect("stop");
}

/// The state survives a restart: a retry after it still gets the original offsets.
#[tokio::test]
async fn a_retry_after_a_restart_appends_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = rill_broker::Config::new(dir.path());
    let broker = TestBroker::start_with(config.clone(), None)
        .await
        .expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("r", 1).await.expect("create");
    let (id, epoch) = init(&mut c, None).await;
    let first = c
        .log
        .produce(req("r", id, epoch, 0, &["a"]))
        .await
        .expect("first");
    c.log
        .produce(req("r", id, epoch, 1, &["b", "c"]))
        .await
        .expect("second");
    broker.stop().await.expect("stop");
    let broker = TestBroker::start_with(config, None).await.expect("restart");
    let mut c = Clients::connect(broker.url()).await.expect("reconnect");
    let retry = c
        .log
        .produce(req("r", id, epoch, 0, &["a"]))
        .await
        .expect("retry");
    assert_eq!(retry.into_inner(), first.into_inner());
    let err = c
        .log
        .produce(req("r", id, epoch, 4, &["d"]))
        .await
        .expect_err("gap");
    assert!(err.message().contains("expected 3"), "{}", err.message());
    assert_eq!(values(&mut c, "r", 0).await, ["a", "b", "c"]);
    broker.stop().await.expect("stop");
}

/// A tiny deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A TCP proxy on 127.0.0.1 that forwards everything the client sends, but cuts each
/// connection after a random number of bytes of the broker's answers: requests already
/// forwarded are appended, their acknowledgements lost.
async fn drop_acks_proxy(
    broker: std::net::SocketAddr,
    stop: CancellationToken,
    seed: u64,
    cuts: Arc<AtomicU64>,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut rng = Rng(seed);
        loop {
            let client = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => return },
            };
            let budget = 300 + rng.below(3_000) as usize;
            let cuts = Arc::clone(&cuts);
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(broker).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = tokio::select! {
                        _ = stop.cancelled() => break,
                        n = ur.read(&mut buf) => match n { Ok(0) | Err(_) => break, Ok(n) => n },
                    };
                    let n = n.min(budget - sent);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                    if sent >= budget {
                        cuts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                // Dropping both halves closes both connections.
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test]
async fn ten_thousand_records_through_a_proxy_that_drops_acks_land_exactly_once_in_order() {
    const RECORDS: u64 = 10_000;
    const PARTITIONS: u32 = 2;
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("exact", PARTITIONS).await.expect("create");
    let stop = CancellationToken::new();
    let cuts = Arc::new(AtomicU64::new(0));
    let proxy = drop_acks_proxy(broker.addr(), stop.clone(), 0x5eed_1d3e, Arc::clone(&cuts)).await;
    let conn = Connection::connect(&proxy.to_string())
        .await
        .expect("connect via proxy");
    let producer = Producer::new(
        conn,
        ProducerConfig::new()
            .linger_ms(1)
            .batch_bytes(512)
            .retry_timeout_ms(60_000),
    );
    let mut acks = Vec::new();
    for i in 0..RECORDS {
        let p = (i % u64::from(PARTITIONS)) as u32;
        let ack = producer
            .send(ProducerRecord::new("exact", format!("{i:05}")).partition(p))
            .await
            .expect("send");
        acks.push(ack);
    }
    for ack in acks {
        ack.await.expect("every record is acknowledged in the end");
    }
    stop.cancel();
    assert!(
        cuts.load(Ordering::Relaxed) >= 3,
        "the proxy cut only {} connections: the test did not test retries",
        cuts.load(Ordering::Relaxed)
    );
    for p in 0..PARTITIONS {
        let got = values(&mut c, "exact", p).await;
        let want: Vec<String> = (0..RECORDS)
            .filter(|i| i % u64::from(PARTITIONS) == u64::from(p))
            .map(|i| format!("{i:05}"))
            .collect();
        assert_eq!(got.len(), want.len(), "partition {p}: duplicates or losses");
        assert!(got == want, "partition {p}: not exactly once in order");
    }
    broker.stop().await.expect("stop");
}

/// Without idempotence the same proxy shows what the test guards against: duplicates.
/// (Kept to prove the proxy really loses acknowledgements of appended batches.)
#[tokio::test]
async fn without_idempotence_the_same_faults_duplicate_records() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("dup", 1).await.expect("create");
    let stop = CancellationToken::new();
    let cuts = Arc::new(AtomicU64::new(0));
    let proxy = drop_acks_proxy(broker.addr(), stop.clone(), 7, Arc::clone(&cuts)).await;
    let conn = Connection::connect(&proxy.to_string())
        .await
        .expect("connect via proxy");
    let producer = Producer::new(
        conn,
        ProducerConfig::new()
            .idempotence(false)
            .linger_ms(1)
            .batch_bytes(512)
            .retry_timeout_ms(60_000),
    );
    let mut acks = Vec::new();
    for i in 0..3000u64 {
        acks.push(
            producer
                .send(ProducerRecord::new("dup", format!("{i:05}")).partition(0))
                .await
                .expect("send"),
        );
    }
    for ack in acks {
        ack.await.expect("acked");
    }
    stop.cancel();
    let got = values(&mut c, "dup", 0).await;
    assert!(
        got.len() > 3000,
        "expected duplicates, got exactly {}",
        got.len()
    );
    broker.stop().await.expect("stop");
}

/// `producer_id_expiration_ms` (`--producer-id-expiration-ms`): a producer idle longer than
/// it is forgotten by the partition. Probed with a sequence gap, which is refused and changes
/// nothing: it names the next sequence while the producer is known, and 0 once it expired;
/// then the retry of its first batch is no longer recognised and is appended again.
#[tokio::test]
async fn an_idle_producer_expires_after_the_configured_time() {
    const EXPIRY_MS: u64 = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = rill_broker::Config::new(dir.path()).producer_id_expiration_ms(EXPIRY_MS);
    let broker = TestBroker::start_with(config, None).await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("x", 1).await.expect("create");
    let (id, epoch) = init(&mut c, None).await;
    let started = std::time::Instant::now();
    let first = c
        .log
        .produce(req("x", id, epoch, 0, &["a"]))
        .await
        .expect("first")
        .into_inner();
    let retry = c
        .log
        .produce(req("x", id, epoch, 0, &["a"]))
        .await
        .expect("retry");
    assert_eq!(retry.into_inner(), first, "known: the retry is recognised");
    let deadline = started + std::time::Duration::from_secs(30);
    loop {
        let err = c
            .log
            .produce(req("x", id, epoch, 5, &["gap"]))
            .await
            .expect_err("a gap is refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        if err.message().contains("expected 0, received 5") {
            break;
        }
        assert!(
            err.message().contains("expected 1, received 5"),
            "{}",
            err.message()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the producer never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Its last batch was appended after `started`, and it is active until the expiry has
    // passed since then (a little slack for the wall clock's rounding).
    assert!(
        started.elapsed().as_millis() as u64 >= EXPIRY_MS - 100,
        "expired after {:?}, before the {EXPIRY_MS} ms setting",
        started.elapsed()
    );
    let again = c
        .log
        .produce(req("x", id, epoch, 0, &["a"]))
        .await
        .expect("after expiry")
        .into_inner();
    assert_ne!(again, first, "forgotten: the old batch is appended again");
    assert_eq!(values(&mut c, "x", 0).await, ["a", "a"]);
    broker.stop().await.expect("stop");
}
