//! A subscription's settings (defaults, bounds, the wire form) and the acknowledgement as
//! both the RPC and the push stream carry it.

use rill_proto::v1 as pb;

use super::records::{self, StoredConfig};
use super::state::{self, AckKind, SubscriptionError};
use super::webhook;
use super::{
    DEFAULT_ACK_DEADLINE_MS, DEFAULT_MAX_DELIVERY_ATTEMPTS, DEFAULT_MAX_IN_FLIGHT,
    MAX_ACK_DEADLINE_MS, MAX_DELIVERY_ATTEMPTS, MAX_IN_FLIGHT,
};
use crate::error::BrokerError;

impl Default for StoredConfig {
    fn default() -> Self {
        StoredConfig {
            topic: String::new(),
            ack_deadline_ms: DEFAULT_ACK_DEADLINE_MS,
            max_delivery_attempts: DEFAULT_MAX_DELIVERY_ATTEMPTS,
            dead_letter_topic: None,
            max_in_flight_per_partition: DEFAULT_MAX_IN_FLIGHT,
            from_earliest: false,
            push: None,
        }
    }
}

/// Fills in defaults and checks bounds.
pub fn settle_config(
    name: &str,
    c: &pb::SubscriptionConfig,
    from_earliest: bool,
) -> Result<StoredConfig, BrokerError> {
    let invalid = |what: String| {
        BrokerError::from(SubscriptionError::Invalid(format!(
            "subscription {name:?}: {what}"
        )))
    };
    let pick = |v: u32, default: u32, max: u32, what: &str| {
        let v = if v == 0 { default } else { v };
        if v > max {
            Err(invalid(format!("{what} {v} is above the limit {max}")))
        } else {
            Ok(v)
        }
    };
    if c.topic.is_empty() {
        return Err(invalid("the topic is required".into()));
    }
    let dead_letter_topic = (!c.dead_letter_topic.is_empty()).then(|| c.dead_letter_topic.clone());
    if dead_letter_topic.as_deref() == Some(c.topic.as_str()) {
        return Err(invalid(
            "the dead-letter topic must not be the topic itself".into(),
        ));
    }
    Ok(StoredConfig {
        topic: c.topic.clone(),
        ack_deadline_ms: pick(
            c.ack_deadline_ms,
            DEFAULT_ACK_DEADLINE_MS,
            MAX_ACK_DEADLINE_MS,
            "ack_deadline_ms",
        )?,
        max_delivery_attempts: pick(
            c.max_delivery_attempts,
            DEFAULT_MAX_DELIVERY_ATTEMPTS,
            MAX_DELIVERY_ATTEMPTS,
            "max_delivery_attempts",
        )?,
        dead_letter_topic,
        max_in_flight_per_partition: pick(
            c.max_in_flight_per_partition,
            DEFAULT_MAX_IN_FLIGHT,
            MAX_IN_FLIGHT,
            "max_in_flight_per_partition",
        )?,
        from_earliest,
        push: match &c.push {
            None => None,
            Some(p) => {
                let min = pick(
                    p.min_backoff_ms,
                    webhook::DEFAULT_MIN_BACKOFF_MS,
                    MAX_ACK_DEADLINE_MS,
                    "min_backoff_ms",
                )?;
                let max = pick(
                    p.max_backoff_ms,
                    webhook::DEFAULT_MAX_BACKOFF_MS,
                    MAX_ACK_DEADLINE_MS,
                    "max_backoff_ms",
                )?;
                if min > max {
                    return Err(invalid(format!(
                        "min_backoff_ms {min} is above max_backoff_ms {max}"
                    )));
                }
                Some(records::StoredPush {
                    endpoint: p.endpoint.clone(),
                    min_backoff_ms: min,
                    max_backoff_ms: max,
                    max_in_flight: pick(
                        p.max_in_flight,
                        webhook::DEFAULT_MAX_IN_FLIGHT,
                        webhook::MAX_IN_FLIGHT,
                        "max_in_flight",
                    )?,
                    signing_secret: (!p.signing_secret.is_empty())
                        .then(|| p.signing_secret.clone()),
                    ordered: p.ordered,
                    max_batch_records: pick(
                        p.max_batch_records,
                        1,
                        webhook::MAX_BATCH_RECORDS,
                        "max_batch_records",
                    )?,
                })
            }
        },
    })
}

