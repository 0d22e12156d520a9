//! Ordered, batched webhooks against a real HTTP server on 127.0.0.1: records with one key
//! arrive one at a time in offset order (the next only after the one before was acked or
//! dead-lettered), a key that always fails blocks only itself, and POSTs carry several
//! records in a `messages` array, never more than `max_batch_records` (retries go alone).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use rand::Rng;
use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_tests::{produce_req, record, rill_cli, Clients, TestBroker};
use tokio::time::Instant;

const ATTEMPTS: u32 = 3;
const BATCH: usize = 5;
/// Ten plain keys that always ack, one that fails 30% of the time, one that always fails.
const PLAIN_KEYS: usize = 10;
const RECORDS: usize = 144;

#[derive(Debug, Clone)]
struct Delivery {
    at: Instant,
    offset: u64,
    attempt: u64,
    acked: bool,
}

#[derive(Default)]
struct Seen {
    /// Key → its deliveries in arrival order.
    by_key: BTreeMap<String, Vec<Delivery>>,
    /// Keys inside a request being answered now.
    busy: BTreeSet<String>,
    /// A key arrived while a request with it was still unanswered, or twice in one POST.
    overlaps: Vec<String>,
    batch_sizes: Vec<usize>,
    bad_bodies: u32,
}

fn key_of(offset: usize) -> String {
    match offset % 12 {
        10 => "flaky".into(),
        // Three records, early in the topic.
        11 if offset < 36 => "poison".into(),
        k => format!("k{}", k % PLAIN_KEYS),
    }
}

