//! [`PartitionLog`]: one partition's ordered segments, and everything done to them.
//!
//! - **Appends** are serialized by the writer lock (a plain lock: nothing awaits while it is
//!   held, and appends are short copies into the page cache). The engine assigns offsets,
//!   writes the batch into the active segment with one `pwrite`, updates the indexes, and
//!   publishes the new length and high watermark with release stores.
//! - **Reads** take no lock: an atomic load of the high watermark and an `Arc` clone of the
//!   segment list, then zero-copy [`Bytes`] of whole batches.
//! - **Durability**: [`PartitionLog::sync_through`] is a group commit: one sync serves every
//!   caller waiting on it. A failed sync fences the partition: appends fail from then on,
//!   reads still work.
//! - **Retention** deletes whole sealed segments from the front; the log start offset is the
//!   first remaining segment's base offset, so it persists with the files themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::batch::{BatchError, BatchView};
use crate::config::{FlushPolicy, TopicConfig};
use crate::error::{Result, StorageError};
use crate::fsutil::fsync_dir;
use crate::recovery::{self, RecoveryReport};
use crate::segment::{LogId, Segment};

/// The default largest batch a partition accepts, in bytes (16 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;

/// How a partition log is run: the topic's config plus engine limits.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// The topic, for errors and logs.
    pub topic: String,
    /// The partition number, for errors and logs.
    pub partition: u32,
    /// Roll when the active segment would exceed this many bytes.
    pub segment_bytes: u64,
    /// Roll when the active segment is older than this many milliseconds.
    pub segment_ms: u64,
    /// Delete sealed segments whose newest record is older than this (ms); `None` = forever.
    pub retention_ms: Option<u64>,
    /// Keep at most this many bytes (sealed segments are deleted oldest first); `None` = no limit.
    pub retention_bytes: Option<u64>,
    /// When appends are synced.
    pub flush: FlushPolicy,
    /// The largest batch accepted, in bytes. Default [`DEFAULT_MAX_BATCH_BYTES`].
    pub max_batch_bytes: usize,
}

impl LogOptions {
    /// Options for partition `partition` of `topic` with its config and default limits.
    pub fn new(topic: &str, partition: u32, config: &TopicConfig) -> Self {
        LogOptions {
            topic: topic.to_string(),
            partition,
            segment_bytes: config.segment_bytes,
            segment_ms: config.segment_ms,
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            flush: config.flush,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }

    /// Sets the largest batch accepted, in bytes (default 16 MiB).
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// The offset given to the batch's first record.
    pub base_offset: u64,
    /// The offset given to its last record.
    pub last_offset: u64,
    /// The high watermark after the append: the offset the next record will get.
    pub next_offset: u64,
    /// How many records the batch held.
    pub record_count: u32,
}

/// What a read returned.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    /// Zero-copy bytes of whole, consecutive batches (one chunk per segment touched). The first
    /// batch may start before the offset asked for: the caller skips the earlier records.
    pub chunks: Vec<Bytes>,
    /// The offset after the last batch returned (the offset asked for when nothing was).
    pub next_offset: u64,
    /// The first offset still retained.
    pub log_start_offset: u64,
    /// The offset the next append will get.
    pub high_watermark: u64,
}

impl ReadResult {
    /// Total bytes returned.
    pub fn size_bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }
}

/// Figures describing a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStats {
    /// The first offset still retained.
    pub log_start_offset: u64,
    /// The offset the next append will get.
    pub high_watermark: u64,
    /// Bytes of log held, over all segments.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: u32,
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub deleted_segments: u32,
    /// Bytes of log deleted.
    pub deleted_bytes: u64,
    /// The log start offset afterwards.
    pub log_start_offset: u64,
}

