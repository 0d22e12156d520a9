//! Tests of the durable Raft log: frames, replay after torn writes, group commit, purges and
//! the vote.

use super::*;
use openraft::CommittedLeaderId;
use std::time::Duration;

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(crate::types::Command(vec![index as u8; 10].into())),
    }
}

/// Queues a frame as an append would, and waits for the writer thread to write it.
fn append_and_wait(store: &LogStore, entries: Vec<Entry>, sync: bool) {
    let op = Op::Append(entries);
    let frame = encode_frame(&op).expect("encode");
    {
        let mut mem = store.mem.lock();
        let Mem {
            entries,
            last_purged,
            ..
        } = &mut *mem;
        apply_op(entries, last_purged, op);
    }
    let (tx, rx) = oneshot::channel();
    store
        .submit(Job {
            frame,
            sync,
            purge: false,
            done: Done::Notify(tx),
        })
        .expect("submit");
    rx.blocking_recv().expect("writer").expect("write");
}

/// Waits until every frame queued so far is written.
fn barrier(store: &LogStore) {
    let (tx, rx) = oneshot::channel();
    store
        .submit(Job {
            frame: Vec::new(),
            sync: false,
            purge: false,
            done: Done::Notify(tx),
        })
        .expect("submit");
    rx.blocking_recv().expect("writer").expect("barrier");
}

#[test]
fn reopen_keeps_entries_truncation_purge_and_vote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    {
        let mut store = LogStore::open(dir.path()).expect("open");
        append_and_wait(&store, (1..=5).map(|i| entry(1, i)).collect(), true);
        rt.block_on(async {
            store.truncate(entry(1, 4).log_id).await.expect("truncate");
            store.purge(entry(1, 1).log_id).await.expect("purge");
            store
                .save_vote(&Vote::new_committed(3, 2))
                .await
                .expect("vote");
        });
        barrier(&store);
    }
    let mut store = LogStore::open(dir.path()).expect("reopen");
    rt.block_on(async {
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        let got = store.try_get_log_entries(0..10).await.expect("read");
        let idx: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(idx, vec![2, 3]);
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new_committed(3, 2))
        );
    });
}

#[test]
fn a_torn_last_frame_is_cut_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = LogStore::open(dir.path()).expect("open");
        append_and_wait(&store, vec![entry(1, 1)], true);
        append_and_wait(&store, vec![entry(1, 2)], true);
    }
    let path = dir.path().join(LOG_FILE);
    let len = std::fs::metadata(&path).expect("meta").len();
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(len - 3).expect("tear");
    drop(f);
    let store = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store.mem.lock().entries.keys().copied().collect::<Vec<_>>(),
        vec![1]
    );
    assert!(
        std::fs::metadata(&path).expect("meta").len() < len - 3,
        "the torn frame was cut"
    );
    // Appends after the cut land after the last good frame.
    append_and_wait(&store, vec![entry(2, 2)], true);
    drop(store);
    let store = LogStore::open(dir.path()).expect("reopen again");
    let mem = store.mem.lock();
    assert_eq!(
        mem.entries.get(&2).map(|e| e.log_id.leader_id.term),
        Some(2)
    );
}

#[test]
fn a_damaged_vote_file_is_an_error_not_a_missing_vote() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(VOTE_FILE), b"garbage!!").expect("write");
    // Forgetting a vote could let this node vote twice in a term: refuse to open.
    assert!(LogStore::open(dir.path()).is_err());
}

#[test]
fn entries_that_need_no_sync_are_written_without_an_fsync_and_one_that_does_syncs_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path()).expect("open");
    let before = store.fsyncs();
    for i in 1..=20 {
        append_and_wait(&store, vec![entry(1, i)], false);
    }
    // Page-cache appends are not fsynced one by one (a background fsync may have come
    // if writing them took over 200 ms).
    assert!(
        store.fsyncs() < before + 3,
        "page-cache appends were fsynced: {}",
        store.fsyncs() - before
    );
    let before = store.fsyncs();
    append_and_wait(&store, vec![entry(1, 21)], true);
    assert_eq!(
        store.fsyncs(),
        before + 1,
        "one fsync for the durable entry"
    );
    // The background flush covers page-cache-only frames once the queue is idle.
    append_and_wait(&store, vec![entry(1, 22)], false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.fsyncs() < before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background fsync came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(store);
    let store = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(store.mem.lock().entries.len(), 22);
}

#[test]
fn a_batch_of_durable_frames_shares_one_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(dir.path().join(LOG_FILE))
        .expect("file");
    let fsyncs = Arc::new(AtomicU64::new(0));
    let syncer = Syncer::start(dir.path().to_path_buf(), &file, fsyncs.clone()).expect("syncer");
    let mut writer = Writer {
        dir: dir.path().to_path_buf(),
        file,
        file_bytes: 0,
        syncer,
        failed: None,
        mem: Arc::new(Mutex::new(Mem {
            entries: BTreeMap::new(),
            last_purged: None,
            vote: None,
        })),
        fsyncs: fsyncs.clone(),
    };
    let jobs: Vec<Job> = (1..=50)
        .map(|i| Job {
            frame: encode_frame(&Op::Append(vec![entry(1, i)])).expect("encode"),
            sync: true,
            purge: false,
            done: Done::Nothing,
        })
        .collect();
    writer.write_batch(&jobs).expect("write");
    // One for the batch, not one per frame (50); the background syncer, a thread of its
    // own, may add its periodic one meanwhile.
    let n = fsyncs.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&n),
        "one fsync for the batch of 50 durable frames, saw {n}"
    );
    drop(writer);
    let store = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(store.mem.lock().entries.len(), 50);
}
