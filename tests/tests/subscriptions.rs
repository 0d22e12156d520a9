//! Queue subscriptions and push over gRPC, against a real broker: consumers sharing one
//! partition, redelivery after a lock expires, refused late acks, dead letters, bad input,
//! state across a restart, and credit flow control.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_tests::{Clients, TestBroker};
use tonic::transport::Channel;
use tonic::Code;

type Subs = SubscriptionsClient<Channel>;

async fn setup(partitions: u32) -> Result<(TestBroker, Clients, Subs)> {
    let broker = TestBroker::start().await?;
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("t", partitions).await?;
    let subs = SubscriptionsClient::new(c.channel.clone());
    Ok((broker, c, subs))
}

fn config(ack_deadline_ms: u32, attempts: u32, dlq: &str) -> pb::SubscriptionConfig {
    pb::SubscriptionConfig {
        topic: "t".into(),
        ack_deadline_ms,
        max_delivery_attempts: attempts,
        dead_letter_topic: dlq.into(),
        max_in_flight_per_partition: 0,
        push: None,
    }
}

async fn create(subs: &mut Subs, name: &str, c: pb::SubscriptionConfig) -> Result<()> {
    subs.create(pb::CreateSubscriptionRequest {
        name: name.into(),
        config: Some(c),
        start: pb::StartPosition::Earliest as i32,
    })
    .await?;
    Ok(())
}

async fn receive(
    subs: &mut Subs,
    name: &str,
    consumer: &str,
    max_records: u32,
    max_wait_ms: u32,
) -> std::result::Result<Vec<pb::ReceivedRecord>, tonic::Status> {
    Ok(subs
        .receive(pb::ReceiveRequest {
            subscription: name.into(),
            consumer_id: consumer.into(),
            max_records,
            max_wait_ms,
            max_bytes: 0,
        })
        .await?
        .into_inner()
        .records)
}

async fn ack(
    subs: &mut Subs,
    name: &str,
    consumer: &str,
    offsets: &[(u32, u64)],
    kind: pb::AckType,
    error: &str,
) -> std::result::Result<pb::AcknowledgeResponse, tonic::Status> {
    Ok(subs
        .acknowledge(pb::AcknowledgeRequest {
            subscription: name.into(),
            consumer_id: consumer.into(),
            ranges: offsets
                .iter()
                .map(|&(partition, o)| pb::AckRange {
                    partition,
                    first_offset: o,
                    last_offset: o,
                })
                .collect(),
            r#type: kind as i32,
            delay_ms: 0,
            error: error.into(),
        })
        .await?
        .into_inner())
}

fn offsets(records: &[pb::ReceivedRecord]) -> Vec<(u32, u64)> {
    records
        .iter()
        .map(|r| {
            (
                r.partition,
                r.record.as_ref().map_or(u64::MAX, |x| x.offset),
            )
        })
        .collect()
}

async fn describe(subs: &mut Subs, name: &str) -> Result<pb::DescribeSubscriptionResponse> {
    Ok(subs
        .describe(pb::DescribeSubscriptionRequest { name: name.into() })
        .await?
        .into_inner())
}

async fn produce_n(c: &mut Clients, topic: &str, n: usize) -> Result<()> {
    let values: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    c.produce_values(topic, 0, &refs).await?;
    Ok(())
}

