//! The sparse indexes of a segment, memory-mapped: the offset index and the time index.
//!
//! Both are arrays of fixed-width little-endian entries (see `storage/FORMAT.md`), appended
//! about every [`INDEX_INTERVAL_BYTES`] of log. The active segment's index files are
//! preallocated to their capacity and their entry count lives in memory (and in the
//! clean-shutdown marker); a sealed segment's index files are trimmed to their entries, so the
//! count is the file length divided by the entry width. The log is the truth: an index that is
//! missing, misshapen or inconsistent is rebuilt from the log.

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
    /// Serializes pushes and the seal. The partition's writer lock already serializes them, so
    /// this lock is never contended; it exists so that writing through the shared mapping is
    /// safe by construction rather than by a caller's promise. Holds the capacity in entries
    /// (0 once sealed or read-only).
    write: Mutex<usize>,
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
            write: Mutex::new(capacity),
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
            write: Mutex::new(0),
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
        let capacity = self.write.lock();
        let len = self.len.load(Ordering::Relaxed);
        if len >= *capacity {
            return false;
        }
        // SAFETY: the write lock makes this the only writer; the slot is past the published
        // length so no reader reads it; the file was preallocated to `capacity` entries, and
        // a sealed or read-only index has capacity 0 so it is never written.
        unsafe { self.region.write_at(len * self.entry_len, entry) };
        self.len.store(len + 1, Ordering::Release);
        true
    }

    /// Syncs the file: entries written through the mapping and any trim. fdatasync covers
    /// pages dirtied through a shared mapping as well as by write.
    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("sync index", &self.path, e))
    }

    /// Trims the file to its entries and stops appends. The trim is made durable by the next
    /// [`EntryFile::sync`], off the append path.
    fn seal(&self) -> Result<()> {
        let mut capacity = self.write.lock();
        let bytes = (self.len() * self.entry_len) as u64;
        self.file
            .set_len(bytes)
            .map_err(|e| StorageError::io("trim index", &self.path, e))?;
        *capacity = 0;
        Ok(())
    }
}

/// The offset index of a segment.
#[derive(Debug)]
pub struct OffsetIndex(EntryFile);

impl OffsetIndex {
    /// Creates an empty, preallocated index for an active segment.
    pub fn create(path: &Path, capacity: usize) -> Result<Self> {
        EntryFile::create(path, OFFSET_ENTRY_LEN, capacity).map(OffsetIndex)
    }

    /// Opens an active segment's index with `entries` known-good entries.
    pub fn open_active(path: &Path, capacity: usize, entries: usize) -> Result<Self> {
        EntryFile::open_writable(path, OFFSET_ENTRY_LEN, capacity, entries).map(OffsetIndex)
    }

