//! One partition's sender: gathering batches, numbering them, keeping up to
//! `max_in_flight` in flight in order, retrying, and resolving the acks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rill_batch::{BatchBuilder, BatchError, Codec};
use rill_proto::v1::{self as pb, produce_request::Payload};
use tokio::sync::{mpsc, oneshot, OnceCell, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::{Ack, Msg, EXPECTED_SEQUENCE_METADATA_KEY};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::leaders::{Watched, LEADER_CHECK_AFTER_MS};
use crate::retry::RetryPolicy;

/// What one partition's sender has gathered for its next request.
#[derive(Default)]
struct Gathered {
    records: Vec<pb::Record>,
    acks: Vec<Ack>,
    permits: Vec<OwnedSemaphorePermit>,
    bytes: usize,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Gathered {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Record {
                record,
                size,
                ack,
                permit,
            } => {
                self.records.push(record);
                self.acks.push(ack);
                self.permits.push(permit);
                self.bytes += size;
            }
            Msg::Flush(done) => self.flushes.push(done),
        }
    }
}

/// The longest pause between produce retries when the producer was given several brokers.
pub(super) const CLUSTER_MAX_RETRY_DELAY: Duration = Duration::from_millis(100);

/// One partition's sender: gathers a batch, sends it with retries, resolves the acks. It
/// owns what it needs and nothing of the [`Producer`]'s shared state, so it ends once the
/// producer's queue sender is dropped and the queue is drained.
pub(super) struct PartitionSender {
    /// The bootstrap connection.
    pub(super) conn: Connection,
    /// Partition leaders in a cluster (empty with a single broker).
    pub(super) leaders: Arc<crate::leaders::Leaders>,
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) linger: Duration,
    pub(super) batch_bytes: usize,
    pub(super) ack: pb::AckMode,
    pub(super) retry: RetryPolicy,
    pub(super) idempotent: bool,
    /// Batches sent before the first is acknowledged (1 without idempotence).
    pub(super) max_in_flight: usize,
    /// The codec the producer compresses its batches with.
    pub(super) compression: Codec,
    pub(super) producer_name: Option<String>,
    /// The producer's shared id and epoch.
    pub(super) identity: Arc<OnceCell<(i64, i16)>>,
}

/// A batch sent and not yet settled.
struct InFlight {
    task: tokio::task::JoinHandle<Result<u64>>,
    gathered: Gathered,
}

/// One partition's place in its producer's sequence.
struct Sequence {
    /// The id and epoch in use; `None` until asked for (and after a reset).
    identity: Option<(i64, i16)>,
    /// The sequence of the next record.
    next: i32,
    /// Set when a batch failed for good: the batches after it cannot be appended (the
    /// broker waits for the failed one's sequence), so they stop retrying.
    broken: Arc<AtomicBool>,
    /// A batch failed for good: take a fresh producer id before the next batch.
    reset: bool,
    /// This partition started again after a failure: it uses an id of its own.
    fresh: bool,
}

/// What an idempotent batch carries.
#[derive(Clone)]
struct Stamp {
    id: i64,
    epoch: i16,
    base_sequence: i32,
    broken: Arc<AtomicBool>,
}

/// The sequence `count` records after `seq`, wrapping from `i32::MAX` to 0 as the broker
/// does.
fn advance(seq: i32, count: usize) -> i32 {
    let m = i64::from(i32::MAX) + 1;
    ((i64::from(seq) + count as i64).rem_euclid(m)) as i32
}

