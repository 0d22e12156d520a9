//! [`StateLog`]: the internal topic `__subscriptions`, written and replayed as a keyed log.
//!
//! Each change appends its records as one batch and syncs it (in a cluster: commits it
//! through Raft, fsynced by a majority) before the change takes effect in memory. The log
//! keeps, in memory, the latest encoded records of each subscription.
//!
//! # Compaction
//! (The steps shared with `__security` and `__producers` are in
//! [`crate::internal::compact`].) Once the log holds about a segment after its last
//! compaction marker (counted from the log when it is opened, so a restarted broker or a new
//! leader knows what the previous writer left, then by each write), a background task of the
//! writer (started by [`crate::subscriptions::spawn_background`], never a client's request) rewrites the
//! whole live state, then appends a [`SubscriptionRecord::Compacted`] marker holding the
//! rewrite's first offset; the sealed segments that end before that offset are then deleted
//! (on a single broker by the writer, in a cluster by each replica: below), so the topic
//! stays bounded. Replay from any later log start gives the same state: the
//! records from the rewrite's start to the marker restate every live subscription, and no
//! write interleaves with them (one writer, holding the log's lock throughout).
//!
//! A rewrite keeps each subscription whole in one batch (its `Created` record and every
//! partition's), and a batch is atomic: on a local append, and as one Raft entry. That
//! matters because replay of `Created` resets the subscription's partitions: were a
//! subscription split across batches, a rewrite cut short between them would leave its
//! partitions reset and their acknowledged records delivered again.
//!
//! # Replicated
//! In a cluster only the leader of `__subscriptions` writes, compactions included: each
//! rewrite batch is one Raft commit, the marker the last. Every replica, the leader too,
//! deletes its own segments before the rewrite when it reads the marker in its log
//! ([`apply_markers`], run by the replica's tail of its log as entries are applied; a
//! replica's log holds only committed entries). Deletion is local, so log starts may differ
//! between replicas by a segment; a follower whose end falls before its source's log start
//! restarts its log there, which is at or before a rewrite it then receives whole.
//!
//! A rewrite cut short (a crash, or a leader change: the old leader's later commits fail)
//! leaves some of its batches committed and no marker, so no replica deletes anything for
//! it. Each batch that did commit restates some subscriptions wholly, at the state they had
//! when the rewrite began; no change landed between the rewrite's batches (the old leader
//! held its lock, and a new leader's entries come after every entry of the old leader's
//! that committed), so replay over them changes nothing. The next rewrite (on whichever
//! broker leads then) is complete before its marker, and deletion only ever cuts before a
//! marker's own rewrite.

use std::collections::BTreeMap;

use bytes::Bytes;
use rill_storage::batch::{try_encode_batch, Record};
use rill_storage::{FlushPolicy, PartitionLog, Store, TopicConfig};

use super::records::{StoredConfig, SubscriptionRecord, COMPACTED_KEY};
use super::state::PartitionState;
use crate::error::BrokerError;
use crate::internal::compact::Growth;

/// The internal topic that holds every subscription's state.
pub const SUBSCRIPTIONS_TOPIC: &str = "__subscriptions";
/// The default segment size of the topic (`--subscriptions-segment-bytes`): a compaction
/// runs once about a segment was appended since the last one.
pub const DEFAULT_SUBSCRIPTIONS_SEGMENT_BYTES: u64 = 1 << 20;

/// The config of the `__subscriptions` topic: one partition, flushed on every append, kept
/// forever (compaction bounds it), in segments of `segment_bytes`. Used when the topic is
/// created; an existing topic keeps its own.
pub fn subscriptions_topic_config(segment_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: None,
        retention_bytes: None,
        flush: FlushPolicy::Always,
        segment_bytes,
        ..TopicConfig::default()
    }
}

/// The latest records of one subscription: its `Created` and each partition's state.
#[derive(Debug)]
struct Latest {
    created: Bytes,
    partitions: BTreeMap<u32, Bytes>,
}

/// The open `__subscriptions` log and the latest record of each key.
#[derive(Debug)]
pub struct StateLog {
    log: PartitionLog,
    /// Set in a cluster: changes are Raft commits through the broker (see
    /// [`crate::internal`]), made from the blocking pool with this runtime.
    replicated: Option<(crate::state::Broker, tokio::runtime::Handle)>,
    /// Name → the latest records of the subscription (a `Deleted` removes it).
    latest: BTreeMap<String, Latest>,
    /// The bytes of the log after its last compaction marker: read from the log when opened,
    /// then counted by each write.
    growth: Growth,
    /// The log's segment size: the compaction threshold.
    segment_bytes: u64,
}

