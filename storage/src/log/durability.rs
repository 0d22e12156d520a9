//! Durability: the flush policy, group commit, checkpoints, fencing and the clean close.
//!
//! The flush policy is enforced here and nowhere else:
//! - `always`, and any append acked `durable`: [`PartitionLog::settle`] waits for a
//!   group-commit sync ([`PartitionLog::sync_through`]) before it returns the offsets to
//!   acknowledge.
//! - `interval:MS`: [`PartitionLog::run_background`] syncs the partition when MS have passed
//!   since its last periodic sync and something is unsynced. A caller drives it every
//!   [`FLUSH_TICK_MS`] for every partition with [`PartitionLog::background_due`] work, each on
//!   a blocking thread of its own, so one slow disk does not hold back the others.
//! - every policy: the same call checkpoints after a roll (syncs the sealed segment and the
//!   folder, then moves the recovery point), so crash recovery stays short.
//!
//! Fail-stop: a failed sync of data the partition wrote (a segment, an index, the folder)
//! fences the partition, since after a failed fsync the kernel may have dropped the dirty
//! pages and a retry can report success without them. Writes are refused from then on;
//! reads go on. Nothing else fences: a failed recovery-point write leaves the older (still
//! valid) point in place and is retried.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::PartitionLog;
use crate::error::{Result, StorageError};
use crate::fsutil::fsync_dir;
use crate::recovery;
use crate::segment::Segment;

/// How often a caller should run [`PartitionLog::background_due`] and
/// [`PartitionLog::run_background`] for each partition, in milliseconds. An `interval` flush
/// starts at most this late.
pub const FLUSH_TICK_MS: u64 = 50;

impl PartitionLog {
    /// Returns once every offset below `end_offset` is on stable storage. Group commit: if a
    /// sync is already running, wait for it and check again; otherwise run one that covers
    /// everything appended so far, serving every caller waiting meanwhile. Blocking.
    pub fn sync_through(&self, end_offset: u64) -> Result<()> {
        let inner = &*self.inner;
        let mut state = inner.sync.lock();
        loop {
            if let Some(reason) = self.fenced_reason() {
                return Err(StorageError::Fenced {
                    topic: inner.id.topic.clone(),
                    partition: inner.id.partition,
                    reason,
                });
            }
            if state.durable_offset >= end_offset {
                return Ok(());
            }
            if state.in_progress {
                inner.sync_done.wait(&mut state);
                continue;
            }
            state.in_progress = true;
            drop(state);
            let started = std::time::Instant::now();
            let result = self.sync_now();
            crate::stats::sync_stats().record(started.elapsed());
            state = inner.sync.lock();
            state.in_progress = false;
            match result {
                Ok(synced) => {
                    state.durable_offset = state.durable_offset.max(synced);
                    inner
                        .durable_offset
                        .store(state.durable_offset, Ordering::Release);
                }
                Err(e) => {
                    crate::stats::sync_stats().record_error();
                    self.fence(format!("sync failed: {e}"));
                    inner.sync_done.notify_all();
                    return Err(e);
                }
            }
            inner.sync_done.notify_all();
        }
    }

    /// Syncs everything appended so far ([`PartitionLog::sync_through`] the high watermark).
    pub fn flush(&self) -> Result<()> {
        self.sync_through(self.high_watermark())
    }