    /// Opens a sealed index; `None` when missing or misshapen (it must be rebuilt).
    pub fn open_sealed(path: &Path) -> Result<Option<Self>> {
        Ok(EntryFile::open_sealed(path, OFFSET_ENTRY_LEN)?.map(OffsetIndex))
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True with no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`, which must be below [`OffsetIndex::len`].
    pub fn get(&self, i: usize) -> OffsetEntry {
        let e = self.0.entry(i);
        OffsetEntry {
            relative_offset: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            position: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        }
    }

    /// Appends an entry (skipped if the index is full).
    pub fn push(&self, entry: OffsetEntry) {
        let mut buf = [0u8; OFFSET_ENTRY_LEN];
        buf[..4].copy_from_slice(&entry.relative_offset.to_le_bytes());
        buf[4..].copy_from_slice(&entry.position.to_le_bytes());
        self.0.push(&buf);
    }

    /// The byte position to start scanning from for `relative_offset`: the last entry at or
    /// before it, considering only entries below `max_position` (published log bytes).
    pub fn lookup(&self, relative_offset: u32, max_position: u64) -> u64 {
        let n = self.len();
        // Binary search for the first entry past the target; the one before it is the answer.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.get(mid);
            if e.relative_offset <= relative_offset && u64::from(e.position) < max_position {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            0
        } else {
            u64::from(self.get(lo - 1).position)
        }
    }

    /// True when the entries are strictly increasing and point inside `log_len` bytes.
    pub fn is_consistent(&self, log_len: u64) -> bool {
        let mut prev: Option<OffsetEntry> = None;
        for i in 0..self.len() {
            let e = self.get(i);
            if u64::from(e.position) >= log_len.max(1) {
                return false;
            }
            if let Some(p) = prev {
                if e.relative_offset <= p.relative_offset || e.position <= p.position {
                    return false;
                }
            }
            prev = Some(e);
        }
        true
    }

    /// Syncs the entries (and a trim) to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.0.sync()
    }

    /// Trims the file to its entries; the next sync makes it durable.
    pub fn seal(&self) -> Result<()> {
        self.0.seal()
    }
}

/// The time index of a segment.
#[derive(Debug)]
pub struct TimeIndex(EntryFile);

impl TimeIndex {
    /// Creates an empty, preallocated index for an active segment.
    pub fn create(path: &Path, capacity: usize) -> Result<Self> {
        EntryFile::create(path, TIME_ENTRY_LEN, capacity).map(TimeIndex)
    }

    /// Opens an active segment's index with `entries` known-good entries.
    pub fn open_active(path: &Path, capacity: usize, entries: usize) -> Result<Self> {
        EntryFile::open_writable(path, TIME_ENTRY_LEN, capacity, entries).map(TimeIndex)
    }

    /// Opens a sealed index; `None` when missing or misshapen (it must be rebuilt).
    pub fn open_sealed(path: &Path) -> Result<Option<Self>> {
        Ok(EntryFile::open_sealed(path, TIME_ENTRY_LEN)?.map(TimeIndex))
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True with no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`, which must be below [`TimeIndex::len`].
    pub fn get(&self, i: usize) -> TimeEntry {
        let e = self.0.entry(i);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&e[..8]);
        TimeEntry {
            max_timestamp_ms: i64::from_le_bytes(ts),
            relative_offset: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            position: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    }

    /// The last entry, if any.
    pub fn last(&self) -> Option<TimeEntry> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    /// Appends an entry (skipped if the index is full).
    pub fn push(&self, entry: TimeEntry) {
        let mut buf = [0u8; TIME_ENTRY_LEN];
        buf[..8].copy_from_slice(&entry.max_timestamp_ms.to_le_bytes());
        buf[8..12].copy_from_slice(&entry.relative_offset.to_le_bytes());
        buf[12..].copy_from_slice(&entry.position.to_le_bytes());
        self.0.push(&buf);
    }

    /// The byte position to start scanning from for the first record at or after
    /// `timestamp_ms`: the last entry whose max timestamp is still below it (every record up
    /// to that batch is older), considering only entries below `max_position`.
    pub fn lookup(&self, timestamp_ms: i64, max_position: u64) -> u64 {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.get(mid);
            if e.max_timestamp_ms < timestamp_ms && u64::from(e.position) < max_position {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            0
        } else {
            u64::from(self.get(lo - 1).position)
        }
    }

    /// True when timestamps never decrease, positions strictly increase and lie in `log_len`.
    pub fn is_consistent(&self, log_len: u64) -> bool {
        let mut prev: Option<TimeEntry> = None;
        for i in 0..self.len() {
            let e = self.get(i);
            if u64::from(e.position) >= log_len.max(1) {
                return false;
            }
            if let Some(p) = prev {
                if e.max_timestamp_ms < p.max_timestamp_ms || e.position <= p.position {
                    return false;
                }
            }
            prev = Some(e);
        }
        true
    }

    /// Syncs the entries (and a trim) to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.0.sync()
    }

    /// Trims the file to its entries; the next sync makes it durable.
    pub fn seal(&self) -> Result<()> {
        self.0.seal()
    }
}
