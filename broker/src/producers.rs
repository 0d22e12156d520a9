//! Producer ids: the broker's registry behind `InitProducer`, kept in the internal
//! `__producers` topic (one partition, flushed on every append) and in memory.
//!
//! The topic holds two kinds of records: an id block (`every id below next_id may have been
//! given`) and a named producer's id and current epoch. Ids are given in order from a cursor
//! that only the writer holds; an id is given only once a block holding it is durable, and a
//! writer that (re)starts, or a new leader in a cluster, starts its cursor at the end of the
//! last block, so no id is ever given twice, even across restarts and failovers (the ids a
//! writer did not give before it stopped are skipped). A named producer keeps its id, and
//! each `InitProducer` with its name raises its epoch, which fences the older instance: its
//! batches are refused from then on.
//!
//! On a single broker a block is one id (each `InitProducer` appends and syncs, as the old
//! per-broker file did). In a cluster (see [`crate::internal`]) the registry is written only
//! by the leader of `__producers`, through Raft commits; other brokers forward
//! `InitProducer` to it, and every broker's memory follows its replica, so the produce-time
//! [`ProducerIds::check`] on any partition leader knows every id and epoch within a commit's
//! time. There a block is [`CLUSTER_BLOCK`] ids, committed well before its ids are given,
//! so an unnamed `InitProducer` is answered without a commit.
//!
//! The per-partition sequences live with each partition's log (`rill_storage::producers`),
//! where they are rebuilt from the batches.
//!
//! # Compaction
//! Once the topic has grown by about a segment (`--state-segment-bytes`) since the last
//! compaction marker (counted by the log's tail, so a new leader or a restarted broker
//! knows it too), the writer, holding the cursor's lock (so no id is given meanwhile), rewrites
//! the registry ([`crate::internal::compact`]): the id block (`next_id` = the end of the
//! last block), then each named producer whole in one batch (a record for every id it held
//! before, with that id's newest epoch, so an id a name left when its epoch ran out stays
//! fenced; then its current id and epoch), then a [`ProducerRecord::Compacted`] marker
//! naming the rewrite's first offset. Whoever tails the log, the single broker too, deletes
//! the sealed segments that end before that offset when it reads the marker.
//!
//! Every record states a whole value that replay folds by maximum (the block end, each id's
//! newest epoch) or replaces (a name's current id and epoch, restated as it is). So replay
//! of any prefix of a rewrite after the records it restates changes nothing: a crash, or a
//! leader change, at any point of a rewrite leaves the registry exactly as before it (the
//! old segments are deleted only after the marker, once the whole rewrite is durable), the
//! block end never goes back (no id is given twice) and no epoch goes back. Replay from a
//! later log start (a segment boundary before a marker's rewrite) reads the newest records
//! of some names, then the whole rewrite, which restates every name and the block end: the
//! same registry. A broker older than the marker refuses to start on a log that holds one
//! (the record kind does not decode: "cannot be replayed"), rather than guess.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use rill_storage::batch::Record;
use rill_storage::{FlushPolicy, PartitionLog, Store, TopicConfig};
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::state::Broker;

/// The internal topic that holds the registry.
pub const PRODUCERS_TOPIC: &str = "__producers";

/// The old per-broker registry file in the data folder, imported once into `__producers`
/// by a single broker (then renamed to [`IMPORTED_FILE`]).
pub const FILE: &str = "producer-ids";

/// What [`FILE`] is renamed to once imported.
pub const IMPORTED_FILE: &str = "producer-ids.imported";

/// Ids per block in a cluster: a new block is committed when fewer than half remain, so
/// every broker knows an id's block long before a producer is given it.
pub const CLUSTER_BLOCK: i64 = 1000;

/// The longest a produce waits for this broker's copy of the registry to learn its producer
/// id (see [`ProducerIds::await_known`]).
pub const CATCH_UP_MS: u64 = 2_000;

/// How often a replica of `__producers` whose Raft group has not started here is looked for.
const GROUP_POLL_MS: u64 = 50;

/// The version byte that starts every record of `__producers`.
const VERSION: u8 = 1;

/// One record of `__producers`: a version byte, then this as JSON tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProducerRecord {
    /// Every id below `next_id` may have been given.
    IdBlock {
        /// The end (exclusive) of the ids that may be given.
        next_id: i64,
    },
    /// A named producer's id and current epoch.
    NamedProducer {
        /// The producer's name.
        name: String,
        /// Its id.
        id: i64,
        /// Its current epoch; older epochs are fenced.
        epoch: i16,
    },
    /// A compaction: the records from `start` to this one restate the whole registry, so
    /// the segments before `start` may be deleted.
    Compacted {
        /// The offset of the rewrite's first record.
        start: u64,
    },
}