impl PartitionSender {
    pub(super) async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let this = Arc::new(self);
        let mut seq = Sequence {
            identity: None,
            next: 0,
            broken: Arc::default(),
            reset: false,
            fresh: false,
        };
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut closed = false;
        loop {
            if in_flight.len() >= this.max_in_flight || (closed && !in_flight.is_empty()) {
                if let Some(f) = in_flight.pop_front() {
                    let out = f.task.await;
                    this.settle(f.gathered, out, &mut seq);
                }
                continue;
            }
            if closed {
                break;
            }
            // The next record, settling acknowledged batches meanwhile.
            let first = match in_flight.front_mut() {
                None => rx.recv().await,
                Some(front) => tokio::select! {
                    msg = rx.recv() => msg,
                    out = &mut front.task => {
                        if let Some(f) = in_flight.pop_front() {
                            this.settle(f.gathered, out, &mut seq);
                        }
                        continue;
                    }
                },
            };
            let Some(first) = first else {
                closed = true;
                continue;
            };
            let mut g = Gathered::default();
            g.take(first);
            let deadline = Instant::now() + this.linger;
            while g.bytes < this.batch_bytes && !g.records.is_empty() {
                // Everything already queued goes in at once; then wait out the linger.
                match rx.try_recv() {
                    Ok(msg) => g.take(msg),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if !g.flushes.is_empty() {
                            break; // a flush is waiting: send now
                        }
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(msg)) => g.take(msg),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
            if g.records.is_empty() {
                // Only flushes: they wait for the batches already sent.
                match in_flight.back_mut() {
                    Some(last) => last.gathered.flushes.append(&mut g.flushes),
                    None => {
                        for done in g.flushes.drain(..) {
                            let _ = done.send(());
                        }
                    }
                }
                continue;
            }
            let stamp = if this.idempotent {
                if seq.reset {
                    // Let the batches sent after the failed one settle (they fail too), then
                    // start again under a fresh id.
                    while let Some(f) = in_flight.pop_front() {
                        let out = f.task.await;
                        this.settle(f.gathered, out, &mut seq);
                    }
                    seq = Sequence {
                        identity: None,
                        next: 0,
                        broken: Arc::default(),
                        reset: false,
                        fresh: true,
                    };
                }
                let identity = match seq.identity {
                    Some(i) => Ok(i),
                    None => this.init_identity(seq.fresh).await,
                };
                match identity {
                    Ok((id, epoch)) => {
                        seq.identity = Some((id, epoch));
                        let base_sequence = seq.next;
                        seq.next = advance(base_sequence, g.records.len());
                        Some(Stamp {
                            id,
                            epoch,
                            base_sequence,
                            broken: Arc::clone(&seq.broken),
                        })
                    }
                    Err(e) => {
                        this.settle(std::mem::take(&mut g), Ok(Err(e)), &mut seq);
                        continue;
                    }
                }
            } else {
                None
            };
            let records = std::mem::take(&mut g.records);
            let sender = Arc::clone(&this);
            let task = tokio::spawn(async move { sender.send_batch(records, stamp).await });
            in_flight.push_back(InFlight { task, gathered: g });
        }
        tracing::trace!(topic = %this.topic, partition = this.partition, "producer queue closed");
    }

    /// Resolves a settled batch's acks and flushes and gives back its buffer share. A batch
    /// that failed breaks the partition's sequence (see [`Sequence`]).
    fn settle(
        &self,
        mut g: Gathered,
        out: std::result::Result<Result<u64>, tokio::task::JoinError>,
        seq: &mut Sequence,
    ) {
        let result = out.unwrap_or(Err(ClientError::Closed));
        if result.is_err() && self.idempotent {
            seq.broken.store(true, Ordering::Release);
            seq.reset = true;
        }
        for (i, ack) in g.acks.drain(..).enumerate() {
            let _ = ack.send(match &result {
                Ok(base) => Ok((self.partition, base + i as u64)),
                Err(e) => Err(e.clone()),
            });
        }
        // The batch is settled: its bytes leave the buffer.
        g.permits.clear();
        for done in g.flushes.drain(..) {
            let _ = done.send(());
        }
    }

    /// The producer id and epoch: the producer's shared one, or (after a broken sequence) a
    /// fresh one for this partition alone.
    async fn init_identity(&self, fresh: bool) -> Result<(i64, i16)> {
        if fresh {
            return self.init_producer(None).await;
        }
        self.identity
            .get_or_try_init(|| self.init_producer(self.producer_name.clone()))
            .await
            .copied()
    }

    /// An id and epoch from a broker that can give one (see [`super::init`]).
    async fn init_producer(&self, producer_name: Option<String>) -> Result<(i64, i16)> {
        super::init::init_producer(&self.conn, &self.leaders, &self.retry, producer_name).await
    }

