//! TLS end to end, with certificates made by the test (rcgen; no files committed): the right
//! CA works, a plaintext client and a client trusting another CA fail cleanly, mutual TLS maps
//! a client certificate to its principal; protected mode; and the reflection setting.

use std::time::Duration;

use anyhow::{Context, Result};
use rill_client::{ConnectOptions, Connection};
use rill_proto::v1 as pb;
use rill_tests::certs::Ca;
use rill_tests::TestBroker;
use tonic::Code;

async fn list_topics(conn: &Connection) -> Result<Vec<String>, tonic::Status> {
    Ok(conn
        .admin()
        .list_topics(pb::ListTopicsRequest {})
        .await?
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect())
}

/// Connecting and one call, within a deadline; an error from either is the failure.
async fn try_call(addr: &str, options: &ConnectOptions) -> Result<Vec<String>, String> {
    let attempt = async {
        let conn = Connection::connect_with(addr, options)
            .await
            .map_err(|e| e.to_string())?;
        list_topics(&conn).await.map_err(|e| format!("{e:?}"))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no answer within 10 s: the failure was not clean".to_string())?
}

#[tokio::test]
async fn tls_with_the_right_ca_works_and_plaintext_or_another_ca_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let other = Ca::new(certs.path(), "other-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let mut config = rill_broker::Config::new(dir.path());
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let addr = broker.addr().to_string();

    let plaintext = try_call(&addr, &ConnectOptions::new()).await;
    let plaintext = plaintext.expect_err("a plaintext client must fail");
    assert!(
        plaintext.contains("FailedPrecondition") && plaintext.contains("serves TLS only"),
        "a plaintext client is told to use TLS: {plaintext}"
    );
    let wrong = try_call(&addr, &ConnectOptions::new().tls_ca(&other.pem)).await;
    let wrong = wrong.expect_err("a client trusting another CA must fail");
    assert!(wrong.contains("certificate"), "the error says why: {wrong}");

    let right = try_call(&addr, &ConnectOptions::new().tls_ca(&ca.pem)).await;
    assert_eq!(
        right,
        Ok(vec![]),
        "the right CA works, after the failed attempts too"
    );
    let conn = Connection::connect_with(&addr, &ConnectOptions::new().tls_ca(&ca.pem)).await?;
    conn.admin()
        .create_topic(pb::CreateTopicRequest {
            name: "over-tls".into(),
            config: None,
            replication_factor: None,
        })
        .await?;
    assert_eq!(list_topics(&conn).await?, vec!["over-tls".to_string()]);

    // The CLI takes the same settings.
    let out = tokio::process::Command::new(rill_tests::binary_path("rill")?)
        .args(["--broker", &addr, "topic", "list"])
        .env("RILL_TLS_CA", &ca.pem)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("rill did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("over-tls"),
        "{stdout} {out:?}"
    );
    broker.stop().await?;
    Ok(())
}

/// The connection limit holds under TLS: a call on a connection over it is answered
/// RESOURCE_EXHAUSTED naming the limit, as without TLS (not a bare close), and the
/// connections within it go on.
#[tokio::test]
async fn the_connection_limit_holds_under_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let mut config = rill_broker::Config::new(dir.path()).max_connections(1);
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let addr = broker.addr().to_string();
    let tls = ConnectOptions::new().tls_ca(&ca.pem);
    let first = Connection::connect_with(&addr, &tls).await?;
    list_topics(&first).await?;
    let over = try_call(&addr, &tls).await.expect_err("over the limit");
    assert!(
        over.contains("ResourceExhausted") && over.contains("max_connections"),
        "answered RESOURCE_EXHAUSTED, naming the limit: {over}"
    );
    list_topics(&first).await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn mutual_tls_maps_the_client_certificate_to_its_principal() -> Result<()> {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let stranger_ca = Ca::new(certs.path(), "stranger-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let (client_cert, client_key) = ca.issue("billing-svc", &[])?;
    let (stranger_cert, stranger_key) = stranger_ca.issue("stranger", &[])?;
    let mut config = rill_broker::Config::new(dir.path());
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    config.security.tls_client_ca = Some(ca.pem.clone());
    config.security.auth = true;
    config.security.admin_token = Some(rill_broker::auth::Secret(ADMIN.into()));
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let addr = broker.addr().to_string();

    let mtls = ConnectOptions::new()
        .tls_ca(&ca.pem)
        .tls_identity(&client_cert, &client_key);
    let client = Connection::connect_with(&addr, &mtls).await?;
    let me = client
        .security()
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (me.principal.as_str(), me.method.as_str()),
        ("billing-svc", "certificate")
    );
    let visible = list_topics(&client).await?;
    assert!(
        visible.is_empty(),
        "lists only what it may describe: {visible:?}"
    );
    let denied = client
        .admin()
        .create_topic(pb::CreateTopicRequest {
            name: "billing".into(),
            config: None,
            replication_factor: None,
        })
        .await
        .expect_err("no rule yet");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("billing-svc"), "{denied:?}");

    let admin =
        Connection::connect_with(&addr, &ConnectOptions::new().tls_ca(&ca.pem).token(ADMIN))
            .await?;
    admin
        .security()
        .add_acl(pb::AddAclRequest {
            rule: Some(pb::AclRule {
                principal: "billing-svc".into(),
                resource_type: pb::ResourceType::Topic as i32,
                resource_name: "billing".into(),
                pattern_type: pb::PatternType::Literal as i32,
                operation: pb::Operation::Create as i32,
                permission: pb::Permission::Allow as i32,
            }),
        })
        .await?;
    client
        .admin()
        .create_topic(pb::CreateTopicRequest {
            name: "billing".into(),
            config: None,
            replication_factor: None,
        })
        .await?;

    // A certificate from a CA the broker does not trust is refused at the handshake; no
    // certificate and no token is UNAUTHENTICATED.
    let stranger = ConnectOptions::new()
        .tls_ca(&ca.pem)
        .tls_identity(&stranger_cert, &stranger_key);
    assert!(try_call(&addr, &stranger).await.is_err());
    let anonymous = Connection::connect_with(&addr, &ConnectOptions::new().tls_ca(&ca.pem)).await?;
    let err = list_topics(&anonymous).await.expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated);
    broker.stop().await?;
    Ok(())
}

