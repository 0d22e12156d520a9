//! The client library finds partition leaders through `Cluster.Metadata` before its first
//! request, instead of sending it to the bootstrap broker and following the redirect; and a
//! single broker (no `Cluster` service) is asked once per producer, not once per request.
//! Counted on the brokers' own `rill_requests_total`, scraped from `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use rill_client::{Connection, Producer, ProducerConfig, ProducerRecord};
use rill_tests::cluster::{create_request, free_ports, spawn_broker_with, Extra};
use rill_tests::{BrokerProcess, Clients};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

/// The longest an election, a commit or a scrape may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// `GET /metrics` (the body), within [`DEADLINE`].
async fn scrape(addr: SocketAddr) -> String {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: rill\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        String::from_utf8(raw).expect("utf-8")
    };
    let response = tokio::time::timeout(DEADLINE, fetch)
        .await
        .expect("scrape within the deadline");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// The sum of `rill_requests_total` over the samples whose `rpc` label is `rpc` (any code).
async fn requests(metrics: SocketAddr, rpc: &str) -> f64 {
    let text = scrape(metrics).await;
    let samples = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    samples
        .samples
        .iter()
        .filter(|s| s.metric == "rill_requests_total" && s.labels.get("rpc") == Some(rpc))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("rill_requests_total is not a counter: {other:?}"),
        })
        .sum()
}

