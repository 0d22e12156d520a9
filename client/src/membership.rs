//! [`GroupMember`]: membership of a consumer group, with the broker assigning partitions
//! (the next-generation consumer protocol of Kafka, KIP-848).
//!
//! The handle heartbeats in the background and turns the broker's answers into
//! [`MemberEvent`]s: partitions assigned, partitions revoked, partitions lost. The
//! application consumes the partitions it owns; on `Revoked` it commits what it has handed
//! out for those partitions, stops them, and calls [`GroupMember::release`]. Only then does the
//! broker hand them to their next owner, so no partition is ever consumed by two members at
//! once, and nothing handed out is lost (at least once).
//!
//! ```no_run
//! # async fn run() -> rill_client::Result<()> {
//! use rill_client::{Connection, GroupMember, MemberConfig, MemberEvent};
//! let conn = Connection::connect("127.0.0.1:9092").await?;
//! let mut member = GroupMember::join(conn, MemberConfig::new("billing", ["orders"])).await?;
//! while let Some(event) = member.next_event().await {
//!     match event {
//!         MemberEvent::Assigned(partitions) => { /* start consuming them */ }
//!         MemberEvent::Revoked(partitions) => {
//!             // commit with member.commit(..), stop them, then:
//!             member.release(&partitions);
//!         }
//!         MemberEvent::Lost(partitions) => { /* stop them at once */ }
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rill_proto::v1 as pb;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::connection::Connection;
use crate::error::{is_retryable_status, ClientError, Result};

/// Partitions by topic.
pub type Partitions = BTreeMap<String, BTreeSet<u32>>;

/// How often a member that waits for partitions heartbeats, ms (at most; the broker's
/// interval when shorter).
const RECONCILING_POLL_MS: u64 = 200;

/// The session timeout the broker uses when a member sets none, ms.
const DEFAULT_SESSION_TIMEOUT_MS: u32 = 45_000;

/// How to join a group.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    group: String,
    topics: Vec<String>,
    instance_id: Option<String>,
    session_timeout_ms: Option<u32>,
    rebalance_timeout_ms: Option<u32>,
    assignor: Option<String>,
}

impl MemberConfig {
    /// Membership of `group`, subscribed to `topics`, with the broker's defaults otherwise.
    pub fn new<S: Into<String>>(group: &str, topics: impl IntoIterator<Item = S>) -> Self {
        MemberConfig {
            group: group.to_string(),
            topics: topics.into_iter().map(Into::into).collect(),
            instance_id: None,
            session_timeout_ms: None,
            rebalance_timeout_ms: None,
            assignor: None,
        }
    }

    /// Makes this a static member: a restart within the session timeout gets the same
    /// partitions back, with no rebalance.
    pub fn instance_id(mut self, id: &str) -> Self {
        self.instance_id = Some(id.to_string());
        self
    }

    /// Sets the group's session timeout, ms (the broker allows 500 to 3600000).
    pub fn session_timeout_ms(mut self, ms: u32) -> Self {
        self.session_timeout_ms = Some(ms);
        self
    }

    /// Sets the group's rebalance timeout, ms: the longest a revoked partition may be kept.
    pub fn rebalance_timeout_ms(mut self, ms: u32) -> Self {
        self.rebalance_timeout_ms = Some(ms);
        self
    }

    /// Chooses the assignor, `uniform` or `range` (used when the group is empty).
    pub fn assignor(mut self, name: &str) -> Self {
        self.assignor = Some(name.to_string());
        self
    }
}

/// A change of the partitions a member owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// Now owned: start consuming them from the group's committed offsets.
    Assigned(Partitions),
    /// To give up: commit what was handed out for them, stop them, then call
    /// [`GroupMember::release`].
    Revoked(Partitions),
    /// Lost without a handover (the member was fenced, timed out, or could not reach the
    /// broker for a session timeout): stop them at once; commits for them are refused.
    Lost(Partitions),
}

