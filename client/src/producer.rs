//! [`Producer`]: batching, partitioning, ordered retries, a bounded buffer.
//!
//! Each partition has its own queue and one task. The task takes the first waiting record,
//! gathers more until the batch reaches `batch_bytes` or `linger_ms` passes, sends one
//! Produce, and resolves every record's future with its offset. The producer builds each
//! batch itself, in the record-batch format of `storage/FORMAT.md` (with `rill-batch`, the
//! code the broker validates and stores it with), compresses its records with the configured
//! codec, and sends it as a pre-encoded `batch`: the broker checks it and stores its bytes as
//! they came, so compression costs the producer's CPU, not the broker's. Retries (on UNAVAILABLE or a
//! broken connection, with exponential backoff and jitter until `retry_timeout_ms`, see
//! [`crate::error`]) resend the same batch. Partitions proceed in parallel.
//!
//! # Idempotence (the default)
//! The producer gets a producer id and epoch from the broker (`InitProducer`) and numbers
//! each partition's records 0, 1, 2, …; every batch carries its first record's sequence. The
//! broker appends a batch only at the next sequence and answers a retry of one it already
//! appended with the original offsets, so a batch whose ack was lost is never appended
//! twice: delivery is exactly once per batch. Up to `max_in_flight` (at most 5) batches per
//! partition are sent without waiting for the previous ack; the broker keeps them in order
//! (a single broker holds a batch that arrives before an earlier one for up to 100 ms until
//! the earlier one is appended; past that, or on a replicated partition, it is refused with
//! the sequence it expects, and resent shortly, see [`EXPECTED_SEQUENCE_METADATA_KEY`]). A batch that fails for good
//! breaks the partition's sequence: the batches after it fail too, and the partition starts
//! again with a fresh producer id. With idempotence off, one batch per partition is in
//! flight and a retry may append a batch twice (at least once).
//!
//! # Leaders
//! In a cluster each batch goes to its partition's leader, which `Cluster.Metadata` names
//! before the first one (see [`crate::leaders`]). A try that fails with UNAVAILABLE or a
//! broken connection, or stays unanswered for a second (a leader cut off from the others
//! holds it until its commit deadline), makes the sender ask the other brokers who leads
//! now, and the batch goes to the leader of the newest term they name. Order is kept as
//! above: the retried batch carries its sequence, and the new leader answers a batch the old
//! one did commit with its original offsets.
//!
//! `InitProducer` first goes to the bootstrap broker, which forwards it to the leader of
//! `__producers`; when that broker cannot answer (cut off from the others), the request goes
//! to the leader the other brokers name, the same way (`init` module).
//!
//! # Memory
//! Every record waiting in a queue or in a batch not yet acknowledged holds its size in the
//! producer's buffer (`buffer_memory_bytes`, like Kafka's `buffer.memory`), and gives it back
//! when its future resolves. [`Producer::send`] waits for room (back-pressure);
//! [`Producer::try_send`] fails at once with [`ClientError::BufferFull`].
//!
//! # Lifetime
//! The partition tasks own their queue's receiving end and a handle on the connection, never
//! the producer's shared state. When the last clone of a [`Producer`] is dropped the queues
//! close: each task sends what was already queued, resolves those futures, and ends, and the
//! connection is released with the last of them. Call [`Producer::flush`] first to wait for
//! that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rill_proto::partitioner::partition_for_key;
use rill_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, OnceCell, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::admin::Admin;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::retry::RetryPolicy;

mod init;
mod sender;

use sender::{PartitionSender, CLUSTER_MAX_RETRY_DELAY};

/// What a produce waits for before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Appended to the partition leader's log (the page cache). With replication factor above
    /// 1, not yet committed: lost if the leader fails before a majority holds it.
    Leader,
    /// Committed by a majority of the partition's replicas (their page caches). The default.
    /// With replication factor 1, the same as [`Acks::Leader`].
    #[default]
    Quorum,
    /// Synced to stable storage (with replication factor above 1, by a majority).
    Durable,
}

/// The metadata key of a sequence-gap refusal that carries the sequence the partition
/// expects next (set by the broker).
pub const EXPECTED_SEQUENCE_METADATA_KEY: &str = "rill-expected-sequence";

/// The most batches per partition an idempotent producer keeps in flight: the broker
/// remembers a producer's last 5 batches per partition, so a retry of any of them is found.
pub const MAX_IN_FLIGHT: usize = 5;

