//! A replicated groups topic (see "Replicated" in the module doc of [`super`]): changes
//! committed through a [`GroupsWriter`], and the view fed from the log.
//!
//! # Compaction
//! Only the partition's leader snapshots it (the broker calls
//! [`GroupStore::compact_partitions_if_due`] with the partitions it leads), at the same
//! threshold as a single broker. It first brings the view up to its log, then commits the
//! snapshot's batches through the writer (one Raft commit each, the marker last), so every
//! replica holds the snapshot at the same offsets. The no-interleaving rule holds on the
//! leader by a per-partition lock: every change holds it shared from its catch-up to its
//! commit, the snapshot holds it exclusively across all its commits, so a change waits for
//! a snapshot and never lands between its records. Only the leader writes, so no other
//! broker's change can interleave either.
//!
//! Every replica (the leader too) deletes its own segments: the walk of the log tracks where
//! the latest complete snapshot began (the first `GroupSnapshot` record after which only
//! snapshot records follow up to a marker; the marker itself for a snapshot of no group),
//! keeping that scan between walks because a walk may stop between two batches of one
//! snapshot, and on applying the marker deletes the sealed segments that end before that
//! start. Deletion is local and deterministic; log starts may differ between replicas by a
//! segment (a replica that restarted skips the deletion of a marker it applied before its
//! crash, until the next one), which is harmless: a follower whose end is before its
//! source's log start restarts its log at that start and replays it whole.
//!
//! A leader change mid-snapshot aborts it: the old leader's later commits fail, and it
//! deletes nothing for that snapshot (no marker). The records it did commit are a partial snapshot:
//! each rewrote a group's current state (no change interleaved on the old leader, and a
//! new leader's entries always come after the old leader's in the log), so replay over them
//! gives the same state. A run of snapshot records with no marker is reset by the next
//! other record; when the new leader's snapshot follows at once, the deletion point is the
//! partial snapshot's start, which is still safe: every record from it to the marker is a
//! current state, and the complete snapshot after it covers every group.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Result, StorageError};

use super::{
    build_batch, max_change_bytes, partition_for_group, replay, GroupRecord, GroupState,
    GroupStore, GroupsWriter, SnapshotOutcome, GROUPS_TOPIC,
};

impl GroupStore {
    /// [`GroupStore::change`] on a replicated groups topic: the view is brought up to the
    /// log first (so `decide` sees every committed change), the records are committed
    /// through `writer`, and the view then applies them from the log.
    pub(super) fn change_replicated(
        &self,
        group: &str,
        p: u32,
        writer: &dyn GroupsWriter,
        decide: impl FnOnce(&GroupState) -> Option<Vec<GroupRecord>>,
    ) -> Result<bool> {
        // Shared with other changes, exclusive of a snapshot of this partition.
        let _no_snapshot = self.leader_writes(p)?.read();
        self.catch_up(p)?;
        let current = self.state_of(group);
        let Some(records) = decide(&current) else {
            return Ok(false);
        };
        let log = self.inner.topic.partition(p)?;
        let batch = build_batch(&records, max_change_bytes(&log))?;
        writer.append(p, batch)?;
        self.catch_up(p)?;
        Ok(true)
    }

    /// [`GroupStore::snapshot`] on a replicated groups topic, at the partition's leader: with
    /// every change of the partition held off, the view is brought up to the log, its
    /// groups' states are committed through `writer` (one commit per batch, the marker
    /// last), and the view then applies them from the log, which deletes the segments before
    /// the snapshot on this replica as on every other. A failed commit (this broker lost the
    /// leadership) ends the snapshot, and nothing is deleted here.
    pub(super) fn snapshot_replicated(
        &self,
        p: u32,
        writer: &dyn GroupsWriter,
    ) -> Result<SnapshotOutcome> {
        let _exclusive = self.leader_writes(p)?.write();
        let log = self.inner.topic.partition(p)?;
        self.catch_up(p)?;
        let batches = self.snapshot_batches(p, &log);
        let groups = batches.iter().flatten().count().saturating_sub(1) as u32;
        let limit = max_change_bytes(&log);
        for batch in &batches {
            writer.append(p, build_batch(batch, limit)?)?;
        }
        // The replica's follower may have applied the marker first (and deleted): the start
        // then comes from the scan it left.
        let (_, compacted) = self.catch_up_compacting(p)?;
        let latest = self
            .inner
            .scans
            .get(p as usize)
            .and_then(|s| s.lock().latest);
        let deleted_segments = compacted.map_or(0, |c| c.1);
        let snapshot_offset = compacted.map(|c| c.0).or(latest).unwrap_or_default();
        tracing::info!(
            partition = p,
            snapshot_offset,
            groups,
            deleted_segments,
            "replicated groups partition snapshotted"
        );
        Ok(SnapshotOutcome {
            snapshot_offset,
            groups,
            deleted_segments,
        })
    }

