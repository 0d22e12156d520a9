//! Produce: partitioning, batch building and appending, for the unary call and the stream.
//!
//! A request is checked whole before anything is written (names, partitions, sizes, an empty
//! batch), so bad input changes nothing. Records are grouped by partition in request order:
//! an explicit partition wins, then the key's documented hash
//! ([`rill_proto::partitioner`]), then round-robin. Each partition's records become one batch,
//! appended under the partition's writer lock, so per-partition order holds whatever other
//! producers do. A `durable` ack (or a topic flushed `always`) then waits for a group-commit
//! sync on the blocking pool.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rill_proto::partitioner::partition_for_key;
use rill_proto::v1::produce_request::Payload;
use rill_proto::v1::{AckMode, PartitionAppend, ProduceRequest, ProduceResponse, Record};
use rill_storage::batch::BatchBuilder;
use rill_storage::log::{now_ms, AppendInfo};
use rill_storage::{FlushPolicy, PartitionLog};

use crate::error::BrokerError;
use crate::state::{Broker, TopicState};

/// A checked request, ready to append: one encoded batch per partition.
#[derive(Debug)]
pub struct Prepared {
    topic: Arc<TopicState>,
    batches: Vec<(u32, PartitionLog, Bytes)>,
    durable: bool,
}

impl Prepared {
    /// The topic's name.
    pub fn topic_name(&self) -> &str {
        self.topic.name()
    }

    /// The encoded batch of each partition, in request order.
    pub fn batches(&self) -> impl Iterator<Item = (u32, &Bytes)> {
        self.batches.iter().map(|(p, _, b)| (*p, b))
    }
}

/// Checks `req` and encodes its batches. Nothing is written.
pub fn prepare(broker: &Broker, req: ProduceRequest) -> Result<Prepared, BrokerError> {
    broker.check_running()?;
    let topic = broker.topic(&req.topic)?;
    let durable =
        req.ack() == AckMode::Durable || topic.topic.config().flush == FlushPolicy::Always;
    let max_batch = broker.config().max_batch_bytes;
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
            if bytes.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "empty batch for topic {:?} partition {p}",
                    req.topic
                )));
            }
            vec![(p, topic.log(p)?, bytes)]
        }
        Some(Payload::Records(list)) => {
            if list.records.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "empty batch for topic {:?}: no records",
                    req.topic
                )));
            }
            let groups = assign(&topic, req.partition, &list.records)?;
            let now = now_ms();
            let mut out = Vec::with_capacity(groups.len());
            for (p, indices) in groups {
                let log = topic.log(p)?;
                let encoded = encode(&list.records, &indices, now);
                if encoded.len() > max_batch {
                    return Err(rill_storage::StorageError::BatchTooLarge {
                        topic: req.topic.clone(),
                        partition: p,
                        size_bytes: encoded.len(),
                        max_bytes: max_batch,
                    }
                    .into());
                }
                out.push((p, log, encoded));
            }
            out
        }
    };
    Ok(Prepared {
        topic,
        batches,
        durable,
    })
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
fn encode(records: &[Record], indices: &[usize], now_ms: i64) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for &i in indices {
        let r = &records[i];
        headers.clear();
        headers.extend(r.headers.iter().map(|h| (h.key.as_str(), h.value.as_ref())));
        builder.push(
            r.key.as_deref(),
            &r.value,
            &headers,
            r.timestamp_ms.unwrap_or(now_ms),
        );
    }
    builder.finish()
}

/// What [`append`] did: the offsets per partition, and whether fetches were waiting.
#[derive(Debug)]
pub struct Appended {
    /// The offsets given per partition.
    pub infos: Vec<(u32, AppendInfo)>,
    /// At least one long-poll fetch was woken.
    pub woke_fetches: bool,
}

/// Appends every batch, waking the partitions' waiting fetches. Appends are short copies
/// into the page cache; growing or rolling a segment may touch the disk briefly.
pub fn append(prepared: &Prepared) -> Result<Appended, BrokerError> {
    let mut infos = Vec::with_capacity(prepared.batches.len());
    let mut woke_fetches = false;
    for (p, log, bytes) in &prepared.batches {
        let info = log.append(bytes)?;
        woke_fetches |= prepared.topic.notify(*p, info.next_offset);
        infos.push((*p, info));
    }
    Ok(Appended {
        infos,
        woke_fetches,
    })
}

/// True when the ack must wait: for a sync (durable ack, or a topic flushed `always`), or for
/// woken fetches to answer first.
pub fn needs_settle(prepared: &Prepared, appended: &Appended) -> bool {
    prepared.durable || appended.woke_fetches
}

/// Waits until the appended data is durable when the request or the topic asks for it.
pub async fn settle(prepared: &Prepared, appended: &Appended) -> Result<(), BrokerError> {
    if appended.woke_fetches {
        // Let the woken fetches (queued on this worker) answer their consumers before this
        // producer's ack is written: end-to-end latency is the consumer's, and the ack only
        // waits for the few microseconds it takes them to send.
        tokio::task::yield_now().await;
    }
    if !prepared.durable {
        return Ok(());
    }
    for ((_, log, _), (_, info)) in prepared.batches.iter().zip(&appended.infos) {
        let log = log.clone();
        let end = info.next_offset;
        tokio::task::spawn_blocking(move || log.sync_through(end)).await??;
    }
    Ok(())
}

/// The response for what was appended.
pub fn response(appended: &Appended) -> ProduceResponse {
    ProduceResponse {
        appends: appended
            .infos
            .iter()
            .map(|(p, info)| PartitionAppend {
                partition: *p,
                base_offset: info.base_offset,
                record_count: info.record_count,
            })
            .collect(),
    }
}

/// The whole unary produce.
pub async fn produce(broker: &Broker, req: ProduceRequest) -> Result<ProduceResponse, BrokerError> {
    let prepared = prepare(broker, req)?;
    if let Some(replication) = broker.replication() {
        if replication.is_replicated(prepared.topic_name()) {
            return crate::cluster::produce_replicated(replication, &prepared).await;
        }
    }
    let appended = append(&prepared)?;
    settle(&prepared, &appended).await?;
    Ok(response(&appended))
}
