//! Consumer-group committed offsets: `(group, topic, partition) → offset + metadata`.
//!
//! Each group has one file, `<data>/groups/<group>.offsets`, replaced atomically on every
//! commit (temp file, fsync, rename, fsync of the folder): a crash leaves the old file or the
//! new one, never a mix, so a commit is durable and all-or-nothing.
//!
//! # File format, version 1 (little-endian, fixed width)
//! | field | width |
//! |---|---|
//! | magic `RLGO` | 4 |
//! | version = 1 | 1 |
//! | entry count | 4 (`u32`) |
//! | per entry: topic length, topic bytes | 2 (`u16`) + n |
//! | partition | 4 (`u32`) |
//! | offset | 8 (`u64`) |
//! | commit time, ms since the epoch | 8 (`i64`) |
//! | metadata length (−1 = none), metadata bytes (UTF-8) | 4 (`i32`) + n |
//! | CRC-32/ISO-HDLC (crc32fast) of every byte before it | 4 (`u32`) |
//!
//! A file that fails any check (magic, version, lengths, CRC, UTF-8) is never read as
//! offsets: it is moved aside to `<group>.offsets.corrupt`, reported by
//! [`GroupStore::damaged`], and the group starts with no commits.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::validate_name;
use crate::cursor::Cursor;
use crate::error::{Result, StorageError};
use crate::fsutil::{atomic_write, fsync_dir, remove_leftover_tmp_files};
use crate::log::now_ms;

const MAGIC: &[u8; 4] = b"RLGO";
const VERSION: u8 = 1;
const SUFFIX: &str = ".offsets";
/// The longest metadata string a commit may carry, in bytes.
pub const MAX_METADATA_BYTES: usize = 4096;

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The next offset the group will read.
    pub offset: u64,
    /// Free text committed with it.
    pub metadata: Option<String>,
    /// When it was committed, in ms since the epoch.
    pub commit_time_ms: i64,
}

type GroupMap = BTreeMap<(String, u32), CommittedOffset>;

/// The committed offsets of every group. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GroupStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// The in-memory view that readers use. A plain lock: held only to copy or swap a map.
    groups: RwLock<HashMap<String, Arc<GroupMap>>>,
    /// Serializes commits, so files are written in commit order and the read-modify-write of
    /// a group's map is atomic. Held across the file write (a blocking fsync), which is why
    /// readers use `groups` instead.
    write: Mutex<()>,
    damaged: Mutex<Vec<String>>,
}

