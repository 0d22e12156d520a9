//! The Raft log's background fsync, on a thread of its own.
//!
//! Frames written without an fsync (`leader` and `quorum` produces) are fsynced at most
//! [`super::BACKGROUND_FLUSH_MS`] after the first of them was written. That fsync used to run
//! on the writer thread, so every append queued behind it waited for it: tens of ms on a busy
//! disk, every 200 ms, on each replica, which set a replicated partition's p99 and cut its
//! throughput (BENCHMARKS.md, "Replication"). Here it runs beside the writer: appends go on
//! while it syncs, and an fsync covers every frame written before it started, so nothing is
//! left unsynced longer than before.
//!
//! The same thread finishes what sealing a file leaves (see `files`): the sealed file's
//! fsync and the folder's (which holds the new file), and the deletion of purged files once
//! an fsync covers the purge. None of that waits on the writer's path; a writer that must
//! know the sealed files are on disk (before it reports a durable entry) calls
//! [`Syncer::sync_sealed`].

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What the writer and the syncing thread share.
struct Shared {
    dir: PathBuf,
    /// The log file as the writer has it now (replaced when the writer begins the next file).
    file: Mutex<File>,
    /// Sealed files not fsynced since, and whether the folder needs one (a new file in it).
    /// Held while they are synced, so a writer that must know them on disk waits for a sync
    /// in progress rather than pass it.
    sealing: Mutex<Sealing>,
    /// Files whose entries are all purged: deleted after the next fsync, which covers the
    /// purge (a replay without it would miss their entries and not know them purged).
    doomed: Mutex<Vec<PathBuf>>,
    /// Since when frames written without an fsync wait for one.
    dirty_since: Mutex<Option<Instant>>,
    /// The first background fsync failure: nothing after it may be trusted as synced.
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
    fsyncs: Arc<AtomicU64>,
    /// Synced before the log file, so that a stub on disk names data on disk.
    placement: Option<Arc<dyn super::Placement>>,
}

/// See [`Shared::sealing`].
#[derive(Default)]
struct Sealing {
    files: Vec<File>,
    dir_dirty: bool,
}

/// The writer's handle on its syncing thread, which ends when this is dropped (after a last
/// fsync of anything still unsynced).
pub(super) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the syncing thread of the log file `file` (a handle of its own is kept) in
    /// `dir`, counting each fsync in `fsyncs`.
    pub(super) fn start(
        dir: PathBuf,
        file: &File,
        fsyncs: Arc<AtomicU64>,
        placement: Option<Arc<dyn super::Placement>>,
    ) -> io::Result<Syncer> {
        let shared = Arc::new(Shared {
            dir,
            file: Mutex::new(file.try_clone()?),
            sealing: Mutex::new(Sealing::default()),
            doomed: Mutex::new(Vec::new()),
            dirty_since: Mutex::new(None),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            fsyncs,
            placement,
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rill-raft-sync".into())
            .spawn(move || run(&for_thread))?;
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Frames were written without an fsync: one comes within the flush interval.
    pub(super) fn mark_dirty(&self) {
        self.shared
            .dirty_since
            .lock()
            .get_or_insert_with(Instant::now);
    }

    /// The writer fsynced the file itself: everything written so far is synced.
    pub(super) fn synced(&self) {
        *self.shared.dirty_since.lock() = None;
    }

    /// The writer sealed `old` and began `new` in the folder: both, and the folder, are
    /// fsynced by the next background pass (or [`Syncer::sync_sealed`]).
    pub(super) fn replace_file(&self, old: &File, new: &File) -> io::Result<()> {
        let old = old.try_clone()?;
        let new = new.try_clone()?;
        {
            let mut sealing = self.shared.sealing.lock();
            sealing.files.push(old);
            sealing.dir_dirty = true;
        }
        *self.shared.file.lock() = new;
        self.mark_dirty();
        Ok(())
    }

    /// Fsyncs the sealed files not yet synced, and the folder, waiting for a background
    /// pass doing so: the writer's own fsync then covers the whole log.
    pub(super) fn sync_sealed(&self) -> io::Result<()> {
        sync_sealed(&self.shared)
    }

    /// How many sealed files wait for their fsync.
    #[cfg(test)]
    pub(super) fn sealed_unsynced(&self) -> usize {
        self.shared.sealing.lock().files.len()
    }

    /// Deletes `paths` (files whose entries are all purged) after the next fsync, which
    /// covers the purge the writer wrote before calling this.
    pub(super) fn delete_after_sync(&self, paths: Vec<PathBuf>) {
        self.shared.doomed.lock().extend(paths);
        self.mark_dirty();
    }

    /// The first background fsync failure, if any.
    pub(super) fn failed(&self) -> Option<String> {
        self.shared.failed.lock().clone()
    }

    fn thread(&self) -> Option<&Thread> {
        self.thread.as_ref().map(JoinHandle::thread)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread() {
            t.unpark();
        }
        if let Some(t) = self.thread.take() {
            // The last fsync happens before the log is reported closed.
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared) {
    let flush_after = Duration::from_millis(super::BACKGROUND_FLUSH_MS);
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        let wait = match *shared.dirty_since.lock() {
            Some(since) => flush_after.saturating_sub(since.elapsed()),
            None => flush_after,
        };
        if !stopping && !wait.is_zero() {
            std::thread::park_timeout(wait);
            continue;
        }
        // Taken before the fsync starts: frames written from here on mark the log dirty
        // again, and those written before are covered by this fsync; so is every purge
        // written before the files it frees were handed over.
        let dirty = shared.dirty_since.lock().take().is_some();
        let doomed = std::mem::take(&mut *shared.doomed.lock());
        // Files handed over count as dirt too: the writer lists them before it marks the
        // log dirty, so this pass may take them without the mark, and must still sync and
        // delete them rather than drop them.
        if (dirty || !doomed.is_empty()) && shared.failed.lock().is_none() {
            // A handle of its own, so the writer replacing the file does not wait.
            let placed = match &shared.placement {
                Some(p) => p.sync(),
                None => Ok(()),
            };
            let synced = placed
                .and_then(|()| sync_sealed(shared))
                .and_then(|()| shared.file.lock().try_clone())
                .and_then(|f| f.sync_data());
            match synced {
                Ok(()) => {
                    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                    delete(&shared.dir, doomed);
                }
                Err(e) => {
                    tracing::error!(dir = %shared.dir.display(), error = %e, "background fsync of the Raft log failed");
                    *shared.failed.lock() = Some(e.to_string());
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// See [`Syncer::sync_sealed`]. A failure leaves the files listed for the next try. Each
/// file is first cut to its size, which frees the blocks reserved past its end (the writer
/// reserves ahead, see `Writer::reserve`; nothing is written to a sealed file again).
fn sync_sealed(shared: &Shared) -> io::Result<()> {
    let mut sealing = shared.sealing.lock();
    for file in &sealing.files {
        file.set_len(file.metadata()?.len())?;
        file.sync_data()?;
        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    }
    sealing.files.clear();
    if sealing.dir_dirty {
        super::sync_dir(&shared.dir)?;
        sealing.dir_dirty = false;
    }
    Ok(())
}

/// Deletes purged files, oldest first. One that cannot be deleted stays until the next
/// open, which replays it (harmless: its entries are purged) and hands it over again.
fn delete(dir: &Path, doomed: Vec<PathBuf>) {
    for path in doomed {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(), path = %path.display(), error = %e,
                    "cannot delete a purged Raft log file"
                );
            }
        }
    }
}
