//! Listeners and connections: accept (with the connection limit), TLS handshake, hyper's
//! HTTP/1.1 + HTTP/2 server (h2c by prior knowledge on the plain listener, ALPN on TLS), the idle
//! timeout, and graceful shutdown (stop accepting, let connections finish, up to a deadline).
//!
//! A client that asks for `Upgrade: h2c` over HTTP/1.1 is answered over HTTP/1.1: the upgrade
//! header is hop-by-hop and ignored, which RFC 9110 allows.
//!
//! The top layer: hands each request to [`Proxy::handle`] (the request layer) with the
//! connection's facts (`conn`); `fds` sizes the connection limit to the file-descriptor limit;
//! `ports` opens and closes the sockets each revision asks for; `tcp` serves TCPMapping ports.

pub mod fds;
pub(crate) mod ports;
mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::LazyConfigAcceptor;

use super::{Limits, Proxy, SetupError};
use crate::proxy::conn::{ClientCert, ConnHold, ConnInfo, Sni};
use crate::proxy::listen::ports::Role;
use crate::proxy::tunnel::LastSeen;

/// hyper's server builder with the limits applied.
pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's read buffer bounds the head; the exact header limits are checked per request (so
    // "at the limit" passes and "one past" gets 431), this only has to be roomy enough.
    let buf =
        (limits.max_header_bytes + limits.max_uri_bytes + 4 * limits.max_headers + 4096).max(8192);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(buf)
        .max_headers(limits.max_headers + 1)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(
            (limits.max_header_bytes + 32 * limits.max_headers + limits.max_uri_bytes) as u32,
        )
        .max_pending_accept_reset_streams(Some(200))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// The sockets to serve. `https` needs a TLS server config (see `tls::server_config`).
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
}

/// A started proxy. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    conns: Arc<Semaphore>,
    max_conns: u32,
    /// The other workers' threads (see [`Proxy::start_workers`]) and the signal that ends them.
    workers: Vec<std::thread::JoinHandle<()>>,
    exit: watch::Sender<bool>,
}

impl Running {
    /// Stop accepting, ask every connection to finish (HTTP/1.1: after the current response;
    /// HTTP/2: GOAWAY), wait for them up to `deadline`. Returns whether all of them finished.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        for a in self.proxy.close_listeners() {
            let _ = a.await;
        }
        let drained = tokio::time::timeout(deadline, self.conns.acquire_many(self.max_conns))
            .await
            .is_ok();
        if !drained {
            tracing::warn!("drain deadline passed with connections still open");
        }
        // The other workers' runtimes end here: connections still open on them are dropped.
        let _ = self.exit.send(true);
        for w in self.workers {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        drained
    }

    /// Open downstream connections.
    pub fn open_connections(&self) -> usize {
        self.max_conns as usize - self.conns.available_permits()
    }
}

/// A worker thread with a single-threaded runtime, idle until accept loops are spawned on it
/// (through the returned handle), ending on `exit`.
fn spawn_worker(
    n: usize,
    mut exit: watch::Receiver<bool>,
) -> Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle), SetupError> {
    let (ready, started) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("legate-worker-{n}"))
        .spawn(move || {
            crate::proxy::upstream::pool::set_worker(u16::try_from(n).unwrap_or(u16::MAX));
            // Built on its own thread: a runtime must not be dropped inside another one.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(rt.handle().clone()));
            rt.block_on(async move {
                let _ = exit.wait_for(|e| *e).await;
            })
        })
        .map_err(SetupError::Worker)?;
    match started.recv() {
        Ok(Ok(handle)) => Ok((thread, handle)),
        Ok(Err(e)) => Err(SetupError::Worker(e)),
        Err(_) => Err(SetupError::Worker(std::io::Error::other(
            "the worker thread ended while starting",
        ))),
    }
}

/// How one accepted connection is served.
enum Mode {
    Plain,
    Tls(Arc<rustls::ServerConfig>),
    /// A TCPMapping port.
    Tcp,
}

impl Proxy {
    /// Serve the given listeners (and the ports the live graph opens) until
    /// [`Running::shutdown`].
    pub fn start(self: &Arc<Self>, listeners: Listeners) -> Result<Running, SetupError> {
        self.start_workers(listeners, 1)
    }

