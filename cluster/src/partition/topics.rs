//! The controller's topics on this broker: which are set up here, at which incarnation, and
//! how they are served (`DATA_DIR/raft/replicated-topics`), and following the metadata:
//! setting topics up as the controller creates them, and deleting local copies the
//! controller's tombstones (or a newer incarnation of the same name) show to be stale.
//!
//! THE RULE: a local topic is deleted only on positive evidence. The metadata applied here
//! grows from empty after a start (the controller's log is replayed), so a topic missing from
//! it proves nothing; a tombstone of this incarnation or a later one, or the same name at a
//! newer incarnation, does. An older incarnation in the metadata (a replay still behind) is
//! ignored.

use std::io;

use crate::controller::{Tombstone, TopicMeta};
use crate::types::CONTROLLER_GROUP;

use super::*;

/// How one of the controller's topics is set up on this broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalSetup {
    /// The incarnation set up here. `None`: recorded before incarnations existed (the first
    /// incarnation the metadata shows for the name is taken as this one).
    pub(crate) incarnation: Option<u64>,
    /// Replication factor 1: the owner of each partition, the one broker that writes and
    /// serves it. `None`: replicated through Raft.
    pub(crate) owners: Option<Vec<NodeId>>,
    /// The partition groups of this incarnation (replication factor above 1).
    pub(crate) groups: Vec<GroupId>,
}

impl LocalSetup {
    fn of(topic: &TopicMeta) -> LocalSetup {
        LocalSetup {
            incarnation: Some(topic.incarnation),
            owners: (topic.replication_factor <= 1).then(|| {
                topic
                    .partitions
                    .iter()
                    .map(|p| p.replicas.first().copied().unwrap_or(0))
                    .collect()
            }),
            groups: topic
                .partitions
                .iter()
                .map(|p| p.group)
                .filter(|g| *g != CONTROLLER_GROUP)
                .collect(),
        }
    }
}

/// Reads `replicated-topics`: one topic a line, `NAME`, or
/// `NAME<TAB>INCARNATION<TAB>OWNERS<TAB>GROUPS` where OWNERS is `-` for a replicated topic or
/// the comma-separated owner of each partition (replication factor 1), and GROUPS `-` or the
/// comma-separated partition groups.
pub(crate) fn parse_setups(text: &str) -> io::Result<HashMap<String, LocalSetup>> {
    let bad = |line: &str, why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{REPLICATED_TOPICS_FILE}: line {line:?}: {why}"),
        )
    };
    let list = |field: &str, line: &str| -> io::Result<Vec<u64>> {
        if field == "-" {
            return Ok(Vec::new());
        }
        field
            .split(',')
            .map(|n| n.parse::<u64>().map_err(|_| bad(line, "not a number list")))
            .collect()
    };
    let mut setups = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (name, setup) = match fields[..] {
            [name] => (
                name,
                LocalSetup {
                    incarnation: None,
                    owners: None,
                    groups: Vec::new(),
                },
            ),
            [name, incarnation, owners, groups] => (
                name,
                LocalSetup {
                    incarnation: Some(
                        incarnation
                            .parse()
                            .map_err(|_| bad(line, "the incarnation is not a number"))?,
                    ),
                    owners: (owners != "-").then(|| list(owners, line)).transpose()?,
                    groups: list(groups, line)?,
                },
            ),
            _ => return Err(bad(line, "want NAME or NAME, INCARNATION, OWNERS, GROUPS")),
        };
        setups.insert(name.to_string(), setup);
    }
    Ok(setups)
}

/// The text of `replicated-topics` for `setups` (see [`parse_setups`]), sorted by name.
pub(crate) fn format_setups(setups: &HashMap<String, LocalSetup>) -> String {
    let list = |ids: &[u64]| {
        if ids.is_empty() {
            "-".to_string()
        } else {
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let mut names: Vec<&String> = setups.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let s = &setups[name];
            match s.incarnation {
                None => format!("{name}\n"),
                Some(i) => format!(
                    "{name}\t{i}\t{}\t{}\n",
                    s.owners.as_deref().map_or("-".to_string(), list),
                    list(&s.groups)
                ),
            }
        })
        .collect()
}

