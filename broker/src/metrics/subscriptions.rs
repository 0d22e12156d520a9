//! The per-subscription series, computed at scrape time from [`Subscriptions::figures`]
//! (memory only: no disk read, no waiting on a subscription's lock).
//!
//! The count of subscriptions is always exported; the per-subscription series follow the
//! per-group switch ([`crate::Config::metrics_per_group`]), since subscriptions are the other
//! kind of consumer group. So do the group push streams' remote read failures: by group
//! with the switch on, one summed series with it off. A subscription busy at the scrape's instant has no backlog or
//! in-flight sample in that scrape (its counters are always there).

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::state::Broker;
use crate::subscriptions::Subscriptions;

/// Reads every subscription at each scrape.
#[derive(Debug)]
pub struct SubscriptionCollector {
    broker: Broker,
    subscriptions: Subscriptions,
}

impl SubscriptionCollector {
    /// A collector over `subscriptions` of `broker`.
    pub fn new(broker: Broker, subscriptions: Subscriptions) -> Self {
        SubscriptionCollector {
            broker,
            subscriptions,
        }
    }
}

impl Collector for SubscriptionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let figures = self.subscriptions.figures(&self.broker);
        {
            let metric = encoder.encode_descriptor(
                "rill_subscriptions",
                "Queue subscriptions",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(figures.len() as u64).encode(metric)?;
        }
        let per_group = self.broker.config().metrics_per_group;
        {
            let mut metric = encoder.encode_descriptor(
                "rill_group_push_remote_read_failures",
                "Reads of a partition held by another broker, by a consumer group's push stream, that failed after their retries, by group (one series, the sum, without per-group metrics)",
                None,
                MetricType::Counter,
            )?;
            let by_group = self.subscriptions.group_push_failures().by_group();
            if per_group {
                for (group, count) in by_group {
                    ConstCounter::new(count).encode(metric.encode_family(&[("group", group)])?)?;
                }
            } else {
                // One series, so the count stays visible with the group names left out.
                let total: u64 = by_group.iter().map(|(_, c)| c).sum();
                ConstCounter::new(total).encode(metric)?;
            }
        }
        if !per_group {
            return Ok(());
        }
        let label = |name: &str| [("subscription", name.to_string())];
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_backlog_records",
                "Records not done (acknowledged or dead-lettered) up to the high watermark, by subscription",
                None,
                MetricType::Gauge,
            )?;
            for f in &figures {
                if let Some((backlog, _)) = f.backlog_and_in_flight {
                    ConstGauge::new(backlog).encode(metric.encode_family(&label(&f.name))?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_in_flight_records",
                "Records locked to a consumer now, by subscription",
                None,
                MetricType::Gauge,
            )?;
            for f in &figures {
                if let Some((_, in_flight)) = f.backlog_and_in_flight {
                    ConstGauge::new(in_flight).encode(metric.encode_family(&label(&f.name))?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_oldest_unacked_age_seconds",
                "Age of the oldest record not done (from its timestamp), 0 with none, by subscription",
                None,
                MetricType::Gauge,
            )?;
            for f in &figures {
                if let Some(ms) = f.oldest_unacked_age_ms {
                    let seconds = ms as f64 / 1000.0;
                    ConstGauge::new(seconds).encode(metric.encode_family(&label(&f.name))?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_deliveries",
                "Delivered records by how their delivery ended, by subscription and outcome",
                None,
                MetricType::Counter,
            )?;
            for f in &figures {
                for (outcome, count) in f.outcomes.by_outcome() {
                    let labels = [
                        ("subscription", f.name.clone()),
                        ("outcome", outcome.to_string()),
                    ];
                    ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_dead_lettered",
                "Records that left a subscription without an ack (dead-letter topic or archive), by subscription",
                None,
                MetricType::Counter,
            )?;
            for f in &figures {
                ConstCounter::new(f.outcomes.dead_lettered)
                    .encode(metric.encode_family(&label(&f.name))?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "rill_subscription_remote_read_failures",
                "Calls to the broker holding a partition of the topic (or the dead-letter topic) that failed after their retries, by subscription",
                None,
                MetricType::Counter,
            )?;
            for f in &figures {
                ConstCounter::new(f.remote_failures)
                    .encode(metric.encode_family(&label(&f.name))?)?;
            }
        }
        Ok(())
    }
}
