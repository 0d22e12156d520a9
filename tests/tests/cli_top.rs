//! Issue 15: `rill top`, the live view, against a loaded broker: one JSON sample with the
//! right rates and lag, and the live screen under tmux.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rill_proto::v1::{CommitOffsetsRequest, FetchRequest, PartitionOffset};
use rill_tests::{binary_path, rill_cli, skip, Clients, TestBroker};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const N: u64 = 40;
const M: u64 = 15;

/// Topic `orders` holds N records; group `billing` committed M of them.
async fn orders_and_billing(c: &mut Clients) {
    c.create_topic("orders", 1).await.expect("create");
    let values: Vec<String> = (0..N).map(|i| format!("order-{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    c.produce_values("orders", 0, &refs).await.expect("produce");
    c.groups
        .commit_offsets(CommitOffsetsRequest {
            member: None,
            group: "billing".into(),
            topic: "orders".into(),
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: M,
                metadata: None,
            }],
        })
        .await
        .expect("commit");
}

/// Produces to and fetches from `load` until cancelled; returns (produced, fetched).
fn spawn_load(url: String, stop: CancellationToken) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let mut c = Clients::connect(url).await.expect("connect");
        let (mut produced, mut fetched) = (0u64, 0u64);
        while !stop.is_cancelled() {
            c.produce_values("load", 0, &["a"; 10])
                .await
                .expect("produce");
            produced += 10;
            let resp = c
                .log
                .fetch(FetchRequest {
                    topic: "load".into(),
                    partition: 0,
                    offset: fetched,
                    ..Default::default()
                })
                .await
                .expect("fetch")
                .into_inner();
            fetched = resp.next_offset;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        (produced, fetched)
    })
}

#[tokio::test]
async fn top_once_prints_rates_and_lag_as_json() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    orders_and_billing(&mut c).await;
    c.create_topic("load", 1).await.expect("create");
    let stop = CancellationToken::new();
    let load = spawn_load(broker.url(), stop.clone());

    let addr = broker.addr().to_string();
    let (ok, out, err) = rill_cli(
        &addr,
        &["--output", "json", "top", "--once", "--interval-ms", "1000"],
        "",
    )
    .await
    .expect("run rill top");
    stop.cancel();
    let (produced, fetched) = load.await.expect("load");
    assert!(ok, "rill top failed: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON sample");
    let interval_s = v["interval_ms"].as_f64().expect("interval") / 1000.0;
    assert!(interval_s >= 1.0, "{v}");
    let topic = |name: &str| {
        v["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .find(|t| t["topic"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("topic {name} in {v}"))
    };
    let orders = topic("orders");
    assert_eq!(orders["high_watermark"], N);
    assert_eq!(orders["produce_per_sec"], 0.0, "nothing produced to orders");
    assert_eq!(orders["fetch_per_sec"], 0.0);
    let load = topic("load");
    let produce_rate = load["produce_per_sec"].as_f64().expect("rate");
    let fetch_rate = load["fetch_per_sec"].as_f64().expect("rate");
    assert!(produce_rate > 0.0 && fetch_rate > 0.0, "{load}");
    // A rate is a delta over the interval: it cannot exceed what the loader did.
    assert!(
        produce_rate * interval_s <= produced as f64 + 0.5,
        "{load} vs {produced}"
    );
    assert!(
        fetch_rate * interval_s <= fetched as f64 + 0.5,
        "{load} vs {fetched}"
    );
    let billing = v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["group"] == "billing")
        .cloned()
        .expect("group billing");
    assert_eq!(billing["lag"], N - M);
    assert_eq!(billing["lag_per_sec"], 0.0);
    assert_eq!(billing["topics"][0], "orders");
    assert_eq!(v["waiting_fetches"], 0);
    broker.stop().await.expect("stop");
}

/// Runs tmux on its own server socket, so nothing else's sessions are touched.
fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tmux")
}

/// Polls the pane until `cond` holds on its text, for at most 30 s (a screen has no event to
/// await).
async fn wait_for_pane(socket: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = tmux(socket, &["capture-pane", "-p", "-t", "top"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if cond(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}; screen:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn top_under_tmux_shows_topic_and_group_and_quits_cleanly() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        skip(
            "top_under_tmux_shows_topic_and_group_and_quits_cleanly",
            "tmux is not installed",
            "RILL_REQUIRE_TMUX",
        );
        return;
    }
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    orders_and_billing(&mut c).await;
    let rill = binary_path("rill").expect("rill binary");
    let socket = format!("rill-top-test-{}", std::process::id());
    // After rill exits, the shell prints its status and waits, so the pane can be read.
    let command = format!(
        "{} --broker {} top --interval-ms 200; echo rill-exited-$?; sleep 60",
        rill.display(),
        broker.addr()
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "120",
            "-y",
            "30",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");

    let frame = wait_for_pane(&socket, "the topic and the group", |t| {
        t.contains("orders") && t.contains("billing")
    })
    .await;
    assert!(
        frame.contains("Topics") && frame.contains("Groups"),
        "{frame}"
    );
    let lag_line = frame
        .lines()
        .find(|l| l.contains("billing"))
        .expect("billing row");
    assert!(
        lag_line.contains(&(N - M).to_string()),
        "lag N-M on: {lag_line}"
    );

    let sent = tmux(&socket, &["send-keys", "-t", "top", "q"]);
    assert!(sent.status.success());
    let after = wait_for_pane(&socket, "rill to exit", |t| t.contains("rill-exited-")).await;
    assert!(after.contains("rill-exited-0"), "exit status: {after}");
    // The alternate screen is gone: the normal screen is back, without the tables.
    assert!(
        !after.contains("Topics") && !after.contains("billing"),
        "{after}"
    );

    tmux(&socket, &["kill-server"]);
    broker.stop().await.expect("stop");
}