impl StateLog {
    /// Opens (creating if missing) the topic and replays it. Returns the log and every
    /// record in order. Blocking: call it on the blocking pool.
    /// `segment_bytes` is used if the topic is created here.
    pub fn open(
        store: &Store,
        segment_bytes: u64,
    ) -> Result<(StateLog, Vec<SubscriptionRecord>), BrokerError> {
        let log = store
            .internal_topic(
                SUBSCRIPTIONS_TOPIC,
                subscriptions_topic_config(segment_bytes),
            )?
            .partition(0)?;
        let segment_bytes = log.options().segment_bytes;
        let mut records = Vec::new();
        let start = log.log_start_offset();
        let mut last_marker = None;
        crate::internal::replay_values(&log, start, corrupt, |offset, value| {
            let r = SubscriptionRecord::decode(value)
                .map_err(|e| corrupt(format!("the record at offset {offset}: {e}")))?;
            if matches!(r, SubscriptionRecord::Compacted { .. }) {
                last_marker = Some(offset);
            }
            records.push(r);
            Ok(())
        })?;
        // A marker is a batch of its own, so the bytes after it are whole batches.
        let mut growth = Growth::default();
        let since = last_marker.map_or(start, |m| m + 1);
        growth.read(
            last_marker.is_some(),
            crate::internal::compact::bytes_from(&log, since)?,
        );
        let mut state = StateLog {
            log,
            replicated: None,
            latest: BTreeMap::new(),
            growth,
            segment_bytes,
        };
        for r in &records {
            state.remember(r, Bytes::from(r.encode()));
        }
        Ok((state, records))
    }

    /// Makes every later change a Raft commit through `broker` (a cluster member whose
    /// internal topics are replicated); compactions too, batch by batch (module doc).
    pub fn replicate_through(&mut self, broker: crate::state::Broker) {
        self.replicated = Some((broker, tokio::runtime::Handle::current()));
    }

    /// Appends `records` as one batch and syncs it. Blocking. Never compacts: a change's
    /// caller learns from [`Self::compaction_due`] whether to wake the background task that
    /// does ([`Self::compact_if_due`]).
    pub fn write(&mut self, records: &[SubscriptionRecord]) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let encoded: Vec<(SubscriptionRecord, Bytes)> = records
            .iter()
            .map(|r| (r.clone(), Bytes::from(r.encode())))
            .collect();
        let (_, bytes) = self.append(&encoded)?;
        for (r, b) in encoded {
            self.remember(&r, b);
        }
        self.growth.read(false, bytes as u64);
        Ok(())
    }

    /// Whether the log grew by a segment since its last compaction (or a failed one's
    /// back-off), so [`Self::compact_if_due`] would compact.
    pub fn compaction_due(&self) -> bool {
        self.growth.due(self.segment_bytes)
    }

    /// Compacts the log if [`Self::compaction_due`]; returns whether it did. Blocking (a
    /// rewrite is several durable commits), and holds this log, so no change lands in the
    /// middle of the rewrite: run it from a background task, never a client's request. A
    /// failure leaves the state intact (module doc); the next compaction is then tried once
    /// another segment has been appended, so a failing one does not rewrite the state at every
    /// check.
    pub fn compact_if_due(&mut self) -> Result<bool, BrokerError> {
        if !self.compaction_due() {
            return Ok(false);
        }
        match self.compact() {
            Ok(()) => {
                // The marker was the last record: nothing after it yet.
                self.growth.read(true, 0);
                Ok(true)
            }
            Err(e) => {
                self.growth.failed(self.segment_bytes);
                Err(e)
            }
        }
    }

    /// Rewrites every subscription's latest records, appends the [`SubscriptionRecord::
    /// Compacted`] marker naming where the rewrite began, then, on a single broker, deletes
    /// the segments before it. In a cluster every replica's tail does that when it reads the
    /// marker ([`apply_markers`]), this one's too: one deleter per log, so no read of the
    /// tail meets segments deleted under it.
    fn compact(&mut self) -> Result<(), BrokerError> {
        // This writer is the only one (its lock is held), and on a cluster's leader every
        // committed entry is applied here before its write returns, so the log's end is
        // where the marker lands when there is nothing to rewrite.
        let end = self.log.high_watermark();
        let mut start = None;
        for batch in self.rewrite_batches() {
            let (base_offset, _) = self.append_raw(&batch)?;
            start.get_or_insert(base_offset);
        }
        let start = start.unwrap_or(end);
        let marker = SubscriptionRecord::Compacted { start };
        self.append_raw(&[record(marker.key(), Bytes::from(marker.encode()))])?;
        let deleted_segments = if self.replicated.is_none() {
            delete_before(&self.log, start)
        } else {
            0
        };
        tracing::info!(
            subscriptions = self.latest.len(),
            start,
            deleted_segments,
            "{SUBSCRIPTIONS_TOPIC} compacted"
        );
        Ok(())
    }

    /// The batches of a rewrite: every subscription's latest records, each subscription
    /// whole in one batch (its `Created` resets its partitions on replay, so a batch boundary
    /// after it would leave them reset if the rest never came). Batches gather subscriptions
    /// up to about a quarter segment; a larger subscription gets a batch of its own.
    fn rewrite_batches(&self) -> Vec<Vec<Record>> {
        let limit = usize::try_from(self.segment_bytes / 4).unwrap_or(usize::MAX);
        let subscriptions = self.latest.iter().map(|(name, latest)| {
            let mut records = vec![record(name.clone(), latest.created.clone())];
            records.extend(
                latest
                    .partitions
                    .iter()
                    .map(|(p, state)| record(format!("{name}/{p}"), state.clone())),
            );
            records
        });
        crate::internal::compact::pack(subscriptions, limit)
    }

    fn remember(&mut self, r: &SubscriptionRecord, bytes: Bytes) {
        match r {
            SubscriptionRecord::Deleted { name } => {
                self.latest.remove(name);
            }
            SubscriptionRecord::Created { name, .. } => {
                let fresh = Latest {
                    created: bytes,
                    partitions: BTreeMap::new(),
                };
                self.latest.insert(name.clone(), fresh);
            }
            SubscriptionRecord::Partition {
                name, partition, ..
            } => {
                // Replay ignores the partition of a subscription it does not hold; so does
                // the rewrite.
                if let Some(l) = self.latest.get_mut(name) {
                    l.partitions.insert(*partition, bytes);
                }
            }
            SubscriptionRecord::Compacted { .. } => {}
        }
    }

    /// Appends `encoded` as one batch; returns its base offset and size in bytes.
    fn append(&self, encoded: &[(SubscriptionRecord, Bytes)]) -> Result<(u64, usize), BrokerError> {
        let records: Vec<Record> = encoded
            .iter()
            .map(|(r, b)| record(r.key(), b.clone()))
            .collect();
        self.append_raw(&records)
    }

    /// Appends `records` as one batch, synced (a durable Raft commit in a cluster); returns
    /// the offset of its first record and its size in bytes.
    fn append_raw(&self, records: &[Record]) -> Result<(u64, usize), BrokerError> {
        let batch = try_encode_batch(records).map_err(|e| {
            BrokerError::Internal(format!("cannot build a {SUBSCRIPTIONS_TOPIC} batch: {e}"))
        })?;
        let len = batch.len();
        if let Some((broker, runtime)) = &self.replicated {
            let base_offset = runtime.block_on(crate::internal::append_batch_at(
                broker,
                SUBSCRIPTIONS_TOPIC,
                0,
                batch,
            ))?;
            return Ok((base_offset, len));
        }
        let appended = self.log.append(&batch)?;
        self.log.sync_through(appended.next_offset)?;
        Ok((appended.base_offset, len))
    }
}

