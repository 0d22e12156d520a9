//! Replicated partitions: [`PartitionMachine`], the state machine that appends committed
//! batches to a replica's `PartitionLog`, and [`Replication`], which starts the Raft groups of
//! this broker's replicas as the controller's metadata names them, and routes writes.
//!
//! Offsets: the apply is deterministic, so every replica gives the same offsets. The machine
//! keeps `next_offset`, the end its applied entries produced (saved in its snapshots). After a
//! restart openraft re-applies entries the partition log may already hold; an entry whose
//! records lie wholly below the log's end is recognised as applied and skipped, so nothing is
//! appended twice. A log that ends *before* `next_offset` lost data this replica acknowledged:
//! the group stops here instead of giving other offsets than its peers.
//!
//! Acks ([`WriteAck`]): a command carries its ack mode, so every replica's Raft log knows
//! whether to fsync it before it counts (`durable`) or not (`leader`, `quorum`), and a token
//! by which the leader's log wakes a `leader` ack as soon as the entry is in its own log. A
//! `leader` ack's offset is the one the apply will give the entry if it commits: the
//! machine's applied end plus the records of the entries between.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use parking_lot::RwLock;
use rill_storage::batch::BatchHeader;
use rill_storage::log::{Ack, AppendInfo};
use rill_storage::{FlushPolicy, PartitionLog, StorageError, TopicConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::controller::{ControllerCommand, ControllerError, ControllerReply, Metadata};
use crate::log_store::AppendWaiters;
use crate::machine::{Machine, MachineStore};
use crate::node::ClusterNode;
use crate::types::{Command, GroupId, LogId, NodeId, Raft, Reply};

/// The broker's local topics, as the replication layer needs them.
pub trait LocalTopics: Send + Sync + 'static {
    /// Creates topic `name` locally with `config` unless it exists. Blocking.
    fn ensure_topic(&self, name: &str, config: &TopicConfig) -> Result<(), String>;
    /// Partition `p` of topic `name`, if it exists locally.
    fn partition(&self, name: &str, p: u32) -> Option<PartitionLog>;
    /// Records were appended to partition `p` up to `next_offset`: wake waiting fetches.
    fn appended(&self, name: &str, p: u32, next_offset: u64);
    /// Deletes topic `name` locally (its data, and its group offsets as a single broker's
    /// delete does); nothing to do if it does not exist. Blocking.
    fn delete_topic(&self, name: &str) -> Result<(), String>;
}

/// What a replicated write's acknowledgement waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAck {
    /// The entry is in the leader's own Raft log (its page cache). Not committed: lost if
    /// the leader fails before a majority holds it.
    Leader,
    /// Committed: in the Raft logs of a majority (their page caches, not fsynced), and
    /// applied by the leader.
    Quorum,
    /// Committed by a majority that each fsynced the entry in its Raft log, and applied by
    /// the leader.
    Durable,
}

impl WriteAck {
    fn code(self) -> u8 {
        match self {
            WriteAck::Leader => 1,
            WriteAck::Quorum => 2,
            WriteAck::Durable => 3,
        }
    }
}

/// The result of one replicated write, as the apply returns it: the base offset and the
/// record count, or why every replica refused the batch.
pub type WriteReply = Result<(u64, u32), Refusal>;

/// Why every replica refused a replicated batch (the apply's answer, the same on each).
/// Typed, so the broker answers as it does for a single broker's partition: a pipelining
/// idempotent producer must tell "an earlier batch has not landed yet" from bad input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The batch itself is invalid (its format, its size, its producer fields).
    #[error("{0}")]
    Invalid(String),
    /// The producer's state disagrees with the partition's: a stale epoch, or a sequence
    /// gap, for which `expected_sequence` is the sequence the partition expects next (a
    /// batch that overtook an earlier one of its producer; resent, it lands).
    #[error("{message}")]
    ProducerState {
        /// What was refused, naming the topic and partition.
        message: String,
        /// The partition's next sequence for the producer, on a sequence gap.
        expected_sequence: Option<i32>,
    },
}

