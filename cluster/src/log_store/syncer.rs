//! The Raft log's background fsync, on a thread of its own.
//!
//! Frames written without an fsync (`leader` and `quorum` produces) are fsynced at most
//! [`super::BACKGROUND_FLUSH_MS`] after the first of them was written. That fsync used to run
//! on the writer thread, so every append queued behind it waited for it: tens of ms on a busy
//! disk, every 200 ms, on each replica, which set a replicated partition's p99 and cut its
//! throughput (BENCHMARKS.md, "Replication"). Here it runs beside the writer: appends go on
//! while it syncs, and an fsync covers every frame written before it started, so nothing is
//! left unsynced longer than before.

use std::fs::File;
use std::io;
use std::path::PathBuf;
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
    /// Since when frames written without an fsync wait for one.
    dirty_since: Mutex<Option<Instant>>,
    /// The first background fsync failure: nothing after it may be trusted as synced.
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
    fsyncs: Arc<AtomicU64>,
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
    pub(super) fn start(dir: PathBuf, file: &File, fsyncs: Arc<AtomicU64>) -> io::Result<Syncer> {
        let shared = Arc::new(Shared {
            dir,
            file: Mutex::new(file.try_clone()?),
            dirty_since: Mutex::new(None),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            fsyncs,
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

    /// The writer replaced the log file (it began the next file, having fsynced both).
    pub(super) fn replace_file(&self, file: &File) -> io::Result<()> {
        *self.shared.file.lock() = file.try_clone()?;
        self.synced();
        Ok(())
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
        // again, and those written before are covered by this fsync.
        let dirty = shared.dirty_since.lock().take().is_some();
        if dirty && shared.failed.lock().is_none() {
            // A handle of its own, so the writer replacing the file does not wait.
            let synced = shared.file.lock().try_clone().and_then(|f| f.sync_data());
            match synced {
                Ok(()) => {
                    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
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
