//! Produce: partitioning, batch building and appending, for the unary call and the stream.
//!
//! A request is checked whole before anything is written (names, partitions, each batch's
//! size against the topic's limit, checksum and structure, an empty batch), so bad input
//! changes nothing. Records are grouped by partition in request order: an explicit partition
//! wins, then the key's documented hash ([`rill_proto::partitioner`]), then round-robin. Each
//! partition's records become one batch, appended under the partition's writer lock, so
//! per-partition order holds whatever other producers do.
//!
//! No disk work runs on the async workers: an append that the storage can do at once (one
//! `pwrite` into the page cache) is done inline; one that needs file work (growing the file,
//! a roll, removing the clean-shutdown marker) runs on the blocking pool. The storage decides
//! what the ack waits for ([`PartitionLog::settle`]: a group-commit sync for a `durable` ack
//! or a topic flushed `always`), and that wait runs on the blocking pool too.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rill_proto::partitioner::partition_for_key;
use rill_proto::v1::produce_request::Payload;
use rill_proto::v1::{
    AckMode, Compression, PartitionAppend, ProduceRequest, ProduceResponse, Record,
};
use rill_storage::batch::{self, BatchBuilder, Codec, MAX_DECOMPRESSED_BATCH_BYTES};
use rill_storage::log::{now_ms, Ack, AppendInfo, CheckedBatch, Unsettled};
use rill_storage::PartitionLog;

use crate::error::BrokerError;
use crate::state::{Broker, TopicState};

/// A checked request, ready to append: one checked batch per partition.
#[derive(Debug)]
pub struct Prepared {
    topic: Arc<TopicState>,
    batches: Vec<(u32, PartitionLog, CheckedBatch)>,
    ack: Ack,
    mode: AckMode,
}

impl Prepared {
    /// The topic's name.
    pub fn topic_name(&self) -> &str {
        self.topic.name()
    }

    /// The ack mode the producer asked for (unspecified is `quorum`).
    pub fn ack_mode(&self) -> AckMode {
        self.mode
    }

    /// The encoded batch of each partition, in request order.
    pub fn batches(&self) -> impl Iterator<Item = (u32, &Bytes)> {
        self.batches.iter().map(|(p, _, b)| (*p, b.bytes()))
    }
}

/// Checks `req` and encodes its batches. Nothing is written.
pub fn prepare(broker: &Broker, req: ProduceRequest) -> Result<Prepared, BrokerError> {
    broker.check_running()?;
    let topic = broker.topic(&req.topic)?;
    // On one broker a majority is the leader: `quorum` is `leader` there.
    let mode = match req.ack() {
        AckMode::Unspecified => AckMode::Quorum,
        m => m,
    };
    let ack = match mode {
        AckMode::Durable => Ack::Durable,
        _ => Ack::Leader,
    };
    let requested = codec_of(req.compression());
    let producer = producer_fields(&req)?;
    let batches = match req.payload {
        None => {
            return Err(BrokerError::invalid(format!(
                "produce to topic {:?} carries neither records nor a batch",
                req.topic
            )))
        }
        Some(Payload::Batch(bytes)) => {
            let Some(p) = req.partition else {
                return Err(BrokerError::invalid(format!(
                    "a pre-encoded batch for topic {:?} must name its partition",
                    req.topic
                )));
            };
            if req.producer_id.is_some()
                || req.producer_epoch.is_some()
                || req.base_sequence.is_some()
            {
                return Err(BrokerError::invalid(format!(
                    "a pre-encoded batch for topic {:?} partition {p} carries its producer id, \
                     epoch and sequence in its header, not in the request",
                    req.topic
                )));
            }
            if bytes.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "empty batch for topic {:?} partition {p}",
                    req.topic
                )));
            }
            let log = topic.log(p)?;
            // The full check first: it bounds a compressed batch's decompressed size before
            // the timestamps are read from its records.
            let checked = log.check_batch(bytes)?;
            let h = checked.header();
            check_producer(broker, h.producer_id, h.producer_epoch)?;
            topic.check_timestamps(p, checked.bytes(), now_ms())?;
            let checked = store_as(&topic, p, &log, checked, None)?;
            vec![(p, log, checked)]
        }
        Some(Payload::Records(list)) => {
            if list.records.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "empty batch for topic {:?}: no records",
                    req.topic
                )));
            }
            if let Some((id, epoch, _)) = producer {
                check_producer(broker, id, epoch)?;
            }
            let groups = assign(&topic, req.partition, &list.records)?;
            let now = now_ms();
            let mut out = Vec::with_capacity(groups.len());
            for (p, indices) in groups {
                let log = topic.log(p)?;
                let encoded = encode(&list.records, &indices, now, producer).map_err(|source| {
                    rill_storage::StorageError::InvalidBatch {
                        topic: req.topic.clone(),
                        partition: p,
                        source,
                    }
                })?;
                topic.check_timestamps(p, &encoded, now)?;
                // The topic's limit (the broker's max_batch_bytes, and no more than a
                // segment) is checked here, with the checksum and structure.
                let checked = log.check_batch(encoded)?;
                let checked = store_as(&topic, p, &log, checked, Some(requested))?;
                out.push((p, log, checked));
            }
            out
        }
    };
    if let Some(replication) = broker.replication() {
        // A replication factor 1 partition of a cluster is written only by its owner; the
        // others name it (`rill-leader`), before anything is appended.
        for (p, _, _) in &batches {
            replication.check_owned(topic.name(), *p)?;
        }
    }
    Ok(Prepared {
        topic,
        batches,
        ack,
        mode,
    })
}

