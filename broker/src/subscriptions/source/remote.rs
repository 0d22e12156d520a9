//! Reading a partition from (and producing to) the broker that holds it, over the peer
//! transport: calls that follow `rill-leader`, retry elsewhere and later with backoff
//! (backon) until a deadline, and pause the partition after a failure. See the parent module.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use parking_lot::Mutex;
use rill_proto::v1::log_client::LogClient;
use rill_proto::v1::{self as pb, FetchedRecord};
use tokio::time::Instant;
use tonic::{Code, Status};

use super::super::read;
use super::Bounds;
use crate::error::{BrokerError, LEADER_METADATA_KEY};
use crate::state::Broker;

/// How long one remote call (with its retries) may take before the pass gives up on the
/// partition.
pub const REMOTE_CALL_DEADLINE_MS: u64 = 2_000;
/// How long a partition whose remote read failed is skipped.
pub const PAUSE_AFTER_FAILURE_MS: u64 = 1_000;
/// The longest one remote long poll waits (then it is made again).
pub const REMOTE_WAIT_MS: u32 = 5_000;
/// Redirects followed by one call (a leader moving during the call).
const MAX_REDIRECTS: usize = 4;
/// Bytes one read of given offsets asks for, as the local read of given offsets does.
const READ_AT_BYTES: usize = 64 << 10;
/// Records one fetch of given offsets asks for at most.
const READ_AT_RECORDS: u64 = 10_000;
/// The largest fetch answer accepted from a peer.
const MAX_ANSWER_BYTES: usize = 256 << 20;

/// Why a read from (or a write to) another broker failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No broker holding the partition answered before the deadline.
    #[error(
        "topic {topic} partition {partition}: no broker holding it answered within \
         {deadline_ms} ms (last tried {address}): {status}"
    )]
    Unreachable {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The last address tried.
        address: String,
        /// The call's deadline.
        deadline_ms: u64,
        /// The last answer.
        #[source]
        status: Status,
    },
    /// This broker knows no broker holding the partition yet.
    #[error(
        "topic {topic} partition {partition}: no broker holding it is known here yet (the \
         cluster's metadata is still arriving); retry"
    )]
    NoReplica {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// The broker holding the partition refused the call (its answer is kept).
    #[error("topic {topic} partition {partition}: the broker at {address} answered: {status}")]
    Refused {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The broker that answered.
        address: String,
        /// Its answer.
        #[source]
        status: Status,
    },
    /// The partition failed a moment ago and is skipped for a while.
    #[error(
        "topic {topic} partition {partition}: skipped for {left_ms} ms more after a failed \
         call to the broker holding it"
    )]
    Paused {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// How long the pause lasts still.
        left_ms: u64,
    },
}

