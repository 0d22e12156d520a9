//! [`ClientError`]: what the client library fails with, with the topic and partition, and the
//! broker's status kept as the source.

use tonic::{Code, Status};

/// A result whose error is a [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything the client can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker address could not be used, or the connection failed.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// The broker refused or failed a request; the message names topic, partition and offset.
    #[error("{}", .source.message())]
    Broker {
        /// The topic the request was for, if any.
        topic: Option<String>,
        /// The partition, if any.
        partition: Option<u32>,
        /// The broker's status.
        #[source]
        source: Status,
    },
    /// The request is wrong before it is sent (for example a partition past the count).
    #[error("{0}")]
    Invalid(String),
    /// The producer or consumer was closed.
    #[error("the client is closed")]
    Closed,
}

impl ClientError {
    /// Wraps a status for `topic`/`partition`.
    pub fn broker(topic: Option<&str>, partition: Option<u32>, source: Status) -> Self {
        ClientError::Broker {
            topic: topic.map(str::to_string),
            partition,
            source,
        }
    }

    /// The gRPC code, for broker errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Broker { source, .. } => Some(source.code()),
            _ => None,
        }
    }

    /// True for failures worth retrying: the broker is unavailable (restarting, shutting
    /// down) or the connection broke.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Broker { source, .. } => is_retryable_status(source),
            ClientError::Connect { .. } => true,
            _ => false,
        }
    }
}

/// True when a status means "try again": UNAVAILABLE, or a transport failure that tonic
/// reports as UNKNOWN/CANCELLED before any answer arrived.
pub fn is_retryable_status(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => {
            let m = status.message();
            m.contains("transport") || m.contains("connection") || m.contains("h2 protocol")
        }
        _ => false,
    }
}
