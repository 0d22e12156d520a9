//! A replicated partition's [`Placement`]: each batch the partition log can take at the
//! append is written once, into the partition log, when its entry is appended to the Raft
//! log (see `docs/REPLICATION.md`, "The partition log as the Raft log").
//!
//! At the Raft append the batch is staged in the partition log (`PartitionLog::stage_at`:
//! written after the published records and the batches staged before it, readable by nobody),
//! and the Raft log's frame holds a stub instead (`stub.rs`: where the batch lies, and for an
//! idempotent producer's batch the entry's clock and the batch header). The apply publishes
//! it ([`PartitionPlacement::take_placed`]): nothing is written a second time.
//!
//! **Which entries are placed.** A batch, when this replica knows exactly where the entry
//! before it ends, and the partition log ends there: the entry before was placed, or applied
//! (its apply reports the applied end). A staged batch goes at the log's end, so it gets the
//! offsets every replica's apply gives the entry only then. An idempotent producer's batch
//! is placed when the producer state its publish will find appends it (the applied state
//! moved by the placed entries before it, which the partition log projects); a retry or a
//! batch its state refuses is kept whole, and its apply answers or refuses it. A `durable`
//! batch is placed too: the log store syncs the placement before the Raft log's fsync that
//! makes the entry count ([`Placement::sync`]), so the staged batch and its stub are both on
//! disk first. Kept whole: a topic flushed `always` (each apply syncs its own append), a
//! batch that does not fit the active segment as it is (a roll or a grow is due), and any
//! entry whose place is not known that way: after an entry kept whole until its apply, after
//! a blank entry, while a snapshot is installed (its catch-up pull appends records, maybe
//! past the snapshot's end), after a restart until the applies resume.
//!
//! **Reads.** The log store keeps the whole command in memory as before; an entry read back
//! from its frame gets its batch from the staged batch, or from the published records once
//! applied ([`Placement::unstub`]). Records deleted by retention cannot be read back: the stub
//! is then sent as it is, and a replica that lacks those records applies it as records it
//! cannot have (`PartitionMachine`'s hole), an idempotent one moving its producer state's
//! clock by the stub's.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rill_storage::{FlushPolicy, PartitionLog, StagedBatch, StorageError};

use super::state_machine::{encode_command, split_command};
use super::stub::{encode_stub, parse_stub, Stub};
use super::WriteAck;
use crate::log_store::Placement;
use crate::types::{Command, LogId};

/// What the placement knows of the Raft log's entries.
#[derive(Debug, Default)]
struct State {
    /// The placed entries not yet applied, in log order, with their staged batches (the
    /// partition log's staged batches, in the same order).
    placed: VecDeque<(LogId, StagedBatch)>,
    /// The latest entry whose records' end is known exactly (placed, or applied), with that
    /// end: an entry right after it may be placed there.
    known: Option<(u64, u64)>,
}

impl State {
    /// Entry `index`'s records end at `end`; an older point changes nothing.
    fn learn(&mut self, index: u64, end: u64) {
        if self.known.is_none_or(|(i, _)| i <= index) {
            self.known = Some((index, end));
        }
    }
}

/// When the active segment's file has less than this allocated past the log's end, a stage
/// asks for it to grow (on a blocking thread): a batch that does not fit the allocated
/// blocks is kept whole, since the Raft append does no file work, and on a follower the next
/// entries too until its apply has run.
const GROW_AHEAD_BYTES: u64 = 8 << 20;

/// A replicated partition's placement (see the module docs). Shared by the group's log
/// store and its state machine.
pub struct PartitionPlacement {
    log: PartitionLog,
    state: Mutex<State>,
    /// A grow of the active segment's file is under way (see [`GROW_AHEAD_BYTES`]).
    growing: Arc<AtomicBool>,
}

