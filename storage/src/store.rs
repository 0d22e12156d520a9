//! [`Store`]: the data folder, with its topics, their partitions, and the group offsets.
//!
//! # Layout
//! - `<data>/topics/<topic>/topic.toml`: the topic's [`TopicConfig`] in TOML, written once
//!   with [`atomic_write`].
//! - `<data>/topics/<topic>/<partition>/`: one [`PartitionLog`] folder per partition, named
//!   by its decimal number; the log owns its contents.
//! - `<data>/topics/__groups/`: the internal groups topic, which holds the [`GroupStore`]'s
//!   state. It is laid out like any topic but is not listed, served or deletable as one;
//!   names starting with `__` are reserved for such internal topics.
//! - `<data>/groups/`: offsets files of earlier versions, imported once (see
//!   [`crate::groups`]).
//! - `<data>/trash/`: topics being deleted; emptied at open.
//!
//! # Crash safety
//! A topic exists once its `topic.toml` does. Creation makes the folders (syncing each
//! parent), opens the partition logs, and writes `topic.toml` last, so a crash during a
//! creation leaves a folder without it, which the next open removes. Deletion renames the
//! topic folder into `trash/` (one atomic step, synced) before removing anything, so a crash
//! leaves either the whole topic or a trash entry that the next open empties; never a topic
//! with half its files. If that move fails, the topic's partitions are reopened in place:
//! every [`Topic`] handle of it (the broker's included) serves again, with no restart.
//!
//! # Damage is contained
//! Nothing found on disk stops the store from opening. A `topic.toml` that cannot be read,
//! parsed or validated is logged and listed by [`Store::damaged`]; its data is left where it
//! is and its name stays taken. A partition that cannot be opened (or whose folder is
//! missing) is logged and fenced: [`Topic::partition`] returns [`StorageError::Fenced`] for
//! it while the topic's other partitions serve.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};

use crate::config::{validate_name, TopicConfig};
use crate::error::{Result, StorageError};
use crate::fsutil::{create_dir_durable, fsync_dir};
use crate::groups::{
    groups_topic_config, GroupStore, DEFAULT_GROUPS_PARTITIONS, DEFAULT_GROUPS_SEGMENT_BYTES,
    GROUPS_TOPIC, INTERNAL_TOPIC_PREFIX,
};
use crate::log::{PartitionLog, DEFAULT_MAX_BATCH_BYTES};

/// The name of a topic's config file, inside its folder.
const TOPIC_FILE: &str = "topic.toml";
/// The most threads that open partitions at once. Opening is mostly small reads, mappings
/// and (after a crash) scans, so a few threads beyond the core count keep the disk busy;
/// many more would only contend.
const MAX_OPEN_THREADS: usize = 8;

/// How to open a [`Store`]: a typed builder.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    data_dir: PathBuf,
    max_batch_bytes: usize,
    producer_expiry_ms: u64,
    groups_partitions: u32,
    groups_segment_bytes: u64,
}