/// Reads this replica's `__subscriptions` log from offset `from` to its end and, if it holds
/// a [`SubscriptionRecord::Compacted`] marker, deletes the sealed segments before the latest
/// marker's start. Returns the offset reached (where the next call starts). A replica's
/// log holds only committed entries, so a marker read here ends a rewrite that is wholly
/// committed before it. Blocking.
pub fn apply_markers(log: &PartitionLog, from: u64) -> Result<u64, BrokerError> {
    let mut start = None;
    let end = crate::internal::replay_keyed(log, from, corrupt, |offset, key, value| {
        if key == Some(COMPACTED_KEY.as_bytes()) {
            match SubscriptionRecord::decode(value) {
                Ok(SubscriptionRecord::Compacted { start: s }) => start = Some(s),
                Ok(_) | Err(_) => {
                    return Err(corrupt(format!(
                        "the record at offset {offset} has the key {COMPACTED_KEY} and is not a \
                         compaction marker"
                    )))
                }
            }
        }
        Ok(())
    })?;
    if let Some(start) = start {
        delete_before(log, start);
    }
    Ok(end)
}

/// Deletes the sealed segments of `log` that end before `start`; returns how many (see
/// [`crate::internal::compact::delete_before`]).
fn delete_before(log: &PartitionLog, start: u64) -> u32 {
    crate::internal::compact::delete_before(SUBSCRIPTIONS_TOPIC, log, start)
}

/// Every subscription's settings and partitions' states.
pub(super) type Replayed = BTreeMap<String, (StoredConfig, BTreeMap<u32, PartitionState>)>;

/// The state `records`, in log order, leave: a `Created` replaces any earlier state of its
/// name, a `Deleted` removes it, a `Partition` of a name not held is ignored.
pub(super) fn fold(records: Vec<SubscriptionRecord>) -> Replayed {
    let mut subs = Replayed::new();
    for r in records {
        match r {
            SubscriptionRecord::Created { name, config } => {
                subs.insert(name, (config, BTreeMap::new()));
            }
            SubscriptionRecord::Deleted { name } => {
                subs.remove(&name);
            }
            SubscriptionRecord::Partition {
                name,
                partition,
                state,
            } => {
                if let Some((_, parts)) = subs.get_mut(&name) {
                    parts.insert(partition, state);
                }
            }
            SubscriptionRecord::Compacted { .. } => {}
        }
    }
    subs
}

fn record(key: String, value: Bytes) -> Record {
    crate::internal::compact::record(Some(Bytes::from(key)), value)
}

fn corrupt(what: String) -> BrokerError {
    BrokerError::Internal(format!(
        "the {SUBSCRIPTIONS_TOPIC} topic cannot be replayed ({what}); the broker will not start \
         with subscription state it cannot read"
    ))
}

#[cfg(test)]
mod tests;
