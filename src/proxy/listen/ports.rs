//! The sockets the proxy serves: the listen flags' listeners, and the ports each revision asks
//! for (its Listeners, and its TCPMappings' ports). A revision's new ports are bound before it
//! is applied ([`Proxy::prepare_listeners`]: a port that cannot be bound rejects the revision,
//! with the reason) and start accepting when it is swapped in; ports it no longer names stop
//! accepting and their connections are asked to finish. Sockets it keeps are not touched, so
//! their connections go on. Without a Listener resource the flags' listeners serve, as before.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::proxy::Proxy;
use crate::routes::Graph;

/// Pending connections the kernel queues per listener (capped by `net.core.somaxconn`): room
/// for bursts, where the usual 128 drops SYNs under load.
pub const LISTEN_BACKLOG: u32 = 4096;

/// What an accept loop does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A flag's cleartext HTTP listener (`--http-listen`).
    Http,
    /// A flag's HTTPS listener (`--https-listen`).
    Https,
    /// A revision's port: its Listener in the live graph says what it speaks.
    Port,
}

/// One socket being served.
struct Open {
    addr: SocketAddr,
    role: watch::Sender<Role>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What accept loops share, known once the proxy is started.
struct Started {
    conns: Arc<Semaphore>,
    tls: Arc<rustls::ServerConfig>,
    /// The other workers' runtimes (`--workers`): each runs an accept loop on every socket.
    workers: Vec<tokio::runtime::Handle>,
}

/// The open sockets, the ones bound for a revision not yet applied, and the flags' addresses.
#[derive(Default)]
pub(crate) struct ListenerSet {
    started: Option<Started>,
    open: Vec<Open>,
    staged: Vec<(SocketAddr, TcpListener)>,
    /// The flags' listeners (port resolved), reopened when a revision drops its own Listeners.
    flags: Vec<(SocketAddr, Role)>,
    /// Shut down: nothing opens any more.
    closed: bool,
}

/// A duplicate of `l`'s socket registered with `worker`'s reactor.
fn dup_listener(l: &TcpListener, worker: &tokio::runtime::Handle) -> std::io::Result<TcpListener> {
    use std::os::fd::AsFd;
    let std = std::net::TcpListener::from(l.as_fd().try_clone_to_owned()?);
    std.set_nonblocking(true)?;
    let _in = worker.enter();
    TcpListener::from_std(std)
}

/// Bind `addr` for listening (address reuse, a deep backlog).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

impl ListenerSet {
    /// The address a revision's port is opened on: `--listener-ip`, else the flags' address.
    fn ip(&self, configured: Option<IpAddr>) -> IpAddr {
        configured
            .or_else(|| self.flags.first().map(|(a, _)| a.ip()))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// The sockets `graph` wants, each with its role and what asked for it.
    fn wanted(
        &self,
        graph: &Graph,
        ip: Option<IpAddr>,
    ) -> Result<Vec<(SocketAddr, Role, String)>, String> {
        let ip = self.ip(ip);
        let mut out: Vec<(SocketAddr, Role, String)> = Vec::new();
        if !graph.has_own_listeners() {
            for (a, r) in &self.flags {
                let flag = if *r == Role::Http {
                    "--http-listen"
                } else {
                    "--https-listen"
                };
                out.push((*a, *r, flag.to_string()));
            }
        }
        for l in &graph.listeners {
            let addr = SocketAddr::new(ip, l.port);
            if let Some((_, _, other)) = out.iter().find(|(a, _, _)| a.port() == l.port) {
                return Err(format!(
                    "port {} is wanted by {} and by {other}",
                    l.port,
                    l.describe()
                ));
            }
            out.push((addr, Role::Port, l.describe()));
        }
        Ok(out)
    }
}

impl Proxy {
    /// Bind the ports `graph` opens that are not open yet, so that swapping it in cannot fail
    /// for a busy port. `Err` says which port and why; nothing is kept bound then.
    pub fn prepare_listeners(&self, graph: &Graph) -> Result<(), String> {
        let mut set = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        // Before `start` the flags' sockets are not known yet (a Listener may name the same
        // port, as Emissary's usual 8080/8443 do): `start` binds what the graph wants.
        if set.closed || set.started.is_none() {
            return Ok(());
        }
        let wanted = set.wanted(graph, self.settings.listener_ip)?;
        let mut fresh = Vec::new();
        for (addr, _, what) in wanted {
            let known = set.open.iter().any(|o| o.addr == addr)
                || set.staged.iter().any(|(a, _)| *a == addr)
                || fresh.iter().any(|(a, _)| *a == addr);
            if known {
                continue;
            }
            match bind(addr) {
                Ok(l) => fresh.push((addr, l)),
                Err(e) => return Err(format!("cannot listen on {addr} for {what}: {e}")),
            }
        }
        set.staged.extend(fresh);
        Ok(())
    }

