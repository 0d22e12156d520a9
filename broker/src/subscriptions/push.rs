//! The `Subscribe` stream: push delivery with credit flow control, for a subscription (queue
//! mode: records are acquired under locks and acked on the stream) and for a group (offset
//! mode: records from the group's committed offsets; the client commits as usual). In a
//! cluster both read partitions this broker holds no replica of from the broker holding
//! them (see [`super::source`]; offset mode in [`offsets`]).
//!
//! # Credits and memory
//! The client grants records and bytes; the pusher never sends a record that would take
//! either below zero (a record larger than the byte credit left waits for more). Sent
//! messages go through a channel of [`PUSH_QUEUE_MESSAGES`] to tonic, and tonic writes them
//! only as HTTP/2 flow control allows; a full channel stops the pusher. So a subscriber that
//! grants credits and never reads its socket holds at most the channel, the transport's
//! windows, and one read's records in broker memory, however much it granted.

use std::sync::Arc;
use std::time::Duration;

use rill_proto::v1::subscribe_request::Kind;
use rill_proto::v1::subscribe_start::Target;
use rill_proto::v1::{
    self as pb, GroupTarget, StreamAckResult, SubscribeRequest, SubscribeResponse,
};
use rill_storage::log::now_ms;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{StreamExt, StreamMap};
use tonic::{Status, Streaming};

use self::offsets::Offsets;
use super::{read, Ack, Sub, Subscriptions};
use crate::auth::{Caller, Operation, Resource};
use crate::error::BrokerError;
use crate::services::subscriptions::SubscribeStream;
use crate::state::{Broker, TopicState};

/// Messages queued toward tonic per stream: the bound on what a stalled subscriber holds.
pub const PUSH_QUEUE_MESSAGES: usize = 16;
/// The most records one grant may add.
pub const MAX_CREDIT_RECORDS: u64 = 1_000_000;
/// The most bytes one grant may add (1 TiB).
pub const MAX_CREDIT_BYTES: u64 = 1 << 40;
/// Records acquired or read per pass, at most.
const PASS_RECORDS: u64 = 500;

mod offsets;

/// What the stream pushes.
enum Mode {
    Queue {
        sub: Arc<Sub>,
        consumer: String,
    },
    /// A group's partitions, from its committed offsets.
    Offsets(Offsets),
}

