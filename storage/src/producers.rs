//! Idempotent producers: per partition and per producer id, the epoch and the last batches
//! appended (their sequences and offsets), so that a retried batch is answered with its
//! original offsets instead of being appended twice.
//!
//! The state is derived from the log alone: every idempotent batch carries its producer id,
//! epoch and base sequence in its header, so replaying the headers in offset order rebuilds
//! it exactly (on every replica that holds the same batches). A snapshot written at
//! checkpoints (`producer-snapshot`, see `storage/FORMAT.md`) records the state up to an
//! offset, so recovery replays only the batches after it.
//!
//! Sequences are per partition, count records, and wrap from `i32::MAX` to 0.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use crate::batch::BatchHeader;
use crate::cursor::Cursor;
use crate::error::{Result, StorageError};
use crate::fsutil;

/// How many of a producer's last batches a partition remembers (as Kafka does): up to this
/// many batches may be in flight per partition and still be deduplicated on retry.
pub const MAX_REMEMBERED_BATCHES: usize = 5;
/// The default time after its last batch that a producer's state is dropped, in ms (7 days,
/// Kafka's `producer.id.expiration.ms`).
pub const DEFAULT_PRODUCER_EXPIRY_MS: u64 = 7 * 24 * 3600 * 1000;
/// The snapshot's file name in the partition folder.
pub const SNAPSHOT_FILE: &str = "producer-snapshot";
/// The adopted state's file name in the partition folder: another replica's state, in the
/// snapshot's encoding, taken after a restart of the log (see
/// [`crate::PartitionLog::restore_producers`]).
pub const BASE_FILE: &str = "producer-base";
/// The file whose presence says that the partition's appends come from a replicated
/// partition's applied entries, which carry the clock producer expiry is decided by
/// ([`ProducerClock`], [`crate::PartitionLog::use_entry_clock`]): empty, written once.
pub const ENTRY_CLOCK_FILE: &str = "producer-clock-entries";
/// The file whose presence says that the log was restarted at a later offset
/// ([`crate::PartitionLog::restart_at`]) and holds no complete producer state yet: empty.
pub const MISSING_FILE: &str = "producer-state-missing";
const SNAPSHOT_MAGIC: [u8; 4] = *b"RLPS";
/// Version 2 adds the state's clock and cutoff after the offset; version 1 (without them) is
/// still read, as a state that has seen no clock.
const SNAPSHOT_VERSION: u8 = 2;

/// Why an idempotent batch is refused. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// The batch does not start at the producer's next sequence.
    #[error(
        "out of order sequence for producer {producer_id}: expected {expected}, received \
         {received}"
    )]
    SequenceGap {
        /// The producer id.
        producer_id: i64,
        /// The sequence the partition expects next.
        expected: i32,
        /// The batch's base sequence.
        received: i32,
    },
    /// The batch's epoch is older than the producer's latest: a fenced instance.
    #[error("producer {producer_id} epoch {epoch} is stale: the current epoch is {current}")]
    StaleEpoch {
        /// The producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The newest epoch the partition has seen.
        current: i16,
    },
    /// The batch's producer fields are not a valid combination.
    #[error("bad producer fields: id {producer_id}, epoch {epoch}, base sequence {base_sequence}: {reason}")]
    BadFields {
        /// The producer id.
        producer_id: i64,
        /// The epoch.
        epoch: i16,
        /// The base sequence.
        base_sequence: i32,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One remembered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberedBatch {
    /// Its base sequence.
    pub first_sequence: i32,
    /// Its last sequence.
    pub last_sequence: i32,
    /// Its first offset.
    pub base_offset: u64,
    /// Its record count.
    pub record_count: u32,
}

/// The clock an append decides producer expiry by: the time it counts as the producer's
/// activity, and the cutoff below which a producer's last activity means it expired.
///
/// A single broker's partition reads its own wall clock at each append. A replicated
/// partition's apply runs on every replica, at different times, so it must not: the leader
/// stamps its clock and its cutoff (its clock less its expiry) into each idempotent entry,
/// and every replica decides by those, so that its producer state, and so which batches it
/// appends, is a function of the applied entries alone (docs/REPLICATION.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerClock {
    /// The time the append counts as its producer's activity, ms since the Unix epoch.
    pub now_ms: i64,
    /// A producer last active before this (ms since the Unix epoch) has expired.
    pub cutoff_ms: i64,
}

