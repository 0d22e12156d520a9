//! Security in a cluster: the brokers replicate over TLS and authenticate each other with the
//! cluster token, the internal replication service accepts only brokers, and a client
//! following a partition leader keeps its TLS and token.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rill_client::{ConnectOptions, Connection, Producer, ProducerConfig, ProducerRecord};
use rill_proto::v1 as pb;
use rill_tests::certs::Ca;
use rill_tests::cluster::{Extra, TestCluster};
use tonic::Code;

const ADMIN: &str = "admin-token-for-tests-0123456789";
const CLUSTER: &str = "cluster-token-for-tests-98765432";

#[tokio::test]
async fn a_cluster_replicates_over_tls_with_the_cluster_token() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let path = |p: &std::path::Path| p.display().to_string();
    let extra = Extra {
        args: vec![
            "--tls-cert".into(),
            path(&cert),
            "--tls-key".into(),
            path(&key),
            "--tls-peer-ca".into(),
            path(&ca.pem),
        ],
        env: vec![
            ("RILL_ADMIN_TOKEN".into(), ADMIN.into()),
            ("RILL_CLUSTER_TOKEN".into(), CLUSTER.into()),
        ],
    };
    let cluster = TestCluster::start_with(3, extra).await?;
    let addr = |id: u64| cluster.addr(id).to_string();
    let admin_options = ConnectOptions::new().tls_ca(&ca.pem).token(ADMIN);
    let admin = Connection::connect_with(&addr(1), &admin_options).await?;

    // A replicated topic needs the controller group, elected over TLS between brokers that
    // accept each other's token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let created = admin
            .admin()
            .create_topic(pb::CreateTopicRequest {
                name: "orders".into(),
                config: Some(pb::TopicConfig {
                    partitions: 3,
                    ..Default::default()
                }),
                replication_factor: Some(3),
            })
            .await;
        match created {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => {
                let logs = std::fs::read_to_string(cluster.log_path(1)).unwrap_or_default();
                anyhow::bail!("creating a replicated topic: {s:?}\nbroker 1 log:\n{logs}");
            }
        }
    }

    // Each partition's leader is somewhere; the producer follows them with its TLS and token.
    let producer = Producer::new(admin.clone(), ProducerConfig::new());
    for p in 0..3u32 {
        let send = producer.send_and_wait(
            ProducerRecord::new("orders", Bytes::from(format!("order {p}"))).partition(p),
        );
        tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .with_context(|| format!("producing to partition {p} timed out"))??;
    }

    // The internal replication service takes brokers only: not the admin, not anonymous.
    let ping = || pb::PingRequest {
        from_node: 9,
        to_node: 1,
        peers: vec![],
        instance_id: 1,
    };
    let denied = pb::raft_client::RaftClient::new(admin.transport())
        .ping(ping())
        .await
        .expect_err("the admin is not a broker");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let anonymous =
        Connection::connect_with(&addr(2), &ConnectOptions::new().tls_ca(&ca.pem)).await?;
    let refused = pb::raft_client::RaftClient::new(anonymous.transport())
        .ping(ping())
        .await
        .expect_err("no credentials");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    Ok(())
}