/// The settings as the wire message.
pub fn config_to_pb(c: &StoredConfig) -> pb::SubscriptionConfig {
    pb::SubscriptionConfig {
        topic: c.topic.clone(),
        ack_deadline_ms: c.ack_deadline_ms,
        max_delivery_attempts: c.max_delivery_attempts,
        dead_letter_topic: c.dead_letter_topic.clone().unwrap_or_default(),
        max_in_flight_per_partition: c.max_in_flight_per_partition,
        // The secret is never returned.
        push: c.push.as_ref().map(|p| pb::PushConfig {
            endpoint: p.endpoint.clone(),
            min_backoff_ms: p.min_backoff_ms,
            max_backoff_ms: p.max_backoff_ms,
            max_in_flight: p.max_in_flight,
            signing_secret: String::new(),
            ordered: p.ordered,
            max_batch_records: p.max_batch_records.max(1),
        }),
    }
}

/// Checks a consumer id.
pub fn validate_consumer(id: &str) -> Result<(), BrokerError> {
    if id.is_empty() || id.len() > state::MAX_CONSUMER_ID_LEN {
        return Err(SubscriptionError::Invalid(format!(
            "consumer_id must be 1 to {} bytes (got {})",
            state::MAX_CONSUMER_ID_LEN,
            id.len()
        ))
        .into());
    }
    Ok(())
}

/// An acknowledgement, as both the RPC and the push stream carry it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Inclusive ranges: (partition, first, last).
    pub ranges: Vec<(u32, u64, u64)>,
    /// What to do.
    pub kind: AckKind,
    /// Why (nack, reject).
    pub error: Option<String>,
}

impl Ack {
    /// Reads the wire form; an unspecified type or a delay above the limit is refused.
    pub fn from_pb(
        ranges: &[pb::AckRange],
        kind: i32,
        delay_ms: u32,
        error: &str,
    ) -> Result<Ack, BrokerError> {
        let kind = match pb::AckType::try_from(kind) {
            Ok(pb::AckType::Ack) => AckKind::Ack,
            Ok(pb::AckType::Nack) => {
                if delay_ms > MAX_ACK_DEADLINE_MS {
                    return Err(SubscriptionError::Invalid(format!(
                        "a nack delay of {delay_ms} ms is above the limit {MAX_ACK_DEADLINE_MS} ms"
                    ))
                    .into());
                }
                AckKind::Nack { delay_ms }
            }
            Ok(pb::AckType::Reject) => AckKind::Reject,
            Ok(pb::AckType::Extend) => AckKind::Extend,
            _ => {
                return Err(SubscriptionError::Invalid(
                    "the ack type must be ACK, NACK, REJECT or EXTEND".into(),
                )
                .into())
            }
        };
        if ranges.is_empty() {
            return Err(SubscriptionError::Invalid(
                "an acknowledgement needs at least one range".into(),
            )
            .into());
        }
        let mut total = 0u64;
        for r in ranges {
            let n = r
                .last_offset
                .checked_sub(r.first_offset)
                .and_then(|d| d.checked_add(1))
                .ok_or_else(|| {
                    SubscriptionError::Invalid(format!(
                        "partition {}: the range {}..={} is empty (the last offset is before the first)",
                        r.partition, r.first_offset, r.last_offset
                    ))
                })?;
            total = total.saturating_add(n);
        }
        if total > state::MAX_ACK_RECORDS {
            return Err(SubscriptionError::Invalid(format!(
                "an acknowledgement names {total} records; the limit is {}",
                state::MAX_ACK_RECORDS
            ))
            .into());
        }
        Ok(Ack {
            ranges: ranges
                .iter()
                .map(|r| (r.partition, r.first_offset, r.last_offset))
                .collect(),
            kind,
            error: (!error.is_empty()).then(|| error.to_string()),
        })
    }
}
