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
//! Everything runs in the test's own process, on 127.0.0.0/8 only, and stops when the
//! [`NetFaults`] (with its proxies) is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// One proxied connection in flight: who calls whom, and how to drop it.
struct Flow {
    from: IpAddr,
    to: IpAddr,
    abort: AbortHandle,
}

#[derive(Default)]
struct State {
    /// The cut directions, `(from, to)`.
    cut: HashSet<(IpAddr, IpAddr)>,
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
    fn admit(&self, inbound: TcpStream, from: IpAddr, target: SocketAddr) {
        let to = target.ip();
        let mut state = self.state();
        state.flows.retain(|f| !f.abort.is_finished());
        if state.cut.contains(&(from, to)) {
            return; // dropped: the caller sees the connection close at once
        }
        let task = tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            let mut inbound = inbound;
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
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

    /// Lets every direction through again.
    pub fn heal(&self) {
        self.state().cut.clear();
    }

    /// How many directions are cut now.
    pub fn cut_count(&self) -> usize {
        self.state().cut.len()
    }
}
