//! Issue 4: the `rill` CLI against a real broker.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use rill_tests::{binary_path, rill_cli, TestBroker};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn ok(broker: &str, args: &[&str], stdin: &str) -> String {
    let (success, out, err) = rill_cli(broker, args, stdin).await.expect("run rill");
    assert!(success, "rill {args:?} failed: {err}");
    out
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn topics_produce_and_consume_round_trip_as_json() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let out = ok(
        &addr,
        &[
            "topic",
            "create",
            "events",
            "--partitions",
            "3",
            "--retention",
            "7d",
            "--flush",
            "interval:250",
        ],
        "",
    )
    .await;
    assert!(out.contains("created topic events"), "{out}");
    let list = json_lines(&ok(&addr, &["--output", "json", "topic", "list"], "").await);
    assert_eq!(list[0][0]["name"], "events");
    let described = json_lines(
        &ok(
            &addr,
            &["--output", "json", "topic", "describe", "events"],
            "",
        )
        .await,
    );
    assert_eq!(
        described[0]["partitions"]
            .as_array()
            .expect("partitions")
            .len(),
        3
    );
    assert_eq!(described[0]["config"]["flush"], "interval:250");
    let table = ok(&addr, &["topic", "describe", "events"], "").await;
    assert!(table.contains("HIGH-WATERMARK"), "{table}");

    let input: String = (0..30)
        .map(|i| format!("user{}:value-{i}\n", i % 5))
        .collect();
    ok(
        &addr,
        &[
            "produce",
            "events",
            "--key-separator",
            ":",
            "--header",
            "source=cli",
            "--header",
            "v=1",
        ],
        &input,
    )
    .await;
    let out = ok(
        &addr,
        &["--output", "json", "consume", "events", "--from-beginning"],
        "",
    )
    .await;
    let records = json_lines(&out);
    assert_eq!(records.len(), 30);
    let mut per_partition: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &records {
        let value = r["value"].as_str().expect("value");
        let i: u64 = value
            .strip_prefix("value-")
            .expect("prefix")
            .parse()
            .expect("n");
        assert_eq!(r["key"], format!("user{}", i % 5));
        assert_eq!(r["headers"]["source"], "cli");
        assert_eq!(r["headers"]["v"], "1");
        let p = r["partition"].as_u64().expect("partition");
        let key = format!("user{}", i % 5);
        assert_eq!(
            p as u32,
            rill_proto::partitioner::partition_for_key(key.as_bytes(), 3)
        );
        per_partition.entry(p).or_default().push(i);
    }
    for (p, values) in per_partition {
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert_eq!(values, sorted, "order within partition {p}");
    }
    // The default output is one value per line; --print-key adds the key.
    let plain = ok(
        &addr,
        &["consume", "events", "--partition", "0", "--print-key"],
        "",
    )
    .await;
    assert!(
        plain
            .lines()
            .all(|l| l.starts_with("user") && l.contains("\tvalue-")),
        "{plain}"
    );

    // Errors: one line on stderr, non-zero exit.
    let (success, _, err) = rill_cli(&addr, &["topic", "describe", "nope"], "")
        .await
        .expect("run");
    assert!(!success);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");
    let (success, _, err) = rill_cli(&addr, &["topic", "create", "../x"], "")
        .await
        .expect("run");
    assert!(!success && err.starts_with("error:"), "{err}");

    ok(&addr, &["topic", "delete", "events"], "").await;
    assert!(
        json_lines(&ok(&addr, &["--output", "json", "topic", "list"], "").await)[0]
            .as_array()
            .expect("list")
            .is_empty()
    );
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn consume_follow_prints_records_produced_after_it_started() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(&addr, &["topic", "create", "tail"], "").await;
    ok(&addr, &["produce", "tail"], "before\n").await;
    let mut child = tokio::process::Command::new(binary_path("rill").expect("rill"))
        .args(["--broker", &addr, "consume", "tail", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("in time")
        .expect("line");
    assert_eq!(
        first.as_deref(),
        Some("before"),
        "it is running and caught up"
    );
    ok(&addr, &["produce", "tail"], "after-1\nafter-2\n").await;
    for expected in ["after-1", "after-2"] {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("in time")
            .expect("line");
        assert_eq!(line.as_deref(), Some(expected));
    }
    child.kill().await.expect("stop the follower");
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn group_runs_continue_describe_lag_and_reset() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(&addr, &["topic", "create", "work", "--partitions", "1"], "").await;
    let input: String = (0..10).map(|i| format!("m{i}\n")).collect();
    ok(&addr, &["produce", "work"], &input).await;

    let first = ok(&addr, &["consume", "work", "--group", "g", "-n", "4"], "").await;
    let second = ok(&addr, &["consume", "work", "--group", "g", "-n", "4"], "").await;
    assert_eq!(
        first.lines().collect::<Vec<_>>(),
        vec!["m0", "m1", "m2", "m3"]
    );
    assert_eq!(
        second.lines().collect::<Vec<_>>(),
        vec!["m4", "m5", "m6", "m7"],
        "successive, not overlapping"
    );

    let described =
        json_lines(&ok(&addr, &["--output", "json", "group", "describe", "g"], "").await);
    let p = &described[0]["partitions"][0];
    assert_eq!(
        (
            p["committed_offset"].as_u64(),
            p["high_watermark"].as_u64(),
            p["lag"].as_u64()
        ),
        (Some(8), Some(10), Some(2))
    );
    let table = ok(&addr, &["group", "describe", "g"], "").await;
    assert!(table.contains("LAG"), "{table}");
    assert!(ok(&addr, &["group", "list"], "").await.contains('g'));

    // The dry run changes nothing.
    let dry = ok(
        &addr,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "work",
            "--to-earliest",
        ],
        "",
    )
    .await;
    assert!(dry.contains("dry run"), "{dry}");
    let after_dry =
        json_lines(&ok(&addr, &["--output", "json", "group", "describe", "g"], "").await);
    assert_eq!(
        after_dry[0]["partitions"][0]["committed_offset"].as_u64(),
        Some(8)
    );
    // --execute applies it; the next run starts at the beginning.
    ok(
        &addr,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "work",
            "--to-earliest",
            "--execute",
        ],
        "",
    )
    .await;
    let third = ok(&addr, &["consume", "work", "--group", "g", "-n", "2"], "").await;
    assert_eq!(third.lines().collect::<Vec<_>>(), vec!["m0", "m1"]);
    let shifted = json_lines(
        &ok(
            &addr,
            &[
                "--output",
                "json",
                "group",
                "reset-offsets",
                "g",
                "--topic",
                "work",
                "--shift-by",
                "3",
                "--execute",
            ],
            "",
        )
        .await,
    );
    assert_eq!(shifted[0]["changes"][0]["new_offset"].as_u64(), Some(5));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn replay_from_a_timestamp_with_since() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(&addr, &["topic", "create", "history"], "").await;
    ok(&addr, &["produce", "history"], "old-1\nold-2\n").await;
    // The boundary is a real instant between the two produces. Both waits below last a
    // millisecond or so; the deadline only guards against a clock stepped backwards.
    let started = std::time::Instant::now();
    let clock_moved = || {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the wall clock did not move past the records' timestamps"
        )
    };
    let boundary_ms = loop {
        clock_moved();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let records = json_lines(&ok(&addr, &["--output", "json", "consume", "history"], "").await);
        if records
            .iter()
            .all(|r| r["timestamp_ms"].as_i64().expect("ts") < now)
        {
            break now;
        }
    };
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64)
        <= boundary_ms
    {
        clock_moved();
        tokio::task::yield_now().await;
    }
    ok(&addr, &["produce", "history"], "new-1\nnew-2\n").await;
    let since = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(boundary_ms as u64),
    )
    .to_string();
    let out = ok(&addr, &["consume", "history", "--since", &since], "").await;
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["new-1", "new-2"]);
    let all = ok(&addr, &["consume", "history", "--since", "1h"], "").await;
    assert_eq!(all.lines().count(), 4);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn completions_are_printed() {
    let (success, out, _) = rill_cli("127.0.0.1:1", &["completions", "bash"], "")
        .await
        .expect("run");
    assert!(success);
    assert!(out.contains("rill"), "{out}");
}
