//! Tests of the durable Raft log: frames, replay after torn writes, group commit, purges and
//! the vote.

use super::*;
use openraft::CommittedLeaderId;
use std::path::Path;
use std::time::Duration;

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(crate::types::Command(vec![index as u8; 10].into())),
    }
}

/// Records `entries` in memory and makes their frame's job, as an append does, with the
/// channel it reports on.
fn job_for(
    store: &LogStore,
    entries: Vec<Entry>,
    sync: bool,
) -> (Job, oneshot::Receiver<io::Result<()>>) {
    let log_ids = entries.iter().map(|e| e.log_id).collect();
    let frame = frame::encode_append_frame(&entries).expect("encode");
    store.mem.lock().apply(Op::Append(entries), None);
    let (tx, rx) = oneshot::channel();
    let job = Job {
        frame,
        log_ids,
        sync,
        purge: false,
        done: Done::Notify(tx),
    };
    (job, rx)
}

/// Queues a frame as an append would, and waits for the writer thread to write it.
fn append_and_wait(store: &LogStore, entries: Vec<Entry>, sync: bool) {
    let (job, rx) = job_for(store, entries, sync);
    store.submit(job).expect("submit");
    rx.blocking_recv().expect("writer").expect("write");
}

/// Waits until every frame queued so far is written.
fn barrier(store: &LogStore) {
    let (tx, rx) = oneshot::channel();
    store
        .submit(Job {
            frame: Vec::new().into(),
            log_ids: Vec::new(),
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
        mem.entries.get(&2).map(|s| s.log_id.leader_id.term),
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
    let syncer =
        Syncer::start(dir.path().to_path_buf(), &file, fsyncs.clone(), None).expect("syncer");
    let mut writer = Writer {
        dir: dir.path().to_path_buf(),
        file,
        reader: Arc::new(File::open(dir.path().join(LOG_FILE)).expect("reader")),
        seq: 0,
        segment_bytes: DEFAULT_SEGMENT_BYTES,
        max_index: None,
        sealed: Default::default(),
        file_bytes: 0,
        reserved_bytes: Some(0),
        syncer,
        failed: None,
        mem: Arc::new(Mutex::new(Mem::new(None, RESIDENT_BUDGET_BYTES))),
        fsyncs: fsyncs.clone(),
        placement: None,
    };
    let jobs: Vec<Job> = (1..=50)
        .map(|i| Job {
            frame: encode_frame(&Op::Append(vec![entry(1, i)]))
                .expect("encode")
                .into(),
            log_ids: Vec::new(),
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

/// An entry whose `size`-byte command is unique to its term and index, so reading back a
/// wrong or empty entry shows.
fn big_entry(term: u64, index: u64, size: usize) -> Entry {
    let bytes: Vec<u8> = (0..size)
        .map(|j| (index as usize * 31 + term as usize * 7 + j) as u8)
        .collect();
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(crate::types::Command(bytes.into())),
    }
}

/// The log id and command bytes of each entry, for comparing.
fn contents(entries: &[Entry]) -> Vec<(LogId, Vec<u8>)> {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(c) => (e.log_id, c.0.to_vec()),
            _ => (e.log_id, Vec::new()),
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// How many entries are in memory.
fn resident(store: &LogStore) -> usize {
    let mem = store.mem.lock();
    mem.entries.values().filter(|s| s.entry.is_some()).count()
}

/// A budget of about two 100-byte entries.
const TINY_BUDGET_BYTES: u64 = 300;

#[test]
fn evicted_entries_are_read_back_equal_including_from_shared_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let waiters = AppendWaiters::new(|_| None);
    let policy = LogPolicy {
        waiters: Some(waiters.clone()),
        ..LogPolicy::default()
    };
    let mut store = LogStore::open_budget(dir.path(), policy, TINY_BUDGET_BYTES).expect("open");
    let mut all = Vec::new();
    // Frames of one entry and frames of three (as a follower's replicated batch).
    for i in 1..=20 {
        let e = big_entry(1, i, 100);
        all.push(e.clone());
        append_and_wait(&store, vec![e], false);
    }
    for first in (21..=50).step_by(3) {
        let batch: Vec<Entry> = (first..first + 3).map(|i| big_entry(1, i, 100)).collect();
        all.extend(batch.iter().cloned());
        append_and_wait(&store, batch, false);
    }
    assert!(
        resident(&store) <= 3,
        "the budget holds about two entries, {} are resident",
        resident(&store)
    );
    assert!(store.mem.lock().resident_bytes <= TINY_BUDGET_BYTES);
    let got = rt
        .block_on(store.try_get_log_entries(1..=50))
        .expect("read");
    assert_eq!(contents(&got), contents(&all));
    // A range in the middle of a shared frame, and a single evicted entry.
    let got = rt
        .block_on(store.try_get_log_entries(23..26))
        .expect("read");
    assert_eq!(contents(&got), contents(&all[22..25]));
    let got = rt.block_on(store.try_get_log_entries(7..8)).expect("read");
    assert_eq!(contents(&got), contents(&all[6..7]));
    // The commands of resident entries are served from memory; a range reaching an
    // evicted entry answers false (the caller waits for the apply) and calls nothing.
    let mut seen = Vec::new();
    assert!(waiters.for_each_between(49, 51, |c| seen.push(c.0.to_vec())));
    assert_eq!(seen, vec![contents(&all[49..50])[0].1.clone()]);
    let mut called = false;
    assert!(!waiters.for_each_between(5, 51, |_| called = true));
    assert!(
        !called,
        "no command of a range with an evicted entry is given"
    );
}

#[test]
fn truncation_purge_and_reopen_with_evicted_entries_keep_the_right_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let mut expected: Vec<Entry> = (1..=40).map(|i| big_entry(1, i, 100)).collect();
    {
        let mut store = LogStore::open_budget(dir.path(), LogPolicy::default(), TINY_BUDGET_BYTES)
            .expect("open");
        for e in &expected {
            append_and_wait(&store, vec![e.clone()], false);
        }
        // A diverged tail from 30 on (evicted entries among it), replaced by term 2's.
        rt.block_on(store.truncate(expected[29].log_id))
            .expect("truncate");
        expected.truncate(29);
        let newer: Vec<Entry> = (30..=45).map(|i| big_entry(2, i, 100)).collect();
        for e in &newer {
            append_and_wait(&store, vec![e.clone()], false);
        }
        expected.extend(newer);
        rt.block_on(store.purge(expected[9].log_id)).expect("purge");
        barrier(&store);
        let got = rt
            .block_on(store.try_get_log_entries(0..100))
            .expect("read");
        assert_eq!(contents(&got), contents(&expected[10..]));
        assert!(resident(&store) <= 3);
    }
    // Replaying keeps the budget too, and reads the evicted entries back from the file.
    let mut store =
        LogStore::open_budget(dir.path(), LogPolicy::default(), TINY_BUDGET_BYTES).expect("reopen");
    assert!(
        resident(&store) <= 3,
        "{} resident after replay",
        resident(&store)
    );
    let got = rt
        .block_on(store.try_get_log_entries(0..100))
        .expect("read");
    assert_eq!(contents(&got), contents(&expected[10..]));
    let state = rt.block_on(store.get_log_state()).expect("state");
    assert_eq!(state.last_purged_log_id, Some(expected[9].log_id));
    assert_eq!(state.last_log_id, expected.last().map(|e| e.log_id));
}

/// The default policy with files sealed at `segment_bytes`.
fn sized(segment_bytes: u64) -> LogPolicy {
    LogPolicy {
        segment_bytes,
        ..LogPolicy::default()
    }
}

/// The log files in `dir`, by number, with their sizes.
fn log_files(dir: &Path) -> Vec<(u64, u64)> {
    let mut found: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|f| {
            let f = f.expect("entry");
            let name = f.file_name().into_string().expect("name");
            let seq = match name.as_str() {
                "log" => 0,
                other => other.strip_prefix("log.")?.parse().ok()?,
            };
            Some((seq, f.metadata().expect("meta").len()))
        })
        .collect();
    found.sort_unstable();
    found
}

/// Each live entry's frame: the file's inode and the offset.
fn frame_places(store: &LogStore) -> Vec<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mem = store.mem.lock();
    mem.entries
        .iter()
        .map(|(index, slot)| {
            let pos = slot.pos.as_ref().expect("written");
            (*index, pos.file.metadata().expect("meta").ino(), pos.offset)
        })
        .collect()
}

#[test]
fn a_purge_deletes_whole_sealed_files_and_moves_no_live_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    // 200 entries of 16 KiB in files of 256 KiB: about 13 files; a budget of one entry.
    let size = 16 << 10;
    let all: Vec<Entry> = (1..=200).map(|i| big_entry(1, i, size)).collect();
    let open =
        |dir: &Path| LogStore::open_budget(dir, sized(256 << 10), size as u64 + 100).expect("open");
    let mut store = open(dir.path());
    for pair in all.chunks(2) {
        append_and_wait(&store, pair.to_vec(), false);
    }
    let before = log_files(dir.path());
    assert!(before.len() >= 10, "sealed files: {before:?}");
    assert!(before
        .iter()
        .all(|(_, len)| *len < (256 << 10) + 2 * size as u64 + 100));
    let got = rt
        .block_on(store.try_get_log_entries(0..300))
        .expect("read");
    assert_eq!(contents(&got), contents(&all), "read back across files");

    // Purging up to 150 deletes the files holding only entries up to 150, and copies
    // nothing: every live entry's frame stays where it was written.
    let live_before: Vec<_> = frame_places(&store)
        .into_iter()
        .filter(|(i, _, _)| *i > 150)
        .collect();
    rt.block_on(store.purge(all[149].log_id)).expect("purge");
    barrier(&store);
    // The syncer deletes them after its next fsync (within the flush interval), one after
    // the other: wait until the oldest file left is the one holding entry 151 (it never is
    // if that one was deleted too, nor if the older ones stay).
    let oldest_live_inode = frame_places(&store)[0].1;
    let oldest_inode = |files: &[(u64, u64)]| {
        use std::os::unix::fs::MetadataExt;
        files
            .first()
            .and_then(|f| std::fs::metadata(files::path(dir.path(), f.0)).ok())
            .map(|m| m.ino())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = log_files(dir.path());
        if oldest_inode(&now) == Some(oldest_live_inode) || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Every file before the one holding entry 151 is gone, and that one is kept.
    let oldest_kept_inode = oldest_inode(&after).expect("a file is left");
    assert_eq!(
        oldest_kept_inode, oldest_live_inode,
        "{before:?} -> {after:?}"
    );
    assert!(after.len() <= before.len() - 8, "{before:?} -> {after:?}");
    assert_eq!(
        after.last().map(|f| f.0),
        before.last().map(|f| f.0),
        "the file being written is the same"
    );
    assert_eq!(frame_places(&store), live_before, "a live entry was moved");
    let got = rt
        .block_on(store.try_get_log_entries(0..300))
        .expect("read");
    assert_eq!(contents(&got), contents(&all[150..]));

    // Appends go on; a reopen replays the remaining files (the oldest headed by an older
    // purge point) and ends at the purge point and entries it had.
    let more: Vec<Entry> = (201..=240).map(|i| big_entry(1, i, size)).collect();
    for e in &more {
        append_and_wait(&store, vec![e.clone()], false);
    }
    drop(store);
    let mut store = open(dir.path());
    let mut want = all[150..].to_vec();
    want.extend(more);
    let got = rt
        .block_on(store.try_get_log_entries(0..300))
        .expect("read");
    assert_eq!(contents(&got), contents(&want));
    let state = rt.block_on(store.get_log_state()).expect("state");
    assert_eq!(state.last_purged_log_id, Some(all[149].log_id));
    assert_eq!(state.last_log_id, want.last().map(|e| e.log_id));
}

#[test]
fn the_log_ends_at_the_first_torn_frame_whichever_file_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 << 10;
    let all: Vec<Entry> = (1..=40).map(|i| big_entry(1, i, size)).collect();
    let open = |dir: &Path| LogStore::open_budget(dir, sized(128 << 10), 1 << 20).expect("open");
    drop({
        let store = open(dir.path());
        for e in &all {
            append_and_wait(&store, vec![e.clone()], false);
        }
        store
    });
    let files = log_files(dir.path());
    assert!(files.len() >= 4, "{files:?}");
    let tear = |seq: u64, len: u64| {
        let f = OpenOptions::new()
            .append(true)
            .open(files::path(dir.path(), seq))
            .expect("open");
        f.set_len(len - 5).expect("tear");
    };
    let rt = runtime();
    // A torn last frame of the newest file: cut, the rest kept.
    let (newest, newest_len) = *files.last().expect("files");
    tear(newest, newest_len);
    {
        let mut store = open(dir.path());
        let state = rt.block_on(store.get_log_state()).expect("state");
        assert_eq!(
            state.last_log_id,
            Some(all[38].log_id),
            "the torn entry is cut"
        );
    }
    // A sealed file torn (a crash before the syncer reached it): the log ends at its tear,
    // the later files go, and appends continue in that file.
    let (second, second_len) = files[1];
    tear(second, second_len);
    let mut store = open(dir.path());
    let got = rt
        .block_on(store.try_get_log_entries(0..100))
        .expect("read");
    let kept = got.len();
    assert!(kept > 0 && kept < 20, "kept {kept} entries");
    assert_eq!(contents(&got), contents(&all[..kept]));
    assert_eq!(
        log_files(dir.path())
            .iter()
            .map(|f| f.0)
            .collect::<Vec<_>>(),
        vec![files[0].0, second],
        "the files after the tear are deleted"
    );
    let next = big_entry(2, kept as u64 + 1, size);
    append_and_wait(&store, vec![next.clone()], true);
    drop(store);
    let mut store = open(dir.path());
    let state = rt.block_on(store.get_log_state()).expect("state");
    assert_eq!(state.last_log_id, Some(next.log_id));
}

