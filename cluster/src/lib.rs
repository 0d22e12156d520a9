//! Rill's replication on openraft 0.9: the controller Raft group, one Raft group per
//! replicated partition, and the broker-to-broker gRPC that carries them.
//!
//! See `docs/REPLICATION.md` for the design.
