//! The offsets files of earlier versions, `<data>/groups/<group>.offsets`, read once at open
//! and imported into the groups topic; then each file is renamed `<group>.offsets.imported`.
//!
//! # File format, version 1
//! All integers are fixed-width little-endian.
//!
//! | field | width (bytes) |
//! |---|---|
//! | magic `RLGO` | 4 |
//! | version = 1 | 1 (`u8`) |
//! | entry count | 4 (`u32`) |
//! | per entry: topic name length | 2 (`u16`) |
//! | per entry: topic name (a valid topic name, ASCII) | that length |
//! | per entry: partition | 4 (`u32`) |
//! | per entry: committed offset (the next offset the group reads) | 8 (`u64`) |
//! | per entry: commit time, ms since the Unix epoch | 8 (`i64`) |
//! | per entry: metadata length, −1 for none, at most [`MAX_METADATA_BYTES`] | 4 (`i32`) |
//! | per entry: metadata (UTF-8) | that length |
//! | CRC-32/ISO-HDLC (crc32fast, the "IEEE" polynomial, not CRC-32C) of every byte before it | 4 (`u32`) |
//!
//! Entries are in strictly increasing `(topic, partition)` order (topics compared as bytes).
//! A file that fails any check (size, CRC, magic, version, a length past the end, a bad
//! name, bad UTF-8, entries out of order or repeated, trailing bytes) is never read as
//! offsets: it is moved aside to `<group>.offsets.corrupt` (the data is kept for the
//! operator) and reported as damaged; the group gets nothing from it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::validate_name;
use crate::cursor::Cursor;
use crate::error::{Result, StorageError};
use crate::fsutil::{fsync_dir, remove_leftover_tmp_files};

use super::record::{read_i64, read_metadata};
#[cfg(test)]
use super::{record::NO_METADATA, MAX_METADATA_BYTES};
use super::{CommittedOffset, GroupMap};

const MAGIC: &[u8; 4] = b"RLGO";
const VERSION: u8 = 1;
/// The file name suffix of a group's offsets file.
pub(super) const SUFFIX: &str = ".offsets";
/// Appended to a damaged file's name when it is moved aside.
const CORRUPT_SUFFIX: &str = ".corrupt";
/// Appended to an imported file's name.
const IMPORTED_SUFFIX: &str = ".imported";
/// Magic, version and entry count.
const HEADER_BYTES: usize = 4 + 1 + 4;
/// The trailing CRC.
const CRC_BYTES: usize = 4;
/// The fixed-width fields of one entry: topic length, partition, offset, time, metadata length.
const ENTRY_FIXED_BYTES: usize = 2 + 4 + 8 + 8 + 4;
/// Files found damaged: where each one's bytes now are, and why it was refused.
pub(super) type Damaged = Vec<(PathBuf, String)>;

/// A legacy file read at open: its group, its offsets, and where it is.
pub(super) struct LegacyFile {
    pub(super) group: String,
    pub(super) offsets: GroupMap,
    pub(super) path: PathBuf,
}

/// Reads every `<group>.offsets` file of `dir` (nothing when the folder does not exist).
/// Damaged ones are moved aside and returned in the second list with the reason. Only a
/// failure to list the folder is an error.
pub(super) fn load(dir: &Path) -> Result<(Vec<LegacyFile>, Damaged)> {
    let mut files = Vec::new();
    let mut damaged = Vec::new();
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok((files, damaged)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((files, damaged)),
        Err(e) => return Err(StorageError::io("check legacy groups folder", dir, e)),
    }
    remove_leftover_tmp_files(dir)?;
    let mut moved_aside = false;
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list groups", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list groups", dir, e))?;
        let path = entry.path();
        let Some(group) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
        else {
            // `.corrupt`, `.imported` and anything else that is not ours.
            continue;
        };
        if validate_name("group", group).is_err() {
            tracing::warn!(path = ?path, "ignoring a file whose name is not a valid group name");
            continue;
        }
        let loaded = fs::read(&path)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|bytes| decode(&bytes));
        match loaded {
            Ok(offsets) => files.push(LegacyFile {
                group: group.to_string(),
                offsets,
                path,
            }),
            Err(reason) => {
                let kept_at = match set_aside(&path, CORRUPT_SUFFIX) {
                    Ok(aside) => {
                        moved_aside = true;
                        aside
                    }
                    Err(e) => {
                        tracing::error!(path = ?path, error = %e, "cannot move a damaged offsets file aside");
                        path.clone()
                    }
                };
                tracing::error!(
                    path = ?path, kept_at = ?kept_at, reason = %reason,
                    "damaged group offsets file; nothing is imported from it"
                );
                damaged.push((kept_at, reason));
            }
        }
    }
    if moved_aside {
        fsync_dir(dir)?;
    }
    Ok((files, damaged))
}

