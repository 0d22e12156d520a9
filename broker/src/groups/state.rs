//! One group's membership state machine, with no I/O: heartbeats, the target assignment,
//! incremental reconciliation, and the session and rebalance timeouts. Time is passed in, in
//! milliseconds of a monotonic clock, so tests drive it directly.
//!
//! # Reconciliation
//! A member *owns* a partition while it is in its `assigned` set (it may consume it) or its
//! `revoking` set (it was told to release it and has not reported it gone). When the target
//! assignment changes, each member on its next heartbeat:
//! 1. moves the partitions it has but the target does not give it to `revoking`;
//! 2. once `revoking` is empty (the member reported them gone, by leaving them out of its
//!    owned partitions), takes the new epoch, and is given each target partition that no other
//!    member owns; the others come on later heartbeats, as their owners release them.
//!
//! A partition is only ever added to a member when no other member owns it, so no partition
//! is owned by two members at once. A member that keeps a revoked partition past the
//! rebalance timeout, or is silent past the session timeout, is removed, which releases
//! everything it owned. Members that keep their partitions keep consuming throughout.

use std::collections::{BTreeMap, BTreeSet};

use super::assignor::{Assignor, MemberSpec, Partitions};

/// The default session timeout, ms.
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 45_000;
/// The default rebalance timeout, ms.
pub const DEFAULT_REBALANCE_TIMEOUT_MS: u32 = 60_000;
/// The shortest and longest session or rebalance timeout a member may set, ms.
pub const TIMEOUT_RANGE_MS: (u32, u32) = (500, 3_600_000);
/// The longest heartbeat interval, ms.
const MAX_HEARTBEAT_INTERVAL_MS: u32 = 5_000;
/// The longest member or instance id.
pub const MAX_ID_LEN: usize = 128;

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: String,
    /// A static member's instance id.
    pub instance_id: Option<String>,
    /// Its epoch.
    pub epoch: i32,
    /// Its previous epoch: a heartbeat whose answer was lost may still carry it.
    pub previous_epoch: i32,
    /// The topics it subscribes to.
    pub subscribed: BTreeSet<String>,
    /// The partitions it may own now.
    pub assigned: Partitions,
    /// The partitions it must release; it owns them until it reports them gone.
    pub revoking: Partitions,
    /// Its target assignment.
    pub target: Partitions,
    /// Its client's address.
    pub client_address: String,
    /// When it was last heard from.
    pub last_seen_ms: u64,
    /// Since when it has had partitions to release.
    pub revoking_since_ms: Option<u64>,
    /// A static member that left for a restart: kept, with its partitions, until its session
    /// times out or its instance id rejoins.
    pub left_static: bool,
}

impl Member {
    /// Whether it owns `topic`/`p` (assigned or still revoking).
    pub fn owns(&self, topic: &str, p: u32) -> bool {
        contains(&self.assigned, topic, p) || contains(&self.revoking, topic, p)
    }

    /// Whether it owns exactly its target and has nothing to release.
    pub fn is_reconciled(&self, assignment_epoch: i32) -> bool {
        self.epoch == assignment_epoch && self.revoking.is_empty() && self.assigned == self.target
    }
}

/// A heartbeat, as the state machine sees it.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// The member id (empty on a first join).
    pub member_id: String,
    /// 0 join, -1 leave, -2 static leave, else the member's epoch.
    pub member_epoch: i32,
    /// A static member's instance id.
    pub instance_id: Option<String>,
    /// The subscription, when sent.
    pub subscribed: Option<BTreeSet<String>>,
    /// The partitions the member owns now, when sent.
    pub owned: Option<Partitions>,
    /// The client's address.
    pub client_address: String,
    /// A new session timeout for the group.
    pub session_timeout_ms: Option<u32>,
    /// A new rebalance timeout for the group.
    pub rebalance_timeout_ms: Option<u32>,
    /// The assignor wanted (used when the group is empty).
    pub assignor: Option<Assignor>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The member id.
    pub member_id: String,
    /// The member epoch (-1 after a leave, -2 after a static leave).
    pub member_epoch: i32,
    /// What it may own now.
    pub assignment: Partitions,
    /// The group epoch.
    pub group_epoch: i32,
    /// Send the next heartbeat within this many ms.
    pub heartbeat_interval_ms: u32,
    /// Partitions still to release or to receive.
    pub reconciling: bool,
}

