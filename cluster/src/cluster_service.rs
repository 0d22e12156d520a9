//! The public `rill.v1.Cluster` service: metadata (who leads what) and cluster status, as
//! the answering broker sees them.
//!
//! A partition's leader is known to its replicas (its Raft group is the truth; the
//! controller does not copy it). For a replicated partition with no replica here (a
//! replication factor below the broker count), the broker asks one of its replicas, live
//! ones first, each within [`FORWARD_TIMEOUT`], and answers with that replica's view of the
//! partition; the ask carries [`METADATA_LOCAL_ONLY`], so it is never forwarded again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rill_proto::v1::cluster_client::ClusterClient;
use rill_proto::v1::cluster_server::{Cluster, ClusterServer};
use rill_proto::v1::{
    BrokerInfo, BrokerStatus, ClusterStatusRequest, ClusterStatusResponse, MetadataRequest,
    MetadataResponse, PartitionMetadata, ReplicaState, TopicMetadata,
};
use tonic::{Request, Response, Status};

use crate::network::PeerChannel;
use crate::node::ClusterNode;
use crate::partition::Replication;

/// Request metadata asking `Metadata` for the answering broker's own view only: the ask of a
/// broker without a replica of a partition, which must not fan out again.
pub const METADATA_LOCAL_ONLY: &str = "rill-metadata-local";
/// How long a broker waits for a replica's view of partitions it holds no replica of,
/// before it asks the next replica (or answers without it).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

/// The `rill.v1.Cluster` service of one broker.
#[derive(Clone)]
pub struct ClusterService {
    node: ClusterNode,
    replication: Option<Replication>,
    /// Channels to the brokers asked for their view, by address.
    channels: Arc<Mutex<HashMap<String, PeerChannel>>>,
}

impl ClusterService {
    /// The service answering from `node`'s view, with its replicated partitions.
    pub fn new(node: ClusterNode, replication: Option<Replication>) -> Self {
        ClusterService {
            node,
            replication,
            channels: Arc::default(),
        }
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

    /// Each wanted topic (all when `wanted` is empty) as this broker sees it: a partition's
    /// leader and replica states are known here only if it holds a replica.
    fn local_view(&self, wanted: &[String]) -> Vec<TopicMetadata> {
        let registry = self.node.registry();
        let config = registry.config();
        let metadata = self.node.metadata();
        metadata
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
            .collect()
    }

    /// Replaces the view of each replicated partition with no replica here by the view of a
    /// replica (see the module docs). A partition no replica answered for keeps this
    /// broker's view (no leader named).
    async fn views_from_replicas(&self, topics: &mut [TopicMetadata]) {
        let me = self.node.node_id();
        let registry = self.node.registry();
        let config = registry.config();
        let mut unresolved: Vec<(usize, usize)> = Vec::new();
        for (t, topic) in topics.iter().enumerate() {
            for (p, part) in topic.partitions.iter().enumerate() {
                if part.replicas.len() > 1 && !part.replicas.contains(&me) {
                    unresolved.push((t, p));
                }
            }
        }
        let mut rank = 0;
        while !unresolved.is_empty() {
            // This round asks each partition's `rank`-th replica, live ones first.
            let mut asks: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
            for &(t, p) in &unresolved {
                let mut replicas = topics[t].partitions[p].replicas.clone();
                replicas.sort_by_key(|r| !registry.is_live(*r));
                let Some(address) = replicas.get(rank).and_then(|r| config.peers.address(*r))
                else {
                    continue;
                };
                asks.entry(address.to_string()).or_default().push((t, p));
            }
            if asks.is_empty() {
                return;
            }
            for (address, wanted) in asks {
                let mut names: Vec<String> = wanted
                    .iter()
                    .map(|(t, _)| topics[*t].name.clone())
                    .collect();
                names.dedup();
                let Some(answer) = self.ask_local_view(&address, names).await else {
                    continue;
                };
                for (t, p) in wanted {
                    let number = topics[t].partitions[p].partition;
                    let theirs = answer
                        .topics
                        .iter()
                        .filter(|x| x.name == topics[t].name)
                        .flat_map(|x| x.partitions.iter())
                        .find(|x| x.partition == number && x.leader != 0);
                    if let Some(theirs) = theirs {
                        topics[t].partitions[p] = theirs.clone();
                        unresolved.retain(|u| *u != (t, p));
                    }
                }
            }
            rank += 1;
        }
    }

    /// The broker at `address`'s own view of `topics`, within [`FORWARD_TIMEOUT`].
    async fn ask_local_view(&self, address: &str, topics: Vec<String>) -> Option<MetadataResponse> {
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(address) {
                Some(c) => c.clone(),
                None => {
                    let transport = self.node.registry().config().peer_transport();
                    let c = transport.connect_lazy(address).ok()?;
                    channels.insert(address.to_string(), c.clone());
                    c
                }
            }
        };
        let mut request = Request::new(MetadataRequest { topics });
        request.metadata_mut().insert(
            METADATA_LOCAL_ONLY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let mut client = ClusterClient::new(channel);
        match tokio::time::timeout(FORWARD_TIMEOUT, client.metadata(request)).await {
            Ok(Ok(answer)) => Some(answer.into_inner()),
            Ok(Err(e)) => {
                tracing::debug!(%address, error = %e, "a replica's metadata view failed");
                None
            }
            Err(_) => {
                tracing::debug!(%address, "a replica's metadata view timed out");
                None
            }
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
        let local_only = request.metadata().get(METADATA_LOCAL_ONLY).is_some();
        let wanted = request.into_inner().topics;
        let mut topics = self.local_view(&wanted);
        if !local_only {
            self.views_from_replicas(&mut topics).await;
        }
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
        // Who leads each replicated partition, as its replicas see it (those here, or one
        // asked: see the module docs); a replication factor 1 partition is led by its owner.
        let mut led: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        if self.replication.is_some() {
            let mut topics = self.local_view(&[]);
            self.views_from_replicas(&mut topics).await;
            for topic in &topics {
                for p in topic.partitions.iter().filter(|p| p.leader != 0) {
                    led.entry(p.leader)
                        .or_default()
                        .push(format!("{}/{}", topic.name, p.partition));
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
