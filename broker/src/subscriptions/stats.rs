//! What the metrics export per subscription: delivery outcomes counted as calls complete
//! (relaxed atomics, bumped only after the change is stored, so a failed call counts
//! nothing), and backlog and in-flight figures read from the state at scrape time.
//!
//! The scrape is synchronous and the state sits behind an async lock that calls hold while
//! they read the log and store changes, so the scrape only *tries* the lock: a subscription
//! busy at that instant is left out of that scrape's gauges (its counters are always there).
//!
//! The age of the oldest record not done needs that record's timestamp, which the state does
//! not keep: the background sweep ([`Subscriptions::refresh_oldest`]) reads it from the log
//! when a partition's floor has moved and keeps it in memory, so the scrape reads no disk.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rill_storage::log::now_ms;

use super::source::{self, Source};
use super::state::{AckKind, PartitionState};
use super::Subscriptions;
use crate::state::Broker;

/// One subscription's outcome counters since the broker started, and the timestamp of the
/// first record not done in each partition.
#[derive(Debug, Default)]
pub struct Counters {
    acked: AtomicU64,
    nacked: AtomicU64,
    rejected: AtomicU64,
    expired: AtomicU64,
    dead_lettered: AtomicU64,
    /// Partition → (the floor when read, that record's timestamp in ms). A plain lock:
    /// never held across an await. Absent for a partition with nothing left to do.
    oldest: Mutex<BTreeMap<u32, (u64, i64)>>,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Records acknowledged.
    pub acked: u64,
    /// Records nacked (released for redelivery).
    pub nacked: u64,
    /// Records rejected (sent to leave at once).
    pub rejected: u64,
    /// Locks that ended without an acknowledgement.
    pub expired: u64,
    /// Records that left without an ack: to the dead-letter topic, or archived without one.
    pub dead_lettered: u64,
}

impl Outcomes {
    /// The delivery outcomes with their label values: `acked`, `nacked`, `rejected`,
    /// `expired`.
    pub fn by_outcome(&self) -> [(&'static str, u64); 4] {
        [
            ("acked", self.acked),
            ("nacked", self.nacked),
            ("rejected", self.rejected),
            ("expired", self.expired),
        ]
    }
}

impl Counters {
    /// Counts an acknowledgement of `kind` applied to `records` records (extensions are not
    /// an outcome).
    pub fn acknowledged(&self, kind: AckKind, records: u64) {
        let counter = match kind {
            AckKind::Ack => &self.acked,
            AckKind::Nack { .. } => &self.nacked,
            AckKind::Reject => &self.rejected,
            AckKind::Extend => return,
        };
        counter.fetch_add(records, Ordering::Relaxed);
    }

    /// Counts `expired` locks ended and `left` records gone without an ack.
    pub fn settled(&self, expired: u64, left: u64) {
        if expired > 0 {
            self.expired.fetch_add(expired, Ordering::Relaxed);
        }
        if left > 0 {
            self.dead_lettered.fetch_add(left, Ordering::Relaxed);
        }
    }

