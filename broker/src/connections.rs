//! The connection limit: the listener's accept loop, which hands tonic at most
//! `max_connections` connections at once and refuses the others in a way a gRPC client
//! understands.
//!
//! Each connection served holds a permit of the broker's connection semaphore; the permit
//! goes back when tonic drops the connection (the client closed it, or shutdown). A
//! connection over the limit is not simply closed, which a client would see as a vague
//! transport error: it gets a minimal HTTP/2 server that answers each call with
//! RESOURCE_EXHAUSTED, naming the limit, then sends GOAWAY. Under TLS that server first does
//! the TLS handshake with the broker's certificate, so a TLS client reads the same answer.
//! Refusals are bounded too (at most [`MAX_REFUSALS_AT_ONCE`] at a time, each for at most
//! [`REFUSAL_WINDOW`]); past that, a connection is closed at once. Refusals are logged, at
//! most once a second.
//!
//! # Plaintext clients on a TLS port
//! Under TLS, a connection's first byte is looked at (without reading it) before tonic gets
//! the connection: a TLS client starts with a handshake record (`0x16`). Any other first
//! byte is a plaintext client; it is answered, in plaintext HTTP/2, with FAILED_PRECONDITION
//! saying the broker serves TLS only, instead of a handshake failure the client would show
//! as a protocol error. Those are logged at most once a second, with how many there were.

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
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::Status;

use crate::error::BrokerError;
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
/// How long a connection to a TLS port may stay silent before its first byte; a TLS client
/// sends its handshake at once.
const FIRST_BYTE_WAIT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// At most one log line per [`LOG_INTERVAL`], counting the events it left out.
#[derive(Default)]
struct LogLimit {
    last: Option<Instant>,
    since_log: u64,
}

impl LogLimit {
    /// Counts one event; `Some(count)` (events since the last line, this one included) when a
    /// line is due.
    fn event(&mut self) -> Option<u64> {
        self.since_log += 1;
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= LOG_INTERVAL);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_log))
    }
}

/// What a connection to a TLS port began with.
enum FirstByte {
    /// A TLS handshake: tonic serves it.
    Tls,
    /// Anything else: a plaintext client.
    Plaintext,
    /// Closed, failed or silent for [`FIRST_BYTE_WAIT`]: dropped.
    Nothing,
}

/// A served connection whose first byte was looked at.
struct Classified {
    conn: LimitedConnection,
    peer: SocketAddr,
    first: FirstByte,
}

/// Waits for `conn`'s first byte, without consuming it.
async fn classify(conn: LimitedConnection, peer: SocketAddr) -> Classified {
    let mut byte = [0u8; 1];
    let first = match tokio::time::timeout(FIRST_BYTE_WAIT, conn.stream.peek(&mut byte)).await {
        Ok(Ok(1..)) if byte[0] == TLS_HANDSHAKE_RECORD => FirstByte::Tls,
        Ok(Ok(1..)) => FirstByte::Plaintext,
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => FirstByte::Nothing,
    };
    Classified { conn, peer, first }
}

/// Answers every call on `io` with `status` (HTTP/2), until the client leaves, for at most
/// [`REFUSAL_WINDOW`] (or until shutdown), then sends GOAWAY.
async fn answer_with<IO>(io: IO, status: Status, shutdown: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |_: hyper::Request<_>| {
        let response = status.clone().into_http::<tonic::body::Body>();
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(REFUSAL_WINDOW) => {}
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(REFUSAL_GRACE, conn).await;
}

/// The stream of accepted connections tonic serves: each within the limit, with its permit.
pub struct LimitedIncoming {
    listener: TcpListener,
    broker: Broker,
    /// The TLS acceptor for refusals, when the broker serves TLS.
    tls: Option<TlsAcceptor>,
    refusals: Arc<Semaphore>,
    /// Connections to a TLS port waiting for their first byte.
    classifying: JoinSet<Classified>,
    backoff: Option<Pin<Box<Sleep>>>,
    refusal_log: LogLimit,
    plaintext_log: LogLimit,
    error_log: LogLimit,
}

impl LimitedIncoming {
    /// Accepts on `listener`, within the broker's `max_connections`. `tls` (the broker
    /// serves TLS) answers refused connections after a handshake, and turns on the
    /// plaintext-client check.
    pub fn new(listener: TcpListener, broker: Broker, tls: Option<TlsAcceptor>) -> Self {
        LimitedIncoming {
            listener,
            broker,
            tls,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE)),
            classifying: JoinSet::new(),
            backoff: None,
            refusal_log: LogLimit::default(),
            plaintext_log: LogLimit::default(),
            error_log: LogLimit::default(),
        }
    }

    /// Answers an over-limit connection with RESOURCE_EXHAUSTED (after a TLS handshake when
    /// the broker serves TLS), or closes it at once when too many are being answered already.
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr) {
        let limit = self.broker.config().max_connections;
        if let Some(refused) = self.refusal_log.event() {
            tracing::warn!(
                %peer,
                max_connections = limit,
                refused,
                "connection refused: the broker serves max_connections at once"
            );
        }
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            // Dropping the stream closes it.
            return;
        };
        let shutdown = self.broker.shutdown().clone();
        let status = Status::from(BrokerError::TooManyConnections { limit });
        let tls = self.tls.clone();
        self.broker.tasks().spawn(async move {
            let _permit = permit;
            match tls {
                None => answer_with(stream, status, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(REFUSAL_WINDOW, acceptor.accept(stream));
                    let tls_stream = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(s)) => s,
                            // A failed or slow handshake: nothing to answer on.
                            _ => return,
                        },
                        _ = shutdown.cancelled() => return,
                    };
                    answer_with(tls_stream, status, shutdown).await;
                }
            }
        });
    }

    /// Tells a plaintext client on the TLS port, in plaintext, that the broker serves TLS
    /// only. It uses a refusal slot, not a connection permit.
    fn answer_plaintext(&mut self, stream: TcpStream, peer: SocketAddr) {
        if let Some(clients) = self.plaintext_log.event() {
            tracing::warn!(
                %peer,
                clients,
                "a plaintext client connected to the TLS port; it was told to use TLS"
            );
        }
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            return;
        };
        let shutdown = self.broker.shutdown().clone();
        self.broker.tasks().spawn(async move {
            let _permit = permit;
            answer_with(stream, Status::from(BrokerError::TlsRequired), shutdown).await;
        });
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedConnection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // Connections to the TLS port whose first byte came in.
            if let Poll::Ready(Some(joined)) = this.classifying.poll_join_next(cx) {
                match joined {
                    Ok(Classified {
                        conn,
                        first: FirstByte::Tls,
                        ..
                    }) => return Poll::Ready(Some(Ok(conn))),
                    Ok(Classified {
                        conn,
                        peer,
                        first: FirstByte::Plaintext,
                    }) => this.answer_plaintext(conn.stream, peer),
                    // Dropped: it closed or stayed silent (or the check was cancelled).
                    Ok(Classified {
                        first: FirstByte::Nothing,
                        ..
                    })
                    | Err(_) => {}
                }
                continue;
            }
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
                            let conn = LimitedConnection {
                                stream,
                                _permit: permit,
                            };
                            if this.tls.is_none() {
                                return Poll::Ready(Some(Ok(conn)));
                            }
                            // Looked at apart, so a slow client holds up no other.
                            this.classifying.spawn(classify(conn, peer));
                        }
                        None => this.refuse(stream, peer),
                    }
                }
                Err(e) => {
                    if this.error_log.event().is_some() {
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
