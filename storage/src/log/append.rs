//! Appends: the checks, the fast path that async callers run inline, the blocking path that
//! does the file work an append may need, and what an append still owes its acknowledgement.
//!
//! The writer lock covers only what must be serialized: choosing the offsets, one `pwrite`
//! into the page cache, the index entries, and (in a roll) sealing the old segment in memory
//! and renaming the spare's files. Everything slower runs before the lock is taken, on the
//! caller's (blocking) thread: removing the clean-shutdown marker and syncing the folder,
//! growing the file by a preallocated chunk, and creating the next segment's files (a
//! [`Spare`]). So an async caller can try [`PartitionLog::try_append`] inline, and only go to
//! a blocking thread when it answers `None`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{now_ms, AppendInfo, PartitionLog};
use crate::batch::{BatchError, BatchHeader, BatchView};
use crate::config::FlushPolicy;
use crate::error::{Result, StorageError};
use crate::producers;
use crate::producers::ProducerClock;
use crate::recovery;
use crate::segment::{Room, Segment, Spare};

/// How long [`PartitionLog::try_append`] waits for the writer lock before it leaves the append
/// to a blocking thread. Holders do at most one `pwrite`, so a longer wait means a very large
/// batch or heavy contention, and the async worker should not be the one waiting.
const FAST_PATH_LOCK_WAIT: Duration = Duration::from_micros(200);

/// How many rounds of file work (grow, create a spare, roll) an append tries before giving up.
/// Each round makes room for some append; only a storm of concurrent rolls needs more than 3.
const MAX_APPEND_ROUNDS: usize = 64;

/// What the producer state decided for a batch.
enum Verdict<T> {
    Append,
    Duplicate(T),
}

/// Whether an append is decided by the producers' state, and by which clock.
#[derive(Debug, Clone, Copy)]
enum ProducerCheck {
    /// Decided by the state, with the clock the append's entry brings (see
    /// [`PartitionLog::append_verified_at`]; none for a single broker's append).
    By(Option<ProducerClock>),
    /// Not decided: a batch copied from another replica, which committed it.
    Skip,
}

/// How an append is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ack {
    /// Once the batch is in the log (the page cache): it survives a process crash. A topic
    /// flushed `always` still waits for a sync.
    #[default]
    Leader,
    /// Once a sync covers the batch: it survives a power loss.
    Durable,
}

/// A batch that passed the checks an append makes (size, length, checksum, structure), so the
/// append does not check it again. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CheckedBatch {
    bytes: Bytes,
    header: BatchHeader,
}

impl CheckedBatch {
    /// The encoded batch.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: an empty batch does not pass the checks.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Its header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// How many records it holds.
    pub fn record_count(&self) -> u32 {
        self.header.record_count
    }
}

/// An append that is in the log but not yet acknowledgeable: hand it to
/// [`PartitionLog::settle`], which waits for the sync the ack or the flush policy needs and
/// returns the offsets to acknowledge.
#[must_use = "an append is acknowledged only with what `PartitionLog::settle` returns"]
#[derive(Debug, Clone, Copy)]
pub struct Unsettled {
    info: AppendInfo,
    needs_sync: bool,
    duplicate: bool,
}

impl Unsettled {
    /// The offsets given, for waking readers at once (the batch is readable already). Not for
    /// acknowledging: use what [`PartitionLog::settle`] returns.
    pub fn info(&self) -> &AppendInfo {
        &self.info
    }

    /// True when the batch was an idempotent producer's retry of a batch already in the log:
    /// nothing was appended, and [`Unsettled::info`] holds the original offsets.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }

    /// True when settling waits for a sync (a blocking call): the ack asked for `durable`, or
    /// the topic is flushed `always`.
    pub fn needs_sync(&self) -> bool {
        self.needs_sync
    }
}

impl PartitionLog {
    /// Checks a batch for this partition: its size against
    /// [`super::LogOptions::effective_max_batch_bytes`], then its length, checksum and
    /// structure. A bad batch changes nothing.
    pub fn check_batch(&self, bytes: Bytes) -> Result<CheckedBatch> {
        let header = self.check(&bytes, true)?;
        Ok(CheckedBatch { bytes, header })
    }

