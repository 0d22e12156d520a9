//! Prometheus metrics: what the broker exports and the listener that serves them.
//!
//! - [`requests`]: the tower layer counting gRPC calls by method and status code, with a
//!   latency histogram per method.
//! - [`counters`]: per-topic records and bytes produced and fetched, plain atomics bumped on
//!   the hot path.
//! - [`collector`]: everything else, computed at scrape time from the broker's state.
//! - [`subscriptions`]: the per-subscription series, computed at scrape time.
//! - [`process`]: resident memory and open files from `/proc/self`.
//! - [`http`]: `GET /metrics` on its own listener (`metrics_listen`), stopped by the
//!   broker's shutdown token.
//!
//! Every series is described in `docs/METRICS.md`. The text is encoded by
//! `prometheus-client`: OpenMetrics when the scraper asks for it, the Prometheus text format
//! otherwise.

pub mod collector;
pub mod counters;
pub mod http;
pub mod process;
pub mod requests;
pub mod subscriptions;

use std::sync::Arc;

use prometheus_client::registry::Registry;

pub use counters::{TopicCounters, TopicTraffic};
pub use requests::{RequestMetrics, RequestMetricsLayer};

use crate::state::Broker;

/// The broker's metrics registry: the request metrics and the scrape-time collector.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Arc<RequestMetrics>,
}

impl Metrics {
    /// The registry for `broker` and, when given, its groups' membership and its queue
    /// subscriptions.
    pub fn new(
        broker: &Broker,
        coordinator: Option<crate::groups::Coordinator>,
        subscriptions: Option<crate::subscriptions::Subscriptions>,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = RequestMetrics::register(&mut registry);
        registry.register_collector(Box::new(collector::BrokerCollector::new(
            broker.clone(),
            coordinator,
        )));
        if let Some(subscriptions) = subscriptions {
            registry.register_collector(Box::new(subscriptions::SubscriptionCollector::new(
                broker.clone(),
                subscriptions,
            )));
        }
        Metrics {
            registry: Arc::new(registry),
            requests,
        }
    }

    /// The layer that records gRPC calls into this registry.
    pub fn layer(&self) -> RequestMetricsLayer {
        RequestMetricsLayer::new(Some(Arc::clone(&self.requests)))
    }

    /// The exposition text: OpenMetrics (with its `# EOF`) when `openmetrics`, the Prometheus
    /// text format otherwise. Reads `/proc/self`: call from a blocking thread.
    pub fn render(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}