/// Three consumers share one partition: no record is held by two at once, and each is
/// delivered exactly once when every consumer acks within the deadline.
#[tokio::test]
async fn three_consumers_on_one_partition_never_hold_a_record_at_once() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(30_000, 5, "")).await?;
    produce_n(&mut c, "t", 300).await?;
    let held: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let seen: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let mut tasks = Vec::new();
    for id in 0..3 {
        let (mut subs, held, seen) = (subs.clone(), held.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let consumer = format!("c{id}");
            loop {
                let got = receive(&mut subs, "s", &consumer, 7, 300).await?;
                if got.is_empty() {
                    return Ok::<_, anyhow::Error>(());
                }
                for (_, o) in offsets(&got) {
                    assert!(
                        held.lock().expect("lock").insert(o),
                        "offset {o} held twice"
                    );
                    *seen.lock().expect("lock").entry(o).or_default() += 1;
                }
                // Hold them a moment, so the others receive meanwhile.
                tokio::task::yield_now().await;
                ack(
                    &mut subs,
                    "s",
                    &consumer,
                    &offsets(&got),
                    pb::AckType::Ack,
                    "",
                )
                .await?;
                for (_, o) in offsets(&got) {
                    held.lock().expect("lock").remove(&o);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 300, "every record delivered");
    assert!(seen.values().all(|n| *n == 1), "each exactly once");
    let d = describe(&mut subs, "s").await?;
    assert_eq!((d.backlog, d.in_flight), (0, 0));
    broker.stop().await?;
    Ok(())
}

/// A consumer that dies holding records: they return to another consumer after the ack
/// deadline (not before), with their delivery count raised; the dead consumer's late ack is
/// refused and changes nothing.
#[tokio::test]
async fn a_killed_consumers_records_return_after_the_deadline_and_its_late_ack_is_refused(
) -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(600, 5, "")).await?;
    produce_n(&mut c, "t", 5).await?;
    let start = tokio::time::Instant::now();
    let a = receive(&mut subs, "s", "a", 100, 1_000).await?;
    assert_eq!(offsets(&a), (0..5).map(|o| (0, o)).collect::<Vec<_>>());
    assert!(a.iter().all(|r| r.delivery_count == 1));
    // "a" is killed here: it never acks. Nothing is free meanwhile.
    assert!(receive(&mut subs, "s", "b", 100, 100).await?.is_empty());
    let b = receive(&mut subs, "s", "b", 100, 10_000).await?;
    let waited = start.elapsed();
    assert_eq!(offsets(&b), offsets(&a), "the same records, to b");
    assert!(b.iter().all(|r| r.delivery_count == 2), "{b:?}");
    assert!(
        waited >= Duration::from_millis(550),
        "returned before the deadline: {waited:?}"
    );
    let before = describe(&mut subs, "s").await?;
    let err = ack(&mut subs, "s", "a", &offsets(&a), pb::AckType::Ack, "")
        .await
        .expect_err("a's lock expired");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("offset 0"), "{}", err.message());
    let after = describe(&mut subs, "s").await?;
    assert_eq!(
        (after.backlog, after.in_flight, after.partitions.clone()),
        (before.backlog, before.in_flight, before.partitions.clone()),
        "the refused ack changed nothing"
    );
    assert_eq!(after.in_flight, 5, "still b's");
    ack(&mut subs, "s", "b", &offsets(&b), pb::AckType::Ack, "").await?;
    assert_eq!(describe(&mut subs, "s").await?.backlog, 0);
    broker.stop().await?;
    Ok(())
}

