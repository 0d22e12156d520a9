//! Queue subscriptions: named, per-record-acknowledged consumption of a topic, shared by
//! many consumers per partition, with redelivery and dead letters (`docs/SUBSCRIPTIONS.md`).
//!
//! - [`state`]: one partition's state machine (done ranges, pending records, locks). No I/O.
//! - [`records`]: the `__subscriptions` record codec.
//! - [`settings`]: settings (defaults, bounds, wire form) and [`Ack`].
//! - `dead_letter`: appending leaving records to the dead-letter topic.
//! - [`persist`]: [`persist::StateLog`], the internal topic written and replayed as a keyed
//!   log.
//! - [`ordered`]: per-key ordered acquisition for webhooks created with `ordered`.
//! - [`read`]: reading records from the topic's log.
//! - [`source`]: where a partition is read: this broker's log, or, in a cluster, a broker
//!   holding the partition when this one does not (long-poll fetches to wait); dead letters
//!   produced at the dead-letter partition's leader.
//! - [`push`]: the `Subscribe` stream (push with credits) for subscriptions and groups.
//! - [`replicated`]: `__subscriptions` on replicated storage in a cluster: served by its
//!   leader, reloaded by a new one.
//! - [`webhook`]: push to HTTP endpoints: signed POSTs, retries with backoff, AIMD rate.
//! - [`stats`]: delivery outcome counters and the figures the metrics read at scrape time.
//! - [`Subscriptions`]: every subscription in memory; each change is stored before it takes
//!   effect.
//! - `background`: [`spawn_background`] runs the sweep that expires locks (and dead-letters
//!   records past their attempts) while no consumer calls, starts the webhook pushers, and
//!   compacts `__subscriptions` off the request path once it grew by a segment.
//!
//! # Concurrency
//! Each subscription has one async lock over its partitions' state. A call works on a copy:
//! it reads records, dead-letters, and stores the changed partitions, and only then installs
//! the copy. A failure leaves the state as it was. The store's writes go through one
//! blocking-pool lock over the log.

mod background;
mod dead_letter;
pub mod ordered;
pub mod persist;
pub mod push;
pub mod read;
pub mod records;
pub mod replicated;
pub mod settings;
pub mod source;
pub mod state;
pub mod stats;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rill_proto::v1::{self as pb, FetchedRecord};
use rill_storage::log::now_ms;
use rill_storage::Store;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{StreamExt, StreamMap};

pub use self::background::spawn_background;
pub use self::settings::{config_to_pb, settle_config, validate_consumer, Ack};

use self::persist::StateLog;
use self::records::{StoredConfig, SubscriptionRecord};
use self::source::Source;
use self::state::{AckKind, DeadLetter, Limits, PartitionState, SubscriptionError};
use crate::error::BrokerError;
use crate::state::{Broker, TopicState};

/// Default lock length.
pub const DEFAULT_ACK_DEADLINE_MS: u32 = 30_000;
/// Longest lock (and nack delay).
pub const MAX_ACK_DEADLINE_MS: u32 = 3_600_000;
/// Default deliveries before dead-lettering.
pub const DEFAULT_MAX_DELIVERY_ATTEMPTS: u32 = 5;
/// Most deliveries allowed.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 1_000;
/// Default pending records per partition.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1_000;
/// Most pending records per partition: bounds one stored partition record (about 100 bytes
/// each) well below half a segment of the state topic.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// Default records per Receive.
const DEFAULT_RECEIVE_RECORDS: usize = 500;
/// How often the sweep looks for expired locks.
const SWEEP_TICK_MS: u64 = 500;

