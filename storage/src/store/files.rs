//! The store's file work: building a topic's folders and files, scanning and opening what
//! is on disk, the trash, and the test-only fault hooks. Split from `store.rs`, which keeps
//! the registry and its API.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{FoundTopic, Topic, TopicInner, MAX_OPEN_THREADS, TOPIC_FILE};
use crate::config::{validate_name, TopicConfig};
use crate::error::{Result, StorageError};
use crate::fsutil::{atomic_write, fsync_dir, remove_leftover_tmp_files};
use crate::log::{LogOptions, PartitionLog};

/// `fs::rename`, through the test-only fault hook when it is compiled in.
pub(super) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(any(test, feature = "fault-injection"))]
    if fault::take_rename_failure(from) {
        return Err(io::Error::other(
            "injected rename failure (fault-injection)",
        ));
    }
    fs::rename(from, to)
}

/// Failure injection for tests, compiled only with the `fault-injection` feature (which only
/// the end-to-end tests enable) or in this crate's own tests.
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Paths whose next rename fails. Keyed by path, not per thread, because the rename
    /// runs on whatever blocking thread serves the request, and by path so that tests
    /// running in parallel never take each other's failure.
    static FAIL_RENAME: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Makes the next rename of `from` (a topic folder moved to the trash by
    /// [`Store::delete_topic`](super::Store::delete_topic)) fail once with an I/O error.
    pub fn fail_next_rename(from: impl Into<PathBuf>) {
        FAIL_RENAME
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(from.into());
    }

    /// Whether a failure was armed for `from`; disarms it.
    pub(super) fn take_rename_failure(from: &Path) -> bool {
        let mut armed = FAIL_RENAME.lock().unwrap_or_else(|e| e.into_inner());
        match armed.iter().position(|p| p == from) {
            Some(i) => {
                armed.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

/// The crash-safe steps of a topic creation in `topics_dir`: the folders (each parent
/// synced), the partition logs, then `before_commit` (the caller's last check or cleanup),
/// then `topic.toml`, after which the topic exists. The caller removes `dir` if this fails.
pub(super) fn build_topic_files(
    topics_dir: &Path,
    name: &str,
    config: &TopicConfig,
    dir: &Path,
    text: &str,
    limits: PartitionLimits,
    before_commit: impl FnOnce() -> Result<()>,
) -> Result<Topic> {
    fs::create_dir(dir).map_err(|e| StorageError::io("create topic folder", dir, e))?;
    fsync_dir(topics_dir)?;
    let jobs: Vec<PartitionJob<'_>> = (0..config.partitions)
        .map(|partition| PartitionJob {
            topic: name,
            dir: dir.join(partition.to_string()),
            partition,
            config,
            limits,
            must_exist: false,
        })
        .collect();
    for job in &jobs {
        fs::create_dir(&job.dir)
            .map_err(|e| StorageError::io("create partition folder", &job.dir, e))?;
    }
    fsync_dir(dir)?;
    // On an error the logs opened so far are dropped unclosed: they hold no data yet, and
    // the caller removes their folders.
    let partitions = open_partitions(&jobs)
        .into_iter()
        .map(|r| r.map(Ok))
        .collect::<Result<Vec<_>>>()?;
    before_commit()?;
    // Last: from here on the topic exists.
    atomic_write(&dir.join(TOPIC_FILE), text.as_bytes())?;
    Ok(Topic {
        inner: Arc::new(TopicInner {
            name: name.to_string(),
            config: config.clone(),
            dir: dir.to_path_buf(),
            partitions: ArcSwap::from_pointee(partitions),
        }),
    })
}

/// Opens the partitions of an internal topic found at open; a partition that cannot be
/// opened is fenced, as a user topic's would be.
pub(super) fn open_found_topic(t: &FoundTopic, limits: PartitionLimits) -> Topic {
    let jobs: Vec<PartitionJob<'_>> = (0..t.config.partitions)
        .map(|partition| PartitionJob {
            topic: &t.name,
            dir: t.dir.join(partition.to_string()),
            partition,
            config: &t.config,
            limits,
            must_exist: true,
        })
        .collect();
    let partitions = open_partitions(&jobs)
        .into_iter()
        .map(|r| r.map_err(|e| format!("it could not be opened: {e}")))
        .collect::<Vec<_>>();
    Topic {
        inner: Arc::new(TopicInner {
            name: t.name.clone(),
            config: t.config.clone(),
            dir: t.dir.clone(),
            partitions: ArcSwap::from_pointee(partitions),
        }),
    }
}

/// Removes everything in the trash: deletions a crash interrupted. Best effort: leftovers
/// only take space, so a failure is logged and the open goes on.
pub(super) fn empty_trash(trash: &Path) {
    let entries = match fs::read_dir(trash) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(path = ?trash, error = %e, "cannot list the trash");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(path = ?path, "finished an interrupted topic deletion"),
            Err(e) => tracing::error!(path = ?path, error = %e, "cannot empty the trash"),
        }
    }
}

/// Lists the topics in `topics_dir` with their configs. Removes creations a crash
/// interrupted; records damaged configs in `damaged` and skips them. Fails only when the
/// folder cannot be listed.
pub(super) fn scan_topics(
    topics_dir: &Path,
    damaged: &mut Vec<(PathBuf, String)>,
) -> Result<Vec<FoundTopic>> {
    let mut found = Vec::new();
    let mut removed_any = false;
    let entries =
        fs::read_dir(topics_dir).map_err(|e| StorageError::io("list topics", topics_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list topics", topics_dir, e))?;
        let dir = entry.path();
        let name = match entry.file_name().into_string() {
            Ok(name) if validate_name("topic", &name).is_ok() => name,
            _ => {
                tracing::warn!(path = ?dir, "ignoring an entry that is not a valid topic name");
                continue;
            }
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::warn!(path = ?dir, "ignoring an entry of the topics folder that is not a folder");
            continue;
        }
        let config_path = dir.join(TOPIC_FILE);
        match fs::symlink_metadata(&config_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(topic = %name, "removing a topic whose creation never finished");
                match fs::remove_dir_all(&dir) {
                    Ok(()) => removed_any = true,
                    Err(e) => {
                        tracing::error!(topic = %name, error = %e, "cannot remove an unfinished topic creation");
                        damaged.push((dir, format!("unfinished creation, cannot remove it: {e}")));
                    }
                }
                continue;
            }
            Err(e) => {
                // Never delete on a failed check: the topic may well exist.
                tracing::error!(topic = %name, error = %e, "cannot check a topic's config; topic not served");
                damaged.push((config_path, format!("cannot check it: {e}")));
                continue;
            }
        }
        match read_config(&config_path, &name) {
            Ok(config) => {
                // atomic_write never leaves one after success, but a temp file is never
                // needed, so clearing it is always safe.
                if let Err(e) = remove_leftover_tmp_files(&dir) {
                    tracing::warn!(topic = %name, error = %e, "cannot remove a leftover temp file");
                }
                found.push(FoundTopic { name, dir, config });
            }
            Err(reason) => {
                tracing::error!(
                    topic = %name, path = ?config_path, reason = %reason,
                    "damaged topic config; the topic is not served and its data is kept"
                );
                damaged.push((config_path, reason));
            }
        }
    }
    if removed_any {
        fsync_dir(topics_dir)?;
    }
    Ok(found)
}

/// Reads, parses and validates a topic config; the error is the reason.
fn read_config(path: &Path, name: &str) -> std::result::Result<TopicConfig, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let config: TopicConfig = toml::from_str(&text).map_err(|e| format!("cannot parse it: {e}"))?;
    config
        .validate(name)
        .map_err(|e| format!("invalid config: {e}"))?;
    Ok(config)
}

/// The store-wide settings every partition log is opened with.
#[derive(Debug, Clone, Copy)]
pub(super) struct PartitionLimits {
    /// See [`LogOptions::max_batch_bytes`].
    pub(super) max_batch_bytes: usize,
    /// See [`LogOptions::producer_expiry_ms`].
    pub(super) producer_expiry_ms: u64,
}

/// One partition to open.
pub(super) struct PartitionJob<'a> {
    pub(super) topic: &'a str,
    pub(super) dir: PathBuf,
    pub(super) partition: u32,
    pub(super) config: &'a TopicConfig,
    pub(super) limits: PartitionLimits,
    /// The folder must be there already. True for a topic that exists: its folders were
    /// made before its `topic.toml`, so a missing one was lost, and recreating it empty
    /// would silently restart the partition's offsets at zero.
    pub(super) must_exist: bool,
}

