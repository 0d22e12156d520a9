//! Issue 18: the `rill` CLI's rough edges, against a real broker: one clean error line,
//! human units in tables, no silent empty reads, and an example in every `--help`.

use rill_tests::{rill_cli, TestBroker};
use serde_json::Value;

async fn ok(broker: &str, args: &[&str], stdin: &str) -> (String, String) {
    let (success, out, err) = rill_cli(broker, args, stdin).await.expect("run rill");
    assert!(success, "rill {args:?} failed: {err}");
    (out, err)
}

/// Runs a command that must fail and returns its stderr.
async fn fails(broker: &str, args: &[&str]) -> String {
    let (success, out, err) = rill_cli(broker, args, "").await.expect("run rill");
    assert!(!success, "rill {args:?} succeeded: {out}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    err
}

#[tokio::test]
async fn errors_are_one_line_with_the_brokers_message_once() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(
        &addr,
        &["topic", "create", "orders", "--partitions", "1"],
        "",
    )
    .await;

    // The exact stderr: the message once, no gRPC code or description repeating it.
    assert_eq!(
        fails(&addr, &["consume", "nope", "-n", "1"]).await,
        "error: topic \"nope\" not found\n"
    );
    assert_eq!(
        fails(&addr, &["topic", "create", "../x"]).await,
        "error: invalid topic name \"../x\": only ASCII letters, digits, `.`, `_` and `-` are allowed\n"
    );
    assert_eq!(
        fails(&addr, &["topic", "create", "orders"]).await,
        "error: topic \"orders\" already exists\n"
    );
    assert_eq!(
        fails(&addr, &["group", "describe", "nobody"]).await,
        "error: group \"nobody\" not found\n"
    );
    broker.stop().await.expect("stop");

    // With the broker gone, the line says why the connection failed, once.
    let err = fails(&addr, &["topic", "list"]).await;
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: cannot connect to {addr}: ")),
        "{err}"
    );
    assert!(
        err.trim_end().ends_with("is a broker running there?"),
        "{err}"
    );
    assert!(!err.contains("code:"), "{err}");
}

#[tokio::test]
async fn tables_use_human_units_and_json_keeps_raw_numbers() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(
        &addr,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "1",
            "--retention",
            "7d",
            "--segment-bytes",
            "268435456",
            "--retention-bytes",
            "1610612736",
        ],
        "",
    )
    .await;
    let (table, _) = ok(&addr, &["topic", "describe", "orders"], "").await;
    let header = table.lines().next().expect("a header line");
    assert!(header.contains("retention 7d,"), "{table}");
    assert!(header.contains("retention bytes 1.5 GiB,"), "{table}");
    assert!(header.contains("segment bytes 256 MiB,"), "{table}");
    assert!(
        table
            .lines()
            .nth(2)
            .expect("partition row")
            .contains(" 0 B "),
        "{table}"
    );

    let (json, _) = ok(
        &addr,
        &["--output", "json", "topic", "describe", "orders"],
        "",
    )
    .await;
    let v: Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(v["config"]["retention_ms"], 604_800_000u64);
    assert_eq!(v["config"]["segment_bytes"], 268_435_456u64);
    assert_eq!(v["config"]["retention_bytes"], 1_610_612_736u64);
    assert_eq!(v["partitions"][0]["size_bytes"], 0);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn an_empty_read_says_why_on_stderr_and_exits_zero() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    ok(
        &addr,
        &["topic", "create", "orders", "--partitions", "1"],
        "",
    )
    .await;
    ok(
        &addr,
        &["topic", "create", "quiet", "--partitions", "2"],
        "",
    )
    .await;
    ok(&addr, &["produce", "orders"], "only\n").await;

    // An offset past the high watermark.
    let (out, err) = ok(
        &addr,
        &[
            "consume",
            "orders",
            "--partition",
            "0",
            "--offset",
            "99",
            "-n",
            "1",
        ],
        "",
    )
    .await;
    assert_eq!(out, "");
    assert_eq!(
        err,
        "note: offset 99 is past the end of partition 0 (high watermark 1); nothing arrived \
         before the end seen at start (-f waits for new records)\n"
    );

    // --since after the newest record.
    let (out, err) = ok(
        &addr,
        &["consume", "orders", "--since", "2999-01-01T00:00:00Z"],
        "",
    )
    .await;
    assert_eq!(out, "");
    assert!(
        err.starts_with("note: no record in partition 0 of topic \"orders\" is at or after 2999-01-01T00:00:00.000Z: all are older (high watermark 1);"),
        "{err}"
    );

    // An empty topic, in JSON too: stdout stays clean, the note goes to stderr.
    let (out, err) = ok(&addr, &["--output", "json", "consume", "quiet"], "").await;
    assert_eq!(out, "");
    assert!(
        err.starts_with("note: topic \"quiet\" is empty: nothing was ever produced to it (high watermarks 0:0, 1:0);"),
        "{err}"
    );

    // A read that printed something adds no note; an error still fails.
    let (out, err) = ok(&addr, &["consume", "orders"], "").await;
    assert_eq!((out.as_str(), err.as_str()), ("only\n", ""));
    let err = fails(&addr, &["consume", "orders", "--partition", "5"]).await;
    assert!(err.starts_with("error: partition 5"), "{err}");
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn help_shows_an_example_and_consume_documents_its_exit_status() {
    // No broker is needed for help; the address is never dialled.
    let (success, out, _) = rill_cli("127.0.0.1:1", &["--help"], "").await.expect("run");
    assert!(success);
    assert!(out.contains("Example:\n  rill "), "{out}");
    let (success, out, _) = rill_cli("127.0.0.1:1", &["consume", "--help"], "")
        .await
        .expect("run");
    assert!(success);
    assert!(out.contains("Example:\n  rill consume "), "{out}");
    assert!(out.contains("Exit status:"), "{out}");
    assert!(
        out.contains("0  the read worked, even if it printed nothing"),
        "{out}"
    );
}