    /// Checks a batch whose checksum and records were verified before, by
    /// [`PartitionLog::check_batch`] on the broker that took it from its producer: its size,
    /// header and length only. A replicated partition's apply runs on every replica, and the
    /// bytes it applies are the ones the leader verified (a Raft log frame has a checksum of
    /// its own), so a batch is verified once rather than once per replica, and a compressed
    /// one is not decompressed on each.
    pub fn check_verified_batch(&self, bytes: Bytes) -> Result<CheckedBatch> {
        let header = self.check(&bytes, false)?;
        Ok(CheckedBatch { bytes, header })
    }

    /// The batch's header after checking its size and length, and when `verify` its
    /// checksum and every record.
    fn check(&self, batch: &[u8], verify: bool) -> Result<BatchHeader> {
        let inner = &*self.inner;
        let max_bytes = inner.options.effective_max_batch_bytes();
        if batch.len() > max_bytes {
            return Err(StorageError::BatchTooLarge {
                topic: inner.id.topic.clone(),
                partition: inner.id.partition,
                size_bytes: batch.len(),
                max_bytes,
            });
        }
        let invalid = |source| StorageError::InvalidBatch {
            topic: inner.id.topic.clone(),
            partition: inner.id.partition,
            source,
        };
        let view = BatchView::parse(batch).map_err(invalid)?;
        if verify {
            // A compressed batch is held to the same limit once decompressed, so a small
            // batch that decompresses to gigabytes (a bomb) is refused.
            view.validate_within(max_bytes).map_err(invalid)?;
        }
        let header = *view.header();
        if header.total_len() != batch.len() {
            return Err(invalid(BatchError::BadLength));
        }
        Ok(header)
    }

    /// Appends one encoded batch (see `storage/FORMAT.md`) with a `leader` ack: checks it,
    /// assigns its offsets, writes it, and returns once the flush policy is satisfied (with
    /// `always`, after a sync). Blocking. See [`PartitionLog::append_acked`].
    pub fn append(&self, batch: &[u8]) -> Result<AppendInfo> {
        self.append_acked(batch, Ack::Leader)
    }

    /// Appends one encoded batch and returns once it is as durable as `ack` and the flush
    /// policy require. The batch is checked first; a bad one changes nothing
    /// ([`StorageError::InvalidBatch`], [`StorageError::BatchTooLarge`]). Blocking: it may
    /// grow the file, roll, and sync.
    pub fn append_acked(&self, batch: &[u8], ack: Ack) -> Result<AppendInfo> {
        let header = self.check(batch, true)?;
        let unsettled = self.append_blocking(batch, &header, ack, ProducerCheck::By(None))?;
        self.settle(unsettled)
    }

    /// Appends a batch copied from another replica of this partition, which committed it
    /// (a replica's catch-up pull): checked like [`PartitionLog::append`], and its producer
    /// fields recorded, but not checked against the producers' state. The copy must land as
    /// the source stored it, and a log restarted at the source's log start
    /// ([`PartitionLog::restart_at`]) has no state for producers whose earlier batches were
    /// deleted (their next sequence would be refused as a gap) until it adopts the source's
    /// ([`PartitionLog::restore_producers`]), which replaces the state the copies built.
    /// Blocking.
    pub fn append_copy(&self, batch: &[u8]) -> Result<AppendInfo> {
        let header = self.check(batch, true)?;
        if self.entry_clock() && !self.producer_state_missing() {
            // The copy's entry, and so its clock, is not here: the state it builds is not
            // the one its replicas hold, until the replica adopts a source's.
            self.mark_producers_missing()?;
        }
        let unsettled = self.append_blocking(batch, &header, Ack::Leader, ProducerCheck::Skip)?;
        self.settle(unsettled)
    }