impl PartitionJob<'_> {
    fn open(&self) -> Result<PartitionLog> {
        if self.must_exist {
            let is_dir = fs::symlink_metadata(&self.dir)
                .map_err(|e| StorageError::io("check partition folder", &self.dir, e))?
                .is_dir();
            if !is_dir {
                return Err(StorageError::io(
                    "open partition",
                    &self.dir,
                    io::Error::other("not a folder"),
                ));
            }
        }
        let options = LogOptions::new(self.topic, self.partition, self.config)
            .max_batch_bytes(self.limits.max_batch_bytes)
            .producer_expiry_ms(self.limits.producer_expiry_ms);
        PartitionLog::open(&self.dir, options)
    }
}

/// Opens every job's partition, in parallel on a few threads (an open may scan a log after
/// a crash, and a broker may have thousands of partitions). Returns one result per job, in
/// order. The calling thread works too, so this works even if no thread can be spawned.
pub(super) fn open_partitions(jobs: &[PartitionJob<'_>]) -> Vec<Result<PartitionLog>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = (cores * 2).clamp(1, MAX_OPEN_THREADS).min(jobs.len());
    if threads <= 1 {
        return jobs.iter().map(PartitionJob::open).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { break };
            done.push((i, job.open()));
        }
        done
    };
    let mut slots: Vec<Option<Result<PartitionLog>>> = jobs.iter().map(|_| None).collect();
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("rill-open".to_string())
                    .spawn_scoped(s, work)
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a partition-open thread"))
                    .ok()
            })
            .collect();
        let mut results = work();
        for helper in helpers {
            match helper.join() {
                Ok(done) => results.extend(done),
                // A panic in an open is a bug: let it surface as one.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        for (i, result) in results {
            if let Some(slot) = slots.get_mut(i) {
                *slot = Some(result);
            }
        }
    });
    jobs.iter()
        .zip(slots)
        .map(|(job, slot)| {
            // Every index below jobs.len() was taken by exactly one worker.
            slot.unwrap_or_else(|| {
                Err(StorageError::io(
                    "open partition",
                    &job.dir,
                    io::Error::other("no thread opened it"),
                ))
            })
        })
        .collect()
}
