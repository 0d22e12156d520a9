//! Background tasks: the storage's background work (the periodic flush of `interval`
//! partitions and checkpoints after rolls) and the retention pass. Each loop selects on the
//! shutdown token. Which partition needs what is the storage's decision
//! ([`rill_storage::PartitionLog::background_due`]); this module only drives it, running each
//! partition's work on the blocking pool of its own, so one slow disk holds back no other
//! partition and no async worker.

use std::future::Future;
use std::time::Duration;

use rill_storage::log::FLUSH_TICK_MS;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use crate::state::Broker;

/// Runs `work` at once, then every `period` (and whenever `wake` is notified, if given),
/// until the broker shuts down. A pass that overruns the period delays the next tick rather
/// than bunching the missed ones; shutdown is noticed between passes. Every periodic loop of
/// the broker is this one.
pub(crate) async fn every<F, Fut>(
    broker: &Broker,
    period: Duration,
    wake: Option<&Notify>,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Made anew each pass: a wake sent while `work` ran is kept by the `Notify` as a
        // permit, and taken here.
        let woken = async {
            match wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = broker.shutdown().cancelled() => return,
            _ = tick.tick() => {}
            _ = woken => {}
        }
        work().await;
    }
}

/// Starts the flush and retention tasks on the broker's tracker.
pub fn spawn_background(broker: &Broker) {
    let b = broker.clone();
    broker.tasks().spawn(async move { flush_loop(b).await });
    let b = broker.clone();
    broker.tasks().spawn(async move { retention_loop(b).await });
}

async fn flush_loop(broker: Broker) {
    every(
        &broker,
        Duration::from_millis(FLUSH_TICK_MS),
        None,
        || async {
            for topic in broker.topics() {
                for (_, log) in topic.topic.partitions() {
                    let Ok(log) = log else { continue };
                    // A cheap check on the worker; the work itself on the blocking pool. A
                    // failed sync fences its partition inside the engine, which logs it.
                    if log.background_due() {
                        broker.tasks().spawn_blocking(move || {
                            let _ = log.run_background();
                        });
                    }
                }
            }
        },
    )
    .await;
}

async fn retention_loop(broker: Broker) {
    every(
        &broker,
        broker.config().retention_interval(),
        None,
        || async {
            run_retention(&broker).await;
        },
    )
    .await;
}

/// One retention pass over every partition.
pub async fn run_retention(broker: &Broker) {
    let logs: Vec<_> = broker
        .topics()
        .iter()
        .flat_map(|t| t.topic.partitions().filter_map(|(_, log)| log.ok()))
        .collect();
    let result = tokio::task::spawn_blocking(move || {
        let now = rill_storage::log::now_ms();
        for log in logs {
            if let Err(e) = log.apply_retention(now) {
                tracing::warn!(
                    topic = log.topic(), partition = log.partition(), error = %e,
                    "retention pass failed"
                );
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "retention task failed");
    }
}
