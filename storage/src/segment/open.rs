//! Opening segments: creating one (through a [`Spare`]), reopening it after a clean shutdown
//! or sealed, and the recovery scan. Every path builds the segment through
//! [`Segment::assemble`].

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    file_names, no_space_or_io, staged, LogId, Segment, WriteState, PREALLOCATE_CHUNK_BYTES,
};
use crate::batch::BatchView;
use crate::error::{Result, StorageError};
use crate::fsutil::{preallocate, TMP_SUFFIX};
use crate::index::{capacity_for, OffsetIndex, TimeIndex};
use crate::region::Region;

/// What a segment is made of when it is opened; the rest starts empty.
struct Parts {
    id: Arc<LogId>,
    base_offset: u64,
    log_path: PathBuf,
    file: File,
    region: Region,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    /// Bytes already published.
    committed_bytes: u64,
    /// Creation (or open) time for rolls by age; 0 for a sealed segment.
    created_ms: i64,
    /// The file's size.
    allocated_bytes: u64,
    /// The most bytes it may hold; 0 when sealed.
    capacity_bytes: u64,
    /// Published bytes known to be synced.
    synced_bytes: u64,
}

/// A new segment's files, created and preallocated ahead of a roll under temporary names
/// (ending in `.tmp`, so an open deletes leftovers). The roll only renames them
/// ([`Segment::from_spare`]), so the slow part of creating a segment (creating files and
/// reserving blocks) runs without the partition's writer lock.
#[derive(Debug)]
pub struct Spare {
    log_path: PathBuf,
    file: File,
    region: Region,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    segment_bytes: u64,
    allocated_bytes: u64,
}

impl Spare {
    /// Deletes the spare's files (best effort: an open deletes leftovers anyway).
    pub fn discard(self) {
        let (log, index, time) = spare_names(self.log_path.parent().unwrap_or(Path::new(".")));
        drop(self);
        for p in [log, index, time] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The temporary file names of a partition's spare segment.
fn spare_names(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("spare.log{TMP_SUFFIX}")),
        dir.join(format!("spare.index{TMP_SUFFIX}")),
        dir.join(format!("spare.timeindex{TMP_SUFFIX}")),
    )
}

impl Segment {
    fn assemble(p: Parts) -> Segment {
        let hot_from = if p.committed_bytes == 0 {
            p.base_offset
        } else {
            // Set from the batches found, once they are counted (`note_opened_end`).
            u64::MAX
        };
        Segment {
            id: p.id,
            base_offset: p.base_offset,
            log_path: p.log_path,
            file: p.file,
            region: Arc::new(p.region),
            offset_index: p.offset_index,
            time_index: p.time_index,
            committed_bytes: AtomicU64::new(p.committed_bytes),
            next_offset: AtomicU64::new(p.base_offset),
            max_timestamp_ms: AtomicI64::new(i64::MIN),
            verified_bytes: AtomicU64::new(0),
            opened_bytes: p.committed_bytes,
            hot_from_offset: AtomicU64::new(hot_from),
            grow_lock: Mutex::new(()),
            created_ms: p.created_ms,
            write: Mutex::new(WriteState {
                allocated_bytes: p.allocated_bytes,
                capacity_bytes: p.capacity_bytes,
                bytes_since_index: 0,
                synced_bytes: p.synced_bytes,
                trim_pending: false,
            }),
        }
    }

    /// Creates a new, empty active segment with its first chunk preallocated (a spare,
    /// renamed at once).
    pub fn create(
        id: Arc<LogId>,
        dir: &Path,
        base_offset: u64,
        segment_bytes: u64,
        now_ms: i64,
    ) -> Result<Segment> {
        let spare = Segment::create_spare(&id, dir, segment_bytes)?;
        Segment::from_spare(spare, id, dir, base_offset, now_ms)
    }

