//! A cluster of real `rill-broker` processes on 127.0.0.1: fixed free ports (a peers list
//! needs them before the brokers start), one temp data folder each, kill -9 and restart by
//! node id, and status queries with deadlines. Every child is killed and reaped on drop.
//!
//! Each broker may get flags of its own ([`TestCluster::start_with_each`]); one started with
//! `--metrics-listen 127.0.0.1:0` serves `/metrics` at the address it prints
//! ([`TestCluster::metrics_addr`]).
//!
//! [`TestCluster::start_partitionable`] puts a fault-injecting proxy ([`NetFaults`]) in front
//! of every broker for broker-to-broker traffic (see [`TestCluster::isolate`], which refuses,
//! and [`TestCluster::isolate_silently`], which holds connections open and drops what they
//! carry); clients still reach every broker directly.
//!
//! The harness is split by concern: `spawn` starts brokers (ports, processes, whole
//! clusters), `faults` kills, pauses, wipes and cuts them off, and `queries` asks them for
//! status and waits, with deadlines, for leaders and records.

mod faults;
mod queries;
mod spawn;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use tokio::process::Child;

use rill_testkit::NetFaults;

pub use queries::{create_request, while_unavailable};
pub use spawn::{free_ports, spawn_broker, spawn_broker_reporting, spawn_broker_with};

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

    /// The first node id (in id order) other than `id`: a follower of a leader, a peer of a
    /// node. Panics in a one-node cluster, which has none (a test's own mistake).
    pub fn another(&self, id: u64) -> u64 {
        self.ids()
            .into_iter()
            .find(|other| *other != id)
            .expect("a cluster of more than one node")
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
}
