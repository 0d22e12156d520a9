//! One segment: a log file named by its base offset, with its offset and time indexes.
//!
//! The active segment's file grows by preallocated chunks (real blocks, see
//! [`crate::fsutil::preallocate`]), so a full disk is an error before anything is written. An
//! append is one `pwrite` into the page cache; readers see the bytes through one read-only
//! mapping of `segment_bytes`, zero-copy. Appends publish the new length with a release store;
//! readers load it and only ever read below it, so they never see part of a batch. Published
//! bytes are never rewritten, so a [`Bytes`] a reader holds stays valid.
//!
//! The file work a segment needs is kept apart from the append itself, so that the partition
//! can run it without its writer lock and off the async workers: a new segment's files are
//! created ahead as a [`Spare`] under temporary names and only renamed by the roll; growing
//! the file ([`Segment::grow_for`]) runs beside appends; sealing only marks the segment, and
//! trimming the files to their length is left to the next [`Segment::sync`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::batch::{self, BatchError, BatchHeader, BatchView};
use crate::error::{Result, StorageError};
use crate::fsutil::preallocate;
use crate::index::{OffsetEntry, OffsetIndex, TimeEntry, TimeIndex, INDEX_INTERVAL_BYTES};
use crate::region::Region;

mod open;
mod staged;

pub use open::Spare;
pub use staged::{StagedAt, STAGED_MAGIC};

/// The active segment's file grows by this many bytes at a time (or less, up to the segment
/// size). Small enough that a topic with many partitions does not reserve gigabytes up front.
pub const PREALLOCATE_CHUNK_BYTES: u64 = 16 << 20;
/// Batches up to this size are appended with one pwrite of a stamped copy (on the stack);
/// larger ones with two (the stamped header, then the rest in place).
const ONE_WRITE_BATCH_BYTES: usize = 4096;

/// Which partition a segment belongs to, for error messages and logs.
#[derive(Debug)]
pub struct LogId {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

/// The file names of segment `base_offset`: Kafka's 20-digit zero-padded naming.
pub fn file_names(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf, PathBuf) {
    let stem = format!("{base_offset:020}");
    (
        dir.join(format!("{stem}.log")),
        dir.join(format!("{stem}.index")),
        dir.join(format!("{stem}.timeindex")),
    )
}

/// Writer-side state, behind the segment's own (uncontended) lock.
#[derive(Debug)]
struct WriteState {
    /// Bytes of the file that are allocated (the file's size).
    allocated_bytes: u64,
    /// The most bytes this segment may hold; 0 once sealed.
    capacity_bytes: u64,
    /// Log bytes appended since the last index entry.
    bytes_since_index: u64,
    /// Published bytes already synced.
    synced_bytes: u64,
    /// Sealed, and the files are not yet trimmed to their length: the next sync trims them
    /// and makes the trim durable.
    trim_pending: bool,
}

/// Whether the active segment can take a batch of a given size right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// The batch fits in the file's allocated blocks: the append is one `pwrite`.
    Ready,
    /// The batch fits in the segment, but the file must grow first ([`Segment::grow_for`]).
    Grow,
    /// The batch does not fit (or the segment is sealed): the partition must roll.
    Full,
}

/// A batch found by walking a segment.
#[derive(Debug, Clone, Copy)]
struct Located {
    position: u64,
    header: BatchHeader,
}

/// What a read from one segment returned: whole batches.
#[derive(Debug, Clone)]
pub struct SegmentRead {
    /// Zero-copy bytes of consecutive whole batches.
    pub bytes: Bytes,
    /// The offset after the last batch returned.
    pub next_offset: u64,
}

