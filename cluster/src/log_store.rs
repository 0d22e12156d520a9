//! The durable Raft log and vote of one group: openraft's `RaftLogStorage`.
//!
//! Layout, in the group's folder:
//! - `vote`: the current vote, one frame, replaced atomically (temporary file, fsync, rename,
//!   folder fsync) before it is reported saved, so a broker never votes twice in a term.
//! - `log`, `log.1`, `log.2`, ...: append-only files of frames, each an [`Op`]: entries
//!   appended, a tail truncated, a head purged. A file is sealed at the policy's size
//!   ([`DEFAULT_SEGMENT_BYTES`] unless set) and the next one begun; a sealed file is deleted
//!   once all its entries are purged (see [`files`]). Opening replays the ops of every file
//!   in order; the log ends at the first torn frame (short, or a bad CRC), as a crash
//!   mid-append leaves it, and what follows is cut off.
//!
//! **When an append counts.** openraft counts an entry toward the commit once the storage
//! reports it flushed (`LogFlushed::log_io_completed`), on the leader and on each follower.
//! Whether that report waits for an fsync is the group's [`LogPolicy`], per entry: an entry
//! that must be durable (a `durable` produce, a membership change, a blank, every controller
//! entry) is fsynced first; any other (a `leader` or `quorum` produce) is reported once it is
//! written to the file (the page cache). Reports are made in log order, so one durable entry
//! makes every entry before it wait for the same fsync.
//!
//! **Group commit.** File work runs on one writer thread per group, fed by a queue:
//! `append` records the entries in memory and queues their frame; the thread writes every
//! frame queued meanwhile in one `write`, fsyncs once if any of them must be durable, then
//! reports them all. An append that needs no fsync, when nothing is queued and the thread is
//! idle, is written in place by the caller instead (one `write` into the page cache, under
//! the same lock the thread writes under, so the order of writes and reports is kept): the
//! hop to the thread and back was on every entry's way to the commit, on each replica. While it fsyncs, later appends queue up and share the next fsync. A
//! second thread per log (`syncer`) fsyncs frames left unsynced for [`BACKGROUND_FLUSH_MS`]
//! (busy or idle), so page-cache-only entries reach the disk soon anyway, without appends
//! waiting behind that fsync.
//!
//! **Memory.** Only the newest entries stay in memory (32 MiB of them per group,
//! `resident::RESIDENT_BUDGET_BYTES`, plus any not yet written): openraft purges
//! only after a snapshot, thousands of entries behind, so keeping every live entry held
//! hundreds of MB per partition. Each index keeps its log id and where its frame lies in the
//! file; an older entry is read back from there (a pread, CRC checked), which happens only for
//! a follower far behind or after a restart.
//!
//! A frame is `len: u32 LE`, `crc32: u32 LE` (of the payload), then `len` bytes of bincode.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::types::{Command, Entry, LogId, StorageError, TypeConfig, Vote};

mod files;
pub(crate) use files::{sync_dir, write_atomic};
mod frame;
mod placement;
mod resident;
mod syncer;
mod waiters;

pub use placement::Placement;
pub use waiters::AppendWaiters;

use files::Sealed;
use frame::{encode_append_frame, encode_frame, invalid, next_frame, parse_frame, Frame};

use resident::{Got, Mem, Pos, ReplaySieve, RESIDENT_BUDGET_BYTES};
use syncer::Syncer;

/// Name of the log file in a group folder.
const LOG_FILE: &str = "log";
/// Name of the vote file in a group folder.
const VOTE_FILE: &str = "vote";
/// A log file is sealed, and the next begun, once it holds this much (see [`files`]), unless
/// the group's [`LogPolicy::segment_bytes`] says otherwise.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// The smallest file size a policy may set.
pub const MIN_SEGMENT_BYTES: u64 = 4 << 10;
/// How long the writer thread leaves frames unsynced at most.
pub const BACKGROUND_FLUSH_MS: u64 = 200;
/// The log file's blocks are reserved this far past its end, a chunk at a time (see
/// [`Writer::reserve`]): at most this much disk per group is allocated and not yet written.
const PREALLOCATE_CHUNK_BYTES: u64 = 8 << 20;

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

