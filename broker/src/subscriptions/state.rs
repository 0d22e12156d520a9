//! One subscription partition's state machine: which offsets are done, which are delivered
//! and not done (with their delivery count, lock and last error), and where new records
//! start. No I/O: reading records, dead-lettering and storing are the caller's.
//!
//! # The model
//! - `floor`: every offset below it is done (acknowledged, dead-lettered or archived).
//! - `next`: the first offset never delivered.
//! - Every offset in `floor..next` is either in `done` (ranges, so acks in any order stay
//!   compact) or in `pending` (delivered, not done), never both.
//! - A pending record is locked to one consumer until its deadline, or unlocked and
//!   deliverable again from `not_before_ms`.
//!
//! Expired locks are found lazily, by the time each call is given ([`PartitionState::expire`]),
//! so an ack after its deadline is refused even before any background sweep has run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The longest consumer id, in bytes.
pub const MAX_CONSUMER_ID_LEN: usize = 249;
/// The most records one acknowledgement may name.
pub const MAX_ACK_RECORDS: u64 = 10_000;
/// The longest error text kept with a record, in bytes (longer ones are cut).
pub const MAX_ERROR_LEN: usize = 1024;

/// Why a subscription call was refused. Each variant names the subscription, and where it
/// applies the partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// No subscription of that name.
    #[error("subscription {name:?} does not exist")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The name is taken.
    #[error("subscription {name:?} already exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// The record is not locked to this consumer: its lock expired, another consumer holds
    /// it, or it is done already.
    #[error(
        "subscription {subscription:?}: topic {topic} partition {partition} offset {offset} is \
         not held by consumer {consumer:?} ({reason})"
    )]
    NotHeld {
        /// The subscription.
        subscription: String,
        /// Its topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset.
        offset: u64,
        /// The consumer that acked.
        consumer: String,
        /// What is the case instead.
        reason: &'static str,
    },
    /// The record was never delivered by this subscription.
    #[error(
        "subscription {subscription:?}: topic {topic} partition {partition} offset {offset} was \
         never delivered (the next offset to deliver is {next})"
    )]
    NeverDelivered {
        /// The subscription.
        subscription: String,
        /// Its topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset.
        offset: u64,
        /// The first offset never delivered.
        next: u64,
    },
    /// The dead-letter topic does not exist.
    #[error("subscription {subscription:?}: dead-letter topic {topic:?} does not exist; create it first")]
    DeadLetterTopicMissing {
        /// The subscription.
        subscription: String,
        /// The dead-letter topic.
        topic: String,
    },
    /// A push endpoint the broker may not call (outside its allow-list).
    #[error(
        "subscription {subscription:?}: the push endpoint {endpoint:?} is not allowed: {reason}"
    )]
    EndpointNotAllowed {
        /// The subscription.
        subscription: String,
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// What an acknowledgement does to each record it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done.
    Ack,
    /// Unlocked, deliverable again after the delay.
    Nack {
        /// Deliverable from now plus this.
        delay_ms: u32,
    },
    /// Dead-letter now.
    Reject,
    /// Lock renewed for another ack deadline.
    Extend,
}

/// A consumer's lock on a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The consumer holding it.
    pub consumer: String,
    /// When it ends, ms since the Unix epoch.
    pub deadline_ms: i64,
}

/// A record delivered and not done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Deliveries so far.
    pub delivery_count: u32,
    /// The lock, while one consumer holds it.
    pub lock: Option<Lock>,
    /// Unlocked: deliverable again from this time, ms since the Unix epoch.
    pub not_before_ms: i64,
    /// Why the last delivery failed, when the consumer said.
    pub last_error: Option<String>,
}

/// A record leaving the subscription without an ack: to the dead-letter topic, or archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// Deliveries made.
    pub attempts: u32,
    /// The last error, if known.
    pub last_error: Option<String>,
}

/// The limits a partition's state obeys (from the subscription's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lock length, ms.
    pub ack_deadline_ms: u32,
    /// Deliveries before dead-lettering.
    pub max_delivery_attempts: u32,
    /// Pending records at once.
    pub max_in_flight: u32,
}

