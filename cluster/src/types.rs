//! The openraft type configuration shared by every Raft group of a broker, and short names
//! for the openraft types used across the crate.

use std::fmt;
use std::io::Cursor;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A broker's node id, as given by `--node-id`.
pub type NodeId = u64;

/// A Raft group's id: [`CONTROLLER_GROUP`] for the controller, others for partitions.
pub type GroupId = u64;

/// The controller group's id.
pub const CONTROLLER_GROUP: GroupId = 0;

/// One application command of a group, opaque to Raft: its state machine decodes it.
///
/// `Bytes`, so that the copies openraft makes of an entry (each AppendEntries read from the
/// log, the apply's read) share one buffer instead of copying a produce batch each time.
/// Serialised as one byte string, as a `Vec<u8>` was before (the same bincode bytes).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes_shared")] pub Bytes);

/// A state machine's answer to one applied command, opaque to Raft.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({} bytes)", self.0.len())
    }
}

/// Serialises shared bytes as one byte string (bincode writes length then the bytes in one
/// copy) instead of a sequence of `u8` elements.
mod serde_bytes_shared {
    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        super::serde_bytes_vec::deserialize(d).map(Bytes::from)
    }
}

/// Serialises a byte vector as one byte string (bincode writes length then the bytes in one
/// copy) instead of a sequence of `u8` elements.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Visit)
    }
}

openraft::declare_raft_types!(
    /// The type configuration of every Rill Raft group: opaque commands and replies, `u64`
    /// node ids, nodes addressed by `host:port`, snapshots as bytes, on tokio.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft instance of one group.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (leader id and index).
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A node's address record.
pub type Node = openraft::BasicNode;
/// Storage failures as openraft wants them.
pub type StorageError = openraft::StorageError<NodeId>;
/// A snapshot with its metadata.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
/// The membership as stored with its log id.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