/// A member of a consumer group. Heartbeats in the background until [`GroupMember::leave`]
/// or drop (a drop stops heartbeating; the broker then removes the member after its session
/// timeout).
#[derive(Debug)]
pub struct GroupMember {
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<MemberEvent>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    /// The broker heartbeats and commits go to; moved to the next broker of its address
    /// list when it stops answering (any broker forwards group calls to the coordinator).
    conn: Mutex<Connection>,
    config: MemberConfig,
    /// A plain lock, held only to read or update the state, never across an await.
    state: Mutex<State>,
    /// Wakes the heartbeat loop early (after a release).
    wake: Notify,
    /// Where events go. Kept here (not only in the heartbeat loop) so that
    /// [`GroupMember::rejoin`] can report what it gave up.
    tx: mpsc::UnboundedSender<MemberEvent>,
}

#[derive(Debug, Default, Clone)]
struct State {
    member_id: String,
    epoch: i32,
    /// Assigned and not revoked.
    owned: Partitions,
    /// Revoked, not released yet: still owned, and reported so.
    releasing: Partitions,
    interval_ms: u32,
    /// The broker's last answer said partitions are still to come (or to give up).
    reconciling: bool,
    /// Why the member was last fenced (the broker's message), until taken.
    fenced_reason: Option<String>,
}