/// One segment of a partition log.
#[derive(Debug)]
pub struct Segment {
    id: Arc<LogId>,
    base_offset: u64,
    log_path: PathBuf,
    file: File,
    region: Arc<Region>,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    /// Published length in bytes: readers read only below it; bytes below it never change.
    committed_bytes: AtomicU64,
    /// The offset after the last published batch.
    next_offset: AtomicU64,
    /// The largest record timestamp published (`i64::MIN` when empty).
    max_timestamp_ms: AtomicI64,
    /// Bytes `[0, verified)` passed their checksum since open.
    verified_bytes: AtomicU64,
    /// Bytes the file held when it was opened. Bytes from here on were appended by this
    /// process, which checked each batch on the way in; bytes below it are checked on their
    /// first read (see [`Segment::verify`]).
    opened_bytes: u64,
    /// Every batch from this offset on was appended by this process or has passed its
    /// checksum since open: reading it checks nothing and touches pages this process wrote or
    /// read (see [`Segment::is_hot`]).
    hot_from_offset: AtomicU64,
    /// Serializes growing the file with trimming it; both run without the partition's
    /// writer lock.
    grow_lock: Mutex<()>,
    /// When the segment was created or last opened, in ms since the epoch, for rolls by age
    /// (0 for a sealed segment, which never rolls).
    created_ms: i64,
    write: Mutex<WriteState>,
}

