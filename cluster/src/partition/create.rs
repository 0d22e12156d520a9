//! Creating and deleting topics through the controller group, and waiting until this broker
//! has followed: a new topic set up with leaders for its partitions, a deleted one gone.

use std::time::Duration;

use super::*;
use crate::controller::TopicMeta;
use crate::types::CONTROLLER_GROUP;

impl Replication {
    /// Creates a topic through the controller (this broker must lead it; see
    /// [`Replication::controller_leader`]) and waits until it exists here. Replication
    /// factor 1 makes a topic whose partitions are each kept by one broker (no Raft group),
    /// spread by the placement like the replicas of others.
    pub async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
        replication_factor: u32,
    ) -> Result<(), CreateError> {
        let registry = self.inner.node.registry();
        let live: Vec<NodeId> = registry
            .config()
            .peers
            .iter()
            .map(|(id, _)| id)
            .filter(|id| registry.is_live(*id))
            .collect();
        let command = ControllerCommand::CreateTopic {
            name: name.to_string(),
            config,
            replication_factor,
            brokers: live,
        };
        let meta = self.propose(command).await?;
        let incarnation = meta.map_or(0, |m| m.incarnation);
        // The metadata follower creates it here on the apply; wait for that.
        let deadline = tokio::time::Instant::now() + self.inner.write_timeout;
        while !(self.is_ready(name) && self.incarnation(name) == Some(incarnation)) {
            if tokio::time::Instant::now() >= deadline {
                return Err(CreateError::Unavailable(format!(
                    "topic {name} was created but not set up on this broker in time"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_leaders(name).await;
        Ok(())
    }

    /// Deletes topic `name` through the controller (this broker must lead it; see
    /// [`Replication::controller_leader`]): every broker deletes its copy when it applies the
    /// tombstone. Waits until this broker's copy is gone.
    pub async fn delete_topic(&self, name: &str) -> Result<(), CreateError> {
        let meta = self
            .propose(ControllerCommand::DeleteTopic {
                name: name.to_string(),
            })
            .await?;
        let deleted = meta.map_or(0, |m| m.incarnation);
        self.wait_deleted(name, deleted).await
    }

    /// Waits until this broker holds no copy of `name` at incarnation `deleted` or older.
    pub async fn wait_deleted(&self, name: &str, deleted: u64) -> Result<(), CreateError> {
        let deadline = tokio::time::Instant::now() + self.inner.write_timeout;
        while self.incarnation(name).is_some_and(|i| i <= deleted) {
            if tokio::time::Instant::now() >= deadline {
                return Err(CreateError::Unavailable(format!(
                    "topic {name} was deleted but this broker has not removed its copy yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Proposes `command` to the controller group and returns its answer.
    async fn propose(&self, command: ControllerCommand) -> Result<Option<TopicMeta>, CreateError> {
        let raft = self
            .inner
            .node
            .controller()
            .ok_or_else(|| CreateError::Unavailable("not joined yet".into()))?;
        let bytes =
            bincode::serialize(&command).map_err(|e| CreateError::Unavailable(e.to_string()))?;
        let response = tokio::time::timeout(
            self.inner.write_timeout,
            raft.client_write(Command(bytes.into())),
        )
        .await
        .map_err(|_| CreateError::Unavailable("no commit in time".into()))?
        .map_err(|e| CreateError::Unavailable(e.to_string()))?;
        let reply: ControllerReply = bincode::deserialize(&response.data.0)
            .map_err(|e| CreateError::Unavailable(e.to_string()))?;
        Ok(reply?)
    }

    /// Waits (a bounded while) until every partition of `name` replicated on this broker has
    /// a leader, so that a client's first produce after a create finds one. A partition still
    /// without one after the deadline is not an error: its election goes on.
    pub async fn wait_leaders(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + self.inner.write_timeout;
        loop {
            // The partitions the metadata gives this broker, whether or not their groups
            // have started yet.
            let me = self.inner.node.node_id();
            let mine: Vec<u32> = self
                .inner
                .node
                .metadata()
                .topics
                .get(name)
                .map(|t| {
                    t.partitions
                        .iter()
                        .enumerate()
                        // Replication factor 1 partitions have no group to wait for.
                        .filter(|(_, m)| m.group != CONTROLLER_GROUP && m.replicas.contains(&me))
                        .map(|(p, _)| p as u32)
                        .collect()
                })
                .unwrap_or_default();
            if mine.iter().all(|p| self.leader(name, *p).is_some())
                || tokio::time::Instant::now() >= deadline
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The controller leader's node id and address, if known.
    pub fn controller_leader(&self) -> Option<(NodeId, String)> {
        let leader = self
            .inner
            .node
            .controller()?
            .metrics()
            .borrow()
            .current_leader?;
        let registry = self.inner.node.registry();
        let address = registry.config().peers.address(leader)?.to_string();
        Some((leader, address))
    }
}
