//! The proxy on its own: plain sockets stand in for brokers, each on a loopback address of
//! its own, so the proxy tells them apart by source address as it does real brokers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::NetFaults;

/// How long a silent connection is watched for an end of stream or a reset that must not
/// come.
const QUIET: Duration = Duration::from_millis(300);
/// The longest any byte that should flow may take.
const DEADLINE: Duration = Duration::from_secs(5);

fn ip(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, a, b))
}

/// A "broker" on `127.0.1.<n>` behind a proxy on `127.0.3.<n>` (a subnet the cluster
/// harness does not use): its listener, and the proxy's address.
async fn target_behind_proxy(faults: &NetFaults, n: u8) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind(SocketAddr::new(ip(1, n), 0))
        .await
        .expect("bind the target");
    let proxy = faults
        .proxy(
            SocketAddr::new(ip(3, n), 0),
            listener.local_addr().expect("addr"),
        )
        .await
        .expect("proxy");
    (listener, proxy)
}

/// A connection from source address `from` to `to`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the source");
    tokio::time::timeout(DEADLINE, socket.connect(to))
        .await
        .expect("connect within the deadline")
        .expect("connect")
}

/// Reads exactly `want.len()` bytes within the deadline and checks them.
async fn expect_bytes(stream: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut got))
        .await
        .expect("bytes within the deadline")
        .expect("read");
    assert_eq!(got, want);
}

/// Asserts that nothing at all (no byte, no end of stream, no error) arrives for [`QUIET`].
async fn expect_silence(stream: &mut TcpStream, who: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(QUIET, stream.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{who} saw the connection end during a silent partition"),
        Ok(Ok(n)) => panic!("{who} received {n} bytes through a blackhole"),
        Ok(Err(e)) => panic!("{who} saw an error during a silent partition: {e}"),
    }
}

/// Connects `from` to the proxy and accepts the forwarded connection on the target.
async fn proxied_pair(
    from: IpAddr,
    listener: &TcpListener,
    proxy: SocketAddr,
) -> (TcpStream, TcpStream) {
    let client = connect_from(from, proxy).await;
    let (server, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .expect("the proxy connects onward within the deadline")
        .expect("accept");
    (client, server)
}

#[tokio::test]
async fn a_blackholed_connection_holds_its_bytes_without_closing_and_resumes_on_heal() {
    let faults = NetFaults::new();
    let (listener, proxy) = target_behind_proxy(&faults, 2).await;
    let caller = ip(1, 1);
    let (mut client, mut server) = proxied_pair(caller, &listener, proxy).await;
    client.write_all(b"before").await.expect("write");
    expect_bytes(&mut server, b"before").await;

    faults.blackhole(caller, ip(1, 2));
    assert_eq!(faults.blackholed_count(), 1);
    assert_eq!(faults.cut_count(), 0);
    // Both ways: the request and the answer vanish; neither side sees an end or a reset,
    // and writing still succeeds (the bytes wait in buffers, as on a network dropping them).
    client
        .write_all(b"held-request")
        .await
        .expect("write while silent");
    server
        .write_all(b"held-answer")
        .await
        .expect("write while silent");
    tokio::join!(
        expect_silence(&mut server, "the target"),
        expect_silence(&mut client, "the caller"),
    );

    // Healed: the same connection carries what was held, in order, then new bytes.
    faults.heal();
    assert_eq!(faults.blackholed_count(), 0);
    expect_bytes(&mut server, b"held-request").await;
    expect_bytes(&mut client, b"held-answer").await;
    client.write_all(b"after").await.expect("write");
    expect_bytes(&mut server, b"after").await;
}

#[tokio::test]
async fn a_new_connection_into_a_blackhole_is_accepted_but_forwards_nothing_until_heal() {
    let faults = NetFaults::new();
    let (listener, proxy) = target_behind_proxy(&faults, 4).await;
    let caller = ip(1, 3);
    faults.isolate_silently(ip(1, 4), &[caller]);
    assert_eq!(faults.blackholed_count(), 2);

    // The caller connects (the proxy accepts), but nothing reaches the target: not even a
    // connection.
    let mut client = connect_from(caller, proxy).await;
    client
        .write_all(b"hello")
        .await
        .expect("write while silent");
    let (accepted, ()) = tokio::join!(
        tokio::time::timeout(QUIET, listener.accept()),
        expect_silence(&mut client, "the caller"),
    );
    assert!(
        accepted.is_err(),
        "the target was reached through a blackhole"
    );

    faults.heal();
    let (mut server, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .expect("connected onward after heal")
        .expect("accept");
    expect_bytes(&mut server, b"hello").await;
    server.write_all(b"world").await.expect("write");
    expect_bytes(&mut client, b"world").await;
}

#[tokio::test]
async fn a_blackhole_holds_only_its_own_direction_and_clients_pass() {
    let faults = NetFaults::new();
    let (listener, proxy) = target_behind_proxy(&faults, 6).await;
    let held = ip(1, 5);
    faults.blackhole(held, ip(1, 6));
    // Another broker, and a client (any other source), still pass.
    for from in [ip(1, 7), ip(0, 1)] {
        let (mut client, mut server) = proxied_pair(from, &listener, proxy).await;
        client.write_all(b"ping").await.expect("write");
        expect_bytes(&mut server, b"ping").await;
        server.write_all(b"pong").await.expect("write");
        expect_bytes(&mut client, b"pong").await;
    }
    // While the held pair itself forwards nothing.
    let mut client = connect_from(held, proxy).await;
    client.write_all(b"x").await.expect("write");
    expect_silence(&mut client, "the held caller").await;
    assert!(
        tokio::time::timeout(QUIET, listener.accept())
            .await
            .is_err(),
        "a blackholed caller reached the target"
    );
}

#[tokio::test]
async fn a_cut_still_drops_connections_at_once_while_a_blackhole_does_not() {
    let faults = NetFaults::new();
    let (listener, proxy) = target_behind_proxy(&faults, 9).await;
    let caller = ip(1, 8);
    let (mut client, _server) = proxied_pair(caller, &listener, proxy).await;
    faults.blackhole(caller, ip(1, 9));
    expect_silence(&mut client, "the caller").await;
    // Turning the silent partition into a refusing one drops the held connection.
    faults.cut(caller, ip(1, 9));
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(DEADLINE, client.read(&mut buf))
        .await
        .expect("the cut connection ends within the deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn dropping_the_faults_ends_held_connections_and_stops_the_proxy() {
    let faults = NetFaults::new();
    let (listener, proxy) = target_behind_proxy(&faults, 11).await;
    let caller = ip(1, 10);
    let (mut client, _server) = proxied_pair(caller, &listener, proxy).await;
    faults.blackhole(caller, ip(1, 11));
    let mut waiting = connect_from(caller, proxy).await;
    drop(faults);
    for (stream, who) in [(&mut client, "held"), (&mut waiting, "waiting")] {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {who} connection ends within the deadline"));
        assert!(matches!(read, Ok(0) | Err(_)), "{who}: {read:?}");
    }
    // The listener is gone: a new connection is refused (or closed at once).
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(caller, 0)).expect("bind");
    if let Ok(Ok(mut s)) = tokio::time::timeout(DEADLINE, socket.connect(proxy)).await {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("closed within the deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
