//! Starting brokers: free ports below the ephemeral range, one `rill-broker` process per
//! node (waiting for its listen line), and whole clusters.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{create_request, Extra, Node, TestCluster};
use crate::binary_path;
use rill_testkit::{NetFaults, METRICS_PREFIX};

/// The longest a broker may take to print its listen line (and a killed one to be reaped).
pub(super) const START_DEADLINE: Duration = Duration::from_secs(60);

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

    /// Starts 3 brokers, waits for a controller leader, and creates topic `name` with
    /// `partitions` partitions, replicated on all three, through node 1.
    pub async fn start_with_topic(name: &str, partitions: u32) -> Result<TestCluster> {
        TestCluster::start_with_topic_rf(name, partitions, 3).await
    }

    /// [`TestCluster::start_with_topic`] with replication factor `rf` (at most 3).
    pub async fn start_with_topic_rf(name: &str, partitions: u32, rf: u32) -> Result<TestCluster> {
        let cluster = TestCluster::start(3).await?;
        cluster
            .wait_controller_leader(Duration::from_secs(30))
            .await?;
        let mut admin = cluster.clients(1).await?.admin;
        admin
            .create_topic(create_request(name, partitions, rf))
            .await
            .with_context(|| format!("creating {name}"))?;
        Ok(cluster)
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
    let mut child = Command::new(binary_path("rill-broker")?)
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
