//! The broker's side of clustering: reading `--node-id`/`--peers` into a
//! [`rill_cluster::ClusterConfig`], and the services a cluster member adds to its listener.
//! Without cluster flags none of this runs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use rill_cluster::partition::{Submitted, WriteAck};
use rill_cluster::{
    ClusterConfig, ClusterNode, ClusterService, PeerList, RaftService, RaftTimings, Replication,
};
use rill_proto::v1 as pb;
use rill_proto::v1::admin_client::AdminClient;
use rill_proto::v1::{PartitionAppend, ProduceResponse};

use crate::error::BrokerError;
use crate::produce::{Prepared, EARLY_BATCH_WAIT_MS};
use crate::state::Broker;

/// The cluster settings from a node id and a peers list (both or neither), checked against
/// the address others reach this broker at: its own peers entry must be the advertised
/// address (`--advertise`) when one is given, else name the port it listens on.
pub fn config(
    node_id: Option<u64>,
    peers: Option<String>,
    listen: SocketAddr,
    advertise: Option<String>,
) -> Result<Option<ClusterConfig>> {
    let (node_id, peers) = match (node_id, peers) {
        (None, None) => {
            if advertise.is_some() {
                anyhow::bail!("--advertise needs --node-id and --peers (a cluster)");
            }
            return Ok(None);
        }
        (Some(n), Some(p)) => (n, p),
        (Some(_), None) => {
            anyhow::bail!("--node-id needs --peers (RILL_PEERS, or peers in the config file)")
        }
        (None, Some(_)) => {
            anyhow::bail!("--peers needs --node-id (RILL_NODE_ID, or node_id in the config file)")
        }
    };
    let peers: PeerList = peers.parse().context("invalid --peers")?;
    let mut config = ClusterConfig::new(node_id, peers).context("invalid --node-id")?;
    // On one machine, each broker's peer connections leave from its own loopback address.
    config.source_ip = Some(listen.ip()).filter(|ip| ip.is_loopback());
    if let Ok(text) = std::env::var(TIMINGS_ENV) {
        config.timings = parse_timings(&text).with_context(|| format!("invalid {TIMINGS_ENV}"))?;
    }
    let own = config.own_address().to_string();
    if let Some(advertise) = advertise {
        if advertise.trim() != own {
            anyhow::bail!(
                "this broker advertises {advertise}, but --peers gives node {node_id} the address {own}; \
                 another broker may already be node {node_id}"
            );
        }
        return Ok(Some(config));
    }
    let own_port = own
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    if listen.port() != 0 && own_port != Some(listen.port()) {
        anyhow::bail!(
            "this broker listens on {listen}, but --peers gives node {node_id} the address {own}; \
             another broker may already be node {node_id}"
        );
    }
    Ok(Some(config))
}

/// How this broker reaches its peers: TLS when it serves TLS (trusting `tls_peer_ca`, else
/// `tls_client_ca`), and the cluster token when authentication is on. A cluster that serves
/// TLS without a CA for its peers, or authenticates without a cluster token, refuses to
/// start: its brokers could not reach each other.
pub async fn peer_transport(
    security: &crate::auth::SecurityConfig,
) -> Result<rill_cluster::network::PeerTransport> {
    let mut transport = rill_cluster::network::PeerTransport::default();
    if security.tls() {
        let Some(ca) = security
            .tls_peer_ca
            .as_ref()
            .or(security.tls_client_ca.as_ref())
        else {
            anyhow::bail!(
                "a cluster serving TLS needs the CA of its brokers' certificates: set \
                 tls_peer_ca (--tls-peer-ca, RILL_TLS_PEER_CA) or tls_client_ca"
            );
        };
        let path = ca.clone();
        let pem = tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .context("reading the peer CA")?
            .with_context(|| format!("reading the peer CA (tls_peer_ca) {}", ca.display()))?;
        transport.tls = Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        );
    }
    if security.auth {
        let Some(token) = &security.cluster_token else {
            anyhow::bail!(
                "a cluster with authentication needs a cluster token, the same on every \
                 broker: set RILL_CLUSTER_TOKEN or cluster_token_file (--cluster-token-file)"
            );
        };
        transport.token = Some(
            format!("Bearer {}", token.0)
                .parse()
                .context("the cluster token must be printable ASCII")?,
        );
    }
    Ok(transport)
}