impl ProducerRecord {
    /// The record's bytes: the version byte, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Plain strings and integers always serialize.
        serde_json::to_writer(&mut out, self).expect("a producer record always serializes");
        out
    }

    /// Reads a record's bytes, or the reason they do not decode.
    pub fn decode(bytes: &[u8]) -> Result<ProducerRecord, String> {
        match bytes.split_first() {
            None => Err("an empty record".into()),
            Some((&VERSION, json)) => serde_json::from_slice(json).map_err(|e| e.to_string()),
            Some((v, _)) => Err(format!(
                "record version {v} is not understood (this broker reads {VERSION})"
            )),
        }
    }
}

/// A named producer's id and current epoch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Named {
    id: i64,
    epoch: i16,
}

/// The registry as the log holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    /// Every id below it may have been given; none at or above it was.
    block_end: i64,
    /// Producer name → its id and current epoch.
    named: BTreeMap<String, Named>,
    /// Id → the newest epoch of a named producer with that id, for the produce check.
    epochs: BTreeMap<i64, i16>,
    /// Id → the name that holds or held it, so a compaction restates every id's epoch.
    holders: BTreeMap<i64, String>,
}

impl State {
    fn apply(&mut self, record: ProducerRecord) {
        match record {
            ProducerRecord::IdBlock { next_id } => self.block_end = self.block_end.max(next_id),
            ProducerRecord::NamedProducer { name, id, epoch } => {
                let newest = self.epochs.entry(id).or_insert(epoch);
                *newest = (*newest).max(epoch);
                self.holders.insert(id, name.clone());
                self.named.insert(name, Named { id, epoch });
            }
            ProducerRecord::Compacted { .. } => {}
        }
    }

    /// The records that restate this registry, in groups never to be split across batches:
    /// the block end, then each named producer whole (every id it held before with that id's
    /// newest epoch, then its current id's newest epoch when its current one is older, then
    /// its current id and epoch). Replayed after any of the records they restate, they
    /// leave the registry as it is (module doc).
    fn rewrite(&self) -> Vec<Vec<ProducerRecord>> {
        let mut groups = vec![vec![ProducerRecord::IdBlock {
            next_id: self.block_end,
        }]];
        let mut held: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (id, name) in &self.holders {
            held.entry(name.as_str()).or_default().push(*id);
        }
        for (name, current) in &self.named {
            let named = |id: i64, epoch: i16| ProducerRecord::NamedProducer {
                name: name.clone(),
                id,
                epoch,
            };
            let newest = |id: i64| self.epochs.get(&id).copied().unwrap_or(current.epoch);
            let mut group: Vec<ProducerRecord> = held
                .get(name.as_str())
                .into_iter()
                .flatten()
                .filter(|id| **id != current.id)
                .map(|id| named(*id, newest(*id)))
                .collect();
            if newest(current.id) != current.epoch {
                group.push(named(current.id, newest(current.id)));
            }
            group.push(named(current.id, current.epoch));
            groups.push(group);
        }
        groups
    }
}

/// The broker's producer ids. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProducerIds {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// A plain lock: held only to read or apply, never across an await.
    state: RwLock<State>,
    /// How far memory follows the log. Locked while the log is read into memory, so two
    /// refreshes never apply the same records.
    tail: parking_lot::Mutex<Tail>,
    /// The writer's cursor (the next id it gives), which also serialises changes: append,
    /// then apply. Meaningful only on the writer; reset when it starts to write.
    cursor: tokio::sync::Mutex<i64>,
    /// The segment size of a `__producers` created here (`--state-segment-bytes`).
    segment_bytes: u64,
    /// The growth since the last compaction that starts one: `segment_bytes` (tests hold it
    /// off).
    compact_after_bytes: std::sync::atomic::AtomicU64,
}

/// How far memory follows the log.
#[derive(Debug, Default)]
struct Tail {
    /// The offset memory holds every record before.
    next: u64,
    /// The growth since the last compaction, which the writer compacts on.
    growth: crate::internal::compact::Growth,
}

/// The config of `__producers`: one partition, flushed on every append, kept forever
/// (compaction bounds it), in segments of `segment_bytes` (`--state-segment-bytes`). Used
/// when the topic is created; an existing topic keeps its own.
pub fn producers_topic_config(segment_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: None,
        retention_bytes: None,
        flush: FlushPolicy::Always,
        segment_bytes,
        ..TopicConfig::default()
    }
}

