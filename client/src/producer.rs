//! [`Producer`]: batching, partitioning, ordered retries.
//!
//! Each partition has its own queue and one task. The task takes the first waiting record,
//! gathers more until the batch reaches `batch_bytes` or `linger_ms` passes, sends one
//! Produce, and resolves every record's future with its offset. Only one request per
//! partition is in flight, so a retry (on UNAVAILABLE or a broken connection, with
//! exponential backoff until `retry_timeout_ms`) can never reorder a partition. Partitions
//! proceed in parallel. A request whose ack was lost may be appended twice by its retry:
//! delivery is at least once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rill_proto::partitioner::partition_for_key;
use rill_proto::v1::{self as pb, produce_request::Payload};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::Instant;

use crate::admin::Admin;
use crate::connection::Connection;
use crate::error::{is_retryable_status, ClientError, Result};

/// What a produce waits for before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Appended to the partition log (the page cache). The default.
    #[default]
    Leader,
    /// Synced to stable storage.
    Durable,
}

/// How a [`Producer`] batches and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    linger_ms: u64,
    batch_bytes: usize,
    acks: Acks,
    retry_timeout_ms: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger_ms: 5,
            batch_bytes: 1 << 20,
            acks: Acks::Leader,
            retry_timeout_ms: 30_000,
        }
    }
}

impl ProducerConfig {
    /// Defaults: linger 5 ms, batches up to 1 MiB, leader acks, retries for 30 s.
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

