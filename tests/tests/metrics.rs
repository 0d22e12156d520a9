//! Issue 15: the `/metrics` endpoint of a real broker process, parsed with a real
//! Prometheus parser; the dashboard and alert rules name only series it exports; a busy
//! metrics port fails the start.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_proto::v1::{self as pb, AckMode, CommitOffsetsRequest, FetchRequest, PartitionOffset};
use rill_tests::{binary_path, produce_req, record, BrokerProcess, Clients};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over HTTP/1.1 (the body only), with a deadline.
async fn scrape_text(addr: SocketAddr) -> String {
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
    let response = tokio::time::timeout(Duration::from_secs(30), fetch)
        .await
        .expect("scrape within 30 s");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    body.to_string()
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let text = scrape_text(addr).await;
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses as Prometheus text")
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a scalar: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "one sample {name}{labels:?}, got {found:?}");
    found[0]
}

/// How many samples named `name` the scrape holds, whatever their labels.
fn count(scrape: &Scrape, name: &str) -> usize {
    scrape.samples.iter().filter(|s| s.metric == name).count()
}

fn has(scrape: &Scrape, name: &str) -> bool {
    scrape.samples.iter().any(|s| s.metric == name)
}

/// Produces N records in 3 requests (one durable), fetches M with a group and commits M,
/// then checks the counters, the lag, the request counts and the histogram counts.
#[tokio::test]
async fn counters_lag_and_histograms_match_the_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker
        .metrics_addr()
        .expect("the metrics address is printed");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("events", 1).await.expect("create");

    const N: u64 = 30;
    const M: u64 = 12;
    for i in 0..3 {
        let records = (0..10)
            .map(|j| record(None, &format!("v{i}-{j}"), None, &[]))
            .collect();
        let mut req = produce_req("events", Some(0), records);
        if i == 0 {
            req.ack = AckMode::Durable as i32;
        }
        c.log.produce(req).await.expect("produce");
    }
    let missing = c.log.produce(produce_req(
        "nope",
        None,
        vec![record(None, "x", None, &[])],
    ));
    assert_eq!(
        missing.await.expect_err("no topic").code(),
        tonic::Code::NotFound
    );
    let fetched = c
        .log
        .fetch(FetchRequest {
            topic: "events".into(),
            partition: 0,
            offset: 0,
            max_records: M as u32,
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(fetched.records.len() as u64, M);
    c.groups
        .commit_offsets(CommitOffsetsRequest {
            member: None,
            group: "readers".into(),
            topic: "events".into(),
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: M,
                metadata: None,
            }],
        })
        .await
        .expect("commit");
    // The dashboard's subscription panels need a subscription's series in the scrape; its
    // oldest-unacked age appears once the background sweep has read the record's time.
    create_subscription(&c, "audit", "events").await;

    let s = scrape_until(metrics, "rill_subscription_oldest_unacked_age_seconds").await;
    let topic = [("topic", "events")];
    assert_eq!(value(&s, "rill_records_produced_total", &topic), N as f64);
    assert_eq!(value(&s, "rill_records_fetched_total", &topic), M as f64);
    assert!(value(&s, "rill_produced_bytes_total", &topic) > 0.0);
    let gp = [
        ("group", "readers"),
        ("topic", "events"),
        ("partition", "0"),
    ];
    assert_eq!(value(&s, "rill_group_lag_records", &gp), (N - M) as f64);
    assert_eq!(value(&s, "rill_group_committed_offset", &gp), M as f64);
    let p0 = [("topic", "events"), ("partition", "0")];
    assert_eq!(value(&s, "rill_partition_high_watermark", &p0), N as f64);
    assert_eq!(value(&s, "rill_partition_log_start_offset", &p0), 0.0);
    assert_eq!(value(&s, "rill_partition_segments", &p0), 1.0);
    assert_eq!(value(&s, "rill_fenced_partitions", &[]), 0.0);
    assert_eq!(value(&s, "rill_waiting_fetches", &[]), 0.0);
    assert!(value(&s, "rill_connections", &[]) >= 1.0);
    assert!(
        value(&s, "rill_fsync_duration_seconds_count", &[]) >= 1.0,
        "the durable ack synced"
    );
    assert_eq!(value(&s, "rill_flush_errors_total", &[]), 0.0);
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&s, "process_open_fds", &[]) > 0.0);

    // Requests by RPC and code.
    let calls =
        |rpc: &str, code: &str| value(&s, "rill_requests_total", &[("rpc", rpc), ("code", code)]);
    assert_eq!(calls("rill.v1.Log/Produce", "OK"), 3.0);
    assert_eq!(calls("rill.v1.Log/Produce", "NOT_FOUND"), 1.0);
    assert_eq!(calls("rill.v1.Log/Fetch", "OK"), 1.0);
    assert_eq!(calls("rill.v1.Groups/CommitOffsets", "OK"), 1.0);
    assert_eq!(calls("rill.v1.Admin/CreateTopic", "OK"), 1.0);
    // Each RPC's histogram counts exactly its calls, whatever their codes.
    let mut by_rpc: HashMap<String, f64> = HashMap::new();
    for sample in s
        .samples
        .iter()
        .filter(|x| x.metric == "rill_requests_total")
    {
        let Value::Counter(v) = sample.value else {
            panic!("a counter")
        };
        *by_rpc
            .entry(sample.labels.get("rpc").expect("rpc").to_string())
            .or_default() += v;
    }
    for sample in s
        .samples
        .iter()
        .filter(|x| x.metric == "rill_request_duration_seconds_count")
    {
        let rpc = sample.labels.get("rpc").expect("rpc");
        let Value::Untyped(count) = sample.value else {
            panic!("a count")
        };
        assert_eq!(
            count,
            by_rpc.get(rpc).copied().unwrap_or(0.0),
            "histogram count of {rpc}"
        );
    }
    assert_eq!(by_rpc.get("rill.v1.Log/Produce"), Some(&4.0));

    check_dashboard_and_rules(&s);
    broker.stop().await.expect("stop");
}

