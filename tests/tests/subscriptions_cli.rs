//! `rill subscription ...` and `rill consume --subscription/--push`, through the real CLI.

use anyhow::Result;
use rill_tests::{rill_cli, Clients, TestBroker};

async fn ok(addr: &str, args: &[&str]) -> Result<String> {
    let (success, out, err) = rill_cli(addr, args, "").await?;
    assert!(success, "rill {args:?} failed: {err}");
    Ok(out)
}

async fn describe(addr: &str) -> Result<serde_json::Value> {
    let out = ok(addr, &["--output", "json", "subscription", "describe", "s"]).await?;
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::test]
async fn the_subscription_verbs_and_queue_and_push_consumption() -> Result<()> {
    let broker = TestBroker::start().await?;
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("t", 1).await?;
    c.produce_values("t", 0, &["a", "b", "c", "d", "e"]).await?;

    let (success, _, err) = rill_cli(
        &addr,
        &[
            "subscription",
            "create",
            "x",
            "--topic",
            "t",
            "--dead-letter-topic",
            "nope",
        ],
        "",
    )
    .await?;
    assert!(!success, "a missing dead-letter topic is refused");
    assert!(
        err.contains("nope") && err.contains("does not exist"),
        "{err}"
    );

    let out = ok(
        &addr,
        &[
            "subscription",
            "create",
            "s",
            "--topic",
            "t",
            "--from-beginning",
            "--ack-deadline",
            "10s",
        ],
    )
    .await?;
    assert!(out.contains("created subscription s"), "{out}");
    assert!(ok(&addr, &["subscription", "list"]).await?.contains("s "));
    let d = describe(&addr).await?;
    assert_eq!(
        (d["backlog"].as_u64(), d["ack_deadline_ms"].as_u64()),
        (Some(5), Some(10_000))
    );
    let table = ok(&addr, &["subscription", "describe", "s"]).await?;
    assert!(
        table.contains("backlog 5") && table.contains("IN-FLIGHT"),
        "{table}"
    );

    // Printed records are acknowledged.
    let out = ok(&addr, &["consume", "t", "--subscription", "s", "-n", "3"]).await?;
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    let d = describe(&addr).await?;
    assert_eq!(
        (d["backlog"].as_u64(), d["in_flight"].as_u64()),
        (Some(2), Some(0))
    );
    let out = ok(&addr, &["consume", "t", "--subscription", "s"]).await?;
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["d", "e"]);
    assert_eq!(describe(&addr).await?["backlog"].as_u64(), Some(0));

    // Replay, then push in queue mode.
    let out = ok(&addr, &["subscription", "seek", "s", "--to-offset", "1"]).await?;
    assert!(out.contains("partition 0: now at offset 1"), "{out}");
    assert_eq!(describe(&addr).await?["backlog"].as_u64(), Some(4));
    let out = ok(
        &addr,
        &["consume", "t", "--subscription", "s", "--push", "-n", "4"],
    )
    .await?;
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["b", "c", "d", "e"]);

    // Push in offset mode, for a group.
    let out = ok(
        &addr,
        &["consume", "t", "--push", "--group", "g", "-n", "2"],
    )
    .await?;
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["a", "b"]);

    ok(&addr, &["subscription", "delete", "s"]).await?;
    assert!(!ok(&addr, &["subscription", "list"]).await?.contains("s "));
    broker.stop().await?;
    Ok(())
}
