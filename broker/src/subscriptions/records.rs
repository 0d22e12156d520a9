//! The records of the internal `__subscriptions` topic and their codec.
//!
//! A record's value is one version byte ([`VERSION`]) then a JSON object tagged by `type`;
//! its key is [`SubscriptionRecord::key`], so the latest record of each key is the state
//! (the topic is compacted by rewriting those). The layout is in `docs/SUBSCRIPTIONS.md`.

use serde::{Deserialize, Serialize};

use super::state::PartitionState;

/// The version byte that starts every record this broker writes.
pub const VERSION: u8 = 1;

/// The key of a [`SubscriptionRecord::Compacted`] marker. It starts with `/`, which no
/// subscription name holds, so it never collides with a subscription's keys.
pub const COMPACTED_KEY: &str = "/compacted";

/// A subscription's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConfig {
    /// The topic read.
    pub topic: String,
    /// Lock length, ms.
    pub ack_deadline_ms: u32,
    /// Deliveries before dead-lettering.
    pub max_delivery_attempts: u32,
    /// The dead-letter topic, if any.
    pub dead_letter_topic: Option<String>,
    /// Pending records per partition.
    pub max_in_flight_per_partition: u32,
    /// Where new partitions start: true for the log start, false for the high watermark.
    pub from_earliest: bool,
    /// Webhook delivery, when set (absent in records of earlier brokers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<StoredPush>,
}

/// A subscription's webhook settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPush {
    /// The endpoint URL.
    pub endpoint: String,
    /// Shortest retry wait, ms.
    pub min_backoff_ms: u32,
    /// Longest retry wait, ms.
    pub max_backoff_ms: u32,
    /// Requests outstanding at once.
    pub max_in_flight: u32,
    /// The HMAC key, if requests are signed.
    pub signing_secret: Option<String>,
    /// Per-key order (absent in records of earlier brokers: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ordered: bool,
    /// Records per POST; 0 or 1: one (absent in records of earlier brokers).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_batch_records: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One change to the subscriptions' state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SubscriptionRecord {
    /// A subscription was created (replaces any earlier state of the name).
    Created {
        /// Its name.
        name: String,
        /// Its settings.
        config: StoredConfig,
    },
    /// A subscription was deleted, with all its partitions' state.
    Deleted {
        /// Its name.
        name: String,
    },
    /// The whole state of one partition of a subscription (replaces the previous one).
    Partition {
        /// The subscription.
        name: String,
        /// The partition.
        partition: u32,
        /// Its state.
        state: PartitionState,
    },
    /// The end of a compaction: the records from offset `start` up to this one restate every
    /// live subscription whole, so a replica that reads it may delete its segments before
    /// `start`. It changes no subscription.
    Compacted {
        /// The offset of the rewrite's first record (this marker's own, if it rewrote none).
        start: u64,
    },
}

/// Why a stored record cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record is empty.
    #[error("empty subscription record")]
    Empty,
    /// Written by a newer broker (or damaged).
    #[error("subscription record version {0} is not understood (this broker reads {VERSION})")]
    Version(u8),
    /// The JSON does not decode.
    #[error("subscription record does not decode: {0}")]
    Json(#[source] serde_json::Error),
    /// It decodes, but its partition state breaks an invariant.
    #[error("subscription record is inconsistent: {0}")]
    Inconsistent(String),
}