/// The dead-letter headers: where a record came from and why it left.
pub const HEADER_TOPIC: &str = "rill-dead-letter-topic";
/// The origin partition header.
pub const HEADER_PARTITION: &str = "rill-dead-letter-partition";
/// The origin offset header.
pub const HEADER_OFFSET: &str = "rill-dead-letter-offset";
/// The deliveries-made header.
pub const HEADER_ATTEMPTS: &str = "rill-dead-letter-attempts";
/// The last-error header (present when an error is known).
pub const HEADER_ERROR: &str = "rill-dead-letter-error";
/// The subscription header.
pub const HEADER_SUBSCRIPTION: &str = "rill-dead-letter-subscription";

/// One subscription.
#[derive(Debug)]
pub struct Sub {
    name: String,
    config: StoredConfig,
    state: tokio::sync::Mutex<SubState>,
    /// Woken when records may have become deliverable (nack, seek, expiry).
    released: tokio::sync::Notify,
    /// Where the next acquisition starts looking, so partitions share consumers fairly.
    rotation: AtomicU32,
    /// Delivery outcomes, for the metrics.
    counters: stats::Counters,
    /// What was learnt about the partitions read from other brokers.
    remotes: Arc<source::Remotes>,
}

#[derive(Debug, Default)]
struct SubState {
    partitions: BTreeMap<u32, PartitionState>,
    deleted: bool,
}

impl Sub {
    fn limits(&self) -> Limits {
        Limits {
            ack_deadline_ms: self.config.ack_deadline_ms,
            max_delivery_attempts: self.config.max_delivery_attempts,
            max_in_flight: self.config.max_in_flight_per_partition,
        }
    }

    /// The subscription's settings.
    pub fn config(&self) -> &StoredConfig {
        &self.config
    }
}

/// Every subscription: a cheap clone.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// A plain lock: looked up and changed, never held across an await.
    subs: RwLock<BTreeMap<String, Arc<Sub>>>,
    /// Used only on the blocking pool.
    log: Arc<Mutex<StateLog>>,
    /// Serializes creations and deletions.
    admin: tokio::sync::Mutex<()>,
    /// Wakes the compaction task: a change left the log due a compaction, or a new leader
    /// loaded a log its predecessor left grown.
    compaction: tokio::sync::Notify,
    /// Group push streams' remote read failures, for the metrics.
    group_push_failures: stats::GroupPushFailures,
}

/// What a subscription's description says.
#[derive(Debug, Clone, Default)]
pub struct Description {
    /// The settings.
    pub config: StoredConfig,
    /// Per partition: (partition, state copy, high watermark).
    pub partitions: Vec<(u32, PartitionState, u64)>,
    /// Timestamp of the oldest record not done, if any.
    pub oldest_unacked_ms: Option<i64>,
}

impl Subscriptions {
    /// Opens the state: replays `__subscriptions` (creating it when missing). Every lock
    /// held before is dropped, so records acquired and not acknowledged before a restart
    /// are delivered again. `segment_bytes` is the topic's segment size if it is created
    /// here. Blocking: call it on the blocking pool.
    pub fn open(store: &Store, segment_bytes: u64) -> Result<Subscriptions, BrokerError> {
        let (log, subs) = replicated::load(store, segment_bytes)?;
        Ok(Subscriptions {
            inner: Arc::new(Inner {
                subs: RwLock::new(subs),
                log: Arc::new(Mutex::new(log)),
                admin: tokio::sync::Mutex::new(()),
                compaction: tokio::sync::Notify::new(),
                group_push_failures: stats::GroupPushFailures::default(),
            }),
        })
    }

