//! The replica's state machine, [`PartitionMachine`], and the format of the commands it
//! applies: `[ack code: u8][token: u64 LE][clock][record batch]` (see [`encode_command`]).

use std::path::{Path, PathBuf};

use rill_storage::producers::ProducerClock;

use super::placement::PartitionPlacement;
use super::stub::{parse_stub, Stub, STUB_FLAG};
use super::*;
use crate::catch_up::AppliedPoint;
use crate::log_store::Placement;
use crate::machine::{AppliedPointReport, SnapshotBarrier};

/// The file in the group's folder holding the applied point this replica last learned
/// (see [`crate::catch_up::learn`]): bincode of an [`AppliedPoint`], written atomically.
const APPLIED_POINT_FILE: &str = "applied_point";

/// The bytes before the clock in a partition command: the ack code (`u8`) and the writer's
/// token (`u64` LE).
const COMMAND_HEADER_BYTES: usize = 9;
/// The ack code's bit that says the leader's producer clock follows the token: its clock and
/// its cutoff, both `i64` LE ms since the Unix epoch ([`ProducerClock`]).
pub(super) const CLOCK_FLAG: u8 = 0x80;
/// The bytes of the clock, when the flag is set.
const CLOCK_BYTES: usize = 16;

/// A partition command: `[ack code: u8][token: u64 LE][record batch]`, or with `clock`
/// (an idempotent producer's batch: the leader's clock decides its producer's expiry on every
/// replica, see `rill_storage::producers::ProducerClock`) the ack code's high bit set and
/// `[clock: i64 LE][cutoff: i64 LE]` before the batch.
pub(super) fn encode_command(
    ack: WriteAck,
    token: u64,
    clock: Option<ProducerClock>,
    batch: &[u8],
) -> Command {
    let mut bytes = Vec::with_capacity(COMMAND_HEADER_BYTES + CLOCK_BYTES + batch.len());
    match clock {
        None => {
            bytes.push(ack.code());
            bytes.extend_from_slice(&token.to_le_bytes());
        }
        Some(clock) => {
            bytes.push(ack.code() | CLOCK_FLAG);
            bytes.extend_from_slice(&token.to_le_bytes());
            bytes.extend_from_slice(&clock.now_ms.to_le_bytes());
            bytes.extend_from_slice(&clock.cutoff_ms.to_le_bytes());
        }
    }
    bytes.extend_from_slice(batch);
    Command(bytes.into())
}

/// A partition command taken apart (see [`encode_command`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Parts<'a> {
    /// The ack code, without the clock flag.
    pub(super) ack_code: u8,
    /// The writer's token.
    pub(super) token: u64,
    /// The leader's producer clock, for an idempotent batch.
    pub(super) clock: Option<ProducerClock>,
    /// The record batch.
    pub(super) batch: &'a [u8],
}

/// The parts of a partition command; `None` if it is too short.
pub(super) fn split_command(command: &Command) -> Option<Parts<'_>> {
    let (head, rest) = command.0.split_at_checked(COMMAND_HEADER_BYTES)?;
    if head[0] & STUB_FLAG != 0 {
        return None; // a stub: see `placement.rs`
    }
    let token = u64::from_le_bytes(head[1..].try_into().ok()?);
    let (clock, batch) = if head[0] & CLOCK_FLAG == 0 {
        (None, rest)
    } else {
        let (clock, batch) = rest.split_at_checked(CLOCK_BYTES)?;
        let (now, cutoff) = clock.split_at(8);
        let clock = ProducerClock {
            now_ms: i64::from_le_bytes(now.try_into().ok()?),
            cutoff_ms: i64::from_le_bytes(cutoff.try_into().ok()?),
        };
        (Some(clock), batch)
    };
    Some(Parts {
        ack_code: head[0] & !CLOCK_FLAG,
        token,
        clock,
        batch,
    })
}

/// The records a partition command adds when applied: its batch's record count, 0 for a
/// command the apply refuses.
pub(super) fn command_records(command: &Command) -> u64 {
    if let Some(stub) = parse_stub(command) {
        return u64::from(stub.batch.record_count);
    }
    split_command(command)
        .and_then(|parts| BatchHeader::parse(parts.batch).ok())
        .map_or(0, |h| u64::from(h.record_count))
}

