//! [`Connection`]: one HTTP/2 channel to a broker, shared by every client made from it.
//! Cloning is cheap; tonic reconnects the channel by itself after a broker restart.

use rill_proto::v1::admin_client::AdminClient;
use rill_proto::v1::cluster_client::ClusterClient;
use rill_proto::v1::groups_client::GroupsClient;
use rill_proto::v1::log_client::LogClient;
use rill_proto::v1::security_client::SecurityClient;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

mod transport;

pub use crate::security::{Auth, ConnectOptions};
pub use transport::{EndsWithData, Transport};

use crate::error::{ClientError, Result};

/// The broker's default address.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7171";
/// The largest message the client sends or accepts, in bytes (64 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// After this long without a byte from the broker while calls are open, an HTTP/2 ping asks
/// whether the connection still carries anything. A long-poll on a quiet topic or a quiet
/// `Subscribe` stream is the usual case: the broker answers the ping at once.
pub const KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// How long that ping may go unanswered before the connection is taken for dead: every call
/// open on it fails with UNAVAILABLE (which the library retries) and the next call connects
/// again. Behind a silent network fault (packets dropped, nothing reset) a call without a
/// deadline of its own, such as a `Subscribe` stream, would otherwise wait forever.
pub const KEEPALIVE_TIMEOUT_MS: u64 = 5_000;

/// A connection to one broker.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: Channel,
    addr: String,
    auth: Auth,
    /// The address list this connection was made from (one address, or several brokers).
    bootstrap: String,
    /// The TLS and token settings it was made with, which connections to other brokers of
    /// the same cluster (partition leaders, a bootstrap retry) reuse.
    options: ConnectOptions,
}