fn producers_log(store: &Store, segment_bytes: u64) -> Result<PartitionLog, BrokerError> {
    Ok(store
        .internal_topic(PRODUCERS_TOPIC, producers_topic_config(segment_bytes))?
        .partition(0)?)
}

fn corrupt(what: String) -> BrokerError {
    BrokerError::Internal(format!(
        "the {PRODUCERS_TOPIC} topic cannot be replayed ({what}); the broker will not start \
         with producer ids it cannot read (it could give an id twice)"
    ))
}

/// Applies every record of `log` from offset `from` to `state` and, when it read a
/// compaction marker, deletes the segments before the marker's rewrite (this replica's own;
/// see the module doc). Moves `tail` to the offset reached. Blocking.
fn follow_log(log: &PartitionLog, tail: &mut Tail, state: &mut State) -> Result<(), BrokerError> {
    let (mut marker, mut bytes) = (None, 0u64);
    let end = crate::internal::replay_values(log, tail.next, corrupt, |offset, value| {
        let decoded = ProducerRecord::decode(value)
            .map_err(|e| corrupt(format!("the record at offset {offset}: {e}")))?;
        if let ProducerRecord::Compacted { start } = decoded {
            (marker, bytes) = (Some(start), 0);
        } else {
            bytes += value.len() as u64;
        }
        state.apply(decoded);
        Ok(())
    })?;
    tail.next = end;
    tail.growth.read(marker.is_some(), bytes);
    if let Some(start) = marker {
        crate::internal::compact::delete_before(PRODUCERS_TOPIC, log, start);
    }
    Ok(())
}

/// The old file's layout.
#[derive(Debug, Deserialize)]
struct OldFile {
    next_id: i64,
    #[serde(default)]
    named: BTreeMap<String, Named>,
}

