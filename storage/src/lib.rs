//! Rill's log engine: a durable, segmented, memory-mapped log per topic partition.
//!
//! The engine is synchronous: it knows nothing of async runtimes, gRPC or the broker. Callers
//! that live on an async runtime run blocking calls (syncs, opens, rolls) on a blocking pool;
//! the engine tells them when a call needs no disk work ([`PartitionLog::try_append`],
//! [`PartitionLog::is_hot`]) so the hot path can stay inline. The `fault-injection` feature
//! adds per-partition slow-sync and slow-roll hooks for end-to-end tests.
//!
//! # The map
//! - [`batch`]: the record-batch format (the unit of storage and of transfer) and its zero-copy
//!   codec, re-exported from the `rill-batch` crate, which the client shares. The byte layout
//!   is specified in `storage/FORMAT.md`.
//! - [`index`]: the sparse offset index and the time index of a segment, memory-mapped.
//! - [`segment`]: one segment file: preallocation, the append mapping, sealing, batch lookup.
//! - [`log`]: [`PartitionLog`], a partition's ordered segments: append, read, time lookup,
//!   durability (the flush policy's enforcement and group commit), fencing, retention, and
//!   staged batches (`log/staged.rs`: written ahead, readable once published, for a
//!   replicated partition whose batches are written at the Raft append).
//! - [`producers`]: idempotent producers' per-partition sequences and offsets, rebuilt from
//!   the log's batch headers and snapshotted at checkpoints.
//! - [`region`]: a shared memory-mapped region; the only module that touches mapping pointers.
//! - [`recovery`]: opening a partition: the clean-shutdown marker, the recovery point, the scan
//!   that cuts torn tails, and index rebuilds.
//! - `cursor`: the bounds-checked little-endian reader every decoder uses (`rill-batch`'s).
//! - [`config`]: topic configuration, flush policies and name rules.
//! - [`store`]: [`Store`], the data folder: topics with their partitions, created, opened,
//!   listed and deleted.
//! - [`groups`]: consumer-group state (committed offsets and the broker's membership
//!   metadata) kept in the internal topic `__groups`: versioned records, replay at open,
//!   durable appends, snapshots that bound its size, and the import of older offsets files.
//! - [`stats`]: process-wide sync counts, durations and failures, for the broker's metrics.
//! - [`fsutil`]: crash-safe file helpers (atomic replace, folder fsync, preallocation).
//! - [`error`]: [`StorageError`], the one error type of this crate.

// No `unwrap` outside tests: input and I/O failures are typed errors, and `expect("why")`
// marks the few places that are provably unreachable.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub use rill_batch as batch;
pub mod config;
mod cursor {
    //! The batch crate's bounds-checked reader, for this crate's other decoders.
    pub(crate) use rill_batch::cursor::Cursor;
}
pub mod error;
pub mod fsutil;
pub mod groups;
pub mod index;
pub mod log;
pub mod producers;
pub mod recovery;
pub mod region;
pub mod segment;
pub mod stats;
pub mod store;

pub use config::{FlushPolicy, TopicCompression, TopicConfig};
pub use error::{Result, StorageError};
pub use groups::{CommittedOffset, GroupStore};
pub use log::{LogOptions, PartitionLog, ReadResult, StagedBatch};
pub use store::{Store, StoreOptions, Topic};