/// How a group's log treats its entries.
#[derive(Clone)]
pub struct LogPolicy {
    /// Whether a normal entry's command must be fsynced before openraft counts it. Blank and
    /// membership entries always are.
    pub must_sync: fn(&Command) -> bool,
    /// Writers waiting for their entry to be appended to this log (leader acks), if any.
    pub waiters: Option<AppendWaiters>,
    /// The size at which a log file is sealed and the next begun (at least
    /// [`MIN_SEGMENT_BYTES`]; smaller is taken as that).
    pub segment_bytes: u64,
    /// Where entries' data may be written instead of this log (see [`Placement`]), if
    /// anywhere.
    pub placement: Option<Arc<dyn Placement>>,
    /// How many records a normal entry's command adds (a produce's batch), for a
    /// follower's lag in records ([`AppendWaiters::records_between`]); 0 for every entry by
    /// default.
    pub records_of: fn(&Command) -> u64,
}

impl Default for LogPolicy {
    /// Every entry fsynced before it counts; nobody waits for appends; 64 MiB files.
    fn default() -> Self {
        LogPolicy {
            must_sync: |_| true,
            waiters: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            placement: None,
            records_of: |_| 0,
        }
    }
}

/// What to do once a queued frame is written (and fsynced, if asked).
enum Done {
    /// Report an append to openraft, and wake the writers waiting for its entries.
    Flushed(LogFlushed<TypeConfig>, Vec<(oneshot::Sender<LogId>, LogId)>),
    /// Wake one caller.
    Notify(oneshot::Sender<io::Result<()>>),
    /// Nothing: nobody waits (a purge).
    Nothing,
}

impl Done {
    /// Tells whoever waits how the write went.
    fn report(self, r: io::Result<()>) {
        match self {
            Done::Flushed(callback, waiters) => {
                if r.is_ok() {
                    for (tx, log_id) in waiters {
                        let _ = tx.send(log_id);
                    }
                }
                callback.log_io_completed(r);
            }
            Done::Notify(tx) => {
                let _ = tx.send(r);
            }
            Done::Nothing => {}
        }
    }
}

/// One unit of work for the writer thread.
struct Job {
    frame: Frame,
    /// The entries in the frame, if an append: their position is recorded once written.
    log_ids: Vec<LogId>,
    sync: bool,
    /// A purge: see whether sealed files can be deleted after it.
    purge: bool,
    done: Done,
}

