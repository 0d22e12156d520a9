//! [`BrokerError`], and the one place where errors become gRPC statuses (the table in
//! `docs/ARCHITECTURE.md`, "Status codes"). Messages carry the topic, partition and offset
//! that the storage error names.

use rill_storage::producers::ProducerError;
use rill_storage::StorageError;
use tonic::{Code, Status};

/// Everything a broker request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The storage engine refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A group refused a heartbeat, a member's commit or a deletion.
    #[error(transparent)]
    Membership(#[from] crate::groups::state::MembershipError),
    /// A subscription refused a call (unknown, exists, a record not held, bad input).
    #[error(transparent)]
    Subscription(#[from] crate::subscriptions::state::SubscriptionError),
    /// The request itself is malformed (a missing field, an empty batch, a bad combination).
    #[error("{0}")]
    InvalidArgument(String),
    /// Too many fetches are waiting already.
    #[error("too many waiting fetches (the limit is {limit}); retry later")]
    TooManyWaiters {
        /// The configured limit.
        limit: usize,
    },
    /// The broker is shutting down; the client may retry against the next start.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// No credentials, or credentials the broker does not accept (unknown, revoked or
    /// expired token).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// An authenticated principal may not do this. The message names the operation and the
    /// resource, never the rules.
    #[error("permission denied: principal {principal:?} may not {operation} {resource}")]
    PermissionDenied {
        /// The caller.
        principal: String,
        /// The operation refused.
        operation: crate::auth::Operation,
        /// The resource, as `topic "name"`.
        resource: String,
    },
    /// A background task died (a bug, not an input error).
    #[error("internal error: {0}")]
    Internal(String),
    /// A replicated partition's write went to a broker that does not lead it. The status
    /// carries the leader's address in the `rill-leader` metadata key when it is known
    /// (FAILED_PRECONDITION), and is UNAVAILABLE while no leader is known.
    #[error("this broker does not lead topic {topic} partition {partition}{}", leader_hint(.leader))]
    NotLeader {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The leader's node id and address, if known.
        leader: Option<(u64, String)>,
    },
    /// Replication could not complete (no quorum within the deadline, no controller); the
    /// client may retry.
    #[error("{0}")]
    ReplicationUnavailable(String),
    /// A replicated topic needs more live brokers than there are.
    #[error("{0}")]
    NotEnoughBrokers(String),
    /// The operation is not available for this resource yet.
    #[error("{0}")]
    NotSupported(String),
    /// A produce named a producer id this broker never gave (see `InitProducer`).
    #[error("unknown producer id {producer_id}: get one from InitProducer")]
    UnknownProducerId {
        /// The id.
        producer_id: i64,
    },
    /// A produce carried an epoch older than the named producer's latest: a newer instance
    /// took over the name, and this one is fenced.
    #[error(
        "producer {producer_id} epoch {epoch} is fenced: a newer instance has epoch {current}"
    )]
    ProducerFenced {
        /// The id.
        producer_id: i64,
        /// The epoch the produce carried.
        epoch: i16,
        /// The producer's current epoch.
        current: i16,
    },
    /// A replicated partition refused an idempotent batch because the producer's state
    /// disagrees with the partition's (a stale epoch, or a sequence gap: then
    /// `expected_sequence` is sent in the `rill-expected-sequence` metadata key, as for a
    /// single broker's partition).
    #[error("{message}")]
    ProducerStateRefused {
        /// What was refused, naming the topic and partition.
        message: String,
        /// The sequence the partition expects next, on a sequence gap.
        expected_sequence: Option<i32>,
    },
    /// The controller leader refused a forwarded request; its code and message are kept.
    #[error("{1}")]
    Forwarded(Code, String),
    /// A connection over `max_connections`; the client may retry later.
    #[error(
        "too many connections: the broker serves at most {limit} at once (max_connections); \
         close one or retry later"
    )]
    TooManyConnections {
        /// The configured limit.
        limit: usize,
    },
    /// A plaintext client reached a port that serves TLS only. Not worth retrying as it is.
    #[error(
        "this broker serves TLS only: connect with TLS (https://, `--tls-ca FILE` or \
         `RILL_TLS_CA` with the CA that signed the broker's certificate)"
    )]
    TlsRequired,
}