/// A `records` produce's idempotence fields: all three or none, in range, and only with a
/// named partition (sequences are per partition).
fn producer_fields(req: &ProduceRequest) -> Result<Option<(i64, i16, i32)>, BrokerError> {
    let (id, epoch, sequence) = match (req.producer_id, req.producer_epoch, req.base_sequence) {
        (None, None, None) => return Ok(None),
        (Some(id), Some(epoch), Some(sequence)) => (id, epoch, sequence),
        _ => {
            return Err(BrokerError::invalid(format!(
                "produce to topic {:?}: producer_id, producer_epoch and base_sequence go \
                 together (set all three or none)",
                req.topic
            )))
        }
    };
    let Some(p) = req.partition else {
        return Err(BrokerError::invalid(format!(
            "an idempotent produce to topic {:?} must name its partition",
            req.topic
        )));
    };
    let epoch = i16::try_from(epoch).ok().filter(|e| *e >= 0);
    match epoch {
        Some(epoch) if id >= 0 && sequence >= 0 => Ok(Some((id, epoch, sequence))),
        _ => Err(BrokerError::invalid(format!(
            "produce to topic {:?} partition {p}: producer_id {id}, producer_epoch {:?} and \
             base_sequence {sequence} must be >= 0 (the epoch at most {})",
            req.topic,
            req.producer_epoch,
            i16::MAX
        ))),
    }
}

/// Checks a batch's producer id and epoch against the broker's registry (no id: nothing to
/// check).
fn check_producer(broker: &Broker, producer_id: i64, epoch: i16) -> Result<(), BrokerError> {
    if producer_id == -1 {
        return Ok(());
    }
    broker.producers()?.check(producer_id, epoch)
}

/// The storage codec of a request's `compression`.
fn codec_of(c: Compression) -> Codec {
    match c {
        Compression::Lz4 => Codec::Lz4,
        Compression::Zstd => Codec::Zstd,
        Compression::None | Compression::Unspecified => Codec::None,
    }
}

/// The batch as the topic stores it: compressed with the topic's codec when it names one,
/// else with `requested` (a `records` produce's `compression`) or as it came (a pre-encoded
/// batch, `None`). A batch that must change codec is decompressed (its size already bounded
/// by the check it passed) and compressed again, then checked like any other.
fn store_as(
    topic: &TopicState,
    p: u32,
    log: &PartitionLog,
    checked: CheckedBatch,
    requested: Option<Codec>,
) -> Result<CheckedBatch, BrokerError> {
    let came_with = Codec::from_bits(checked.header().compression_codec()).unwrap_or_default();
    let wanted = topic
        .topic
        .config()
        .compression
        .stored_codec(requested.unwrap_or(came_with));
    if wanted == came_with {
        return Ok(checked);
    }
    let invalid = |source| rill_storage::StorageError::InvalidBatch {
        topic: topic.name().to_string(),
        partition: p,
        source,
    };
    let plain =
        batch::decompress(checked.bytes(), MAX_DECOMPRESSED_BATCH_BYTES).map_err(invalid)?;
    let stored = batch::compress(&plain, wanted).map_err(invalid)?;
    Ok(log.check_batch(stored)?)
}

/// Groups record indices by partition, in request order.
fn assign(
    topic: &TopicState,
    partition: Option<u32>,
    records: &[Record],
) -> Result<Vec<(u32, Vec<usize>)>, BrokerError> {
    let count = topic.topic.partition_count();
    if let Some(p) = partition {
        topic.log(p)?; // NotFound or fenced, before anything else
        return Ok(vec![(p, (0..records.len()).collect())]);
    }
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let p = match &record.key {
            Some(key) => partition_for_key(key, count),
            None => topic.next_round_robin(),
        };
        match groups.iter_mut().find(|(gp, _)| *gp == p) {
            Some((_, v)) => v.push(i),
            None => groups.push((p, vec![i])),
        }
    }
    Ok(groups)
}