impl GroupMember {
    /// Joins the group: the first heartbeat is sent before this returns, so bad input (a bad
    /// group or topic name, a timeout out of range) is an error here.
    pub async fn join(conn: Connection, config: MemberConfig) -> Result<GroupMember> {
        if config.topics.is_empty() {
            return Err(ClientError::Invalid(
                "a group member must subscribe to at least one topic".into(),
            ));
        }
        let (tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            tx,
        });
        let reply = shared
            .send(shared.request())
            .await
            .map_err(|s| ClientError::broker(None, None, s))?;
        shared.apply(reply, &shared.tx);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(heartbeat_loop(Arc::clone(&shared), cancel.clone()));
        Ok(GroupMember {
            shared,
            events,
            cancel,
            task: Some(task),
        })
    }

    /// The member id the broker gave.
    pub fn member_id(&self) -> String {
        self.shared.lock().member_id.clone()
    }

    /// The member's current epoch.
    pub fn member_epoch(&self) -> i32 {
        self.shared.lock().epoch
    }

    /// The partitions owned now (assigned, and revoked but not released yet).
    pub fn owned(&self) -> Partitions {
        let s = self.shared.lock();
        union(&s.owned, &s.releasing)
    }

    /// The next change of ownership. Waits while nothing changes.
    pub async fn next_event(&mut self) -> Option<MemberEvent> {
        self.events.recv().await
    }

    /// The next change of ownership if one has arrived already, without waiting.
    pub fn try_next_event(&mut self) -> Option<MemberEvent> {
        self.events.try_recv().ok()
    }

    /// Why the member was last fenced or timed out (the broker's message, naming the group,
    /// the member and the epochs), if it was since the last call.
    pub fn take_fenced_reason(&self) -> Option<String> {
        self.shared.lock().fenced_reason.take()
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.shared.config.group
    }

    /// Gives up every partition at once, without a handover, and rejoins with epoch 0 at
    /// once: for a member that learnt it was fenced some other way than by a heartbeat (a
    /// commit refused with FAILED_PRECONDITION). A [`MemberEvent::Lost`] follows when it
    /// owned anything.
    pub fn rejoin(&self) {
        self.shared.lose_all(&self.shared.tx);
        self.shared.wake.notify_one();
    }

    /// Gives up revoked partitions (after committing and stopping them). The broker learns it
    /// at once, and hands them to their next owner.
    pub fn release(&self, partitions: &Partitions) {
        {
            let mut s = self.shared.lock();
            for (topic, ps) in partitions {
                if let Some(set) = s.releasing.get_mut(topic) {
                    set.retain(|p| !ps.contains(p));
                }
            }
            s.releasing.retain(|_, set| !set.is_empty());
        }
        self.shared.wake.notify_one();
    }

    /// Commits `(partition, offset)` pairs for `topic` as this member: refused
    /// (FAILED_PRECONDITION) if the member has been fenced.
    pub async fn commit(&self, topic: &str, offsets: &[(u32, u64)]) -> Result<()> {
        let (member_id, member_epoch) = {
            let s = self.shared.lock();
            (s.member_id.clone(), s.epoch)
        };
        let conn = self.shared.conn();
        let answer = conn
            .groups()
            .commit_offsets(pb::CommitOffsetsRequest {
                group: self.shared.config.group.clone(),
                topic: topic.into(),
                offsets: offsets
                    .iter()
                    .map(|&(partition, offset)| pb::PartitionOffset {
                        partition,
                        offset,
                        metadata: None,
                    })
                    .collect(),
                member: Some(pb::MemberIdentity {
                    member_id,
                    member_epoch,
                }),
            })
            .await;
        if let Err(status) = &answer {
            if is_retryable_status(status) {
                // The caller's retry goes to a broker that answers.
                self.shared.move_on(&conn).await;
            }
        }
        answer.map_err(|s| ClientError::broker(Some(topic), None, s))?;
        Ok(())
    }

    /// Stops heartbeating and leaves the group: its partitions go to the others at once. A
    /// static member leaves for a restart instead (epoch -2): it keeps its partitions for the
    /// session timeout.
    pub async fn leave(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let mut req = self.shared.request();
        req.member_epoch = if self.shared.config.instance_id.is_some() {
            -2
        } else {
            -1
        };
        req.owned_partitions = None;
        self.shared
            .send(req)
            .await
            .map_err(|s| ClientError::broker(None, None, s))?;
        Ok(())
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under this lock is a few assignments that cannot panic midway, so a
        // poisoned lock still holds a consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next heartbeat: a join (with everything) at epoch 0, else the owned partitions.
    fn request(&self) -> pb::GroupHeartbeatRequest {
        let s = self.lock();
        let joining = s.epoch == 0;
        let c = &self.config;
        pb::GroupHeartbeatRequest {
            group: c.group.clone(),
            member_id: s.member_id.clone(),
            member_epoch: s.epoch,
            instance_id: c.instance_id.clone(),
            subscribed_topics: joining.then(|| pb::TopicList {
                topics: c.topics.clone(),
            }),
            owned_partitions: Some(to_set(&union(&s.owned, &s.releasing))),
            session_timeout_ms: if joining { c.session_timeout_ms } else { None },
            rebalance_timeout_ms: if joining {
                c.rebalance_timeout_ms
            } else {
                None
            },
            assignor: if joining { c.assignor.clone() } else { None },
        }
    }

    async fn send(
        &self,
        req: pb::GroupHeartbeatRequest,
    ) -> std::result::Result<pb::GroupHeartbeatResponse, tonic::Status> {
        let conn = self.conn();
        let answer = conn.groups().group_heartbeat(req).await;
        if let Err(status) = &answer {
            if is_retryable_status(status) {
                self.move_on(&conn).await;
            }
        }
        Ok(answer?.into_inner())
    }

    /// The broker group calls go to now.
    fn conn(&self) -> Connection {
        self.conn_slot().clone()
    }

    /// The lock on the connection; a poisoned one still holds a whole connection.
    fn conn_slot(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Leaves `failed` (the broker that did not answer) for the next broker of its list
    /// that does, unless another call moved already.
    async fn move_on(&self, failed: &Connection) {
        if let Some(next) = failed.next_in_list().await {
            let mut conn = self.conn_slot();
            if conn.addr() == failed.addr() {
                tracing::debug!(from = failed.addr(), to = next.addr(), "group calls move");
                *conn = next;
            }
        }
    }

    /// Takes an answer in: new partitions are assigned, ones no longer given are revoked.
    fn apply(&self, r: pb::GroupHeartbeatResponse, tx: &mpsc::UnboundedSender<MemberEvent>) {
        let assignment = from_set(r.assignment.unwrap_or_default());
        let mut s = self.lock();
        s.member_id = r.member_id;
        s.epoch = r.member_epoch;
        s.interval_ms = r.heartbeat_interval_ms.max(1);
        s.reconciling = r.reconciling;
        let revoked = minus(&s.owned, &assignment);
        let added = minus(&minus(&assignment, &s.owned), &s.releasing);
        if !revoked.is_empty() {
            s.owned = minus(&s.owned, &revoked);
            s.releasing = union(&s.releasing, &revoked);
            let _ = tx.send(MemberEvent::Revoked(revoked));
        }
        if !added.is_empty() {
            s.owned = union(&s.owned, &added);
            let _ = tx.send(MemberEvent::Assigned(added));
        }
    }

    /// Everything owned is lost; the member rejoins with epoch 0 at its next heartbeat.
    fn lose_all(&self, tx: &mpsc::UnboundedSender<MemberEvent>) {
        let mut s = self.lock();
        let lost = union(&s.owned, &s.releasing);
        s.owned.clear();
        s.releasing.clear();
        s.epoch = 0;
        if !lost.is_empty() {
            let _ = tx.send(MemberEvent::Lost(lost));
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let tx = &shared.tx;
    let session = Duration::from_millis(u64::from(
        shared
            .config
            .session_timeout_ms
            .unwrap_or(DEFAULT_SESSION_TIMEOUT_MS),
    ));
    let mut last_ok = Instant::now();
    loop {
        let interval = {
            let s = shared.lock();
            let ms = u64::from(s.interval_ms.max(1));
            // While partitions are on their way (their previous owner releases them at its
            // next heartbeat), ask again sooner than the interval: the new owner then starts
            // within RECONCILING_POLL_MS of the release instead of up to an interval later.
            // Only during a rebalance, so the steady-state heartbeat rate is unchanged.
            if s.reconciling && s.releasing.is_empty() {
                Duration::from_millis(ms.min(RECONCILING_POLL_MS))
            } else {
                Duration::from_millis(ms)
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = shared.wake.notified() => {}
        }
        let req = shared.request();
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            answer = shared.send(req) => answer,
        };
        match answer {
            Ok(r) => {
                last_ok = Instant::now();
                shared.apply(r, tx);
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                tracing::warn!(group = %shared.config.group, error = %status.message(), "fenced; rejoining");
                shared.lock().fenced_reason = Some(status.message().to_string());
                shared.lose_all(tx);
            }
            Err(status) => {
                if !is_retryable_status(&status) {
                    tracing::warn!(group = %shared.config.group, error = %status.message(), "heartbeat refused");
                }
                if last_ok.elapsed() > session {
                    // The broker has removed this member by now.
                    shared.lock().fenced_reason = Some(format!(
                        "no heartbeat answered for the session timeout ({} ms): {}",
                        session.as_millis(),
                        status.message()
                    ));
                    shared.lose_all(tx);
                    last_ok = Instant::now();
                }
            }
        }
    }
}

fn to_set(p: &Partitions) -> pb::PartitionSet {
    pb::PartitionSet {
        topics: p
            .iter()
            .map(|(t, ps)| pb::TopicPartitions {
                topic: t.clone(),
                partitions: ps.iter().copied().collect(),
            })
            .collect(),
    }
}

fn from_set(set: pb::PartitionSet) -> Partitions {
    let mut out = Partitions::new();
    for tp in set.topics {
        if !tp.partitions.is_empty() {
            out.entry(tp.topic).or_default().extend(tp.partitions);
        }
    }
    out
}

fn union(a: &Partitions, b: &Partitions) -> Partitions {
    let mut out = a.clone();
    for (t, ps) in b {
        out.entry(t.clone()).or_default().extend(ps);
    }
    out
}

fn minus(a: &Partitions, b: &Partitions) -> Partitions {
    let mut out = Partitions::new();
    for (t, ps) in a {
        let rest: BTreeSet<u32> = match b.get(t) {
            Some(drop) => ps.difference(drop).copied().collect(),
            None => ps.clone(),
        };
        if !rest.is_empty() {
            out.insert(t.clone(), rest);
        }
    }
    out
}