    /// Open and close sockets so that the ones `graph` wants are served (called on every swap
    /// and at start). A socket that cannot be bound here (a swap that skipped
    /// `prepare_listeners`) is logged; the rest go on.
    pub(crate) fn apply_listeners(self: &Arc<Self>, graph: &Graph) {
        let mut set = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if set.closed || set.started.is_none() {
            return;
        }
        let wanted = match set.wanted(graph, self.settings.listener_ip) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "listeners not changed");
                return;
            }
        };
        // Close what is no longer wanted: stop accepting, ask its connections to finish.
        let (keep, gone): (Vec<Open>, Vec<Open>) = std::mem::take(&mut set.open)
            .into_iter()
            .partition(|o| wanted.iter().any(|(a, _, _)| *a == o.addr));
        for o in gone {
            tracing::info!(addr = %o.addr, "listener closed");
            let _ = o.stop.send(true);
        }
        set.open = keep;
        for (addr, role, what) in wanted {
            if let Some(o) = set.open.iter().find(|o| o.addr == addr) {
                o.role
                    .send_if_modified(|r| std::mem::replace(r, role) != role);
                continue;
            }
            let staged = set.staged.iter().position(|(a, _)| *a == addr);
            let listener = match staged {
                Some(i) => set.staged.swap_remove(i).1,
                None => match bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "cannot listen for {what}");
                        continue;
                    }
                },
            };
            let open = self.spawn_listener(&set, listener, addr, role);
            tracing::info!(%addr, "listener opened for {what}");
            set.open.extend(open);
        }
        set.staged.clear();
    }

    fn spawn_listener(
        self: &Arc<Self>,
        set: &ListenerSet,
        listener: TcpListener,
        addr: SocketAddr,
        role: Role,
    ) -> Option<Open> {
        let started = set.started.as_ref()?;
        let (role_tx, role_rx) = watch::channel(role);
        let (stop_tx, stop_rx) = watch::channel(false);
        for w in &started.workers {
            // The same socket, registered with the worker's reactor: whichever worker is free
            // accepts. The loop ends with the others on `stop`.
            let dup = match dup_listener(&listener, w) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "a worker cannot accept on this listener");
                    continue;
                }
            };
            w.spawn(self.clone().accept_loop(
                dup,
                role_rx.clone(),
                started.tls.clone(),
                started.conns.clone(),
                stop_rx.clone(),
            ));
        }
        let task = tokio::spawn(self.clone().accept_loop(
            listener,
            role_rx,
            started.tls.clone(),
            started.conns.clone(),
            stop_rx,
        ));
        Some(Open {
            addr,
            role: role_tx,
            stop: stop_tx,
            task,
        })
    }

    /// Start serving: the flags' sockets, then whatever the live graph asks for.
    pub(super) fn start_listeners(
        self: &Arc<Self>,
        flags: Vec<(TcpListener, Role)>,
        tls: Arc<rustls::ServerConfig>,
        conns: Arc<Semaphore>,
        workers: Vec<tokio::runtime::Handle>,
    ) -> Result<(), crate::proxy::SetupError> {
        {
            let mut set = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            set.started = Some(Started {
                conns,
                tls,
                workers,
            });
            for (l, role) in flags {
                let addr = l
                    .local_addr()
                    .map_err(crate::proxy::SetupError::LocalAddr)?;
                set.flags.push((addr, role));
                set.staged.push((addr, l));
            }
        }
        let graph = self.shared.load().graph.clone();
        self.apply_listeners(&graph);
        Ok(())
    }

    /// Stop every accept loop (connections are asked to finish); returns the loops to await.
    pub(super) fn close_listeners(&self) -> Vec<JoinHandle<()>> {
        let mut set = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        set.closed = true;
        set.staged.clear();
        set.open
            .drain(..)
            .map(|o| {
                let _ = o.stop.send(true);
                o.task
            })
            .collect()
    }

    /// The addresses being served, for status and tests.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let set = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        set.open.iter().map(|o| o.addr).collect()
    }
}