impl Refusal {
    /// The refusal of a storage error the apply answers with, `None` for a local failure.
    fn of(e: &StorageError) -> Option<Refusal> {
        use rill_storage::producers::ProducerError;
        match e {
            StorageError::ProducerRefused { source, .. } => Some(match source {
                ProducerError::BadFields { .. } => Refusal::Invalid(e.to_string()),
                ProducerError::SequenceGap { expected, .. } => Refusal::ProducerState {
                    message: e.to_string(),
                    expected_sequence: Some(*expected),
                },
                _ => Refusal::ProducerState {
                    message: e.to_string(),
                    expected_sequence: None,
                },
            }),
            StorageError::InvalidBatch { .. } | StorageError::BatchTooLarge { .. } => {
                Some(Refusal::Invalid(e.to_string()))
            }
            _ => None,
        }
    }
}

/// Why a replicated write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This broker does not lead the partition; the leader, if known, is named.
    #[error("this broker does not lead topic {topic} partition {partition}")]
    NotLeader {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The leader's node id and address, if known.
        leader: Option<(NodeId, String)>,
    },
    /// No commit within the deadline (no quorum); the write may or may not commit later.
    #[error(
        "topic {topic} partition {partition}: not committed within {waited_ms} ms (no quorum?)"
    )]
    Timeout {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// How long it waited.
        waited_ms: u64,
    },
    /// Every replica refused the batch (it is invalid, or its producer's state disagrees).
    #[error("{0}")]
    Refused(Refusal),
    /// The group failed here.
    #[error("topic {topic} partition {partition}: {message}")]
    Failed {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What failed.
        message: String,
    },
}

/// Why a topic could not be created or deleted through the controller.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The controller refused it.
    #[error(transparent)]
    Refused(#[from] ControllerError),
    /// The controller has no leader, or did not answer in time.
    #[error("the cluster controller is unavailable: {0}")]
    Unavailable(String),
}

/// One replica of a partition as its leader sees it ([`Replication::replica_states`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaProgress {
    /// The replica's node id.
    pub node: NodeId,
    /// It holds every entry the leader has applied (committed).
    pub in_sync: bool,
    /// The Raft entries (produce requests, and elections' blank entries) it lacks of the
    /// leader's log.
    pub lag_entries: u64,
    /// The records of those entries; `None` when the leader's log no longer holds them all
    /// (the replica catches up from a snapshot).
    pub lag_records: Option<u64>,
}

struct Inner {
    node: ClusterNode,
    local: Arc<dyn LocalTopics>,
    /// (topic, partition) → group, for the replicas this broker runs.
    groups: RwLock<HashMap<(String, u32), GroupId>>,
    /// The controller's topics set up here, as `replicated-topics` records them.
    topics: RwLock<HashMap<String, topics::LocalSetup>>,
    /// Per group run here: its machine and the waiters of its `leader` acks.
    replicas: RwLock<HashMap<GroupId, (MachineStore<PartitionMachine>, AppendWaiters)>>,
    /// The next token for a `leader` ack's command (random start: tokens of several brokers
    /// do not meet).
    next_token: AtomicU64,
    write_timeout: Duration,
    /// Per group led here: each idempotent producer's next proposed sequence (a hint that
    /// keeps a producer's batches in order, see `proposed`).
    proposed: proposed::ProposedSequences,
}

/// This broker's replicated partitions. Cheap to clone.
#[derive(Clone)]
pub struct Replication {
    inner: Arc<Inner>,
}

/// The file, beside the groups' folders, that lists the controller's topics set up on this
/// broker, one a line with its incarnation, its partitions' owners (replication factor 1) and
/// its groups (see `topics::parse_setups`). It is read at start, before any request is
/// served, so a produce never takes a path its topic does not allow (the local log of a
/// replicated topic, or of another broker's partition) while the metadata is still being
/// caught up.
const REPLICATED_TOPICS_FILE: &str = "replicated-topics";

