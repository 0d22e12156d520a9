//! Rill's replication on openraft 0.9: the controller Raft group, one Raft group per
//! replicated partition, and the broker-to-broker gRPC that carries them.
//!
//! See `docs/REPLICATION.md` for the design.
//!
//! # The map
//! - [`types`]: the openraft type config shared by every group, ids, commands and replies.
//! - [`log_store`]: [`LogStore`], a group's durable Raft log and vote (fsynced before acked);
//!   `log_store/frame.rs` is its frame codec (an append's frame written in pieces),
//!   `log_store/waiters.rs` the writers waiting for their append (`leader` acks), and
//!   [`log_store::Placement`] where a group's entry data may live instead of the log.
//! - [`machine`]: the [`Machine`] trait of a group's state and [`MachineStore`], its adapter
//!   to openraft with persisted snapshots.
//! - [`network`]: the sending side: openraft's network over the `rill.v1.Raft` gRPC service,
//!   one channel per peer shared by all groups, AppendEntries on a stream per group and
//!   follower, with the commands beside the envelope (`network/commands.rs`).
//! - [`service`]: the receiving side: [`RaftService`], routing each message to its group.
//! - [`host`]: [`GroupHost`], every Raft group of one broker, keyed by group id.
//! - [`peers`]: [`PeerList`] (`--peers`) and [`ClusterConfig`], a broker's cluster settings.
//! - [`node`]: [`ClusterNode`], a broker's membership: join handshake, liveness pings, the
//!   controller group and its bootstrap.
//! - [`controller`]: the controller's state machine (topics, replica sets, group ids,
//!   incarnations and delete tombstones) and the placement.
//! - [`partition`]: replicated partitions: [`partition::PartitionMachine`] appends committed
//!   batches to a replica's log (`partition/state_machine.rs`, with the command format;
//!   `partition/apply.rs`), or publishes the ones [`partition::PartitionPlacement`] staged
//!   there at the Raft append (`partition/placement.rs`: the partition log as the Raft log;
//!   `partition/stub.rs`: the stub the Raft log holds instead of such a batch);
//!   [`Replication`] sets the controller's topics up here from
//!   the metadata (replication factor 1 ones served by their owners), starts this broker's
//!   replica groups, routes writes to them (proposed in order: `partition/write.rs`,
//!   `partition/proposed.rs`), and deletes local copies that tombstones show stale
//!   (`partition/topics.rs`).
//! - [`internal`]: the internal replicated topics (group, security and subscription state):
//!   their creation at the cluster's start, and leadership for their writers.
//! - [`failover`]: [`Failover`], the failure detector (a watch stream to every peer; a
//!   broken stream plus a refused reconnect means the peer's process is gone) and the
//!   election drivers that replace what it led without waiting for the election timers.
//! - [`catch_up`]: a follower's pull of the records a snapshot says it lacks, from another
//!   replica's partition log (`Log.Fetch`), and the applied point (`Raft.AppliedPoint`) a
//!   replica learns when Raft entries it must apply lie below its log start.
//! - [`cluster_service`]: [`ClusterService`], the public `rill.v1.Cluster` service (a broker
//!   without a replica of a partition asks one of its replicas for that partition's view).
//! - [`error`]: the typed [`ClusterError`].

pub mod catch_up;
pub mod cluster_service;
pub mod controller;
pub mod error;
pub mod failover;
pub mod host;
pub mod internal;
pub mod log_store;
pub mod machine;
pub mod network;
pub mod node;
pub mod partition;
pub mod peers;
pub mod service;
pub mod types;

pub use cluster_service::ClusterService;
pub use error::ClusterError;
pub use failover::Failover;
pub use host::{GroupFiles, GroupHost, RaftTimings};
pub use log_store::LogStore;
pub use machine::{Machine, MachineStore, SnapshotBarrier};
pub use node::ClusterNode;
pub use partition::{LocalTopics, ReplicaProgress, Replication};
pub use peers::{ClusterConfig, PeerList, PeerListError};
pub use service::RaftService;
pub use types::{Command, GroupId, NodeId, Reply, TypeConfig, CONTROLLER_GROUP};