impl GroupStore {
    /// Opens (creating if needed) the groups folder and loads every group.
    pub fn open(dir: &Path) -> Result<GroupStore> {
        if !dir.exists() {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io("create groups folder", dir, e))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        remove_leftover_tmp_files(dir)?;
        let mut groups = HashMap::new();
        let mut damaged = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list groups", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list groups", dir, e))?;
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(SUFFIX))
            else {
                continue;
            };
            if validate_name("group", name).is_err() {
                continue;
            }
            let bytes =
                fs::read(&path).map_err(|e| StorageError::io("read group offsets", &path, e))?;
            match decode(&bytes) {
                Ok(map) => {
                    groups.insert(name.to_string(), Arc::new(map));
                }
                Err(reason) => {
                    let aside = path.with_extension("offsets.corrupt");
                    tracing::error!(
                        path = ?path, reason, "damaged group offsets file moved aside; the group restarts with no commits"
                    );
                    fs::rename(&path, &aside)
                        .map_err(|e| StorageError::io("move damaged offsets aside", &path, e))?;
                    fsync_dir(dir)?;
                    damaged.push(format!("{}: {reason}", path.display()));
                }
            }
        }
        Ok(GroupStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                groups: RwLock::new(groups),
                write: Mutex::new(()),
                damaged: Mutex::new(damaged),
            }),
        })
    }

    /// Commits offsets `(partition, offset, metadata)` of `group` for `topic`, durably and
    /// atomically. Bad names or metadata change nothing.
    pub fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64, Option<String>)],
    ) -> Result<()> {
        validate_name("group", group)?;
        validate_name("topic", topic)?;
        if let Some((p, _, _)) = offsets
            .iter()
            .find(|(_, _, m)| m.as_ref().is_some_and(|m| m.len() > MAX_METADATA_BYTES))
        {
            return Err(StorageError::InvalidConfig {
                topic: topic.to_string(),
                reason: format!("metadata for partition {p} exceeds {MAX_METADATA_BYTES} bytes"),
            });
        }
        let _w = self.inner.write.lock();
        let mut map = self
            .inner
            .groups
            .read()
            .get(group)
            .map(|m| GroupMap::clone(m))
            .unwrap_or_default();
        let now = now_ms();
        for (partition, offset, metadata) in offsets {
            map.insert(
                (topic.to_string(), *partition),
                CommittedOffset {
                    offset: *offset,
                    metadata: metadata.clone(),
                    commit_time_ms: now,
                },
            );
        }
        self.persist(group, &map)?;
        self.inner
            .groups
            .write()
            .insert(group.to_string(), Arc::new(map));
        Ok(())
    }

    fn persist(&self, group: &str, map: &GroupMap) -> Result<()> {
        let path = self.inner.dir.join(format!("{group}{SUFFIX}"));
        if map.is_empty() {
            match fs::remove_file(&path) {
                Ok(()) => return fsync_dir(&self.inner.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StorageError::io("remove group offsets", &path, e)),
            }
        }
        atomic_write(&path, &encode(map))
    }

    /// The committed offset of `group` for `topic`/`partition`, if any.
    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<CommittedOffset> {
        let groups = self.inner.groups.read();
        groups
            .get(group)?
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// Every committed offset of `group`, sorted by topic and partition.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, CommittedOffset)>> {
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
            .map(|((t, p), c)| (t.clone(), *p, c.clone()))
            .collect())
    }

    /// The groups that have committed offsets, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.groups.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// Forgets every group's offsets for a deleted topic.
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        let _w = self.inner.write.lock();
        let affected: Vec<(String, GroupMap)> = self
            .inner
            .groups
            .read()
            .iter()
            .filter(|(_, m)| m.keys().any(|(t, _)| t == topic))
            .map(|(g, m)| {
                let mut m = GroupMap::clone(m);
                m.retain(|(t, _), _| t != topic);
                (g.clone(), m)
            })
            .collect();
        for (group, map) in affected {
            self.persist(&group, &map)?;
            let mut groups = self.inner.groups.write();
            if map.is_empty() {
                groups.remove(&group);
            } else {
                groups.insert(group, Arc::new(map));
            }
        }
        Ok(())
    }

    /// Damaged offset files found at open, each with the reason.
    pub fn damaged(&self) -> Vec<String> {
        self.inner.damaged.lock().clone()
    }
}

