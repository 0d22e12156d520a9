//! The write path of a replicated partition, in two steps: [`Replication::submit`] hands one
//! batch to the partition's Raft group (openraft appends client writes to the leader's log in
//! the order they are handed over, so callers that submit in turn get that order in the log),
//! and [`Submitted::acked`] waits for what its [`WriteAck`] asks, a `leader` ack from the
//! leader's own log append at a predicted offset. [`Replication::write_acked`] does both.
//!
//! An idempotent producer's batch that reaches the leader before its predecessor waits in
//! the submit step, bounded, for its turn (see `proposed`).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use openraft::raft::ClientWriteResult;
use rill_storage::log::now_ms;
use rill_storage::producers::ProducerClock;
use tokio::sync::oneshot;

use super::proposed::{Batch, Next};
use super::*;

impl Replication {
    /// Replicates one batch to partition `p` of `topic` and waits for its commit, fsynced
    /// on a majority, and its local apply ([`WriteAck::Durable`]); returns its base offset
    /// and record count.
    pub async fn write(&self, topic: &str, p: u32, batch: Bytes) -> Result<(u64, u32), WriteError> {
        self.write_acked(topic, p, batch, WriteAck::Durable).await
    }

    /// Replicates one batch to partition `p` of `topic` and waits for what `ack` asks (see
    /// [`WriteAck`]); returns its base offset and record count. An idempotent batch is not
    /// held back for its predecessor ([`Replication::submit`] with no wait).
    pub async fn write_acked(
        &self,
        topic: &str,
        p: u32,
        batch: Bytes,
        ack: WriteAck,
    ) -> Result<(u64, u32), WriteError> {
        self.submit(topic, p, batch, ack, Duration::ZERO)
            .await?
            .acked()
            .await
    }

    /// Whether this broker leads partition `p` of `topic` now, as its group's metrics say;
    /// otherwise the same [`WriteError::NotLeader`] a write there fails with, naming the
    /// leader this broker knows (or, when it holds no replica, the one the controller's
    /// placement prefers). A leadership that changes right after is found by the write.
    pub fn check_leads(&self, topic: &str, p: u32) -> Result<(), WriteError> {
        let target = Target {
            replication: self.clone(),
            topic: topic.to_string(),
            partition: p,
        };
        match self.group(topic, p) {
            Some(raft) => {
                let leader = raft.metrics().borrow().current_leader;
                if leader == Some(self.node_id()) {
                    Ok(())
                } else {
                    Err(target.not_leader(leader))
                }
            }
            None => Err(target.not_leader(self.preferred_leader(topic, p))),
        }
    }

    /// The leader the controller's placement prefers for partition `p` of `topic` (its first
    /// replica), for a broker that holds no replica of it.
    fn preferred_leader(&self, topic: &str, p: u32) -> Option<NodeId> {
        let md = self.inner.node.metadata();
        md.topics
            .get(topic)
            .and_then(|t| t.partitions.get(p as usize))
            .and_then(|m| m.replicas.first().copied())
    }