async fn hook(
    axum::extract::State(seen): axum::extract::State<Arc<Mutex<Seen>>>,
    body: Bytes,
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    let at = Instant::now();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        seen.lock().expect("lock").bad_bodies += 1;
        return StatusCode::BAD_REQUEST;
    };
    let Some(messages) = v["messages"].as_array() else {
        seen.lock().expect("lock").bad_bodies += 1;
        return StatusCode::BAD_REQUEST;
    };
    let b64 = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap_or_default())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_default()
    };
    let items: Vec<(String, u64, u64)> = messages
        .iter()
        .map(|m| {
            (
                b64(&m["key"]),
                m["offset"].as_u64().unwrap_or(u64::MAX),
                m["delivery_attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // The whole POST fails if any record's key fails.
    let fail = items
        .iter()
        .any(|(k, _, _)| k == "poison" || (k == "flaky" && rand::rng().random_bool(0.3)));
    {
        let mut s = seen.lock().expect("lock");
        s.batch_sizes.push(items.len());
        for (k, _, _) in &items {
            if !s.busy.insert(k.clone()) {
                s.overlaps.push(k.clone());
            }
        }
    }
    // Held a moment, so an overlapping delivery of a key would be seen.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut s = seen.lock().expect("lock");
    for (k, offset, attempt) in items {
        s.busy.remove(&k);
        s.by_key.entry(k).or_default().push(Delivery {
            at,
            offset,
            attempt,
            acked: !fail,
        });
    }
    if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

#[tokio::test]
async fn ordered_batched_webhooks_keep_key_order_and_a_failing_key_blocks_only_itself() -> Result<()>
{
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&seen));
    let server = rill_tests::hooks::HookServer::start(app).await?;
    let endpoint = server.endpoint.clone();

    let broker = TestBroker::start().await?;
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("t", 1).await?;
    c.create_topic("dlq", 1).await?;
    // Records first, so the pusher sees the whole backlog at once.
    let records: Vec<pb::Record> = (0..RECORDS)
        .map(|i| record(Some(&key_of(i)), &format!("v{i}"), None, &[]))
        .collect();
    c.log.produce(produce_req("t", Some(0), records)).await?;

    // Through the CLI: the flags reach the broker and describe shows them.
    let (ok, out, err) = rill_cli(
        &addr,
        &[
            "--output",
            "json",
            "subscription",
            "create",
            "hooks",
            "--topic",
            "t",
            "--from-beginning",
            "--push-endpoint",
            &endpoint,
            "--ordered",
            "--max-batch-records",
            &BATCH.to_string(),
            "--max-attempts",
            &ATTEMPTS.to_string(),
            "--dead-letter-topic",
            "dlq",
            "--min-backoff",
            "1s",
            "--max-backoff",
            "4s",
            "--max-in-flight",
            "16",
        ],
        "",
    )
    .await?;
    assert!(ok, "create failed: {err}");
    let created: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(created["push"]["ordered"], true, "{created}");
    assert_eq!(created["push"]["max_batch_records"], BATCH, "{created}");

    let mut subs = SubscriptionsClient::new(c.channel.clone());
    let limit = Instant::now() + Duration::from_secs(120);
    let d = loop {
        let d = subs
            .describe(pb::DescribeSubscriptionRequest {
                name: "hooks".into(),
            })
            .await?
            .into_inner();
        if d.backlog == 0 && d.in_flight == 0 {
            break d;
        }
        anyhow::ensure!(Instant::now() < limit, "not done in time: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dead: BTreeSet<u64> = c
        .fetch("dlq", 0, 0, 1_000)
        .await?
        .records
        .iter()
        .filter_map(|r| {
            let h = r
                .headers
                .iter()
                .find(|h| h.key == "rill-dead-letter-offset")?;
            std::str::from_utf8(&h.value).ok()?.parse().ok()
        })
        .collect();
    assert_eq!(d.dead_lettered, dead.len() as u64);

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(seen.bad_bodies, 0, "every body is a `messages` array");
    assert!(
        seen.overlaps.is_empty(),
        "a key was in two requests at once: {:?}",
        seen.overlaps
    );
    assert!(
        seen.batch_sizes.iter().all(|n| (1..=BATCH).contains(n)),
        "{:?}",
        seen.batch_sizes
    );
    assert!(
        seen.batch_sizes.iter().any(|n| *n > 1),
        "records are batched: {:?}",
        seen.batch_sizes
    );
    for (key, deliveries) in &seen.by_key {
        let expected: Vec<u64> = (0..RECORDS)
            .filter(|i| key_of(*i) == *key)
            .map(|i| i as u64)
            .collect();
        // Offset order, one at a time: each record is delivered until it is acked or has
        // had its attempts (and was dead-lettered), and only then the next one of the key.
        let mut i = 0;
        let mut attempts = 0;
        for d in deliveries {
            let want = *expected.get(i).context(format!("{key}: extra {d:?}"))?;
            assert_eq!(d.offset, want, "{key}: out of order: {deliveries:?}");
            attempts += 1;
            assert_eq!(d.attempt, attempts, "{key}: {deliveries:?}");
            if d.acked {
                assert!(!dead.contains(&d.offset), "{key}: acked and dead: {d:?}");
                (i, attempts) = (i + 1, 0);
            } else if attempts == u64::from(ATTEMPTS) {
                assert!(dead.contains(&d.offset), "{key}: {d:?} not dead-lettered");
                (i, attempts) = (i + 1, 0);
            }
        }
        assert_eq!(i, expected.len(), "{key}: every record was settled");
    }
    // The poison key fails every time; its first record is tried for at least 1 s + 2 s
    // (its backoffs). The plain keys went on meanwhile: were a failing record to hold back
    // other keys, none would be acked in that window.
    let poison = &seen.by_key["poison"];
    assert_eq!(poison.len(), 3 * ATTEMPTS as usize);
    let stuck = poison[0].at..poison[ATTEMPTS as usize - 1].at;
    let acked_meanwhile = seen
        .by_key
        .iter()
        .filter(|(k, _)| k.starts_with('k'))
        .flat_map(|(_, d)| d.iter())
        .filter(|d| d.acked && stuck.contains(&d.at))
        .count();
    assert!(
        acked_meanwhile >= 10,
        "only {acked_meanwhile} plain records were acked while the poison key was stuck"
    );
    assert!(dead.len() >= 3, "{dead:?}");
    broker.stop().await?;
    server.stop().await?;
    Ok(())
}
