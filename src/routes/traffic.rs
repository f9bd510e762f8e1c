//! Traffic policy of a forwarding route: when to retry and how much concurrent work its upstream
//! may take. Plain validated values; the proxy (`proxy::upstream::retry`,
//! `proxy::upstream::breaker`) acts on them.

use std::time::Duration;

/// Envoy's defaults for `circuit_breakers`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
pub const DEFAULT_MAX_PENDING: u32 = 1024;
pub const DEFAULT_MAX_REQUESTS: u32 = 1024;
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Emissary's `retry_policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// Timeout of one attempt; the route timeout still bounds them all.
    pub per_try_timeout: Option<Duration>,
}

/// Which failures a retry follows (Envoy's `retry_on` values Emissary exposes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// Any 5xx answer, a connect failure, a reset or a per-try timeout.
    FiveXx,
    /// 502, 503 or 504, a connect failure, a reset or a per-try timeout.
    GatewayError,
    /// The connection could not be made.
    ConnectFailure,
    /// 409 Conflict.
    Retriable4xx,
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM).
    RefusedStream,
    /// The codes the client lists in `x-envoy-retriable-status-codes`.
    RetriableStatusCodes,
    /// The upstream closed or reset the connection before answering.
    Reset,
}

impl RetryOn {
    pub fn parse(s: &str) -> Option<RetryOn> {
        Some(match s {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "connect-failure" => RetryOn::ConnectFailure,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "reset" => RetryOn::Reset,
            _ => return None,
        })
    }
}

/// Emissary's `circuit_breakers` (the `default` priority): limits per upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BreakerLimits {
    /// Open upstream connections, idle or busy (HTTP/1.1 and HTTP/2 alike).
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

impl Default for BreakerLimits {
    fn default() -> Self {
        BreakerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_requests: DEFAULT_MAX_PENDING,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

/// Emissary's `cors` on a Mapping.
#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: Vec<OriginMatch>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub exposed_headers: Vec<String>,
    pub credentials: bool,
    /// Seconds a preflight answer may be cached.
    pub max_age: Option<u64>,
}

/// One allowed origin.
#[derive(Debug, Clone)]
pub enum OriginMatch {
    /// `*`.
    Any,
    Exact(String),
    /// Anchored: the whole origin must match.
    Regex(regex::Regex),
}

impl Cors {
    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| match o {
            OriginMatch::Any => true,
            OriginMatch::Exact(e) => e == origin,
            OriginMatch::Regex(r) => r.is_match(origin),
        })
    }
}

/// Emissary's `load_balancer`: how a request picks one of its upstream's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    pub policy: LbPolicy,
    /// What ring_hash and maglev hash; `None`: a random address.
    pub key: Option<HashKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    RingHash,
    Maglev,
}

/// The request fact a hashing balancer keys on (sticky sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (lowercase name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    SourceIp,
}

/// Envoy's defaults for `outlier_detection`.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// `outlier_detection`: passive ejection of addresses that keep failing (Envoy's semantics).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures and resets) that eject an address; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 answers (or connect failures and resets); 0: off.
    pub consecutive_gateway_failure: u32,
    /// How often an address's ejection count decays by one while it behaves.
    pub interval: Duration,
    /// Ejection time is this times the number of times the address was ejected.
    pub base_ejection_time: Duration,
    /// Share of addresses that may be ejected at once (at least one of two or more).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: DEFAULT_CONSECUTIVE_5XX,
            consecutive_gateway_failure: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: DEFAULT_BASE_EJECTION,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// One entry of `health_checks`: an active probe of every upstream address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that take an address out of rotation.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that bring it back.
    pub healthy_threshold: u32,
    pub probe: Probe,
}

/// What a health check asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    Http {
        path: String,
        /// Host header; default: the upstream's host name.
        hostname: Option<String>,
        add_headers: Vec<(String, String)>,
        remove_headers: Vec<String>,
        /// Inclusive status ranges that pass (default 200-299).
        expected: Vec<(u16, u16)>,
    },
    /// `grpc.health.v1.Health/Check` over HTTP/2.
    Grpc {
        service: String,
        authority: Option<String>,
    },
}