impl Replication {
    /// How `topic` is set up here, if it is one of the controller's.
    pub(crate) fn setup(&self, topic: &str) -> Option<LocalSetup> {
        self.inner.topics.read().get(topic).cloned()
    }

    /// Records `setup` for `name` (`None`: forgets it), on disk first.
    async fn record(&self, name: &str, setup: Option<LocalSetup>) -> Result<(), String> {
        let mut setups = self.inner.topics.read().clone();
        match setup {
            Some(s) => setups.insert(name.to_string(), s),
            None => setups.remove(name),
        };
        let dir = self.inner.node.host().dir().to_path_buf();
        let text = format_setups(&setups);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            crate::log_store::write_atomic(&dir, REPLICATED_TOPICS_FILE, text.as_bytes())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        *self.inner.topics.write() = setups;
        Ok(())
    }

    /// Brings this broker in line with `metadata`: deletes stale local copies, sets up the
    /// topics it lacks, and starts the groups of its replicas.
    pub(super) async fn sync(&self, metadata: &Metadata) {
        for (name, tombstone) in &metadata.deleted {
            let Some(setup) = self.setup(name) else {
                continue;
            };
            // A copy recorded before incarnations is matched with its topic first (below).
            let Some(incarnation) = setup.incarnation else {
                continue;
            };
            if incarnation <= tombstone.incarnation {
                if let Err(e) = self.remove_local(name, &setup, Some(tombstone)).await {
                    tracing::error!(topic = %name, error = %e, "cannot delete a deleted topic here");
                }
            }
        }
        for (name, topic) in &metadata.topics {
            if let Some(setup) = self.setup(name) {
                match setup.incarnation {
                    // The metadata is behind this broker (a replay after a start).
                    Some(i) if i > topic.incarnation => continue,
                    Some(i) if i < topic.incarnation => {
                        // Deleted and created again while this broker did not look.
                        if let Err(e) = self.remove_local(name, &setup, None).await {
                            tracing::error!(topic = %name, error = %e, "cannot delete an older incarnation here");
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            let wanted = LocalSetup::of(topic);
            if self.setup(name).as_ref() != Some(&wanted) {
                // Recorded first: from then on, no produce here takes a path this topic
                // does not allow, even while the metadata is caught up after a restart.
                if let Err(e) = self.record(name, Some(wanted)).await {
                    tracing::error!(topic = %name, error = %e, "cannot record a topic of the controller's");
                    continue;
                }
            }
            if self.inner.local.partition(name, 0).is_none() {
                let local = self.inner.local.clone();
                let (n, config) = (name.clone(), topic.config.clone());
                let made = tokio::task::spawn_blocking(move || local.ensure_topic(&n, &config))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                if let Err(e) = made {
                    tracing::error!(topic = %name, error = %e, "cannot create a topic of the controller's here");
                    continue;
                }
            }
            if topic.replication_factor > 1 {
                self.start_replicas(name, topic).await;
            }
        }
    }

    /// Starts the groups of this broker's replicas of `topic` not running yet.
    async fn start_replicas(&self, name: &str, topic: &TopicMeta) {
        let me = self.inner.node.node_id();
        for (p, meta) in topic.partitions.iter().enumerate() {
            let p = p as u32;
            if !meta.replicas.contains(&me)
                || self
                    .inner
                    .groups
                    .read()
                    .contains_key(&(name.to_string(), p))
            {
                continue;
            }
            if let Err(e) = self
                .start_replica(name, p, meta.group, &meta.replicas)
                .await
            {
                tracing::error!(topic = %name, partition = p, error = %e, "cannot start a replica");
            }
        }
    }

    /// Deletes this broker's copy of `name` (as `setup` describes it): stops its partition
    /// groups, removes their Raft folders (and those `tombstone` names), deletes the local
    /// topic, and only then forgets it in `replicated-topics`, so a crash on the way is
    /// finished after the restart.
    async fn remove_local(
        &self,
        name: &str,
        setup: &LocalSetup,
        tombstone: Option<&Tombstone>,
    ) -> Result<(), String> {
        let running: Vec<GroupId> = {
            let mut groups = self.inner.groups.write();
            let keys: Vec<(String, u32)> =
                groups.keys().filter(|(t, _)| t == name).cloned().collect();
            keys.iter().filter_map(|k| groups.remove(k)).collect()
        };
        let host = self.inner.node.host().clone();
        for group in &running {
            self.inner.replicas.write().remove(group);
            host.stop_group(*group).await;
        }
        let mut folders: Vec<GroupId> = running;
        folders.extend(&setup.groups);
        folders.extend(tombstone.iter().flat_map(|t| t.groups.iter()));
        folders.sort_unstable();
        folders.dedup();
        let local = self.inner.local.clone();
        let topic = name.to_string();
        tokio::task::spawn_blocking(move || {
            for group in folders {
                match std::fs::remove_dir_all(host.group_dir(group)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("removing the folder of group {group}: {e}")),
                }
            }
            crate::log_store::sync_dir(host.dir()).map_err(|e| e.to_string())?;
            local.delete_topic(&topic)
        })
        .await
        .map_err(|e| e.to_string())??;
        self.record(name, None).await?;
        tracing::info!(topic = %name, incarnation = ?setup.incarnation, "deleted this broker's copy of a deleted topic");
        Ok(())
    }

    /// Whether `topic` is one of the controller's topics set up on this broker.
    pub fn is_controlled(&self, topic: &str) -> bool {
        self.inner.topics.read().contains_key(topic)
    }

    /// Whether the controller knows `topic`, as far as this broker can tell: set up here, or
    /// in the metadata applied so far.
    pub fn is_known(&self, topic: &str) -> bool {
        self.is_controlled(topic) || self.inner.node.metadata().topics.contains_key(topic)
    }

    /// The incarnation of `topic` set up here, if any (`Some(0)` for one recorded before
    /// incarnations).
    pub fn incarnation(&self, topic: &str) -> Option<u64> {
        self.inner
            .topics
            .read()
            .get(topic)
            .map(|s| s.incarnation.unwrap_or(0))
    }

    /// Whether partition `p` of `topic` may be written and read through this broker's local
    /// log: yes unless `topic` is a replication factor 1 topic of the controller's whose
    /// partition `p` another broker owns; that owner is named in the error.
    pub fn check_owned(&self, topic: &str, p: u32) -> Result<(), WriteError> {
        let owner = {
            let topics = self.inner.topics.read();
            let Some(owner) = topics
                .get(topic)
                .and_then(|s| s.owners.as_ref())
                .and_then(|o| o.get(p as usize).copied())
            else {
                return Ok(());
            };
            owner
        };
        if owner == self.inner.node.node_id() {
            return Ok(());
        }
        let registry = self.inner.node.registry();
        Err(WriteError::NotLeader {
            topic: topic.to_string(),
            partition: p,
            leader: registry
                .config()
                .peers
                .address(owner)
                .map(|a| (owner, a.to_string())),
        })
    }
}

#[cfg(test)]
mod setup_tests {
    use super::*;

    #[test]
    fn the_setups_file_reads_back_and_old_lines_still_read() {
        let mut setups = HashMap::new();
        setups.insert(
            "rf1".to_string(),
            LocalSetup {
                incarnation: Some(4),
                owners: Some(vec![2, 3, 1]),
                groups: vec![],
            },
        );
        setups.insert(
            "rf3".to_string(),
            LocalSetup {
                incarnation: Some(5),
                owners: None,
                groups: vec![7, 8],
            },
        );
        let text = format_setups(&setups);
        assert_eq!(text, "rf1\t4\t2,3,1\t-\nrf3\t5\t-\t7,8\n");
        assert_eq!(parse_setups(&text).expect("parse"), setups);
        let old = parse_setups("orders\n__groups\n").expect("old lines");
        assert_eq!(old["orders"].incarnation, None);
        assert_eq!(old["orders"].owners, None);
        for bad in ["t\t1\t-", "t\tx\t-\t-", "t\t1\t1,a\t-"] {
            assert!(parse_setups(bad).is_err(), "{bad:?} accepted");
        }
    }
}
