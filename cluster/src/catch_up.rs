//! Snapshot catch-up of a replicated partition's data: a follower behind a purged Raft log
//! receives a snapshot that is only the partition's end offset (`next_offset`); before the
//! snapshot is installed, [`pull`] copies the committed records it lacks from another
//! replica's partition log with the ordinary `Log.Fetch` RPC (raw stored batches), so the
//! follower's log reaches that offset with the same records at the same offsets.
//!
//! Every replica's partition log holds only committed records, so any replica whose log
//! reaches the snapshot's offset is a valid source; the replicas are tried in turn. Each
//! committed Raft entry is one batch on every replica, so batches line up: the first batch a
//! source returns must start exactly at this replica's end, or the logs disagree and the pull
//! fails (the group then stops here, as it would have without the pull). A pulled batch is
//! appended as a copy ([`PartitionLog::append_copy`]): its idempotent producer's fields are
//! recorded, not checked, since a restarted log has no state for producers whose earlier
//! batches were deleted.
//!
//! A source may have deleted the records this replica lacks by retention (its log starts
//! past this replica's end: its Fetch answers OUT_OF_RANGE, and `Log.ListOffsets` gives its
//! log start). Every record below a source's log start was committed (a replica's log holds
//! only committed records) and the source deleted it, so this replica restarts its own log
//! empty at that start ([`PartitionLog::restart_at`]) and pulls from there: a "snapshot" of a
//! log is its start offset.
//!
//! A restarted log lost its idempotent producers' state with the records, and the copies
//! rebuild it only for their own producers. So it also adopts a source's state: the
//! `AppliedPoint` reply carries the source's state as of its log end `S` (read together), and
//! the log pulls the records up to `S`, then installs the state as of `S`
//! ([`PartitionLog::restore_producers`], durable when it returns). [`learn`] does that when
//! the log's state is missing, and a snapshot install asks for it with
//! [`adopt_producer_state`] (see `docs/REPLICATION.md`, "Producer state of a restarted
//! log").
//!
//! The snapshot openraft sends may be older than the sources' log start (retention ran since
//! it was built). Then the log restarts past the snapshot's end, and the Raft entries between
//! the two, which follow the snapshot, must be applied although their records are gone here.
//! A plain batch always appended, so its records are simply counted; an idempotent
//! producer's batch may have appended nothing (a deduplicated retry, a refused sequence),
//! which only its records could tell. So the machine asks instead, with [`learn`]: another
//! replica's *applied point* (`rill.v1.Raft/AppliedPoint`: a Raft index `A` and the end `H`
//! of the records the entries up to `A` produced, read together) at or past the entry. It
//! pulls the records up to `H` from that replica, and applies every entry up to `A` as held
//! already, then goes on from `H`. The same holds when this replica's own retention deleted
//! records past its last snapshot and it restarted. All replicas apply the same committed
//! entries, so the point is true on every replica; refusing instead would be fatal (a failed
//! apply or install stops the replica's Raft group).

use std::io;
use std::time::Duration;

use backon::BackoffBuilder;
use rill_proto::v1::list_offsets_request::Spec;
use rill_proto::v1::log_client::LogClient;
use rill_proto::v1::raft_client::RaftClient;
use rill_proto::v1::{
    AppliedPointRequest, FetchEncoding, FetchRequest, ListOffsetsRequest, OffsetSpec,
};
use rill_storage::batch::BatchHeader;
use rill_storage::PartitionLog;
use serde::{Deserialize, Serialize};

use crate::partition::LocalTopics;
use crate::types::{GroupId, NodeId};

/// How long one fetch from a source replica may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes asked for by one fetch.
const FETCH_MAX_BYTES: u32 = 4 << 20;
/// How long [`learn`] keeps asking the other replicas (they may be restarting too) before
/// the apply that needs the point fails.
const LEARN_DEADLINE: Duration = Duration::from_secs(60);