impl RemoteError {
    /// The code of the answer a refusal carried.
    fn refused_code(&self) -> Option<Code> {
        match self {
            RemoteError::Refused { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

impl From<RemoteError> for BrokerError {
    fn from(e: RemoteError) -> Self {
        match e.refused_code() {
            // The holder's own answer (a topic deleted meanwhile, bad input) keeps its code.
            Some(code) => BrokerError::Forwarded(code, e.to_string()),
            None => BrokerError::ReplicationUnavailable(e.to_string()),
        }
    }
}

/// A boxed call to a peer.
pub type Call<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;

/// The calls a remote source makes to the broker at an address.
pub trait Peer: Send + Sync {
    /// `Log.Fetch`, answered within `timeout`.
    fn fetch(
        &self,
        address: &str,
        req: pb::FetchRequest,
        timeout: Duration,
    ) -> Call<pb::FetchResponse>;
    /// `Log.ListOffsets`.
    fn list_offsets(
        &self,
        address: &str,
        req: pb::ListOffsetsRequest,
    ) -> Call<pb::ListOffsetsResponse>;
    /// `Log.Produce`.
    fn produce(&self, address: &str, req: pb::ProduceRequest) -> Call<pb::ProduceResponse>;
}

/// The peer transport of a broker: the channels [`crate::internal::channel`] keeps, with the
/// cluster token (the receiving broker authorizes the call as a broker).
#[derive(Debug, Clone)]
pub struct BrokerPeer(pub Broker);

impl BrokerPeer {
    fn client(
        &self,
        address: &str,
    ) -> Result<LogClient<rill_cluster::network::PeerChannel>, Status> {
        let channel = crate::internal::channel(&self.0, address).map_err(Status::from)?;
        Ok(LogClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES))
    }
}

fn timed<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

impl Peer for BrokerPeer {
    fn fetch(
        &self,
        address: &str,
        req: pb::FetchRequest,
        timeout: Duration,
    ) -> Call<pb::FetchResponse> {
        let client = self.client(address);
        Box::pin(async move { Ok(client?.fetch(timed(req, timeout)).await?.into_inner()) })
    }

    fn list_offsets(
        &self,
        address: &str,
        req: pb::ListOffsetsRequest,
    ) -> Call<pb::ListOffsetsResponse> {
        let client = self.client(address);
        let timeout = Duration::from_millis(REMOTE_CALL_DEADLINE_MS);
        Box::pin(async move {
            Ok(client?
                .list_offsets(timed(req, timeout))
                .await?
                .into_inner())
        })
    }

    fn produce(&self, address: &str, req: pb::ProduceRequest) -> Call<pb::ProduceResponse> {
        let client = self.client(address);
        let timeout = Duration::from_millis(REMOTE_CALL_DEADLINE_MS * 5);
        Box::pin(async move { Ok(client?.produce(timed(req, timeout)).await?.into_inner()) })
    }
}

/// What a subscription last learnt about a remote partition.
#[derive(Debug, Default, Clone)]
struct Place {
    /// The broker that answered last, or was named as the leader.
    address: Option<String>,
    /// The bounds the last answer carried.
    bounds: Option<Bounds>,
    /// Skipped until then after a failure.
    paused_until: Option<Instant>,
}

/// A subscription's (or a group push stream's) knowledge of the partitions it reads
/// remotely, and its failure count.
#[derive(Debug, Default)]
pub struct Remotes {
    /// A plain lock: never held across an await.
    places: Mutex<BTreeMap<(String, u32), Place>>,
    /// Shared when the failures are counted for more than this reader (every push stream of
    /// a group adds to the group's count).
    failures: Arc<AtomicU64>,
}

impl Remotes {
    /// Counting its failures into `failures`, which outlives it (a group's count, kept
    /// while its push streams come and go).
    pub fn counting_into(failures: Arc<AtomicU64>) -> Self {
        Remotes {
            places: Mutex::default(),
            failures,
        }
    }

    /// The bounds the last remote answer about partition `p` of `topic` carried, if any.
    pub fn bounds(&self, topic: &str, p: u32) -> Option<Bounds> {
        self.places
            .lock()
            .get(&(topic.to_string(), p))
            .and_then(|pl| pl.bounds)
    }

    /// Remote calls that failed (after their retries) since the subscription was loaded
    /// (or, with [`Remotes::counting_into`], into the shared count since it was made).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// One partition read from another broker.
#[derive(Clone)]
pub struct Remote<P: Peer = BrokerPeer> {
    peer: Arc<P>,
    topic: String,
    partition: u32,
    /// Where to look, in order: the broker this one names, then the partition's replicas.
    candidates: Vec<String>,
    remotes: Arc<Remotes>,
    /// How long one read (with its retries) may take.
    deadline_ms: u64,
}

impl<P: Peer> std::fmt::Debug for Remote<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("candidates", &self.candidates)
            .finish_non_exhaustive()
    }
}

/// Whether an answer is worth another try (elsewhere or later): the call never reached a
/// serving broker, or it was busy.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
    )
}

/// The leader a NotLeader answer names.
fn redirect(status: &Status) -> Option<String> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let v = status.metadata().get(LEADER_METADATA_KEY)?.to_str().ok()?;
    Some(v.to_string())
}

impl<P: Peer> Remote<P> {
    /// Partition `partition` of `topic` through `peer`, looked for at `candidates` first to
    /// last (duplicates dropped).
    pub fn new(
        peer: Arc<P>,
        topic: &str,
        partition: u32,
        candidates: Vec<String>,
        remotes: Arc<Remotes>,
    ) -> Self {
        let mut unique: Vec<String> = Vec::with_capacity(candidates.len());
        for c in candidates {
            if !unique.contains(&c) {
                unique.push(c);
            }
        }
        Remote {
            peer,
            topic: topic.to_string(),
            partition,
            candidates: unique,
            remotes,
            deadline_ms: REMOTE_CALL_DEADLINE_MS,
        }
    }

    /// The same, with reads given up after `deadline_ms` (tests).
    #[cfg(test)]
    fn with_deadline_ms(mut self, deadline_ms: u64) -> Self {
        self.deadline_ms = deadline_ms;
        self
    }

