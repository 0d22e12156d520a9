//! Raft groups of several in-process nodes, talking over real loopback gRPC: election,
//! replication, restarts that keep the vote and the log, and more than one group on the same
//! connections.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use parking_lot::Mutex;
use rill_cluster::types::{LogId, Raft};
use rill_cluster::{Command, GroupHost, GroupId, Machine, NodeId, RaftService, RaftTimings, Reply};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The longest any wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// A machine that records every command it applies; the reply is the command's position.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Machine for Recorder {
    fn apply(&mut self, _log_id: LogId, command: &Command) -> io::Result<Reply> {
        let mut applied = self.applied.lock();
        applied.push(command.0.to_vec());
        Ok(Reply(((applied.len() - 1) as u64).to_le_bytes().to_vec()))
    }

    fn snapshot(&self) -> io::Result<Vec<u8>> {
        bincode::serialize(&*self.applied.lock()).map_err(io::Error::other)
    }

    fn restore(&mut self, bytes: &[u8]) -> io::Result<()> {
        *self.applied.lock() = bincode::deserialize(bytes).map_err(io::Error::other)?;
        Ok(())
    }
}

/// One node: its host, its gRPC server and the recorders of its groups.
struct TestNode {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
    host: GroupHost,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    recorders: BTreeMap<GroupId, Recorder>,
}

impl TestNode {
    /// Starts node `id` serving on `addr` (port 0 picks one) with its files in `dir`.
    async fn start(id: NodeId, addr: SocketAddr, dir: &Path) -> TestNode {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let timings = RaftTimings {
            heartbeat_ms: 50,
            election_min_ms: 300,
            election_max_ms: 600,
        };
        let host = GroupHost::new(id, dir.join("raft"), timings).expect("host");
        let stop = CancellationToken::new();
        let service = RaftService::new(host.clone()).into_server();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let token = stop.clone();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, token.cancelled())
                .await;
        });
        TestNode {
            id,
            addr,
            dir: dir.to_path_buf(),
            host,
            stop,
            server,
            recorders: BTreeMap::new(),
        }
    }

    async fn start_group(&mut self, group: GroupId) -> Raft {
        let recorder = Recorder::default();
        let (raft, _store) = self
            .host
            .start_group(group, recorder.clone())
            .await
            .expect("start group");
        self.recorders.insert(group, recorder);
        raft
    }

    async fn stop(self) -> (NodeId, SocketAddr, PathBuf) {
        self.host.shutdown().await;
        self.stop.cancel();
        let _ = tokio::time::timeout(DEADLINE, self.server).await;
        (self.id, self.addr, self.dir)
    }

    fn applied(&self, group: GroupId) -> Vec<Vec<u8>> {
        self.recorders[&group].applied.lock().clone()
    }
}

async fn start_cluster(dirs: &[tempfile::TempDir]) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        nodes.push(TestNode::start(i as u64 + 1, any, dir.path()).await);
    }
    nodes
}

fn members(nodes: &[TestNode]) -> BTreeMap<NodeId, BasicNode> {
    nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(n.addr.to_string())))
        .collect()
}

