//! The controller group's state machine: the cluster metadata (topics, their replica sets and
//! Raft group ids), and the placement that spreads replicas and preferred leaders evenly.
//!
//! Brokers and their addresses are the controller group's Raft membership itself (each node's
//! `BasicNode` address), so they are not repeated here.
//!
//! Deletes leave a [`Tombstone`]: every topic gets an incarnation number when it is created
//! (a recreate of the same name gets a higher one), and a delete records the deleted
//! incarnation. A broker deletes its local copy of a topic only on that positive evidence (a
//! tombstone, or the same name at a newer incarnation), never because the metadata it has
//! applied so far lacks the topic: right after a start it is still being replayed.

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

use rill_storage::groups::INTERNAL_TOPIC_PREFIX;
use rill_storage::TopicConfig;

use crate::machine::Machine;
use crate::types::{Command, GroupId, LogId, NodeId, Reply, CONTROLLER_GROUP};

/// One partition's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// The partition's Raft group (0 for a replication factor 1 partition: no group).
    pub group: GroupId,
    /// The brokers holding a replica; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
}

/// One topic's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// The topic's storage config, the same on every replica.
    pub config: TopicConfig,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// The partitions, by number.
    pub partitions: Vec<PartitionMeta>,
    /// This topic's incarnation: unique over the cluster's life, higher for a later
    /// creation of the same name (1 for the first topic ever created).
    pub incarnation: u64,
}

/// What a delete leaves behind, so that a broker that missed it (down at the time, or given a
/// snapshot instead of the entries) still deletes its copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The deleted incarnation: a local copy of this one or an older one is stale.
    pub incarnation: u64,
    /// The deleted incarnation's partition groups (their folders go too).
    pub groups: Vec<GroupId>,
}

/// The replicated cluster metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Topics by name.
    pub topics: BTreeMap<String, TopicMeta>,
    /// The next free partition group id.
    pub next_group: GroupId,
    /// Partitions placed so far, where the next topic's placement starts.
    pub placed: u64,
    /// The last incarnation given to a topic.
    pub last_incarnation: u64,
    /// The latest deleted incarnation of each deleted name (one entry per name, kept after a
    /// recreate: it is what tells a broker that missed the delete to drop its copy).
    pub deleted: BTreeMap<String, Tombstone>,
}

/// The metadata as snapshots stored it before incarnations and tombstones: read once after
/// an upgrade (its topics get incarnation 0, which no later topic has).
#[derive(Debug, Clone, Default, Deserialize)]
struct MetadataWithoutTombstones {
    topics: BTreeMap<String, TopicMetaWithoutIncarnation>,
    next_group: GroupId,
    placed: u64,
}

/// A topic in [`MetadataWithoutTombstones`].
#[derive(Debug, Clone, Deserialize)]
struct TopicMetaWithoutIncarnation {
    config: TopicConfig,
    replication_factor: u32,
    partitions: Vec<PartitionMeta>,
}

impl From<MetadataWithoutTombstones> for Metadata {
    fn from(old: MetadataWithoutTombstones) -> Self {
        Metadata {
            topics: old
                .topics
                .into_iter()
                .map(|(name, t)| {
                    let meta = TopicMeta {
                        config: t.config,
                        replication_factor: t.replication_factor,
                        partitions: t.partitions,
                        incarnation: 0,
                    };
                    (name, meta)
                })
                .collect(),
            next_group: old.next_group,
            placed: old.placed,
            last_incarnation: 0,
            deleted: BTreeMap::new(),
        }
    }
}

/// A change to the metadata, proposed through the controller group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// Creates a topic placed over `brokers` (the live brokers when it was proposed).
    CreateTopic {
        /// The topic name.
        name: String,
        /// Its storage config (the partition count included).
        config: TopicConfig,
        /// Replicas per partition.
        replication_factor: u32,
        /// The brokers to place on, in any order.
        brokers: Vec<NodeId>,
    },
    /// Deletes a topic's metadata.
    DeleteTopic {
        /// The topic name.
        name: String,
    },
}

/// Why the controller refused a command. Every replica refuses alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControllerError {
    /// The topic exists already.
    #[error("topic {topic} already exists")]
    TopicExists {
        /// The topic.
        topic: String,
    },
    /// The topic does not exist.
    #[error("topic {topic} does not exist")]
    TopicNotFound {
        /// The topic.
        topic: String,
    },
    /// Fewer live brokers than replicas asked.
    #[error("topic {topic}: replication factor {replication_factor} needs that many live brokers; {live} are live")]
    NotEnoughBrokers {
        /// The topic.
        topic: String,
        /// The replicas asked.
        replication_factor: u32,
        /// The live brokers.
        live: usize,
    },
    /// A command this version cannot read.
    #[error("undecodable controller command: {0}")]
    Undecodable(String),
    /// Internal topics hold the brokers' own state and are never deleted.
    #[error("topic {topic} is internal (the brokers' own state); it cannot be deleted")]
    InternalTopic {
        /// The topic.
        topic: String,
    },
}

/// The answer to a [`ControllerCommand`].
pub type ControllerReply = Result<Option<TopicMeta>, ControllerError>;

