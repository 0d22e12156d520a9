//! The sparse indexes of a segment, memory-mapped: the offset index and the time index.
//!
//! Both are arrays of fixed-width little-endian entries (see `storage/FORMAT.md`), appended
//! about every [`INDEX_INTERVAL_BYTES`] of log. The active segment's index files are
//! preallocated to their capacity and their entry count lives in memory (and in the
//! clean-shutdown marker); a sealed segment's index files are trimmed to their entries (by
//! the first sync after the seal), so the count is the file length divided by the entry
//! width. The log is the truth: an index that is missing, misshapen or inconsistent is
//! rebuilt from the log.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::error::{Result, StorageError};
use crate::fsutil::preallocate;
use crate::region::Region;

/// An index entry is added when at least this many log bytes follow the previous entry.
pub const INDEX_INTERVAL_BYTES: u64 = 4096;
/// Width of an offset-index entry: `u32` relative offset, `u32` position.
pub const OFFSET_ENTRY_LEN: usize = 8;
/// Width of a time-index entry: `i64` max timestamp so far, `u32` relative offset, `u32` position.
pub const TIME_ENTRY_LEN: usize = 16;

/// How many entries an index of a segment of `segment_bytes` can need.
pub fn capacity_for(segment_bytes: u64) -> usize {
    usize::try_from(segment_bytes / INDEX_INTERVAL_BYTES + 2).unwrap_or(usize::MAX)
}

/// One offset-index entry: the batch starting at `relative_offset` is at byte `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Batch base offset minus the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the segment file.
    pub position: u32,
}

/// One time-index entry: every record up to and including the batch at `position` has a
/// timestamp of at most `max_timestamp_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    /// The largest timestamp seen in the segment up to and including this batch.
    pub max_timestamp_ms: i64,
    /// Base offset of the batch minus the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the segment file.
    pub position: u32,
}

/// A mapped file of fixed-width entries with a published entry count.
#[derive(Debug)]
struct EntryFile {
    path: PathBuf,
    file: File,
    region: Region,
    entry_len: usize,
    /// Entries `[0, len)` are published and never rewritten.
    len: AtomicUsize,
    /// Serializes pushes, the seal and the trim. The partition's writer lock already
    /// serializes pushes and the seal, so this lock is never contended; it exists so that
    /// writing through the shared mapping is safe by construction rather than by a caller's
    /// promise.
    write: Mutex<EntryWrite>,
}

/// Writer-side state of an [`EntryFile`].
#[derive(Debug)]
struct EntryWrite {
    /// Capacity in entries; 0 once sealed or read-only.
    capacity: usize,
    /// Sealed, but the file is not yet trimmed to its entries (the next sync trims it).
    trim_pending: bool,
}

