//! [`Region`]: a shared, memory-mapped file region that one writer appends to while readers
//! read what is already published. This module holds the engine's `unsafe` code: nothing else
//! touches raw mapping pointers.
//!
//! The invariant that makes it sound: bytes are written only at or beyond a *published length*
//! that the owner tracks (an atomic), and bytes below it are never written again. Readers only
//! read below the published length they loaded. Writers are serialized by the owner (the
//! partition's writer lock), so no two writes overlap either.
//!
//! Nothing here syncs: the owner syncs the file with `fdatasync`, which on Linux also writes
//! back the pages dirtied through a shared mapping (the index entries written by
//! [`Region::write_at`]).

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

/// A memory-mapped region of a file. Cheap to share through `Arc`; a [`Bytes`] cut from it
/// keeps the mapping alive, even after the file is unlinked.
#[derive(Debug)]
pub struct Region {
    /// `None` for an empty region: a zero-length mapping is not allowed.
    map: Option<MmapRaw>,
    len: usize,
}

impl Region {
    /// Maps `len` bytes of `file` for reading and writing. `len` may exceed the file's current
    /// size: pages past the end of the file must not be touched until the file has grown
    /// (preallocation makes sure of that before any append writes there).
    pub fn map_writable(file: &File, len: usize) -> io::Result<Region> {
        if len == 0 {
            return Ok(Region { map: None, len: 0 });
        }
        let map = MmapOptions::new().len(len).map_raw(file)?;
        Ok(Region {
            map: Some(map),
            len,
        })
    }

    /// Maps `len` bytes of `file` read-only (segments; sealed indexes). As for a writable map,
    /// `len` may exceed the file's size as long as nothing past the end is read.
    pub fn map_read_only(file: &File, len: usize) -> io::Result<Region> {
        if len == 0 {
            return Ok(Region { map: None, len: 0 });
        }
        let map = MmapOptions::new().len(len).map_raw_read_only(file)?;
        Ok(Region {
            map: Some(map),
            len,
        })
    }

    /// The mapped length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` into the region at `pos`.
    ///
    /// # Safety
    /// The caller must be the region's only writer at this moment, `[pos, pos + data.len())`
    /// must lie at or beyond the published length (no reader may be reading it), and the file
    /// must already extend past `pos + data.len()` (else the write faults with SIGBUS).
    /// The region must have been mapped writable.
    pub unsafe fn write_at(&self, pos: usize, data: &[u8]) {
        let end = pos.checked_add(data.len()).filter(|&e| e <= self.len);
        let (Some(_), Some(map)) = (end, self.map.as_ref()) else {
            // A logic error in the caller, not an input error: refuse rather than corrupt.
            panic!(
                "write of {} bytes at {pos} outside a region of {} bytes",
                data.len(),
                self.len
            );
        };
        // SAFETY: the range is inside the mapping (checked above); the caller guarantees no
        // concurrent reader or writer touches it and that the file backs it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), map.as_mut_ptr().add(pos), data.len());
        }
    }

    /// Returns the bytes `[start, end)`.
    ///
    /// # Safety
    /// The range must lie below a published length (so no writer changes it while the slice
    /// lives) and within the file's size.
    pub unsafe fn slice(&self, start: usize, end: usize) -> &[u8] {
        match self.map.as_ref() {
            Some(map) if start <= end && end <= self.len => {
                // SAFETY: in bounds of the live mapping (checked); the caller guarantees the
                // bytes are published and immutable.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(start), end - start) }
            }
            _ => &[],
        }
    }

    /// Returns `[start, end)` as a zero-copy [`Bytes`] that keeps the mapping alive.
    ///
    /// # Safety
    /// As for [`Region::slice`]: the range must be published, immutable and backed by the file.
    pub unsafe fn bytes(self: &Arc<Self>, start: usize, end: usize) -> Bytes {
        if start >= end || end > self.len {
            return Bytes::new();
        }
        Bytes::from_owner(RegionSlice {
            region: Arc::clone(self),
            start,
            end,
        })
    }
}

/// The owner behind a [`Bytes`] cut from a [`Region`]: an `Arc` of the region and a range that
/// was published when it was cut.
struct RegionSlice {
    region: Arc<Region>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for RegionSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was checked against the region and was published (immutable) when
        // this slice was made; `Region::bytes` is unsafe precisely to make its caller promise it.
        unsafe { self.region.slice(self.start, self.end) }
    }
}