    /// What acknowledgements wait for (default [`Acks::Leader`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// How long to keep retrying a batch the broker cannot take, in ms (default 30,000).
    pub fn retry_timeout_ms(mut self, retry_timeout_ms: u64) -> Self {
        self.retry_timeout_ms = retry_timeout_ms;
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
    /// A timestamp in ms since the epoch; the broker's clock when `None`.
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

enum Msg {
    Record(pb::Record, usize, Ack),
    Flush(oneshot::Sender<()>),
}

struct TopicState {
    partitions: u32,
    round_robin: std::sync::atomic::AtomicU32,
}

/// The producer. Cheap to clone; every clone shares the queues.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connection,
    /// Partition leaders in a cluster (empty with a single broker).
    leaders: crate::leaders::Leaders,
    config: ProducerConfig,
    topics: Mutex<HashMap<String, Arc<TopicState>>>,
    queues: Mutex<HashMap<(String, u32), mpsc::UnboundedSender<Msg>>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Producer {
    /// A producer on `conn`.
    pub fn new(conn: Connection, config: ProducerConfig) -> Self {
        Producer {
            inner: Arc::new(Inner {
                conn,
                leaders: crate::leaders::Leaders::default(),
                config,
                topics: Mutex::new(HashMap::new()),
                queues: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn topic(&self, topic: &str) -> Result<Arc<TopicState>> {
        let mut topics = self.inner.topics.lock().await;
        if let Some(t) = topics.get(topic) {
            return Ok(Arc::clone(t));
        }
        let d = Admin::new(self.inner.conn.clone())
            .describe_topic(topic)
            .await?;
        let state = Arc::new(TopicState {
            partitions: d.partitions.len().max(1) as u32,
            round_robin: std::sync::atomic::AtomicU32::new(0),
        });
        topics.insert(topic.to_string(), Arc::clone(&state));
        Ok(state)
    }

    async fn queue(&self, topic: &str, partition: u32) -> mpsc::UnboundedSender<Msg> {
        let mut queues = self.inner.queues.lock().await;
        queues
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(partition_loop(
                    Arc::clone(&self.inner),
                    topic.to_string(),
                    partition,
                    rx,
                ));
                tx
            })
            .clone()
    }

    /// Queues a record and returns a future of its `(partition, offset)`. Records sent from
    /// one task to one partition keep their order.
    pub async fn send(
        &self,
        record: ProducerRecord,
    ) -> Result<impl std::future::Future<Output = Result<(u32, u64)>>> {
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
            .await
            .send(Msg::Record(pb_record, size, tx))
            .map_err(|_| ClientError::Closed)?;
        Ok(async move { rx.await.map_err(|_| ClientError::Closed)? })
    }

    /// Sends a record and waits for its `(partition, offset)`.
    pub async fn send_and_wait(&self, record: ProducerRecord) -> Result<(u32, u64)> {
        self.send(record).await?.await
    }

    /// Waits until every record sent before this call is acknowledged (or failed).
    pub async fn flush(&self) -> Result<()> {
        let queues: Vec<_> = self.inner.queues.lock().await.values().cloned().collect();
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

/// What one partition's sender has gathered for its next request.
#[derive(Default)]
struct Gathered {
    records: Vec<pb::Record>,
    acks: Vec<Ack>,
    bytes: usize,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Gathered {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Record(r, size, ack) => {
                self.records.push(r);
                self.acks.push(ack);
                self.bytes += size;
            }
            Msg::Flush(done) => self.flushes.push(done),
        }
    }
}

/// One partition's sender: gathers a batch, sends it with retries, resolves the acks.
async fn partition_loop(
    inner: Arc<Inner>,
    topic: String,
    partition: u32,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let linger = Duration::from_millis(inner.config.linger_ms);
    while let Some(first) = rx.recv().await {
        let mut g = Gathered::default();
        g.take(first);
        let deadline = Instant::now() + linger;
        while g.bytes < inner.config.batch_bytes && !g.records.is_empty() {
            // Everything already queued goes in at once; then wait out the linger.
            match rx.try_recv() {
                Ok(msg) => g.take(msg),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !g.flushes.is_empty() {
                        break; // a flush is waiting: send now
                    }
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(msg)) => g.take(msg),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        if !g.records.is_empty() {
            let result =
                send_with_retries(&inner, &topic, partition, std::mem::take(&mut g.records)).await;
            for (i, ack) in g.acks.drain(..).enumerate() {
                let _ = ack.send(match &result {
                    Ok(base) => Ok((partition, base + i as u64)),
                    Err(e) => Err(ClientError::broker(
                        Some(&topic),
                        Some(partition),
                        match e {
                            ClientError::Broker { source, .. } => source.clone(),
                            other => tonic::Status::unavailable(other.to_string()),
                        },
                    )),
                });
            }
        }
        for done in g.flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn send_with_retries(
    inner: &Inner,
    topic: &str,
    partition: u32,
    records: Vec<pb::Record>,
) -> Result<u64> {
    let request = pb::ProduceRequest {
        topic: topic.to_string(),
        partition: Some(partition),
        ack: match inner.config.acks {
            Acks::Leader => pb::AckMode::Leader as i32,
            Acks::Durable => pb::AckMode::Durable as i32,
        },
        payload: Some(Payload::Records(pb::RecordList { records })),
    };
    let give_up = Instant::now() + Duration::from_millis(inner.config.retry_timeout_ms);
    let mut backoff = Duration::from_millis(20);
    // In a cluster, the partition's leader; one request is in flight per partition, so
    // following a leader change cannot reorder the partition.
    let mut conn = inner
        .leaders
        .get(topic, partition)
        .unwrap_or_else(|| inner.conn.clone());
    loop {
        match conn.log().produce(request.clone()).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                return Ok(resp.appends.first().map_or(0, |a| a.base_offset));
            }
            Err(status) if Instant::now() + backoff < give_up => {
                if let Some(leader) = crate::leaders::leader_hint(&status) {
                    tracing::debug!(topic, partition, %leader, "following the partition leader");
                    match inner.leaders.follow(topic, partition, &leader).await {
                        Ok(c) => {
                            conn = c;
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(topic, partition, error = %e, "leader unreachable");
                        }
                    }
                } else if !is_retryable_status(&status) {
                    return Err(ClientError::broker(Some(topic), Some(partition), status));
                } else {
                    // The leader (or the broker) may be gone: start over from the
                    // bootstrap connection, which names the new leader once elected.
                    inner.leaders.forget(topic, partition);
                    conn = inner.conn.clone();
                    if inner.conn.bootstrap().contains(',') {
                        // Several brokers: the one first connected to may be the one that
                        // died; take whichever of the list answers now.
                        if let Ok(c) = Connection::connect(inner.conn.bootstrap()).await {
                            conn = c;
                        }
                    }
                }
                tracing::debug!(topic, partition, error = %status, "produce failed; retrying");
                tokio::time::sleep(backoff).await;
                // Given several brokers (a cluster), the usual cause is an election, over
                // within a second: look for the new leader often rather than back off far.
                let cap = if inner.conn.bootstrap().contains(',') {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(1)
                };
                backoff = (backoff * 2).min(cap);
            }
            Err(status) => return Err(ClientError::broker(Some(topic), Some(partition), status)),
        }
    }
}
