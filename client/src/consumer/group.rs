//! The [`Consumer`] as a group member: joining, starting assigned partitions, committing and
//! giving up revoked ones, dropping lost ones. See the parent module's "Group membership".

use std::collections::BTreeMap;

use tonic::Code;

use super::{Consumer, ConsumerConfig, ConsumerEvent, Slot};
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
    /// Joins `config`'s group as a member subscribed to `topics` (of `count` partitions in
    /// all), and starts what the first answer assigns.
    pub(super) async fn join(
        conn: Connection,
        config: ConsumerConfig,
        topics: Vec<String>,
        count: u32,
    ) -> Result<Consumer> {
        let group = config.group.clone().unwrap_or_default();
        let mut member_config = MemberConfig::new(&group, topics.iter().cloned());
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
        let mut consumer = Consumer::new(conn, config, topics, count as usize, Some(member));
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

    /// The partitions of `partitions` in subscribed topics, per topic index (in topic order),
    /// and the ones of topics not subscribed.
    fn split(&self, partitions: Partitions) -> (BTreeMap<usize, Vec<u32>>, Partitions) {
        let mut mine = BTreeMap::new();
        let mut others = Partitions::new();
        for (topic, ps) in partitions {
            match self.topics.iter().position(|t| *t == topic) {
                Some(i) => {
                    mine.insert(i, ps.into_iter().collect());
                }
                None => {
                    others.insert(topic, ps);
                }
            }
        }
        (mine, others)
    }

    /// Starts assigned partitions, stops revoked ones (kept until committed and given up),
    /// drops lost ones; each becomes a notice for the application, one per topic.
    pub(super) async fn on_member_event(&mut self, event: MemberEvent) -> Result<()> {
        match event {
            MemberEvent::Assigned(given) => {
                for (t, ps) in self.split(given).0 {
                    let added: Vec<u32> = ps
                        .into_iter()
                        .filter(|p| !self.partitions.contains_key(&(t, *p)))
                        .collect();
                    if added.is_empty() {
                        continue;
                    }
                    self.start_all(t, &added).await?;
                    self.notices.push_back(ConsumerEvent::Assigned {
                        topic: self.topics[t].clone(),
                        partitions: added,
                    });
                }
            }
            MemberEvent::Revoked(taken) => {
                let (mine, others) = self.split(taken);
                for (t, ps) in mine {
                    let revoked: Vec<u32> = ps
                        .into_iter()
                        .filter(|p| self.partitions.contains_key(&(t, *p)))
                        .collect();
                    for &p in &revoked {
                        if let Some(s) = self.partitions.get_mut(&(t, p)) {
                            s.cancel.cancel();
                            s.revoked = true;
                        }
                    }
                    self.buffer
                        .retain(|((bt, bp), _)| *bt != t || !revoked.contains(bp));
                    if !revoked.is_empty() {
                        self.notices.push_back(ConsumerEvent::Revoked {
                            topic: self.topics[t].clone(),
                            partitions: revoked,
                        });
                    }
                }
                // Topics not subscribed (not expected) have nothing to commit: given up at
                // once.
                if let Some(m) = &self.member {
                    if !others.is_empty() {
                        m.release(&others);
                    }
                }
            }
            MemberEvent::Lost(lost) => {
                let lost: Vec<Slot> = self
                    .split(lost)
                    .0
                    .into_iter()
                    .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t, p)))
                    .collect();
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

    /// Stops `slots` at once, forgets them, and reports them lost (one notice per topic).
    fn drop_partitions(&mut self, slots: &[Slot], reason: &str) {
        let mut gone: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for slot in slots {
            if let Some(s) = self.partitions.remove(slot) {
                s.cancel.cancel();
                gone.entry(slot.0).or_default().push(slot.1);
            }
            self.committed.remove(slot);
        }
        self.buffer.retain(|(slot, _)| !slots.contains(slot));
        // Fencing loses everything: no revocation is pending any more.
        self.notices
            .retain(|n| !matches!(n, ConsumerEvent::Revoked { .. }));
        for (t, mut partitions) in gone {
            partitions.sort_unstable();
            self.notices.push_back(ConsumerEvent::Lost {
                topic: self.topics[t].clone(),
                partitions,
                reason: reason.to_string(),
            });
        }
    }

    /// A commit was refused because the member is fenced: everything it owned is lost, and it
    /// rejoins.
    pub(super) fn lose_all(&mut self, reason: &str) {
        let all: Vec<Slot> = self.partitions.keys().copied().collect();
        self.drop_partitions(&all, reason);
        if let Some(m) = &self.member {
            m.rejoin();
        }
    }

    /// Commits what was handed out of revoked partitions, then gives them up. A transient
    /// failure keeps them for the next try; a fenced member loses them.
    pub(super) async fn finish_revocations(&mut self) -> Result<()> {
        let revoked: Vec<Slot> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.revoked)
            .map(|(&slot, _)| slot)
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        match self.commit_positions().await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(topics = ?self.topics, error = %e, "commit before giving up revoked partitions failed; will retry");
                return Ok(());
            }
            // Fenced: `commit_positions` reported them lost.
            Err(e) if is_fenced(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut released = Partitions::new();
        for slot in &revoked {
            self.partitions.remove(slot);
            self.committed.remove(slot);
            released
                .entry(self.topics[slot.0].clone())
                .or_default()
                .insert(slot.1);
        }
        if let Some(m) = &self.member {
            m.release(&released);
        }
        Ok(())
    }
}
