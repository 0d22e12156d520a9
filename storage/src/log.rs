//! [`PartitionLog`]: one partition's ordered segments, and everything done to them.
//!
//! - **Appends** (the `append` submodule) are serialized by the writer lock, a plain lock
//!   held only for in-memory work and one `pwrite` into the page cache. The file work an append
//!   may need (removing the clean-shutdown marker, growing the file, creating the next segment)
//!   runs outside that lock, and [`PartitionLog::try_append`] tells an async caller whether
//!   an append can be done at once or needs a blocking thread.
//! - **Reads** take no lock: an atomic load of the high watermark and an `Arc` clone of the
//!   segment list, then zero-copy [`Bytes`] of whole batches. [`PartitionLog::is_hot`] tells
//!   whether a read touches only pages this process wrote or read already.
//! - **Durability** (the `durability` submodule): the flush policy is enforced here, by
//!   [`PartitionLog::settle`] (an append waits for a sync when its ack or the policy asks) and
//!   by [`PartitionLog::run_background`] (the periodic flush and checkpoints, which a caller
//!   drives). [`PartitionLog::sync_through`] is a group commit: one sync serves every caller
//!   waiting on it. A failed sync fences the partition: appends fail from then on, reads
//!   still work.
//! - **Retention** (the `retention` submodule) deletes whole sealed segments from the front; the log start offset is the
//!   first remaining segment's base offset, so it persists with the files themselves.
//! - **Restart** (the `restart` submodule) empties the log and starts it at a later offset,
//!   committed by one marker file, for a replica whose missing records are gone everywhere;
//!   the `adopt` submodule then installs another replica's idempotent-producer state, which
//!   the deleted records held.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::batch::BatchHeader;
use crate::config::{FlushPolicy, TopicConfig};
use crate::error::{Result, StorageError};
use crate::fsutil;
use crate::producers::{self, ProducerClock, ProducerStates};
use crate::recovery::{self, RecoveryReport};
use crate::segment::{LogId, Segment, Spare};

mod adopt;
mod append;
mod durability;
mod inject;
mod restart;
mod retention;
mod staged;

pub use append::{Ack, CheckedBatch, Unsettled};
pub use durability::FLUSH_TICK_MS;
pub use staged::StagedBatch;

/// The default largest batch a partition accepts, in bytes (16 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;

