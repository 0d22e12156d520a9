//! [`Broker`]: the shared state every service uses. A cheap clone around `Arc<Inner>`.
//!
//! It holds the store, the config, the shutdown token and, per partition, a `watch` channel
//! carrying the high watermark: an append sends on it, and waiting fetches wake on it. No
//! polling loop exists anywhere.
//!
//! # One source of truth
//! The store's topic registry alone says which topics exist and which partition handles are
//! live. The broker keeps no registry of its own: every lookup asks the store, and the
//! wake-up channels are attached to the store's [`Topic`] by identity, made on first use.
//! So nothing the store does (a creation or deletion whose caller went away, a deletion that
//! failed and reopened the topic) can leave the broker serving from stale handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use rill_storage::{PartitionLog, StorageError, Store, Topic};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::BrokerError;

/// A topic as the broker serves it: the storage topic plus its wake-up channels.
#[derive(Debug)]
pub struct TopicState {
    /// The storage topic.
    pub topic: Topic,
    /// One high-watermark channel per partition; appends send, fetches wait.
    watches: Vec<watch::Sender<u64>>,
    /// Spreads keyless records over the partitions.
    round_robin: AtomicU32,
    /// Records and bytes produced and fetched, for metrics and DescribeTopic.
    pub counters: crate::metrics::TopicCounters,
}

impl TopicState {
    fn new(topic: Topic) -> Self {
        let watches = (0..topic.partition_count())
            .map(|p| {
                let hwm = topic.partition(p).map_or(0, |log| log.high_watermark());
                watch::channel(hwm).0
            })
            .collect();
        TopicState {
            topic,
            watches,
            round_robin: AtomicU32::new(0),
            counters: crate::metrics::TopicCounters::default(),
        }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        self.topic.name()
    }

    /// Partition `p`'s log (NotFound or Fenced errors name the topic and partition).
    pub fn log(&self, p: u32) -> Result<PartitionLog, BrokerError> {
        Ok(self.topic.partition(p)?)
    }

    /// Checks the record timestamps of `batch`, bound for partition `p`, against the topic's
    /// bounds (`timestamp_after_max_ms`, `timestamp_before_max_ms`) and the broker's clock
    /// `now_ms`. INVALID_ARGUMENT, naming the topic, the partition and the bound, before
    /// anything is written.
    pub fn check_timestamps(&self, p: u32, batch: &[u8], now_ms: i64) -> Result<(), BrokerError> {
        self.topic
            .config()
            .check_batch_timestamps(batch, now_ms)
            .map_err(|source| {
                StorageError::InvalidBatch {
                    topic: self.name().to_string(),
                    partition: p,
                    source,
                }
                .into()
            })
    }

    /// Wakes the fetches waiting on partition `p` with its new high watermark.
    /// Returns true when at least one fetch was waiting.
    pub fn notify(&self, p: u32, high_watermark: u64) -> bool {
        match self.watches.get(p as usize) {
            Some(tx) => {
                tx.send_replace(high_watermark);
                tx.receiver_count() > 0
            }
            None => false,
        }
    }

    /// A receiver that sees the next append to partition `p`.
    pub fn subscribe(&self, p: u32) -> Option<watch::Receiver<u64>> {
        self.watches.get(p as usize).map(watch::Sender::subscribe)
    }

    /// Fetches waiting on partition `p` right now: each holds one receiver of its channel.
    pub fn waiting_fetches(&self, p: u32) -> u32 {
        self.watches.get(p as usize).map_or(0, |tx| {
            u32::try_from(tx.receiver_count()).unwrap_or(u32::MAX)
        })
    }

    /// Wakes every fetch waiting on this topic, so each checks whether its topic still
    /// exists.
    fn wake_all(&self) {
        for tx in &self.watches {
            tx.send_modify(|_| {});
        }
    }

    /// The next partition for a keyless record.
    pub fn next_round_robin(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.topic.partition_count()
    }
}