/// Encodes the chosen records as one batch; a record without a timestamp gets `now_ms`.
/// Records the format cannot hold (timestamps too far apart) are refused with the reason.
fn encode(
    records: &[Record],
    indices: &[usize],
    now_ms: i64,
    producer: Option<(i64, i16, i32)>,
) -> Result<Bytes, rill_storage::batch::BatchError> {
    let mut builder = BatchBuilder::new(BytesMut::new());
    if let Some((id, epoch, sequence)) = producer {
        builder = builder.with_producer(id, epoch, sequence);
    }
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for &i in indices {
        let r = &records[i];
        headers.clear();
        headers.extend(r.headers.iter().map(|h| (h.key.as_str(), h.value.as_ref())));
        builder.try_push(
            r.key.as_deref(),
            &r.value,
            &headers,
            r.timestamp_ms.unwrap_or(now_ms),
        )?;
    }
    builder.try_finish()
}

/// What [`append`] did: per partition, an append that still owes its ack a settle, and
/// whether fetches were waiting.
#[derive(Debug)]
pub struct Appended {
    unsettled: Vec<(u32, Unsettled)>,
    /// At least one long-poll fetch was woken.
    pub woke_fetches: bool,
}

/// Appends every batch, waking the partitions' waiting fetches. An append the storage can do
/// at once runs inline; one that needs file work (growing the file, a roll, removing the
/// clean-shutdown marker) runs on the blocking pool, and the next partition waits for it so
/// the request's order holds.
pub async fn append(prepared: &Prepared) -> Result<Appended, BrokerError> {
    let mut unsettled = Vec::with_capacity(prepared.batches.len());
    let mut woke_fetches = false;
    for (p, log, batch) in &prepared.batches {
        let done = append_in_turn(prepared, *p, log, batch).await?;
        // A producer's retry of a batch already in the log appended nothing: no new records
        // to count, no fetch to wake (its offsets lie below the high watermark).
        if !done.is_duplicate() {
            let records = u64::from(done.info().record_count);
            prepared
                .topic
                .counters
                .produced(records, batch.len() as u64);
            woke_fetches |= prepared.topic.notify(*p, done.info().next_offset);
        }
        unsettled.push((*p, done));
    }
    Ok(Appended {
        unsettled,
        woke_fetches,
    })
}

/// How long a batch of an idempotent producer that arrived before an earlier batch of its
/// own (its sequence is ahead of the one expected) waits for that batch, in ms, before it
/// is refused as a gap. A producer with several batches in flight sends them in order, but
/// concurrent calls can reach the partition in another order (each call is its own task,
/// on the client and here); waiting for the earlier one keeps the producer's order without
/// a refusal and a resend. A batch whose predecessor never comes is refused as before.
/// A replicated partition's leader holds an early batch back as long before proposing it
/// ([`crate::cluster::submit_replicated`]).
pub const EARLY_BATCH_WAIT_MS: u64 = 100;

/// Appends `batch` to partition `p` (inline when the storage can, else on the blocking
/// pool). An idempotent batch that came early ([`EARLY_BATCH_WAIT_MS`]) is tried again
/// after each append to the partition until it is its turn or the wait is over.
async fn append_in_turn(
    prepared: &Prepared,
    p: u32,
    log: &PartitionLog,
    batch: &CheckedBatch,
) -> Result<Unsettled, BrokerError> {
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_millis(EARLY_BATCH_WAIT_MS);
    let mut appends: Option<tokio::sync::watch::Receiver<u64>> = None;
    loop {
        let attempt = match log.try_append(batch, prepared.ack) {
            Ok(Some(done)) => Ok(done),
            Ok(None) => {
                let (log, batch, ack) = (log.clone(), batch.clone(), prepared.ack);
                tokio::task::spawn_blocking(move || log.append_checked(&batch, ack)).await?
            }
            Err(e) => Err(e),
        };
        match attempt {
            Err(e) if came_early(&e) => match appends.as_mut() {
                // Watch the partition from now on, then try once more at once: an append
                // between the refusal and the subscription is not missed.
                None => match prepared.topic.subscribe(p) {
                    Some(rx) => appends = Some(rx),
                    None => return Err(e.into()),
                },
                Some(rx) => {
                    let appended = tokio::time::timeout_at(deadline, rx.changed()).await;
                    if !matches!(appended, Ok(Ok(()))) {
                        return Err(e.into());
                    }
                }
            },
            other => return Ok(other?),
        }
    }
}

