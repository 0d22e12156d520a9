//! Adopting another replica's idempotent-producer state after a restart of the log.
//!
//! A log restarted at a later offset ([`PartitionLog::restart_at`]) lost the batches its
//! producers' state was built from. It copies another replica's batches from that offset on
//! ([`PartitionLog::append_copy`]), which tells it only of the producers of those batches: a
//! producer whose last batches all lie below the restart offset is unknown here, so its retry
//! of such a batch would be appended again and its next batch refused as a sequence gap. So
//! the replica also copies the source's state:
//!
//! - the source reads its state and its high watermark `S` together, under its writer lock
//!   ([`PartitionLog::producer_snapshot`], in the producer snapshot's encoding), so the state
//!   covers exactly the batches below `S`;
//! - the replica pulls the batches up to `S`, then installs the state as of `S`
//!   ([`PartitionLog::restore_producers`]), replaying on it the headers of any batch it holds
//!   past `S`.
//!
//! The adopted state **replaces** the one the copies built: the source's state as of `S`
//! covers every batch below `S`, the copies among them (they are the source's own batches).
//!
//! Durability: the restart writes `producer-state-missing` (see `storage/FORMAT.md`), so a
//! log that lost its state says so across a crash until a state is adopted
//! ([`PartitionLog::producer_state_missing`]). The adoption syncs the log, writes the state
//! as `producer-base` (the state as of `S`), rewrites the producer snapshot from it, and only
//! then deletes `producer-state-missing`. An open starts from whichever of the snapshot and
//! `producer-base` covers more: `producer-base` describes synced batches only, so it stays
//! usable when a crash leaves the newer snapshot past the end of the recovered log.

use std::sync::atomic::Ordering;

use super::PartitionLog;
use crate::error::{Result, StorageError};
use crate::fsutil::fsync_dir;
use crate::producers::{self, ProducerStates, MISSING_FILE};
use crate::recovery::RESTART_MARKER_FILE;

impl PartitionLog {
    /// The idempotent producers' state and the high watermark it covers up to, read together
    /// under the writer lock: the state's bytes in the producer snapshot's encoding
    /// (`storage/FORMAT.md`, which holds the offset too) and that offset. Expired producers
    /// are not dropped here (the adopting replica sweeps them). `None` when
    /// this log's state is incomplete ([`PartitionLog::producer_state_missing`]): it must not
    /// be passed on as whole. Never blocks on I/O.
    pub fn producer_snapshot(&self) -> Option<(Vec<u8>, u64)> {
        let inner = &*self.inner;
        let (states, offset) = {
            let _w = inner.writer.lock();
            if inner.producers_missing.load(Ordering::Acquire) {
                return None;
            }
            (inner.producers.lock().clone(), self.high_watermark())
        };
        Some((states.encode_snapshot(offset), offset))
    }

    /// Records, durably, that this log's producer state is not whole
    /// ([`PartitionLog::producer_state_missing`]) until it adopts another replica's: a log of
    /// entry clocks does so before it takes a batch copied from another replica, whose
    /// entry's clock it cannot know. Blocking.
    pub(crate) fn mark_producers_missing(&self) -> Result<()> {
        producers::write_missing_marker(&self.inner.dir)?;
        self.inner.producers_missing.store(true, Ordering::Release);
        Ok(())
    }

    /// Adopts another replica's producer state, `snapshot` (from its
    /// [`PartitionLog::producer_snapshot`]), as this log's state as of the snapshot's offset
    /// `S`, which must lie within `[log start, high watermark]`
    /// ([`StorageError::OffsetOutOfRange`] otherwise): the batches below `S` here must be the
    /// source's. The headers of the batches held past `S` are replayed on it; the result
    /// replaces the state the copied batches built. Durable before it returns (see the module
    /// notes), and it clears [`PartitionLog::producer_state_missing`]. Returns `S`.
    ///
    /// Bytes that fail their checks are [`StorageError::InvalidProducerState`] and change
    /// nothing. The caller must be the log's only writer meanwhile (a replica's apply).
    /// Blocking: reads headers, syncs, writes two small files.
    pub fn restore_producers(&self, snapshot: &[u8]) -> Result<u64> {
        let inner = &*self.inner;
        let (adopted, offset) = ProducerStates::decode_snapshot(snapshot).ok_or_else(|| {
            StorageError::InvalidProducerState {
                topic: inner.id.topic.clone(),
                partition: inner.id.partition,
                reason: "it fails its checks (magic, version, length or CRC)",
            }
        })?;
        // Retention and restarts cut the segment list: not while a state is matched to it.
        let _pass = inner.retention_lock.lock();
        self.check_writable()?;
        let (log_start, end) = (self.log_start_offset(), self.high_watermark());
        if offset < log_start || offset > end {
            return Err(self.out_of_range(offset, log_start, end));
        }
        // A restart whose old files are not all deleted yet is completed by the next open,
        // which deletes the producer files with them: finish it before writing any.
        let marker = inner.dir.join(RESTART_MARKER_FILE);
        let unfinished = marker
            .try_exists()
            .map_err(|e| StorageError::io("look for the restart marker", &marker, e))?;
        if unfinished {
            self.remove_restarted(&[])?;
        }
        // The batches below the state's offset first: a state on disk always describes
        // batches that survive a power loss.
        self.sync_through(end)?;
        producers::write_base(&inner.dir, &adopted, offset)?;
        // The batches past `S` count their timestamps alone in a log of entry clocks (their
        // clocks are in entries this replica no longer replays), this broker's clock else.
        let local = self.local_clock();
        let now = local.map_or(i64::MIN, |clock| clock.now_ms);
        let mut states = adopted;
        let (mut from, mut to) = (offset, end);
        loop {
            // Reads outside the writer lock; an append meanwhile (there should be none) is
            // replayed by the next round.
            self.replay_producers(&mut states, from, to, now)?;
            let _w = inner.writer.lock();
            let high_watermark = self.high_watermark();
            if high_watermark == to {
                Self::sweep_producers(&mut states, local);
                *inner.producers.lock() = states;
                inner.producers_from.store(offset, Ordering::Release);
                break;
            }
            (from, to) = (to, high_watermark);
        }
        // The snapshot may hold the copies' state as of an offset past `S`, which an open
        // would prefer: it is rewritten from the adopted state before the marker goes.
        self.snapshot_producers()?;
        producers::remove_file(&inner.dir, MISSING_FILE)?;
        fsync_dir(&inner.dir)?;
        inner.producers_missing.store(false, Ordering::Release);
        tracing::info!(
            topic = %inner.id.topic, partition = inner.id.partition, offset,
            producers = self.inner.producers.lock().len(),
            "adopted another replica's idempotent-producer state"
        );
        Ok(offset)
    }
}

#[cfg(test)]
mod tests;
