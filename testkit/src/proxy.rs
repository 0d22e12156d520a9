//! [`NetFaults`]: fault-injecting TCP proxies between brokers on one machine, for network
//! partition tests.
//!
//! Each broker listens on its own loopback address (`127.0.1.N`) and advertises a proxy
//! (`127.0.2.N`) in the peers list, so every broker reaches every other one through the
//! target's proxy. A broker's peer connections leave from its own listen address, so the
//! proxy knows which broker is calling by the connection's source address; a caller with any
//! other source (a client) always passes. Cutting a direction `from → to` refuses new
//! connections of that pair and drops the ones in flight; healing lets them through again.
//!
//! A cut is a *refusing* partition: each side sees its connections reset at once. A real
//! partition (a dead switch, a firewall that drops packets, a paused VM) is usually *silent*:
//! nothing arrives, nothing is refused, and only timeouts notice. Blackholing a direction
//! `from → to` ([`NetFaults::blackhole`]) models that: the connections of that pair in flight
//! stay open but the proxy forwards no byte of them either way (it stops reading both
//! sockets, so nothing is lost, only held), and new ones are accepted but forward nothing.
//! Healing resumes the held connections where they stopped, as a real network does when a
//! link comes back (TCP retransmits what was dropped).
//!
//! Everything runs in the test's own process, on 127.0.0.0/8 only, and stops when the
//! [`NetFaults`] (with its proxies) is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// The directions `(from, to)` whose connections forward nothing for now.
type Blackholed = HashSet<(IpAddr, IpAddr)>;

/// One proxied connection in flight: who calls whom, and how to drop it.
struct Flow {
    from: IpAddr,
    to: IpAddr,
    abort: AbortHandle,
}

struct State {
    /// The cut directions, `(from, to)`.
    cut: HashSet<(IpAddr, IpAddr)>,
    /// The blackholed directions; every proxied connection watches this set and forwards
    /// nothing while its pair is in it. Dropping the sender (with the [`NetFaults`]) ends
    /// every connection still waiting on it.
    blackholed: watch::Sender<Blackholed>,
    /// The connections in flight, pruned of finished ones on every new connection.
    flows: Vec<Flow>,
    /// The proxies' accept loops.
    listeners: Vec<JoinHandle<()>>,
}

/// The proxies of one test and the directions cut between brokers. Cheap to clone; the
/// proxies stop, and every proxied connection is dropped, when the last clone goes.
#[derive(Clone, Default)]
pub struct NetFaults {
    inner: Arc<Inner>,
}