impl ProducerClock {
    /// The clock at `now_ms` for producers that expire `expiry_ms` after their last activity.
    pub fn at(now_ms: i64, expiry_ms: u64) -> Self {
        ProducerClock {
            now_ms,
            cutoff_ms: expiry_cutoff(now_ms, expiry_ms),
        }
    }
}

/// One producer's state in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Producer {
    epoch: i16,
    /// When the producer was last active, for expiry: the newest of its batches' max
    /// timestamps and the broker's clock when they were appended (or replayed). The clock
    /// counts too, so that a producer writing old timestamps (a backfill) does not expire
    /// between two of its batches.
    last_timestamp_ms: i64,
    /// The last batches, oldest first; never empty.
    batches: VecDeque<RememberedBatch>,
}

/// What the state says about a batch about to be appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not idempotent (no producer id), or the next in sequence: append it.
    Append,
    /// A retry of a batch already appended: answer with these offsets, append nothing.
    Duplicate(RememberedBatch),
}

/// The sequence after `seq` moved on by `count` records, wrapping past `i32::MAX` to 0.
pub fn advance(seq: i32, count: u32) -> i32 {
    let m = i64::from(i32::MAX) + 1;
    ((i64::from(seq) + i64::from(count)).rem_euclid(m)) as i32
}

/// The oldest activity time a producer may have at `now_ms` and keep its state.
fn expiry_cutoff(now_ms: i64, expiry_ms: u64) -> i64 {
    now_ms.saturating_sub(i64::try_from(expiry_ms).unwrap_or(i64::MAX))
}

/// Every producer's state in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStates {
    producers: HashMap<i64, Producer>,
    /// The newest clock the appends have brought ([`ProducerStates::advance`]): what an
    /// appended batch counts as its producer's activity. Never moves back, so a replay in
    /// order from a snapshot reproduces it (`i64::MIN`: none yet).
    clock_ms: i64,
    /// The newest cutoff the appends have brought: a producer last active before it has
    /// expired. Never moves back, so a producer dropped by a sweep is one every later
    /// append would also find expired (`i64::MIN`: none yet).
    cutoff_ms: i64,
}

impl Default for ProducerStates {
    fn default() -> Self {
        ProducerStates {
            producers: HashMap::new(),
            clock_ms: i64::MIN,
            cutoff_ms: i64::MIN,
        }
    }
}

impl ProducerStates {
    /// Moves the state's clock and cutoff forward to `clock`'s (never back); called for each
    /// append before its verdict. Returns the state's clock.
    pub fn advance(&mut self, clock: ProducerClock) -> i64 {
        self.clock_ms = self.clock_ms.max(clock.now_ms);
        self.cutoff_ms = self.cutoff_ms.max(clock.cutoff_ms);
        self.clock_ms
    }

    /// The state's clock (see [`ProducerStates::advance`]).
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// The state's cutoff (see [`ProducerStates::advance`]).
    pub fn cutoff_ms(&self) -> i64 {
        self.cutoff_ms
    }