impl Segment {
    /// This segment's base offset (the offset of its first record).
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.log_path
    }

    /// Published bytes.
    pub fn size_bytes(&self) -> u64 {
        self.committed_bytes.load(Ordering::Acquire)
    }

    /// The offset after the last published batch.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// The largest published record timestamp, `None` when empty.
    pub fn max_timestamp_ms(&self) -> Option<i64> {
        let ts = self.max_timestamp_ms.load(Ordering::Acquire);
        (ts != i64::MIN).then_some(ts)
    }

    /// Entries in the offset index and the time index (for the clean-shutdown marker).
    pub fn index_entries(&self) -> (usize, usize) {
        (self.offset_index.len(), self.time_index.len())
    }

    /// When the segment was created or last opened, in ms since the epoch.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Whether a batch of `len` bytes fits in this segment without exceeding its size (a
    /// batch never spans segments). False once sealed.
    pub fn fits(&self, len: u64) -> bool {
        self.room(len) != Room::Full
    }

    /// The most bytes this segment may hold (its size when it was created or opened); 0 once
    /// sealed.
    pub fn capacity_bytes(&self) -> u64 {
        self.write.lock().capacity_bytes
    }

    /// Whether a batch of `len` bytes can be appended now, needs the file to grow first, or
    /// needs a new segment.
    pub fn room(&self, len: u64) -> Room {
        self.room_at(self.committed_bytes.load(Ordering::Relaxed), len)
    }

    /// Grows the file by a preallocated chunk (at least enough for a batch of `len` bytes
    /// after the published ones), unless it already has the room or is sealed. Runs without
    /// the partition's writer lock: appends that fit go on meanwhile. On a full disk nothing
    /// changes and the error is [`StorageError::NoSpace`].
    pub fn grow_for(&self, len: u64) -> Result<()> {
        self.grow_at(self.committed_bytes.load(Ordering::Acquire), len)
    }

    /// [`Segment::grow_for`] for a batch of `len` bytes at byte position `pos` (at or past
    /// the published length: after staged batches).
    pub fn grow_at(&self, pos: u64, len: u64) -> Result<()> {
        let _grow = self.grow_lock.lock();
        let (from, target) = {
            let w = self.write.lock();
            let end = pos.max(self.committed_bytes.load(Ordering::Acquire)) + len;
            let limit = w.capacity_bytes.min(self.region.len() as u64);
            if w.capacity_bytes == 0 || end <= w.allocated_bytes || end > limit {
                // Sealed, grown by someone else, or too big: the caller looks again.
                return Ok(());
            }
            let target = (w.allocated_bytes + PREALLOCATE_CHUNK_BYTES)
                .max(end)
                .min(limit);
            (w.allocated_bytes, target)
        };
        // Past the allocated end, so no append writes there meanwhile; a trim waits on
        // `grow_lock`, so a sealed file is never grown again after its trim.
        preallocate(&self.file, from, target - from)
            .map_err(|e| no_space_or_io(&self.id, &self.log_path, "grow segment", e))?;
        let mut w = self.write.lock();
        w.allocated_bytes = w.allocated_bytes.max(target);
        Ok(())
    }

    /// Appends `batch` (already validated) at the published length with base offset
    /// `base_offset`. The batch must fit in the allocated blocks ([`Room::Ready`]); otherwise
    /// nothing is written and the error is [`StorageError::BatchTooLarge`] (the caller grows
    /// or rolls first, under the writer lock, so this does not happen). A failed write is
    /// [`StorageError::NoSpace`] on a full disk and [`StorageError::Io`] otherwise.
    pub fn append(&self, batch: &[u8], base_offset: u64, header: &BatchHeader) -> Result<()> {
        let mut w = self.write.lock();
        let pos = self.committed_bytes.load(Ordering::Relaxed);
        let len = batch.len() as u64;
        let end = pos + len;
        self.write_stamped(&w, pos, batch, "write segment", |head| {
            batch::stamp_base_offset(head, base_offset)
        })?;
        let mut stamped = *header;
        stamped.base_offset = base_offset;
        self.note_batch(&mut w, pos, len, &stamped);
        // The batch was validated on the way in and lies past `opened_bytes`: reads do not
        // check it again.
        self.publish(end, stamped.next_offset(), 0);
        Ok(())
    }

    /// The refusal of a batch of `size_bytes` that does not fit the allocated blocks at byte
    /// position `pos`.
    fn too_large(&self, w: &WriteState, pos: u64, size_bytes: usize) -> StorageError {
        StorageError::BatchTooLarge {
            topic: self.id.topic.clone(),
            partition: self.id.partition,
            size_bytes,
            max_bytes: usize::try_from(w.allocated_bytes.saturating_sub(pos)).unwrap_or(usize::MAX),
        }
    }

    /// Writes `batch` at byte position `pos` with its header changed by `stamp` (the base
    /// offset; a staged batch's magic too), when it fits the allocated blocks; else nothing
    /// is written and the error is [`StorageError::BatchTooLarge`]. Called with the write
    /// state locked. Write with pwrite, not through the mapping: a store into a fresh mapped
    /// page first faults it in, and the kernel zero-fills it (and its read-ahead neighbours)
    /// before the copy, which cost a third of the produce path. pwrite fills whole pages
    /// directly. Readers see the bytes through the same page cache once the length is
    /// published.
    fn write_stamped(
        &self,
        w: &WriteState,
        pos: u64,
        batch: &[u8],
        op: &'static str,
        stamp: impl Fn(&mut [u8]),
    ) -> Result<()> {
        let end = pos + batch.len() as u64;
        if w.capacity_bytes == 0 || end > w.allocated_bytes || end > self.region.len() as u64 {
            return Err(self.too_large(w, pos, batch.len()));
        }
        let written = if batch.len() <= ONE_WRITE_BATCH_BYTES {
            // A small batch (a single record, typically) is stamped in a copy and written
            // with one pwrite: a copy of a few KiB costs less than a second system call.
            let mut whole = [0u8; ONE_WRITE_BATCH_BYTES];
            let whole = &mut whole[..batch.len()];
            whole.copy_from_slice(batch);
            stamp(whole);
            self.file.write_all_at(whole, pos)
        } else {
            let mut head = [0u8; batch::HEADER_LEN];
            let head_len = batch.len().min(head.len());
            head[..head_len].copy_from_slice(&batch[..head_len]);
            stamp(&mut head);
            write_two_at(&self.file, &head[..head_len], &batch[head_len..], pos)
        };
        written.map_err(|e| no_space_or_io(&self.id, &self.log_path, op, e))
    }

    /// Index bookkeeping for a batch at `pos`, shared by append, recovery and rebuilds.
    fn note_batch(&self, w: &mut WriteState, pos: u64, len: u64, header: &BatchHeader) {
        let max_ts = self
            .max_timestamp_ms
            .load(Ordering::Relaxed)
            .max(header.max_timestamp);
        self.max_timestamp_ms.store(max_ts, Ordering::Release);
        if w.bytes_since_index >= INDEX_INTERVAL_BYTES {
            let relative_offset = (header.base_offset - self.base_offset) as u32;
            let position = pos as u32;
            self.offset_index.push(OffsetEntry {
                relative_offset,
                position,
            });
            self.time_index.push(TimeEntry {
                max_timestamp_ms: max_ts,
                relative_offset,
                position,
            });
            w.bytes_since_index = 0;
        }
        w.bytes_since_index += len;
    }

    /// Publishes a new length and next offset (release), so readers can see the bytes.
    fn publish(&self, committed: u64, next_offset: u64, verified: u64) {
        if verified > 0 {
            self.verified_bytes.fetch_max(verified, Ordering::AcqRel);
        }
        self.next_offset.store(next_offset, Ordering::Release);
        self.committed_bytes.store(committed, Ordering::Release);
    }

    /// Recomputes the next offset and max timestamp of an opened segment from its indexes and
    /// the batches after the last index entry.
    fn load_tail_state(&self) -> Result<()> {
        let committed = self.size_bytes();
        let start = self
            .offset_index
            .len()
            .checked_sub(1)
            .map_or(0, |i| u64::from(self.offset_index.get(i).position));
        let mut max_ts = self
            .time_index
            .last()
            .map_or(i64::MIN, |e| e.max_timestamp_ms);
        let mut next = self.base_offset;
        let mut pos = start;
        while pos < committed {
            let loc = self.header_at(pos, committed, (pos == 0).then_some(self.base_offset))?;
            max_ts = max_ts.max(loc.header.max_timestamp);
            next = loc.header.next_offset();
            pos += loc.header.total_len() as u64;
        }
        self.max_timestamp_ms.store(max_ts, Ordering::Release);
        self.next_offset.store(next, Ordering::Release);
        self.note_opened_end(next);
        Ok(())
    }

    /// Batches found on disk at open are unchecked until read: only offsets from `next` (the
    /// end of what was found) on are hot, until the first reads have checked the rest.
    fn note_opened_end(&self, next: u64) {
        if self.opened_bytes > 0 && self.verified_bytes.load(Ordering::Acquire) < self.opened_bytes
        {
            self.hot_from_offset.store(next, Ordering::Release);
        }
    }

    /// Rebuilds a sealed segment's indexes by walking its batch headers, then seals them.
    fn rebuild_indexes(&self) -> Result<()> {
        let committed = self.size_bytes();
        let mut w = self.write.lock();
        let mut pos = 0;
        let mut next = self.base_offset;
        while pos < committed {
            let loc = self.header_at(pos, committed, (pos == 0).then_some(self.base_offset))?;
            let len = loc.header.total_len() as u64;
            self.note_batch(&mut w, pos, len, &loc.header);
            next = loc.header.next_offset();
            pos += len;
        }
        drop(w);
        self.push_final_time_entry();
        self.offset_index.seal();
        self.time_index.seal();
        self.write.lock().trim_pending = true;
        self.next_offset.store(next, Ordering::Release);
        self.note_opened_end(next);
        Ok(())
    }

    /// Makes the time index's last entry carry the segment's max timestamp, so a reopen knows
    /// it without reading the log.
    fn push_final_time_entry(&self) {
        let Some(max_ts) = self.max_timestamp_ms() else {
            return;
        };
        let committed = self.size_bytes();
        if self
            .time_index
            .last()
            .is_some_and(|e| e.max_timestamp_ms >= max_ts)
        {
            return;
        }
        // Point at the last batch: find it from the last offset-index entry.
        let mut pos = self
            .offset_index
            .len()
            .checked_sub(1)
            .map_or(0, |i| u64::from(self.offset_index.get(i).position));
        let mut last = None;
        while pos < committed {
            let Ok(loc) = self.header_at(pos, committed, None) else {
                return;
            };
            pos += loc.header.total_len() as u64;
            last = Some(loc);
        }
        if let Some(loc) = last {
            if self
                .time_index
                .last()
                .is_some_and(|e| u64::from(e.position) >= loc.position)
            {
                return;
            }
            self.time_index.push(TimeEntry {
                max_timestamp_ms: max_ts,
                relative_offset: (loc.header.base_offset - self.base_offset) as u32,
                position: loc.position as u32,
            });
        }
    }

    /// True when published bytes, index entries or a seal's trim are not yet synced.
    pub fn needs_sync(&self) -> bool {
        let w = self.write.lock();
        w.trim_pending || w.synced_bytes < self.size_bytes()
    }

    /// Syncs the published bytes and the indexes to stable storage (fdatasync, which covers
    /// pages written by pwrite or through a mapping, and the file size). A sealed segment's
    /// files are first trimmed to their length, and the trim is synced with them.
    pub fn sync(&self) -> Result<()> {
        // Read under the lock together: once `trim_pending` is set the segment is sealed, so
        // `committed` is final and the trim cuts nothing published.
        let (committed, from, trim) = {
            let w = self.write.lock();
            (self.size_bytes(), w.synced_bytes, w.trim_pending)
        };
        if committed <= from && !trim {
            return Ok(());
        }
        if trim {
            let _grow = self.grow_lock.lock();
            self.file
                .set_len(committed)
                .map_err(|e| StorageError::io("trim segment", &self.log_path, e))?;
            self.write.lock().allocated_bytes = committed;
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("sync segment", &self.log_path, e))?;
        self.offset_index.sync()?;
        self.time_index.sync()?;
        let mut w = self.write.lock();
        w.synced_bytes = w.synced_bytes.max(committed);
        if trim {
            w.trim_pending = false;
        }
        Ok(())
    }

    /// Seals the segment: no append is accepted afterwards, and the time index gets a final
    /// entry carrying the segment's max timestamp. Touches no file, so a roll never waits on
    /// the file system: trimming the files to their length and syncing them is left to the
    /// next [`Segment::sync`] (group commit, the periodic flush or a checkpoint), and
    /// [`Segment::needs_sync`] stays true until then. Called with the partition's writer lock
    /// held, so no append runs meanwhile.
    pub fn seal(&self) {
        {
            let mut w = self.write.lock();
            if w.capacity_bytes == 0 {
                return;
            }
            w.capacity_bytes = 0;
        }
        self.push_final_time_entry();
        self.offset_index.seal();
        self.time_index.seal();
        // Last, so that a sync that saw it also sees the indexes sealed (and trims them).
        self.write.lock().trim_pending = true;
    }

    /// True when a read from `offset` checks no checksum and touches only batches this
    /// process appended or has read (and checked) before. A sign that the pages
    /// are in the page cache, not a promise: memory pressure can still evict them.
    pub fn is_hot(&self, offset: u64) -> bool {
        offset >= self.hot_from_offset.load(Ordering::Acquire)
    }

    /// True while a reader holds bytes of this segment's mapping (or the segment itself is
    /// shared), so that dropping it now would not be the last reference.
    pub fn is_shared(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) > 1 || Arc::strong_count(&self.region) > 1
    }

    /// Reads whole batches starting with the one that contains `offset`, up to `max_bytes`
    /// (at least one batch, however large). `None` when `offset` is past this segment.
    ///
    /// Batches at or past `end_offset` (the high watermark the caller loaded) are left out:
    /// a segment publishes a batch an instant before the partition's high watermark moves,
    /// and a read must never hand out offsets its own high watermark does not cover.
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        end_offset: u64,
    ) -> Result<Option<SegmentRead>> {
        let committed = self.size_bytes();
        let Some(first) = self.locate(offset, committed)? else {
            return Ok(None);
        };
        if first.header.base_offset >= end_offset {
            return Ok(None);
        }
        let mut end = first.position;
        let mut next_offset = first.header.base_offset;
        let limit = first.position.saturating_add(max_bytes as u64);
        let mut loc = first;
        loop {
            let len = loc.header.total_len() as u64;
            if end > first.position && end + len > limit {
                break;
            }
            if let Err(source) = self.verify(loc.position, len) {
                if end == first.position {
                    return Err(self.data_loss(
                        loc.header.base_offset.max(offset),
                        loc.position,
                        source,
                    ));
                }
                break;
            }
            end += len;
            next_offset = loc.header.next_offset();
            if end >= committed || next_offset >= end_offset {
                break;
            }
            loc = match self.header_at(end, committed, Some(next_offset)) {
                Ok(l) => l,
                // A damaged header after good batches: serve those, the next read reports it.
                Err(_) => break,
            };
        }
        // SAFETY: `[first.position, end)` is below the published length loaded above.
        let bytes = unsafe { self.region.bytes(first.position as usize, end as usize) };
        Ok(Some(SegmentRead { bytes, next_offset }))
    }

    /// Finds the first offset in this segment whose record timestamp is at or after
    /// `timestamp_ms`.
    pub fn find_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let committed = self.size_bytes();
        let mut pos = self.time_index.lookup(timestamp_ms, committed);
        let mut expected = None;
        while pos < committed {
            let loc = self.header_at(pos, committed, expected)?;
            let len = loc.header.total_len() as u64;
            if loc.header.max_timestamp >= timestamp_ms {
                self.verify(pos, len)
                    .map_err(|e| self.data_loss(loc.header.base_offset, pos, e))?;
                // SAFETY: below the published length.
                let data = unsafe { self.region.slice(pos as usize, (pos + len) as usize) };
                let plain = batch::decompress(data, batch::MAX_DECOMPRESSED_BATCH_BYTES)
                    .map_err(|e| self.data_loss(loc.header.base_offset, pos, e))?;
                let view = BatchView::parse(&plain)
                    .map_err(|e| self.data_loss(loc.header.base_offset, pos, e))?;
                for record in view.records() {
                    let record =
                        record.map_err(|e| self.data_loss(loc.header.base_offset, pos, e))?;
                    if record.timestamp_ms >= timestamp_ms {
                        return Ok(Some(record.offset));
                    }
                }
            }
            expected = Some(loc.header.next_offset());
            pos += len;
        }
        Ok(None)
    }

    /// Finds the batch containing `offset`, walking from the nearest index entry.
    fn locate(&self, offset: u64, committed: u64) -> Result<Option<Located>> {
        if offset < self.base_offset || committed == 0 {
            return Ok(None);
        }
        let relative = u32::try_from(offset - self.base_offset).unwrap_or(u32::MAX);
        let mut pos = self.offset_index.lookup(relative, committed);
        let mut expected = None;
        while pos < committed {
            let loc = self.header_at(pos, committed, expected)?;
            if loc.header.next_offset() > offset {
                return Ok(Some(loc));
            }
            expected = Some(loc.header.next_offset());
            pos += loc.header.total_len() as u64;
        }
        Ok(None)
    }

    /// Parses the batch header at `pos`; the batch must lie wholly below `committed` and, when
    /// `expected` is given, start at that offset. Anything else is damage.
    fn header_at(&self, pos: u64, committed: u64, expected: Option<u64>) -> Result<Located> {
        // SAFETY: `[pos, committed)` is below the published length.
        let data = unsafe { self.region.slice(pos as usize, committed as usize) };
        let header = BatchHeader::parse(data)
            .map_err(|e| self.data_loss(expected.unwrap_or(self.base_offset), pos, e))?;
        if header.total_len() as u64 > committed - pos {
            return Err(self.data_loss(
                header.base_offset,
                pos,
                BatchError::Truncated {
                    needed: header.total_len(),
                    available: (committed - pos) as usize,
                },
            ));
        }
        if let Some(expected) = expected {
            if header.base_offset != expected {
                return Err(self.data_loss(expected, pos, BatchError::BadLength));
            }
        }
        Ok(Located {
            position: pos,
            header,
        })
    }

    /// Checks the checksum of the batch at `[pos, pos + len)` unless it was checked before:
    /// batches appended by this process were checked on the way in, and batches found on disk
    /// at open are checked on their first read only. Damage that happens to a batch after
    /// that (on disk or in memory) is not caught by later reads.
    fn verify(&self, pos: u64, len: u64) -> std::result::Result<(), BatchError> {
        let end = pos + len;
        if pos >= self.opened_bytes || end <= self.verified_bytes.load(Ordering::Acquire) {
            return Ok(());
        }
        // SAFETY: callers pass a batch below the published length.
        let data = unsafe { self.region.slice(pos as usize, end as usize) };
        batch::verify_crc(data)?;
        // Extend the verified prefix only when this batch continues it.
        let extended = self
            .verified_bytes
            .compare_exchange(pos, end, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if extended && end >= self.opened_bytes {
            self.hot_from_offset
                .store(self.base_offset, Ordering::Release);
        }
        Ok(())
    }

    fn data_loss(&self, offset: u64, position: u64, source: BatchError) -> StorageError {
        StorageError::DataLoss {
            topic: self.id.topic.clone(),
            partition: self.id.partition,
            offset,
            segment: self.log_path.clone(),
            position,
            source,
        }
    }

    /// Deletes the segment's files (the mapping lives on while readers hold bytes of it).
    pub fn remove_files(&self) -> Result<()> {
        let dir = self.log_path.parent().unwrap_or(Path::new("."));
        let (log, index, time) = file_names(dir, self.base_offset);
        for p in [log, index, time] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("delete segment file", &p, e)),
            }
        }
        Ok(())
    }
}

