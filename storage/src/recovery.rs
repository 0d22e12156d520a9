//! Opening a partition: clean opens, crash recovery, and the two checkpoint files.
//!
//! # Files (all integers little-endian; CRC is CRC-32/ISO-HDLC via crc32fast)
//! `clean-shutdown`, written by a clean close and deleted before the first write after open:
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | 4 | magic `RLCS` |
//! | 4 | 1 | version = 1 |
//! | 5 | 3 | reserved, zero |
//! | 8 | 8 | active segment base offset |
//! | 16 | 8 | active segment length in bytes |
//! | 24 | 8 | offset-index entries of the active segment |
//! | 32 | 8 | time-index entries of the active segment |
//! | 40 | 8 | high watermark |
//! | 48 | 4 | CRC of bytes 0..48 |
//!
//! `recovery-point`, rewritten by each checkpoint after a roll (see
//! [`crate::PartitionLog::checkpoint`]): everything below this offset is sealed and synced, so
//! recovery need not scan it:
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | 4 | magic `RLRP` |
//! | 4 | 1 | version = 1 |
//! | 5 | 3 | reserved, zero |
//! | 8 | 8 | recovery point (an offset) |
//! | 16 | 4 | CRC of bytes 0..16 |
//!
//! # Recovery
//! With a valid marker that matches the files, the open trusts it and validates nothing.
//! Otherwise every segment that may hold offsets at or past the recovery point is scanned:
//! each batch must start at the expected offset, have a sane length and pass its checksum.
//! The first that fails ends the valid log: the file is truncated there (a zeroed or torn
//! tail), later segments are deleted, and what was cut is logged and reported. Segments below
//! the recovery point are opened as they are, with their indexes rebuilt if damaged.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::fsutil::{atomic_write, fsync_dir, remove_leftover_tmp_files};
use crate::segment::{file_names, LogId, Segment};

/// The clean-shutdown marker's file name.
pub const CLEAN_MARKER_FILE: &str = "clean-shutdown";
/// The recovery-point checkpoint's file name.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";
/// The restart marker's file name (see [`crate::PartitionLog::restart_at`]).
pub const RESTART_MARKER_FILE: &str = "restart-at";

const CLEAN_MAGIC: &[u8; 4] = b"RLCS";
const POINT_MAGIC: &[u8; 4] = b"RLRP";
const RESTART_MAGIC: &[u8; 4] = b"RLRA";
const CHECKPOINT_VERSION: u8 = 1;
const CLEAN_LEN: usize = 52;
const POINT_LEN: usize = 20;

/// One cut made by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The segment file cut or deleted.
    pub segment: PathBuf,
    /// The first offset no longer in the log.
    pub offset: u64,
    /// The byte position in the segment where the cut starts.
    pub position: u64,
    /// How many bytes were cut.
    pub bytes: u64,
}

/// What opening a partition found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// True when the clean-shutdown marker was trusted and nothing was scanned.
    pub clean: bool,
    /// Bytes of log validated by scanning.
    pub scanned_bytes: u64,
    /// Tails cut and segments deleted.
    pub cuts: Vec<Cut>,
    /// Segments whose indexes were rebuilt.
    pub rebuilt_indexes: u32,
}

/// The segments of an opened partition and what the open did.
#[derive(Debug)]
pub(crate) struct Opened {
    pub segments: Vec<Arc<Segment>>,
    pub report: RecoveryReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CleanMarker {
    active_base: u64,
    active_bytes: u64,
    offset_entries: u64,
    time_entries: u64,
    high_watermark: u64,
}

fn checksum_tail(buf: &mut [u8]) {
    let n = buf.len() - 4;
    let crc = crc32fast::hash(&buf[..n]);
    buf[n..].copy_from_slice(&crc.to_le_bytes());
}

fn checked<'a>(buf: &'a [u8], magic: &[u8; 4], len: usize) -> Option<&'a [u8]> {
    if buf.len() != len || &buf[..4] != magic || buf[4] != CHECKPOINT_VERSION {
        return None;
    }
    let n = len - 4;
    let stored = u32::from_le_bytes(buf[n..].try_into().ok()?);
    (crc32fast::hash(&buf[..n]) == stored).then_some(buf)
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

