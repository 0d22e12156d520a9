//! The connection limit: the listener's accept loop, which hands tonic at most
//! `max_connections` connections at once and refuses the others in a way a gRPC client
//! understands.
//!
//! Each connection served holds a permit of the broker's connection semaphore; the permit
//! goes back when tonic drops the connection (the client closed it, or shutdown). A
//! connection over the limit is not simply closed, which a client would see as a vague
//! transport error: it gets a minimal HTTP/2 server that answers each call with
//! RESOURCE_EXHAUSTED, naming the limit, then sends GOAWAY. Refusals are bounded too (at most
//! [`MAX_REFUSALS_AT_ONCE`] at a time, each for at most [`REFUSAL_WINDOW`]); past that, a
//! connection is closed at once. Refusals are logged, at most once a second.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::Status;

use crate::state::Broker;

/// The most over-limit connections being answered at once; more are closed at once.
pub const MAX_REFUSALS_AT_ONCE: usize = 32;
/// How long an over-limit connection is kept to answer its calls with RESOURCE_EXHAUSTED
/// before it is sent GOAWAY.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(5);
/// How long a refused connection gets to finish after GOAWAY.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);
/// The pause after a failed accept (out of file descriptors, say), instead of retrying in a
/// busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Refusals and accept errors are logged at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The stream of accepted connections tonic serves: each within the limit, with its permit.
pub struct LimitedIncoming {
    listener: TcpListener,
    broker: Broker,
    refusals: Arc<Semaphore>,
    backoff: Option<Pin<Box<Sleep>>>,
    last_log: Option<Instant>,
    refused_since_log: u64,
}

impl LimitedIncoming {
    /// Accepts on `listener`, within the broker's `max_connections`.
    pub fn new(listener: TcpListener, broker: Broker) -> Self {
        LimitedIncoming {
            listener,
            broker,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE)),
            backoff: None,
            last_log: None,
            refused_since_log: 0,
        }
    }

    /// Whether a log line is due (at most one per [`LOG_INTERVAL`]).
    fn log_due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= LOG_INTERVAL);
        if due {
            self.last_log = Some(now);
        }
        due
    }

    /// Answers an over-limit connection with RESOURCE_EXHAUSTED, or closes it at once when
    /// too many are being answered already.
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr) {
        let limit = self.broker.config().max_connections;
        self.refused_since_log += 1;
        if self.log_due() {
            tracing::warn!(
                %peer,
                max_connections = limit,
                refused = self.refused_since_log,
                "connection refused: the broker serves max_connections at once"
            );
            self.refused_since_log = 0;
        }
        // Under TLS, the answer would have to follow a handshake that tonic (which owns the
        // TLS config) does not offer here; the connection is closed instead, which a client
        // sees as UNAVAILABLE and retries.
        if self.broker.config().security.tls() {
            return;
        }
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            // Dropping the stream closes it.
            return;
        };
        let shutdown = self.broker.shutdown().clone();
        self.broker.tasks().spawn(async move {
            let _permit = permit;
            let status = Status::resource_exhausted(format!(
                "too many connections: the broker serves at most {limit} at once \
                 (max_connections); close one or retry later"
            ));
            let service = hyper::service::service_fn(move |_: hyper::Request<_>| {
                let response = status.clone().into_http::<tonic::body::Body>();
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(REFUSAL_WINDOW) => {}
                _ = shutdown.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REFUSAL_GRACE, conn).await;
        });
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedConnection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    // Nagle's algorithm would hold small responses back for the peer's
                    // delayed ACK (40 ms).
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    match this.broker.connection_permit() {
                        Some(permit) => {
                            return Poll::Ready(Some(Ok(LimitedConnection {
                                stream,
                                _permit: permit,
                            })))
                        }
                        None => this.refuse(stream, peer),
                    }
                }
                Err(e) => {
                    if this.log_due() {
                        tracing::warn!(error = %e, "accepting a connection failed; backing off");
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF)));
                }
            }
        }
    }
}

/// A served connection: the TCP stream and the permit it holds until dropped.
pub struct LimitedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