    /// How many producers have state.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer has state.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Decides what to do with `header`'s batch; changes nothing.
    pub fn check(&self, header: &BatchHeader) -> std::result::Result<Verdict, ProducerError> {
        let (id, epoch, seq) = (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence,
        );
        if id == -1 {
            return Ok(Verdict::Append);
        }
        let bad = |reason| ProducerError::BadFields {
            producer_id: id,
            epoch,
            base_sequence: seq,
            reason,
        };
        if id < 0 {
            return Err(bad("a producer id is >= 0, or -1 for none"));
        }
        if epoch < 0 || seq < 0 {
            return Err(bad(
                "an idempotent batch needs an epoch and a sequence >= 0",
            ));
        }
        let Some(p) = self.producers.get(&id) else {
            // A new producer (or one whose state expired) starts at sequence 0.
            return if seq == 0 {
                Ok(Verdict::Append)
            } else {
                Err(ProducerError::SequenceGap {
                    producer_id: id,
                    expected: 0,
                    received: seq,
                })
            };
        };
        if epoch < p.epoch {
            return Err(ProducerError::StaleEpoch {
                producer_id: id,
                epoch,
                current: p.epoch,
            });
        }
        if epoch > p.epoch {
            // A new instance of the producer starts its sequences again.
            return if seq == 0 {
                Ok(Verdict::Append)
            } else {
                Err(ProducerError::SequenceGap {
                    producer_id: id,
                    expected: 0,
                    received: seq,
                })
            };
        }
        let last_sequence = advance(seq, header.record_count.saturating_sub(1));
        if let Some(b) = p
            .batches
            .iter()
            .find(|b| b.first_sequence == seq && b.last_sequence == last_sequence)
        {
            return Ok(Verdict::Duplicate(*b));
        }
        let expected = p.batches.back().map_or(0, |b| advance(b.last_sequence, 1));
        if seq == expected {
            Ok(Verdict::Append)
        } else {
            Err(ProducerError::SequenceGap {
                producer_id: id,
                expected,
                received: seq,
            })
        }
    }

    /// What an append does before it writes: moves the clock to `clock` (if any), drops
    /// `header`'s producer if it expired by the cutoff, then decides its batch
    /// ([`ProducerStates::check`]). A refused batch has moved the clock all the same, as it
    /// does on every replica.
    pub fn decide(
        &mut self,
        header: &BatchHeader,
        clock: Option<ProducerClock>,
    ) -> std::result::Result<Verdict, ProducerError> {
        if let Some(clock) = clock {
            self.advance(clock);
        }
        if header.producer_id >= 0 {
            // An idle producer's state is gone once it expires, not only at the next sweep.
            self.expire_producer(header.producer_id);
        }
        self.check(header)
    }

    /// Records `header`'s batch, appended at `base_offset` after [`ProducerStates::decide`]
    /// let it through, as active at the state's clock.
    pub fn appended(&mut self, header: &BatchHeader, base_offset: u64) {
        let clock = self.clock_ms;
        self.apply_at(header, base_offset, clock);
    }

    /// The state as one producer's batches see it: that producer's state (if any) with the
    /// clock and cutoff, and no other producer's. Deciding and recording that producer's
    /// batches in it gives what they would give in the whole state; cheap to copy.
    pub fn only(&self, producer_id: i64) -> ProducerStates {
        ProducerStates {
            producers: self
                .producers
                .get(&producer_id)
                .map(|p| HashMap::from([(producer_id, p.clone())]))
                .unwrap_or_default(),
            clock_ms: self.clock_ms,
            cutoff_ms: self.cutoff_ms,
        }
    }

    /// Records an appended batch (one that [`ProducerStates::check`] let through, or one
    /// met replaying the log) at `base_offset`. Its activity time is the batch's max
    /// timestamp alone; see [`ProducerStates::apply_at`].
    pub fn apply(&mut self, header: &BatchHeader, base_offset: u64) {
        self.apply_at(header, base_offset, i64::MIN);
    }

    /// [`ProducerStates::apply`], with the broker's clock `now_ms` counted as the producer's
    /// latest activity when it is newer than the batch's timestamps.
    pub fn apply_at(&mut self, header: &BatchHeader, base_offset: u64, now_ms: i64) {
        if header.producer_id < 0 || header.producer_epoch < 0 || header.base_sequence < 0 {
            return;
        }
        let batch = RememberedBatch {
            first_sequence: header.base_sequence,
            last_sequence: advance(header.base_sequence, header.record_count.saturating_sub(1)),
            base_offset,
            record_count: header.record_count,
        };
        let p = self
            .producers
            .entry(header.producer_id)
            .or_insert_with(|| Producer {
                epoch: header.producer_epoch,
                last_timestamp_ms: header.max_timestamp.max(now_ms),
                batches: VecDeque::new(),
            });
        let continues = p
            .batches
            .back()
            .is_none_or(|b| advance(b.last_sequence, 1) == header.base_sequence);
        if header.producer_epoch != p.epoch || !continues {
            // A new epoch, or (replaying the log) a batch at sequence 0 after a gap: the
            // producer expired and started again, so the batches before are not its own.
            p.epoch = header.producer_epoch;
            p.batches.clear();
        }
        p.last_timestamp_ms = p.last_timestamp_ms.max(header.max_timestamp).max(now_ms);
        if p.batches.len() == MAX_REMEMBERED_BATCHES {
            p.batches.pop_front();
        }
        p.batches.push_back(batch);
    }