    /// [`PartitionLog::append`] of a batch verified before, checked as
    /// [`PartitionLog::check_verified_batch`] checks it: a replicated partition's apply,
    /// which must decide alike whether it appends inline or here.
    pub fn append_verified(&self, batch: &[u8]) -> Result<AppendInfo> {
        self.append_verified_at(batch, None)
    }

    /// [`PartitionLog::append_verified`] with the clock its entry brings: in a log that
    /// uses it ([`PartitionLog::use_entry_clock`]), the producer state decides by `clock`
    /// (none: by the clock the state holds) and never by this broker's.
    pub fn append_verified_at(
        &self,
        batch: &[u8],
        clock: Option<ProducerClock>,
    ) -> Result<AppendInfo> {
        let header = self.check(batch, false)?;
        let unsettled =
            self.append_blocking(batch, &header, Ack::Leader, ProducerCheck::By(clock))?;
        self.settle(unsettled)
    }

    /// Appends `batch` if that needs no blocking work: no clean-shutdown marker to remove, no
    /// file to grow, no roll, and the writer lock free within a few hundred microseconds.
    /// Then the only file work is one `pwrite` into the page cache. Answers `None`, having
    /// changed nothing, when the append needs more: run [`PartitionLog::append_checked`] on a
    /// blocking thread then. Errors are as for [`PartitionLog::append_checked`].
    pub fn try_append(&self, batch: &CheckedBatch, ack: Ack) -> Result<Option<Unsettled>> {
        self.try_append_at(batch, ack, None)
    }

    /// [`PartitionLog::try_append`] with the clock its entry brings (as
    /// [`PartitionLog::append_verified_at`] takes it).
    pub fn try_append_at(
        &self,
        batch: &CheckedBatch,
        ack: Ack,
        clock: Option<ProducerClock>,
    ) -> Result<Option<Unsettled>> {
        let inner = &*self.inner;
        if inner.marker_present.load(Ordering::Acquire) {
            return Ok(None);
        }
        let Some(_w) = inner.writer.try_lock_for(FAST_PATH_LOCK_WAIT) else {
            return Ok(None);
        };
        self.check_writable()?;
        self.check_nothing_staged()?;
        let active = self.active();
        if self.room_for(&active, batch.len() as u64, now_ms()) != Room::Ready {
            return Ok(None);
        }
        Ok(Some(match self.producer_verdict(&batch.header, clock)? {
            Verdict::Duplicate(info) => self.unsettled(info, ack, true),
            Verdict::Append => {
                let info = self.write_locked(&active, &batch.bytes, &batch.header)?;
                self.unsettled(info, ack, false)
            }
        }))
    }

    /// Appends a checked batch, doing whatever file work that needs first (removing the
    /// clean-shutdown marker, growing the file, rolling to a new segment), none of it under
    /// the writer lock. Blocking; never syncs the batch itself: pass the result to
    /// [`PartitionLog::settle`]. A full disk is [`StorageError::NoSpace`] and changes nothing;
    /// only a failed write of the batch fences the partition.
    pub fn append_checked(&self, batch: &CheckedBatch, ack: Ack) -> Result<Unsettled> {
        self.append_blocking(&batch.bytes, &batch.header, ack, ProducerCheck::By(None))
    }

    /// Returns the offsets to acknowledge once `unsettled` is as durable as its ack and the
    /// flush policy require: at once when no sync is needed, else after a group-commit sync
    /// (blocking).
    pub fn settle(&self, unsettled: Unsettled) -> Result<AppendInfo> {
        if unsettled.needs_sync {
            self.sync_through(unsettled.info.next_offset)?;
        }
        Ok(unsettled.info)
    }

    fn unsettled(&self, info: AppendInfo, ack: Ack, duplicate: bool) -> Unsettled {
        Unsettled {
            info,
            // A duplicate waits too: its original may not be synced yet.
            needs_sync: ack == Ack::Durable || self.inner.options.flush == FlushPolicy::Always,
            duplicate,
        }
    }

