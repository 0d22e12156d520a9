//! Pipelined produce on a replicated partition keeps the producer's order, on 3 real broker
//! processes: a ProduceStream's requests are proposed in arrival order, and an idempotent
//! batch that reaches the leader before its predecessor waits for it instead of being
//! proposed, refused by the apply and resent.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rill_proto::v1 as pb;
use rill_proto::v1::produce_request::Payload;
use rill_tests::cluster::{while_unavailable, TestCluster};
use rill_tests::Clients;
use tokio_stream::StreamExt;

/// The longest an election, a commit or a catch-up may take in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts 3 brokers with topic `name` (one partition, replication factor 3); returns the
/// cluster, the partition's leader and that leader's clients.
async fn start(name: &str) -> (TestCluster, u64, Clients) {
    let cluster = TestCluster::start_with_topic(name, 1)
        .await
        .expect("cluster");
    let leader = cluster
        .wait_partition_leader(name, 0, DEADLINE)
        .await
        .expect("leader");
    let c = cluster.clients(leader).await.expect("connect");
    (cluster, leader, c)
}

/// A new idempotent producer's id and epoch.
/// (The cluster may still be creating `__producers`: UNAVAILABLE is retried.)
async fn init(c: &mut Clients) -> (i64, i32) {
    let log = c.log.clone();
    let r = while_unavailable(DEADLINE, || {
        let mut log = log.clone();
        async move { log.init_producer(pb::InitProducerRequest::default()).await }
    })
    .await
    .expect("init")
    .into_inner();
    (r.producer_id, r.producer_epoch)
}

/// An idempotent produce of `values` to partition 0 of `topic` at `seq`, `quorum` acks.
fn req(topic: &str, (id, epoch): (i64, i32), seq: i32, values: &[String]) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(0),
        ack: pb::AckMode::Quorum as i32,
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

/// Asserts that every replica holds exactly `expected` (offset → value) in partition 0.
async fn assert_replicas_hold(cluster: &TestCluster, topic: &str, expected: &[String]) {
    let want: BTreeMap<u64, String> = expected
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.clone()))
        .collect();
    for id in cluster.ids() {
        cluster
            .wait_records(id, topic, 0, want.len() as u64, DEADLINE)
            .await
            .expect("records");
        let got = cluster.read_all(id, topic, 0).await.expect("read");
        assert_eq!(got, want, "node {id}: each record once, in sequence order");
    }
}

/// A ProduceStream to the leader carrying an idempotent producer's batches back to back, none
/// waiting for an earlier ack: each is proposed in arrival order, so every ack is OK and the
/// records lie in sequence order on every replica. Catches a stream whose replicated requests
/// are proposed from tasks of their own (a later batch proposed first is refused as a gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_to_a_replicated_partition_is_proposed_in_arrival_order() {
    let (cluster, _leader, mut c) = start("stream").await;
    let producer = init(&mut c).await;
    let batches = 300u64;
    let per_batch = 2;
    let mut values = Vec::new();
    let mut reqs = Vec::new();
    for b in 0..batches {
        let batch: Vec<String> = (0..per_batch).map(|k| format!("b{b:04}-{k}")).collect();
        let seq = (b * per_batch) as i32;
        reqs.push(pb::ProduceStreamRequest {
            sequence: b,
            request: Some(req("stream", producer, seq, &batch)),
        });
        values.extend(batch);
    }
    let mut acks = tokio::time::timeout(DEADLINE, c.log.produce_stream(tokio_stream::iter(reqs)))
        .await
        .expect("stream opened in time")
        .expect("stream")
        .into_inner();
    let mut refused = Vec::new();
    let mut next = 0u64;
    while let Some(ack) = tokio::time::timeout(DEADLINE, acks.next())
        .await
        .expect("ack in time")
    {
        let ack = ack.expect("ack");
        assert_eq!(ack.sequence, next, "acks in request order");
        next += 1;
        match ack.response {
            Some(r) => assert_eq!(
                r.appends[0].base_offset,
                ack.sequence * per_batch,
                "batch {} at its place",
                ack.sequence
            ),
            None => refused.push((ack.sequence, ack.error_code, ack.error_message)),
        }
    }
    assert_eq!(next, batches, "an ack for every request");
    assert!(
        refused.is_empty(),
        "{} of {batches} batches refused, first {:?}",
        refused.len(),
        refused.first()
    );
    assert_replicas_hold(&cluster, "stream", &values).await;
}

/// Two unary idempotent produces where the later batch (sequence n+1) reaches the leader
/// first and its predecessor 20 ms after: the later one waits on the leader for the earlier
/// one to be proposed, and both land, in order, without a refusal. Catches a leader that
/// proposes an early batch at once (the apply refuses it with FAILED_PRECONDITION).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overtaking_unary_batch_waits_on_the_leader_for_its_predecessor() {
    let (cluster, _leader, mut c) = start("unary").await;
    let producer = init(&mut c).await;
    let v = |s: &str| vec![s.to_string()];
    // A first batch, so the leader knows the producer (sequence n = 1 next).
    c.log
        .produce(req("unary", producer, 0, &v("a")))
        .await
        .expect("the first batch");
    for round in 0..3 {
        let base = 1 + 2 * round;
        let (first, second) = (format!("first-{round}"), format!("second-{round}"));
        let mut early = c.log.clone();
        let second_req = req("unary", producer, base + 1, &v(&second));
        let second_call = tokio::spawn(async move { early.produce(second_req).await });
        // The later batch gets a head start; the leader holds it (up to 100 ms) until this
        // one is proposed.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let first_ack = c
            .log
            .produce(req("unary", producer, base, &v(&first)))
            .await
            .expect("the earlier batch")
            .into_inner();
        let second_ack = second_call
            .await
            .expect("task")
            .expect("the overtaking batch waited for its predecessor, not refused")
            .into_inner();
        assert_eq!(first_ack.appends[0].base_offset, base as u64);
        assert_eq!(second_ack.appends[0].base_offset, base as u64 + 1);
    }
    let expected: Vec<String> = std::iter::once("a".to_string())
        .chain((0..3).flat_map(|r| [format!("first-{r}"), format!("second-{r}")]))
        .collect();
    assert_replicas_hold(&cluster, "unary", &expected).await;
}

/// The client library's Producer with 5 batches in flight (separate calls, which may reach
/// the leader out of order) writes 2,000 records to a replication factor 3 partition: every
/// record once, at the offset it was acknowledged with, in order on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_producer_with_5_in_flight_writes_every_record_once_in_order() {
    use rill_client::{Producer, ProducerConfig, ProducerRecord};
    let (cluster, leader, _c) = start("lib").await;
    let conn = rill_client::Connection::connect(&cluster.addr(leader).to_string())
        .await
        .expect("connect");
    let producer = Producer::new(
        conn,
        ProducerConfig::new()
            .max_in_flight(5)
            .batch_bytes(10 * (6 + 32))
            .linger_ms(1_000),
    );
    let n = 2_000u64;
    let mut acks = Vec::new();
    for i in 0..n {
        let record = ProducerRecord::new("lib", format!("r{i:05}")).partition(0);
        acks.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    for (i, ack) in acks.into_iter().enumerate() {
        let acked = tokio::time::timeout(DEADLINE, ack)
            .await
            .expect("acked in time")
            .expect("acked");
        assert_eq!(acked, (0, i as u64), "record {i} acknowledged elsewhere");
    }
    let values: Vec<String> = (0..n).map(|i| format!("r{i:05}")).collect();
    assert_replicas_hold(&cluster, "lib", &values).await;
}
