//! State machines: the [`Machine`] trait a group's application state implements, and
//! [`MachineStore`], its adapter to openraft's `RaftStateMachine`.
//!
//! The adapter keeps the applied log id and membership, builds and installs snapshots, and
//! persists the latest snapshot (its metadata and the machine's bytes) in the group's folder as
//! `snapshot`, atomically. On open it restores the machine from that file; openraft then
//! re-applies the committed entries after it from the Raft log (the log is only purged behind
//! a snapshot). Applies run on a blocking thread, so a machine may do file work, unless the
//! machine can apply a command at once without any ([`Machine::try_apply_inline`]): then the
//! apply runs where openraft asks for it, with no hop to the blocking pool and back (on the
//! leader that hop is on every acknowledgement's path).

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::log_store::{write_atomic, AppendWaiters, Placement};
use crate::types::{
    Command, Entry, LogId, Reply, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// The snapshot file in a group folder.
const SNAPSHOT_FILE: &str = "snapshot";

/// A group's application state, fed with committed commands in log order.
pub trait Machine: Send + 'static {
    /// Applies one committed command and returns the reply for its writer. Runs on a blocking
    /// thread. It must be deterministic: every replica applies the same commands in the same
    /// order and must reach the same state. A command the machine refuses is a reply (every
    /// replica refuses it alike); an `Err` is a local failure (a disk error) after which this
    /// replica cannot follow: openraft stops the group here rather than let it diverge.
    fn apply(&mut self, log_id: LogId, command: &Command) -> io::Result<Reply>;

    /// Applies `command` as [`Machine::apply`] would, if that needs no blocking work (at most
    /// one write into the page cache, as an append to a partition's active segment): runs on
    /// an async worker. `None` when it would need more; the machine must then be unchanged, and
    /// [`Machine::apply`] gets the command on a blocking thread. `None` by default.
    fn try_apply_inline(&mut self, log_id: LogId, command: &Command) -> Option<io::Result<Reply>> {
        let _ = (log_id, command);
        None
    }

    /// Called once when the group opens, before any restore, with the group's folder, where
    /// the machine may keep files of its own. Blocking. Nothing by default.
    fn open(&mut self, dir: &Path) -> io::Result<()> {
        let _ = dir;
        Ok(())
    }

    /// The machine's applied point, given the last applied log id (read together with the
    /// machine, so the two agree): a Raft index and the end of the data the entries up to it
    /// produced, with the producer state that goes with that data, for another replica that
    /// lost the data to retention (see [`crate::catch_up`]). `None` (the default) for a
    /// machine without such data.
    fn applied_point(&self, last_applied: Option<LogId>) -> Option<AppliedPointReport> {
        let _ = last_applied;
        None
    }

    /// The whole state as bytes, for a snapshot. Runs under the machine's lock, so applies
    /// wait for it: keep it cheap, and leave slow work to [`Machine::snapshot_barrier`].
    fn snapshot(&self) -> io::Result<Vec<u8>>;

    /// Work that must be done before a snapshot taken now may be saved (the Raft log is then
    /// purged behind it), read together with [`Machine::snapshot`]'s bytes and run after the
    /// machine's lock is released, on a blocking thread, so that applies go on meanwhile. A
    /// partition syncs its records below the snapshot's end here: done under the lock, that
    /// fsync (hundreds of MB at full rate) held up every apply, and so every acknowledgement,
    /// for as long as it took. `None` (the default) when the bytes are all a snapshot needs.
    fn snapshot_barrier(&self) -> Option<SnapshotBarrier> {
        None
    }

    /// Replaces the state with a snapshot's bytes.
    fn restore(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Replaces the state with a snapshot received from the leader (not one read back from
    /// this replica's own file), whose last entry is `last`: a machine whose data lives
    /// outside the snapshot fetches what it lacks here, before the install is reported done.
    /// Runs on a blocking thread.
    fn install(&mut self, last: Option<LogId>, bytes: &[u8]) -> io::Result<()> {
        let _ = last;
        self.restore(bytes)
    }

    /// Whether `command` must be fsynced in the Raft log before it counts toward the commit
    /// (on the leader and on each follower). Always, unless a machine's commands say
    /// otherwise (a partition's `leader` and `quorum` produces).
    fn must_sync(command: &Command) -> bool
    where
        Self: Sized,
    {
        let _ = command;
        true
    }

    /// How many records `command` adds once applied, for a follower's lag in records
    /// ([`crate::log_store::LogPolicy::records_of`]); 0 unless a machine's commands carry
    /// records. It may be given a placement's stub as well as a whole command.
    fn entry_records(command: &Command) -> u64
    where
        Self: Sized,
    {
        let _ = command;
        0
    }

    /// Writers waiting for their commands to reach this replica's Raft log (leader acks),
    /// if the machine's commands carry tokens for them. None by default.
    fn append_waiters(&self) -> Option<AppendWaiters> {
        None
    }

    /// Where this machine's commands' data may be written instead of the Raft log (see
    /// [`crate::log_store::Placement`]). None by default.
    fn placement(&self) -> Option<Arc<dyn Placement>> {
        None
    }
}

/// Work a snapshot needs done before it is saved (see [`Machine::snapshot_barrier`]).
pub type SnapshotBarrier = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// A machine's applied point, as [`Machine::applied_point`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPointReport {
    /// The index of the last Raft entry covered.
    pub index: u64,
    /// The end offset of the data the entries up to `index` produced.
    pub end: u64,
    /// The partition's idempotent-producer state, read in the same step, in the storage's
    /// producer snapshot encoding (which holds the offset it covers up to, at or past `end`);
    /// `None` when this replica's own state is incomplete.
    pub producer_states: Option<Vec<u8>>,
}

/// The snapshot file's contents.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

struct State<M> {
    dir: PathBuf,
    machine: M,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// A [`Machine`] behind openraft's `RaftStateMachine`. Cheap to clone: clones share the state.
pub struct MachineStore<M> {
    state: Arc<Mutex<State<M>>>,
}

impl<M> Clone for MachineStore<M> {
    fn clone(&self) -> Self {
        MachineStore {
            state: self.state.clone(),
        }
    }
}

impl<M: Machine> MachineStore<M> {
    /// Opens the machine's store in `dir`, restoring `machine` from the saved snapshot if
    /// there is one. Blocking: call from a blocking thread.
    pub fn open(dir: &Path, mut machine: M) -> io::Result<MachineStore<M>> {
        std::fs::create_dir_all(dir)?;
        machine.open(dir)?;
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        let current = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => {
                let snap: StoredSnapshot = bincode::deserialize(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                machine.restore(&snap.data)?;
                last_applied = snap.meta.last_log_id;
                membership = snap.meta.last_membership.clone();
                Some(snap)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(MachineStore {
            state: Arc::new(Mutex::new(State {
                dir: dir.to_path_buf(),
                machine,
                last_applied,
                membership,
                current,
                snapshots_built: 0,
            })),
        })
    }

    /// Reads the machine (for queries). Do not block inside `f`.
    pub fn read<T>(&self, f: impl FnOnce(&M) -> T) -> T {
        f(&self.state.lock().machine)
    }

    /// Reads the machine and its last applied log id together (one consistent view). Do not
    /// block inside `f`.
    pub fn read_applied<T>(&self, f: impl FnOnce(&M, Option<LogId>) -> T) -> T {
        let s = self.state.lock();
        f(&s.machine, s.last_applied)
    }

    /// The machine's applied point (see [`Machine::applied_point`]), read with its last
    /// applied log id under one lock. Waits while an apply or a snapshot install runs: call
    /// from a blocking thread.
    pub fn applied_point(&self) -> Option<AppliedPointReport> {
        let s = self.state.lock();
        s.machine.applied_point(s.last_applied)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        self.state.lock().last_applied
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State<M>) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&mut state.lock()))
            .await
            .map_err(io::Error::other)?
    }
}

fn save_snapshot(dir: &Path, snap: &StoredSnapshot) -> io::Result<()> {
    let bytes =
        bincode::serialize(snap).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    write_atomic(dir, SNAPSHOT_FILE, &bytes)
}

impl<M: Machine> RaftSnapshotBuilder<TypeConfig> for MachineStore<M> {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let state = self.state.clone();
        let built = tokio::task::spawn_blocking(move || -> io::Result<Snapshot> {
            // The bytes, the applied point and the barrier, read together under the lock.
            let (snap, barrier) = {
                let mut s = state.lock();
                let data = s.machine.snapshot()?;
                let barrier = s.machine.snapshot_barrier();
                s.snapshots_built += 1;
                let snapshot_id = match s.last_applied {
                    Some(l) => format!("{}-{}-{}", l.leader_id, l.index, s.snapshots_built),
                    None => format!("none-{}", s.snapshots_built),
                };
                let meta = SnapshotMeta {
                    last_log_id: s.last_applied,
                    last_membership: s.membership.clone(),
                    snapshot_id,
                };
                (StoredSnapshot { meta, data }, barrier)
            };
            // Applies go on while the barrier runs (see Machine::snapshot_barrier).
            if let Some(barrier) = barrier {
                barrier()?;
            }
            let out = Snapshot {
                meta: snap.meta.clone(),
                snapshot: Box::new(Cursor::new(snap.data.clone())),
            };
            let mut s = state.lock();
            // A snapshot installed from the leader meanwhile is newer: keep it, and hand
            // this one back anyway (openraft ignores a snapshot older than its own).
            let newer = s
                .current
                .as_ref()
                .is_some_and(|c| c.meta.last_log_id > snap.meta.last_log_id);
            if !newer {
                save_snapshot(&s.dir, &snap)?;
                s.current = Some(snap);
            }
            Ok(out)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        built.map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }
}

impl<M: Machine> RaftStateMachine<TypeConfig> for MachineStore<M> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let s = self.state.lock();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut entries: std::collections::VecDeque<Entry> = entries.into_iter().collect();
        let mut replies = Vec::with_capacity(entries.len());
        // The entries the machine takes at once, in order; the rest (from the first it cannot
        // take inline) on the blocking pool. A snapshot being built holds the lock: wait there.
        if let Some(mut s) = self.state.try_lock() {
            while let Some(entry) = entries.front() {
                let reply = match &entry.payload {
                    EntryPayload::Normal(command) => {
                        match s.machine.try_apply_inline(entry.log_id, command) {
                            Some(r) => r.map_err(|e| StorageIOError::write_state_machine(&e))?,
                            None => break,
                        }
                    }
                    EntryPayload::Blank => Reply::default(),
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Reply::default()
                    }
                };
                s.last_applied = Some(entry.log_id);
                replies.push(reply);
                entries.pop_front();
            }
        }
        if entries.is_empty() {
            return Ok(replies);
        }
        self.blocking(move |s| {
            for entry in entries {
                s.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => replies.push(Reply::default()),
                    EntryPayload::Normal(ref command) => {
                        replies.push(s.machine.apply(entry.log_id, command)?);
                    }
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m);
                        replies.push(Reply::default());
                    }
                }
            }
            Ok(replies)
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(&e).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        self.blocking(move |s| {
            s.machine.install(snap.meta.last_log_id, &snap.data)?;
            save_snapshot(&s.dir, &snap)?;
            s.last_applied = snap.meta.last_log_id;
            s.membership = snap.meta.last_membership.clone();
            s.current = Some(snap);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let s = self.state.lock();
        Ok(s.current.as_ref().map(|snap| Snapshot {
            meta: snap.meta.clone(),
            snapshot: Box::new(Cursor::new(snap.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests;
