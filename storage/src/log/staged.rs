//! Staged appends: batches written to the log ahead of their publication, for a replicated
//! partition whose partition log holds a Raft entry's batch from the moment the entry is
//! appended to the Raft log (so the batch is written once, not twice), but which readers may
//! see only once the entry commits.
//!
//! - [`PartitionLog::stage`] writes a plain batch after the last staged one (or the high
//!   watermark) in the active segment: one `pwrite` into the page cache, with the batch's
//!   base offset stamped and a staged magic (see `segment/staged.rs`). Nothing is published:
//!   reads, the high watermark and every scan ignore it. It never rolls or grows a file: a
//!   batch that does not fit as things are is not staged (`None`), and the caller keeps it
//!   elsewhere.
//! - [`PartitionLog::stage_at`] stages an idempotent producer's batch too, with the clock
//!   its entry brings, when the producer state its publish will find says `Append`: the
//!   published state moved by the staged batches before it (see "Idempotent batches").
//! - [`PartitionLog::publish_staged`] publishes staged batches in order (their magic made
//!   `RL`, then indexed and published as an append would be, an idempotent batch's producer
//!   state recorded).
//! - [`PartitionLog::unstage_from`] drops staged batches from an offset on (a Raft log's
//!   diverged tail), and [`PartitionLog::staged_batch`] reads one back.
//! - After a restart, the staged batches found right after the published ones are only
//!   candidates: [`PartitionLog::restage`] takes those the caller still vouches for (its
//!   Raft log still holds their entries) and forgets the rest.
//!
//! While batches are staged, the published end cannot move by any other way: an append or a
//! restart fails with [`StorageError::Staged`]. So staged batches are always in the active
//! segment, back to back after the published bytes.
//!
//! **Idempotent batches.** An append decides an idempotent batch by the producer state as
//! it stands, moved by the entry's clock ([`ProducerStates::decide`]). A staged batch is
//! published later, after the batches staged before it, and nothing else moves the state in
//! between (the published end moves only by publishing). So the state its publish will find
//! is known at the stage: the published state, with the clock of each staged batch before
//! it and the effect of those of the same producer. The stage decides by that projection
//! and stages only an `Append`; a retry or a refusal is left to the caller (kept whole, it
//! is decided at its apply). The publish decides again, by the real state, and records the
//! batch; a verdict other than `Append` there is a bug, and it fences the partition rather
//! than publish a batch the state would have refused. Only a log of entry clocks
//! ([`PartitionLog::use_entry_clock`]) with its producer state complete stages them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{now_ms, PartitionLog};
use crate::batch::BatchHeader;
use crate::error::{Result, StorageError};
use crate::log::append::CheckedBatch;
use crate::producers::{ProducerClock, ProducerStates, Verdict};
use crate::segment::{Room, Segment, StagedAt};

/// How long [`PartitionLog::stage`] waits for the writer lock before it declines.
const STAGE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

/// A staged batch as its stager names it: enough to know it again after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedBatch {
    /// The offset given to its first record.
    pub base_offset: u64,
    /// How many records it holds.
    pub record_count: u32,
    /// Its length in bytes.
    pub len: u32,
    /// Its checksum (the header's CRC field).
    pub crc: u32,
}

impl StagedBatch {
    /// The offset after its last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    fn of(staged: &StagedAt) -> Self {
        StagedBatch {
            base_offset: staged.header.base_offset,
            record_count: staged.header.record_count,
            len: u32::try_from(staged.header.total_len()).unwrap_or(u32::MAX),
            crc: staged.header.crc,
        }
    }
}

/// One staged batch: where it lies, and the clock its entry brought (an idempotent
/// producer's batch; its publish decides by it).
#[derive(Debug, Clone, Copy)]
struct Staged {
    at: StagedAt,
    clock: Option<ProducerClock>,
}

impl Staged {
    fn header(&self) -> &BatchHeader {
        &self.at.header
    }
}