impl EntryFile {
    fn create(path: &Path, entry_len: usize, capacity: usize) -> Result<EntryFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| StorageError::io("create index", path, e))?;
        Self::writable(path, file, entry_len, capacity, 0)
    }

    fn open_writable(path: &Path, entry_len: usize, capacity: usize, len: usize) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io("open index", path, e))?;
        Self::writable(path, file, entry_len, capacity, len)
    }

    fn writable(
        path: &Path,
        file: File,
        entry_len: usize,
        capacity: usize,
        len: usize,
    ) -> Result<EntryFile> {
        let bytes = capacity * entry_len;
        let size = file
            .metadata()
            .map_err(|e| StorageError::io("stat index", path, e))?
            .len();
        if size < bytes as u64 {
            preallocate(&file, size, bytes as u64 - size)
                .map_err(|e| StorageError::io("preallocate index", path, e))?;
        }
        let region = Region::map_writable(&file, bytes)
            .map_err(|e| StorageError::io("map index", path, e))?;
        Ok(EntryFile {
            path: path.to_path_buf(),
            file,
            region,
            entry_len,
            len: AtomicUsize::new(len.min(capacity)),
            write: Mutex::new(EntryWrite {
                capacity,
                trim_pending: false,
            }),
        })
    }

    /// Opens a sealed index; `None` when its size is not a whole number of entries.
    fn open_sealed(path: &Path, entry_len: usize) -> Result<Option<EntryFile>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("open index", path, e)),
        };
        let size = file
            .metadata()
            .map_err(|e| StorageError::io("stat index", path, e))?
            .len();
        let Ok(size) = usize::try_from(size) else {
            return Ok(None);
        };
        if size % entry_len != 0 {
            return Ok(None);
        }
        let region = Region::map_read_only(&file, size)
            .map_err(|e| StorageError::io("map index", path, e))?;
        let len = size / entry_len;
        Ok(Some(EntryFile {
            path: path.to_path_buf(),
            file,
            region,
            entry_len,
            len: AtomicUsize::new(len),
            write: Mutex::new(EntryWrite {
                capacity: 0,
                trim_pending: false,
            }),
        }))
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn entry(&self, i: usize) -> &[u8] {
        let start = i * self.entry_len;
        // SAFETY: callers pass i < len(), a published entry; published entries are never
        // rewritten and lie inside the preallocated (or trimmed) file.
        unsafe { self.region.slice(start, start + self.entry_len) }
    }

    /// Appends one entry; false when the index is full (the entry is just skipped: a sparse
    /// index stays correct with fewer entries).
    fn push(&self, entry: &[u8]) -> bool {
        let w = self.write.lock();
        let len = self.len.load(Ordering::Relaxed);
        if len >= w.capacity {
            return false;
        }
        // SAFETY: the write lock makes this the only writer; the slot is past the published
        // length so no reader reads it; the file was preallocated to `capacity` entries, and
        // a sealed or read-only index has capacity 0 so it is never written.
        unsafe { self.region.write_at(len * self.entry_len, entry) };
        self.len.store(len + 1, Ordering::Release);
        true
    }

    /// Syncs the file: trims a sealed index to its entries first, then syncs the entries
    /// written through the mapping and the trim. fdatasync covers pages dirtied through a
    /// shared mapping as well as by write.
    fn sync(&self) -> Result<()> {
        {
            let mut w = self.write.lock();
            if w.trim_pending {
                let bytes = (self.len() * self.entry_len) as u64;
                self.file
                    .set_len(bytes)
                    .map_err(|e| StorageError::io("trim index", &self.path, e))?;
                w.trim_pending = false;
            }
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("sync index", &self.path, e))
    }

    /// Stops appends. Touches no file: the trim to the entries is left to the next
    /// [`EntryFile::sync`], so sealing (part of a roll, under the partition's writer lock)
    /// never waits on the file system.
    fn seal(&self) {
        let mut w = self.write.lock();
        if w.capacity > 0 {
            w.capacity = 0;
            w.trim_pending = true;
        }
    }

    /// Renames the file (a spare segment's index taking its segment's name).
    fn rename(&mut self, to: &Path) -> Result<()> {
        std::fs::rename(&self.path, to).map_err(|e| StorageError::io("rename index", to, e))?;
        self.path = to.to_path_buf();
        Ok(())
    }
}

/// A fixed-width index entry: how it is laid out on disk and what order entries keep.
pub trait Entry: Copy {
    /// Width in bytes.
    const LEN: usize;
    /// Decodes an entry from exactly [`Entry::LEN`] bytes.
    fn decode(bytes: &[u8]) -> Self;
    /// Encodes the entry into exactly [`Entry::LEN`] bytes.
    fn encode(&self, out: &mut [u8]);
    /// Byte position of the batch the entry points at.
    fn position(&self) -> u32;
    /// Whether this entry may follow `prev` in a sound index.
    fn follows(&self, prev: &Self) -> bool;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Entry for OffsetEntry {
    const LEN: usize = OFFSET_ENTRY_LEN;

    fn decode(b: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: u32_at(b, 0),
            position: u32_at(b, 4),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        out[4..8].copy_from_slice(&self.position.to_le_bytes());
    }

    fn position(&self) -> u32 {
        self.position
    }

    fn follows(&self, prev: &Self) -> bool {
        self.relative_offset > prev.relative_offset && self.position > prev.position
    }
}

impl Entry for TimeEntry {
    const LEN: usize = TIME_ENTRY_LEN;

    fn decode(b: &[u8]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[..8]);
        TimeEntry {
            max_timestamp_ms: i64::from_le_bytes(ts),
            relative_offset: u32_at(b, 8),
            position: u32_at(b, 12),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        out[8..12].copy_from_slice(&self.relative_offset.to_le_bytes());
        out[12..16].copy_from_slice(&self.position.to_le_bytes());
    }

