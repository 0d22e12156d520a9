//! Where a subscription reads one partition of its topic: [`Source::Local`], this broker's
//! own log (on the blocking pool, as on a single broker), or [`Source::Remote`], a broker
//! that holds the partition, when this one does not (a replication factor 1 topic owned
//! elsewhere, or a topic with fewer replicas than the cluster has brokers).
//!
//! A remote read is the Log service's `Fetch` (and `ListOffsets` for bounds and timestamps)
//! over the peer transport (the cluster token, and TLS when on): a fetch never returns past
//! the high watermark, so only committed records are delivered, and it takes the same
//! record and byte budget as a local read. A call that reaches a broker which names another
//! as the leader (`rill-leader`) follows it; one that finds no broker answering is retried
//! with backoff (backon) against the partition's other replicas until its deadline, and
//! then the partition is paused for [`PAUSE_AFTER_FAILURE_MS`], so a dead broker costs one
//! pass at most that long and other partitions go on being delivered. Waiting for new
//! records remotely is a long-poll fetch ([`Remote::wait_past`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use rill_proto::v1::FetchedRecord;
use rill_storage::PartitionLog;

pub use self::remote::{
    BrokerPeer, Call, Peer, Remote, RemoteError, Remotes, PAUSE_AFTER_FAILURE_MS,
    REMOTE_CALL_DEADLINE_MS, REMOTE_WAIT_MS,
};
use super::read;
use crate::error::BrokerError;
use crate::state::{Broker, TopicState};

mod remote;

/// A partition's first retained offset and its high watermark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// The first offset still retained.
    pub log_start: u64,
    /// The committed end.
    pub high_watermark: u64,
}

/// Where one partition of a subscription's topic is read.
#[derive(Debug, Clone)]
pub enum Source {
    /// This broker's log (single broker, or a replica here).
    Local(PartitionLog),
    /// Another broker's.
    Remote(Remote),
}

impl Source {
    /// Partition `p` of `topic`: local unless this broker is in a cluster and holds no
    /// replica of it. NOT_FOUND for a partition the topic does not have.
    pub fn of(
        broker: &Broker,
        topic: &TopicState,
        p: u32,
        remotes: &Arc<Remotes>,
    ) -> Result<Source, BrokerError> {
        let log = topic.log(p)?;
        let Some(r) = broker.replication() else {
            return Ok(Source::Local(log));
        };
        let hint = match r.check_readable(topic.name(), p) {
            Ok(()) => return Ok(Source::Local(log)),
            Err(rill_cluster::partition::WriteError::NotLeader { leader, .. }) => leader,
            Err(e) => return Err(e.into()),
        };
        let candidates = hint
            .map(|(_, a)| a)
            .into_iter()
            .chain(
                r.replica_addresses(topic.name(), p)
                    .into_iter()
                    .map(|(_, a)| a),
            )
            .collect();
        Ok(Source::Remote(Remote::new(
            Arc::new(BrokerPeer(broker.clone())),
            topic.name(),
            p,
            candidates,
            Arc::clone(remotes),
        )))
    }

    /// The bounds known without a call: a local log's; `None` for a remote partition,
    /// whose reads return them.
    pub fn local_bounds(&self) -> Option<Bounds> {
        match self {
            Source::Local(log) => Some(Bounds {
                log_start: log.log_start_offset(),
                high_watermark: log.high_watermark(),
            }),
            Source::Remote(_) => None,
        }
    }

    /// The bounds now (a call for a remote partition).
    pub async fn bounds(&self) -> Result<Bounds, BrokerError> {
        match self {
            Source::Local(_) => Ok(self.local_bounds().unwrap_or_default()),
            Source::Remote(r) => Ok(r.bounds().await?),
        }
    }

    /// The bounds as last known, without a call: a remote partition's from its last
    /// answer (none before the first).
    pub fn last_bounds(&self) -> Option<Bounds> {
        match self {
            Source::Local(_) => self.local_bounds(),
            Source::Remote(r) => r.cached_bounds(),
        }
    }

    /// The records at `again` (sorted) still held, then up to `new_max` records from `from`
    /// within `budget` bytes, and the bounds seen.
    pub async fn read(
        &self,
        again: Vec<u64>,
        from: u64,
        new_max: usize,
        budget: usize,
    ) -> Result<(Vec<FetchedRecord>, Vec<FetchedRecord>, Bounds), BrokerError> {
        match self {
            Source::Local(log) => {
                let log = log.clone();
                tokio::task::spawn_blocking(move || -> Result<_, BrokerError> {
                    let old = read::read_at(&log, &again)?;
                    let new = if new_max > 0 {
                        read::read_from(&log, from, new_max, budget)?
                    } else {
                        Vec::new()
                    };
                    let bounds = Bounds {
                        log_start: log.log_start_offset(),
                        high_watermark: log.high_watermark(),
                    };
                    Ok((old, new, bounds))
                })
                .await?
            }
            Source::Remote(r) => {
                let old = r.read_at(&again).await?;
                let (new, bounds) = if new_max > 0 {
                    r.read_from(from, new_max, budget).await?
                } else {
                    let b = match r.cached_bounds() {
                        Some(b) => b,
                        None => r.bounds().await?,
                    };
                    (Vec::new(), b)
                };
                Ok((old, new, bounds))
            }
        }
    }

