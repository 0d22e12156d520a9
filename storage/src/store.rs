//! [`Store`]: the data folder, with its topics, their partitions, and the group offsets.
//!
//! Layout:
//! - `<data>/topics/<topic>/topic.toml`: the topic's [`TopicConfig`], replaced atomically.
//! - `<data>/topics/<topic>/<partition>/`: one [`PartitionLog`] folder per partition.
//! - `<data>/groups/`: the [`GroupStore`].
//! - `<data>/trash/`: topics being deleted; emptied at open.
//!
//! A topic exists once its `topic.toml` does: creation writes it last, so a crash during a
//! creation leaves a folder without it, which the next open removes. A damaged `topic.toml`
//! or a partition that cannot be opened never stops the store from opening: the topic is
//! reported by [`Store::damaged`], or the partition is fenced while the others serve.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::{validate_name, TopicConfig};
use crate::error::{Result, StorageError};
use crate::fsutil::{atomic_write, fsync_dir};
use crate::groups::GroupStore;
use crate::log::{LogOptions, PartitionLog, DEFAULT_MAX_BATCH_BYTES};

const TOPIC_FILE: &str = "topic.toml";

/// How to open a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    data_dir: PathBuf,
    max_batch_bytes: usize,
}

impl StoreOptions {
    /// Options for the data folder `data_dir`, with defaults otherwise.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreOptions {
            data_dir: data_dir.into(),
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }

    /// The largest batch a partition accepts, in bytes (default 16 MiB).
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// A topic: its config and its partitions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Topic {
    inner: Arc<TopicInner>,
}

#[derive(Debug)]
struct TopicInner {
    name: String,
    config: TopicConfig,
    dir: PathBuf,
    /// Each partition's log, or why it could not be opened.
    partitions: Vec<std::result::Result<PartitionLog, String>>,
}

impl Topic {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The topic's config.
    pub fn config(&self) -> &TopicConfig {
        &self.inner.config
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.inner.partitions.len() as u32
    }

