//! The write path of a replicated partition: [`Replication::write_acked`] proposes one batch to
//! the partition's Raft group and answers as its [`WriteAck`] asks, a `leader` ack from the
//! leader's own log append at a predicted offset.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::*;

impl Replication {
    /// Replicates one batch to partition `p` of `topic` and waits for its commit, fsynced
    /// on a majority, and its local apply ([`WriteAck::Durable`]); returns its base offset
    /// and record count.
    pub async fn write(&self, topic: &str, p: u32, batch: Bytes) -> Result<(u64, u32), WriteError> {
        self.write_acked(topic, p, batch, WriteAck::Durable).await
    }

    /// Replicates one batch to partition `p` of `topic` and waits for what `ack` asks (see
    /// [`WriteAck`]); returns its base offset and record count.
    pub async fn write_acked(
        &self,
        topic: &str,
        p: u32,
        batch: Bytes,
        ack: WriteAck,
    ) -> Result<(u64, u32), WriteError> {
        let not_leader = |leader: Option<NodeId>| {
            let registry = self.inner.node.registry();
            WriteError::NotLeader {
                topic: topic.to_string(),
                partition: p,
                leader: leader.and_then(|l| {
                    registry
                        .config()
                        .peers
                        .address(l)
                        .map(|a| (l, a.to_string()))
                }),
            }
        };
        let failed = |message: String| WriteError::Failed {
            topic: topic.to_string(),
            partition: p,
            message,
        };
        let Some(group) = self
            .inner
            .groups
            .read()
            .get(&(topic.to_string(), p))
            .copied()
        else {
            // Not a replica here: point at the leader the controller's placement prefers.
            let md = self.inner.node.metadata();
            let preferred = md
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(p as usize))
                .and_then(|m| m.replicas.first().copied());
            return Err(not_leader(preferred));
        };
        let Some(raft) = self.inner.node.host().group(group) else {
            return Err(not_leader(None));
        };
        let timeout = self.inner.write_timeout;
        let timed_out = || WriteError::Timeout {
            topic: topic.to_string(),
            partition: p,
            waited_ms: timeout.as_millis() as u64,
        };
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let command = encode_command(ack, token, &batch);
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
        let applied = match replica {
            Some((store, waiters)) => {
                // Woken when the entry is in this broker's Raft log; the commit goes on.
                let appended = waiters.register(token);
                let outcome = tokio::time::timeout(timeout, async {
                    let mut responder = raft
                        .client_write_ff(command)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    let applied = tokio::select! {
                        log_id = appended => {
                            let base = log_id
                                .ok()
                                .and_then(|l| predicted_base(&store, &waiters, l.index));
                            if let Some(base) = base {
                                return Ok(LeaderAck::Appended(base));
                            }
                            // Applied already (or the log moved on): the apply's answer is
                            // on its way.
                            (&mut responder).await
                        }
                        r = &mut responder => r,
                    };
                    Ok(LeaderAck::Applied(applied))
                })
                .await;
                waiters.cancel(token);
                match outcome.map_err(|_| timed_out())?? {
                    LeaderAck::Appended(base) => {
                        let count = BatchHeader::parse(&batch)
                            .map(|h| h.record_count)
                            .map_err(|e| failed(format!("invalid batch: {e}")))?;
                        return Ok((base, count));
                    }
                    LeaderAck::Applied(r) => r
                        .map_err(|_| failed("the Raft group stopped".into()))?
                        .map_err(|e| match e {
                            openraft::error::ClientWriteError::ForwardToLeader(fwd) => {
                                not_leader(fwd.leader_id)
                            }
                            e => failed(e.to_string()),
                        })?,
                }
            }
            None => match tokio::time::timeout(timeout, raft.client_write(command)).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => {
                    if let Some(fwd) = e.forward_to_leader() {
                        return Err(not_leader(fwd.leader_id));
                    }
                    return Err(failed(e.to_string()));
                }
                Ok(Ok(r)) => r,
            },
        };
        let reply: WriteReply = bincode::deserialize(&applied.data.0)
            .map_err(|e| failed(format!("undecodable apply reply: {e}")))?;
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
/// applied already, or the entries between are no longer all in the log.
fn predicted_base(
    store: &MachineStore<PartitionMachine>,
    waiters: &AppendWaiters,
    index: u64,
) -> Option<u64> {
    let (applied, next_offset) =
        store.read_applied(|m, applied| (applied.map_or(0, |l| l.index), m.next_offset()));
    if applied >= index {
        return None;
    }
    let mut records = 0;
    waiters
        .for_each_between(applied, index, |c| records += command_records(c))
        .then_some(next_offset + records)
}