    /// The records at `offsets` (sorted) still held.
    pub async fn read_at(&self, offsets: Vec<u64>) -> Result<Vec<FetchedRecord>, BrokerError> {
        Ok(self.read(offsets, 0, 0, 0).await?.0)
    }

    /// Up to `max_records` records from `from` within `max_bytes` (the first always).
    pub async fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<FetchedRecord>, BrokerError> {
        Ok(self.read(Vec::new(), from, max_records, max_bytes).await?.1)
    }

    /// The first offset whose record is at or after `timestamp_ms`; the high watermark when
    /// every record is older.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<u64, BrokerError> {
        match self {
            Source::Local(log) => {
                let l = log.clone();
                Ok(
                    tokio::task::spawn_blocking(move || l.offset_for_timestamp(timestamp_ms))
                        .await??
                        .unwrap_or_else(|| log.high_watermark()),
                )
            }
            Source::Remote(r) => Ok(r.offset_for_timestamp(timestamp_ms).await?),
        }
    }
}

/// Partition `p` of `topic`'s bounds as known now without waiting: its log's here, or the
/// last answer's of the broker holding it (`None` before one came), for the metrics.
pub fn bounds_now(
    broker: &Broker,
    topic: &TopicState,
    p: u32,
    remotes: &Remotes,
) -> Option<Bounds> {
    let log = topic.log(p).ok()?;
    let held_elsewhere = broker
        .replication()
        .is_some_and(|r| r.check_readable(topic.name(), p).is_err());
    if held_elsewhere {
        return remotes.bounds(topic.name(), p);
    }
    Some(Bounds {
        log_start: log.log_start_offset(),
        high_watermark: log.high_watermark(),
    })
}

/// What wakes a waiting loop (a `Receive`, a push stream, a webhook pusher) when a
/// partition of its topic held by another broker gets records: a long poll there per such
/// partition. Local partitions wake the loop through the topic's watches instead.
///
/// The polls stay open across calls of [`Arrivals::next`] (a loop that wakes for another
/// reason and waits again keeps them): they are made again only after one answered.
pub struct Arrivals {
    broker: Broker,
    sub: Option<Arc<super::Sub>>,
    topic: Arc<TopicState>,
    polls: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Arrivals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arrivals")
            .field("topic", &self.topic.name())
            .field("polling", &self.polls.is_some())
            .finish_non_exhaustive()
    }
}

impl Arrivals {
    /// For subscription `sub` reading `topic`; [`Arrivals::next`] never wakes without a
    /// subscription (a group's push stream uses [`Arrivals::next_past`]).
    pub fn new(broker: &Broker, sub: Option<Arc<super::Sub>>, topic: &Arc<TopicState>) -> Self {
        Arrivals {
            broker: broker.clone(),
            sub,
            topic: Arc::clone(topic),
            polls: None,
        }
    }

    /// Returns once a remote partition holds records past what the subscription has taken
    /// from it and past the end last seen there (so a partition at its in-flight bound does
    /// not wake the loop again and again); never, when every partition is here. Cancel
    /// safe: dropped before it returns, the polls go on for the next call.
    pub async fn next(&mut self) {
        let Some(sub) = self.sub.clone() else {
            return std::future::pending().await;
        };
        let polls = self.polls.get_or_insert_with(|| {
            Box::pin(remote_arrivals(
                self.broker.clone(),
                sub,
                Arc::clone(&self.topic),
            ))
        });
        polls.as_mut().await;
        self.polls = None;
    }

    /// Returns once one of the remote partitions `waits` yields (each with the offset to
    /// wait past) gets records there: for a stream without a subscription (a group's push
    /// stream), which knows its own positions. `waits` is asked only when no polls are open
    /// (they stay open across calls, as in [`Arrivals::next`]); never returns when it is
    /// empty. Cancel safe.
    pub async fn next_past(&mut self, waits: impl FnOnce() -> Vec<(Remote, u64)>) {
        let polls = self
            .polls
            .get_or_insert_with(|| Box::pin(wait_any(waits())));
        polls.as_mut().await;
        self.polls = None;
    }
}

/// Returns once one of `waits` has records past its offset; never when there is none.
async fn wait_any(waits: Vec<(Remote, u64)>) {
    let mut polls = tokio::task::JoinSet::new();
    for (r, from) in waits {
        polls.spawn(async move { r.wait_past(from).await });
    }
    if polls.is_empty() {
        return std::future::pending().await;
    }
    // Dropping the set (the loop ended) ends the other polls.
    let _ = polls.join_next().await;
}

async fn remote_arrivals(broker: Broker, sub: Arc<super::Sub>, topic: Arc<TopicState>) {
    if broker.replication().is_none() {
        return std::future::pending().await;
    }
    let nexts: BTreeMap<u32, u64> = {
        let st = sub.state.lock().await;
        st.partitions.iter().map(|(p, ps)| (*p, ps.next)).collect()
    };
    let mut waits = Vec::new();
    for p in 0..topic.topic.partition_count() {
        let Ok(Source::Remote(r)) = Source::of(&broker, &topic, p, &sub.remotes) else {
            continue;
        };
        let seen = r.cached_bounds().map_or(0, |b| b.high_watermark);
        let from = nexts.get(&p).copied().unwrap_or(0).max(seen);
        waits.push((r, from));
    }
    wait_any(waits).await;
}
