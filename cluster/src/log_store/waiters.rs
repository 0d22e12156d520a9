//! [`AppendWaiters`]: writers waiting for their command to reach a group's Raft log (the
//! leader's `leader` acks), and their reads of the log's resident commands.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use openraft::EntryPayload;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::resident::Mem;
use crate::types::{Command, Entry, LogId};

/// Writers waiting for their command to be appended to a group's log, by a token their
/// command carries (see [`AppendWaiters::new`]). Also reads the log's entries for them. Cheap
/// to clone.
#[derive(Clone)]
pub struct AppendWaiters {
    pub(super) inner: Arc<WaitersInner>,
}

pub(super) struct WaitersInner {
    pub(super) token_of: fn(&Command) -> Option<u64>,
    pub(super) waiting: Mutex<HashMap<u64, oneshot::Sender<LogId>>>,
    /// The log's memory image, set when the log opens (weak: the log owns the waiters).
    pub(super) log: OnceLock<Weak<Mutex<Mem>>>,
}

impl AppendWaiters {
    /// Waiters for commands whose token `token_of` reads (`None`: no token).
    pub fn new(token_of: fn(&Command) -> Option<u64>) -> Self {
        AppendWaiters {
            inner: Arc::new(WaitersInner {
                token_of,
                waiting: Mutex::new(HashMap::new()),
                log: OnceLock::new(),
            }),
        }
    }

    /// Waits for the command carrying `token`: the receiver gets its log id once it is
    /// written to this log. Call [`AppendWaiters::cancel`] when giving up.
    pub fn register(&self, token: u64) -> oneshot::Receiver<LogId> {
        let (tx, rx) = oneshot::channel();
        self.inner.waiting.lock().insert(token, tx);
        rx
    }

    /// Stops waiting for `token`.
    pub fn cancel(&self, token: u64) {
        self.inner.waiting.lock().remove(&token);
    }

    /// Calls `f` with each normal entry's command with an index in `(after, before)`, in
    /// order. False (and `f` not called) if the log is gone or some index of the range is no
    /// longer in it or no longer in memory.
    pub fn for_each_between(&self, after: u64, before: u64, f: impl FnMut(&Command)) -> bool {
        let Some(mem) = self.inner.log.get().and_then(Weak::upgrade) else {
            return false;
        };
        let mem = mem.lock();
        match mem.commands_between(after, before) {
            Some(commands) => {
                commands.into_iter().for_each(f);
                true
            }
            None => false,
        }
    }

    /// The records the log's entries with an index in `(after, through]` add (see
    /// [`super::LogPolicy::records_of`]): a follower's lag in records, from its matched
    /// index to the leader's last. `None` if the log is gone or no longer holds all of them.
    pub fn records_between(&self, after: u64, through: u64) -> Option<u64> {
        let mem = self.inner.log.get().and_then(Weak::upgrade)?;
        let mem = mem.lock();
        mem.records_between(after, through)
    }

    /// The waiters of the normal entries in `entries`, with their log ids.
    pub(super) fn take(&self, entries: &[Entry]) -> Vec<(oneshot::Sender<LogId>, LogId)> {
        let mut waiting = self.inner.waiting.lock();
        if waiting.is_empty() {
            return Vec::new();
        }
        entries
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(c) => (self.inner.token_of)(c)
                    .and_then(|t| waiting.remove(&t))
                    .map(|tx| (tx, e.log_id)),
                _ => None,
            })
            .collect()
    }
}