#[test]
fn a_sync_after_a_roll_syncs_the_sealed_file_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 << 10;
    let store = LogStore::open_budget(dir.path(), sized(64 << 10), 1 << 20).expect("open");
    for i in 1..=6 {
        append_and_wait(&store, vec![big_entry(1, i, size)], false);
    }
    let before = store.fsyncs();
    // The roll happened; no fsync on the writer's path for it. A durable append then syncs
    // the sealed file (and the folder) before its own file.
    append_and_wait(&store, vec![big_entry(1, 7, size)], true);
    let pending = store.writer.lock().syncer.sealed_unsynced();
    assert_eq!(
        pending, 0,
        "a sealed file left unsynced behind a durable entry"
    );
    // The sealed file no longer holds the blocks reserved past its end.
    use std::os::unix::fs::MetadataExt;
    let sealed = std::fs::metadata(dir.path().join(LOG_FILE)).expect("metadata");
    assert!(
        sealed.blocks() * 512 < sealed.len() + (1 << 20),
        "a sealed file of {} bytes holds {} bytes of blocks",
        sealed.len(),
        sealed.blocks() * 512
    );
    assert!(
        store.fsyncs() >= before + 2,
        "{before} -> {}",
        store.fsyncs()
    );
}

#[test]
fn a_damaged_frame_read_back_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let mut store =
        LogStore::open_budget(dir.path(), LogPolicy::default(), TINY_BUDGET_BYTES).expect("open");
    for i in 1..=10 {
        append_and_wait(&store, vec![big_entry(1, i, 100)], false);
    }
    let offset = {
        let mem = store.mem.lock();
        let slot = mem.entries.get(&2).expect("entry 2");
        assert!(slot.entry.is_none(), "entry 2 is evicted");
        slot.pos.as_ref().expect("written").offset
    };
    // Flip a byte of entry 2's command, under the log's feet (the same file).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join(LOG_FILE))
        .expect("open");
    let mut b = [0u8; 1];
    let at = offset + 60;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).expect("read");
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0xff], at).expect("write");
    let err = rt
        .block_on(store.try_get_log_entries(1..5))
        .expect_err("a damaged frame is an error");
    assert!(err.to_string().contains("offset"), "{err}");
    // The undamaged ones still read.
    let got = rt.block_on(store.try_get_log_entries(3..5)).expect("read");
    assert_eq!(got.len(), 2);
}