/// The durable Raft log and vote of one group. Cheap to clone: clones share the log.
#[derive(Clone)]
pub struct LogStore {
    dir: PathBuf,
    mem: Arc<Mutex<Mem>>,
    jobs: mpsc::Sender<Job>,
    /// The file side, shared with the writer thread: an append that needs no fsync, with
    /// nothing queued before it, is written in place by the caller (see [`LogStore::append`]).
    writer: Arc<Mutex<Writer>>,
    /// Jobs handed to the writer thread and not yet written; changed under the writer lock
    /// (decrements) or before the send (increments), so a caller that holds the lock and sees
    /// 0 knows nothing it must follow is waiting.
    pending: Arc<AtomicUsize>,
    policy: LogPolicy,
    fsyncs: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens (or creates) the log and vote in `dir`, every entry fsynced before it counts.
    /// Blocking: call from a blocking thread.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        LogStore::open_with(dir, LogPolicy::default())
    }

    /// Opens (or creates) the log and vote in `dir`, replaying the log and cutting a torn
    /// tail, and starts its writer thread (which ends when the last clone is dropped).
    /// Blocking: call from a blocking thread.
    pub fn open_with(dir: &Path, policy: LogPolicy) -> io::Result<LogStore> {
        LogStore::open_budget(dir, policy, RESIDENT_BUDGET_BYTES)
    }

    /// [`LogStore::open_with`], keeping at most `budget_bytes` of written entries in memory.
    fn open_budget(dir: &Path, policy: LogPolicy, budget_bytes: u64) -> io::Result<LogStore> {
        let segment_bytes = policy.segment_bytes.max(MIN_SEGMENT_BYTES);
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
        let mut mem = Mem::new(vote, budget_bytes);
        mem.records_of = policy.records_of;
        mem.replay_sieve = policy.placement.clone().map(|placement| ReplaySieve {
            placement,
            seen: Vec::new(),
        });
        let replayed = files::replay(dir, &mut mem)?;
        // Entries whose placed data a crash lost (or a truncation dropped before its own
        // frame was written) leave the log now, before anything reads them.
        let cut_from = match &policy.placement {
            Some(placement) => placement.reopen(&mem.replayed_entries())?,
            None => None,
        };
        if let Some(index) = cut_from {
            tracing::warn!(dir = %dir.display(), index, "cutting Raft log entries whose placed data is gone");
            mem.apply(Op::Truncate(index), None);
        }
        let file = replayed.file;
        sync_dir(dir)?;
        let mem = Arc::new(Mutex::new(mem));
        if let Some(w) = &policy.waiters {
            // A second open of the same waiters keeps the first log: a group's waiters
            // belong to one log.
            let _ = w.inner.log.set(Arc::downgrade(&mem));
        }
        let (jobs, queue) = mpsc::channel();
        let fsyncs = Arc::new(AtomicU64::new(0));
        let syncer = Syncer::start(
            dir.to_path_buf(),
            &file,
            fsyncs.clone(),
            policy.placement.clone(),
        )?;
        let mut writer = Writer {
            placement: policy.placement.clone(),
            fsyncs: fsyncs.clone(),
            dir: dir.to_path_buf(),
            file,
            reader: replayed.reader,
            seq: replayed.seq,
            segment_bytes,
            max_index: replayed.max_index,
            sealed: replayed.sealed,
            file_bytes: replayed.file_bytes,
            reserved_bytes: Some(replayed.file_bytes),
            syncer,
            failed: None,
            mem: mem.clone(),
        };
        if let Some(index) = cut_from {
            let job = Job {
                frame: encode_frame(&Op::Truncate(index))?.into(),
                log_ids: Vec::new(),
                sync: true,
                purge: false,
                done: Done::Nothing,
            };
            writer.write_batch(std::slice::from_ref(&job))?;
        }
        let writer = Arc::new(Mutex::new(writer));
        let pending = Arc::new(AtomicUsize::new(0));
        {
            let (writer, pending) = (writer.clone(), pending.clone());
            std::thread::Builder::new()
                .name("rill-raft-log".into())
                .spawn(move || Writer::run(&writer, &pending, queue))?;
        }
        Ok(LogStore {
            dir: dir.to_path_buf(),
            mem,
            jobs,
            writer,
            pending,
            policy,
            fsyncs,
        })
    }

    /// How many fsyncs of the log file the writer and syncing threads have made (appends,
    /// truncations, background flushes), since open.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Queues a frame for the writer thread.
    fn submit(&self, job: Job) -> io::Result<()> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            io::Error::other("the Raft log's writer thread has stopped")
        })
    }

    /// Writes `job` in place when no fsync is due and nothing queued must land first: one
    /// `write` into the page cache, as the partition's own append, without the hop to the
    /// writer thread and back on every entry's way to the commit. Otherwise (an fsync, a
    /// queue, or the thread busy with a batch) the writer thread takes it. Either way the job
    /// is reported (its `done`), in log order.
    fn write_in_place_or_queue(&self, job: Job) -> io::Result<()> {
        if !job.sync {
            if let Some(mut w) = self.writer.try_lock() {
                if self.pending.load(Ordering::SeqCst) == 0 {
                    let result = w.write_batch(std::slice::from_ref(&job));
                    let failed = result
                        .as_ref()
                        .err()
                        .map(|e| io::Error::new(e.kind(), e.to_string()));
                    job.done.report(result);
                    return failed.map_or(Ok(()), Err);
                }
            }
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            let e = io::Error::other("the Raft log's writer thread has stopped");
            job.done
                .report(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
        Ok(())
    }

    /// Queues a frame and waits until it is written (and fsynced, if `sync`).
    async fn write_and_wait(&self, frame: Vec<u8>, sync: bool) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job {
            frame: frame.into(),
            log_ids: Vec::new(),
            sync,
            purge: false,
            done: Done::Notify(tx),
        })?;
        rx.await
            .map_err(|_| io::Error::other("the Raft log's writer thread has stopped"))?
    }

    /// Records `entries` in memory (readable at once, as openraft expects) and writes or
    /// queues their frame, with each placed entry's stub in it (see [`Placement`]); `done`,
    /// made with the entries' waiting writers, is reported once the frame is written.
    fn append_entries(
        &self,
        entries: Vec<Entry>,
        done: impl FnOnce(Vec<(oneshot::Sender<LogId>, LogId)>) -> Done,
    ) -> io::Result<()> {
        let sync = entries.iter().any(|e| self.must_sync(e));
        let log_ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
        let waiters = match &self.policy.waiters {
            Some(w) => w.take(&entries),
            None => Vec::new(),
        };
        let done = done(waiters);
        let framed = self
            .policy
            .placement
            .as_ref()
            .and_then(|p| placement::frame_entries(p.as_ref(), &entries));
        let frame = match encode_append_frame(framed.as_deref().unwrap_or(&entries)) {
            Ok(f) => f,
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                done.report(Err(e));
                return Err(copy);
            }
        };
        self.mem.lock().apply(Op::Append(entries), None);
        self.write_in_place_or_queue(Job {
            frame,
            log_ids,
            sync,
            purge: false,
            done,
        })
    }

    /// Appends `entries` as openraft's append does, and waits until their frame is written.
    /// Blocking; for tests of what uses the log.
    #[cfg(test)]
    pub(crate) fn append_blocking(&self, entries: Vec<Entry>) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.append_entries(entries, |_| Done::Notify(tx))?;
        rx.blocking_recv()
            .map_err(|_| io::Error::other("the Raft log's writer thread has stopped"))?
    }

    /// The bytes of the log's files, for tests of what is written where.
    #[cfg(test)]
    pub(crate) fn file_bytes(&self) -> u64 {
        let w = self.writer.lock();
        w.sealed.len() as u64 * w.segment_bytes + w.file_bytes
    }

    /// Whether `entry` must be fsynced before it counts, under this log's policy.
    fn must_sync(&self, entry: &Entry) -> bool {
        match &entry.payload {
            EntryPayload::Normal(c) => (self.policy.must_sync)(c),
            EntryPayload::Blank | EntryPayload::Membership(_) => true,
        }
    }
}