    /// How many syncs wrote appended data to stable storage since open (each group commit or
    /// flush that found something to sync counts once, however many appends it covered; so
    /// does each [`PartitionLog::sync_staged`] that synced staged batches).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Acquire)
    }

    /// Every offset below this is known to be on stable storage.
    pub fn durable_offset(&self) -> u64 {
        self.inner.durable_offset.load(Ordering::Acquire)
    }

    /// Syncs every segment with unsynced data (the active one, and any sealed since the last
    /// sync), then the folder and the recovery point if a roll happened; returns the offset
    /// below which all is durable.
    fn sync_now(&self) -> Result<u64> {
        // Load the watermark first: every batch below it is in a segment of the list loaded
        // next.
        let target = self.high_watermark();
        self.inner.faults.before_sync();
        self.inner.faults.take_sync_failure(&self.inner.dir)?;
        let segments = self.inner.segments.load_full();
        if self.checkpoint_segments(&segments, &segments)? {
            self.inner.syncs.fetch_add(1, Ordering::AcqRel);
        }
        Ok(target)
    }

    /// Makes sealed segments durable and moves the recovery point up to the active segment,
    /// so a crash recovery scans only that one. Cheap when no roll happened since the last
    /// checkpoint. Syncs of the active segment are left to the flush policy. Blocking; a
    /// failed sync fences the partition.
    pub fn checkpoint(&self) -> Result<()> {
        if !self.inner.checkpoint_due.load(Ordering::Acquire) {
            return Ok(());
        }
        self.inner.faults.before_sync();
        let segments = self.inner.segments.load_full();
        let sealed = &segments[..segments.len().saturating_sub(1)];
        let result = self.checkpoint_segments(sealed, &segments).map(|_| ());
        if let Err(e) = &result {
            crate::stats::sync_stats().record_error();
            self.fence(format!("checkpoint failed: {e}"));
        }
        result
    }

    /// Syncs `to_sync` (trimming sealed ones first), then, if a roll is pending, the folder
    /// and the recovery point (the base of the last segment of `segments`). Returns whether
    /// any segment had data to sync. A failed recovery-point write is logged and retried by
    /// the next checkpoint: the older point on disk stays valid, so nothing is at risk.
    fn checkpoint_segments(
        &self,
        to_sync: &[Arc<Segment>],
        segments: &[Arc<Segment>],
    ) -> Result<bool> {
        let mut synced = false;
        for segment in to_sync {
            if segment.needs_sync() {
                segment.sync()?;
                synced = true;
            }
        }
        let inner = &*self.inner;
        let _lock = inner.checkpoint_lock.lock();
        if inner.checkpoint_due.swap(false, Ordering::AcqRel) {
            if let Err(e) = fsync_dir(&inner.dir) {
                inner.checkpoint_due.store(true, Ordering::Release);
                return Err(e);
            }
            let point = segments.last().map_or(0, |s| s.base_offset());
            if let Err(e) = recovery::write_recovery_point(&inner.dir, point) {
                inner.checkpoint_due.store(true, Ordering::Release);
                tracing::warn!(
                    topic = %inner.id.topic, partition = inner.id.partition, error = %e,
                    "cannot move the recovery point; a crash recovery would scan more"
                );
            }
            // The producers' snapshot moves with the recovery point, so a recovery replays
            // only the batches after it. A failed write leaves the older snapshot, which is
            // still right (recovery replays more). A replicated partition's is written by
            // its Raft snapshots instead, synced first (`checkpoint_producers`): one written
            // here, past the synced records, could replace it with one a power loss voids.
            let written = if self.entry_clock() {
                Ok(())
            } else {
                self.snapshot_producers()
            };
            if let Err(e) = written {
                tracing::warn!(
                    topic = %inner.id.topic, partition = inner.id.partition, error = %e,
                    "cannot write the producer snapshot; a recovery would replay more"
                );
            }
        }
        Ok(synced)
    }

    /// True when [`PartitionLog::run_background`] has work: an `interval` flush is due and
    /// something is unsynced, or a roll awaits its checkpoint; and no earlier run is still
    /// going. Cheap (atomic loads), never blocks: a caller may ask on an async worker.
    pub fn background_due(&self) -> bool {
        let inner = &*self.inner;
        !inner.background_busy.load(Ordering::Acquire)
            && (inner.checkpoint_due.load(Ordering::Acquire) || self.interval_flush_due())
    }

    fn interval_flush_due(&self) -> bool {
        let inner = &*self.inner;
        let crate::config::FlushPolicy::IntervalMs(interval_ms) = inner.options.flush else {
            return false;
        };
        let now_ms = inner.opened_at.elapsed().as_millis() as u64;
        self.high_watermark() > inner.durable_offset.load(Ordering::Acquire)
            && now_ms.saturating_sub(inner.last_flush_ms.load(Ordering::Acquire)) >= interval_ms
    }

    /// The background half of the flush policy: with `interval:MS`, syncs the partition when
    /// MS have passed since the last such sync started and something is unsynced; in any
    /// case, checkpoints after a roll. Blocking; runs one at a time per partition (a second
    /// call meanwhile returns at once). Failures fence the partition (and are logged) as for
    /// any sync.
    pub fn run_background(&self) -> Result<()> {
        let inner = &*self.inner;
        if inner.background_busy.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let result = if self.interval_flush_due() {
            let now_ms = inner.opened_at.elapsed().as_millis() as u64;
            inner.last_flush_ms.store(now_ms, Ordering::Release);
            self.flush()
        } else {
            self.checkpoint()
        };
        inner.background_busy.store(false, Ordering::Release);
        result
    }

    pub(super) fn fence(&self, reason: String) {
        tracing::error!(
            topic = %self.inner.id.topic, partition = self.inner.id.partition, %reason,
            "partition fenced: it refuses writes until restarted"
        );
        let mut slot = self.inner.fence_reason.lock();
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.inner.fenced.store(true, Ordering::Release);
    }

    /// Closes the partition cleanly: refuses appends from now on, syncs everything, writes the
    /// recovery point and then the clean-shutdown marker, so the next open validates nothing.
    /// A fenced partition gets no marker (its next open scans). Idempotent; appends fail with
    /// [`StorageError::Closed`] afterwards. Blocking; the writer lock is held only to mark the
    /// partition closed.
    pub fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        {
            let _w = inner.writer.lock();
            if inner.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
        }
        // No append runs from here on: every writer checks `closed` under the lock.
        if let Some(spare) = inner.spare.lock().take() {
            spare.discard();
        }
        self.drop_retired();
        if self.fenced_reason().is_some() {
            return Ok(());
        }
        // Sync everything and move the recovery point to the active segment, then write the
        // marker: the next open trusts the marker, and a later crash scans only the active
        // segment.
        inner.checkpoint_due.store(true, Ordering::Release);
        self.flush()?;
        self.checkpoint()?;
        let _m = inner.marker_lock.lock();
        let active = self.active();
        recovery::write_clean_marker(&inner.dir, &active, self.high_watermark())?;
        inner.marker_present.store(true, Ordering::Release);
        Ok(())
    }
}
