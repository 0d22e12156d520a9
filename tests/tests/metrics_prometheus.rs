//! Issue 15: a real Prometheus server scrapes the broker, and its HTTP API answers the group
//! lag the broker reports; `promtool` accepts the shipped scrape config and alert rules. Skipped, loudly, where no `prometheus` binary is installed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rill_proto::v1::{CommitOffsetsRequest, PartitionOffset};
use rill_tests::{skip, BrokerProcess, Clients};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over HTTP/1.1 on `addr`; the status line and the body. `None` while nothing
/// listens yet.
async fn get(addr: &str, path: &str) -> Option<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// Decodes a chunked body, which Prometheus's API may send.
fn dechunk(body: &str) -> String {
    if body.trim_start().starts_with('{') {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::test]
async fn prometheus_scrapes_the_group_lag() {
    const TEST: &str = "prometheus_scrapes_the_group_lag";
    if std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            TEST,
            "no prometheus binary (Debian package `prometheus`)",
            "RILL_REQUIRE_PROMETHEUS",
        );
        return;
    }
    // The shipped configuration and alert rules are valid for Prometheus itself.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for (what, file) in [("config", "rill.yml"), ("rules", "rill.rules.yml")] {
        let checked = std::process::Command::new("promtool")
            .args(["check", what])
            .arg(root.join(file))
            .output()
            .expect("promtool comes with prometheus");
        assert!(
            checked.status.success(),
            "promtool check {what} {file}: {checked:?}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(
        &dir.path().join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await
    .expect("broker");
    let metrics = broker.metrics_addr().expect("metrics address");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("orders", 1).await.expect("create");
    let values: Vec<String> = (0..25).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    c.produce_values("orders", 0, &refs).await.expect("produce");
    c.groups
        .commit_offsets(CommitOffsetsRequest {
            member: None,
            group: "billing".into(),
            topic: "orders".into(),
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: 7,
                metadata: None,
            }],
        })
        .await
        .expect("commit");

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rill\n    \
             static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    )
    .expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let web = format!("127.0.0.1:{port}");
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn prometheus");

    let query = "/api/v1/query?query=rill_group_lag_records%7Bgroup%3D%22billing%22%7D";
    let deadline = Instant::now() + Duration::from_secs(90);
    let lag = loop {
        if let Some((status, body)) = get(&web, query).await {
            if status.contains(" 200") {
                let json: serde_json::Value =
                    serde_json::from_str(&dechunk(&body)).expect("Prometheus answers JSON");
                if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
                    break v.to_string();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not report the lag within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(lag, "18", "N - M = 25 - 7");
    prometheus.kill().await.expect("stop prometheus");
    broker.stop().await.expect("stop broker");
}
