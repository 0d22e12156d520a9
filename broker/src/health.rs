//! The gRPC health service's states: NOT_SERVING while the store is still opening
//! (recovering partitions after a crash can take a while) and once shutdown begins, SERVING
//! in between; for the whole server (`""`) and for each service. In a cluster, the Admin
//! service also reports NOT_SERVING while this broker sees no controller quorum (topics
//! cannot be created or deleted then), checked every [`QUORUM_CHECK_INTERVAL`].
//!
//! While the store opens, the gRPC port already answers health checks, so a probe on a fixed
//! port sees NOT_SERVING rather than a refused connection; every other call is answered
//! UNAVAILABLE ("starting"), which clients retry like a refused connection. When the store
//! is open, that health-only server hands the listener to the full server: its connections
//! are told to go away (GOAWAY) and clients reconnect to the full server.

use std::time::Duration;

use anyhow::{Context, Result};
use rill_proto::v1::admin_server::AdminServer;
use rill_proto::v1::groups_server::GroupsServer;
use rill_proto::v1::log_server::LogServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::services::{AdminService, GroupsService, LogService};

/// How long the health-only server's connections get to go away before they are dropped.
const HANDOVER_GRACE: Duration = Duration::from_secs(1);

/// How often a cluster member checks its controller quorum for the Admin service's state.
pub const QUORUM_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The health reporter and the service it feeds.
#[derive(Clone)]
pub struct Health {
    /// Sets the states.
    pub reporter: HealthReporter,
    /// The `grpc.health.v1.Health` service.
    pub service: HealthServer<HealthService>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Health")
    }
}

impl Health {
    /// A health service with the whole server and every service NOT_SERVING.
    pub async fn not_serving() -> Health {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let health = Health { reporter, service };
        health.set_all(ServingStatus::NotServing).await;
        health
    }

    /// Sets the whole server (`""`) and every Rill service to `status`.
    pub async fn set_all(&self, status: ServingStatus) {
        let r = &self.reporter;
        r.set_service_status("", status).await;
        r.set_service_status(<LogServer<LogService> as NamedService>::NAME, status)
            .await;
        r.set_service_status(<GroupsServer<GroupsService> as NamedService>::NAME, status)
            .await;
        r.set_service_status(<AdminServer<AdminService> as NamedService>::NAME, status)
            .await;
    }
}

/// Keeps the Admin service's state in step with the controller quorum until shutdown: SERVING
/// with a quorum, NOT_SERVING without. The whole server and the other services are left
/// alone (produce and fetch of partitions with a leader go on without the controller).
pub fn watch_controller_quorum(
    health: &Health,
    replication: rill_cluster::Replication,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
    let reporter = health.reporter.clone();
    tasks.spawn(async move {
        let admin = <AdminServer<AdminService> as NamedService>::NAME;
        let mut serving = None;
        loop {
            let quorum = replication.controller_has_quorum();
            // Not after shutdown began: everything says NOT_SERVING then.
            if serving != Some(quorum) && !shutdown.is_cancelled() {
                let status = if quorum {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status(admin, status).await;
                if serving.is_some() {
                    tracing::info!(
                        quorum,
                        "the controller quorum changed; admin health follows"
                    );
                }
                serving = Some(quorum);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(QUORUM_CHECK_INTERVAL) => {}
            }
        }
    });
}

/// The health-only server that answers on the gRPC port while the store opens.
#[derive(Debug)]
pub struct Recovering {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Recovering {
    /// Serves `health` alone on a second handle of `listener`.
    pub fn serve(listener: &TcpListener, health: &Health) -> Result<Recovering> {
        let handle = second_handle(listener)?;
        let stop = CancellationToken::new();
        let service = health.service.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .layer(tower_layer::layer_fn(|inner| Starting { inner }))
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(handle),
                    stopped.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the health server during recovery failed");
            }
        });
        Ok(Recovering { stop, task })
    }

    /// Stops accepting and lets its connections go (at most [`HANDOVER_GRACE`]).
    pub async fn stop(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(HANDOVER_GRACE, self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Answers every call but health checks with UNAVAILABLE while the store opens.
#[derive(Debug, Clone)]
struct Starting<S> {
    inner: S,
}

type BoxedResponse<E> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>,
>;

impl<S, B> tower_service::Service<http::Request<B>> for Starting<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxedResponse<S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        let status = tonic::Status::unavailable(
            "the broker is starting: its store is still opening (recovering partitions); retry",
        );
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// A second tokio handle on the same listening socket.
fn second_handle(listener: &TcpListener) -> Result<TcpListener> {
    let std_listener = listener_as_std(listener)?;
    std_listener
        .set_nonblocking(true)
        .context("setting the listener non-blocking")?;
    TcpListener::from_std(std_listener).context("registering the listener")
}

/// Duplicates the listening socket's descriptor as a std listener.
fn listener_as_std(listener: &TcpListener) -> Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let fd = listener
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the listening socket")?;
    Ok(std::net::TcpListener::from(fd))
}
