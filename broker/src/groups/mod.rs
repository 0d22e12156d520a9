//! The group coordinator: membership with broker-side assignment (the next-generation
//! consumer protocol of Kafka, KIP-848), over the groups topic (`__groups`), where the storage
//! engine keeps every group's offsets and membership state.
//!
//! - [`assignor`]: the `uniform` (sticky) and `range` assignors.
//! - [`state`]: one group's state machine: heartbeats, targets, incremental reconciliation,
//!   timeouts, fencing. No I/O.
//! - [`persist`]: the stored form of a group's state, and partition-set conversions.
//! - [`coordinator`]: [`Coordinator`], every group in memory, stored on every change.
//! - [`replicated`]: the groups topic on replicated storage in a cluster.
//! - [`spawn_background`]: the expiry loop (session and rebalance timeouts) and the
//!   compaction loop, which snapshots partitions of the groups topic once they have grown by
//!   about a segment, so the topic stays bounded.

pub mod assignor;
pub mod coordinator;
pub mod persist;
pub mod replicated;
pub mod state;

pub use coordinator::Coordinator;

use std::time::Duration;

use rill_storage::groups::GROUPS_TOPIC;

use crate::state::Broker;

/// How often the groups topic is checked for partitions due a snapshot.
const COMPACTION_TICK_MS: u64 = 10_000;

/// How often members are checked against their session and rebalance timeouts: a fraction
/// of the shortest timeout allowed, so a removal is at most this late.
const EXPIRY_TICK_MS: u64 = 100;

/// Starts the groups' background loops on the broker's tracker.
pub fn spawn_background(broker: &Broker, coordinator: &Coordinator) {
    let b = broker.clone();
    broker
        .tasks()
        .spawn(async move { compaction_loop(b).await });
    let b = broker.clone();
    let c = coordinator.clone();
    broker.tasks().spawn(async move { expiry_loop(b, c).await });
}

async fn expiry_loop(broker: Broker, coordinator: Coordinator) {
    crate::tasks::every(
        &broker,
        Duration::from_millis(EXPIRY_TICK_MS),
        None,
        || async {
            coordinator.expire(&broker).await;
        },
    )
    .await;
}

async fn compaction_loop(broker: Broker) {
    crate::tasks::every(
        &broker,
        Duration::from_millis(COMPACTION_TICK_MS),
        None,
        || async {
            let groups = broker.store().groups().clone();
            // In a cluster only a partition's settled leader snapshots it, through Raft; every
            // replica deletes its own segments when it applies the marker.
            let partitions: Vec<u32> = (0..groups.partition_count())
                .filter(|&p| {
                    matches!(
                        crate::internal::route(&broker, GROUPS_TOPIC, p),
                        Ok(crate::internal::Route::Here)
                    )
                })
                .collect();
            // A failure is logged by the store and retried at the next tick.
            match tokio::task::spawn_blocking(move || groups.compact_partitions_if_due(partitions))
                .await
            {
                Ok(Ok(_)) | Ok(Err(_)) => {}
                Err(e) => tracing::error!(error = %e, "groups compaction task failed"),
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use rill_storage::groups::partition_for_group;

    /// The storage engine places groups with its own copy of the key partitioner (it cannot
    /// depend on the proto crate); both must agree, or a data folder's groups would move.
    #[test]
    fn group_placement_matches_the_documented_partitioner() {
        for i in 0..2_000 {
            let group = format!("group-{i}-{}", "x".repeat(i % 13));
            for partitions in [1, 3, 8, 50] {
                assert_eq!(
                    partition_for_group(&group, partitions),
                    rill_proto::partitioner::partition_for_key(group.as_bytes(), partitions),
                    "{group} over {partitions}"
                );
            }
        }
    }
}
