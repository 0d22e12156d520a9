//! Work done while no consumer calls: the sweep that expires locks (dead-lettering records
//! past their attempts), starting the webhook pushers, and compacting `__subscriptions`.

use std::sync::Arc;
use std::time::Duration;

use rill_storage::log::now_ms;

use super::{persist, webhook, Sub, Subscriptions, SWEEP_TICK_MS};
use crate::error::BrokerError;
use crate::state::Broker;

/// How often the compaction task checks `__subscriptions` without being woken: catches a
/// log a new leader loaded grown (its wake comes before it is settled, when it does not
/// write yet).
const COMPACTION_TICK_MS: u64 = 10_000;

impl Subscriptions {
    /// Expires locks of every subscription (dead-lettering records past their attempts), so
    /// that happens while no consumer calls.
    pub async fn sweep(&self, broker: &Broker) {
        if !super::replicated::serves(broker) {
            return;
        }
        let subs: Vec<Arc<Sub>> = self.inner.subs.read().values().cloned().collect();
        let now = now_ms();
        for sub in subs {
            let due = {
                let Ok(st) = sub.state.try_lock() else {
                    continue;
                };
                st.partitions.values().any(|ps| {
                    ps.pending
                        .values()
                        .any(|p| p.lock.as_ref().is_some_and(|l| l.deadline_ms < now))
                })
            };
            if !due {
                continue;
            }
            let Ok(topic) = broker.topic(&sub.config.topic) else {
                continue;
            };
            match self.acquire(broker, &sub, &topic, "-", 0, 0).await {
                Ok(_) => sub.released.notify_waiters(),
                Err(e) => {
                    tracing::warn!(subscription = %sub.name, error = %e, "subscription sweep failed")
                }
            }
        }
    }

    /// Compacts `__subscriptions` if it grew by a segment since its last compaction and this
    /// broker writes it (the single broker, or the settled leader in a cluster); returns
    /// whether it did. The rewrite runs on the blocking pool holding the log, so changes
    /// arriving meanwhile wait for it, but no change's request runs it.
    pub async fn compact_if_due(&self, broker: &Broker) -> Result<bool, BrokerError> {
        if !super::replicated::serves(broker) {
            return Ok(false);
        }
        let log = Arc::clone(&self.inner.log);
        tokio::task::spawn_blocking(move || log.lock().compact_if_due()).await?
    }

    /// Wakes the compaction task (a change left the log due one, or a leader loaded it).
    pub(super) fn wake_compaction(&self) {
        self.inner.compaction.notify_one();
    }
}

/// Runs [`Subscriptions::compact_if_due`] when woken and every [`COMPACTION_TICK_MS`] until
/// the broker shuts down. A failure is logged; the log then waits a segment more.
async fn compaction_loop(broker: Broker, subs: Subscriptions) {
    crate::tasks::every(
        &broker,
        Duration::from_millis(COMPACTION_TICK_MS),
        Some(&subs.inner.compaction),
        || async {
            if let Err(e) = subs.compact_if_due(&broker).await {
                tracing::warn!(error = %e, "{} compaction failed", persist::SUBSCRIPTIONS_TOPIC);
            }
        },
    )
    .await;
}

/// Starts the sweep loop, the compaction loop, and the webhook pusher of every subscription
/// with an endpoint, on the broker's tracker.
pub fn spawn_background(broker: &Broker, subs: &Subscriptions) {
    // In a cluster the leader of `__subscriptions` starts them once it has loaded the state.
    let clustered = crate::internal::replication(broker).is_some();
    let with_push: Vec<Arc<Sub>> = subs
        .inner
        .subs
        .read()
        .values()
        .filter(|s| s.config.push.is_some() && !clustered)
        .cloned()
        .collect();
    for sub in with_push {
        webhook::spawn(broker, subs, &sub);
    }
    let (b, s) = (broker.clone(), subs.clone());
    broker.tasks().spawn(compaction_loop(b, s));
    let b = broker.clone();
    let s = subs.clone();
    broker.tasks().spawn(async move {
        crate::tasks::every(&b, Duration::from_millis(SWEEP_TICK_MS), None, || async {
            s.sweep(&b).await;
            if b.config().metrics_listen.is_some() && b.config().metrics_per_group {
                s.refresh_oldest(&b).await;
            }
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use rill_storage::{Store, StoreOptions};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::subscriptions::records::{StoredConfig, SubscriptionRecord};
    use crate::subscriptions::state::PartitionState;

    /// The smallest accepted `__subscriptions` segment.
    const SEGMENT_BYTES: u64 = 16 << 10;
    /// The longest the background task may take to compact (it is woken at once).
    const DEADLINE: Duration = Duration::from_secs(30);

    fn log_start(broker: &Broker) -> u64 {
        broker
            .store()
            .existing_internal_topic(persist::SUBSCRIPTIONS_TOPIC)
            .expect("the topic")
            .partition(0)
            .expect("its partition")
            .log_start_offset()
    }

    /// The changes a request makes return without compacting, even the one that takes the
    /// log past its threshold (before, that write ran the whole rewrite inline, so its
    /// caller's ack waited for it and the log start had moved when it returned); the
    /// broker's background task then compacts the log and deletes the segments before it.
    #[tokio::test]
    async fn requests_never_compact_and_the_background_task_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreOptions::new(dir.path())).expect("open the store");
        let subs = Subscriptions::open(&store, SEGMENT_BYTES).expect("open");
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let broker = Broker::new(
            store,
            crate::Config::new(dir.path()),
            shutdown.clone(),
            tasks.clone(),
        );
        subs.write(vec![SubscriptionRecord::Created {
            name: "workers".into(),
            config: StoredConfig {
                topic: "jobs".into(),
                ack_deadline_ms: 30_000,
                max_delivery_attempts: 5,
                dead_letter_topic: None,
                max_in_flight_per_partition: 1000,
                from_earliest: true,
                push: None,
            },
        }])
        .await
        .expect("create");
        // Acks one by one until a segment's worth was appended (the first segment sealed).
        let mut floor = 0;
        while !subs.inner.log.lock().compaction_due() {
            floor += 1;
            let mut state = PartitionState::starting_at(floor);
            state.next = floor + 1;
            subs.write(vec![SubscriptionRecord::Partition {
                name: "workers".into(),
                partition: 0,
                state,
            }])
            .await
            .expect("ack");
            assert_eq!(log_start(&broker), 0, "the ack of {floor} compacted");
            assert!(floor < 1_000, "the log never became due a compaction");
        }

        spawn_background(&broker, &subs);
        let until = tokio::time::Instant::now() + DEADLINE;
        while log_start(&broker) == 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "the background task did not compact within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!subs.inner.log.lock().compaction_due());
        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(DEADLINE, tasks.wait())
            .await
            .expect("the background tasks stop at shutdown");
        broker.store().close().expect("close");
        drop((broker, subs));

        // The state replays whole from the compacted log.
        let store = Store::open(StoreOptions::new(dir.path())).expect("reopen");
        let (_log, replayed) = persist::StateLog::open(&store, SEGMENT_BYTES).expect("replay");
        let state: BTreeMap<_, _> = persist::fold(replayed);
        let (_, partitions) = &state["workers"];
        assert_eq!(partitions[&0].next, floor + 1, "the last ack survives");
    }
}