/// Why a heartbeat or a member's commit is refused. Nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The member id is not in the group (never joined, removed, or fenced).
    #[error("group {group:?} has no member {member:?} (it sent epoch {given}): it left, timed out or was fenced; rejoin with epoch 0")]
    UnknownMember {
        /// The group.
        group: String,
        /// The member.
        member: String,
        /// The epoch it sent.
        given: i32,
    },
    /// The member's epoch is not its current one.
    #[error("member {member:?} of group {group:?} sent epoch {given}, but its epoch is {current}: it is fenced; rejoin with epoch 0")]
    FencedEpoch {
        /// The group.
        group: String,
        /// The member.
        member: String,
        /// The epoch sent.
        given: i32,
        /// The member's current epoch.
        current: i32,
    },
    /// The group still has live members (a deletion or an offset reset is refused).
    #[error("group {group:?} has {members} live member(s); {action} needs it empty: wait until they leave or time out")]
    GroupNotEmpty {
        /// The group.
        group: String,
        /// Its live members.
        members: usize,
        /// What was refused.
        action: &'static str,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// One group's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The group's name.
    pub name: String,
    /// Rises on every change of membership, subscriptions or topic sizes.
    pub epoch: i32,
    /// The group epoch the target assignment was computed for.
    pub assignment_epoch: i32,
    /// The assignor.
    pub assignor: Assignor,
    /// Members silent for longer are removed.
    pub session_timeout_ms: u32,
    /// Members that keep a revoked partition for longer are removed.
    pub rebalance_timeout_ms: u32,
    /// The members, by id.
    pub members: BTreeMap<String, Member>,
    /// The sizes of the subscribed topics the target was computed with.
    pub topic_sizes: BTreeMap<String, u32>,
}

impl Group {
    /// An empty group.
    pub fn new(name: &str) -> Self {
        Group {
            name: name.to_string(),
            epoch: 0,
            assignment_epoch: 0,
            assignor: Assignor::default(),
            session_timeout_ms: DEFAULT_SESSION_TIMEOUT_MS,
            rebalance_timeout_ms: DEFAULT_REBALANCE_TIMEOUT_MS,
            members: BTreeMap::new(),
            topic_sizes: BTreeMap::new(),
        }
    }

    /// How often members should heartbeat: a third of the session timeout, at most 5 s.
    pub fn heartbeat_interval_ms(&self) -> u32 {
        (self.session_timeout_ms / 3).clamp(1, MAX_HEARTBEAT_INTERVAL_MS)
    }