    /// Partition `p`'s log: [`StorageError::PartitionNotFound`] past the count, or
    /// [`StorageError::Fenced`] when it could not be opened.
    pub fn partition(&self, p: u32) -> Result<PartitionLog> {
        match self.inner.partitions.get(p as usize) {
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

    /// Every partition with its log or the error that fences it.
    pub fn partitions(&self) -> impl Iterator<Item = (u32, Result<PartitionLog>)> + '_ {
        (0..self.partition_count()).map(|p| (p, self.partition(p)))
    }

    fn close(&self) -> Result<()> {
        let mut first = None;
        for log in self.inner.partitions.iter().flatten() {
            if let Err(e) = log.close() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The data folder. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    options: StoreOptions,
    topics_dir: PathBuf,
    trash_dir: PathBuf,
    /// Name → topic. A plain lock, held only to look up, insert or remove.
    topics: RwLock<HashMap<String, Topic>>,
    /// Serializes creations and deletions (which do slow, blocking file work) without
    /// blocking lookups.
    admin: Mutex<()>,
    groups: GroupStore,
    damaged: Vec<String>,
}

fn create_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| StorageError::io("create folder", dir, e))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens the data folder (creating it when missing) and every topic in it.
    pub fn open(options: StoreOptions) -> Result<Store> {
        let data = options.data_dir.clone();
        let topics_dir = data.join("topics");
        let trash_dir = data.join("trash");
        create_dir(&topics_dir)?;
        create_dir(&trash_dir)?;
        empty_trash(&trash_dir)?;
        let groups = GroupStore::open(&data.join("groups"))?;
        let mut topics = HashMap::new();
        let mut damaged: Vec<String> = groups.damaged();
        let entries = fs::read_dir(&topics_dir)
            .map_err(|e| StorageError::io("list topics", &topics_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list topics", &topics_dir, e))?;
            let dir = entry.path();
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if validate_name("topic", &name).is_err() || !dir.is_dir() {
                continue;
            }
            let config_path = dir.join(TOPIC_FILE);
            if !config_path.exists() {
                tracing::warn!(topic = %name, "removing a topic whose creation never finished");
                fs::remove_dir_all(&dir).map_err(|e| StorageError::io("remove topic", &dir, e))?;
                fsync_dir(&topics_dir)?;
                continue;
            }
            match read_config(&config_path, &name) {
                Ok(config) => {
                    let topic = open_topic(&name, config, dir, options.max_batch_bytes);
                    topics.insert(name, topic);
                }
                Err(e) => {
                    tracing::error!(topic = %name, error = %e, "topic config is damaged; topic not served");
                    damaged.push(format!("topic {name}: {e}"));
                }
            }
        }
        Ok(Store {
            inner: Arc::new(StoreInner {
                options,
                topics_dir,
                trash_dir,
                topics: RwLock::new(topics),
                admin: Mutex::new(()),
                groups,
                damaged,
            }),
        })
    }

    /// Creates a topic. A bad name or config, or an existing topic, changes nothing.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Topic> {
        validate_name("topic", name)?;
        config.validate(name)?;
        let _admin = self.inner.admin.lock();
        if self.inner.topics.read().contains_key(name) {
            return Err(StorageError::TopicExists {
                topic: name.to_string(),
            });
        }
        let dir = self.inner.topics_dir.join(name);
        if dir.exists() {
            // A damaged topic still occupies the name.
            return Err(StorageError::TopicExists {
                topic: name.to_string(),
            });
        }
        let created = (|| {
            create_dir(&dir)?;
            let topic = open_topic(
                name,
                config.clone(),
                dir.clone(),
                self.inner.options.max_batch_bytes,
            );
            if let Some((p, Err(e))) = topic.partitions().find(|(_, r)| r.is_err()) {
                return Err(StorageError::io(
                    "create partition",
                    dir.join(p.to_string()),
                    std::io::Error::other(e.to_string()),
                ));
            }
            let text = toml::to_string(&config).map_err(|e| StorageError::Corrupt {
                path: dir.join(TOPIC_FILE),
                reason: e.to_string(),
            })?;
            atomic_write(&dir.join(TOPIC_FILE), text.as_bytes())?;
            Ok(topic)
        })();
        match created {
            Ok(topic) => {
                self.inner
                    .topics
                    .write()
                    .insert(name.to_string(), topic.clone());
                Ok(topic)
            }
            Err(e) => {
                // Nothing may remain of a failed creation.
                let _ = fs::remove_dir_all(&dir);
                let _ = fsync_dir(&self.inner.topics_dir);
                Err(e)
            }
        }
    }

    /// The topic `name`.
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

    /// Every topic, sorted by name.
    pub fn topics(&self) -> Vec<Topic> {
        let mut all: Vec<Topic> = self.inner.topics.read().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Deletes a topic, its data and its committed offsets.
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
        // Close first so nothing appends to files about to move; readers holding mapped
        // bytes keep them (the mappings outlive the files).
        let _ = topic.close();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let trashed = self.inner.trash_dir.join(format!("{name}-{nanos}"));
        fs::rename(&topic.inner.dir, &trashed)
            .map_err(|e| StorageError::io("move topic to trash", &topic.inner.dir, e))?;
        fsync_dir(&self.inner.topics_dir)?;
        fsync_dir(&self.inner.trash_dir)?;
        self.inner.groups.delete_topic(name)?;
        fs::remove_dir_all(&trashed).map_err(|e| StorageError::io("remove topic", &trashed, e))?;
        Ok(())
    }

    /// The group offsets.
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

    /// Topics and group files found damaged at open, with the reasons.
    pub fn damaged(&self) -> &[String] {
        &self.inner.damaged
    }

    /// Closes every partition cleanly (synced, with clean-shutdown markers). Tries them all;
    /// returns the first error.
    pub fn close(&self) -> Result<()> {
        let mut first = None;
        for topic in self.topics() {
            if let Err(e) = topic.close() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn read_config(path: &Path, name: &str) -> Result<TopicConfig> {
    let text =
        fs::read_to_string(path).map_err(|e| StorageError::io("read topic config", path, e))?;
    let config: TopicConfig = toml::from_str(&text).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    config.validate(name)?;
    Ok(config)
}

/// Opens every partition of a topic, in parallel: a partition's open may scan its log.
/// A partition that fails is kept as its error, so the others serve.
fn open_topic(name: &str, config: TopicConfig, dir: PathBuf, max_batch_bytes: usize) -> Topic {
    let count = config.partitions as usize;
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(count)
        .max(1);
    let mut slots: Vec<Option<std::result::Result<PartitionLog, String>>> =
        (0..count).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunks: Vec<_> = slots
            .chunks_mut(count.div_ceil(threads))
            .enumerate()
            .collect();
        let chunk_len = count.div_ceil(threads);
        for (i, chunk) in chunks {
            let (config, dir) = (&config, &dir);
            s.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    let p = (i * chunk_len + j) as u32;
                    let options = LogOptions::new(name, p, config).max_batch_bytes(max_batch_bytes);
                    let result = PartitionLog::open(&dir.join(p.to_string()), options).map_err(|e| {
                        tracing::error!(topic = name, partition = p, error = %e, "partition fenced: it could not be opened");
                        e.to_string()
                    });
                    *slot = Some(result);
                }
            });
        }
    });
    let partitions = slots
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Err("partition was not opened".to_string())))
        .collect();
    Topic {
        inner: Arc::new(TopicInner {
            name: name.to_string(),
            config,
            dir,
            partitions,
        }),
    }
}

fn empty_trash(trash: &Path) -> Result<()> {
    let entries = fs::read_dir(trash).map_err(|e| StorageError::io("list trash", trash, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list trash", trash, e))?;
        let path = entry.path();
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| StorageError::io("empty trash", &path, e))?;
    }
    Ok(())
}
