//! Background tasks: the periodic flush of `interval` topics, checkpoints of every partition
//! (syncing segments sealed since the last one, off the append path), and the retention pass. Each
//! loop selects on the shutdown token, and runs its blocking storage work on the blocking
//! pool so the runtime's workers never wait on a disk.

use std::collections::HashMap;
use std::time::Duration;

use rill_storage::FlushPolicy;
use tokio::time::{Instant, MissedTickBehavior};

use crate::state::Broker;

/// How often the flusher wakes to look for `interval` partitions that are due.
const FLUSH_TICK_MS: u64 = 50;

/// Starts the flush and retention tasks on the broker's tracker.
pub fn spawn_background(broker: &Broker) {
    let b = broker.clone();
    broker.tasks().spawn(async move { flush_loop(b).await });
    let b = broker.clone();
    broker.tasks().spawn(async move { retention_loop(b).await });
}

async fn flush_loop(broker: Broker) {
    let mut tick = tokio::time::interval(Duration::from_millis(FLUSH_TICK_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // When each `interval` topic was last flushed. Deleted topics are dropped from it as
    // they disappear from the broker's list.
    let mut last_flush: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = broker.shutdown().cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let topics = broker.topics();
        last_flush.retain(|name, _| topics.iter().any(|t| t.name() == name));
        // Partitions whose `interval` flush is due get a full sync; every other partition
        // gets a checkpoint, which syncs only segments sealed since the last one (a no-op
        // without a roll) so crash recovery stays short whatever the flush policy.
        let mut flush = Vec::new();
        let mut checkpoint = Vec::new();
        for topic in &topics {
            let due = match topic.topic.config().flush {
                FlushPolicy::IntervalMs(ms) => {
                    let last = last_flush.entry(topic.name().to_string()).or_insert(now);
                    let due = now.duration_since(*last) >= Duration::from_millis(ms);
                    if due {
                        *last = now;
                    }
                    due
                }
                FlushPolicy::Always | FlushPolicy::Never => false,
            };
            let logs = topic.topic.partitions().filter_map(|(_, log)| log.ok());
            if due {
                flush.extend(logs);
            } else {
                checkpoint.extend(logs);
            }
        }
        let result = tokio::task::spawn_blocking(move || {
            // A failed sync fences its partition inside the engine, which logs it; the
            // flusher goes on with the others.
            for log in flush {
                let _ = log.flush();
            }
            for log in checkpoint {
                let _ = log.checkpoint();
            }
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "flush task failed");
        }
    }
}

async fn retention_loop(broker: Broker) {
    let mut tick = tokio::time::interval(broker.config().retention_interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = broker.shutdown().cancelled() => return,
            _ = tick.tick() => {}
        }
        run_retention(&broker).await;
    }
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
