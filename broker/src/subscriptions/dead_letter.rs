//! Dead letters: records past their attempts (or rejected) are appended to the
//! subscription's dead-letter topic with their origin in headers.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use rill_proto::v1 as pb;

use super::state::{DeadLetter, SubscriptionError};
use super::{
    read, Sub, HEADER_ATTEMPTS, HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_SUBSCRIPTION,
    HEADER_TOPIC,
};
use crate::error::BrokerError;
use crate::state::Broker;

/// Sends `leaving` to the dead-letter topic with origin headers. Returns whether there
/// is one (false: the records are archived).
pub(super) async fn dead_letter(
    broker: &Broker,
    sub: &Arc<Sub>,
    leaving: &[DeadLetter],
) -> Result<bool, BrokerError> {
    let Some(dlq) = sub.config.dead_letter_topic.clone() else {
        return Ok(false);
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
        let log = topic.log(p)?;
        let offsets: Vec<u64> = ds.iter().map(|d| d.offset).collect();
        let found = tokio::task::spawn_blocking(move || read::read_at(&log, &offsets)).await??;
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
        crate::produce::produce(
            broker,
            pb::ProduceRequest {
                topic: dlq,
                partition: None,
                ack: pb::AckMode::Durable as i32,
                payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
                    records,
                })),
                // Not idempotent; the topic's own compression applies.
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(true)
}