    /// The subscription `name`, or NOT_FOUND.
    pub fn get(&self, name: &str) -> Result<Arc<Sub>, BrokerError> {
        self.inner
            .subs
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| SubscriptionError::NotFound { name: name.into() }.into())
    }

    /// Every subscription's name and topic, sorted by name.
    pub fn list(&self) -> Vec<(String, String)> {
        self.inner
            .subs
            .read()
            .values()
            .map(|s| (s.name.clone(), s.config.topic.clone()))
            .collect()
    }

    async fn write(&self, records: Vec<SubscriptionRecord>) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let log = Arc::clone(&self.inner.log);
        let due = tokio::task::spawn_blocking(move || -> Result<bool, BrokerError> {
            let mut log = log.lock();
            log.write(&records)?;
            Ok(log.compaction_due())
        })
        .await??;
        // The change is stored and acknowledged now; the compaction is the background
        // task's (a permit is kept if it is busy, so this wake is not lost).
        if due {
            self.wake_compaction();
        }
        Ok(())
    }

    /// Creates subscription `name`, starting every partition at the log start or the high
    /// watermark.
    pub async fn create(
        &self,
        broker: &Broker,
        name: &str,
        config: StoredConfig,
    ) -> Result<(), BrokerError> {
        rill_storage::config::validate_name("subscription", name)?;
        let topic = broker.topic(&config.topic)?;
        if let Some(p) = &config.push {
            webhook::check_endpoint(name, &p.endpoint, &broker.config().push_endpoint_allow)?;
        }
        if let Some(d) = &config.dead_letter_topic {
            if broker.topic(d).is_err() {
                return Err(SubscriptionError::DeadLetterTopicMissing {
                    subscription: name.into(),
                    topic: d.clone(),
                }
                .into());
            }
        }
        let _admin = self.inner.admin.lock().await;
        if self.inner.subs.read().contains_key(name) {
            return Err(SubscriptionError::Exists { name: name.into() }.into());
        }
        let remotes = Arc::new(source::Remotes::default());
        let mut partitions = BTreeMap::new();
        for p in 0..topic.topic.partition_count() {
            let bounds = Source::of(broker, &topic, p, &remotes)?.bounds().await?;
            let start = if config.from_earliest {
                bounds.log_start
            } else {
                bounds.high_watermark
            };
            partitions.insert(p, PartitionState::starting_at(start));
        }
        let mut records = vec![SubscriptionRecord::Created {
            name: name.into(),
            config: config.clone(),
        }];
        records.extend(
            partitions
                .iter()
                .map(|(p, s)| SubscriptionRecord::Partition {
                    name: name.into(),
                    partition: *p,
                    state: s.clone(),
                }),
        );
        self.write(records).await?;
        let sub = Sub {
            name: name.into(),
            config,
            state: tokio::sync::Mutex::new(SubState {
                partitions,
                deleted: false,
            }),
            released: tokio::sync::Notify::new(),
            rotation: AtomicU32::new(0),
            counters: stats::Counters::default(),
            remotes,
        };
        let sub = Arc::new(sub);
        self.inner
            .subs
            .write()
            .insert(name.into(), Arc::clone(&sub));
        if sub.config.push.is_some() {
            webhook::spawn(broker, self, &sub);
        }
        tracing::info!(subscription = name, "subscription created");
        Ok(())
    }

    /// Deletes subscription `name` and its state.
    pub async fn delete(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        let sub = self.get(name)?;
        let mut st = sub.state.lock().await;
        self.write(vec![SubscriptionRecord::Deleted { name: name.into() }])
            .await?;
        st.deleted = true;
        self.inner.subs.write().remove(name);
        sub.released.notify_waiters();
        tracing::info!(subscription = name, "subscription deleted");
        Ok(())
    }

    /// Describes subscription `name`.
    pub async fn describe(&self, broker: &Broker, name: &str) -> Result<Description, BrokerError> {
        let sub = self.get(name)?;
        let topic = broker.topic(&sub.config.topic)?;
        // Bounds first (a call for a partition read from another broker), without the lock.
        let mut sources = Vec::new();
        for p in 0..topic.topic.partition_count() {
            let source = Source::of(broker, &topic, p, &sub.remotes)?;
            let bounds = match source.bounds().await {
                Ok(b) => b,
                // The last answer's, when the holder does not answer now.
                Err(e) => source.last_bounds().ok_or(e)?,
            };
            sources.push((p, source, bounds));
        }
        let st = sub.state.lock().await;
        let mut out = Description {
            config: sub.config.clone(),
            ..Description::default()
        };
        let mut oldest: Vec<(Source, u64)> = Vec::new();
        for (p, source, bounds) in sources {
            let mut ps = st
                .partitions
                .get(&p)
                .cloned()
                .unwrap_or_else(|| PartitionState::starting_at(bounds.log_start));
            ps.clamp_to_log_start(bounds.log_start);
            let hwm = bounds.high_watermark;
            if ps.floor < hwm {
                oldest.push((source, ps.floor));
            }
            out.partitions.push((p, ps, hwm));
        }
        drop(st);
        let mut first_ms = None;
        for (source, at) in oldest {
            if let Some(r) = source
                .read_from(at, 1, 1)
                .await
                .ok()
                .and_then(|r| r.into_iter().next())
            {
                first_ms = Some(first_ms.map_or(r.timestamp_ms, |m: i64| m.min(r.timestamp_ms)));
            }
        }
        out.oldest_unacked_ms = first_ms;
        Ok(out)
    }

    /// Moves `name` to an offset or a time in one partition or all. Returns where each went.
    pub async fn seek(
        &self,
        broker: &Broker,
        name: &str,
        target: pb::seek_subscription_request::Target,
        partition: Option<u32>,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        let sub = self.get(name)?;
        let topic = broker.topic(&sub.config.topic)?;
        let partitions: Vec<u32> = match partition {
            Some(p) => {
                topic.log(p)?;
                vec![p]
            }
            None => (0..topic.topic.partition_count()).collect(),
        };
        let mut targets = Vec::new();
        for p in partitions {
            let source = Source::of(broker, &topic, p, &sub.remotes)?;
            let offset = match target {
                pb::seek_subscription_request::Target::ToOffset(o) => {
                    let b = source.bounds().await?;
                    o.clamp(b.log_start, b.high_watermark)
                }
                pb::seek_subscription_request::Target::ToTimestampMs(t) => {
                    source.offset_for_timestamp(t).await?
                }
            };
            targets.push((p, offset));
        }
        let mut st = sub.state.lock().await;
        if st.deleted {
            return Err(SubscriptionError::NotFound { name: name.into() }.into());
        }
        let mut next = st.partitions.clone();
        for (p, offset) in &targets {
            next.entry(*p).or_default().seek(*offset);
        }
        self.write(
            targets
                .iter()
                .filter_map(|(p, _)| next.get(p).map(|s| (p, s)))
                .map(|(p, s)| SubscriptionRecord::Partition {
                    name: name.into(),
                    partition: *p,
                    state: s.clone(),
                })
                .collect(),
        )
        .await?;
        st.partitions = next;
        drop(st);
        sub.released.notify_waiters();
        Ok(targets)
    }

    /// Acquires up to `max_records` records (and about `max_bytes`) for `consumer`, waiting
    /// up to `wait` for the first.
    pub async fn receive(
        &self,
        broker: &Broker,
        name: &str,
        consumer: &str,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<pb::ReceivedRecord>, BrokerError> {
        validate_consumer(consumer)?;
        let sub = self.get(name)?;
        let topic = broker.topic(&sub.config.topic)?;
        let max_records = if max_records == 0 {
            DEFAULT_RECEIVE_RECORDS
        } else {
            max_records
        };
        let deadline = Instant::now() + wait;
        let mut changes = StreamMap::new();
        for p in 0..topic.topic.partition_count() {
            if let Some(rx) = topic.subscribe(p) {
                changes.insert(p, WatchStream::from_changes(rx));
            }
        }
        let mut arrivals = source::Arrivals::new(broker, Some(Arc::clone(&sub)), &topic);
        let _slot = broker.waiter_slot()?;
        loop {
            let released = sub.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let (got, next_event) = self
                .acquire(broker, &sub, &topic, consumer, max_records, max_bytes)
                .await?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            // Events are after the pass began (due records were just tried); one that
            // came due during the pass wakes at once.
            let wake_at = next_event
                .map(|ms| {
                    let in_ms = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
                    (Instant::now() + Duration::from_millis(in_ms)).min(deadline)
                })
                .unwrap_or(deadline);
            tokio::select! {
                _ = broker.shutdown().cancelled() => return Ok(Vec::new()),
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = &mut released => {}
                _ = changes.next(), if !changes.is_empty() => {}
                _ = arrivals.next() => {}
            }
        }
    }

    /// One pass of acquisition (also expiring locks and dead-lettering). Returns the records
    /// and the next time a lock ends or a released record becomes due. The first record is
    /// returned even when larger than `max_bytes`, so a large record is never stuck.
    pub async fn acquire(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        topic: &Arc<TopicState>,
        consumer: &str,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<pb::ReceivedRecord>, Option<i64>), BrokerError> {
        let limits = (max_records, max_bytes);
        self.acquire_with(broker, sub, topic, consumer, limits, How::Loose)
            .await
    }

    /// [`Subscriptions::acquire`] in per-key order ([`ordered`]), for an ordered webhook.
    pub async fn acquire_ordered(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        topic: &Arc<TopicState>,
        consumer: &str,
        (max_records, max_bytes): (usize, usize),
        index: &mut ordered::KeyIndex,
    ) -> Result<(Vec<pb::ReceivedRecord>, Option<i64>), BrokerError> {
        let limits = (max_records, max_bytes);
        self.acquire_with(broker, sub, topic, consumer, limits, How::Ordered(index))
            .await
    }

    /// [`Subscriptions::acquire`] that never goes past `max_bytes` (push credits).
    pub async fn acquire_strict(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        topic: &Arc<TopicState>,
        consumer: &str,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<pb::ReceivedRecord>, Option<i64>), BrokerError> {
        let limits = (max_records, max_bytes);
        self.acquire_with(broker, sub, topic, consumer, limits, How::Strict)
            .await
    }

    async fn acquire_with(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        topic: &Arc<TopicState>,
        consumer: &str,
        (max_records, max_bytes): (usize, usize),
        mut how: How<'_>,
    ) -> Result<(Vec<pb::ReceivedRecord>, Option<i64>), BrokerError> {
        let strict = matches!(how, How::Strict);
        let mut st = sub.state.lock().await;
        if st.deleted {
            return Err(SubscriptionError::NotFound {
                name: sub.name.clone(),
            }
            .into());
        }
        let limits = sub.limits();
        let now = now_ms();
        let mut next = st.partitions.clone();
        let count = topic.topic.partition_count();
        let expired = stats::expiring(&next, now);
        let mut leaving = Vec::new();
        for (p, ps) in next.iter_mut() {
            leaving.extend(ps.expire(*p, now, &limits));
        }
        let mut out = Vec::new();
        let mut bytes_left = max_bytes;
        let first = sub.rotation.fetch_add(1, Ordering::Relaxed) % count.max(1);
        for i in 0..count {
            if out.len() >= max_records || bytes_left == 0 {
                break;
            }
            let p = (first + i) % count;
            let source = Source::of(broker, topic, p, &sub.remotes)?;
            let known = source.local_bounds();
            let ps = next.entry(p).or_insert_with(|| {
                PartitionState::starting_at(source.last_bounds().map_or(0, |b| b.log_start))
            });
            if let Some(b) = known {
                ps.clamp_to_log_start(b.log_start);
            }
            let want = max_records - out.len();
            if let How::Ordered(index) = &mut how {
                let pass = ordered::Pass {
                    partition: p,
                    consumer,
                    now_ms: now,
                    limits,
                    want,
                };
                let bytes = &mut bytes_left;
                match ordered::acquire(index, ps, &source, pass, bytes, strict, &mut out).await {
                    Ok(()) => {}
                    Err(e) if matches!(source, Source::Remote(_)) => remote_failed(sub, p, &e),
                    Err(e) => return Err(e),
                }
                continue;
            }
            let again = ps.redeliverable(now, want);
            let room = (limits.max_in_flight as usize).saturating_sub(ps.pending.len());
            let new_max = want.saturating_sub(again.len()).min(room);
            let from = ps.next;
            // A remote partition's end as last seen: its long poll wakes the caller when it
            // moves, so a pass with nothing to redeliver makes no call for it.
            let end = known.or(source.last_bounds()).map(|b| b.high_watermark);
            if again.is_empty() && (new_max == 0 || end.is_some_and(|h| from >= h)) {
                continue;
            }
            let (old, new, bounds) = match source.read(again, from, new_max, bytes_left).await {
                Ok(read) => read,
                // Another broker's partition that cannot be read now: the others go on.
                Err(e) if matches!(source, Source::Remote(_)) => {
                    remote_failed(sub, p, &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            ps.clamp_to_log_start(bounds.log_start);
            // Redelivered offsets the log no longer holds are done (not those past the end
            // of a replica that answered while behind).
            let found: std::collections::BTreeSet<u64> = old.iter().map(|r| r.offset).collect();
            for o in ps.redeliverable(now, want) {
                if !found.contains(&o) && o < bounds.high_watermark {
                    ps.forget(o);
                }
            }
            for r in &new {
                ps.take_new(r.offset);
            }
            for r in old.into_iter().chain(new) {
                let size = read::record_bytes(&r);
                if (strict || !out.is_empty()) && size > bytes_left {
                    break;
                }
                if let Some((delivery_count, lock_deadline_ms)) =
                    ps.lock(r.offset, consumer, now, &limits)
                {
                    bytes_left = bytes_left.saturating_sub(size);
                    out.push(pb::ReceivedRecord {
                        partition: p,
                        record: Some(r),
                        delivery_count,
                        lock_deadline_ms,
                    });
                }
            }
        }
        let held_back = self
            .finish(broker, sub, &mut st, (next, &[]), leaving)
            .await?;
        // Records of a partition whose dead letters could not be sent: its state was kept
        // as it was, so they are not held by this consumer.
        out.retain(|r| !held_back.contains(&r.partition));
        sub.counters.settled(expired, 0);
        let next_event = st
            .partitions
            .values()
            .filter_map(|ps| ps.next_event_ms(now))
            .min();
        Ok((out, next_event))
    }

    /// Dead-letters `leaving`, stores the partitions of `next` that differ from the state,
    /// then installs `next`. On an error nothing changes. Returns the partitions kept as
    /// they were because the broker holding their records to dead-letter did not answer;
    /// when one of `needed` is among them, the call fails instead (UNAVAILABLE).
    async fn finish(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        st: &mut SubState,
        (mut next, needed): (BTreeMap<u32, PartitionState>, &[u32]),
        mut leaving: Vec<DeadLetter>,
    ) -> Result<std::collections::BTreeSet<u32>, BrokerError> {
        let mut held_back = std::collections::BTreeSet::new();
        if !leaving.is_empty() {
            let (to_topic, kept) = dead_letter::dead_letter(broker, sub, &leaving).await?;
            if let Some(p) = needed.iter().find(|p| kept.contains(p)) {
                return Err(BrokerError::ReplicationUnavailable(format!(
                    "subscription {:?}: topic {} partition {p} has records to dead-letter that \
                     the broker holding them cannot give now; nothing changed; retry",
                    sub.name, sub.config.topic
                )));
            }
            for p in &kept {
                match st.partitions.get(p) {
                    Some(before) => next.insert(*p, before.clone()),
                    None => next.remove(p),
                };
            }
            leaving.retain(|d| !kept.contains(&d.partition));
            held_back = kept;
            for d in &leaving {
                if let Some(ps) = next.get_mut(&d.partition) {
                    ps.count_left(1, to_topic);
                }
            }
            tracing::debug!(subscription = %sub.name, records = leaving.len(), to_topic, "records left the subscription");
        }
        let leaving_count = leaving.len() as u64;
        let changed: Vec<SubscriptionRecord> = next
            .iter()
            .filter(|(p, s)| st.partitions.get(p) != Some(s))
            .map(|(p, s)| SubscriptionRecord::Partition {
                name: sub.name.clone(),
                partition: *p,
                state: s.clone(),
            })
            .collect();
        self.write(changed).await?;
        st.partitions = next;
        sub.counters.settled(0, leaving_count);
        Ok(held_back)
    }

    /// Applies `ack` for `consumer`: all ranges or none. Returns the records it applied to
    /// and, for an extend, the new deadline.
    pub async fn acknowledge(
        &self,
        broker: &Broker,
        name: &str,
        consumer: &str,
        ack: &Ack,
    ) -> Result<(u64, i64), BrokerError> {
        validate_consumer(consumer)?;
        let sub = self.get(name)?;
        let topic = broker.topic(&sub.config.topic)?;
        let count = topic.topic.partition_count();
        let mut st = sub.state.lock().await;
        if st.deleted {
            return Err(SubscriptionError::NotFound { name: name.into() }.into());
        }
        let limits = sub.limits();
        let now = now_ms();
        let mut next = st.partitions.clone();
        let expired = stats::expiring(&next, now);
        let mut leaving = Vec::new();
        for (p, ps) in next.iter_mut() {
            leaving.extend(ps.expire(*p, now, &limits));
        }
        let mut applied = 0u64;
        let mut deadline = 0;
        for &(p, first, last) in &ack.ranges {
            if p >= count {
                return Err(rill_storage::StorageError::PartitionNotFound {
                    topic: sub.config.topic.clone(),
                    partition: p,
                    partitions: count,
                }
                .into());
            }
            let ps = next.entry(p).or_default();
            applied += ps.check_held((name, &sub.config.topic, p), consumer, (first, last), now)?;
            let (out, d) = ps.apply(
                p,
                (first, last),
                ack.kind,
                ack.error.as_deref(),
                now,
                &limits,
            );
            leaving.extend(out);
            deadline = deadline.max(d);
        }
        let needed: Vec<u32> = ack.ranges.iter().map(|(p, _, _)| *p).collect();
        self.finish(broker, &sub, &mut st, (next, &needed), leaving)
            .await?;
        drop(st);
        sub.counters.settled(expired, 0);
        sub.counters.acknowledged(ack.kind, applied);
        if matches!(ack.kind, AckKind::Nack { .. }) {
            sub.released.notify_waiters();
        }
        Ok((applied, deadline))
    }
}

/// Notes a failed read of another broker's partition: logged (a pause after a failure
/// quietly), counted; the pass goes on with the other partitions.
fn remote_failed(sub: &Sub, p: u32, e: &BrokerError) {
    // The failure itself was logged where it happened (a pause after it is quiet).
    tracing::debug!(subscription = %sub.name, topic = %sub.config.topic, partition = p, error = %e, "a partition held by another broker is not read in this pass; delivering the others");
}

/// How an acquisition pass takes records.
enum How<'a> {
    /// The first record even when larger than the byte budget (so it is never stuck).
    Loose,
    /// Never past the byte budget (push credits).
    Strict,
    /// Loose, in per-key order.
    Ordered(&'a mut ordered::KeyIndex),
}

/// A record as pushed in offset mode (no lock).
pub fn unlocked(partition: u32, record: FetchedRecord) -> pb::ReceivedRecord {
    pb::ReceivedRecord {
        partition,
        record: Some(record),
        delivery_count: 0,
        lock_deadline_ms: 0,
    }
}
