//! Fast failover: noticing at once that a peer's process is gone, and electing new leaders
//! for the groups it led without waiting for the election timers.
//!
//! Why the timers are slow: openraft 0.9 makes a follower whose leader was committed wait
//! for the leader's lease (`election_timeout_max`) *plus* its own election timeout since the
//! last heartbeat before it campaigns, and every voter refuses votes while its own lease
//! since that heartbeat lasts. With the default timings a dead leader is replaced 0.9–1.2 s
//! after its last heartbeat. Shorter timings cause spurious elections on a loaded machine.
//!
//! **Detection** ([`Failover::start`]): every broker keeps a `Raft.Watch` stream open to
//! each peer, on the channel its Raft traffic uses. A killed process's kernel closes its
//! sockets at once, so the stream breaks at once; the watcher then tries a plain TCP
//! connection to the peer's address ([`probe`]). *Refused* means no process listens there:
//! the peer is down ([`Verdict::Down`]). *Accepted*, or another immediate failure (a reset),
//! means something still listens or is closing ([`Verdict::CheckAgain`]): a live peer (the
//! break was transient) answers a new watch, and a dying process, whose listening socket can
//! outlive its connections for a moment, soon refuses; the watcher alternates the two for up
//! to [`JUDGE_WINDOW`]. No answer within the probe's timeout decides nothing
//! ([`Verdict::Undecided`]): the timers handle it, as before. A paused (SIGSTOP) or
//! cut-off peer keeps its sockets open, so it is never reported this way.
//!
//! **Election** ([`decide`]): for each Raft group hosted here whose known leader is the
//! dead peer and in which this broker is a voter, every surviving voter triggers one
//! election at once. That gives up its lease (a candidate's vote is not committed, and only
//! a committed vote holds a lease), so the others' next vote requests are answered on their
//! merits. That first round may fail (a voter asked before it gave up its lease refuses),
//! so the *driver*, the live voter with the highest node id, triggers again every
//! [`RETRY_INTERVAL`] (once the previous round's vote requests have come back) until a
//! leader is known, or the deadline (twice the longest election timeout) passes. The other
//! live voters trigger again too, less often (the `k`-th every `2k + 1` intervals), in case
//! the driver cannot help (it did not see the peer die, or is still starting). A voter
//! whose candidacy a voter with a longer log refused stops (it cannot win); that voter, on
//! refusing it, drives instead. A voter that granted its vote to another candidate waits
//! for it (a new election would unseat the leader it is becoming). Elections are always
//! safe in Raft (only liveness is at stake), and the extra terms carry no leader, so
//! nothing in Rill sees them but the `rill_raft_elections_total` counter.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use parking_lot::Mutex;
use rill_proto::v1::raft_client::RaftClient;
use rill_proto::v1::{WatchEvent, WatchRequest};
use tonic::Streaming;

use crate::network::{source_for, PeerChannel};
use crate::node::{ClusterNode, PING_INTERVAL};
use crate::types::{GroupId, NodeId, Raft};

/// How often a group's election driver looks again (and, when it drives, re-elects).
pub const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How long opening a watch (and its first event) may take.
const OPEN_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How long reopening a watch may take while judging a peer whose watch ended: a live
/// peer answers within it; a dying process never does.
const RECHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a peer whose watch ended is judged (probes alternating with reopened watches)
/// before it is left to the timers.
pub const JUDGE_WINDOW: Duration = Duration::from_millis(1_000);
/// How long the connection probe may take; a peer that does not answer within it is not
/// judged (a refusal from a live host comes back at once).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// The pause between two checks of a peer whose watch ended.
const REOPEN_PAUSE: Duration = Duration::from_millis(50);

/// What a connection attempt to a peer's address showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Refused: nothing listens at the address.
    Refused,
    /// Accepted: something listens (the peer, or a proxy in front of it).
    Accepted,
    /// The connection failed at once another way (reset while the peer's listening socket
    /// closed, say): worth another look.
    Failed(std::io::ErrorKind),
    /// Neither within the timeout, or the address did not resolve: nothing is known.
    Unknown,
}

/// The watcher's judgement on a peer whose watch stream just ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its process is gone: help elect new leaders for what it led.
    Down,
    /// Something listens at its address, or the connection failed at once another way:
    /// reopen the watch (a live peer answers it) or probe again (a dying process soon
    /// refuses).
    CheckAgain,
    /// Not decided here (a slow or unreachable network): leave failures to the election
    /// timers.
    Undecided,
}

