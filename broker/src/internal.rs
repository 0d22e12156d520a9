//! The broker's internal state topics (`__groups`, `__security`, `__subscriptions`,
//! `__producers`) on replicated storage.
//!
//! On a single broker each is a local internal topic, written and synced in place. In a
//! cluster of two brokers or more each is a replicated topic the controller creates at
//! start (replication factor 3, or the cluster's size), and:
//! - a change is a Raft commit on the partition's group, fsynced by a majority
//!   ([`append`]), so an acknowledged change survives the loss of any one broker;
//! - only the partition's leader changes state and answers for it: a request that reaches
//!   another broker is forwarded to the leader ([`route`], [`channel`]), so clients need
//!   not know where state lives;
//! - a broker that comes to lead a partition first applies every entry committed before
//!   its term, then rebuilds what it keeps in memory from its replica's log, and only then
//!   serves it ([`follow`]); every replica also tails its log as it grows, so reads that
//!   any broker may answer (authentication) see changes at once.
//!
//! [`compact`] holds what the compactions of the keyed state topics share.

pub mod compact;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rill_cluster::network::PeerChannel;
use rill_cluster::partition::WriteAck;
use rill_cluster::Replication;
use rill_storage::batch::Record;
use rill_storage::groups::GROUPS_TOPIC;

use crate::error::BrokerError;
use crate::state::Broker;

/// How long a new leader may take to confirm itself with a majority and apply what was
/// committed before its term.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a partition whose Raft group has not started here yet is looked for.
const GROUP_POLL_MS: u64 = 100;

/// Per-broker bookkeeping of the internal partitions: the terms in which this broker's state
/// for a partition was rebuilt, and the channels to peers that requests are forwarded on.
#[derive(Debug, Default)]
pub struct Internal {
    /// (topic, partition) → the term this broker settled as its leader.
    settled: parking_lot::Mutex<HashMap<(String, u32), u64>>,
    /// Peer address → a channel, reused by every forwarded request.
    channels: parking_lot::Mutex<HashMap<String, PeerChannel>>,
}

/// The internal topics that are replicated in a cluster, with their configs.
pub fn specs(broker: &Broker) -> Vec<(String, rill_storage::TopicConfig)> {
    vec![
        (
            GROUPS_TOPIC.to_string(),
            broker.store().groups().topic().config().clone(),
        ),
        (
            crate::auth::SECURITY_TOPIC.to_string(),
            crate::auth::state::security_topic_config(broker.config().state_segment_bytes),
        ),
        (
            crate::subscriptions::persist::SUBSCRIPTIONS_TOPIC.to_string(),
            crate::subscriptions::persist::subscriptions_topic_config(
                broker.config().subscriptions_segment_bytes,
            ),
        ),
        (
            crate::producers::PRODUCERS_TOPIC.to_string(),
            crate::producers::producers_topic_config(broker.config().state_segment_bytes),
        ),
    ]
}

/// Refuses to start a cluster member whose data folder holds internal state written by a
/// single broker (not through Raft): its records would sit where the replicated partition's
/// entries go. Such state is not carried into a cluster.
pub fn check_unreplicated_state(broker: &Broker) -> anyhow::Result<()> {
    let Some(r) = replication(broker) else {
        return Ok(());
    };
    for (name, _) in specs(broker) {
        if r.is_replicated(&name) {
            continue;
        }
        let Some(topic) = broker.store().existing_internal_topic(&name) else {
            continue;
        };
        for (p, log) in topic.partitions() {
            if log.is_ok_and(|l| l.high_watermark() > 0) {
                anyhow::bail!(
                    "the data folder {} holds {name} partition {p} written by a single broker; a                      cluster keeps {name} replicated and cannot adopt it: start this broker                      with an empty data folder (or without --node-id/--peers)",
                    broker.store().data_dir().display()
                );
            }
        }
    }
    Ok(())
}

/// Where a request about an internal partition is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here: the state is local (a single broker), or this broker is the settled leader.
    Here,
    /// At the leader, whose address this is.
    Leader(String),
}

/// The replication of internal topics, when this broker is in a cluster of two or more.
pub fn replication(broker: &Broker) -> Option<&Replication> {
    broker
        .replication()
        .filter(|r| r.replicates_internal_topics())
}