impl SubscriptionRecord {
    /// The record's bytes: the version byte, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Strings, integers, maps with integer keys and options always serialize.
        serde_json::to_writer(&mut out, self).expect("a subscription record always serializes");
        out
    }

    /// Reads a record's bytes.
    pub fn decode(bytes: &[u8]) -> Result<SubscriptionRecord, RecordError> {
        let (&version, json) = bytes.split_first().ok_or(RecordError::Empty)?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        let record: SubscriptionRecord = serde_json::from_slice(json).map_err(RecordError::Json)?;
        if let SubscriptionRecord::Partition { state, .. } = &record {
            state.validate().map_err(RecordError::Inconsistent)?;
        }
        Ok(record)
    }

    /// The subscription it is about; none for a compaction marker.
    pub fn name(&self) -> Option<&str> {
        match self {
            SubscriptionRecord::Created { name, .. }
            | SubscriptionRecord::Deleted { name }
            | SubscriptionRecord::Partition { name, .. } => Some(name),
            SubscriptionRecord::Compacted { .. } => None,
        }
    }

    /// The compaction key: the name for its settings, `name/partition` for a partition,
    /// [`COMPACTED_KEY`] for a marker. A name has no `/` (names are `[a-zA-Z0-9._-]`), so keys
    /// never collide.
    pub fn key(&self) -> String {
        match self {
            SubscriptionRecord::Compacted { .. } => COMPACTED_KEY.to_string(),
            SubscriptionRecord::Created { name, .. } | SubscriptionRecord::Deleted { name } => {
                name.clone()
            }
            SubscriptionRecord::Partition {
                name, partition, ..
            } => format!("{name}/{partition}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::super::state::{Lock, Pending};
    use super::*;

    fn pending() -> impl Strategy<Value = Pending> {
        (
            any::<u32>(),
            proptest::option::of(("[a-z0-9-]{1,20}", any::<i64>())),
            any::<i64>(),
            proptest::option::of(".{0,40}"),
        )
            .prop_map(
                |(delivery_count, lock, not_before_ms, last_error)| Pending {
                    delivery_count,
                    lock: lock.map(|(consumer, deadline_ms)| Lock {
                        consumer,
                        deadline_ms,
                    }),
                    not_before_ms,
                    last_error,
                },
            )
    }

    /// A consistent state: ranges and pending offsets laid out between floor and next.
    fn partition_state() -> impl Strategy<Value = PartitionState> {
        (
            0u64..u64::MAX / 4,
            prop::collection::vec((1u64..50, 0u8..3), 0..40),
            prop::collection::vec(pending(), 40),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(floor, steps, pendings, dead_lettered, archived)| {
                let mut state = PartitionState::starting_at(floor);
                let mut at = floor;
                let mut pendings = pendings.into_iter();
                for (len, kind) in steps {
                    match kind {
                        // A gap of pending records.
                        0 => {
                            let end = at + len.min(3);
                            while at < end {
                                let Some(p) = pendings.next() else { break };
                                state.pending.insert(at, p);
                                at += 1;
                            }
                        }
                        // A done range after a pending record (so it does not touch the floor).
                        _ => {
                            if let Some(p) = pendings.next() {
                                state.pending.insert(at, p);
                                state.done.push((at + 1, at + 1 + len));
                                at += 1 + len;
                            }
                        }
                    }
                }
                state.next = at;
                state.dead_lettered = dead_lettered;
                state.archived = archived;
                state
            })
    }

    fn record() -> impl Strategy<Value = SubscriptionRecord> {
        prop_oneof![
            (
                "[a-zA-Z0-9._-]{1,30}",
                "[a-z]{1,10}",
                any::<u32>(),
                any::<u32>(),
                proptest::option::of("[a-z]{1,10}"),
                any::<u32>(),
                any::<bool>(),
                proptest::option::of((
                    "http://[a-z]{1,10}",
                    any::<u32>(),
                    any::<u32>(),
                    proptest::option::of(".{0,20}")
                )),
            )
                .prop_map(|(name, topic, a, m, d, f, e, push)| {
                    SubscriptionRecord::Created {
                        name,
                        config: StoredConfig {
                            topic,
                            ack_deadline_ms: a,
                            max_delivery_attempts: m,
                            dead_letter_topic: d,
                            max_in_flight_per_partition: f,
                            from_earliest: e,
                            push: push.map(|(endpoint, b, n, signing_secret)| StoredPush {
                                endpoint,
                                min_backoff_ms: b,
                                max_backoff_ms: b,
                                max_in_flight: n,
                                signing_secret,
                                ordered: b % 2 == 0,
                                max_batch_records: n % 3,
                            }),
                        },
                    }
                }),
            "[a-zA-Z0-9._-]{1,30}".prop_map(|name| SubscriptionRecord::Deleted { name }),
            ("[a-zA-Z0-9._-]{1,30}", any::<u32>(), partition_state()).prop_map(
                |(name, partition, state)| SubscriptionRecord::Partition {
                    name,
                    partition,
                    state
                }
            ),
            any::<u64>().prop_map(|start| SubscriptionRecord::Compacted { start }),
        ]
    }

    proptest! {
        /// Every record reads back as written.
        #[test]
        fn records_round_trip(r in record()) {
            prop_assert_eq!(SubscriptionRecord::decode(&r.encode()).expect("decodes"), r);
        }

        /// Arbitrary bytes are an error, never a panic.
        #[test]
        fn garbage_is_an_error(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = SubscriptionRecord::decode(&bytes);
        }

        /// A state is stored as ranges: its size grows with the pending records and the gaps
        /// between done ranges, not with the offsets acknowledged.
        #[test]
        fn acked_ranges_are_stored_compactly(len in 1u64..1_000_000) {
            let mut state = PartitionState::starting_at(0);
            state.pending.insert(0, Pending { delivery_count: 1, lock: None, not_before_ms: 0, last_error: None });
            state.done.push((1, 1 + len));
            state.next = 1 + len;
            let r = SubscriptionRecord::Partition { name: "s".into(), partition: 0, state };
            prop_assert!(r.encode().len() < 400, "{}", r.encode().len());
        }
    }

    #[test]
    fn an_unknown_version_and_an_inconsistent_state_are_refused() {
        let mut bytes = SubscriptionRecord::Deleted { name: "x".into() }.encode();
        bytes[0] = 2;
        assert!(matches!(
            SubscriptionRecord::decode(&bytes),
            Err(RecordError::Version(2))
        ));
        assert!(matches!(
            SubscriptionRecord::decode(&[]),
            Err(RecordError::Empty)
        ));
        let bad = SubscriptionRecord::Partition {
            name: "s".into(),
            partition: 0,
            state: PartitionState {
                floor: 10,
                next: 5,
                done: Vec::new(),
                pending: BTreeMap::new(),
                dead_lettered: 0,
                archived: 0,
            },
        };
        assert!(matches!(
            SubscriptionRecord::decode(&bad.encode()),
            Err(RecordError::Inconsistent(_))
        ));
    }
}
