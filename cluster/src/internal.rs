//! Internal replicated topics: the cluster's own state (group offsets and membership,
//! principals, tokens and ACLs, subscription state) kept in topics the controller creates
//! and Raft replicates like any other, so it survives the loss of a broker.
//!
//! Each internal topic is created once per cluster, by whichever broker leads the
//! controller, at replication factor [`Replication::internal_replication_factor`] (3, or the
//! cluster's size when smaller). Its writers are the leaders of its partitions: a broker that
//! comes to lead one first waits until it has applied every entry committed before its term
//! ([`Replication::settle_leadership`]), so the state it serves from then on is complete.

use std::time::Duration;

use rill_storage::TopicConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::partition::{CreateError, Replication, WriteError};
use crate::types::NodeId;

/// How often the internal topics are looked for until the metadata holds them all.
const ENSURE_TICK_MS: u64 = 200;

/// The leadership of one partition as this broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// The leader, if one is known.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// The index of the last entry this replica applied.
    pub applied: u64,
}

impl Replication {
    /// The replication factor of the internal topics: 3, or the number of brokers in the
    /// peers list when smaller. 1 means they stay local (a one-broker cluster).
    pub fn internal_replication_factor(&self) -> u32 {
        let brokers = self.node().registry().config().peers.len();
        u32::try_from(brokers).unwrap_or(u32::MAX).min(3)
    }

    /// Whether internal topics are replicated in this cluster (it has two brokers or more).
    pub fn replicates_internal_topics(&self) -> bool {
        self.internal_replication_factor() > 1
    }

    /// Creates the internal topics `specs` (name and config) through the controller, in the
    /// background, until the cluster's metadata holds them all. Only the controller leader
    /// creates; a topic waits until enough brokers are live for its replication factor.
    pub fn ensure_internal_topics(
        &self,
        specs: Vec<(String, TopicConfig)>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) {
        if !self.replicates_internal_topics() {
            return;
        }
        let this = self.clone();
        tasks.spawn(async move {
            let rf = this.internal_replication_factor();
            let mut tick = tokio::time::interval(Duration::from_millis(ENSURE_TICK_MS));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let metadata = this.node().metadata();
                let missing: Vec<&(String, TopicConfig)> = specs
                    .iter()
                    .filter(|(name, _)| !metadata.topics.contains_key(name))
                    .collect();
                if missing.is_empty() {
                    return;
                }
                let leads = this
                    .controller_leader()
                    .is_some_and(|(id, _)| id == this.node_id());
                let live = this
                    .node()
                    .registry()
                    .config()
                    .peers
                    .iter()
                    .filter(|(id, _)| this.is_live(*id))
                    .count();
                if !leads || live < rf as usize {
                    continue;
                }
                for (name, config) in missing {
                    match this.create_topic(name, config.clone(), rf).await {
                        Ok(()) => tracing::info!(topic = %name, replication_factor = rf, "internal topic created"),
                        Err(CreateError::Refused(e)) => {
                            tracing::debug!(topic = %name, error = %e, "internal topic not created")
                        }
                        Err(e) => tracing::warn!(topic = %name, error = %e, "cannot create an internal topic yet; retrying"),
                    }
                }
            }
        });
    }

    /// Whether `topic` is in the cluster's metadata and set up here.
    pub fn has_topic(&self, topic: &str) -> bool {
        self.node().metadata().topics.contains_key(topic) && self.is_ready(topic)
    }

    /// Partition `p` of `topic`'s leadership as this broker sees it; `None` when this broker
    /// holds no replica of it.
    pub fn leadership(&self, topic: &str, p: u32) -> Option<Leadership> {
        let raft = self.group(topic, p)?;
        let m = raft.metrics();
        let m = m.borrow();
        Some(Leadership {
            leader: m.current_leader,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
        })
    }

    /// A receiver that changes whenever partition `p` of `topic`'s Raft state does (its
    /// leader, term, or applied entries); `None` when this broker holds no replica.
    pub fn watch(&self, topic: &str, p: u32) -> Option<watch::Receiver<()>> {
        let raft = self.group(topic, p)?;
        let mut metrics = raft.metrics();
        let (tx, rx) = watch::channel(());
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }

    /// Waits, as the leader of partition `p` of `topic`, until this replica has applied
    /// every entry committed before its term (its log then holds the whole committed
    /// state), and returns the term. Fails when this broker does not lead it, or cannot
    /// confirm that with a majority within `timeout`.
    pub async fn settle_leadership(
        &self,
        topic: &str,
        p: u32,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        let raft = self.group(topic, p).ok_or_else(|| WriteError::NotLeader {
            topic: topic.to_string(),
            partition: p,
            leader: None,
        })?;
        let term = raft.metrics().borrow().current_term;
        match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(term),
            Ok(Err(e)) => Err(WriteError::Failed {
                topic: topic.to_string(),
                partition: p,
                message: format!("not the settled leader: {e}"),
            }),
            Err(_) => Err(WriteError::Failed {
                topic: topic.to_string(),
                partition: p,
                message: "no majority confirmed this leader in time".into(),
            }),
        }
    }

    /// The advertised address of broker `node`.
    pub fn address(&self, node: NodeId) -> Option<String> {
        self.node()
            .registry()
            .config()
            .peers
            .address(node)
            .map(str::to_string)
    }
}