/// Where requests about partition `p` of the internal topic `topic` are answered. UNAVAILABLE
/// (worth a retry) while the topic is being created, no leader is known, or this broker
/// leads it but has not rebuilt its state yet.
pub fn route(broker: &Broker, topic: &str, p: u32) -> Result<Route, BrokerError> {
    let Some(r) = replication(broker) else {
        return Ok(Route::Here);
    };
    if !r.has_topic(topic) {
        return Err(BrokerError::ReplicationUnavailable(format!(
            "the cluster is still creating its internal topic {topic}; retry"
        )));
    }
    let Some(l) = r.leadership(topic, p) else {
        // No replica here (a cluster larger than the replication factor): the placement's
        // preferred leader answers, or names the leader.
        return match r.check_readable(topic, p) {
            Err(rill_cluster::partition::WriteError::NotLeader {
                leader: Some((_, address)),
                ..
            }) => Ok(Route::Leader(address)),
            _ => Err(no_leader(topic, p)),
        };
    };
    match l.leader {
        Some(id) if id == r.node_id() => {
            let settled = broker
                .internal()
                .settled
                .lock()
                .get(&key(topic, p))
                .copied();
            if settled == Some(l.term) {
                Ok(Route::Here)
            } else {
                Err(BrokerError::ReplicationUnavailable(format!(
                    "topic {topic} partition {p}: this broker was just elected its leader and is \
                     loading its state; retry"
                )))
            }
        }
        Some(id) => r
            .address(id)
            .map(Route::Leader)
            .ok_or_else(|| no_leader(topic, p)),
        None => Err(no_leader(topic, p)),
    }
}

fn no_leader(topic: &str, p: u32) -> BrokerError {
    BrokerError::ReplicationUnavailable(format!(
        "topic {topic} partition {p} has no leader yet (an election is running); retry"
    ))
}

fn key(topic: &str, p: u32) -> (String, u32) {
    (topic.to_string(), p)
}

/// A channel to the peer at `address`, as a broker (TLS and the cluster token when on),
/// reused across requests.
pub fn channel(broker: &Broker, address: &str) -> Result<PeerChannel, BrokerError> {
    if let Some(c) = broker.internal().channels.lock().get(address) {
        return Ok(c.clone());
    }
    let transport = broker
        .config()
        .cluster
        .as_ref()
        .map(|c| c.peer_transport())
        .unwrap_or_default();
    let channel = transport.connect_lazy(address).map_err(|e| {
        BrokerError::ReplicationUnavailable(format!("cannot reach the broker at {address}: {e}"))
    })?;
    broker
        .internal()
        .channels
        .lock()
        .insert(address.to_string(), channel.clone());
    Ok(channel)
}

/// The answer of a forwarded call, as this broker's: a call the serving broker never
/// answered (it died, or the connection broke: CANCELLED or UNAVAILABLE from the transport,
/// or UNKNOWN made here from a transport failure, such as a connection reset or a broken
/// pipe under a request in flight) becomes UNAVAILABLE, which clients retry; its own
/// answers pass unchanged.
pub fn relayed<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
) -> Result<tonic::Response<T>, tonic::Status> {
    answer.map_err(|status| match status.code() {
        tonic::Code::Cancelled | tonic::Code::Unavailable => unanswered(&status),
        tonic::Code::Unknown if from_transport(&status) => unanswered(&status),
        _ => status,
    })
}

/// UNAVAILABLE, for a forwarded call the serving broker did not answer.
fn unanswered(status: &tonic::Status) -> tonic::Status {
    tonic::Status::from(BrokerError::ReplicationUnavailable(format!(
        "the broker serving this state did not answer ({}); retry",
        status.message()
    )))
}