impl Connection {
    /// Connects to `addr` (`host:port`, or a `http://` URL). Uses TCP_NODELAY and 1 MiB
    /// HTTP/2 frames (the receiver's setting is what counts for large fetches).
    ///
    /// `addr` may list several brokers of a cluster, comma-separated (`a:1,b:2,c:3`): they
    /// are tried in order and the first that answers is used.
    pub async fn connect(addr: &str) -> Result<Connection> {
        Connection::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects to `addr` with TLS (when `options` names a CA) and a bearer token (when it
    /// has one). A TLS connection uses `https://`; the broker's certificate must name the
    /// address's host. Several comma-separated addresses (a cluster's brokers) connect to
    /// the first that answers.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Connection> {
        if addr.contains(',') {
            let mut failures = Vec::new();
            for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                match Box::pin(Connection::connect_with(one, options)).await {
                    Ok(c) => {
                        return Ok(Connection {
                            bootstrap: addr.to_string(),
                            ..c
                        })
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            return Err(ClientError::Connect {
                addr: addr.to_string(),
                message: format!("no broker answered: {}", failures.join("; ")),
            });
        }
        let tls = options.tls_config(addr).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{scheme}://{addr}")
        };
        let mut endpoint = Endpoint::from_shared(url).map_err(|e| ClientError::BadAddress {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::BadAddress {
                    addr: addr.to_string(),
                    message: format!("bad TLS settings: {e}"),
                })?;
        }
        let auth =
            Auth::new(options.token.as_deref()).map_err(|message| ClientError::BadAddress {
                addr: addr.to_string(),
                message,
            })?;
        let channel = endpoint
            .http2_keep_alive_interval(std::time::Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(std::time::Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .tcp_nodelay(true)
            .max_frame_size(1 << 20)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                message: format!(
                    "{}: {}",
                    chain_text(&e),
                    if options.tls_ca.is_some() {
                        "is a broker serving TLS there, with a certificate the CA signed for \
                         this host?"
                    } else {
                        "is a broker running there?"
                    }
                ),
            })?;
        Ok(Connection {
            channel,
            addr: addr.to_string(),
            auth,
            bootstrap: addr.to_string(),
            options: options.clone(),
        })
    }

    /// Connects to another broker (`addr`, or several comma-separated) with this
    /// connection's TLS and token settings: how a client follows a partition leader or goes
    /// back to its bootstrap brokers without dropping to plaintext or anonymous.
    pub async fn connect_like(&self, addr: &str) -> Result<Connection> {
        Connection::connect_with(addr, &self.options).await
    }

    /// A connection to the next broker of this connection's address list that answers,
    /// trying them in list order after this one and wrapping round; `None` when no other
    /// answers (or the list has one address). How a client leaves a broker that stopped
    /// answering: the new connection keeps the whole list, so a later move goes on round it.
    pub async fn next_in_list(&self) -> Option<Connection> {
        for addr in others_in_list(&self.bootstrap, &self.addr) {
            if let Ok(next) = self.connect_like(&addr).await {
                return Some(next.with_bootstrap(&self.bootstrap));
            }
        }
        None
    }

    /// This connection, with `bootstrap` as the address list it belongs to (a connection
    /// made to one broker of a cluster that another connection found).
    pub fn with_bootstrap(mut self, bootstrap: &str) -> Connection {
        self.bootstrap = bootstrap.to_string();
        self
    }

    /// The TLS and token settings this connection was made with.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// The address list this connection was made from: [`Connection::addr`], or several
    /// comma-separated brokers of which `addr` answered first.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The address this connection was made to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A `rill.v1.Log` client on this connection.
    pub fn log(&self) -> LogClient<Transport> {
        LogClient::new(self.transport())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A `rill.v1.Groups` client on this connection.
    pub fn groups(&self) -> GroupsClient<Transport> {
        GroupsClient::new(self.transport())
    }

    /// A `rill.v1.Admin` client on this connection.
    pub fn admin(&self) -> AdminClient<Transport> {
        AdminClient::new(self.transport())
    }

    /// A `rill.v1.Security` client on this connection.
    pub fn security(&self) -> SecurityClient<Transport> {
        SecurityClient::new(self.transport())
    }

    /// A `rill.v1.Subscriptions` client on this connection.
    pub fn subscriptions(&self) -> SubscriptionsClient<Transport> {
        SubscriptionsClient::new(self.transport())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The channel with this connection's credentials.
    pub fn transport(&self) -> Transport {
        Transport::new(InterceptedService::new(
            self.channel.clone(),
            self.auth.clone(),
        ))
    }

    /// A `rill.v1.Cluster` client on this connection (brokers started with cluster flags).
    pub fn cluster(&self) -> ClusterClient<Transport> {
        ClusterClient::new(self.transport())
    }
}

/// `e` and its sources joined with `: `, leaving out any whose text is already shown (a
/// transport error alone says only "transport error"; the reason is further down).
fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The addresses of the comma-separated `bootstrap` list after `current`, wrapping around,
/// without `current` itself (all of them, in order, when `current` is not in the list).
fn others_in_list(bootstrap: &str, current: &str) -> Vec<String> {
    let all: Vec<&str> = bootstrap
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let start = all.iter().position(|a| *a == current).map_or(0, |i| i + 1);
    (0..all.len())
        .map(|k| all[(start + k) % all.len()])
        .filter(|a| *a != current)
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_other_brokers_come_in_list_order_after_the_current_one() {
        assert_eq!(others_in_list("a:1,b:2,c:3", "b:2"), vec!["c:3", "a:1"]);
        assert_eq!(others_in_list("a:1, b:2 ,c:3", "c:3"), vec!["a:1", "b:2"]);
        assert_eq!(
            others_in_list("a:1,b:2,c:3", "x:9"),
            vec!["a:1", "b:2", "c:3"]
        );
        assert!(others_in_list("a:1", "a:1").is_empty());
    }

    /// A broker that accepts the connection and then says nothing (a paused process, a
    /// silent network fault): a call with no deadline of its own fails UNAVAILABLE once the
    /// keep-alive ping goes unanswered, rather than wait forever.
    #[tokio::test]
    async fn a_call_to_a_broker_that_never_answers_fails_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and holds every connection, reading and writing nothing.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let started = tokio::time::Instant::now();
        // Far above the keep-alive's bound (interval + timeout), far below forever.
        let bound = Duration::from_millis(3 * (KEEPALIVE_INTERVAL_MS + KEEPALIVE_TIMEOUT_MS));
        let answer = tokio::time::timeout(bound, async {
            let conn = Connection::connect(&addr.to_string())
                .await
                .expect("the TCP connection opens");
            conn.admin()
                .list_topics(rill_proto::v1::ListTopicsRequest::default())
                .await
        })
        .await
        .expect("a call to a silent broker must fail, not hang");
        holder.abort();
        let status = answer.expect_err("nothing answered");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(KEEPALIVE_TIMEOUT_MS),
            "failed after {:?}, before the ping could time out: {status:?}",
            started.elapsed()
        );
    }
}
