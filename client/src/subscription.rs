//! Queue subscriptions and push: [`Subscriptions`] (create, list, describe, delete, seek),
//! [`QueueConsumer`] (Receive and acknowledgements, per record), and [`PushStream`] (records
//! pushed by the broker within the credits this client grants, in queue or offset mode).
//!
//! ```no_run
//! # async fn demo() -> rill_client::Result<()> {
//! use rill_client::{Connection, QueueConsumer};
//! let conn = Connection::connect("127.0.0.1:7171").await?;
//! let consumer = QueueConsumer::new(conn, "billing-jobs", "worker-1");
//! for r in consumer.receive(100, 5_000).await? {
//!     // ... work ...
//!     consumer.ack(&[(r.partition, r.offset)]).await?;
//! }
//! # Ok(()) }
//! ```

use bytes::Bytes;
use rill_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::connection::Connection;
use crate::error::{ClientError, Result};

fn status(s: tonic::Status) -> ClientError {
    ClientError::broker(None, None, s)
}

/// Subscription administration.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    conn: Connection,
}

impl Subscriptions {
    /// On `conn`.
    pub fn new(conn: Connection) -> Self {
        Subscriptions { conn }
    }

    /// Creates subscription `name` with `config` (zeros take the broker's defaults),
    /// starting at the log start (`from_earliest`) or at the end. Returns the settings in
    /// effect.
    pub async fn create(
        &self,
        name: &str,
        config: pb::SubscriptionConfig,
        from_earliest: bool,
    ) -> Result<pb::SubscriptionConfig> {
        let start = if from_earliest {
            pb::StartPosition::Earliest
        } else {
            pb::StartPosition::Latest
        };
        let r = self
            .conn
            .subscriptions()
            .create(pb::CreateSubscriptionRequest {
                name: name.into(),
                config: Some(config),
                start: start as i32,
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok(r.config.unwrap_or_default())
    }

    /// Every subscription (name and topic), sorted by name.
    pub async fn list(&self) -> Result<Vec<pb::SubscriptionSummary>> {
        Ok(self
            .conn
            .subscriptions()
            .list(pb::ListSubscriptionsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .subscriptions)
    }

    /// Backlog, in-flight, oldest unacknowledged age, dead letters, per partition.
    pub async fn describe(&self, name: &str) -> Result<pb::DescribeSubscriptionResponse> {
        Ok(self
            .conn
            .subscriptions()
            .describe(pb::DescribeSubscriptionRequest { name: name.into() })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Deletes a subscription (the topic stays).
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.conn
            .subscriptions()
            .delete(pb::DeleteSubscriptionRequest { name: name.into() })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// Moves a subscription to an offset or a time; returns `(partition, offset)` moved.
    pub async fn seek(
        &self,
        name: &str,
        target: pb::seek_subscription_request::Target,
        partition: Option<u32>,
    ) -> Result<Vec<(u32, u64)>> {
        Ok(self
            .conn
            .subscriptions()
            .seek(pb::SeekSubscriptionRequest {
                name: name.into(),
                target: Some(target),
                partition,
            })
            .await
            .map_err(status)?
            .into_inner()
            .partitions
            .into_iter()
            .map(|p| (p.partition, p.offset))
            .collect())
    }
}

/// A record acquired from a subscription (or pushed in offset mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// The record's timestamp, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// This delivery's number (1 for the first; 0 in offset mode).
    pub delivery_count: u32,
    /// The lock's end, ms since the Unix epoch (0 in offset mode).
    pub lock_deadline_ms: i64,
}

impl QueueRecord {
    fn from_pb(r: pb::ReceivedRecord) -> Option<QueueRecord> {
        let rec = r.record?;
        Some(QueueRecord {
            partition: r.partition,
            offset: rec.offset,
            timestamp_ms: rec.timestamp_ms,
            key: rec.key,
            value: rec.value,
            headers: rec.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            delivery_count: r.delivery_count,
            lock_deadline_ms: r.lock_deadline_ms,
        })
    }
}

/// `(partition, offset)` pairs as the fewest inclusive ranges.
pub fn ranges(records: &[(u32, u64)]) -> Vec<pb::AckRange> {
    let mut sorted = records.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<pb::AckRange> = Vec::new();
    for (p, o) in sorted {
        match out.last_mut() {
            Some(r) if r.partition == p && r.last_offset + 1 == o => r.last_offset = o,
            _ => out.push(pb::AckRange {
                partition: p,
                first_offset: o,
                last_offset: o,
            }),
        }
    }
    out
}

/// A consumer of a queue subscription: receives records under locks and acknowledges
/// them one by one.
#[derive(Debug, Clone)]
pub struct QueueConsumer {
    conn: Connection,
    subscription: String,
    consumer_id: String,
}

impl QueueConsumer {
    /// Consumer `consumer_id` of `subscription` on `conn`.
    pub fn new(conn: Connection, subscription: &str, consumer_id: &str) -> Self {
        QueueConsumer {
            conn,
            subscription: subscription.into(),
            consumer_id: consumer_id.into(),
        }
    }

    /// Up to `max_records` records, waiting up to `max_wait_ms` for the first.
    pub async fn receive(&self, max_records: u32, max_wait_ms: u32) -> Result<Vec<QueueRecord>> {
        let r = self
            .conn
            .subscriptions()
            .receive(pb::ReceiveRequest {
                subscription: self.subscription.clone(),
                consumer_id: self.consumer_id.clone(),
                max_records,
                max_wait_ms,
                max_bytes: 0,
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok(r.records
            .into_iter()
            .filter_map(QueueRecord::from_pb)
            .collect())
    }

    async fn acknowledge(
        &self,
        records: &[(u32, u64)],
        kind: pb::AckType,
        delay_ms: u32,
        error: &str,
    ) -> Result<pb::AcknowledgeResponse> {
        Ok(self
            .conn
            .subscriptions()
            .acknowledge(pb::AcknowledgeRequest {
                subscription: self.subscription.clone(),
                consumer_id: self.consumer_id.clone(),
                ranges: ranges(records),
                r#type: kind as i32,
                delay_ms,
                error: error.into(),
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Done with these `(partition, offset)` records.
    pub async fn ack(&self, records: &[(u32, u64)]) -> Result<()> {
        self.acknowledge(records, pb::AckType::Ack, 0, "").await?;
        Ok(())
    }

    /// Releases them, deliverable again after `delay_ms`; `error` is kept as their last error.
    pub async fn nack(&self, records: &[(u32, u64)], delay_ms: u32, error: &str) -> Result<()> {
        self.acknowledge(records, pb::AckType::Nack, delay_ms, error)
            .await?;
        Ok(())
    }

    /// Dead-letters them now.
    pub async fn reject(&self, records: &[(u32, u64)], error: &str) -> Result<()> {
        self.acknowledge(records, pb::AckType::Reject, 0, error)
            .await?;
        Ok(())
    }

    /// Renews their locks; returns the new deadline (ms since the Unix epoch).
    pub async fn extend(&self, records: &[(u32, u64)]) -> Result<i64> {
        Ok(self
            .acknowledge(records, pb::AckType::Extend, 0, "")
            .await?
            .lock_deadline_ms)
    }
}

/// What a push stream delivers.
#[derive(Debug, Clone)]
pub enum PushTarget {
    /// Queue mode: a subscription's records, acquired for this consumer id.
    Subscription {
        /// The subscription.
        name: String,
        /// The consumer id.
        consumer_id: String,
    },
    /// Offset mode: a group's topic from its committed offsets.
    Group {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
    },
}

/// Records pushed by the broker. The stream keeps a window of `window_records` credits
/// (and `window_bytes`) granted: it grants again as records are taken, so the broker never
/// holds more than the window toward this client.
pub struct PushStream {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    inbound: tonic::Streaming<pb::SubscribeResponse>,
    window_records: u64,
    window_bytes: u64,
    taken_records: u64,
    taken_bytes: u64,
    next_ack: u64,
}

impl std::fmt::Debug for PushStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushStream")
            .field("window_records", &self.window_records)
            .finish_non_exhaustive()
    }
}

impl PushStream {
    /// Opens a push stream for `target` with a window of `window_records` records and
    /// `window_bytes` bytes.
    pub async fn open(
        conn: &Connection,
        target: PushTarget,
        window_records: u64,
        window_bytes: u64,
    ) -> Result<PushStream> {
        if window_records == 0 || window_bytes == 0 {
            return Err(ClientError::Invalid(
                "a push window needs at least one record and one byte".into(),
            ));
        }
        let (tx, rx) = mpsc::channel(16);
        let (target, consumer_id) = match target {
            PushTarget::Subscription { name, consumer_id } => {
                (pb::subscribe_start::Target::Subscription(name), consumer_id)
            }
            PushTarget::Group { group, topic } => (
                pb::subscribe_start::Target::Group(pb::GroupTarget {
                    group,
                    topic,
                    partitions: Vec::new(),
                }),
                String::new(),
            ),
        };
        let closed = |_| ClientError::Closed;
        tx.send(pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Start(pb::SubscribeStart {
                target: Some(target),
                consumer_id,
            })),
        })
        .await
        .map_err(closed)?;
        tx.send(credits(window_records, window_bytes))
            .await
            .map_err(closed)?;
        let inbound = conn
            .subscriptions()
            .subscribe(ReceiverStream::new(rx))
            .await
            .map_err(status)?
            .into_inner();
        Ok(PushStream {
            tx,
            inbound,
            window_records,
            window_bytes,
            taken_records: 0,
            taken_bytes: 0,
            next_ack: 0,
        })
    }

    /// The next pushed record; `None` when the broker ended the stream.
    pub async fn next(&mut self) -> Result<Option<QueueRecord>> {
        loop {
            let Some(msg) = self.inbound.message().await.map_err(status)? else {
                return Ok(None);
            };
            let Some(pb::subscribe_response::Kind::Record(r)) = msg.kind else {
                // Ack results: this stream sends acks without waiting for them.
                continue;
            };
            let Some(r) = QueueRecord::from_pb(r) else {
                continue;
            };
            self.taken_records += 1;
            self.taken_bytes += (r.value.len() + r.key.as_ref().map_or(0, |k| k.len())) as u64;
            // Re-grant once half the window was used.
            if self.taken_records * 2 >= self.window_records
                || self.taken_bytes * 2 >= self.window_bytes
            {
                let grant = credits(self.taken_records.max(1), self.taken_bytes.max(1));
                self.taken_records = 0;
                self.taken_bytes = 0;
                self.tx.send(grant).await.map_err(|_| ClientError::Closed)?;
            }
            return Ok(Some(r));
        }
    }

    /// Ends the stream cleanly: the broker applies the acks sent so far, then ends its side.
    /// Records pushed meanwhile and not acknowledged return when their locks expire.
    pub async fn close(self) -> Result<()> {
        let PushStream {
            tx, mut inbound, ..
        } = self;
        drop(tx);
        let drain = async {
            while let Some(_msg) = inbound.message().await.map_err(status)? {}
            Ok::<(), ClientError>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), drain).await {
            Ok(r) => r,
            // The broker did not end its side in time; dropping the stream cancels it.
            Err(_) => Ok(()),
        }
    }

    /// Acknowledges `(partition, offset)` records on the stream (queue mode); the outcome
    /// arrives on the stream and is not waited for.
    pub async fn ack(&mut self, records: &[(u32, u64)]) -> Result<()> {
        self.next_ack += 1;
        self.tx
            .send(pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Ack(pb::StreamAck {
                    sequence: self.next_ack,
                    ranges: ranges(records),
                    r#type: pb::AckType::Ack as i32,
                    delay_ms: 0,
                    error: String::new(),
                })),
            })
            .await
            .map_err(|_| ClientError::Closed)
    }
}

fn credits(records: u64, bytes: u64) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Credits(pb::Credits {
            records,
            bytes,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_the_fewest_ranges() {
        let r = ranges(&[(0, 5), (0, 3), (0, 4), (1, 4), (0, 9), (0, 4)]);
        let got: Vec<(u32, u64, u64)> = r
            .iter()
            .map(|r| (r.partition, r.first_offset, r.last_offset))
            .collect();
        assert_eq!(got, vec![(0, 3, 5), (0, 9, 9), (1, 4, 4)]);
    }
}
