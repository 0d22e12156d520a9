//! The durable Raft log and vote of one group: openraft's `RaftLogStorage`.
//!
//! Layout, in the group's folder:
//! - `vote`: the current vote, one frame, replaced atomically (temporary file, fsync, rename,
//!   folder fsync) before it is reported saved, so a broker never votes twice in a term.
//! - `log`: an append-only file of frames, each an [`Op`]: entries appended, a tail truncated,
//!   a head purged. Appends are fsynced before openraft is told they are flushed, because
//!   a follower's flushed entries count toward the commit. Opening replays the ops; a torn
//!   last frame (short, or a bad CRC) is cut off, as a crash mid-append leaves it.
//!
//! Entries live in memory between purges too (openraft purges behind the applied index, so
//! the live tail is short); the file is rewritten when purged frames dominate it.
//!
//! A frame is `len: u32 LE`, `crc32: u32 LE` (of the payload), then `len` bytes of bincode.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, StorageIOError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Name of the log file in a group folder.
const LOG_FILE: &str = "log";
/// Name of the vote file in a group folder.
const VOTE_FILE: &str = "vote";
/// The largest frame accepted at open; a larger length is damage, not data.
const MAX_FRAME_BYTES: u32 = 256 << 20;
/// A log file smaller than this is never rewritten.
const COMPACT_MIN_BYTES: u64 = 8 << 20;

/// One change to the log, as written in a frame.
#[derive(Serialize, Deserialize)]
enum Op {
    /// Entries appended after the current last one.
    Append(Vec<Entry>),
    /// Every entry from this index on removed (a diverged tail).
    Truncate(u64),
    /// Every entry up to and including this log id removed (applied and no longer needed).
    Purge(LogId),
}

/// The in-memory image of the log file.
struct Inner {
    dir: PathBuf,
    file: File,
    file_bytes: u64,
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
}

/// The durable Raft log and vote of one group. Cheap to clone: clones share the log.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

impl LogStore {
    /// Opens (or creates) the log and vote in `dir`, replaying the log and cutting a torn tail.
    /// Blocking: call from a blocking thread.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let vote = match std::fs::read(dir.join(VOTE_FILE)) {
            Ok(bytes) => {
                let (payload, _) = parse_frame(&bytes).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "the vote file is damaged")
                })?;
                Some(bincode::deserialize::<Vote>(payload).map_err(invalid)?)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        let mut pos = 0usize;
        while let Some((payload, len)) = parse_frame(&bytes[pos..]) {
            let Ok(op) = bincode::deserialize::<Op>(payload) else {
                break;
            };
            apply_op(&mut entries, &mut last_purged, op);
            pos += len;
        }
        if pos < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept = pos,
                cut = bytes.len() - pos,
                "cutting a torn tail off the Raft log"
            );
            file.set_len(pos as u64)?;
            file.sync_all()?;
        }
        sync_dir(dir)?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file,
                file_bytes: pos as u64,
                entries,
                last_purged,
                vote,
            })),
        })
    }

    /// Runs blocking file work off the async worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock()))
            .await
            .map_err(io::Error::other)?
    }
}

impl Inner {
    /// Appends one op as a frame; fsyncs it when `sync`.
    fn write_op(&mut self, op: &Op, sync: bool) -> io::Result<()> {
        let frame = encode_frame(op)?;
        self.file.write_all(&frame)?;
        if sync {
            self.file.sync_data()?;
        }
        self.file_bytes += frame.len() as u64;
        Ok(())
    }

    /// Rewrites the log file with only the live entries, when purged frames dominate it.
    fn maybe_compact(&mut self) -> io::Result<()> {
        if self.file_bytes < COMPACT_MIN_BYTES {
            return Ok(());
        }
        let live: Vec<Entry> = self.entries.values().cloned().collect();
        let live_bytes = bincode::serialized_size(&live).map_err(invalid)?;
        if live_bytes * 2 > self.file_bytes {
            return Ok(());
        }
        let tmp = self.dir.join("log.tmp");
        let mut out = File::create(&tmp)?;
        let mut written = 0u64;
        if let Some(purged) = self.last_purged {
            let frame = encode_frame(&Op::Purge(purged))?;
            out.write_all(&frame)?;
            written += frame.len() as u64;
        }
        let frame = encode_frame(&Op::Append(live))?;
        out.write_all(&frame)?;
        written += frame.len() as u64;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, self.dir.join(LOG_FILE))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        self.file_bytes = written;
        Ok(())
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(self.last_purged)
    }
}

