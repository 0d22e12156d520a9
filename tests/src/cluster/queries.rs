//! Questions to a running cluster, each call within a short deadline: status, metadata and
//! records, and waits (with deadlines) for leaders, records, live brokers and compaction.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rill_proto::v1::cluster_client::ClusterClient;
use rill_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, MetadataRequest, MetadataResponse,
};

use super::TestCluster;

/// The longest one status call may take.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// A `CreateTopic` request for `name` with `partitions` partitions, each replicated on `rf`
/// brokers, every other setting left to the broker.
pub fn create_request(name: &str, partitions: u32, rf: u32) -> rill_proto::v1::CreateTopicRequest {
    rill_proto::v1::CreateTopicRequest {
        name: name.to_string(),
        config: Some(rill_proto::v1::TopicConfig {
            partitions,
            ..Default::default()
        }),
        replication_factor: Some(rf),
    }
}

/// Calls `call` again every 100 ms while it answers UNAVAILABLE (an election, an internal
/// topic still being created, a leader settling) and `deadline` has not passed since the
/// first call; returns the first other answer, or the last UNAVAILABLE.
pub async fn while_unavailable<T, F, Fut>(
    deadline: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match call().await {
            Err(s)
                if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

impl TestCluster {
    /// Creates `name` with `partitions` partitions of `rf` replicas through node 1, asking
    /// again while it answers UNAVAILABLE (the cluster settling) for up to `deadline`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        rf: u32,
        deadline: Duration,
    ) -> Result<()> {
        let admin = self.clients(1).await?.admin;
        while_unavailable(deadline, || {
            let mut admin = admin.clone();
            async move {
                admin
                    .create_topic(create_request(name, partitions, rf))
                    .await
            }
        })
        .await
        .with_context(|| format!("creating {name}"))?;
        Ok(())
    }

    /// Node `id`'s cluster status, within a short deadline.
    pub async fn status(&self, id: u64) -> Result<ClusterStatusResponse> {
        let url = format!("http://{}", self.addr(id));
        let call = async {
            let mut client = ClusterClient::connect(url).await?;
            Ok::<_, anyhow::Error>(
                client
                    .cluster_status(ClusterStatusRequest {})
                    .await?
                    .into_inner(),
            )
        };
        tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .context("cluster status timed out")?
    }

    /// Node `id`'s metadata for `topic`, within a short deadline.
    pub async fn metadata(&self, id: u64, topic: &str) -> Result<MetadataResponse> {
        self.metadata_as(id, topic, None).await
    }

    /// [`TestCluster::metadata`], asked with `token` (authentication on) if given.
    async fn metadata_as(
        &self,
        id: u64,
        topic: &str,
        token: Option<&str>,
    ) -> Result<MetadataResponse> {
        let request = MetadataRequest {
            topics: vec![topic.to_string()],
        };
        let call = async {
            let response = match token {
                None => {
                    let url = format!("http://{}", self.addr(id));
                    ClusterClient::connect(url).await?.metadata(request).await?
                }
                Some(token) => {
                    let options = rill_client::ConnectOptions::new().token(token);
                    rill_client::Connection::connect_with(&self.addr(id).to_string(), &options)
                        .await?
                        .cluster()
                        .metadata(request)
                        .await?
                }
            };
            Ok::<_, anyhow::Error>(response.into_inner())
        };
        tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .context("metadata timed out")?
    }

    /// Waits until every running replica names the same running leader of partition `p` of
    /// `topic`, and returns it.
    pub async fn wait_partition_leader(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        self.wait_partition_leader_as(None, topic, p, deadline)
            .await
    }

    /// [`TestCluster::wait_partition_leader`], asking with `token` (authentication on) if
    /// given.
    pub async fn wait_partition_leader_as(
        &self,
        token: Option<&str>,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            let mut leaders = Vec::new();
            for id in &running {
                let leader = self
                    .metadata_as(*id, topic, token)
                    .await
                    .ok()
                    .and_then(|m| leader_in(&m, p));
                leaders.push(leader);
            }
            if let Some(l) = agreed(&leaders, &running) {
                return Ok(l);
            }
            if tokio::time::Instant::now() >= until {
                bail!("no agreed leader of {topic}/{p} within {deadline:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until some running node reports a running leader of partition `p` of `topic`
    /// (with a replication factor below the broker count, only replicas know it).
    pub async fn wait_partition_leader_among(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            for id in &running {
                let leader = self
                    .metadata(*id, topic)
                    .await
                    .ok()
                    .and_then(|m| leader_in(&m, p));
                if let Some(l) = leader.filter(|l| running.contains(l)) {
                    return Ok(l);
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!("no leader of {topic}/{p} within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node names the same controller leader, among the running
    /// nodes, and returns it.
    pub async fn wait_controller_leader(&self, deadline: Duration) -> Result<u64> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let running = self.running();
            let mut leaders = Vec::new();
            for id in &running {
                leaders.push(self.status(*id).await.ok().map(|s| s.controller_leader));
            }
            if let Some(l) = agreed(&leaders, &running) {
                return Ok(l);
            }
            if tokio::time::Instant::now() >= until {
                bail!("no agreed controller leader within {deadline:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The base offset of the oldest segment of `topic`/`p` in node `id`'s data folder: where
    /// its log starts on disk (0 when it has no segment yet).
    pub fn log_start_on_disk(&self, id: u64, topic: &str, p: u32) -> u64 {
        let folder = self
            .data_dir(id)
            .join("topics")
            .join(topic)
            .join(p.to_string());
        std::fs::read_dir(&folder)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.strip_suffix(".log")?.parse::<u64>().ok()
                    })
                    .min()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Waits until every running node's copy of `topic`/`p` starts past offset 0 on disk (its
    /// older segments deleted by compaction), polling the data folders: the deletion is on
    /// disk, with nothing to await. Returns node id → log start.
    pub async fn wait_log_starts_past_zero(
        &self,
        topic: &str,
        p: u32,
        deadline: Duration,
    ) -> Result<BTreeMap<u64, u64>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let starts: BTreeMap<u64, u64> = self
                .running()
                .into_iter()
                .map(|id| (id, self.log_start_on_disk(id, topic, p)))
                .collect();
            if starts.values().all(|start| *start > 0) {
                return Ok(starts);
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "every replica's {topic}/{p} log start should move past 0 within \
                     {deadline:?}: node → start {starts:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The gRPC clients of node `id`.
    pub async fn clients(&self, id: u64) -> Result<crate::Clients> {
        crate::Clients::connect(format!("http://{}", self.addr(id))).await
    }

    /// Every record of `topic`/`p` on node `id`, read from offset 0: offset → value.
    pub async fn read_all(&self, id: u64, topic: &str, p: u32) -> Result<BTreeMap<u64, String>> {
        let mut c = self.clients(id).await?;
        let mut out = BTreeMap::new();
        let mut offset = 0;
        loop {
            let resp = c.fetch(topic, p, offset, 0).await?;
            for r in &resp.records {
                out.insert(r.offset, String::from_utf8_lossy(&r.value).into_owned());
            }
            if resp.next_offset >= resp.high_watermark || resp.records.is_empty() {
                return Ok(out);
            }
            offset = resp.next_offset;
        }
    }

    /// Waits until node `id`'s high watermark of `topic`/`p` reaches `n`.
    pub async fn wait_records(
        &self,
        id: u64,
        topic: &str,
        p: u32,
        n: u64,
        deadline: Duration,
    ) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(mut c) = self.clients(id).await {
                if let Ok(r) = c.fetch(topic, p, 0, 0).await {
                    if r.high_watermark >= n {
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "node {id} never reached {n} records on {topic}/{p} (see {})",
                    self.log_path(id).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `asked` reports exactly `live` as the live brokers.
    pub async fn wait_live(&self, asked: u64, live: &[u64], deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let got: Option<Vec<u64>> = self.status(asked).await.ok().map(|s| {
                s.brokers
                    .iter()
                    .filter(|b| b.live)
                    .map(|b| b.node_id)
                    .collect()
            });
            if got.as_deref() == Some(live) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                bail!("node {asked} never reported live = {live:?}; last {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The leader that every answer in `leaders` names, if it is one of the `running` nodes
/// (0 is no leader).
fn agreed(leaders: &[Option<u64>], running: &[u64]) -> Option<u64> {
    let first = (*leaders.first()?)?;
    (first != 0 && running.contains(&first) && leaders.iter().all(|x| *x == Some(first)))
        .then_some(first)
}

/// The leader a Metadata answer names for partition `p` of its (first) topic.
fn leader_in(m: &MetadataResponse, p: u32) -> Option<u64> {
    m.topics
        .first()
        .and_then(|t| t.partitions.get(p as usize))
        .map(|x| x.leader)
}
