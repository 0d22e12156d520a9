//! Issue 9, points 3 and 4: the client library's producer and consumer against a real broker.
//! - The producer's buffer is bounded: `send` waits for room, `try_send` fails at once.
//! - A slow topic lookup holds up only the sends to that topic, and concurrent first sends
//!   to a topic share one lookup.
//! - A dropped producer frees its partition tasks and its connection (no reference cycle).
//! - A consumer's fetch that the transport breaks (the broker killed mid long-poll) is
//!   retried: retryability is typed, not read from message text.
//! - Auto-commit never covers the record in the application's hands: a consumer that dies
//!   holding a record leaves it to the group; `commit` and `close` behave as documented.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rill_client::{
    Admin, AutoOffsetReset, ClientError, Connection, Consumer, ConsumerConfig, ConsumerEvent,
    Producer, ProducerConfig, ProducerRecord, TopicSettings,
};
use rill_tests::{BrokerProcess, TestBroker};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every wait in this file ends by this deadline.
const DEADLINE: Duration = Duration::from_secs(20);

async fn connect(broker: &TestBroker) -> Connection {
    Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect")
}

async fn create_topic(conn: &Connection, name: &str, partitions: u32) {
    Admin::new(conn.clone())
        .create_topic(name, TopicSettings::new().partitions(partitions))
        .await
        .expect("create topic");
}

/// A TCP forwarder in front of the broker that counts the client connections open through
/// it: a client's connection is seen to close from outside the client.
struct CountingProxy {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    changed: Arc<Notify>,
    cancel: CancellationToken,
    accept: JoinHandle<()>,
}

impl CountingProxy {
    async fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicUsize::new(0));
        let changed = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let accept = {
            let (open, changed, cancel) = (open.clone(), changed.clone(), cancel.clone());
            tokio::spawn(async move {
                let tracker = tokio_util::task::TaskTracker::new();
                loop {
                    let mut inbound = tokio::select! {
                        _ = cancel.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => break,
                        },
                    };
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    open.fetch_add(1, Ordering::SeqCst);
                    changed.notify_waiters();
                    let (open, changed, cancel) = (open.clone(), changed.clone(), cancel.clone());
                    tracker.spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                        changed.notify_waiters();
                    });
                }
                tracker.close();
                tracker.wait().await;
            })
        };
        CountingProxy {
            addr,
            open,
            changed,
            cancel,
            accept,
        }
    }

    /// Waits until `pred(open connections)` holds; false at the deadline.
    async fn wait_until(&self, pred: impl Fn(usize) -> bool) -> bool {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.changed.notified();
                if pred(self.open.load(Ordering::SeqCst)) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.accept.await.expect("proxy task");
    }
}

