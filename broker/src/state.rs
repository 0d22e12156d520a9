//! [`Broker`]: the shared state every service uses. A cheap clone around `Arc<Inner>`.
//!
//! It holds the store, the config, the shutdown token and, per partition, a `watch` channel
//! carrying the high watermark: an append sends on it, and waiting fetches wake on it. No
//! polling loop exists anywhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rill_storage::{PartitionLog, StorageError, Store, Topic};
use tokio::sync::watch;
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
    /// Topic name → state. A plain lock: held only to look up, insert or remove, never
    /// across an await.
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    waiting_fetches: AtomicUsize,
    /// Replicated partitions, set once when the broker runs in a cluster; unset otherwise,
    /// so a single broker's produce path pays one check of an empty cell.
    replication: std::sync::OnceLock<rill_cluster::Replication>,
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
        let topics = store
            .topics()
            .into_iter()
            .map(|t| (t.name().to_string(), Arc::new(TopicState::new(t))))
            .collect();
        Broker {
            inner: Arc::new(Inner {
                store,
                config,
                shutdown,
                tasks,
                topics: RwLock::new(topics),
                waiting_fetches: AtomicUsize::new(0),
                replication: std::sync::OnceLock::new(),
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

    /// The state of topic `name`, or NotFound.
    pub fn topic(&self, name: &str) -> Result<Arc<TopicState>, BrokerError> {
        rill_storage::config::validate_name("topic", name)?;
        self.inner.topics.read().get(name).cloned().ok_or_else(|| {
            StorageError::TopicNotFound {
                topic: name.to_string(),
            }
            .into()
        })
    }

    /// Every topic, sorted by name.
    pub fn topics(&self) -> Vec<Arc<TopicState>> {
        let mut all: Vec<_> = self.inner.topics.read().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Registers a topic just created in the store.
    pub fn add_topic(&self, topic: Topic) -> Arc<TopicState> {
        let state = Arc::new(TopicState::new(topic));
        self.inner
            .topics
            .write()
            .insert(state.name().to_string(), Arc::clone(&state));
        state
    }

    /// Forgets a topic. Its watch senders drop, which wakes its waiting fetches; they then
    /// find the topic gone.
    pub fn remove_topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.inner.topics.write().remove(name)
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

    /// Fails with UNAVAILABLE once shutdown has begun.
    pub fn check_running(&self) -> Result<(), BrokerError> {
        if self.inner.shutdown.is_cancelled() {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}