    /// `producer_id`'s epoch and the sequence its next batch must start at, if the
    /// partition has its state (none: a new producer, which starts at 0). Expiry is not
    /// looked at: a hint for callers that order batches, never a check.
    pub fn next_sequence(&self, producer_id: i64) -> Option<(i16, i32)> {
        let p = self.producers.get(&producer_id)?;
        Some((
            p.epoch,
            p.batches.back().map_or(0, |b| advance(b.last_sequence, 1)),
        ))
    }

    /// Counts `header`'s batch, appended at `base_offset` before a restart and replayed
    /// now, as active at the state's clock: a replicated partition's replay of an entry whose
    /// records the log holds already, after [`ProducerStates::advance`] with its clock (the
    /// rebuild from the log alone could not know it). Only the clock moves; a producer
    /// without state, or at another epoch, is left alone.
    pub fn touch(&mut self, header: &BatchHeader) {
        if let Some(p) = self.producers.get_mut(&header.producer_id) {
            if p.epoch == header.producer_epoch {
                p.last_timestamp_ms = p.last_timestamp_ms.max(self.clock_ms);
            }
        }
    }

    /// Drops every producer last active before the state's cutoff.
    pub fn sweep(&mut self) {
        let cutoff = self.cutoff_ms;
        self.producers.retain(|_, p| p.last_timestamp_ms >= cutoff);
    }

    /// Advances the state to the clock at `now_ms` ([`ProducerClock::at`]) and drops the
    /// producers last active more than `expiry_ms` before it: a single broker's sweep.
    pub fn expire(&mut self, now_ms: i64, expiry_ms: u64) {
        self.advance(ProducerClock::at(now_ms, expiry_ms));
        self.sweep();
    }

    /// Drops `producer_id`'s state if it was last active before the state's cutoff; one
    /// lookup. The append path calls it (after [`ProducerStates::advance`]) before
    /// [`ProducerStates::check`], so a producer idle past the expiry is treated as unknown
    /// at once, not only after the next sweep.
    pub fn expire_producer(&mut self, producer_id: i64) {
        let cutoff = self.cutoff_ms;
        if self
            .producers
            .get(&producer_id)
            .is_some_and(|p| p.last_timestamp_ms < cutoff)
        {
            self.producers.remove(&producer_id);
        }
    }