    /// The append; `check_producer` says whether the producers' state decides if the batch
    /// is appended, answered as a duplicate, or refused, and by which clock.
    fn append_blocking(
        &self,
        batch: &[u8],
        header: &BatchHeader,
        ack: Ack,
        check_producer: ProducerCheck,
    ) -> Result<Unsettled> {
        let inner = &*self.inner;
        let len = batch.len() as u64;
        self.remove_clean_marker()?;
        // Each round either writes, or finds what is missing and does that file work without
        // the lock, then looks again: growing leaves room for the batch, and a roll leaves an
        // empty segment, which holds any batch that passed the size check.
        for _ in 0..MAX_APPEND_ROUNDS {
            let (active, room) = {
                let _w = inner.writer.lock();
                self.check_writable()?;
                self.check_nothing_staged()?;
                let active = self.active();
                let room = self.room_for(&active, len, now_ms());
                match room {
                    Room::Ready => {
                        let verdict = match check_producer {
                            ProducerCheck::By(clock) => self.producer_verdict(header, clock)?,
                            ProducerCheck::Skip => Verdict::Append,
                        };
                        return Ok(match verdict {
                            Verdict::Duplicate(info) => self.unsettled(info, ack, true),
                            Verdict::Append => {
                                let info = self.write_locked(&active, batch, header)?;
                                self.unsettled(info, ack, false)
                            }
                        });
                    }
                    Room::Full if active.size_bytes() == 0 => {
                        // Cannot happen after the size check; refuse rather than roll onto the
                        // same base offset.
                        return Err(StorageError::BatchTooLarge {
                            topic: inner.id.topic.clone(),
                            partition: inner.id.partition,
                            size_bytes: batch.len(),
                            max_bytes: usize::try_from(active.capacity_bytes())
                                .unwrap_or(usize::MAX),
                        });
                    }
                    Room::Full => {
                        // `try_lock`: a spare being created is not waited for under the lock.
                        let spare = inner.spare.try_lock().and_then(|mut s| s.take());
                        if let Some(spare) = spare {
                            self.roll_locked(spare)?;
                            continue;
                        }
                    }
                    Room::Grow => {}
                }
                (active, room)
            };
            match room {
                Room::Grow => active.grow_for(len)?,
                _ => self.prepare_spare()?,
            }
        }
        Err(StorageError::io(
            "append",
            &inner.dir,
            std::io::Error::other(format!(
                "found no room for the batch after {MAX_APPEND_ROUNDS} rolls"
            )),
        ))
    }

    /// Whether the active segment takes `len` more bytes now; a segment older than
    /// `segment_ms` (and not empty) counts as full.
    fn room_for(&self, active: &Segment, len: u64, now: i64) -> Room {
        let age_ms = now.saturating_sub(active.created_ms());
        let too_old = active.size_bytes() > 0
            && u64::try_from(age_ms).is_ok_and(|age| age >= self.inner.options.segment_ms);
        if too_old {
            Room::Full
        } else {
            active.room(len)
        }
    }

