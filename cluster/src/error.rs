//! [`ClusterError`], the typed error of this crate.

use std::io;

use crate::types::{GroupId, NodeId};

/// What can go wrong in the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file of a group could not be read or written.
    #[error("Raft group {group}: {context}")]
    Io {
        /// The group.
        group: GroupId,
        /// What was being done.
        context: &'static str,
        /// The I/O failure.
        #[source]
        source: io::Error,
    },
    /// openraft refused its configuration.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// A group's Raft instance failed to start or stopped for good.
    #[error("Raft group {group} on node {node}: {message}")]
    Raft {
        /// The group.
        group: GroupId,
        /// This node.
        node: NodeId,
        /// openraft's description of the failure.
        message: String,
    },
    /// A group with this id already runs on this broker.
    #[error("Raft group {0} is already running")]
    GroupExists(GroupId),
}