/// Where a replica's partition can pull the records it lacks from.
#[derive(Clone)]
pub struct CatchUp {
    /// The other replicas, node id and address (`host:port`), in the order to try them.
    pub sources: Vec<(NodeId, String)>,
    /// The partition's Raft group.
    pub group: GroupId,
    /// This broker's node id (named in the requests to the others).
    pub node_id: NodeId,
    /// The runtime the pulls run on (the caller is a blocking thread of it).
    pub runtime: tokio::runtime::Handle,
    /// How to reach the other replicas: TLS and the cluster token when the cluster uses them
    /// (a secured replica refuses an anonymous fetch).
    pub transport: crate::network::PeerTransport,
}

/// The partition a pull fills.
pub struct Target<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: u32,
    /// Its local log.
    pub log: &'a PartitionLog,
    /// The broker's topics, told of each append (to wake waiting fetches).
    pub local: &'a dyn LocalTopics,
}

/// Appends to `target`'s log the committed records from its end up to `until`, fetched
/// from the first source that has them. Blocking: runs the fetches on the catch-up's runtime
/// from the calling (blocking) thread.
pub fn pull(catch_up: &CatchUp, target: &Target<'_>, until: u64) -> io::Result<()> {
    let mut failures = Vec::new();
    for (_, source) in &catch_up.sources {
        if target.log.high_watermark() >= until {
            break;
        }
        let result =
            catch_up
                .runtime
                .block_on(pull_from(&catch_up.transport, source, target, until));
        match result {
            Ok(()) => {}
            Err(e) => failures.push(format!("{source}: {e}")),
        }
    }
    let end = target.log.high_watermark();
    if end >= until {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "topic {} partition {}: this replica's log ends at {end}, the snapshot at {until}, and no replica supplied the records ({})",
        target.topic,
        target.partition,
        failures.join("; ")
    )))
}

/// Pulls from one source until the log reaches `until` or the source has nothing more.
async fn pull_from(
    transport: &crate::network::PeerTransport,
    source: &str,
    target: &Target<'_>,
    until: u64,
) -> io::Result<()> {
    let channel = transport.connect_lazy(source).map_err(io::Error::other)?;
    let mut client =
        LogClient::new(channel).max_decoding_message_size(2 * FETCH_MAX_BYTES as usize);
    loop {
        let end = target.log.high_watermark();
        if end >= until {
            return Ok(());
        }
        let fetch = client.fetch(FetchRequest {
            topic: target.topic.to_string(),
            partition: target.partition,
            offset: end,
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: FETCH_MAX_BYTES,
            max_records: 0,
            encoding: FetchEncoding::RawBatches as i32,
        });
        // The channel connects lazily and has no timeout of its own: bound each fetch here.
        let resp = tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| {
                io::Error::other(format!("fetch at {end}: no answer in {FETCH_TIMEOUT:?}"))
            })?;
        let resp = match resp {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                // Below the source's log start (or past its end): ask where it starts.
                let start = log_start(&mut client, target, end).await?;
                restart_at_source_start(target, end, start)?;
                continue;
            }
            Err(s) => return Err(io::Error::other(format!("fetch at {end}: {}", s.message()))),
        };
        if resp.log_start_offset > end {
            restart_at_source_start(target, end, resp.log_start_offset)?;
            continue;
        }
        if resp.batches.is_empty() {
            return Err(io::Error::other(format!(
                "it has nothing at {end} (its high watermark is {})",
                resp.high_watermark
            )));
        }
        for batch in &resp.batches {
            let header = BatchHeader::parse(batch).map_err(io::Error::other)?;
            let end = target.log.high_watermark();
            if end >= until {
                return Ok(());
            }
            let batch_end = header.base_offset + u64::from(header.record_count);
            if batch_end <= end {
                continue; // held already
            }
            if header.base_offset != end || batch_end > until {
                return Err(io::Error::other(format!(
                    "its batch at {}..{batch_end} does not line up with this replica's end {end} and the snapshot's {until}",
                    header.base_offset
                )));
            }
            let info = target.log.append_copy(batch).map_err(io::Error::other)?;
            target
                .local
                .appended(target.topic, target.partition, info.next_offset);
        }
    }
}

