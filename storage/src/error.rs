//! [`StorageError`]: every failure of the log engine, with the topic, partition, offset or path
//! that locates it. The broker maps these to gRPC status codes in one place; this crate only
//! states what went wrong.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;

/// A result whose error is a [`StorageError`].
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What the storage engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A topic or group name breaks the naming rule `[a-zA-Z0-9._-]{1,249}` (and not `.`/`..`).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What was named: `"topic"` or `"group"`.
        kind: &'static str,
        /// The rejected name, as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A topic configuration value is out of its allowed range.
    #[error("invalid config for topic {topic:?}: {reason}")]
    InvalidConfig {
        /// The topic the config was meant for.
        topic: String,
        /// Which value is wrong and what is allowed.
        reason: String,
    },
    /// Creating a topic that already exists.
    #[error("topic {topic:?} already exists")]
    TopicExists {
        /// The topic.
        topic: String,
    },
    /// The topic does not exist (or is being deleted).
    #[error("topic {topic:?} not found")]
    TopicNotFound {
        /// The topic.
        topic: String,
    },
    /// The partition does not exist in the topic.
    #[error(
        "partition {partition} not found in topic {topic:?}, which has {partitions} partitions"
    )]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the topic has.
        partitions: u32,
    },
    /// The group has no committed offsets.
    #[error("group {group:?} not found")]
    GroupNotFound {
        /// The group.
        group: String,
    },
    /// A read asked for an offset outside `[log_start, high_watermark]`.
    #[error(
        "offset {offset} is out of range for topic {topic:?} partition {partition}: \
         valid offsets are {log_start}..={high_watermark}"
    )]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The first offset still retained.
        log_start: u64,
        /// The offset the next append will get.
        high_watermark: u64,
    },
    /// A batch offered for append is malformed (bad checksum, structure, or empty).
    #[error("invalid batch for topic {topic:?} partition {partition}: {source}")]
    InvalidBatch {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What the codec found.
        #[source]
        source: BatchError,
    },
    /// A batch offered for append is larger than the partition accepts.
    #[error(
        "batch of {size_bytes} bytes for topic {topic:?} partition {partition} exceeds the limit of {max_bytes} bytes"
    )]
    BatchTooLarge {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The batch size.
        size_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Stored data failed its checksum or structure check: it is reported, never served.
    #[error(
        "data loss in topic {topic:?} partition {partition} at offset {offset} \
         (segment {segment:?}, byte {position}): {source}"
    )]
    DataLoss {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The first offset the damaged batch should hold (or the offset being read).
        offset: u64,
        /// The segment file.
        segment: PathBuf,
        /// The byte position of the damaged batch in the segment.
        position: u64,
        /// What the codec found.
        #[source]
        source: BatchError,
    },
    /// An idempotent producer's batch was refused (a sequence gap, a stale epoch, bad
    /// producer fields). Nothing was appended.
    #[error("topic {topic:?} partition {partition}: {source}")]
    ProducerRefused {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: crate::producers::ProducerError,
    },
    /// Another replica's idempotent-producer state offered to
    /// [`crate::PartitionLog::restore_producers`] fails its checks. Nothing was changed.
    #[error(
        "topic {topic:?} partition {partition}: the producer state offered is invalid: {reason}"
    )]
    InvalidProducerState {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The partition refuses writes after an I/O failure (fail-stop), or could not be opened.
    #[error("topic {topic:?} partition {partition} is fenced: {reason}")]
    Fenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The failure that fenced it.
        reason: String,
    },
    /// The disk is full: preallocation or a write got `ENOSPC`/`EDQUOT`. Nothing was written.
    #[error("no space left for topic {topic:?} partition {partition} at {path:?}: {source}")]
    NoSpace {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The file that could not grow.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A metadata file (topic config, group offsets, checkpoint) is damaged.
    #[error("corrupt file {path:?}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The log holds staged batches (see `PartitionLog::stage`) that the operation would
    /// write over or ignore: they must be published or dropped first.
    #[error("topic {topic:?} partition {partition}: offset {offset} {what}; staged batches must be published or dropped first")]
    Staged {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset concerned.
        offset: u64,
        /// What is wrong at it.
        what: &'static str,
    },
    /// The store is closed or shutting down.
    #[error("storage is closed")]
    Closed,
    /// A replicated internal topic could not commit a change (no quorum, no leader, or a
    /// timeout); the outcome of the change is unknown, as for any failed produce.
    #[error("topic {topic:?} partition {partition} is unavailable: {reason}")]
    Unavailable {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Why.
        reason: String,
    },
    /// Any other I/O failure, with what was being done and to which file.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done, such as "open segment".
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// Builds an [`StorageError::Io`] from an operation name, a path and the OS error.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the error means the disk is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            StorageError::NoSpace { .. } => true,
            StorageError::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

/// True for the OS errors that mean "the disk is full": `ENOSPC` and `EDQUOT`.
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
