//! The Rust client for Rill: a producer, a consumer and an admin client over the `rill.v1`
//! gRPC contract, and (in `main.rs` with [`cli`]) the `rill` command-line tool.
//!
//! # The map
//! - [`connection`]: [`Connection`], one tuned HTTP/2 channel shared by every client.
//! - [`producer`]: [`Producer`]: batching by bytes and linger, the broker's key partitioner,
//!   ordered retries on UNAVAILABLE, `flush`, ack modes, a bounded buffer with
//!   back-pressure (`send` waits, `try_send` fails at once); it builds and compresses its
//!   batches itself with `rill-batch`, the format's shared codec (`producer/sender.rs`).
//! - [`consumer`]: [`Consumer`]: long-poll fetches per partition with prefetch, group
//!   offsets with at-least-once auto-commit, seeks, reported skips; as a group member (built
//!   with a group and no explicit partitions, of one topic or several) it consumes the
//!   `(topic, partition)`s the broker assigns, committing before it gives one up
//!   (`consumer/group.rs`); each partition's long-poll task is in `consumer/fetch.rs`.
//! - [`admin`]: [`Admin`]: topics, offsets and groups.
//! - [`leaders`]: [`leaders::Leaders`]: in a cluster, each partition's leader, found
//!   through `Cluster.Metadata` before the first request (once per topic; a single
//!   broker's UNIMPLEMENTED is remembered) and looked up again from the other brokers when
//!   it fails or stops answering, the newest Raft term winning ([`leaders::rank_leaders`]);
//!   the producer, the consumer's fetch tasks and [`Admin::list_offsets`] route by it.
//! - [`membership`]: [`GroupMember`]: a consumer group member; background heartbeats, and
//!   assigned, revoked and lost partitions as events.
//! - [`error`]: [`ClientError`], typed, with the broker status as its source; which errors
//!   are retryable is decided there, from codes and variants.
//! - `retry` (private): the one backoff policy (exponential with jitter, from `backon`) that
//!   the producer's and the consumer's retries share.
//! - [`subscription`]: queue subscriptions: [`Subscriptions`] (admin), [`QueueConsumer`]
//!   (Receive, ack, nack, reject, extend), and [`PushStream`] (records pushed within
//!   credits, queue or offset mode).
//! - [`security`]: TLS settings ([`ConnectOptions`]) and the bearer token sent on every call.
//! - [`cli`]: the `rill` tool's commands (built on the above).
//!
//! # Producing
//! ```no_run
//! # async fn demo() -> rill_client::Result<()> {
//! use rill_client::{Acks, Connection, Producer, ProducerConfig, ProducerRecord};
//! let conn = Connection::connect("127.0.0.1:7171").await?;
//! let producer = Producer::new(conn, ProducerConfig::new().linger_ms(5).acks(Acks::Durable));
//! let ack = producer.send(ProducerRecord::new("orders", "hello").key("customer-7")).await?;
//! let (partition, offset) = ack.await?;
//! producer.flush().await?;
//! # let _ = (partition, offset); Ok(()) }
//! ```
//!
//! # Consuming
//! ```no_run
//! # async fn demo() -> rill_client::Result<()> {
//! use rill_client::{AutoOffsetReset, Connection, Consumer, ConsumerConfig, ConsumerEvent};
//! let conn = Connection::connect("127.0.0.1:7171").await?;
//! let config = ConsumerConfig::new()
//!     .group("billing")
//!     .auto_offset_reset(AutoOffsetReset::Earliest)
//!     .auto_commit_interval_ms(Some(1000));
//! // A group and no explicit partitions: a member; the broker assigns its share.
//! let mut consumer = Consumer::subscribe(conn, config, "orders", None).await?;
//! loop {
//!     match consumer.next().await? {
//!         ConsumerEvent::Record(r) => println!("{}@{}: {:?}", r.partition, r.offset, r.value),
//!         ConsumerEvent::Skipped { partition, from, to, .. } => {
//!             eprintln!("partition {partition}: data {from}..{to} was deleted by retention")
//!         }
//!         ConsumerEvent::Assigned { partitions, .. } => eprintln!("now own {partitions:?}"),
//!         // Flush state kept for them now: the next call commits and gives them up.
//!         ConsumerEvent::Revoked { partitions, .. } => eprintln!("giving up {partitions:?}"),
//!         ConsumerEvent::Lost { partitions, reason, .. } => eprintln!("lost {partitions:?}: {reason}"),
//!     }
//! }
//! # }
//! ```
//!
//! # Administering
//! ```no_run
//! # async fn demo() -> rill_client::Result<()> {
//! use rill_client::{Admin, Connection, Flush, TopicSettings};
//! let admin = Admin::new(Connection::connect("127.0.0.1:7171").await?);
//! admin.create_topic("orders", TopicSettings::new().partitions(6).flush(Flush::Always)).await?;
//! for group in admin.list_groups().await? {
//!     let d = admin.describe_group(&group).await?;
//!     println!("{group}: {} partitions", d.partitions.len());
//! }
//! # Ok(()) }
//! ```
//!
//! # Latency of one call at a time
//! A call that starts from idle waits mostly on the runtime's wake-ups, not on the broker.
//! On a 2-vCPU VM an empty call took 42–43 µs at p50 from a current-thread runtime, and
//! 93–100 µs from a task on a two-worker runtime, whose workers wake each other for every
//! answer (`rill-call-floor` in `benches/`; `BENCHMARKS.md`, "The floor of one call"). A
//! caller that makes one call at a time and cares about its latency can give the client a
//! current-thread runtime of its own.

pub mod admin;
pub mod cli;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod leaders;
pub mod membership;
pub mod producer;
mod retry;
pub mod security;
pub mod subscription;

pub use admin::{Admin, Flush, OffsetQuery, ResetTo, TopicSettings};
pub use connection::{Connection, DEFAULT_BROKER};
pub use consumer::{
    AutoOffsetReset, ConsumedRecord, Consumer, ConsumerConfig, ConsumerEvent, SeekTo,
};
pub use error::{ClientError, Result};
pub use membership::{GroupMember, MemberConfig, MemberEvent};
pub use producer::{
    Acks, Compression, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, MAX_IN_FLIGHT,
};
pub use security::ConnectOptions;
pub use subscription::{PushStream, PushTarget, QueueConsumer, QueueRecord, Subscriptions};
