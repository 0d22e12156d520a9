//! Consumer-group committed offsets: `(group, topic, partition) → offset + metadata`.
//!
//! Each group has one file, `<data>/groups/<group>.offsets`, replaced atomically on every
//! commit with [`atomic_write`] (temp file, fsync, rename, fsync of the folder). A crash leaves
//! the old file or the new one, never a mix, so a commit is durable on return and
//! all-or-nothing. Iggy overwrote its offset files in place, and a crash could tear them; this
//! is the fix.
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
//! Entries are in strictly increasing `(topic, partition)` order (topics compared as bytes),
//! so no pair appears twice and the same offsets always encode to the same bytes.
//!
//! A file that fails any check (size, CRC, magic, version, a length past the end, a bad
//! name, bad UTF-8, entries out of order or repeated, trailing bytes) is never read as offsets: it is moved aside
//! to `<group>.offsets.corrupt` (the data is kept for the operator), reported by
//! [`GroupStore::damaged`], and the group starts with no commits.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::validate_name;
use crate::cursor::Cursor;
use crate::error::{Result, StorageError};
use crate::fsutil::create_dir_durable;
use crate::fsutil::{atomic_write, fsync_dir, remove_leftover_tmp_files};
use crate::log::now_ms;

/// The longest metadata string a commit may carry, in bytes.
pub const MAX_METADATA_BYTES: usize = 4096;

const MAGIC: &[u8; 4] = b"RLGO";
const VERSION: u8 = 1;
/// The file name suffix of a group's offsets file.
const SUFFIX: &str = ".offsets";
/// Appended to a damaged file's name when it is moved aside.
const CORRUPT_SUFFIX: &str = ".corrupt";
/// Magic, version and entry count.
const HEADER_BYTES: usize = 4 + 1 + 4;
/// The trailing CRC.
const CRC_BYTES: usize = 4;
/// The fixed-width fields of one entry: topic length, partition, offset, time, metadata length.
const ENTRY_FIXED_BYTES: usize = 2 + 4 + 8 + 8 + 4;
/// The metadata length that means "no metadata".
const NO_METADATA: i32 = -1;

/// A group's committed offset for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The next offset the group will read (Kafka's convention).
    pub offset: u64,
    /// Free text committed with it, at most [`MAX_METADATA_BYTES`] bytes.
    pub metadata: Option<String>,
    /// When it was committed, in milliseconds since the Unix epoch (the broker's clock).
    pub commit_time_ms: i64,
}

/// One group's offsets: topic → partition → offset. Sorted, so encoding is deterministic and
/// listings come out in order without a sort.
type GroupMap = BTreeMap<String, BTreeMap<u32, CommittedOffset>>;

/// The committed offsets of every group, in `<data>/groups/`. Cheap to clone: a handle around
/// shared state.
///
/// Readers ([`GroupStore::fetch`] and the listings) read an in-memory map and never wait for
/// a disk write. Writers of one group are serialized, and its file is written while its lock
/// is held, so files land in commit order. Writers of different groups run in parallel.
#[derive(Debug, Clone)]
pub struct GroupStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// The view readers use: group → its offsets. A plain lock, held only to look up, clone an
    /// `Arc` or swap one in; never across file I/O, so a slow fsync never blocks a fetch.
    groups: RwLock<HashMap<String, Arc<GroupMap>>>,
    /// One writer lock per group (created on first use, kept for the life of the store: a
    /// group is a few bytes). A group's lock is held across its read-modify-write and file
    /// write, so commits of one group are applied and written in one order. The outer lock is
    /// held only to find or insert an entry.
    writers: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Offset files found damaged at open: where each was moved, and why. Fixed after open.
    damaged: Vec<(PathBuf, String)>,
}