/// The verdict on a peer whose watch stream ended, from the probe that followed.
pub fn verdict(probe: Probe) -> Verdict {
    match probe {
        Probe::Refused => Verdict::Down,
        Probe::Accepted | Probe::Failed(_) => Verdict::CheckAgain,
        Probe::Unknown => Verdict::Undecided,
    }
}

/// Tries one TCP connection to `addr` (`host:port`), from `source` when that applies (see
/// [`source_for`]), and closes it at once.
pub async fn probe(addr: &str, source: Option<IpAddr>) -> Probe {
    let target = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host(addr)).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    };
    let Some(target) = target else {
        return Probe::Unknown;
    };
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    let Ok(socket) = socket else {
        return Probe::Unknown;
    };
    if let Some(source) = source_for(source, addr) {
        if let Err(e) = socket.bind(SocketAddr::new(source, 0)) {
            return Probe::Failed(e.kind());
        }
    }
    match tokio::time::timeout(PROBE_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(_stream)) => Probe::Accepted,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Ok(Err(e)) => Probe::Failed(e.kind()),
        Err(_) => Probe::Unknown,
    }
}

/// What a group's election driver sees at one look.
#[derive(Debug, Clone)]
pub struct Tick {
    /// This broker.
    pub me: NodeId,
    /// The peer found down.
    pub dead: NodeId,
    /// The leader this replica knows (none while an election runs); this broker when it
    /// leads.
    pub leader: Option<NodeId>,
    /// The candidate (or leader) this replica's current vote is for.
    pub voted_for: Option<NodeId>,
    /// The group's voters.
    pub voters: BTreeSet<NodeId>,
    /// The voters this broker counts as live (itself always is).
    pub live: BTreeSet<NodeId>,
    /// Whether this is the driver's first look.
    pub first: bool,
    /// Whether the deadline has passed.
    pub expired: bool,
    /// Whether a voter with a longer log refused this broker's candidacy since the failover
    /// began (this broker cannot win).
    pub outlogged: bool,
    /// Whether this broker refused a candidate with a shorter log since the failover began
    /// (so it should campaign itself).
    pub asked: bool,
    /// Vote requests of this group sent from here still awaiting an answer (or a timeout).
    pub votes_in_flight: usize,
    /// How long ago this driver last triggered an election, if it did.
    pub since_elect: Option<Duration>,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Trigger an election now.
    Elect,
    /// Look again after [`RETRY_INTERVAL`].
    Wait,
    /// Done: a leader is known, the deadline passed, or nothing here can help.
    Stop,
}

/// The driver's decision (see the module documentation).
pub fn decide(t: &Tick) -> Step {
    if t.leader.is_some_and(|l| l != t.dead) || t.expired || !t.voters.contains(&t.me) {
        return Step::Stop;
    }
    let is_live = |v: &NodeId| *v != t.dead && (*v == t.me || t.live.contains(v));
    let live_voters: Vec<NodeId> = t.voters.iter().copied().filter(is_live).collect();
    if live_voters.len() <= t.voters.len() / 2 {
        // No majority is live: no one can win; the timers go on as before.
        return Step::Stop;
    }
    if t.first {
        // Give up this voter's lease, so the driver's next request is answered on its merits.
        return Step::Elect;
    }
    if t.outlogged || t.votes_in_flight > 0 {
        return Step::Wait;
    }
    if !t.asked && t.voted_for.is_some_and(|v| v != t.me && v != t.dead) {
        // This voter granted another candidate its vote: that one is becoming leader (its
        // first append makes it known here). Running against it would unseat it. (A voter
        // that refused a shorter log may hold a vote it only learned from a refusal, for a
        // candidate that cannot win: it campaigns anyway.)
        return Step::Wait;
    }
    // The driver (rank 0, the highest live id), or a voter that a shorter log asked, every
    // interval; the others every 3, 5, ... intervals. The highest id drives because
    // openraft orders votes of one term by node id: its candidacy beats the others' of the
    // same term, so the rounds of lower ids (which would unseat it) are the rare ones. The
    // driver's loop looks once per interval, so its elapsed time always reaches one interval.
    let rank = live_voters
        .iter()
        .rev()
        .position(|v| *v == t.me)
        .unwrap_or(0) as u32;
    let period = if t.asked {
        RETRY_INTERVAL
    } else {
        RETRY_INTERVAL * (2 * rank + 1)
    };
    if t.since_elect.is_none_or(|since| since >= period) {
        Step::Elect
    } else {
        Step::Wait
    }
}

