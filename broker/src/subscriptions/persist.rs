//! [`StateLog`]: the internal topic `__subscriptions`, written and replayed as a keyed log.
//!
//! Each change appends its records as one batch and syncs it before the change takes
//! effect in memory. The log keeps, in memory, the latest encoded record of each key; once
//! about a segment has been appended since the last compaction, it rewrites those (the whole
//! live state) and deletes the sealed segments before them, so the topic stays bounded.
//! Replay from any later log start gives the same state: a rewrite is the complete state,
//! and no write interleaves with it (one writer lock).

use std::collections::BTreeMap;

use bytes::Bytes;
use rill_storage::batch::{try_encode_batch, Record};
use rill_storage::{FlushPolicy, PartitionLog, Store, TopicConfig};

use super::records::SubscriptionRecord;
use crate::error::BrokerError;

/// The internal topic that holds every subscription's state.
pub const SUBSCRIPTIONS_TOPIC: &str = "__subscriptions";
/// Segment size of the topic: a compaction runs once about this much was appended.
const SEGMENT_BYTES: u64 = 1 << 20;

/// The config of the `__subscriptions` topic: one partition, flushed on every append, kept
/// forever (compaction bounds it).
pub fn subscriptions_topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: None,
        retention_bytes: None,
        flush: FlushPolicy::Always,
        segment_bytes: SEGMENT_BYTES,
        ..TopicConfig::default()
    }
}

/// The open `__subscriptions` log and the latest record of each key.
#[derive(Debug)]
pub struct StateLog {
    log: PartitionLog,
    /// Set in a cluster: changes are Raft commits through the broker (see
    /// [`crate::internal`]), made from the blocking pool with this runtime.
    replicated: Option<(crate::state::Broker, tokio::runtime::Handle)>,
    /// Key → the latest record's bytes (a `Deleted` removes its name's keys).
    latest: BTreeMap<String, Bytes>,
    since_compaction_bytes: u64,
}

impl StateLog {
    /// Opens (creating if missing) the topic and replays it. Returns the log and every
    /// record in order. Blocking: call it on the blocking pool.
    pub fn open(store: &Store) -> Result<(StateLog, Vec<SubscriptionRecord>), BrokerError> {
        let log = store
            .internal_topic(SUBSCRIPTIONS_TOPIC, subscriptions_topic_config())?
            .partition(0)?;
        let mut records = Vec::new();
        let start = log.log_start_offset();
        crate::internal::replay_values(&log, start, corrupt, |offset, value| {
            records.push(
                SubscriptionRecord::decode(value)
                    .map_err(|e| corrupt(format!("the record at offset {offset}: {e}")))?,
            );
            Ok(())
        })?;
        let mut state = StateLog {
            log,
            replicated: None,
            latest: BTreeMap::new(),
            since_compaction_bytes: 0,
        };
        for r in &records {
            state.remember(r, Bytes::from(r.encode()));
        }
        Ok((state, records))
    }

    /// Makes every later change a Raft commit through `broker` (a cluster member whose
    /// internal topics are replicated). Compaction is then off: each replica's log keeps the
    /// records a lagging follower's catch-up reads.
    pub fn replicate_through(&mut self, broker: crate::state::Broker) {
        self.replicated = Some((broker, tokio::runtime::Handle::current()));
    }

    /// Appends `records` as one batch and syncs it. Blocking.
    pub fn write(&mut self, records: &[SubscriptionRecord]) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let encoded: Vec<(SubscriptionRecord, Bytes)> = records
            .iter()
            .map(|r| (r.clone(), Bytes::from(r.encode())))
            .collect();
        let bytes = self.append(&encoded)?;
        for (r, b) in encoded {
            self.remember(&r, b);
        }
        self.since_compaction_bytes += bytes as u64;
        if self.since_compaction_bytes >= SEGMENT_BYTES && self.replicated.is_none() {
            // A failed compaction is retried at the next write; the state is intact.
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "{SUBSCRIPTIONS_TOPIC} compaction failed");
            }
        }
        Ok(())
    }

    /// Rewrites the latest record of every key, then deletes the segments before them.
    fn compact(&mut self) -> Result<(), BrokerError> {
        let start = self.log.high_watermark();
        let all: Vec<(String, Bytes)> = self
            .latest
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Batches of at most a quarter segment, so each fits a fresh segment.
        let mut batch: Vec<Record> = Vec::new();
        let mut batch_bytes = 0usize;
        for (key, value) in all {
            if !batch.is_empty() && batch_bytes + value.len() > (SEGMENT_BYTES / 4) as usize {
                self.append_raw(&batch)?;
                batch.clear();
                batch_bytes = 0;
            }
            batch_bytes += value.len() + key.len();
            batch.push(record(key, value));
        }
        if !batch.is_empty() {
            self.append_raw(&batch)?;
        }
        self.log.sync_through(self.log.high_watermark())?;
        let deleted = self.log.delete_segments_before(start)?;
        self.since_compaction_bytes = 0;
        tracing::info!(
            keys = self.latest.len(),
            deleted_segments = deleted.deleted_segments,
            "{SUBSCRIPTIONS_TOPIC} compacted"
        );
        Ok(())
    }

    fn remember(&mut self, r: &SubscriptionRecord, bytes: Bytes) {
        match r {
            SubscriptionRecord::Deleted { name } => {
                let prefix = format!("{name}/");
                self.latest
                    .retain(|k, _| k != name && !k.starts_with(&prefix));
            }
            SubscriptionRecord::Created { name, .. } => {
                let prefix = format!("{name}/");
                self.latest.retain(|k, _| !k.starts_with(&prefix));
                self.latest.insert(r.key(), bytes);
            }
            SubscriptionRecord::Partition { .. } => {
                self.latest.insert(r.key(), bytes);
            }
        }
    }

    fn append(&self, encoded: &[(SubscriptionRecord, Bytes)]) -> Result<usize, BrokerError> {
        let records: Vec<Record> = encoded
            .iter()
            .map(|(r, b)| record(r.key(), b.clone()))
            .collect();
        self.append_raw(&records)
    }

    fn append_raw(&self, records: &[Record]) -> Result<usize, BrokerError> {
        let batch = try_encode_batch(records).map_err(|e| {
            BrokerError::Internal(format!("cannot build a {SUBSCRIPTIONS_TOPIC} batch: {e}"))
        })?;
        if let Some((broker, runtime)) = &self.replicated {
            let len = batch.len();
            runtime.block_on(crate::internal::append_batch(
                broker,
                SUBSCRIPTIONS_TOPIC,
                0,
                batch,
            ))?;
            return Ok(len);
        }
        let appended = self.log.append(&batch)?;
        self.log.sync_through(appended.next_offset)?;
        Ok(batch.len())
    }
}

fn record(key: String, value: Bytes) -> Record {
    Record {
        key: Some(Bytes::from(key)),
        value,
        headers: Vec::new(),
        timestamp_ms: rill_storage::log::now_ms(),
    }
}

fn corrupt(what: String) -> BrokerError {
    BrokerError::Internal(format!(
        "the {SUBSCRIPTIONS_TOPIC} topic cannot be replayed ({what}); the broker will not start \
         with subscription state it cannot read"
    ))
}
