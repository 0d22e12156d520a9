//! A replicated groups topic (see "Replicated" in the module doc of [`super`]): changes
//! committed through a [`GroupsWriter`], and the view fed from the log.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Result, StorageError};

use super::{
    build_batch, max_change_bytes, partition_for_group, replay, GroupRecord, GroupState,
    GroupStore, GroupsWriter, GROUPS_TOPIC,
};

impl GroupStore {
    /// [`GroupStore::change`] on a replicated groups topic: the view is brought up to the
    /// log first (so `decide` sees every committed change), the records are committed
    /// through `writer`, and the view then applies them from the log.
    pub(super) fn change_replicated(
        &self,
        group: &str,
        p: u32,
        writer: &dyn GroupsWriter,
        decide: impl FnOnce(&GroupState) -> Option<Vec<GroupRecord>>,
    ) -> Result<bool> {
        self.catch_up(p)?;
        let current = self.state_of(group);
        let Some(records) = decide(&current) else {
            return Ok(false);
        };
        let log = self.inner.topic.partition(p)?;
        let batch = build_batch(&records, max_change_bytes(&log))?;
        writer.append(p, batch)?;
        self.catch_up(p)?;
        Ok(true)
    }

    /// Makes the groups topic replicated: from now on every change is committed through
    /// `writer`, and the view follows the log ([`GroupStore::catch_up`]).
    pub fn replicate_with(&self, writer: Arc<dyn GroupsWriter>) {
        *self.inner.writer.write() = Some(writer);
    }

    /// Whether changes go through a replicated writer.
    pub fn is_replicated(&self) -> bool {
        self.inner.writer.read().is_some()
    }

    /// Applies to the view what partition `p`'s log holds beyond it (records a replicated
    /// partition's apply appended). A log that now starts after the view's end (a replica
    /// rebuilt from another) is replayed whole, and its groups replaced. Returns the offset
    /// the view now holds every record before. A record that does not decode is
    /// [`StorageError::Corrupt`] and changes nothing.
    pub fn catch_up(&self, p: u32) -> Result<u64> {
        let log = self.inner.topic.partition(p)?;
        let gate = self.gate(p)?;
        let _exclusive = gate.write();
        let applied = self.inner.applied_next.get(p as usize).ok_or_else(|| {
            StorageError::PartitionNotFound {
                topic: GROUPS_TOPIC.to_string(),
                partition: p,
                partitions: self.inner.topic.partition_count(),
            }
        })?;
        let from = applied.load(Ordering::Relaxed);
        let start = log.log_start_offset();
        if from >= start && from >= log.high_watermark() {
            return Ok(from);
        }
        let whole = from < start;
        let partitions = self.inner.topic.partition_count();
        let mut touched: HashMap<String, GroupState> = HashMap::new();
        let view = |g: &str| {
            if whole {
                GroupState::default()
            } else {
                self.inner
                    .groups
                    .read()
                    .get(g)
                    .map(|s| GroupState::clone(s))
                    .unwrap_or_default()
            }
        };
        let mut since_snapshot = 0;
        let end = replay::replay_from(
            &log,
            from.max(start),
            partitions,
            &mut touched,
            view,
            &mut since_snapshot,
        )
        .map_err(|(offset, reason)| StorageError::Corrupt {
            path: log.dir().to_path_buf(),
            reason: format!("groups record at offset {offset}: {reason}"),
        })?;
        let mut groups = self.inner.groups.write();
        if whole {
            groups.retain(|g, _| partition_for_group(g, partitions) != p);
        }
        for (g, state) in touched {
            if state.is_empty() {
                groups.remove(&g);
            } else {
                groups.insert(g, Arc::new(state));
            }
        }
        applied.store(end, Ordering::Relaxed);
        Ok(end)
    }
}
