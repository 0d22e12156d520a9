//! The broker's side of clustering: reading `--node-id`/`--peers` into a
//! [`rill_cluster::ClusterConfig`], and the services a cluster member adds to its listener.
//! Without cluster flags none of this runs.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use rill_cluster::{ClusterConfig, ClusterNode, ClusterService, PeerList, RaftService};

/// The cluster settings from a node id and a peers list (both or neither), checked against
/// the listen address: a broker must listen where its own peers entry says it does.
pub fn config(
    node_id: Option<u64>,
    peers: Option<String>,
    listen: SocketAddr,
) -> Result<Option<ClusterConfig>> {
    let (node_id, peers) = match (node_id, peers) {
        (None, None) => return Ok(None),
        (Some(n), Some(p)) => (n, p),
        (Some(_), None) => {
            anyhow::bail!("--node-id needs --peers (RILL_PEERS, or peers in the config file)")
        }
        (None, Some(_)) => {
            anyhow::bail!("--peers needs --node-id (RILL_NODE_ID, or node_id in the config file)")
        }
    };
    let peers: PeerList = peers.parse().context("invalid --peers")?;
    let config = ClusterConfig::new(node_id, peers).context("invalid --node-id")?;
    let own = config.own_address().to_string();
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

/// The internal `Raft` and public `Cluster` services of a cluster member.
pub fn services(
    node: &ClusterNode,
) -> (
    rill_proto::v1::raft_server::RaftServer<RaftService>,
    rill_proto::v1::cluster_server::ClusterServer<ClusterService>,
) {
    (
        RaftService::with_registry(node.host().clone(), node.registry()).into_server(),
        ClusterService::new(node.clone()).into_server(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn no_flags_is_no_cluster() {
        assert!(config(None, None, listen(7171)).expect("ok").is_none());
    }

    #[test]
    fn one_flag_without_the_other_is_refused() {
        let err = config(Some(1), None, listen(0)).expect_err("needs peers");
        assert!(format!("{err:#}").contains("--node-id needs --peers"));
        let err = config(None, Some("1=a:1".into()), listen(0)).expect_err("needs id");
        assert!(format!("{err:#}").contains("--peers needs --node-id"));
    }

    #[test]
    fn the_listen_port_must_match_the_own_peers_entry() {
        let peers = "1=127.0.0.1:7001,2=127.0.0.1:7002".to_string();
        let ok = config(Some(2), Some(peers.clone()), listen(7002)).expect("ok");
        assert_eq!(ok.map(|c| c.node_id), Some(2));
        let err = config(Some(2), Some(peers), listen(7001)).expect_err("mismatch");
        assert!(format!("{err:#}").contains("gives node 2 the address 127.0.0.1:7002"));
    }
}
