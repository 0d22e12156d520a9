//! Creating a replicated topic through the controller group, and waiting until its
//! partitions are set up and have leaders here.

use std::time::Duration;

use super::*;

impl Replication {
    /// Creates a replicated topic through the controller (this broker must lead it; see
    /// [`Replication::controller_leader`]) and waits until it exists here.
    pub async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
        replication_factor: u32,
    ) -> Result<(), CreateError> {
        let raft = self
            .inner
            .node
            .controller()
            .ok_or_else(|| CreateError::Unavailable("not joined yet".into()))?;
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
        reply?;
        // The metadata follower creates it here on the apply; wait for that.
        let deadline = tokio::time::Instant::now() + self.inner.write_timeout;
        while !self.is_ready(name) {
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
                        .filter(|(_, m)| m.replicas.contains(&me))
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
