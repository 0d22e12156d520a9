//! A group's push stream (offset mode): each partition is read from the group's committed
//! offset on, from this broker's replica when it holds one (as on a single broker) or from
//! the broker holding it ([`Source::Remote`]: the same budgets, redirects, retries and
//! long polls as a subscription's remote reads). A member's partitions may be spread over
//! several brokers, so the stream cannot be redirected to one that holds them all: it reads
//! each where it is. A partition that cannot be read now is left out of the pass; the others
//! are pushed.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rill_proto::v1 as pb;

use super::super::read;
use super::super::source::{Bounds, Remote, Remotes, Source, REMOTE_CALL_DEADLINE_MS};
use crate::error::BrokerError;
use crate::internal::{self, Route};
use crate::state::{Broker, TopicState};

/// One partition of the stream.
#[derive(Debug)]
struct Part {
    source: Source,
    /// The group's committed offset when the stream started.
    committed: Option<u64>,
    /// The next offset to push; `None` until a remote partition's bounds are known (the
    /// committed offset is clamped to them).
    at: Option<u64>,
}

/// The partitions a group's push stream reads and where each stands.
#[derive(Debug)]
pub(super) struct Offsets {
    parts: BTreeMap<u32, Part>,
}

/// Where a partition's stream starts: the committed offset within the log's bounds, the
/// log start when the group committed none.
fn start_at(committed: Option<u64>, b: Bounds) -> u64 {
    committed
        .unwrap_or(b.log_start)
        .clamp(b.log_start, b.high_watermark)
}

/// Whether a partition may have records at `at`: not when its end as last seen (a local
/// log's now, a remote one's last answer) is at or before it. An unknown end is worth a
/// call.
fn may_have_records(at: u64, end: Option<Bounds>) -> bool {
    end.is_none_or(|b| at < b.high_watermark)
}

/// The offset a long poll of a remote partition waits past: the next to push, or the end
/// last seen when further (records there wait for credits, not for appends); 0 while the
/// position is unknown (its first answer wakes the stream to learn it).
fn wait_from(at: Option<u64>, seen: Option<Bounds>) -> u64 {
    at.unwrap_or(0).max(seen.map_or(0, |b| b.high_watermark))
}

/// `group`'s committed offsets of `partitions` of `topic`, as its coordinator knows them: read
/// here when this broker is the coordinator (or single), else asked of the coordinator over
/// the peer transport, since this broker's replica of `__groups` may lag a commit just made
/// (a member that took partitions over would be pushed records already handled).
pub(super) async fn committed(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: &[u32],
) -> Result<BTreeMap<u32, Option<u64>>, BrokerError> {
    let groups = broker.store().groups();
    let address = match internal::route(
        broker,
        rill_storage::groups::GROUPS_TOPIC,
        groups.partition_of(group),
    )? {
        Route::Here => {
            return Ok(partitions
                .iter()
                .map(|p| (*p, groups.fetch(group, topic, *p).map(|c| c.offset)))
                .collect())
        }
        Route::Leader(address) => address,
    };
    let mut client = pb::groups_client::GroupsClient::new(internal::channel(broker, &address)?);
    let mut req = tonic::Request::new(pb::FetchOffsetsRequest {
        group: group.to_string(),
        topic: topic.to_string(),
        partitions: partitions.to_vec(),
    });
    // A coordinator that hangs fails the stream's start (UNAVAILABLE, retried by the client)
    // rather than holding it.
    req.set_timeout(std::time::Duration::from_millis(REMOTE_CALL_DEADLINE_MS));
    let answer =
        internal::relayed(client.fetch_offsets(req).await).map_err(|s| match s.code() {
            tonic::Code::DeadlineExceeded => BrokerError::ReplicationUnavailable(format!(
                "group {group}'s coordinator at {address} did not answer within \
             {REMOTE_CALL_DEADLINE_MS} ms; retry"
            )),
            code => BrokerError::Forwarded(code, s.message().to_string()),
        })?;
    Ok(answer
        .into_inner()
        .offsets
        .into_iter()
        .map(|c| (c.partition, c.offset))
        .collect())
}