/// Places `partitions` partitions of `rf` replicas over `brokers`, starting at `start`:
/// partition `p` gets brokers `start + p + k` for `k < rf` (modulo the sorted broker list), so
/// every broker gets the same share of replicas and of preferred leaderships (the first
/// replica), and successive topics start where the last one stopped.
pub fn place(brokers: &[NodeId], start: u64, partitions: u32, rf: u32) -> Vec<Vec<NodeId>> {
    let mut sorted = brokers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    (0..u64::from(partitions))
        .map(|p| {
            (0..u64::from(rf).min(n))
                .map(|k| sorted[((start + p + k) % n) as usize])
                .collect()
        })
        .collect()
}

impl Metadata {
    fn apply_command(&mut self, command: ControllerCommand) -> ControllerReply {
        match command {
            ControllerCommand::CreateTopic {
                name,
                config,
                replication_factor,
                brokers,
            } => {
                if self.topics.contains_key(&name) {
                    return Err(ControllerError::TopicExists { topic: name });
                }
                if (replication_factor as usize) > brokers.len() || replication_factor == 0 {
                    return Err(ControllerError::NotEnoughBrokers {
                        topic: name,
                        replication_factor,
                        live: brokers.len(),
                    });
                }
                let partitions = config.partitions;
                let placed = place(&brokers, self.placed, partitions, replication_factor);
                self.placed += u64::from(partitions);
                let partitions = placed
                    .into_iter()
                    .map(|replicas| {
                        let group = if replication_factor > 1 {
                            // Group ids start at 1: 0 is the controller.
                            self.next_group += 1;
                            self.next_group
                        } else {
                            CONTROLLER_GROUP
                        };
                        PartitionMeta { group, replicas }
                    })
                    .collect();
                self.last_incarnation += 1;
                let meta = TopicMeta {
                    config,
                    replication_factor,
                    partitions,
                    incarnation: self.last_incarnation,
                };
                self.topics.insert(name, meta.clone());
                Ok(Some(meta))
            }
            ControllerCommand::DeleteTopic { name } => {
                if name.starts_with(INTERNAL_TOPIC_PREFIX) {
                    return Err(ControllerError::InternalTopic { topic: name });
                }
                let Some(meta) = self.topics.remove(&name) else {
                    return Err(ControllerError::TopicNotFound { topic: name });
                };
                let groups = meta
                    .partitions
                    .iter()
                    .map(|p| p.group)
                    .filter(|g| *g != CONTROLLER_GROUP)
                    .collect();
                let tombstone = Tombstone {
                    incarnation: meta.incarnation,
                    groups,
                };
                self.deleted.insert(name, tombstone);
                Ok(Some(meta))
            }
        }
    }
}

/// The controller's [`Machine`]: the metadata in memory, snapshotted whole.
#[derive(Debug, Default)]
pub struct Controller {
    /// The current metadata.
    pub metadata: Metadata,
}

impl Machine for Controller {
    fn apply(&mut self, _log_id: LogId, command: &Command) -> io::Result<Reply> {
        let reply: ControllerReply = match bincode::deserialize::<ControllerCommand>(&command.0) {
            Ok(c) => self.metadata.apply_command(c),
            Err(e) => Err(ControllerError::Undecodable(e.to_string())),
        };
        Ok(Reply(bincode::serialize(&reply).map_err(io::Error::other)?))
    }

    /// The metadata after [`SNAPSHOT_MARK`].
    fn snapshot(&self) -> io::Result<Vec<u8>> {
        let mut bytes = SNAPSHOT_MARK.to_le_bytes().to_vec();
        bincode::serialize_into(&mut bytes, &self.metadata).map_err(io::Error::other)?;
        Ok(bytes)
    }

    fn restore(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.metadata = match bytes.split_first_chunk::<8>() {
            Some((mark, rest)) if u64::from_le_bytes(*mark) == SNAPSHOT_MARK => {
                bincode::deserialize(rest).map_err(io::Error::other)?
            }
            // A snapshot written before tombstones existed: the bare metadata of then.
            _ => bincode::deserialize::<MetadataWithoutTombstones>(bytes)
                .map(Metadata::from)
                .map_err(io::Error::other)?,
        };
        Ok(())
    }
}

