//! [`Consumer`]: long-poll fetches per partition with prefetch, group offsets, seeks, and
//! reported skips.
//!
//! Each subscribed partition has a fetch task that long-polls from its position and hands
//! whole responses to a bounded channel (the prefetch depth), so the next fetch is under way
//! while the application handles the current one. Positions advance as records are handed
//! out; [`Consumer::commit`] (or auto-commit) stores them for the group. When retention
//! deleted the data under a position (OUT_OF_RANGE), the reset policy picks a new position
//! and the consumer yields [`ConsumerEvent::Skipped`], so a skip is never silent. A fetch
//! that fails with a retryable error is retried with the client's one backoff policy for as
//! long as the consumer lives; any other error is returned by [`Consumer::next`].
//!
//! # Commits: at least once
//! Kafka's rule: a record is committed only once the application is done with it.
//! - Auto-commit (see [`ConsumerConfig::auto_commit_interval_ms`]) runs inside
//!   [`Consumer::next`] and covers only the records handed out by *earlier* calls: the
//!   record a call returns is in the application's hands until the next call.
//! - [`Consumer::commit`] covers every record handed out so far, the last one included.
//! - [`Consumer::close`] commits like [`Consumer::commit`] when auto-commit is on, then stops.
//! - Dropping a consumer (or a crash) commits nothing: the group gets the uncommitted
//!   records again, the one that was in hand included.
//!
//! # Group membership
//! Built with a group and no explicit partitions, the consumer is a member of the group (see
//! [`crate::membership`]) subscribed to one topic ([`Consumer::subscribe`]) or several
//! ([`Consumer::subscribe_topics`]): it heartbeats in the background, and consumes only the
//! partitions the broker assigns it, each `(topic, partition)` with its own fetch task. Changes come out of [`Consumer::next`] as
//! [`ConsumerEvent::Assigned`], [`ConsumerEvent::Revoked`] and [`ConsumerEvent::Lost`]:
//! - `Assigned`: the partitions now fetch from the group's committed offsets.
//! - `Revoked`: the partitions have stopped (nothing more of them is handed out); the next call
//!   to `next` (or `commit`, or `close`) commits what was handed out for them, with the member
//!   epoch, and only then gives them up, so the next owner starts where this one stopped.
//!   The application flushes its own state for them before that call.
//! - `Lost`: the member was fenced (it missed its session timeout, or a commit was refused):
//!   the partitions stopped at once and nothing of them can be committed any more; the member
//!   rejoins by itself.
//!
//! Commits carry the member epoch, so a member that was fenced cannot move the group's
//! offsets. [`Consumer::close`] leaves the group (a static member, with an instance id, leaves
//! for a restart and keeps its partitions for the session timeout). Given explicit partitions,
//! the consumer manages them itself and commits plain offsets (no membership).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, OffsetQuery};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::leaders::Leaders;
use crate::membership::GroupMember;

mod fetch;
mod group;

use fetch::{FetchTask, Fetched};

/// Where to start when the group has no committed offset (or the offset is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOffsetReset {
    /// The first retained record.
    Earliest,
    /// Only records produced from now on (Kafka's default).
    #[default]
    Latest,
}

/// How a [`Consumer`] fetches and commits.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    group: Option<String>,
    auto_offset_reset: AutoOffsetReset,
    max_wait_ms: u32,
    max_bytes: u32,
    auto_commit_interval_ms: Option<u64>,
    prefetch: usize,
    instance_id: Option<String>,
    session_timeout_ms: Option<u32>,
    rebalance_timeout_ms: Option<u32>,
    assignor: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: None,
            auto_offset_reset: AutoOffsetReset::Latest,
            max_wait_ms: 500,
            max_bytes: 4 << 20,
            auto_commit_interval_ms: None,
            prefetch: 2,
            instance_id: None,
            session_timeout_ms: None,
            rebalance_timeout_ms: None,
            assignor: None,
        }
    }
}

impl ConsumerConfig {
    /// Defaults: no group, start at the latest, 500 ms long-polls, 4 MiB fetches, manual
    /// commits, 2 responses prefetched per partition.
    pub fn new() -> Self {
        ConsumerConfig::default()
    }