fn encode(map: &GroupMap) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + map.len() * 48);
    buf.extend_from_slice(MAGIC);
    buf.push(VERSION);
    buf.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for ((topic, partition), c) in map {
        buf.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        buf.extend_from_slice(topic.as_bytes());
        buf.extend_from_slice(&partition.to_le_bytes());
        buf.extend_from_slice(&c.offset.to_le_bytes());
        buf.extend_from_slice(&c.commit_time_ms.to_le_bytes());
        match &c.metadata {
            None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
            Some(m) => {
                buf.extend_from_slice(&(m.len() as i32).to_le_bytes());
                buf.extend_from_slice(m.as_bytes());
            }
        }
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes a group file; any damage is an error with the reason, never a guess.
fn decode(bytes: &[u8]) -> std::result::Result<GroupMap, &'static str> {
    if bytes.len() < MAGIC.len() + 1 + 4 + 4 {
        return Err("file too short");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err("checksum mismatch");
    }
    if &body[..4] != MAGIC {
        return Err("bad magic");
    }
    if body[4] != VERSION {
        return Err("unsupported version");
    }
    let mut c = Cursor(&body[5..]);
    let count = c.u32().ok_or("truncated count")?;
    let mut map = GroupMap::new();
    for _ in 0..count {
        let tlen = c.u16().ok_or("truncated topic length")? as usize;
        let topic = std::str::from_utf8(c.take(tlen).ok_or("truncated topic")?)
            .map_err(|_| "topic is not UTF-8")?;
        validate_name("topic", topic).map_err(|_| "bad topic name")?;
        let partition = c.u32().ok_or("truncated partition")?;
        let offset = c.u64().ok_or("truncated offset")?;
        let commit_time_ms = c.u64().ok_or("truncated commit time")? as i64;
        let mlen = c.u32().ok_or("truncated metadata length")? as i32;
        let metadata = match mlen {
            -1 => None,
            n if n >= 0 => Some(
                std::str::from_utf8(c.take(n as usize).ok_or("truncated metadata")?)
                    .map_err(|_| "metadata is not UTF-8")?
                    .to_string(),
            ),
            _ => return Err("negative metadata length"),
        };
        map.insert(
            (topic.to_string(), partition),
            CommittedOffset {
                offset,
                metadata,
                commit_time_ms,
            },
        );
    }
    if !c.0.is_empty() {
        return Err("bytes after the last entry");
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store(dir: &Path) -> GroupStore {
        GroupStore::open(dir).expect("open")
    }

    #[test]
    fn commit_fetch_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = store(dir.path());
        assert!(g.fetch("g", "t", 0).is_none());
        g.commit("g", "t", &[(0, 5, None), (1, 7, Some("m".into()))])
            .expect("commit");
        g.commit("g", "t", &[(0, 9, None)]).expect("commit");
        g.commit("h", "u", &[(3, 1, None)]).expect("commit");
        drop(g);
        let g = store(dir.path());
        assert_eq!(g.fetch("g", "t", 0).map(|c| c.offset), Some(9));
        assert_eq!(
            g.fetch("g", "t", 1).and_then(|c| c.metadata),
            Some("m".into())
        );
        assert_eq!(g.list(), vec!["g".to_string(), "h".to_string()]);
        assert_eq!(g.group_offsets("g").expect("offsets").len(), 2);
        assert!(matches!(
            g.group_offsets("x"),
            Err(StorageError::GroupNotFound { .. })
        ));
        g.delete_topic("u").expect("delete topic");
        assert_eq!(g.list(), vec!["g".to_string()]);
        assert!(g.damaged().is_empty());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = store(dir.path());
        assert!(g.commit("../x", "t", &[(0, 1, None)]).is_err());
        assert!(g.commit("g", "a/b", &[(0, 1, None)]).is_err());
        assert!(g
            .commit(
                "g",
                "t",
                &[(0, 1, Some("x".repeat(MAX_METADATA_BYTES + 1)))]
            )
            .is_err());
        assert!(g.list().is_empty());
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn torn_or_flipped_files_are_never_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = store(dir.path());
        g.commit(
            "g",
            "t",
            &[(0, 123_456, Some("meta".into())), (1, 99, None)],
        )
        .expect("commit");
        drop(g);
        let path = dir.path().join("g.offsets");
        let good = fs::read(&path).expect("read");
        let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            cases.push(b);
        }
        for bytes in cases {
            let _ = fs::remove_file(dir.path().join("g.offsets.corrupt"));
            fs::write(&path, &bytes).expect("write");
            let g = store(dir.path());
            // Never a wrong offset: either nothing, or exactly what was committed.
            assert!(g.fetch("g", "t", 0).is_none(), "damaged file was read");
            assert_eq!(g.damaged().len(), 1);
            assert!(!path.exists(), "moved aside");
        }
    }

    #[test]
    fn leftover_temp_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = store(dir.path());
        g.commit("g", "t", &[(0, 1, None)]).expect("commit");
        drop(g);
        fs::write(dir.path().join("g.offsets.tmp"), b"garbage").expect("write");
        let g = store(dir.path());
        assert_eq!(g.fetch("g", "t", 0).map(|c| c.offset), Some(1));
        assert!(!dir.path().join("g.offsets.tmp").exists());
    }

    proptest! {
        #[test]
        fn codec_round_trips(entries in proptest::collection::vec(
            ("[a-z]{1,8}", 0u32..100, any::<u64>(), any::<i64>(), proptest::option::of("\\PC{0,20}")), 0..20)) {
            let map: GroupMap = entries.into_iter().map(|(t, p, o, ts, m)| {
                ((t, p), CommittedOffset { offset: o, metadata: m, commit_time_ms: ts })
            }).collect();
            prop_assert_eq!(decode(&encode(&map)).expect("decode"), map);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