/// The first 8 bytes of a controller snapshot with incarnations and tombstones. A snapshot
/// from before them starts with its topic count, which is never this.
const SNAPSHOT_MARK: u64 = u64::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_spreads_replicas_and_leaders_evenly() {
        let placed = place(&[3, 1, 2], 0, 6, 3);
        let mut leaders = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for r in &placed {
            assert_eq!(r.len(), 3);
            let mut distinct = r.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "no broker twice in {r:?}");
            *leaders.entry(r[0]).or_insert(0) += 1;
            for b in r {
                *replicas.entry(*b).or_insert(0) += 1;
            }
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        assert_eq!(
            replicas.values().copied().collect::<Vec<_>>(),
            vec![6, 6, 6]
        );
    }

    #[test]
    fn successive_topics_do_not_pile_on_the_first_broker() {
        let mut m = Metadata::default();
        for name in ["a", "b", "c"] {
            m.apply_command(ControllerCommand::CreateTopic {
                name: name.into(),
                config: TopicConfig {
                    partitions: 1,
                    ..TopicConfig::default()
                },
                replication_factor: 2,
                brokers: vec![1, 2, 3],
            })
            .expect("create");
        }
        let leaders: Vec<NodeId> = m
            .topics
            .values()
            .map(|t| t.partitions[0].replicas[0])
            .collect();
        assert_eq!(leaders, vec![1, 2, 3]);
        let groups: Vec<GroupId> = m.topics.values().map(|t| t.partitions[0].group).collect();
        assert_eq!(
            groups,
            vec![1, 2, 3],
            "each replicated partition gets its own group"
        );
    }

    #[test]
    fn too_few_brokers_or_a_duplicate_name_is_refused_and_changes_nothing() {
        let mut m = Metadata::default();
        let create = |name: &str, rf| ControllerCommand::CreateTopic {
            name: name.into(),
            config: TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
            replication_factor: rf,
            brokers: vec![1, 2],
        };
        let err = m.apply_command(create("t", 3)).expect_err("rf 3 on 2");
        assert!(
            matches!(err, ControllerError::NotEnoughBrokers { live: 2, .. }),
            "{err}"
        );
        assert_eq!(m, Metadata::default());
        m.apply_command(create("t", 2)).expect("create");
        let before = m.clone();
        assert!(m.apply_command(create("t", 2)).is_err());
        assert_eq!(m, before);
    }

    fn create(name: &str, rf: u32) -> ControllerCommand {
        ControllerCommand::CreateTopic {
            name: name.into(),
            config: TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
            replication_factor: rf,
            brokers: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_delete_leaves_a_tombstone_and_a_recreate_gets_a_newer_incarnation() {
        let mut m = Metadata::default();
        let first = m
            .apply_command(create("t", 3))
            .expect("create")
            .expect("meta");
        m.apply_command(create("other", 1)).expect("create");
        m.apply_command(ControllerCommand::DeleteTopic { name: "t".into() })
            .expect("delete");
        assert!(!m.topics.contains_key("t"));
        let tomb = m.deleted.get("t").expect("a tombstone");
        assert_eq!(tomb.incarnation, first.incarnation);
        let groups: Vec<GroupId> = first.partitions.iter().map(|p| p.group).collect();
        assert_eq!(tomb.groups, groups, "the deleted groups are named");
        let again = m
            .apply_command(create("t", 3))
            .expect("recreate")
            .expect("meta");
        assert!(again.incarnation > first.incarnation);
        assert!(
            again.partitions.iter().all(|p| !groups.contains(&p.group)),
            "a recreate never reuses a group id"
        );
        assert_eq!(m.deleted["t"].incarnation, first.incarnation, "kept");
        let err = m
            .apply_command(ControllerCommand::DeleteTopic {
                name: "nothing".into(),
            })
            .expect_err("unknown");
        assert!(
            matches!(err, ControllerError::TopicNotFound { .. }),
            "{err}"
        );
    }

    #[test]
    fn an_internal_topic_cannot_be_deleted() {
        let mut m = Metadata::default();
        m.apply_command(create("__groups", 3)).expect("create");
        let before = m.clone();
        let err = m
            .apply_command(ControllerCommand::DeleteTopic {
                name: "__groups".into(),
            })
            .expect_err("internal");
        assert!(
            matches!(err, ControllerError::InternalTopic { .. }),
            "{err}"
        );
        assert_eq!(m, before, "nothing changed");
    }

    #[test]
    fn snapshots_keep_tombstones_and_an_old_snapshot_still_restores() {
        let mut c = Controller::default();
        c.metadata.apply_command(create("t", 2)).expect("create");
        c.metadata.apply_command(create("u", 1)).expect("create");
        c.metadata
            .apply_command(ControllerCommand::DeleteTopic { name: "t".into() })
            .expect("delete");
        let bytes = c.snapshot().expect("snapshot");
        let mut restored = Controller::default();
        restored.restore(&bytes).expect("restore");
        assert_eq!(restored.metadata, c.metadata);
        assert!(restored.metadata.deleted.contains_key("t"));

        // The layout of a snapshot written before incarnations.
        #[derive(Serialize)]
        struct OldTopic<'a> {
            config: &'a TopicConfig,
            replication_factor: u32,
            partitions: &'a [PartitionMeta],
        }
        let u = &c.metadata.topics["u"];
        let old: (BTreeMap<String, OldTopic<'_>>, GroupId, u64) = (
            [(
                "u".to_string(),
                OldTopic {
                    config: &u.config,
                    replication_factor: 1,
                    partitions: &u.partitions,
                },
            )]
            .into(),
            7,
            4,
        );
        let mut from_old = Controller::default();
        from_old
            .restore(&bincode::serialize(&old).expect("encode"))
            .expect("an old snapshot restores");
        assert_eq!(from_old.metadata.next_group, 7);
        assert_eq!(from_old.metadata.topics["u"].incarnation, 0);
        assert_eq!(from_old.metadata.topics["u"].partitions, u.partitions);
    }
}
