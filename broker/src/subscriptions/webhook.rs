//! Push to HTTP endpoints: one pusher per subscription with an endpoint. It acquires records
//! as the consumer [`CONSUMER`] (so locks, delivery counts, dead letters and persistence are
//! the queue's own), POSTs each as a JSON envelope, acks on 200, 201, 202, 204 or 102, and
//! nacks otherwise (any other status, a connection error, no answer within the ack
//! deadline) with a delay from an exponential backoff with jitter between the subscription's
//! minimum and maximum. At most a window of requests is outstanding: it grows on success
//! (slow start, then additive increase) and halves on failure, up to `max_in_flight`, so a
//! failing endpoint is not hammered.
//!
//! With `max_batch_records` above 1, one POST carries up to that many records (a
//! `messages` array) and its answer acks or nacks them all. With `ordered`, records are
//! acquired in per-key order ([`super::ordered`]): one record of a key in flight at a time.
//!
//! The endpoint must be `http` or `https` on a loopback host or a host in the broker's
//! `push_endpoint_allow` list ([`check_endpoint`]), so a topic admin cannot make the broker
//! call arbitrary hosts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use rill_proto::v1 as pb;
use rill_storage::log::now_ms;
use sha2::Sha256;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{StreamExt, StreamMap};

use super::state::{AckKind, SubscriptionError};
use super::{Ack, Sub, Subscriptions};
use crate::error::BrokerError;
use crate::state::Broker;

/// Default shortest retry wait.
pub const DEFAULT_MIN_BACKOFF_MS: u32 = 100;
/// Default longest retry wait.
pub const DEFAULT_MAX_BACKOFF_MS: u32 = 60_000;
/// Default requests outstanding.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
/// Most requests outstanding.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// Most records in one POST.
pub const MAX_BATCH_RECORDS: u32 = 1_000;
/// The consumer id the pusher acquires records as, followed by `-<pass>`: each acquisition
/// pass locks under its own id, so the late outcome of an earlier delivery (a POST that
/// timed out as its lock expired and the record was delivered again) cannot ack or nack
/// the later one.
pub const CONSUMER: &str = "rill-webhook";
/// The signature header: `t=<unix ms>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "rill-signature";
/// The statuses that acknowledge a record.
pub const ACK_STATUSES: [u16; 5] = [200, 201, 202, 204, 102];

/// Checks that `endpoint` is an http(s) URL on a loopback host or an allowed one.
pub fn check_endpoint(
    subscription: &str,
    endpoint: &str,
    allow: &[String],
) -> Result<(), BrokerError> {
    let refuse = |reason: String| -> BrokerError {
        SubscriptionError::EndpointNotAllowed {
            subscription: subscription.into(),
            endpoint: endpoint.into(),
            reason,
        }
        .into()
    };
    let url = reqwest::Url::parse(endpoint).map_err(|e| {
        BrokerError::from(SubscriptionError::Invalid(format!(
            "subscription {subscription:?}: the push endpoint {endpoint:?} is not a URL: {e}"
        )))
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(SubscriptionError::Invalid(format!(
            "subscription {subscription:?}: the push endpoint {endpoint:?} must be http or https"
        ))
        .into());
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(refuse("it has no host".into())),
    };
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
    if loopback || allow.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        Ok(())
    } else {
        Err(refuse(format!(
            "{host} is not loopback and not in the broker's push_endpoint_allow list"
        )))
    }
}

/// The wait before retrying a record that failed its `attempt`-th delivery: `min * 2^(n-1)`
/// capped at `max`, plus a random jitter below itself (backon's exponential backoff). So
/// each wait is at least the previous one.
pub fn backoff_ms(min_ms: u32, max_ms: u32, attempt: u32) -> u32 {
    let mut b = backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(u64::from(min_ms)))
            .with_max_delay(Duration::from_millis(u64::from(max_ms)))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times(),
    );
    let wait = b
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_millis(u64::from(max_ms)));
    u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)
}