/// The environment variable that overrides the Raft timings (a tuning knob for slow or
/// overloaded machines and for benchmarks): `HEARTBEAT_MS,ELECTION_MIN_MS,ELECTION_MAX_MS`.
pub const TIMINGS_ENV: &str = "RILL_RAFT_TIMINGS";

/// Parses `HEARTBEAT_MS,ELECTION_MIN_MS,ELECTION_MAX_MS`; elections must be at least three
/// heartbeats long and the range not empty.
pub fn parse_timings(text: &str) -> Result<RaftTimings> {
    let parts: Vec<u64> = text
        .split(',')
        .map(|p| p.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text:?} is not three numbers of milliseconds"))?;
    let [heartbeat_ms, election_min_ms, election_max_ms] = parts[..] else {
        anyhow::bail!("{text:?}: want HEARTBEAT_MS,ELECTION_MIN_MS,ELECTION_MAX_MS");
    };
    if heartbeat_ms == 0 || election_min_ms < 3 * heartbeat_ms || election_max_ms <= election_min_ms
    {
        anyhow::bail!(
            "{text:?}: want a heartbeat above 0, an election minimum of at least 3 heartbeats, and a maximum above the minimum"
        );
    }
    Ok(RaftTimings {
        heartbeat_ms,
        election_min_ms,
        election_max_ms,
    })
}

/// The internal `Raft` and public `Cluster` services of a cluster member.
pub fn services(
    node: &ClusterNode,
    replication: &Replication,
) -> (
    rill_proto::v1::raft_server::RaftServer<RaftService>,
    rill_proto::v1::cluster_server::ClusterServer<ClusterService>,
) {
    (
        RaftService::with_registry(node.host().clone(), node.registry()).into_server(),
        ClusterService::new(node.clone(), Some(replication.clone())).into_server(),
    )
}

/// The broker's topics as the replication layer sees them.
pub struct BrokerTopics(pub Broker);

