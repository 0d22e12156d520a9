//! The records of the groups topic: what each one says, and its byte codec.
//!
//! Every record of `__groups` is an ordinary record of the batch format. Its key is the
//! group's name (none for a snapshot marker); its value is one [`GroupRecord`]:
//!
//! | field | width (bytes) |
//! |---|---|
//! | format version = 1 | 1 (`u8`) |
//! | kind | 1 (`u8`) |
//! | body, by kind | the rest |
//!
//! All integers are fixed-width little-endian. A string is a `u16` length and that many UTF-8
//! bytes. Bodies:
//! - kind 1, offset commit: the group, the topic, an entry count (`u32`), then per entry the
//!   partition (`u32`), the offset (`u64`), the commit time in ms (`i64`), and the metadata
//!   length (`i32`, −1 for none, at most [`MAX_METADATA_BYTES`]) with its UTF-8 bytes.
//! - kind 2, forget a topic: the group and the topic (a deleted topic's offsets).
//! - kind 3, group metadata: the group, a length (`u32`, at most [`MAX_GROUP_METADATA_BYTES`])
//!   and that many bytes, opaque here
//!   (the broker's membership state). Zero bytes clears it.
//! - kind 4, forget a group: the group (offsets and metadata both go).
//! - kind 5, snapshot marker: no body, no key. Ends a snapshot: the group snapshots before
//!   it (back to the snapshot's first record) were every group of the partition.
//! - kind 6, group snapshot: the group, a topic count (`u32`), per topic the topic and its
//!   entries as in kind 1, then a metadata flag (`u8`, 0 or 1) and, when 1, the metadata as
//!   in kind 3. It replaces the group's whole state.
//!
//! Decoding checks every length against the bytes left, refuses bad names, bad UTF-8,
//! unknown versions and kinds, and trailing bytes, and never panics.

use std::collections::BTreeMap;

use crate::config::validate_name;
use crate::cursor::Cursor;

use super::{CommittedOffset, GroupMap, MAX_METADATA_BYTES};

/// The format version this code writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// The largest metadata blob a group may store, in bytes (64 KiB: room for hundreds of
/// members, and half of what one change of the default groups topic may take).
pub const MAX_GROUP_METADATA_BYTES: usize = 64 << 10;

const KIND_COMMIT: u8 = 1;
const KIND_FORGET_TOPIC: u8 = 2;
const KIND_METADATA: u8 = 3;
const KIND_FORGET_GROUP: u8 = 4;
const KIND_SNAPSHOT_MARKER: u8 = 5;
const KIND_GROUP_SNAPSHOT: u8 = 6;
/// The metadata length that means "no metadata".
pub(super) const NO_METADATA: i32 = -1;

/// One record of the groups topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRecord {
    /// Offsets committed by `group` for `topic`: `(partition, committed)`.
    Commit {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
        /// The committed offsets; a later entry for a partition wins.
        entries: Vec<(u32, CommittedOffset)>,
    },
    /// `group` forgets its offsets for `topic`.
    ForgetTopic {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
    },
    /// `group`'s metadata (membership state) is now `metadata`; empty clears it.
    Metadata {
        /// The group.
        group: String,
        /// Opaque bytes, owned by the broker.
        metadata: Vec<u8>,
    },
    /// `group` is deleted: offsets and metadata.
    ForgetGroup {
        /// The group.
        group: String,
    },
    /// The end of a snapshot of the partition.
    SnapshotMarker,
    /// One group's whole state, inside a snapshot batch.
    GroupSnapshot {
        /// The group.
        group: String,
        /// Its offsets.
        offsets: GroupMap,
        /// Its metadata, if any.
        metadata: Option<Vec<u8>>,
    },
}

impl GroupRecord {
    /// The group the record is about (the record's key), none for a snapshot marker.
    pub fn group(&self) -> Option<&str> {
        match self {
            GroupRecord::Commit { group, .. }
            | GroupRecord::ForgetTopic { group, .. }
            | GroupRecord::Metadata { group, .. }
            | GroupRecord::ForgetGroup { group }
            | GroupRecord::GroupSnapshot { group, .. } => Some(group),
            GroupRecord::SnapshotMarker => None,
        }
    }