/// What this broker's vote requests and answers showed, per group: shared by the sending
/// side (network), the receiving side (service) and the election drivers.
#[derive(Debug, Default)]
pub struct ElectionNotes {
    groups: Mutex<HashMap<GroupId, GroupNotes>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct GroupNotes {
    votes_in_flight: usize,
    /// When a voter with a longer log last refused this broker's candidacy.
    outlogged_at: Option<Instant>,
    /// When this broker last refused a candidate with a shorter log.
    refused_shorter_at: Option<Instant>,
}

impl ElectionNotes {
    /// Counts a vote request of `group` as sent until the returned guard is dropped (the
    /// request answered, failed, or abandoned at its timeout).
    pub fn vote_sent(self: &Arc<Self>, group: GroupId) -> VoteInFlight {
        self.groups.lock().entry(group).or_default().votes_in_flight += 1;
        VoteInFlight {
            notes: self.clone(),
            group,
        }
    }

    /// Records that a voter with a longer log refused this broker's candidacy in `group`.
    pub fn outlogged(&self, group: GroupId) {
        self.groups.lock().entry(group).or_default().outlogged_at = Some(Instant::now());
    }

    /// Records that this broker refused a candidate with a shorter log in `group`.
    pub fn refused_shorter(&self, group: GroupId) {
        self.groups
            .lock()
            .entry(group)
            .or_default()
            .refused_shorter_at = Some(Instant::now());
    }

    fn get(&self, group: GroupId) -> GroupNotes {
        self.groups.lock().get(&group).copied().unwrap_or_default()
    }
}

/// A vote request counted in flight (see [`ElectionNotes::vote_sent`]).
pub struct VoteInFlight {
    notes: Arc<ElectionNotes>,
    group: GroupId,
}

impl Drop for VoteInFlight {
    fn drop(&mut self) {
        if let Some(n) = self.notes.groups.lock().get_mut(&self.group) {
            n.votes_in_flight = n.votes_in_flight.saturating_sub(1);
        }
    }
}

/// Whether a vote answer means the candidate's log is shorter than the voter's.
pub fn refused_for_log(
    request: &openraft::raft::VoteRequest<NodeId>,
    answer: &openraft::raft::VoteResponse<NodeId>,
) -> bool {
    !answer.vote_granted && answer.last_log_id > request.last_log_id
}

/// The failure detector and election drivers of one broker. Cheap to clone.
#[derive(Clone, Default)]
pub struct Failover {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Groups with a driver running.
    driving: Mutex<HashSet<GroupId>>,
    /// Peers found down so far.
    detections: AtomicU64,
}

impl Failover {
    /// How many times a peer was found down since this broker started.
    pub fn detections(&self) -> u64 {
        self.inner.detections.load(Ordering::Relaxed)
    }

    /// Starts one watcher per peer of `node` (on `node`'s task tracker; each stops with its
    /// shutdown token).
    pub fn start(&self, node: &ClusterNode) {
        let config = node.registry().config().clone();
        for (peer, address) in config.peers.iter() {
            if peer == config.node_id {
                continue;
            }
            let (this, node, address) = (self.clone(), node.clone(), address.to_string());
            node.tasks().clone().spawn(async move {
                let shutdown = node.shutdown_token().clone();
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = this.watch(&node, peer, &address) => {}
                }
            });
        }
    }