impl StoreOptions {
    /// Options for the data folder `data_dir` (created when missing), with every other
    /// setting at its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreOptions {
            data_dir: data_dir.into(),
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            producer_expiry_ms: crate::producers::DEFAULT_PRODUCER_EXPIRY_MS,
            groups_partitions: DEFAULT_GROUPS_PARTITIONS,
            groups_segment_bytes: DEFAULT_GROUPS_SEGMENT_BYTES,
        }
    }

    /// Sets the partition count and segment size of the groups topic, used only when it is
    /// created (a data folder keeps the ones it was made with). Defaults
    /// [`DEFAULT_GROUPS_PARTITIONS`] and [`DEFAULT_GROUPS_SEGMENT_BYTES`].
    pub fn groups_topic(mut self, partitions: u32, segment_bytes: u64) -> Self {
        self.groups_partitions = partitions;
        self.groups_segment_bytes = segment_bytes;
        self
    }

    /// Sets the largest batch a partition accepts for append, in bytes. Default 16 MiB
    /// ([`DEFAULT_MAX_BATCH_BYTES`]).
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// Sets how long an idle idempotent producer's state is kept in each partition, in ms.
    /// Default 7 days ([`crate::producers::DEFAULT_PRODUCER_EXPIRY_MS`]).
    pub fn producer_expiry_ms(mut self, producer_expiry_ms: u64) -> Self {
        self.producer_expiry_ms = producer_expiry_ms;
        self
    }

    /// The settings each partition log is opened with.
    fn limits(&self) -> PartitionLimits {
        PartitionLimits {
            max_batch_bytes: self.max_batch_bytes,
            producer_expiry_ms: self.producer_expiry_ms,
        }
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The largest batch a partition accepts for append, in bytes (set by
    /// [`StoreOptions::max_batch_bytes`]).
    pub fn batch_limit_bytes(&self) -> usize {
        self.max_batch_bytes
    }
}

/// A topic: its name, config and partitions. Cheap to clone: a handle around shared state.
///
/// A handle stays usable after the topic is deleted, but its partitions are closed then, so
/// appends to them fail. A deletion that fails reopens the partitions inside the same
/// topic, so every handle sees them serve again.
#[derive(Debug, Clone)]
pub struct Topic {
    inner: Arc<TopicInner>,
}

#[derive(Debug)]
struct TopicInner {
    name: String,
    config: TopicConfig,
    dir: PathBuf,
    /// One slot per partition, `config.partitions` of them: the log, or why it could not be
    /// opened (the partition is fenced). Swapped whole only when a failed deletion reopens
    /// the partitions; lookups load it without a lock.
    partitions: ArcSwap<Vec<PartitionSlot>>,
}

/// A partition's log, or why it could not be opened (the partition is fenced).
type PartitionSlot = std::result::Result<PartitionLog, String>;

impl Topic {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The topic's config, as created.
    pub fn config(&self) -> &TopicConfig {
        &self.inner.config
    }

    /// The topic's folder, `<data>/topics/<name>`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The number of partitions, numbered `0..partition_count()`.
    pub fn partition_count(&self) -> u32 {
        self.inner.config.partitions
    }

    /// Partition `p`'s log. [`StorageError::PartitionNotFound`] past the count, and
    /// [`StorageError::Fenced`] for a partition that could not be opened.
    pub fn partition(&self, p: u32) -> Result<PartitionLog> {
        let slots = self.inner.partitions.load();
        let slot = usize::try_from(p).ok().and_then(|i| slots.get(i));
        match slot {
            None => Err(StorageError::PartitionNotFound {
                topic: self.inner.name.clone(),
                partition: p,
                partitions: self.partition_count(),
            }),
            Some(Ok(log)) => Ok(log.clone()),
            Some(Err(reason)) => Err(StorageError::Fenced {
                topic: self.inner.name.clone(),
                partition: p,
                reason: reason.clone(),
            }),
        }
    }

    /// Every partition in order, with its log or the [`StorageError::Fenced`] error that
    /// stands for it.
    pub fn partitions(&self) -> impl Iterator<Item = (u32, Result<PartitionLog>)> + '_ {
        (0..self.partition_count()).map(|p| (p, self.partition(p)))
    }

    /// Whether `other` is a handle of this very topic (not of another topic of the same name,
    /// created after this one was deleted).
    pub fn is_same(&self, other: &Topic) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Closes every open partition (synced, with clean-shutdown markers). Tries them all and
    /// returns the first error.
    fn close(&self) -> Result<()> {
        let mut first_error = None;
        for log in self.inner.partitions.load().iter().flatten() {
            if let Err(e) = log.close() {
                tracing::error!(topic = %self.inner.name, partition = log.partition(), error = %e, "closing a partition failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The data folder: every topic and the group offsets. Cheap to clone: a handle around
/// shared state.
///
/// Every method blocks on disk I/O (syncs, opens); callers on an async runtime run them on a
/// blocking pool.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    options: StoreOptions,
    topics_dir: PathBuf,
    trash_dir: PathBuf,
    /// Name → topic: what lookups see. A plain lock, held only to look up, insert or remove
    /// an entry, never across file I/O, so a slow creation does not block produce and fetch.
    topics: RwLock<HashMap<String, Topic>>,
    /// Serializes creations and deletions, which check the map, do slow file work, then
    /// change the map: two creations of one name must not both pass the check.
    admin: Mutex<()>,
    groups: GroupStore,
    /// The other internal (`__`) topics, by name: the broker's replicated state (security,
    /// later subscriptions). Never in `topics`, so never listed, produced to or deleted by
    /// clients.
    internal: RwLock<HashMap<String, Topic>>,
    /// Damaged topic configs and group files found at open. Fixed after open.
    damaged: Vec<(PathBuf, String)>,
}

/// A topic found at open, before its partitions are opened.
struct FoundTopic {
    name: String,
    dir: PathBuf,
    config: TopicConfig,
}

impl Store {
    /// Opens the data folder (creating its folders when missing, durably), empties the
    /// trash, loads the group offsets, and opens every topic with its partitions (in
    /// parallel, on a few threads).
    ///
    /// Damage never stops the open (see the module doc): a half-created topic is removed, a
    /// damaged config is listed by [`Store::damaged`], a partition that fails to open is
    /// fenced. Only a failure to create or list the folders themselves is an error.
    pub fn open(options: StoreOptions) -> Result<Store> {
        let data_dir = options.data_dir.clone();
        let topics_dir = data_dir.join("topics");
        let trash_dir = data_dir.join("trash");
        create_dir_durable(&topics_dir)?;
        create_dir_durable(&trash_dir)?;
        empty_trash(&trash_dir);
        let mut damaged = Vec::new();
        let mut found = scan_topics(&topics_dir, &mut damaged)?;
        // Internal topics are opened here but never join the user-visible map.
        let mut groups_found = None;
        let mut others_found = Vec::new();
        found.retain_mut(|t| {
            if !t.name.starts_with(INTERNAL_TOPIC_PREFIX) {
                return true;
            }
            if t.name == GROUPS_TOPIC {
                groups_found = Some(FoundTopic {
                    name: t.name.clone(),
                    dir: t.dir.clone(),
                    config: t.config.clone(),
                });
            } else {
                others_found.push(FoundTopic {
                    name: t.name.clone(),
                    dir: t.dir.clone(),
                    config: t.config.clone(),
                });
            }
            false
        });

        let limits = options.limits();
        let jobs: Vec<PartitionJob<'_>> = found
            .iter()
            .flat_map(|t| {
                (0..t.config.partitions).map(move |partition| PartitionJob {
                    topic: &t.name,
                    dir: t.dir.join(partition.to_string()),
                    partition,
                    config: &t.config,
                    limits,
                    must_exist: true,
                })
            })
            .collect();
        let mut opened = open_partitions(&jobs).into_iter();
        let mut topics = HashMap::with_capacity(found.len());
        for t in &found {
            let partitions = (0..t.config.partitions)
                .map(|partition| match opened.next() {
                    Some(Ok(log)) => Ok(log),
                    Some(Err(e)) => {
                        tracing::error!(
                            topic = %t.name, partition, error = %e,
                            "partition fenced: it could not be opened; the topic's other partitions serve"
                        );
                        Err(format!("it could not be opened: {e}"))
                    }
                    // open_partitions returns one result per job, in order.
                    None => Err("it was not opened".to_string()),
                })
                .collect();
            let topic = Topic {
                inner: Arc::new(TopicInner {
                    name: t.name.clone(),
                    config: t.config.clone(),
                    dir: t.dir.clone(),
                    partitions: ArcSwap::from_pointee(partitions),
                }),
            };
            topics.insert(t.name.clone(), topic);
        }
        drop(jobs);
        let groups_topic = match groups_found {
            Some(t) => open_found_topic(&t, options.limits()),
            None => {
                let config =
                    groups_topic_config(options.groups_partitions, options.groups_segment_bytes);
                config.validate(GROUPS_TOPIC)?;
                let text = toml::to_string(&config).map_err(|e| StorageError::InvalidConfig {
                    topic: GROUPS_TOPIC.to_string(),
                    reason: format!("cannot serialize the groups topic config: {e}"),
                })?;
                let dir = topics_dir.join(GROUPS_TOPIC);
                build_topic_files(
                    &topics_dir,
                    GROUPS_TOPIC,
                    &config,
                    &dir,
                    &text,
                    options.limits(),
                    || Ok(()),
                )?
            }
        };
        let groups = GroupStore::open(groups_topic, &data_dir.join("groups"))?;
        let internal = others_found
            .iter()
            .map(|t| (t.name.clone(), open_found_topic(t, options.limits())))
            .collect();
        damaged.extend(groups.damaged().iter().cloned());
        tracing::info!(
            topics = topics.len(),
            damaged = damaged.len(),
            data_dir = ?data_dir,
            "store opened"
        );
        Ok(Store {
            inner: Arc::new(StoreInner {
                options,
                topics_dir,
                trash_dir,
                topics: RwLock::new(topics),
                admin: Mutex::new(()),
                groups,
                internal: RwLock::new(internal),
                damaged,
            }),
        })
    }

    /// Creates topic `name` with `config` and returns it, its partitions open and empty.
    ///
    /// [`StorageError::InvalidName`] or [`StorageError::InvalidConfig`] for bad input, and
    /// [`StorageError::TopicExists`] when the name is taken (also by a damaged topic still
    /// on disk). Any failure leaves nothing behind. A new topic starts with no committed
    /// offsets, even if a crash interrupted the deletion of an earlier topic of that name
    /// before its offsets were dropped.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Topic> {
        validate_name("topic", name)?;
        if name.starts_with(INTERNAL_TOPIC_PREFIX) {
            return Err(StorageError::InvalidName {
                kind: "topic",
                name: name.to_string(),
                reason: "names starting with `__` are reserved for internal topics",
            });
        }
        config.validate(name)?;
        // Serialize first: a config TOML cannot hold (an integer over i64::MAX) is refused
        // before anything is created. Reading it back proves the file will load at open.
        let text = toml::to_string(&config)
            .ok()
            .filter(|text| toml::from_str::<TopicConfig>(text).ok().as_ref() == Some(&config))
            .ok_or_else(|| StorageError::InvalidConfig {
                topic: name.to_string(),
                reason: "the config cannot be stored in topic.toml, whose integers stop at \
                         9223372036854775807"
                    .to_string(),
            })?;
        let _admin = self.inner.admin.lock();
        let exists = || StorageError::TopicExists {
            topic: name.to_string(),
        };
        if self.inner.topics.read().contains_key(name) {
            return Err(exists());
        }
        let dir = self.inner.topics_dir.join(name);
        match fs::symlink_metadata(&dir) {
            // A damaged topic (or a leftover nobody could remove) still holds the name.
            Ok(_) => return Err(exists()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("check topic folder", &dir, e)),
        }
        let groups = &self.inner.groups;
        let built = build_topic_files(
            &self.inner.topics_dir,
            name,
            &config,
            &dir,
            &text,
            self.inner.options.limits(),
            // Offsets left by an earlier topic of this name (a deletion cut short by a
            // crash) must not apply to this one.
            || groups.delete_topic(name),
        );
        match built {
            Ok(topic) => {
                self.inner
                    .topics
                    .write()
                    .insert(name.to_string(), topic.clone());
                tracing::info!(
                    topic = name,
                    partitions = config.partitions,
                    "topic created"
                );
                Ok(topic)
            }
            Err(e) => {
                // Nothing may remain of a failed creation. Without topic.toml, a leftover is
                // removed at the next open anyway, so a failure here only delays that.
                if let Err(rm) = fs::remove_dir_all(&dir) {
                    if rm.kind() != io::ErrorKind::NotFound {
                        tracing::error!(topic = name, error = %rm, "cannot remove a failed creation; the next open will");
                    }
                }
                if let Err(sync) = fsync_dir(&self.inner.topics_dir) {
                    tracing::warn!(error = %sync, "cannot sync the topics folder");
                }
                Err(e)
            }
        }
    }

    /// The topic `name`, or [`StorageError::TopicNotFound`].
    pub fn topic(&self, name: &str) -> Result<Topic> {
        self.inner
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| StorageError::TopicNotFound {
                topic: name.to_string(),
            })
    }

    /// The internal topic `name` if it exists: `__groups` (the [`GroupStore`]'s) or one
    /// made by [`Store::internal_topic`].
    pub fn existing_internal_topic(&self, name: &str) -> Option<Topic> {
        if name == GROUPS_TOPIC {
            return Some(self.inner.groups.topic().clone());
        }
        self.inner.internal.read().get(name).cloned()
    }

    /// The internal topic `name` (it must start with `__`; `__groups` belongs to the
    /// [`GroupStore`]), created with `config` the first time. Internal topics hold state the
    /// broker must keep where replication can carry it (see docs/ARCHITECTURE.md); they are
    /// opened with the store and closed with it, and never listed with the user's topics.
    pub fn internal_topic(&self, name: &str, config: TopicConfig) -> Result<Topic> {
        if !name.starts_with(INTERNAL_TOPIC_PREFIX) || name == GROUPS_TOPIC {
            return Err(StorageError::InvalidName {
                kind: "internal topic",
                name: name.to_string(),
                reason: "an internal topic starts with `__` and is not `__groups`",
            });
        }
        validate_name("topic", name)?;
        if let Some(t) = self.inner.internal.read().get(name) {
            return Ok(t.clone());
        }
        config.validate(name)?;
        let text = toml::to_string(&config).map_err(|e| StorageError::InvalidConfig {
            topic: name.to_string(),
            reason: format!("cannot serialize the internal topic config: {e}"),
        })?;
        let _admin = self.inner.admin.lock();
        if let Some(t) = self.inner.internal.read().get(name) {
            return Ok(t.clone());
        }
        let dir = self.inner.topics_dir.join(name);
        let built = build_topic_files(
            &self.inner.topics_dir,
            name,
            &config,
            &dir,
            &text,
            self.inner.options.limits(),
            || Ok(()),
        );
        match built {
            Ok(topic) => {
                self.inner
                    .internal
                    .write()
                    .insert(name.to_string(), topic.clone());
                Ok(topic)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Every topic, sorted by name.
    pub fn topics(&self) -> Vec<Topic> {
        let mut all: Vec<Topic> = self.inner.topics.read().values().cloned().collect();
        all.sort_unstable_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Deletes topic `name`: its partitions, its data and every group's committed offsets
    /// for it. [`StorageError::TopicNotFound`] when there is no such topic.
    ///
    /// Lookups see [`StorageError::TopicNotFound`] from the start. The deletion is durable
    /// once the folder has moved into the trash; a crash after that finishes it at the next
    /// open. If the move fails, the topic stays: its partitions are reopened inside the same
    /// [`Topic`] (so handles held elsewhere serve again), it is listed again, and the error
    /// is returned.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        validate_name("topic", name)?;
        let _admin = self.inner.admin.lock();
        let topic =
            self.inner
                .topics
                .write()
                .remove(name)
                .ok_or_else(|| StorageError::TopicNotFound {
                    topic: name.to_string(),
                })?;
        // Close first, so nothing appends to files about to move. Readers holding mapped
        // bytes keep them: a mapping outlives its file.
        if let Err(e) = topic.close() {
            tracing::warn!(topic = name, error = %e, "deleting a topic whose partitions did not close cleanly");
        }
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let trashed = self.inner.trash_dir.join(format!("{name}-{unix_nanos}"));
        if let Err(e) = rename(topic.dir(), &trashed) {
            // Nothing moved: serve the topic again as it is on disk.
            tracing::error!(topic = name, error = %e, "cannot move a topic to the trash; it stays");
            self.reopen(&topic);
            self.inner
                .topics
                .write()
                .insert(name.to_string(), topic.clone());
            return Err(StorageError::io("move topic to trash", topic.dir(), e));
        }
        // Both folders must be synced before anything is removed: otherwise a power loss
        // could bring back the topic folder with some of its files gone.
        fsync_dir(&self.inner.topics_dir)?;
        fsync_dir(&self.inner.trash_dir)?;
        if let Err(e) = fs::remove_dir_all(&trashed) {
            // The topic is gone already; the next open empties the trash.
            tracing::warn!(path = ?trashed, error = %e, "cannot empty a deleted topic from the trash");
        }
        if let Err(e) = self.inner.groups.delete_topic(name) {
            // A replicated groups topic forgets offsets only where this broker leads the
            // group's partition; the others keep them until a recreate overwrites them.
            if !self.inner.groups.is_replicated() {
                return Err(e);
            }
            tracing::warn!(topic = name, error = %e, "a deleted topic's offsets stay in some groups");
        }
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// Reopens the closed partitions of `topic` from its folder, in place: every handle of
    /// the topic sees the new logs. A partition that cannot be reopened is fenced.
    fn reopen(&self, topic: &Topic) {
        let config = topic.config();
        let jobs: Vec<PartitionJob<'_>> = (0..config.partitions)
            .map(|partition| PartitionJob {
                topic: topic.name(),
                dir: topic.dir().join(partition.to_string()),
                partition,
                config,
                limits: self.inner.options.limits(),
                must_exist: true,
            })
            .collect();
        let partitions: Vec<PartitionSlot> = open_partitions(&jobs)
            .into_iter()
            .map(|r| r.map_err(|e| format!("it could not be reopened: {e}")))
            .collect();
        topic.inner.partitions.store(Arc::new(partitions));
    }

    /// The committed offsets of every consumer group.
    pub fn groups(&self) -> &GroupStore {
        &self.inner.groups
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.inner.options.data_dir
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// What was found damaged at open and is not served: topic configs (the path of the
    /// `topic.toml` or topic folder) and group offset files (where the damaged bytes were
    /// moved), each with the reason.
    pub fn damaged(&self) -> &[(PathBuf, String)] {
        &self.inner.damaged
    }

    /// Closes every partition cleanly (synced, with clean-shutdown markers), so the next
    /// open validates nothing. Tries them all and returns the first error.
    pub fn close(&self) -> Result<()> {
        let mut first_error = None;
        let groups = self.inner.groups.topic().clone();
        let internal: Vec<Topic> = self.inner.internal.read().values().cloned().collect();
        for topic in self
            .topics()
            .into_iter()
            .chain(std::iter::once(groups))
            .chain(internal)
        {
            if let Err(e) = topic.close() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

mod files;
#[cfg(any(test, feature = "fault-injection"))]
pub use files::fault;
use files::{
    build_topic_files, empty_trash, open_found_topic, open_partitions, rename, scan_topics,
    PartitionJob, PartitionLimits,
};

#[cfg(test)]
mod tests;