    fn leader_writes(&self, p: u32) -> Result<&parking_lot::RwLock<()>> {
        self.inner
            .leader_writes
            .get(p as usize)
            .ok_or_else(|| StorageError::PartitionNotFound {
                topic: GROUPS_TOPIC.to_string(),
                partition: p,
                partitions: self.inner.topic.partition_count(),
            })
    }

    /// Makes the groups topic replicated: from now on every change is committed through
    /// `writer`, and the view follows the log ([`GroupStore::catch_up`]).
    pub fn replicate_with(&self, writer: Arc<dyn GroupsWriter>) {
        *self.inner.writer.write() = Some(writer);
    }

    /// Whether changes go through a replicated writer.
    pub fn is_replicated(&self) -> bool {
        self.inner.writer.read().is_some()
    }

    /// Applies to the view what partition `p`'s log holds beyond it (records a replicated
    /// partition's apply appended). A log that now starts after the view's end (a replica
    /// rebuilt from another) is replayed whole, and its groups replaced. When the records
    /// applied complete a snapshot, this replica's sealed segments before it are deleted.
    /// Returns the offset the view now holds every record before. A record that does not
    /// decode is [`StorageError::Corrupt`] and changes nothing.
    pub fn catch_up(&self, p: u32) -> Result<u64> {
        Ok(self.catch_up_compacting(p)?.0)
    }

    /// [`GroupStore::catch_up`], also returning the start of the latest snapshot it completed
    /// and how many segments that deleted.
    fn catch_up_compacting(&self, p: u32) -> Result<(u64, Option<(u64, u32)>)> {
        let log = self.inner.topic.partition(p)?;
        let gate = self.gate(p)?;
        let _exclusive = gate.write();
        let applied = self.inner.applied_next.get(p as usize).ok_or_else(|| {
            StorageError::PartitionNotFound {
                topic: GROUPS_TOPIC.to_string(),
                partition: p,
                partitions: self.inner.topic.partition_count(),
            }
        })?;
        let from = applied.load(Ordering::Relaxed);
        let start = log.log_start_offset();
        if from >= start && from >= log.high_watermark() {
            return Ok((from, None));
        }
        let whole = from < start;
        let partitions = self.inner.topic.partition_count();
        let mut touched: HashMap<String, GroupState> = HashMap::new();
        let view = |g: &str| {
            if whole {
                GroupState::default()
            } else {
                self.inner
                    .groups
                    .read()
                    .get(g)
                    .map(|s| GroupState::clone(s))
                    .unwrap_or_default()
            }
        };
        let since = self.inner.since_snapshot_bytes.get(p as usize);
        let scans = self.inner.scans.get(p as usize);
        let (mut since_snapshot, mut scan) = if whole {
            (0, replay::SnapshotScan::default())
        } else {
            (
                since.map_or(0, |b| b.load(Ordering::Relaxed)),
                scans.map(|s| *s.lock()).unwrap_or_default(),
            )
        };
        let end = replay::replay_from(
            &log,
            from.max(start),
            partitions,
            &mut touched,
            view,
            &mut since_snapshot,
            &mut scan,
        )
        .map_err(|(offset, reason)| StorageError::Corrupt {
            path: log.dir().to_path_buf(),
            reason: format!("groups record at offset {offset}: {reason}"),
        })?;
        let mut groups = self.inner.groups.write();
        if whole {
            groups.retain(|g, _| partition_for_group(g, partitions) != p);
        }
        for (g, state) in touched {
            if state.is_empty() {
                groups.remove(&g);
            } else {
                groups.insert(g, Arc::new(state));
            }
        }
        drop(groups);
        applied.store(end, Ordering::Relaxed);
        if let Some(since) = since {
            since.store(since_snapshot, Ordering::Relaxed);
        }
        let completed = scan.complete.take();
        if let Some(s) = scans {
            *s.lock() = scan;
        }
        let Some(snapshot_start) = completed else {
            return Ok((end, None));
        };
        // Every replica deletes at the same marker, from its own log: replay from the
        // snapshot's start rebuilds what the view holds (module doc, "Bounded growth"). A
        // failure leaves the segments for the next marker.
        match log.delete_segments_before(snapshot_start) {
            Ok(deleted) => Ok((end, Some((snapshot_start, deleted.deleted_segments)))),
            Err(e) => {
                tracing::warn!(partition = p, snapshot_start, error = %e, "cannot delete the groups segments a snapshot replaces; the next snapshot retries");
                Ok((end, Some((snapshot_start, 0))))
            }
        }
    }
}
