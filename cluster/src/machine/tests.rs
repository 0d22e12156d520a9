//! Unit tests of the machine store: a snapshot's barrier runs beside the applies.

use std::sync::mpsc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};

use super::*;

/// The longest any wait here may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// Counts its applies; its snapshot barrier reports that it started and then waits until the
/// test lets it go.
struct Gated {
    applied: u64,
    entered: mpsc::Sender<()>,
    release: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
}

impl Machine for Gated {
    fn apply(&mut self, _log_id: LogId, _command: &Command) -> io::Result<Reply> {
        self.applied += 1;
        Ok(Reply(self.applied.to_le_bytes().to_vec()))
    }

    fn snapshot(&self) -> io::Result<Vec<u8>> {
        Ok(self.applied.to_le_bytes().to_vec())
    }

    fn restore(&mut self, bytes: &[u8]) -> io::Result<()> {
        let bytes: [u8; 8] = bytes.try_into().map_err(io::Error::other)?;
        self.applied = u64::from_le_bytes(bytes);
        Ok(())
    }

    fn snapshot_barrier(&self) -> Option<SnapshotBarrier> {
        let entered = self.entered.clone();
        let release = self.release.lock().take()?;
        Some(Box::new(move || {
            entered.send(()).map_err(io::Error::other)?;
            release.recv_timeout(DEADLINE).map_err(io::Error::other)
        }))
    }
}

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command(bytes::Bytes::from_static(b"c"))),
    }
}

/// A store in `dir` that applied entry 1 and is building a snapshot whose barrier has
/// started and waits: the store, the build, and the sender that lets the barrier finish.
async fn building_after_one_apply(
    dir: &std::path::Path,
) -> (
    MachineStore<Gated>,
    tokio::task::JoinHandle<Result<Snapshot, StorageError>>,
    mpsc::Sender<()>,
) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let machine = Gated {
        applied: 0,
        entered: entered_tx,
        release: Arc::new(Mutex::new(Some(release_rx))),
    };
    let mut store = MachineStore::open(dir, machine).expect("open");
    store.apply([entry(1)]).await.expect("apply 1");
    let mut builder = store.clone();
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(DEADLINE))
        .await
        .expect("join")
        .expect("the barrier never started");
    (store, build, release_tx)
}

/// The store in `dir` opened again, with a machine that has no barrier to wait on.
fn reopen(dir: &std::path::Path) -> MachineStore<Gated> {
    let (unused_tx, _) = mpsc::channel();
    let machine = Gated {
        applied: 0,
        entered: unused_tx,
        release: Arc::new(Mutex::new(None)),
    };
    MachineStore::open(dir, machine).expect("reopen")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_go_on_while_a_snapshot_barrier_runs_and_the_snapshot_covers_only_its_point() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, build, release_tx) = building_after_one_apply(dir.path()).await;

    // The barrier is still running: an apply must not wait for it.
    let applied = tokio::time::timeout(Duration::from_secs(5), store.apply([entry(2)])).await;
    let replies = applied
        .expect("an apply waited for the snapshot's barrier")
        .expect("apply 2");
    assert_eq!(replies[0].0, 2u64.to_le_bytes().to_vec());

    release_tx.send(()).expect("release");
    let snapshot = tokio::time::timeout(DEADLINE, build)
        .await
        .expect("the snapshot never finished")
        .expect("join")
        .expect("build");
    // The snapshot is the state when it was taken (entry 1), not after the later apply.
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));
    assert_eq!(snapshot.snapshot.into_inner(), 1u64.to_le_bytes().to_vec());
    let current = store.get_current_snapshot().await.expect("current");
    assert_eq!(
        current.and_then(|s| s.meta.last_log_id).map(|l| l.index),
        Some(1)
    );

    // Reopened, the store restores the saved snapshot: entry 1, and openraft re-applies 2.
    drop(store);
    let again = reopen(dir.path());
    assert_eq!(again.last_applied().map(|l| l.index), Some(1));
    assert_eq!(again.read(|m| m.applied), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_installed_while_a_barrier_runs_is_not_replaced_by_the_older_one_built() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, build, release_tx) = building_after_one_apply(dir.path()).await;

    // The leader's snapshot of entry 5 arrives meanwhile.
    let meta = SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
        last_membership: StoredMembership::default(),
        snapshot_id: "leader-5".into(),
    };
    store
        .install_snapshot(&meta, Box::new(Cursor::new(5u64.to_le_bytes().to_vec())))
        .await
        .expect("install");
    release_tx.send(()).expect("release");
    let built = tokio::time::timeout(DEADLINE, build)
        .await
        .expect("the snapshot never finished")
        .expect("join")
        .expect("build");
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(1));

    // The installed snapshot stays the current one, in memory and on disk.
    let current = store.get_current_snapshot().await.expect("current");
    assert_eq!(
        current.map(|s| s.meta.snapshot_id),
        Some("leader-5".to_string()),
        "the older snapshot built meanwhile replaced the installed one"
    );
    drop(store);
    let again = reopen(dir.path());
    assert_eq!(again.last_applied().map(|l| l.index), Some(5));
    assert_eq!(again.read(|m| m.applied), 5);
}