/// Applies one replayed or new op to the in-memory image.
fn apply_op(entries: &mut BTreeMap<u64, Entry>, last_purged: &mut Option<LogId>, op: Op) {
    match op {
        Op::Append(new) => {
            for e in new {
                entries.insert(e.get_log_id().index, e);
            }
        }
        Op::Truncate(since) => {
            entries.split_off(&since);
        }
        Op::Purge(upto) => {
            let kept = entries.split_off(&(upto.index + 1));
            *entries = kept;
            if last_purged.is_none_or(|p| p.index < upto.index) {
                *last_purged = Some(upto);
            }
        }
    }
}

fn encode_frame<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let payload = bincode::serialize(value).map_err(invalid)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a Raft frame over 256 MiB"))?;
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// The payload of the frame at the start of `bytes` and the frame's whole length, or `None`
/// if the frame is short or damaged.
fn parse_frame(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    if len > MAX_FRAME_BYTES {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some((payload, 8 + len as usize))
}

fn invalid(e: bincode::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Fsyncs a folder, so a created or renamed file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.inner.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.inner.lock();
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |inner| {
            let frame = encode_frame(&vote)?;
            write_atomic(&inner.dir, VOTE_FILE, &frame)?;
            inner.vote = Some(vote);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.inner.lock().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self
            .blocking(move |inner| {
                let op = Op::Append(entries);
                inner.write_op(&op, true)?;
                let Inner {
                    entries,
                    last_purged,
                    ..
                } = inner;
                apply_op(entries, last_purged, op);
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e).into();
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |inner| {
            let op = Op::Truncate(log_id.index);
            inner.write_op(&op, true)?;
            let Inner {
                entries,
                last_purged,
                ..
            } = inner;
            apply_op(entries, last_purged, op);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |inner| {
            // No fsync: purged entries that reappear after a crash are harmless (they are
            // behind the state machine's applied index and get purged again).
            let op = Op::Purge(log_id);
            inner.write_op(&op, false)?;
            let Inner {
                entries,
                last_purged,
                ..
            } = inner;
            apply_op(entries, last_purged, op);
            inner.maybe_compact()
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(crate::types::Command(vec![index as u8; 10])),
        }
    }

    fn append_sync(store: &LogStore, entries: Vec<Entry>) {
        let mut inner = store.inner.lock();
        let op = Op::Append(entries);
        inner.write_op(&op, true).expect("write");
        let Inner {
            entries,
            last_purged,
            ..
        } = &mut *inner;
        apply_op(entries, last_purged, op);
    }

    #[test]
    fn reopen_keeps_entries_truncation_purge_and_vote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        {
            let mut store = LogStore::open(dir.path()).expect("open");
            append_sync(&store, (1..=5).map(|i| entry(1, i)).collect());
            rt.block_on(async {
                store.truncate(entry(1, 4).log_id).await.expect("truncate");
                store.purge(entry(1, 1).log_id).await.expect("purge");
                store
                    .save_vote(&Vote::new_committed(3, 2))
                    .await
                    .expect("vote");
            });
        }
        let mut store = LogStore::open(dir.path()).expect("reopen");
        rt.block_on(async {
            let state = store.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
            let got = store.try_get_log_entries(0..10).await.expect("read");
            let idx: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
            assert_eq!(idx, vec![2, 3]);
            assert_eq!(
                store.read_vote().await.expect("vote"),
                Some(Vote::new_committed(3, 2))
            );
        });
    }

    #[test]
    fn a_torn_last_frame_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = LogStore::open(dir.path()).expect("open");
            append_sync(&store, vec![entry(1, 1)]);
            append_sync(&store, vec![entry(1, 2)]);
        }
        let path = dir.path().join(LOG_FILE);
        let len = std::fs::metadata(&path).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 3).expect("tear");
        drop(f);
        let store = LogStore::open(dir.path()).expect("reopen");
        let inner = store.inner.lock();
        assert_eq!(inner.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert!(inner.file_bytes < len - 3, "the torn frame was cut");
        drop(inner);
        // Appends after the cut land after the last good frame.
        append_sync(&store, vec![entry(2, 2)]);
        drop(store);
        let store = LogStore::open(dir.path()).expect("reopen again");
        let inner = store.inner.lock();
        assert_eq!(
            inner.entries.get(&2).map(|e| e.log_id.leader_id.term),
            Some(2)
        );
    }

    #[test]
    fn a_damaged_vote_file_is_an_error_not_a_missing_vote() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(VOTE_FILE), b"garbage!!").expect("write");
        // Forgetting a vote could let this node vote twice in a term: refuse to open.
        assert!(LogStore::open(dir.path()).is_err());
    }
}