    /// Sends one batch with retries; returns its base offset. An idempotent batch that
    /// arrives before an earlier one of the partition (the broker expects an earlier
    /// sequence) is resent shortly, until the earlier one lands or the retry budget ends.
    async fn send_batch(&self, records: Vec<pb::Record>, stamp: Option<Stamp>) -> Result<u64> {
        let count = records.len();
        let batch = self.build(records, stamp.as_ref()).await?;
        // The producer fields travel in the batch's header, not in the request.
        let request = pb::ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(self.partition),
            ack: self.ack as i32,
            payload: Some(Payload::Batch(batch)),
            ..Default::default()
        };
        let give_up_at = Instant::now() + self.retry.budget();
        self.retry
            .run("produce", || async {
                let mut wait = Duration::from_millis(1);
                loop {
                    if let Some(s) = &stamp {
                        if s.broken.load(Ordering::Acquire) {
                            return Err(ClientError::Invalid(format!(
                                "an earlier batch to topic {:?} partition {} failed, so this \
                                 one (sequence {}) cannot be appended after it",
                                self.topic, self.partition, s.base_sequence
                            )));
                        }
                    }
                    // In a cluster, the partition's leader.
                    let conn = match self.leaders.get(&self.topic, self.partition) {
                        Some(c) => c,
                        None => self
                            .leaders
                            .find(&self.conn, &self.topic, self.partition)
                            .await
                            .unwrap_or_else(|| self.conn.clone()),
                    };
                    let (answer, moved) = self.try_at(&conn, request.clone()).await;
                    match answer {
                        Ok(response) => {
                            return base_offset(
                                &response.into_inner(),
                                &self.topic,
                                self.partition,
                                count,
                            )
                        }
                        Err(status)
                            if stamp
                                .as_ref()
                                .is_some_and(|s| waits_for_earlier(&status, s))
                                && Instant::now() < give_up_at =>
                        {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_millis(100));
                        }
                        Err(status) => {
                            if !moved {
                                self.after_failure(&status, &conn).await;
                            }
                            return Err(ClientError::broker(
                                Some(&self.topic),
                                Some(self.partition),
                                status,
                            ));
                        }
                    }
                }
            })
            .await
    }

    /// The batch of `records`, stamped and compressed (see [`build_batch`]). Compression is
    /// CPU work of a few milliseconds per MiB: it runs on the blocking pool, off the async
    /// workers that carry other partitions' sends and acks.
    async fn build(&self, records: Vec<pb::Record>, stamp: Option<&Stamp>) -> Result<Bytes> {
        let producer = stamp.map(|s| (s.id, s.epoch, s.base_sequence));
        let codec = self.compression;
        let now_ms = now_ms();
        let built = if codec == Codec::None {
            build_batch(&records, producer, codec, now_ms)
        } else {
            tokio::task::spawn_blocking(move || build_batch(&records, producer, codec, now_ms))
                .await
                .map_err(|_| ClientError::Closed)?
        };
        built.map_err(|source| ClientError::BadBatch {
            topic: self.topic.clone(),
            partition: self.partition,
            source,
        })
    }

    /// One produce try at `conn`. In a cluster, a try unanswered for
    /// [`LEADER_CHECK_AFTER_MS`] makes the sender ask the other brokers who leads, and again
    /// while it stays unanswered ([`crate::leaders::Leaders::watch_try`]): when they name
    /// another broker as leader of a newer term (this one was cut off from the majority,
    /// which elected a successor), the try is dropped and answered UNAVAILABLE, and `true`
    /// says the partition already moved to the new leader. The retry there carries the same
    /// batch: an idempotent one that the old leader did get committed is answered with its
    /// original offsets, not appended again.
    async fn try_at(
        &self,
        conn: &Connection,
        request: pb::ProduceRequest,
    ) -> (
        std::result::Result<tonic::Response<pb::ProduceResponse>, tonic::Status>,
        bool,
    ) {
        let mut log = conn.log();
        let call = log.produce(request);
        if !self.leaders.is_cluster() {
            return (call.await, false);
        }
        match self
            .leaders
            .watch_try(&self.conn, &self.topic, self.partition, conn, call)
            .await
        {
            Watched::Answer(answer) => (answer, false),
            Watched::Moved(newer) => (
                Err(tonic::Status::unavailable(format!(
                    "topic {} partition {}: no answer from the leader at {} within {} ms, and \
                     the other brokers name {} as leader of a newer term",
                    self.topic,
                    self.partition,
                    conn.addr(),
                    LEADER_CHECK_AFTER_MS,
                    newer
                ))),
                true,
            ),
        }
    }

    /// Where the next attempt goes after `status` from `failed`: the leader a non-leader
    /// named (the error is then retryable, see [`ClientError::is_retryable`]), or, after an
    /// outage or a broken connection, the leader the other brokers name (see
    /// [`crate::leaders::Leaders::leave`]).
    async fn after_failure(&self, status: &tonic::Status, failed: &Connection) {
        if let Some(leader) = crate::leaders::leader_hint(status) {
            tracing::debug!(topic = %self.topic, partition = self.partition, %leader, "following the partition leader");
            if let Err(e) = self
                .leaders
                .follow(&self.conn, &self.topic, self.partition, &leader)
                .await
            {
                tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "leader unreachable");
            }
        } else if crate::error::is_retryable_status(status) {
            let next = self
                .leaders
                .leave(&self.conn, &self.topic, self.partition, failed)
                .await;
            tracing::debug!(topic = %self.topic, partition = self.partition, from = failed.addr(), to = ?next.as_ref().map(Connection::addr), "leaving a leader that failed");
        }
    }
}