/// Imports `<data>/producer-ids` into an empty local `__producers` (synced), then renames
/// the file so it is imported once. Blocking.
fn import_file(data_dir: &Path, log: &PartitionLog) -> Result<bool, BrokerError> {
    let path = data_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(BrokerError::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let old: OldFile = toml::from_str(&text)
        .map_err(|e| BrokerError::Internal(format!("{} does not parse: {e}", path.display())))?;
    let mut records = vec![ProducerRecord::IdBlock {
        next_id: old.next_id,
    }];
    records.extend(
        old.named
            .into_iter()
            .map(|(name, n)| ProducerRecord::NamedProducer {
                name,
                id: n.id,
                epoch: n.epoch,
            }),
    );
    let batch = rill_storage::batch::try_encode_batch(&to_records(&records))
        .map_err(|e| BrokerError::Internal(format!("encoding {PRODUCERS_TOPIC}: {e}")))?;
    let appended = log.append(&batch)?;
    log.sync_through(appended.next_offset)?;
    std::fs::rename(&path, data_dir.join(IMPORTED_FILE)).map_err(|e| {
        BrokerError::Internal(format!(
            "cannot rename {} once imported: {e}",
            path.display()
        ))
    })?;
    rill_storage::fsutil::fsync_dir(data_dir)?;
    Ok(true)
}

fn to_records(records: &[ProducerRecord]) -> Vec<Record> {
    let now = rill_storage::log::now_ms();
    records
        .iter()
        .map(|r| Record {
            key: None,
            value: Bytes::from(r.encode()),
            headers: Vec::new(),
            timestamp_ms: now,
        })
        .collect()
}

/// The end of the block to commit before giving `id` when the last block ends at
/// `block_end`, if one is needed: on a single broker a block is that one id; in a cluster a
/// block of [`CLUSTER_BLOCK`] ids is added once fewer than half of the current one remain
/// after `id`, so followers know it long before its ids are given.
fn next_block(id: i64, block_end: i64, clustered: bool) -> Option<i64> {
    let (block, low_water) = if clustered {
        (CLUSTER_BLOCK, CLUSTER_BLOCK / 2)
    } else {
        (1, 0)
    };
    (id + 1 + low_water > block_end).then(|| block_end.max(id) + block)
}

impl ProducerIds {
    /// Opens the registry: replays `__producers` (created empty if missing). `import_old`
    /// (a single broker) first imports an old `<data>/producer-ids` file into an empty topic;
    /// a cluster member never writes its internal topics outside Raft, so it leaves the file
    /// alone (its ids came from per-broker ranges the cluster registry does not reuse).
    /// `segment_bytes` is the segment size if the topic is created here. Blocking (file work).
    pub fn open(store: Store, import_old: bool, segment_bytes: u64) -> Result<Self, BrokerError> {
        let log = producers_log(&store, segment_bytes)?;
        let data_dir = store.data_dir().to_path_buf();
        if import_old && log.high_watermark() == 0 && import_file(&data_dir, &log)? {
            tracing::info!(
                "imported {} into {PRODUCERS_TOPIC}",
                data_dir.join(FILE).display()
            );
        } else if !import_old && data_dir.join(FILE).exists() {
            tracing::warn!(
                "{} is a single broker's producer ids; a cluster keeps them in \
                 {PRODUCERS_TOPIC} and does not carry that file over",
                data_dir.join(FILE).display()
            );
        }
        let mut state = State::default();
        // A marker read here is acted on again: a crash may have come between it and the
        // deletion.
        let mut tail = Tail::default();
        follow_log(&log, &mut tail, &mut state)?;
        let cursor = state.block_end;
        tracing::info!(
            next_id = state.block_end,
            named = state.named.len(),
            "producer ids loaded from {PRODUCERS_TOPIC}"
        );
        Ok(ProducerIds {
            inner: Arc::new(Inner {
                store,
                state: RwLock::new(state),
                tail: parking_lot::Mutex::new(tail),
                cursor: tokio::sync::Mutex::new(cursor),
                segment_bytes,
                compact_after_bytes: std::sync::atomic::AtomicU64::new(segment_bytes),
            }),
        })
    }

    /// Gives an id and epoch: a fresh id with epoch 0, or for `name` its id with the next
    /// epoch. What it gives is durable before it returns (a Raft commit in a cluster). Call
    /// it only on the writer (a single broker, or the settled leader of `__producers`).
    pub async fn init(
        &self,
        broker: &Broker,
        name: Option<&str>,
    ) -> Result<(i64, i16), BrokerError> {
        if let Some(name) = name {
            rill_storage::config::validate_name("producer", name)?;
        }
        let mut cursor = self.inner.cursor.lock().await;
        self.refresh().await?;
        let (block_end, known) = {
            let state = self.inner.state.read();
            (
                state.block_end,
                name.and_then(|n| state.named.get(n).copied()),
            )
        };
        let clustered = crate::internal::replication(broker).is_some();
        // A new id, unless a named producer keeps its own (Kafka gives a new id when the
        // epoch would overflow).
        let given = match known {
            Some(n) if n.epoch < i16::MAX => (n.id, n.epoch + 1, false),
            _ => (*cursor, 0, true),
        };
        let mut records = Vec::new();
        if given.2 {
            if let Some(next_id) = next_block(given.0, block_end, clustered) {
                records.push(ProducerRecord::IdBlock { next_id });
            }
        }
        if let Some(name) = name {
            records.push(ProducerRecord::NamedProducer {
                name: name.to_string(),
                id: given.0,
                epoch: given.1,
            });
        }
        if given.2 {
            // Taken before the append: an append that fails may still commit later (a Raft
            // timeout), and its id must not be given again.
            *cursor = given.0 + 1;
        }
        if !records.is_empty() {
            crate::internal::append(broker, PRODUCERS_TOPIC, 0, to_records(&records)).await?;
            self.refresh().await?;
            // What was given above is durable whatever the compaction does.
            crate::internal::compact::compact_if_due(
                PRODUCERS_TOPIC,
                &self.inner.compact_after_bytes,
                &self.inner.tail,
                |t| &mut t.growth,
                || self.compact(broker),
            )
            .await;
        }
        Ok((given.0, given.1))
    }

    /// Rewrites the registry and appends the marker (module doc); the tail of the log, here
    /// [`Self::refresh`], deletes the segments before the rewrite. The caller holds the
    /// cursor's lock, so the registry does not change meanwhile.
    async fn compact(&self, broker: &Broker) -> Result<(), BrokerError> {
        self.refresh().await?;
        let limit = usize::try_from(self.inner.segment_bytes / 4).unwrap_or(usize::MAX);
        let (batches, end) = self.rewrite_batches(limit);
        let records: usize = batches.iter().map(Vec::len).sum();
        let start =
            crate::internal::compact::rewrite(broker, PRODUCERS_TOPIC, batches, end, |start| {
                to_records(&[ProducerRecord::Compacted { start }]).remove(0)
            })
            .await?;
        self.refresh().await?;
        tracing::info!(start, records, "{PRODUCERS_TOPIC} compacted");
        Ok(())
    }

    /// The batches of a rewrite of the registry (each of about `limit_bytes`, a named
    /// producer whole in one), and the offset memory reached (where the marker goes when
    /// there is nothing to rewrite).
    fn rewrite_batches(&self, limit_bytes: usize) -> (Vec<Vec<Record>>, u64) {
        let tail = self.inner.tail.lock();
        let groups = self.inner.state.read().rewrite();
        let batches =
            crate::internal::compact::pack(groups.iter().map(|g| to_records(g)), limit_bytes);
        (batches, tail.next)
    }

    /// Checks a batch's producer id and epoch against the registry: an id never given, or
    /// an epoch older than a named producer's latest, is refused (FAILED_PRECONDITION).
    /// Sequences are checked by the partition.
    pub fn check(&self, producer_id: i64, epoch: i16) -> Result<(), BrokerError> {
        if producer_id == -1 {
            return Ok(());
        }
        let state = self.inner.state.read();
        if producer_id < 0 || producer_id >= state.block_end {
            return Err(BrokerError::UnknownProducerId { producer_id });
        }
        if let Some(&current) = state.epochs.get(&producer_id) {
            if epoch < current {
                return Err(BrokerError::ProducerFenced {
                    producer_id,
                    epoch,
                    current,
                });
            }
        }
        Ok(())
    }

    /// In a cluster, when `id` is beyond the blocks memory knows, waits until this broker's
    /// replica of `__producers` has applied a block holding it, or [`CATCH_UP_MS`] passed (a
    /// follower learns a commit a moment after the leader answers; a replica just started
    /// may be further behind). Returns at once when the id is known, or on a single broker.
    /// Only this request waits; the check that follows refuses an id still unknown.
    pub async fn await_known(&self, broker: &Broker, id: i64) {
        if self.inner.state.read().block_end > id {
            return;
        }
        let Some(r) = crate::internal::replication(broker) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(CATCH_UP_MS);
        loop {
            // A change may land between this refresh and the watch below: the watch is
            // taken first, so it is not missed.
            let changes = r.watch(PRODUCERS_TOPIC, 0);
            if self.refresh().await.is_err() || self.inner.state.read().block_end > id {
                return;
            }
            match changes {
                Some(mut changes) => tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    changed = changes.changed() => if changed.is_err() { return },
                },
                // The group has not started here yet.
                None => {
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    let poll = tokio::time::Instant::now() + Duration::from_millis(GROUP_POLL_MS);
                    tokio::time::sleep_until(poll.min(deadline)).await;
                }
            }
        }
    }

    /// Applies to memory what this broker's `__producers` log holds beyond it. Runs on the
    /// blocking pool.
    pub async fn refresh(&self) -> Result<(), BrokerError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.refresh_blocking()).await?
    }

    fn refresh_blocking(&self) -> Result<(), BrokerError> {
        let mut tail = self.inner.tail.lock();
        let log = producers_log(&self.inner.store, self.inner.segment_bytes)?;
        if tail.next >= log.high_watermark() {
            return Ok(());
        }
        // From a later log start (a replica restarted at its source's), the records replayed
        // fold onto what memory holds: every value is a maximum or restated whole by the
        // rewrite there, so nothing goes back.
        let mut state = self.inner.state.read().clone();
        follow_log(&log, &mut tail, &mut state)?;
        *self.inner.state.write() = state;
        Ok(())
    }

    /// A new writer in a cluster: memory holds every committed record; the cursor starts at
    /// the end of the last block (ids of it the old leader did not give are skipped), and
    /// a fresh block is committed at once so every broker knows it before its ids are given.
    async fn settle(&self, broker: &Broker) -> Result<(), BrokerError> {
        let mut cursor = self.inner.cursor.lock().await;
        self.refresh().await?;
        let block_end = self.inner.state.read().block_end;
        let record = ProducerRecord::IdBlock {
            next_id: block_end + CLUSTER_BLOCK,
        };
        crate::internal::append(broker, PRODUCERS_TOPIC, 0, to_records(&[record])).await?;
        self.refresh().await?;
        *cursor = block_end;
        Ok(())
    }

    /// Keeps memory following this broker's replica of `__producers` in a cluster, and
    /// settles this broker as the writer when it comes to lead it (see
    /// [`crate::internal::follow`]); nothing on a single broker.
    pub fn follow(&self, broker: &Broker) {
        let (a, b, settling) = (self.clone(), self.clone(), broker.clone());
        crate::internal::follow(
            broker,
            PRODUCERS_TOPIC,
            1,
            move |_| {
                let ids = a.clone();
                async move {
                    if let Err(e) = ids.refresh().await {
                        tracing::error!(error = %e, "the producer ids cannot follow their log");
                    }
                }
            },
            move |_| {
                let (ids, broker) = (b.clone(), settling.clone());
                async move { ids.settle(&broker).await }
            },
        );
    }
}

#[cfg(test)]
mod tests;