/// The writer thread's side of a log: the file, and what it knows of it.
struct Writer {
    dir: PathBuf,
    file: File,
    /// A read handle of the same file, which positions of entries written to it name.
    reader: Arc<File>,
    /// The file's number (see [`files::path`]).
    seq: u64,
    /// The file is sealed, and the next begun, once it holds this much.
    segment_bytes: u64,
    /// The highest index an entry appended to this file had.
    max_index: Option<u64>,
    /// The sealed files before it, oldest first.
    sealed: std::collections::VecDeque<Sealed>,
    file_bytes: u64,
    /// How far the file's blocks are reserved ([`Writer::reserve`]); `None` once reserving
    /// failed (a filesystem without `fallocate`): the log is then written as before.
    reserved_bytes: Option<u64>,
    /// Fsyncs frames written without one, in the background.
    syncer: Syncer,
    /// The first write error: the file may end in a partial frame, so nothing more is written.
    failed: Option<String>,
    mem: Arc<Mutex<Mem>>,
    fsyncs: Arc<AtomicU64>,
    /// Synced before the log is, so that a stub on disk names data on disk.
    placement: Option<Arc<dyn Placement>>,
}

impl Writer {
    /// Writes what is queued until the log is closed. Dropping the writer at the end stops
    /// its syncer, which first fsyncs whatever is still unsynced.
    /// The writer thread's loop: takes the writer lock, then everything queued, writes it,
    /// and reports it, all under the lock, so an append written in place by a caller (which
    /// holds the same lock) never lands or is reported before a job queued ahead of it.
    fn run(writer: &Mutex<Writer>, pending: &AtomicUsize, queue: mpsc::Receiver<Job>) {
        loop {
            let Ok(first) = queue.recv() else {
                return;
            };
            let mut w = writer.lock();
            let mut batch = vec![first];
            while let Ok(job) = queue.try_recv() {
                batch.push(job);
            }
            let result = w.write_batch(&batch);
            pending.fetch_sub(batch.len(), Ordering::SeqCst);
            for job in batch {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                job.done.report(r);
            }
        }
    }

