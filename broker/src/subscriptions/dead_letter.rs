//! Dead letters: records past their attempts (or rejected) are appended to the
//! subscription's dead-letter topic with their origin in headers, with a `durable` ack, at
//! each dead-letter partition's leader: here, or (in a cluster) forwarded to the broker that
//! leads it ([`Remote::produce`]), following redirects as reads do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use rill_proto::v1 as pb;

use super::source::{BrokerPeer, Remote, Source};
use super::state::{DeadLetter, SubscriptionError};
use super::{
    Sub, HEADER_ATTEMPTS, HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_SUBSCRIPTION,
    HEADER_TOPIC,
};
use crate::error::BrokerError;
use crate::state::Broker;

/// Sends `leaving` to the dead-letter topic with origin headers. Returns whether there
/// is one (false: the records are archived), and the partitions whose records were not
/// sent because the broker holding them did not answer (their records stay, for a later
/// pass; the others go).
pub(super) async fn dead_letter(
    broker: &Broker,
    sub: &Arc<Sub>,
    leaving: &[DeadLetter],
) -> Result<(bool, BTreeSet<u32>), BrokerError> {
    let mut held_back = BTreeSet::new();
    let Some(dlq) = sub.config.dead_letter_topic.clone() else {
        return Ok((false, held_back));
    };
    if broker.topic(&dlq).is_err() {
        return Err(SubscriptionError::DeadLetterTopicMissing {
            subscription: sub.name.clone(),
            topic: dlq,
        }
        .into());
    }
    let topic = broker.topic(&sub.config.topic)?;
    let mut by_partition: BTreeMap<u32, Vec<&DeadLetter>> = BTreeMap::new();
    for d in leaving {
        by_partition.entry(d.partition).or_default().push(d);
    }
    let mut records = Vec::new();
    for (p, ds) in by_partition {
        let source = Source::of(broker, &topic, p, &sub.remotes)?;
        let offsets: Vec<u64> = ds.iter().map(|d| d.offset).collect();
        let found = match source.read_at(offsets).await {
            Ok(found) => found,
            Err(e) if matches!(source, Source::Remote(_)) => {
                tracing::warn!(subscription = %sub.name, topic = %sub.config.topic, partition = p, error = %e, "records to dead-letter are not readable now; they stay for a later pass");
                held_back.insert(p);
                continue;
            }
            Err(e) => return Err(e),
        };
        for r in found {
            let Some(d) = ds.iter().find(|d| d.offset == r.offset) else {
                continue;
            };
            let mut headers = r.headers;
            let mut add = |k: &str, v: String| {
                headers.push(pb::Header {
                    key: k.into(),
                    value: Bytes::from(v),
                })
            };
            add(HEADER_SUBSCRIPTION, sub.name.clone());
            add(HEADER_TOPIC, sub.config.topic.clone());
            add(HEADER_PARTITION, p.to_string());
            add(HEADER_OFFSET, r.offset.to_string());
            add(HEADER_ATTEMPTS, d.attempts.to_string());
            if let Some(e) = &d.last_error {
                add(HEADER_ERROR, e.clone());
            }
            records.push(pb::Record {
                key: r.key,
                value: r.value,
                headers,
                timestamp_ms: Some(r.timestamp_ms),
            });
        }
    }
    if !records.is_empty() {
        produce(broker, sub, &dlq, records).await?;
    }
    Ok((true, held_back))
}

/// Appends `records` to `dlq` (partitioned as a produce would: by key, else round-robin)
/// with a `durable` ack, each partition at its leader.
async fn produce(
    broker: &Broker,
    sub: &Sub,
    dlq: &str,
    records: Vec<pb::Record>,
) -> Result<(), BrokerError> {
    let topic = broker.topic(dlq)?;
    let count = topic.topic.partition_count();
    let mut by_partition: BTreeMap<u32, Vec<pb::Record>> = BTreeMap::new();
    for r in records {
        let p = match &r.key {
            Some(key) => rill_proto::partitioner::partition_for_key(key, count),
            None => topic.next_round_robin(),
        };
        by_partition.entry(p).or_default().push(r);
    }
    for (p, records) in by_partition {
        let req = pb::ProduceRequest {
            topic: dlq.to_string(),
            partition: Some(p),
            ack: pb::AckMode::Durable as i32,
            payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
                records,
            })),
            // Not idempotent; the topic's own compression applies.
            ..Default::default()
        };
        let remote = match Source::of(broker, &topic, p, &sub.remotes)? {
            Source::Local(_) => match crate::produce::produce(broker, req.clone()).await {
                Ok(_) => continue,
                // A replica here that does not lead the partition: its leader appends.
                Err(BrokerError::NotLeader {
                    leader: Some((_, address)),
                    ..
                }) => Remote::new(
                    Arc::new(BrokerPeer(broker.clone())),
                    dlq,
                    p,
                    vec![address],
                    Arc::clone(&sub.remotes),
                ),
                Err(e) => return Err(e),
            },
            Source::Remote(r) => r,
        };
        remote.produce(req).await?;
    }
    Ok(())
}
