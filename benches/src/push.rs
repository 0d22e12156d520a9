//! Push delivery against a Rill broker (issue 13's figures):
//! - `push`: the e2e workload (one paced producer) read through a `Subscribe` stream for a
//!   group (offset mode), so its latency sits next to e2e's long-poll fetch in the same run;
//! - `push-queue`: the same through a queue subscription (each push pass stores the records'
//!   locks before sending; acks go back on the stream every 64 records);
//! - `webhook`: a backlog of `--messages` records drained by the broker's webhook pusher to a
//!   local HTTP server that acks at once; records per second from the subscription's
//!   creation to the last record's POST;
//! - `webhook-e2e`: the paced producer again, latency from the send to the POST's arrival.
//!
//! Latencies compare a send stamp with the arrival time on one monotonic clock of this
//! process (the stamp is the payload's first 8 bytes).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use hdrhistogram::Histogram;
use rill_client::subscription::{PushStream, PushTarget, Subscriptions};
use rill_proto::v1 as pb;

use crate::report::{hist, now_ns, pace, payload, Stats};
use crate::scenarios::{connect, request, Run};

/// Records produced per request when loading a backlog.
const LOAD_BATCH: u64 = 500;

/// Sends `run.e2e_messages` one per produce at `run.e2e_rate` to `topic`, each stamped with
/// `now_ns` just before it is sent, on its own thread and runtime (so pacing sleeps block
/// nothing else). Returns the rate achieved.
fn paced_producer(run: &Run, topic: &str) -> std::thread::JoinHandle<Result<f64>> {
    let (n, rate, size) = (run.e2e_messages, run.e2e_rate, run.size.max(8));
    let mut run = run.clone();
    run.topic = topic.to_string();
    std::thread::spawn(move || -> Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client = connect(&run.url, &run.options).await?;
            let mut buf = payload(size);
            let t0 = Instant::now();
            for i in 0..n {
                pace(t0, i, rate);
                buf[..8].copy_from_slice(&now_ns().to_le_bytes());
                let value = Bytes::copy_from_slice(&buf);
                client.produce(request(&run, 0, &[value])).await?;
            }
            Ok(n as f64 / t0.elapsed().as_secs_f64())
        })
    })
}

async fn join_producer(p: std::thread::JoinHandle<Result<f64>>) -> Result<f64> {
    tokio::task::spawn_blocking(move || p.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the paced producer panicked"))?
}

fn stamp_latency_us(value: &[u8]) -> Result<u64> {
    let stamp = u64::from_le_bytes(value.get(..8).context("a stamped value")?.try_into()?);
    Ok((now_ns().saturating_sub(stamp) / 1000).max(1))
}

/// `push` (a group, `queue` false) or `push-queue` (a subscription): the paced producer's
/// records through a `Subscribe` stream with a window of 1,000 records.
pub async fn push(run: &Run, topic: &str, queue: bool) -> Result<Stats> {
    let conn = rill_client::Connection::connect_with(&run.url, &run.options).await?;
    let target = if queue {
        let name = format!("{topic}-sub");
        let subs = Subscriptions::new(conn.clone());
        let _ = subs.delete(&name).await;
        subs.create(
            &name,
            pb::SubscriptionConfig {
                topic: topic.into(),
                ..Default::default()
            },
            false,
        )
        .await?;
        PushTarget::Subscription {
            name,
            consumer_id: "bench".into(),
        }
    } else {
        PushTarget::Group {
            group: format!("{topic}-group"),
            topic: topic.into(),
        }
    };
    let mut stream = PushStream::open(&conn, target, 1_000, 64 << 20).await?;
    let n = run.e2e_messages;
    let start = Instant::now();
    let producer = paced_producer(run, topic);
    let deadline = Instant::now() + Duration::from_secs(n / run.e2e_rate.max(1) + 30);
    let (mut h, mut got, mut bytes) = (hist(), 0u64, 0u64);
    let mut unacked = Vec::new();
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, stream.next()).await else {
            break;
        };
        let Some(r) = next? else { break };
        h.saturating_record(stamp_latency_us(&r.value)?);
        got += 1;
        bytes += r.value.len() as u64;
        if queue {
            unacked.push((r.partition, r.offset));
            if unacked.len() >= 64 {
                stream.ack(&std::mem::take(&mut unacked)).await?;
            }
        }
    }
    if !unacked.is_empty() {
        stream.ack(&unacked).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let sent_rate = join_producer(producer).await?;
    stream.close().await?;
    Ok(Stats {
        scenario: if queue { "push-q" } else { "push" },
        msgs: got,
        bytes,
        secs,
        hist: h,
        note: format!(
            "lat=send->push ({}); target {}/s, sent at {sent_rate:.0}/s, recv {got}/{n}",
            if queue {
                "queue mode, acks every 64"
            } else {
                "offset mode"
            },
            run.e2e_rate
        ),
    })
}

