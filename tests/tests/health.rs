//! Issue 15: the gRPC health service says NOT_SERVING while the store is still opening and
//! once shutdown begins, SERVING in between, for the whole server and each service.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rill_tests::{binary_path, TestBroker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICES: [&str; 4] = ["", "rill.v1.Log", "rill.v1.Groups", "rill.v1.Admin"];

async fn status(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let resp = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("check {service:?}: {e}"))
        .into_inner();
    resp.status()
}

/// Connects to `addr`, retrying until a deadline: the broker is starting.
async fn health_client(addr: &str) -> HealthClient<tonic::transport::Channel> {
    HealthClient::new(channel(addr).await)
}

/// A channel to `addr`, retrying until a deadline: the broker is starting.
async fn channel(addr: &str) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The store's open is held up by a group offsets file that is a FIFO with no writer yet
/// (reading it blocks); meanwhile the gRPC port answers NOT_SERVING. Once the FIFO is
/// written (garbage: the file is set aside as damaged), the store opens and the broker
/// reports SERVING.
#[tokio::test]
async fn not_serving_while_the_store_opens_then_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = dir.path().join("groups");
    std::fs::create_dir_all(&groups).expect("groups dir");
    let fifo = groups.join("stalled.offsets");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // A free port, fixed, so the test can reach the broker before it prints its address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(binary_path("rill-broker").expect("binary"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &addr])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");

    let starting = channel(&addr).await;
    let mut client = HealthClient::new(starting.clone());
    for service in SERVICES {
        assert_eq!(
            status(&mut client, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    // Other calls are UNAVAILABLE, which clients retry, not UNIMPLEMENTED.
    let mut admin = rill_proto::v1::admin_client::AdminClient::new(starting);
    let refused = admin
        .list_topics(rill_proto::v1::ListTopicsRequest {})
        .await
        .expect_err("not served while starting");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("starting"), "{refused}");

    // Unblock the open: a writer appears and writes something that is not an offsets file.
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&fifo)?;
        f.write_all(b"not an offsets file")
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.starts_with("rill-broker listening on") {
                return;
            }
        }
        panic!("the broker exited before serving");
    })
    .await
    .expect("serving within 60 s");
    writer.await.expect("writer").expect("write the fifo");

    let mut client = health_client(&addr).await;
    for service in SERVICES {
        assert_eq!(
            status(&mut client, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    child.kill().await.expect("kill");
}

/// A health watcher sees NOT_SERVING as soon as shutdown begins.
#[tokio::test]
async fn not_serving_once_shutdown_begins() {
    let broker = TestBroker::start().await.expect("broker");
    let mut client = health_client(&broker.addr().to_string()).await;
    let mut watches = Vec::new();
    for service in SERVICES {
        assert_eq!(status(&mut client, service).await, ServingStatus::Serving);
        let mut stream = client
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = stream.next().await.expect("an update").expect("ok");
        assert_eq!(first.status(), ServingStatus::Serving);
        watches.push((service, stream));
    }
    let stopping = tokio::spawn(broker.stop());
    for (service, mut stream) in watches {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("an update within 30 s")
            .expect("an update before the stream ends")
            .expect("ok");
        assert_eq!(next.status(), ServingStatus::NotServing, "{service:?}");
    }
    stopping.await.expect("join").expect("stop");
}

/// Polls `service`'s health on `client` until it is `want`, within `limit`.
async fn wait_status(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let got = status(client, service).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service:?} still {got:?} after {limit:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// In a cluster, a broker that sees no controller quorum reports NOT_SERVING for the Admin
/// service (it cannot create or delete topics), while the whole server and the data
/// services stay SERVING; the quorum back, Admin is SERVING again.
#[tokio::test]
async fn admin_is_not_serving_without_a_controller_quorum() -> anyhow::Result<()> {
    let mut cluster = rill_tests::cluster::TestCluster::start(3).await?;
    let mut client = health_client(&cluster.addr(1).to_string()).await;
    let limit = Duration::from_secs(30);
    wait_status(&mut client, "rill.v1.Admin", ServingStatus::Serving, limit).await;
    cluster.kill(2).await?;
    cluster.kill(3).await?;
    wait_status(
        &mut client,
        "rill.v1.Admin",
        ServingStatus::NotServing,
        limit,
    )
    .await;
    for service in ["", "rill.v1.Log", "rill.v1.Groups"] {
        assert_eq!(status(&mut client, service).await, ServingStatus::Serving);
    }
    cluster.restart(2).await?;
    wait_status(&mut client, "rill.v1.Admin", ServingStatus::Serving, limit).await;
    Ok(())
}