    /// Consume as part of `group`, starting from its committed offsets. Subscribed without
    /// explicit partitions, the consumer is a member of the group (see "Group membership").
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Where to start without a committed offset (default [`AutoOffsetReset::Latest`]).
    pub fn auto_offset_reset(mut self, reset: AutoOffsetReset) -> Self {
        self.auto_offset_reset = reset;
        self
    }

    /// The longest a fetch waits for new records, in ms (default 500).
    pub fn max_wait_ms(mut self, max_wait_ms: u32) -> Self {
        self.max_wait_ms = max_wait_ms;
        self
    }

    /// About how many bytes one fetch returns (default 4 MiB).
    pub fn max_bytes(mut self, max_bytes: u32) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Commit automatically every so many ms (default: only on [`Consumer::commit`]). The
    /// commit is made by [`Consumer::next`] (also while it waits for records) and covers
    /// only the records handed out by earlier calls, never the one it is about to return;
    /// see the module's "Commits". Needs a group. A retryable failure of an automatic
    /// commit is logged and tried again an interval later; any other is returned by `next`.
    pub fn auto_commit_interval_ms(mut self, interval_ms: Option<u64>) -> Self {
        self.auto_commit_interval_ms = interval_ms;
        self
    }

    /// Fetch responses buffered ahead per partition (default 2, at least 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// Timestamp, ms since the epoch.
    pub timestamp_ms: i64,
    /// The key, `None` for a null key.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
}

/// What the consumer yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerEvent {
    /// A record.
    Record(ConsumedRecord),
    /// The position jumped because the data under it was gone (retention): `from` was out
    /// of range and the reset policy moved the partition to `to`.
    Skipped {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The position that was out of range.
        from: u64,
        /// The new position.
        to: u64,
        /// The broker's message.
        reason: String,
    },
    /// As a group member: these partitions are now this consumer's; they fetch from the
    /// group's committed offsets (or where the reset policy says).
    Assigned {
        /// The topic.
        topic: String,
        /// The partitions added.
        partitions: Vec<u32>,
    },
    /// As a group member: these partitions go to another member. Nothing more of them is
    /// handed out; the next call to [`Consumer::next`], [`Consumer::commit`] or
    /// [`Consumer::close`] commits what was handed out for them and then gives them up.
    Revoked {
        /// The topic.
        topic: String,
        /// The partitions given up.
        partitions: Vec<u32>,
    },
    /// As a group member: these partitions were lost without a handover (the member was
    /// fenced); they stopped at once, and the member rejoins.
    Lost {
        /// The topic.
        topic: String,
        /// The partitions lost.
        partitions: Vec<u32>,
        /// Why.
        reason: String,
    },
}

/// A position to seek to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// An offset.
    Offset(u64),
    /// The first offset at or after a time, ms since the epoch.
    Timestamp(i64),
    /// The first retained offset.
    Beginning,
    /// The high watermark: only new records.
    End,
}

struct PartitionState {
    position: u64,
    high_watermark: u64,
    generation: u64,
    cancel: CancellationToken,
    /// Revoked from this group member: stopped, to be committed and given up.
    revoked: bool,
}

/// A subscribed partition: its topic's index in [`Consumer::topics`], and the partition. An
/// index rather than the name keeps the per-record bookkeeping free of string copies.
type Slot = (usize, u32);

/// A consumer of one topic or several.
pub struct Consumer {
    conn: Connection,
    /// Partition leaders in a cluster, found through `Metadata` (once per topic) and shared
    /// by the fetch tasks and offset lookups.
    leaders: Arc<Leaders>,
    config: ConsumerConfig,
    /// The subscribed topics, in the order given, without duplicates.
    topics: Vec<String>,
    partitions: HashMap<Slot, PartitionState>,
    tx: mpsc::Sender<Fetched>,
    rx: mpsc::Receiver<Fetched>,
    buffer: VecDeque<(Slot, ConsumerEvent)>,
    committed: HashMap<Slot, u64>,
    last_commit: Instant,
    next_generation: u64,
    /// The group membership, when the broker assigns the partitions.
    member: Option<GroupMember>,
    /// Membership changes to hand out before any record.
    notices: VecDeque<ConsumerEvent>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("topics", &self.topics)
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // A dropped member stops heartbeating (its own drop) without leaving: like a crash,
        // its partitions move after the session timeout.
        for p in self.partitions.values() {
            p.cancel.cancel();
        }
    }
}