    /// [`Proxy::start`] with `workers` workers: the current runtime and `workers - 1` threads,
    /// each with a single-threaded runtime that accepts on every listener (a duplicate of the
    /// socket in its own reactor) and serves the connections it accepted, so a connection and
    /// its requests stay on one thread: no work stealing, no cross-thread wake-ups. Listeners
    /// a revision opens or closes later are served by every worker too. `--max-connections`
    /// and the drain on shutdown count the connections of all workers together.
    pub fn start_workers(
        self: &Arc<Self>,
        listeners: Listeners,
        workers: usize,
    ) -> Result<Running, SetupError> {
        let (exit, exit_rx) = watch::channel(false);
        let mut threads = Vec::new();
        let mut handles = Vec::new();
        for n in 1..workers.max(1) {
            let (thread, handle) = spawn_worker(n, exit_rx.clone())?;
            threads.push(thread);
            handles.push(handle);
        }
        let max_conns = self
            .settings
            .limits
            .max_connections
            .clamp(1, u32::MAX as usize >> 4) as u32;
        let conns = Arc::new(Semaphore::new(max_conns as usize));
        let local = |l: &TcpListener| l.local_addr().map_err(SetupError::LocalAddr);
        let mut flags = Vec::new();
        let mut http_addr = None;
        let mut https_addr = None;
        if let Some(l) = listeners.http {
            http_addr = Some(local(&l)?);
            flags.push((l, Role::Http));
        }
        let tls = match listeners.https {
            Some((l, cfg)) => {
                https_addr = Some(local(&l)?);
                flags.push((l, Role::Https));
                cfg
            }
            None => Arc::new(crate::tls::server_config(self.cert_source())?),
        };
        self.start_listeners(flags, tls, conns.clone(), handles)?;
        Ok(Running {
            http_addr,
            https_addr,
            proxy: self.clone(),
            conns,
            max_conns,
            workers: threads,
            exit,
        })
    }

    /// What a connection accepted on `port` gets: the flag's role, or what the live graph's
    /// listener on that port speaks (`None`: the port is being closed).
    fn mode_for(&self, role: Role, port: u16, tls: &Arc<rustls::ServerConfig>) -> Option<Mode> {
        use crate::routes::ListenerProtocol as P;
        match role {
            Role::Http => Some(Mode::Plain),
            Role::Https => Some(Mode::Tls(tls.clone())),
            Role::Port => {
                let snap = self.shared.load();
                let g = &snap.graph;
                Some(match g.listeners[g.listener_on(port)?].protocol {
                    P::Http => Mode::Plain,
                    P::Https => Mode::Tls(tls.clone()),
                    P::Tcp | P::Tls => Mode::Tcp,
                })
            }
        }
    }

