//! Staged batches: written into the active segment past its published length, in the page
//! cache like any append, but not readable until published (see `PartitionLog::stage`).
//!
//! A staged batch is stored as it will be read, with its base offset stamped, except that its
//! magic is [`STAGED_MAGIC`] instead of `RL`. Publishing rewrites those two bytes (outside the
//! checksum) and then publishes the length. So the file says by itself which batches are
//! staged: every reader and every scan refuses the staged magic as a bad magic, a recovery
//! keeps a run of staged batches after the published ones for the caller to vouch for
//! ([`Segment::staged_run`]), and a broker that crashed between a stage and its publication
//! never serves the staged batch as a record.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::{Room, Segment};
use crate::batch::{self, field, BatchHeader, CRC_START, HEADER_LEN, MAGIC};
use crate::error::{Result, StorageError};

/// The magic of a staged batch (a published one has `RL`).
pub const STAGED_MAGIC: [u8; 2] = *b"Rs";

/// A staged batch in a segment: where it lies and its header (base offset stamped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedAt {
    /// Its byte position in the segment.
    pub position: u64,
    /// Its header.
    pub header: BatchHeader,
}

impl StagedAt {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.header.total_len() as u64
    }

    /// Never true: a batch has a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The byte position after it.
    pub fn end(&self) -> u64 {
        self.position + self.len()
    }
}

/// The header of the staged batch at the start of `data` if it is one: the staged magic, a
/// sound header, the whole batch within `data`, base offset `expected_base`, and a matching
/// checksum. Anything else is `None`, never an error: a staged run ends there.
pub(crate) fn parse_staged(data: &[u8], expected_base: u64) -> Option<BatchHeader> {
    let head = data.first_chunk::<HEADER_LEN>()?;
    if head[field::MAGIC..field::MAGIC + 2] != STAGED_MAGIC {
        return None;
    }
    let mut published = *head;
    published[field::MAGIC..field::MAGIC + 2].copy_from_slice(&MAGIC);
    let header = BatchHeader::parse(&published).ok()?;
    let whole = data.get(..header.total_len())?;
    if header.base_offset != expected_base || header.record_count == 0 {
        return None;
    }
    let covered = whole.get(CRC_START..)?;
    (crc32fast::hash(covered) == header.crc).then_some(header)
}

impl Segment {
    /// Whether `len` bytes fit at byte position `pos` (past the published length) now:
    /// as [`Segment::room`] for an append at `pos`.
    pub fn room_at(&self, pos: u64, len: u64) -> Room {
        let w = self.write.lock();
        let end = pos + len;
        if w.capacity_bytes == 0 || end > w.capacity_bytes.min(self.region.len() as u64) {
            Room::Full
        } else if end > w.allocated_bytes {
            Room::Grow
        } else {
            Room::Ready
        }
    }

    /// Writes `batch` (already checked) at `pos`, at or past the published length, with
    /// base offset `base_offset` and the staged magic. Publishes nothing. The bytes must fit
    /// in the allocated blocks ([`Room::Ready`] from [`Segment::room_at`]); the caller holds
    /// the partition's writer lock, so nothing else writes there meanwhile.
    pub fn write_staged(&self, pos: u64, batch: &[u8], base_offset: u64) -> Result<()> {
        let w = self.write.lock();
        if pos < self.committed_bytes.load(Ordering::Relaxed) || batch.len() < HEADER_LEN {
            return Err(self.too_large(&w, pos, batch.len()));
        }
        self.write_stamped(&w, pos, batch, "write staged batch", |head| {
            batch::stamp_base_offset(head, base_offset);
            head[field::MAGIC..field::MAGIC + 2].copy_from_slice(&STAGED_MAGIC);
        })
    }

    /// Publishes the staged batch `staged`, which must start at the published length: its
    /// magic becomes `RL` on disk, then it is indexed and its length published, as an append
    /// would have.
    pub fn publish_staged(&self, staged: &StagedAt) -> Result<()> {
        let mut w = self.write.lock();
        let pos = self.committed_bytes.load(Ordering::Relaxed);
        if staged.position != pos {
            return Err(StorageError::io(
                "publish staged batch",
                &self.log_path,
                std::io::Error::other(format!(
                    "the staged batch at byte {} does not follow the published length {pos}",
                    staged.position
                )),
            ));
        }
        self.file
            .write_all_at(&MAGIC, pos + field::MAGIC as u64)
            .map_err(|e| StorageError::io("publish staged batch", &self.log_path, e))?;
        self.note_batch(&mut w, pos, staged.len(), &staged.header);
        self.publish(staged.end(), staged.header.next_offset(), 0);
        Ok(())
    }

    /// Zeroes the header of the staged batch at `pos`, so that no later scan finds a staged
    /// run there (see [`Segment::staged_run`]).
    pub fn clear_staged(&self, pos: u64) -> Result<()> {
        let _w = self.write.lock();
        if pos < self.committed_bytes.load(Ordering::Relaxed) {
            return Ok(()); // published since: nothing staged there
        }
        self.file
            .write_all_at(&[0u8; HEADER_LEN], pos)
            .map_err(|e| StorageError::io("clear staged batch", &self.log_path, e))
    }

    /// The staged batches that follow the published ones back to back (from byte `pos` and
    /// offset `next`), each whole, with its checksum, and within the allocated blocks. Called
    /// with the partition's writer lock held (or before the segment is shared).
    pub fn staged_run(&self, mut pos: u64, mut next: u64) -> Vec<StagedAt> {
        let allocated = self
            .write
            .lock()
            .allocated_bytes
            .min(self.region.len() as u64);
        // SAFETY: `[pos, allocated)` is inside the file; nothing writes there while the
        // caller holds the writer lock, and published bytes are never rewritten.
        let data = unsafe { self.region.slice(0, allocated as usize) };
        let mut run = Vec::new();
        while let Some(header) = data
            .get(pos as usize..)
            .and_then(|rest| parse_staged(rest, next))
        {
            let staged = StagedAt {
                position: pos,
                header,
            };
            pos = staged.end();
            next = header.next_offset();
            run.push(staged);
        }
        run
    }

    /// A copy of the staged batch `staged`, as it will read once published (magic `RL`).
    /// Called with the partition's writer lock held.
    pub fn staged_bytes(&self, staged: &StagedAt) -> Option<Vec<u8>> {
        let end = usize::try_from(staged.end()).ok()?;
        let start = usize::try_from(staged.position).ok()?;
        if end > self.write.lock().allocated_bytes as usize {
            return None;
        }
        // SAFETY: `[start, end)` is inside the file and staged: only the caller, under the
        // writer lock, writes there.
        let data = unsafe { self.region.slice(start, end) };
        let mut copy = data.to_vec();
        copy.get_mut(field::MAGIC..field::MAGIC + 2)?
            .copy_from_slice(&MAGIC);
        Some(copy)
    }

    /// Bytes allocated to the file past byte position `pos`.
    pub fn allocated_past(&self, pos: u64) -> u64 {
        self.write.lock().allocated_bytes.saturating_sub(pos)
    }

    /// Makes the staged bytes (with everything else written to the file) durable.
    pub fn sync_file(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("sync segment", &self.log_path, e))
    }
}
