//! [`GroupHost`]: every Raft group of one broker process, keyed by group id, with the shared
//! peer channels and the openraft settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::error::ClusterError;
use crate::failover::ElectionNotes;
use crate::log_store::{LogPolicy, LogStore};
use crate::machine::{Machine, MachineStore};
use crate::network::{GroupNetwork, Peers};
use crate::types::{GroupId, NodeId, Raft};

/// Raft timing, in milliseconds. Elections must be far longer than heartbeats.
#[derive(Debug, Clone, Copy)]
pub struct RaftTimings {
    /// The leader's heartbeat interval.
    pub heartbeat_ms: u64,
    /// The shortest election timeout.
    pub election_min_ms: u64,
    /// The longest election timeout.
    pub election_max_ms: u64,
}

impl Default for RaftTimings {
    /// 100 ms heartbeats and 300–600 ms election timeouts: a leader failure is noticed within
    /// 0.6 s (openraft 0.9 also holds the leader's lease for the longest election timeout),
    /// and a busy 2-core machine does not miss three heartbeats in a row. The heartbeat is
    /// not shorter because openraft uses it as the AppendEntries timeout too: at 40–50 ms,
    /// large batches on a loaded machine time out and cause elections (measured).
    fn default() -> Self {
        RaftTimings {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
        }
    }
}

/// The default count of Raft entries between a group's snapshots (see
/// [`GroupHost::with_peers`]).
pub const DEFAULT_SNAPSHOT_ENTRIES: u64 = 5_000;

/// How each group of a host keeps its Raft files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupFiles {
    /// Raft entries between a group's snapshots, after which its Raft log is purged.
    pub snapshot_entries: u64,
    /// The size at which a group's Raft log file is sealed and the next begun (at least
    /// [`crate::log_store::MIN_SEGMENT_BYTES`]).
    pub log_segment_bytes: u64,
}

impl Default for GroupFiles {
    /// 5,000 entries between snapshots, 64 MiB files.
    fn default() -> Self {
        GroupFiles {
            snapshot_entries: DEFAULT_SNAPSHOT_ENTRIES,
            log_segment_bytes: crate::log_store::DEFAULT_SEGMENT_BYTES,
        }
    }
}

struct Inner {
    node_id: NodeId,
    dir: PathBuf,
    peers: Peers,
    config: Arc<openraft::Config>,
    groups: RwLock<HashMap<GroupId, Raft>>,
    /// How to read each running group's applied point (see [`GroupHost::applied_point`]).
    points: RwLock<HashMap<GroupId, AppliedPointReader>>,
    /// What vote requests and answers showed, for the failover's election drivers.
    notes: Arc<ElectionNotes>,
    /// Until when this broker refuses to vote, when it started without any Raft state.
    vote_quiet_until: Option<Instant>,
    /// The size at which each group's Raft log file is sealed (see `log_store`).
    log_segment_bytes: u64,
}

/// Reads one group's applied point (see [`Machine::applied_point`]); blocking.
pub type AppliedPointReader =
    Arc<dyn Fn() -> Option<crate::machine::AppliedPointReport> + Send + Sync>;

/// The Raft groups of one broker. Cheap to clone.
#[derive(Clone)]
pub struct GroupHost {
    inner: Arc<Inner>,
}

impl GroupHost {
    /// A host for node `node_id` keeping each group's files under `dir/<group id>/`.
    pub fn new(
        node_id: NodeId,
        dir: impl Into<PathBuf>,
        timings: RaftTimings,
    ) -> Result<GroupHost, ClusterError> {
        Self::with_peers(
            node_id,
            dir,
            timings,
            GroupFiles::default(),
            Peers::default(),
        )
    }

    /// [`GroupHost::new`] over the given peer channels (shared with the liveness pings).
    ///
    /// Reads whether `dir` holds any Raft state: blocking, call from a blocking thread. A
    /// host that finds none (a new broker, or one whose data folder was lost) refuses to
    /// vote for one election timeout (see [`GroupHost::vote_quiet_until`]).
    /// Each group snapshots after `files.snapshot_entries` entries and then purges its Raft
    /// log behind the snapshot, keeping a fifth of that for followers slightly behind.
    pub fn with_peers(
        node_id: NodeId,
        dir: impl Into<PathBuf>,
        timings: RaftTimings,
        files: GroupFiles,
        peers: Peers,
    ) -> Result<GroupHost, ClusterError> {
        let snapshot_entries = files.snapshot_entries;
        let config = openraft::Config {
            cluster_name: "rill".into(),
            heartbeat_interval: timings.heartbeat_ms,
            election_timeout_min: timings.election_min_ms,
            election_timeout_max: timings.election_max_ms,
            // Snapshots let the log be purged; the machines here are small or (for
            // partitions) keep their data elsewhere.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_entries.max(1)),
            max_in_snapshot_log_to_keep: snapshot_entries / 5,
            // An AppendEntries must finish within one heartbeat (openraft's timeout for it):
            // with produce batches of up to a few MB per entry, 300 entries would not.
            max_payload_entries: 32,
            ..Default::default()
        };
        let config = config
            .validate()
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        let dir: PathBuf = dir.into();
        let vote_quiet_until = holds_nothing(&dir)
            .then(|| Instant::now() + Duration::from_millis(config.election_timeout_max));
        Ok(GroupHost {
            inner: Arc::new(Inner {
                node_id,
                dir,
                peers,
                config: Arc::new(config),
                groups: RwLock::new(HashMap::new()),
                points: RwLock::new(HashMap::new()),
                notes: Arc::default(),
                vote_quiet_until,
                log_segment_bytes: files.log_segment_bytes,
            }),
        })
    }