impl Default for State {
    fn default() -> State {
        State {
            cut: HashSet::new(),
            blackholed: watch::Sender::new(HashSet::new()),
            flows: Vec::new(),
            listeners: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for l in &state.listeners {
            l.abort();
        }
        for f in &state.flows {
            f.abort.abort();
        }
    }
}

impl NetFaults {
    /// No proxies yet, nothing cut.
    pub fn new() -> NetFaults {
        NetFaults::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a proxy listening on `listen` (port 0 picks one) that forwards to `target`, and
    /// returns the bound address. The proxy's broker is `target`'s IP.
    pub async fn proxy(&self, listen: SocketAddr, target: SocketAddr) -> Result<SocketAddr> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding a proxy on {listen}"))?;
        let bound = listener.local_addr()?;
        // The accept loop holds only a weak handle, so dropping the last NetFaults stops it.
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, peer)) = listener.accept().await else {
                    // Out of file descriptors, say: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let faults = NetFaults { inner };
                faults.admit(inbound, peer.ip(), target);
            }
        });
        self.state().listeners.push(task);
        Ok(bound)
    }

    /// Forwards one accepted connection unless its direction is cut (then it is dropped).
    /// While its direction is blackholed it is held: accepted, but not even connected onward
    /// (a dropped SYN), and nothing forwarded.
    fn admit(&self, inbound: TcpStream, from: IpAddr, target: SocketAddr) {
        let to = target.ip();
        let mut state = self.state();
        state.flows.retain(|f| !f.abort.is_finished());
        if state.cut.contains(&(from, to)) {
            return; // dropped: the caller sees the connection close at once
        }
        let gate = Gate {
            pair: (from, to),
            blackholed: state.blackholed.subscribe(),
        };
        let task = tokio::spawn(async move {
            if !gate.open().await {
                return;
            }
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            // Ends at the first error either way (dropping both sockets, as
            // `copy_bidirectional` would); an end of stream is passed on as a half close.
            let _ = tokio::try_join!(
                pump(in_read, out_write, gate.clone()),
                pump(out_read, in_write, gate),
            );
        });
        state.flows.push(Flow {
            from,
            to,
            abort: task.abort_handle(),
        });
    }

    /// Cuts the direction `from → to` (broker listen IPs): new connections are refused and
    /// those in flight dropped.
    pub fn cut(&self, from: IpAddr, to: IpAddr) {
        let mut state = self.state();
        state.cut.insert((from, to));
        for f in state.flows.iter().filter(|f| f.from == from && f.to == to) {
            f.abort.abort();
        }
    }

    /// Cuts both directions between `isolated` and each of `others`.
    pub fn isolate(&self, isolated: IpAddr, others: &[IpAddr]) {
        for other in others {
            self.cut(isolated, *other);
            self.cut(*other, isolated);
        }
    }

    /// Blackholes the direction `from → to` (broker listen IPs), silently: the connections
    /// of that pair in flight stay open but forward no byte either way, and new ones are
    /// accepted but forward nothing. Neither side sees an end of stream or a reset; only its
    /// own timeouts can tell.
    pub fn blackhole(&self, from: IpAddr, to: IpAddr) {
        self.state().blackholed.send_modify(|set| {
            set.insert((from, to));
        });
    }

    /// Blackholes both directions between `isolated` and each of `others`: a silent
    /// partition (see [`NetFaults::blackhole`]).
    pub fn isolate_silently(&self, isolated: IpAddr, others: &[IpAddr]) {
        for other in others {
            self.blackhole(isolated, *other);
            self.blackhole(*other, isolated);
        }
    }

    /// Lets every direction through again: cut ones accept new connections, and blackholed
    /// ones resume forwarding on the connections they held, from where they stopped.
    pub fn heal(&self) {
        let mut state = self.state();
        state.cut.clear();
        state.blackholed.send_replace(HashSet::new());
    }

    /// How many directions are cut now.
    pub fn cut_count(&self) -> usize {
        self.state().cut.len()
    }

    /// How many directions are blackholed now.
    pub fn blackholed_count(&self) -> usize {
        self.state().blackholed.borrow().len()
    }
}

/// Whether one connection's direction is blackholed, watched.
#[derive(Clone)]
struct Gate {
    pair: (IpAddr, IpAddr),
    blackholed: watch::Receiver<Blackholed>,
}

impl Gate {
    /// Waits until the pair is not blackholed; `false` once the [`NetFaults`] is gone.
    async fn open(&self) -> bool {
        let mut rx = self.blackholed.clone();
        let pair = self.pair;
        let open = rx.wait_for(|set| !set.contains(&pair)).await.is_ok();
        open
    }

    /// Waits until the pair is blackholed (forever once the [`NetFaults`] is gone: the
    /// connection is aborted then anyway).
    async fn closed(&self) {
        let mut rx = self.blackholed.clone();
        let pair = self.pair;
        if rx.wait_for(|set| set.contains(&pair)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The bytes of one direction of a proxied connection, from `src` to `dst`, forwarded only
/// while `gate` is open. While it is closed neither socket is read or written: what the
/// sender sends waits in the kernel's buffers (a full one stalls it, as unacknowledged data
/// does on a real network), and no end of stream or error is passed on. A read or write is
/// abandoned when the gate closes (both are cancel safe: a byte is either moved or not).
async fn pump(mut src: OwnedReadHalf, mut dst: OwnedWriteHalf, gate: Gate) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !gate.open().await {
            return Ok(());
        }
        // `biased`, the gate first: once `blackhole` returns, no later read is forwarded.
        let n = tokio::select! {
            biased;
            () = gate.closed() => continue,
            read = src.read(&mut buf) => read?,
        };
        let mut written = 0;
        while written < n {
            if !gate.open().await {
                return Ok(());
            }
            tokio::select! {
                biased;
                () = gate.closed() => {}
                w = dst.write(&buf[written..n]) => match w? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    w => written += w,
                },
            }
        }
        if n == 0 {
            // The end of the stream, passed on only while the gate is open.
            if gate.open().await {
                let _ = dst.shutdown().await;
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests;