/// The outstanding-request window: slow start, then additive increase; halved on failure.
#[derive(Debug, Clone)]
pub struct Rate {
    window: f64,
    threshold: f64,
    max: f64,
    /// Deliveries finished since the window last shrank: it shrinks at most once per
    /// window's worth, as failures of requests sent together are one congestion signal.
    since_decrease: f64,
}

impl Rate {
    /// One request at first, at most `max`.
    pub fn new(max: u32) -> Self {
        let max = f64::from(max.max(1));
        Rate {
            window: 1.0,
            threshold: max,
            max,
            since_decrease: f64::INFINITY,
        }
    }

    /// Requests allowed outstanding now.
    pub fn window(&self) -> usize {
        self.window as usize
    }

    /// A delivery succeeded.
    pub fn success(&mut self) {
        self.since_decrease += 1.0;
        self.window += if self.window < self.threshold {
            1.0
        } else {
            1.0 / self.window
        };
        self.window = self.window.min(self.max);
    }

    /// A delivery failed: the window halves, unless it did within the last window's worth
    /// of deliveries.
    pub fn failure(&mut self) {
        if self.since_decrease < self.window {
            self.since_decrease += 1.0;
            return;
        }
        self.window = (self.window / 2.0).max(1.0);
        self.threshold = self.window;
        self.since_decrease = 0.0;
    }
}

/// Starts `sub`'s pusher on the broker's tracker.
pub fn spawn(broker: &Broker, subs: &Subscriptions, sub: &Arc<Sub>) {
    let (b, s, sub) = (broker.clone(), subs.clone(), Arc::clone(sub));
    broker.tasks().spawn(async move {
        if let Err(e) = run(&b, &s, &sub).await {
            tracing::warn!(subscription = %sub.name, error = %e, "webhook pusher stopped");
        }
    });
}

/// What one POST came to.
struct Outcome {
    /// The consumer id the records were locked to.
    consumer: String,
    /// (partition, offset, delivery attempt) of each record the POST carried.
    records: Vec<(u32, u64, u32)>,
    /// `None`: acked; else why not.
    error: Option<String>,
}

