//! The upstream layer: everything between a prepared route and an upstream response.
//!
//! - `connect`: the one place that dials (TCP, TLS origination, name resolution);
//! - `pool`: HTTP/1.1 connections per upstream, dialled through a `connect::Connector`;
//! - `balance` and `health`: which address a request goes to (load balancer, outlier
//!   detection, active health checks);
//! - `breaker`: circuit-breaker slots (`max_connections`, pending, requests, retries);
//! - `retry`: the attempts of one request, with the route timeout.
//!
//! [`Clients`] keeps the pools and HTTP/2 clients across graph swaps, so a swap never drops warm
//! connections; [`Target`] is what a prepared route knows of its upstream. Must not know the
//! request layer (routes, policies, header edits) nor the listener.

pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod checks;
pub(crate) mod connect;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod retry;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderValue, Uri};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::proxy::body::ReqBody;
use crate::proxy::respond::SetupError;
use crate::routes::OriginTls;
use balance::Balancer;
use breaker::Breaker;
use connect::{Connector, Connectors, Origin, Resolver};
use pool::HostPool;

/// How a route reaches its upstream.
#[derive(Clone)]
pub(crate) enum UpstreamClient {
    /// HTTP/1.1: Legate's own pool for this upstream.
    H1(Arc<HostPool>),
    /// HTTP/2 (`grpc`): hyper-util's client, one multiplexed connection.
    H2(Box<Client>),
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
    /// checks), for HTTP/1.1 upstreams.
    pub balancer: Option<Arc<Balancer>>,
    /// The pool and balancer health checks of this upstream dial through, when it has checks.
    pub checked: Option<(Arc<HostPool>, Arc<Balancer>)>,
}

/// The client type every route uses.
pub type Client = hyper_util::client::legacy::Client<Connector, ReqBody>;

/// Upstream idle connections kept per host.
const POOL_MAX_IDLE_PER_HOST: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/2?, connect timeout, upstream idle timeout, TLSContext origination, the upstream every
/// request dials.
type ClientKey = (
    bool,
    Duration,
    Option<Duration>,
    Option<OriginTls>,
    Option<String>,
);

/// Upstream URL, connect timeout, upstream idle timeout, TLSContext origination.
type PoolKey = (String, Duration, Option<Duration>, Option<OriginTls>);

/// The client registry: HTTP/1.1 pools and HTTP/2 clients, kept across graph swaps.
pub struct Clients {
    connectors: Connectors,
    made: Mutex<HashMap<ClientKey, Client>>,
    pools: Mutex<HashMap<PoolKey, Arc<HostPool>>>,
}

impl Clients {
    pub fn new(extra_ca: Option<&Path>, resolver: Resolver) -> Result<Clients, SetupError> {
        Ok(Clients {
            connectors: Connectors::new(extra_ca, resolver)?,
            made: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
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
        let target = up.to_string();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry((
                target.clone(),
                connect_timeout,
                idle,
                origin.map(|o| o.spec.clone()),
            ))
            .or_insert_with(|| {
                let uri: Uri = target
                    .parse()
                    .unwrap_or_else(|_| Uri::from_static("http://invalid.invalid"));
                Arc::new(HostPool::new(
                    uri,
                    self.connectors.connector(false, connect_timeout, origin),
                    self.connectors.connector(true, connect_timeout, origin),
                    idle.unwrap_or(POOL_IDLE_TIMEOUT),
                ))
            })
            .clone()
    }

    /// Drop the pools no prepared route holds any more (their idle sockets close with them).
    /// A pool an older snapshot still holds (a request in flight) goes at a later swap.
    pub fn prune(&self) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, p| Arc::strong_count(p) > 1);
    }

    /// Upstream pools held now (tests: none outlive the graphs that use them).
    pub fn pool_count(&self) -> usize {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The shared client for this protocol, connect timeout and upstream idle timeout; with
    /// `upstream`, every request dials it whatever authority its URI carries (an HTTP/2
    /// upstream receives the client's authority as `:authority`).
    pub fn get(
        &self,
        http2: bool,
        connect_timeout: Duration,
        idle: Option<Duration>,
        origin: Option<&Origin>,
        upstream: Option<&crate::routes::Upstream>,
    ) -> Client {
        let target = upstream.map(|u| u.to_string());
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        made.entry((
            http2,
            connect_timeout,
            idle,
            origin.map(|o| o.spec.clone()),
            target.clone(),
        ))
        .or_insert_with(|| {
            let fixed = target.and_then(|t| t.parse::<Uri>().ok());
            let connector = self
                .connectors
                .connector_to(http2, connect_timeout, origin, fixed);
            let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(idle.unwrap_or(POOL_IDLE_TIMEOUT))
                .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
                // The Host header is set by the proxy (client's, or rewritten).
                .set_host(false)
                .http2_only(http2);
            b.build(connector)
        })
        .clone()
    }
}