/// Renames an imported file to `<name>.imported` (and syncs the folder), so it is never
/// imported again.
pub(super) fn mark_imported(path: &Path) -> Result<()> {
    set_aside(path, IMPORTED_SUFFIX)
        .map_err(|e| StorageError::io("rename imported offsets file", path, e))?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

/// Renames a file to `<name><suffix>`, or `<name><suffix>.N` when that is taken (an earlier
/// copy is kept too). Returns the new path; the caller fsyncs the folder.
fn set_aside(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let mut base = path.as_os_str().to_owned();
    base.push(suffix);
    let mut aside = PathBuf::from(&base);
    let mut n = 0u32;
    while fs::symlink_metadata(&aside).is_ok() {
        n += 1;
        let mut name = base.clone();
        name.push(format!(".{n}"));
        aside = PathBuf::from(name);
    }
    fs::rename(path, &aside)?;
    Ok(aside)
}

/// Encodes a group's offsets (see the module doc); the tests write legacy files with it.
/// Fails only for a map no commit can build: more than `u32::MAX` entries, or a topic or
/// metadata over its length limit.
#[cfg(test)]
pub(super) fn encode(map: &GroupMap) -> std::result::Result<Vec<u8>, String> {
    let entries: usize = map.values().map(|m| m.len()).sum();
    let count = u32::try_from(entries).map_err(|_| format!("{entries} entries do not fit"))?;
    let mut buf = Vec::with_capacity(HEADER_BYTES + entries * (ENTRY_FIXED_BYTES + 32));
    buf.extend_from_slice(MAGIC);
    buf.push(VERSION);
    buf.extend_from_slice(&count.to_le_bytes());
    for (topic, partitions) in map {
        let topic_len =
            u16::try_from(topic.len()).map_err(|_| format!("topic {topic:?} is too long"))?;
        for (partition, c) in partitions {
            buf.extend_from_slice(&topic_len.to_le_bytes());
            buf.extend_from_slice(topic.as_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&c.offset.to_le_bytes());
            buf.extend_from_slice(&c.commit_time_ms.to_le_bytes());
            match &c.metadata {
                None => buf.extend_from_slice(&NO_METADATA.to_le_bytes()),
                Some(m) => {
                    let len = i32::try_from(m.len())
                        .ok()
                        .filter(|_| m.len() <= MAX_METADATA_BYTES)
                        .ok_or_else(|| format!("metadata of {} bytes is too long", m.len()))?;
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(m.as_bytes());
                }
            }
        }
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Decodes a group file. Any damage is an error with the reason, never a guess: every length
/// is checked against the bytes that remain, and nothing here can panic.
pub(super) fn decode(bytes: &[u8]) -> std::result::Result<GroupMap, String> {
    let Some(body_len) = bytes
        .len()
        .checked_sub(CRC_BYTES)
        .filter(|&n| n >= HEADER_BYTES)
    else {
        return Err(format!(
            "file is {} bytes, shorter than the smallest valid file ({} bytes)",
            bytes.len(),
            HEADER_BYTES + CRC_BYTES
        ));
    };
    let (body, crc) = bytes.split_at(body_len);
    let stored = Cursor(crc).u32().ok_or("missing checksum")?;
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let mut c = Cursor(body);
    if c.take(MAGIC.len()) != Some(MAGIC.as_slice()) {
        return Err("bad magic".to_string());
    }
    let version = c.take(1).and_then(|v| v.first().copied());
    if version != Some(VERSION) {
        return Err(format!("unsupported version {version:?}"));
    }
    let count = c.u32().ok_or("truncated entry count")?;
    // Each entry has at least its fixed-width fields; refuse a count the bytes cannot hold
    // before looping on it.
    if usize::try_from(count).map_or(true, |n| n > c.0.len() / ENTRY_FIXED_BYTES) {
        return Err(format!(
            "entry count {count} does not fit in the {} bytes that follow",
            c.0.len()
        ));
    }
    let mut map = GroupMap::new();
    let mut last: Option<(&str, u32)> = None;
    for i in 0..count {
        let topic_len = usize::from(c.u16().ok_or("truncated topic length")?);
        let topic = c
            .take(topic_len)
            .ok_or_else(|| format!("entry {i}: topic name runs past the end"))?;
        let topic = std::str::from_utf8(topic)
            .ok()
            .filter(|t| validate_name("topic", t).is_ok())
            .ok_or_else(|| format!("entry {i}: invalid topic name"))?;
        let partition = c.u32().ok_or("truncated partition")?;
        let offset = c.u64().ok_or("truncated offset")?;
        let commit_time_ms = read_i64(&mut c).ok_or("truncated commit time")?;
        let metadata = read_metadata(&mut c, i)?;
        // Strictly increasing keys: what encode writes. This refuses duplicates, and a
        // reordering that a checksum collision would otherwise let through.
        if last.is_some_and(|last| last >= (topic, partition)) {
            return Err(format!(
                "entry {i}: topic {topic:?} partition {partition} is out of order or repeated"
            ));
        }
        last = Some((topic, partition));
        map.entry(topic.to_string()).or_default().insert(
            partition,
            CommittedOffset {
                offset,
                metadata,
                commit_time_ms,
            },
        );
    }
    if !c.0.is_empty() {
        return Err(format!("{} bytes after the last entry", c.0.len()));
    }
    Ok(map)
}
