//! Work done while no consumer calls: the sweep that expires locks (dead-lettering records
//! past their attempts), starting the webhook pushers, and compacting `__subscriptions`.

use std::sync::Arc;
use std::time::Duration;

use rill_storage::log::now_ms;
use tokio::time::MissedTickBehavior;

use super::{persist, webhook, Sub, Subscriptions, SWEEP_TICK_MS};
use crate::error::BrokerError;
use crate::state::Broker;

/// How often the compaction task checks `__subscriptions` without being woken: catches a
/// log a new leader loaded before it was settled, and a back-off after a failure.
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
}

impl Subscriptions {
    /// Compacts `__subscriptions` if it grew by a segment since its last compaction and this
    /// broker writes it (the single broker, or the settled leader in a cluster); returns
    /// whether it did. The rewrite runs on the blocking pool holding the log, so changes
    /// arriving meanwhile wait for it, but no change's request runs it.
    pub async fn compact_if_due(&self, broker: &Broker) -> Result<bool, BrokerError> {
        if !super::replicated::serves(broker) {
            return Ok(false);
        }
        let log = std::sync::Arc::clone(&self.inner.log);
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
    let mut tick = tokio::time::interval(Duration::from_millis(COMPACTION_TICK_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = broker.shutdown().cancelled() => return,
            _ = tick.tick() => {}
            _ = subs.inner.compaction.notified() => {}
        }
        if let Err(e) = subs.compact_if_due(&broker).await {
            tracing::warn!(error = %e, "{} compaction failed", persist::SUBSCRIPTIONS_TOPIC);
        }
    }
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
        let mut tick = tokio::time::interval(Duration::from_millis(SWEEP_TICK_MS));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = b.shutdown().cancelled() => return,
                _ = tick.tick() => {}
            }
            s.sweep(&b).await;
            if b.config().metrics_listen.is_some() && b.config().metrics_per_group {
                s.refresh_oldest(&b).await;
            }
        }
    });
}