/// Waits until some node of `group` sees a leader that every node agrees on.
async fn wait_leader(nodes: &[TestNode], group: GroupId) -> NodeId {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leaders: Vec<Option<NodeId>> = nodes
            .iter()
            .map(|n| {
                n.host
                    .group(group)
                    .and_then(|r| r.metrics().borrow().current_leader)
            })
            .collect();
        if let Some(Some(l)) = leaders.first() {
            if leaders.iter().all(|x| *x == Some(*l)) {
                return *l;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader of group {group}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every node of `group` has applied `n` commands.
async fn wait_applied(nodes: &[TestNode], group: GroupId, n: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while nodes.iter().any(|node| node.applied(group).len() < n) {
        let counts: Vec<usize> = nodes.iter().map(|x| x.applied(group).len()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "group {group} not applied {n} everywhere: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn write(nodes: &[TestNode], group: GroupId, leader: NodeId, data: &[u8]) -> u64 {
    let raft = nodes
        .iter()
        .find(|n| n.id == leader)
        .and_then(|n| n.host.group(group))
        .expect("leader node");
    let resp = tokio::time::timeout(DEADLINE, raft.client_write(Command(data.to_vec().into())))
        .await
        .expect("write in time")
        .expect("write");
    u64::from_le_bytes(resp.data.0.try_into().expect("8 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_replicate_in_order() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut nodes = start_cluster(&dirs).await;
    for n in nodes.iter_mut() {
        n.start_group(7).await;
    }
    let m = members(&nodes);
    nodes[0]
        .host
        .group(7)
        .expect("group")
        .initialize(m)
        .await
        .expect("initialize");
    let leader = wait_leader(&nodes, 7).await;
    for i in 0..20u8 {
        let position = write(&nodes, 7, leader, &[i]).await;
        assert_eq!(position, u64::from(i), "replies come back in log order");
    }
    wait_applied(&nodes, 7, 20).await;
    let expected: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i]).collect();
    for n in &nodes {
        assert_eq!(n.applied(7), expected, "node {} applied in order", n.id);
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_every_node_keeps_vote_and_log() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut nodes = start_cluster(&dirs).await;
    for n in nodes.iter_mut() {
        n.start_group(1).await;
    }
    let m = members(&nodes);
    nodes[0]
        .host
        .group(1)
        .expect("group")
        .initialize(m)
        .await
        .expect("initialize");
    let leader = wait_leader(&nodes, 1).await;
    for i in 0..5u8 {
        write(&nodes, 1, leader, &[i]).await;
    }
    wait_applied(&nodes, 1, 5).await;
    let term_before = nodes[0]
        .host
        .group(1)
        .expect("group")
        .metrics()
        .borrow()
        .current_term;

    // Stop everything, then start the same nodes on the same addresses and folders.
    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.stop().await);
    }
    let mut nodes = Vec::new();
    for (id, addr, dir) in stopped {
        let mut n = TestNode::start(id, addr, &dir).await;
        let raft = n.start_group(1).await;
        // The restarted node reads its vote and log before it talks to anyone.
        raft.wait(Some(DEADLINE))
            .metrics(
                |m| m.current_term >= term_before && m.last_log_index >= Some(5),
                "vote and log read back",
            )
            .await
            .unwrap_or_else(|e| panic!("node {id} lost its vote or log: {e}"));
        nodes.push(n);
    }
    let leader = wait_leader(&nodes, 1).await;
    // The old entries are applied again from the kept log, then new ones follow them.
    write(&nodes, 1, leader, &[99]).await;
    wait_applied(&nodes, 1, 6).await;
    for n in &nodes {
        let applied = n.applied(1);
        assert_eq!(applied.len(), 6, "node {}: {applied:?}", n.id);
        assert_eq!(applied[5], vec![99]);
        assert_eq!(applied[0], vec![0]);
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_share_the_nodes_and_stay_apart() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut nodes = start_cluster(&dirs).await;
    for n in nodes.iter_mut() {
        n.start_group(1).await;
        n.start_group(2).await;
    }
    let m = members(&nodes);
    for g in [1, 2] {
        nodes[0]
            .host
            .group(g)
            .expect("group")
            .initialize(m.clone())
            .await
            .expect("initialize");
    }
    let l1 = wait_leader(&nodes, 1).await;
    let l2 = wait_leader(&nodes, 2).await;
    write(&nodes, 1, l1, b"one").await;
    write(&nodes, 2, l2, b"two").await;
    write(&nodes, 2, l2, b"three").await;
    wait_applied(&nodes, 1, 1).await;
    wait_applied(&nodes, 2, 2).await;
    for n in &nodes {
        assert_eq!(n.applied(1), vec![b"one".to_vec()]);
        assert_eq!(n.applied(2), vec![b"two".to_vec(), b"three".to_vec()]);
    }
    for n in nodes {
        n.stop().await;
    }
}