/// One partition of a subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Everything below is done.
    pub floor: u64,
    /// The first offset never delivered.
    pub next: u64,
    /// Done offsets in `floor..next`, as disjoint, sorted, non-adjacent `[start, end)`.
    pub done: Vec<(u64, u64)>,
    /// Delivered and not done. Stored as a list of `[offset, record]` pairs: JSON map keys
    /// are strings, which a tagged record would not read back as integers.
    #[serde(with = "pending_list")]
    pub pending: BTreeMap<u64, Pending>,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Records archived.
    pub archived: u64,
}

impl PartitionState {
    /// A partition starting at `offset`.
    pub fn starting_at(offset: u64) -> Self {
        PartitionState {
            floor: offset,
            next: offset,
            ..PartitionState::default()
        }
    }

    /// Records locked now (as of `now_ms`).
    pub fn in_flight(&self, now_ms: i64) -> u64 {
        self.pending
            .values()
            .filter(|p| p.lock.as_ref().is_some_and(|l| l.deadline_ms >= now_ms))
            .count() as u64
    }

    /// Pending records not locked.
    pub fn redelivery_pending(&self, now_ms: i64) -> u64 {
        self.pending.len() as u64 - self.in_flight(now_ms)
    }

    /// Records not done from the floor to `high_watermark`.
    pub fn backlog(&self, high_watermark: u64) -> u64 {
        let done: u64 = self.done.iter().map(|(s, e)| e - s).sum();
        high_watermark
            .saturating_sub(self.floor)
            .saturating_sub(done)
    }

    /// Whether a new record may be taken from the log: the pending bound has room.
    pub fn has_room(&self, limits: &Limits) -> bool {
        self.pending.len() < limits.max_in_flight as usize
    }