    /// What the producer state says of `header`'s batch, as an error when it is refused.
    /// Called with the writer lock held, so the verdict still holds at the write. A retry of
    /// a remembered batch is answered with that batch's offsets (a full duplicate: the same
    /// first and last sequence).
    ///
    /// The clock moves first: the entry's `clock` in a log that uses entry clocks (none:
    /// the state's stays), this broker's for an idempotent batch otherwise. A refused batch
    /// moves it too, as it does on every replica.
    fn producer_verdict(
        &self,
        header: &BatchHeader,
        clock: Option<ProducerClock>,
    ) -> Result<Verdict<AppendInfo>> {
        let inner = &*self.inner;
        let mut states = inner.producers.lock();
        let clock = if self.entry_clock() {
            clock
        } else if header.producer_id >= 0 {
            self.local_clock()
        } else {
            None // a plain batch changes no producer state: no clock read
        };
        match states.decide(header, clock) {
            Ok(producers::Verdict::Append) => Ok(Verdict::Append),
            Ok(producers::Verdict::Duplicate(b)) => {
                let next_offset = b.base_offset + u64::from(b.record_count);
                Ok(Verdict::Duplicate(AppendInfo {
                    base_offset: b.base_offset,
                    last_offset: next_offset.saturating_sub(1),
                    next_offset,
                    record_count: b.record_count,
                }))
            }
            Err(e) => Err(producers::refused(&inner.id.topic, inner.id.partition, e)),
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if let Some(reason) = self.fenced_reason() {
            return Err(StorageError::Fenced {
                topic: self.inner.id.topic.clone(),
                partition: self.inner.id.partition,
                reason,
            });
        }
        Ok(())
    }

    /// Writes the batch into `active` at the high watermark and publishes it. Called with
    /// the writer lock held and [`Room::Ready`].
    fn write_locked(
        &self,
        active: &Segment,
        batch: &[u8],
        header: &BatchHeader,
    ) -> Result<AppendInfo> {
        let inner = &*self.inner;
        let base_offset = inner.high_watermark.load(Ordering::Relaxed);
        if let Err(e) = active.append(batch, base_offset, header) {
            // A failed write (not a full disk, not a refusal) means the disk can no longer be
            // trusted with this partition.
            if matches!(e, StorageError::Io { .. }) {
                self.fence(format!("write failed: {e}"));
            }
            return Err(e);
        }
        let next_offset = base_offset + u64::from(header.record_count);
        if header.producer_id >= 0 {
            inner.producers.lock().appended(header, base_offset);
        }
        inner.high_watermark.store(next_offset, Ordering::Release);
        Ok(AppendInfo {
            base_offset,
            last_offset: next_offset - 1,
            next_offset,
            record_count: header.record_count,
        })
    }

    /// Starts a new segment at the high watermark from `spare`, and seals the old one in
    /// memory. Called with the writer lock held; does three renames and no other file work.
    /// Nothing is synced here: the sealed segment, the new names and the recovery point are
    /// made durable by the next sync or checkpoint. A failed rename changes nothing and does
    /// not fence (no data is at risk); the next append tries again with a new spare.
    fn roll_locked(&self, spare: Spare) -> Result<()> {
        let inner = &*self.inner;
        let old = self.active();
        let base = inner.high_watermark.load(Ordering::Relaxed);
        let segment = Arc::new(Segment::from_spare(
            spare,
            Arc::clone(&inner.id),
            &inner.dir,
            base,
            now_ms(),
        )?);
        old.seal();
        // Before the new list is visible: whoever sees the new segment also sees that the
        // folder needs a sync before anything in it counts as durable.
        inner.checkpoint_due.store(true, Ordering::Release);
        let mut list = Vec::clone(&inner.segments.load());
        list.push(segment);
        inner.segments.store(Arc::new(list));
        Ok(())
    }

    /// Creates the next segment's files unless a spare is ready. Blocking; not under the
    /// writer lock.
    fn prepare_spare(&self) -> Result<()> {
        let inner = &*self.inner;
        let mut spare = inner.spare.lock();
        if spare.is_none() {
            inner.faults.before_roll();
            *spare = Some(Segment::create_spare(
                &inner.id,
                &inner.dir,
                inner.options.segment_bytes,
            )?);
        }
        Ok(())
    }

    /// Removes the clean-shutdown marker, durably, before the first write after a clean open.
    /// Blocking (an unlink and a folder sync), not under the writer lock; appenders that need
    /// it gone wait for it here, since none may write before it is.
    pub(super) fn remove_clean_marker(&self) -> Result<()> {
        let inner = &*self.inner;
        if !inner.marker_present.load(Ordering::Acquire) {
            return Ok(());
        }
        let _m = inner.marker_lock.lock();
        if inner.closed.load(Ordering::Acquire) {
            // Close may have written a fresh marker: leave it.
            return Err(StorageError::Closed);
        }
        if inner.marker_present.load(Ordering::Acquire) {
            inner.faults.before_sync();
            recovery::remove_clean_marker(&inner.dir)?;
            inner.marker_present.store(false, Ordering::Release);
        }
        Ok(())
    }
}