    /// Writes the batch's frames in one write (sealing the file first if it is full), fsyncs
    /// once if any job asks for it, and deletes the files a purge among them freed.
    fn write_batch(&mut self, batch: &[Job]) -> io::Result<()> {
        if let Some(e) = self.failed.clone().or_else(|| self.syncer.failed()) {
            return Err(io::Error::other(format!(
                "an earlier Raft log write failed: {e}"
            )));
        }
        let result = self.write_frames(batch);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn write_frames(&mut self, batch: &[Job]) -> io::Result<()> {
        if self.file_bytes >= self.segment_bytes {
            self.roll()?;
        }
        let mut pending: Vec<&Frame> = Vec::with_capacity(batch.len());
        // The appends among them, with where their frame lands.
        let mut placed: Vec<(&[LogId], u64, u32)> = Vec::new();
        let mut at = self.file_bytes;
        for job in batch {
            pending.push(&job.frame);
            if !job.log_ids.is_empty() {
                let len = u32::try_from(job.frame.len()).map_err(io::Error::other)?;
                placed.push((&job.log_ids, at, len));
            }
            at += job.frame.len() as u64;
        }
        self.write_pending(&mut pending)?;
        self.place(&mut placed);
        if batch.iter().any(|j| j.sync) {
            self.sync_active()?;
        }
        if batch.iter().any(|j| j.purge) {
            self.delete_purged_files();
        }
        Ok(())
    }

    /// Fsyncs the log: the sealed files not yet synced, then the file being appended to.
    /// Everything written so far is then on disk.
    fn sync_active(&mut self) -> io::Result<()> {
        if let Some(placement) = &self.placement {
            placement.sync()?;
        }
        self.syncer.sync_sealed()?;
        self.file.sync_data()?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.syncer.synced();
        Ok(())
    }

    /// Seals the file and begins the next, headed by the current purge point so that it
    /// replays without the files before it. Nothing here waits for the disk: the syncer
    /// fsyncs the sealed file and the folder in the background, and any fsync the writer
    /// makes itself syncs them first ([`Writer::sync_active`]). Until then a crash may tear
    /// the sealed file; a replay then ends the log at the tear, as it would in one file.
    fn roll(&mut self) -> io::Result<()> {
        let seq = self.seq + 1;
        let path = files::path(&self.dir, seq);
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        let head = match self.mem.lock().last_purged {
            Some(purged) => encode_frame(&Op::Purge(purged))?,
            None => Vec::new(),
        };
        file.write_all(&head)?;
        self.syncer.replace_file(&self.file, &file)?;
        self.sealed.push_back(Sealed {
            seq: self.seq,
            max_index: self.max_index,
        });
        self.reader = Arc::new(File::open(&path)?);
        self.file = file;
        self.seq = seq;
        self.max_index = None;
        self.file_bytes = head.len() as u64;
        if self.reserved_bytes.is_some() {
            self.reserved_bytes = Some(self.file_bytes);
        }
        Ok(())
    }

    /// Hands the sealed files whose entries are all purged, oldest first, to the syncer,
    /// which deletes them after its next fsync (covering the purge just written).
    /// Positions held by readers keep a deleted file's contents readable until dropped.
    fn delete_purged_files(&mut self) {
        let Some(purged) = self.mem.lock().last_purged.map(|p| p.index) else {
            return;
        };
        let mut doomed = Vec::new();
        while let Some(sealed) = self.sealed.front() {
            if sealed.max_index.is_some_and(|m| m > purged) {
                break;
            }
            doomed.push(files::path(&self.dir, sealed.seq));
            self.sealed.pop_front();
        }
        if !doomed.is_empty() {
            self.syncer.delete_after_sync(doomed);
        }
    }

    /// Writes `frames` with one `writev` (more only if the system takes fewer pieces at a
    /// time) and empties it: their pieces go from the entries to the file as they are.
    fn write_pending(&mut self, frames: &mut Vec<&Frame>) -> io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        self.reserve(bytes as u64);
        frame::write_frames(&mut self.file, frames)?;
        frames.clear();
        self.file_bytes += bytes as u64;
        self.syncer.mark_dirty();
        Ok(())
    }