/// Reads the first message, checks the caller's rights, and starts the pusher on the
/// broker's tracker. Errors before the stream starts are the call's status.
pub async fn start(
    broker: Broker,
    subs: Subscriptions,
    caller: Caller,
    mut inbound: Streaming<SubscribeRequest>,
) -> Result<SubscribeStream, BrokerError> {
    broker.check_running()?;
    let first = inbound
        .message()
        .await
        .map_err(|s| {
            BrokerError::invalid(format!(
                "reading the stream's first message: {}",
                s.message()
            ))
        })?
        .ok_or_else(|| BrokerError::invalid("the stream ended before its SubscribeStart"))?;
    let Some(Kind::Start(start)) = first.kind else {
        return Err(BrokerError::invalid(
            "the first message of a Subscribe stream must be a SubscribeStart",
        ));
    };
    let authorize = |op: Operation, r: Resource| -> Result<(), BrokerError> {
        if let Some(s) = broker.security() {
            s.authorize(&caller, op, &r)?;
        }
        Ok(())
    };
    let (topic, mode) = match start.target {
        Some(Target::Subscription(name)) => {
            authorize(Operation::Consume, Resource::subscription(&name))?;
            super::validate_consumer(&start.consumer_id)?;
            let sub = subs.get(&name)?;
            authorize(Operation::Consume, Resource::topic(&sub.config.topic))?;
            let topic = broker.topic(&sub.config.topic)?;
            (
                topic,
                Mode::Queue {
                    sub,
                    consumer: start.consumer_id,
                },
            )
        }
        Some(Target::Group(GroupTarget {
            group,
            topic,
            partitions,
        })) => {
            rill_storage::config::validate_name("group", &group)?;
            authorize(Operation::Consume, Resource::group(&group))?;
            authorize(Operation::Consume, Resource::topic(&topic))?;
            let t = broker.topic(&topic)?;
            let count = t.topic.partition_count();
            let partitions: Vec<u32> = if partitions.is_empty() {
                (0..count).collect()
            } else {
                partitions
            };
            for &p in &partitions {
                t.log(p)?;
            }
            let committed = offsets::committed(&broker, &group, &topic, &partitions).await?;
            let failures = subs.group_push_failures().counter(&group);
            let offsets = Offsets::new(&broker, &t, &partitions, &committed, failures)?;
            (t, Mode::Offsets(offsets))
        }
        None => {
            return Err(BrokerError::invalid(
                "a SubscribeStart needs a subscription or a group",
            ))
        }
    };
    let (tx, rx) = mpsc::channel(PUSH_QUEUE_MESSAGES);
    let b = broker.clone();
    broker.tasks().spawn(async move {
        let mut pusher = Pusher {
            broker: b,
            subs,
            topic,
            mode,
            credit_records: 0,
            credit_bytes: 0,
            tx,
        };
        if let Err(e) = pusher.run(inbound).await {
            // The client may be gone already; then nobody reads this.
            let _ = pusher.tx.send(Err(Status::from(e))).await;
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

struct Pusher {
    broker: Broker,
    subs: Subscriptions,
    topic: Arc<TopicState>,
    mode: Mode,
    credit_records: u64,
    credit_bytes: u64,
    tx: mpsc::Sender<Result<SubscribeResponse, Status>>,
}

impl Pusher {
    async fn run(&mut self, mut inbound: Streaming<SubscribeRequest>) -> Result<(), BrokerError> {
        let mut changes = StreamMap::new();
        for p in 0..self.topic.topic.partition_count() {
            if let Some(rx) = self.topic.subscribe(p) {
                changes.insert(p, WatchStream::from_changes(rx));
            }
        }
        let released_sub = match &self.mode {
            Mode::Queue { sub, .. } => Some(Arc::clone(sub)),
            Mode::Offsets(_) => None,
        };
        let mut arrivals =
            super::source::Arrivals::new(&self.broker, released_sub.clone(), &self.topic);
        let idle = tokio::sync::Notify::new();
        loop {
            let released = match &released_sub {
                Some(s) => s.released.notified(),
                None => idle.notified(),
            };
            tokio::pin!(released);
            released.as_mut().enable();
            let mut next_event = None;
            if self.credit_records > 0 && self.credit_bytes > 0 {
                let (sent, event) = self.push_once().await?;
                if sent > 0 {
                    continue;
                }
                next_event = event;
            }
            // Only a future event is worth a wake-up: one due already was just tried (a
            // record waiting for more byte credit), and waking for it again would spin.
            let wake_at = next_event.filter(|ms| *ms > now_ms()).map(|ms: i64| {
                let in_ms = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
                Instant::now() + Duration::from_millis(in_ms)
            });
            let has_credit = self.credit_records > 0 && self.credit_bytes > 0;
            tokio::select! {
                _ = self.broker.shutdown().cancelled() => return Ok(()),
                _ = self.tx.closed() => return Ok(()),
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.handle(m).await?,
                    // The client closed its side or went away.
                    Ok(None) | Err(_) => return Ok(()),
                },
                _ = changes.next(), if has_credit && !changes.is_empty() => {}
                // Records at another broker holding a partition (a long poll there).
                _ = async {
                    match &self.mode {
                        Mode::Queue { .. } => arrivals.next().await,
                        Mode::Offsets(o) => arrivals.next_past(|| o.remote_waits()).await,
                    }
                }, if has_credit => {}
                _ = &mut released, if has_credit => {}
                _ = sleep_until_opt(wake_at), if has_credit && wake_at.is_some() => {}
            }
        }
    }

    /// Applies one client message.
    async fn handle(&mut self, m: SubscribeRequest) -> Result<(), BrokerError> {
        match m.kind {
            Some(Kind::Credits(c)) => {
                if c.records == 0 || c.records > MAX_CREDIT_RECORDS {
                    return Err(BrokerError::invalid(format!(
                        "a grant of {} records is outside 1..={MAX_CREDIT_RECORDS}",
                        c.records
                    )));
                }
                if c.bytes == 0 || c.bytes > MAX_CREDIT_BYTES {
                    return Err(BrokerError::invalid(format!(
                        "a grant of {} bytes is outside 1..={MAX_CREDIT_BYTES}",
                        c.bytes
                    )));
                }
                self.credit_records = self.credit_records.saturating_add(c.records);
                self.credit_bytes = self.credit_bytes.saturating_add(c.bytes);
            }
            Some(Kind::Ack(a)) => {
                let Mode::Queue { sub, consumer } = &self.mode else {
                    return Err(BrokerError::invalid(
                        "acks travel on a subscription's stream; a group commits its offsets",
                    ));
                };
                let outcome = match Ack::from_pb(&a.ranges, a.r#type, a.delay_ms, &a.error) {
                    Ok(ack) => {
                        self.subs
                            .acknowledge(&self.broker, &sub.name, consumer, &ack)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let result = match outcome {
                    Ok((records, _)) => StreamAckResult {
                        sequence: a.sequence,
                        error_code: None,
                        error_message: String::new(),
                        records,
                    },
                    Err(e) => {
                        let status = Status::from(e);
                        StreamAckResult {
                            sequence: a.sequence,
                            error_code: Some(status.code() as i32),
                            error_message: status.message().to_string(),
                            records: 0,
                        }
                    }
                };
                self.send(pb::subscribe_response::Kind::AckResult(result))
                    .await?;
            }
            Some(Kind::Start(_)) => {
                return Err(BrokerError::invalid(
                    "a Subscribe stream takes one SubscribeStart, as its first message",
                ))
            }
            None => return Err(BrokerError::invalid("an empty SubscribeRequest")),
        }
        Ok(())
    }

    /// Pushes what the credits allow now. Returns the records sent and, when none, the next
    /// time a queue record becomes due.
    async fn push_once(&mut self) -> Result<(u64, Option<i64>), BrokerError> {
        let max_records = self.credit_records.min(PASS_RECORDS) as usize;
        let max_bytes = usize::try_from(self.credit_bytes)
            .unwrap_or(usize::MAX)
            .min(self.broker.config().max_fetch_bytes);
        let (records, event) = match &mut self.mode {
            Mode::Queue { sub, consumer } => {
                let sub = Arc::clone(sub);
                let consumer = consumer.clone();
                self.subs
                    .acquire_strict(
                        &self.broker,
                        &sub,
                        &self.topic,
                        &consumer,
                        max_records,
                        max_bytes,
                    )
                    .await?
            }
            Mode::Offsets(offsets) => (
                offsets
                    .read(self.topic.name(), max_records, max_bytes)
                    .await?,
                None,
            ),
        };
        let sent = records.len() as u64;
        for r in records {
            let size = r.record.as_ref().map_or(0, read::record_bytes) as u64;
            self.credit_records -= 1;
            self.credit_bytes = self.credit_bytes.saturating_sub(size);
            self.send(pb::subscribe_response::Kind::Record(r)).await?;
        }
        Ok((sent, event))
    }

    async fn send(&self, kind: pb::subscribe_response::Kind) -> Result<(), BrokerError> {
        self.tx
            .send(Ok(SubscribeResponse { kind: Some(kind) }))
            .await
            // The client went away: the stream ends; its queue records return at their
            // deadline.
            .map_err(|_| BrokerError::ShuttingDown)
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