/// How a batch's records are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Not compressed (the default).
    #[default]
    None,
    /// LZ4: fast, a moderate ratio.
    Lz4,
    /// Zstandard: a better ratio at more CPU.
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// Parses `none`, `lz4` or `zstd`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?}: expected none, lz4 or zstd"
            )),
        }
    }
}

impl Compression {
    /// The batch format's codec.
    fn codec(self) -> rill_batch::Codec {
        match self {
            Compression::None => rill_batch::Codec::None,
            Compression::Lz4 => rill_batch::Codec::Lz4,
            Compression::Zstd => rill_batch::Codec::Zstd,
        }
    }
}

/// How a [`Producer`] batches and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    linger_ms: u64,
    batch_bytes: usize,
    acks: Acks,
    retry_timeout_ms: u64,
    buffer_memory_bytes: usize,
    idempotence: bool,
    max_in_flight: usize,
    compression: Compression,
    producer_name: Option<String>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger_ms: 5,
            batch_bytes: 1 << 20,
            acks: Acks::Quorum,
            retry_timeout_ms: 30_000,
            buffer_memory_bytes: 32 << 20,
            idempotence: true,
            max_in_flight: MAX_IN_FLIGHT,
            compression: Compression::None,
            producer_name: None,
        }
    }
}

impl ProducerConfig {
    /// Defaults: linger 5 ms, batches up to 1 MiB, quorum acks, retries for 30 s, a 32 MiB
    /// buffer, idempotent with up to 5 batches in flight per partition, no compression.
    pub fn new() -> Self {
        ProducerConfig::default()
    }

    /// How long a partial batch waits for more records, in ms (default 5).
    pub fn linger_ms(mut self, linger_ms: u64) -> Self {
        self.linger_ms = linger_ms;
        self
    }

    /// Send a batch once it holds this many bytes of records (default 1 MiB).
    pub fn batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes.max(1);
        self
    }

    /// What acknowledgements wait for (default [`Acks::Quorum`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// How long to keep retrying a batch the broker cannot take, in ms (default 30,000).
    pub fn retry_timeout_ms(mut self, retry_timeout_ms: u64) -> Self {
        self.retry_timeout_ms = retry_timeout_ms;
        self
    }

    /// Whether the producer is idempotent (default true): see the module's "Idempotence".
    /// Off, one batch per partition is in flight and a retry may append a batch twice.
    pub fn idempotence(mut self, idempotence: bool) -> Self {
        self.idempotence = idempotence;
        self
    }

    /// How many batches per partition an idempotent producer sends before the first is
    /// acknowledged, 1 to [`MAX_IN_FLIGHT`] (default 5).
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT);
        self
    }

    /// How the producer compresses its batches' records before sending them (default none).
    /// The broker stores a batch as it came, unless the topic's `compression` names another
    /// codec, which it then recompresses to.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// A stable name for this producer: a new producer with the same name fences this one
    /// (the broker refuses its batches from then on). Default: none.
    pub fn producer_name(mut self, name: impl Into<String>) -> Self {
        self.producer_name = Some(name.into());
        self
    }

    /// The most record bytes the producer holds at once, queued or awaiting their
    /// acknowledgement, across all partitions (default 32 MiB; Kafka's `buffer.memory`).
    /// When it is full, [`Producer::send`] waits and [`Producer::try_send`] fails with
    /// [`ClientError::BufferFull`]. A record larger than the whole buffer is refused with
    /// [`ClientError::RecordTooLarge`]. A record counts its key, value and headers plus 32
    /// bytes.
    pub fn buffer_memory_bytes(mut self, buffer_memory_bytes: usize) -> Self {
        self.buffer_memory_bytes = buffer_memory_bytes.clamp(1, Semaphore::MAX_PERMITS);
        self
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// The topic.
    pub topic: String,
    /// An explicit partition; otherwise the key's hash, or round-robin without a key.
    pub partition: Option<u32>,
    /// The key.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// A timestamp in ms since the epoch; the producer's clock when its batch is built, when
    /// `None`.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A keyless record with a value.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            value: value.into(),
            ..Default::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the timestamp, in ms since the epoch.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    fn size(&self) -> usize {
        self.value.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 32
    }
}

type Ack = oneshot::Sender<Result<(u32, u64)>>;

