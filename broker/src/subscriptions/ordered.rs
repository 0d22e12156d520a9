//! Per-key ordered acquisition, for webhooks created with `ordered`: records with the same
//! key in one partition are handed out one at a time, in offset order. A record is
//! deliverable only when no record of its key at a lower offset is still pending (locked,
//! waiting for its backoff, or waiting behind another), so a failing key blocks only itself.
//! Records without a key are not ordered.
//!
//! The stored state knows offsets, not keys, so the pusher keeps a [`KeyIndex`] in memory:
//! the key hash of each pending offset, read from the log once (again after a restart) and
//! dropped when the record is done. Records taken from the log behind a pending record of
//! their key stay pending without a lock (no delivery counted) until their turn; they count
//! against `max_in_flight_per_partition`, which bounds what a stuck key can hold back.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use super::read;
use super::source::Source;
use super::state::{Limits, PartitionState};
use crate::error::BrokerError;
use rill_proto::v1::{self as pb, FetchedRecord};

/// The key hash of each pending record, per partition (`None`: the record has no key).
/// A hash collision only orders two keys together; it never reorders one.
#[derive(Debug, Default)]
pub struct KeyIndex {
    partitions: BTreeMap<u32, HashMap<u64, Option<u64>>>,
}

fn key_hash(r: &FetchedRecord) -> Option<u64> {
    r.key.as_ref().map(|k| {
        let mut h = DefaultHasher::new();
        k.as_ref().hash(&mut h);
        h.finish()
    })
}

/// What one ordered pass over a partition may take.
pub(super) struct Pass<'a> {
    /// The partition.
    pub partition: u32,
    /// The acquiring consumer.
    pub consumer: &'a str,
    /// Now, ms since the Unix epoch.
    pub now_ms: i64,
    /// The subscription's limits.
    pub limits: Limits,
    /// Records wanted at most.
    pub want: usize,
}

/// The offsets of `ps` deliverable now in key order, lowest first, at most `max`, and the
/// keys that are taken (by a pending record that is not deliverable now, or by one of the
/// offsets returned).
fn deliverable(
    ps: &PartitionState,
    keys: &HashMap<u64, Option<u64>>,
    now_ms: i64,
    max: usize,
) -> (Vec<u64>, HashSet<u64>) {
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    for (offset, p) in &ps.pending {
        let free = p.lock.is_none() && p.not_before_ms <= now_ms;
        let first_of_key = match keys.get(offset).copied().flatten() {
            Some(k) => taken.insert(k),
            None => true,
        };
        if free && first_of_key && out.len() < max {
            out.push(*offset);
        }
    }
    (out, taken)
}

