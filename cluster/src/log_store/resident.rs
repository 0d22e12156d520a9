//! The log's memory image: per index, the entry's log id and where its frame lies in the
//! log file, plus the entry itself while it is among the newest (resident).
//!
//! Keeping every entry until openraft purges it (after a snapshot, thousands of entries
//! later) held hundreds of MB per partition with large produce batches, and since that
//! memory only grew between purges each new entry landed in fresh pages (page faults and
//! page zeroing on every append). Now only the newest [`RESIDENT_BUDGET_BYTES`] of entries
//! stay in memory, which are the ones openraft reads right after appending (replication to
//! followers, the apply); older ones are read back from the file, which is rare (a follower
//! far behind, a restart). An entry the writer thread has not written yet has no position and
//! always stays resident.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use openraft::{EntryPayload, RaftLogId};

use super::{parse_frame, Op, Placement};
use crate::types::{Command, Entry, LogId, Vote};

/// How many bytes of entries (their encoded size) a group keeps in memory at most, besides
/// those not yet written to the file.
pub(super) const RESIDENT_BUDGET_BYTES: u64 = 32 << 20;

/// Where an entry's frame lies: in which file (the log file it was written to, kept open
/// by this handle even once deleted), at which offset, and the frame's whole length. The
/// frame may hold other entries too.
#[derive(Clone)]
pub(super) struct Pos {
    pub(super) file: Arc<File>,
    pub(super) offset: u64,
    pub(super) len: u32,
}

/// One index of the log.
pub(super) struct Slot {
    pub(super) log_id: LogId,
    /// Encoded size of the entry, counted against the budget while resident.
    pub(super) bytes: u64,
    /// `None` until the writer thread has written the entry's frame.
    pub(super) pos: Option<Pos>,
    /// The entry, while resident.
    pub(super) entry: Option<Entry>,
    /// The records its command adds ([`Mem::records_of`]).
    pub(super) records: u64,
}

/// The in-memory image of the log.
pub(super) struct Mem {
    pub(super) entries: BTreeMap<u64, Slot>,
    pub(super) last_purged: Option<LogId>,
    pub(super) vote: Option<Vote>,
    /// Sum of `bytes` of the resident entries.
    pub(super) resident_bytes: u64,
    /// The budget of resident bytes (see [`RESIDENT_BUDGET_BYTES`]).
    pub(super) budget_bytes: u64,
    /// Every index below this one is evicted: where eviction resumes.
    evict_from: u64,
    /// While the log is replayed at open, with a placement: what its normal entries are
    /// (see [`Mem::replayed_entries`]).
    pub(super) replay_sieve: Option<ReplaySieve>,
    /// How many records a normal entry's command adds (whole, or a placement's stub, as
    /// replayed from its frame): the log's policy's.
    pub(super) records_of: fn(&Command) -> u64,
}

/// The normal entries a replay met, for the placement's reopen: each one's log id, with its
/// command when that is a stub.
pub(super) struct ReplaySieve {
    pub(super) placement: Arc<dyn Placement>,
    pub(super) seen: Vec<(LogId, Option<Command>)>,
}

/// An entry of a read: in memory, or to be read back from its frame.
pub(super) enum Got {
    Here(Entry),
    There(LogId, Pos),
}

impl Mem {
    /// An empty log keeping at most `budget_bytes` of written entries resident.
    pub(super) fn new(vote: Option<Vote>, budget_bytes: u64) -> Mem {
        Mem {
            entries: BTreeMap::new(),
            last_purged: None,
            vote,
            resident_bytes: 0,
            budget_bytes,
            evict_from: 0,
            replay_sieve: None,
            records_of: |_| 0,
        }
    }