/// The metadata key that carries the sequence a partition expects next from a producer, on
/// the FAILED_PRECONDITION of a sequence gap.
pub const EXPECTED_SEQUENCE_METADATA_KEY: &str = "rill-expected-sequence";

/// The metadata key that names a partition's leader on a NotLeader status.
pub const LEADER_METADATA_KEY: &str = "rill-leader";

fn leader_hint(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, addr)) => format!("; the leader is node {id} at {addr}"),
        None => "; no leader is known yet (an election is running)".to_string(),
    }
}

impl From<rill_cluster::partition::WriteError> for BrokerError {
    fn from(e: rill_cluster::partition::WriteError) -> Self {
        use rill_cluster::partition::{Refusal, WriteError};
        match e {
            WriteError::NotLeader {
                topic,
                partition,
                leader,
            } => BrokerError::NotLeader {
                topic,
                partition,
                leader,
            },
            WriteError::Refused(Refusal::Invalid(m)) => BrokerError::InvalidArgument(m),
            WriteError::Refused(Refusal::ProducerState {
                message,
                expected_sequence,
            }) => BrokerError::ProducerStateRefused {
                message,
                expected_sequence,
            },
            e @ (WriteError::Timeout { .. } | WriteError::Failed { .. }) => {
                BrokerError::ReplicationUnavailable(e.to_string())
            }
        }
    }
}

impl From<rill_cluster::partition::CreateError> for BrokerError {
    fn from(e: rill_cluster::partition::CreateError) -> Self {
        use rill_cluster::controller::ControllerError;
        use rill_cluster::partition::CreateError;
        match e {
            CreateError::Refused(ControllerError::TopicExists { topic }) => {
                StorageError::TopicExists { topic }.into()
            }
            CreateError::Refused(ControllerError::TopicNotFound { topic }) => {
                StorageError::TopicNotFound { topic }.into()
            }
            CreateError::Refused(e @ ControllerError::NotEnoughBrokers { .. }) => {
                BrokerError::NotEnoughBrokers(e.to_string())
            }
            CreateError::Refused(e @ ControllerError::InternalTopic { .. }) => {
                BrokerError::InvalidArgument(e.to_string())
            }
            e => BrokerError::ReplicationUnavailable(e.to_string()),
        }
    }
}

impl BrokerError {
    /// A malformed-request error with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        BrokerError::InvalidArgument(message.into())
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::Storage(e) => storage_code(e),
            BrokerError::Membership(e) => membership_code(e),
            BrokerError::Subscription(e) => subscription_code(e),
            BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::TooManyWaiters { .. } => Code::ResourceExhausted,
            BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied { .. } => Code::PermissionDenied,
            BrokerError::Internal(_) => Code::Internal,
            BrokerError::NotLeader {
                leader: Some(_), ..
            } => Code::FailedPrecondition,
            BrokerError::NotLeader { leader: None, .. } => Code::Unavailable,
            BrokerError::ReplicationUnavailable(_) => Code::Unavailable,
            BrokerError::NotEnoughBrokers(_) => Code::FailedPrecondition,
            BrokerError::Forwarded(code, _) => *code,
            BrokerError::NotSupported(_) => Code::FailedPrecondition,
            BrokerError::TooManyConnections { .. } => Code::ResourceExhausted,
            BrokerError::TlsRequired => Code::FailedPrecondition,
            BrokerError::UnknownProducerId { .. }
            | BrokerError::ProducerFenced { .. }
            | BrokerError::ProducerStateRefused { .. } => Code::FailedPrecondition,
        }
    }
}

