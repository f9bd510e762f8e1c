//! The HTTP/1.1 upstream pool: idle connections per upstream, checked out per request and put
//! back when the response body ends, with no task spawned and no map lookup per request (each
//! prepared route holds its upstream's pool directly).
//!
//! hyper-util's legacy client spawns a task per HTTP/1 request to wait for the connection to be
//! reusable and hashes the authority on every checkout; on a proxy's request path those two cost
//! more than everything Legate does to the request itself. HTTP/2 upstreams have their own
//! pool (`h2`): one multiplexed connection per address.
//!
//! Every connection holds a slot of the route's circuit breaker (`max_connections`) from dial
//! to close, idle or busy, as Envoy counts them; a request that finds no idle connection and no
//! free slot waits as a pending request until one is returned or freed. The pool also runs
//! active health-check probes against one address (a fresh connection each, never pooled).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};

use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::breaker::Breaker;
use super::connect::Connector;
use crate::proxy::body::{BoxError, ReqBody};
use crate::proxy::respond::ProxyError;
use crate::routes::Probe;

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 256;

/// The pool of one upstream (scheme + authority + connect settings).
pub struct HostPool {
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    connector: Connector,
    /// The same with TLS offering only `h2` by ALPN, for gRPC health checks.
    h2_connector: Connector,
    idle_timeout: Duration,
    /// Idle connections, tagged with the address they were dialled at when a load balancer
    /// chose it (`None`: the resolver's rotation chose).
    idle: Mutex<Vec<Idle>>,
    /// Woken when a connection goes back to `idle` (requests waiting for a breaker slot).
    returned: Notify,
    /// Dials in progress at most ([`MAX_DIALS`]).
    dials: Arc<tokio::sync::Semaphore>,
}

/// Concurrent dials per upstream: a burst of requests (or of client resets) waits for these
/// connections instead of opening one each.
const MAX_DIALS: usize = 32;

type Idle = (Conn, Instant, Option<IpAddr>);

/// One upstream connection and the address it is connected to (for the access log).
struct Conn {
    tx: SendRequest<ReqBody>,
    peer: Option<SocketAddr>,
    /// The worker whose runtime drives the connection's task (see [`set_worker`]).
    worker: u16,
}

thread_local! {
    static WORKER: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
}

/// Mark this thread as worker `n` (`--workers`). A request prefers an idle connection its own
/// worker dialled: one driven by another worker's runtime costs a cross-thread wake-up each way
/// per request.
pub(crate) fn set_worker(n: u16) {
    WORKER.with(|w| w.set(n));
}

impl HostPool {
    pub fn new(
        target: Uri,
        connector: Connector,
        h2_connector: Connector,
        idle_timeout: Duration,
    ) -> HostPool {
        HostPool {
            target,
            connector,
            h2_connector,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            dials: Arc::new(tokio::sync::Semaphore::new(MAX_DIALS)),
        }
    }

