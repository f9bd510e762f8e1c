//! What a request reads: the [`Snapshot`] of one graph (built once per graph by `prepare`) and
//! each forwarding route's [`Prepared`] form (header names and values parsed, upstream
//! reachable).

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use crate::metrics::RouteStats;
use crate::proxy::headers::HeaderOp;
use crate::proxy::observe::View;
use crate::proxy::upstream::Target;
use crate::reconcile::Evidence;
use crate::routes::Graph;
use crate::tls::CertTable;

/// Everything a request reads, built once per graph (or per certificate change).
pub(crate) struct Snapshot {
    pub graph: Arc<Graph>,
    /// Indexed by `RouteId`; `None` for redirects.
    pub routes: Vec<Option<Prepared>>,
    pub certs: CertTable,
    /// `x-legate-revision` value and the access log's `revision`: the revision id the
    /// reconciler shows (commit id, or content id), or the graph hash for a bare swap.
    pub revision: HeaderValue,
    /// Where each answered request is counted for the revision's verification window.
    pub evidence: Arc<Evidence>,
    /// Request counters per route, indexed by `RouteId` (resolved here, not per request).
    pub stats: Vec<Arc<RouteStats>>,
    /// Share of new traces marked sampled (the flag, else the TracingService, else a default).
    pub sample_ratio: f64,
}

/// A `Forward` route with its header names, values and upstream pre-parsed.
#[derive(Clone)]
pub(crate) struct Prepared {
    /// The upstream and the limits of the exchange with it.
    pub target: Target,
    pub add_request: Vec<HeaderOp>,
    pub remove_request: Vec<HeaderName>,
    pub add_response: Vec<HeaderOp>,
    pub remove_response: Vec<HeaderName>,
    /// Upgrade protocols allowed (lowercase), e.g. `websocket`.
    pub allow_upgrade: Vec<String>,
    /// `namespace/name`, for `x-legate-route`.
    pub label: HeaderValue,
    /// The route's share of the edge-policy state (JWKS keys, token buckets, Redis).
    pub guard: crate::guard::RouteState,
    pub cors: Option<Arc<super::cors::Policy>>,
}

impl View for Snapshot {
    fn revision(&self) -> &HeaderValue {
        &self.revision
    }

    fn upstream(&self, route: usize) -> Option<&str> {
        let prep = self.routes.get(route)?.as_ref()?;
        Some(prep.target.authority.as_str())
    }

    fn route_name(&self, route: usize) -> Option<(&str, &str)> {
        let r = self.graph.routes.get(route)?;
        Some((&r.namespace, &r.name))
    }

    fn stats(&self, route: usize) -> Option<&Arc<RouteStats>> {
        self.stats.get(route)
    }

    fn evidence(&self) -> &Evidence {
        &self.evidence
    }

    fn route_path(&self, route: usize) -> Option<&str> {
        Some(self.graph.routes.get(route)?.matcher.path.as_str())
    }

    fn tracing(&self) -> Option<&crate::routes::settings::Tracing> {
        self.graph.settings.tracing.as_ref()
    }

    fn sample_ratio(&self) -> f64 {
        self.sample_ratio
    }
}