/// Past max_delivery_attempts a record goes to the dead-letter topic with its origin in
/// headers; a reject goes at once.
#[tokio::test]
async fn records_past_their_attempts_and_rejected_ones_are_dead_lettered() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    c.create_topic("dlq", 1).await?;
    create(&mut subs, "s", config(30_000, 2, "dlq")).await?;
    produce_n(&mut c, "t", 2).await?;
    for attempt in 1..=2 {
        let got = receive(&mut subs, "s", "a", 1, 1_000).await?;
        assert_eq!(offsets(&got), vec![(0, 0)], "attempt {attempt}");
        assert_eq!(got[0].delivery_count, attempt);
        ack(&mut subs, "s", "a", &[(0, 0)], pb::AckType::Nack, "boom").await?;
    }
    let got = receive(&mut subs, "s", "a", 10, 1_000).await?;
    assert_eq!(
        offsets(&got),
        vec![(0, 1)],
        "offset 0 left after 2 attempts"
    );
    ack(
        &mut subs,
        "s",
        "a",
        &[(0, 1)],
        pb::AckType::Reject,
        "poison",
    )
    .await?;
    let dead = c.fetch("dlq", 0, 0, 1_000).await?.records;
    assert_eq!(dead.len(), 2);
    let headers = |r: &pb::FetchedRecord| -> BTreeMap<String, String> {
        r.headers
            .iter()
            .map(|h| {
                (
                    h.key.clone(),
                    String::from_utf8_lossy(&h.value).into_owned(),
                )
            })
            .collect()
    };
    let first = headers(&dead[0]);
    assert_eq!(first["rill-dead-letter-topic"], "t");
    assert_eq!(first["rill-dead-letter-partition"], "0");
    assert_eq!(first["rill-dead-letter-offset"], "0");
    assert_eq!(first["rill-dead-letter-attempts"], "2");
    assert_eq!(first["rill-dead-letter-error"], "boom");
    assert_eq!(dead[0].value.as_ref(), b"v0");
    let second = headers(&dead[1]);
    assert_eq!(second["rill-dead-letter-offset"], "1");
    assert_eq!(second["rill-dead-letter-attempts"], "1");
    assert_eq!(second["rill-dead-letter-error"], "poison");
    let d = describe(&mut subs, "s").await?;
    assert_eq!((d.backlog, d.dead_lettered, d.archived), (0, 2, 0));
    broker.stop().await?;
    Ok(())
}

/// Bad input gets its status and changes nothing.
#[tokio::test]
async fn bad_input_is_refused() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    let err = create(&mut subs, "s", config(0, 0, "missing"))
        .await
        .expect_err("no dead-letter topic");
    let status = err.downcast_ref::<tonic::Status>().context("a status")?;
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(status.message().contains("missing"), "{}", status.message());
    let list = subs
        .list(pb::ListSubscriptionsRequest {})
        .await?
        .into_inner();
    assert!(list.subscriptions.is_empty(), "nothing created");

    fn code<T: std::fmt::Debug>(r: std::result::Result<T, tonic::Status>) -> Code {
        r.expect_err("refused").code()
    }
    assert_eq!(
        code(receive(&mut subs, "nope", "a", 1, 0).await),
        Code::NotFound
    );
    assert_eq!(
        code(ack(&mut subs, "nope", "a", &[(0, 0)], pb::AckType::Ack, "").await),
        Code::NotFound
    );
    create(&mut subs, "s", config(0, 0, "")).await?;
    let err = create(&mut subs, "s", config(0, 0, ""))
        .await
        .expect_err("exists");
    assert_eq!(
        err.downcast_ref::<tonic::Status>().map(|s| s.code()),
        Some(Code::AlreadyExists)
    );
    produce_n(&mut c, "t", 3).await?;
    let got = receive(&mut subs, "s", "a", 1, 1_000).await?;
    assert_eq!(offsets(&got), vec![(0, 0)]);
    let before = describe(&mut subs, "s").await?;
    // Offsets never delivered (1 and 2 exist but were not handed out; 99 does not exist).
    for o in [1, 99] {
        let err = ack(&mut subs, "s", "a", &[(0, 0), (0, o)], pb::AckType::Ack, "")
            .await
            .expect_err("never delivered");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains("never delivered"),
            "{}",
            err.message()
        );
    }
    assert_eq!(
        code(ack(&mut subs, "s", "a", &[(0, 0)], pb::AckType::Unspecified, "").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(receive(&mut subs, "s", "", 1, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ack(&mut subs, "s", "a", &[(7, 0)], pb::AckType::Ack, "").await),
        Code::NotFound,
        "no such partition"
    );
    let after = describe(&mut subs, "s").await?;
    assert_eq!(
        after.partitions, before.partitions,
        "refusals changed nothing"
    );
    // The held record is still acknowledgeable.
    ack(&mut subs, "s", "a", &[(0, 0)], pb::AckType::Ack, "").await?;
    broker.stop().await?;
    Ok(())
}

/// Acknowledged ranges and delivery counts survive a restart; records acquired and not
/// acknowledged are delivered again at once after it, acknowledged ones never.
#[tokio::test]
async fn state_survives_a_restart_and_unacked_records_come_back() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(60_000, 5, "")).await?;
    produce_n(&mut c, "t", 10).await?;
    let got = receive(&mut subs, "s", "a", 10, 1_000).await?;
    assert_eq!(got.len(), 10);
    let acked: Vec<(u32, u64)> = [0, 2, 4, 6, 8].iter().map(|&o| (0, o)).collect();
    ack(&mut subs, "s", "a", &acked, pb::AckType::Ack, "").await?;
    let dir = broker.stop().await?.context("temp dir")?;

    let config = rill_broker::Config::new(dir.path());
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let c = Clients::connect(broker.url()).await?;
    let mut subs = SubscriptionsClient::new(c.channel.clone());
    let again = receive(&mut subs, "s", "b", 100, 5_000).await?;
    assert_eq!(
        offsets(&again),
        [1, 3, 5, 7, 9].iter().map(|&o| (0, o)).collect::<Vec<_>>()
    );
    assert!(
        again.iter().all(|r| r.delivery_count == 2),
        "counts survived: {again:?}"
    );
    ack(&mut subs, "s", "b", &offsets(&again), pb::AckType::Ack, "").await?;
    let d = describe(&mut subs, "s").await?;
    assert_eq!((d.backlog, d.partitions[0].ack_floor), (0, 10));
    broker.stop().await?;
    Ok(())
}