    fn checkout(&self, addr: Option<IpAddr>) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // One clock read per checkout, not one per idle connection.
        let now = Instant::now();
        idle.retain(|(c, since, _)| {
            !c.tx.is_closed() && now.saturating_duration_since(*since) < self.idle_timeout
        });
        let me = WORKER.with(|w| w.get());
        let i = idle
            .iter()
            .rposition(|(c, _, a)| *a == addr && c.worker == me)
            .or_else(|| idle.iter().rposition(|(_, _, a)| *a == addr))?;
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
        drop(idle);
        self.returned.notify_waiters();
    }

    /// Close one idle connection (its breaker slot comes back when its task ends).
    fn evict_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.is_empty() {
            idle.remove(0);
        }
    }

    /// An idle connection to `addr`, or a new one within the breaker's `max_connections` and
    /// [`MAX_DIALS`].
    async fn sender(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        breaker: &Breaker,
    ) -> Result<(Conn, bool), ProxyError> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before looking, so a check-in in between is not missed.
            returned.as_mut().enable();
            if let Some(s) = self.checkout(addr) {
                return Ok((s, true));
            }
            let slot = match breaker.try_connection() {
                Some(slot) => slot,
                None => {
                    // At the limit: an idle connection to another address gives its slot back.
                    self.evict_idle();
                    let _pending = breaker.pending()?;
                    tokio::select! {
                        slot = breaker.wait_connection() => slot?,
                        _ = &mut returned => continue,
                    }
                }
            };
            // A dial slot, unless a connection comes back first.
            let dialing = tokio::select! {
                p = self.dials.clone().acquire_owned() => {
                    p.map_err(|_| ProxyError::Internal("dial limiter closed".into()))?
                }
                _ = &mut returned => continue,
            };
            return Ok((self.dial(addr, slot, dialing).await?, false));
        }
    }

    /// Dial in a task of its own: when the request that asked is cancelled (a client reset),
    /// the connection still goes to the idle pool for the next request instead of being
    /// thrown away, so resets cannot make a dial each.
    async fn dial(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        slot: OwnedSemaphorePermit,
        dialing: OwnedSemaphorePermit,
    ) -> Result<Conn, ProxyError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        tokio::spawn(async move {
            let made = pool.connect(addr, Some(slot)).await;
            drop(dialing);
            if let Err(Ok(conn)) = tx.send(made) {
                pool.checkin(conn, addr);
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(ProxyError::Internal("dial task ended".into())))
    }

    async fn connect(
        &self,
        addr: Option<IpAddr>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Conn, ProxyError> {
        let (tx, conn, peer) = self.handshake(addr).await?;
        tokio::spawn(async move {
            // The breaker slot is held for as long as the connection is open.
            let _slot = slot;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn {
            tx,
            peer,
            worker: WORKER.with(|w| w.get()),
        })
    }

    async fn handshake(
        &self,
        addr: Option<IpAddr>,
    ) -> Result<
        (
            SendRequest<ReqBody>,
            http1::Connection<super::connect::UpstreamIo, ReqBody>,
            Option<SocketAddr>,
        ),
        ProxyError,
    > {
        let mut c = self.connector.clone();
        let (target, name) = dial_target(&self.target, addr)?;
        let io = c
            .dial(target, name)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let peer = io.peer();
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        Ok((tx, conn, peer))
    }

    /// One HTTP health check of `ip` on a fresh connection: `Err` says why it failed.
    pub async fn probe(&self, ip: IpAddr, probe: &Probe, timeout: Duration) -> Result<(), String> {
        let Probe::Http {
            path,
            hostname,
            add_headers,
            remove_headers,
            expected,
        } = probe
        else {
            return Err("not an HTTP check".into());
        };
        let fut = async {
            let (mut sender, conn, _) =
                self.handshake(Some(ip)).await.map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let host = match hostname {
                Some(h) => h.clone(),
                None => self
                    .target
                    .authority()
                    .map_or_else(String::new, |a| a.to_string()),
            };
            let mut req = Request::get(path.as_str())
                .header(http::header::HOST, host)
                .header(http::header::USER_AGENT, "legate-health-check")
                .header(http::header::CONNECTION, "close")
                .body(ReqBody::buffered(Bytes::new()))
                .map_err(|e| format!("request: {e}"))?;
            let h = req.headers_mut();
            for name in remove_headers {
                h.remove(name.as_str());
            }
            for (k, v) in add_headers {
                if let (Ok(k), Ok(v)) = (
                    http::header::HeaderName::from_bytes(k.as_bytes()),
                    http::header::HeaderValue::from_str(v),
                ) {
                    h.insert(k, v);
                }
            }
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"));
            task.abort();
            let code = resp?.status().as_u16();
            if expected.iter().any(|(lo, hi)| (*lo..=*hi).contains(&code)) {
                Ok(())
            } else {
                Err(format!("status {code}"))
            }
        };
        within(timeout, fut).await
    }

    /// One `grpc.health.v1.Health/Check` of `ip` over HTTP/2 on a fresh connection.
    pub async fn probe_grpc(
        &self,
        ip: IpAddr,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<(), String> {
        use http_body_util::BodyExt;
        let Probe::Grpc { service, authority } = probe else {
            return Err("not a gRPC check".into());
        };
        let fut = async {
            let mut c = self.h2_connector.clone();
            let (target, name) = dial_target(&self.target, Some(ip)).map_err(|e| e.to_string())?;
            let io = c
                .dial(target, name)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake::<_, http_body_util::Full<Bytes>>(io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            let task = tokio::spawn(conn);
            let scheme = if self.target.scheme() == Some(&http::uri::Scheme::HTTPS) {
                "https"
            } else {
                "http"
            };
            let auth = match authority {
                Some(a) => a.clone(),
                None => self
                    .target
                    .authority()
                    .map_or_else(String::new, |a| a.to_string()),
            };
            let req = Request::post(format!("{scheme}://{auth}/grpc.health.v1.Health/Check"))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .header(http::header::USER_AGENT, "legate-health-check")
                .body(http_body_util::Full::new(grpc_check_request(service)))
                .map_err(|e| format!("request: {e}"))?;
            let result = async {
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("status {}", resp.status().as_u16()));
                }
                let head_status = resp.headers().get("grpc-status").cloned();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?;
                let status = body
                    .trailers()
                    .and_then(|t| t.get("grpc-status").cloned())
                    .or(head_status);
                if status.as_ref().is_some_and(|s| s != "0") {
                    return Err(format!(
                        "grpc-status {}",
                        status.as_ref().and_then(|s| s.to_str().ok()).unwrap_or("?")
                    ));
                }
                match grpc_serving_status(&body.to_bytes()) {
                    Some(1) => Ok(()),
                    Some(s) => Err(format!("serving status {s}")),
                    None => Err("not a HealthCheckResponse".into()),
                }
            }
            .await;
            task.abort();
            result
        };
        within(timeout, fut).await
    }

    /// Send `req` (origin-form URI) on an idle connection, or a new one; a request that a stale
    /// idle connection refused before sending is retried once on a fresh connection.
    /// `addr` pins the upstream address (a load balancer's pick); `None`: any address. `peer`
    /// receives the address of the connection the request was sent on.
    pub async fn send_to(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        mut req: Request<ReqBody>,
        breaker: &Breaker,
        peer: &mut Option<SocketAddr>,
    ) -> Result<Response<PooledBody>, ProxyError> {
        loop {
            let (mut sender, reused) = self.sender(addr, breaker).await?;
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

/// The URI to dial for `addr` (the service's own `target` for `None`) and the TLS name to
/// expect (the service's host, when a balancer picked an address of an `https` upstream).
pub(super) fn dial_target(
    target: &Uri,
    addr: Option<IpAddr>,
) -> Result<(Uri, Option<&str>), ProxyError> {
    let Some(ip) = addr else {
        return Ok((target.clone(), None));
    };
    let https = target.scheme() == Some(&http::uri::Scheme::HTTPS);
    let port = target.port_u16().unwrap_or(if https { 443 } else { 80 });
    let sa = std::net::SocketAddr::new(ip, port);
    let scheme = if https { "https" } else { "http" };
    let uri = format!("{scheme}://{sa}/")
        .parse()
        .map_err(|_| ProxyError::Internal("balanced address".into()))?;
    Ok((uri, https.then(|| target.host().unwrap_or(""))))
}

/// A probe's outcome, or a failure when it takes longer than `timeout`.
async fn within(
    timeout: Duration,
    probe: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// A `grpc.health.v1.HealthCheckRequest { service }`, length-prefixed as a gRPC message.
fn grpc_check_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        // Field 1, length-delimited.
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

/// The `status` (field 1) of a length-prefixed `HealthCheckResponse`; 0 when absent (UNKNOWN).
fn grpc_serving_status(b: &[u8]) -> Option<u64> {
    let len = u32::from_be_bytes(b.get(1..5)?.try_into().ok()?) as usize;
    let mut msg = b.get(5..5 + len)?;
    let mut status = 0;
    while let Some((&tag, rest)) = msg.split_first() {
        let (v, rest) = varint(rest)?;
        match tag {
            0x08 => {
                status = v;
                msg = rest;
            }
            // Length-delimited fields are skipped.
            t if t & 7 == 2 => msg = rest.get(v as usize..)?,
            t if t & 7 == 0 => msg = rest,
            _ => return None,
        }
    }
    Some(status)
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
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
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
        Poll::Ready(r.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages() {
        assert_eq!(&grpc_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &grpc_check_request("a")[..],
            &[0, 0, 0, 0, 3, 0x0a, 1, b'a']
        );
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(grpc_serving_status(&[0, 0]), None);
    }
}