/// Acquires records of one partition for `pass.consumer` in key order: due records first
/// (each the lowest pending of its key), then new ones from the log, locking a new record
/// only when no earlier record of its key is pending. Stops before a record that would take
/// the locked bytes past `bytes_left` (except the first, unless `strict`).
pub(super) async fn acquire(
    index: &mut KeyIndex,
    ps: &mut PartitionState,
    source: &Source,
    pass: Pass<'_>,
    bytes_left: &mut usize,
    strict: bool,
    out: &mut Vec<pb::ReceivedRecord>,
) -> Result<(), BrokerError> {
    let keys = index.partitions.entry(pass.partition).or_default();
    keys.retain(|o, _| ps.pending.contains_key(o));
    // Learn the keys of pending records not seen since they were taken (after a restart).
    let unknown: Vec<u64> = ps
        .pending
        .keys()
        .filter(|o| !keys.contains_key(o))
        .copied()
        .collect();
    let mut known: BTreeMap<u64, FetchedRecord> = BTreeMap::new();
    if !unknown.is_empty() {
        let (got, _, bounds) = source.read(unknown.clone(), 0, 0, 0).await?;
        ps.clamp_to_log_start(bounds.log_start);
        let found: BTreeSet<u64> = got.iter().map(|r| r.offset).collect();
        for o in unknown {
            // Gone from the log (retention): done, as the unordered path does.
            if !found.contains(&o)
                && o < bounds.high_watermark
                && ps.pending.get(&o).is_some_and(|p| p.lock.is_none())
            {
                ps.forget(o);
            }
        }
        for r in got {
            keys.insert(r.offset, key_hash(&r));
            known.insert(r.offset, r);
        }
    }
    let (again, mut taken) = deliverable(ps, keys, pass.now_ms, pass.want);
    let room = (pass.limits.max_in_flight as usize).saturating_sub(ps.pending.len());
    let new_max = pass.want.saturating_sub(again.len()).min(room);
    let from = ps.next;
    let end = source.last_bounds().map(|b| b.high_watermark);
    if again.is_empty() && (new_max == 0 || end.is_some_and(|h| from >= h)) {
        return Ok(());
    }
    let missing: Vec<u64> = again
        .iter()
        .filter(|o| !known.contains_key(o))
        .copied()
        .collect();
    let (old, new, bounds) = source.read(missing, from, new_max, *bytes_left).await?;
    ps.clamp_to_log_start(bounds.log_start);
    for r in old {
        known.insert(r.offset, r);
    }
    let mut ready: Vec<FetchedRecord> = Vec::new();
    for o in &again {
        match known.remove(o) {
            Some(r) => ready.push(r),
            None if *o < bounds.high_watermark => ps.forget(*o),
            None => {}
        }
    }
    for r in new {
        ps.take_new(r.offset);
        let k = key_hash(&r);
        keys.insert(r.offset, k);
        // Behind a pending record of its key: it waits, pending and unlocked.
        if k.is_none_or(|k| taken.insert(k)) {
            ready.push(r);
        }
    }
    for r in ready {
        let size = read::record_bytes(&r);
        if (strict || !out.is_empty()) && size > *bytes_left {
            break;
        }
        if let Some((delivery_count, lock_deadline_ms)) =
            ps.lock(r.offset, pass.consumer, pass.now_ms, &pass.limits)
        {
            *bytes_left = bytes_left.saturating_sub(size);
            out.push(pb::ReceivedRecord {
                partition: pass.partition,
                record: Some(r),
                delivery_count,
                lock_deadline_ms,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::state::{Lock, Pending};

    fn pending(lock: bool, not_before_ms: i64) -> Pending {
        Pending {
            delivery_count: 1,
            lock: lock.then(|| Lock {
                consumer: "c".into(),
                deadline_ms: 1_000,
            }),
            not_before_ms,
            last_error: None,
        }
    }

    #[test]
    fn only_the_lowest_pending_record_of_a_key_is_deliverable() {
        let mut ps = PartitionState::starting_at(0);
        ps.next = 8;
        // Key 1: 0 locked (in flight), 2 due. Key 2: 1 waiting for its backoff, 3 due.
        // Key 3: 4 due, 6 due. No key: 5 and 7 due.
        for (o, lock, nb) in [
            (0, true, 0),
            (1, false, 500),
            (2, false, 0),
            (3, false, 0),
            (4, false, 0),
            (5, false, 0),
            (6, false, 0),
            (7, false, 0),
        ] {
            ps.pending.insert(o, pending(lock, nb));
        }
        let keys: HashMap<u64, Option<u64>> = [
            (0, Some(1)),
            (1, Some(2)),
            (2, Some(1)),
            (3, Some(2)),
            (4, Some(3)),
            (5, None),
            (6, Some(3)),
            (7, None),
        ]
        .into_iter()
        .collect();
        let (out, taken) = deliverable(&ps, &keys, 100, 10);
        assert_eq!(
            out,
            vec![4, 5, 7],
            "a failing or busy key blocks only itself"
        );
        assert_eq!(taken, HashSet::from([1, 2, 3]));
        let (out, _) = deliverable(&ps, &keys, 600, 10);
        assert_eq!(
            out,
            vec![1, 4, 5, 7],
            "the key's first record, once its backoff passed"
        );
        let (out, _) = deliverable(&ps, &keys, 600, 2);
        assert_eq!(out, vec![1, 4]);
    }
}
