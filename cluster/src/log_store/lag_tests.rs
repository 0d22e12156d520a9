//! A follower's lag in records: the records of the entries after its matched index, as the
//! policy counts them, through truncations, a reopen and purges.

use openraft::CommittedLeaderId;

use crate::log_store::*;

/// Entry `index` of `term` whose command holds `records` bytes: one record per byte under
/// [`policy`].
fn counted(term: u64, index: u64, records: usize) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Command(vec![7; records].into())),
    }
}

fn policy(waiters: &AppendWaiters) -> LogPolicy {
    LogPolicy {
        waiters: Some(waiters.clone()),
        records_of: |c| c.0.len() as u64,
        ..LogPolicy::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn lag_in_records_counts_the_entries_after_the_matched_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    {
        let waiters = AppendWaiters::new(|_| None);
        let store = LogStore::open_with(dir.path(), policy(&waiters)).expect("open");
        let mut entries: Vec<Entry> = (1..=10).map(|i| counted(1, i, i as usize)).collect();
        // An election's blank entry adds no records.
        entries.push(Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 11),
            payload: EntryPayload::Blank,
        });
        store.append_blocking(entries).expect("append");
        assert_eq!(waiters.records_between(3, 11), Some((4..=10).sum()));
        assert_eq!(waiters.records_between(11, 11), Some(0));
        assert_eq!(waiters.records_between(0, 2), Some(3));

        // A diverged tail replaced: the new entries count, the old ones no longer.
        let mut s = store.clone();
        rt.block_on(s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 8)))
            .expect("truncate");
        store
            .append_blocking(vec![counted(3, 8, 100)])
            .expect("append");
        assert_eq!(waiters.records_between(3, 8), Some(4 + 5 + 6 + 7 + 100));
    }
    // Replayed from the frames at open, the same counts.
    let waiters = AppendWaiters::new(|_| None);
    let mut store = LogStore::open_with(dir.path(), policy(&waiters)).expect("reopen");
    assert_eq!(waiters.records_between(3, 8), Some(4 + 5 + 6 + 7 + 100));
    // Purged entries are not known: a replica matched before them is not counted.
    rt.block_on(store.purge(LogId::new(CommittedLeaderId::new(1, 1), 5)))
        .expect("purge");
    assert_eq!(waiters.records_between(3, 8), None);
    assert_eq!(waiters.records_between(5, 8), Some(6 + 7 + 100));
}