impl Consumer {
    /// Subscribes to `topic`. With a group and no partitions given, the consumer joins the
    /// group as a member and consumes the partitions the broker assigns it (see the module's
    /// "Group membership"; the first heartbeat is answered before this returns). Otherwise it
    /// consumes all the topic's partitions, or the ones given. With a group, each partition
    /// starts at its committed offset; otherwise (or without one) where `auto_offset_reset`
    /// says.
    pub async fn subscribe(
        conn: Connection,
        config: ConsumerConfig,
        topic: &str,
        partitions: Option<Vec<u32>>,
    ) -> Result<Consumer> {
        let admin = Admin::new(conn.clone());
        let count = admin.describe_topic(topic).await?.partitions.len() as u32;
        if partitions.is_none() && config.group.is_some() {
            return Consumer::join(conn, config, vec![topic.to_string()], count).await;
        }
        let chosen = partitions.unwrap_or_else(|| (0..count).collect());
        if let Some(p) = chosen.iter().find(|&&p| p >= count) {
            return Err(ClientError::Invalid(format!(
                "partition {p} does not exist: topic {topic:?} has {count} partitions"
            )));
        }
        let mut consumer = Consumer::new(conn, config, vec![topic.to_string()], chosen.len(), None);
        consumer.start_all(0, &chosen).await?;
        Ok(consumer)
    }

    /// Subscribes to every partition of several topics (each listed once; at least one). With
    /// a group, the consumer joins it as a member subscribed to all of them, and consumes the
    /// `(topic, partition)`s the broker assigns it; [`ConsumerEvent::Assigned`] and the other
    /// membership events come one per topic. Without a group it consumes every partition of
    /// every topic. Where each partition starts is as for [`Consumer::subscribe`].
    pub async fn subscribe_topics<S: AsRef<str>>(
        conn: Connection,
        config: ConsumerConfig,
        topics: &[S],
    ) -> Result<Consumer> {
        let mut names: Vec<String> = Vec::new();
        for t in topics {
            if !names.iter().any(|n| n == t.as_ref()) {
                names.push(t.as_ref().to_string());
            }
        }
        if names.is_empty() {
            return Err(ClientError::Invalid(
                "a consumer needs at least one topic".into(),
            ));
        }
        let admin = Admin::new(conn.clone());
        let mut counts = Vec::with_capacity(names.len());
        for t in &names {
            counts.push(admin.describe_topic(t).await?.partitions.len() as u32);
        }
        let total: u32 = counts.iter().sum();
        if config.group.is_some() {
            return Consumer::join(conn, config, names, total).await;
        }
        let mut consumer = Consumer::new(conn, config, names, total as usize, None);
        for (i, count) in counts.into_iter().enumerate() {
            let all: Vec<u32> = (0..count).collect();
            consumer.start_all(i, &all).await?;
        }
        Ok(consumer)
    }

    /// Starts `partitions` of topic `topic` (an index into `topics`) at the group's committed
    /// offsets, or where the reset policy says.
    async fn start_all(&mut self, topic: usize, partitions: &[u32]) -> Result<()> {
        let committed: HashMap<u32, u64> = match &self.config.group {
            Some(group) => Admin::new(self.conn.clone())
                .fetch_offsets(group, &self.topics[topic], partitions)
                .await?
                .into_iter()
                .filter_map(|c| c.offset.map(|o| (c.partition, o)))
                .collect(),
            None => HashMap::new(),
        };
        for &p in partitions {
            let start = match committed.get(&p) {
                Some(&o) => {
                    self.committed.insert((topic, p), o);
                    o
                }
                None => {
                    self.committed.remove(&(topic, p));
                    self.reset_position((topic, p)).await?
                }
            };
            self.start((topic, p), start);
        }
        Ok(())
    }

