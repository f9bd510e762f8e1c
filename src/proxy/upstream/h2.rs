//! HTTP/2 upstreams (`grpc: true`, `h2c://`): one multiplexed connection per upstream address,
//! dialled through a `connect::Connector` offering `h2` by ALPN. The balancer picks the address
//! per request, as for HTTP/1.1, so `load_balancer`, outlier ejection and health checks work per
//! address; without a balancer every request shares one connection to the resolver's pick.
//!
//! Every connection holds a slot of the route's circuit breaker (`max_connections`) from dial to
//! close, as an HTTP/1.1 connection does (Envoy counts HTTP/2 connections the same way). A request
//! that needs a new connection and finds no free slot closes a connection to another address that
//! carries no request, then waits as a pending request (`max_pending_requests`). A connection that
//! carried no request for the idle timeout is closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::breaker::Breaker;
use super::connect::Connector;
use super::pool::dial_target;
use crate::proxy::body::{BoxError, ReqBody, RespBody};
use crate::proxy::respond::ProxyError;
use crate::proxy::tunnel::LastSeen;

/// The HTTP/2 connections of one upstream (scheme + authority + connect settings).
pub struct H2Pool {
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    connector: Connector,
    idle_timeout: Duration,
    /// The connection of each address (`None`: the resolver's pick), dialled by the first
    /// request that needs it.
    conns: Mutex<HashMap<Option<IpAddr>, Arc<Slot>>>,
    /// Woken when a connection carries no request any more (requests waiting for a breaker
    /// slot look for one to close).
    unused: Arc<Notify>,
}

/// Where one address's connection lives; the async lock makes concurrent requests wait for one
/// dial instead of dialling each.
#[derive(Default)]
struct Slot(tokio::sync::Mutex<Option<Mux>>);

/// One multiplexed connection.
#[derive(Clone)]
struct Mux {
    tx: SendRequest<ReqBody>,
    peer: Option<SocketAddr>,
    usage: Arc<Usage>,
}

/// Requests in flight on a connection, and when the last one ended (for the idle timeout).
struct Usage {
    inflight: AtomicUsize,
    seen: LastSeen,
    unused: Arc<Notify>,
}

impl Usage {
    /// `None` when the connection carried no request for `idle`; else when to look again.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return Some(Instant::now() + idle);
        }
        self.seen.idle_deadline(idle)
    }
}

/// One request on a connection, in flight until its response body is dropped.
struct InFlight(Arc<Usage>);

impl InFlight {
    fn start(usage: &Arc<Usage>) -> InFlight {
        usage.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(usage.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.seen.touch();
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.unused.notify_waiters();
        }
    }
}

