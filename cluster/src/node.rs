//! [`ClusterNode`]: a broker's membership in a cluster: the join handshake, the liveness
//! pings, the controller group and its deterministic bootstrap.
//!
//! Joining, in order:
//! 1. Ping every peer (itself included, through its own peers entry) until a majority of the
//!    peers list answers and agrees. A peer with another peers list, or another process
//!    answering as this node, is fatal: the broker stops with that error, and nothing has
//!    been written (the controller's files are created only after this step).
//! 2. Start the controller group from its files (a restart finds its vote and log).
//! 3. The broker with the lowest node id waits until every peer has answered, then
//!    initialises the controller group with all peers as voters, unless it already is
//!    initialised (a restart): openraft refuses a second initialisation anyway.
//!
//! Pings go on every [`PING_INTERVAL`] to every peer; a peer is live while its last answer
//! (or its last ping to us) is younger than the session, and the failure detector
//! ([`crate::failover`]) has not found its process gone since.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use parking_lot::Mutex;
use rill_proto::v1::raft_client::RaftClient;
use rill_proto::v1::{Peer, PingReply, PingRequest};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::controller::{Controller, Metadata};
use crate::error::ClusterError;
use crate::failover::Failover;
use crate::host::GroupHost;
use crate::machine::MachineStore;
use crate::network::Peers;
use crate::peers::ClusterConfig;
use crate::types::{NodeId, Raft, CONTROLLER_GROUP};

/// How often every peer is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// How long one ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(1_000);

/// What every broker of a cluster knows about its peers: the agreed list and who was heard
/// from when. Shared by the pinging side and the answering side (the `Raft` service).
pub struct Registry {
    config: ClusterConfig,
    instance_id: u64,
    last_seen: Mutex<HashMap<NodeId, Instant>>,
    /// When the failure detector last found each peer's process gone (see
    /// [`crate::failover`]).
    down_at: Mutex<HashMap<NodeId, Instant>>,
    /// The broker's shutdown, which ends the watches peers keep open here.
    shutdown: CancellationToken,
}