    /// A consumer of `topics` with nothing started yet, its channel sized for `partitions`
    /// (all topics together).
    fn new(
        conn: Connection,
        config: ConsumerConfig,
        topics: Vec<String>,
        partitions: usize,
        member: Option<GroupMember>,
    ) -> Consumer {
        let (tx, rx) = mpsc::channel(partitions.max(1) * config.prefetch);
        Consumer {
            conn,
            leaders: Arc::default(),
            config,
            topics,
            partitions: HashMap::new(),
            tx,
            rx,
            buffer: VecDeque::new(),
            committed: HashMap::new(),
            last_commit: Instant::now(),
            next_generation: 0,
            member,
            notices: VecDeque::new(),
        }
    }

    /// An admin client on this consumer's connection and leaders.
    fn admin(&self) -> Admin {
        Admin::with_leaders(self.conn.clone(), Arc::clone(&self.leaders))
    }

    async fn reset_position(&self, (topic, partition): Slot) -> Result<u64> {
        let query = match self.config.auto_offset_reset {
            AutoOffsetReset::Earliest => OffsetQuery::Earliest,
            AutoOffsetReset::Latest => OffsetQuery::Latest,
        };
        Ok(self
            .admin()
            .list_offsets(&self.topics[topic], partition, query)
            .await?
            .offset)
    }