    /// Hands one batch to partition `p`'s Raft group, which this broker must lead: its
    /// entry follows every batch submitted to the group before this call returned. An
    /// idempotent producer's batch whose sequence is ahead of the one its producer's last
    /// batch proposed here left (or, without one, of the partition's applied state) first
    /// waits up to `early_wait` for the batches before it; a retry, a stale epoch or a batch
    /// still early after the wait goes on at once, for the apply to answer. Wait for the
    /// outcome with [`Submitted::acked`].
    pub async fn submit(
        &self,
        topic: &str,
        p: u32,
        batch: Bytes,
        ack: WriteAck,
        early_wait: Duration,
    ) -> Result<Submitted, WriteError> {
        let target = Target {
            replication: self.clone(),
            topic: topic.to_string(),
            partition: p,
        };
        let Some(group) = self
            .inner
            .groups
            .read()
            .get(&(topic.to_string(), p))
            .copied()
        else {
            // Not a replica here: point at the leader the controller's placement prefers.
            return Err(target.not_leader(self.preferred_leader(topic, p)));
        };
        let Some(raft) = self.inner.node.host().group(group) else {
            return Err(target.not_leader(None));
        };
        let header = BatchHeader::parse(&batch).ok();
        let producer = header.filter(|h| h.producer_id >= 0).map(|h| Batch {
            producer_id: h.producer_id,
            epoch: h.producer_epoch,
            base_sequence: h.base_sequence,
            record_count: h.record_count,
        });
        // The local log, for an idempotent batch only: its producer state orders the batch,
        // and its expiry goes with this leader's clock into the entry, which decides the
        // producer's expiry on every replica (docs/REPLICATION.md, "Producer expiry goes by
        // the leader's clock").
        let log = producer
            .as_ref()
            .and_then(|_| self.inner.local.partition(topic, p));
        let expiry_ms = log.as_ref().map(|log| log.options().producer_expiry_ms);
        let propose = || self.hand_over(&raft, group, ack, expiry_ms, &batch);
        let (responder, leader_ack) = match &producer {
            None => propose().await,
            Some(b) => {
                let applied = || {
                    log.as_ref()
                        .and_then(|log| log.producer_next_sequence(b.producer_id))
                        .map(|(epoch, sequence)| Next { epoch, sequence })
                };
                self.inner
                    .proposed
                    .group(group)
                    .propose_in_turn(
                        raft.metrics(),
                        self.node_id(),
                        b,
                        applied,
                        early_wait,
                        propose,
                    )
                    .await
            }
        }
        .map_err(|e| target.failed(e.to_string()))?;
        Ok(Submitted {
            target,
            group,
            producer: producer.map(|b| b.producer_id),
            record_count: header.map(|h| h.record_count),
            responder,
            leader_ack,
            deadline: tokio::time::Instant::now() + self.inner.write_timeout,
        })
    }

    /// Hands `batch` to `raft` (an unbounded queue into openraft's core: it returns at
    /// once). A `leader` ack, unless the log is far ahead of its applied index, also waits
    /// for the entry's append to this broker's log. With `expiry_ms` (an idempotent batch),
    /// the entry carries this broker's clock at this moment and that expiry's cutoff.
    async fn hand_over(
        &self,
        raft: &Raft,
        group: GroupId,
        ack: WriteAck,
        expiry_ms: Option<u64>,
        batch: &Bytes,
    ) -> Result<(Responder, Option<LeaderAckWait>), openraft::error::Fatal<NodeId>> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let clock = expiry_ms.map(|expiry_ms| ProducerClock::at(now_ms(), expiry_ms));
        let command = encode_command(ack, token, clock, batch);
        // Backpressure: a `leader` ack waits for the commit, as `quorum`, while the leader's
        // log is far ahead of its applied index; otherwise a fast producer would pile up
        // entries that no follower can take within one AppendEntries timeout.
        let far_ahead = {
            let m = raft.metrics();
            let m = m.borrow();
            m.last_log_index
                .unwrap_or(0)
                .saturating_sub(m.last_applied.map_or(0, |l| l.index))
                > LEADER_ACK_MAX_UNAPPLIED
        };
        let replica = if ack == WriteAck::Leader && !far_ahead {
            self.inner.replicas.read().get(&group).cloned()
        } else {
            None
        };
        // Registered before the hand-over: the append may come at once.
        let leader_ack = replica.map(|(store, waiters)| {
            let appended = waiters.register(token);
            LeaderAckWait {
                store,
                waiters,
                token,
                appended,
            }
        });
        let responder = raft.client_write_ff(command).await?;
        Ok((responder, leader_ack))
    }
}

/// The answer openraft sends for one client write.
type Responder = oneshot::Receiver<ClientWriteResult<crate::types::TypeConfig>>;

/// A `leader` ack's wait for its entry's append to this broker's log; dropped, it stops
/// waiting (whatever way the write ended).
struct LeaderAckWait {
    store: MachineStore<PartitionMachine>,
    waiters: AppendWaiters,
    token: u64,
    appended: oneshot::Receiver<LogId>,
}

impl Drop for LeaderAckWait {
    fn drop(&mut self) {
        self.waiters.cancel(self.token);
    }
}

/// The partition a write is for, to name it in errors.
struct Target {
    replication: Replication,
    topic: String,
    partition: u32,
}

impl Target {
    fn not_leader(&self, leader: Option<NodeId>) -> WriteError {
        let registry = self.replication.inner.node.registry();
        WriteError::NotLeader {
            topic: self.topic.clone(),
            partition: self.partition,
            leader: leader.and_then(|l| {
                registry
                    .config()
                    .peers
                    .address(l)
                    .map(|a| (l, a.to_string()))
            }),
        }
    }

    fn failed(&self, message: String) -> WriteError {
        WriteError::Failed {
            topic: self.topic.clone(),
            partition: self.partition,
            message,
        }
    }

