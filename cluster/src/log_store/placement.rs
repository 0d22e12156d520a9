//! Where a group's data may live instead of the Raft log: [`Placement`].
//!
//! A replicated partition writes each plain batch once. When its entry is appended to the
//! Raft log, the batch is written into the partition log as a staged batch (readable by
//! nobody until the apply publishes it), and the Raft log's frame holds a small stub naming
//! it instead of the batch. The log store keeps the whole command in memory as before, so
//! openraft's reads of recent entries see no difference; an entry read back from its frame
//! (evicted, or after a restart) has its stub turned back into the command here.
//!
//! The log store calls the placement in log order, under its own rules for what it writes
//! when: the batch is written before the frame that names it, a truncated tail is dropped
//! here before its truncation is written, and the placement is synced before the Raft log
//! is (so a stub on disk names data on disk). See `docs/REPLICATION.md`, "The partition log
//! as the Raft log".

use std::io;

use openraft::EntryPayload;

use crate::types::{Command, Entry, LogId};

/// A group's place for entry data outside the Raft log. Implemented by the replicated
/// partition (`partition/placement.rs`).
pub trait Placement: Send + Sync {
    /// Offers the normal entry `log_id` as it is appended, in log order. `Some(stub)`: its
    /// data is placed, and the frame holds `stub` instead of `command`. `None`: the frame
    /// holds `command` as it is. An entry that must be fsynced before it counts may be
    /// placed too: the log store calls [`Placement::sync`] before that fsync.
    fn place(&self, log_id: LogId, command: &Command) -> Option<Command>;

    /// Whether `command` is a stub this placement wrote.
    fn is_stub(&self, command: &Command) -> bool;

    /// The command a stub stands for, read from where its data was placed. A stub whose
    /// data is gone for good (deleted by retention) may come back as it is: the state
    /// machine knows a stub, and answers it as records it cannot have.
    fn unstub(&self, stub: &Command) -> io::Result<Command>;

    /// The entries from `index` on are being removed from the Raft log (a diverged tail).
    fn truncate_from(&self, index: u64) -> io::Result<()>;

    /// At open, before anything is appended: every normal entry the Raft log holds, in order,
    /// with its stub if it has one (an entry kept whole is `None`).
    /// Returns the index of the first entry whose placed data is not there (a crash came
    /// between the two writes, or a truncation's), from which the log must be cut; `None`
    /// when all are.
    fn reopen(&self, entries: &[(LogId, Option<Command>)]) -> io::Result<Option<u64>>;

    /// Makes the placed data durable; called before each fsync of the Raft log.
    fn sync(&self) -> io::Result<()>;
}

/// `entries` with each stub turned back into its command (see [`Placement::unstub`]).
/// Blocking: it may read placed data.
pub(super) fn unstub_all(placement: &dyn Placement, entries: Vec<Entry>) -> io::Result<Vec<Entry>> {
    entries
        .into_iter()
        .map(|e| match e.payload {
            EntryPayload::Normal(ref c) if placement.is_stub(c) => Ok(Entry {
                log_id: e.log_id,
                payload: EntryPayload::Normal(placement.unstub(c)?),
            }),
            _ => Ok(e),
        })
        .collect()
}

/// The entries as their frame holds them, when `placement` placed any (see
/// [`Placement::place`]); `None`: the frame holds them as they are.
pub(super) fn frame_entries(placement: &dyn Placement, entries: &[Entry]) -> Option<Vec<Entry>> {
    let mut any = false;
    let framed = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(c) => match placement.place(e.log_id, c) {
                Some(stub) => {
                    any = true;
                    Entry {
                        log_id: e.log_id,
                        payload: EntryPayload::Normal(stub),
                    }
                }
                None => e.clone(),
            },
            _ => e.clone(),
        })
        .collect();
    any.then_some(framed)
}
