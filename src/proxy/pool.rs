//! The HTTP/1.1 upstream pool: idle connections per upstream, checked out per request and put
//! back when the response body ends, with no task spawned and no map lookup per request (each
//! prepared route holds its upstream's pool directly).
//!
//! hyper-util's legacy client spawns a task per HTTP/1 request to wait for the connection to be
//! reusable and hashes the authority on every checkout; on a proxy's request path those two cost
//! more than everything Legate does to the request itself. HTTP/2 upstreams keep the legacy
//! client (one multiplexed connection needs neither).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};

use super::body::ReqBody;
use super::client::Connector;
use super::error::ProxyError;

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 256;

/// The pool of one upstream (scheme + authority + connect settings).
pub struct HostPool {
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    connector: Connector,
    idle_timeout: Duration,
    /// Idle connections, tagged with the address they were dialled at when a load balancer
    /// chose it (`None`: the resolver's rotation chose).
    idle: Mutex<Vec<Idle>>,
}

type Idle = (Conn, Instant, Option<IpAddr>);

/// One upstream connection and the address it is connected to (for the access log).
struct Conn {
    tx: SendRequest<ReqBody>,
    peer: Option<SocketAddr>,
}

impl HostPool {
    pub fn new(target: Uri, connector: Connector, idle_timeout: Duration) -> HostPool {
        HostPool {
            target,
            connector,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn checkout(&self, addr: Option<IpAddr>) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(c, since, _)| !c.tx.is_closed() && since.elapsed() < self.idle_timeout);
        let i = idle.iter().rposition(|(_, _, a)| *a == addr)?;
        Some(idle.swap_remove(i).0)
    }

    fn checkin(&self, s: Conn, addr: Option<IpAddr>) {
        if s.tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now(), addr));
        }
    }

    async fn connect(&self, addr: Option<IpAddr>) -> Result<Conn, ProxyError> {
        use tower_service::Service;
        let mut c = self.connector.clone();
        let target = match addr {
            None => self.target.clone(),
            Some(ip) => {
                let port = self.target.port_u16().unwrap_or(80);
                let sa = std::net::SocketAddr::new(ip, port);
                format!("http://{sa}/")
                    .parse()
                    .map_err(|_| ProxyError::Internal("balanced address".into()))?
            }
        };
        let io = c
            .call(target)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let peer = io.peer();
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn { tx, peer })
    }

    /// Whether this pool dials plain `http://` (load balancers may pick its addresses).
    pub fn is_plain_http(&self) -> bool {
        self.target.scheme() == Some(&http::uri::Scheme::HTTP)
    }

    /// The host name this pool dials (for address lookups).
    pub fn host(&self) -> &str {
        self.target.host().unwrap_or("")
    }

    /// Send `req` (origin-form URI) on an idle connection, or a new one; a request that a stale
    /// idle connection refused before sending is retried once on a fresh connection.
    /// `addr` pins the upstream address (a load balancer's pick); `None`: any address. `peer`
    /// receives the address of the connection the request was sent on.
    pub async fn send_to(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        mut req: Request<ReqBody>,
        peer: &mut Option<SocketAddr>,
    ) -> Result<Response<PooledBody>, ProxyError> {
        loop {
            let (mut sender, reused) = match self.checkout(addr) {
                Some(s) => (s, true),
                None => (self.connect(addr).await?, false),
            };
            *peer = sender.peer;
            if sender.tx.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(ProxyError::Connect("connection closed before use".into()));
            }
            match sender.tx.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, inner) = resp.into_parts();
                    // A switched (101) connection belongs to the tunnel, never to the pool.
                    let back = (parts.status != http::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (sender, self.clone(), addr));
                    let mut body = PooledBody { inner, back };
                    body.maybe_return();
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(ProxyError::from_hyper(e.into_error())),
                },
            }
        }
    }
}

/// An upstream response body that returns its connection to the pool when it ends.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Conn, Arc<HostPool>, Option<IpAddr>)>,
}

impl PooledBody {
    fn maybe_return(&mut self) {
        if self.inner.is_end_stream() {
            if let Some((s, pool, addr)) = self.back.take() {
                pool.checkin(s, addr);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            None => {
                if let Some((s, pool, addr)) = self.back.take() {
                    pool.checkin(s, addr);
                }
            }
            Some(Ok(_)) => self.maybe_return(),
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