/// Hands a frame over as an append does: written in place or queued.
fn append_job(
    store: &LogStore,
    entries: Vec<Entry>,
    sync: bool,
) -> oneshot::Receiver<io::Result<()>> {
    let (job, rx) = job_for(store, entries, sync);
    store.write_in_place_or_queue(job).expect("append");
    rx
}

#[test]
fn an_append_without_fsync_is_written_in_place_only_when_nothing_is_ahead_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = LogStore::open(dir.path()).expect("open");
        // Idle log, no fsync due: written and reported before the call returns.
        let mut rx = append_job(&store, vec![entry(1, 1)], false);
        assert!(
            matches!(rx.try_recv(), Ok(Ok(()))),
            "an append on an idle log went through the writer thread"
        );
        // A durable append always goes to the writer thread (it fsyncs there).
        let rx = append_job(&store, vec![entry(1, 2)], true);
        rx.blocking_recv().expect("writer").expect("write");

        // The writer busy (its lock held, as while it writes a batch): the next append
        // queues, and while it is queued a later one must not jump it once the lock is free
        // (the race is the thread's wake-up against the caller's next append: many rounds).
        for round in 0..200u64 {
            let (a, b) = (3 + 2 * round, 4 + 2 * round);
            let held = store.writer.lock();
            let mut first = append_job(&store, vec![entry(1, a)], false);
            assert!(
                first.try_recv().is_err(),
                "written while the writer was busy"
            );
            assert_eq!(store.pending.load(Ordering::SeqCst), 1);
            drop(held);
            let second = append_job(&store, vec![entry(1, b)], false);
            first.blocking_recv().expect("writer").expect("write");
            second.blocking_recv().expect("writer").expect("write");
        }
        barrier(&store);
        assert_eq!(store.pending.load(Ordering::SeqCst), 0);
    }
    // The file holds every entry in log order (a reopen replays them as written).
    let file = std::fs::read(dir.path().join(LOG_FILE)).expect("read");
    let mut at = 0;
    let mut order = Vec::new();
    while let Some((payload, len)) = parse_frame(&file[at..]) {
        if let Ok(Op::Append(entries)) = bincode::deserialize::<Op>(payload) {
            order.extend(entries.iter().map(|e| e.log_id.index));
        }
        at += len;
    }
    assert_eq!(
        order,
        (1..=402).collect::<Vec<u64>>(),
        "frames out of log order"
    );
}