/// Whether `e` refuses an idempotent batch whose sequence is ahead of the expected one (by
/// less than half the sequence space, which wraps at `i32::MAX`): an earlier batch of the
/// same producer may still be on its way.
fn came_early(e: &rill_storage::StorageError) -> bool {
    let rill_storage::StorageError::ProducerRefused {
        source:
            rill_storage::producers::ProducerError::SequenceGap {
                expected, received, ..
            },
        ..
    } = e
    else {
        return false;
    };
    let ahead = (i64::from(*received) - i64::from(*expected)).rem_euclid(1 << 31);
    ahead > 0 && ahead < 1 << 30
}

/// True when the ack must wait: for a sync (the storage says so: a durable ack, or a topic
/// flushed `always`), or for woken fetches to answer first.
pub fn needs_settle(appended: &Appended) -> bool {
    appended.woke_fetches || appended.unsettled.iter().any(|(_, u)| u.needs_sync())
}

/// Waits until every append is as durable as its ack and the topic's flush policy require
/// (the syncs run on the blocking pool), and returns the offsets to acknowledge.
pub async fn settle(
    prepared: &Prepared,
    appended: Appended,
) -> Result<Vec<(u32, AppendInfo)>, BrokerError> {
    if appended.woke_fetches {
        // Let the woken fetches (queued on this worker) answer their consumers before this
        // producer's ack is written: end-to-end latency is the consumer's, and the ack only
        // waits for the few microseconds it takes them to send.
        tokio::task::yield_now().await;
    }
    let mut infos = Vec::with_capacity(appended.unsettled.len());
    for ((_, log, _), (p, unsettled)) in prepared.batches.iter().zip(appended.unsettled) {
        let info = if unsettled.needs_sync() {
            let log = log.clone();
            tokio::task::spawn_blocking(move || log.settle(unsettled)).await??
        } else {
            // Returns at once: nothing to wait for.
            log.settle(unsettled)?
        };
        infos.push((p, info));
    }
    Ok(infos)
}

/// The response for what was appended and settled.
pub fn response(infos: &[(u32, AppendInfo)]) -> ProduceResponse {
    ProduceResponse {
        appends: infos
            .iter()
            .map(|(p, info)| PartitionAppend {
                partition: *p,
                base_offset: info.base_offset,
                record_count: info.record_count,
            })
            .collect(),
    }
}

/// In a cluster, lets this broker's copy of the producer-id registry catch up (bounded)
/// when the request's producer id is beyond what it knows: the leader of `__producers` may
/// have given it a moment ago. Nothing to wait for otherwise.
pub async fn await_producer_known(broker: &Broker, req: &ProduceRequest) {
    let id = match &req.payload {
        Some(Payload::Batch(b)) => batch::BatchHeader::parse(b).ok().map(|h| h.producer_id),
        _ => req.producer_id,
    };
    if let (Some(id), Ok(ids)) = (id.filter(|id| *id >= 0), broker.producers()) {
        ids.await_known(broker, id).await;
    }
}

/// The whole unary produce.
pub async fn produce(broker: &Broker, req: ProduceRequest) -> Result<ProduceResponse, BrokerError> {
    await_producer_known(broker, &req).await;
    let prepared = prepare(broker, req)?;
    if let Some(replication) = broker.replication() {
        if replication.is_replicated(prepared.topic_name()) {
            return crate::cluster::produce_replicated(replication, &prepared).await;
        }
    }
    let appended = append(&prepared).await?;
    let infos = settle(&prepared, appended).await?;
    Ok(response(&infos))
}

#[cfg(test)]
mod tests {
    use rill_storage::producers::ProducerError;
    use rill_storage::StorageError;

    use super::came_early;

    fn gap(expected: i32, received: i32) -> StorageError {
        StorageError::ProducerRefused {
            topic: "t".into(),
            partition: 0,
            source: ProducerError::SequenceGap {
                producer_id: 1,
                expected,
                received,
            },
        }
    }

    #[test]
    fn only_a_sequence_ahead_of_the_expected_one_came_early() {
        assert!(came_early(&gap(0, 5)));
        assert!(came_early(&gap(i32::MAX - 1, 3)), "ahead across the wrap");
        assert!(!came_early(&gap(5, 2)), "behind: a stale retry, not early");
        assert!(
            !came_early(&gap(3, i32::MAX - 1)),
            "far behind across the wrap"
        );
        assert!(!came_early(&StorageError::Closed));
    }
}