/// The acknowledgement of one sent record: resolves to its `(partition, offset)` once its
/// batch is acknowledged, or to the batch's error. Dropping it does not cancel the send.
#[derive(Debug)]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<(u32, u64)>>,
}

impl std::future::Future for DeliveryFuture {
    type Output = Result<(u32, u64)>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // The sender is dropped unanswered only if its task is gone (the runtime shut down).
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(ClientError::Closed)))
    }
}

enum Msg {
    Record {
        record: pb::Record,
        size: usize,
        ack: Ack,
        /// The record's share of the buffer, given back when its ack is resolved.
        permit: OwnedSemaphorePermit,
    },
    Flush(oneshot::Sender<()>),
}

struct TopicState {
    partitions: u32,
    round_robin: std::sync::atomic::AtomicU32,
}

/// The producer. Cheap to clone; every clone shares the queues and the buffer.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

/// What the clones of one producer share. The partition tasks never hold it (see the
/// module's "Lifetime"), so dropping the last [`Producer`] drops the queues' senders.
struct Inner {
    conn: Connection,
    /// Partition leaders in a cluster (empty with a single broker).
    leaders: Arc<crate::leaders::Leaders>,
    config: ProducerConfig,
    /// Each topic's partition count, looked up once. The lock guards only the map; the
    /// lookup runs in the topic's cell without it, and concurrent first sends to a topic
    /// share that one lookup.
    topics: Mutex<HashMap<String, Arc<OnceCell<Arc<TopicState>>>>>,
    /// The partition queues. Unbounded channels, bounded in bytes by `buffer`: every record
    /// in them holds its share of it.
    queues: Mutex<HashMap<(String, u32), mpsc::UnboundedSender<Msg>>>,
    /// The buffer: one permit per byte of `buffer_memory_bytes`.
    buffer: Arc<Semaphore>,
    /// The producer id and epoch, asked for once by the first partition that sends.
    identity: Arc<OnceCell<(i64, i16)>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Whether an enqueue may wait for room in the buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    Wait,
    Fail,
}

impl Producer {
    /// A producer on `conn`.
    pub fn new(conn: Connection, config: ProducerConfig) -> Self {
        let buffer = Arc::new(Semaphore::new(config.buffer_memory_bytes));
        Producer {
            inner: Arc::new(Inner {
                conn,
                leaders: Arc::default(),
                config,
                topics: Mutex::new(HashMap::new()),
                queues: Mutex::new(HashMap::new()),
                buffer,
                identity: Arc::default(),
            }),
        }
    }

    async fn topic(&self, topic: &str) -> Result<Arc<TopicState>> {
        let cell = {
            let mut topics = self.inner.topics.lock();
            match topics.get(topic) {
                Some(cell) => Arc::clone(cell),
                None => Arc::clone(topics.entry(topic.to_string()).or_default()),
            }
        };
        let found = cell
            .get_or_try_init(|| async {
                let d = Admin::new(self.inner.conn.clone())
                    .describe_topic(topic)
                    .await?;
                Ok::<_, ClientError>(Arc::new(TopicState {
                    partitions: d.partitions.len().max(1) as u32,
                    round_robin: std::sync::atomic::AtomicU32::new(0),
                }))
            })
            .await;
        match found {
            Ok(state) => Ok(Arc::clone(state)),
            Err(e) => {
                // Forget the failed lookup so that names that never existed do not pile up.
                let mut topics = self.inner.topics.lock();
                if topics
                    .get(topic)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
                {
                    topics.remove(topic);
                }
                Err(e)
            }
        }
    }