/// One partition's log. Cheap to clone: a handle around shared state.
#[derive(Debug, Clone)]
pub struct PartitionLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: Arc<LogId>,
    dir: PathBuf,
    options: LogOptions,
    /// The segments in offset order; the last is the active one. Replaced whole on roll and
    /// retention, so readers need only an atomic load.
    segments: ArcSwap<Vec<Arc<Segment>>>,
    high_watermark: AtomicU64,
    /// Serializes appends, rolls, retention and close. Never held across an await (this crate
    /// has none) nor across a group-commit sync, which uses `sync` below instead.
    writer: Mutex<WriterState>,
    /// Group commit state; `sync_done` wakes the callers waiting on a sync in progress.
    sync: Mutex<SyncState>,
    sync_done: Condvar,
    fenced: AtomicBool,
    fence_reason: Mutex<Option<String>>,
    /// A roll happened since the last checkpoint: the folder (a new file) and the sealed
    /// segment still need syncing before the recovery point may move past it.
    checkpoint_due: AtomicBool,
    /// Serializes checkpoints (folder fsync and recovery-point write), which both the group
    /// commit and the background checkpoint may run.
    checkpoint_lock: Mutex<()>,
    report: RecoveryReport,
    #[cfg(test)]
    fail_next_sync: AtomicBool,
}

#[derive(Debug)]
struct WriterState {
    /// The clean-shutdown marker is still on disk; it must go before the first write, or a
    /// crash after that write would look like a clean shutdown.
    clean_marker_present: bool,
    closed: bool,
}

