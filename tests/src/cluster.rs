//! A cluster of real `rill-broker` processes on 127.0.0.1: fixed free ports (a peers list
//! needs them before the brokers start), one temp data folder each, kill -9 and restart by
//! node id, and status queries with deadlines. Every child is killed and reaped on drop.
//!
//! Each broker may get flags of its own ([`TestCluster::start_with_each`]); one started with
//! `--metrics-listen 127.0.0.1:0` serves `/metrics` at the address it prints
//! ([`TestCluster::metrics_addr`]).
//!
//! [`TestCluster::start_partitionable`] puts a fault-injecting proxy ([`NetFaults`]) in front
//! of every broker for broker-to-broker traffic (see [`TestCluster::isolate`]); clients still
//! reach every broker directly.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rill_proto::v1::cluster_client::ClusterClient;
use rill_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, MetadataRequest, MetadataResponse,
};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::binary_path;
use rill_testkit::{NetFaults, METRICS_PREFIX};

/// The longest a broker may take to print its listen line.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// The longest one status call may take.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// The first port of the kernel's ephemeral range on Linux's default (32768–60999), below
/// which test brokers' ports are picked.
const EPHEMERAL_START: u16 = 32768;
/// The lowest port picked.
const LOWEST_PORT: u16 = 20000;

/// A free port on `ip`, picked below the kernel's ephemeral range and checked by binding it.
///
/// A cluster's ports must be known before its brokers start (every broker is given the
/// others' addresses), so they cannot bind port 0. A port taken from the ephemeral range and
/// released could meanwhile become the source port of any outgoing connection (the failure
/// detector's probes make many), and the broker's bind would fail, at start or at a restart
/// on the same port after a kill. Ports below that range are never given out that way.
fn free_port_on(ip: IpAddr) -> Result<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(LOWEST_PORT..EPHEMERAL_START);
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {LOWEST_PORT} and {EPHEMERAL_START} on {ip}")
}

/// Picks `n` distinct free ports on 127.0.0.1 (see [`free_port_on`]).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// A `CreateTopic` request for `name` with `partitions` partitions, each replicated on `rf`
/// brokers, every other setting left to the broker.
pub fn create_request(name: &str, partitions: u32, rf: u32) -> rill_proto::v1::CreateTopicRequest {
    rill_proto::v1::CreateTopicRequest {
        name: name.to_string(),
        config: Some(rill_proto::v1::TopicConfig {
            partitions,
            ..Default::default()
        }),
        replication_factor: Some(rf),
    }
}