#[path = "apply.rs"]
mod apply;

/// A replica's state machine: appends committed batches to its partition log.
pub struct PartitionMachine {
    topic: String,
    partition: u32,
    log: PartitionLog,
    next_offset: u64,
    local: Arc<dyn LocalTopics>,
    /// Where to pull records from when a snapshot is ahead of the log, and to learn an
    /// applied point from; none: fail instead.
    catch_up: Option<crate::catch_up::CatchUp>,
    /// The group's folder, where the learned applied point is kept (none: not kept).
    dir: Option<PathBuf>,
    /// The applied point learned last: the entries up to its index produced the records
    /// below its end (see [`PartitionMachine::below_log_start`]).
    point: Option<AppliedPoint>,
    /// The waiters of `leader` acks, keyed by command token (the group's start keeps a
    /// clone to register writes in).
    pub(super) waiters: AppendWaiters,
    /// Where the group's Raft log places its entries' batches (shared with the log store).
    placement: Arc<PartitionPlacement>,
}

impl PartitionMachine {
    /// This partition as the catch-up pulls name it: its topic, log and the broker's topics.
    fn catch_up_target(&self) -> crate::catch_up::Target<'_> {
        crate::catch_up::Target {
            topic: &self.topic,
            partition: self.partition,
            log: &self.log,
            local: self.local.as_ref(),
        }
    }

    /// The machine of partition `partition` of `topic` over `log`.
    pub fn new(
        topic: &str,
        partition: u32,
        log: PartitionLog,
        local: Arc<dyn LocalTopics>,
    ) -> Self {
        PartitionMachine {
            topic: topic.to_string(),
            partition,
            next_offset: 0,
            local,
            catch_up: None,
            dir: None,
            point: None,
            waiters: AppendWaiters::new(|c| split_command(c).map(|parts| parts.token)),
            placement: PartitionPlacement::new(log.clone()),
            log,
        }
    }

    /// Lets an installed snapshot pull the records this replica lacks from `catch_up`'s
    /// sources (see [`crate::catch_up`]).
    pub fn with_catch_up(mut self, catch_up: crate::catch_up::CatchUp) -> Self {
        self.catch_up = Some(catch_up);
        self
    }

    /// The end of the records the applied entries produced.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The end of the records the applied entries produced, when this replica knows it
    /// exactly: `None` while it answers entries up to a learned applied point as held (see
    /// [`PartitionMachine::below_log_start`]), whose records end somewhere below the point's
    /// end.
    pub fn exact_next_offset(&self) -> Option<u64> {
        let skipping = self.next_offset < self.log.log_start_offset()
            && self.point.is_some_and(|p| p.end > self.next_offset);
        (!skipping).then_some(self.next_offset)
    }

    /// Whether the log's batch at `offset` is the one `header` describes (same producer,
    /// epoch, sequence and record count: fields an append never rewrites).
    fn holds_at(&self, offset: u64, header: &BatchHeader) -> io::Result<bool> {
        let read = self
            .log
            .read(offset, rill_storage::batch::HEADER_LEN)
            .map_err(io::Error::other)?;
        let Some(stored) = read
            .chunks
            .first()
            .and_then(|chunk| BatchHeader::parse(chunk).ok())
        else {
            return Ok(false);
        };
        Ok(stored.base_offset == offset
            && stored.record_count == header.record_count
            && stored.producer_id == header.producer_id
            && stored.producer_epoch == header.producer_epoch
            && stored.base_sequence == header.base_sequence)
    }

    /// Applies entry `index` (whose batch is producer `producer_id`'s, negative for a plain
    /// batch) when the records it would have produced are below the log's start: deleted by retention, here or on the replica
    /// this one restarted its log from. `None`: the usual apply follows.
    ///
    /// An entry up to the learned applied point's index is held already (its records, if
    /// any, are below the point's end): answered, nothing appended, nothing read. Past that
    /// index the applied end moves to the point's end. A plain batch always appended, so the
    /// replay counts its records; an idempotent batch may have appended nothing (a retry, a
    /// refused sequence), and only its records could tell: the machine learns an applied
    /// point covering it from another replica first (see [`crate::catch_up::learn`]), and
    /// keeps it in its folder, so a restart replays the same entries without asking again.
    fn below_log_start(&mut self, index: u64, producer_id: i64) -> io::Result<Option<Reply>> {
        loop {
            if self.next_offset >= self.log.log_start_offset() {
                return Ok(None);
            }
            match self.point {
                Some(point) if index <= point.index => {
                    // No writer waits for this answer: entries up to the point were committed
                    // before this replica restarted (its writers' waits died with the process)
                    // or were proposed by another leader.
                    return Self::reply(&Err(Refusal::Invalid(format!(
                        "topic {} partition {}: the records of Raft entry {index} (below offset {}) were deleted here by retention (log start {}); its answer is not known here",
                        self.topic,
                        self.partition,
                        point.end,
                        self.log.log_start_offset()
                    ))))
                    .map(Some);
                }
                Some(point) if point.end > self.next_offset => {
                    self.next_offset = point.end;
                    continue;
                }
                _ => {}
            }
            if producer_id < 0 {
                return Ok(None);
            }
            let Some(catch_up) = &self.catch_up else {
                return Ok(None); // nowhere to ask: the replay's read fails
            };
            let target = self.catch_up_target();
            let point = crate::catch_up::learn(catch_up, &target, index)?;
            // The pulled records first, the point after: a point kept on disk always
            // describes records that survive a power loss.
            self.log
                .sync_through(self.log.high_watermark())
                .map_err(io::Error::other)?;
            if let Some(dir) = &self.dir {
                let bytes = bincode::serialize(&point).map_err(io::Error::other)?;
                crate::log_store::write_atomic(dir, APPLIED_POINT_FILE, &bytes)?;
            }
            self.point = Some(point);
        }
    }

    /// The reply to an append's outcome (the same for the blocking and the inline apply).
    fn appended(&mut self, outcome: rill_storage::Result<AppendInfo>) -> io::Result<Reply> {
        match outcome {
            Ok(info) => {
                // A producer's retry of a batch already appended is answered with its
                // original offsets and appends nothing: the applied end does not move back.
                self.next_offset = self.next_offset.max(info.next_offset);
                self.local
                    .appended(&self.topic, self.partition, info.next_offset);
                Self::reply(&Ok((info.base_offset, info.record_count)))
            }
            Err(e) => match Refusal::of(&e) {
                Some(refusal) => Self::reply(&Err(refusal)),
                None => Err(io::Error::other(e)),
            },
        }
    }

    fn reply(r: &WriteReply) -> io::Result<Reply> {
        bincode::serialize(r).map(Reply).map_err(io::Error::other)
    }
}