    /// (Re)starts a partition's fetch task at `offset`; older tasks' answers are ignored.
    fn start(&mut self, slot: Slot, offset: u64) {
        if let Some(old) = self.partitions.get(&slot) {
            old.cancel.cancel();
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let cancel = CancellationToken::new();
        self.partitions.insert(
            slot,
            PartitionState {
                position: offset,
                high_watermark: offset,
                generation,
                cancel: cancel.clone(),
                revoked: false,
            },
        );
        self.buffer.retain(|(s, _)| *s != slot);
        let task = FetchTask {
            conn: self.conn.clone(),
            leaders: Arc::clone(&self.leaders),
            topic: self.topics[slot.0].clone(),
            slot,
            generation,
            reset: self.config.auto_offset_reset,
            max_wait_ms: self.config.max_wait_ms,
            max_bytes: self.config.max_bytes,
            tx: self.tx.clone(),
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task.run(offset) => {}
            }
        });
    }

    /// The topic (the first one, when several are subscribed).
    pub fn topic(&self) -> &str {
        &self.topics[0]
    }

    /// The subscribed topics, in the order given.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The next offset to be handed out, per `(topic, partition)` (as a group member: the
    /// partitions it owns, revoked ones not given up yet included).
    pub fn positions(&self) -> HashMap<(String, u32), u64> {
        self.partitions
            .iter()
            .map(|(&(t, p), s)| ((self.topics[t].clone(), p), s.position))
            .collect()
    }

    /// The last high watermark seen per `(topic, partition)` (lag = high watermark −
    /// position).
    pub fn high_watermarks(&self) -> HashMap<(String, u32), u64> {
        self.partitions
            .iter()
            .map(|(&(t, p), s)| ((self.topics[t].clone(), p), s.high_watermark))
            .collect()
    }

    /// The next record or skip. Waits (long-polling) until one is available.
    ///
    /// Calling it says the application is done with the records earlier calls returned: when
    /// auto-commit is on and its interval has passed, it commits their positions first (and
    /// again while it waits, when the interval passes then). The record it returns is not
    /// covered by that commit: if the process dies, or the consumer is dropped, before the
    /// next call, the group gets that record again.
    ///
    /// Cancel-safe: a record is handed out only when the call returns it.
    pub async fn next(&mut self) -> Result<ConsumerEvent> {
        self.maybe_auto_commit().await?;
        self.finish_revocations().await?;
        loop {
            self.take_member_events().await?;
            if let Some(notice) = self.notices.pop_front() {
                return Ok(notice);
            }
            if let Some((slot, event)) = self.buffer.pop_front() {
                if let Some(state) = self.partitions.get_mut(&slot) {
                    match &event {
                        ConsumerEvent::Record(r) => state.position = r.offset + 1,
                        ConsumerEvent::Skipped { to, .. } => state.position = *to,
                        // Never buffered: they are notices.
                        ConsumerEvent::Assigned { .. }
                        | ConsumerEvent::Revoked { .. }
                        | ConsumerEvent::Lost { .. } => {}
                    }
                }
                return Ok(event);
            }
            // Far in the future when there is nothing to auto-commit.
            let due = self
                .auto_commit_due()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let member = self.member.as_mut();
            let fetched = tokio::select! {
                fetched = self.rx.recv() => fetched,
                _ = tokio::time::sleep_until(due) => {
                    // Nothing was handed out by this call yet: the positions cover
                    // only records of earlier calls.
                    self.auto_commit().await?;
                    continue;
                }
                event = group::next_member_event(member) => {
                    self.on_member_event(event).await?;
                    continue;
                }
            };
            self.accept(fetched.ok_or(ClientError::Closed)?)?;
        }
    }

    /// Like [`Consumer::next`], but gives up after `timeout` with `None`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<ConsumerEvent>> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn accept(&mut self, fetched: Fetched) -> Result<()> {
        let current = |parts: &HashMap<Slot, PartitionState>, slot: Slot, g: u64| {
            parts
                .get(&slot)
                .is_some_and(|s| s.generation == g && !s.revoked)
        };
        match fetched {
            Fetched::Records {
                slot,
                generation,
                records,
                high_watermark,
            } => {
                if !current(&self.partitions, slot, generation) {
                    return Ok(());
                }
                if let Some(s) = self.partitions.get_mut(&slot) {
                    s.high_watermark = s.high_watermark.max(high_watermark);
                }
                for r in records {
                    let event = ConsumerEvent::Record(ConsumedRecord {
                        topic: self.topics[slot.0].clone(),
                        partition: slot.1,
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        key: r.key,
                        value: r.value,
                        headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                    });
                    self.buffer.push_back((slot, event));
                }
                Ok(())
            }
            Fetched::Skipped {
                slot,
                generation,
                from,
                to,
                reason,
            } => {
                if current(&self.partitions, slot, generation) {
                    let event = ConsumerEvent::Skipped {
                        topic: self.topics[slot.0].clone(),
                        partition: slot.1,
                        from,
                        to,
                        reason,
                    };
                    self.buffer.push_back((slot, event));
                }
                Ok(())
            }
            Fetched::Failed {
                slot,
                generation,
                error,
            } => {
                if current(&self.partitions, slot, generation) {
                    Err(error)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Positions not committed yet.
    fn uncommitted(&self) -> Vec<(Slot, u64)> {
        self.partitions
            .iter()
            .filter(|(slot, s)| self.committed.get(slot) != Some(&s.position))
            .map(|(&slot, s)| (slot, s.position))
            .collect()
    }

    /// When the next auto-commit is due, if auto-commit is on and there is something to
    /// commit.
    fn auto_commit_due(&self) -> Option<Instant> {
        let ms = self.config.auto_commit_interval_ms?;
        if self.config.group.is_none() || self.uncommitted().is_empty() {
            return None;
        }
        Some(self.last_commit + Duration::from_millis(ms))
    }

    async fn maybe_auto_commit(&mut self) -> Result<()> {
        match self.auto_commit_due() {
            Some(due) if Instant::now() >= due => self.auto_commit().await,
            _ => Ok(()),
        }
    }

    /// An automatic commit. A transient failure (the broker restarting) is logged and the
    /// commit is tried again an interval later, so it never ends a subscription; a final one
    /// is returned.
    async fn auto_commit(&mut self) -> Result<()> {
        match self.commit().await {
            Err(e) if e.is_retryable() => {
                tracing::warn!(topics = ?self.topics, error = %e, "auto-commit failed; will retry");
                Ok(())
            }
            // A fenced member's commit: its partitions are reported lost (a Lost event),
            // and it rejoins.
            Err(e) if self.member.is_some() && group::is_fenced(&e) => Ok(()),
            other => other,
        }
    }

    /// Commits the positions of every record handed out so far, the one last returned by
    /// [`Consumer::next`] included (the group's next offsets): call it once the application
    /// is done with them. Without a group this is an error.
    pub async fn commit(&mut self) -> Result<()> {
        self.commit_positions().await?;
        self.finish_revocations().await
    }

    /// Commits the positions not committed yet: as a group member with the member epoch.
    async fn commit_positions(&mut self) -> Result<()> {
        let Some(group) = self.config.group.clone() else {
            return Err(ClientError::Invalid("commit needs a consumer group".into()));
        };
        let changed = self.uncommitted();
        self.last_commit = Instant::now();
        if changed.is_empty() {
            return Ok(());
        }
        // One request per topic; a topic's offsets count as committed once its request
        // succeeded, so a failure part-way leaves only the rest for the next try.
        let mut by_topic: BTreeMap<usize, Vec<(u32, u64)>> = BTreeMap::new();
        for ((t, p), o) in changed {
            by_topic.entry(t).or_default().push((p, o));
        }
        for (t, offsets) in by_topic {
            let topic = &self.topics[t];
            match &self.member {
                Some(member) => {
                    if let Err(e) = member.commit(topic, &offsets).await {
                        if group::is_fenced(&e) {
                            self.lose_all(&e.to_string());
                        }
                        return Err(e);
                    }
                }
                None => {
                    Admin::new(self.conn.clone())
                        .commit_offsets(&group, topic, &offsets)
                        .await?;
                }
            }
            self.committed
                .extend(offsets.into_iter().map(|(p, o)| ((t, p), o)));
        }
        Ok(())
    }

    /// Stops the consumer. With a group and auto-commit on, it first commits like
    /// [`Consumer::commit`], the record last handed out included: closing says the
    /// application is done with it (as Kafka's `close`). Without auto-commit it commits
    /// nothing; call [`Consumer::commit`] first. Either way the fetch tasks end.
    ///
    /// Dropping a consumer instead of closing it commits nothing.
    ///
    /// A group member also commits what it handed out of revoked partitions, then leaves the
    /// group, so its partitions move at once (a static member keeps them for the session
    /// timeout, for a restart).
    pub async fn close(mut self) -> Result<()> {
        if self.config.group.is_some() && self.config.auto_commit_interval_ms.is_some() {
            self.commit().await?;
        } else {
            self.finish_revocations().await?;
        }
        if let Some(member) = self.member.take() {
            member.leave().await?;
        }
        Ok(()) // dropping `self` cancels the fetch tasks
    }

    /// Moves partition `partition` of the consumer's topic to a new position; records
    /// buffered for it are dropped. With several topics subscribed, this is an error: use
    /// [`Consumer::seek_in`].
    pub async fn seek(&mut self, partition: u32, to: SeekTo) -> Result<u64> {
        if self.topics.len() > 1 {
            return Err(ClientError::Invalid(format!(
                "the consumer has {} topics ({}): seek needs a topic (seek_in)",
                self.topics.len(),
                self.topics.join(", ")
            )));
        }
        let topic = self.topics[0].clone();
        self.seek_in(&topic, partition, to).await
    }

    /// Moves partition `partition` of `topic` to a new position; records buffered for it are
    /// dropped.
    pub async fn seek_in(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<u64> {
        let slot = self
            .topics
            .iter()
            .position(|t| t == topic)
            .map(|t| (t, partition));
        let Some(slot) = slot.filter(|s| self.partitions.get(s).is_some_and(|s| !s.revoked)) else {
            return Err(ClientError::Invalid(format!(
                "topic {topic:?} partition {partition} is not subscribed (or was revoked from this member)"
            )));
        };
        let admin = self.admin();
        let offset = match to {
            SeekTo::Offset(o) => o,
            SeekTo::Beginning => {
                admin
                    .list_offsets(topic, partition, OffsetQuery::Earliest)
                    .await?
                    .offset
            }
            SeekTo::End => {
                admin
                    .list_offsets(topic, partition, OffsetQuery::Latest)
                    .await?
                    .offset
            }
            SeekTo::Timestamp(ts) => {
                admin
                    .list_offsets(topic, partition, OffsetQuery::Timestamp(ts))
                    .await?
                    .offset
            }
        };
        self.start(slot, offset);
        Ok(offset)
    }
}