/// The broker's shared state.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    config: Config,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Topic name → the wake-up state attached to the store's topic of that name. Not a
    /// registry: an entry serves only while its topic is the very one the store holds (see
    /// [`Broker::attach`]). A plain lock: held only to look up, insert or remove, never
    /// across an await.
    attached: RwLock<HashMap<String, Arc<TopicState>>>,
    waiting_fetches: AtomicUsize,
    /// One permit per client connection served; `config.max_connections` of them.
    connections: Arc<Semaphore>,
    /// The security state, installed once at start (absent: every caller may do all).
    security: OnceLock<crate::auth::Security>,
    /// Replicated partitions, set once when the broker runs in a cluster; unset otherwise,
    /// so a single broker's produce path pays one check of an empty cell.
    replication: std::sync::OnceLock<rill_cluster::Replication>,
    /// The producer id registry, installed once at start (absent: InitProducer is
    /// unavailable and idempotent produces are refused).
    producers: OnceLock<crate::producers::ProducerIds>,
    /// The internal state topics' leadership bookkeeping and peer channels.
    internal: crate::internal::Internal,
}

/// Counts a waiting fetch for as long as it lives.
#[derive(Debug)]
pub struct WaiterSlot {
    broker: Broker,
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.broker
            .inner
            .waiting_fetches
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Broker {
    /// Wraps an opened store.
    pub fn new(
        store: Store,
        config: Config,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(
            config.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        Broker {
            inner: Arc::new(Inner {
                store,
                config,
                shutdown,
                tasks,
                attached: RwLock::new(HashMap::new()),
                waiting_fetches: AtomicUsize::new(0),
                connections,
                security: OnceLock::new(),
                replication: std::sync::OnceLock::new(),
                producers: OnceLock::new(),
                internal: crate::internal::Internal::default(),
            }),
        }
    }

    /// The storage engine.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The running config.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Cancelled when the broker shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Tracks the broker's background tasks.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// The state of topic `name` as the store has it now, or NotFound.
    pub fn topic(&self, name: &str) -> Result<Arc<TopicState>, BrokerError> {
        rill_storage::config::validate_name("topic", name)?;
        let topic = self.inner.store.topic(name)?;
        Ok(self.attach(topic))
    }

    /// Every topic the store has, sorted by name. Also forgets the wake-up state of topics
    /// the store no longer has.
    pub fn topics(&self) -> Vec<Arc<TopicState>> {
        let all: Vec<_> = self
            .inner
            .store
            .topics()
            .into_iter()
            .map(|t| self.attach(t))
            .collect();
        if self.inner.attached.read().len() > all.len() {
            let mut stale = Vec::new();
            self.inner.attached.write().retain(|_, state| {
                let live = all.iter().any(|t| Arc::ptr_eq(t, state));
                if !live {
                    stale.push(Arc::clone(state));
                }
                live
            });
            // Their waiting fetches find the topic gone.
            for state in stale {
                state.wake_all();
            }
        }
        all
    }

    /// The serving state of `topic`, a topic of the store: the one already attached to it,
    /// or a new one. A state left from an earlier topic of the same name is replaced, and
    /// its waiting fetches are woken so they find their topic gone.
    pub fn attach(&self, topic: Topic) -> Arc<TopicState> {
        if let Some(state) = self.inner.attached.read().get(topic.name()) {
            if state.topic.is_same(&topic) {
                return Arc::clone(state);
            }
        }
        let mut attached = self.inner.attached.write();
        // Checked again: another lookup may have attached it meanwhile.
        if let Some(state) = attached.get(topic.name()) {
            if state.topic.is_same(&topic) {
                return Arc::clone(state);
            }
        }
        let state = Arc::new(TopicState::new(topic));
        if let Some(stale) = attached.insert(state.name().to_string(), Arc::clone(&state)) {
            stale.wake_all();
        }
        state
    }

    /// Called after the store deleted topic `name`: forgets its wake-up state and wakes its
    /// waiting fetches, which then find the topic gone. Does nothing while the store still
    /// has the topic.
    pub fn forget_deleted(&self, name: &str) {
        let stale = {
            let mut attached = self.inner.attached.write();
            let live = attached.get(name).is_some_and(|state| {
                self.inner
                    .store
                    .topic(name)
                    .is_ok_and(|t| t.is_same(&state.topic))
            });
            if live {
                None
            } else {
                attached.remove(name)
            }
        };
        if let Some(stale) = stale {
            stale.wake_all();
        }
    }

    /// Takes a waiting-fetch slot, or fails when the limit is reached.
    pub fn waiter_slot(&self) -> Result<WaiterSlot, BrokerError> {
        let limit = self.inner.config.max_waiting_fetches;
        let now = self.inner.waiting_fetches.fetch_add(1, Ordering::AcqRel);
        let slot = WaiterSlot {
            broker: self.clone(),
        };
        if now >= limit {
            drop(slot);
            return Err(BrokerError::TooManyWaiters { limit });
        }
        Ok(slot)
    }

    /// A permit to serve one more client connection, held as long as it is served, or
    /// `None` when `max_connections` are served already.
    pub fn connection_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inner.connections).try_acquire_owned().ok()
    }