/// The names a scrape exports, with the histograms' `_bucket`, `_sum` and `_count` series.
fn exported_names(s: &Scrape) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for sample in &s.samples {
        names.insert(sample.metric.clone());
        if matches!(sample.value, Value::Histogram(_)) {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", sample.metric));
            }
        }
    }
    names
}

/// The series names in a PromQL expression: Rill's and the process's.
fn series_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = ["rill_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn check_dashboard_and_rules(s: &Scrape) {
    let exported = exported_names(s);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/grafana/rill.json")).expect("dashboard");
    let dash: Json = serde_json::from_str(&text).expect("the dashboard is JSON");
    // What Grafana's import needs: a title, a uid, a schema version, and panels each with a
    // type, a title, a grid position and Prometheus targets.
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    assert!(dash["templating"]["list"].is_array());
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "unique ids"
        );
        assert!(panel["type"].is_string(), "{title}: type");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert!(t["refId"].is_string(), "{title}: refId");
            exprs.push((
                title.to_string(),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/rill.rules.yml"))
        .expect("alert rules");
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            exprs.push(("alert rule".into(), expr.to_string()));
        }
    }
    assert!(rules.contains("rill_fenced_partitions") && rules.contains("rill_fsync_duration"));
    assert!(rules.contains("rill_under_replicated_partitions"));
    for (title, expr) in exprs {
        let names = series_in(&expr);
        assert!(!names.is_empty(), "{title}: {expr} names no Rill series");
        for name in names {
            assert!(
                exported.contains(&name),
                "{title}: {name} is not exported ({expr})"
            );
        }
    }
}