impl CleanMarker {
    fn encode(&self) -> [u8; CLEAN_LEN] {
        let mut buf = [0u8; CLEAN_LEN];
        buf[..4].copy_from_slice(CLEAN_MAGIC);
        buf[4] = CHECKPOINT_VERSION;
        for (i, v) in [
            self.active_base,
            self.active_bytes,
            self.offset_entries,
            self.time_entries,
            self.high_watermark,
        ]
        .into_iter()
        .enumerate()
        {
            buf[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        checksum_tail(&mut buf);
        buf
    }

    fn decode(buf: &[u8]) -> Option<CleanMarker> {
        let buf = checked(buf, CLEAN_MAGIC, CLEAN_LEN)?;
        Some(CleanMarker {
            active_base: u64_at(buf, 8)?,
            active_bytes: u64_at(buf, 16)?,
            offset_entries: u64_at(buf, 24)?,
            time_entries: u64_at(buf, 32)?,
            high_watermark: u64_at(buf, 40)?,
        })
    }
}

fn encode_point(offset: u64) -> [u8; POINT_LEN] {
    encode_offset_file(POINT_MAGIC, offset)
}

/// The recovery point and the restart marker share one layout: magic, version, an offset.
fn encode_offset_file(magic: &[u8; 4], offset: u64) -> [u8; POINT_LEN] {
    let mut buf = [0u8; POINT_LEN];
    buf[..4].copy_from_slice(magic);
    buf[4] = CHECKPOINT_VERSION;
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    checksum_tail(&mut buf);
    buf
}

fn decode_point(buf: &[u8]) -> Option<u64> {
    u64_at(checked(buf, POINT_MAGIC, POINT_LEN)?, 8)
}

/// Writes the clean-shutdown marker for `active` (synced before this is called).
pub(crate) fn write_clean_marker(dir: &Path, active: &Segment, high_watermark: u64) -> Result<()> {
    let (offset_entries, time_entries) = active.index_entries();
    let marker = CleanMarker {
        active_base: active.base_offset(),
        active_bytes: active.size_bytes(),
        offset_entries: offset_entries as u64,
        time_entries: time_entries as u64,
        high_watermark,
    };
    atomic_write(&dir.join(CLEAN_MARKER_FILE), &marker.encode())
}

/// Deletes the clean-shutdown marker, durably, before the first write after a clean open.
pub(crate) fn remove_clean_marker(dir: &Path) -> Result<()> {
    let path = dir.join(CLEAN_MARKER_FILE);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove clean-shutdown marker", path, e)),
    }
}

/// Records that every offset below `offset` is sealed and synced.
pub(crate) fn write_recovery_point(dir: &Path, offset: u64) -> Result<()> {
    atomic_write(&dir.join(RECOVERY_POINT_FILE), &encode_point(offset))
}

/// Records, durably, that the log restarts empty at `offset`: from now on an open deletes
/// every segment below it (see [`finish_restart`]).
pub(crate) fn write_restart_marker(dir: &Path, offset: u64) -> Result<()> {
    atomic_write(
        &dir.join(RESTART_MARKER_FILE),
        &encode_offset_file(RESTART_MAGIC, offset),
    )
}

/// Deletes the restart marker, durably, once nothing below its offset is left.
pub(crate) fn remove_restart_marker(dir: &Path) -> Result<()> {
    let path = dir.join(RESTART_MARKER_FILE);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove restart marker", path, e)),
    }
}

/// Deletes the three files of the segment at `base` (those present).
pub(crate) fn remove_segment_files(dir: &Path, base: u64) -> Result<()> {
    let (log, index, time) = file_names(dir, base);
    // The log last: an index without its log is an orphan the next open deletes.
    for p in [index, time, log] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("delete segment file", &p, e)),
        }
    }
    Ok(())
}

/// Completes an interrupted [`crate::PartitionLog::restart_at`]: with a restart marker at
/// `offset` present, every segment below `offset` is deleted, an empty segment is created at
/// `offset` when none at or past it is left, the producer-state-missing marker is written,
/// the producer snapshot and adopted state (which describe the discarded records) are
/// deleted, and then the marker. Each step is idempotent, so a crash
/// here is completed by the next open. A marker that fails its check is refused as corrupt
/// (never guessed at: ignoring it could serve a log with a hole).
fn finish_restart(id: &Arc<LogId>, dir: &Path, segment_bytes: u64, now_ms: i64) -> Result<()> {
    let path = dir.join(RESTART_MARKER_FILE);
    let Some(buf) = read_small(&path)? else {
        return Ok(());
    };
    let offset = checked(&buf, RESTART_MAGIC, POINT_LEN)
        .and_then(|b| u64_at(b, 8))
        .ok_or_else(|| StorageError::Corrupt {
            path: path.clone(),
            reason: "restart marker fails its check".to_string(),
        })?;
    tracing::info!(
        topic = %id.topic, partition = id.partition, offset,
        "completing a restart of the log"
    );
    let bases = list_segments(dir)?;
    for &base in bases.iter().filter(|&&b| b < offset) {
        remove_segment_files(dir, base)?;
    }
    if !bases.iter().any(|&b| b >= offset) {
        // Dropped at once: the open that follows finds its files.
        Segment::create(Arc::clone(id), dir, offset, segment_bytes, now_ms)?;
    }
    fsync_dir(dir)?;
    // The restarted log has no complete producer state until another replica's is adopted
    // (`restart_at` wrote this already unless it crashed first).
    crate::producers::write_missing_marker(dir)?;
    crate::producers::remove_file(dir, crate::producers::SNAPSHOT_FILE)?;
    crate::producers::remove_file(dir, crate::producers::BASE_FILE)?;
    fsync_dir(dir)?;
    remove_restart_marker(dir)
}