impl PartitionPlacement {
    /// The placement of `log`'s group.
    pub fn new(log: PartitionLog) -> Arc<Self> {
        Arc::new(PartitionPlacement {
            log,
            state: Mutex::new(State::default()),
            growing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The machine applied entry `index`, its records ending at `end` (`None`: not known
    /// exactly, as while a learned applied point is answered).
    pub(super) fn applied(&self, index: u64, end: Option<u64>) {
        let mut state = self.state.lock();
        match end {
            Some(end) => state.learn(index, end),
            None => state.known = None,
        }
    }

    /// The staged batch of entry `log_id` if it was placed; the apply publishes it. Only the
    /// oldest placed entry can be applied next.
    pub(super) fn take_placed(&self, log_id: LogId) -> Option<StagedBatch> {
        let mut state = self.state.lock();
        match state.placed.front() {
            Some((placed, batch)) if *placed == log_id => {
                let batch = *batch;
                state.placed.pop_front();
                Some(batch)
            }
            _ => None,
        }
    }

    /// A snapshot whose last entry is `last`, its records ending at `next_offset`, is being
    /// installed: nothing is placed until [`PartitionPlacement::applied`] says where the
    /// records end after it. When that entry was placed here, it and every placed entry
    /// before it are the snapshot's own (the same log id: the same entries before it), so
    /// they are published, and true is returned if that reached `next_offset`. Otherwise
    /// every staged batch is dropped (the install brings the records another way) and false
    /// is returned.
    pub(super) fn installing(&self, last: Option<LogId>, next_offset: u64) -> io::Result<bool> {
        let mut state = self.state.lock();
        let last_index = last.map_or(0, |l| l.index);
        state.known = None;
        let covers = last.is_some_and(|last| state.placed.iter().any(|(id, _)| *id == last));
        if covers {
            while let Some((id, batch)) = state.placed.front().copied() {
                if id.index > last_index {
                    break;
                }
                self.log
                    .publish_staged(batch.next_offset())
                    .map_err(io::Error::other)?;
                state.placed.pop_front();
            }
            return Ok(self.log.high_watermark() == next_offset);
        }
        if let Some((_, first)) = state.placed.front() {
            self.log
                .unstage_from(first.base_offset)
                .map_err(io::Error::other)?;
        }
        state.placed.clear();
        Ok(false)
    }

    /// Stages `command`'s batch if the partition log takes it (a plain batch, or an
    /// idempotent one whose producer state will append it: `PartitionLog::stage_at`); its
    /// stub then.
    fn stage(&self, command: &Command) -> Option<(Command, StagedBatch)> {
        let parts = split_command(command)?;
        let checked = self
            .log
            .check_verified_batch(command.0.slice_ref(parts.batch))
            .ok()?;
        match self.log.stage_at(&checked, parts.clock) {
            Ok(Some(staged)) => {
                self.grow_ahead_if_short();
                let producer = parts.clock.map(|clock| (clock, parts.batch));
                let stub = encode_stub(parts.ack_code, parts.token, &staged, producer);
                Some((stub, staged))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    topic = self.log.topic(), partition = self.log.partition(), error = %e,
                    "cannot stage a batch: keeping it whole in the Raft log"
                );
                None
            }
        }
    }

    /// Asks a blocking thread to grow the active segment's file when little is allocated
    /// past the log's end (see [`GROW_AHEAD_BYTES`]); one grow at a time, and none outside a
    /// runtime.
    fn grow_ahead_if_short(&self) {
        if self.log.room_past_end() >= GROW_AHEAD_BYTES {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.growing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (log, growing) = (self.log.clone(), self.growing.clone());
        runtime.spawn_blocking(move || {
            if let Err(e) = log.grow_ahead(2 * GROW_AHEAD_BYTES) {
                tracing::warn!(
                    topic = log.topic(), partition = log.partition(), error = %e,
                    "cannot grow the active segment ahead of staged batches"
                );
            }
            growing.store(false, Ordering::Release);
        });
    }

    fn bad_stub(&self, stub: &Stub, why: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "topic {} partition {}: the Raft log's stub for offset {} ({} bytes) {why}",
                self.log.topic(),
                self.log.partition(),
                stub.batch.base_offset,
                stub.batch.len
            ),
        )
    }
}

impl Placement for PartitionPlacement {
    fn place(&self, log_id: LogId, command: &Command) -> Option<Command> {
        let mut state = self.state.lock();
        let here = state
            .known
            .filter(|(index, _)| index + 1 == log_id.index)
            .map(|(_, end)| end);
        let placeable = here.is_some_and(|end| end == self.log.log_end())
            && self.log.options().flush != FlushPolicy::Always
            && parse_stub(command).is_none();
        match placeable.then(|| self.stage(command)).flatten() {
            Some((stub, staged)) => {
                state.placed.push_back((log_id, staged));
                state.learn(log_id.index, staged.next_offset());
                Some(stub)
            }
            None => None,
        }
    }

    fn is_stub(&self, command: &Command) -> bool {
        parse_stub(command).is_some()
    }

    fn unstub(&self, command: &Command) -> io::Result<Command> {
        let Some(stub) = parse_stub(command) else {
            return Ok(command.clone());
        };
        let want = stub.batch;
        let bytes = match self.log.staged_batch(want.base_offset) {
            Some(bytes) => bytes,
            None => match self.log.read(want.base_offset, want.len as usize) {
                Ok(read) => match read.chunks.first() {
                    Some(chunk) => chunk.slice(..chunk.len().min(want.len as usize)),
                    None => return Err(self.bad_stub(&stub, "names records not in the log".into())),
                },
                // Deleted by retention: the stub goes on as it is (see the module docs).
                Err(StorageError::OffsetOutOfRange { log_start, .. })
                    if want.base_offset < log_start =>
                {
                    return Ok(command.clone())
                }
                Err(e) => return Err(self.bad_stub(&stub, format!("cannot be read: {e}"))),
            },
        };
        let header = rill_storage::batch::BatchHeader::parse(&bytes)
            .map_err(|e| self.bad_stub(&stub, format!("names a bad batch: {e}")))?;
        if header.base_offset != want.base_offset
            || header.crc != want.crc
            || bytes.len() != want.len as usize
        {
            return Err(self.bad_stub(&stub, "names another batch".into()));
        }
        Ok(encode_command(
            ack_of(stub.ack_code),
            stub.token,
            stub.producer.map(|p| p.clock),
            &bytes,
        ))
    }

    fn truncate_from(&self, index: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.known.is_some_and(|(i, _)| i >= index) {
            state.known = None;
        }
        let Some(at) = state.placed.iter().position(|(id, _)| id.index >= index) else {
            return Ok(());
        };
        let from = state.placed[at].1.base_offset;
        self.log.unstage_from(from).map_err(io::Error::other)?;
        state.placed.truncate(at);
        state.known = state
            .placed
            .back()
            .map(|(id, b)| (id.index, b.next_offset()));
        Ok(())
    }

    fn reopen(&self, entries: &[(LogId, Option<Command>)]) -> io::Result<Option<u64>> {
        let mut state = self.state.lock();
        let published = self.log.high_watermark();
        let mut staged: Vec<(LogId, StagedBatch)> = Vec::new();
        let mut expected = Vec::new();
        for (log_id, stub) in entries {
            match stub.as_ref().and_then(parse_stub) {
                Some(stub) if stub.batch.base_offset >= published => {
                    staged.push((*log_id, stub.batch));
                    expected.push((stub.batch, stub.producer.map(|p| p.clock)));
                }
                Some(_) | None => {} // published, or whole: its apply is a replay or an append
            }
        }
        let taken = self.log.restage_at(&expected).map_err(io::Error::other)?;
        let cut = staged.get(taken).map(|(id, _)| id.index);
        staged.truncate(taken);
        state.placed = staged.into();
        // Where the next entry goes is known once the applies resume.
        state.known = None;
        Ok(cut)
    }

    fn sync(&self) -> io::Result<()> {
        self.log.sync_staged().map_err(io::Error::other)
    }
}

/// The [`WriteAck`] of an ack code (`quorum` for an unknown one: a stub is only written for
/// codes this version wrote).
pub(super) fn ack_of(code: u8) -> WriteAck {
    [WriteAck::Leader, WriteAck::Quorum, WriteAck::Durable]
        .into_iter()
        .find(|a| a.code() == code)
        .unwrap_or(WriteAck::Quorum)
}
