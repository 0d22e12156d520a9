//! The leader's hint of each idempotent producer's next sequence, per partition group, so a
//! batch that reached the leader before its predecessor waits for it instead of being
//! proposed, refused by the apply and resent.
//!
//! A producer with several batches in flight sends them in order, but separate calls can
//! reach the leader in another order. On one broker the partition's own check holds an early
//! batch back (the broker's `EARLY_BATCH_WAIT_MS`); on a replicated partition that check runs
//! at the apply, after the Raft commit, where a refusal has cost an entry on every replica and
//! the producer's resend another. So the leader keeps, per producer, the sequence after the
//! last batch it proposed in turn, and a batch ahead of it waits (bounded) until it is its
//! turn.
//!
//! Only a hint: it is leader-local, in memory, cleared when the term or the leadership
//! changes, and when a proposal fails. The apply's check stays the only authority; a wrong
//! hint costs a wait or a refusal, never a misplaced record. With no entry in the map the
//! partition's applied state (what the leader's own log expects next) stands in, so a fresh
//! leader or a new producer is ordered too; while entries are in flight that state lags, so a
//! waiter also looks again after each apply.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use rill_storage::producers::advance;
use tokio::sync::Notify;

use crate::types::{GroupId, Node, NodeId};

/// A group's Raft metrics, as `Raft::metrics` watches them (a plain watch: unit tests make
/// their own without a group).
pub(super) type Metrics = tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, Node>>;

/// How many producers a group's map holds before it is cleared: it is only a hint, and a
/// leader that lives long sees producers come and go.
const MAX_PRODUCERS_PER_GROUP: usize = 4_096;

/// A producer's epoch and the sequence its next batch starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Next {
    /// The producer's epoch.
    pub epoch: i16,
    /// The next batch's base sequence.
    pub sequence: i32,
}

/// The producer fields of a batch about to be proposed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batch {
    /// The producer id (>= 0).
    pub producer_id: i64,
    /// Its epoch.
    pub epoch: i16,
    /// The batch's base sequence.
    pub base_sequence: i32,
    /// Its record count.
    pub record_count: u32,
}

/// Where a batch stands against the sequence expected next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// It starts at the expected sequence.
    Now,
    /// It is ahead of it (by less than half the sequence space): an earlier batch of its
    /// producer may be on its way.
    Early,
    /// Behind it (a retry), or of an older epoch: the apply answers it.
    Other,
}

/// The further of two views of a producer's next sequence: the newer epoch, or in the same
/// epoch the sequence ahead (wrapping at `i32::MAX`).
pub(super) fn furthest(a: Option<Next>, b: Option<Next>) -> Option<Next> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.epoch != a.epoch {
            if b.epoch > a.epoch {
                b
            } else {
                a
            }
        } else if ahead(b.sequence, a.sequence) {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}

/// Whether sequence `s` is ahead of `of` by less than half the sequence space.
fn ahead(s: i32, of: i32) -> bool {
    let by = (i64::from(s) - i64::from(of)).rem_euclid(1 << 31);
    by > 0 && by < 1 << 30
}

/// Where `batch` stands against `expected` (none: a new producer, which starts at 0; a newer
/// epoch starts at 0 too).
pub(super) fn turn(expected: Option<Next>, batch: &Batch) -> Turn {
    let next = match expected {
        Some(e) if batch.epoch < e.epoch => return Turn::Other,
        Some(e) if batch.epoch == e.epoch => e.sequence,
        _ => 0,
    };
    if batch.base_sequence == next {
        Turn::Now
    } else if ahead(batch.base_sequence, next) {
        Turn::Early
    } else {
        Turn::Other
    }
}

/// Every group's map on this broker. Cheap to share.
#[derive(Default)]
pub(super) struct ProposedSequences {
    groups: Mutex<HashMap<GroupId, Arc<GroupSequences>>>,
}

impl ProposedSequences {
    /// Group `group`'s map.
    pub fn group(&self, group: GroupId) -> Arc<GroupSequences> {
        self.groups.lock().entry(group).or_default().clone()
    }
}