    fn queue(&self, topic: &str, partition: u32) -> mpsc::UnboundedSender<Msg> {
        let mut queues = self.inner.queues.lock();
        queues
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let config = &self.inner.config;
                let sender = PartitionSender {
                    conn: self.inner.conn.clone(),
                    leaders: Arc::clone(&self.inner.leaders),
                    topic: topic.to_string(),
                    partition,
                    linger: Duration::from_millis(config.linger_ms),
                    batch_bytes: config.batch_bytes,
                    ack: match config.acks {
                        Acks::Leader => pb::AckMode::Leader,
                        Acks::Quorum => pb::AckMode::Quorum,
                        Acks::Durable => pb::AckMode::Durable,
                    },
                    idempotent: config.idempotence,
                    max_in_flight: if config.idempotence {
                        config.max_in_flight
                    } else {
                        1
                    },
                    compression: config.compression.codec(),
                    producer_name: config.producer_name.clone(),
                    identity: Arc::clone(&self.inner.identity),
                    retry: {
                        let policy =
                            RetryPolicy::produce(Duration::from_millis(config.retry_timeout_ms));
                        // Given several brokers (a cluster), the usual cause is an election,
                        // over within a second or two: look for the new leader often.
                        if self.inner.conn.bootstrap().contains(',') {
                            policy.with_max_delay(CLUSTER_MAX_RETRY_DELAY)
                        } else {
                            policy
                        }
                    },
                };
                tokio::spawn(sender.run(rx));
                tx
            })
            .clone()
    }

    /// Queues a record and returns its [`DeliveryFuture`], which resolves to the record's
    /// `(partition, offset)`. Records sent from one task to one partition keep their order.
    ///
    /// When the buffer is full (see [`ProducerConfig::buffer_memory_bytes`]) this waits until
    /// earlier records are acknowledged and make room. The first send to a topic looks the
    /// topic up on the broker.
    ///
    /// # Errors
    /// The topic does not exist, the partition is past the topic's count, the record is
    /// larger than the whole buffer ([`ClientError::RecordTooLarge`]). The returned future
    /// fails with the batch's error when the broker refuses it or retries run out.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        self.enqueue(record, WhenFull::Wait).await
    }

    /// Like [`Producer::send`], but never waits for room in the buffer: when it is full, fails
    /// at once with [`ClientError::BufferFull`] and the record is not sent. (The first send
    /// to a topic still waits for the topic's lookup.)
    pub async fn try_send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        self.enqueue(record, WhenFull::Fail).await
    }

    async fn enqueue(&self, record: ProducerRecord, when_full: WhenFull) -> Result<DeliveryFuture> {
        let topic = self.topic(&record.topic).await?;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p >= topic.partitions => {
                return Err(ClientError::Invalid(format!(
                    "partition {p} does not exist: topic {:?} has {} partitions",
                    record.topic, topic.partitions
                )))
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, topic.partitions),
            (None, None) => {
                topic
                    .round_robin
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % topic.partitions
            }
        };
        let size = record.size();
        let buffer_memory_bytes = self.inner.config.buffer_memory_bytes;
        let permits = u32::try_from(size)
            .ok()
            .filter(|_| size <= buffer_memory_bytes)
            .ok_or_else(|| ClientError::RecordTooLarge {
                topic: record.topic.clone(),
                size_bytes: size,
                buffer_memory_bytes,
            })?;
        let buffer = Arc::clone(&self.inner.buffer);
        let permit = match when_full {
            // The semaphore is fair: a waiting large record is not overtaken by small ones.
            WhenFull::Wait => buffer
                .acquire_many_owned(permits)
                .await
                .map_err(|_| ClientError::Closed)?,
            WhenFull::Fail => buffer
                .try_acquire_many_owned(permits)
                .map_err(|e| match e {
                    TryAcquireError::NoPermits => ClientError::BufferFull {
                        topic: record.topic.clone(),
                        size_bytes: size,
                        buffer_memory_bytes,
                    },
                    TryAcquireError::Closed => ClientError::Closed,
                })?,
        };
        let pb_record = pb::Record {
            key: record.key,
            value: record.value,
            headers: record
                .headers
                .into_iter()
                .map(|(key, value)| pb::Header { key, value })
                .collect(),
            timestamp_ms: record.timestamp_ms,
        };
        let (tx, rx) = oneshot::channel();
        self.queue(&record.topic, partition)
            .send(Msg::Record {
                record: pb_record,
                size,
                ack: tx,
                permit,
            })
            .map_err(|_| ClientError::Closed)?;
        Ok(DeliveryFuture { rx })
    }

    /// Sends a record and waits for its `(partition, offset)`.
    pub async fn send_and_wait(&self, record: ProducerRecord) -> Result<(u32, u64)> {
        self.send(record).await?.await
    }

    /// Waits until every record sent before this call is acknowledged (or failed). Batches
    /// still lingering are sent at once.
    pub async fn flush(&self) -> Result<()> {
        let queues: Vec<_> = self.inner.queues.lock().values().cloned().collect();
        let mut waits = Vec::new();
        for q in queues {
            let (tx, rx) = oneshot::channel();
            if q.send(Msg::Flush(tx)).is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = w.await;
        }
        Ok(())
    }
}
