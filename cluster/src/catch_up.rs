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
//! fails (the group then stops here, as it would have without the pull).
//!
//! A source may have deleted the records this replica lacks by retention (its log starts
//! past this replica's end: its Fetch answers OUT_OF_RANGE, and `Log.ListOffsets` gives its
//! log start). Every record below a source's log start was committed (a replica's log holds
//! only committed records) and the source deleted it, so this replica restarts its own log
//! empty at that start ([`PartitionLog::restart_at`]) and pulls from there: a "snapshot" of a
//! log is its start offset.
//!
//! The snapshot openraft sends may be older than the sources' log start (retention ran since
//! it was built). Then the log restarts past the snapshot's end, and the Raft entries between
//! the two, which follow the snapshot, are applied as records the log already holds (the
//! machine's replay path): their offsets stay those every replica gave them. Refusing instead
//! would be fatal: a failed install stops the replica's Raft group.

use std::io;
use std::time::Duration;

use rill_proto::v1::list_offsets_request::Spec;
use rill_proto::v1::log_client::LogClient;
use rill_proto::v1::{FetchEncoding, FetchRequest, ListOffsetsRequest, OffsetSpec};
use rill_storage::batch::BatchHeader;
use rill_storage::PartitionLog;

use crate::partition::LocalTopics;

/// How long one fetch from a source replica may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes asked for by one fetch.
const FETCH_MAX_BYTES: u32 = 4 << 20;

/// Where a replica's partition can pull the records it lacks from.
#[derive(Clone)]
pub struct CatchUp {
    /// The addresses (`host:port`) of the other replicas, in the order to try them.
    pub sources: Vec<String>,
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
    for source in &catch_up.sources {
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
            let info = target.log.append(batch).map_err(io::Error::other)?;
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