    /// Reserves the file's blocks a chunk ahead of its end, before `bytes` more are written
    /// there, without changing its size (`fallocate` with `FALLOC_FL_KEEP_SIZE`: the replay
    /// still reads frames up to the size, and cutting a torn tail frees what lies past it).
    ///
    /// Why: an append into blocks reserved ahead costs the kernel about a third less than
    /// one that extends the file and has ext4 allocate (and later convert) blocks page by
    /// page, measured on the Raft log's own writes (BENCHMARKS.md, "RF 3: the Raft log's
    /// blocks reserved ahead"); every replicated batch is written here on every replica,
    /// the leader's write and a follower's both on the way to the commit. A failure to
    /// reserve is not a failure to write: the log goes on without reserving.
    fn reserve(&mut self, bytes: u64) {
        let Some(reserved) = self.reserved_bytes else {
            return;
        };
        let end = self.file_bytes + bytes;
        if end <= reserved {
            return;
        }
        let target = end + PREALLOCATE_CHUNK_BYTES;
        let from = self.file_bytes.max(reserved);
        let result = rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            from,
            target - from,
        );
        match result {
            Ok(()) => self.reserved_bytes = Some(target),
            Err(e) => {
                tracing::warn!(
                    dir = %self.dir.display(), error = %e,
                    "cannot reserve the Raft log's blocks ahead; writing without"
                );
                self.reserved_bytes = None;
            }
        }
    }

    /// Records where the appends just written lie, and empties `placed`.
    fn place(&mut self, placed: &mut Vec<(&[LogId], u64, u32)>) {
        if placed.is_empty() {
            return;
        }
        self.max_index = placed
            .iter()
            .flat_map(|(log_ids, _, _)| log_ids.iter().map(|l| l.index))
            .chain(self.max_index)
            .max();
        let mut mem = self.mem.lock();
        for (log_ids, offset, len) in placed.drain(..) {
            let pos = Pos {
                file: self.reader.clone(),
                offset,
                len,
            };
            mem.placed(log_ids, &pos);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let read_err = |e: &io::Error| StorageError::from(StorageIOError::read_logs(e));
        let got = self.mem.lock().get(range).map_err(|e| read_err(&e))?;
        let is_stub = |g: &Got| match (g, &self.policy.placement) {
            (Got::Here(e), Some(p)) => {
                matches!(&e.payload, EntryPayload::Normal(c) if p.is_stub(c))
            }
            _ => false,
        };
        if got.iter().all(|g| matches!(g, Got::Here(_)) && !is_stub(g)) {
            return Ok(got
                .into_iter()
                .filter_map(|g| match g {
                    Got::Here(e) => Some(e),
                    Got::There(..) => None,
                })
                .collect());
        }
        // Some were evicted, or hold a stub (replayed at open): read back from their frames
        // and placed data, off the async workers. Each position holds its file open, so a
        // deletion of its file meanwhile does not lose them.
        let placement = self.policy.placement.clone();
        tokio::task::spawn_blocking(move || {
            let entries = resident::read_back(got)?;
            match placement {
                Some(p) => placement::unstub_all(p.as_ref(), entries),
                None => Ok(entries),
            }
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|e| read_err(&e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.mem.lock();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (vote, dir, mem) = (*vote, self.dir.clone(), self.mem.clone());
        tokio::task::spawn_blocking(move || {
            let frame = encode_frame(&vote)?;
            write_atomic(&dir, VOTE_FILE, &frame)?;
            mem.lock().vote = Some(vote);
            Ok::<_, io::Error>(())
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.mem.lock().vote)
    }

    /// Records the entries in memory (readable at once, as openraft expects) and queues
    /// their frame; the writer thread reports them flushed (see the module doc).
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
        self.append_entries(entries, |waiters| Done::Flushed(callback, waiters))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let op = Op::Truncate(log_id.index);
        let result = async {
            if let Some(placement) = &self.policy.placement {
                placement.truncate_from(log_id.index)?;
            }
            let frame = encode_frame(&op)?;
            self.mem.lock().apply(op, None);
            // Fsynced: a truncated tail must not come back after a crash.
            self.write_and_wait(frame, true).await
        };
        result
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let op = Op::Purge(log_id);
        let result = (|| {
            let frame = encode_frame(&op)?;
            self.mem.lock().apply(op, None);
            // No fsync, and nobody waits: purged entries that reappear after a crash are
            // harmless (they are behind the state machine's applied index and get purged
            // again).
            self.submit(Job {
                frame: frame.into(),
                log_ids: Vec::new(),
                sync: false,
                purge: true,
                done: Done::Nothing,
            })
        })();
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests;
