//! The upstream layer: everything between a prepared route and an upstream response.
//!
//! - `connect`: the one place that dials (TCP, TLS origination, name resolution);
//! - `pool`: HTTP/1.1 connections per upstream, dialled through a `connect::Connector`;
//! - `h2`: HTTP/2 connections, one multiplexed connection per address, dialled the same way;
//! - `balance` and `health`: which address a request goes to (load balancer, outlier
//!   detection, active health checks);
//! - `breaker`: circuit-breaker slots (`max_connections`, pending, requests, retries);
//! - `retry`: the attempts of one request, with the route timeout.
//!
//! [`Clients`] keeps the HTTP/1.1 and HTTP/2 pools across graph swaps, so a swap never drops warm
//! connections; [`Target`] is what a prepared route knows of its upstream. Must not know the
//! request layer (routes, policies, header edits) nor the listener.

pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod checks;
pub(crate) mod connect;
pub(crate) mod h2;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod retry;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderValue, Uri};

use crate::proxy::respond::SetupError;
use crate::routes::OriginTls;
use balance::Balancer;
use breaker::Breaker;
use connect::{Connectors, Origin, Resolver};
use h2::H2Pool;
use pool::HostPool;

/// How a route reaches its upstream.
#[derive(Clone)]
pub(crate) enum UpstreamClient {
    /// HTTP/1.1: Legate's own pool for this upstream.
    H1(Arc<HostPool>),
    /// HTTP/2 (`grpc`, `h2c`): one multiplexed connection per address.
    H2(Arc<H2Pool>),
}

/// What a prepared route knows of its upstream: where it is, how to reach it, and the
/// limits of the exchange (timeout, retries, breaker, balancer).
#[derive(Clone)]
pub(crate) struct Target {
    pub scheme: UriScheme,
    pub authority: Authority,
    pub upstream: UpstreamClient,
    pub http2: bool,
    /// Host header sent upstream (`host_rewrite`, or the upstream with `auto_host_rewrite`).
    pub host_header: Option<HeaderValue>,
    /// Route timeout over the whole response (Envoy's route timeout); `None`: `timeout_ms: 0`.
    pub timeout: Option<Duration>,
    /// How long an upgraded tunnel may pass no bytes either way, and a response body may send
    /// no data, before it is closed (the Mapping's `idle_timeout_ms`).
    pub tunnel_idle: Duration,
    pub retry: Option<crate::routes::RetryPolicy>,
    pub breaker: Arc<Breaker>,
    /// The route label's counters, for retries and circuit-breaker refusals.
    pub stats: Arc<crate::metrics::RouteStats>,
    /// Picks the upstream address per request (`load_balancer`, outlier detection, health
    /// checks), for HTTP/1.1 and HTTP/2 upstreams alike.
    pub balancer: Option<Arc<Balancer>>,
    /// The pool and balancer health checks of this upstream dial through, when it has checks.
    pub checked: Option<(Arc<HostPool>, Arc<Balancer>)>,
}

const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Upstream URL, connect timeout, upstream idle timeout, TLSContext origination.
type PoolKey = (String, Duration, Option<Duration>, Option<OriginTls>);

/// The client registry: the HTTP/1.1 and HTTP/2 pools of every upstream, kept across graph
/// swaps.
pub struct Clients {
    connectors: Connectors,
    pools: Mutex<HashMap<PoolKey, Arc<HostPool>>>,
    h2: Mutex<HashMap<PoolKey, Arc<H2Pool>>>,
}

impl Clients {
    pub fn new(extra_ca: Option<&Path>, resolver: Resolver) -> Result<Clients, SetupError> {
        Ok(Clients {
            connectors: Connectors::new(extra_ca, resolver)?,
            pools: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        })
    }

    /// The caching resolver every connector uses.
    pub fn resolver(&self) -> &Resolver {
        self.connectors.resolver()
    }

    /// The shared HTTP/1.1 pool of this upstream, kept across graph swaps.
    pub fn pool(
        &self,
        up: &crate::routes::Upstream,
        connect_timeout: Duration,
        idle: Option<Duration>,
        origin: Option<&Origin>,
    ) -> Arc<HostPool> {
        let key = (
            up.to_string(),
            connect_timeout,
            idle,
            origin.map(|o| o.spec.clone()),
        );
        shared(&self.pools, key, |target| {
            HostPool::new(
                target,
                self.connectors.connector(false, connect_timeout, origin),
                self.connectors.connector(true, connect_timeout, origin),
                idle.unwrap_or(POOL_IDLE_TIMEOUT),
            )
        })
    }

    /// The shared HTTP/2 connections of this upstream (one per address), kept across graph
    /// swaps.
    pub fn h2_pool(
        &self,
        up: &crate::routes::Upstream,
        connect_timeout: Duration,
        idle: Option<Duration>,
        origin: Option<&Origin>,
    ) -> Arc<H2Pool> {
        let key = (
            up.to_string(),
            connect_timeout,
            idle,
            origin.map(|o| o.spec.clone()),
        );
        shared(&self.h2, key, |target| {
            H2Pool::new(
                target,
                self.connectors.connector(true, connect_timeout, origin),
                idle.unwrap_or(POOL_IDLE_TIMEOUT),
            )
        })
    }

    /// Drop the pools no prepared route holds any more (their idle sockets close with them).
    /// A pool an older snapshot still holds (a request in flight) goes at a later swap.
    pub fn prune(&self) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, p| Arc::strong_count(p) > 1);
        drop(pools);
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, p| Arc::strong_count(p) > 1);
    }

    /// Upstream pools held now (tests: none outlive the graphs that use them).
    pub fn pool_count(&self) -> usize {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.h2.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The pool of `key` in `pools`, made (from the URI it dials) when there is none yet.
fn shared<P>(
    pools: &Mutex<HashMap<PoolKey, Arc<P>>>,
    key: PoolKey,
    make: impl FnOnce(Uri) -> P,
) -> Arc<P> {
    let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
    pools
        .entry(key)
        .or_insert_with_key(|(target, ..)| {
            // A compiled upstream always parses.
            let uri = target
                .parse()
                .unwrap_or_else(|_| Uri::from_static("http://invalid.invalid"));
            Arc::new(make(uri))
        })
        .clone()
}