/// Protected mode: the real binary refuses a non-loopback address without authentication,
/// and says how to fix it.
#[tokio::test]
async fn the_broker_refuses_an_open_address_without_auth() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = tokio::process::Command::new(rill_tests::binary_path("rill-broker")?)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("RILL_ADMIN_TOKEN")
        .env_remove("RILL_INSECURE_NO_AUTH")
        .env_remove("RILL_AUTH")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("rill-broker did not exit")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not start: {stderr}");
    assert!(
        stderr.contains("without authentication") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    Ok(())
}

/// A client following a partition leader (or going back to its bootstrap brokers) connects
/// with the TLS and token settings of its first connection: without them, the new
/// connection would be plaintext and anonymous, and a secured cluster would refuse it.
#[tokio::test]
async fn a_followed_leader_connection_keeps_tls_and_token() -> Result<()> {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let mut config = rill_broker::Config::new(dir.path());
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    config.security.auth = true;
    config.security.admin_token = Some(rill_broker::auth::Secret(ADMIN.into()));
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let addr = broker.addr().to_string();
    let origin =
        Connection::connect_with(&addr, &ConnectOptions::new().tls_ca(&ca.pem).token(ADMIN))
            .await?;

    // The broker a refusal names as the leader is reached as the first one was.
    let leaders = rill_client::leaders::Leaders::default();
    let leader = tokio::time::timeout(
        Duration::from_secs(10),
        leaders.follow(&origin, "t", 0, &addr),
    )
    .await
    .context("following a leader hung")??;
    let me = leader
        .security()
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(me.principal, "admin", "the token went along: {me:?}");
    // So is a retry through the bootstrap list.
    let again = origin.connect_like(&format!("{addr},{addr}")).await?;
    assert_eq!(
        again
            .security()
            .who_am_i(pb::WhoAmIRequest {})
            .await?
            .into_inner()
            .principal,
        "admin"
    );
    broker.stop().await?;
    Ok(())
}