#[derive(Debug)]
struct SyncState {
    /// Every offset below this is on stable storage.
    durable_offset: u64,
    in_progress: bool,
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl PartitionLog {
    /// Opens the partition in `dir`, creating it when empty. After a clean shutdown this
    /// validates nothing; after a crash it recovers (see [`crate::recovery`]).
    pub fn open(dir: &Path, options: LogOptions) -> Result<Self> {
        let id = Arc::new(LogId {
            topic: options.topic.clone(),
            partition: options.partition,
        });
        let opened = recovery::open_segments(&id, dir, options.segment_bytes, now_ms())?;
        let high_watermark = opened.segments.last().map_or(0, |s| s.next_offset());
        Ok(PartitionLog {
            inner: Arc::new(Inner {
                id,
                dir: dir.to_path_buf(),
                options,
                segments: ArcSwap::from_pointee(opened.segments),
                high_watermark: AtomicU64::new(high_watermark),
                writer: Mutex::new(WriterState {
                    clean_marker_present: opened.report.clean,
                    closed: false,
                }),
                sync: Mutex::new(SyncState {
                    durable_offset: if opened.report.clean {
                        high_watermark
                    } else {
                        0
                    },
                    in_progress: false,
                }),
                sync_done: Condvar::new(),
                fenced: AtomicBool::new(false),
                fence_reason: Mutex::new(None),
                checkpoint_due: AtomicBool::new(false),
                checkpoint_lock: Mutex::new(()),
                report: opened.report,
                #[cfg(test)]
                fail_next_sync: AtomicBool::new(false),
            }),
        })
    }

    /// The topic this partition belongs to.
    pub fn topic(&self) -> &str {
        &self.inner.id.topic
    }

    /// The partition number.
    pub fn partition(&self) -> u32 {
        self.inner.id.partition
    }

    /// The partition's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The options the log runs with.
    pub fn options(&self) -> &LogOptions {
        &self.inner.options
    }

    /// What opening the partition found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// The offset the next append will get.
    pub fn high_watermark(&self) -> u64 {
        self.inner.high_watermark.load(Ordering::Acquire)
    }

    /// The first offset still retained.
    pub fn log_start_offset(&self) -> u64 {
        self.inner
            .segments
            .load()
            .first()
            .map_or(0, |s| s.base_offset())
    }

    /// Why the partition refuses writes, if it does.
    pub fn fenced_reason(&self) -> Option<String> {
        if self.inner.fenced.load(Ordering::Acquire) {
            self.inner.fence_reason.lock().clone()
        } else {
            None
        }
    }

    /// Figures for describing the partition.
    pub fn stats(&self) -> PartitionStats {
        let segments = self.inner.segments.load();
        PartitionStats {
            log_start_offset: segments.first().map_or(0, |s| s.base_offset()),
            high_watermark: self.high_watermark(),
            size_bytes: segments.iter().map(|s| s.size_bytes()).sum(),
            segments: u32::try_from(segments.len()).unwrap_or(u32::MAX),
        }
    }

    /// Appends one encoded batch (see `storage/FORMAT.md`), assigning its offsets. The batch
    /// is checked first (length, checksum, structure); a bad one changes nothing. The data is
    /// in the page cache on return; call [`PartitionLog::sync_through`] for durability.
    pub fn append(&self, batch: &[u8]) -> Result<AppendInfo> {
        let inner = &*self.inner;
        if batch.len() > inner.options.max_batch_bytes {
            return Err(StorageError::BatchTooLarge {
                topic: inner.id.topic.clone(),
                partition: inner.id.partition,
                size_bytes: batch.len(),
                max_bytes: inner.options.max_batch_bytes,
            });
        }
        let invalid = |source| StorageError::InvalidBatch {
            topic: inner.id.topic.clone(),
            partition: inner.id.partition,
            source,
        };
        let view = BatchView::parse(batch).map_err(invalid)?;
        view.validate().map_err(invalid)?;
        let header = *view.header();
        if header.total_len() != batch.len() {
            return Err(invalid(BatchError::BadLength));
        }

        let mut w = inner.writer.lock();
        self.check_writable(&w)?;
        if w.clean_marker_present {
            recovery::remove_clean_marker(&inner.dir)?;
            w.clean_marker_present = false;
        }
        let now = now_ms();
        let mut active = self.active();
        let age_ms = now.saturating_sub(active.created_ms());
        let too_old = active.size_bytes() > 0
            && u64::try_from(age_ms).is_ok_and(|age| age >= inner.options.segment_ms);
        if !active.fits(batch.len() as u64) || too_old {
            active = self.roll(now)?;
        }
        let base_offset = inner.high_watermark.load(Ordering::Relaxed);
        if let Err(e) = active.append(batch, base_offset, &header) {
            // A full disk refuses this append and nothing else; any other write failure
            // means the disk can no longer be trusted with this partition.
            if !e.is_no_space() {
                self.fence(format!("write failed: {e}"));
            }
            return Err(e);
        }
        let next_offset = base_offset + u64::from(header.record_count);
        inner.high_watermark.store(next_offset, Ordering::Release);
        Ok(AppendInfo {
            base_offset,
            last_offset: next_offset - 1,
            next_offset,
            record_count: header.record_count,
        })
    }

    fn check_writable(&self, w: &WriterState) -> Result<()> {
        if w.closed {
            return Err(StorageError::Closed);
        }
        if let Some(reason) = self.fenced_reason() {
            return Err(StorageError::Fenced {
                topic: self.inner.id.topic.clone(),
                partition: self.inner.id.partition,
                reason,
            });
        }
        Ok(())
    }

    fn active(&self) -> Arc<Segment> {
        let segments = self.inner.segments.load();
        match segments.last() {
            Some(s) => Arc::clone(s),
            // The open path always leaves at least one segment, and nothing removes the last.
            None => unreachable!("a partition log always has an active segment"),
        }
    }

    /// Seals the active segment and starts a new one at the high watermark. Called with the
    /// writer lock held. Nothing is synced here: the sealed segment, the new file's folder
    /// entry and the recovery point are made durable by the next sync or checkpoint.
    fn roll(&self, now: i64) -> Result<Arc<Segment>> {
        let inner = &*self.inner;
        let old = self.active();
        if let Err(e) = old.seal() {
            self.fence(format!("sealing segment {:?} failed: {e}", old.path()));
            return Err(e);
        }
        let base = inner.high_watermark.load(Ordering::Relaxed);
        let segment = Arc::new(Segment::create(
            Arc::clone(&inner.id),
            &inner.dir,
            base,
            inner.options.segment_bytes,
            now,
        )?);
        let mut list = Vec::clone(&inner.segments.load());
        list.push(Arc::clone(&segment));
        inner.segments.store(Arc::new(list));
        inner.checkpoint_due.store(true, Ordering::Release);
        Ok(segment)
    }

    /// Makes sealed segments durable and moves the recovery point up to the active segment,
    /// so a crash recovery scans only that one. Cheap when no roll happened since the last
    /// checkpoint. The broker calls this periodically for every partition; syncs of the
    /// active segment are left to the flush policy.
    pub fn checkpoint(&self) -> Result<()> {
        if !self.inner.checkpoint_due.load(Ordering::Acquire) {
            return Ok(());
        }
        let segments = self.inner.segments.load_full();
        let sealed = &segments[..segments.len().saturating_sub(1)];
        let result = self.checkpoint_segments(sealed, &segments);
        if let Err(e) = &result {
            self.fence(format!("checkpoint failed: {e}"));
        }
        result
    }

    /// Syncs `to_sync`, then, if a roll is pending, the folder and the recovery point (the
    /// base of the last segment of `segments`).
    fn checkpoint_segments(
        &self,
        to_sync: &[Arc<Segment>],
        segments: &[Arc<Segment>],
    ) -> Result<()> {
        for segment in to_sync {
            if segment.needs_sync() {
                segment.sync()?;
            }
        }
        let _lock = self.inner.checkpoint_lock.lock();
        if self.inner.checkpoint_due.swap(false, Ordering::AcqRel) {
            let done = fsync_dir(&self.inner.dir).and_then(|()| {
                let point = segments.last().map_or(0, |s| s.base_offset());
                recovery::write_recovery_point(&self.inner.dir, point)
            });
            if let Err(e) = done {
                self.inner.checkpoint_due.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Returns once every offset below `end_offset` is on stable storage. Group commit: if a
    /// sync is already running, wait for it and check again; otherwise run one that covers
    /// everything appended so far, serving every caller waiting meanwhile.
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
            let result = self.sync_now();
            state = inner.sync.lock();
            state.in_progress = false;
            match result {
                Ok(synced) => state.durable_offset = state.durable_offset.max(synced),
                Err(e) => {
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

    /// Syncs every segment with unsynced data (the active one, and any sealed since the last
    /// sync), then the folder and the recovery point if a roll happened; returns the offset
    /// below which all is durable.
    fn sync_now(&self) -> Result<u64> {
        // Load the watermark first: every batch below it is in a segment of the list loaded
        // next.
        let target = self.high_watermark();
        #[cfg(test)]
        if self.inner.fail_next_sync.swap(false, Ordering::AcqRel) {
            return Err(StorageError::io(
                "sync segment",
                &self.inner.dir,
                std::io::Error::other("injected sync failure"),
            ));
        }
        let segments = self.inner.segments.load_full();
        self.checkpoint_segments(&segments, &segments)?;
        Ok(target)
    }

    fn fence(&self, reason: String) {
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

    /// Reads whole batches from `offset` up to about `max_bytes` (at least one batch when any
    /// exists). An offset equal to the high watermark returns nothing; one outside
    /// `[log_start, high_watermark]` is [`StorageError::OffsetOutOfRange`]. A batch that fails
    /// its checksum is [`StorageError::DataLoss`], never served.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult> {
        let high_watermark = self.high_watermark();
        let segments = self.inner.segments.load();
        let log_start = segments.first().map_or(0, |s| s.base_offset());
        if offset < log_start || offset > high_watermark {
            return Err(self.out_of_range(offset, log_start, high_watermark));
        }
        let mut result = ReadResult {
            chunks: Vec::new(),
            next_offset: offset,
            log_start_offset: log_start,
            high_watermark,
        };
        if offset == high_watermark {
            return Ok(result);
        }
        let first = segments
            .partition_point(|s| s.base_offset() <= offset)
            .saturating_sub(1);
        let mut remaining = max_bytes;
        for segment in &segments[first..] {
            if !result.chunks.is_empty() && remaining == 0 {
                break;
            }
            let read = match segment.read(result.next_offset, remaining, high_watermark) {
                Ok(Some(read)) => read,
                Ok(None) => continue,
                Err(e) if result.chunks.is_empty() => return Err(e),
                // Serve what was good; the next read starts at the damage and reports it.
                Err(_) => break,
            };
            remaining = remaining.saturating_sub(read.bytes.len());
            result.next_offset = read.next_offset;
            result.chunks.push(read.bytes);
            if result.next_offset >= high_watermark {
                break;
            }
        }
        result.high_watermark = self.high_watermark().max(result.next_offset);
        Ok(result)
    }

    fn out_of_range(&self, offset: u64, log_start: u64, high_watermark: u64) -> StorageError {
        StorageError::OffsetOutOfRange {
            topic: self.inner.id.topic.clone(),
            partition: self.inner.id.partition,
            offset,
            log_start,
            high_watermark,
        }
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, or `None` when
    /// every retained record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let segments = self.inner.segments.load();
        for segment in segments.iter() {
            if segment
                .max_timestamp_ms()
                .is_some_and(|max| max >= timestamp_ms)
            {
                if let Some(offset) = segment.find_timestamp(timestamp_ms)? {
                    return Ok(Some(offset));
                }
            }
        }
        Ok(None)
    }

    /// Deletes sealed segments from the front: those whose newest record is older than the
    /// retention time, then the oldest while the partition holds more than the retention size.
    /// The active segment is never deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let segments = inner.segments.load_full();
        let sealed = segments.len().saturating_sub(1);
        let mut cut = 0;
        if let Some(retention_ms) = inner.options.retention_ms {
            let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
            while cut < sealed
                && segments[cut]
                    .max_timestamp_ms()
                    .is_none_or(|max| max < cutoff)
            {
                cut += 1;
            }
        }
        if let Some(limit) = inner.options.retention_bytes {
            let mut total: u64 = segments[cut..].iter().map(|s| s.size_bytes()).sum();
            while cut < sealed && total > limit {
                total -= segments[cut].size_bytes();
                cut += 1;
            }
        }
        let mut outcome = RetentionOutcome {
            log_start_offset: segments.first().map_or(0, |s| s.base_offset()),
            ..RetentionOutcome::default()
        };
        if cut == 0 {
            return Ok(outcome);
        }
        let mut deleted = 0;
        let mut error = None;
        for segment in &segments[..cut] {
            // Oldest first, so what remains on disk is always a suffix of the log.
            if let Err(e) = segment.remove_files() {
                error = Some(e);
                break;
            }
            deleted += 1;
            outcome.deleted_bytes += segment.size_bytes();
        }
        if deleted > 0 {
            let rest = segments[deleted..].to_vec();
            outcome.log_start_offset = rest.first().map_or(0, |s| s.base_offset());
            inner.segments.store(Arc::new(rest));
            outcome.deleted_segments = deleted as u32;
            tracing::info!(
                topic = %inner.id.topic, partition = inner.id.partition,
                segments = deleted, bytes = outcome.deleted_bytes,
                log_start_offset = outcome.log_start_offset, "retention deleted segments"
            );
            fsync_dir(&inner.dir)?;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Deletes the sealed segments that end at or before `offset` (every record they hold
    /// is below it), oldest first; the active segment is never deleted. A compacting owner
    /// of the log (the groups topic, after writing a snapshot at `offset`) uses this to drop
    /// what the snapshot replaces. Returns what was deleted; nothing is deleted when the
    /// first segment reaches past `offset`.
    pub fn delete_segments_before(&self, offset: u64) -> Result<RetentionOutcome> {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let segments = inner.segments.load_full();
        let sealed = segments.len().saturating_sub(1);
        let cut = segments[..sealed]
            .iter()
            .take_while(|s| s.next_offset() <= offset)
            .count();
        let mut outcome = RetentionOutcome {
            log_start_offset: segments.first().map_or(0, |s| s.base_offset()),
            ..RetentionOutcome::default()
        };
        let mut deleted = 0;
        let mut error = None;
        for segment in &segments[..cut] {
            // Oldest first, so what remains on disk is always a suffix of the log.
            if let Err(e) = segment.remove_files() {
                error = Some(e);
                break;
            }
            deleted += 1;
            outcome.deleted_bytes += segment.size_bytes();
        }
        if deleted > 0 {
            let rest = segments[deleted..].to_vec();
            outcome.log_start_offset = rest.first().map_or(0, |s| s.base_offset());
            inner.segments.store(Arc::new(rest));
            outcome.deleted_segments = deleted as u32;
            fsync_dir(&inner.dir)?;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Closes the partition cleanly: syncs it, writes the recovery point and then the
    /// clean-shutdown marker, so the next open validates nothing. A fenced partition gets no
    /// marker (its next open scans). Idempotent; appends fail with [`StorageError::Closed`] afterwards.
    pub fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        let mut w = inner.writer.lock();
        if w.closed {
            return Ok(());
        }
        w.closed = true;
        if self.fenced_reason().is_some() {
            return Ok(());
        }
        // Sync everything and move the recovery point to the active segment, then write the
        // marker: the next open trusts the marker, and a later crash scans only the active
        // segment.
        inner.checkpoint_due.store(true, Ordering::Release);
        self.flush()?;
        self.checkpoint()?;
        let active = self.active();
        recovery::write_clean_marker(&inner.dir, &active, self.high_watermark())?;
        w.clean_marker_present = true;
        Ok(())
    }

    /// Makes the next sync fail, to test fencing.
    #[cfg(test)]
    pub(crate) fn inject_sync_failure(&self) {
        self.inner.fail_next_sync.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