    /// The counts now.
    pub fn get(&self) -> Outcomes {
        Outcomes {
            acked: self.acked.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

/// Locks in `partitions` that ended before `now_ms` (what `expire` is about to release).
pub(super) fn expiring(partitions: &BTreeMap<u32, PartitionState>, now_ms: i64) -> u64 {
    partitions
        .values()
        .flat_map(|ps| ps.pending.values())
        .filter(|p| p.lock.as_ref().is_some_and(|l| l.deadline_ms < now_ms))
        .count() as u64
}

/// The remote read failures of group push streams (`Subscribe` with a group target), by
/// group: one shared count per group, added to by each of its streams' reads of partitions
/// held by other brokers (see [`source::Remotes::counting_into`]).
///
/// A group is kept while a stream of it runs, and for good once it has failed (a counter
/// must not go back to 0 while the broker runs); so the groups kept are those streaming
/// here now plus those that ever failed, not every name a client tried.
#[derive(Debug, Default)]
pub struct GroupPushFailures {
    /// A plain lock: never held across an await.
    by_group: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl GroupPushFailures {
    /// The count a new push stream of `group` adds to. Drops the groups that no stream
    /// holds any more and that never failed.
    pub fn counter(&self, group: &str) -> Arc<AtomicU64> {
        let mut by_group = self.by_group.lock();
        // Only the map holds a count no stream uses.
        by_group.retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Relaxed) > 0);
        Arc::clone(by_group.entry(group.to_string()).or_default())
    }

    /// Each group's failures, sorted by group.
    pub fn by_group(&self) -> Vec<(String, u64)> {
        self.by_group
            .lock()
            .iter()
            .map(|(g, c)| (g.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One subscription's figures for a scrape.
#[derive(Debug, Clone)]
pub struct SubscriptionFigures {
    /// The subscription.
    pub name: String,
    /// Records not done, over its partitions, and records locked now; `None` when the
    /// state was busy during this scrape.
    pub backlog_and_in_flight: Option<(u64, u64)>,
    /// Outcome counters.
    pub outcomes: Outcomes,
    /// Calls to brokers holding its partitions that failed after their retries.
    pub remote_failures: u64,
    /// Age in ms of the oldest record not done (0 with none); `None` when the state was busy
    /// or a partition with records left has not been read by the sweep yet.
    pub oldest_unacked_age_ms: Option<u64>,
}

impl Subscriptions {
    /// The group push streams' remote read failures.
    pub fn group_push_failures(&self) -> &GroupPushFailures {
        &self.inner.group_push_failures
    }

    /// Every subscription's figures now, sorted by name. Never waits: reads only memory
    /// (the state, and each partition's high watermark).
    pub fn figures(&self, broker: &Broker) -> Vec<SubscriptionFigures> {
        let subs: Vec<_> = self.inner.subs.read().values().cloned().collect();
        let now = now_ms();
        subs.iter()
            .map(|sub| {
                let oldest = sub.counters.oldest.lock().clone();
                let gauges = broker.topic(&sub.config.topic).ok().and_then(|topic| {
                    let st = sub.state.try_lock().ok()?;
                    let mut backlog = 0u64;
                    let mut in_flight = 0u64;
                    // The oldest timestamp over partitions with records left; `None` inside
                    // once one of them has not been read yet.
                    let mut oldest_ms: Option<Option<i64>> = None;
                    for p in 0..topic.topic.partition_count() {
                        // A fenced partition has no high watermark, and one held by another
                        // broker none before its first answer: nothing to add.
                        let Some(bounds) = source::bounds_now(broker, &topic, p, &sub.remotes)
                        else {
                            continue;
                        };
                        let (start, hwm) = (bounds.log_start, bounds.high_watermark);
                        let left = match st.partitions.get(&p) {
                            // As Describe: records below the log start are gone, so done.
                            Some(ps) if ps.floor < start => {
                                let mut ps = ps.clone();
                                ps.clamp_to_log_start(start);
                                in_flight += ps.in_flight(now);
                                ps.backlog(hwm)
                            }
                            Some(ps) => {
                                in_flight += ps.in_flight(now);
                                ps.backlog(hwm)
                            }
                            None => hwm.saturating_sub(start),
                        };
                        backlog += left;
                        if left > 0 {
                            let ts = oldest.get(&p).map(|(_, ts)| *ts);
                            oldest_ms = Some(match (oldest_ms, ts) {
                                (Some(Some(a)), Some(b)) => Some(a.min(b)),
                                (None, b) => b,
                                _ => None,
                            });
                        }
                    }
                    let age = match oldest_ms {
                        None => Some(0),
                        Some(ts) => ts.map(|ts| u64::try_from(now - ts).unwrap_or(0)),
                    };
                    Some(((backlog, in_flight), age))
                });
                SubscriptionFigures {
                    name: sub.name.clone(),
                    backlog_and_in_flight: gauges.map(|g| g.0),
                    outcomes: sub.counters.get(),
                    remote_failures: sub.remotes.failures(),
                    oldest_unacked_age_ms: gauges.and_then(|g| g.1),
                }
            })
            .collect()
    }
}

impl Subscriptions {
    /// Reads, for each partition of each subscription whose floor moved since the last
    /// call, the timestamp of its first record not done (one record read, on the blocking
    /// pool), for [`Subscriptions::figures`]. Called by the background sweep.
    pub async fn refresh_oldest(&self, broker: &Broker) {
        let subs: Vec<_> = self.inner.subs.read().values().cloned().collect();
        for sub in subs {
            let Ok(topic) = broker.topic(&sub.config.topic) else {
                continue;
            };
            // Waiting here delays only the background loop, never a call.
            let floors: Vec<(u32, u64)> = {
                let st = sub.state.lock().await;
                st.partitions.iter().map(|(p, ps)| (*p, ps.floor)).collect()
            };
            let mut reads = Vec::new();
            {
                let mut oldest = sub.counters.oldest.lock();
                for p in 0..topic.topic.partition_count() {
                    let Some(bounds) = source::bounds_now(broker, &topic, p, &sub.remotes) else {
                        continue;
                    };
                    let start = bounds.log_start;
                    let floor = floors
                        .iter()
                        .find(|(q, _)| *q == p)
                        .map_or(start, |(_, f)| *f)
                        .max(start);
                    if floor >= bounds.high_watermark {
                        oldest.remove(&p);
                    } else if oldest.get(&p).map(|(at, _)| *at) != Some(floor) {
                        reads.push((p, floor));
                    }
                }
            }
            for (p, floor) in reads {
                // One record, from this broker's log or the broker holding the partition.
                let Ok(source) = Source::of(broker, &topic, p, &sub.remotes) else {
                    continue;
                };
                let Ok(first) = source.read_from(floor, 1, 1).await else {
                    continue;
                };
                if let Some(r) = first.first() {
                    sub.counters
                        .oldest
                        .lock()
                        .insert(p, (floor, r.timestamp_ms));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::state::{Lock, Pending};

    #[test]
    fn each_ack_kind_counts_under_its_outcome_and_extend_under_none() {
        let c = Counters::default();
        c.acknowledged(AckKind::Ack, 3);
        c.acknowledged(AckKind::Nack { delay_ms: 10 }, 2);
        c.acknowledged(AckKind::Reject, 1);
        c.acknowledged(AckKind::Extend, 7);
        c.settled(4, 5);
        c.settled(0, 0);
        assert_eq!(
            c.get(),
            Outcomes {
                acked: 3,
                nacked: 2,
                rejected: 1,
                expired: 4,
                dead_lettered: 5,
            }
        );
    }

    #[test]
    fn a_group_push_count_is_kept_while_streamed_or_once_it_failed() {
        let f = GroupPushFailures::default();
        let a = f.counter("a");
        let b = f.counter("b");
        a.fetch_add(2, Ordering::Relaxed);
        let a_again = f.counter("a");
        a_again.fetch_add(1, Ordering::Relaxed);
        assert_eq!(f.by_group(), vec![("a".into(), 3), ("b".into(), 0)]);
        drop((a, a_again, b));
        // A later stream's start drops "b" (no stream, never failed); "a" stays at 3.
        let _c = f.counter("c");
        assert_eq!(f.by_group(), vec![("a".into(), 3), ("c".into(), 0)]);
    }

    #[test]
    fn only_locks_past_their_deadline_count_as_expiring() {
        let pending = |deadline_ms: Option<i64>| Pending {
            delivery_count: 1,
            lock: deadline_ms.map(|deadline_ms| Lock {
                consumer: "c".into(),
                deadline_ms,
            }),
            not_before_ms: 0,
            last_error: None,
        };
        let mut ps = PartitionState::starting_at(0);
        ps.pending.insert(0, pending(Some(99)));
        ps.pending.insert(1, pending(Some(100)));
        ps.pending.insert(2, pending(None));
        ps.pending.insert(3, pending(Some(50)));
        let parts = BTreeMap::from([(0, ps.clone()), (1, ps)]);
        // A lock ending exactly now still holds (as `expire` and `in_flight` see it).
        assert_eq!(expiring(&parts, 100), 4);
        assert_eq!(expiring(&parts, 0), 0);
    }
}