/// Log lines written while it is the thread's subscriber (the test runtime runs the broker's
/// accept loop on the test's thread).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Plaintext clients on a TLS port each get a clear answer, and the broker logs them once
/// (rate-limited), not once per connection or per byte; TLS clients go on meanwhile.
#[tokio::test]
async fn plaintext_clients_on_a_tls_port_are_told_and_logged_once() -> Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = Ca::new(certs.path(), "rill-test-ca")?;
    let (cert, key) = ca.issue("broker", &["localhost", "127.0.0.1"])?;
    let mut config = rill_broker::Config::new(dir.path());
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    let broker = TestBroker::start_with(config, Some(dir)).await?;
    let addr = broker.addr().to_string();
    for _ in 0..5 {
        let err = try_call(&addr, &ConnectOptions::new())
            .await
            .expect_err("plaintext fails");
        assert!(err.contains("serves TLS only"), "{err}");
    }
    // Raw bytes that are not even HTTP/2 are dropped without a line per byte.
    let mut raw = tokio::net::TcpStream::connect(&addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET / HTTP/1.1\r\n\r\n").await?;
    drop(raw);
    assert_eq!(
        try_call(&addr, &ConnectOptions::new().tls_ca(&ca.pem)).await,
        Ok(vec![]),
        "TLS clients are served meanwhile"
    );
    broker.stop().await?;
    let logs = captured.text();
    let lines = logs
        .lines()
        .filter(|l| l.contains("plaintext client connected to the TLS port"))
        .count();
    // Six plaintext connections: one line per second at most (two if the machine is slow
    // enough to straddle a second), never one per connection.
    assert!(
        (1..=2).contains(&lines),
        "logged once, not per client or byte ({lines} lines):\n{logs}"
    );
    Ok(())
}

/// Lists the services over reflection, through `conn`'s transport (with its token, if any).
async fn reflection_services(conn: &Connection) -> Result<Vec<String>, tonic::Status> {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(conn.transport())
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = stream
        .next()
        .await
        .ok_or_else(|| tonic::Status::internal("no reflection response"))??;
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
    }
}

/// With authentication on, reflection is open by default and needs a credential with
/// `open_reflection = false`.
#[tokio::test]
async fn reflection_is_open_or_closed_by_config() -> Result<()> {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    for open in [true, false] {
        let dir = tempfile::tempdir()?;
        let mut config = rill_broker::Config::new(dir.path());
        config.security.auth = true;
        config.security.admin_token = Some(rill_broker::auth::Secret(ADMIN.into()));
        config.security.open_reflection = open;
        let broker = TestBroker::start_with(config, Some(dir)).await?;
        let addr = broker.addr().to_string();
        let anonymous = Connection::connect(&addr).await?;
        let admin = Connection::connect_with(&addr, &ConnectOptions::new().token(ADMIN)).await?;
        let listed = reflection_services(&admin).await?;
        assert!(listed.iter().any(|s| s == "rill.v1.Log"), "{listed:?}");
        match (open, reflection_services(&anonymous).await) {
            (true, Ok(listed)) => assert!(listed.iter().any(|s| s == "rill.v1.Log")),
            (false, Err(e)) => assert_eq!(e.code(), Code::Unauthenticated, "{e:?}"),
            (open, got) => panic!("open_reflection = {open}: {got:?}"),
        }
        broker.stop().await?;
    }
    Ok(())
}
