//! The metrics listener: `GET /metrics` over HTTP/1, on its own address, so scrapes never
//! compete with gRPC connections for `max_connections`. Bound at start (a busy port fails
//! the start with a clear error); stopped by the broker's shutdown token and tracked by its
//! task tracker.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::state::Broker;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics listener at `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics listener on {addr} (metrics_listen / --metrics-listen)")
    })
}

/// Serves `/metrics` on `listener` until the broker shuts down, as a tracked task.
pub fn spawn(listener: TcpListener, metrics: Metrics, broker: &Broker) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    let shutdown = broker.shutdown().clone();
    broker.tasks().spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
}

/// Renders the registry on a blocking thread (it reads `/proc/self`, and a broker with very
/// many partitions takes a while to walk).
async fn scrape(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    headers: HeaderMap,
) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let rendered = tokio::task::spawn_blocking(move || metrics.render(openmetrics)).await;
    match rendered {
        Ok(Ok(body)) => {
            let content_type = if openmetrics {
                OPENMETRICS
            } else {
                PROMETHEUS_TEXT
            };
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(Err(_)) | Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}