    /// Encodes the record's value. Fails only for a record no caller can build: a name over
    /// `u16::MAX` bytes, metadata over its limit, or more than `u32::MAX` entries.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut buf = vec![RECORD_VERSION];
        match self {
            GroupRecord::Commit {
                group,
                topic,
                entries,
            } => {
                buf.push(KIND_COMMIT);
                put_str(&mut buf, group)?;
                put_str(&mut buf, topic)?;
                put_entries(
                    &mut buf,
                    entries.iter().map(|(p, c)| (*p, c)),
                    entries.len(),
                )?;
            }
            GroupRecord::ForgetTopic { group, topic } => {
                buf.push(KIND_FORGET_TOPIC);
                put_str(&mut buf, group)?;
                put_str(&mut buf, topic)?;
            }
            GroupRecord::Metadata { group, metadata } => {
                buf.push(KIND_METADATA);
                put_str(&mut buf, group)?;
                put_blob(&mut buf, metadata)?;
            }
            GroupRecord::ForgetGroup { group } => {
                buf.push(KIND_FORGET_GROUP);
                put_str(&mut buf, group)?;
            }
            GroupRecord::SnapshotMarker => buf.push(KIND_SNAPSHOT_MARKER),
            GroupRecord::GroupSnapshot {
                group,
                offsets,
                metadata,
            } => {
                buf.push(KIND_GROUP_SNAPSHOT);
                put_str(&mut buf, group)?;
                put_u32(&mut buf, offsets.len())?;
                for (topic, partitions) in offsets {
                    put_str(&mut buf, topic)?;
                    put_entries(
                        &mut buf,
                        partitions.iter().map(|(p, c)| (*p, c)),
                        partitions.len(),
                    )?;
                }
                match metadata {
                    None => buf.push(0),
                    Some(m) => {
                        buf.push(1);
                        put_blob(&mut buf, m)?;
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Decodes a record's value; any damage is an error with the reason.
    pub fn decode(bytes: &[u8]) -> Result<GroupRecord, String> {
        let mut c = Cursor(bytes);
        let version = c.take(1).and_then(|v| v.first().copied());
        if version != Some(RECORD_VERSION) {
            return Err(format!("unsupported record version {version:?}"));
        }
        let kind = c
            .take(1)
            .and_then(|v| v.first().copied())
            .ok_or("missing kind")?;
        let record = match kind {
            KIND_COMMIT => GroupRecord::Commit {
                group: get_name(&mut c, "group")?,
                topic: get_name(&mut c, "topic")?,
                entries: get_entries(&mut c)?,
            },
            KIND_FORGET_TOPIC => GroupRecord::ForgetTopic {
                group: get_name(&mut c, "group")?,
                topic: get_name(&mut c, "topic")?,
            },
            KIND_METADATA => GroupRecord::Metadata {
                group: get_name(&mut c, "group")?,
                metadata: get_blob(&mut c)?,
            },
            KIND_FORGET_GROUP => GroupRecord::ForgetGroup {
                group: get_name(&mut c, "group")?,
            },
            KIND_SNAPSHOT_MARKER => GroupRecord::SnapshotMarker,
            KIND_GROUP_SNAPSHOT => {
                let group = get_name(&mut c, "group")?;
                let topics = c.u32().ok_or("truncated topic count")?;
                let mut offsets = GroupMap::new();
                for _ in 0..topics {
                    let topic = get_name(&mut c, "topic")?;
                    let entries: BTreeMap<u32, CommittedOffset> =
                        get_entries(&mut c)?.into_iter().collect();
                    if offsets.insert(topic.clone(), entries).is_some() {
                        return Err(format!("topic {topic:?} appears twice in a snapshot"));
                    }
                }
                let metadata = match c.take(1).and_then(|v| v.first().copied()) {
                    Some(0) => None,
                    Some(1) => Some(get_blob(&mut c)?),
                    other => return Err(format!("bad metadata flag {other:?}")),
                };
                GroupRecord::GroupSnapshot {
                    group,
                    offsets,
                    metadata,
                }
            }
            other => return Err(format!("unknown record kind {other}")),
        };
        if !c.0.is_empty() {
            return Err(format!("{} bytes after the record", c.0.len()));
        }
        Ok(record)
    }
}

fn put_u32(buf: &mut Vec<u8>, n: usize) -> Result<(), String> {
    let n = u32::try_from(n).map_err(|_| format!("count {n} does not fit"))?;
    buf.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<(), String> {
    let len = u16::try_from(s.len()).map_err(|_| format!("name {s:?} is too long"))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_blob(buf: &mut Vec<u8>, blob: &[u8]) -> Result<(), String> {
    if blob.len() > MAX_GROUP_METADATA_BYTES {
        return Err(format!(
            "group metadata of {} bytes is over the limit of {MAX_GROUP_METADATA_BYTES}",
            blob.len()
        ));
    }
    put_u32(buf, blob.len())?;
    buf.extend_from_slice(blob);
    Ok(())
}

fn put_entries<'a>(
    buf: &mut Vec<u8>,
    entries: impl Iterator<Item = (u32, &'a CommittedOffset)>,
    count: usize,
) -> Result<(), String> {
    put_u32(buf, count)?;
    for (partition, c) in entries {
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
    Ok(())
}

fn get_name(c: &mut Cursor<'_>, kind: &'static str) -> Result<String, String> {
    let len = usize::from(c.u16().ok_or_else(|| format!("truncated {kind} length"))?);
    let bytes = c
        .take(len)
        .ok_or_else(|| format!("{kind} name runs past the end"))?;
    std::str::from_utf8(bytes)
        .ok()
        .filter(|name| validate_name(kind, name).is_ok())
        .map(str::to_string)
        .ok_or_else(|| format!("invalid {kind} name"))
}

fn get_blob(c: &mut Cursor<'_>) -> Result<Vec<u8>, String> {
    let len = c.u32().ok_or("truncated metadata length")?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_GROUP_METADATA_BYTES)
        .ok_or_else(|| format!("bad group metadata length {len}"))?;
    Ok(c.take(len)
        .ok_or("group metadata runs past the end")?
        .to_vec())
}

/// The fixed-width fields of one entry: partition, offset, time, metadata length.
const ENTRY_FIXED_BYTES: usize = 4 + 8 + 8 + 4;

fn get_entries(c: &mut Cursor<'_>) -> Result<Vec<(u32, CommittedOffset)>, String> {
    let count = c.u32().ok_or("truncated entry count")?;
    // Refuse a count the bytes cannot hold before allocating for it.
    if usize::try_from(count).map_or(true, |n| n > c.0.len() / ENTRY_FIXED_BYTES) {
        return Err(format!(
            "entry count {count} does not fit in the {} bytes that follow",
            c.0.len()
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let partition = c.u32().ok_or("truncated partition")?;
        let offset = c.u64().ok_or("truncated offset")?;
        let commit_time_ms = read_i64(c).ok_or("truncated commit time")?;
        let metadata = read_metadata(c, i)?;
        entries.push((
            partition,
            CommittedOffset {
                offset,
                metadata,
                commit_time_ms,
            },
        ));
    }
    Ok(entries)
}

/// Reads a little-endian `i64`.
pub(super) fn read_i64(c: &mut Cursor<'_>) -> Option<i64> {
    c.take(8)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_le_bytes)
}

/// Reads a little-endian `i32`.
pub(super) fn read_i32(c: &mut Cursor<'_>) -> Option<i32> {
    c.take(4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
}

/// Reads entry `i`'s commit metadata: an `i32` length ([`NO_METADATA`] for none, at most
/// [`MAX_METADATA_BYTES`]) and that many UTF-8 bytes. Shared by this codec and the legacy
/// offsets files, which store metadata the same way.
pub(super) fn read_metadata(
    c: &mut Cursor<'_>,
    i: u32,
) -> std::result::Result<Option<String>, String> {
    let len = read_i32(c).ok_or("truncated metadata length")?;
    if len == NO_METADATA {
        return Ok(None);
    }
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_METADATA_BYTES)
        .ok_or_else(|| format!("entry {i}: bad metadata length {len}"))?;
    let bytes = c
        .take(n)
        .ok_or_else(|| format!("entry {i}: metadata runs past the end"))?;
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("entry {i}: metadata is not UTF-8"))?;
    Ok(Some(text.to_string()))
}
