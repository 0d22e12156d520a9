//! The remote source against a fake peer: budgets, offsets, redirects, retries and pauses.

use std::collections::HashMap;

use bytes::Bytes;

use super::*;

/// How the fake broker at an address answers.
#[derive(Clone)]
enum Behaviour {
    /// Holds the partition: records at offsets `log_start..high_watermark`, each value
    /// `value_bytes` long.
    Holds {
        log_start: u64,
        high_watermark: u64,
        value_bytes: usize,
    },
    /// Names another broker as the leader.
    Redirects(String),
    /// Does not answer.
    Down,
    /// Answers NOT_FOUND (the topic is gone).
    NotFound,
}

#[derive(Default)]
struct FakePeer {
    at: Mutex<HashMap<String, Behaviour>>,
    calls: Mutex<Vec<(String, &'static str)>>,
    produced: Mutex<Vec<(String, pb::ProduceRequest)>>,
}

impl FakePeer {
    fn with(entries: &[(&str, Behaviour)]) -> Arc<FakePeer> {
        let peer = FakePeer::default();
        for (a, b) in entries {
            peer.at.lock().insert(a.to_string(), b.clone());
        }
        Arc::new(peer)
    }

    fn calls_to(&self, address: &str) -> usize {
        self.calls
            .lock()
            .iter()
            .filter(|(a, _)| a == address)
            .count()
    }

    /// Notes the call; the holder's (log start, high watermark, value bytes), or the
    /// answer of a broker that does not hold it.
    fn reach(&self, address: &str, what: &'static str) -> Result<(u64, u64, usize), Status> {
        self.calls.lock().push((address.to_string(), what));
        let behaviour = self
            .at
            .lock()
            .get(address)
            .cloned()
            .unwrap_or(Behaviour::Down);
        match behaviour {
            Behaviour::Holds {
                log_start,
                high_watermark,
                value_bytes,
            } => Ok((log_start, high_watermark, value_bytes)),
            Behaviour::Redirects(to) => {
                let mut s = Status::failed_precondition("not the leader");
                s.metadata_mut()
                    .insert(LEADER_METADATA_KEY, to.parse().expect("ascii"));
                Err(s)
            }
            Behaviour::Down => Err(Status::unavailable("connection refused")),
            Behaviour::NotFound => Err(Status::not_found("topic t does not exist")),
        }
    }
}

fn ready<T: Send + 'static>(answer: Result<T, Status>) -> Call<T> {
    Box::pin(async move { answer })
}

fn record(offset: u64, value_bytes: usize) -> FetchedRecord {
    FetchedRecord {
        offset,
        timestamp_ms: offset as i64,
        key: None,
        value: Bytes::from(vec![b'v'; value_bytes]),
        headers: Vec::new(),
    }
}

impl Peer for FakePeer {
    fn fetch(
        &self,
        address: &str,
        req: pb::FetchRequest,
        _timeout: Duration,
    ) -> Call<pb::FetchResponse> {
        ready(self.reach(address, "fetch").and_then(|(start, hwm, size)| {
            if req.offset < start || req.offset > hwm {
                return Err(Status::out_of_range(format!(
                    "offset {} outside {start}..{hwm}",
                    req.offset
                )));
            }
            // As the broker: whole records up to max_bytes (at least one), max_records.
            let mut records = Vec::new();
            let mut bytes = 0usize;
            for o in req.offset..hwm {
                if records.len() >= req.max_records as usize
                    || (!records.is_empty() && bytes + size > req.max_bytes as usize)
                {
                    break;
                }
                bytes += size;
                records.push(record(o, size));
            }
            Ok(pb::FetchResponse {
                topic: req.topic.clone(),
                partition: req.partition,
                next_offset: records.last().map_or(req.offset, |r| r.offset + 1),
                records,
                high_watermark: hwm,
                log_start_offset: start,
                ..Default::default()
            })
        }))
    }

    fn list_offsets(
        &self,
        address: &str,
        _req: pb::ListOffsetsRequest,
    ) -> Call<pb::ListOffsetsResponse> {
        ready(
            self.reach(address, "list_offsets")
                .map(|(start, hwm, _)| pb::ListOffsetsResponse {
                    offset: hwm,
                    log_start_offset: start,
                    high_watermark: hwm,
                }),
        )
    }

    fn produce(&self, address: &str, req: pb::ProduceRequest) -> Call<pb::ProduceResponse> {
        let answer = self.reach(address, "produce");
        if answer.is_ok() {
            self.produced.lock().push((address.to_string(), req));
        }
        ready(answer.map(|_| pb::ProduceResponse::default()))
    }
}