/// Calls `call` again every 100 ms while it answers UNAVAILABLE (an election, an internal
/// topic still being created, a leader settling) and `deadline` has not passed since the
/// first call; returns the first other answer, or the last UNAVAILABLE.
pub async fn while_unavailable<T, F, Fut>(
    deadline: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match call().await {
            Err(s)
                if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// One broker of a [`TestCluster`].
struct Node {
    addr: SocketAddr,
    /// The proxy other brokers reach this one through, when partitionable.
    advertise: Option<SocketAddr>,
    dir: TempDir,
    child: Option<Child>,
    /// More flags and environment variables for this broker (TLS, tokens, a metrics
    /// listener), at every start.
    extra: Extra,
    /// Where it serves `/metrics`, as printed at its last start.
    metrics: Option<SocketAddr>,
}

/// Several `rill-broker` processes forming one cluster.
pub struct TestCluster {
    nodes: BTreeMap<u64, Node>,
    peers: String,
    logs: TempDir,
    /// The proxies between brokers of a partitionable cluster.
    faults: Option<NetFaults>,
}

/// Flags and environment variables given to a broker of a cluster.
#[derive(Clone, Debug, Default)]
pub struct Extra {
    /// More command-line arguments.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
}

impl Extra {
    /// Only these command-line arguments.
    pub fn args(args: &[&str]) -> Extra {
        Extra {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A paused broker cannot die of SIGKILL until it is continued on some systems'
        // process states; continue every child, then kill_on_drop kills it.
        for node in self.nodes.values() {
            if let Some(pid) = node.child.as_ref().and_then(Child::id) {
                let _ = std::process::Command::new("kill")
                    .arg("-CONT")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

impl TestCluster {
    /// Starts `n` brokers with node ids `1..=n` and waits until each listens.
    pub async fn start(n: usize) -> Result<TestCluster> {
        TestCluster::start_with(n, Extra::default()).await
    }

    /// As [`TestCluster::start`], each broker also given `extra`.
    pub async fn start_with(n: usize, extra: Extra) -> Result<TestCluster> {
        TestCluster::start_with_each(n, |_| extra.clone()).await
    }

    /// As [`TestCluster::start`], node `id` also given `extra(id)` (at every start).
    pub async fn start_with_each(n: usize, extra: impl Fn(u64) -> Extra) -> Result<TestCluster> {
        let ports = free_ports(n)?;
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = TestCluster {
            nodes: BTreeMap::new(),
            peers,
            logs: tempfile::tempdir()?,
            faults: None,
        };
        for (i, port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            cluster.nodes.insert(
                id,
                Node {
                    addr: SocketAddr::from(([127, 0, 0, 1], *port)),
                    advertise: None,
                    dir: tempfile::tempdir()?,
                    child: None,
                    extra: extra(id),
                    metrics: None,
                },
            );
        }
        cluster.start_all().await?;
        Ok(cluster)
    }

    async fn start_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.restart(id).await?;
        }
        Ok(())
    }

    /// Starts `n` brokers whose broker-to-broker traffic goes through fault-injecting
    /// proxies: node `N` listens on `127.0.1.N` (where clients reach it) and advertises a
    /// proxy on `127.0.2.N` in the peers list; see [`TestCluster::isolate`].
    pub async fn start_partitionable(n: usize) -> Result<TestCluster> {
        anyhow::ensure!((1..=250).contains(&n), "1 to 250 brokers");
        let faults = NetFaults::new();
        let mut nodes = BTreeMap::new();
        let mut peers = Vec::new();
        for id in 1..=n as u64 {
            let listen_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, id as u8));
            let addr = SocketAddr::new(listen_ip, free_port_on(listen_ip)?);
            let proxy_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 2, id as u8));
            let advertise = faults.proxy(SocketAddr::new(proxy_ip, 0), addr).await?;
            peers.push(format!("{id}={advertise}"));
            nodes.insert(
                id,
                Node {
                    addr,
                    advertise: Some(advertise),
                    dir: tempfile::tempdir()?,
                    child: None,
                    extra: Extra::default(),
                    metrics: None,
                },
            );
        }
        let mut cluster = TestCluster {
            nodes,
            peers: peers.join(","),
            logs: tempfile::tempdir()?,
            faults: Some(faults),
        };
        cluster.start_all().await?;
        Ok(cluster)
    }

    /// Cuts node `id` off from every other broker, both directions, dropping the
    /// connections in flight; clients still reach it. Only on a partitionable cluster.
    pub fn isolate(&self, id: u64) -> Result<()> {
        let faults = self
            .faults
            .as_ref()
            .context("not a partitionable cluster")?;
        let others: Vec<IpAddr> = self
            .nodes
            .iter()
            .filter(|(other, _)| **other != id)
            .map(|(_, n)| n.addr.ip())
            .collect();
        faults.isolate(self.addr(id).ip(), &others);
        Ok(())
    }

    /// Lets all broker-to-broker traffic through again.
    pub fn heal(&self) -> Result<()> {
        self.faults
            .as_ref()
            .context("not a partitionable cluster")?
            .heal();
        Ok(())
    }

    /// The address other brokers reach node `id` at (its peers entry).
    pub fn advertised(&self, id: u64) -> SocketAddr {
        let node = &self.nodes[&id];
        node.advertise.unwrap_or(node.addr)
    }

    /// The `--peers` value every broker got.
    pub fn peers(&self) -> &str {
        &self.peers
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The node ids whose process runs.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Node `id`'s address.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].addr
    }

    /// Where node `id` serves `/metrics` (as printed at its last start), if it was given
    /// `--metrics-listen`.
    pub fn metrics_addr(&self, id: u64) -> Option<SocketAddr> {
        self.nodes[&id].metrics
    }

    /// Node `id`'s data folder.
    pub fn data_dir(&self, id: u64) -> &Path {
        self.nodes[&id].dir.path()
    }

    /// Where node `id`'s stderr goes.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.logs.path().join(format!("broker-{id}.log"))
    }

    /// Starts (again) node `id` on its address and folder, and waits until it listens.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let log_path = self.log_path(id);
        let peers = self.peers.clone();
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if node.child.is_some() {
            bail!("node {id} is running");
        }
        let mut extra = node.extra.clone();
        if let Some(advertise) = node.advertise {
            extra.args.push("--advertise".into());
            extra.args.push(advertise.to_string());
        }
        let (child, metrics) =
            match spawn_broker_reporting(node.dir.path(), node.addr, id, &peers, log, &extra).await
            {
                Ok(started) => started,
                Err(e) => {
                    // The broker's own words say why it did not start (a port taken, a refusal).
                    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
                    return Err(e.context(format!("node {id}'s log ends with:\n{tail}")));
                }
            };
        node.child = Some(child);
        node.metrics = metrics;
        Ok(())
    }

    /// kill -9 node `id` and reap it.
    pub async fn kill(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut child) = node.child.take() {
            child.start_kill()?;
            tokio::time::timeout(START_DEADLINE, child.wait())
                .await
                .context("reaping a killed broker")??;
        }
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to node `id`'s process with the `kill` command.
    pub async fn signal(&self, id: u64, signal: &str) -> Result<()> {
        let pid = self.nodes[&id]
            .child
            .as_ref()
            .and_then(Child::id)
            .context("node not running")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Deletes everything in node `id`'s data folder (the node must be stopped).
    pub fn wipe(&self, id: u64) -> Result<()> {
        let node = &self.nodes[&id];
        anyhow::ensure!(node.child.is_none(), "node {id} is running");
        for entry in std::fs::read_dir(node.dir.path())? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Node `id`'s cluster status, within a short deadline.
    pub async fn status(&self, id: u64) -> Result<ClusterStatusResponse> {
        let url = format!("http://{}", self.addr(id));
        let call = async {
            let mut client = ClusterClient::connect(url).await?;
            Ok::<_, anyhow::Error>(
                client
                    .cluster_status(ClusterStatusRequest {})
                    .await?
                    .into_inner(),
            )
        };
        tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .context("cluster status timed out")?
    }

    /// Node `id`'s metadata for `topic`, within a short deadline.
    pub async fn metadata(&self, id: u64, topic: &str) -> Result<MetadataResponse> {
        self.metadata_as(id, topic, None).await
    }

    /// [`TestCluster::metadata`], asked with `token` (authentication on) if given.
    async fn metadata_as(
        &self,
        id: u64,
        topic: &str,
        token: Option<&str>,
    ) -> Result<MetadataResponse> {
        let request = MetadataRequest {
            topics: vec![topic.to_string()],
        };
        let call = async {
            let response = match token {
                None => {
                    let url = format!("http://{}", self.addr(id));
                    ClusterClient::connect(url).await?.metadata(request).await?
                }
                Some(token) => {
                    let options = rill_client::ConnectOptions::new().token(token);
                    rill_client::Connection::connect_with(&self.addr(id).to_string(), &options)
                        .await?
                        .cluster()
                        .metadata(request)
                        .await?
                }
            };
            Ok::<_, anyhow::Error>(response.into_inner())
        };
        tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .context("metadata timed out")?
    }

    /// Waits until every running replica names the same running leader of partition `p` of
    /// `topic`, and returns it.
    pub async fn wait_partition_leader(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        self.wait_partition_leader_as(None, topic, p, deadline)
            .await
    }

    /// [`TestCluster::wait_partition_leader`], asking with `token` (authentication on) if
    /// given.
    pub async fn wait_partition_leader_as(
        &self,
        token: Option<&str>,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            let mut leaders = Vec::new();
            for id in &running {
                let leader = self
                    .metadata_as(*id, topic, token)
                    .await
                    .ok()
                    .and_then(|m| {
                        m.topics
                            .first()
                            .and_then(|t| t.partitions.get(p as usize))
                            .map(|x| x.leader)
                    });
                leaders.push(leader);
            }
            if let Some(Some(l)) = leaders.first() {
                if *l != 0 && running.contains(l) && leaders.iter().all(|x| *x == Some(*l)) {
                    return Ok(*l);
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!("no agreed leader of {topic}/{p} within {deadline:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until some running node reports a running leader of partition `p` of `topic`
    /// (with a replication factor below the broker count, only replicas know it).
    pub async fn wait_partition_leader_among(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            for id in &running {
                let leader = self.metadata(*id, topic).await.ok().and_then(|m| {
                    m.topics
                        .first()
                        .and_then(|t| t.partitions.get(p as usize))
                        .map(|x| x.leader)
                });
                if let Some(l) = leader.filter(|l| running.contains(l)) {
                    return Ok(l);
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!("no leader of {topic}/{p} within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node names the same controller leader, among the running
    /// nodes, and returns it.
    pub async fn wait_controller_leader(&self, deadline: Duration) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            let mut leaders = Vec::new();
            for id in &running {
                leaders.push(self.status(*id).await.ok().map(|s| s.controller_leader));
            }
            if let Some(Some(l)) = leaders.first() {
                if *l != 0 && running.contains(l) && leaders.iter().all(|x| *x == Some(*l)) {
                    return Ok(*l);
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!("no agreed controller leader within {deadline:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts 3 brokers, waits for a controller leader, and creates topic `name` with
    /// `partitions` partitions, replicated on all three, through node 1.
    pub async fn start_with_topic(name: &str, partitions: u32) -> Result<TestCluster> {
        let cluster = TestCluster::start(3).await?;
        cluster
            .wait_controller_leader(Duration::from_secs(30))
            .await?;
        let mut admin = cluster.clients(1).await?.admin;
        admin
            .create_topic(create_request(name, partitions, 3))
            .await
            .with_context(|| format!("creating {name}"))?;
        Ok(cluster)
    }

    /// The base offset of the oldest segment of `topic`/`p` in node `id`'s data folder: where
    /// its log starts on disk (0 when it has no segment yet).
    pub fn log_start_on_disk(&self, id: u64, topic: &str, p: u32) -> u64 {
        let folder = self
            .data_dir(id)
            .join("topics")
            .join(topic)
            .join(p.to_string());
        std::fs::read_dir(&folder)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.strip_suffix(".log")?.parse::<u64>().ok()
                    })
                    .min()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Waits until every running node's copy of `topic`/`p` starts past offset 0 on disk (its
    /// older segments deleted by compaction), polling the data folders: the deletion is on
    /// disk, with nothing to await. Returns node id → log start.
    pub async fn wait_log_starts_past_zero(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<BTreeMap<u64, u64>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let starts: BTreeMap<u64, u64> = self
                .running()
                .into_iter()
                .map(|id| (id, self.log_start_on_disk(id, topic, p)))
                .collect();
            if starts.values().all(|start| *start > 0) {
                return Ok(starts);
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "every replica's {topic}/{p} log start should move past 0 within \
                     {deadline:?}: node → start {starts:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The gRPC clients of node `id`.
    pub async fn clients(&self, id: u64) -> Result<crate::Clients> {
        crate::Clients::connect(format!("http://{}", self.addr(id))).await
    }

    /// Every record of `topic`/`p` on node `id`, read from offset 0: offset → value.
    pub async fn read_all(&self, id: u64, topic: &str, p: u32) -> Result<BTreeMap<u64, String>> {
        let mut c = self.clients(id).await?;
        let mut out = BTreeMap::new();
        let mut offset = 0;
        loop {
            let resp = c.fetch(topic, p, offset, 0).await?;
            for r in &resp.records {
                out.insert(r.offset, String::from_utf8_lossy(&r.value).into_owned());
            }
            if resp.next_offset >= resp.high_watermark || resp.records.is_empty() {
                return Ok(out);
            }
            offset = resp.next_offset;
        }
    }

    /// Waits until node `id`'s high watermark of `topic`/`p` reaches `n`.
    pub async fn wait_records(
        &self,
        id: u64,
        topic: &str,
        p: u32,
        n: u64,
        deadline: Duration,
    ) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(mut c) = self.clients(id).await {
                if let Ok(r) = c.fetch(topic, p, 0, 0).await {
                    if r.high_watermark >= n {
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "node {id} never reached {n} records on {topic}/{p} (see {})",
                    self.log_path(id).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `asked` reports exactly `live` as the live brokers.
    pub async fn wait_live(&self, asked: u64, live: &[u64], deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let got: Option<Vec<u64>> = self.status(asked).await.ok().map(|s| {
                s.brokers
                    .iter()
                    .filter(|b| b.live)
                    .map(|b| b.node_id)
                    .collect()
            });
            if got.as_deref() == Some(live) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                bail!("node {asked} never reported live = {live:?}; last {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts one broker of a cluster and waits for its listen line.
pub async fn spawn_broker(
    data_dir: &Path,
    addr: SocketAddr,
    node_id: u64,
    peers: &str,
    log: std::fs::File,
) -> Result<Child> {
    spawn_broker_with(data_dir, addr, node_id, peers, log, &Extra::default()).await
}

/// As [`spawn_broker`], with `extra` flags and environment.
pub async fn spawn_broker_with(
    data_dir: &Path,
    addr: SocketAddr,
    node_id: u64,
    peers: &str,
    log: std::fs::File,
    extra: &Extra,
) -> Result<Child> {
    Ok(
        spawn_broker_reporting(data_dir, addr, node_id, peers, log, extra)
            .await?
            .0,
    )
}

/// As [`spawn_broker_with`], also returning where the broker serves `/metrics` (the address
/// it prints when given `--metrics-listen`; port 0 there picks a free one).
pub async fn spawn_broker_reporting(
    data_dir: &Path,
    addr: SocketAddr,
    node_id: u64,
    peers: &str,
    log: std::fs::File,
    extra: &Extra,
) -> Result<(Child, Option<SocketAddr>)> {
    let mut child = Command::new(binary_path("rill-broker", "rill-broker")?)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--node-id")
        .arg(node_id.to_string())
        .arg("--peers")
        .arg(peers)
        .args(&extra.args)
        .envs(extra.env.iter().map(|(k, v)| (k, v)))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("spawning rill-broker")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut metrics = None;
    tokio::time::timeout(START_DEADLINE, async {
        while let Some(line) = lines.next_line().await? {
            // Printed before the listen line.
            if let Some(a) = line.strip_prefix(METRICS_PREFIX) {
                metrics = Some(a.trim().parse::<SocketAddr>()?);
            }
            if line.starts_with("rill-broker listening on ") {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("rill-broker node {node_id} exited before listening")
    })
    .await
    .context("waiting for rill-broker to listen")??;
    // Keep draining stdout so the broker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, metrics))
}
