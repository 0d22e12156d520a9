//! The Rill broker: gRPC produce (push), long-poll fetch (pull), topics and group offsets,
//! served over the storage engine.
//!
//! # The map
//! - [`auth`]: TLS, tokens, ACLs and the authenticating layer (`docs/SECURITY.md`).
//! - [`config`]: [`Config`], the typed settings with their defaults.
//! - [`cli`]: the binary's layering of defaults, a TOML file, environment and flags.
//! - [`cluster`]: cluster flags and the services of a cluster member (none without flags).
//! - [`server`]: binding, serving (with health and reflection), and graceful shutdown.
//! - [`health`]: the health service's states, and health checks answered while the store
//!   opens.
//! - [`connections`]: the accept loop that enforces `max_connections`.
//! - [`state`]: [`Broker`], the shared handle: the store, topics, and per-partition wake-ups.
//! - [`services`]: the gRPC services `rill.v1.Log`, `rill.v1.Groups`, `rill.v1.Admin`,
//!   `rill.v1.Security` and `rill.v1.Subscriptions`; `Fetch` is framed by hand around the
//!   stored batches ([`services::LogRoutes`]).
//! - [`produce`]: partitioning, batch building and compression for Produce and ProduceStream.
//! - [`producers`]: the producer id registry behind InitProducer (idempotent producers), in
//!   the internal topic `__producers`.
//! - [`fetch`]: the long-poll Fetch and ListOffsets.
//! - [`metrics`]: Prometheus metrics (request layer, per-topic counters, scrape-time
//!   collector) and the `/metrics` listener.
//! - [`tasks`]: the background flush and retention loops.
//! - [`internal`]: the internal state topics (`__groups`, `__security`, `__subscriptions`,
//!   `__producers`) on replicated storage in a cluster: durable appends, routing to the partition leader,
//!   and rebuilding state on a new leader; `internal::compact`, what the compactions of
//!   `__subscriptions`, `__security` and `__producers` share.
//! - [`groups`]: the group coordinator's background work over the groups topic.
//! - [`subscriptions`]: queue subscriptions (per-record acks, redelivery, dead letters) over
//!   the internal topic `__subscriptions`, and push delivery with credits.
//! - [`error`]: [`BrokerError`] and the one mapping to gRPC status codes.
//!
//! `main.rs` only loads the config and calls [`run`] with a shutdown token. The design this
//! code follows (layers, the produce and fetch paths, status codes, threading) is in
//! `docs/ARCHITECTURE.md`.

// No `unwrap` outside tests: input and I/O failures are typed errors, and `expect("why")`
// marks the few places that are provably unreachable.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod error;
pub mod fetch;
pub mod groups;
pub mod health;
pub mod internal;
pub mod metrics;
pub mod produce;
pub mod producers;
pub mod server;
pub mod services;
pub mod state;
pub mod subscriptions;
pub mod tasks;

pub use config::Config;
pub use error::BrokerError;
pub use server::{init_tracing, run, shutdown_on_signals, Server};
pub use state::Broker;