async fn run(broker: &Broker, subs: &Subscriptions, sub: &Arc<Sub>) -> Result<(), BrokerError> {
    let Some(push) = sub.config.push.clone() else {
        return Ok(());
    };
    let deadline = Duration::from_millis(u64::from(sub.config.ack_deadline_ms));
    let client = reqwest::Client::builder()
        // A little before the lock ends, so the nack lands while the lock still holds.
        .timeout(deadline * 9 / 10)
        .connect_timeout(deadline.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(push.max_in_flight as usize)
        .build()
        .map_err(|e| BrokerError::Internal(format!("cannot build the HTTP client: {e}")))?;
    let topic = broker.topic(&sub.config.topic)?;
    let mut changes = StreamMap::new();
    for p in 0..topic.topic.partition_count() {
        if let Some(rx) = topic.subscribe(p) {
            changes.insert(p, WatchStream::from_changes(rx));
        }
    }
    let mut rate = Rate::new(push.max_in_flight);
    let batch = push.max_batch_records.max(1) as usize;
    let mut keys = push.ordered.then(super::ordered::KeyIndex::default);
    let mut posts: JoinSet<Outcome> = JoinSet::new();
    let max_bytes = broker.config().max_fetch_bytes;
    let mut pass = 0u64;
    let mut arrivals = super::source::Arrivals::new(broker, Some(Arc::clone(sub)), &topic);
    loop {
        let released = sub.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        let room = rate.window().saturating_sub(posts.len());
        let mut next_event = None;
        if room > 0 {
            pass += 1;
            let consumer = format!("{CONSUMER}-{pass}");
            let want = (room.saturating_mul(batch), max_bytes);
            let got = match keys.as_mut() {
                Some(keys) => {
                    subs.acquire_ordered(broker, sub, &topic, &consumer, want, keys)
                        .await
                }
                None => {
                    subs.acquire(broker, sub, &topic, &consumer, want.0, want.1)
                        .await
                }
            };
            let (records, event) = match got {
                Ok(got) => got,
                Err(BrokerError::Subscription(SubscriptionError::NotFound { .. })) => return Ok(()),
                Err(e) => return Err(e),
            };
            for request in batches(records, batch) {
                posts.spawn(post(
                    client.clone(),
                    consumer.clone(),
                    Arc::clone(sub),
                    push.clone(),
                    request,
                ));
            }
            next_event = event;
        }
        let has_room = rate.window() > posts.len();
        let wake_at = next_event.map(|ms| {
            let in_ms = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
            Instant::now() + Duration::from_millis(in_ms)
        });
        tokio::select! {
            _ = broker.shutdown().cancelled() => return Ok(()),
            Some(done) = posts.join_next(), if !posts.is_empty() => {
                let mut outcomes = vec![done.map_err(BrokerError::from)?];
                while let Some(more) = posts.try_join_next() {
                    outcomes.push(more.map_err(BrokerError::from)?);
                }
                settle(broker, subs, sub, &push, &mut rate, outcomes).await?;
            }
            _ = &mut released, if has_room => {}
            _ = changes.next(), if has_room && !changes.is_empty() => {}
            _ = arrivals.next(), if has_room => {}
            _ = sleep_until_opt(wake_at), if has_room && wake_at.is_some() => {}
        }
    }
}

/// Splits acquired records into POSTs: first deliveries in batches of up to `batch`, and
/// each retry alone, so a record that failed (say, one the endpoint cannot take) fails no
/// other record with it again.
fn batches(records: Vec<pb::ReceivedRecord>, batch: usize) -> Vec<Vec<pb::ReceivedRecord>> {
    let (fresh, retries): (Vec<_>, Vec<_>) =
        records.into_iter().partition(|r| r.delivery_count <= 1);
    let mut out: Vec<Vec<pb::ReceivedRecord>> = retries.into_iter().map(|r| vec![r]).collect();
    let mut fresh = fresh.into_iter().peekable();
    while fresh.peek().is_some() {
        out.push(fresh.by_ref().take(batch.max(1)).collect());
    }
    out
}

/// Acks the successes and nacks each failure with its backoff, all in one stored change,
/// and adapts the rate.
async fn settle(
    broker: &Broker,
    subs: &Subscriptions,
    sub: &Arc<Sub>,
    push: &super::records::StoredPush,
    rate: &mut Rate,
    outcomes: Vec<Outcome>,
) -> Result<(), BrokerError> {
    let mut acked: BTreeMap<String, Vec<(u32, u64, u64)>> = BTreeMap::new();
    let mut items = Vec::new();
    for o in outcomes {
        let ranges = o
            .records
            .iter()
            .map(|(p, offset, _)| (*p, *offset, *offset));
        match o.error {
            None => {
                rate.success();
                acked.entry(o.consumer).or_default().extend(ranges);
            }
            Some(error) => {
                rate.failure();
                // A batch waits as long as its most-tried record.
                let attempt = o.records.iter().map(|r| r.2).max().unwrap_or(1);
                let delay_ms = backoff_ms(push.min_backoff_ms, push.max_backoff_ms, attempt);
                let nack = Ack {
                    ranges: ranges.collect(),
                    kind: AckKind::Nack { delay_ms },
                    error: Some(error),
                };
                items.push((o.consumer, nack));
            }
        }
    }
    items.extend(acked.into_iter().map(|(consumer, ranges)| {
        let ack = Ack {
            ranges,
            kind: AckKind::Ack,
            error: None,
        };
        (consumer, ack)
    }));
    subs.apply_held(broker, sub, &items).await
}

impl Subscriptions {
    /// Applies each `(consumer, ack)` range that its consumer still holds, all in one stored
    /// change (one synced write, however many outcomes a round of POSTs brought). A range
    /// whose lock ended meanwhile (a slow answer, delivered again since) is skipped: it is
    /// left to its redelivery, as the late outcome of an earlier delivery.
    async fn apply_held(
        &self,
        broker: &Broker,
        sub: &Arc<Sub>,
        items: &[(String, Ack)],
    ) -> Result<(), BrokerError> {
        let topic = broker.topic(&sub.config.topic)?;
        let count = topic.topic.partition_count();
        let mut st = sub.state.lock().await;
        if st.deleted {
            return Err(SubscriptionError::NotFound {
                name: sub.name.clone(),
            }
            .into());
        }
        let limits = sub.limits();
        let now = now_ms();
        let mut next = st.partitions.clone();
        let expired = super::stats::expiring(&next, now);
        let mut leaving = Vec::new();
        for (p, ps) in next.iter_mut() {
            leaving.extend(ps.expire(*p, now, &limits));
        }
        let mut applied = Vec::new();
        for (consumer, ack) in items {
            for &(p, first, last) in &ack.ranges {
                let Some(ps) = next.get_mut(&p).filter(|_| p < count) else {
                    continue;
                };
                let ids = (sub.name.as_str(), sub.config.topic.as_str(), p);
                let Ok(n) = ps.check_held(ids, consumer, (first, last), now) else {
                    continue;
                };
                let error = ack.error.as_deref();
                let (out, _) = ps.apply(p, (first, last), ack.kind, error, now, &limits);
                leaving.extend(out);
                applied.push((ack.kind, n));
            }
        }
        let needed: Vec<u32> = items
            .iter()
            .flat_map(|(_, ack)| ack.ranges.iter().map(|(p, _, _)| *p))
            .collect();
        self.finish(broker, sub, &mut st, (next, &needed), leaving)
            .await?;
        drop(st);
        sub.counters.settled(expired, 0);
        let mut nacked = false;
        for (kind, n) in applied {
            sub.counters.acknowledged(kind, n);
            nacked |= matches!(kind, AckKind::Nack { .. });
        }
        if nacked {
            sub.released.notify_waiters();
        }
        Ok(())
    }
}

/// The JSON body of a POST: `{"subscription", "message"}` for one record at a time, or
/// `{"subscription", "messages": [...]}` when the subscription batches (`batched`), however
/// many records this POST carries.
pub fn body(
    subscription: &str,
    topic: &str,
    records: &[pb::ReceivedRecord],
    batched: bool,
) -> serde_json::Value {
    if batched || records.len() != 1 {
        let messages: Vec<serde_json::Value> = records
            .iter()
            .map(|r| envelope(subscription, topic, r)["message"].take())
            .collect();
        serde_json::json!({"subscription": subscription, "messages": messages})
    } else {
        envelope(subscription, topic, &records[0])
    }
}

/// The JSON envelope of one record.
pub fn envelope(subscription: &str, topic: &str, r: &pb::ReceivedRecord) -> serde_json::Value {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let rec = r.record.clone().unwrap_or_default();
    let attributes: BTreeMap<String, String> = rec
        .headers
        .iter()
        .map(|h| {
            (
                h.key.clone(),
                String::from_utf8_lossy(&h.value).into_owned(),
            )
        })
        .collect();
    serde_json::json!({
        "subscription": subscription,
        "message": {
            "message_id": format!("{topic}/{}/{}", r.partition, rec.offset),
            "topic": topic,
            "partition": r.partition,
            "offset": rec.offset,
            "key": rec.key.as_ref().map(|k| b64(k)),
            "data": b64(&rec.value),
            "attributes": attributes,
            "publish_time_ms": rec.timestamp_ms,
            "delivery_attempt": r.delivery_count,
        }
    })
}

/// The signature header's value for `body` at `t_ms`.
pub fn signature(secret: &str, t_ms: i64, body: &[u8]) -> String {
    // An HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 accepts keys of any length");
    mac.update(t_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t_ms},v1={hex}")
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn post(
    client: reqwest::Client,
    consumer: String,
    sub: Arc<Sub>,
    push: super::records::StoredPush,
    records: Vec<pb::ReceivedRecord>,
) -> Outcome {
    let mut outcome = Outcome {
        consumer,
        records: records
            .iter()
            .map(|r| {
                let offset = r.record.as_ref().map_or(0, |x| x.offset);
                (r.partition, offset, r.delivery_count)
            })
            .collect(),
        error: None,
    };
    let batched = push.max_batch_records > 1;
    let json = body(&sub.name, &sub.config.topic, &records, batched);
    // A JSON value of strings and numbers always serializes.
    let body = serde_json::to_vec(&json).unwrap_or_default();
    let mut req = client
        .post(&push.endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &push.signing_secret {
        req = req.header(SIGNATURE_HEADER, signature(secret, now_ms(), &body));
    }
    outcome.error = match req.body(body).send().await {
        Ok(resp) if ACK_STATUSES.contains(&resp.status().as_u16()) => None,
        Ok(resp) => Some(format!("HTTP {}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Some("no answer within the ack deadline".into()),
        Err(e) => Some(format!("request failed: {e}")),
    };
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_allowed_hosts_over_http_are_accepted() {
        let allow = vec!["hooks.example.com".to_string(), "10.0.0.7".to_string()];
        for ok in [
            "http://127.0.0.1:8080/x",
            "https://localhost/x",
            "http://[::1]:9/",
            "https://hooks.example.com/in",
            "http://10.0.0.7/",
        ] {
            check_endpoint("s", ok, &allow).expect(ok);
        }
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "https://evil.example.com/",
            "http://10.0.0.8/",
        ] {
            let e = check_endpoint("s", bad, &allow).expect_err(bad);
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::FailedPrecondition,
                "{bad}"
            );
        }
        for bad in ["ftp://127.0.0.1/", "file:///etc/passwd", "not a url"] {
            let e = check_endpoint("s", bad, &allow).expect_err(bad);
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn backoff_grows_within_its_bounds() {
        for _ in 0..50 {
            let waits: Vec<u32> = (1..=8).map(|n| backoff_ms(100, 2_000, n)).collect();
            assert!((100..200).contains(&waits[0]), "{waits:?}");
            for w in waits.windows(2) {
                assert!(w[1] >= w[0] || w[0] >= 2_000, "{waits:?}");
            }
            assert!(waits.iter().all(|w| *w < 4_000), "{waits:?}");
        }
    }

    #[test]
    fn the_rate_starts_slow_grows_and_halves_on_failure() {
        let mut r = Rate::new(64);
        assert_eq!(r.window(), 1);
        for _ in 0..10 {
            r.success();
        }
        assert_eq!(r.window(), 11, "slow start: one more per success");
        r.failure();
        assert_eq!(r.window(), 5);
        for _ in 0..4 {
            r.failure();
        }
        assert_eq!(r.window(), 5, "failures of one window halve it once");
        for _ in 0..5 {
            r.success();
        }
        assert_eq!(
            r.window(),
            6,
            "additive increase from 5.5: about one per window of successes, not one each"
        );
        for _ in 0..200 {
            r.failure();
        }
        assert_eq!(r.window(), 1, "never below one");
        for _ in 0..10_000 {
            r.success();
        }
        assert_eq!(r.window(), 64, "never above the maximum");
    }

    #[test]
    fn first_deliveries_are_batched_and_retries_go_alone() {
        let r = |offset: u64, delivery_count: u32| pb::ReceivedRecord {
            partition: 0,
            record: Some(pb::FetchedRecord {
                offset,
                ..Default::default()
            }),
            delivery_count,
            lock_deadline_ms: 0,
        };
        let got = batches(
            vec![
                r(0, 1),
                r(1, 3),
                r(2, 1),
                r(3, 1),
                r(4, 2),
                r(5, 1),
                r(6, 1),
            ],
            2,
        );
        let offsets: Vec<Vec<u64>> = got
            .iter()
            .map(|b| {
                b.iter()
                    .filter_map(|r| r.record.as_ref().map(|x| x.offset))
                    .collect()
            })
            .collect();
        assert_eq!(
            offsets,
            vec![vec![1], vec![4], vec![0, 2], vec![3, 5], vec![6]]
        );
        assert_eq!(batches(vec![r(0, 1), r(1, 1)], 1).len(), 2);
    }

    #[test]
    fn the_signature_is_an_hmac_of_the_timestamp_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe", message "what do ya want for nothing?".
        let s = signature("Jefe", 1, b"what do ya want for nothing?");
        assert!(s.starts_with("t=1,v1="), "{s}");
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature("Jefe", 2, b"what do ya want for nothing?"));
    }
}