    fn place(&self) -> Place {
        self.remotes
            .places
            .lock()
            .get(&(self.topic.clone(), self.partition))
            .cloned()
            .unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Place)) {
        let key = (self.topic.clone(), self.partition);
        f(self.remotes.places.lock().entry(key).or_default());
    }

    /// The bounds the last answer carried.
    pub fn cached_bounds(&self) -> Option<Bounds> {
        self.place().bounds
    }

    fn note_bounds(&self, log_start: u64, high_watermark: u64) -> Bounds {
        let b = Bounds {
            log_start,
            high_watermark,
        };
        self.update(|pl| pl.bounds = Some(b));
        b
    }

    /// Makes `call` at the partition's broker: follows redirects, retries elsewhere and later
    /// until `deadline_ms`; on failure pauses the partition (when `pausing`).
    async fn call<T>(
        &self,
        deadline_ms: u64,
        pausing: bool,
        call: impl Fn(&str) -> Call<T>,
    ) -> Result<T, RemoteError> {
        let place = self.place();
        if pausing {
            if let Some(until) = place.paused_until {
                let now = Instant::now();
                if until > now {
                    return Err(RemoteError::Paused {
                        topic: self.topic.clone(),
                        partition: self.partition,
                        left_ms: (until - now).as_millis() as u64,
                    });
                }
            }
        }
        let Some(mut address) = place.address.or_else(|| self.candidates.first().cloned()) else {
            return Err(RemoteError::NoReplica {
                topic: self.topic.clone(),
                partition: self.partition,
            });
        };
        let until = Instant::now() + Duration::from_millis(deadline_ms);
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_millis(500))
            .with_jitter()
            .without_max_times()
            .build();
        let mut redirects = 0;
        loop {
            let status = match call(&address).await {
                Ok(v) => {
                    self.update(|pl| {
                        pl.address = Some(address);
                        pl.paused_until = None;
                    });
                    return Ok(v);
                }
                Err(status) => status,
            };
            if let Some(leader) = redirect(&status) {
                if leader != address && redirects < MAX_REDIRECTS {
                    redirects += 1;
                    address = leader;
                    continue;
                }
            }
            if !retryable(status.code()) {
                self.update(|pl| pl.address = Some(address.clone()));
                return Err(RemoteError::Refused {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    address,
                    status,
                });
            }
            let delay = delays.next().unwrap_or(Duration::from_millis(500));
            if Instant::now() + delay >= until {
                self.remotes.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.topic, partition = self.partition, address = %address, error = %status, "no broker holding the partition answered");
                self.update(|pl| {
                    // Start from the first candidate next time: the one that failed may be
                    // gone for good.
                    pl.address = None;
                    if pausing {
                        pl.paused_until =
                            Some(Instant::now() + Duration::from_millis(PAUSE_AFTER_FAILURE_MS));
                    }
                });
                return Err(RemoteError::Unreachable {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    address,
                    deadline_ms,
                    status,
                });
            }
            tokio::time::sleep(delay).await;
            // The next replica (or the same one, when it is the only one known).
            let at = self.candidates.iter().position(|c| *c == address);
            if let Some(next) = match at {
                Some(i) => self.candidates.get((i + 1) % self.candidates.len()),
                None => self.candidates.first(),
            } {
                address = next.clone();
            }
        }
    }

    /// The partition's bounds, asked now.
    pub async fn bounds(&self) -> Result<Bounds, RemoteError> {
        let req = pb::ListOffsetsRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            spec: Some(pb::list_offsets_request::Spec::Position(
                pb::OffsetSpec::Latest as i32,
            )),
        };
        let peer = &self.peer;
        let r = self
            .call(self.deadline_ms, true, |a| {
                peer.list_offsets(a, req.clone())
            })
            .await?;
        Ok(self.note_bounds(r.log_start_offset, r.high_watermark))
    }

    /// The first offset whose record is at or after `timestamp_ms` (the high watermark when
    /// none is).
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<u64, RemoteError> {
        let req = pb::ListOffsetsRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            spec: Some(pb::list_offsets_request::Spec::TimestampMs(timestamp_ms)),
        };
        let peer = &self.peer;
        let r = self
            .call(self.deadline_ms, true, |a| {
                peer.list_offsets(a, req.clone())
            })
            .await?;
        self.note_bounds(r.log_start_offset, r.high_watermark);
        Ok(r.offset)
    }

    async fn fetch(
        &self,
        offset: u64,
        max_records: u64,
        max_bytes: usize,
    ) -> Result<pb::FetchResponse, RemoteError> {
        let req = pb::FetchRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            max_wait_ms: 0,
            min_bytes: 0,
            // 0 would mean the server's limit: ask for at least a byte.
            max_bytes: u32::try_from(max_bytes.max(1)).unwrap_or(u32::MAX),
            max_records: u32::try_from(max_records.max(1)).unwrap_or(u32::MAX),
            encoding: pb::FetchEncoding::Records as i32,
        };
        let peer = &self.peer;
        let timeout = Duration::from_millis(REMOTE_CALL_DEADLINE_MS);
        let r = self
            .call(self.deadline_ms, true, |a| {
                peer.fetch(a, req.clone(), timeout)
            })
            .await?;
        self.note_bounds(r.log_start_offset, r.high_watermark);
        Ok(r)
    }

    /// Up to `max_records` records from `from` on within `max_bytes` (the first always), as
    /// [`read::read_from`] reads a local log, and the bounds the answer carried. From below
    /// the log start, reading starts at the log start.
    pub async fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<FetchedRecord>, Bounds), RemoteError> {
        let mut from = from.max(self.cached_bounds().map_or(0, |b| b.log_start));
        let mut retried = false;
        let resp = loop {
            match self.fetch(from, max_records as u64, max_bytes).await {
                Ok(r) => break r,
                Err(e) if e.refused_code() == Some(Code::OutOfRange) && !retried => {
                    // Retention moved the start past `from`, or the replica that answered is
                    // behind `from`: learn the bounds, and read from the start or not at all.
                    retried = true;
                    let b = self.bounds().await?;
                    if from >= b.high_watermark {
                        return Ok((Vec::new(), b));
                    }
                    from = from.max(b.log_start);
                }
                Err(e) => return Err(e),
            }
        };
        let bounds = Bounds {
            log_start: resp.log_start_offset,
            high_watermark: resp.high_watermark,
        };
        Ok((trim(resp.records, from, max_records, max_bytes), bounds))
    }

    /// The records at `offsets` (sorted, ascending) that the partition still holds, as
    /// [`read::read_at`] reads a local log.
    pub async fn read_at(&self, offsets: &[u64]) -> Result<Vec<FetchedRecord>, RemoteError> {
        let mut out = Vec::with_capacity(offsets.len());
        let mut bounds = self.cached_bounds();
        let mut i = 0;
        while i < offsets.len() {
            let o = offsets[i];
            if bounds.is_some_and(|b| o < b.log_start) {
                i += 1;
                continue;
            }
            let span = (offsets[offsets.len() - 1] - o + 1).min(READ_AT_RECORDS);
            let resp = match self.fetch(o, span, READ_AT_BYTES).await {
                Ok(r) => r,
                Err(e) if e.refused_code() == Some(Code::OutOfRange) => {
                    let b = self.bounds().await?;
                    if o >= b.high_watermark || bounds == Some(b) {
                        // Not there (yet, on the replica that answered): skip it.
                        i += 1;
                    }
                    bounds = Some(b);
                    continue;
                }
                Err(e) => return Err(e),
            };
            bounds = Some(Bounds {
                log_start: resp.log_start_offset,
                high_watermark: resp.high_watermark,
            });
            read::take_wanted(offsets, &mut i, resp.records, &mut out);
        }
        Ok(out)
    }

    /// Returns once the partition holds records at or past `from` (a long-poll fetch of at
    /// most [`REMOTE_WAIT_MS`], made again while nothing came), noting the bounds the
    /// answer carried. After a failed call it pauses, then returns, so the caller's next pass
    /// finds the error, without a loop that spins.
    pub async fn wait_past(&self, from: u64) {
        let req = pb::FetchRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: from,
            max_wait_ms: REMOTE_WAIT_MS,
            min_bytes: 1,
            max_bytes: 1,
            max_records: 1,
            encoding: pb::FetchEncoding::Records as i32,
        };
        let peer = &self.peer;
        let timeout = Duration::from_millis(u64::from(REMOTE_WAIT_MS) + REMOTE_CALL_DEADLINE_MS);
        loop {
            let answer = self
                .call(self.deadline_ms, false, |a| {
                    peer.fetch(a, req.clone(), timeout)
                })
                .await;
            match answer {
                Ok(r) => {
                    self.note_bounds(r.log_start_offset, r.high_watermark);
                    if r.high_watermark > from || !r.records.is_empty() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a long poll of another broker failed");
                    tokio::time::sleep(Duration::from_millis(PAUSE_AFTER_FAILURE_MS)).await;
                    return;
                }
            }
        }
    }

    /// Produces `req` (naming this partition) at the partition's leader.
    pub async fn produce(
        &self,
        req: pb::ProduceRequest,
    ) -> Result<pb::ProduceResponse, RemoteError> {
        let peer = &self.peer;
        self.call(self.deadline_ms * 5, false, |a| {
            peer.produce(a, req.clone())
        })
        .await
    }
}

/// `records` from `from` on, at most `max_records`, stopping before the record that would
/// take the total past `max_bytes` (the first always kept): the budget of
/// [`read::read_from`], which counts key and value bytes where a fetch counts stored bytes.
fn trim(
    records: Vec<FetchedRecord>,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Vec<FetchedRecord> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for r in records.into_iter().filter(|r| r.offset >= from) {
        let size = read::record_bytes(&r);
        if out.len() >= max_records || (!out.is_empty() && bytes + size > max_bytes) {
            break;
        }
        bytes += size;
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests;