impl Registry {
    fn new(config: ClusterConfig, shutdown: CancellationToken) -> Registry {
        // A random number per process, from the standard library's seeded hasher.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Registry {
            config,
            instance_id: h.finish(),
            last_seen: Mutex::new(HashMap::new()),
            down_at: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    fn peers_proto(&self) -> Vec<Peer> {
        self.config
            .peers
            .iter()
            .map(|(node_id, a)| Peer {
                node_id,
                address: a.to_string(),
            })
            .collect()
    }

    /// Answers a peer's ping: refuses a different peers list or a wrong target, else marks
    /// the sender live.
    pub fn answer_ping(&self, ping: &PingRequest) -> Result<PingReply, Status> {
        let me = self.config.node_id;
        if ping.to_node != me {
            return Err(Status::failed_precondition(format!(
                "node {} reached node {me} at the address it has for node {}; the peers lists disagree",
                ping.from_node, ping.to_node
            )));
        }
        if ping.peers != self.peers_proto() {
            let theirs: Vec<String> = ping
                .peers
                .iter()
                .map(|p| format!("{}={}", p.node_id, p.address))
                .collect();
            return Err(Status::failed_precondition(format!(
                "node {} has --peers {}, but node {me} has --peers {}; every broker must be given the same list",
                ping.from_node,
                theirs.join(","),
                self.config.peers
            )));
        }
        if ping.from_node == me && ping.instance_id != self.instance_id {
            return Err(Status::failed_precondition(format!(
                "node id {me} is already used by the broker at {}; node ids must be unique",
                self.config.own_address()
            )));
        }
        if ping.from_node != me {
            self.last_seen.lock().insert(ping.from_node, Instant::now());
        }
        Ok(PingReply {
            node_id: me,
            instance_id: self.instance_id,
        })
    }

    /// How long ago each peer was last heard from.
    pub fn last_seen(&self) -> BTreeMap<NodeId, Duration> {
        let now = Instant::now();
        self.last_seen
            .lock()
            .iter()
            .map(|(id, at)| (*id, now.saturating_duration_since(*at)))
            .collect()
    }

    /// Whether `node` counts as live (this broker always does): heard from within the
    /// session, and not found down since.
    pub fn is_live(&self, node: NodeId) -> bool {
        if node == self.config.node_id {
            return true;
        }
        let Some(seen) = self.last_seen.lock().get(&node).copied() else {
            return false;
        };
        seen.elapsed() < Duration::from_millis(self.config.session_ms)
            && self
                .down_at
                .lock()
                .get(&node)
                .is_none_or(|down| *down < seen)
    }

    /// Records that `node`'s process was found gone (its connection closed and a new one
    /// refused): it is not live until it is heard from again.
    pub fn mark_down(&self, node: NodeId) {
        self.down_at.lock().insert(node, Instant::now());
    }

    /// How long ago `node` was found down, if that happened after it was last heard from.
    pub fn down_detected(&self, node: NodeId) -> Option<Duration> {
        let down = self.down_at.lock().get(&node).copied()?;
        let seen = self.last_seen.lock().get(&node).copied();
        seen.is_none_or(|seen| seen < down).then(|| down.elapsed())
    }

    /// The identity a watch of this broker reports first.
    pub fn watch_event(&self) -> rill_proto::v1::WatchEvent {
        rill_proto::v1::WatchEvent {
            node_id: self.config.node_id,
            instance_id: self.instance_id,
        }
    }

    /// Cancelled when this broker shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The cluster settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
}

struct Inner {
    registry: Arc<Registry>,
    host: GroupHost,
    peers: Peers,
    controller: OnceLock<(Raft, MachineStore<Controller>)>,
    failover: Failover,
    fatal: Mutex<Option<String>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// A broker's membership in a cluster. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

/// The result of one ping.
enum PingOutcome {
    Agreed,
    Unreachable,
    Refused(String),
}

impl ClusterNode {
    /// A node keeping its Raft files under `data_dir/raft`. Nothing is written until
    /// [`ClusterNode::start`] has joined. Looks at that folder (see
    /// [`GroupHost::vote_quiet_until`]): blocking, call from a blocking thread.
    pub fn new(
        config: ClusterConfig,
        data_dir: &Path,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<ClusterNode, ClusterError> {
        let peers = Peers::new(config.peer_transport());
        let host = GroupHost::with_peers(
            config.node_id,
            data_dir.join("raft"),
            config.timings,
            crate::host::GroupFiles {
                snapshot_entries: config.snapshot_entries,
                log_segment_bytes: config.raft_log_segment_bytes,
            },
            peers.clone(),
        )?;
        Ok(ClusterNode {
            inner: Arc::new(Inner {
                registry: Arc::new(Registry::new(config, shutdown.clone())),
                host,
                peers,
                controller: OnceLock::new(),
                failover: Failover::default(),
                fatal: Mutex::new(None),
                shutdown,
                tasks,
            }),
        })
    }

    /// The peers registry (for the `Raft` service's pings).
    pub fn registry(&self) -> Arc<Registry> {
        self.inner.registry.clone()
    }

    /// The group host.
    pub fn host(&self) -> &GroupHost {
        &self.inner.host
    }

    /// This broker's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.registry.config.node_id
    }

    /// The failure detector and its election drivers.
    pub fn failover(&self) -> &Failover {
        &self.inner.failover
    }

    /// The channels to peers.
    pub(crate) fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The broker's shutdown token.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The broker's task tracker.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// The error that made this broker leave, if any (a disagreeing peers list, a duplicate
    /// node id). The shutdown token is cancelled when it is set.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner.fatal.lock().clone()
    }

    /// The controller's Raft instance, once joined.
    pub fn controller(&self) -> Option<Raft> {
        self.inner.controller.get().map(|(r, _)| r.clone())
    }

    /// A copy of the controller's metadata as applied here (empty before joining).
    pub fn metadata(&self) -> Metadata {
        self.inner
            .controller
            .get()
            .map(|(_, store)| store.read(|c| c.metadata.clone()))
            .unwrap_or_default()
    }

    /// Starts joining and pinging in the background, and watching every peer (see
    /// [`crate::failover`]).
    pub fn start(&self) {
        self.inner.failover.start(self);
        let node = self.clone();
        self.inner.tasks.spawn(async move {
            let shutdown = node.inner.shutdown.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = node.join_and_ping() => {
                    if let Err(message) = result {
                        tracing::error!("{message}");
                        *node.inner.fatal.lock() = Some(message);
                        node.inner.shutdown.cancel();
                    }
                }
            }
        });
    }

    /// Stops every Raft group.
    pub async fn shutdown(&self) {
        self.inner.host.shutdown().await;
    }

    async fn ping(&self, to: NodeId, address: &str) -> PingOutcome {
        ping_peer(&self.inner.registry, &self.inner.peers, to, address).await
    }

