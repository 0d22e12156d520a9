//! A subscribed partition's fetch task: it long-polls from its position and hands whole
//! responses (or a skip, or its final error) to the consumer's channel.
//!
//! In a cluster any replica of a partition serves its committed records, so a fetch task
//! moves rather than fails: a broker without a replica names one (`rill-leader`), and the
//! task goes there; a broker that stops answering is left for the next address of the
//! connection's bootstrap list. A replica reached that way may not yet hold the records
//! up to the task's position (it lags the one the task read from): OUT_OF_RANGE above its
//! end then means "wait", not "reset the position", for [`BEHIND_GRACE`] after a move.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use rill_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

use super::{AutoOffsetReset, Slot};
use crate::admin::{list_offsets_at, OffsetQuery};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::leaders::{leader_hint, Leaders};
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

/// How long after moving to another broker a position above that broker's end is taken
/// for a lagging replica (retried) rather than a position out of range (reset).
pub(super) const BEHIND_GRACE: Duration = Duration::from_secs(30);

/// The broker a fetch task reads from.
struct Source {
    conn: Connection,
    /// When the task last moved to another broker, until that broker answered records.
    moved_at: Option<Instant>,
}

/// One partition's long-poll loop.
pub(super) struct FetchTask {
    pub(super) conn: Connection,
    /// The consumer's partition leaders: the task starts at its partition's leader.
    pub(super) leaders: Arc<Leaders>,
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
        // In a cluster, the leader (which `Metadata` names, once per topic): it holds every
        // committed record, where a follower may lag; else the broker connected to.
        let first = self
            .leaders
            .find(&self.conn, &self.topic, self.slot.1)
            .await
            .unwrap_or_else(|| self.conn.clone());
        let source = Mutex::new(Source {
            conn: first,
            moved_at: None,
        });
        loop {
            let step = retry
                .run("fetch", || self.fetch_once(&source, offset))
                .await;
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

    /// One long-poll at `offset` from the source broker; on failure, moves the source to
    /// where the next attempt should go (see the module's doc).
    async fn fetch_once(&self, source: &Mutex<Source>, offset: u64) -> Result<Step> {
        let mut source = source.lock().await;
        let behind_ok = source
            .moved_at
            .is_some_and(|at| at.elapsed() < BEHIND_GRACE);
        let result = self.fetch_at(&source.conn, offset, behind_ok).await;
        match &result {
            Ok(Step::Records(_)) => source.moved_at = None,
            Ok(_) => {}
            Err(e) => {
                if let Some(next) = next_source(&source.conn, e).await {
                    tracing::debug!(
                        topic = %self.topic,
                        partition = self.slot.1,
                        from = source.conn.addr(),
                        to = next.addr(),
                        "fetching from another broker"
                    );
                    source.conn = next;
                    source.moved_at = Some(Instant::now());
                }
            }
        }
        result
    }

    /// The partition's offset that `query` names, as `conn`'s broker answers it.
    async fn offset_at(&self, conn: &Connection, query: OffsetQuery) -> Result<u64> {
        Ok(list_offsets_at(conn, &self.topic, self.slot.1, query)
            .await?
            .offset)
    }

    /// One long-poll at `offset` from `conn`; on OUT_OF_RANGE, where the reset policy moves
    /// it, unless `behind_ok` and the broker's log ends below `offset` (a lagging replica).
    async fn fetch_at(&self, conn: &Connection, offset: u64, behind_ok: bool) -> Result<Step> {
        let mut request = tonic::Request::new(pb::FetchRequest {
            topic: self.topic.clone(),
            partition: self.slot.1,
            offset,
            max_wait_ms: self.max_wait_ms,
            max_bytes: self.max_bytes,
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(u64::from(self.max_wait_ms) + 10_000));
        match conn.log().fetch(request).await {
            Ok(resp) => Ok(Step::Records(resp.into_inner())),
            Err(status) if status.code() == Code::OutOfRange => {
                if behind_ok {
                    let end = self.offset_at(conn, OffsetQuery::Latest).await?;
                    if end < offset {
                        return Err(ClientError::broker(
                            Some(&self.topic),
                            Some(self.slot.1),
                            tonic::Status::unavailable(format!(
                                "the replica at {} ends at offset {end}, before this \
                                 consumer's position {offset}: waiting for it to catch up",
                                conn.addr()
                            )),
                        ));
                    }
                }
                let query = match self.reset {
                    AutoOffsetReset::Earliest => OffsetQuery::Earliest,
                    AutoOffsetReset::Latest => OffsetQuery::Latest,
                };
                let found = self.offset_at(conn, query).await?;
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

/// Where a fetch that failed with `error` on `conn` should go next, if elsewhere: the
/// replica a non-replica named, or, when the broker did not answer (a broken or refused
/// connection, UNAVAILABLE), the next address of the bootstrap list that accepts a
/// connection. `None`: try the same broker again (or the error is final).
async fn next_source(conn: &Connection, error: &ClientError) -> Option<Connection> {
    if let ClientError::Broker { source, .. } = error {
        if let Some(hint) = leader_hint(source) {
            let next = conn.connect_like(&hint).await.ok()?;
            return Some(next.with_bootstrap(conn.bootstrap()));
        }
    }
    if !error.is_retryable() {
        return None;
    }
    conn.next_in_list().await
}
