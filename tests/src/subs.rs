//! Subscriptions on a [`TestCluster`]: calls that retry while the cluster answers
//! UNAVAILABLE (an election, a leader loading its state), and placing a topic away from a
//! given broker.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use tonic::transport::Channel;

use crate::cluster::{create_request, while_unavailable, Extra, TestCluster};

/// The internal topic whose leader serves every subscription.
pub const SUBSCRIPTIONS_TOPIC: &str = "__subscriptions";
/// The longest one call keeps being retried while UNAVAILABLE.
const RETRY: Duration = Duration::from_secs(30);

/// Starts `n` brokers and waits for the controller's leader and the leader of
/// `__subscriptions` (the broker that serves every subscription): the cluster and that
/// broker's id.
pub async fn start_serving(n: usize, deadline: Duration) -> Result<(TestCluster, u64)> {
    start_serving_with(n, Extra::default(), deadline).await
}

/// As [`start_serving`], each broker also given `extra`.
pub async fn start_serving_with(
    n: usize,
    extra: Extra,
    deadline: Duration,
) -> Result<(TestCluster, u64)> {
    let cluster = TestCluster::start_with(n, extra).await?;
    cluster
        .wait_controller_leader(deadline)
        .await
        .context("controller leader")?;
    let serving = cluster
        .wait_partition_leader(SUBSCRIPTIONS_TOPIC, 0, deadline)
        .await
        .context("leader of __subscriptions")?;
    Ok((cluster, serving))
}

/// Produces `values` to `topic`/`p` at node `at`, retrying (every 100 ms, up to `deadline`)
/// while the partition settles after an election or a restart.
pub async fn produce(
    cluster: &TestCluster,
    at: u64,
    topic: &str,
    p: u32,
    values: &[String],
    deadline: Duration,
) -> Result<()> {
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let tried = match cluster.clients(at).await {
            Ok(mut c) => c.produce_values(topic, p, &refs).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match tried {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < until => {
                eprintln!("produce to {topic}/{p} at node {at}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("produce to {topic}/{p} at node {at}"))
            }
        }
    }
}

/// The Subscriptions client of node `id`.
pub async fn client(cluster: &TestCluster, id: u64) -> Result<SubscriptionsClient<Channel>> {
    Ok(SubscriptionsClient::new(cluster.clients(id).await?.channel))
}

/// Creates topics `{prefix}-0`, `{prefix}-1`, ... (`partitions` partitions, replicated on
/// `rf` brokers) through node `via` until one has some partition without a replica on
/// broker `away_from` (and, when `owner_not` is set, none led by it); returns its name and
/// each partition's replicas. Fails after ten topics.
pub async fn create_topic_away_from(
    cluster: &TestCluster,
    via: u64,
    prefix: &str,
    (partitions, rf): (u32, u32),
    away_from: &[u64],
) -> Result<(String, Vec<Vec<u64>>)> {
    let admin = cluster.clients(via).await?.admin;
    for i in 0..10 {
        let name = format!("{prefix}-{i}");
        while_unavailable(RETRY, || {
            let mut admin = admin.clone();
            let req = create_request(&name, partitions, rf);
            async move { admin.create_topic(req).await }
        })
        .await
        .with_context(|| format!("creating {name}"))?;
        let replicas = replicas_of(cluster, via, &name, partitions).await?;
        let away = replicas
            .iter()
            .any(|r| away_from.iter().all(|b| !r.contains(b)));
        if replicas.len() == partitions as usize && away {
            return Ok((name, replicas));
        }
    }
    bail!("ten topics {prefix}-N all had replicas on {away_from:?}")
}

/// Each partition's replicas of `topic` as node `via` knows them, once it knows all
/// `partitions`.
pub async fn replicas_of(
    cluster: &TestCluster,
    via: u64,
    topic: &str,
    partitions: u32,
) -> Result<Vec<Vec<u64>>> {
    let until = tokio::time::Instant::now() + RETRY;
    loop {
        let replicas: Vec<Vec<u64>> = cluster
            .metadata(via, topic)
            .await
            .ok()
            .and_then(|md| md.topics.into_iter().next())
            .map(|t| t.partitions.into_iter().map(|p| p.replicas).collect())
            .unwrap_or_default();
        if replicas.len() == partitions as usize && replicas.iter().all(|r| !r.is_empty()) {
            return Ok(replicas);
        }
        if tokio::time::Instant::now() >= until {
            bail!("node {via} never knew the {partitions} partitions of {topic}: {replicas:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates subscription `name` through node `via`.
pub async fn create(
    cluster: &TestCluster,
    via: u64,
    name: &str,
    config: pb::SubscriptionConfig,
) -> Result<()> {
    let subs = client(cluster, via).await?;
    while_unavailable(RETRY, || {
        let mut subs = subs.clone();
        let req = pb::CreateSubscriptionRequest {
            name: name.into(),
            config: Some(config.clone()),
            start: pb::StartPosition::Earliest as i32,
        };
        async move { subs.create(req).await }
    })
    .await
    .with_context(|| format!("creating subscription {name}"))?;
    Ok(())
}

/// Receives up to `n` records of subscription `sub` as `consumer` through node `via`,
/// waiting up to `wait_ms` for the first.
pub async fn receive(
    cluster: &TestCluster,
    via: u64,
    sub: &str,
    consumer: &str,
    (n, wait_ms): (u32, u32),
) -> Result<Vec<pb::ReceivedRecord>> {
    let subs = client(cluster, via).await?;
    let resp = while_unavailable(RETRY, || {
        let mut subs = subs.clone();
        let req = pb::ReceiveRequest {
            subscription: sub.into(),
            consumer_id: consumer.into(),
            max_records: n,
            max_wait_ms: wait_ms,
            max_bytes: 0,
        };
        async move { subs.receive(req).await }
    })
    .await
    .with_context(|| format!("receiving from {sub}"))?;
    Ok(resp.into_inner().records)
}

/// Describes subscription `sub` through node `via`.
pub async fn describe(
    cluster: &TestCluster,
    via: u64,
    sub: &str,
) -> Result<pb::DescribeSubscriptionResponse> {
    let mut subs = client(cluster, via).await?;
    let resp = subs
        .describe(pb::DescribeSubscriptionRequest { name: sub.into() })
        .await
        .with_context(|| format!("describing {sub}"))?;
    Ok(resp.into_inner())
}

/// Applies `kind` to one record (`partition`, `offset`) held by `consumer`.
pub async fn settle(
    cluster: &TestCluster,
    via: u64,
    sub: &str,
    consumer: &str,
    (partition, offset): (u32, u64),
    kind: pb::AckType,
) -> Result<()> {
    let subs = client(cluster, via).await?;
    while_unavailable(RETRY, || {
        let mut subs = subs.clone();
        let req = pb::AcknowledgeRequest {
            subscription: sub.into(),
            consumer_id: consumer.into(),
            ranges: vec![pb::AckRange {
                partition,
                first_offset: offset,
                last_offset: offset,
            }],
            r#type: kind as i32,
            delay_ms: 0,
            error: String::new(),
        };
        async move { subs.acknowledge(req).await }
    })
    .await
    .with_context(|| format!("{kind:?} of {partition}/{offset} in {sub}"))?;
    Ok(())
}