    /// Before anything is opened or written: asks every other reachable peer whether it
    /// agrees on the peers list, and returns the first refusal. Unreachable peers are
    /// skipped (the join checks again once they answer).
    pub async fn precheck(config: &ClusterConfig) -> Result<(), String> {
        let registry = Registry::new(config.clone(), CancellationToken::new());
        let peers = Peers::new(config.peer_transport());
        let pings = config
            .peers
            .iter()
            .filter(|(id, _)| *id != config.node_id)
            .map(|(id, a)| {
                let (registry, peers) = (&registry, &peers);
                async move { ping_peer(registry, peers, id, a).await }
            });
        for outcome in futures::future::join_all(pings).await {
            if let PingOutcome::Refused(m) = outcome {
                return Err(m);
            }
        }
        Ok(())
    }

    /// Pings every peer once, concurrently; a refusal is returned as an error.
    async fn ping_all(&self) -> Result<Vec<NodeId>, String> {
        let peers: Vec<(NodeId, String)> = self
            .inner
            .registry
            .config
            .peers
            .iter()
            .map(|(id, a)| (id, a.to_string()))
            .collect();
        let pings = peers
            .iter()
            .map(|(id, a)| async move { (*id, self.ping(*id, a).await) });
        let mut agreed = Vec::new();
        let mut refused = None;
        for (id, outcome) in futures::future::join_all(pings).await {
            match outcome {
                PingOutcome::Agreed => agreed.push(id),
                PingOutcome::Unreachable => {}
                PingOutcome::Refused(m) => refused = Some(m),
            }
        }
        match refused {
            Some(m) => Err(m),
            None => Ok(agreed),
        }
    }

    async fn join_and_ping(&self) -> Result<(), String> {
        let config = self.inner.registry.config.clone();
        let majority = config.peers.len() / 2 + 1;
        // 1. A majority agrees (and no one disagrees) before anything is written.
        loop {
            let agreed = self.ping_all().await?;
            if agreed.len() >= majority {
                break;
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
        // 2. The controller group, from its files.
        let (raft, store) = self
            .inner
            .host
            .start_group(CONTROLLER_GROUP, Controller::default())
            .await
            .map_err(|e| format!("starting the controller group: {e}"))?;
        let _ = self.inner.controller.set((raft.clone(), store));
        tracing::info!(node = config.node_id, peers = %config.peers, "joined the cluster");
        // 3. Bootstrap by the lowest node id, once everyone answers; then keep pinging.
        let mut bootstrapped = config.peers.lowest() != Some(config.node_id);
        loop {
            let agreed = match self.ping_all().await {
                Ok(a) => a,
                Err(m) => {
                    // Joined already: a later disagreement is another broker's mistake.
                    tracing::warn!("{m}");
                    Vec::new()
                }
            };
            if !bootstrapped && agreed.len() == config.peers.len() {
                bootstrapped = true;
                let initialized = raft
                    .is_initialized()
                    .await
                    .map_err(|e| format!("controller group: {e}"))?;
                if !initialized {
                    let members: BTreeMap<NodeId, BasicNode> = config
                        .peers
                        .iter()
                        .map(|(id, a)| (id, BasicNode::new(a)))
                        .collect();
                    match raft.initialize(members).await {
                        Ok(()) => tracing::info!("initialised the controller group"),
                        Err(e) => {
                            tracing::info!(error = %e, "controller group not initialised here")
                        }
                    }
                }
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
    }
}

/// Pings one peer.
async fn ping_peer(registry: &Registry, peers: &Peers, to: NodeId, address: &str) -> PingOutcome {
    let channel = match peers.channel(address) {
        Ok(c) => c,
        Err(e) => return PingOutcome::Refused(format!("peer {to} at {address}: {e}")),
    };
    let mut request = tonic::Request::new(PingRequest {
        from_node: registry.config.node_id,
        to_node: to,
        peers: registry.peers_proto(),
        instance_id: registry.instance_id,
    });
    request.set_timeout(PING_TIMEOUT);
    match RaftClient::new(channel).ping(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            if to == registry.config.node_id && reply.instance_id != registry.instance_id {
                return PingOutcome::Refused(format!(
                    "another broker answers as node {to} at {address}; node ids must be unique"
                ));
            }
            if to != registry.config.node_id {
                registry.last_seen.lock().insert(to, Instant::now());
            }
            PingOutcome::Agreed
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => PingOutcome::Refused(
            format!("refusing to join the cluster: {}", status.message()),
        ),
        Err(_) => PingOutcome::Unreachable,
    }
}