/// Turns a failed allocation into [`StorageError::NoSpace`] when the disk is full.
/// Writes `head` then `body` at `pos`, in one `pwritev` when the kernel takes them whole (a
/// batch's stamped header and its records, without joining them in a copy or paying a second
/// system call); whatever a short write left is finished with plain positioned writes.
fn write_two_at(file: &File, head: &[u8], body: &[u8], pos: u64) -> std::io::Result<()> {
    use std::io::IoSlice;
    let written = loop {
        match rustix::io::pwritev(file, &[IoSlice::new(head), IoSlice::new(body)], pos) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if written < head.len() {
        file.write_all_at(&head[written..], pos + written as u64)?;
        file.write_all_at(body, pos + head.len() as u64)
    } else {
        let done = written - head.len();
        file.write_all_at(&body[done..], pos + written as u64)
    }
}

fn no_space_or_io(id: &LogId, path: &Path, op: &'static str, e: std::io::Error) -> StorageError {
    if crate::error::is_no_space(&e) {
        StorageError::NoSpace {
            topic: id.topic.clone(),
            partition: id.partition,
            path: path.to_path_buf(),
            source: e,
        }
    } else {
        StorageError::io(op, path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_and_a_body_land_back_to_back_at_the_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("open");
        file.write_all_at(&[9u8; 10], 0).expect("prefix");
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        write_two_at(&file, b"HEAD", &body, 10).expect("written");
        let mut back = vec![0u8; 10 + 4 + body.len()];
        file.read_exact_at(&mut back, 0).expect("read back");
        assert_eq!(&back[..10], &[9u8; 10]);
        assert_eq!(&back[10..14], b"HEAD");
        assert_eq!(&back[14..], &body[..]);
    }
}