    /// The normal entries the replay met that are still in the log, in order (see
    /// [`ReplaySieve`]); ends the sieving.
    pub(super) fn replayed_entries(&mut self) -> Vec<(LogId, Option<Command>)> {
        let Some(sieve) = self.replay_sieve.take() else {
            return Vec::new();
        };
        let mut seen: BTreeMap<u64, (LogId, Option<Command>)> = BTreeMap::new();
        for (log_id, stub) in sieve.seen {
            // A later frame's entry at the same index (after a truncation) replaces it.
            seen.insert(log_id.index, (log_id, stub));
        }
        seen.into_values()
            .filter(|(log_id, _)| {
                self.entries
                    .get(&log_id.index)
                    .is_some_and(|s| s.log_id == *log_id)
            })
            .collect()
    }

    pub(super) fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|s| s.log_id)
            .or(self.last_purged)
    }

    /// Applies one new op (entries not yet written: resident, no position), or one replayed
    /// from the file (`at`: the frame it was read from).
    pub(super) fn apply(&mut self, op: Op, at: Option<Pos>) {
        match op {
            Op::Append(new) => {
                if let (Some(sieve), Some(_)) = (&mut self.replay_sieve, &at) {
                    for e in &new {
                        if let EntryPayload::Normal(c) = &e.payload {
                            let stub = sieve.placement.is_stub(c).then(|| c.clone());
                            sieve.seen.push((e.log_id, stub));
                        }
                    }
                }
                for e in new {
                    let index = e.get_log_id().index;
                    let bytes = bincode::serialized_size(&e).unwrap_or(0);
                    let records = match &e.payload {
                        EntryPayload::Normal(c) => (self.records_of)(c),
                        _ => 0,
                    };
                    let slot = Slot {
                        log_id: *e.get_log_id(),
                        bytes,
                        pos: at.clone(),
                        entry: Some(e),
                        records,
                    };
                    self.resident_bytes += bytes;
                    self.evict_from = self.evict_from.min(index);
                    if let Some(old) = self.entries.insert(index, slot) {
                        self.forget(&old);
                    }
                }
            }
            Op::Truncate(since) => {
                let removed = self.entries.split_off(&since);
                removed.values().for_each(|s| self.forget(s));
            }
            Op::Purge(upto) => {
                let kept = self.entries.split_off(&(upto.index + 1));
                let removed = std::mem::replace(&mut self.entries, kept);
                removed.values().for_each(|s| self.forget(s));
                if self.last_purged.is_none_or(|p| p.index < upto.index) {
                    self.last_purged = Some(upto);
                }
            }
        }
        if at.is_some() {
            self.evict();
        }
    }

    /// Uncounts a slot that left the log.
    fn forget(&mut self, slot: &Slot) {
        if slot.entry.is_some() {
            self.resident_bytes -= slot.bytes;
        }
    }

    /// The writer wrote the frame of `log_ids` at `pos`: records it, then evicts what the
    /// budget no longer holds. An index now holding another entry (truncated and appended
    /// again meanwhile) is left alone: its own frame comes later.
    pub(super) fn placed(&mut self, log_ids: &[LogId], pos: &Pos) {
        for id in log_ids {
            if let Some(slot) = self.entries.get_mut(&id.index) {
                if slot.log_id == *id {
                    slot.pos = Some(pos.clone());
                }
            }
        }
        self.evict();
    }

    /// Drops the oldest written entries from memory until the resident ones fit the budget.
    /// Stops at the first entry not yet written (writes are in log order, so the later ones
    /// are not written either).
    pub(super) fn evict(&mut self) {
        while self.resident_bytes > self.budget_bytes {
            let Some((&index, slot)) = self.entries.range_mut(self.evict_from..).next() else {
                return;
            };
            if slot.entry.is_some() {
                if slot.pos.is_none() {
                    return;
                }
                slot.entry = None;
                self.resident_bytes -= slot.bytes;
            }
            self.evict_from = index + 1;
        }
    }

    /// The entries of `range`, in order: resident ones cloned, the others with their frame.
    pub(super) fn get(&self, range: impl std::ops::RangeBounds<u64>) -> io::Result<Vec<Got>> {
        self.entries
            .range(range)
            .map(|(_, s)| match (&s.entry, &s.pos) {
                (Some(e), _) => Ok(Got::Here(e.clone())),
                (None, Some(pos)) => Ok(Got::There(s.log_id, pos.clone())),
                // Only written entries are evicted; an error rather than a panic all the same.
                (None, None) => Err(io::Error::other(format!(
                    "Raft log entry {} is neither in memory nor written",
                    s.log_id
                ))),
            })
            .collect()
    }

    /// The records the entries with an index in `(after, through]` add, or `None` when the
    /// log no longer holds all of them (purged after a snapshot: a replica that far behind
    /// catches up from the snapshot).
    pub(super) fn records_between(&self, after: u64, through: u64) -> Option<u64> {
        if after >= through {
            return Some(0);
        }
        if self.last_purged.is_some_and(|p| p.index > after) {
            return None;
        }
        let (mut held, mut records) = (0, 0);
        for (want, (index, slot)) in (after + 1..).zip(self.entries.range(after + 1..=through)) {
            if *index != want {
                return None;
            }
            held += 1;
            records += slot.records;
        }
        (held == through - after).then_some(records)
    }

    /// The command of each normal entry with an index in `(after, before)`, in order, or
    /// `None` if an index of the range is not in the log or not resident.
    pub(super) fn commands_between(&self, after: u64, before: u64) -> Option<Vec<&Command>> {
        let mut expected = after + 1;
        let mut out = Vec::new();
        for (index, slot) in self.entries.range(after + 1..before) {
            if *index != expected {
                return None;
            }
            expected += 1;
            if let EntryPayload::Normal(c) = &slot.entry.as_ref()?.payload {
                out.push(c);
            }
        }
        (expected == before).then_some(out)
    }
}

