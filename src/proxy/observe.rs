//! What the request path tells metrics and the access log about one exchange.
//!
//! `serve` fills an [`Exchange`] as it learns things (the route, the upstream); `handle` hands it
//! to the counters once the response head is known. Nothing here allocates for metrics: the
//! route's counters were resolved when the snapshot was built.

use std::time::Duration;

use http::uri::Authority;
use http::StatusCode;

use super::error::ProxyError;
use super::Snapshot;
use crate::metrics::Metrics;

/// Facts about one request, filled in along the request path.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    /// Index of the route that served it (`RouteId.0`), if any matched.
    pub route: Option<usize>,
    /// The upstream it was forwarded to.
    pub upstream: Option<Authority>,
    /// The `x-request-id` the gateway generated (a client's own is read from the request).
    pub request_id: Option<http::HeaderValue>,
}

/// Count a failure the gateway answered itself.
pub(crate) fn count_error(m: &Metrics, e: &ProxyError) {
    match e {
        ProxyError::Connect(_) => m.connect_failure(),
        ProxyError::Timeout => m.timeout(),
        _ => {}
    }
    if e.status().is_server_error() {
        m.gateway_5xx();
    }
}

/// Count an answered request against its route's (or the no-route) counters.
pub(crate) fn record(
    m: &Metrics,
    snap: &Snapshot,
    ex: &Exchange,
    method: usize,
    status: StatusCode,
    took: Duration,
) {
    let stats = ex
        .route
        .and_then(|i| snap.stats.get(i))
        .unwrap_or(m.no_route());
    stats.record(method, status, took);
}