    /// Client connections served right now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .config
            .max_connections
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.inner.connections.available_permits())
    }

    /// Installs the producer id registry (once, at start).
    pub fn set_producers(&self, producers: crate::producers::ProducerIds) {
        let _ = self.inner.producers.set(producers);
    }

    /// The producer id registry, once installed.
    pub fn producers(&self) -> Result<&crate::producers::ProducerIds, BrokerError> {
        self.inner.producers.get().ok_or_else(|| {
            BrokerError::NotSupported("idempotent producers are not set up on this broker".into())
        })
    }

    /// Installs the security state (once; later calls change nothing).
    pub fn set_security(&self, security: crate::auth::Security) {
        let _ = self.inner.security.set(security);
    }

    /// The security state, when installed.
    pub fn security(&self) -> Option<&crate::auth::Security> {
        self.inner.security.get()
    }

    /// Fetches waiting right now.
    pub fn waiting_fetches(&self) -> usize {
        self.inner.waiting_fetches.load(Ordering::Acquire)
    }

    /// Replication, when the broker runs in a cluster.
    pub fn replication(&self) -> Option<&rill_cluster::Replication> {
        self.inner.replication.get()
    }

    /// Sets the broker's replication (once, at start in a cluster).
    pub fn set_replication(&self, replication: rill_cluster::Replication) {
        let _ = self.inner.replication.set(replication);
    }

    /// The internal state topics' bookkeeping (see [`crate::internal`]).
    pub fn internal(&self) -> &crate::internal::Internal {
        &self.inner.internal
    }

    /// Fails with UNAVAILABLE once shutdown has begun.
    pub fn check_running(&self) -> Result<(), BrokerError> {
        if self.inner.shutdown.is_cancelled() {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use rill_storage::{StoreOptions, TopicConfig};

    use super::*;

    /// Topics created or deleted in the store, by whatever caller (one that went away before
    /// updating the broker, say), are what the broker serves: it has no registry to drift.
    #[test]
    fn the_broker_serves_what_the_store_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreOptions::new(dir.path())).expect("open");
        let broker = Broker::new(
            store.clone(),
            Config::new(dir.path()),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        assert!(broker.topic("t").is_err());
        store
            .create_topic("t", TopicConfig::default())
            .expect("create");
        let first = broker.topic("t").expect("seen without add");
        assert!(Arc::ptr_eq(&first, &broker.topic("t").expect("again")));
        assert_eq!(broker.topics().len(), 1);

        let mut woken = first.subscribe(0).expect("partition 0");
        woken.borrow_and_update();
        store.delete_topic("t").expect("delete");
        assert!(broker.topic("t").is_err(), "gone without remove");
        assert!(broker.topics().is_empty());
        assert!(woken.has_changed().unwrap_or(true), "waiters woken");

        // A new topic of the same name gets new wake-up channels and live partitions.
        store
            .create_topic("t", TopicConfig::default())
            .expect("recreate");
        let second = broker.topic("t").expect("the new topic");
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.log(0).expect("log").high_watermark(), 0);
    }
}