fn read_small(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io("read checkpoint", path, e)),
    }
}

/// Lists the base offsets of the segments in `dir`, deleting index files whose log is gone
/// (left by an interrupted retention pass).
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut logs = Vec::new();
    let mut indexes = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list partition", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list partition", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, ext)) = name.split_once('.') else {
            continue;
        };
        let Ok(base) = stem.parse::<u64>() else {
            continue;
        };
        if stem.len() != 20 {
            continue;
        }
        match ext {
            "log" => logs.push(base),
            "index" | "timeindex" => indexes.push((base, entry.path())),
            _ => {}
        }
    }
    logs.sort_unstable();
    let mut removed = false;
    for (base, path) in indexes {
        if logs.binary_search(&base).is_err() {
            fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove orphan index", &path, e))?;
            removed = true;
        }
    }
    if removed {
        fsync_dir(dir)?;
    }
    Ok(logs)
}

/// Opens (or creates) the segments of the partition in `dir`.
pub(crate) fn open_segments(
    id: &Arc<LogId>,
    dir: &Path,
    segment_bytes: u64,
    now_ms: i64,
) -> Result<Opened> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| StorageError::io("create partition", dir, e))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
    }
    remove_leftover_tmp_files(dir)?;
    finish_restart(id, dir, segment_bytes, now_ms)?;
    let bases = list_segments(dir)?;
    let mut report = RecoveryReport::default();
    let Some(&last_base) = bases.last() else {
        // A new partition (or one whose every segment is gone): start empty.
        let _ = fs::remove_file(dir.join(CLEAN_MARKER_FILE));
        let segment = Segment::create(Arc::clone(id), dir, 0, segment_bytes, now_ms)?;
        fsync_dir(dir)?;
        return Ok(Opened {
            segments: vec![Arc::new(segment)],
            report,
        });
    };

    let marker = read_small(&dir.join(CLEAN_MARKER_FILE))?
        .as_deref()
        .and_then(CleanMarker::decode)
        .filter(|m| m.active_base == last_base);
    if let Some(marker) = marker {
        match open_clean(id, dir, segment_bytes, &bases, marker, now_ms, &mut report) {
            Ok(segments) => {
                report.clean = true;
                return Ok(Opened { segments, report });
            }
            Err(e) => {
                tracing::warn!(
                    topic = %id.topic, partition = id.partition, error = %e,
                    "clean-shutdown marker does not match the files; recovering"
                );
                report = RecoveryReport::default();
            }
        }
    }
    // Not clean: the marker must go before anything is written, or a later crash would
    // trust it.
    remove_clean_marker(dir)?;
    let segments = recover(id, dir, segment_bytes, &bases, now_ms, &mut report)?;
    Ok(Opened { segments, report })
}

fn open_clean(
    id: &Arc<LogId>,
    dir: &Path,
    segment_bytes: u64,
    bases: &[u64],
    marker: CleanMarker,
    now_ms: i64,
    report: &mut RecoveryReport,
) -> Result<Vec<Arc<Segment>>> {
    let mut segments = Vec::with_capacity(bases.len());
    for &base in &bases[..bases.len() - 1] {
        let (segment, rebuilt) = Segment::open_sealed(Arc::clone(id), dir, base)?;
        report.rebuilt_indexes += u32::from(rebuilt);
        segments.push(Arc::new(segment));
    }
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let active = Segment::open_active(
        Arc::clone(id),
        dir,
        marker.active_base,
        segment_bytes,
        marker.active_bytes,
        to_usize(marker.offset_entries),
        to_usize(marker.time_entries),
        now_ms,
    )?;
    if active.next_offset() != marker.high_watermark {
        return Err(StorageError::Corrupt {
            path: dir.join(CLEAN_MARKER_FILE),
            reason: format!(
                "high watermark {} does not match the log's {}",
                marker.high_watermark,
                active.next_offset()
            ),
        });
    }
    segments.push(Arc::new(active));
    Ok(segments)
}