/// Switched off, the per-partition and per-group series are absent; the per-topic ones stay.
#[tokio::test]
async fn per_partition_and_per_group_series_can_be_switched_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-per-partition",
        "false",
        "--metrics-per-group",
        "false",
    ];
    let broker = BrokerProcess::spawn(dir.path(), &args)
        .await
        .expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 2).await.expect("create");
    c.produce_values("t", 0, &["a", "b"])
        .await
        .expect("produce");
    c.groups
        .commit_offsets(CommitOffsetsRequest {
            member: None,
            group: "g".into(),
            topic: "t".into(),
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: 1,
                metadata: None,
            }],
        })
        .await
        .expect("commit");
    create_subscription(&c, "s", "t").await;
    let s = scrape(broker.metrics_addr().expect("metrics")).await;
    assert_eq!(
        value(&s, "rill_records_produced_total", &[("topic", "t")]),
        2.0
    );
    assert_eq!(value(&s, "rill_partitions", &[]), 2.0);
    assert_eq!(value(&s, "rill_groups", &[]), 1.0);
    assert_eq!(value(&s, "rill_subscriptions", &[]), 1.0);
    // One series without a group label: the sum over groups.
    let failures = value(&s, "rill_group_push_remote_read_failures_total", &[]);
    assert_eq!(failures, 0.0);
    for name in [
        "rill_partition_high_watermark",
        "rill_partition_size_bytes",
        "rill_group_lag_records",
        "rill_group_members",
        "rill_subscription_backlog_records",
        "rill_subscription_oldest_unacked_age_seconds",
        "rill_subscription_deliveries_total",
        "rill_subscription_dead_lettered_total",
    ] {
        assert!(!has(&s, name), "{name} is switched off");
    }
    broker.stop().await.expect("stop");
}

/// A metrics port already in use fails the start, naming the address and the setting.
#[tokio::test]
async fn a_busy_metrics_port_fails_the_start_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = binary_path("rill-broker").expect("binary");
    let run = tokio::process::Command::new(binary)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", &addr])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("exits within 60 s")
        .expect("runs");
    assert!(!out.status.success(), "must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metrics listener") && stderr.contains(&addr),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("in use"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening on"), "{stdout}");
    drop(taken);
}

/// Members per group follow joins and leaves; a broker without a cluster exports the
/// replication gauges as zero (so dashboards and alerts work unchanged).
#[tokio::test]
async fn members_per_group_follow_joins_and_leaves() {
    use rill_proto::v1::{GroupHeartbeatRequest, TopicList};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker.metrics_addr().expect("metrics");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 2).await.expect("create");
    let join = || GroupHeartbeatRequest {
        group: "g".into(),
        member_id: String::new(),
        member_epoch: 0,
        instance_id: None,
        subscribed_topics: Some(TopicList {
            topics: vec!["t".into()],
        }),
        owned_partitions: None,
        session_timeout_ms: None,
        rebalance_timeout_ms: None,
        assignor: None,
    };
    let first = c
        .groups
        .group_heartbeat(join())
        .await
        .expect("join")
        .into_inner();
    c.groups.group_heartbeat(join()).await.expect("join");
    let s = scrape(metrics).await;
    assert_eq!(value(&s, "rill_group_members", &[("group", "g")]), 2.0);
    assert_eq!(value(&s, "rill_leader_partitions", &[]), 0.0);
    assert_eq!(value(&s, "rill_under_replicated_partitions", &[]), 0.0);
    assert_eq!(value(&s, "rill_raft_elections_total", &[]), 0.0);

    c.groups
        .group_heartbeat(GroupHeartbeatRequest {
            member_id: first.member_id,
            member_epoch: -1,
            subscribed_topics: None,
            ..join()
        })
        .await
        .expect("leave");
    let s = scrape(metrics).await;
    assert_eq!(value(&s, "rill_group_members", &[("group", "g")]), 1.0);
    broker.stop().await.expect("stop");
}

/// The sum of `name` over the scrapes of `addrs`.
async fn sum_over(addrs: &[SocketAddr], name: &str) -> f64 {
    let mut total = 0.0;
    for addr in addrs {
        total += value(&scrape(*addr).await, name, &[]);
    }
    total
}