    /// `empty`, `stable` or `reconciling`.
    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.epoch == self.assignment_epoch
            && self
                .members
                .values()
                .all(|m| m.is_reconciled(self.assignment_epoch))
        {
            "stable"
        } else {
            "reconciling"
        }
    }

    /// Members that count as alive (static members away for a restart do not).
    pub fn live_members(&self) -> usize {
        self.members.values().filter(|m| !m.left_static).count()
    }

    /// Handles one heartbeat at `now_ms`. `topic_size` gives a topic's partition count
    /// (`None`: it does not exist); `new_id` makes a fresh member id. On an error nothing
    /// changes.
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat,
        now_ms: u64,
        topic_size: &dyn Fn(&str) -> Option<u32>,
        new_id: &mut dyn FnMut() -> String,
    ) -> Result<Reply, MembershipError> {
        self.validate(&hb)?;
        let id = match hb.member_epoch {
            -1 => return Ok(self.leave(&hb.member_id)),
            -2 => return self.leave_static(&hb.member_id, now_ms),
            0 => self.join(&hb, now_ms, new_id)?,
            epoch => {
                let member = self.known(&hb.member_id, epoch)?;
                let lost_answer = epoch == member.previous_epoch
                    && hb.owned.as_ref().is_none_or(|owned| {
                        owned
                            .iter()
                            .all(|(t, ps)| ps.iter().all(|&p| member.owns(t, p)))
                    });
                if (epoch != member.epoch && !lost_answer) || member.left_static {
                    return Err(MembershipError::FencedEpoch {
                        group: self.name.clone(),
                        member: hb.member_id.clone(),
                        given: epoch,
                        current: member.epoch,
                    });
                }
                if let Some(subscribed) = &hb.subscribed {
                    if *subscribed != member.subscribed {
                        if let Some(m) = self.members.get_mut(&hb.member_id) {
                            m.subscribed = subscribed.clone();
                        }
                        self.epoch += 1;
                    }
                }
                hb.member_id.clone()
            }
        };
        if let Some(ms) = hb.session_timeout_ms {
            self.session_timeout_ms = ms;
        }
        if let Some(ms) = hb.rebalance_timeout_ms {
            self.rebalance_timeout_ms = ms;
        }
        if let Some(m) = self.members.get_mut(&id) {
            m.last_seen_ms = now_ms;
            m.client_address.clone_from(&hb.client_address);
        }
        self.refresh_target(topic_size);
        self.reconcile(&id, hb.owned.as_ref(), now_ms);
        Ok(self.reply(&id))
    }

    /// Checks a member's commit: it must be a member at its current epoch.
    pub fn check_commit(&self, member_id: &str, epoch: i32) -> Result<(), MembershipError> {
        let member = self.known(member_id, epoch)?;
        if member.epoch != epoch || member.left_static {
            return Err(MembershipError::FencedEpoch {
                group: self.name.clone(),
                member: member_id.to_string(),
                given: epoch,
                current: member.epoch,
            });
        }
        Ok(())
    }

    /// Removes members silent past the session timeout and members holding a revoked
    /// partition past the rebalance timeout. Returns the ids removed.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let session = u64::from(self.session_timeout_ms);
        let rebalance = u64::from(self.rebalance_timeout_ms);
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                now_ms.saturating_sub(m.last_seen_ms) > session
                    || m.revoking_since_ms
                        .is_some_and(|since| now_ms.saturating_sub(since) > rebalance)
            })
            .map(|m| m.id.clone())
            .collect();
        for id in &gone {
            self.members.remove(id);
        }
        if !gone.is_empty() {
            self.epoch += 1;
        }
        gone
    }

    /// Recomputes the target when the group epoch moved past it, or the subscribed topics'
    /// sizes changed (a topic appeared, or was deleted).
    pub fn refresh_target(&mut self, topic_size: &dyn Fn(&str) -> Option<u32>) {
        let subscribed: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|m| m.subscribed.iter())
            .collect();
        let sizes: BTreeMap<String, u32> = subscribed
            .into_iter()
            .filter_map(|t| topic_size(t).map(|n| (t.clone(), n)))
            .collect();
        if sizes != self.topic_sizes {
            self.topic_sizes = sizes;
            // One bump per change is enough: a bump already pending recomputes with these.
            if self.assignment_epoch == self.epoch {
                self.epoch += 1;
            }
        }
        if self.assignment_epoch == self.epoch {
            return;
        }
        let specs: BTreeMap<String, MemberSpec> = self
            .members
            .iter()
            .map(|(id, m)| {
                (
                    id.clone(),
                    MemberSpec {
                        subscribed: m.subscribed.clone(),
                        previous: m.target.clone(),
                    },
                )
            })
            .collect();
        let mut targets = self.assignor.assign(&specs, &self.topic_sizes);
        for (id, m) in self.members.iter_mut() {
            m.target = targets.remove(id).unwrap_or_default();
        }
        self.assignment_epoch = self.epoch;
    }

    /// Moves member `id` toward its target (see the module doc).
    fn reconcile(&mut self, id: &str, owned: Option<&Partitions>, now_ms: u64) {
        let assignment_epoch = self.assignment_epoch;
        // What other members own: a partition goes to this one only when nobody else has it.
        let taken: BTreeSet<(String, u32)> = self
            .members
            .values()
            .filter(|m| m.id != id)
            .flat_map(|m| {
                m.assigned
                    .iter()
                    .chain(m.revoking.iter())
                    .flat_map(|(t, ps)| ps.iter().map(move |&p| (t.clone(), p)))
            })
            .collect();
        let Some(m) = self.members.get_mut(id) else {
            return;
        };
        if let Some(owned) = owned {
            for (topic, ps) in m.revoking.iter_mut() {
                ps.retain(|&p| contains(owned, topic, p));
            }
            m.revoking.retain(|_, ps| !ps.is_empty());
        }
        // 1. Release what the target no longer gives.
        let mut revoke = Partitions::new();
        for (topic, ps) in &m.assigned {
            for &p in ps {
                if !contains(&m.target, topic, p) {
                    revoke.entry(topic.clone()).or_default().insert(p);
                }
            }
        }
        if !revoke.is_empty() {
            for (topic, ps) in revoke {
                for p in ps {
                    remove(&mut m.assigned, &topic, p);
                    m.revoking.entry(topic.clone()).or_default().insert(p);
                }
            }
            m.revoking_since_ms.get_or_insert(now_ms);
        }
        if !m.revoking.is_empty() {
            return;
        }
        m.revoking_since_ms = None;
        // 2. Everything released: take the new epoch and every free target partition.
        if m.epoch != assignment_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = assignment_epoch;
        }
        for (topic, ps) in &m.target {
            for &p in ps {
                if !taken.contains(&(topic.clone(), p)) {
                    m.assigned.entry(topic.clone()).or_default().insert(p);
                }
            }
        }
    }

    fn reply(&self, id: &str) -> Reply {
        let m = self.members.get(id);
        Reply {
            member_id: id.to_string(),
            member_epoch: m.map_or(-1, |m| m.epoch),
            assignment: m.map(|m| m.assigned.clone()).unwrap_or_default(),
            group_epoch: self.epoch,
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            reconciling: m.is_some_and(|m| !m.is_reconciled(self.assignment_epoch)),
        }
    }

    fn validate(&self, hb: &Heartbeat) -> Result<(), MembershipError> {
        let invalid = |s: String| Err(MembershipError::Invalid(s));
        let id_ok = |id: &str| id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok(&hb.member_id) {
            return invalid(format!(
                "member id {:?} must be at most {MAX_ID_LEN} printable ASCII characters",
                hb.member_id
            ));
        }
        if let Some(instance) = &hb.instance_id {
            if instance.is_empty() || !id_ok(instance) {
                return invalid(format!(
                    "instance id {instance:?} must be 1 to {MAX_ID_LEN} printable ASCII characters"
                ));
            }
        }
        if hb.member_epoch < -2 {
            return invalid(format!(
                "member epoch {} is not valid: 0 joins, -1 leaves, -2 leaves for a restart",
                hb.member_epoch
            ));
        }
        if hb.member_epoch != 0 && hb.member_id.is_empty() {
            return invalid("a member id is needed unless joining (epoch 0)".to_string());
        }
        if hb.member_epoch == 0 && hb.subscribed.as_ref().is_none_or(BTreeSet::is_empty) {
            return invalid("a join must subscribe to at least one topic".to_string());
        }
        for topic in hb.subscribed.iter().flatten() {
            rill_storage::config::validate_name("topic", topic)
                .map_err(|e| MembershipError::Invalid(e.to_string()))?;
        }
        let (lo, hi) = TIMEOUT_RANGE_MS;
        for (name, value) in [
            ("session_timeout_ms", hb.session_timeout_ms),
            ("rebalance_timeout_ms", hb.rebalance_timeout_ms),
        ] {
            if value.is_some_and(|v| !(lo..=hi).contains(&v)) {
                return invalid(format!("{name} must be {lo}..={hi}, got {value:?}"));
            }
        }
        Ok(())
    }

    fn known(&self, id: &str, given: i32) -> Result<&Member, MembershipError> {
        self.members
            .get(id)
            .ok_or_else(|| MembershipError::UnknownMember {
                group: self.name.clone(),
                member: id.to_string(),
                given,
            })
    }

    fn leave(&mut self, id: &str) -> Reply {
        if self.members.remove(id).is_some() {
            self.epoch += 1;
        }
        Reply {
            member_id: id.to_string(),
            member_epoch: -1,
            assignment: Partitions::new(),
            group_epoch: self.epoch,
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            reconciling: false,
        }
    }

    fn leave_static(&mut self, id: &str, now_ms: u64) -> Result<Reply, MembershipError> {
        let name = self.name.clone();
        let interval = self.heartbeat_interval_ms();
        let m = self
            .members
            .get_mut(id)
            .ok_or_else(|| MembershipError::UnknownMember {
                group: name,
                member: id.to_string(),
                given: -2,
            })?;
        if m.instance_id.is_none() {
            return Err(MembershipError::Invalid(format!(
                "member {id:?} has no instance id: only a static member may leave with epoch -2"
            )));
        }
        m.left_static = true;
        m.last_seen_ms = now_ms;
        Ok(Reply {
            member_id: id.to_string(),
            member_epoch: -2,
            assignment: Partitions::new(),
            group_epoch: self.epoch,
            heartbeat_interval_ms: interval,
            reconciling: false,
        })
    }

    /// A join; returns the member's id.
    fn join(
        &mut self,
        hb: &Heartbeat,
        now_ms: u64,
        new_id: &mut dyn FnMut() -> String,
    ) -> Result<String, MembershipError> {
        let subscribed = hb.subscribed.clone().unwrap_or_default();
        if self.members.is_empty() {
            if let Some(assignor) = hb.assignor {
                self.assignor = assignor;
            }
        }
        let id = if hb.member_id.is_empty() {
            new_id()
        } else {
            hb.member_id.clone()
        };
        // A static member coming back takes its predecessor's place, partitions and epoch.
        let predecessor = hb.instance_id.as_ref().and_then(|instance| {
            self.members
                .values()
                .find(|m| m.instance_id.as_ref() == Some(instance))
                .map(|m| m.id.clone())
        });
        if let Some(old_id) = predecessor {
            if let Some(old) = self.members.remove(&old_id) {
                if old.subscribed != subscribed {
                    self.epoch += 1;
                }
                self.members.insert(
                    id.clone(),
                    Member {
                        id: id.clone(),
                        subscribed,
                        last_seen_ms: now_ms,
                        left_static: false,
                        ..old
                    },
                );
                return Ok(id);
            }
        }
        // A known member rejoining has lost its state: it starts over.
        self.members.remove(&id);
        self.members.insert(
            id.clone(),
            Member {
                id: id.clone(),
                instance_id: hb.instance_id.clone(),
                epoch: 0,
                previous_epoch: 0,
                subscribed,
                assigned: Partitions::new(),
                revoking: Partitions::new(),
                target: Partitions::new(),
                client_address: hb.client_address.clone(),
                last_seen_ms: now_ms,
                revoking_since_ms: None,
                left_static: false,
            },
        );
        self.epoch += 1;
        Ok(id)
    }
}

fn contains(set: &Partitions, topic: &str, p: u32) -> bool {
    set.get(topic).is_some_and(|ps| ps.contains(&p))
}

fn remove(set: &mut Partitions, topic: &str, p: u32) {
    if let Some(ps) = set.get_mut(topic) {
        ps.remove(&p);
        if ps.is_empty() {
            set.remove(topic);
        }
    }
}

#[cfg(test)]
mod tests;
