//! Retention: deleting whole sealed segments from the front of the log.
//!
//! A pass swaps the segment list under the writer lock (an in-memory change) and does its file
//! work afterwards, without it: unlinking the files, oldest first, and syncing the folder. A
//! segment whose files could not be deleted stays in a list of retired segments and is retried
//! by the next pass. A retired segment is also kept until no reader holds it, and then dropped
//! by a pass: the last close of an unlinked file frees its blocks, which is disk work that
//! must not fall to whichever async worker happens to drop the last reference.

use std::sync::Arc;

use super::{PartitionLog, RetentionOutcome};
use crate::error::Result;
use crate::fsutil::fsync_dir;
use crate::segment::Segment;

/// A segment cut from the log by retention.
#[derive(Debug)]
pub(super) struct Retired {
    segment: Arc<Segment>,
    /// Its files are deleted.
    removed: bool,
}

impl Retired {
    /// A segment cut from the list whose files are still to be deleted.
    pub(super) fn new(segment: Arc<Segment>) -> Self {
        Retired {
            segment,
            removed: false,
        }
    }
}

impl PartitionLog {
    /// Deletes sealed segments from the front: those whose newest record is older than the
    /// retention time, then the oldest while the partition holds more than the retention size.
    /// The active segment is never deleted. Blocking; the writer lock is held only to swap the
    /// segment list. A failure to delete a file is returned (and retried by the next pass); it
    /// does not fence the partition, and the log start offset has moved regardless.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        self.cut_front(|segments| self.retention_cut(segments, now_ms))
    }

    /// Deletes the sealed segments that end at or before `offset` (every record they hold
    /// is below it), oldest first; the active segment is never deleted. A compacting owner
    /// of the log (the groups topic, after writing a snapshot at `offset`) uses this to drop
    /// what the snapshot replaces. Nothing is deleted when the first segment reaches past
    /// `offset`. Blocking, with the same locking and failure rules as
    /// [`PartitionLog::apply_retention`].
    pub fn delete_segments_before(&self, offset: u64) -> Result<RetentionOutcome> {
        self.cut_front(|segments| {
            let sealed = segments.len().saturating_sub(1);
            segments[..sealed]
                .iter()
                .take_while(|s| s.next_offset() <= offset)
                .count()
        })
    }

    /// Cuts the first `count(segments)` segments from the log under the writer lock, then
    /// deletes their files (and any earlier pass's leftovers) without it.
    fn cut_front(&self, count: impl FnOnce(&[Arc<Segment>]) -> usize) -> Result<RetentionOutcome> {
        let inner = &*self.inner;
        let _pass = inner.retention_lock.lock();
        let (cut, log_start_offset) = {
            let _w = inner.writer.lock();
            let segments = inner.segments.load_full();
            let n = count(&segments);
            if n > 0 {
                inner.segments.store(Arc::new(segments[n..].to_vec()));
            }
            let start = segments.get(n).map_or(0, |s| s.base_offset());
            (segments[..n].to_vec(), start)
        };
        let mut outcome = RetentionOutcome {
            log_start_offset,
            ..RetentionOutcome::default()
        };
        if !cut.is_empty() {
            tracing::info!(
                topic = %inner.id.topic, partition = inner.id.partition,
                segments = cut.len(), log_start_offset, "retention cut segments"
            );
        }
        inner
            .retired
            .lock()
            .extend(cut.into_iter().map(Retired::new));
        let (deleted_segments, deleted_bytes) = self.remove_retired_files()?;
        outcome.deleted_segments = deleted_segments;
        outcome.deleted_bytes = deleted_bytes;
        Ok(outcome)
    }

    /// Deletes the files of the retired segments not yet deleted, oldest first, stopping at
    /// the first failure, then syncs the folder; drops the retired segments no reader holds.
    /// Returns how many segments and bytes were deleted. Called with the retention lock held.
    pub(super) fn remove_retired_files(&self) -> Result<(u32, u64)> {
        let inner = &*self.inner;
        let mut retired = inner.retired.lock();
        let mut deleted = (0u32, 0u64);
        // Oldest first (earlier passes' leftovers are older than this pass's cut), stopping at
        // the first failure, so that what remains on disk is always a suffix of the log.
        let mut error = None;
        let mut removed_any = false;
        for r in retired.iter_mut().filter(|r| !r.removed) {
            if let Err(e) = r.segment.remove_files() {
                tracing::warn!(
                    topic = %inner.id.topic, partition = inner.id.partition, error = %e,
                    "retention could not delete a segment; the next pass retries"
                );
                error = Some(e);
                break;
            }
            r.removed = true;
            removed_any = true;
            deleted.0 += 1;
            deleted.1 += r.segment.size_bytes();
        }
        if removed_any {
            if let Err(e) = fsync_dir(&inner.dir) {
                // The deletions may come back after a power loss; retention deletes them again.
                error.get_or_insert(e);
            }
        }
        retired.retain(|r| !r.removed || r.segment.is_shared());
        match error {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// How many segments from the front retention cuts.
    fn retention_cut(&self, segments: &[Arc<Segment>], now_ms: i64) -> usize {
        let options = &self.inner.options;
        let sealed = segments.len().saturating_sub(1);
        let mut cut = 0;
        if let Some(retention_ms) = options.retention_ms {
            let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
            while cut < sealed
                && segments[cut]
                    .max_timestamp_ms()
                    .is_none_or(|max| max < cutoff)
            {
                cut += 1;
            }
        }
        if let Some(limit) = options.retention_bytes {
            let mut total: u64 = segments[cut..].iter().map(|s| s.size_bytes()).sum();
            while cut < sealed && total > limit {
                total -= segments[cut].size_bytes();
                cut += 1;
            }
        }
        cut
    }

    /// Drops every retired segment (at close: whoever still holds one keeps it alive).
    pub(super) fn drop_retired(&self) {
        self.inner.retired.lock().clear();
    }
}
