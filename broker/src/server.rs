//! Binding, serving and shutting down: the gRPC server with its services, health and
//! reflection, the background tasks, and the clean close of the store.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use rill_proto::v1::admin_server::AdminServer;
use rill_proto::v1::groups_server::GroupsServer;
use rill_proto::v1::log_server::LogServer;
use rill_proto::v1::security_server::SecurityServer;
use rill_proto::v1::subscriptions_server::SubscriptionsServer;
use rill_storage::{Store, StoreOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::layer::AuthLayer;
use crate::config::Config;
use crate::connections::LimitedIncoming;
use crate::health::{Health, Recovering};
use crate::metrics::{Metrics, RequestMetricsLayer};
use crate::services::{
    AdminService, GroupsService, LogRoutes, LogService, SecurityService, SubscriptionsService,
};
use crate::state::Broker;
use crate::tasks;

/// HTTP/2 frame size: 1 MiB frames moved large fetches 40–80% faster than the 16 KiB
/// default here, while 16 MiB frames went stop-and-wait (`docs/ARCHITECTURE.md`, "gRPC
/// transport").
const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Room for protobuf framing around the largest batch.
const MESSAGE_OVERHEAD_BYTES: usize = 64 << 10;

/// A bound, not yet serving broker.
pub struct Server {
    broker: Broker,
    /// Cluster membership, when started with `--node-id` and `--peers`.
    cluster: Option<rill_cluster::ClusterNode>,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The `/metrics` listener, when `metrics_listen` is set.
    metrics_listener: Option<(TcpListener, SocketAddr)>,
    /// NOT_SERVING until [`Server::serve`] starts.
    health: Health,
}

impl Server {
    /// Binds the listen address, then opens the store (recovering partitions as needed),
    /// answering health checks with NOT_SERVING meanwhile (see [`crate::health`]).
    pub async fn bind(mut config: Config, shutdown: CancellationToken) -> Result<Server> {
        if let Some(cluster) = config.cluster.as_mut() {
            cluster.transport = crate::cluster::peer_transport(&config.security).await?;
        }
        if let Some(cluster) = &config.cluster {
            // A broker whose peers list the running ones refuse stops before it opens or
            // writes anything.
            rill_cluster::ClusterNode::precheck(cluster)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        // Bound before the store opens, so a busy port fails the start at once.
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let listener = crate::metrics::http::bind(addr).await?;
                let bound = listener
                    .local_addr()
                    .context("reading the metrics listener's address")?;
                Some((listener, bound))
            }
            None => None,
        };
        let health = Health::not_serving().await;
        let recovering = Recovering::serve(&listener, &health)?;
        let options = StoreOptions::new(&config.data_dir)
            .max_batch_bytes(config.max_batch_bytes)
            .producer_expiry_ms(config.producer_id_expiration_ms)
            .groups_topic(
                rill_storage::groups::DEFAULT_GROUPS_PARTITIONS,
                config.groups_segment_bytes,
            );
        let store = tokio::task::spawn_blocking(move || Store::open(options)).await;
        recovering.stop().await;
        let store = store
            .context("opening the store")?
            .with_context(|| format!("opening data folder {}", config.data_dir.display()))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;
        let tasks = TaskTracker::new();
        let cluster = match &config.cluster {
            Some(c) => {
                // It looks at the Raft folder: blocking.
                let (c, dir) = (c.clone(), config.data_dir.clone());
                let (shutdown, tasks) = (shutdown.clone(), tasks.clone());
                let node = tokio::task::spawn_blocking(move || {
                    rill_cluster::ClusterNode::new(c, &dir, shutdown, tasks)
                })
                .await
                .context("starting cluster membership")?
                .context("starting cluster membership")?;
                Some(node)
            }
            None => None,
        };
        let security_config = config.security.clone();
        let security_store = store.clone();
        let security_segment_bytes = config.state_segment_bytes;
        let security = tokio::task::spawn_blocking(move || {
            crate::auth::Security::open(security_store, &security_config, security_segment_bytes)
        })
        .await
        .context("opening the security state")?
        .context("opening the security state")?;
        // A cluster of two or more keeps the registry replicated; only a single broker (or a
        // one-broker cluster) imports an old per-broker file.
        let single = config.cluster.as_ref().is_none_or(|c| c.peers.len() <= 1);
        let producers_store = store.clone();
        let state_segment_bytes = config.state_segment_bytes;
        let producers = tokio::task::spawn_blocking(move || {
            crate::producers::ProducerIds::open(producers_store, single, state_segment_bytes)
        })
        .await
        .context("opening the producer ids")?
        .context("opening the producer ids")?;
        let broker = Broker::new(store, config, shutdown, tasks);
        broker.set_security(security);
        broker.set_producers(producers);
        if let Some(node) = &cluster {
            let local = std::sync::Arc::new(crate::cluster::BrokerTopics(broker.clone()));
            let node = node.clone();
            let replication =
                tokio::task::spawn_blocking(move || rill_cluster::Replication::open(node, local))
                    .await
                    .context("opening replication")?
                    .context("reading the replicated topics")?;
            broker.set_replication(replication);
            crate::internal::check_unreplicated_state(&broker)?;
            crate::groups::replicated::replicate_store(&broker);
        }
        Ok(Server {
            broker,
            cluster,
            listener,
            local_addr,
            metrics_listener,
            health,
        })
    }

    /// The address the metrics listener bound, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared broker state (for tests and embedding).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Serves until the shutdown token is cancelled, then stops accepting, lets in-flight
    /// requests finish (waiting fetches return at once), stops the background tasks, and
    /// closes the store cleanly (synced, with clean-shutdown markers).
    pub async fn serve(self) -> Result<()> {
        let Server {
            broker,
            listener,
            metrics_listener,
            health,
            cluster,
            ..
        } = self;
        tasks::spawn_background(&broker);
        let coordinator = crate::groups::Coordinator::load(broker.store());
        crate::groups::spawn_background(&broker, &coordinator);
        crate::groups::replicated::follow(&broker, &coordinator);
        if let Some(security) = broker.security() {
            security.follow(&broker);
        }
        if let Ok(producers) = broker.producers() {
            producers.follow(&broker);
        }
        let subs_store = broker.store().clone();
        let subs_segment_bytes = broker.config().subscriptions_segment_bytes;
        let subscriptions = tokio::task::spawn_blocking(move || {
            crate::subscriptions::Subscriptions::open(&subs_store, subs_segment_bytes)
        })
        .await
        .context("opening the subscription state")?
        .context("opening the subscription state")?;
        crate::subscriptions::spawn_background(&broker, &subscriptions);
        crate::subscriptions::replicated::follow(&broker, &subscriptions);
        let request_metrics = match metrics_listener {
            Some((listener, _)) => {
                let metrics = Metrics::new(
                    &broker,
                    Some(coordinator.clone()),
                    Some(subscriptions.clone()),
                );
                let layer = metrics.layer();
                crate::metrics::http::spawn(listener, metrics, &broker);
                layer
            }
            None => RequestMetricsLayer::new(None),
        };
        let (raft, cluster_service) = match &cluster {
            Some(node) => {
                node.start();
                let replication = broker
                    .replication()
                    .expect("set in bind for every cluster member")
                    .clone();
                replication.start(broker.shutdown().clone(), broker.tasks());
                replication.ensure_internal_topics(
                    crate::internal::specs(&broker),
                    broker.shutdown().clone(),
                    broker.tasks(),
                );
                let (raft, status) = crate::cluster::services(node, &replication);
                (Some(raft), Some(status))
            }
            None => (None, None),
        };
        let max_message = broker.config().max_batch_bytes + MESSAGE_OVERHEAD_BYTES;
        let max_fetch = broker.config().max_fetch_bytes + MESSAGE_OVERHEAD_BYTES;

        health.set_all(tonic_health::ServingStatus::Serving).await;
        if let Some(replication) = broker.replication() {
            crate::health::watch_controller_quorum(
                &health,
                replication.clone(),
                broker.shutdown().clone(),
                broker.tasks(),
            );
        }
        // Once shutdown begins, the whole server and each service report NOT_SERVING (to
        // health watchers) while in-flight calls drain.
        let on_shutdown = health.clone();
        let shutting_down = broker.shutdown().clone();
        broker.tasks().spawn(async move {
            shutting_down.cancelled().await;
            on_shutdown
                .set_all(tonic_health::ServingStatus::NotServing)
                .await;
        });
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rill_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rill_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building reflection v1alpha")?;

        // Fetch is framed by hand around the stored batches (no copy); the other Log RPCs
        // go through the generated server (see crate::services::LogRoutes).
        let log = LogRoutes::new(
            LogServer::new(LogService::new(broker.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_fetch.max(max_message)),
            broker.clone(),
        );
        let groups = GroupsServer::new(GroupsService::new(broker.clone(), coordinator));
        let admin = AdminServer::new(AdminService::new(broker.clone()));
        let subscriptions =
            SubscriptionsServer::new(SubscriptionsService::new(broker.clone(), subscriptions))
                .max_encoding_message_size(max_fetch.max(max_message));
        let security = broker.security().cloned();
        let security_rpc = security
            .clone()
            .map(|s| SecurityServer::new(SecurityService::new(broker.clone(), s)));
        let tls = crate::auth::tls::server_config(&broker.config().security).await?;

        let shutdown = broker.shutdown().clone();
        // At most `max_connections` connections reach tonic; the others are refused with
        // RESOURCE_EXHAUSTED, and plaintext clients of a TLS port are told to use TLS (see
        // crate::connections).
        let incoming = LimitedIncoming::new(
            listener,
            broker.clone(),
            tls.as_ref().map(|t| t.refusals.clone()),
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.tonic).context("configuring TLS")?;
        }
        let served = builder
            // Authentication, in front of every service (see crate::auth).
            .layer(AuthLayer::new(
                security,
                broker.config().security.open_reflection,
            ))
            .max_frame_size(MAX_FRAME_BYTES)
            .max_concurrent_streams(Some(broker.config().max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(request_metrics)
            .add_service(health.service.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(log)
            .add_service(groups)
            .add_service(admin)
            .add_service(subscriptions)
            .add_optional_service(raft)
            .add_optional_service(cluster_service)
            .add_optional_service(security_rpc)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await;
        // Whatever ended serving, stop the tasks and close the store.
        broker.shutdown().cancel();
        health
            .set_all(tonic_health::ServingStatus::NotServing)
            .await;
        if let Some(node) = &cluster {
            node.shutdown().await;
        }
        broker.tasks().close();
        broker.tasks().wait().await;
        let store = broker.store().clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .context("closing the store")?
            .context("closing the store")?;
        tracing::info!("broker stopped cleanly");
        if let Some(message) = cluster.as_ref().and_then(|n| n.fatal_error()) {
            anyhow::bail!("{message}");
        }
        served.context("serving gRPC")
    }
}

/// Opens, binds, prints where it listens and what folder it uses, and serves until
/// `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let server = Server::bind(config, shutdown).await?;
    // Printed on stdout, one line each, so scripts and tests can read the bound port.
    println!("rill-broker data dir: {}", data_dir.display());
    // Before the gRPC line: a reader that stops at that line has seen this one too.
    if let Some(addr) = server.metrics_addr() {
        println!("rill-broker metrics listening on {addr}");
    }
    println!("rill-broker listening on {}", server.local_addr());
    tracing::info!(addr = %server.local_addr(), data_dir = %data_dir.display(), "broker started");
    server.serve().await
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub async fn shutdown_on_signals(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}

/// Sets up `tracing` output to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