impl Machine for PartitionMachine {
    fn apply(&mut self, log_id: LogId, command: &Command) -> io::Result<Reply> {
        let reply = self.apply_entry(log_id, command);
        self.placement
            .applied(log_id.index, self.exact_next_offset());
        reply
    }

    /// The append, when it is one `pwrite` into the active segment's page cache (no roll, no
    /// file to grow, no sync, the writer lock free at once), as a single broker's produce
    /// does on its async worker, or the publication of a placed batch; `None` otherwise,
    /// having changed nothing. Replays, stubs and malformed commands go the blocking way,
    /// which answers them.
    fn try_apply_inline(&mut self, log_id: LogId, command: &Command) -> Option<io::Result<Reply>> {
        let reply = self.try_apply_entry_inline(log_id, command)?;
        self.placement
            .applied(log_id.index, self.exact_next_offset());
        Some(reply)
    }

    /// Makes the log's producer expiry go by the entries' clocks (for good: see
    /// `PartitionLog::use_entry_clock`), and reads the applied point learned before a
    /// restart, if any.
    fn open(&mut self, dir: &Path) -> io::Result<()> {
        self.log.use_entry_clock().map_err(io::Error::other)?;
        self.dir = Some(dir.to_path_buf());
        let path = dir.join(APPLIED_POINT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let point = bincode::deserialize(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                self.point = Some(point);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The last applied index and `next_offset`; while entries up to a learned point are
    /// being answered as held (the applied end is behind the log start), that point. With
    /// the log's producer state as of its end (at or past the point's end: the log never
    /// ends below the applied end), read while the machine is held, so no apply moves the
    /// log meanwhile.
    fn applied_point(&self, last_applied: Option<LogId>) -> Option<AppliedPointReport> {
        let last = last_applied?;
        let (index, end) = match self.point {
            Some(point)
                if point.index >= last.index && self.next_offset < self.log.log_start_offset() =>
            {
                (point.index, point.end)
            }
            _ => (last.index, self.next_offset),
        };
        Some(AppliedPointReport {
            index,
            end,
            producer_states: self.log.producer_snapshot().map(|(bytes, _)| bytes),
        })
    }

    /// The snapshot is `next_offset`.
    fn snapshot(&self) -> io::Result<Vec<u8>> {
        bincode::serialize(&self.next_offset).map_err(io::Error::other)
    }

    /// The records below the snapshot's end are synced before it is saved, because the Raft
    /// log is purged behind a snapshot: after a power loss they could not be re-applied. So
    /// is the producer snapshot, as of the log's end (past the snapshot's), since the entries'
    /// clocks go with the purged entries (`PartitionLog::checkpoint_producers`). This runs
    /// beside the applies: appends past the end go on meanwhile.
    fn snapshot_barrier(&self) -> Option<SnapshotBarrier> {
        let log = self.log.clone();
        let end = self.next_offset;
        Some(Box::new(move || {
            let covered = log.checkpoint_producers().map_err(io::Error::other)?;
            debug_assert!(covered >= end, "the log never ends below the applied end");
            Ok(())
        }))
    }

    fn restore(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.next_offset = bincode::deserialize(bytes).map_err(io::Error::other)?;
        Ok(())
    }

    /// Pulls the records below the snapshot's end that the log lacks (restarting it at a
    /// source's log start when retention deleted them there), then, if the log's producer
    /// state is missing (it restarted, now or in an earlier try), adopts a source's.
    ///
    /// Batches placed here for the snapshot's own entries are published instead of pulled
    /// (the same last log id: the same entries); any other staged batch is dropped first.
    fn install(&mut self, last: Option<LogId>, bytes: &[u8]) -> io::Result<()> {
        let next_offset: u64 = bincode::deserialize(bytes).map_err(io::Error::other)?;
        if self.placement.installing(last, next_offset)? {
            // Published up to the snapshot's end from what was placed here.
        } else if !self.log.staged().is_empty() {
            return Err(io::Error::other(format!(
                "topic {} partition {}: the snapshot up to {last:?} ends at offset {next_offset}, but the batches placed for it here end at {}",
                self.topic,
                self.partition,
                self.log.high_watermark()
            )));
        }
        if self.log.high_watermark() < next_offset {
            if let Some(catch_up) = &self.catch_up {
                let target = self.catch_up_target();
                crate::catch_up::pull(catch_up, &target, next_offset)?;
            }
        }
        // Also when the log reached the snapshot's end already: a crash may have come
        // between a restart of the log (by an earlier try of this install) and the adoption.
        if self.log.producer_state_missing() {
            if let Some(catch_up) = &self.catch_up {
                let target = self.catch_up_target();
                crate::catch_up::adopt_producer_state(catch_up, &target)?;
            }
        }
        self.next_offset = next_offset;
        if let Some(last) = last {
            self.placement.applied(last.index, self.exact_next_offset());
        }
        Ok(())
    }

    /// Only `durable` writes are fsynced in the Raft log before they count.
    fn must_sync(command: &Command) -> bool {
        split_command(command).is_none_or(|parts| parts.ack_code == WriteAck::Durable.code())
    }

    /// A produce's batch (or its stub) adds its record count.
    fn entry_records(command: &Command) -> u64 {
        command_records(command)
    }

    fn append_waiters(&self) -> Option<AppendWaiters> {
        Some(self.waiters.clone())
    }

    fn placement(&self) -> Option<Arc<dyn Placement>> {
        Some(self.placement.clone())
    }
}