/// The source's log start offset, by `Log.ListOffsets`.
async fn log_start(
    client: &mut LogClient<crate::network::PeerChannel>,
    target: &Target<'_>,
    end: u64,
) -> io::Result<u64> {
    let list = client.list_offsets(ListOffsetsRequest {
        topic: target.topic.to_string(),
        partition: target.partition,
        spec: Some(Spec::Position(OffsetSpec::Earliest as i32)),
    });
    let resp = tokio::time::timeout(FETCH_TIMEOUT, list)
        .await
        .map_err(|_| {
            io::Error::other(format!(
                "fetch at {end} was out of range, and its log start: no answer in {FETCH_TIMEOUT:?}"
            ))
        })?
        .map_err(|s| {
            io::Error::other(format!(
                "fetch at {end} was out of range, and its log start: {}",
                s.message()
            ))
        })?
        .into_inner();
    Ok(resp.log_start_offset)
}

/// Restarts the target's log empty at `start`, the source's log start, when the source
/// deleted the records from this replica's `end` on (every record below `start` was
/// committed, and is gone there). `start` may be past the snapshot's end: see the module
/// notes.
fn restart_at_source_start(target: &Target<'_>, end: u64, start: u64) -> io::Result<()> {
    if start <= end {
        return Err(io::Error::other(format!(
            "a fetch at {end} was out of range though its log starts at {start}"
        )));
    }
    tracing::warn!(
        topic = target.topic, partition = target.partition, end, start,
        "the records this replica lacks were deleted by retention on its source: restarting the local log at the source's log start"
    );
    target.log.restart_at(start).map_err(io::Error::other)?;
    target.local.appended(target.topic, target.partition, start);
    Ok(())
}

/// An applied point: on every replica, the Raft entries up to `index` produce the records
/// below offset `end` (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPoint {
    /// The index of the last Raft entry covered.
    pub index: u64,
    /// The end offset of the records the entries up to `index` produced.
    pub end: u64,
}

/// Learns from another replica an applied point at or past Raft entry `index`, and pulls
/// from that replica the records below the point's end that `target`'s log lacks (restarting
/// the log at the replica's log start if retention deleted them there too), and adopts its
/// producer state if the log's is missing (see `take`). Asks the replicas in turn, preferring
/// one that sends its producer state, again and again with a growing pause, for up to
/// [`LEARN_DEADLINE`]: a replica that has not applied that far yet may soon have. Blocking:
/// runs on the catch-up's runtime from the calling (blocking) thread.
pub fn learn(catch_up: &CatchUp, target: &Target<'_>, index: u64) -> io::Result<AppliedPoint> {
    catch_up.runtime.block_on(async {
        let until = tokio::time::Instant::now() + LEARN_DEADLINE;
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let mut failures = Vec::new();
            // A replica that answers without its producer state is used only when none
            // answers with it (see `take`); one that sent it but could not be taken from
            // (retention moved meanwhile) is asked again in the next round instead.
            let mut stateless = None;
            let mut stateful = false;
            for (id, address) in &catch_up.sources {
                match ask(catch_up, *id, address, index).await {
                    Ok(answer) if answer.producer_states.is_none() => {
                        stateless.get_or_insert((*id, address, answer));
                    }
                    Ok(answer) => {
                        stateful = true;
                        match take(catch_up, *id, address, target, answer).await {
                            Ok(point) => return Ok(point),
                            Err(e) => failures.push(format!("node {id} at {address}: {e}")),
                        }
                    }
                    Err(e) => failures.push(format!("node {id} at {address}: {e}")),
                }
            }
            if let Some((id, address, answer)) = stateless.filter(|_| !stateful) {
                match take(catch_up, id, address, target, answer).await {
                    Ok(point) => return Ok(point),
                    Err(e) => failures.push(format!("node {id} at {address}: {e}")),
                }
            }
            let pause = pauses.next().unwrap_or(Duration::from_secs(2));
            tracing::warn!(
                topic = target.topic, partition = target.partition, index,
                failures = failures.join("; "),
                "no replica reported an applied point covering this Raft entry yet: asking again"
            );
            if tokio::time::Instant::now() + pause >= until {
                return Err(io::Error::other(format!(
                    "topic {} partition {}: the records of Raft entry {index} are below this replica's log start {} and no replica reported an applied point at or past it within {LEARN_DEADLINE:?} ({})",
                    target.topic,
                    target.partition,
                    target.log.log_start_offset(),
                    failures.join("; ")
                )));
            }
            tokio::time::sleep(pause).await;
        }
    })
}

