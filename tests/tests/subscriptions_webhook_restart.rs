//! A broker restart in the middle of webhook delivery: the real broker process pushes 1,000
//! records to a real HTTP server on 127.0.0.1 that fails 25% of requests, is killed with
//! SIGKILL while requests are outstanding, and is restarted on the same data directory.
//! Nothing is lost (every record ends acked by a 2xx or in the dead-letter topic), no ack
//! stored before the kill is undone (no record below the acknowledged floor read just before
//! the kill is delivered again), delivery counts carry over the restart, and records first
//! delivered after it are acked exactly once or dead-lettered after exactly max-attempts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rand::Rng;
use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_tests::{BrokerProcess, Clients, SIGKILL};
use tokio::time::Instant;

const ATTEMPTS: u32 = 5;
const RECORDS: usize = 1000;

#[derive(Debug, Clone, Copy)]
struct Delivery {
    /// 0: to the first broker process, 1: to the restarted one.
    life: u32,
    attempt: u64,
    acked: bool,
}

#[derive(Default)]
struct Seen {
    /// Offset → its deliveries in arrival order.
    by_offset: BTreeMap<u64, Vec<Delivery>>,
    acks: usize,
}

struct Server {
    seen: Mutex<Seen>,
    life: AtomicU32,
}

async fn hook(
    axum::extract::State(server): axum::extract::State<Arc<Server>>,
    body: Bytes,
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let m = &v["message"];
    let offset = m["offset"].as_u64().unwrap_or(u64::MAX);
    let attempt = m["delivery_attempt"].as_u64().unwrap_or(0);
    let acked = rand::rng().random_bool(0.75);
    {
        let mut s = server.seen.lock().expect("lock");
        s.acks += usize::from(acked);
        s.by_offset.entry(offset).or_default().push(Delivery {
            life: server.life.load(Ordering::SeqCst),
            attempt,
            acked,
        });
    }
    // A moment's work, so requests are outstanding when the broker dies.
    tokio::time::sleep(Duration::from_millis(30)).await;
    if acked {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn describe(c: &Clients) -> Result<pb::DescribeSubscriptionResponse> {
    Ok(SubscriptionsClient::new(c.channel.clone())
        .describe(pb::DescribeSubscriptionRequest {
            name: "hooks".into(),
        })
        .await?
        .into_inner())
}

#[tokio::test]
async fn a_broker_killed_mid_delivery_loses_no_ack_and_redelivers_only_unacked_records(
) -> Result<()> {
    let server = Arc::new(Server {
        seen: Mutex::default(),
        life: AtomicU32::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&server));
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await
    });

    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::spawn(dir.path(), &[]).await?;
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("t", 1).await?;
    c.create_topic("dlq", 1).await?;
    SubscriptionsClient::new(c.channel.clone())
        .create(pb::CreateSubscriptionRequest {
            name: "hooks".into(),
            config: Some(pb::SubscriptionConfig {
                topic: "t".into(),
                ack_deadline_ms: 5_000,
                max_delivery_attempts: ATTEMPTS,
                dead_letter_topic: "dlq".into(),
                max_in_flight_per_partition: 0,
                push: Some(pb::PushConfig {
                    endpoint,
                    min_backoff_ms: 50,
                    max_backoff_ms: 800,
                    max_in_flight: 32,
                    ..Default::default()
                }),
            }),
            start: pb::StartPosition::Earliest as i32,
        })
        .await?;
    for chunk in 0..RECORDS / 100 {
        let values: Vec<String> = (chunk * 100..(chunk + 1) * 100)
            .map(|i| format!("v{i}"))
            .collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        c.produce_values("t", 0, &refs).await?;
    }

    // Mid-delivery: a good share acked, most not.
    let limit = Instant::now() + Duration::from_secs(120);
    while server.seen.lock().expect("lock").acks < RECORDS * 3 / 10 {
        anyhow::ensure!(Instant::now() < limit, "deliveries did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Everything below the floor is acknowledged (or dead-lettered) and stored: the state
    // is synced before a change takes effect, so no restart may deliver it again.
    let before = describe(&c).await?;
    broker.signal_and_wait(SIGKILL).await?;
    server.life.store(1, Ordering::SeqCst);
    let floor = before.partitions.first().context("partition 0")?.ack_floor;
    let killed_at = server.seen.lock().expect("lock").acks;
    assert!(
        (killed_at as u64) < RECORDS as u64,
        "the kill came before the end"
    );

    let broker = BrokerProcess::spawn(dir.path(), &[]).await?;
    let mut c = Clients::connect(broker.url()).await?;
    let limit = Instant::now() + Duration::from_secs(180);
    let d = loop {
        let d = describe(&c).await?;
        if d.backlog == 0 && d.in_flight == 0 {
            break d;
        }
        anyhow::ensure!(Instant::now() < limit, "not done in time: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut dead: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &c.fetch("dlq", 0, 0, 1_000).await?.records {
        let h: BTreeMap<&str, String> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.key.as_str(),
                    String::from_utf8_lossy(&h.value).into_owned(),
                )
            })
            .collect();
        *dead
            .entry(h["rill-dead-letter-offset"].parse()?)
            .or_default() += 1;
    }
    let seen = std::mem::take(&mut *server.seen.lock().expect("lock"));
    let mut redelivered_after_restart = BTreeSet::new();
    for offset in 0..RECORDS as u64 {
        let ds = seen
            .by_offset
            .get(&offset)
            .with_context(|| format!("offset {offset} was never delivered"))?;
        let acks = ds.iter().filter(|d| d.acked).count();
        let dead_count = dead.get(&offset).copied().unwrap_or(0);
        assert!(
            acks > 0 || dead_count > 0,
            "offset {offset} lost: neither acked nor dead-lettered: {ds:?}"
        );
        // Delivery counts are stored with each acquisition, so they carry over the restart.
        for w in ds.windows(2) {
            assert!(w[1].attempt > w[0].attempt, "offset {offset}: {ds:?}");
        }
        let before_kill = ds.iter().any(|d| d.life == 0);
        let after_restart = ds.iter().any(|d| d.life == 1);
        if offset < floor {
            assert!(
                !after_restart,
                "offset {offset} was stored as done before the kill (floor {floor}) and was \
                 delivered again: {ds:?}"
            );
        }
        if before_kill && after_restart {
            redelivered_after_restart.insert(offset);
        }
        if offset < floor || !before_kill {
            // Clean histories: one ack at the end, or exactly max-attempts and one dead letter.
            if dead_count > 0 {
                assert_eq!((acks, dead_count), (0, 1), "offset {offset}: {ds:?}");
                assert_eq!(ds.len(), ATTEMPTS as usize, "offset {offset}: {ds:?}");
            } else {
                assert_eq!(acks, 1, "offset {offset}: acked exactly once: {ds:?}");
                assert!(
                    ds.last().is_some_and(|d| d.acked),
                    "offset {offset}: {ds:?}"
                );
            }
        }
    }
    assert_eq!(d.dead_lettered, dead.values().sum::<usize>() as u64);
    println!(
        "webhook restart: killed after {killed_at} acks with the floor at {floor}; {} records \
         delivered on both sides of the restart; {} dead-lettered",
        redelivered_after_restart.len(),
        dead.len()
    );
    assert!(
        floor > 0,
        "the kill came after some records were stored as done"
    );
    broker.stop().await?;
    stop.cancel();
    http.await??;
    Ok(())
}