/// Staged batches of a log, behind their own lock, changed only under the writer lock.
#[derive(Debug, Default)]
pub(super) struct Staging {
    /// Staged batches, in offset order, right after the published ones.
    batches: VecDeque<Staged>,
    /// Staged batches found at open, not yet vouched for ([`PartitionLog::restage`]).
    candidates: Vec<StagedAt>,
    /// The segments written by stages since the last [`PartitionLog::sync_staged`]: the
    /// batches staged there, published since or not, may not be on disk yet. A batch published
    /// before a roll lies in a sealed segment by the time of the sync, so the segment is kept,
    /// not found again as the active one.
    unsynced: Vec<std::sync::Arc<Segment>>,
}

impl Staging {
    /// Where the next staged batch goes in `active` (the log's active segment, whose
    /// published records end at offset `published`): its byte position and base offset.
    fn end(&self, active: &Segment, published: u64) -> (u64, u64) {
        match self.batches.back() {
            Some(last) => (last.at.end(), last.header().next_offset()),
            None => (active.size_bytes(), published),
        }
    }

    /// What the producer state will decide for `header`'s batch with `clock` when it is
    /// published after the staged batches: `published` (the log's state) moved by each
    /// staged batch's clock and by the effect of those of the same producer (see the module
    /// docs). Changes nothing.
    fn project(
        &self,
        published: &ProducerStates,
        header: &BatchHeader,
        clock: Option<ProducerClock>,
    ) -> std::result::Result<Verdict, crate::producers::ProducerError> {
        let mut states = published.only(header.producer_id);
        for staged in &self.batches {
            if staged.header().producer_id == header.producer_id {
                // Each was staged as an `Append` by this same projection.
                states.decide(staged.header(), staged.clock)?;
                states.appended(staged.header(), staged.header().base_offset);
            } else if let Some(clock) = staged.clock {
                states.advance(clock);
            }
        }
        states.decide(header, clock)
    }
}

impl PartitionLog {
    /// Reads the staged batches that follow the published ones at open, as candidates for
    /// [`PartitionLog::restage`].
    pub(super) fn find_staged_candidates(&self) {
        let active = self.active();
        let run = active.staged_run(active.size_bytes(), active.next_offset());
        self.inner.staging.lock().candidates = run;
    }

    /// The offset after the last staged batch, or the high watermark when none is staged:
    /// where the next staged batch (or append) goes.
    pub fn log_end(&self) -> u64 {
        let staging = self.inner.staging.lock();
        staging
            .batches
            .back()
            .map_or_else(|| self.high_watermark(), |s| s.header().next_offset())
    }

    /// The staged batches, oldest first.
    pub fn staged(&self) -> Vec<StagedBatch> {
        let staging = self.inner.staging.lock();
        staging
            .batches
            .iter()
            .map(|s| StagedBatch::of(&s.at))
            .collect()
    }

    /// Stages a plain batch (no producer id) after the last staged one: written, not
    /// published (see the module docs). `None`, having changed nothing, when it cannot be
    /// done as things are: an idempotent producer's batch (see [`PartitionLog::stage_at`]),
    /// the file to grow or a roll due, the clean-shutdown marker still to remove, or the
    /// writer lock busy for a few hundred microseconds. Never blocks on file work beyond the
    /// one `pwrite`.
    pub fn stage(&self, batch: &CheckedBatch) -> Result<Option<StagedBatch>> {
        self.stage_at(batch, None)
    }

    /// [`PartitionLog::stage`] with the clock the batch's entry brings, which an idempotent
    /// producer's batch needs: it is staged when the log goes by entry clocks, its producer
    /// state is complete, and the state its publish will find says `Append` (see the module
    /// docs). A retry of a batch in the log, or one the state refuses, is not staged
    /// (`None`): its append answers or refuses it.
    pub fn stage_at(
        &self,
        batch: &CheckedBatch,
        clock: Option<ProducerClock>,
    ) -> Result<Option<StagedBatch>> {
        let inner = &*self.inner;
        let idempotent = batch.header().producer_id >= 0;
        if inner.marker_present.load(Ordering::Acquire)
            || (idempotent
                && (clock.is_none() || !self.entry_clock() || self.producer_state_missing()))
        {
            return Ok(None);
        }
        let Some(_w) = inner.writer.try_lock_for(STAGE_LOCK_WAIT) else {
            return Ok(None);
        };
        self.check_writable()?;
        let active = self.active();
        let mut staging = inner.staging.lock();
        staging.candidates.clear();
        if idempotent {
            let published = inner.producers.lock();
            let verdict = staging.project(&published, batch.header(), clock);
            if verdict != Ok(Verdict::Append) {
                return Ok(None);
            }
        }
        let (pos, base) = staging.end(&active, self.high_watermark());
        let len = batch.len() as u64;
        let age_ms = now_ms().saturating_sub(active.created_ms());
        let too_old = active.size_bytes() > 0
            && u64::try_from(age_ms).is_ok_and(|age| age >= inner.options.segment_ms);
        if too_old || active.room_at(pos, len) != Room::Ready {
            return Ok(None);
        }
        if let Err(e) = active.write_staged(pos, batch.bytes(), base) {
            if matches!(e, StorageError::Io { .. }) {
                self.fence(format!("staged write failed: {e}"));
            }
            return Err(e);
        }
        let mut header = *batch.header();
        header.base_offset = base;
        let staged = StagedAt {
            position: pos,
            header,
        };
        staging.batches.push_back(Staged { at: staged, clock });
        if !staging
            .unsynced
            .last()
            .is_some_and(|s| std::sync::Arc::ptr_eq(s, &active))
        {
            staging.unsynced.push(active.clone());
        }
        Ok(Some(StagedBatch::of(&staged)))
    }

