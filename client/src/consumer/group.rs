//! The [`Consumer`] as a group member: joining, starting assigned partitions, committing and
//! giving up revoked ones, dropping lost ones. See the parent module's "Group membership".

use std::collections::BTreeSet;

use tonic::Code;

use super::{Consumer, ConsumerConfig, ConsumerEvent};
use crate::admin::Admin;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::membership::{GroupMember, MemberConfig, MemberEvent, Partitions};

/// Whether a commit or heartbeat error says the member is fenced (removed, replaced, or at a
/// stale epoch): the broker's code for that is FAILED_PRECONDITION.
pub(super) fn is_fenced(e: &ClientError) -> bool {
    e.code() == Some(Code::FailedPrecondition)
}

/// The member's next event; never, without a member.
pub(super) async fn next_member_event(member: Option<&mut GroupMember>) -> MemberEvent {
    match member {
        Some(m) => match m.next_event().await {
            Some(event) => event,
            // The member's sender lives as long as the member: not reached.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The member's settings (used when the consumer is a group member).
impl ConsumerConfig {
    /// As a group member, be a static member with this instance id: a restart within the
    /// session timeout gets the same partitions back, with no rebalance.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// As a group member, set the group's session timeout, ms (the broker allows 500 to
    /// 3600000; its default is 45000).
    pub fn session_timeout_ms(mut self, ms: u32) -> Self {
        self.session_timeout_ms = Some(ms);
        self
    }

    /// As a group member, set the group's rebalance timeout, ms: the longest a revoked
    /// partition may be kept before the member is fenced (the broker's default is 60000).
    pub fn rebalance_timeout_ms(mut self, ms: u32) -> Self {
        self.rebalance_timeout_ms = Some(ms);
        self
    }

    /// As the first member of an empty group, choose its assignor, `uniform` (the default)
    /// or `range`.
    pub fn assignor(mut self, name: impl Into<String>) -> Self {
        self.assignor = Some(name.into());
        self
    }
}

impl Consumer {
    /// Joins `config`'s group as a member subscribed to `topic` (of `count` partitions), and
    /// starts what the first answer assigns.
    pub(super) async fn join(
        conn: Connection,
        config: ConsumerConfig,
        topic: &str,
        count: u32,
    ) -> Result<Consumer> {
        let group = config.group.clone().unwrap_or_default();
        let mut member_config = MemberConfig::new(&group, [topic]);
        if let Some(id) = &config.instance_id {
            member_config = member_config.instance_id(id);
        }
        if let Some(ms) = config.session_timeout_ms {
            member_config = member_config.session_timeout_ms(ms);
        }
        if let Some(ms) = config.rebalance_timeout_ms {
            member_config = member_config.rebalance_timeout_ms(ms);
        }
        if let Some(name) = &config.assignor {
            member_config = member_config.assignor(name);
        }
        let member = GroupMember::join(conn.clone(), member_config).await?;
        let mut consumer = Consumer::new(conn, config, topic, count as usize, Some(member));
        consumer.take_member_events().await?;
        Ok(consumer)
    }

    /// The member id, as a group member.
    pub fn member_id(&self) -> Option<String> {
        self.member.as_ref().map(GroupMember::member_id)
    }

    /// The member epoch, as a group member.
    pub fn member_epoch(&self) -> Option<i32> {
        self.member.as_ref().map(GroupMember::member_epoch)
    }

    /// Handles the member events that have arrived, without waiting.
    pub(super) async fn take_member_events(&mut self) -> Result<()> {
        while let Some(event) = self.member.as_mut().and_then(GroupMember::try_next_event) {
            self.on_member_event(event).await?;
        }
        Ok(())
    }

    fn mine(&self, partitions: &Partitions) -> Vec<u32> {
        partitions
            .get(&self.topic)
            .map(|ps| ps.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Starts assigned partitions, stops revoked ones (kept until committed and given up),
    /// drops lost ones; each becomes a notice for the application.
    pub(super) async fn on_member_event(&mut self, event: MemberEvent) -> Result<()> {
        match event {
            MemberEvent::Assigned(given) => {
                let added: Vec<u32> = self
                    .mine(&given)
                    .into_iter()
                    .filter(|p| !self.partitions.contains_key(p))
                    .collect();
                if added.is_empty() {
                    return Ok(());
                }
                let group = self.config.group.clone().unwrap_or_default();
                let committed = Admin::new(self.conn.clone())
                    .fetch_offsets(&group, &self.topic, &added)
                    .await?;
                for &p in &added {
                    let offset = committed
                        .iter()
                        .find(|c| c.partition == p)
                        .and_then(|c| c.offset);
                    let start = match offset {
                        Some(o) => {
                            self.committed.insert(p, o);
                            o
                        }
                        None => {
                            self.committed.remove(&p);
                            self.reset_position(p).await?
                        }
                    };
                    self.start(p, start);
                }
                self.notices.push_back(ConsumerEvent::Assigned {
                    topic: self.topic.clone(),
                    partitions: added,
                });
            }
            MemberEvent::Revoked(taken) => {
                let revoked: Vec<u32> = self
                    .mine(&taken)
                    .into_iter()
                    .filter(|p| self.partitions.contains_key(p))
                    .collect();
                for p in &revoked {
                    if let Some(s) = self.partitions.get_mut(p) {
                        s.cancel.cancel();
                        s.revoked = true;
                    }
                }
                self.buffer.retain(|(p, _, _)| !revoked.contains(p));
                // Other topics (none: one topic is subscribed) are given up at once.
                let mut others = taken;
                others.remove(&self.topic);
                if let Some(m) = &self.member {
                    if !others.is_empty() {
                        m.release(&others);
                    }
                }
                if !revoked.is_empty() {
                    self.notices.push_back(ConsumerEvent::Revoked {
                        topic: self.topic.clone(),
                        partitions: revoked,
                    });
                }
            }
            MemberEvent::Lost(lost) => {
                let lost = self.mine(&lost);
                let reason = self
                    .member
                    .as_ref()
                    .and_then(GroupMember::take_fenced_reason)
                    .unwrap_or_else(|| "the member was fenced".to_string());
                self.drop_partitions(&lost, &format!("{reason}; rejoining"));
            }
        }
        Ok(())
    }

    /// Stops `partitions` at once, forgets them, and reports them lost.
    fn drop_partitions(&mut self, partitions: &[u32], reason: &str) {
        let mut gone = Vec::new();
        for p in partitions {
            if let Some(s) = self.partitions.remove(p) {
                s.cancel.cancel();
                gone.push(*p);
            }
            self.committed.remove(p);
        }
        self.buffer.retain(|(p, _, _)| !partitions.contains(p));
        self.notices
            .retain(|n| !matches!(n, ConsumerEvent::Revoked { .. }));
        if !gone.is_empty() {
            gone.sort_unstable();
            self.notices.push_back(ConsumerEvent::Lost {
                topic: self.topic.clone(),
                partitions: gone,
                reason: reason.to_string(),
            });
        }
    }

    /// A commit was refused because the member is fenced: everything it owned is lost, and it
    /// rejoins.
    pub(super) fn lose_all(&mut self, reason: &str) {
        let all: Vec<u32> = self.partitions.keys().copied().collect();
        self.drop_partitions(&all, reason);
        if let Some(m) = &self.member {
            m.rejoin();
        }
    }

    /// Commits what was handed out of revoked partitions, then gives them up. A transient
    /// failure keeps them for the next try; a fenced member loses them.
    pub(super) async fn finish_revocations(&mut self) -> Result<()> {
        let revoked: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.revoked)
            .map(|(&p, _)| p)
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        match self.commit_positions().await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(topic = %self.topic, error = %e, "commit before giving up revoked partitions failed; will retry");
                return Ok(());
            }
            // Fenced: `commit_positions` reported them lost.
            Err(e) if is_fenced(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        for p in &revoked {
            self.partitions.remove(p);
            self.committed.remove(p);
        }
        if let Some(m) = &self.member {
            let mut released = Partitions::new();
            released.insert(
                self.topic.clone(),
                revoked.into_iter().collect::<BTreeSet<_>>(),
            );
            m.release(&released);
        }
        Ok(())
    }
}