fn holds(log_start: u64, high_watermark: u64) -> Behaviour {
    Behaviour::Holds {
        log_start,
        high_watermark,
        value_bytes: 10,
    }
}

fn remote(peer: &Arc<FakePeer>, candidates: &[&str]) -> Remote<FakePeer> {
    Remote::new(
        Arc::clone(peer),
        "t",
        0,
        candidates.iter().map(|c| c.to_string()).collect(),
        Arc::new(Remotes::default()),
    )
    .with_deadline_ms(300)
}

fn offsets(records: &[FetchedRecord]) -> Vec<u64> {
    records.iter().map(|r| r.offset).collect()
}

#[tokio::test]
async fn a_remote_read_keeps_the_record_and_byte_budget_and_always_gives_the_first_record() {
    let peer = FakePeer::with(&[("a:1", holds(0, 100))]);
    let r = remote(&peer, &["a:1"]);
    let (got, bounds) = r.read_from(5, 3, 1 << 20).await.expect("read");
    assert_eq!(offsets(&got), vec![5, 6, 7], "max_records");
    assert_eq!(
        bounds,
        Bounds {
            log_start: 0,
            high_watermark: 100
        }
    );
    // Ten value bytes a record: 25 bytes hold two.
    let (got, _) = r.read_from(5, 100, 25).await.expect("read");
    assert_eq!(offsets(&got), vec![5, 6], "max_bytes");
    // A budget below one record still returns that record (it would be stuck otherwise).
    let (got, _) = r.read_from(5, 100, 1).await.expect("read");
    assert_eq!(offsets(&got), vec![5]);
    // At the end: nothing, and no error.
    let (got, _) = r.read_from(100, 10, 1 << 20).await.expect("read");
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_remote_read_below_the_log_start_starts_there_and_past_a_lagging_end_is_empty() {
    let peer = FakePeer::with(&[("a:1", holds(40, 50))]);
    let r = remote(&peer, &["a:1"]);
    let (got, bounds) = r.read_from(10, 3, 1 << 20).await.expect("read");
    assert_eq!(offsets(&got), vec![40, 41, 42], "from the log start");
    assert_eq!(bounds.log_start, 40);
    // A replica behind the offset asked for (it answered while catching up): nothing yet.
    let (got, bounds) = r.read_from(60, 3, 1 << 20).await.expect("read");
    assert!(got.is_empty());
    assert_eq!(bounds.high_watermark, 50);
}

#[tokio::test]
async fn a_remote_read_of_given_offsets_returns_those_still_held_in_order() {
    let peer = FakePeer::with(&[("a:1", holds(10, 30_000))]);
    let r = remote(&peer, &["a:1"]);
    // 3 is below the log start (gone); 40_000 past the end; the rest are spread out, farther
    // apart than one read covers.
    let wanted = vec![3, 10, 12, 13, 500, 20_000, 29_999, 40_000];
    let got = r.read_at(&wanted).await.expect("read");
    assert_eq!(offsets(&got), vec![10, 12, 13, 500, 20_000, 29_999]);
    let got = r.read_at(&[]).await.expect("nothing asked");
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_redirect_is_followed_and_the_leader_is_remembered() {
    let peer = FakePeer::with(&[
        ("a:1", Behaviour::Redirects("b:2".into())),
        ("b:2", holds(0, 10)),
    ]);
    let r = remote(&peer, &["a:1"]);
    let (got, _) = r.read_from(0, 2, 1 << 20).await.expect("read");
    assert_eq!(offsets(&got), vec![0, 1]);
    assert_eq!(peer.calls_to("a:1"), 1);
    let (got, _) = r.read_from(2, 2, 1 << 20).await.expect("read");
    assert_eq!(offsets(&got), vec![2, 3]);
    assert_eq!(
        peer.calls_to("a:1"),
        1,
        "the next read goes straight to the leader"
    );
    assert_eq!(peer.calls_to("b:2"), 2);
}

#[tokio::test]
async fn a_redirect_loop_ends_in_an_error_not_a_spin() {
    let peer = FakePeer::with(&[
        ("a:1", Behaviour::Redirects("b:2".into())),
        ("b:2", Behaviour::Redirects("a:1".into())),
    ]);
    let r = remote(&peer, &["a:1"]);
    let e = r
        .read_from(0, 2, 1 << 20)
        .await
        .expect_err("no leader answers");
    assert!(matches!(e, RemoteError::Refused { .. }), "{e}");
    assert!(peer.calls.lock().len() <= MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn a_replica_that_does_not_answer_is_passed_over_for_another() {
    let peer = FakePeer::with(&[("a:1", Behaviour::Down), ("b:2", holds(0, 10))]);
    let r = remote(&peer, &["a:1", "b:2"]);
    let (got, _) = r
        .read_from(0, 2, 1 << 20)
        .await
        .expect("read from the other replica");
    assert_eq!(offsets(&got), vec![0, 1]);
    assert_eq!(peer.calls_to("a:1"), 1);
}

#[tokio::test]
async fn when_no_replica_answers_the_read_fails_by_its_deadline_and_the_partition_pauses() {
    let peer = FakePeer::with(&[("a:1", Behaviour::Down), ("b:2", Behaviour::Down)]);
    let remotes = Arc::new(Remotes::default());
    let r = Remote::new(
        Arc::clone(&peer),
        "t",
        0,
        vec!["a:1".into(), "b:2".into()],
        Arc::clone(&remotes),
    )
    .with_deadline_ms(300);
    let started = Instant::now();
    let e = r
        .read_from(0, 2, 1 << 20)
        .await
        .expect_err("nobody answers");
    assert!(matches!(e, RemoteError::Unreachable { .. }), "{e}");
    // Far below a stall: the deadline is 300 ms.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        peer.calls_to("a:1") >= 1 && peer.calls_to("b:2") >= 1,
        "both tried"
    );
    assert_eq!(remotes.failures(), 1);
    assert_eq!(
        BrokerError::from(e).code(),
        Code::Unavailable,
        "worth a retry for the caller"
    );
    // Paused: the next pass does not wait on the dead brokers again.
    let calls = peer.calls.lock().len();
    let e = r.read_from(0, 2, 1 << 20).await.expect_err("paused");
    assert!(matches!(e, RemoteError::Paused { .. }), "{e}");
    assert_eq!(peer.calls.lock().len(), calls, "no call while paused");
    // Back once the holder answers and the pause ended.
    peer.at.lock().insert("a:1".into(), holds(0, 10));
    tokio::time::sleep(Duration::from_millis(PAUSE_AFTER_FAILURE_MS + 50)).await;
    let (got, _) = r.read_from(0, 2, 1 << 20).await.expect("read again");
    assert_eq!(offsets(&got), vec![0, 1]);
}

#[tokio::test]
async fn a_refusal_keeps_its_code_and_is_not_retried() {
    let peer = FakePeer::with(&[("a:1", Behaviour::NotFound), ("b:2", holds(0, 10))]);
    let r = remote(&peer, &["a:1", "b:2"]);
    let e = r.read_from(0, 2, 1 << 20).await.expect_err("refused");
    assert_eq!(
        peer.calls_to("b:2"),
        0,
        "a refusal is an answer, not an outage"
    );
    assert_eq!(BrokerError::from(e).code(), Code::NotFound);
}

#[tokio::test]
async fn a_remote_produce_follows_the_leader() {
    let peer = FakePeer::with(&[
        ("a:1", Behaviour::Redirects("b:2".into())),
        ("b:2", holds(0, 0)),
    ]);
    let r = remote(&peer, &["a:1"]);
    r.produce(pb::ProduceRequest {
        topic: "t".into(),
        partition: Some(0),
        ..Default::default()
    })
    .await
    .expect("produced");
    let produced = peer.produced.lock();
    assert_eq!(produced.len(), 1);
    assert_eq!(produced[0].0, "b:2", "appended once, at the leader");
}

#[tokio::test]
async fn waiting_returns_when_the_end_passes_the_offset() {
    let peer = FakePeer::with(&[("a:1", holds(0, 10))]);
    let r = remote(&peer, &["a:1"]);
    tokio::time::timeout(Duration::from_secs(5), r.wait_past(3))
        .await
        .expect("records past 3 are there");
    assert_eq!(r.cached_bounds().map(|b| b.high_watermark), Some(10));
}

#[test]
fn trimming_counts_key_and_value_bytes() {
    let mut records: Vec<FetchedRecord> = (0..5).map(|o| record(o, 10)).collect();
    records[1].key = Some(Bytes::from_static(b"kkkkk"));
    // 10 + 15 = 25 fits 25; the third would pass it.
    assert_eq!(offsets(&trim(records.clone(), 0, 10, 25)), vec![0, 1]);
    assert_eq!(offsets(&trim(records.clone(), 2, 2, 1 << 20)), vec![2, 3]);
    assert_eq!(offsets(&trim(records, 0, 0, 1 << 20)), Vec::<u64>::new());
}
