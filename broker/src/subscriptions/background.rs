//! Work done while no consumer calls: the sweep that expires locks (dead-lettering records
//! past their attempts), and starting the webhook pushers.

use std::sync::Arc;
use std::time::Duration;

use rill_storage::log::now_ms;
use tokio::time::MissedTickBehavior;

use super::{webhook, Sub, Subscriptions, SWEEP_TICK_MS};
use crate::state::Broker;

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

/// Starts the sweep loop, and the webhook pusher of every subscription with an endpoint, on
/// the broker's tracker.
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