impl rill_cluster::LocalTopics for BrokerTopics {
    fn ensure_topic(&self, name: &str, config: &rill_storage::TopicConfig) -> Result<(), String> {
        if name.starts_with(rill_storage::groups::INTERNAL_TOPIC_PREFIX) {
            // Internal topics are the store's own (see crate::internal), never attached.
            if self.0.store().existing_internal_topic(name).is_some() {
                return Ok(());
            }
            return self
                .0
                .store()
                .internal_topic(name, config.clone())
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        if self.0.topic(name).is_ok() {
            return Ok(());
        }
        match self.0.store().create_topic(name, config.clone()) {
            Ok(topic) => {
                self.0.attach(topic);
                Ok(())
            }
            Err(rill_storage::StorageError::TopicExists { .. }) => {
                let topic = self.0.store().topic(name).map_err(|e| e.to_string())?;
                self.0.attach(topic);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn partition(&self, name: &str, p: u32) -> Option<rill_storage::PartitionLog> {
        if name.starts_with(rill_storage::groups::INTERNAL_TOPIC_PREFIX) {
            return self
                .0
                .store()
                .existing_internal_topic(name)?
                .partition(p)
                .ok();
        }
        self.0.topic(name).ok()?.log(p).ok()
    }

    fn appended(&self, name: &str, p: u32, next_offset: u64) {
        if let Ok(topic) = self.0.topic(name) {
            topic.notify(p, next_offset);
        }
    }

    fn delete_topic(&self, name: &str) -> Result<(), String> {
        if name.starts_with(rill_storage::groups::INTERNAL_TOPIC_PREFIX) {
            return Err(format!("topic {name} is internal; it is never deleted"));
        }
        // As the single broker's delete: the data, then the group offsets (forgotten by
        // whichever broker leads each group's `__groups` partition).
        let deleted = match self.0.store().delete_topic(name) {
            Err(rill_storage::StorageError::TopicNotFound { .. }) => Ok(()),
            r => r.map_err(|e| e.to_string()),
        };
        self.0.forget_deleted(name);
        deleted
    }
}

/// Produces a prepared request to a replicated topic: each partition's batch goes through its
/// Raft group (this broker must lead it), proposed in request order, and is acknowledged as
/// its ack mode asks (see [`WriteAck`]).
pub async fn produce_replicated(
    replication: &Replication,
    prepared: &Prepared,
) -> Result<ProduceResponse, BrokerError> {
    submit_replicated(replication, prepared)
        .await?
        .acked()
        .await
}

/// Hands each partition's batch of a prepared request to its Raft group, in request order
/// ([`Replication::submit`]): a batch of an idempotent producer that came before its
/// predecessor waits for it first, up to [`EARLY_BATCH_WAIT_MS`], as on one broker. Returns
/// once every batch is handed over; [`ReplicatedProduce::acked`] waits for the acks. A
/// request spanning partitions (keyed records without a partition) is first checked to be
/// led here in every one of them: one that is not fails the whole request with its leader
/// named, before anything is handed over, so such a request never leaves part of its
/// records behind (the client sends each partition to its own leader instead). A leadership
/// lost between that check and the hand-over still fails the request after the batches
/// before it were handed over (they may commit; nothing is acknowledged).
pub async fn submit_replicated(
    replication: &Replication,
    prepared: &Prepared,
) -> Result<ReplicatedProduce, BrokerError> {
    let ack = match prepared.ack_mode() {
        pb::AckMode::Leader => WriteAck::Leader,
        pb::AckMode::Durable => WriteAck::Durable,
        pb::AckMode::Quorum | pb::AckMode::Unspecified => WriteAck::Quorum,
    };
    let early_wait = Duration::from_millis(EARLY_BATCH_WAIT_MS);
    if prepared.batches().nth(1).is_some() {
        for (p, _) in prepared.batches() {
            replication.check_leads(prepared.topic_name(), p)?;
        }
    }
    let mut submitted = Vec::new();
    for (p, batch) in prepared.batches() {
        let s = replication
            .submit(prepared.topic_name(), p, batch.clone(), ack, early_wait)
            .await?;
        submitted.push((p, s));
    }
    Ok(ReplicatedProduce { submitted })
}

/// A produce request whose batches are handed to their Raft groups, awaiting its acks.
#[derive(Debug)]
pub struct ReplicatedProduce {
    submitted: Vec<(u32, Submitted)>,
}

impl ReplicatedProduce {
    /// Waits for every partition's ack, in request order; the first failure fails the
    /// request.
    pub async fn acked(self) -> Result<ProduceResponse, BrokerError> {
        let mut appends = Vec::with_capacity(self.submitted.len());
        for (p, submitted) in self.submitted {
            let (base_offset, record_count) = submitted.acked().await?;
            appends.push(PartitionAppend {
                partition: p,
                base_offset,
                record_count,
            });
        }
        Ok(ProduceResponse { appends })
    }
}

/// Creates a topic in a cluster: on the controller leader through the controller group,
/// elsewhere by forwarding the request to the controller leader; then waits until the topic
/// is set up on this broker too. Replication factor 1 topics go the same way (their
/// partitions are spread over the brokers, one owner each).
pub async fn create_replicated(
    broker: &Broker,
    req: &pb::CreateTopicRequest,
    config: rill_storage::TopicConfig,
    replication_factor: u32,
) -> Result<(), BrokerError> {
    rill_storage::config::validate_name("topic", &req.name)?;
    if req
        .name
        .starts_with(rill_storage::groups::INTERNAL_TOPIC_PREFIX)
    {
        return Err(rill_storage::StorageError::InvalidName {
            kind: "topic",
            name: req.name.clone(),
            reason: "names starting with `__` are reserved for internal topics",
        }
        .into());
    }
    config.validate(&req.name)?;
    let Some(replication) = broker.replication() else {
        return Err(BrokerError::invalid(format!(
            "topic {}: replication factor {replication_factor} needs a cluster (start the brokers with --node-id and --peers)",
            req.name
        )));
    };
    if broker.topic(&req.name).is_ok() && !replication.is_known(&req.name) {
        // A local topic the controller does not know (made before this broker was in a
        // cluster): the name is taken here.
        return Err(rill_storage::StorageError::TopicExists {
            topic: req.name.clone(),
        }
        .into());
    }
    let leader = controller_leader(replication)?;
    if leader.0 == replication.node_id() {
        return Ok(replication
            .create_topic(&req.name, config, replication_factor)
            .await?);
    }
    let forward = |mut admin: AdminClient<rill_cluster::network::PeerChannel>| {
        let req = req.clone();
        async move { admin.create_topic(req).await.map(|_| ()) }
    };
    forward_to_controller(broker, &leader.1, &req.name, "creation", forward).await?;
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    while !replication.is_ready(&req.name) {
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::ReplicationUnavailable(format!(
                "topic {} was created but is not set up on this broker yet",
                req.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replication.wait_leaders(&req.name).await;
    Ok(())
}

/// Deletes a topic of the controller's: on the controller leader through the controller
/// group (a tombstone every broker follows), elsewhere by forwarding the request to the
/// controller leader; then waits until this broker's copy is gone.
pub async fn delete_replicated(broker: &Broker, name: &str) -> Result<(), BrokerError> {
    let Some(replication) = broker.replication() else {
        return Err(BrokerError::Internal("not in a cluster".into()));
    };
    if name.starts_with(rill_storage::groups::INTERNAL_TOPIC_PREFIX) {
        return Err(BrokerError::invalid(format!(
            "topic {name} is internal (the brokers' own state); it cannot be deleted"
        )));
    }
    let before = replication.incarnation(name);
    let leader = controller_leader(replication)?;
    if leader.0 == replication.node_id() {
        return Ok(replication.delete_topic(name).await?);
    }
    let forward = |mut admin: AdminClient<rill_cluster::network::PeerChannel>| {
        let req = pb::DeleteTopicRequest {
            name: name.to_string(),
        };
        async move { admin.delete_topic(req).await.map(|_| ()) }
    };
    forward_to_controller(broker, &leader.1, name, "deletion", forward).await?;
    if let Some(incarnation) = before {
        replication.wait_deleted(name, incarnation).await?;
    }
    Ok(())
}

/// The controller leader's node id and address, or UNAVAILABLE during an election.
fn controller_leader(replication: &Replication) -> Result<(u64, String), BrokerError> {
    replication.controller_leader().ok_or_else(|| {
        BrokerError::ReplicationUnavailable(
            "the cluster controller has no leader (an election is running); retry".into(),
        )
    })
}

/// Sends an admin call about `topic` to the controller leader at `address` as a broker
/// (the cluster token, over TLS when on: this broker authorized its caller already), and
/// maps its refusal to this broker's own error.
async fn forward_to_controller<F, Fut>(
    broker: &Broker,
    address: &str,
    topic: &str,
    what: &str,
    call: F,
) -> Result<(), BrokerError>
where
    F: FnOnce(AdminClient<rill_cluster::network::PeerChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let forward = async {
        // The cached channel to that broker (TLS and the cluster token when on).
        let admin = AdminClient::new(crate::internal::channel(broker, address)?);
        call(admin).await?;
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, forward).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                return Err(forwarded_status(status));
            }
            Err(BrokerError::ReplicationUnavailable(format!(
                "forwarding the {what} of topic {topic} to the controller at {address}: {e}"
            )))
        }
        Err(_) => Err(BrokerError::ReplicationUnavailable(format!(
            "the controller at {address} did not finish the {what} of topic {topic} in time"
        ))),
    }
}

/// How long a forwarded topic creation or deletion may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// The controller leader's refusal, as this broker's own error.
fn forwarded_status(status: &tonic::Status) -> BrokerError {
    match status.code() {
        tonic::Code::AlreadyExists
        | tonic::Code::NotFound
        | tonic::Code::FailedPrecondition
        | tonic::Code::InvalidArgument => {
            BrokerError::Forwarded(status.code(), status.message().to_string())
        }
        _ => BrokerError::ReplicationUnavailable(status.message().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn no_flags_is_no_cluster() {
        assert!(config(None, None, listen(7171), None)
            .expect("ok")
            .is_none());
        let err = config(None, None, listen(7171), Some("h:1".into())).expect_err("alone");
        assert!(format!("{err:#}").contains("--advertise needs --node-id"));
    }

    #[test]
    fn the_advertised_address_must_be_the_own_peers_entry() {
        let peers = "1=127.0.2.1:8001,2=127.0.2.2:8002".to_string();
        // Listening elsewhere (behind a proxy or a NAT) is fine when advertised.
        let ok = config(
            Some(2),
            Some(peers.clone()),
            listen(7002),
            Some("127.0.2.2:8002".into()),
        )
        .expect("ok")
        .expect("cluster");
        assert_eq!(ok.node_id, 2);
        assert_eq!(ok.source_ip, Some(listen(0).ip()));
        let err = config(
            Some(2),
            Some(peers),
            listen(8002),
            Some("127.0.2.1:8001".into()),
        )
        .expect_err("another node's address");
        assert!(
            format!("{err:#}").contains("advertises 127.0.2.1:8001, but --peers gives node 2"),
            "{err:#}"
        );
    }

    #[test]
    fn one_flag_without_the_other_is_refused() {
        let err = config(Some(1), None, listen(0), None).expect_err("needs peers");
        assert!(format!("{err:#}").contains("--node-id needs --peers"));
        let err = config(None, Some("1=a:1".into()), listen(0), None).expect_err("needs id");
        assert!(format!("{err:#}").contains("--peers needs --node-id"));
    }

    #[test]
    fn raft_timings_parse_and_bad_ones_are_refused() {
        let t = parse_timings("50, 300,600").expect("ok");
        assert_eq!(
            (t.heartbeat_ms, t.election_min_ms, t.election_max_ms),
            (50, 300, 600)
        );
        for bad in [
            "",
            "50,300",
            "50,300,600,1",
            "0,300,600",
            "100,200,600",
            "50,600,600",
            "a,b,c",
        ] {
            assert!(parse_timings(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_listen_port_must_match_the_own_peers_entry() {
        let peers = "1=127.0.0.1:7001,2=127.0.0.1:7002".to_string();
        let ok = config(Some(2), Some(peers.clone()), listen(7002), None).expect("ok");
        assert_eq!(ok.map(|c| c.node_id), Some(2));
        let err = config(Some(2), Some(peers), listen(7001), None).expect_err("mismatch");
        assert!(format!("{err:#}").contains("gives node 2 the address 127.0.0.1:7002"));
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;
    use crate::auth::{Secret, SecurityConfig};

    #[tokio::test]
    async fn a_cluster_with_auth_needs_a_cluster_token_and_with_tls_a_peer_ca() {
        let mut security = SecurityConfig {
            auth: true,
            ..SecurityConfig::default()
        };
        let e = peer_transport(&security).await.expect_err("no token");
        assert!(e.to_string().contains("RILL_CLUSTER_TOKEN"), "{e}");
        security.cluster_token = Some(Secret("cluster-token-0123456789".into()));
        let t = peer_transport(&security).await.expect("a token");
        assert!(t.token.is_some() && t.tls.is_none());

        security.tls_cert = Some("cert.pem".into());
        security.tls_key = Some("key.pem".into());
        let e = peer_transport(&security).await.expect_err("no peer CA");
        assert!(e.to_string().contains("tls_peer_ca"), "{e}");
    }
}