/// How many entries the leader's log may run ahead of its applied index before a `leader`
/// ack waits for the commit like a `quorum` one.
const LEADER_ACK_MAX_UNAPPLIED: u64 = 16;

/// How long a non-preferred replica waits for the preferred leader to initialise a new
/// group before it initialises the group itself.
const INIT_GRACE_MS: u64 = 3_000;

impl Replication {
    /// Replication over `node`'s groups, with partitions kept in `local`. Reads the list of
    /// the controller's topics set up here: blocking, call from a blocking thread.
    pub fn open(node: ClusterNode, local: Arc<dyn LocalTopics>) -> io::Result<Self> {
        let path = node.host().dir().join(REPLICATED_TOPICS_FILE);
        let topics = match std::fs::read_to_string(&path) {
            Ok(text) => topics::parse_setups(&text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Replication {
            inner: Arc::new(Inner {
                node,
                local,
                groups: RwLock::new(HashMap::new()),
                topics: RwLock::new(topics),
                replicas: RwLock::new(HashMap::new()),
                next_token: AtomicU64::new(
                    std::collections::hash_map::RandomState::new()
                        .build_hasher()
                        .finish(),
                ),
                write_timeout: Duration::from_secs(10),
                proposed: proposed::ProposedSequences::default(),
            }),
        })
    }

    /// Follows the controller's metadata in the background: sets its topics up locally,
    /// starts the groups of this broker's replicas, and deletes what it deleted (see
    /// `topics`).
    pub fn start(&self, shutdown: CancellationToken, tasks: &TaskTracker) {
        let this = self.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = this.follow_metadata() => {}
            }
        });
    }

    async fn follow_metadata(&self) {
        // The controller exists once the broker has joined; joining is a one-time wait.
        let raft = loop {
            if let Some(r) = self.inner.node.controller() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut metrics = raft.metrics();
        loop {
            let metadata = self.inner.node.metadata();
            self.sync(&metadata).await;
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    async fn start_replica(
        &self,
        name: &str,
        p: u32,
        group: GroupId,
        replicas: &[NodeId],
    ) -> Result<(), String> {
        let log = self
            .inner
            .local
            .partition(name, p)
            .ok_or_else(|| format!("no local partition {name}/{p}"))?;
        let registry = self.inner.node.registry();
        let sources = replicas
            .iter()
            .filter(|id| **id != self.inner.node.node_id())
            .filter_map(|id| {
                let address = registry.config().peers.address(*id)?;
                Some((*id, address.to_string()))
            })
            .collect();
        let catch_up = crate::catch_up::CatchUp {
            sources,
            group,
            node_id: self.inner.node.node_id(),
            runtime: tokio::runtime::Handle::current(),
            transport: registry.config().peer_transport(),
        };
        let machine =
            PartitionMachine::new(name, p, log, self.inner.local.clone()).with_catch_up(catch_up);
        let waiters = machine.waiters.clone();
        let (raft, store) = self
            .inner
            .node
            .host()
            .start_group(group, machine)
            .await
            .map_err(|e| e.to_string())?;
        self.inner.replicas.write().insert(group, (store, waiters));
        self.inner
            .groups
            .write()
            .insert((name.to_string(), p), group);
        let initialized = raft.is_initialized().await.map_err(|e| e.to_string())?;
        if !initialized {
            let registry = self.inner.node.registry();
            let members: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .filter_map(|id| {
                    registry
                        .config()
                        .peers
                        .address(*id)
                        .map(|a| (*id, BasicNode::new(a)))
                })
                .collect();
            let preferred = replicas.first() == Some(&self.inner.node.node_id());
            // The preferred leader (the first replica) initialises the group and so leads it
            // first, as the placement intended. If it is down, the others initialise it
            // themselves after a grace period (the same members everywhere, which openraft
            // allows), so a group never waits for one broker.
            let delay = if preferred {
                Duration::ZERO
            } else {
                Duration::from_millis(INIT_GRACE_MS)
            };
            let (topic, raft) = (name.to_string(), raft.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if raft.is_initialized().await.unwrap_or(true) {
                    return;
                }
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(topic, partition = p, error = %e, "group initialised elsewhere");
                }
            });
        }
        Ok(())
    }

    /// Whether `topic` is replicated (its writes go through Raft).
    pub fn is_replicated(&self, topic: &str) -> bool {
        self.inner
            .topics
            .read()
            .get(topic)
            .is_some_and(|s| s.owners.is_none())
    }

    /// Whether `topic` is one of the controller's topics and set up on this broker.
    pub fn is_ready(&self, topic: &str) -> bool {
        self.is_controlled(topic) && self.inner.local.partition(topic, 0).is_some()
    }

    /// The Raft group of partition `p` of `topic` on this broker.
    pub fn group(&self, topic: &str, p: u32) -> Option<Raft> {
        let id = *self.inner.groups.read().get(&(topic.to_string(), p))?;
        self.inner.node.host().group(id)
    }

    /// The leader of partition `p` of `topic` as this broker sees it, if it is a replica.
    pub fn leader(&self, topic: &str, p: u32) -> Option<NodeId> {
        self.group(topic, p)
            .and_then(|r| r.metrics().borrow().current_leader)
    }

    /// The leader of partition `p` of `topic` and the Raft term it leads in, as this broker
    /// sees it, if it is a replica and knows a leader.
    pub fn leader_and_term(&self, topic: &str, p: u32) -> Option<(NodeId, u64)> {
        let raft = self.group(topic, p)?;
        let m = raft.metrics();
        let m = m.borrow();
        m.current_leader.map(|l| (l, m.current_term))
    }

    /// Each replica's progress in partition `p` of `topic`, by node id, if this broker
    /// leads it: in sync means it holds every entry the leader has applied (committed).
    pub fn replica_states(&self, topic: &str, p: u32) -> Option<Vec<ReplicaProgress>> {
        let group = *self.inner.groups.read().get(&(topic.to_string(), p))?;
        let raft = self.inner.node.host().group(group)?;
        let m = raft.metrics().borrow().clone();
        if m.current_leader != Some(self.inner.node.node_id()) {
            return None;
        }
        let end = m.last_log_index.unwrap_or(0);
        let committed = m.last_applied.map_or(0, |l| l.index);
        let replication = m.replication?;
        let waiters = self
            .inner
            .replicas
            .read()
            .get(&group)
            .map(|(_, waiters)| waiters.clone());
        let me = self.inner.node.node_id();
        let mut states: Vec<ReplicaProgress> = replication
            .iter()
            .map(|(id, matched)| {
                let matched = matched.map_or(0, |l| l.index);
                ReplicaProgress {
                    node: *id,
                    in_sync: matched >= committed,
                    lag_entries: end.saturating_sub(matched),
                    lag_records: waiters
                        .as_ref()
                        .and_then(|w| w.records_between(matched, end)),
                }
            })
            .collect();
        if !states.iter().any(|s| s.node == me) {
            states.push(ReplicaProgress {
                node: me,
                in_sync: true,
                lag_entries: 0,
                lag_records: Some(0),
            });
        }
        states.sort_unstable_by_key(|s| s.node);
        Some(states)
    }

    /// Whether partition `p` of `topic` may be read here: it is not replicated, or this
    /// broker holds a replica; a replication factor 1 partition only at its owner. Otherwise
    /// the error names the partition's leader as far as this broker knows it (the preferred
    /// replica of the placement, or the owner).
    pub fn check_readable(&self, topic: &str, p: u32) -> Result<(), WriteError> {
        self.check_owned(topic, p)?;
        if !self.is_replicated(topic)
            || self
                .inner
                .groups
                .read()
                .contains_key(&(topic.to_string(), p))
        {
            return Ok(());
        }
        let md = self.inner.node.metadata();
        let Some(meta) = md
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(p as usize))
        else {
            // Not in the metadata yet (a restart catching up): no replica here either.
            return Err(WriteError::NotLeader {
                topic: topic.to_string(),
                partition: p,
                leader: None,
            });
        };
        if meta.replicas.contains(&self.inner.node.node_id()) {
            // A replica whose group is starting: its log holds only committed records.
            return Ok(());
        }
        let registry = self.inner.node.registry();
        Err(WriteError::NotLeader {
            topic: topic.to_string(),
            partition: p,
            leader: meta.replicas.first().and_then(|l| {
                registry
                    .config()
                    .peers
                    .address(*l)
                    .map(|a| (*l, a.to_string()))
            }),
        })
    }

    /// The replicas of partition `p` of `topic` in the metadata applied here, with their
    /// addresses, the placement's preferred leader first; empty when the controller does not
    /// know the partition. Lets a broker without a replica read from another one when the
    /// first it tried is down.
    pub fn replica_addresses(&self, topic: &str, p: u32) -> Vec<(NodeId, String)> {
        let md = self.inner.node.metadata();
        let Some(meta) = md
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(p as usize))
        else {
            return Vec::new();
        };
        let registry = self.inner.node.registry();
        let peers = &registry.config().peers;
        meta.replicas
            .iter()
            .filter_map(|id| peers.address(*id).map(|a| (*id, a.to_string())))
            .collect()
    }

    /// The replicated partitions this broker holds a replica of, as `(topic, partition)`.
    pub fn hosted_partitions(&self) -> Vec<(String, u32)> {
        self.inner.groups.read().keys().cloned().collect()
    }

    /// Whether `node` counts as live (heard from within the session; this broker always is).
    pub fn is_live(&self, node: NodeId) -> bool {
        self.inner.node.registry().is_live(node)
    }

    /// The sum of the current Raft terms of the groups hosted here, the controller's
    /// included. Every election starts a new term, so this grows by one per election any of
    /// them held (a group dropped with its topic takes its terms along).
    pub fn terms(&self) -> u64 {
        let ids: Vec<GroupId> = self.inner.groups.read().values().copied().collect();
        let host = self.inner.node.host();
        let controller = self
            .inner
            .node
            .controller()
            .map_or(0, |r| r.metrics().borrow().current_term);
        controller
            + ids
                .into_iter()
                .filter_map(|id| host.group(id))
                .map(|r| r.metrics().borrow().current_term)
                .sum::<u64>()
    }

    /// Whether the controller group has a quorum, as this broker sees it: a leader is known
    /// and, when this broker is that leader, a majority acknowledged it within twice the
    /// longest election timeout. A follower cut off from the leader starts elections, which
    /// clears the leader it knows.
    pub fn controller_has_quorum(&self) -> bool {
        let Some(raft) = self.inner.node.controller() else {
            return false;
        };
        let (leader, me, acked_ms) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (m.current_leader, m.id, m.millis_since_quorum_ack)
        };
        let bound_ms = self.inner.node.registry().config().timings.election_max_ms * 2;
        match leader {
            None => false,
            Some(l) if l == me => acked_ms.is_some_and(|ms| ms <= bound_ms),
            Some(_) => true,
        }
    }

    /// This broker's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node.node_id()
    }

    /// This broker's cluster membership.
    pub(crate) fn node(&self) -> &ClusterNode {
        &self.inner.node
    }
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("node_id", &self.inner.node.node_id())
            .finish_non_exhaustive()
    }
}

mod create;
mod placement;
mod proposed;
mod state_machine;
mod stub;
mod topics;
mod write;

pub use placement::PartitionPlacement;
pub use state_machine::PartitionMachine;
use state_machine::{command_records, encode_command};
pub use write::Submitted;

#[cfg(test)]
mod adopt_tests;
#[cfg(test)]
mod below_start_tests;
#[cfg(test)]
mod clock_tests;
#[cfg(test)]
mod placement_producer_tests;
#[cfg(test)]
mod placement_tests;
#[cfg(test)]
mod tests;