fn recover(
    id: &Arc<LogId>,
    dir: &Path,
    segment_bytes: u64,
    bases: &[u64],
    now_ms: i64,
    report: &mut RecoveryReport,
) -> Result<Vec<Arc<Segment>>> {
    let recovery_point = read_small(&dir.join(RECOVERY_POINT_FILE))?
        .as_deref()
        .and_then(decode_point)
        .unwrap_or(0);
    tracing::info!(
        topic = %id.topic, partition = id.partition, recovery_point,
        "no clean shutdown: recovering the partition"
    );
    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    let mut expected: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        if expected.is_some_and(|e| e != base) {
            // A hole or an overlap: nothing from here on can be served in order.
            cut_rest(dir, &bases[i..], expected.unwrap_or(base), report)?;
            break;
        }
        let is_last = i + 1 == bases.len();
        let below_point = bases.get(i + 1).is_some_and(|&next| next <= recovery_point);
        let segment = if below_point && !is_last {
            let (segment, rebuilt) = Segment::open_sealed(Arc::clone(id), dir, base)?;
            report.rebuilt_indexes += u32::from(rebuilt);
            segment
        } else {
            let segment =
                Segment::open_for_recovery(Arc::clone(id), dir, base, segment_bytes, now_ms)?;
            let (valid, cut_bytes) = segment.recover_scan()?;
            report.scanned_bytes += valid;
            report.rebuilt_indexes += 1;
            if cut_bytes > 0 {
                let cut = Cut {
                    segment: segment.path().to_path_buf(),
                    offset: segment.next_offset(),
                    position: valid,
                    bytes: cut_bytes,
                };
                log_cut(id, &cut);
                report.cuts.push(cut);
                segments.push(Arc::new(segment));
                cut_rest(dir, &bases[i + 1..], segments_next(&segments), report)?;
                break;
            }
            if !is_last {
                segment.seal();
            }
            segment
        };
        expected = Some(segment.next_offset());
        segments.push(Arc::new(segment));
    }
    if segments.is_empty() {
        let segment = Segment::create(Arc::clone(id), dir, 0, segment_bytes, now_ms)?;
        fsync_dir(dir)?;
        segments.push(Arc::new(segment));
    }
    // Everything before the last segment is now validated and sealed; sync what the scan
    // touched, then record it.
    for segment in &segments {
        if segment.needs_sync() {
            segment.sync()?;
        }
    }
    if let Some(last) = segments.last() {
        write_recovery_point(dir, last.base_offset())?;
    }
    // The last segment must be writable: if recovery left a sealed one there (the crash hit
    // between a seal and the next segment's creation, or a cut), reopen it for appends.
    if let Some(last) = segments.last() {
        if !last.fits(0) {
            let base = last.base_offset();
            segments.pop();
            let reopened =
                Segment::open_for_recovery(Arc::clone(id), dir, base, segment_bytes, now_ms)?;
            reopened.recover_scan()?;
            segments.push(Arc::new(reopened));
        }
    }
    Ok(segments)
}

fn segments_next(segments: &[Arc<Segment>]) -> u64 {
    segments.last().map_or(0, |s| s.next_offset())
}

/// Deletes the segments `bases` that follow a cut, logging each.
fn cut_rest(dir: &Path, bases: &[u64], offset: u64, report: &mut RecoveryReport) -> Result<()> {
    for &base in bases {
        let (log, index, time) = file_names(dir, base);
        let bytes = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let cut = Cut {
            segment: log.clone(),
            offset,
            position: 0,
            bytes,
        };
        tracing::warn!(segment = ?log, offset, bytes, "recovery deleted a segment after a cut");
        report.cuts.push(cut);
        for p in [log, index, time] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("delete segment after a cut", &p, e)),
            }
        }
    }
    if !bases.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn log_cut(id: &LogId, cut: &Cut) {
    tracing::warn!(
        topic = %id.topic, partition = id.partition, offset = cut.offset,
        position = cut.position, bytes = cut.bytes, segment = ?cut.segment,
        "recovery cut a torn or damaged tail"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_reject_damage() {
        let m = CleanMarker {
            active_base: 7,
            active_bytes: 4096,
            offset_entries: 3,
            time_entries: 4,
            high_watermark: 99,
        };
        let buf = m.encode();
        assert_eq!(CleanMarker::decode(&buf), Some(m));
        for i in 0..buf.len() {
            let mut bad = buf;
            bad[i] ^= 0x40;
            assert_eq!(CleanMarker::decode(&bad), None, "flip at {i}");
        }
        assert_eq!(CleanMarker::decode(&buf[..CLEAN_LEN - 1]), None);
        let p = encode_point(1234);
        assert_eq!(decode_point(&p), Some(1234));
        assert_eq!(decode_point(&p[..10]), None);
    }
}
