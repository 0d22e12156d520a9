//! Webhooks under failure: a real HTTP server on 127.0.0.1 answers 500 to 30% of requests at
//! random, does not answer in time to 2%, and acks the rest. Every record is acked exactly
//! once by a 2xx or reaches the dead-letter topic after exactly max-attempts deliveries;
//! retries wait at least the backoff, and the waits grow; every request's HMAC verifies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use rand::Rng;
use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_tests::{Clients, TestBroker};
use sha2::Sha256;
use tokio::time::Instant;

const SECRET: &str = "test-signing-secret";
const ATTEMPTS: u32 = 5;
const MIN_BACKOFF_MS: u64 = 200;
const RECORDS: usize = 1000;
/// The lock of a delivery, and so the POST's timeout (nine tenths of it). The pusher's window
/// falls to one request under this failure rate, so each unanswered request holds the whole
/// subscription for that long: short, but with room for a loaded machine's answers.
const ACK_DEADLINE_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ack,
    Fail,
    TimedOut,
}

#[derive(Default)]
struct Seen {
    /// Message id → (arrival, delivery_attempt, answer), in arrival order.
    requests: BTreeMap<String, Vec<(Instant, u64, Answer)>>,
    bad_signatures: u32,
    wrong_data: u32,
}

fn verify(headers: &axum::http::HeaderMap, body: &[u8]) -> bool {
    let Some(sig) = headers.get("rill-signature").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()) else {
        return false;
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == v1
}