    /// This broker's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// While this is in the future, the broker answers no vote request: it started with no
    /// Raft state at all, so it may have forgotten a vote it gave in the current term (its
    /// data folder was lost) and could elect a second leader in that term. After one
    /// election timeout that term has ended or has a leader whose heartbeats carry it, and
    /// the first heartbeat makes the broker remember it. `None` for a broker that found its
    /// files.
    pub fn vote_quiet_until(&self) -> Option<Instant> {
        self.inner
            .vote_quiet_until
            .filter(|until| *until > Instant::now())
    }

    /// The folder holding every group's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The folder of group `group`.
    pub fn group_dir(&self, group: GroupId) -> PathBuf {
        self.inner.dir.join(group.to_string())
    }

    /// Opens group `group`'s log and state machine (recovering them) and starts its Raft
    /// instance. The group is not initialised: see [`Raft::initialize`].
    pub async fn start_group<M: Machine>(
        &self,
        group: GroupId,
        machine: M,
    ) -> Result<(Raft, MachineStore<M>), ClusterError> {
        if self.inner.groups.read().contains_key(&group) {
            return Err(ClusterError::GroupExists(group));
        }
        let dir = self.group_dir(group);
        let segment_bytes = self.inner.log_segment_bytes;
        let (log, store) =
            tokio::task::spawn_blocking(move || open_stores(&dir, machine, segment_bytes))
                .await
                .map_err(|e| ClusterError::Io {
                    group,
                    context: "opening the group's files",
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| ClusterError::Io {
                    group,
                    context: "opening the group's files",
                    source,
                })?;
        let network = GroupNetwork::new(
            group,
            self.inner.node_id,
            self.inner.peers.clone(),
            self.inner.notes.clone(),
        );
        let raft = Raft::new(
            self.inner.node_id,
            self.inner.config.clone(),
            network,
            log,
            store.clone(),
        )
        .await
        .map_err(|e| ClusterError::Raft {
            group,
            node: self.inner.node_id,
            message: e.to_string(),
        })?;
        let inserted = {
            let mut groups = self.inner.groups.write();
            let fresh = !groups.contains_key(&group);
            if fresh {
                groups.insert(group, raft.clone());
                let reader = store.clone();
                self.inner
                    .points
                    .write()
                    .insert(group, Arc::new(move || reader.applied_point()));
            }
            fresh
        };
        if !inserted {
            // Lost a race with another start of the same group: keep the first one.
            let _ = raft.shutdown().await;
            return Err(ClusterError::GroupExists(group));
        }
        Ok((raft, store))
    }

    /// Every group running here.
    pub fn groups(&self) -> Vec<(GroupId, Raft)> {
        let groups = self.inner.groups.read();
        groups
            .iter()
            .map(|(id, raft)| (*id, raft.clone()))
            .collect()
    }

    /// What this broker's vote requests and answers showed (see [`crate::failover`]).
    pub fn election_notes(&self) -> &Arc<ElectionNotes> {
        &self.inner.notes
    }

    /// How to read `group`'s applied point, if it runs here (the reader blocks while the
    /// group applies: call it from a blocking thread).
    pub fn applied_point(&self, group: GroupId) -> Option<AppliedPointReader> {
        self.inner.points.read().get(&group).cloned()
    }

    /// The Raft instance of `group`, if it runs here.
    pub fn group(&self, group: GroupId) -> Option<Raft> {
        self.inner.groups.read().get(&group).cloned()
    }

    /// Stops group `group`'s Raft instance and forgets it (its files stay; see
    /// [`GroupHost::group_dir`]). Nothing happens for a group not running here.
    pub async fn stop_group(&self, group: GroupId) {
        let raft = self.inner.groups.write().remove(&group);
        self.inner.points.write().remove(&group);
        if let Some(raft) = raft {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, error = %e, "a Raft group did not stop cleanly");
            }
        }
    }

    /// Stops every group's Raft instance (their files stay consistent: every write was
    /// complete when it was reported).
    pub async fn shutdown(&self) {
        let groups: Vec<(GroupId, Raft)> = self.inner.groups.write().drain().collect();
        self.inner.points.write().clear();
        for (group, raft) in groups {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, error = %e, "a Raft group did not stop cleanly");
            }
        }
    }
}

/// Whether `dir` is missing or holds no group folder and no file.
fn holds_nothing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        // Unreadable is not "empty": the group's own open reports the error.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

fn open_stores<M: Machine>(
    dir: &Path,
    machine: M,
    segment_bytes: u64,
) -> std::io::Result<(LogStore, MachineStore<M>)> {
    let policy = LogPolicy {
        must_sync: M::must_sync,
        waiters: machine.append_waiters(),
        segment_bytes,
        placement: machine.placement(),
        records_of: M::entry_records,
    };
    let log = LogStore::open_with(dir, policy)?;
    let store = MachineStore::open(dir, machine)?;
    Ok((log, store))
}
