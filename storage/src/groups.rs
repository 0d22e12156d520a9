//! Consumer-group state: committed offsets `(group, topic, partition) → offset + metadata`,
//! and each group's opaque metadata (the broker's membership state), kept in the internal
//! topic [`GROUPS_TOPIC`].
//!
//! # Where the state lives
//! State that must survive the loss of a broker is kept where replication carries it: in an
//! ordinary topic, written and read through the same append and read path as every other
//! topic (as Kafka keeps `__consumer_offsets`). A group's records all go to one partition,
//! [`partition_for_group`], so they stay in order. Each record says one change
//! ([`GroupRecord`], format in `record.rs` and `docs/GROUPS.md`); the store replays the topic
//! at open to rebuild the in-memory view, and appends to it on every change.
//!
//! # Durability
//! A commit (and every other change) returns once its record is appended and synced
//! ([`PartitionLog::sync_through`]): durable on return, and all-or-nothing because a batch is
//! appended whole or not at all. On an error the in-memory view is unchanged. A record whose
//! sync failed may still be on disk, and a later replay then applies it: the outcome of a
//! failed commit is unknown, as for any failed produce.
//!
//! # Bounded growth
//! [`GroupStore::compact_if_due`] writes a snapshot of a partition once about a segment's
//! worth of records has been appended since the last one: every group's whole state (one
//! record each, in as many batches as needed), then a marker; then it deletes the sealed
//! segments that end before the snapshot's first record.
//!
//! Why replay from any later log start rebuilds the same state: a group's snapshot record
//! replaces its whole state, and no write interleaves with a snapshot. A group that existed
//! when the snapshot was taken gets exactly that state from its record, then the records
//! after it. A group that did not exist had every topic forgotten after its last commit and
//! its metadata cleared after its last set, so whatever suffix of its records remains also
//! leaves it empty. A snapshot cut short by a crash only rewrote states that were current.
//!
//! # Replicated
//! In a cluster the groups topic is a replicated topic, and its writes are Raft commits: the
//! broker sets a [`GroupsWriter`] ([`GroupStore::replicate_with`]) that hands each change's
//! batch to the partition's Raft group, whose apply appends it to this replica's log. The
//! view is then fed only from the log: [`GroupStore::catch_up`] applies what the log holds
//! beyond the view, on the leader after each write and on followers as their logs grow, so
//! every replica holds the same state and a new leader serves at once.
//!
//! Compaction, replicated: only the partition's leader snapshots it, through the writer (one
//! Raft commit per batch, the marker last), with every change of that partition held off; every
//! replica deletes its own segments before a snapshot when it applies the marker. Details, and
//! why a snapshot cut short by a leader change is harmless, in `replicated.rs`.
//!
//! # Upgrades
//! The offsets files of earlier versions (`<data>/groups/<group>.offsets`) are imported once
//! at open (see `legacy.rs`): what the topic lacks is appended, then each file is renamed
//! `<group>.offsets.imported`.

mod legacy;
mod record;
mod replay;
mod replicated;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};

use crate::batch::BatchBuilder;
use crate::config::{validate_name, FlushPolicy, TopicConfig};
use crate::error::{Result, StorageError};
use crate::log::{now_ms, PartitionLog};
use crate::store::Topic;

pub use record::{GroupRecord, MAX_GROUP_METADATA_BYTES, RECORD_VERSION};

/// The longest metadata string a commit may carry, in bytes.
pub const MAX_METADATA_BYTES: usize = 4096;
/// The internal topic that holds every group's state.
pub const GROUPS_TOPIC: &str = "__groups";
/// Topic names starting with this are reserved for internal topics.
pub const INTERNAL_TOPIC_PREFIX: &str = "__";
/// The partition count of a new groups topic (fixed once created).
pub const DEFAULT_GROUPS_PARTITIONS: u32 = 4;
/// The segment size of a new groups topic (256 KiB): small, so compaction frees space soon
/// and an idle broker holds little (each partition's active segment is preallocated: 1 MiB
/// in all). One change may take at most half a segment.
pub const DEFAULT_GROUPS_SEGMENT_BYTES: u64 = 256 << 10;
/// How much is read per call during replay.
const REPLAY_READ_BYTES: usize = 4 << 20;

