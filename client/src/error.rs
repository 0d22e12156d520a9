//! [`ClientError`]: what the client library fails with, with the topic and partition, and the
//! broker's status kept as the source.
//!
//! Whether an error is worth retrying is decided here, once, from the variant and the gRPC
//! code ([`ClientError::is_retryable`]); never from message text, which the broker may
//! reword at any time.

use tonic::{Code, Status};

/// A result whose error is a [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything the client can fail with.
///
/// Cloning is cheap; a failed batch hands the same error to every record in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker address cannot be used at all (it does not parse as a URL). Not retryable.
    #[error("cannot connect to {addr}: {message}")]
    BadAddress {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// The connection to the broker failed (nothing listens there, or the network is
    /// down). Retryable: the broker may be restarting.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// The broker refused or failed a request, or the transport broke before its answer
    /// arrived; the message names topic, partition and offset. Displayed as the broker's
    /// message alone, followed by the code only where the code says something the message
    /// does not (see [`code_note`]).
    #[error("{}{}", .source.message(), code_note(.source))]
    Broker {
        /// The topic the request was for, if any.
        topic: Option<String>,
        /// The partition, if any.
        partition: Option<u32>,
        /// The broker's status.
        #[source]
        source: Status,
    },
    /// The broker's answer broke the contract (for example a produce answer without the
    /// append of the partition written). Not retryable: the request may have been applied.
    #[error("bad answer from the broker for topic {topic:?} partition {partition}: {problem}")]
    BadResponse {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What was wrong.
        problem: String,
    },
    /// [`crate::Producer::try_send`] found the producer's buffer full (records waiting to be
    /// sent or acknowledged use all of `buffer_memory_bytes`).
    #[error(
        "the producer's buffer is full: a {size_bytes}-byte record for topic {topic:?} does \
         not fit in the {buffer_memory_bytes}-byte buffer until earlier records are acknowledged"
    )]
    BufferFull {
        /// The topic of the refused record.
        topic: String,
        /// The record's size as the buffer counts it.
        size_bytes: usize,
        /// The producer's `buffer_memory_bytes`.
        buffer_memory_bytes: usize,
    },
    /// A record is larger than the producer's whole buffer, so it could never be sent.
    #[error(
        "a {size_bytes}-byte record for topic {topic:?} is larger than the producer's \
         {buffer_memory_bytes}-byte buffer (raise buffer_memory_bytes)"
    )]
    RecordTooLarge {
        /// The topic of the refused record.
        topic: String,
        /// The record's size as the buffer counts it.
        size_bytes: usize,
        /// The producer's `buffer_memory_bytes`.
        buffer_memory_bytes: usize,
    },
    /// The producer could not build a batch of its records (timestamps too far apart for
    /// the format, a field over its limit). Not retryable: the same records fail again.
    #[error("cannot build a batch for topic {topic:?} partition {partition}: {source}")]
    BadBatch {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What the batch format refused.
        #[source]
        source: rill_batch::BatchError,
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
    /// down), the connection could not be made, or it broke before an answer arrived. See
    /// [`is_retryable_status`] for broker statuses. Bad input, missing topics, fenced
    /// partitions and contract violations are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            // A non-leader that names the leader (its `rill-leader` metadata): the next
            // attempt goes there.
            ClientError::Broker { source, .. } => {
                is_retryable_status(source) || crate::leaders::leader_hint(source).is_some()
            }
            ClientError::BadAddress { .. }
            | ClientError::BadResponse { .. }
            | ClientError::BufferFull { .. }
            | ClientError::RecordTooLarge { .. }
            | ClientError::BadBatch { .. }
            | ClientError::Invalid(_)
            | ClientError::Closed => false,
        }
    }
}

/// What the gRPC code adds to a broker's message, as ` (CODE)` or ` (CODE; retryable)`, or
/// nothing. The broker's refusals (NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS,
/// FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED) name the problem in their message,
/// so their code is left out; an outage, an internal failure or an empty message is not
/// clear from the text alone, so the code is shown, with whether trying again may help.
pub fn code_note(status: &Status) -> String {
    let self_explained = matches!(
        status.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted
    );
    if self_explained && !status.message().is_empty() {
        return String::new();
    }
    let name = code_name(status.code());
    let sep = if status.message().is_empty() { "" } else { " " };
    if is_retryable_status(status) {
        format!("{sep}({name}; retryable)")
    } else {
        format!("{sep}({name})")
    }
}

/// A code's name as the gRPC specification spells it (`NOT_FOUND`), from its Rust name.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

