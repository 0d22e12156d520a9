//! Replay of the groups topic: the walk that rebuilds group states from a partition's
//! records, from its log start at open, or from where the view stopped when a replicated
//! partition's followers catch up (see [`super::GroupStore::catch_up`]).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::batch::batches;
use crate::log::PartitionLog;

use super::{partition_for_group, GroupRecord, GroupState, REPLAY_READ_BYTES};

/// Where the latest complete snapshot of a partition began, as the walk finds it (see
/// "Replicated" in the module doc of [`super`]). Kept between walks, because a replica's walk
/// can stop between two batches of one snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SnapshotScan {
    /// The offset of the first `GroupSnapshot` record of the run being walked: every record
    /// since it is a snapshot record. Reset by any other record.
    pub(super) pending: Option<u64>,
    /// The first offset of the latest complete snapshot walked over (its first
    /// `GroupSnapshot` record, or its marker alone when it holds no group); the caller takes it.
    pub(super) complete: Option<u64>,
    /// The first offset of the latest complete snapshot walked over, kept.
    pub(super) latest: Option<u64>,
}

impl SnapshotScan {
    /// Notes the record at `offset`.
    fn see(&mut self, offset: u64, record: &GroupRecord) {
        match record {
            GroupRecord::GroupSnapshot { .. } => {
                self.pending.get_or_insert(offset);
            }
            GroupRecord::SnapshotMarker => {
                let start = self.pending.take().unwrap_or(offset);
                self.complete = Some(start);
                self.latest = Some(start);
            }
            _ => self.pending = None,
        }
    }
}

/// Replays one partition of the groups topic into `groups`. Returns the bytes read since its
/// last snapshot marker, and where the walk left its snapshot scan. Damage is recorded in
/// `damaged` and ends this partition's replay.
pub(super) fn replay(
    log: &PartitionLog,
    partitions: u32,
    groups: &mut HashMap<String, GroupState>,
    damaged: &mut Vec<(PathBuf, String)>,
) -> (u64, SnapshotScan) {
    let mut since_snapshot = 0u64;
    let mut scan = SnapshotScan::default();
    let from = log.log_start_offset();
    let fresh = |_: &str| GroupState::default();
    if let Err((offset, reason)) = replay_from(
        log,
        from,
        partitions,
        groups,
        fresh,
        &mut since_snapshot,
        &mut scan,
    ) {
        tracing::error!(
            partition = log.partition(), offset, reason = %reason,
            "damaged groups record; replay of this partition stops there"
        );
        damaged.push((
            log.dir().to_path_buf(),
            format!("offset {offset}: {reason}"),
        ));
    }
    (since_snapshot, scan)
}

/// The walk of [`replay`], from offset `from` to the partition's end; returns the offset it
/// reached. A group met for the first time starts from `initial(group)`. `scan` follows the
/// snapshots walked over. An error is the offset where it stopped, and why.
pub(super) fn replay_from(
    log: &PartitionLog,
    from: u64,
    partitions: u32,
    groups: &mut HashMap<String, GroupState>,
    mut initial: impl FnMut(&str) -> GroupState,
    since_snapshot: &mut u64,
    scan: &mut SnapshotScan,
) -> std::result::Result<u64, (u64, String)> {
    let p = log.partition();
    let mut offset = from;
    while offset < log.high_watermark() {
        let read = log
            .read(offset, REPLAY_READ_BYTES)
            .map_err(|e| (offset, e.to_string()))?;
        if read.chunks.is_empty() {
            break;
        }
        for chunk in &read.chunks {
            for batch in batches(chunk) {
                let batch = batch.map_err(|e| (offset, e.to_string()))?;
                let mut snapshot_end = false;
                for record in batch.records() {
                    let record = record.map_err(|e| (offset, e.to_string()))?;
                    if record.offset < offset {
                        continue;
                    }
                    let decoded =
                        GroupRecord::decode(record.value).map_err(|e| (record.offset, e))?;
                    scan.see(record.offset, &decoded);
                    match decoded.group() {
                        // A snapshot ends here: only what follows counts toward the next.
                        None => snapshot_end = true,
                        Some(g) => {
                            if partition_for_group(g, partitions) != p {
                                return Err((
                                    record.offset,
                                    format!("group {g:?} in partition {p}, not its own"),
                                ));
                            }
                            let state = match groups.get_mut(g) {
                                Some(state) => state,
                                None => groups.entry(g.to_string()).or_insert(initial(g)),
                            };
                            state.apply(decoded);
                        }
                    }
                }
                *since_snapshot = if snapshot_end {
                    0
                } else {
                    *since_snapshot + batch.as_bytes().len() as u64
                };
                offset = offset.max(batch.header().next_offset());
            }
        }
        offset = offset.max(read.next_offset);
    }
    Ok(offset)
}