    pub(super) async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        role: watch::Receiver<Role>,
        tls: Arc<rustls::ServerConfig>,
        conns: Arc<Semaphore>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.changed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; never exit the loop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "connection refused: --max-connections reached");
                drop(stream);
                continue;
            };
            let port = stream.local_addr().map_or(0, |a| a.port());
            let Some(mode) = self.mode_for(*role.borrow(), port, &tls) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let stop = stop.clone();
            // A client must complete a request head (and a TLS handshake) within the header
            // timeout from accept, whatever the protocol: the clock starts here.
            let head_by = tokio::time::Instant::now() + self.settings.limits.header_read_timeout;
            tokio::spawn(async move {
                // Held by the connection task and by a tunnel it hands an upgrade to, so an
                // upgraded connection still counts against --max-connections, in the gauge and
                // for the drain on shutdown.
                let hold = ConnHold(Arc::new((permit, proxy.metrics.connection())));
                let tls = match mode {
                    Mode::Tcp => return proxy.serve_tcp(stream, remote, port, hold).await,
                    Mode::Plain => None,
                    Mode::Tls(cfg) => Some(cfg),
                };
                proxy
                    .serve_conn(stream, remote, tls, stop, hold, head_by)
                    .await;
            });
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        stop: watch::Receiver<bool>,
        hold: ConnHold,
        head_by: tokio::time::Instant,
    ) {
        let info = ConnInfo {
            remote,
            tls: tls.is_some(),
            local_port: stream.local_addr().map_or(0, |a| a.port()),
            xff_hops: self.settings.xff_trusted_hops,
        };
        match tls {
            None => {
                self.serve_io(
                    TokioIo::new(stream),
                    info,
                    (None, None),
                    stop,
                    hold,
                    head_by,
                )
                .await
            }
            Some(listener_cfg) => {
                let hs = tokio::time::timeout_at(head_by, self.tls_handshake(stream, listener_cfg))
                    .await;
                match hs {
                    Ok(Ok(s)) => {
                        let tls = s.get_ref().1;
                        let sni = tls.server_name().map(|n| Sni(Arc::from(n)));
                        // rustls returns peer certificates only once its verifier accepted them.
                        let client = tls
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| {
                                http::HeaderValue::from_str(&crate::tls::cert::xfcc(c)).ok()
                            })
                            .map(ClientCert);
                        self.serve_io(TokioIo::new(s), info, (sni, client), stop, hold, head_by)
                            .await
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            }
        }
    }

    /// Read the ClientHello, then finish the handshake with the config of the Host its SNI
    /// picks (a Host with its own TLS settings), else the listener's.
    async fn tls_handshake(
        &self,
        stream: TcpStream,
        listener_cfg: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
        let cfg = self
            .tls_config_for(start.client_hello().server_name())
            .map_err(|()| std::io::Error::other("the Host's TLS settings are unavailable"))?
            .unwrap_or(listener_cfg);
        start.into_stream(cfg).await
    }

    async fn serve_io<I>(
        self: Arc<Self>,
        io: I,
        info: ConnInfo,
        (sni, client): (Option<Sni>, Option<ClientCert>),
        mut stop: watch::Receiver<bool>,
        hold: ConnHold,
        head_by: tokio::time::Instant,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let svc = {
            let proxy = self.clone();
            let activity = activity.clone();
            service_fn(move |mut req: Request<Incoming>| {
                let proxy = proxy.clone();
                let activity = activity.clone();
                if req.headers().contains_key(http::header::UPGRADE) {
                    // Only a request that may become a tunnel carries the hold.
                    req.extensions_mut().insert(hold.clone());
                }
                if let Some(sni) = &sni {
                    req.extensions_mut().insert(sni.clone());
                }
                if let Some(c) = &client {
                    req.extensions_mut().insert(c.clone());
                }
                async move {
                    // A guard, so a request cancelled by a client reset still counts as ended.
                    let _busy = activity.begin();
                    // Boxed: the handler's future is kilobytes, and hyper moves the service
                    // future several times (into an HTTP/2 stream's spawned task, into the
                    // HTTP/1.1 dispatcher), each move a memcpy of all of it (12% of an h2c
                    // profile). Boxed here, only the pointer moves.
                    Ok::<_, Infallible>(Box::pin(proxy.handle(req, info)).await)
                }
            })
        };
        let conn = self.builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let idle = self.settings.limits.idle_timeout;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        // hyper's HTTP/1.1 header timer starts only with the first byte, and HTTP/2 (and the
        // protocol sniffing of the plain listener) has none: a connection whose first request
        // has not started by `head_by` is dropped.
        let first_head = tokio::time::sleep_until(head_by);
        tokio::pin!(first_head);
        let mut head_seen = false;
        let mut closing = *stop.borrow();
        if closing {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(remote = %info.remote, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = &mut first_head, if !head_seen => {
                    // Looked at when the timer fires: the first request may have started after
                    // this wait began.
                    head_seen = activity.started();
                    if !head_seen {
                        tracing::debug!(remote = %info.remote, "no request head within the header timeout: closed");
                        return;
                    }
                }
                _ = stop.changed(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle_timer, if !closing => {
                    match activity.idle_deadline(idle) {
                        None => {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        Some(at) => idle_timer.as_mut().reset(at),
                    }
                }
            }
        }
    }
}

/// Requests in flight on a connection and when the last one ended, for the idle timeout.
struct Activity {
    inflight: AtomicUsize,
    seen: LastSeen,
    /// A request head has been read on this connection.
    started: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            inflight: AtomicUsize::new(0),
            seen: LastSeen::new(),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.started.store(true, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    fn end(&self) {
        self.seen.touch();
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// `None` when the connection has been idle for `idle`; else when to look again.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return Some(Instant::now() + idle);
        }
        self.seen.idle_deadline(idle)
    }
}

/// One request in flight on a connection; ends it when dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_the_idle_timeout_since_its_last_request() {
        let idle = Duration::from_secs(30);
        let a = Arc::new(Activity::new());
        // A request in flight keeps the connection busy however long it takes.
        let busy = a.begin();
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(a.idle_deadline(idle).is_some());
        drop(busy);
        // The idle time runs from the end of the last request.
        let at = a.idle_deadline(idle).expect("just ended");
        assert_eq!(at, Instant::now() + idle);
        tokio::time::advance(idle - Duration::from_millis(1)).await;
        assert!(a.idle_deadline(idle).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            a.idle_deadline(idle).is_none(),
            "idle for the whole timeout"
        );
    }
}