    /// Publishes the staged batches that end at or below `through`, in order, and returns
    /// the high watermark after. `through` inside a staged batch publishes up to that batch.
    /// An idempotent batch's producer state is decided again and recorded; a verdict other
    /// than `Append` fences the partition (see the module docs).
    pub fn publish_staged(&self, through: u64) -> Result<u64> {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let active = self.active();
        let mut staging = inner.staging.lock();
        while let Some(first) = staging.batches.front().copied() {
            let header = first.header();
            if header.next_offset() > through {
                break;
            }
            let mut states = (header.producer_id >= 0).then(|| inner.producers.lock());
            if let Some(states) = states.as_mut() {
                let verdict = states.decide(header, first.clock);
                if verdict != Ok(Verdict::Append) {
                    let reason = format!(
                        "the staged batch at offset {} (producer {}, sequence {}) is no longer \
                         the next in sequence at its publish: {verdict:?}",
                        header.base_offset, header.producer_id, header.base_sequence
                    );
                    self.fence(reason.clone());
                    return Err(StorageError::Fenced {
                        topic: inner.id.topic.clone(),
                        partition: inner.id.partition,
                        reason,
                    });
                }
            }
            if let Err(e) = active.publish_staged(&first.at) {
                self.fence(format!("publishing a staged batch failed: {e}"));
                return Err(e);
            }
            if let Some(states) = states.as_mut() {
                states.appended(header, header.base_offset);
            }
            staging.batches.pop_front();
            inner
                .high_watermark
                .store(header.next_offset(), Ordering::Release);
        }
        Ok(self.high_watermark())
    }

    /// Drops the staged batches from `offset` on (`offset` must be where one starts, or the
    /// end of the staged ones), and returns how many were dropped. Their place is written
    /// again by the next stage or append.
    pub fn unstage_from(&self, offset: u64) -> Result<usize> {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let active = self.active();
        let mut staging = inner.staging.lock();
        let Some(first_dropped) = staging
            .batches
            .iter()
            .position(|s| s.header().base_offset >= offset)
        else {
            return Ok(0);
        };
        let at = staging.batches[first_dropped];
        if at.header().base_offset != offset {
            return Err(self.staged_error(offset, "is not where a staged batch starts"));
        }
        active.clear_staged(at.at.position)?;
        let dropped = staging.batches.len() - first_dropped;
        staging.batches.truncate(first_dropped);
        Ok(dropped)
    }

    /// The staged batch starting at `base_offset`, as it will read once published; `None`
    /// when no staged batch starts there.
    pub fn staged_batch(&self, base_offset: u64) -> Option<Bytes> {
        let _w = self.inner.writer.lock();
        let staging = self.inner.staging.lock();
        let staged = staging
            .batches
            .iter()
            .find(|s| s.header().base_offset == base_offset)?;
        self.active().staged_bytes(&staged.at).map(Bytes::from)
    }