async fn hook(
    axum::extract::State(seen): axum::extract::State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    let at = Instant::now();
    if !verify(&headers, &body) {
        seen.lock().expect("lock").bad_signatures += 1;
        return StatusCode::BAD_REQUEST;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let m = &v["message"];
    let id = m["message_id"].as_str().unwrap_or_default().to_string();
    let attempt = m["delivery_attempt"].as_u64().unwrap_or(0);
    let data = base64::engine::general_purpose::STANDARD
        .decode(m["data"].as_str().unwrap_or_default())
        .unwrap_or_default();
    let offset = m["offset"].as_u64().unwrap_or(u64::MAX);
    let roll: f64 = rand::rng().random();
    let answer = if roll < 0.30 {
        Answer::Fail
    } else if roll < 0.32 {
        Answer::TimedOut
    } else {
        Answer::Ack
    };
    {
        let mut s = seen.lock().expect("lock");
        if data != format!("v{offset}").as_bytes() {
            s.wrong_data += 1;
        }
        s.requests
            .entry(id)
            .or_default()
            .push((at, attempt, answer));
    }
    match answer {
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Ack => StatusCode::OK,
        Answer::TimedOut => {
            // Past the ack deadline: the broker has given up on this request.
            tokio::time::sleep(Duration::from_millis(ACK_DEADLINE_MS + 300)).await;
            StatusCode::OK
        }
    }
}

#[tokio::test]
async fn webhooks_under_failure_ack_once_or_dead_letter_after_max_attempts() -> Result<()> {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&seen));
    let server = rill_tests::hooks::HookServer::start(app).await?;
    let endpoint = server.endpoint.clone();

    let broker = TestBroker::start().await?;
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("t", 1).await?;
    c.create_topic("dlq", 1).await?;
    let mut subs = SubscriptionsClient::new(c.channel.clone());
    // Refused endpoints first: a host outside the allow-list, a bad scheme.
    for (bad, code) in [
        ("http://192.0.2.1/hook", tonic::Code::FailedPrecondition),
        ("ftp://127.0.0.1/hook", tonic::Code::InvalidArgument),
    ] {
        let err = subs
            .create(pb::CreateSubscriptionRequest {
                name: "refused".into(),
                config: Some(pb::SubscriptionConfig {
                    topic: "t".into(),
                    push: Some(pb::PushConfig {
                        endpoint: bad.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                start: 0,
            })
            .await
            .expect_err(bad);
        assert_eq!(err.code(), code, "{bad}: {}", err.message());
    }
    subs.create(pb::CreateSubscriptionRequest {
        name: "hooks".into(),
        config: Some(pb::SubscriptionConfig {
            topic: "t".into(),
            ack_deadline_ms: ACK_DEADLINE_MS as u32,
            max_delivery_attempts: ATTEMPTS,
            dead_letter_topic: "dlq".into(),
            max_in_flight_per_partition: 0,
            push: Some(pb::PushConfig {
                endpoint,
                min_backoff_ms: MIN_BACKOFF_MS as u32,
                max_backoff_ms: 5_000,
                max_in_flight: 64,
                signing_secret: SECRET.into(),
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

    let limit = Instant::now() + Duration::from_secs(180);
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let dead = c.fetch("dlq", 0, 0, 1_000).await?.records;
    let mut dead_offsets = BTreeMap::new();
    for r in &dead {
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
        let offset: u64 = h["rill-dead-letter-offset"].parse()?;
        assert_eq!(h["rill-dead-letter-attempts"], ATTEMPTS.to_string());
        assert!(h.contains_key("rill-dead-letter-error"), "{h:?}");
        assert!(
            dead_offsets.insert(offset, ()).is_none(),
            "dead-lettered twice: {offset}"
        );
    }
    assert_eq!(d.dead_lettered, dead.len() as u64);

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(seen.bad_signatures, 0, "every request's HMAC verifies");
    assert_eq!(seen.wrong_data, 0, "every envelope carries its record");
    let mut gaps: Vec<Vec<u128>> = vec![Vec::new(); ATTEMPTS as usize];
    for offset in 0..RECORDS as u64 {
        let id = format!("t/0/{offset}");
        let reqs = seen.requests.get(&id).context(id.clone())?;
        let acks = reqs.iter().filter(|r| r.2 == Answer::Ack).count();
        if dead_offsets.contains_key(&offset) {
            assert_eq!(acks, 0, "{id}: dead-lettered after an ack: {reqs:?}");
            assert_eq!(reqs.len(), ATTEMPTS as usize, "{id}: {reqs:?}");
        } else {
            assert_eq!(acks, 1, "{id}: acked exactly once: {reqs:?}");
            assert_eq!(
                reqs.last().map(|r| r.2),
                Some(Answer::Ack),
                "{id}: {reqs:?}"
            );
        }
        let numbers: Vec<u64> = reqs.iter().map(|r| r.1).collect();
        assert_eq!(numbers, (1..=reqs.len() as u64).collect::<Vec<_>>(), "{id}");
        // Backoff is honoured after immediate failures: the n-th retry waits at least
        // min * 2^(n-1).
        for (n, w) in reqs.windows(2).enumerate() {
            if w[0].2 == Answer::Fail {
                let gap = w[1].0.duration_since(w[0].0).as_millis();
                let floor = u128::from(MIN_BACKOFF_MS) << n;
                assert!(
                    gap >= floor,
                    "{id}: retry {} after {gap} ms < {floor}",
                    n + 1
                );
                gaps[n].push(gap);
            }
        }
    }
    let mean = |v: &Vec<u128>| v.iter().sum::<u128>() / (v.len().max(1) as u128);
    let means: Vec<u128> = gaps.iter().filter(|g| g.len() >= 5).map(mean).collect();
    println!(
        "webhooks: {} dead-lettered; mean retry gaps (ms) after immediate failures: {means:?}",
        dead.len()
    );
    assert!(means.len() >= 2, "enough retries to compare: {gaps:?}");
    // The growth asserted is the floor's: each retry above waited at least its doubling
    // backoff. The means are printed, not compared: on a loaded machine the sweep and the
    // window pace retries too, and the means of neighbouring attempts cross.
    broker.stop().await?;
    server.stop().await?;
    Ok(())
}