fn membership_code(e: &crate::groups::state::MembershipError) -> Code {
    use crate::groups::state::MembershipError as M;
    match e {
        // The member must rejoin with epoch 0; a stale member's commit changes nothing.
        M::UnknownMember { .. } | M::FencedEpoch { .. } | M::GroupNotEmpty { .. } => {
            Code::FailedPrecondition
        }
        M::Invalid(_) => Code::InvalidArgument,
    }
}

fn subscription_code(e: &crate::subscriptions::state::SubscriptionError) -> Code {
    use crate::subscriptions::state::SubscriptionError as S;
    match e {
        S::NotFound { .. } => Code::NotFound,
        S::Exists { .. } => Code::AlreadyExists,
        // An ack after the lock expired (or by another consumer) changes nothing; the
        // consumer must receive again.
        S::NotHeld { .. } | S::DeadLetterTopicMissing { .. } | S::EndpointNotAllowed { .. } => {
            Code::FailedPrecondition
        }
        S::NeverDelivered { .. } | S::Invalid(_) => Code::InvalidArgument,
    }
}

fn storage_code(e: &StorageError) -> Code {
    match e {
        StorageError::InvalidName { .. }
        | StorageError::InvalidConfig { .. }
        | StorageError::InvalidBatch { .. }
        | StorageError::BatchTooLarge { .. } => Code::InvalidArgument,
        StorageError::TopicNotFound { .. }
        | StorageError::PartitionNotFound { .. }
        | StorageError::GroupNotFound { .. } => Code::NotFound,
        StorageError::TopicExists { .. } => Code::AlreadyExists,
        StorageError::OffsetOutOfRange { .. } => Code::OutOfRange,
        StorageError::NoSpace { .. } => Code::ResourceExhausted,
        StorageError::Fenced { .. } => Code::FailedPrecondition,
        // Bad producer fields are bad input; a gap or a stale epoch is the producer's state
        // disagreeing with the partition's: retrying the same batch cannot succeed.
        StorageError::ProducerRefused { source, .. } => match source {
            ProducerError::BadFields { .. } => Code::InvalidArgument,
            _ => Code::FailedPrecondition,
        },
        StorageError::DataLoss { .. } | StorageError::Corrupt { .. } => Code::DataLoss,
        StorageError::Closed | StorageError::Unavailable { .. } => Code::Unavailable,
        e if e.is_no_space() => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let code = e.code();
        if code == Code::Internal || code == Code::DataLoss {
            tracing::error!(error = %e, "request failed");
        }
        let mut status = Status::new(code, e.to_string());
        let expected = match &e {
            BrokerError::Storage(StorageError::ProducerRefused {
                source: ProducerError::SequenceGap { expected, .. },
                ..
            }) => Some(*expected),
            BrokerError::ProducerStateRefused {
                expected_sequence, ..
            } => *expected_sequence,
            _ => None,
        };
        if let Some(expected) = expected {
            // Typed for the client: a batch that arrived before an earlier one of its
            // producer is retried rather than failed (see the client's producer).
            if let Ok(v) = expected.to_string().parse() {
                status
                    .metadata_mut()
                    .insert(EXPECTED_SEQUENCE_METADATA_KEY, v);
            }
        }
        if let BrokerError::NotLeader {
            leader: Some((_, addr)),
            ..
        } = &e
        {
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_METADATA_KEY, v);
            }
        }
        status
    }
}