    /// Creates the files of a future segment of `segment_bytes` under temporary names in
    /// `dir`: the log with its first chunk preallocated, and both indexes preallocated, all
    /// mapped. Leftovers of an earlier attempt are overwritten. On a full disk the error is
    /// [`StorageError::NoSpace`], and nothing is left behind.
    pub fn create_spare(id: &LogId, dir: &Path, segment_bytes: u64) -> Result<Spare> {
        let (log_path, index_path, time_path) = spare_names(dir);
        let remove_all = || {
            // Best effort: leftovers are overwritten by the next attempt and deleted on open.
            for p in [&log_path, &index_path, &time_path] {
                let _ = std::fs::remove_file(p);
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log_path)
            .map_err(|e| no_space_or_io(id, &log_path, "create segment", e))?;
        let first_chunk = PREALLOCATE_CHUNK_BYTES.min(segment_bytes);
        if let Err(e) = preallocate(&file, 0, first_chunk) {
            drop(file);
            remove_all();
            return Err(no_space_or_io(id, &log_path, "preallocate segment", e));
        }
        let capacity = capacity_for(segment_bytes);
        let built = OffsetIndex::create(&index_path, capacity).and_then(|oi| {
            let ti = TimeIndex::create(&time_path, capacity)?;
            let region = map_log(&file, &log_path, segment_bytes)?;
            Ok((oi, ti, region))
        });
        let (offset_index, time_index, region) = match built {
            Ok(parts) => parts,
            Err(e) => {
                remove_all();
                return Err(as_no_space(id, e));
            }
        };
        Ok(Spare {
            log_path,
            file,
            region,
            offset_index,
            time_index,
            segment_bytes,
            allocated_bytes: first_chunk,
        })
    }

    /// Makes `spare` the segment starting at `base_offset`: renames its files to their real
    /// names (the indexes first, so a failure leaves at most index files without a log, which
    /// an open deletes). Creates no file and reserves no block. The new names become durable
    /// with the next folder sync (a checkpoint); until then a crash may lose the new segment
    /// along with its unsynced batches, which recovery handles like a torn tail.
    pub fn from_spare(
        spare: Spare,
        id: Arc<LogId>,
        dir: &Path,
        base_offset: u64,
        now_ms: i64,
    ) -> Result<Segment> {
        let (log_path, index_path, time_path) = file_names(dir, base_offset);
        let Spare {
            log_path: spare_log,
            file,
            region,
            mut offset_index,
            mut time_index,
            segment_bytes,
            allocated_bytes,
        } = spare;
        offset_index.rename(&index_path)?;
        time_index.rename(&time_path)?;
        std::fs::rename(&spare_log, &log_path)
            .map_err(|e| StorageError::io("rename segment", &log_path, e))?;
        Ok(Segment::assemble(Parts {
            id,
            base_offset,
            log_path,
            file,
            region,
            offset_index,
            time_index,
            committed_bytes: 0,
            created_ms: now_ms,
            allocated_bytes,
            capacity_bytes: segment_bytes,
            synced_bytes: 0,
        }))
    }

    /// Reopens the active segment after a clean shutdown, trusting the marker's figures.
    #[allow(clippy::too_many_arguments)]
    pub fn open_active(
        id: Arc<LogId>,
        dir: &Path,
        base_offset: u64,
        segment_bytes: u64,
        committed_bytes: u64,
        offset_entries: usize,
        time_entries: usize,
        now_ms: i64,
    ) -> Result<Segment> {
        let (log_path, index_path, time_path) = file_names(dir, base_offset);
        let file = open_rw(&log_path)?;
        let size = file_len(&file, &log_path)?;
        if size < committed_bytes {
            return Err(StorageError::Corrupt {
                path: log_path,
                reason: format!(
                    "file has {size} bytes but the clean-shutdown marker says {committed_bytes}"
                ),
            });
        }
        let capacity = capacity_for(segment_bytes.max(committed_bytes));
        let offset_index = OffsetIndex::open_active(&index_path, capacity, offset_entries)?;
        let time_index = TimeIndex::open_active(&time_path, capacity, time_entries)?;
        let region = map_log(&file, &log_path, segment_bytes.max(size))?;
        let seg = Segment::assemble(Parts {
            id,
            base_offset,
            log_path,
            file,
            region,
            offset_index,
            time_index,
            committed_bytes,
            created_ms: now_ms,
            allocated_bytes: size,
            capacity_bytes: segment_bytes.max(committed_bytes),
            synced_bytes: committed_bytes,
        });
        seg.load_tail_state()?;
        Ok(seg)
    }

    /// Opens a sealed segment read-only. Its indexes are used as they are when they look
    /// sound, and rebuilt from the log otherwise; the returned flag says whether they were.
    pub fn open_sealed(id: Arc<LogId>, dir: &Path, base_offset: u64) -> Result<(Segment, bool)> {
        let (log_path, index_path, time_path) = file_names(dir, base_offset);
        let file = open_rw(&log_path)?;
        let size = file_len(&file, &log_path)?;
        let region = Region::map_read_only(&file, to_usize(size, &log_path)?)
            .map_err(|e| StorageError::io("map segment", &log_path, e))?;
        let indexes = match (
            OffsetIndex::open_sealed(&index_path)?,
            TimeIndex::open_sealed(&time_path)?,
        ) {
            (Some(oi), Some(ti))
                if oi.is_consistent(size)
                    && ti.is_consistent(size)
                    && (size == 0 || !ti.is_empty()) =>
            {
                Some((oi, ti))
            }
            _ => None,
        };
        let rebuilt = indexes.is_none();
        let (offset_index, time_index) = match indexes {
            Some(pair) => pair,
            None => {
                let capacity = capacity_for(size);
                (
                    OffsetIndex::create(&index_path, capacity)?,
                    TimeIndex::create(&time_path, capacity)?,
                )
            }
        };
        let seg = Segment::assemble(Parts {
            id,
            base_offset,
            log_path,
            file,
            region,
            offset_index,
            time_index,
            committed_bytes: size,
            created_ms: 0,
            allocated_bytes: size,
            capacity_bytes: 0,
            synced_bytes: size,
        });
        if rebuilt {
            tracing::warn!(
                topic = %seg.id.topic, partition = seg.id.partition, segment = ?seg.log_path,
                "rebuilding missing or damaged indexes of a sealed segment"
            );
            seg.rebuild_indexes()?;
        } else {
            seg.load_tail_state()?;
        }
        Ok((seg, rebuilt))
    }

    /// Opens a segment for recovery: writable, with fresh indexes, nothing published yet.
    /// [`Segment::recover_scan`] then validates its batches and publishes the valid prefix.
    pub fn open_for_recovery(
        id: Arc<LogId>,
        dir: &Path,
        base_offset: u64,
        segment_bytes: u64,
        now_ms: i64,
    ) -> Result<Segment> {
        let (log_path, index_path, time_path) = file_names(dir, base_offset);
        let file = open_rw(&log_path)?;
        let size = file_len(&file, &log_path)?;
        let capacity_bytes = segment_bytes.max(size);
        let capacity = capacity_for(capacity_bytes);
        let region = map_log(&file, &log_path, capacity_bytes)?;
        Ok(Segment::assemble(Parts {
            id,
            base_offset,
            log_path,
            file,
            region,
            offset_index: OffsetIndex::create(&index_path, capacity)?,
            time_index: TimeIndex::create(&time_path, capacity)?,
            committed_bytes: 0,
            created_ms: now_ms,
            allocated_bytes: size,
            capacity_bytes,
            synced_bytes: 0,
        }))
    }

    /// Validates the file's batches from the start: each must have the expected base offset, a
    /// sane length, and a good checksum and structure. Publishes the valid prefix (rebuilding
    /// the indexes as it goes). A run of staged batches right after it is kept, unpublished
    /// (see `staged.rs`). If anything else follows, truncates the file there so the tail
    /// reads as zeros again. Returns `(kept_bytes, damaged_bytes_cut)`: the valid prefix and
    /// the staged run, and what was cut after them.
    pub fn recover_scan(&self) -> Result<(u64, u64)> {
        let mut w = self.write.lock();
        let size = w.allocated_bytes;
        let mut pos = 0u64;
        let mut expected = self.base_offset;
        // SAFETY: nothing is published and nobody else has this segment yet; `[0, size)` is
        // inside the file.
        let data = unsafe { self.region.slice(0, to_usize(size, &self.log_path)?) };
        while pos < size {
            let rest = &data[pos as usize..];
            let Ok(view) = BatchView::parse(rest) else {
                break;
            };
            let header = *view.header();
            if header.base_offset != expected || view.validate().is_err() {
                break;
            }
            let len = header.total_len() as u64;
            self.note_batch(&mut w, pos, len, &header);
            pos += len;
            expected = header.next_offset();
        }
        self.publish(pos, expected, pos);
        w.synced_bytes = 0;
        // Staged batches right after the published ones are kept for the caller to vouch for
        // (see `staged.rs`): they are not published, and not damage.
        let mut kept = pos;
        while let Some(header) = data
            .get(kept as usize..)
            .and_then(|rest| staged::parse_staged(rest, expected))
        {
            kept += header.total_len() as u64;
            expected = header.next_offset();
        }
        // A preallocated tail is zeros: that is the normal end, not damage. Anything else
        // after the last valid batch is a torn write or garbage, and is cut.
        let tail_is_zero = data[kept as usize..].iter().all(|&b| b == 0);
        if kept < size && !tail_is_zero {
            self.file
                .set_len(kept)
                .map_err(|e| StorageError::io("truncate segment", &self.log_path, e))?;
            self.file
                .sync_all()
                .map_err(|e| StorageError::io("sync segment", &self.log_path, e))?;
            w.allocated_bytes = kept;
            return Ok((kept, size - kept));
        }
        Ok((kept, 0))
    }
}

/// Turns an I/O error that means the disk is full into [`StorageError::NoSpace`].
fn as_no_space(id: &LogId, e: StorageError) -> StorageError {
    match e {
        StorageError::Io { path, source, .. } if crate::error::is_no_space(&source) => {
            StorageError::NoSpace {
                topic: id.topic.clone(),
                partition: id.partition,
                path,
                source,
            }
        }
        other => other,
    }
}

pub(super) fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open segment", path, e))
}

pub(super) fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| StorageError::io("stat segment", path, e))
}

pub(super) fn to_usize(n: u64, path: &Path) -> Result<usize> {
    usize::try_from(n).map_err(|_| StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("size {n} does not fit in memory"),
    })
}

/// Maps `len` bytes of a segment file for reading. Appends go through `pwrite`, so the
/// mapping is never written; `len` may run past the file's current end (the part past it is
/// never read before the file has grown and the bytes are published).
pub(super) fn map_log(file: &File, path: &Path, len: u64) -> Result<Region> {
    Region::map_read_only(file, to_usize(len, path)?)
        .map_err(|e| StorageError::io("map segment", path, e))
}