/// One group's map, and the wake-up of its waiters.
#[derive(Default)]
pub(super) struct GroupSequences {
    /// Held from a batch's check through its hand-over to openraft, so the order of
    /// hand-overs is the order the checks allowed.
    state: tokio::sync::Mutex<State>,
    /// Woken after each proposal and each cleared entry.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// The term the entries were proposed in (0: none).
    term: u64,
    next: HashMap<i64, Next>,
}

impl GroupSequences {
    /// Runs `propose` (the hand-over of `batch` to the group whose Raft `metrics` are
    /// watched) when it is the batch's turn: at once when it starts at its producer's next
    /// sequence (or is behind it, or this broker does not lead the group), else once the
    /// batches before it are proposed or applied, or `wait` is over. `applied` reads the
    /// partition's applied state of the producer.
    pub async fn propose_in_turn<T, E, Fut>(
        &self,
        mut metrics: Metrics,
        me: NodeId,
        batch: &Batch,
        applied: impl Fn() -> Option<Next>,
        wait: Duration,
        propose: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        let mut may_wait = !wait.is_zero();
        loop {
            let mut state = self.state.lock().await;
            let term = {
                let m = metrics.borrow_and_update();
                (m.state == ServerState::Leader && m.current_leader == Some(me))
                    .then_some(m.current_term)
            };
            let Some(term) = term else {
                // Not the leader (as far as this broker knows): no hint; openraft answers.
                state.next.clear();
                state.term = 0;
                drop(state);
                return propose().await;
            };
            if term != state.term {
                // What was proposed in another term may be gone: start over.
                state.next.clear();
                state.term = term;
            }
            let expected = furthest(state.next.get(&batch.producer_id).copied(), applied());
            let turn = turn(expected, batch);
            if turn == Turn::Early && may_wait {
                // Registered before the lock is let go: a proposal right after is not missed.
                let changed = self.changed.notified();
                drop(state);
                tokio::select! {
                    _ = changed => {}
                    // An apply moved the applied state on (or the leadership changed).
                    r = metrics.changed() => may_wait = r.is_ok(),
                    _ = tokio::time::sleep_until(deadline) => may_wait = false,
                }
                continue;
            }
            let proposed = propose().await;
            match (&proposed, turn) {
                (Ok(_), Turn::Now) => {
                    if state.next.len() >= MAX_PRODUCERS_PER_GROUP {
                        state.next.clear();
                    }
                    state.next.insert(
                        batch.producer_id,
                        Next {
                            epoch: batch.epoch,
                            sequence: advance(batch.base_sequence, batch.record_count),
                        },
                    );
                }
                // A retry changes nothing; an early batch proposed after the wait is likely
                // refused, and after its refusal the map knows no better than the apply.
                (Ok(_), Turn::Other) => {}
                (_, _) => {
                    state.next.remove(&batch.producer_id);
                }
            }
            drop(state);
            self.changed.notify_waiters();
            return proposed;
        }
    }

