//! Clusters of real `rill-broker` processes: forming, reporting status, replacing a killed
//! controller leader, and refusing brokers that do not belong.

use std::process::Stdio;
use std::time::Duration;

use rill_tests::cluster::{free_ports, TestCluster};
use rill_tests::{binary_path, rill_cli};

/// The longest the cluster may take to elect or notice anything in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_form_a_cluster_and_agree_on_its_status() {
    let cluster = TestCluster::start(3).await.expect("start");
    let leader = cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("leader");
    for id in cluster.ids() {
        cluster
            .wait_live(id, &[1, 2, 3], DEADLINE)
            .await
            .expect("all live");
        let status = cluster.status(id).await.expect("status");
        assert_eq!(status.answered_by, id);
        assert_eq!(status.controller_leader, leader);
        let flagged: Vec<u64> = status
            .brokers
            .iter()
            .filter(|b| b.controller_leader)
            .map(|b| b.node_id)
            .collect();
        assert_eq!(flagged, vec![leader]);
    }

    // The CLI tells the same, as JSON and as a table.
    let addr = cluster.addr(2).to_string();
    let (ok, out, err) = rill_cli(&addr, &["--output", "json", "cluster", "status"], "")
        .await
        .expect("cli");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["controller_leader"], leader);
    assert_eq!(v["answered_by"], 2);
    let brokers = v["brokers"].as_array().expect("brokers");
    assert_eq!(brokers.len(), 3);
    assert!(brokers.iter().all(|b| b["live"] == true), "{v}");
    let (ok, out, err) = rill_cli(&addr, &["cluster", "status"], "")
        .await
        .expect("cli");
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("controller leader: {leader}")),
        "{out}"
    );
    assert_eq!(out.matches("live").count(), 3, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_leader_is_replaced_and_rejoins_after_restart() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    let first = cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("leader");
    cluster.kill(first).await.expect("kill -9");
    let second = cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("a new leader");
    assert_ne!(second, first, "the dead broker cannot lead");
    let survivors: Vec<u64> = cluster.running();
    for id in &survivors {
        cluster
            .wait_live(*id, &survivors, DEADLINE)
            .await
            .expect("the killed broker is reported down");
    }

    cluster.restart(first).await.expect("restart");
    let third = cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("a leader after the restart");
    assert!(cluster.running().contains(&third));
    for id in cluster.ids() {
        cluster
            .wait_live(id, &[1, 2, 3], DEADLINE)
            .await
            .expect("everyone live again");
    }
    let status = cluster.status(first).await.expect("status");
    assert!(
        status.controller_term > 1,
        "the restarted broker follows the newer term: {status:?}"
    );
}

/// Runs a broker that should refuse to start; returns its exit success and stderr.
async fn run_refused(data_dir: &std::path::Path, args: &[String]) -> (bool, String) {
    let out = tokio::process::Command::new(binary_path("rill-broker").expect("bin"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "error,openraft=off")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("the refused broker exits in time")
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_that_do_not_belong_refuse_to_join_and_change_nothing() {
    let cluster = TestCluster::start(3).await.expect("start");
    let leader = cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("leader");
    let scratch = tempfile::tempdir().expect("tmp");

    // Node 3 again, but with a peers list that gives it another address.
    let port = free_ports(1).expect("port")[0];
    let wrong_peers = cluster
        .peers()
        .split(',')
        .map(|p| {
            if p.starts_with("3=") {
                format!("3=127.0.0.1:{port}")
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let dir = scratch.path().join("wrong-peers");
    let args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--node-id".into(),
        "3".into(),
        "--peers".into(),
        wrong_peers,
    ];
    let (ok, stderr) = run_refused(&dir, &args).await;
    assert!(!ok, "a broker with another peers list must not run");
    assert!(
        stderr.contains("every broker must be given the same list"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing was written for the refused broker");

    // Node 2 a second time, on another port, with the right peers list.
    let port = free_ports(1).expect("port")[0];
    let dir = scratch.path().join("duplicate");
    let args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--node-id".into(),
        "2".into(),
        "--peers".into(),
        cluster.peers().to_string(),
    ];
    let (ok, stderr) = run_refused(&dir, &args).await;
    assert!(!ok, "a duplicate node id must not run");
    assert!(
        stderr.contains("another broker may already be node 2"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing was written for the duplicate");

    // The cluster did not notice.
    assert_eq!(
        cluster
            .wait_controller_leader(DEADLINE)
            .await
            .expect("leader"),
        leader
    );
    for id in cluster.ids() {
        cluster
            .wait_live(id, &[1, 2, 3], DEADLINE)
            .await
            .expect("all live");
    }
}