/// Adopts another replica's idempotent-producer state for `target`'s log, which restarted
/// past records deleted by retention and has none whole
/// ([`PartitionLog::producer_state_missing`]): asks the replicas for their applied point
/// (any point: it carries the state) and pulls the records up to the state's offset from the
/// one that answers, as [`learn`] does. Blocking, like [`learn`].
pub fn adopt_producer_state(catch_up: &CatchUp, target: &Target<'_>) -> io::Result<()> {
    learn(catch_up, target, 0).map(|_| ()).map_err(|e| {
        io::Error::other(format!(
            "adopting another replica's idempotent-producer state after a restart of the log: {e}"
        ))
    })
}

/// One replica's answer to `AppliedPoint`.
struct Answer {
    point: AppliedPoint,
    /// Its producer state (the storage's snapshot encoding), if it sent one.
    producer_states: Option<Vec<u8>>,
}

/// Asks node `id` at `address` for its applied point, which must be at or past Raft entry
/// `index`.
async fn ask(catch_up: &CatchUp, id: NodeId, address: &str, index: u64) -> io::Result<Answer> {
    let channel = catch_up
        .transport
        .connect_lazy(address)
        .map_err(io::Error::other)?;
    let mut client = RaftClient::new(channel);
    let ask = client.applied_point(AppliedPointRequest {
        group_id: catch_up.group,
        from_node: catch_up.node_id,
        to_node: id,
    });
    let reply = tokio::time::timeout(FETCH_TIMEOUT, ask)
        .await
        .map_err(|_| io::Error::other(format!("no applied point in {FETCH_TIMEOUT:?}")))?
        .map_err(|s| io::Error::other(format!("applied point: {}", s.message())))?
        .into_inner();
    if reply.applied_index < index {
        return Err(io::Error::other(format!(
            "it has applied up to Raft entry {} only",
            reply.applied_index
        )));
    }
    Ok(Answer {
        point: AppliedPoint {
            index: reply.applied_index,
            end: reply.applied_end,
        },
        // An older broker leaves the field out, which decodes as empty; a whole state is
        // never empty (it holds at least its header).
        producer_states: (!reply.producer_states.is_empty())
            .then(|| reply.producer_states.to_vec()),
    })
}

/// Takes node `id`'s answer: pulls from it the records below the point's end that
/// `target`'s log lacks (restarting the log at its log start if retention deleted them there
/// too); then, if the log's producer state is missing (it restarted, now or before), pulls on
/// to the offset the answer's state covers and adopts that state
/// ([`PartitionLog::restore_producers`], durable when it returns). An answer without a state
/// (an older broker, or one whose own state is incomplete) leaves the log with the state its
/// copied batches built, as before this state was sent, and says so in the log.
async fn take(
    catch_up: &CatchUp,
    id: NodeId,
    address: &str,
    target: &Target<'_>,
    answer: Answer,
) -> io::Result<AppliedPoint> {
    let point = answer.point;
    // Its log holds every record below the point's end from its log start on; a restart
    // at that start may leave this log past the point's end, which is still exact (the
    // machine then learns again for the entries after the point).
    pull_from(&catch_up.transport, address, target, point.end).await?;
    if target.log.producer_state_missing() {
        match &answer.producer_states {
            Some(bytes) => {
                let offset = rill_storage::producers::snapshot_offset(bytes).ok_or_else(|| {
                    io::Error::other("its producer state fails its checks".to_string())
                })?;
                // The records the state describes first: it is adopted as of their end.
                pull_from(&catch_up.transport, address, target, offset).await?;
                target
                    .log
                    .restore_producers(bytes)
                    .map_err(io::Error::other)?;
            }
            None => tracing::warn!(
                topic = target.topic, partition = target.partition, node = id,
                "the replica answered without its idempotent-producer state (an older broker, or its own state is incomplete): this replica keeps the state of the records it copied, so a producer whose batches all lie below its log start is unknown here"
            ),
        }
    }
    tracing::info!(
        topic = target.topic,
        partition = target.partition,
        node = id,
        index = point.index,
        end = point.end,
        "learned which Raft entries the records pulled past retention hold"
    );
    Ok(point)
}