    /// Forgets `producer_id`'s entry after one of its proposals failed (not the leader, no
    /// commit in time, refused by the apply): the next batch falls back to the applied
    /// state, and waiters look again.
    pub async fn forget(&self, producer_id: i64) {
        self.state.lock().await.next.remove(&producer_id);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(epoch: i16, sequence: i32) -> Option<Next> {
        Some(Next { epoch, sequence })
    }

    fn batch(epoch: i16, base_sequence: i32) -> Batch {
        Batch {
            producer_id: 1,
            epoch,
            base_sequence,
            record_count: 2,
        }
    }

    /// Catches an early batch taken for a retry (or the reverse), across the wrap and epochs.
    #[test]
    fn a_batch_is_in_turn_early_or_neither() {
        assert_eq!(turn(None, &batch(0, 0)), Turn::Now, "a new producer");
        assert_eq!(turn(None, &batch(0, 4)), Turn::Early);
        assert_eq!(turn(next(0, 4), &batch(0, 4)), Turn::Now);
        assert_eq!(turn(next(0, 4), &batch(0, 6)), Turn::Early);
        assert_eq!(turn(next(0, 4), &batch(0, 2)), Turn::Other, "a retry");
        assert_eq!(turn(next(0, i32::MAX - 1), &batch(0, 1)), Turn::Early);
        assert_eq!(turn(next(0, 1), &batch(0, i32::MAX - 1)), Turn::Other);
        assert_eq!(turn(next(3, 4), &batch(2, 4)), Turn::Other, "stale epoch");
        assert_eq!(turn(next(3, 4), &batch(4, 0)), Turn::Now, "new epoch");
        assert_eq!(turn(next(3, 4), &batch(4, 4)), Turn::Early);
    }

    /// Catches a map that trusts a lagging view: the further of the proposed and the
    /// applied state wins.
    #[test]
    fn the_further_view_wins() {
        assert_eq!(furthest(next(0, 4), None), next(0, 4));
        assert_eq!(furthest(None, next(0, 4)), next(0, 4));
        assert_eq!(furthest(next(0, 4), next(0, 8)), next(0, 8));
        assert_eq!(furthest(next(0, 8), next(0, 4)), next(0, 8));
        assert_eq!(furthest(next(1, 0), next(0, 8)), next(1, 0));
        assert_eq!(furthest(next(0, i32::MAX), next(0, 3)), next(0, 3));
    }

    /// Node 1's metrics as the leader of term 1. The sender is returned to be kept: with it
    /// dropped, a waiter's `changed()` fails at once and it stops waiting.
    fn leading() -> (
        tokio::sync::watch::Sender<openraft::RaftMetrics<NodeId, Node>>,
        Metrics,
    ) {
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        m.current_term = 1;
        tokio::sync::watch::channel(m)
    }

    /// The hint's entry for producer 1.
    async fn entry(seqs: &GroupSequences) -> Option<Next> {
        seqs.state.lock().await.next.get(&1).copied()
    }

    /// Catches a failed proposal leaving its producer's entry in the hint: the map would
    /// stay ahead of what the partition will hold, so the producer's next batches are
    /// judged against a proposal that never lands (today bounded only by the early wait).
    /// Covers both clearings: a hand-over that fails, and `forget` after a failed commit.
    #[tokio::test]
    async fn a_failed_proposal_clears_its_producers_entry() {
        let (_keep, metrics) = leading();
        let seqs = GroupSequences::default();
        let ok = || async { Ok::<(), ()>(()) };
        let failed = || async { Err::<(), ()>(()) };

        let proposed = seqs
            .propose_in_turn(
                metrics.clone(),
                1,
                &batch(0, 0),
                || None,
                Duration::ZERO,
                ok,
            )
            .await;
        assert_eq!(proposed, Ok(()));
        assert_eq!(
            entry(&seqs).await,
            next(0, 2),
            "a proposal in turn is noted"
        );
        let refused = seqs
            .propose_in_turn(
                metrics.clone(),
                1,
                &batch(0, 2),
                || None,
                Duration::ZERO,
                failed,
            )
            .await;
        assert_eq!(refused, Err(()));
        assert_eq!(
            entry(&seqs).await,
            None,
            "a failed hand-over clears the entry"
        );

        let proposed = seqs
            .propose_in_turn(metrics, 1, &batch(0, 0), || None, Duration::ZERO, ok)
            .await;
        assert_eq!(proposed, Ok(()));
        assert_eq!(entry(&seqs).await, next(0, 2));
        // The batch was handed over, then its commit failed (the write's `acked`).
        seqs.forget(1).await;
        assert_eq!(entry(&seqs).await, None, "a failed commit clears the entry");
    }

    /// Catches `forget` not waking waiters: an early batch waiting for its turn must look
    /// again when an entry is cleared, not sit out its wait (60 s here; the test allows 10).
    #[tokio::test]
    async fn forget_wakes_a_waiting_batch() {
        let (_keep, metrics) = leading();
        let seqs = GroupSequences::default();
        let applied = Mutex::new(next(0, 2));
        let early = batch(0, 4);
        let waiter = seqs.propose_in_turn(
            metrics,
            1,
            &early,
            || *applied.lock(),
            Duration::from_secs(60),
            || async { Ok::<(), ()>(()) },
        );
        let wake = async {
            // Let the waiter find its batch early and wait; then the batch before it lands
            // (no wake-up of its own here) and a failed write's `forget` follows.
            tokio::task::yield_now().await;
            *applied.lock() = next(0, 4);
            seqs.forget(1).await;
        };
        let (proposed, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(waiter, wake)
        })
        .await
        .expect("the waiting batch is proposed once woken, not after its 60 s wait");
        assert_eq!(proposed, Ok(()));
    }
}