/// The largest batch a partition accepts: the engine's limit `max_batch_bytes`, and no more
/// than one segment of `segment_bytes` holds (a batch never spans segments). A larger batch is
/// refused with [`StorageError::BatchTooLarge`] before anything is written.
pub fn effective_max_batch_bytes(max_batch_bytes: usize, segment_bytes: u64) -> usize {
    max_batch_bytes.min(usize::try_from(segment_bytes).unwrap_or(usize::MAX))
}

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
    /// The largest batch accepted, in bytes. Default [`DEFAULT_MAX_BATCH_BYTES`]; the
    /// partition also refuses batches larger than a segment (see
    /// [`LogOptions::effective_max_batch_bytes`]).
    pub max_batch_bytes: usize,
    /// An idempotent producer's state in this partition is dropped this many milliseconds
    /// after its newest batch's timestamp. Default
    /// [`crate::producers::DEFAULT_PRODUCER_EXPIRY_MS`] (7 days).
    pub producer_expiry_ms: u64,
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
            producer_expiry_ms: crate::producers::DEFAULT_PRODUCER_EXPIRY_MS,
        }
    }

    /// Sets how long an idle producer's state is kept, in ms (default 7 days).
    pub fn producer_expiry_ms(mut self, producer_expiry_ms: u64) -> Self {
        self.producer_expiry_ms = producer_expiry_ms;
        self
    }

    /// Sets the largest batch accepted, in bytes (default 16 MiB).
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// The largest batch the partition accepts, in bytes: the smaller of
    /// [`LogOptions::max_batch_bytes`] and the segment size.
    pub fn effective_max_batch_bytes(&self) -> usize {
        effective_max_batch_bytes(self.max_batch_bytes, self.segment_bytes)
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
    /// Serializes appends, rolls, the segment-list swap of retention, and the start of close.
    /// Held only for in-memory work, one `pwrite` and (in a roll) three renames: never across
    /// an fsync, an unlink or a file creation, and never across an await (this crate has none).
    writer: Mutex<()>,
    /// Set (under the writer lock) by close: appends fail from then on.
    closed: AtomicBool,
    /// The clean-shutdown marker is on disk: it must go, durably, before the first write, or
    /// a crash after that write would look like a clean shutdown.
    marker_present: AtomicBool,
    /// Serializes the marker's removal (by the first append, off the writer lock) with its
    /// writing (by close).
    marker_lock: Mutex<()>,
    /// The next segment's files, created ahead of a roll without the writer lock.
    spare: Mutex<Option<Spare>>,
    /// Group commit state; `sync_done` wakes the callers waiting on a sync in progress.
    sync: Mutex<SyncState>,
    sync_done: Condvar,
    /// A copy of `SyncState::durable_offset`, for lock-free checks.
    durable_offset: AtomicU64,
    /// Syncs that wrote appended data to stable storage (for tests and metrics).
    syncs: AtomicU64,
    fenced: AtomicBool,
    fence_reason: Mutex<Option<String>>,
    /// A roll happened since the last checkpoint: the folder (a new file) and the sealed
    /// segment still need syncing before the recovery point may move past it.
    checkpoint_due: AtomicBool,
    /// Serializes checkpoints (folder fsync and recovery-point write), which both the group
    /// commit and the background checkpoint may run.
    checkpoint_lock: Mutex<()>,
    /// When this handle was opened: the clock of `last_flush_ms`.
    opened_at: Instant,
    /// When the last `interval` flush started, in ms since `opened_at`.
    last_flush_ms: AtomicU64,
    /// A [`PartitionLog::run_background`] is running.
    background_busy: AtomicBool,
    /// Serializes retention passes (never taken by appends).
    retention_lock: Mutex<()>,
    /// Segments cut by retention whose files are not yet deleted or which a reader may still
    /// hold (see the `retention` module).
    retired: Mutex<Vec<retention::Retired>>,
    report: RecoveryReport,
    faults: inject::Faults,
    /// Idempotent producers' sequences and offsets. Changed only under the writer lock, with
    /// the append it describes, so a check and its append are one step.
    producers: Mutex<ProducerStates>,
    /// The log was restarted at a later offset and has not adopted another replica's producer
    /// state since (the `producer-state-missing` file is on disk): `producers` knows only the
    /// producers of the batches appended since the restart.
    producers_missing: AtomicBool,
    /// Producer expiry goes by the clock each append brings (a replicated partition's
    /// entries), never by this broker's (the `producer-clock-entries` file is on disk).
    entry_clock: AtomicBool,
    /// The offset the producer state's last rebuild replayed the log from: the state holds
    /// the appends below it with their clocks, and those from it with their timestamps only
    /// until [`PartitionLog::replay_entry`] brings their clocks.
    producers_from: AtomicU64,
    /// Batches written past the high watermark and not yet published (see the `staged`
    /// module).
    staging: Mutex<staged::Staging>,
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
    /// validates nothing; after a crash it recovers (see [`crate::recovery`]). Blocking.
    pub fn open(dir: &Path, options: LogOptions) -> Result<Self> {
        let id = Arc::new(LogId {
            topic: options.topic.clone(),
            partition: options.partition,
        });
        let opened = recovery::open_segments(&id, dir, options.segment_bytes, now_ms())?;
        // After `open_segments`, which writes the file when it completes a restart.
        let missing_path = dir.join(producers::MISSING_FILE);
        let producers_missing = missing_path.try_exists().map_err(|e| {
            StorageError::io(
                "look for the producer-state-missing marker",
                &missing_path,
                e,
            )
        })?;
        let clock_path = dir.join(producers::ENTRY_CLOCK_FILE);
        let entry_clock = clock_path.try_exists().map_err(|e| {
            StorageError::io("look for the producer-clock-entries marker", &clock_path, e)
        })?;
        let high_watermark = opened.segments.last().map_or(0, |s| s.next_offset());
        let durable_offset = if opened.report.clean {
            high_watermark
        } else {
            0
        };
        let log = PartitionLog {
            inner: Arc::new(Inner {
                id,
                dir: dir.to_path_buf(),
                options,
                segments: ArcSwap::from_pointee(opened.segments),
                high_watermark: AtomicU64::new(high_watermark),
                writer: Mutex::new(()),
                closed: AtomicBool::new(false),
                marker_present: AtomicBool::new(opened.report.clean),
                marker_lock: Mutex::new(()),
                spare: Mutex::new(None),
                sync: Mutex::new(SyncState {
                    durable_offset,
                    in_progress: false,
                }),
                sync_done: Condvar::new(),
                durable_offset: AtomicU64::new(durable_offset),
                syncs: AtomicU64::new(0),
                fenced: AtomicBool::new(false),
                fence_reason: Mutex::new(None),
                checkpoint_due: AtomicBool::new(false),
                checkpoint_lock: Mutex::new(()),
                opened_at: Instant::now(),
                last_flush_ms: AtomicU64::new(0),
                background_busy: AtomicBool::new(false),
                retention_lock: Mutex::new(()),
                retired: Mutex::new(Vec::new()),
                report: opened.report,
                faults: inject::Faults::default(),
                producers: Mutex::new(ProducerStates::default()),
                producers_missing: AtomicBool::new(producers_missing),
                entry_clock: AtomicBool::new(entry_clock),
                producers_from: AtomicU64::new(0),
                staging: Mutex::new(staged::Staging::default()),
            }),
        };
        log.rebuild_producers()?;
        log.find_staged_candidates();
        Ok(log)
    }

    /// Rebuilds the producers' state from the snapshot or the adopted state (`producer-base`,
    /// see [`PartitionLog::restore_producers`]), whichever covers more, and the batches after
    /// it (all of the log when neither is usable). Reads headers only. Blocking; run at open.
    fn rebuild_producers(&self) -> Result<()> {
        let inner = &*self.inner;
        let high_watermark = self.high_watermark();
        // A file past the log's end describes batches a crash cut: unusable. The adopted
        // state is written only once the records below its offset are synced, so it stays
        // usable when a crash makes the newer snapshot unusable.
        let usable = |file: Option<(ProducerStates, u64)>| {
            file.filter(|(_, offset)| *offset <= high_watermark)
        };
        let snapshot = usable(producers::read_snapshot(&inner.dir));
        let base = usable(producers::read_base(&inner.dir));
        let start = match (snapshot, base) {
            (Some(s), Some(b)) => Some(if b.1 > s.1 { b } else { s }),
            (s, b) => s.or(b),
        };
        let (mut states, mut offset) = start.unwrap_or((ProducerStates::default(), 0));
        offset = offset.max(self.log_start_offset());
        // In a log of entry clocks the replayed batches' clocks are in the entries the
        // replica replays next (`replay_entry`), not here: their timestamps alone until then.
        let local = self.local_clock();
        let replayed_at = local.map_or(i64::MIN, |clock| clock.now_ms);
        self.replay_producers(&mut states, offset, high_watermark, replayed_at)?;
        Self::sweep_producers(&mut states, local);
        *inner.producers.lock() = states;
        inner.producers_from.store(offset, Ordering::Release);
        Ok(())
    }

    /// Whether producer expiry goes by the clock the appends bring (see
    /// [`PartitionLog::use_entry_clock`]).
    pub fn entry_clock(&self) -> bool {
        self.inner.entry_clock.load(Ordering::Acquire)
    }

    /// This broker's producer clock now, in a log whose expiry goes by it; `None` in a log of
    /// entry clocks, which never reads this broker's.
    fn local_clock(&self) -> Option<ProducerClock> {
        (!self.entry_clock())
            .then(|| ProducerClock::at(now_ms(), self.inner.options.producer_expiry_ms))
    }

    /// Drops the expired producers of `states`: those before its cutoff, moved first to
    /// `local` (this broker's clock, [`PartitionLog::local_clock`]) when given.
    fn sweep_producers(states: &mut ProducerStates, local: Option<ProducerClock>) {
        if let Some(clock) = local {
            states.advance(clock);
        }
        states.sweep();
    }

    /// Makes producer expiry in this partition go by the clock each append brings
    /// ([`crate::producers::ProducerClock`]) instead of this broker's wall clock, for good:
    /// a replicated partition's apply, which runs on every replica at different times, calls
    /// it before its first apply. Writes the `producer-clock-entries` file (durably) the
    /// first time, and rebuilds the producer state as such a log's open does. Blocking.
    pub fn use_entry_clock(&self) -> Result<()> {
        if self.entry_clock() {
            return Ok(());
        }
        let inner = &*self.inner;
        fsutil::atomic_write(&inner.dir.join(producers::ENTRY_CLOCK_FILE), &[])?;
        inner.entry_clock.store(true, Ordering::Release);
        self.rebuild_producers()
    }

    /// A replicated partition's replay of an entry applied before a restart, whose outcome
    /// the log holds already (`header`'s batch appended at `base_offset`, or nothing for
    /// `None`): the state's clock moves to the entry's `clock`, and a batch the rebuild at
    /// open replayed without its clock counts as active at it. The state then equals the one
    /// the first apply left. Never blocks on I/O.
    pub fn replay_entry(
        &self,
        header: &BatchHeader,
        base_offset: Option<u64>,
        clock: Option<ProducerClock>,
    ) {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let mut states = inner.producers.lock();
        if let Some(clock) = clock {
            states.advance(clock);
        }
        if base_offset.is_some_and(|b| b >= inner.producers_from.load(Ordering::Acquire)) {
            states.touch(header);
        }
    }

    /// Writes the producer snapshot as of the high watermark `S`, after syncing the records
    /// below `S`, and returns `S`: a replicated partition's Raft snapshot calls it, so that
    /// the snapshot file always covers the entries the Raft log no longer holds (their
    /// clocks are gone with them). Blocking.
    pub fn checkpoint_producers(&self) -> Result<u64> {
        let (states, offset) = self.producers_as_of_end();
        self.sync_through(offset)?;
        producers::write_snapshot(&self.inner.dir, &states, offset)?;
        Ok(offset)
    }

    /// The producer state, expired producers dropped, and the high watermark it covers up
    /// to, read together under the writer lock.
    fn producers_as_of_end(&self) -> (ProducerStates, u64) {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let mut states = inner.producers.lock();
        Self::sweep_producers(&mut states, self.local_clock());
        (states.clone(), self.high_watermark())
    }

    /// Applies to `states` the headers of the batches from `offset` to `end`, each counted as
    /// active at `now` (its append time is not in the log). Reads headers only. Blocking.
    fn replay_producers(
        &self,
        states: &mut ProducerStates,
        mut offset: u64,
        end: u64,
        now: i64,
    ) -> Result<()> {
        while offset < end {
            let read = self.read(offset, 1 << 20)?;
            if read.next_offset <= offset {
                break;
            }
            for chunk in &read.chunks {
                for view in crate::batch::batches(chunk) {
                    let Ok(view) = view else { break };
                    let header = view.header();
                    if header.next_offset() > offset && header.base_offset < end {
                        // The batch's append time is not in the log: count the producer
                        // as active now, which keeps it longer rather than expiring it
                        // early (a producer backfilling old timestamps).
                        states.apply_at(header, header.base_offset, now);
                    }
                }
            }
            offset = read.next_offset;
        }
        Ok(())
    }

    /// Writes the producer snapshot as of the high watermark, dropping expired producers
    /// first. Blocking; called by checkpoints and close.
    pub(crate) fn snapshot_producers(&self) -> Result<()> {
        let (states, offset) = self.producers_as_of_end();
        producers::write_snapshot(&self.inner.dir, &states, offset)
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

    /// The epoch and next expected sequence of idempotent producer `producer_id` in this
    /// partition, as its appended batches leave it ([`ProducerStates::next_sequence`]).
    pub fn producer_next_sequence(&self, producer_id: i64) -> Option<(i16, i32)> {
        self.inner.producers.lock().next_sequence(producer_id)
    }

    /// True when the log was restarted at a later offset ([`PartitionLog::restart_at`]) and
    /// has not adopted another replica's producer state since
    /// ([`PartitionLog::restore_producers`]): its idempotent producers' state then knows only
    /// the producers of the batches appended after the restart. Survives a reopen.
    pub fn producer_state_missing(&self) -> bool {
        self.inner.producers_missing.load(Ordering::Acquire)
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

    fn active(&self) -> Arc<Segment> {
        let segments = self.inner.segments.load();
        match segments.last() {
            Some(s) => Arc::clone(s),
            // The open path always leaves at least one segment, and nothing removes the last.
            None => unreachable!("a partition log always has an active segment"),
        }
    }

    /// True when a read from `offset` of up to `max_bytes` touches only batches this process
    /// appended or has read (and checked) before, so it checks no checksum and its pages were
    /// in memory a moment ago: an async caller may read inline. False when it would check
    /// batches found on disk at open (their first read), which are likely not in memory
    /// either: read those on a blocking thread. Memory pressure can still evict a hot page,
    /// so this is a good guess, not a promise. Never blocks.
    pub fn is_hot(&self, offset: u64, max_bytes: usize) -> bool {
        let segments = self.inner.segments.load();
        let first = segments
            .partition_point(|s| s.base_offset() <= offset)
            .saturating_sub(1);
        let Some(start) = segments.get(first) else {
            return false;
        };
        if !start.is_hot(offset) {
            return false;
        }
        // The read may run on into later segments: they must be hot from their start, as far
        // as `max_bytes` can reach (counting none of the first segment's bytes, to be safe).
        let mut covered = 0u64;
        for segment in &segments[first + 1..] {
            if covered >= max_bytes as u64 {
                break;
            }
            if !segment.is_hot(segment.base_offset()) {
                return false;
            }
            covered += segment.size_bytes();
        }
        true
    }

    /// Reads whole batches from `offset` up to about `max_bytes` (at least one batch when any
    /// exists). An offset equal to the high watermark returns nothing; one outside
    /// `[log_start, high_watermark]` is [`StorageError::OffsetOutOfRange`]. A batch that fails
    /// its checksum is [`StorageError::DataLoss`], never served. May block on page-ins (see
    /// [`PartitionLog::is_hot`]).
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
    /// every retained record is older. May block on page-ins and first-read checks.
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
}

#[cfg(test)]
mod tests;