/// Reads back the entries of `got` that are not in memory, keeping the order. Blocking (a
/// pread per frame): call from a blocking thread. A frame shared by consecutive entries is
/// read once.
pub(super) fn read_back(got: Vec<Got>) -> io::Result<Vec<Entry>> {
    let mut frames = FrameCache::default();
    got.into_iter()
        .map(|g| match g {
            Got::Here(e) => Ok(e),
            Got::There(log_id, pos) => frames.entry(log_id, &pos),
        })
        .collect()
}

/// The last frame read back, decoded: consecutive entries of one frame (a follower's
/// replicated batch) cost one read, and no more than one frame is held.
#[derive(Default)]
pub(super) struct FrameCache {
    /// The frame's file (by address, while `pos` keeps it open) and offset, and its entries.
    last: Option<(Pos, Vec<Entry>)>,
}

impl FrameCache {
    /// The entry `log_id`, from its frame at `pos`.
    pub(super) fn entry(&mut self, log_id: LogId, pos: &Pos) -> io::Result<Entry> {
        let cached = self
            .last
            .as_ref()
            .is_some_and(|(p, _)| Arc::ptr_eq(&p.file, &pos.file) && p.offset == pos.offset);
        if !cached {
            self.last = Some((pos.clone(), read_frame(pos)?));
        }
        self.last
            .as_ref()
            .and_then(|(_, entries)| entries.iter().find(|e| e.log_id == log_id))
            .cloned()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the Raft log frame at offset {} holds no entry {log_id}",
                        pos.offset
                    ),
                )
            })
    }
}

/// The entries of the append frame at `pos`; a short, damaged or other frame is an error.
pub(super) fn read_frame(pos: &Pos) -> io::Result<Vec<Entry>> {
    let damaged = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the Raft log frame at offset {} ({} bytes) {what}",
                pos.offset, pos.len
            ),
        )
    };
    let mut buf = vec![0u8; pos.len as usize];
    pos.file.read_exact_at(&mut buf, pos.offset)?;
    let (payload, _) = parse_frame(&buf).ok_or_else(|| damaged("is damaged (length or CRC)"))?;
    match bincode::deserialize::<Op>(payload) {
        Ok(Op::Append(entries)) => Ok(entries),
        Ok(_) => Err(damaged("is not an append")),
        Err(_) => Err(damaged("does not decode")),
    }
}

#[cfg(test)]
#[path = "lag_tests.rs"]
mod lag_tests;