    /// Takes the staged batches found at open that match `expected`, in order from the first
    /// (same base offset, length and checksum), as staged again, and forgets every other
    /// candidate. Returns how many were taken: `expected` past that is not in this log.
    /// Call before anything is staged or appended.
    pub fn restage(&self, expected: &[StagedBatch]) -> Result<usize> {
        let with_clocks: Vec<_> = expected.iter().map(|b| (*b, None)).collect();
        self.restage_at(&with_clocks)
    }

    /// [`PartitionLog::restage`] with each batch's entry clock (an idempotent producer's
    /// batch was staged with one, and its publish decides by it).
    pub fn restage_at(&self, expected: &[(StagedBatch, Option<ProducerClock>)]) -> Result<usize> {
        let inner = &*self.inner;
        let _w = inner.writer.lock();
        let active = self.active();
        let mut staging = inner.staging.lock();
        if !staging.batches.is_empty() {
            return Err(self.staged_error(self.high_watermark(), "is staged already"));
        }
        let candidates = std::mem::take(&mut staging.candidates);
        let taken = candidates
            .iter()
            .zip(expected)
            .take_while(|(found, (want, _))| StagedBatch::of(found) == *want)
            .count();
        if let Some(first_forgotten) = candidates.get(taken) {
            // A later open must not find it either.
            active.clear_staged(first_forgotten.position)?;
        }
        staging
            .batches
            .extend(
                candidates
                    .iter()
                    .zip(expected)
                    .take(taken)
                    .map(|(at, (_, clock))| Staged {
                        at: *at,
                        clock: *clock,
                    }),
            );
        if taken > 0 {
            // Found in the page cache after a crash: maybe not on disk.
            staging.unsynced.push(active.clone());
        }
        Ok(taken)
    }

    /// Bytes the active segment's file has allocated past the log's end (the last staged
    /// batch, or the published records): what stages can still take without file work.
    pub fn room_past_end(&self) -> u64 {
        let (active, end) = self.active_and_end();
        active.allocated_past(end)
    }

    /// Grows the active segment's file so that `bytes` more fit past the log's end (as far
    /// as the segment's size allows), so that stages need no file work. Blocking: run it on
    /// a blocking thread, beside stages and appends (growing runs without the writer lock).
    pub fn grow_ahead(&self, bytes: u64) -> Result<()> {
        let (active, end) = self.active_and_end();
        active.grow_at(end, bytes)
    }

    /// The active segment, and the byte position in it where the next staged batch goes.
    fn active_and_end(&self) -> (std::sync::Arc<Segment>, u64) {
        let active = self.active();
        let (end, _) = self
            .inner
            .staging
            .lock()
            .end(&active, self.high_watermark());
        (active, end)
    }

    /// Makes every batch staged so far durable, whether it is still staged or was published
    /// since: an fdatasync of each segment a stage wrote since the last call (the active
    /// one, and one sealed by a roll since). A caller that fsyncs a record of the stages
    /// (a Raft log's stubs) after this finds every batch it names on disk. Counts in
    /// [`PartitionLog::sync_count`]. Blocking. A failed sync fences the partition (fail-stop,
    /// as every sync of written data: a retry could report success without the pages).
    pub fn sync_staged(&self) -> Result<()> {
        let written = std::mem::take(&mut self.inner.staging.lock().unsynced);
        if !written.is_empty() {
            self.inner.faults.before_sync();
        }
        for segment in &written {
            let synced = self
                .inner
                .faults
                .take_sync_failure(&self.inner.dir)
                .and_then(|()| segment.sync_file());
            if let Err(e) = synced {
                self.fence(format!("syncing staged batches failed: {e}"));
                return Err(e);
            }
        }
        if !written.is_empty() {
            self.inner.syncs.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Fails with [`StorageError::Staged`] while batches are staged: the published end may
    /// then move only by publishing them. Called under the writer lock.
    pub(super) fn check_nothing_staged(&self) -> Result<()> {
        let staging = self.inner.staging.lock();
        match staging.batches.front() {
            None => Ok(()),
            Some(first) => Err(self.staged_error(first.header().base_offset, "is staged")),
        }
    }

    fn staged_error(&self, offset: u64, what: &'static str) -> StorageError {
        StorageError::Staged {
            topic: self.inner.id.topic.clone(),
            partition: self.inner.id.partition,
            offset,
            what,
        }
    }
}

#[cfg(test)]
#[path = "staged_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "staged_producer_tests.rs"]
mod producer_tests;