/// Waits until the sum of `name` over `addrs` is `want`.
async fn wait_sum(addrs: &[SocketAddr], name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = sum_over(addrs, name).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} summed over {addrs:?} is {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The partitions of the internal state topics, once the cluster has created them all.
async fn internal_partitions(c: &Clients) -> usize {
    use rill_proto::v1::cluster_client::ClusterClient;
    const INTERNAL: [&str; 4] = ["__groups", "__security", "__subscriptions", "__producers"];
    let mut cluster = ClusterClient::new(c.channel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let md = cluster
            .metadata(rill_proto::v1::MetadataRequest { topics: Vec::new() })
            .await
            .expect("metadata")
            .into_inner();
        let internal: Vec<_> = md
            .topics
            .iter()
            .filter(|t| t.name.starts_with("__"))
            .collect();
        if INTERNAL
            .iter()
            .all(|n| internal.iter().any(|t| t.name == *n))
        {
            return internal.iter().map(|t| t.partitions.len()).sum();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the internal topics were not all created: {:?}",
            md.topics.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A 3-broker cluster with an RF 3 topic of 3 partitions: the brokers lead 3 partitions in
/// all, none under-replicated, with elections counted and each leader reporting its
/// replicas' lag; with one broker killed, the survivors lead all 3 and report each
/// under-replicated.
#[tokio::test]
async fn replication_series_follow_leaders_and_a_lost_replica() {
    use rill_tests::cluster::{Extra, TestCluster};
    let mut cluster = TestCluster::start_with(3, Extra::args(&["--metrics-listen", "127.0.0.1:0"]))
        .await
        .expect("3 brokers, each with its metrics");
    let metrics: Vec<SocketAddr> = cluster
        .ids()
        .iter()
        .map(|id| cluster.metrics_addr(*id).expect("a metrics address"))
        .collect();
    let c = cluster.clients(1).await.expect("connect");
    cluster
        .create_topic("r", 3, 3, Duration::from_secs(60))
        .await
        .expect("creating the topic");
    // The internal state topics are replicated partitions too, led and counted alike.
    let internal = internal_partitions(&c).await;
    let all = 3.0 + internal as f64;
    wait_sum(&metrics, "rill_leader_partitions", all).await;
    wait_sum(&metrics, "rill_under_replicated_partitions", 0.0).await;
    for addr in &metrics {
        let s = scrape(*addr).await;
        assert!(value(&s, "rill_raft_elections_total", &[]) >= 1.0);
        let led = value(&s, "rill_leader_partitions", &[]) as usize;
        let lags = count(&s, "rill_replica_lag_entries");
        assert_eq!(lags, led * 2, "two followers per partition led");
        let records = count(&s, "rill_replica_lag_records");
        assert_eq!(records, led * 2, "a lag in records per follower too");
    }

    cluster.kill(3).await.expect("kill node 3");
    let survivors = &metrics[..2];
    wait_sum(survivors, "rill_leader_partitions", all).await;
    wait_sum(survivors, "rill_under_replicated_partitions", all).await;
}

/// Creates subscription `name` on `topic` from its earliest record, with a 60 s lock and no
/// dead-letter topic (leaving records are archived).
async fn create_subscription(c: &Clients, name: &str, topic: &str) {
    SubscriptionsClient::new(c.channel.clone())
        .create(pb::CreateSubscriptionRequest {
            name: name.into(),
            config: Some(pb::SubscriptionConfig {
                topic: topic.into(),
                ack_deadline_ms: 60_000,
                max_delivery_attempts: 5,
                ..Default::default()
            }),
            start: pb::StartPosition::Earliest as i32,
        })
        .await
        .expect("create subscription");
}

/// Acknowledges `offsets` of partition 0 with `kind`, as one request of one range each.
async fn settle(c: &Clients, name: &str, offsets: &[u64], kind: pb::AckType) {
    let resp = SubscriptionsClient::new(c.channel.clone())
        .acknowledge(pb::AcknowledgeRequest {
            subscription: name.into(),
            consumer_id: "worker".into(),
            ranges: offsets
                .iter()
                .map(|&o| pb::AckRange {
                    partition: 0,
                    first_offset: o,
                    last_offset: o,
                })
                .collect(),
            r#type: kind as i32,
            delay_ms: 0,
            error: String::new(),
        })
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(resp.records, offsets.len() as u64);
}

/// Scrapes until a sample named `name` is there (a subscription's gauges wait for the state
/// lock and the background sweep), for at most 10 s.
async fn scrape_until(metrics: SocketAddr, name: &str) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(metrics).await;
        if has(&s, name) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {name} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 15: the age of a subscription's oldest unacknowledged record, from its timestamp,
/// follows the floor as records are acked, and is 0 once nothing is left.
#[tokio::test]
async fn subscription_oldest_unacked_age_follows_the_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker.metrics_addr().expect("metrics");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("aged", 1).await.expect("create");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // Written 10, 5 and 1 minutes ago.
    let records = [600, 300, 60]
        .iter()
        .map(|ago_s| record(None, "v", Some(now_ms - ago_s * 1000), &[]))
        .collect();
    c.log
        .produce(produce_req("aged", Some(0), records))
        .await
        .expect("produce");
    create_subscription(&c, "slow", "aged").await;
    let sub = [("subscription", "slow")];
    // Waits (10 s at most) until the age is about `want_s`: the sweep refreshes it twice a
    // second, and time goes on during the test, hence the margin.
    let age_near = |want_s: f64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = scrape(metrics).await;
            let got = s
                .samples
                .iter()
                .find(|x| {
                    x.metric == "rill_subscription_oldest_unacked_age_seconds"
                        && x.labels.get("subscription") == Some("slow")
                })
                .map(|x| match x.value {
                    Value::Gauge(v) => v,
                    ref other => panic!("not a gauge: {other:?}"),
                });
            if got.is_some_and(|v| (v - want_s).abs() < 30.0) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "age {got:?}, want about {want_s} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    age_near(600.0).await;
    let s = scrape_until(metrics, "rill_subscription_backlog_records").await;
    assert_eq!(value(&s, "rill_subscription_backlog_records", &sub), 3.0);

    let got = SubscriptionsClient::new(c.channel.clone())
        .receive(pb::ReceiveRequest {
            subscription: "slow".into(),
            consumer_id: "worker".into(),
            max_records: 3,
            max_wait_ms: 5_000,
            max_bytes: 0,
        })
        .await
        .expect("receive")
        .into_inner()
        .records;
    assert_eq!(got.len(), 3);
    // Acking a later record leaves the oldest where it is.
    settle(&c, "slow", &[1], pb::AckType::Ack).await;
    age_near(600.0).await;
    settle(&c, "slow", &[0], pb::AckType::Ack).await;
    age_near(60.0).await;
    settle(&c, "slow", &[2], pb::AckType::Ack).await;
    age_near(0.0).await;
    broker.stop().await.expect("stop");
}

/// Issue 15, per subscription: 10 records produced, 6 received, 3 acked, 1 nacked, 1
/// rejected; the scrape shows a backlog of 6 (everything but the acked and rejected), 1 in
/// flight (the nacked one is unlocked), each outcome counted once per record, and the
/// rejected record as dead-lettered.
#[tokio::test]
async fn subscription_backlog_in_flight_and_outcomes_match_the_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker.metrics_addr().expect("metrics");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("q", 1).await.expect("create");
    let values: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    c.produce_values("q", 0, &refs).await.expect("produce");
    create_subscription(&c, "work", "q").await;
    let got = SubscriptionsClient::new(c.channel.clone())
        .receive(pb::ReceiveRequest {
            subscription: "work".into(),
            consumer_id: "worker".into(),
            max_records: 6,
            max_wait_ms: 5_000,
            max_bytes: 0,
        })
        .await
        .expect("receive")
        .into_inner()
        .records;
    let offsets: Vec<u64> = got
        .iter()
        .map(|r| r.record.as_ref().expect("a record").offset)
        .collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4, 5]);
    settle(&c, "work", &[0, 1, 2], pb::AckType::Ack).await;
    settle(&c, "work", &[3], pb::AckType::Nack).await;
    settle(&c, "work", &[4], pb::AckType::Reject).await;

    // A subscription busy at the scrape's instant (the background sweep may hold it for a
    // moment) has no gauges in that scrape: scrape again until they are there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = scrape(metrics).await;
        if has(&s, "rill_subscription_backlog_records") {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no subscription gauges within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sub = [("subscription", "work")];
    assert_eq!(value(&s, "rill_subscriptions", &[]), 1.0);
    assert_eq!(value(&s, "rill_subscription_backlog_records", &sub), 6.0);
    assert_eq!(value(&s, "rill_subscription_in_flight_records", &sub), 1.0);
    let outcome = |o: &str| {
        value(
            &s,
            "rill_subscription_deliveries_total",
            &[("subscription", "work"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("acked"), 3.0);
    assert_eq!(outcome("nacked"), 1.0);
    assert_eq!(outcome("rejected"), 1.0);
    assert_eq!(outcome("expired"), 0.0);
    assert_eq!(
        value(&s, "rill_subscription_dead_lettered_total", &sub),
        1.0
    );
    broker.stop().await.expect("stop");
}
