//! [`PeerList`]: the brokers of a cluster as given by `--peers 1=HOST:PORT,2=HOST:PORT,...`,
//! and [`ClusterConfig`], a broker's cluster settings.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::host::RaftTimings;
use crate::types::NodeId;

/// The brokers of a cluster: node id to `HOST:PORT`, sorted by node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerList {
    peers: BTreeMap<NodeId, String>,
}

/// Why a peers list or node id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerListError {
    /// An entry is not `ID=HOST:PORT`.
    #[error("peers entry {entry:?} is not ID=HOST:PORT")]
    Malformed {
        /// The entry as given.
        entry: String,
    },
    /// A node id is 0 or not a number.
    #[error("peers entry {entry:?}: the node id must be a whole number of 1 or more")]
    BadNodeId {
        /// The entry as given.
        entry: String,
    },
    /// The same node id twice.
    #[error("node id {node} appears twice in the peers list")]
    DuplicateNodeId {
        /// The repeated id.
        node: NodeId,
    },
    /// The same address for two node ids.
    #[error("address {address} is given to both node {first} and node {second}")]
    DuplicateAddress {
        /// The shared address.
        address: String,
        /// One node.
        first: NodeId,
        /// The other.
        second: NodeId,
    },
    /// The list is empty.
    #[error("the peers list is empty")]
    Empty,
    /// This broker's own id is not in the list.
    #[error("node id {node} is not in the peers list ({peers})")]
    SelfMissing {
        /// This broker's id.
        node: NodeId,
        /// The list.
        peers: String,
    },
}

impl PeerList {
    /// The node ids and addresses, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &str)> {
        self.peers.iter().map(|(id, a)| (*id, a.as_str()))
    }

    /// The address of `node`.
    pub fn address(&self, node: NodeId) -> Option<&str> {
        self.peers.get(&node).map(String::as_str)
    }

    /// How many brokers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether the list is empty (never, for a parsed list).
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The smallest node id: the broker that bootstraps the controller.
    pub fn lowest(&self) -> Option<NodeId> {
        self.peers.keys().next().copied()
    }

    /// A list from pairs, with the same checks as parsing.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (NodeId, String)>,
    ) -> Result<PeerList, PeerListError> {
        let mut peers = BTreeMap::new();
        let mut by_addr: BTreeMap<String, NodeId> = BTreeMap::new();
        for (id, addr) in pairs {
            if id == 0 {
                return Err(PeerListError::BadNodeId {
                    entry: format!("{id}={addr}"),
                });
            }
            if let Some(first) = by_addr.insert(addr.clone(), id) {
                return Err(PeerListError::DuplicateAddress {
                    address: addr,
                    first,
                    second: id,
                });
            }
            if peers.insert(id, addr).is_some() {
                return Err(PeerListError::DuplicateNodeId { node: id });
            }
        }
        if peers.is_empty() {
            return Err(PeerListError::Empty);
        }
        Ok(PeerList { peers })
    }
}

impl FromStr for PeerList {
    type Err = PeerListError;

    fn from_str(s: &str) -> Result<PeerList, PeerListError> {
        let mut pairs = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, addr) = entry.split_once('=').ok_or(PeerListError::Malformed {
                entry: entry.to_string(),
            })?;
            let id: NodeId = id.trim().parse().map_err(|_| PeerListError::BadNodeId {
                entry: entry.to_string(),
            })?;
            let addr = addr.trim();
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(PeerListError::Malformed {
                    entry: entry.to_string(),
                });
            }
            pairs.push((id, addr.to_string()));
        }
        PeerList::from_pairs(pairs)
    }
}

impl fmt::Display for PeerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (id, addr) in &self.peers {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{id}={addr}")?;
        }
        Ok(())
    }
}

/// A broker's cluster settings: who it is and who its peers are.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This broker's node id (`--node-id`).
    pub node_id: NodeId,
    /// Every broker of the cluster, this one included (`--peers`).
    pub peers: PeerList,
    /// Raft timing.
    pub timings: RaftTimings,
    /// A broker not heard from for this long is reported not live, in milliseconds.
    pub session_ms: u64,
    /// How this broker reaches its peers (TLS, the cluster token). Default: plaintext, no
    /// token.
    /// `source_ip` is added by [`ClusterConfig::peer_transport`], which is what connections use.
    pub transport: crate::network::PeerTransport,
    /// The address connections to peers leave from, when the peer is on this machine
    /// (a loopback address): the broker's own listen address, so that brokers sharing a
    /// machine on distinct loopback addresses (127.0.0.N) are told apart by their source,
    /// as a per-broker firewall rule or a fault-injecting proxy needs. `None`: the system
    /// chooses.
    pub source_ip: Option<std::net::IpAddr>,
    /// Raft entries between a group's snapshots, after which its Raft log is purged (a
    /// follower further behind then catches up by snapshot). Default 5,000.
    pub snapshot_entries: u64,
    /// The size at which each group's Raft log file is sealed and the next begun; sealed
    /// files are deleted whole once purged. Default 64 MiB.
    pub raft_log_segment_bytes: u64,
}

/// The default liveness session: six missed pings.
pub const DEFAULT_SESSION_MS: u64 = 3_000;

impl ClusterConfig {
    /// How connections to peers are made: [`ClusterConfig::transport`] leaving from
    /// [`ClusterConfig::source_ip`].
    pub fn peer_transport(&self) -> crate::network::PeerTransport {
        let mut transport = self.transport.clone();
        transport.source_ip = self.source_ip;
        transport
    }

    /// Checks that `node_id` is in `peers` and builds the config with default timings.
    pub fn new(node_id: NodeId, peers: PeerList) -> Result<ClusterConfig, PeerListError> {
        if peers.address(node_id).is_none() {
            return Err(PeerListError::SelfMissing {
                node: node_id,
                peers: peers.to_string(),
            });
        }
        Ok(ClusterConfig {
            node_id,
            peers,
            timings: RaftTimings::default(),
            session_ms: DEFAULT_SESSION_MS,
            transport: crate::network::PeerTransport::default(),
            source_ip: None,
            snapshot_entries: crate::host::DEFAULT_SNAPSHOT_ENTRIES,
            raft_log_segment_bytes: crate::log_store::DEFAULT_SEGMENT_BYTES,
        })
    }

    /// This broker's own address from the peers list.
    pub fn own_address(&self) -> &str {
        self.peers.address(self.node_id).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sorted() {
        let p: PeerList = "3=h:3, 1=h:1,2=h:2".parse().expect("parse");
        assert_eq!(p.to_string(), "1=h:1,2=h:2,3=h:3");
        assert_eq!(p.lowest(), Some(1));
        assert_eq!(p.address(2), Some("h:2"));
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        let cases = [
            ("1=h:1,1=h:2", "appears twice"),
            ("1=h:1,2=h:1", "given to both"),
            ("0=h:1", "1 or more"),
            ("x=h:1", "1 or more"),
            ("1h:1", "ID=HOST:PORT"),
            ("1=h", "ID=HOST:PORT"),
            ("1=h:99999", "ID=HOST:PORT"),
            ("", "empty"),
        ];
        for (text, want) in cases {
            let err = text.parse::<PeerList>().expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn the_node_must_be_in_the_list() {
        let p: PeerList = "1=h:1,2=h:2".parse().expect("parse");
        let err = ClusterConfig::new(3, p).expect_err("missing").to_string();
        assert!(err.contains("node id 3 is not in the peers list"), "{err}");
    }
}