#[test]
fn blocks_are_reserved_past_the_end_without_changing_the_size_and_a_reopen_reads_only_frames() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    {
        let store = LogStore::open(dir.path()).expect("open");
        append_and_wait(&store, vec![entry(1, 1), entry(1, 2)], false);
        let meta = std::fs::metadata(dir.path().join(LOG_FILE)).expect("metadata");
        let written = meta.len();
        assert!(written > 0 && written < 4096, "size {written}");
        // st_blocks counts 512-byte units: the chunk past the frames is allocated.
        assert!(
            meta.blocks() * 512 >= written + PREALLOCATE_CHUNK_BYTES,
            "{} blocks reserved for {written} bytes written",
            meta.blocks()
        );
        append_and_wait(&store, vec![entry(1, 3)], true);
    }
    let mut store = LogStore::open(dir.path()).expect("reopen");
    rt.block_on(async {
        let got = store.try_get_log_entries(0..10).await.expect("read");
        let idx: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(idx, vec![1, 2, 3]);
    });
    // The reserved blocks hold no frames: the file's size is still the frames' end.
    let size = std::fs::metadata(dir.path().join(LOG_FILE))
        .expect("metadata")
        .len();
    append_and_wait(&store, vec![entry(1, 4)], false);
    let grown = std::fs::metadata(dir.path().join(LOG_FILE))
        .expect("metadata")
        .len();
    assert!(grown > size, "an append after the reopen lands at the end");
}