/// The wall clock in ms since the Unix epoch: the timestamp of records sent without one.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Encodes `records` as one batch in the format of `storage/FORMAT.md`: stamped with
/// `producer`'s id, epoch and base sequence when idempotent, records without a timestamp at
/// `now_ms`, and its records section compressed with `codec`.
fn build_batch(
    records: &[pb::Record],
    producer: Option<(i64, i16, i32)>,
    codec: Codec,
    now_ms: i64,
) -> std::result::Result<Bytes, BatchError> {
    let capacity = records
        .iter()
        .map(|r| {
            rill_batch::record_size(
                r.key.as_deref(),
                &r.value,
                r.headers.iter().map(|h| (h.key.as_str(), h.value.as_ref())),
            )
        })
        .fold(rill_batch::HEADER_LEN, usize::saturating_add);
    let mut builder = BatchBuilder::new(BytesMut::with_capacity(capacity));
    if let Some((id, epoch, base_sequence)) = producer {
        builder = builder.with_producer(id, epoch, base_sequence);
    }
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for r in records {
        headers.clear();
        headers.extend(r.headers.iter().map(|h| (h.key.as_str(), h.value.as_ref())));
        builder.try_push(
            r.key.as_deref(),
            &r.value,
            &headers,
            r.timestamp_ms.unwrap_or(now_ms),
        )?;
    }
    let plain = builder.try_finish()?;
    match codec {
        Codec::None => Ok(plain),
        codec => rill_batch::compress(&plain, codec),
    }
}

/// True when `status` refuses `stamp`'s batch only because an earlier batch of the same
/// sequence has not landed yet: a sequence gap whose expected sequence lies (wrapping) a
/// little before the batch's own.
fn waits_for_earlier(status: &tonic::Status, stamp: &Stamp) -> bool {
    if status.code() != tonic::Code::FailedPrecondition {
        return false;
    }
    let Some(expected) = status
        .metadata()
        .get(EXPECTED_SEQUENCE_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return false;
    };
    let m = i64::from(i32::MAX) + 1;
    let behind = (i64::from(stamp.base_sequence) - i64::from(expected)).rem_euclid(m);
    behind > 0 && behind < (1 << 30)
}