/// The config of a new groups topic: `partitions` partitions of `segment_bytes` segments,
/// kept forever (compaction, not retention, bounds it), synced by each writer.
pub fn groups_topic_config(partitions: u32, segment_bytes: u64) -> TopicConfig {
    TopicConfig::default()
        .partitions(partitions)
        .segment_bytes(segment_bytes)
        .retention_ms(None)
        .flush(FlushPolicy::default())
}

/// The partition of the groups topic that holds `group`'s records: Kafka's key partitioner
/// (murmur2 of the name, seed `0x9747b28c`, masked positive, modulo the count), the same
/// rule as `rill_proto::partitioner::partition_for_key`, which storage cannot depend on; a
/// broker test checks that the two agree.
pub fn partition_for_group(group: &str, partitions: u32) -> u32 {
    (murmur2(group.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2: 32-bit MurmurHash2, seed `0x9747b28c`, little-endian blocks.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = blocks.remainder();
    if let Some(&b) = tail.get(2) {
        h ^= u32::from(b) << 16;
    }
    if let Some(&b) = tail.get(1) {
        h ^= u32::from(b) << 8;
    }
    if let Some(&b) = tail.first() {
        h ^= u32::from(b);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

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

/// One group's offsets: topic → partition → offset. Sorted, so listings come out in order.
pub type GroupMap = BTreeMap<String, BTreeMap<u32, CommittedOffset>>;

/// One group's whole state.
#[derive(Debug, Clone, Default)]
struct GroupState {
    offsets: GroupMap,
    metadata: Option<Arc<[u8]>>,
}

impl GroupState {
    fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.metadata.is_none()
    }

    /// Applies one replayed or written record about this group.
    fn apply(&mut self, record: GroupRecord) {
        match record {
            GroupRecord::Commit { topic, entries, .. } => {
                let partitions = self.offsets.entry(topic).or_default();
                for (p, c) in entries {
                    partitions.insert(p, c);
                }
            }
            GroupRecord::ForgetTopic { topic, .. } => {
                self.offsets.remove(&topic);
            }
            GroupRecord::Metadata { metadata, .. } => {
                self.metadata = (!metadata.is_empty()).then(|| Arc::from(metadata));
            }
            GroupRecord::ForgetGroup { .. } => *self = GroupState::default(),
            GroupRecord::GroupSnapshot {
                offsets, metadata, ..
            } => {
                self.offsets = offsets;
                self.metadata = metadata.map(Arc::from);
            }
            GroupRecord::SnapshotMarker => {}
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotOutcome {
    /// The offset of the snapshot's marker record.
    pub snapshot_offset: u64,
    /// Groups written into it.
    pub groups: u32,
    /// Segments deleted because the snapshot replaces them.
    pub deleted_segments: u32,
}

/// Where a replicated groups topic's changes go: the partition's Raft group, whose apply
/// appends the batch to this replica's log before [`GroupsWriter::append`] returns.
pub trait GroupsWriter: Send + Sync + std::fmt::Debug {
    /// Commits `batch` (the records of one change) to partition `partition` of the groups
    /// topic, durably, and returns once this replica's log holds it. Blocking.
    fn append(&self, partition: u32, batch: Bytes) -> Result<()>;
}

/// Every group's state, kept in the groups topic. Cheap to clone: a handle around shared
/// state.
///
/// Readers ([`GroupStore::fetch`] and the listings) read an in-memory map and never wait for
/// a disk write. Writers of one group are serialized, and its records are appended while its
/// lock is held, so they land in the order applied. Writers of different groups run in
/// parallel and share the syncs of their partition (group commit).
#[derive(Debug, Clone)]
pub struct GroupStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topic: Topic,
    /// The view readers use: group → its state. A plain lock, held only to look up, clone an
    /// `Arc` or swap one in; never across I/O, so a slow sync never blocks a fetch.
    groups: RwLock<HashMap<String, Arc<GroupState>>>,
    /// One writer lock per group (created on first use, kept for the life of the store).
    writers: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per partition: writers hold it shared from append to publish; a snapshot holds it
    /// exclusively, so the state it writes is exactly what the log holds before it.
    gates: Vec<RwLock<()>>,
    /// Per partition: bytes appended since the last snapshot.
    since_snapshot_bytes: Vec<AtomicU64>,
    /// What could not be read at open, with the reason. Fixed after open.
    damaged: Vec<(PathBuf, String)>,
    /// Per partition: the offset the view holds every record before.
    applied_next: Vec<AtomicU64>,
    /// Set when the groups topic is replicated: changes go through it.
    writer: RwLock<Option<Arc<dyn GroupsWriter>>>,
    /// Per partition: where the view's walk of the log left its snapshot scan (guarded, like
    /// `applied_next`, by the partition's gate held exclusively).
    scans: Vec<Mutex<replay::SnapshotScan>>,
    /// Per partition of a replicated topic: its changes hold it shared from their catch-up to
    /// their commit; a snapshot holds it exclusively across all its commits, so no change
    /// interleaves with one.
    leader_writes: Vec<RwLock<()>>,
}

impl GroupStore {
    /// Opens the group state over the groups topic `topic`: replays every partition to
    /// rebuild the view, then imports the legacy offsets files of `legacy_dir` (when that
    /// folder exists).
    ///
    /// Damage never stops the open and is never misread. A fenced partition, a batch that
    /// fails its checks, or a record that does not decode is logged and listed by
    /// [`GroupStore::damaged`], and that partition's replay stops there: its groups keep what
    /// came before. A damaged legacy file is moved aside and listed. Only a failure to list
    /// the legacy folder is an error.
    pub fn open(topic: Topic, legacy_dir: &Path) -> Result<GroupStore> {
        let partitions = topic.partition_count();
        let mut damaged = Vec::new();
        let mut groups: HashMap<String, GroupState> = HashMap::new();
        let mut since_snapshot = Vec::with_capacity(partitions as usize);
        let mut applied_next = Vec::with_capacity(partitions as usize);
        let mut scans = Vec::with_capacity(partitions as usize);
        for (p, log) in topic.partitions() {
            applied_next.push(AtomicU64::new(
                log.as_ref().map_or(0, PartitionLog::high_watermark),
            ));
            let (bytes, scan) = match log {
                Ok(log) => replay::replay(&log, partitions, &mut groups, &mut damaged),
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "groups partition fenced; its groups start empty");
                    damaged.push((topic.dir().join(p.to_string()), e.to_string()));
                    (0, replay::SnapshotScan::default())
                }
            };
            since_snapshot.push(AtomicU64::new(bytes));
            // What a replay at open walked over is already bounded (a single broker deletes
            // when it writes a snapshot; a replica at its next marker).
            scans.push(Mutex::new(replay::SnapshotScan {
                complete: None,
                ..scan
            }));
        }
        groups.retain(|_, state| !state.is_empty());
        let mut store = GroupStore {
            inner: Arc::new(Inner {
                groups: RwLock::new(
                    groups
                        .into_iter()
                        .map(|(g, state)| (g, Arc::new(state)))
                        .collect(),
                ),
                writers: Mutex::new(HashMap::new()),
                gates: (0..partitions).map(|_| RwLock::new(())).collect(),
                since_snapshot_bytes: since_snapshot,
                topic,
                damaged: Vec::new(),
                applied_next,
                writer: RwLock::new(None),
                scans,
                leader_writes: (0..partitions).map(|_| RwLock::new(())).collect(),
            }),
        };
        let (files, legacy_damaged) = legacy::load(legacy_dir)?;
        damaged.extend(legacy_damaged);
        for file in files {
            if let Err(e) = store.import(&file) {
                tracing::error!(path = ?file.path, error = %e, "cannot import a legacy offsets file; it is kept and retried at the next open");
                damaged.push((file.path.clone(), format!("cannot import it: {e}")));
            }
        }
        // Fill in the damage list now that the store is built: no clone of it has escaped
        // yet, so this is its only handle.
        match Arc::get_mut(&mut store.inner) {
            Some(inner) => inner.damaged = damaged,
            None => tracing::error!(?damaged, "cannot record the groups damage list"),
        }
        Ok(store)
    }

    /// The groups topic.
    pub fn topic(&self) -> &Topic {
        &self.inner.topic
    }

    /// Commits `(partition, offset, metadata)` entries of `group` for `topic`, stamped with
    /// the current time.
    ///
    /// Every entry of one call lands atomically (one record), and it is durable on return. A
    /// later entry for the same partition in one call wins. A bad group or topic name
    /// ([`StorageError::InvalidName`]) or metadata over [`MAX_METADATA_BYTES`]
    /// ([`StorageError::InvalidConfig`]) changes nothing. An empty list changes nothing.
    /// On an error the in-memory offsets are unchanged.
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
        let commit_time_ms = now_ms();
        let record = GroupRecord::Commit {
            group: group.to_string(),
            topic: topic.to_string(),
            entries: offsets
                .iter()
                .map(|(p, o, m)| {
                    (
                        *p,
                        CommittedOffset {
                            offset: *o,
                            metadata: m.clone(),
                            commit_time_ms,
                        },
                    )
                })
                .collect(),
        };
        self.change(group, |_| Some(vec![record]))?;
        Ok(())
    }

    /// The committed offset of `group` for `topic`/`partition`, if any.
    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<CommittedOffset> {
        self.inner
            .groups
            .read()
            .get(group)?
            .offsets
            .get(topic)?
            .get(&partition)
            .cloned()
    }

    /// Every committed offset of `group` as `(topic, partition, offset)`, sorted by topic and
    /// partition. [`StorageError::GroupNotFound`] when the group has none.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, CommittedOffset)>> {
        let state = self
            .inner
            .groups
            .read()
            .get(group)
            .cloned()
            .filter(|s| !s.offsets.is_empty())
            .ok_or_else(|| StorageError::GroupNotFound {
                group: group.to_string(),
            })?;
        Ok(state
            .offsets
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .iter()
                    .map(move |(p, c)| (topic.clone(), *p, c.clone()))
            })
            .collect())
    }

    /// The groups that have committed offsets or metadata, sorted by name.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.groups.read().keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// `group`'s metadata (the broker's membership state), if any.
    pub fn metadata(&self, group: &str) -> Option<Arc<[u8]>> {
        self.inner.groups.read().get(group)?.metadata.clone()
    }

    /// Every group's metadata, sorted by group.
    pub fn all_metadata(&self) -> Vec<(String, Arc<[u8]>)> {
        let mut all: Vec<_> = self
            .inner
            .groups
            .read()
            .iter()
            .filter_map(|(g, s)| s.metadata.clone().map(|m| (g.clone(), m)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Replaces `group`'s metadata, durably; empty clears it. Over
    /// [`MAX_GROUP_METADATA_BYTES`] is [`StorageError::InvalidConfig`] and changes nothing.
    pub fn put_metadata(&self, group: &str, metadata: Vec<u8>) -> Result<()> {
        validate_name("group", group)?;
        if metadata.len() > MAX_GROUP_METADATA_BYTES {
            return Err(StorageError::InvalidConfig {
                topic: GROUPS_TOPIC.to_string(),
                reason: format!(
                    "group {group:?} metadata is {} bytes; at most {MAX_GROUP_METADATA_BYTES} are allowed",
                    metadata.len()
                ),
            });
        }
        let record = GroupRecord::Metadata {
            group: group.to_string(),
            metadata,
        };
        self.change(group, |_| Some(vec![record]))?;
        Ok(())
    }

    /// Deletes `group`: its offsets and metadata, durably. [`StorageError::GroupNotFound`]
    /// when it has neither.
    pub fn delete_group(&self, group: &str) -> Result<()> {
        validate_name("group", group)?;
        let changed = self.change(group, |state| {
            (!state.is_empty()).then(|| {
                vec![GroupRecord::ForgetGroup {
                    group: group.to_string(),
                }]
            })
        })?;
        if changed {
            Ok(())
        } else {
            Err(StorageError::GroupNotFound {
                group: group.to_string(),
            })
        }
    }

    /// Forgets every group's offsets for `topic` (a deleted topic); a group left with no
    /// state leaves the listing. Tries every group and returns the first error.
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        let affected: Vec<String> = self
            .inner
            .groups
            .read()
            .iter()
            .filter(|(_, s)| s.offsets.contains_key(topic))
            .map(|(group, _)| group.clone())
            .collect();
        let mut first_error = None;
        for group in affected {
            // The closure re-checks under the group's lock: a commit may have landed since.
            let result = self.change(&group, |state| {
                state.offsets.contains_key(topic).then(|| {
                    vec![GroupRecord::ForgetTopic {
                        group: group.clone(),
                        topic: topic.to_string(),
                    }]
                })
            });
            if let Err(e) = result {
                tracing::error!(group = %group, topic, error = %e, "cannot drop a deleted topic's offsets");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What was found damaged at open (groups partitions, legacy files), with the reason.
    pub fn damaged(&self) -> &[(PathBuf, String)] {
        &self.inner.damaged
    }

    /// Snapshots every partition that has had at least a segment's worth of records appended
    /// since its last snapshot ([`GroupStore::snapshot`]). Returns the snapshots written;
    /// tries every partition and returns the first error. On a replicated topic only a
    /// partition's leader may snapshot it: use [`GroupStore::compact_partitions_if_due`].
    pub fn compact_if_due(&self) -> Result<Vec<SnapshotOutcome>> {
        self.compact_partitions_if_due(0..self.inner.topic.partition_count())
    }

    /// [`GroupStore::compact_if_due`] for the partitions `partitions` only (on a replicated
    /// topic: those this broker leads).
    pub fn compact_partitions_if_due(
        &self,
        partitions: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<SnapshotOutcome>> {
        let threshold = self.inner.topic.config().segment_bytes;
        let mut done = Vec::new();
        let mut first_error = None;
        for p in partitions {
            let due = self
                .inner
                .since_snapshot_bytes
                .get(p as usize)
                .is_some_and(|b| b.load(Ordering::Relaxed) >= threshold);
            if due {
                match self.snapshot(p) {
                    Ok(outcome) => done.push(outcome),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "groups snapshot failed");
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(done), Err)
    }

    /// Writes a snapshot of partition `p` of the groups topic (every group's whole state, in
    /// batches of at most half a segment, then a marker, all synced), then deletes the sealed
    /// segments that end before it: replay from the new log start rebuilds the same state
    /// (see the module doc). A group whose state alone exceeds the batch limit makes the
    /// snapshot fail, and nothing is deleted. On a replicated topic the batches are
    /// committed through its writer, and every replica deletes at the marker (see
    /// "Replicated" in the module doc); only the partition's leader may call it.
    pub fn snapshot(&self, p: u32) -> Result<SnapshotOutcome> {
        let replicated = self.inner.writer.read().clone();
        if let Some(writer) = replicated {
            return self.snapshot_replicated(p, &*writer);
        }
        let log = self.inner.topic.partition(p)?;
        let gate = self.gate(p)?;
        let _exclusive = gate.write();
        let batches = self.snapshot_batches(p, &log);
        let group_count = batches.iter().flatten().count().saturating_sub(1) as u32;
        let mut first_offset = None;
        let mut end = log.high_watermark();
        for batch in &batches {
            let info = append_records(&log, batch)?;
            first_offset.get_or_insert(info.0);
            end = info.1;
        }
        log.sync_through(end)?;
        let snapshot_offset = first_offset.unwrap_or(end);
        if let Some(counter) = self.inner.since_snapshot_bytes.get(p as usize) {
            counter.store(0, Ordering::Relaxed);
        }
        let deleted = log.delete_segments_before(snapshot_offset)?;
        tracing::info!(
            partition = p,
            snapshot_offset,
            groups = group_count,
            deleted_segments = deleted.deleted_segments,
            "groups partition snapshotted"
        );
        Ok(SnapshotOutcome {
            snapshot_offset,
            groups: group_count,
            deleted_segments: deleted.deleted_segments,
        })
    }

    /// The records of a snapshot of partition `p` as the view holds it (every group's whole
    /// state, sorted by group, then the marker), cut into batches of at most half a segment.
    fn snapshot_batches(&self, p: u32, log: &PartitionLog) -> Vec<Vec<GroupRecord>> {
        let mut states = Vec::new();
        {
            let groups = self.inner.groups.read();
            let mut names: Vec<&String> = groups
                .keys()
                .filter(|g| self.partition_of(g) == p)
                .collect();
            names.sort_unstable();
            for g in names {
                if let Some(state) = groups.get(g) {
                    states.push(GroupRecord::GroupSnapshot {
                        group: g.clone(),
                        offsets: state.offsets.clone(),
                        metadata: state.metadata.as_deref().map(<[u8]>::to_vec),
                    });
                }
            }
        }
        states.push(GroupRecord::SnapshotMarker);
        let limit = max_change_bytes(log);
        let mut batches = Vec::new();
        let mut batch: Vec<GroupRecord> = Vec::new();
        let mut batch_bytes = 0;
        for record in states {
            // The value plus room for the record's framing and key.
            let len = record.encode().map_or(0, |v| v.len()) + 300;
            if !batch.is_empty() && batch_bytes + len > limit {
                batches.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch.push(record);
            batch_bytes += len;
        }
        batches.push(batch);
        batches
    }

    /// How many partitions the groups topic has.
    pub fn partition_count(&self) -> u32 {
        self.inner.topic.partition_count()
    }

    /// The partition of the groups topic that holds `group`'s state.
    pub fn partition_of(&self, group: &str) -> u32 {
        partition_for_group(group, self.inner.topic.partition_count())
    }

    /// Imports a legacy file: appends what the topic lacks, then renames the file.
    fn import(&self, file: &legacy::LegacyFile) -> Result<()> {
        self.change(&file.group, |state| {
            let records: Vec<GroupRecord> = file
                .offsets
                .iter()
                .filter_map(|(topic, partitions)| {
                    let have = state.offsets.get(topic);
                    let entries: Vec<(u32, CommittedOffset)> = partitions
                        .iter()
                        .filter(|(p, _)| have.is_none_or(|h| !h.contains_key(p)))
                        .map(|(p, c)| (*p, c.clone()))
                        .collect();
                    (!entries.is_empty()).then(|| GroupRecord::Commit {
                        group: file.group.clone(),
                        topic: topic.clone(),
                        entries,
                    })
                })
                .collect();
            (!records.is_empty()).then_some(records)
        })?;
        legacy::mark_imported(&file.path)?;
        tracing::info!(group = %file.group, path = ?file.path, "imported a legacy offsets file");
        Ok(())
    }

    /// The one write path: under `group`'s writer lock, `decide` looks at the current state
    /// and returns the records to write (or none: no change). They are appended as one
    /// batch, synced, and then applied to the view. Returns whether anything was written.
    fn change(
        &self,
        group: &str,
        decide: impl FnOnce(&GroupState) -> Option<Vec<GroupRecord>>,
    ) -> Result<bool> {
        let writer = self.writer(group);
        let _writing = writer.lock();
        let p = self.partition_of(group);
        let replicated = self.inner.writer.read().clone();
        if let Some(replicated) = replicated {
            return self.change_replicated(group, p, &*replicated, decide);
        }
        let current = self.state_of(group);
        let Some(records) = decide(&current) else {
            return Ok(false);
        };
        let log = self.inner.topic.partition(p)?;
        let gate = self.gate(p)?;
        let _shared = gate.read();
        let (_, end, bytes) = append_records(&log, &records)?;
        log.sync_through(end)?;
        if let Some(counter) = self.inner.since_snapshot_bytes.get(p as usize) {
            counter.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        if let Some(applied) = self.inner.applied_next.get(p as usize) {
            applied.fetch_max(end, Ordering::Relaxed);
        }
        let mut next = current;
        for record in records {
            next.apply(record);
        }
        let mut groups = self.inner.groups.write();
        if next.is_empty() {
            groups.remove(group);
        } else {
            groups.insert(group.to_string(), Arc::new(next));
        }
        Ok(true)
    }

    /// A copy of `group`'s state in the view (empty when it has none).
    fn state_of(&self, group: &str) -> GroupState {
        self.inner
            .groups
            .read()
            .get(group)
            .map(|s| GroupState::clone(s))
            .unwrap_or_default()
    }

    pub(crate) fn gate(&self, p: u32) -> Result<&RwLock<()>> {
        self.inner
            .gates
            .get(p as usize)
            .ok_or_else(|| StorageError::PartitionNotFound {
                topic: GROUPS_TOPIC.to_string(),
                partition: p,
                partitions: self.inner.topic.partition_count(),
            })
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
}

/// The largest batch one change may append: half a segment of the groups topic, so a
/// batch always fits a fresh segment, and at most the engine's batch limit.
pub(crate) fn max_change_bytes(log: &PartitionLog) -> usize {
    usize::try_from(log.options().segment_bytes / 2)
        .unwrap_or(usize::MAX)
        .min(log.options().max_batch_bytes)
}

/// Appends `records` as one batch (keyed by group), not synced. Returns the batch's base
/// offset, the offset after it, and its size in bytes.
fn append_records(log: &PartitionLog, records: &[GroupRecord]) -> Result<(u64, u64, usize)> {
    let batch = build_batch(records, max_change_bytes(log))?;
    let info = log.append(&batch)?;
    Ok((info.base_offset, info.next_offset, batch.len()))
}

/// `records` as one batch (keyed by group), or [`StorageError::InvalidConfig`] when it is
/// over `limit` bytes.
pub(crate) fn build_batch(records: &[GroupRecord], limit: usize) -> Result<Bytes> {
    let invalid = |reason: String| StorageError::InvalidConfig {
        topic: GROUPS_TOPIC.to_string(),
        reason,
    };
    let now = now_ms();
    let mut builder = BatchBuilder::new(BytesMut::new());
    for record in records {
        let value = record.encode().map_err(invalid)?;
        builder
            .try_push(record.group().map(str::as_bytes), &value, &[], now)
            .map_err(|e| invalid(format!("cannot build a groups batch: {e}")))?;
    }
    let batch = builder
        .try_finish()
        .map_err(|e| invalid(format!("cannot build a groups batch: {e}")))?;
    if batch.len() > limit {
        return Err(invalid(format!(
            "a change of {} bytes does not fit the groups topic, whose limit is {limit} bytes \
             (half a segment); commit fewer partitions at once",
            batch.len()
        )));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests;