/// True when a status means "try again", decided from its code and the types of its
/// source errors only:
/// - UNAVAILABLE, from the broker (restarting, shutting down) or from tonic (the connection
///   could not be made);
/// - UNKNOWN or CANCELLED that tonic built locally from a transport failure before any
///   answer arrived (a reset or closed connection, an expired client timeout): such a
///   status carries a [`tonic::transport::Error`], [`tonic::ConnectError`],
///   [`tonic::TimeoutExpired`], a `hyper::Error` (an HTTP/2 stream cut mid-answer) or
///   [`std::io::Error`] in its source chain, while a status the broker sent carries no
///   source at all. The request may or may not have been applied; an idempotent producer's
///   retry is then answered with the original offsets (see [`crate::producer`]).
///
/// Everything else (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, INTERNAL, ...) is
/// final.
pub fn is_retryable_status(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => from_transport(status),
        _ => false,
    }
}

/// True when `status` was made from a local transport failure (see [`is_retryable_status`]).
fn from_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>()
            || e.is::<tonic::ConnectError>()
            || e.is::<tonic::TimeoutExpired>()
            || e.is::<hyper::Error>()
            || e.is::<std::io::Error>()
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn broker(status: Status) -> ClientError {
        ClientError::broker(Some("t"), Some(0), status)
    }

    fn with_transport_source(code: Code) -> Status {
        let mut s = Status::new(code, "stream closed");
        s.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        s
    }

    #[test]
    fn unavailable_and_broken_transports_retry() {
        assert!(broker(Status::unavailable("shutting down")).is_retryable());
        assert!(broker(with_transport_source(Code::Unknown)).is_retryable());
        assert!(broker(with_transport_source(Code::Cancelled)).is_retryable());
        let connect = ClientError::Connect {
            addr: "x".into(),
            message: "refused".into(),
        };
        assert!(connect.is_retryable());
    }

    #[test]
    fn final_errors_do_not_retry() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Internal,
            Code::OutOfRange,
            Code::ResourceExhausted,
            Code::AlreadyExists,
        ] {
            assert!(!broker(Status::new(code, "no")).is_retryable(), "{code:?}");
        }
        let others = [
            ClientError::BadAddress {
                addr: "::".into(),
                message: "bad".into(),
            },
            ClientError::BadResponse {
                topic: "t".into(),
                partition: 0,
                problem: "no append".into(),
            },
            ClientError::BufferFull {
                topic: "t".into(),
                size_bytes: 10,
                buffer_memory_bytes: 5,
            },
            ClientError::RecordTooLarge {
                topic: "t".into(),
                size_bytes: 10,
                buffer_memory_bytes: 5,
            },
            ClientError::Invalid("bad".into()),
            ClientError::Closed,
        ];
        for e in others {
            assert!(!e.is_retryable(), "{e:?}");
        }
    }

    #[test]
    fn a_broker_error_shows_its_message_once_and_the_code_only_where_it_adds() {
        assert_eq!(
            broker(Status::not_found("topic \"nope\" not found")).to_string(),
            "topic \"nope\" not found"
        );
        assert_eq!(
            broker(Status::invalid_argument("bad name")).to_string(),
            "bad name"
        );
        assert_eq!(
            broker(Status::unavailable("the broker is shutting down")).to_string(),
            "the broker is shutting down (UNAVAILABLE; retryable)"
        );
        assert_eq!(
            broker(Status::internal("disk gone")).to_string(),
            "disk gone (INTERNAL)"
        );
        assert_eq!(broker(Status::not_found("")).to_string(), "(NOT_FOUND)");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Ok), "OK");
    }

    #[test]
    fn message_text_never_decides() {
        // A status the broker sent (no local source) whose text merely mentions the
        // transport is the broker's own answer: final. The old substring rule retried it.
        for message in ["transport error", "connection reset", "h2 protocol error"] {
            assert!(
                !broker(Status::unknown(message)).is_retryable(),
                "{message}"
            );
            assert!(
                !broker(Status::cancelled(message)).is_retryable(),
                "{message}"
            );
        }
        // A local source that is not a transport failure is final too.
        let mut s = Status::unknown("transport error");
        s.set_source(Arc::new(std::fmt::Error));
        assert!(!broker(s).is_retryable());
        // A timeout of tonic's own is a transport failure.
        let mut s = Status::cancelled("Timeout expired");
        s.set_source(Arc::new(tonic::TimeoutExpired(())));
        assert!(broker(s).is_retryable());
        // And an UNAVAILABLE retries whatever it says.
        assert!(broker(Status::unavailable("")).is_retryable());
    }
}