/// Seek replays: to offset 0 every record is delivered again; to a time after the last
/// record nothing is left.
#[tokio::test]
async fn seek_replays_and_skips() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(30_000, 5, "")).await?;
    produce_n(&mut c, "t", 4).await?;
    let got = receive(&mut subs, "s", "a", 10, 1_000).await?;
    ack(&mut subs, "s", "a", &offsets(&got), pb::AckType::Ack, "").await?;
    subs.seek(pb::SeekSubscriptionRequest {
        name: "s".into(),
        target: Some(pb::seek_subscription_request::Target::ToOffset(0)),
        partition: None,
    })
    .await?;
    assert_eq!(describe(&mut subs, "s").await?.backlog, 4);
    let again = receive(&mut subs, "s", "a", 10, 1_000).await?;
    assert_eq!(offsets(&again), offsets(&got));
    subs.seek(pb::SeekSubscriptionRequest {
        name: "s".into(),
        target: Some(pb::seek_subscription_request::Target::ToTimestampMs(
            rill_storage::log::now_ms() + 60_000,
        )),
        partition: None,
    })
    .await?;
    let d = describe(&mut subs, "s").await?;
    assert_eq!(
        (d.backlog, d.in_flight),
        (0, 0),
        "locks dropped, nothing left"
    );
    broker.stop().await?;
    Ok(())
}

/// Opens a push stream; returns the sender of client messages and the response stream.
async fn open_push(
    subs: &mut Subs,
    start: pb::SubscribeStart,
) -> Result<(
    tokio::sync::mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::SubscribeResponse>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Start(start)),
    })
    .await?;
    let stream = subs
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

fn credits(records: u64, bytes: u64) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Credits(pb::Credits {
            records,
            bytes,
        })),
    }
}