/// Three brokers, node `i + 1` listening on `addrs[i]` with its metrics on `metrics[i]`.
struct Cluster {
    addrs: Vec<SocketAddr>,
    metrics: Vec<SocketAddr>,
    children: Vec<Child>,
    _dirs: Vec<tempfile::TempDir>,
    _logs: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let ports = free_ports(6).expect("ports");
        let peers = (0..3)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let logs = tempfile::tempdir().expect("logs");
        let mut cluster = Cluster {
            addrs: Vec::new(),
            metrics: Vec::new(),
            children: Vec::new(),
            _dirs: Vec::new(),
            _logs: tempfile::tempdir().expect("logs"),
        };
        for i in 0..3 {
            let dir = tempfile::tempdir().expect("dir");
            let metrics = SocketAddr::from(([127, 0, 0, 1], ports[3 + i]));
            let extra = Extra {
                args: vec!["--metrics-listen".into(), metrics.to_string()],
                env: vec![],
            };
            let log = std::fs::File::create(logs.path().join(format!("{i}.log"))).expect("log");
            let addr = SocketAddr::from(([127, 0, 0, 1], ports[i]));
            let child = spawn_broker_with(dir.path(), addr, i as u64 + 1, &peers, log, &extra)
                .await
                .expect("broker");
            cluster.addrs.push(addr);
            cluster.metrics.push(metrics);
            cluster.children.push(child);
            cluster._dirs.push(dir);
        }
        cluster._logs = logs;
        cluster
    }

    /// Node `id`'s view of who leads each partition of `topic` (0: none known).
    async fn leaders(&self, id: u64, topic: &str) -> Vec<u64> {
        let url = format!("http://{}", self.addrs[id as usize - 1]);
        let call = async {
            let mut c = rill_proto::v1::cluster_client::ClusterClient::connect(url).await?;
            Ok::<_, anyhow::Error>(
                c.metadata(rill_proto::v1::MetadataRequest {
                    topics: vec![topic.into()],
                })
                .await?
                .into_inner(),
            )
        };
        match tokio::time::timeout(DEADLINE, call).await {
            Ok(Ok(m)) => m
                .topics
                .first()
                .map(|t| t.partitions.iter().map(|p| p.leader).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn stop(mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

/// A producer bootstrapped at broker 1 alone sends to a partition that another broker
/// leads: the produce goes straight to that leader. Broker 1 is never sent a Produce (no
/// FAILED_PRECONDITION redirect), asked `Metadata` once, and the leader appends the record.
/// Sending the first request to the bootstrap broker and following its `rill-leader`
/// redirect (the client before leader discovery) fails the first assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_produce_goes_straight_to_a_leader_that_is_not_the_bootstrap_broker() {
    let cluster = Cluster::start().await;
    let mut admin = Clients::connect(format!("http://{}", cluster.addrs[0]))
        .await
        .expect("connect")
        .admin;
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match admin.create_topic(create_request("lead", 3, 3)).await {
            Ok(_) => break,
            Err(s) if tokio::time::Instant::now() < until => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("creating the topic: {s:?}"),
        }
    }
    // Every broker agrees on each partition's leader; take one that broker 1 does not lead.
    let until = tokio::time::Instant::now() + DEADLINE;
    let (partition, leader) = loop {
        let views = [
            cluster.leaders(1, "lead").await,
            cluster.leaders(2, "lead").await,
            cluster.leaders(3, "lead").await,
        ];
        let agreed = views[0].len() == 3
            && views[0].iter().all(|l| *l != 0)
            && views.iter().all(|v| *v == views[0]);
        if agreed {
            if let Some(p) = views[0].iter().position(|l| *l != 1) {
                break (p as u32, views[0][p]);
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no agreed leaders other than broker 1: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let produce = "rill.v1.Log/Produce";
    let metadata = "rill.v1.Cluster/Metadata";
    let produces_before = requests(cluster.metrics[0], produce).await;
    let metadata_before = requests(cluster.metrics[0], metadata).await;
    let leader_before = requests(cluster.metrics[leader as usize - 1], produce).await;

    let conn = Connection::connect(&cluster.addrs[0].to_string())
        .await
        .expect("connect");
    let producer = Producer::new(conn, ProducerConfig::new().linger_ms(0));
    let (p, offset) = producer
        .send_and_wait(ProducerRecord::new("lead", "straight").partition(partition))
        .await
        .expect("acknowledged");
    assert_eq!((p, offset), (partition, 0));
    for i in 0..10 {
        producer
            .send_and_wait(ProducerRecord::new("lead", format!("m{i}")).partition(partition))
            .await
            .expect("acknowledged");
    }

    assert_eq!(
        requests(cluster.metrics[0], produce).await - produces_before,
        0.0,
        "the bootstrap broker (1) was sent a Produce for partition {partition}, which node \
         {leader} leads"
    );
    assert_eq!(
        requests(cluster.metrics[leader as usize - 1], produce).await - leader_before,
        11.0,
        "node {leader}, the leader, takes every produce"
    );
    assert_eq!(
        requests(cluster.metrics[0], metadata).await - metadata_before,
        1.0,
        "one Metadata call for the topic, not one per request"
    );
    cluster.stop().await;
}

/// A single broker has no `Cluster` service: the producer asks once, remembers the
/// UNIMPLEMENTED, and sends every batch to the broker with no further lookup. A lookup
/// before each request (or each partition's first) would show here as more than one call.
#[tokio::test]
async fn a_single_broker_is_asked_for_leaders_once_per_producer() {
    let dir = tempfile::tempdir().expect("dir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker
        .metrics_addr()
        .expect("the metrics address is printed");
    let mut clients = Clients::connect(broker.url()).await.expect("connect");
    clients.create_topic("solo", 3).await.expect("create");
    let before =
        requests(metrics, "unknown").await + requests(metrics, "rill.v1.Cluster/Metadata").await;

    let conn = Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect");
    let producer = Producer::new(conn, ProducerConfig::new().linger_ms(0));
    for i in 0..30u32 {
        producer
            .send_and_wait(ProducerRecord::new("solo", format!("m{i}")).partition(i % 3))
            .await
            .expect("acknowledged");
    }
    let asked = requests(metrics, "unknown").await
        + requests(metrics, "rill.v1.Cluster/Metadata").await
        - before;
    assert!(asked <= 1.0, "Metadata asked {asked} times for 30 produces");
    assert_eq!(requests(metrics, "rill.v1.Log/Produce").await, 30.0);
    broker.stop().await.expect("stop");
}
