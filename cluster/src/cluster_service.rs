//! The public `rill.v1.Cluster` service: metadata (who leads what) and cluster status, as
//! the answering broker sees them.

use rill_proto::v1::cluster_server::{Cluster, ClusterServer};
use rill_proto::v1::{
    BrokerInfo, BrokerStatus, ClusterStatusRequest, ClusterStatusResponse, MetadataRequest,
    MetadataResponse, PartitionMetadata, ReplicaState, TopicMetadata,
};
use tonic::{Request, Response, Status};

use crate::node::ClusterNode;
use crate::partition::Replication;

/// The `rill.v1.Cluster` service of one broker.
#[derive(Clone)]
pub struct ClusterService {
    node: ClusterNode,
    replication: Option<Replication>,
}

impl ClusterService {
    /// The service answering from `node`'s view, with its replicated partitions.
    pub fn new(node: ClusterNode, replication: Option<Replication>) -> Self {
        ClusterService { node, replication }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> ClusterServer<ClusterService> {
        ClusterServer::new(self)
    }

    fn controller_view(&self) -> (u64, u64) {
        match self.node.controller() {
            Some(raft) => {
                let m = raft.metrics().borrow().clone();
                (m.current_leader.unwrap_or(0), m.current_term)
            }
            None => (0, 0),
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let registry = self.node.registry();
        let config = registry.config();
        let brokers = config
            .peers
            .iter()
            .map(|(node_id, address)| BrokerInfo {
                node_id,
                address: address.to_string(),
                live: registry.is_live(node_id),
            })
            .collect();
        let wanted = request.into_inner().topics;
        let metadata = self.node.metadata();
        let topics = metadata
            .topics
            .iter()
            .filter(|(name, _)| wanted.is_empty() || wanted.contains(name))
            .map(|(name, t)| TopicMetadata {
                name: name.clone(),
                replication_factor: t.replication_factor,
                partitions: t
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(p, meta)| {
                        // A replica knows its group's leader; a replication factor 1
                        // partition is led by its only replica.
                        let (leader, leader_term) = if meta.replicas.len() == 1 {
                            (meta.replicas[0], 0)
                        } else {
                            self.replication
                                .as_ref()
                                .and_then(|r| r.leader_and_term(name, p as u32))
                                .unwrap_or((0, 0))
                        };
                        let states = self
                            .replication
                            .as_ref()
                            .and_then(|r| r.replica_states(name, p as u32))
                            .unwrap_or_default();
                        PartitionMetadata {
                            partition: p as u32,
                            leader,
                            leader_address: config.peers.address(leader).unwrap_or("").into(),
                            replicas: meta.replicas.clone(),
                            in_sync: states
                                .iter()
                                .filter(|s| s.in_sync)
                                .map(|s| s.node)
                                .collect(),
                            replica_states: states
                                .iter()
                                .map(|s| ReplicaState {
                                    node_id: s.node,
                                    in_sync: s.in_sync,
                                    lag_entries: s.lag_entries,
                                    lag_records: s.lag_records,
                                })
                                .collect(),
                            leader_term,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(MetadataResponse {
            brokers,
            controller_leader: self.controller_view().0,
            topics,
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let registry = self.node.registry();
        let config = registry.config();
        let (controller_leader, controller_term) = self.controller_view();
        let seen = registry.last_seen();
        // Who leads each replicated partition, as the replicas on this broker see it; a
        // replication factor 1 partition is led by its owner.
        let mut led: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        if let Some(replication) = &self.replication {
            for (name, topic) in &self.node.metadata().topics {
                for (p, meta) in topic.partitions.iter().enumerate() {
                    let leader = match meta.replicas[..] {
                        [owner] => Some(owner),
                        _ => replication.leader(name, p as u32),
                    };
                    if let Some(leader) = leader {
                        led.entry(leader).or_default().push(format!("{name}/{p}"));
                    }
                }
            }
        }
        let brokers = config
            .peers
            .iter()
            .map(|(node_id, address)| BrokerStatus {
                node_id,
                address: address.to_string(),
                live: registry.is_live(node_id),
                last_seen_ms: if node_id == config.node_id {
                    Some(0)
                } else {
                    seen.get(&node_id).map(|d| d.as_millis() as u64)
                },
                controller_leader: node_id == controller_leader,
                partitions_led: led.remove(&node_id).unwrap_or_default(),
                down_detected_ms: registry
                    .down_detected(node_id)
                    .map(|d| d.as_millis() as u64),
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            answered_by: config.node_id,
            controller_leader,
            controller_term,
            brokers,
        }))
    }
}