/// The base offset of the `count` records just sent to `topic`/`partition`, checked against
/// the answer: it must hold that partition's append, with every record in it.
fn base_offset(
    response: &pb::ProduceResponse,
    topic: &str,
    partition: u32,
    count: usize,
) -> Result<u64> {
    let bad = |problem: String| ClientError::BadResponse {
        topic: topic.to_string(),
        partition,
        problem,
    };
    let append = response
        .appends
        .iter()
        .find(|a| a.partition == partition)
        .ok_or_else(|| {
            bad(format!(
                "the produce answer has no append for partition {partition}"
            ))
        })?;
    if usize::try_from(append.record_count).ok() != Some(count) {
        return Err(bad(format!(
            "{count} records were sent but the produce answer reports {} appended",
            append.record_count
        )));
    }
    Ok(append.base_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(partition: u32, base_offset: u64, record_count: u32) -> pb::PartitionAppend {
        pb::PartitionAppend {
            partition,
            base_offset,
            record_count,
        }
    }

    #[test]
    fn an_answer_without_the_append_is_an_error_not_offset_zero() {
        let empty = pb::ProduceResponse { appends: vec![] };
        match base_offset(&empty, "t", 3, 2) {
            Err(ClientError::BadResponse {
                topic, partition, ..
            }) => assert_eq!((topic.as_str(), partition), ("t", 3)),
            other => panic!("expected BadResponse, got {other:?}"),
        }
        let other_partition = pb::ProduceResponse {
            appends: vec![append(1, 40, 2)],
        };
        assert!(matches!(
            base_offset(&other_partition, "t", 3, 2),
            Err(ClientError::BadResponse { .. })
        ));
    }

    #[test]
    fn an_answer_with_the_wrong_count_is_an_error() {
        let short = pb::ProduceResponse {
            appends: vec![append(3, 40, 1)],
        };
        let e = base_offset(&short, "t", 3, 2).expect_err("short");
        assert!(matches!(e, ClientError::BadResponse { .. }), "{e:?}");
        assert!(!e.is_retryable());
    }

    fn gap(expected: &str) -> tonic::Status {
        let mut s = tonic::Status::failed_precondition("out of order sequence");
        s.metadata_mut().insert(
            EXPECTED_SEQUENCE_METADATA_KEY,
            expected.parse().expect("ascii"),
        );
        s
    }

    fn stamp(base_sequence: i32) -> Stamp {
        Stamp {
            id: 1,
            epoch: 0,
            base_sequence,
            broken: Arc::default(),
        }
    }

    #[test]
    fn sequences_wrap_as_the_brokers_do() {
        assert_eq!(advance(0, 5), 5);
        assert_eq!(advance(i32::MAX, 1), 0);
        assert_eq!(advance(i32::MAX - 1, 4), 2);
    }

    /// Only a gap whose expected sequence is a little before the batch's own means "an
    /// earlier batch has not landed yet"; anything else is a real failure.
    #[test]
    fn only_a_gap_behind_the_batch_waits_for_an_earlier_one() {
        assert!(waits_for_earlier(&gap("10"), &stamp(20)));
        assert!(
            waits_for_earlier(&gap("2147483640"), &stamp(3)),
            "across the wrap"
        );
        assert!(!waits_for_earlier(&gap("20"), &stamp(20)));
        assert!(
            !waits_for_earlier(&gap("30"), &stamp(20)),
            "the broker is past it"
        );
        assert!(!waits_for_earlier(
            &tonic::Status::failed_precondition("fenced"),
            &stamp(20)
        ));
    }

    /// The producer's batch is what the broker expects: the producer fields in the header,
    /// the records section compressed with the codec, records without a timestamp at the
    /// producer's clock, and every record back once decompressed.
    #[test]
    fn a_built_batch_carries_the_stamp_and_round_trips_through_each_codec() {
        let records: Vec<pb::Record> = (0..50)
            .map(|i| pb::Record {
                key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
                value: Bytes::from(format!(r#"{{"msg":"served","id":{i}}}"#)),
                headers: vec![pb::Header {
                    key: "h".into(),
                    value: Bytes::from_static(b"x"),
                }],
                timestamp_ms: (i == 3).then_some(1_000),
            })
            .collect();
        let plain = build_batch(&records, Some((7, 2, 40)), Codec::None, 5_000).expect("plain");
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let batch = build_batch(&records, Some((7, 2, 40)), codec, 5_000).expect("build");
            let view = rill_batch::BatchView::parse(&batch).expect("parse");
            let h = *view.header();
            assert_eq!(h.compression_codec(), codec.bits(), "{codec}");
            assert_eq!(
                (h.producer_id, h.producer_epoch, h.base_sequence),
                (7, 2, 40)
            );
            assert_eq!(h.record_count, 50);
            view.validate().expect("valid");
            if codec != Codec::None {
                assert!(batch.len() < plain.len(), "{codec}: compressed");
            }
            let back = rill_batch::decompress(&batch, 1 << 20).expect("decompress");
            assert_eq!(&back[..], &plain[..], "{codec}: the plain equivalent");
        }
        let view = rill_batch::BatchView::parse(&plain).expect("parse");
        for (i, r) in view.records().enumerate() {
            let r = r.expect("record");
            assert_eq!(r.value, records[i].value.as_ref());
            assert_eq!(r.key, records[i].key.as_deref());
            assert_eq!(r.timestamp_ms, if i == 3 { 1_000 } else { 5_000 });
        }
        let unstamped = build_batch(&records, None, Codec::Lz4, 5_000).expect("build");
        let h = rill_batch::BatchHeader::parse(&unstamped).expect("header");
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (-1, -1, -1)
        );
    }

    #[test]
    fn the_partitions_append_gives_the_base_offset() {
        let ok = pb::ProduceResponse {
            appends: vec![append(1, 7, 5), append(3, 40, 2)],
        };
        assert_eq!(base_offset(&ok, "t", 3, 2).expect("ok"), 40);
    }
}