/// An upstream response body; its request stops counting as in flight when the body ends (or
/// is dropped), so the connection can be closed as unused before the client reads the end.
struct Tracked {
    inner: Incoming,
    flight: Option<InFlight>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if r.is_none() || self.inner.is_end_stream() {
            self.flight = None;
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

impl H2Pool {
    pub fn new(target: Uri, connector: Connector, idle_timeout: Duration) -> H2Pool {
        H2Pool {
            target,
            connector,
            idle_timeout,
            conns: Mutex::new(HashMap::new()),
            unused: Arc::new(Notify::new()),
        }
    }

    /// Send `req` (absolute-form URI) on the connection to `addr` (a load balancer's pick;
    /// `None`: any address), dialling it first when there is none. A request the connection
    /// refused before sending it (closed meanwhile) goes once more on a fresh connection.
    /// `peer` receives the address of the connection the request was sent on.
    pub async fn send_to(
        &self,
        addr: Option<IpAddr>,
        mut req: Request<ReqBody>,
        breaker: &Breaker,
        peer: &mut Option<SocketAddr>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let mut fresh = false;
        loop {
            let (mut mux, dialled) = self.connection(addr, breaker).await?;
            fresh |= dialled;
            *peer = mux.peer;
            if mux.tx.ready().await.is_err() {
                if !fresh {
                    fresh = true;
                    continue;
                }
                return Err(ProxyError::Connect("connection closed before use".into()));
            }
            let flight = InFlight::start(&mux.usage);
            match mux.tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|inner| {
                        let flight = (!inner.is_end_stream()).then_some(flight);
                        RespBody::Dyn(Box::new(Tracked { inner, flight }))
                    }))
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => {
                        fresh = true;
                        req = r;
                    }
                    _ => return Err(ProxyError::from_hyper(e.into_error())),
                },
            }
        }
    }

    /// The open connection to `addr`, or a new one within the breaker's `max_connections`;
    /// `true` when it was dialled for this call.
    async fn connection(
        &self,
        addr: Option<IpAddr>,
        breaker: &Breaker,
    ) -> Result<(Mux, bool), ProxyError> {
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.entry(addr).or_default().clone()
        };
        let mut cur = match slot.0.try_lock() {
            Ok(cur) => cur,
            Err(_) => {
                // Another request is dialling this address, or waiting for a slot to: this one
                // waits for that connection as a pending request (Envoy counts it so too).
                let _pending = breaker.pending()?;
                slot.0.lock().await
            }
        };
        if let Some(m) = cur.as_ref().filter(|m| !m.tx.is_closed()) {
            return Ok((m.clone(), false));
        }
        *cur = None;
        let permit = loop {
            let unused = self.unused.notified();
            tokio::pin!(unused);
            // Registered before looking, so a request ending in between is not missed.
            unused.as_mut().enable();
            if let Some(p) = breaker.try_connection() {
                break p;
            }
            // At the limit: a connection to another address that carries no request gives its
            // slot back when it closes.
            self.close_unused(addr);
            let _pending = breaker.pending()?;
            tokio::select! {
                p = breaker.wait_connection() => break p?,
                _ = &mut unused => continue,
            }
        };
        let m = self.dial(addr, permit).await?;
        *cur = Some(m.clone());
        Ok((m, true))
    }

    /// Close one connection to an address other than `keep` that carries no request.
    fn close_unused(&self, keep: Option<IpAddr>) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for (a, slot) in conns.iter() {
            if *a == keep {
                continue;
            }
            // A slot being dialled or used right now is left alone.
            let Ok(mut cur) = slot.0.try_lock() else {
                continue;
            };
            if cur
                .as_ref()
                .is_some_and(|m| m.usage.inflight.load(Ordering::Acquire) == 0)
            {
                // The last handle: the connection closes, its task ends and frees the slot.
                *cur = None;
                return;
            }
        }
    }

    async fn dial(
        &self,
        addr: Option<IpAddr>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Mux, ProxyError> {
        let mut c = self.connector.clone();
        let (target, name) = dial_target(&self.target, addr)?;
        let io = c
            .dial(target, name)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let peer = io.peer();
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let usage = Arc::new(Usage {
            inflight: AtomicUsize::new(0),
            seen: LastSeen::new(),
            unused: self.unused.clone(),
        });
        let idle = self.idle_timeout;
        let watched = usage.clone();
        tokio::spawn(async move {
            // The breaker slot is held for as long as the connection is open.
            let _permit = permit;
            tokio::pin!(conn);
            let mut check = Box::pin(tokio::time::sleep(idle));
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "upstream h2 connection ended with an error");
                        }
                        return;
                    }
                    _ = &mut check => match watched.idle_deadline(idle) {
                        // Dropping the connection closes it.
                        None => return,
                        Some(at) => check.as_mut().reset(at),
                    }
                }
            }
        });
        Ok(Mux { tx, peer, usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_unused_after_the_idle_timeout_since_its_last_request() {
        let idle = Duration::from_secs(60);
        let usage = Arc::new(Usage {
            inflight: AtomicUsize::new(0),
            seen: LastSeen::new(),
            unused: Arc::new(Notify::new()),
        });
        // A request in flight keeps the connection however long it takes.
        let flight = InFlight::start(&usage);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(usage.idle_deadline(idle).is_some());
        let woken = usage.unused.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        drop(flight);
        // Its end wakes requests waiting for a connection to close.
        woken.await;
        tokio::time::advance(idle - Duration::from_millis(1)).await;
        assert!(usage.idle_deadline(idle).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            usage.idle_deadline(idle).is_none(),
            "idle for the whole timeout"
        );
    }
}