impl From<tokio::task::JoinError> for BrokerError {
    fn from(e: tokio::task::JoinError) -> Self {
        BrokerError::Internal(format!("blocking task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table() {
        let cases: Vec<(BrokerError, Code)> = vec![
            (
                StorageError::TopicNotFound { topic: "t".into() }.into(),
                Code::NotFound,
            ),
            (
                StorageError::TopicExists { topic: "t".into() }.into(),
                Code::AlreadyExists,
            ),
            (
                StorageError::OffsetOutOfRange {
                    topic: "t".into(),
                    partition: 1,
                    offset: 9,
                    log_start: 2,
                    high_watermark: 5,
                }
                .into(),
                Code::OutOfRange,
            ),
            (StorageError::Closed.into(), Code::Unavailable),
            (BrokerError::invalid("empty batch"), Code::InvalidArgument),
            (
                BrokerError::TooManyWaiters { limit: 1 },
                Code::ResourceExhausted,
            ),
            (BrokerError::ShuttingDown, Code::Unavailable),
            (
                BrokerError::Unauthenticated("unknown token".into()),
                Code::Unauthenticated,
            ),
            (
                BrokerError::PermissionDenied {
                    principal: "app".into(),
                    operation: crate::auth::Operation::Delete,
                    resource: "topic \"orders\"".into(),
                },
                Code::PermissionDenied,
            ),
            (
                crate::groups::state::MembershipError::FencedEpoch {
                    group: "g".into(),
                    member: "m".into(),
                    given: 1,
                    current: 2,
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                crate::groups::state::MembershipError::Invalid("bad".into()).into(),
                Code::InvalidArgument,
            ),
            (
                crate::subscriptions::state::SubscriptionError::NotFound { name: "s".into() }
                    .into(),
                Code::NotFound,
            ),
            (
                crate::subscriptions::state::SubscriptionError::NotHeld {
                    subscription: "s".into(),
                    topic: "t".into(),
                    partition: 0,
                    offset: 3,
                    consumer: "c".into(),
                    reason: "its lock expired",
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                crate::subscriptions::state::SubscriptionError::NeverDelivered {
                    subscription: "s".into(),
                    topic: "t".into(),
                    partition: 0,
                    offset: 9,
                    next: 3,
                }
                .into(),
                Code::InvalidArgument,
            ),
            (
                crate::subscriptions::state::SubscriptionError::DeadLetterTopicMissing {
                    subscription: "s".into(),
                    topic: "dlq".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{}", status.message());
        }
        let status = Status::from(BrokerError::NotLeader {
            topic: "orders".into(),
            partition: 2,
            leader: Some((3, "127.0.0.1:7003".into())),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status
                .metadata()
                .get(LEADER_METADATA_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7003")
        );
        assert!(status.message().contains("orders") && status.message().contains("partition 2"));
        let status = Status::from(BrokerError::NotLeader {
            topic: "orders".into(),
            partition: 2,
            leader: None,
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.metadata().get(LEADER_METADATA_KEY).is_none());
        let status = Status::from(BrokerError::from(StorageError::OffsetOutOfRange {
            topic: "orders".into(),
            partition: 1,
            offset: 9,
            log_start: 2,
            high_watermark: 5,
        }));
        for part in ["orders", "partition 1", "9", "2", "5"] {
            assert!(status.message().contains(part), "{}", status.message());
        }
    }

    #[test]
    fn a_replicated_sequence_gap_carries_the_expected_sequence_as_a_single_broker_does() {
        use rill_cluster::partition::{Refusal, WriteError};
        let gap = |expected_sequence| {
            Status::from(BrokerError::from(WriteError::Refused(
                Refusal::ProducerState {
                    message: "topic orders partition 0: out of order sequence".into(),
                    expected_sequence,
                },
            )))
        };
        // A pipelining producer resends a batch that overtook an earlier one only when the
        // status says so: FAILED_PRECONDITION with the sequence the partition expects.
        let status = gap(Some(300));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status
                .metadata()
                .get(EXPECTED_SEQUENCE_METADATA_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("300")
        );
        assert!(status.message().contains("orders"), "{}", status.message());
        // A stale epoch: refused for good, without a sequence.
        let status = gap(None);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status
            .metadata()
            .get(EXPECTED_SEQUENCE_METADATA_KEY)
            .is_none());
        let status = Status::from(BrokerError::from(WriteError::Refused(Refusal::Invalid(
            "topic orders partition 0: invalid batch".into(),
        ))));
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