/// What the local endpoint saw.
struct Seen {
    offsets: HashSet<u64>,
    posts: u64,
    hist: Histogram<u64>,
    bytes: u64,
    last: Option<Instant>,
}

/// A local HTTP endpoint that acks every POST at once and records each record's offset and
/// send-to-arrival latency. Returns its URL, what it saw, and its task (aborted to stop it).
async fn endpoint() -> Result<(String, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>)> {
    let seen = Arc::new(Mutex::new(Seen {
        offsets: HashSet::new(),
        posts: 0,
        hist: hist(),
        bytes: 0,
        last: None,
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let state = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let state = Arc::clone(&state);
            async move {
                match take(&state, &body) {
                    Ok(()) => axum::http::StatusCode::OK,
                    Err(_) => axum::http::StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen, server))
}

fn take(seen: &Mutex<Seen>, body: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let messages: Vec<&serde_json::Value> = match v["messages"].as_array() {
        Some(all) => all.iter().collect(),
        None => vec![&v["message"]],
    };
    let mut s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    s.posts += 1;
    for m in messages {
        let data = base64::engine::general_purpose::STANDARD
            .decode(m["data"].as_str().context("data")?)?;
        let latency = stamp_latency_us(&data)?;
        if s.offsets.insert(m["offset"].as_u64().context("offset")?) {
            s.hist.saturating_record(latency);
            s.bytes += data.len() as u64;
        }
    }
    s.last = Some(Instant::now());
    Ok(())
}

async fn create_hook(run: &Run, name: &str, topic: &str, url: &str, batch: u32) -> Result<()> {
    let conn = rill_client::Connection::connect_with(&run.url, &run.options).await?;
    let subs = Subscriptions::new(conn);
    let _ = subs.delete(name).await;
    subs.create(
        name,
        pb::SubscriptionConfig {
            topic: topic.into(),
            push: Some(pb::PushConfig {
                endpoint: url.into(),
                max_batch_records: batch,
                ..Default::default()
            }),
            ..Default::default()
        },
        true,
    )
    .await?;
    Ok(())
}

/// Waits until the endpoint saw `n` distinct records or `limit` passed; returns how many.
async fn wait_seen(seen: &Mutex<Seen>, n: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let got = seen.lock().map_or(0, |s| s.offsets.len() as u64);
        if got >= n || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `webhook`: `run.messages` records loaded first, then a webhook subscription from the
/// earliest record; throughput from its creation to the last record's POST.
pub async fn webhook(run: &Run, topic: &str, batch: u32) -> Result<Stats> {
    let (url, seen, server) = endpoint().await?;
    let mut client = connect(&run.url, &run.options).await?;
    let mut load = run.clone();
    load.topic = topic.to_string();
    let value = Bytes::from(payload(run.size.max(8)));
    let mut loaded = 0;
    while loaded < run.messages {
        let k = LOAD_BATCH.min(run.messages - loaded);
        let values: Vec<Bytes> = (0..k).map(|_| value.clone()).collect();
        client.produce(request(&load, 0, &values)).await?;
        loaded += k;
    }
    let start = Instant::now();
    create_hook(run, &format!("{topic}-hook"), topic, &url, batch).await?;
    // The caller bounds the whole scenario (`--timeout`).
    let got = wait_seen(&seen, run.messages, Duration::from_secs(3_600)).await;
    server.abort();
    let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let secs = s
        .last
        .map_or(0.0, |t| t.duration_since(start).as_secs_f64());
    if got < run.messages {
        bail!("the endpoint saw {got} of {} records", run.messages);
    }
    Ok(Stats {
        scenario: "webhook",
        msgs: got,
        bytes: s.bytes,
        secs,
        hist: hist(),
        note: format!(
            "backlog drained by POSTs to 127.0.0.1 (acks at once), {batch} record(s) per POST, {} POSTs",
            s.posts
        ),
    })
}

/// `webhook-e2e`: the paced producer into a topic with a webhook subscription; latency from
/// the send to the POST's arrival.
pub async fn webhook_e2e(run: &Run, topic: &str, batch: u32) -> Result<Stats> {
    let (url, seen, server) = endpoint().await?;
    create_hook(run, &format!("{topic}-hook"), topic, &url, batch).await?;
    let n = run.e2e_messages;
    let start = Instant::now();
    let producer = paced_producer(run, topic);
    let got = wait_seen(&seen, n, Duration::from_secs(n / run.e2e_rate.max(1) + 30)).await;
    let secs = start.elapsed().as_secs_f64();
    let sent_rate = join_producer(producer).await?;
    server.abort();
    let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(Stats {
        scenario: "hook-e2e",
        msgs: got,
        bytes: s.bytes,
        secs,
        hist: s.hist.clone(),
        note: format!(
            "lat=send->POST; target {}/s, sent at {sent_rate:.0}/s, recv {got}/{n}, {batch} per POST",
            run.e2e_rate
        ),
    })
}