/// Takes pushed records until `n` arrived; fails on anything else or after 10 s.
async fn take(stream: &mut tonic::Streaming<pb::SubscribeResponse>, n: usize) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .context("no record within 10 s")??
            .context("stream ended")?;
        match msg.kind {
            Some(pb::subscribe_response::Kind::Record(r)) => {
                out.push(r.record.context("record")?.offset)
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    Ok(out)
}

/// Nothing more arrives within `ms`.
async fn quiet(stream: &mut tonic::Streaming<pb::SubscribeResponse>, ms: u64) -> Result<()> {
    match tokio::time::timeout(Duration::from_millis(ms), stream.message()).await {
        Err(_) => Ok(()),
        Ok(m) => anyhow::bail!("pushed beyond the credits: {m:?}"),
    }
}

/// A push subscriber with 10 credits gets exactly 10 records until it grants more, in both
/// modes; acks travel on the stream in queue mode.
#[tokio::test]
async fn push_never_exceeds_the_credits_granted() -> Result<()> {
    let (broker, mut c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(30_000, 5, "")).await?;
    produce_n(&mut c, "t", 30).await?;

    let (tx, mut stream) = open_push(
        &mut subs,
        pb::SubscribeStart {
            target: Some(pb::subscribe_start::Target::Subscription("s".into())),
            consumer_id: "p".into(),
        },
    )
    .await?;
    tx.send(credits(10, 1 << 20)).await?;
    assert_eq!(take(&mut stream, 10).await?, (0..10).collect::<Vec<_>>());
    quiet(&mut stream, 500).await?;
    tx.send(credits(5, 1 << 20)).await?;
    assert_eq!(take(&mut stream, 5).await?, (10..15).collect::<Vec<_>>());
    quiet(&mut stream, 300).await?;
    // Acks on the stream.
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Ack(pb::StreamAck {
            sequence: 7,
            ranges: vec![pb::AckRange {
                partition: 0,
                first_offset: 0,
                last_offset: 14,
            }],
            r#type: pb::AckType::Ack as i32,
            delay_ms: 0,
            error: String::new(),
        })),
    })
    .await?;
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .context("ack result")?;
    match msg.kind {
        Some(pb::subscribe_response::Kind::AckResult(r)) => {
            assert_eq!(
                (r.sequence, r.error_code, r.records),
                (7, None, 15),
                "{r:?}"
            )
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    assert_eq!(describe(&mut subs, "s").await?.partitions[0].ack_floor, 15);

    drop(tx);

    // Byte credits bind too (on a new stream, as credits add up): "v15" and "v16" are 3
    // bytes each, and 7 bytes allow two.
    let (tx, mut stream) = open_push(
        &mut subs,
        pb::SubscribeStart {
            target: Some(pb::subscribe_start::Target::Subscription("s".into())),
            consumer_id: "q".into(),
        },
    )
    .await?;
    tx.send(credits(100, 7)).await?;
    assert_eq!(take(&mut stream, 2).await?, vec![15, 16]);
    quiet(&mut stream, 300).await?;
    drop(tx);

    // Offset mode: from the group's committed offset.
    c.groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "g".into(),
            topic: "t".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset: 20,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    let (tx, mut stream) = open_push(
        &mut subs,
        pb::SubscribeStart {
            target: Some(pb::subscribe_start::Target::Group(pb::GroupTarget {
                group: "g".into(),
                topic: "t".into(),
                partitions: vec![],
            })),
            consumer_id: String::new(),
        },
    )
    .await?;
    tx.send(credits(3, 1 << 20)).await?;
    assert_eq!(take(&mut stream, 3).await?, vec![20, 21, 22]);
    quiet(&mut stream, 300).await?;
    // New appends are pushed as they come, within the credits.
    tx.send(credits(10, 1 << 20)).await?;
    assert_eq!(take(&mut stream, 7).await?, (23..30).collect::<Vec<_>>());
    produce_n(&mut c, "t", 1).await?;
    assert_eq!(take(&mut stream, 1).await?, vec![30]);
    drop(tx);
    broker.stop().await?;
    Ok(())
}

/// Credits of 0 or 2^63 end the stream with INVALID_ARGUMENT.
#[tokio::test]
async fn credits_of_zero_or_two_to_the_63_are_refused() -> Result<()> {
    let (broker, _c, mut subs) = setup(1).await?;
    create(&mut subs, "s", config(0, 0, "")).await?;
    for (records, bytes) in [(0, 100), (1u64 << 63, 100), (10, 0), (10, 1u64 << 63)] {
        let (tx, mut stream) = open_push(
            &mut subs,
            pb::SubscribeStart {
                target: Some(pb::subscribe_start::Target::Subscription("s".into())),
                consumer_id: "p".into(),
            },
        )
        .await?;
        tx.send(credits(records, bytes)).await?;
        let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await?
            .expect_err("refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{records}/{bytes}: {err:?}"
        );
    }
    broker.stop().await?;
    Ok(())
}