    fn timed_out(&self) -> WriteError {
        WriteError::Timeout {
            topic: self.topic.clone(),
            partition: self.partition,
            waited_ms: self.replication.inner.write_timeout.as_millis() as u64,
        }
    }
}

/// A batch handed to its partition's Raft group ([`Replication::submit`]); its outcome comes
/// with [`Submitted::acked`]. Dropped unawaited, the write goes on and nobody is answered.
pub struct Submitted {
    target: Target,
    group: GroupId,
    /// The batch's idempotent producer, whose ordering hint a failure clears.
    producer: Option<i64>,
    /// The batch's record count (none: the batch is not parseable; the apply refuses it).
    record_count: Option<u32>,
    responder: Responder,
    leader_ack: Option<LeaderAckWait>,
    deadline: tokio::time::Instant,
}

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted")
            .field("topic", &self.target.topic)
            .field("partition", &self.target.partition)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Submitted {
    /// Waits for what the write's [`WriteAck`] asks; returns its base offset and record
    /// count. A failure (not the leader, no commit in time, refused) also clears the
    /// producer's ordering hint, so its next batches do not wait on a proposal that failed.
    pub async fn acked(self) -> Result<(u64, u32), WriteError> {
        let (replication, group, producer) =
            (self.target.replication.clone(), self.group, self.producer);
        let result = self.outcome().await;
        if let (Err(_), Some(producer_id)) = (&result, producer) {
            replication
                .inner
                .proposed
                .group(group)
                .forget(producer_id)
                .await;
        }
        result
    }

    async fn outcome(self) -> Result<(u64, u32), WriteError> {
        let Submitted {
            target,
            record_count,
            mut responder,
            leader_ack,
            deadline,
            ..
        } = self;
        let applied = match leader_ack {
            Some(mut wait) => {
                // Woken when the entry is in this broker's Raft log; the commit goes on.
                let outcome = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        log_id = &mut wait.appended => {
                            let base = log_id.ok().and_then(|l| {
                                predicted_base(&wait.store, &wait.waiters, l.index)
                            });
                            if let Some(base) = base {
                                return LeaderAck::Appended(base);
                            }
                            // Applied already (or the log moved on): the apply's answer is
                            // on its way.
                            LeaderAck::Applied((&mut responder).await)
                        }
                        r = &mut responder => LeaderAck::Applied(r),
                    }
                })
                .await;
                drop(wait);
                match outcome.map_err(|_| target.timed_out())? {
                    LeaderAck::Appended(base) => {
                        let count =
                            record_count.ok_or_else(|| target.failed("invalid batch".into()))?;
                        return Ok((base, count));
                    }
                    LeaderAck::Applied(r) => r,
                }
            }
            None => tokio::time::timeout_at(deadline, responder)
                .await
                .map_err(|_| target.timed_out())?,
        };
        let applied = applied
            .map_err(|_| target.failed("the Raft group stopped".into()))?
            .map_err(|e| match e {
                openraft::error::ClientWriteError::ForwardToLeader(fwd) => {
                    target.not_leader(fwd.leader_id)
                }
                e => target.failed(e.to_string()),
            })?;
        let reply: WriteReply = bincode::deserialize(&applied.data.0)
            .map_err(|e| target.failed(format!("undecodable apply reply: {e}")))?;
        reply.map_err(WriteError::Refused)
    }
}

/// How a `leader` ack ended: the entry is in the leader's log with this predicted base
/// offset, or the apply answered first.
enum LeaderAck<R> {
    Appended(u64),
    Applied(R),
}

/// The base offset the apply will give the entry at `index` of this replica's Raft log if it
/// commits: the applied end plus the records of the entries between. `None` if the entry is
/// applied already, the entries between are no longer all in the log, or the applied end is
/// not known exactly yet (see [`PartitionMachine::exact_next_offset`]).
fn predicted_base(
    store: &MachineStore<PartitionMachine>,
    waiters: &AppendWaiters,
    index: u64,
) -> Option<u64> {
    let (applied, next_offset) =
        store.read_applied(|m, applied| (applied.map_or(0, |l| l.index), m.exact_next_offset()));
    if applied >= index {
        return None;
    }
    let next_offset = next_offset?;
    let mut records = 0;
    waiters
        .for_each_between(applied, index, |c| records += command_records(c))
        .then_some(next_offset + records)
}