    /// Watches `peer` at `address` for as long as the broker runs.
    async fn watch(&self, node: &ClusterNode, peer: NodeId, address: &str) {
        loop {
            let channel = match node.peers().channel(address) {
                Ok(c) => c,
                // A malformed address: the join refuses it with the reason.
                Err(_) => return,
            };
            let mut stream = match open_watch(channel, node.node_id(), peer, OPEN_TIMEOUT).await {
                Ok(stream) => stream,
                Err(status) => {
                    tracing::trace!(peer, %status, "could not watch the peer");
                    tokio::time::sleep(PING_INTERVAL).await;
                    continue;
                }
            };
            tracing::debug!(peer, "watching the peer");
            loop {
                // Events past the first are not sent; the stream ends when the connection
                // does (or the peer shuts down).
                while let Ok(Some(_)) = stream.message().await {}
                match self.judge(node, peer, address).await {
                    Some(again) => stream = again,
                    None => break,
                }
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
    }

    /// After `peer`'s watch ended: probes its address until it refuses (the peer is down)
    /// or the peer answers a new watch (a transient break: the new stream is returned),
    /// for at most [`JUDGE_WINDOW`].
    async fn judge(
        &self,
        node: &ClusterNode,
        peer: NodeId,
        address: &str,
    ) -> Option<Streaming<WatchEvent>> {
        let until = Instant::now() + JUDGE_WINDOW;
        loop {
            let probed = probe(address, node.peers().source_ip()).await;
            tracing::debug!(peer, ?probed, "the watch of the peer ended");
            match verdict(probed) {
                Verdict::Down => {
                    self.peer_down(node, peer);
                    return None;
                }
                Verdict::Undecided => return None,
                Verdict::CheckAgain => {}
            }
            let channel = node.peers().channel(address).ok()?;
            if let Ok(stream) = open_watch(channel, node.node_id(), peer, RECHECK_TIMEOUT).await {
                return Some(stream);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(REOPEN_PAUSE).await;
        }
    }

    /// `peer`'s process is gone: marks it down and starts a driver for every group it led
    /// here.
    fn peer_down(&self, node: &ClusterNode, peer: NodeId) {
        self.inner.detections.fetch_add(1, Ordering::Relaxed);
        node.registry().mark_down(peer);
        tracing::info!(
            peer,
            "peer's connection closed and a new one was refused: electing new leaders for what it led"
        );
        for (group, raft) in node.host().groups() {
            let led = {
                let m = raft.metrics();
                let m = m.borrow();
                // The committed vote names the leader too (a replica still starting may
                // not have published it as the current leader yet).
                let voted = m.vote.is_committed() && m.vote.leader_id().voted_for() == Some(peer);
                (m.current_leader == Some(peer) || voted) && m.state != ServerState::Leader
            };
            if !led || !self.inner.driving.lock().insert(group) {
                continue;
            }
            let (this, node2) = (self.clone(), node.clone());
            node.tasks().spawn(async move {
                let shutdown = node2.shutdown_token().clone();
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = this.drive(&node2, group, raft, peer) => {}
                }
                this.inner.driving.lock().remove(&group);
            });
        }
    }

    /// Helps elect a leader of `group` after its leader `dead` was found down.
    async fn drive(&self, node: &ClusterNode, group: GroupId, raft: Raft, dead: NodeId) {
        let started = Instant::now();
        let election_max = Duration::from_millis(node.registry().config().timings.election_max_ms);
        let deadline = started + 2 * election_max;
        let notes = node.host().election_notes();
        let registry = node.registry();
        let mut first = true;
        let mut elected_at: Option<Instant> = None;
        loop {
            let n = notes.get(group);
            let tick = {
                let m = raft.metrics();
                let m = m.borrow();
                let voters: BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
                Tick {
                    me: node.node_id(),
                    dead,
                    leader: m.current_leader,
                    voted_for: m.vote.leader_id().voted_for(),
                    live: voters
                        .iter()
                        .copied()
                        .filter(|v| registry.is_live(*v))
                        .collect(),
                    voters,
                    first,
                    expired: Instant::now() >= deadline,
                    outlogged: n.outlogged_at.is_some_and(|at| at >= started),
                    asked: n.refused_shorter_at.is_some_and(|at| at >= started),
                    votes_in_flight: n.votes_in_flight,
                    since_elect: elected_at.map(|at| at.elapsed()),
                }
            };
            match decide(&tick) {
                Step::Stop => {
                    tracing::info!(
                        group,
                        dead,
                        leader = ?tick.leader,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "failover of the group done"
                    );
                    return;
                }
                Step::Elect => {
                    tracing::debug!(group, dead, ?tick, "triggering an election");
                    if raft.trigger().elect().await.is_err() {
                        // The group stopped.
                        return;
                    }
                    elected_at = Some(Instant::now());
                }
                Step::Wait => {}
            }
            first = false;
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
}

/// Opens a watch of `peer` and reads its first event, each within `timeout`.
async fn open_watch(
    channel: PeerChannel,
    me: NodeId,
    peer: NodeId,
    timeout: Duration,
) -> Result<Streaming<WatchEvent>, tonic::Status> {
    let mut client = RaftClient::new(channel);
    // No deadline on the call itself: it would end the stream.
    let request = WatchRequest {
        from_node: me,
        to_node: peer,
    };
    let mut stream = tokio::time::timeout(timeout, client.watch(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("opening the watch"))??
        .into_inner();
    match tokio::time::timeout(timeout, stream.message()).await {
        Ok(Ok(Some(event))) if event.node_id == peer => Ok(stream),
        Ok(Ok(Some(event))) => Err(tonic::Status::failed_precondition(format!(
            "node {} answered a watch of node {peer}",
            event.node_id
        ))),
        Ok(Ok(None)) => Err(tonic::Status::unavailable("the watch ended at once")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("the watch's first event")),
    }
}

#[cfg(test)]
mod tests;