    /// The snapshot's bytes for this state as of `offset` (the state covers every batch
    /// below it).
    pub fn encode_snapshot(&self, offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&self.clock_ms.to_le_bytes());
        out.extend_from_slice(&self.cutoff_ms.to_le_bytes());
        out.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        let mut ids: Vec<_> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let p = &self.producers[&id];
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&p.epoch.to_le_bytes());
            out.extend_from_slice(&p.last_timestamp_ms.to_le_bytes());
            out.push(p.batches.len() as u8);
            for b in &p.batches {
                out.extend_from_slice(&b.first_sequence.to_le_bytes());
                out.extend_from_slice(&b.last_sequence.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.record_count.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a snapshot: the state and the offset it covers up to. `None` for anything
    /// that fails a check (the caller then replays the log from its start).
    pub fn decode_snapshot(bytes: &[u8]) -> Option<(ProducerStates, u64)> {
        let (body, crc) = bytes.split_last_chunk::<4>()?;
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return None;
        }
        let mut c = Cursor(body);
        if c.take(4)? != SNAPSHOT_MAGIC {
            return None;
        }
        let version = *c.take(1)?.first()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) || c.take(3)? != [0; 3] {
            return None;
        }
        let offset = c.u64()?;
        let (clock_ms, cutoff_ms) = if version >= 2 {
            (c.u64()? as i64, c.u64()? as i64)
        } else {
            (i64::MIN, i64::MIN)
        };
        let count = c.u32()?;
        let mut producers = HashMap::new();
        for _ in 0..count {
            let id = c.u64()? as i64;
            let epoch = c.u16()? as i16;
            let last_timestamp_ms = c.u64()? as i64;
            let n = usize::from(*c.take(1)?.first()?);
            if n == 0 || n > MAX_REMEMBERED_BATCHES {
                return None;
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                batches.push_back(RememberedBatch {
                    first_sequence: c.u32()? as i32,
                    last_sequence: c.u32()? as i32,
                    base_offset: c.u64()?,
                    record_count: c.u32()?,
                });
            }
            producers.insert(
                id,
                Producer {
                    epoch,
                    last_timestamp_ms,
                    batches,
                },
            );
        }
        if !c.0.is_empty() {
            return None;
        }
        Some((
            ProducerStates {
                producers,
                clock_ms,
                cutoff_ms,
            },
            offset,
        ))
    }
}

/// Writes the snapshot of `states` as of `offset` into the partition folder `dir`,
/// atomically and durably. Blocking.
pub fn write_snapshot(dir: &Path, states: &ProducerStates, offset: u64) -> Result<()> {
    fsutil::atomic_write(&dir.join(SNAPSHOT_FILE), &states.encode_snapshot(offset))
}

/// The offset a snapshot's bytes (see [`ProducerStates::encode_snapshot`]) cover up to, if
/// they pass every check of [`ProducerStates::decode_snapshot`].
pub fn snapshot_offset(bytes: &[u8]) -> Option<u64> {
    ProducerStates::decode_snapshot(bytes).map(|(_, offset)| offset)
}

/// Reads the snapshot in `dir`, if there is a valid one. A damaged one is ignored (and
/// logged): the log is the truth, and replaying it from the start rebuilds the same state.
pub fn read_snapshot(dir: &Path) -> Option<(ProducerStates, u64)> {
    read_state_file(&dir.join(SNAPSHOT_FILE))
}

/// Writes the adopted state `states` as of `offset` into the partition folder `dir` as
/// [`BASE_FILE`], atomically and durably. Blocking.
pub fn write_base(dir: &Path, states: &ProducerStates, offset: u64) -> Result<()> {
    fsutil::atomic_write(&dir.join(BASE_FILE), &states.encode_snapshot(offset))
}

/// Reads the adopted state in `dir` ([`BASE_FILE`]), if there is a valid one. A damaged one
/// is ignored and logged, as a damaged snapshot is.
pub fn read_base(dir: &Path) -> Option<(ProducerStates, u64)> {
    read_state_file(&dir.join(BASE_FILE))
}

/// Records, durably, that the log in `dir` holds no complete producer state
/// ([`MISSING_FILE`]). Blocking.
pub(crate) fn write_missing_marker(dir: &Path) -> Result<()> {
    fsutil::atomic_write(&dir.join(MISSING_FILE), &[])
}

/// Deletes `name` from the partition folder `dir` if it is there (the caller syncs the
/// folder).
pub(crate) fn remove_file(dir: &Path, name: &'static str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove producer state file", path, e)),
    }
}

fn read_state_file(path: &Path) -> Option<(ProducerStates, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "producer state file unreadable; replaying the log");
            return None;
        }
    };
    let decoded = ProducerStates::decode_snapshot(&bytes);
    if decoded.is_none() {
        tracing::warn!(path = %path.display(), "producer state file damaged; replaying the log");
    }
    decoded
}

/// The storage error for a refused idempotent batch.
pub(crate) fn refused(topic: &str, partition: u32, source: ProducerError) -> StorageError {
    StorageError::ProducerRefused {
        topic: topic.to_string(),
        partition,
        source,
    }
}

#[cfg(test)]
mod clock_tests;
#[cfg(test)]
mod tests;
