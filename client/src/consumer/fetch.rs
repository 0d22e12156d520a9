//! A subscribed partition's fetch task: it long-polls from its position and hands whole
//! responses (or a skip, or its final error) to the consumer's channel.

use std::time::Duration;

use rill_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

use super::{AutoOffsetReset, Slot};
use crate::admin::{Admin, OffsetQuery};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::retry::RetryPolicy;

/// What a fetch task hands the consumer; `generation` tells a stale task's leftovers (from
/// before a seek or a reassignment) from the current one's.
pub(super) enum Fetched {
    Records {
        slot: Slot,
        generation: u64,
        records: Vec<pb::FetchedRecord>,
        high_watermark: u64,
    },
    Skipped {
        slot: Slot,
        generation: u64,
        from: u64,
        to: u64,
        reason: String,
    },
    Failed {
        slot: Slot,
        generation: u64,
        error: ClientError,
    },
}

/// One partition's long-poll loop.
pub(super) struct FetchTask {
    pub(super) conn: Connection,
    /// The topic's name, for requests.
    pub(super) topic: String,
    /// The topic's index and the partition, for the consumer.
    pub(super) slot: Slot,
    pub(super) generation: u64,
    pub(super) reset: AutoOffsetReset,
    pub(super) max_wait_ms: u32,
    pub(super) max_bytes: u32,
    pub(super) tx: mpsc::Sender<Fetched>,
}

/// What one fetch attempt found.
enum Step {
    /// A response (possibly empty, when the long-poll timed out).
    Records(pb::FetchResponse),
    /// The position was out of range and the reset policy moved it.
    Skipped { from: u64, to: u64, reason: String },
    /// The position was out of range but the reset policy points at it again: the log
    /// grew up to it meanwhile, so fetching again succeeds.
    Again,
}

impl FetchTask {
    pub(super) async fn run(self, mut offset: u64) {
        let retry = RetryPolicy::fetch();
        loop {
            let step = retry.run("fetch", || self.fetch_once(offset)).await;
            let sent = match step {
                Ok(Step::Records(resp)) => {
                    if resp.records.is_empty() {
                        continue;
                    }
                    offset = resp.next_offset;
                    self.tx
                        .send(Fetched::Records {
                            slot: self.slot,
                            generation: self.generation,
                            records: resp.records,
                            high_watermark: resp.high_watermark,
                        })
                        .await
                }
                Ok(Step::Skipped { from, to, reason }) => {
                    offset = to;
                    self.tx
                        .send(Fetched::Skipped {
                            slot: self.slot,
                            generation: self.generation,
                            from,
                            to,
                            reason,
                        })
                        .await
                }
                Ok(Step::Again) => continue,
                Err(error) => {
                    let _ = self
                        .tx
                        .send(Fetched::Failed {
                            slot: self.slot,
                            generation: self.generation,
                            error,
                        })
                        .await;
                    return;
                }
            };
            if sent.is_err() {
                return; // the consumer is gone
            }
        }
    }

    /// One long-poll at `offset`; on OUT_OF_RANGE, where the reset policy moves it.
    async fn fetch_once(&self, offset: u64) -> Result<Step> {
        let mut request = tonic::Request::new(pb::FetchRequest {
            topic: self.topic.clone(),
            partition: self.slot.1,
            offset,
            max_wait_ms: self.max_wait_ms,
            max_bytes: self.max_bytes,
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(u64::from(self.max_wait_ms) + 10_000));
        match self.conn.log().fetch(request).await {
            Ok(resp) => Ok(Step::Records(resp.into_inner())),
            Err(status) if status.code() == Code::OutOfRange => {
                let query = match self.reset {
                    AutoOffsetReset::Earliest => OffsetQuery::Earliest,
                    AutoOffsetReset::Latest => OffsetQuery::Latest,
                };
                let found = Admin::new(self.conn.clone())
                    .list_offsets(&self.topic, self.slot.1, query)
                    .await?
                    .offset;
                if found == offset {
                    return Ok(Step::Again);
                }
                Ok(Step::Skipped {
                    from: offset,
                    to: found,
                    reason: status.message().to_string(),
                })
            }
            Err(status) => Err(ClientError::broker(
                Some(&self.topic),
                Some(self.slot.1),
                status,
            )),
        }
    }
}