impl GroupStore {
    /// Opens the groups folder `dir` (creating it, durably, when missing) and loads every
    /// group.
    ///
    /// Leftover temp files of interrupted commits are deleted. A damaged offsets file never
    /// stops the open and is never misread: it is logged, moved aside to
    /// `<group>.offsets.corrupt`, listed by [`GroupStore::damaged`], and its group starts
    /// with no commits. Only a failure to create or list the folder is an error.
    pub fn open(dir: &Path) -> Result<GroupStore> {
        create_dir_durable(dir)?;
        remove_leftover_tmp_files(dir)?;
        let mut groups = HashMap::new();
        let mut damaged = Vec::new();
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
                // `.corrupt` files and anything else that is not ours.
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
                Ok(map) => {
                    if !map.is_empty() {
                        groups.insert(group.to_string(), Arc::new(map));
                    }
                }
                Err(reason) => {
                    let kept_at = match set_aside(&path) {
                        Ok(aside) => {
                            moved_aside = true;
                            aside
                        }
                        Err(e) => {
                            // Still never misread: the group starts empty, and its next
                            // commit replaces the file.
                            tracing::error!(path = ?path, error = %e, "cannot move a damaged offsets file aside");
                            path.clone()
                        }
                    };
                    tracing::error!(
                        path = ?path, kept_at = ?kept_at, reason = %reason,
                        "damaged group offsets file; the group restarts with no commits"
                    );
                    damaged.push((kept_at, reason));
                }
            }
        }
        if moved_aside {
            fsync_dir(dir)?;
        }
        Ok(GroupStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                groups: RwLock::new(groups),
                writers: Mutex::new(HashMap::new()),
                damaged,
            }),
        })
    }

    /// The groups folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Commits `(partition, offset, metadata)` entries of `group` for `topic`, stamped with
    /// the current time.
    ///
    /// Every entry of one call lands atomically (one file replace), and it is durable on
    /// return. A later entry for the same partition in one call wins. A bad group or topic
    /// name ([`StorageError::InvalidName`]) or metadata over [`MAX_METADATA_BYTES`]
    /// ([`StorageError::InvalidConfig`]) changes nothing. An empty list changes nothing.
    /// On an I/O error the in-memory offsets are unchanged; the file holds either the old
    /// offsets or the new ones.
    pub fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64, Option<String>)],
    ) -> Result<()> {
        validate_name("group", group)?;
        validate_name("topic", topic)?;
        if let Some((partition, _, metadata)) = offsets
            .iter()
            .find(|(_, _, m)| m.as_ref().is_some_and(|m| m.len() > MAX_METADATA_BYTES))
        {
            return Err(StorageError::InvalidConfig {
                topic: topic.to_string(),
                reason: format!(
                    "commit metadata for partition {partition} is {} bytes; at most {MAX_METADATA_BYTES} are allowed",
                    metadata.as_ref().map_or(0, String::len)
                ),
            });
        }
        if offsets.is_empty() {
            return Ok(());
        }
        let writer = self.writer(group);
        let _writing = writer.lock();
        let mut map = self.current(group);
        let commit_time_ms = now_ms();
        let partitions = map.entry(topic.to_string()).or_default();
        for (partition, offset, metadata) in offsets {
            partitions.insert(
                *partition,
                CommittedOffset {
                    offset: *offset,
                    metadata: metadata.clone(),
                    commit_time_ms,
                },
            );
        }
        self.persist(group, &map)?;
        self.publish(group, map);
        Ok(())
    }

    /// The committed offset of `group` for `topic`/`partition`, if any.
    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<CommittedOffset> {
        self.inner
            .groups
            .read()
            .get(group)?
            .get(topic)?
            .get(&partition)
            .cloned()
    }

    /// Every committed offset of `group` as `(topic, partition, offset)`, sorted by topic and
    /// partition. [`StorageError::GroupNotFound`] when the group has none.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, CommittedOffset)>> {
        // Clone the Arc, then build the list outside the lock.
        let map = self
            .inner
            .groups
            .read()
            .get(group)
            .cloned()
            .ok_or_else(|| StorageError::GroupNotFound {
                group: group.to_string(),
            })?;
        Ok(map
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .iter()
                    .map(move |(p, c)| (topic.clone(), *p, c.clone()))
            })
            .collect())
    }

    /// The groups that have committed offsets, sorted by name.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.groups.read().keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Forgets every group's offsets for `topic` (a deleted topic), rewriting each affected
    /// group's file; a group left with no offsets loses its file and leaves the listing.
    /// Tries every group and returns the first error.
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        let affected: Vec<String> = self
            .inner
            .groups
            .read()
            .iter()
            .filter(|(_, map)| map.contains_key(topic))
            .map(|(group, _)| group.clone())
            .collect();
        let mut first_error = None;
        for group in affected {
            let writer = self.writer(&group);
            let _writing = writer.lock();
            // Re-read under the group's lock: a commit may have landed since the scan.
            let mut map = self.current(&group);
            if map.remove(topic).is_none() {
                continue;
            }
            match self.persist(&group, &map) {
                Ok(()) => self.publish(&group, map),
                Err(e) => {
                    tracing::error!(group = %group, topic, error = %e, "cannot drop a deleted topic's offsets");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Offset files found damaged at open: where each one's bytes now are (normally
    /// `<group>.offsets.corrupt`), and why it was refused.
    pub fn damaged(&self) -> &[(PathBuf, String)] {
        &self.inner.damaged
    }

    /// The writer lock of `group`, created on first use.
    fn writer(&self, group: &str) -> Arc<Mutex<()>> {
        let mut writers = self.inner.writers.lock();
        match writers.get(group) {
            Some(lock) => Arc::clone(lock),
            None => {
                let lock = Arc::new(Mutex::new(()));
                writers.insert(group.to_string(), Arc::clone(&lock));
                lock
            }
        }
    }

    /// A copy of `group`'s current offsets, to modify (empty for a new group).
    fn current(&self, group: &str) -> GroupMap {
        self.inner
            .groups
            .read()
            .get(group)
            .map(|m| GroupMap::clone(m))
            .unwrap_or_default()
    }

    /// Makes `map` what readers see for `group` (no entry when it is empty).
    fn publish(&self, group: &str, map: GroupMap) {
        let mut groups = self.inner.groups.write();
        if map.is_empty() {
            groups.remove(group);
        } else {
            groups.insert(group.to_string(), Arc::new(map));
        }
    }

    /// Replaces `group`'s file with `map`, or removes it when `map` is empty. Durable on
    /// return.
    fn persist(&self, group: &str, map: &GroupMap) -> Result<()> {
        let path = self.inner.dir.join(format!("{group}{SUFFIX}"));
        if map.is_empty() {
            return match fs::remove_file(&path) {
                Ok(()) => fsync_dir(&self.inner.dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StorageError::io("remove group offsets", &path, e)),
            };
        }
        let bytes = encode(map).map_err(|reason| StorageError::Corrupt {
            path: path.clone(),
            reason,
        })?;
        atomic_write(&path, &bytes)
    }
}

/// Renames a damaged file to `<name>.corrupt`, or `<name>.corrupt.N` when that is taken (an
/// earlier damaged copy is kept too). Returns the new path; the caller fsyncs the folder.
fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let mut base = path.as_os_str().to_owned();
    base.push(CORRUPT_SUFFIX);
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

/// Encodes a group's offsets (see the module doc). Fails only for a map no commit can build:
/// more than `u32::MAX` entries, or a topic or metadata over its length limit.
fn encode(map: &GroupMap) -> std::result::Result<Vec<u8>, String> {
    let entries: usize = map.values().map(BTreeMap::len).sum();
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
fn decode(bytes: &[u8]) -> std::result::Result<GroupMap, String> {
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
        let metadata_len = read_i32(&mut c).ok_or("truncated metadata length")?;
        let metadata = match metadata_len {
            NO_METADATA => None,
            n => {
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= MAX_METADATA_BYTES)
                    .ok_or_else(|| format!("entry {i}: bad metadata length {n}"))?;
                let bytes = c
                    .take(n)
                    .ok_or_else(|| format!("entry {i}: metadata runs past the end"))?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| format!("entry {i}: metadata is not UTF-8"))?;
                Some(text.to_string())
            }
        };
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

/// The next little-endian `i64`.
fn read_i64(c: &mut Cursor<'_>) -> Option<i64> {
    c.take(8)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_le_bytes)
}

/// The next little-endian `i32`.
fn read_i32(c: &mut Cursor<'_>) -> Option<i32> {
    c.take(4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
}

#[cfg(test)]
mod tests;