    fn position(&self) -> u32 {
        self.position
    }

    fn follows(&self, prev: &Self) -> bool {
        self.max_timestamp_ms >= prev.max_timestamp_ms && self.position > prev.position
    }
}

/// A memory-mapped index of entries of type `E`.
#[derive(Debug)]
pub struct Index<E> {
    file: EntryFile,
    _entry: std::marker::PhantomData<E>,
}

/// The offset index of a segment: relative offset → position.
pub type OffsetIndex = Index<OffsetEntry>;
/// The time index of a segment: max timestamp so far → position.
pub type TimeIndex = Index<TimeEntry>;

impl<E: Entry> Index<E> {
    fn wrap(file: EntryFile) -> Self {
        Index {
            file,
            _entry: std::marker::PhantomData,
        }
    }

    /// Creates an empty, preallocated index for an active segment.
    pub fn create(path: &Path, capacity: usize) -> Result<Self> {
        EntryFile::create(path, E::LEN, capacity).map(Self::wrap)
    }

    /// Opens an active segment's index with `entries` known-good entries.
    pub fn open_active(path: &Path, capacity: usize, entries: usize) -> Result<Self> {
        EntryFile::open_writable(path, E::LEN, capacity, entries).map(Self::wrap)
    }

    /// Opens a sealed index; `None` when missing or misshapen (it must be rebuilt).
    pub fn open_sealed(path: &Path) -> Result<Option<Self>> {
        Ok(EntryFile::open_sealed(path, E::LEN)?.map(Self::wrap))
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.file.len()
    }

    /// True with no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`, which must be below [`Index::len`].
    pub fn get(&self, i: usize) -> E {
        E::decode(self.file.entry(i))
    }

    /// The last entry, if any.
    pub fn last(&self) -> Option<E> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    /// Appends an entry (skipped if the index is full).
    pub fn push(&self, entry: E) {
        let mut buf = [0u8; TIME_ENTRY_LEN];
        entry.encode(&mut buf[..E::LEN]);
        self.file.push(&buf[..E::LEN]);
    }

    /// The position of the last entry (below `max_position`) for which `before` holds, or 0:
    /// entries for which `before` holds form a prefix, found by binary search.
    fn last_position_where(&self, max_position: u64, before: impl Fn(&E) -> bool) -> u64 {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.get(mid);
            if before(&e) && u64::from(e.position()) < max_position {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
            .map_or(0, |i| u64::from(self.get(i).position()))
    }

    /// True when entries keep their order and point inside `log_len` bytes.
    pub fn is_consistent(&self, log_len: u64) -> bool {
        let mut prev: Option<E> = None;
        for i in 0..self.len() {
            let e = self.get(i);
            if u64::from(e.position()) >= log_len.max(1) || prev.is_some_and(|p| !e.follows(&p)) {
                return false;
            }
            prev = Some(e);
        }
        true
    }

    /// Trims a sealed index to its entries, then syncs the entries and the trim.
    pub fn sync(&self) -> Result<()> {
        self.file.sync()
    }

    /// Stops appends; the next [`Index::sync`] trims the file to its entries.
    pub fn seal(&self) {
        self.file.seal()
    }

    /// Renames the index file to `to`.
    pub fn rename(&mut self, to: &Path) -> Result<()> {
        self.file.rename(to)
    }
}

impl Index<OffsetEntry> {
    /// The byte position to start scanning from for `relative_offset`: the last entry at or
    /// before it, considering only entries below `max_position` (published log bytes).
    pub fn lookup(&self, relative_offset: u32, max_position: u64) -> u64 {
        self.last_position_where(max_position, |e| e.relative_offset <= relative_offset)
    }
}

impl Index<TimeEntry> {
    /// The byte position to start scanning from for the first record at or after
    /// `timestamp_ms`: the last entry whose max timestamp is still below it (every record up
    /// to that batch is older), considering only entries below `max_position`.
    pub fn lookup(&self, timestamp_ms: i64, max_position: u64) -> u64 {
        self.last_position_where(max_position, |e| e.max_timestamp_ms < timestamp_ms)
    }
}
