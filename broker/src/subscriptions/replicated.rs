//! `__subscriptions` on replicated storage (see [`crate::internal`]): in a cluster every
//! change is a Raft commit made by the topic's leader, which alone serves subscriptions;
//! a broker that becomes the leader rebuilds them from its replica before it serves.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use rill_storage::Store;

use super::persist::{self, StateLog};
use super::{stats, webhook, Sub, SubState, Subscriptions};
use crate::error::BrokerError;
use crate::state::Broker;

impl Subscriptions {
    /// In a cluster whose internal topics are replicated: every later change is a Raft
    /// commit (see [`crate::internal`]). Nothing on a single broker.
    pub fn replicate(&self, broker: &Broker) {
        if crate::internal::replication(broker).is_some() {
            self.inner.log.lock().replicate_through(broker.clone());
        }
    }

    /// Rebuilds every subscription from this broker's replica of `__subscriptions`, for a
    /// broker that just became its leader (its replica then holds every committed change):
    /// the subscriptions held before end (their push streams and webhook pushers stop,
    /// locks taken before are dropped, so those records are delivered again), and the
    /// webhook pushers of the rebuilt ones start.
    pub async fn reload(&self, broker: &Broker) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        let store = broker.store().clone();
        let segment_bytes = broker.config().subscriptions_segment_bytes;
        let (mut log, subs) =
            tokio::task::spawn_blocking(move || load(&store, segment_bytes)).await??;
        log.replicate_through(broker.clone());
        let current = Arc::clone(&self.inner.log);
        // Waits for a write in progress, on the blocking pool.
        tokio::task::spawn_blocking(move || *current.lock() = log).await?;
        let old: Vec<Arc<Sub>> = {
            let mut map = self.inner.subs.write();
            let old = map.values().cloned().collect();
            *map = subs;
            old
        };
        for sub in old {
            sub.state.lock().await.deleted = true;
            sub.released.notify_waiters();
        }
        let with_push: Vec<Arc<Sub>> = self
            .inner
            .subs
            .read()
            .values()
            .filter(|s| s.config.push.is_some())
            .cloned()
            .collect();
        for sub in with_push {
            webhook::spawn(broker, self, &sub);
        }
        // The log may have grown under the previous leader: its growth was read from the
        // log above. The compaction task acts once this broker is settled (at the latest its
        // next tick).
        self.wake_compaction();
        Ok(())
    }
}

/// Whether this broker serves subscriptions: always on a single broker; in a cluster, when
/// it is the settled leader of `__subscriptions`.
pub fn serves(broker: &Broker) -> bool {
    matches!(
        crate::internal::route(broker, persist::SUBSCRIPTIONS_TOPIC, 0),
        Ok(crate::internal::Route::Here)
    )
}

/// Keeps `subs` served by the leader of `__subscriptions` in a cluster: changes go through
/// Raft, a broker that becomes the leader reloads the state (see
/// [`Subscriptions::reload`]), and every replica tails its log for compaction markers
/// ([`tail`]). Nothing on a single broker.
pub fn follow(broker: &Broker, subs: &Subscriptions) {
    subs.replicate(broker);
    let (b, s) = (broker.clone(), subs.clone());
    // Where this replica's tail reads next; 0 at start, so a restarted replica also acts on
    // a marker it applied before it stopped.
    let (tail_broker, read_from) = (broker.clone(), Arc::new(parking_lot::Mutex::new(0u64)));
    crate::internal::follow(
        broker,
        persist::SUBSCRIPTIONS_TOPIC,
        1,
        move |_| {
            let (b, from) = (tail_broker.clone(), Arc::clone(&read_from));
            async move { tail(&b, from).await }
        },
        move |_| {
            let (b, s) = (b.clone(), s.clone());
            async move { s.reload(&b).await }
        },
    );
}

/// Acts on the compaction markers this replica's log received since `from` (see
/// [`persist::apply_markers`]): every replica, the leader too, deletes its own segments
/// before a complete rewrite as it applies the rewrite's marker. A failure is logged and
/// the next apply reads again from the same offset.
async fn tail(broker: &Broker, from: Arc<parking_lot::Mutex<u64>>) {
    let store = broker.store().clone();
    let read = tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
        let Some(topic) = store.existing_internal_topic(persist::SUBSCRIPTIONS_TOPIC) else {
            return Ok(());
        };
        let log = topic.partition(0)?;
        // Only this task reads and moves it; the lock is never held across an await.
        let mut from = from.lock();
        *from = persist::apply_markers(&log, *from)?;
        Ok(())
    })
    .await
    .map_err(BrokerError::from)
    .and_then(|r| r);
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read {} for compaction markers", persist::SUBSCRIPTIONS_TOPIC);
    }
}

/// Replays `__subscriptions` into every subscription's state, with the locks held before
/// dropped (`segment_bytes`: see [`StateLog::open`]). Blocking.
pub(super) fn load(
    store: &Store,
    segment_bytes: u64,
) -> Result<(StateLog, BTreeMap<String, Arc<Sub>>), BrokerError> {
    let (log, replayed) = StateLog::open(store, segment_bytes)?;
    let count = replayed.len();
    let subs: BTreeMap<String, Arc<Sub>> = persist::fold(replayed)
        .into_iter()
        .map(|(name, (config, mut partitions))| {
            for p in partitions.values_mut() {
                p.drop_locks();
            }
            let sub = Sub {
                name: name.clone(),
                config,
                state: tokio::sync::Mutex::new(SubState {
                    partitions,
                    deleted: false,
                }),
                released: tokio::sync::Notify::new(),
                rotation: AtomicU32::new(0),
                counters: stats::Counters::default(),
                remotes: Default::default(),
            };
            (name, Arc::new(sub))
        })
        .collect();
    tracing::info!(
        records = count,
        subscriptions = subs.len(),
        "subscription state loaded from {}",
        persist::SUBSCRIPTIONS_TOPIC
    );
    Ok((log, subs))
}