/// True when `status` was made on this side from a transport failure: it carries the
/// failure as its source (a status the other broker sent has none). Decided by the error's
/// type, never by its text.
fn from_transport(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<hyper::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `message` as a request forwarded on behalf of `caller`: the receiving broker, which trusts
/// this one's cluster token, authorizes it as `caller` (see [`crate::auth::ON_BEHALF_OF`]).
/// A principal that cannot travel in metadata is refused rather than forwarded as the broker.
pub fn on_behalf<T>(
    caller: &crate::auth::Caller,
    message: T,
) -> Result<tonic::Request<T>, BrokerError> {
    let mut request = tonic::Request::new(message);
    let principal = caller.principal.parse().map_err(|_| {
        BrokerError::invalid(format!(
            "principal {:?} cannot be forwarded to the broker that serves this request",
            caller.principal
        ))
    })?;
    request
        .metadata_mut()
        .insert(crate::auth::ON_BEHALF_OF, principal);
    if caller.superuser {
        request.metadata_mut().insert(
            crate::auth::ON_BEHALF_OF_SUPERUSER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    Ok(request)
}

/// Appends `records` to partition `p` of the internal topic `topic` durably: a Raft commit
/// fsynced by a majority in a cluster, else an append synced in place. On return this
/// broker's copy of the partition holds them.
pub async fn append(
    broker: &Broker,
    topic: &str,
    p: u32,
    records: Vec<Record>,
) -> Result<(), BrokerError> {
    let batch = rill_storage::batch::try_encode_batch(&records)
        .map_err(|e| BrokerError::invalid(format!("topic {topic}: {e}")))?;
    append_batch(broker, topic, p, batch).await
}

/// [`append`] for an encoded batch.
pub async fn append_batch(
    broker: &Broker,
    topic: &str,
    p: u32,
    batch: Bytes,
) -> Result<(), BrokerError> {
    append_batch_at(broker, topic, p, batch).await.map(|_| ())
}

/// [`append_batch`], returning the offset the batch's first record got.
pub async fn append_batch_at(
    broker: &Broker,
    topic: &str,
    p: u32,
    batch: Bytes,
) -> Result<u64, BrokerError> {
    if let Some(r) = replication(broker) {
        if !r.has_topic(topic) {
            return Err(BrokerError::ReplicationUnavailable(format!(
                "the cluster is still creating its internal topic {topic}; retry"
            )));
        }
        let (base_offset, _) = r.write_acked(topic, p, batch, WriteAck::Durable).await?;
        return Ok(base_offset);
    }
    let log = broker
        .store()
        .existing_internal_topic(topic)
        .ok_or_else(|| BrokerError::Internal(format!("the internal topic {topic} is not open")))?
        .partition(p)?;
    tokio::task::spawn_blocking(move || -> Result<u64, BrokerError> {
        let appended = log.append(&batch)?;
        log.sync_through(appended.next_offset)?;
        Ok(appended.base_offset)
    })
    .await?
}

/// Walks the records of an internal topic's partition `log` from offset `from` (or its log
/// start, if later) to its end, handing each record's offset and value to `apply`, and
/// returns the offset reached. A batch or record that does not read back is
/// `corrupt(what)`, and stops the walk: the state topics refuse to start with a change
/// skipped (a revocation, an id given) rather than guess. Blocking.
pub fn replay_values(
    log: &rill_storage::PartitionLog,
    from: u64,
    corrupt: impl Fn(String) -> BrokerError,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), BrokerError>,
) -> Result<u64, BrokerError> {
    replay_keyed(log, from, corrupt, |offset, _, value| apply(offset, value))
}

/// [`replay_values`], handing each record's key too.
pub fn replay_keyed(
    log: &rill_storage::PartitionLog,
    from: u64,
    corrupt: impl Fn(String) -> BrokerError,
    mut apply: impl FnMut(u64, Option<&[u8]>, &[u8]) -> Result<(), BrokerError>,
) -> Result<u64, BrokerError> {
    let mut offset = from.max(log.log_start_offset());
    while offset < log.high_watermark() {
        let read = log.read(offset, REPLAY_READ_BYTES)?;
        for chunk in &read.chunks {
            for batch in rill_storage::batch::batches(chunk) {
                let batch = batch.map_err(|e| corrupt(format!("a batch: {e}")))?;
                for record in batch.records() {
                    let record = record.map_err(|e| corrupt(format!("a record: {e}")))?;
                    if record.offset >= offset {
                        apply(record.offset, record.key, record.value)?;
                    }
                }
            }
        }
        if read.next_offset <= offset {
            break;
        }
        offset = read.next_offset;
    }
    Ok(offset)
}

/// How much [`replay_values`] reads per call.
const REPLAY_READ_BYTES: usize = 4 << 20;

/// Runs, for each partition `0..partitions` of the internal topic `topic`, a follower of its
/// Raft group here: `applied(p)` whenever this replica applied new entries (to tail its
/// log), and `settled(p)` once this broker leads it and has applied everything committed
/// before its term (to rebuild the in-memory state); only after `settled` succeeds does
/// [`route`] answer [`Route::Here`]. Nothing runs on a single broker.
pub fn follow<A, AF, S, SF>(broker: &Broker, topic: &str, partitions: u32, applied: A, settled: S)
where
    A: Fn(u32) -> AF + Send + Sync + 'static,
    AF: Future<Output = ()> + Send,
    S: Fn(u32) -> SF + Send + Sync + 'static,
    SF: Future<Output = Result<(), BrokerError>> + Send,
{
    if replication(broker).is_none() {
        return;
    }
    let (applied, settled) = (Arc::new(applied), Arc::new(settled));
    for p in 0..partitions {
        let (broker, topic) = (broker.clone(), topic.to_string());
        let (applied, settled) = (Arc::clone(&applied), Arc::clone(&settled));
        let tasks = broker.tasks().clone();
        tasks.spawn(async move {
            let shutdown = broker.shutdown().clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = follow_partition(&broker, &topic, p, &*applied, &*settled) => {}
            }
        });
    }
}

async fn follow_partition<A, AF, S, SF>(
    broker: &Broker,
    topic: &str,
    p: u32,
    applied: &A,
    settled: &S,
) where
    A: Fn(u32) -> AF,
    AF: Future<Output = ()>,
    S: Fn(u32) -> SF,
    SF: Future<Output = Result<(), BrokerError>>,
{
    let Some(r) = replication(broker) else {
        return;
    };
    loop {
        let Some(mut changes) = r.watch(topic, p) else {
            tokio::time::sleep(Duration::from_millis(GROUP_POLL_MS)).await;
            continue;
        };
        let mut seen_applied = None;
        loop {
            if let Some(l) = r.leadership(topic, p) {
                if seen_applied != Some(l.applied) {
                    seen_applied = Some(l.applied);
                    applied(p).await;
                }
                let k = key(topic, p);
                let mine = l.leader == Some(r.node_id());
                let current = broker.internal().settled.lock().get(&k).copied();
                if !mine {
                    broker.internal().settled.lock().remove(&k);
                } else if current != Some(l.term) {
                    match r.settle_leadership(topic, p, SETTLE_TIMEOUT).await {
                        Ok(term) => {
                            applied(p).await;
                            match settled(p).await {
                                Ok(()) => {
                                    tracing::info!(
                                        topic,
                                        partition = p,
                                        term,
                                        "leading an internal partition; its state is loaded"
                                    );
                                    broker.internal().settled.lock().insert(k, term);
                                }
                                Err(e) => {
                                    tracing::warn!(topic, partition = p, error = %e, "cannot load an internal partition's state; retrying");
                                    tokio::time::sleep(Duration::from_millis(GROUP_POLL_MS)).await;
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(topic, partition = p, error = %e, "leadership not settled yet");
                        }
                    }
                }
            }
            if changes.changed().await.is_err() {
                // The group stopped here (its topic went away): look for it again.
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forwarded call whose connection breaks under it (the serving broker vanished, or
    /// a partition dropped the connection) fails here with UNKNOWN "transport error" (a broken pipe or a reset); the
    /// client must get UNAVAILABLE, which it retries, not that final UNKNOWN.
    #[tokio::test]
    async fn a_forwarded_call_whose_connection_breaks_is_relayed_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Reads the start of the call, then closes the connection.
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                drop(socket);
            }
        });
        let channel = rill_cluster::network::PeerTransport::default()
            .connect_lazy(&addr.to_string())
            .expect("channel");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            rill_proto::v1::log_client::LogClient::new(channel)
                .init_producer(rill_proto::v1::InitProducerRequest::default()),
        )
        .await
        .expect("the broken call ends");
        server.abort();
        let status = relayed(answer).expect_err("nothing answered");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// The serving broker's own answers pass unchanged, UNKNOWN included, whatever their
    /// text says.
    #[test]
    fn the_serving_brokers_own_answers_pass_unchanged() {
        for status in [
            tonic::Status::unknown("transport error"),
            tonic::Status::failed_precondition("fenced"),
            tonic::Status::not_found("no such group"),
        ] {
            let code = status.code();
            let relayed = relayed::<()>(Err(status)).expect_err("an error");
            assert_eq!(relayed.code(), code, "{relayed:?}");
        }
        let unavailable =
            relayed::<()>(Err(tonic::Status::cancelled("gone"))).expect_err("an error");
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
    }
}