    /// Unlocks every record whose lock ended before `now_ms`. Those past the attempt limit
    /// leave the subscription: they are returned, marked done, for the caller to dead-letter.
    pub fn expire(&mut self, partition: u32, now_ms: i64, limits: &Limits) -> Vec<DeadLetter> {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.lock.as_ref().is_some_and(|l| l.deadline_ms < now_ms))
            .map(|(o, _)| *o)
            .collect();
        let mut out = Vec::new();
        for offset in expired {
            if let Some(p) = self.pending.get_mut(&offset) {
                p.lock = None;
                p.not_before_ms = now_ms;
                if p.last_error.is_none() {
                    p.last_error = Some("ack deadline expired".into());
                }
                if p.delivery_count >= limits.max_delivery_attempts {
                    out.push(self.leave(partition, offset));
                }
            }
        }
        out
    }

    /// Offsets delivered before, now unlocked and due (`not_before_ms <= now_ms`), lowest
    /// first, at most `max`.
    pub fn redeliverable(&self, now_ms: i64, max: usize) -> Vec<u64> {
        self.pending
            .iter()
            .filter(|(_, p)| p.lock.is_none() && p.not_before_ms <= now_ms)
            .map(|(o, _)| *o)
            .take(max)
            .collect()
    }

    /// The earliest time after `now_ms` an unlocked record becomes due or a lock ends, if
    /// any. Records due already are left out: a caller that did not take them (its limits,
    /// or an ordered key waiting) must still wake for the next future event.
    pub fn next_event_ms(&self, now_ms: i64) -> Option<i64> {
        self.pending
            .values()
            .map(|p| match &p.lock {
                Some(l) => l.deadline_ms.saturating_add(1),
                None => p.not_before_ms,
            })
            .filter(|at| *at > now_ms)
            .min()
    }

    /// Takes `offset`, the next never-delivered record, as pending (not yet locked).
    /// Offsets skipped over (gone to retention) count as done.
    pub fn take_new(&mut self, offset: u64) {
        if offset < self.next {
            return;
        }
        if offset > self.next {
            let skipped = (self.next, offset);
            self.mark_done_range(skipped);
        }
        self.pending.insert(
            offset,
            Pending {
                delivery_count: 0,
                lock: None,
                not_before_ms: 0,
                last_error: None,
            },
        );
        self.next = offset + 1;
    }

    /// Locks pending `offset` to `consumer` until `now_ms` plus the ack deadline, counting
    /// a delivery. Returns the delivery count and deadline.
    pub fn lock(
        &mut self,
        offset: u64,
        consumer: &str,
        now_ms: i64,
        limits: &Limits,
    ) -> Option<(u32, i64)> {
        let p = self.pending.get_mut(&offset)?;
        p.delivery_count = p.delivery_count.saturating_add(1);
        let deadline_ms = now_ms.saturating_add(i64::from(limits.ack_deadline_ms));
        p.lock = Some(Lock {
            consumer: consumer.to_string(),
            deadline_ms,
        });
        Some((p.delivery_count, deadline_ms))
    }

    /// Marks `offset` done whatever its state (a record gone from the log).
    pub fn forget(&mut self, offset: u64) {
        if self.pending.remove(&offset).is_some() {
            self.mark_done_range((offset, offset + 1));
        }
    }

    /// Checks that `consumer` holds every offset of `first..=last` at `now_ms`; the first
    /// failure names the offset. `ids` fills in the error's names.
    pub fn check_held(
        &self,
        ids: (&str, &str, u32),
        consumer: &str,
        (first, last): (u64, u64),
        now_ms: i64,
    ) -> Result<u64, SubscriptionError> {
        let (subscription, topic, partition) = ids;
        if last < first {
            return Err(SubscriptionError::Invalid(format!(
                "subscription {subscription:?}: topic {topic} partition {partition}: the range \
                 {first}..={last} is empty (the last offset is before the first)"
            )));
        }
        if last >= self.next {
            return Err(SubscriptionError::NeverDelivered {
                subscription: subscription.into(),
                topic: topic.into(),
                partition,
                offset: first.max(self.next),
                next: self.next,
            });
        }
        let not_held = |offset: u64, reason: &'static str| SubscriptionError::NotHeld {
            subscription: subscription.into(),
            topic: topic.into(),
            partition,
            offset,
            consumer: consumer.into(),
            reason,
        };
        let mut expected = first;
        for (offset, p) in self.pending.range(first..=last) {
            if *offset != expected {
                return Err(not_held(expected, "it is done already"));
            }
            match &p.lock {
                None => return Err(not_held(*offset, "its lock expired or it was released")),
                Some(l) if l.consumer != consumer => {
                    return Err(not_held(*offset, "another consumer holds it"))
                }
                Some(l) if l.deadline_ms < now_ms => {
                    return Err(not_held(*offset, "its lock expired"))
                }
                Some(_) => {}
            }
            expected = offset + 1;
        }
        if expected <= last {
            return Err(not_held(expected, "it is done already"));
        }
        Ok(last - first + 1)
    }

    /// Applies `kind` to `first..=last`, which [`PartitionState::check_held`] accepted.
    /// Returns the records leaving the subscription (to dead-letter) and, for an extend, the
    /// new deadline.
    pub fn apply(
        &mut self,
        partition: u32,
        (first, last): (u64, u64),
        kind: AckKind,
        error: Option<&str>,
        now_ms: i64,
        limits: &Limits,
    ) -> (Vec<DeadLetter>, i64) {
        let offsets: Vec<u64> = self.pending.range(first..=last).map(|(o, _)| *o).collect();
        let mut out = Vec::new();
        let mut deadline = 0;
        for offset in offsets {
            match kind {
                AckKind::Ack => {
                    self.pending.remove(&offset);
                    self.mark_done_range((offset, offset + 1));
                }
                AckKind::Extend => {
                    if let Some(l) = self.pending.get_mut(&offset).and_then(|p| p.lock.as_mut()) {
                        l.deadline_ms = now_ms.saturating_add(i64::from(limits.ack_deadline_ms));
                        deadline = l.deadline_ms;
                    }
                }
                AckKind::Nack { delay_ms } => {
                    let Some(p) = self.pending.get_mut(&offset) else {
                        continue;
                    };
                    p.lock = None;
                    p.not_before_ms = now_ms.saturating_add(i64::from(delay_ms));
                    if let Some(e) = error {
                        p.last_error = Some(cut(e));
                    }
                    if p.delivery_count >= limits.max_delivery_attempts {
                        out.push(self.leave(partition, offset));
                    }
                }
                AckKind::Reject => {
                    if let (Some(p), Some(e)) = (self.pending.get_mut(&offset), error) {
                        p.last_error = Some(cut(e));
                    }
                    out.push(self.leave(partition, offset));
                }
            }
        }
        (out, deadline)
    }

    /// Counts `n` records as dead-lettered (`to_topic`) or archived.
    pub fn count_left(&mut self, n: u64, to_topic: bool) {
        if to_topic {
            self.dead_lettered += n;
        } else {
            self.archived += n;
        }
    }

    /// Moves to `offset`: everything before is done, everything from it never delivered.
    pub fn seek(&mut self, offset: u64) {
        self.floor = offset;
        self.next = offset;
        self.done.clear();
        self.pending.clear();
    }

    /// Raises the floor to `log_start` when retention removed records below it: those are
    /// gone and count as done.
    pub fn clamp_to_log_start(&mut self, log_start: u64) {
        if self.floor >= log_start {
            return;
        }
        let gone: Vec<u64> = self.pending.range(..log_start).map(|(o, _)| *o).collect();
        for o in gone {
            self.pending.remove(&o);
        }
        if self.next < log_start {
            self.next = log_start;
        }
        self.done.retain(|(_, e)| *e > log_start);
        if let Some(first) = self.done.first_mut() {
            first.0 = first.0.max(log_start);
        }
        self.floor = log_start;
        self.raise_floor();
    }

    /// Drops every lock (a restart: the records are delivered again).
    pub fn drop_locks(&mut self) {
        for p in self.pending.values_mut() {
            if p.lock.take().is_some() {
                p.not_before_ms = 0;
            }
        }
    }

    /// Checks the invariants of a state read back from storage.
    pub fn validate(&self) -> Result<(), String> {
        if self.floor > self.next {
            return Err(format!("floor {} above next {}", self.floor, self.next));
        }
        let mut last_end = self.floor;
        for (i, (s, e)) in self.done.iter().enumerate() {
            if s >= e || *e > self.next || (i > 0 && *s <= last_end) || *s < self.floor {
                return Err(format!("bad done range {s}..{e}"));
            }
            last_end = *e;
        }
        for o in self.pending.keys() {
            if *o < self.floor || *o >= self.next || self.is_done(*o) {
                return Err(format!("bad pending offset {o}"));
            }
        }
        Ok(())
    }

    fn is_done(&self, offset: u64) -> bool {
        offset < self.floor || self.done.iter().any(|(s, e)| (*s..*e).contains(&offset))
    }

    /// Removes `offset` from pending as leaving the subscription.
    fn leave(&mut self, partition: u32, offset: u64) -> DeadLetter {
        let p = self.pending.remove(&offset);
        self.mark_done_range((offset, offset + 1));
        DeadLetter {
            partition,
            offset,
            attempts: p.as_ref().map_or(0, |p| p.delivery_count),
            last_error: p.and_then(|p| p.last_error),
        }
    }

    /// Adds `[start, end)` to the done ranges (merging neighbours), then raises the floor.
    fn mark_done_range(&mut self, (start, end): (u64, u64)) {
        if start >= end {
            return;
        }
        let i = self.done.partition_point(|(_, e)| *e < start);
        let mut s = start;
        let mut e = end;
        let mut j = i;
        while j < self.done.len() && self.done[j].0 <= e {
            s = s.min(self.done[j].0);
            e = e.max(self.done[j].1);
            j += 1;
        }
        self.done.splice(i..j, [(s, e)]);
        self.raise_floor();
    }

    fn raise_floor(&mut self) {
        while let Some(&(s, e)) = self.done.first() {
            if s > self.floor {
                break;
            }
            self.floor = self.floor.max(e);
            self.done.remove(0);
        }
    }
}

/// The stored form of the pending map: a list of `(offset, record)` pairs.
mod pending_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::Pending;

    pub fn serialize<S: Serializer>(m: &BTreeMap<u64, Pending>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u64, Pending>, D::Error> {
        Ok(Vec::<(u64, Pending)>::deserialize(d)?.into_iter().collect())
    }
}

fn cut(e: &str) -> String {
    if e.len() <= MAX_ERROR_LEN {
        return e.to_string();
    }
    let mut end = MAX_ERROR_LEN;
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    e[..end].to_string()
}

#[cfg(test)]
mod tests;
