//! What the request path tells metrics and the access log about one exchange.
//!
//! The request layer fills an [`Exchange`] as it learns things (the route, the trace id, the
//! attempts) and hands it to the [`Observer`] once the response head is known. Nothing here
//! allocates for metrics: the route's counters were resolved when the snapshot was built.
//!
//! A leaf below the request layer: it reads the snapshot a request was served on through
//! [`View`], never the request layer's types. `accesslog` writes the JSON lines; `trace` reads
//! and writes W3C trace context.

pub mod accesslog;
pub mod spans;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use http::{Request, Response};

use accesslog::{Counted, Line, Logger};
use spans::{AttemptTrace, Recording};
use trace::{Context, TraceId};

use crate::metrics::{method_class, Metrics, RouteStats};
use crate::proxy::body::RespBody;
use crate::proxy::respond::ProxyError;
use crate::reconcile::{Evidence, Observed};

/// What observing reads of the revision a request was served on (the request layer's snapshot).
pub(crate) trait View: Send + Sync + 'static {
    /// The `x-legate-revision` value.
    fn revision(&self) -> &http::HeaderValue;
    /// The upstream authority of route `route`, when it forwards.
    fn upstream(&self, route: usize) -> Option<&str>;
    /// `(namespace, name)` of route `route`.
    fn route_name(&self, route: usize) -> Option<(&str, &str)>;
    /// The request counters of route `route`.
    fn stats(&self, route: usize) -> Option<&Arc<RouteStats>>;
    /// Where answered requests are counted for the revision's verification window.
    fn evidence(&self) -> &Evidence;
    /// The path route `route` matches (its prefix, exact path or regex), for `http.route`.
    fn route_path(&self, _route: usize) -> Option<&str> {
        None
    }
    /// The revision's TracingService settings.
    fn tracing(&self) -> Option<&crate::routes::settings::Tracing> {
        None
    }
    /// Share of new traces sampled (none unless the revision says).
    fn sample_ratio(&self) -> f64 {
        0.0
    }
}

/// Where answered requests go: the per-route metrics and the access log.
pub(crate) struct Observer {
    pub metrics: Arc<Metrics>,
    /// The access log with the metrics, when the log is on.
    pub logger: Option<Arc<Logger>>,
    /// Count every request in the per-route metrics (`Settings::metrics`).
    pub count: bool,
    /// The span exporter, when spans may be exported (`Settings::otlp`).
    pub otlp: Option<crate::otlp::Exporter>,
}

/// Facts about one request, filled in along the request path.
pub(crate) struct Exchange {
    start: Instant,
    method: usize,
    /// The access log line being built, when the access log is on.
    line: Option<Line>,
    /// Index of the route that served it (`RouteId.0`), if any matched.
    pub route: Option<usize>,
    /// The `x-request-id` the gateway generated (a client's own is read from the request).
    pub request_id: Option<http::HeaderValue>,
    /// The trace id sent upstream (the client's, or a new trace's).
    pub trace_id: Option<TraceId>,
    /// This hop of the request's trace (continued from the client, or new).
    pub trace: Context,
    /// The server span being recorded, when the trace is sampled and spans are exported.
    recording: Option<Box<Recording>>,
    pub attempts: Attempts,
    /// Set when the gateway answered with an error instead of an upstream response: whether
    /// that error counts against the revision (see [`ProxyError::counts_against_revision`]).
    failure: Option<bool>,
}

/// What the attempts of one forwarded request came to.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    /// Retries made (attempts after the first).
    pub retries: u32,
    /// The upstream address the last attempt was sent to, once it had a connection.
    pub peer: Option<SocketAddr>,
    /// The client spans of the attempts, when the request is being recorded.
    pub trace: Option<Box<AttemptTrace>>,
}

impl Exchange {
    /// Begin observing a request (before it is consumed).
    pub fn start<B, V: View>(
        req: &Request<B>,
        snap: &Arc<V>,
        observer: &Observer,
        client: SocketAddr,
    ) -> Exchange {
        let start = Instant::now();
        let log = observer.logger.is_some();
        let trace = Context::read(req.headers(), snap.sample_ratio());
        let (recording, attempt_trace) =
            match spans::start(req, &**snap, &trace, observer.otlp.as_ref(), client) {
                Some((r, a)) => (Some(r), Some(a)),
                None => (None, None),
            };
        Exchange {
            start,
            method: method_class(req.method()),
            line: log.then(|| Line::start(req, snap, start, client)),
            route: None,
            request_id: None,
            trace_id: None,
            trace,
            recording,
            attempts: Attempts {
                trace: attempt_trace,
                ..Attempts::default()
            },
            failure: None,
        }
    }

    /// The gateway answers with `e` instead of an upstream response.
    pub fn failed(&mut self, e: &ProxyError) {
        self.failure = Some(e.counts_against_revision());
        if let Some(line) = &mut self.line {
            line.failure = Some(e.to_string());
        }
    }

    /// How this exchange counts in its revision's verification window.
    fn evidence(&self, status: http::StatusCode) -> Observed {
        match self.failure {
            Some(true) => Observed::UpstreamFailure,
            // A client error or a policy's answer (an AuthService's relayed 5xx too).
            Some(false) => Observed::NotCounted,
            None if status.is_server_error() => Observed::Upstream5xx,
            None => Observed::Fine,
        }
    }
}

impl Observer {
    /// Count the answered request and, with the access log on, wrap the body so the line is
    /// written when the body ends.
    pub(crate) fn finish(
        &self,
        snap: &dyn View,
        mut ex: Exchange,
        mut resp: Response<RespBody>,
    ) -> Response<RespBody> {
        if let (Some(rec), Some(attempts)) = (ex.recording.take(), ex.attempts.trace.take()) {
            spans::finish(snap, *rec, *attempts, ex.route, resp.status());
        }
        if let Some(route) = ex.route {
            snap.evidence().record(route, ex.evidence(resp.status()));
        }
        if self.count {
            let stats = ex
                .route
                .and_then(|i| snap.stats(i))
                .unwrap_or(self.metrics.no_route());
            stats.record(ex.method, resp.status(), ex.start.elapsed());
        }
        match (&self.logger, ex.line) {
            (Some(logger), Some(mut line)) => {
                line.route = ex.route;
                line.attempts = ex.attempts;
                line.request_id = ex.request_id;
                if line.request_id.is_none() && !line.has_client_id() {
                    // Not forwarded (404, a policy's refusal, an early failure): the line still
                    // gets an id, and the client sees it to quote.
                    let id = crate::proxy::headers::new_request_id();
                    resp.headers_mut()
                        .insert(crate::proxy::headers::X_REQUEST_ID.clone(), id.clone());
                    line.request_id = Some(id);
                }
                if ex.trace_id.is_some() {
                    line.trace_id = ex.trace_id;
                }
                let status = resp.status().as_u16();
                resp.map(|b| RespBody::Dyn(Box::new(Counted::new(b, line, status, logger.clone()))))
            }
            _ => resp,
        }
    }
}

/// Count a failure the gateway answered itself, on the route it was for (`none` before one
/// matched).
pub(crate) fn count_error(m: &Metrics, snap: &dyn View, route: Option<usize>, e: &ProxyError) {
    let stats = route.and_then(|i| snap.stats(i)).unwrap_or(m.no_route());
    match e {
        ProxyError::Connect(_) => stats.connect_failure(),
        ProxyError::Timeout => stats.timeout(),
        _ => {}
    }
    if e.status().is_server_error() {
        stats.gateway_5xx();
    }
}