#[tokio::test]
async fn a_full_buffer_makes_send_wait_and_try_send_fail() {
    let broker = TestBroker::start().await.expect("broker");
    let conn = connect(&broker).await;
    create_topic(&conn, "bp", 1).await;
    // Batches linger for a minute, so records stay in the buffer until a flush sends them.
    let buffer_memory_bytes = 10_000;
    let producer = Producer::new(
        conn.clone(),
        ProducerConfig::new()
            .linger_ms(60_000)
            .buffer_memory_bytes(buffer_memory_bytes),
    );
    // 1,000-byte values count 1,032 bytes each: nine fit in 10,000 bytes, a tenth does not.
    let value = "x".repeat(1000);
    let mut acks = Vec::new();
    for _ in 0..9 {
        let ack = producer
            .try_send(ProducerRecord::new("bp", value.clone()))
            .await
            .expect("room for nine");
        acks.push(ack);
    }
    match producer
        .try_send(ProducerRecord::new("bp", value.clone()))
        .await
    {
        Err(ClientError::BufferFull {
            topic,
            size_bytes,
            buffer_memory_bytes: limit,
        }) => {
            assert_eq!(topic, "bp");
            assert_eq!(size_bytes, 1032);
            assert_eq!(limit, buffer_memory_bytes);
        }
        Ok(_) => panic!("try_send took a record into a full buffer"),
        Err(e) => panic!("expected BufferFull, got {e:?}"),
    }

    // `send` waits for room instead.
    let mut waiting = {
        let producer = producer.clone();
        let value = value.clone();
        tokio::spawn(async move { producer.send(ProducerRecord::new("bp", value)).await })
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "send returned although the buffer is full"
    );
    // A record larger than the whole buffer can never fit: refused at once, by both.
    let huge = "y".repeat(buffer_memory_bytes);
    for result in [
        producer.send(ProducerRecord::new("bp", huge.clone())).await,
        producer
            .try_send(ProducerRecord::new("bp", huge.clone()))
            .await,
    ] {
        assert!(
            matches!(result, Err(ClientError::RecordTooLarge { .. })),
            "a record larger than the buffer must be refused"
        );
    }

    // Sending the lingering batch frees its bytes; the waiting send goes through.
    tokio::time::timeout(DEADLINE, producer.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let tenth = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiting send got room")
        .expect("task")
        .expect("send");
    acks.push(tenth);
    tokio::time::timeout(DEADLINE, producer.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let mut offsets = Vec::new();
    for ack in acks {
        offsets.push(ack.await.expect("acked").1);
    }
    assert_eq!(offsets, (0..10).collect::<Vec<u64>>(), "all ten, in order");
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_dropped_producer_ends_its_tasks_and_closes_its_connection() {
    let broker = TestBroker::start().await.expect("broker");
    let direct = connect(&broker).await;
    create_topic(&direct, "gone", 3).await;
    let proxy = CountingProxy::start(broker.addr()).await;
    let conn = Connection::connect(&proxy.addr.to_string())
        .await
        .expect("connect through the proxy");
    assert!(proxy.wait_until(|n| n == 1).await, "one connection open");

    // The producer is the only holder of `conn`; its sends start a task per partition.
    let producer = Producer::new(conn, ProducerConfig::new().linger_ms(50));
    let mut acks = Vec::new();
    for p in 0..3 {
        let record = ProducerRecord::new("gone", format!("v{p}")).partition(p);
        acks.push(producer.send(record).await.expect("send"));
    }
    // Dropped without a flush: what was queued is still sent and acknowledged...
    drop(producer);
    for ack in acks {
        tokio::time::timeout(DEADLINE, ack)
            .await
            .expect("ack in time")
            .expect("a dropped producer still delivers what it queued");
    }
    // ...and then the tasks end, and with the last of them the connection closes. Each task
    // holds a handle on the connection, so this also shows that all of them ended.
    assert!(
        proxy.wait_until(|n| n == 0).await,
        "the dropped producer kept its connection open: its partition tasks are still alive"
    );
    proxy.stop().await;
    broker.stop().await.expect("stop");
}

/// The record at `offset` was handed out next.
fn expect_record(event: ConsumerEvent, offset: u64) {
    match event {
        ConsumerEvent::Record(r) => assert_eq!(r.offset, offset, "record at {offset}"),
        other => panic!("expected the record at {offset}, got {other:?}"),
    }
}

async fn next(consumer: &mut Consumer) -> ConsumerEvent {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a record in time")
        .expect("next")
}

async fn committed(conn: &Connection, group: &str, topic: &str) -> Option<u64> {
    Admin::new(conn.clone())
        .fetch_offsets(group, topic, &[0])
        .await
        .expect("fetch offsets")
        .into_iter()
        .find(|c| c.partition == 0)
        .and_then(|c| c.offset)
}

async fn produce(conn: &Connection, topic: &str, n: u64) {
    let producer = Producer::new(conn.clone(), ProducerConfig::new());
    for i in 0..n {
        producer
            .send_and_wait(ProducerRecord::new(topic, format!("v{i}")).partition(0))
            .await
            .expect("produce");
    }
}

async fn subscribe(conn: &Connection, group: &str, topic: &str, auto: Option<u64>) -> Consumer {
    let config = ConsumerConfig::new()
        .group(group)
        .auto_offset_reset(AutoOffsetReset::Earliest)
        .max_wait_ms(100)
        .auto_commit_interval_ms(auto);
    // Partition 0 given explicitly: these tests are about commits, and a consumer that manages
    // its partitions itself needs no membership (a dropped member would hold partition 0 for
    // its session timeout).
    Consumer::subscribe(conn.clone(), config, topic, Some(vec![0]))
        .await
        .expect("subscribe")
}

#[tokio::test]
async fn auto_commit_never_covers_the_record_in_hand() {
    let broker = TestBroker::start().await.expect("broker");
    let conn = connect(&broker).await;
    create_topic(&conn, "jobs", 1).await;
    produce(&conn, "jobs", 5).await;

    // Auto-commit on every call. Take three records; the process "crashes" while it
    // handles the third: the consumer is dropped, never closed.
    let mut c = subscribe(&conn, "g", "jobs", Some(0)).await;
    for offset in 0..3 {
        expect_record(next(&mut c).await, offset);
    }
    drop(c);
    assert_eq!(
        committed(&conn, "g", "jobs").await,
        Some(2),
        "records 0 and 1 were handed out by earlier calls; record 2 was still in hand"
    );

    // The group's next consumer gets the record that was in hand again.
    let mut c = subscribe(&conn, "g", "jobs", Some(0)).await;
    expect_record(next(&mut c).await, 2);
    drop(c);
    assert_eq!(committed(&conn, "g", "jobs").await, Some(2));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn commit_and_close_cover_the_record_in_hand() {
    let broker = TestBroker::start().await.expect("broker");
    let conn = connect(&broker).await;
    create_topic(&conn, "work", 1).await;
    produce(&conn, "work", 6).await;

    // Auto-commit on, with an interval too long to fire: close commits, the last record
    // included (closing says the application is done with it).
    let mut c = subscribe(&conn, "g", "work", Some(3_600_000)).await;
    expect_record(next(&mut c).await, 0);
    expect_record(next(&mut c).await, 1);
    assert_eq!(committed(&conn, "g", "work").await, None, "nothing due yet");
    c.close().await.expect("close");
    assert_eq!(committed(&conn, "g", "work").await, Some(2));

    // Manual commits: `commit` covers the record in hand; `close` commits nothing.
    let mut c = subscribe(&conn, "g", "work", None).await;
    expect_record(next(&mut c).await, 2);
    c.commit().await.expect("commit");
    assert_eq!(committed(&conn, "g", "work").await, Some(3));
    expect_record(next(&mut c).await, 3);
    c.close().await.expect("close");
    assert_eq!(
        committed(&conn, "g", "work").await,
        Some(3),
        "close without auto-commit commits nothing"
    );

    // An idle consumer commits, while it waits, what earlier calls handed out.
    let mut c = subscribe(&conn, "g", "work", Some(100)).await;
    expect_record(next(&mut c).await, 3);
    expect_record(next(&mut c).await, 4);
    expect_record(next(&mut c).await, 5);
    let idle = c
        .next_timeout(Duration::from_secs(2))
        .await
        .expect("next while idle");
    assert!(idle.is_none(), "no more records: {idle:?}");
    assert_eq!(
        committed(&conn, "g", "work").await,
        Some(6),
        "the records handed out before the wait are committed during it"
    );
    drop(c);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_consumer_outlives_a_broker_killed_under_its_long_poll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
    let addr = broker.addr().to_string();
    let conn = Connection::connect(&addr).await.expect("connect");
    create_topic(&conn, "live", 1).await;
    produce(&conn, "live", 1).await;
    let config = ConsumerConfig::new()
        .auto_offset_reset(AutoOffsetReset::Earliest)
        .max_wait_ms(10_000);
    let mut c = Consumer::subscribe(conn.clone(), config, "live", None)
        .await
        .expect("subscribe");
    expect_record(next(&mut c).await, 0);
    // The next long-poll is parked in the broker (nothing to read for 10 s) when the broker
    // dies: the in-flight fetch fails with a transport error (UNKNOWN, not UNAVAILABLE).
    let idle = c
        .next_timeout(Duration::from_millis(500))
        .await
        .expect("idle");
    assert!(idle.is_none());
    broker.signal_and_wait(9).await.expect("kill -9");
    let broker = BrokerProcess::spawn_at(dir.path(), &addr, &[])
        .await
        .expect("restart");
    produce(&conn, "live", 1).await;
    expect_record(next(&mut c).await, 1);
    drop(c);
    assert!(broker.stop().await.expect("stop").success());
}

/// An Admin service whose DescribeTopic for "slow" waits until released; it counts lookups
/// per topic name.
struct StallingAdmin {
    lookups: tokio::sync::watch::Sender<HashMap<String, usize>>,
    release: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl rill_proto::v1::admin_server::Admin for StallingAdmin {
    async fn create_topic(
        &self,
        _: tonic::Request<rill_proto::v1::CreateTopicRequest>,
    ) -> Result<tonic::Response<rill_proto::v1::CreateTopicResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn delete_topic(
        &self,
        _: tonic::Request<rill_proto::v1::DeleteTopicRequest>,
    ) -> Result<tonic::Response<rill_proto::v1::DeleteTopicResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn list_topics(
        &self,
        _: tonic::Request<rill_proto::v1::ListTopicsRequest>,
    ) -> Result<tonic::Response<rill_proto::v1::ListTopicsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn describe_topic(
        &self,
        request: tonic::Request<rill_proto::v1::DescribeTopicRequest>,
    ) -> Result<tonic::Response<rill_proto::v1::TopicDescription>, tonic::Status> {
        let name = request.into_inner().name;
        self.lookups
            .send_modify(|m| *m.entry(name.clone()).or_default() += 1);
        if name == "slow" {
            let mut release = self.release.clone();
            release
                .wait_for(|released| *released)
                .await
                .map_err(|_| tonic::Status::unavailable("fake stopped"))?;
        }
        Ok(tonic::Response::new(rill_proto::v1::TopicDescription {
            name,
            partitions: vec![Default::default()],
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn a_slow_topic_lookup_holds_up_only_its_own_topic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (lookups, mut lookups_seen) = tokio::sync::watch::channel(HashMap::new());
    let count = |m: &HashMap<String, usize>, name: &str| m.get(name).copied().unwrap_or(0);
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let shutdown = CancellationToken::new();
    let server = {
        let admin = StallingAdmin { lookups, release };
        let shutdown = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(rill_proto::v1::admin_server::AdminServer::new(admin))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                ),
        )
    };
    let conn = Connection::connect(&addr.to_string())
        .await
        .expect("connect");
    // No Log service: the records fail later, but queueing them needs only the lookup.
    let producer = Producer::new(conn, ProducerConfig::new().retry_timeout_ms(0));

    // Three concurrent first sends to "slow" wait in its lookup...
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move {
                producer
                    .send(ProducerRecord::new("slow", format!("s{i}")))
                    .await
                    .map(drop)
            })
        })
        .collect();
    tokio::time::timeout(DEADLINE, lookups_seen.wait_for(|m| count(m, "slow") >= 1))
        .await
        .expect("the lookup started in time")
        .expect("fake alive");
    // ...while a send to another topic is not held up by them.
    tokio::time::timeout(DEADLINE, producer.send(ProducerRecord::new("fast", "f")))
        .await
        .expect("a send to another topic waited for the slow lookup")
        .expect("queued");
    release_tx.send(true).expect("release");
    for send in slow {
        tokio::time::timeout(DEADLINE, send)
            .await
            .expect("released in time")
            .expect("task")
            .expect("queued");
    }
    let seen = lookups_seen.borrow().clone();
    assert_eq!(
        count(&seen, "slow"),
        1,
        "concurrent first sends share one lookup"
    );
    assert_eq!(count(&seen, "fast"), 1);
    drop(producer);
    shutdown.cancel();
    server.await.expect("server task").expect("server");
}
