//! The groups topic on replicated storage (see [`crate::internal`]): the store's changes
//! become Raft commits, every replica's view follows its log, and a new leader of a groups
//! partition rebuilds that partition's memberships before it coordinates them.

use bytes::Bytes;
use rill_storage::groups::{GroupsWriter, GROUPS_TOPIC};
use rill_storage::StorageError;

use super::Coordinator;
use crate::error::BrokerError;
use crate::state::Broker;

/// Commits the group store's changes through the groups partition's Raft group.
#[derive(Debug)]
pub struct RaftGroupsWriter {
    broker: Broker,
    runtime: tokio::runtime::Handle,
}

impl GroupsWriter for RaftGroupsWriter {
    fn append(&self, partition: u32, batch: Bytes) -> rill_storage::Result<()> {
        // The store calls this on the blocking pool (its callers use spawn_blocking), where
        // waiting on the runtime is allowed.
        self.runtime
            .block_on(crate::internal::append_batch(
                &self.broker,
                GROUPS_TOPIC,
                partition,
                batch,
            ))
            .map_err(|e| StorageError::Unavailable {
                topic: GROUPS_TOPIC.to_string(),
                partition,
                reason: e.to_string(),
            })
    }
}

/// Makes the group store write through Raft, when the internal topics are replicated (a
/// cluster of two or more). Call before anything can change a group.
pub fn replicate_store(broker: &Broker) {
    if crate::internal::replication(broker).is_some() {
        broker
            .store()
            .groups()
            .replicate_with(std::sync::Arc::new(RaftGroupsWriter {
                broker: broker.clone(),
                runtime: tokio::runtime::Handle::current(),
            }));
    }
}

/// Follows each groups partition's Raft group here: the view tails the log, and on
/// becoming a partition's leader the coordinator reloads its groups.
pub fn follow(broker: &Broker, coordinator: &Coordinator) {
    let partitions = broker.store().groups().topic().partition_count();
    let (b1, b2, c) = (broker.clone(), broker.clone(), coordinator.clone());
    crate::internal::follow(
        broker,
        GROUPS_TOPIC,
        partitions,
        move |p| {
            let b = b1.clone();
            async move {
                if let Err(e) = catch_up(&b, p).await {
                    tracing::warn!(partition = p, error = %e, "groups view cannot follow its log");
                }
            }
        },
        move |p| {
            let (b, c) = (b2.clone(), c.clone());
            async move {
                catch_up(&b, p).await?;
                c.reload_partition(b.store(), p);
                Ok(())
            }
        },
    );
}

async fn catch_up(broker: &Broker, p: u32) -> Result<(), BrokerError> {
    let groups = broker.store().groups().clone();
    tokio::task::spawn_blocking(move || groups.catch_up(p)).await??;
    Ok(())
}