impl Offsets {
    /// `partitions` of `topic`, each from its `committed` offset (clamped to a local log's
    /// bounds now, to a remote one's at its first read), counting failed remote reads into
    /// `failures` (the group's count). NOT_FOUND for a partition the topic does not have.
    pub(super) fn new(
        broker: &Broker,
        topic: &TopicState,
        partitions: &[u32],
        committed: &BTreeMap<u32, Option<u64>>,
        failures: Arc<AtomicU64>,
    ) -> Result<Self, BrokerError> {
        // The stream's knowledge of its remote partitions (their broker, their last bounds).
        let remotes = Arc::new(Remotes::counting_into(failures));
        let mut parts = BTreeMap::new();
        for &p in partitions {
            let source = Source::of(broker, topic, p, &remotes)?;
            let committed = committed.get(&p).copied().flatten();
            let at = source.local_bounds().map(|b| start_at(committed, b));
            parts.insert(
                p,
                Part {
                    source,
                    committed,
                    at,
                },
            );
        }
        Ok(Offsets { parts })
    }

    /// Up to `max_records` records within `max_bytes` (never past it), partition by
    /// partition, advancing each partition's position past what it returns.
    pub(super) async fn read(
        &mut self,
        topic: &str,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<pb::ReceivedRecord>, BrokerError> {
        let mut out = Vec::new();
        let mut bytes_left = max_bytes;
        for (p, part) in self.parts.iter_mut() {
            if out.len() >= max_records || bytes_left == 0 {
                break;
            }
            let remote = matches!(part.source, Source::Remote(_));
            let at = match part.at {
                Some(at) => at,
                None => match part.source.bounds().await {
                    Ok(b) => *part.at.insert(start_at(part.committed, b)),
                    Err(e) => {
                        skipped(topic, *p, &e);
                        continue;
                    }
                },
            };
            if !may_have_records(at, part.source.last_bounds()) {
                continue;
            }
            let want = max_records - out.len();
            let got = match part.source.read_from(at, want, bytes_left).await {
                Ok(got) => got,
                // Another broker's partition that cannot be read now: the others go on.
                Err(e) if remote => {
                    skipped(topic, *p, &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            for r in got {
                let size = read::record_bytes(&r);
                if size > bytes_left {
                    break;
                }
                bytes_left -= size;
                part.at = Some(r.offset + 1);
                out.push(super::super::unlocked(*p, r));
            }
        }
        Ok(out)
    }

    /// Each remote partition and the offset its long poll waits past (see [`wait_from`]).
    pub(super) fn remote_waits(&self) -> Vec<(Remote, u64)> {
        self.parts
            .values()
            .filter_map(|part| match &part.source {
                Source::Remote(r) => Some((r.clone(), wait_from(part.at, r.cached_bounds()))),
                Source::Local(_) => None,
            })
            .collect()
    }
}

fn skipped(topic: &str, p: u32, e: &BrokerError) {
    // The failure itself was logged and counted (the group's
    // `rill_group_push_remote_read_failures_total`) where it happened; a pause after it is
    // quiet.
    tracing::debug!(topic = %topic, partition = p, error = %e, "a group push stream leaves out a partition held by another broker in this pass; pushing the others");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(log_start: u64, high_watermark: u64) -> Option<Bounds> {
        Some(Bounds {
            log_start,
            high_watermark,
        })
    }

    #[test]
    fn a_stream_starts_at_the_committed_offset_within_the_bounds() {
        let bounds = |s, h| b(s, h).expect("bounds");
        assert_eq!(
            start_at(None, bounds(5, 20)),
            5,
            "nothing committed: the log start"
        );
        assert_eq!(start_at(Some(12), bounds(5, 20)), 12);
        assert_eq!(start_at(Some(2), bounds(5, 20)), 5, "retention passed it");
        assert_eq!(start_at(Some(30), bounds(5, 20)), 20, "past the end");
    }

    #[test]
    fn a_partition_at_its_end_as_last_seen_is_not_read() {
        assert!(!may_have_records(20, b(0, 20)));
        assert!(may_have_records(19, b(0, 20)));
        assert!(may_have_records(20, None), "an unknown end is asked");
    }

    #[test]
    fn a_long_poll_waits_past_the_position_or_the_end_seen() {
        assert_eq!(wait_from(Some(7), b(0, 5)), 7);
        assert_eq!(
            wait_from(Some(3), b(0, 9)),
            9,
            "records short of credit must not wake the stream again and again"
        );
        assert_eq!(
            wait_from(None, None),
            0,
            "unknown: the first answer wakes it"
        );
        assert_eq!(wait_from(Some(4), None), 4);
    }
}
