//! Requests by RPC and status code, and latency histograms by RPC: one tower layer around
//! the whole gRPC server, so no service records anything itself.
//!
//! A call is recorded when its response headers are ready: for a unary call that is when the
//! handler has finished (its latency), for a streaming call when the stream was set up. The
//! status is the `grpc-status` of a trailers-only response (every error a handler returns),
//! otherwise OK. A call whose client went away before the response is not recorded, so the
//! request counts and the histogram counts always agree.
//!
//! Cardinality is bounded: the `rpc` label takes only the methods the broker serves (read
//! from the descriptor sets at start); any other path a client sends is `rpc="unknown"`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message;

/// The request latency buckets, in seconds: from 100 µs (an in-memory produce) to 30 s (the
/// longest long-poll fetch by default).
const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// The gRPC status codes by number, as the `code` label spells them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Methods served beside those of the Rill descriptor set (health and reflection).
const EXTRA_METHODS: [&str; 4] = [
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The label of paths the broker does not serve.
const UNKNOWN_RPC: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCodeLabels {
    rpc: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
}

/// One RPC's handles: its latency histogram and, made on first use, a counter per code.
#[derive(Debug)]
struct RpcHandles {
    name: String,
    latency: Histogram,
    by_code: [OnceLock<Counter>; CODE_NAMES.len()],
}

/// The request metrics, shared by every connection's service.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RpcCodeLabels, Counter>,
    /// `/package.Service/Method` → index in `rpcs`.
    by_path: HashMap<String, usize>,
    /// One per served method, then the one for unknown paths.
    rpcs: Vec<RpcHandles>,
}

impl RequestMetrics {
    /// Registers `rill_requests_total` and `rill_request_duration_seconds` in `registry`,
    /// with one histogram per method the broker serves.
    pub fn register(registry: &mut Registry) -> Arc<RequestMetrics> {
        let requests = Family::<RpcCodeLabels, Counter>::default();
        let latency = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS_SECONDS)) as fn() -> Histogram,
        );
        let handles = |name: &str| RpcHandles {
            name: name.to_string(),
            latency: latency
                .get_or_create(&RpcLabels {
                    rpc: name.to_string(),
                })
                .clone(),
            by_code: Default::default(),
        };
        let methods = served_methods();
        let by_path = methods
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("/{m}"), i))
            .collect();
        let mut rpcs: Vec<RpcHandles> = methods.iter().map(|m| handles(m)).collect();
        rpcs.push(handles(UNKNOWN_RPC));
        registry.register(
            "rill_requests",
            "gRPC calls answered, by method and status code",
            requests.clone(),
        );
        registry.register(
            "rill_request_duration_seconds",
            "Time to answer a gRPC call (to the response headers; for streams, their setup)",
            latency,
        );
        Arc::new(RequestMetrics {
            requests,
            by_path,
            rpcs,
        })
    }

    /// The index of `path`'s handles (the last, "unknown", for a path not served).
    fn index(&self, path: &str) -> usize {
        self.by_path
            .get(path)
            .copied()
            .unwrap_or(self.rpcs.len() - 1)
    }

    fn record(&self, index: usize, code: usize, started: Instant) {
        let Some(rpc) = self.rpcs.get(index) else {
            return;
        };
        rpc.latency.observe(started.elapsed().as_secs_f64());
        let code = code.min(CODE_NAMES.len() - 1);
        rpc.by_code[code]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RpcCodeLabels {
                        rpc: rpc.name.clone(),
                        code: CODE_NAMES[code].to_string(),
                    })
                    .clone()
            })
            .inc();
    }
}

/// `package.Service/Method` of every method the broker serves.
fn served_methods() -> Vec<String> {
    let mut methods: Vec<String> = EXTRA_METHODS.iter().map(|m| m.to_string()).collect();
    // The descriptor set is built into the binary; failing to decode it is a build defect,
    // and the only effect is that Rill calls are labelled "unknown".
    match prost_types::FileDescriptorSet::decode(rill_proto::FILE_DESCRIPTOR_SET) {
        Ok(set) => {
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        methods.push(format!(
                            "{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the built-in descriptor set"),
    }
    methods
}

/// The tower layer that records every call (see the module docs).
#[derive(Debug, Clone)]
pub struct RequestMetricsLayer {
    metrics: Option<Arc<RequestMetrics>>,
}

impl RequestMetricsLayer {
    /// A layer recording into `metrics`, or passing calls through untouched when `None`
    /// (metrics off), so the server has one type either way.
    pub fn new(metrics: Option<Arc<RequestMetrics>>) -> Self {
        RequestMetricsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RequestMetricsLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct RequestMetricsService<S> {
    inner: S,
    metrics: Option<Arc<RequestMetrics>>,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RequestMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let metrics = self.metrics.as_ref().map(|m| {
            let index = m.index(request.uri().path());
            (Arc::clone(m), index, Instant::now())
        });
        RecordedCall {
            inner: self.inner.call(request),
            metrics,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call in progress; records it when its response is ready.
    pub struct RecordedCall<F> {
        #[pin]
        inner: F,
        metrics: Option<(Arc<RequestMetrics>, usize, Instant)>,
    }
}

impl<F, RB, E> Future for RecordedCall<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some((metrics, index, started)) = this.metrics.take() {
            let code = match &out {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0),
                // The transport failed the call: counted as UNKNOWN.
                Err(_) => 2,
            };
            metrics.record(index, code, started);
        }
        Poll::Ready(out)
    }
}
