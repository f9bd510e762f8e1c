//! The proxy: listeners, connections, and the per-request path from a request to an upstream
//! response or a local answer (redirect, 404, error).
//!
//! Owns: the one pointer to the current [`Snapshot`] (graph + what the request path derives from
//! it: parsed upstream authorities, header values, TLS certificates), the HTTP server (hyper 1,
//! HTTP/1.1 and h2/h2c), the pooled upstream clients, limits, and the mapping of every failure to
//! a response (`error`). Must not parse or compile configuration (that is `config`) nor match
//! routes itself (that is `routes`): it asks the graph and does what the route says. A request
//! reads the snapshot once at its start and finishes on it, so a swap never disturbs it.

pub mod accesslog;
mod balance;
mod body;
mod breaker;
mod client;
mod cors;
pub mod echo;
mod error;
pub mod fds;
mod handle;
mod head;
mod headers;
mod health;
mod module;
mod observe;
mod pool;
mod retry;
mod server;
mod shadow;
mod spans;
pub mod trace;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme as UriScheme};

use crate::routes::{Action, Graph, Scheme};
use crate::tls::{CertSource, CertTable, SecretStore};

pub use client::{Lookup, SystemLookup};
pub use error::{ProxyError, SetupError};
pub use head::valid_authority;
pub use server::{Listeners, Running};
pub use shadow::ShadowStats;

/// Limits applied to every downstream connection and request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sum of header name and value bytes of one request (431 above it).
    pub max_header_bytes: usize,
    /// Number of header fields of one request (431 above it).
    pub max_headers: usize,
    /// Length of the request target (path and query, plus authority in absolute form; 414).
    pub max_uri_bytes: usize,
    /// Request body size (413 above it); `None`: unlimited.
    pub max_body_bytes: Option<u64>,
    /// Time to receive a complete request head (and a TLS handshake); the connection is closed.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_h2_streams: u32,
    /// Open downstream connections over all listeners; more are refused (closed at accept).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_h2_streams: 100,
            max_connections: 10_000,
        }
    }
}

/// How the proxy behaves, independent of the route graph.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many proxies in front of Legate may have appended to `X-Forwarded-For`; 0 distrusts
    /// the client's header entirely.
    pub xff_trusted_hops: usize,
    /// Add `x-legate-route` and `x-legate-revision` to responses.
    pub debug_headers: bool,
    /// Not read any more: compiled Mappings carry their timeout (3000 ms unless `timeout_ms`
    /// says otherwise; `timeout_ms: 0` is none). Kept for `--default-timeout-ms`.
    pub default_timeout: Duration,
    /// Port written in insecure-redirect `Location`s (443 is omitted).
    pub https_redirect_port: u16,
    pub limits: Limits,
    /// Directory of Kubernetes-style mounted Secrets (`<name>/tls.crt`, `<name>/tls.key`).
    pub secrets_dir: Option<PathBuf>,
    /// Secret served when the SNI matches no Host with a certificate; `None`: handshake fails.
    pub default_cert: Option<String>,
    /// PEM bundle of CAs trusted for `https://` upstreams, in addition to the webpki roots.
    pub upstream_ca: Option<PathBuf>,
    /// How long resolved upstream addresses are used before a new lookup.
    pub dns_ttl: Duration,
    /// Name lookups for upstreams (default: the system resolver). Tests inject their own.
    pub lookup: Arc<dyn Lookup>,
    /// Where access log lines go; `None`: no access log.
    pub access_log: Option<accesslog::AccessLog>,
    /// Share of new traces (no incoming `traceparent`) marked sampled, 0.0..=1.0; `None`: the
    /// TracingService's `sampling.overall`, else 1 while spans are exported and 0 otherwise.
    pub trace_sample_ratio: Option<f64>,
    /// The OTLP span exporter (`legate run` always starts one; it records nothing until a
    /// target is set by `--otlp-endpoint` or a TracingService).
    pub otlp: Option<crate::otlp::Exporter>,
    /// Count every request in the per-route metrics (off: only rare events are counted).
    pub metrics: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            xff_trusted_hops: 0,
            debug_headers: false,
            default_timeout: Duration::from_millis(3000),
            https_redirect_port: 443,
            limits: Limits::default(),
            secrets_dir: None,
            default_cert: None,
            upstream_ca: None,
            dns_ttl: Duration::from_secs(30),
            lookup: Arc::new(client::SystemLookup),
            access_log: None,
            trace_sample_ratio: None,
            otlp: None,
            metrics: true,
        }
    }
}

impl crate::reconcile::GraphSink for Proxy {
    fn swap(&self, graph: Arc<Graph>) {
        Proxy::swap(self, graph)
    }

    fn serve(&self, graph: Arc<Graph>, revision: &str, evidence: Arc<crate::reconcile::Evidence>) {
        Proxy::swap_revision(self, graph, revision, evidence)
    }
}

impl crate::reconcile::UpstreamHealth for Proxy {
    fn unhealthy_upstreams(&self) -> Vec<String> {
        Proxy::unhealthy_upstreams(self)
    }
}

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
    pub evidence: Arc<crate::reconcile::Evidence>,
    /// Request counters per route, indexed by `RouteId` (resolved here, not per request).
    pub stats: Vec<Arc<crate::metrics::RouteStats>>,
    /// Share of new traces marked sampled (the flag, else the TracingService, else a default).
    pub sample_ratio: f64,
}

/// A header to add, parsed once.
#[derive(Debug, Clone)]
pub(crate) struct HeaderOp {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub append: bool,
    /// The value holds `%VARIABLE%`s substituted per request (see `headers::substitute`).
    pub template: bool,
}

/// A `Forward` route with its header names, values and upstream address pre-parsed.
pub(crate) struct Prepared {
    pub scheme: UriScheme,
    pub authority: Authority,
    pub upstream: UpstreamClient,
    pub http2: bool,
    /// Host header sent upstream (`host_rewrite`, or the upstream with `auto_host_rewrite`).
    pub host_header: Option<HeaderValue>,
    pub add_request: Vec<HeaderOp>,
    pub remove_request: Vec<HeaderName>,
    pub add_response: Vec<HeaderOp>,
    pub remove_response: Vec<HeaderName>,
    /// Route timeout over the whole response (Envoy's route timeout); `None`: `timeout_ms: 0`.
    pub timeout: Option<Duration>,
    /// Upgrade protocols allowed (lowercase), e.g. `websocket`.
    pub allow_upgrade: Vec<String>,
    /// How long an upgraded tunnel may pass no bytes either way, and a response body may send
    /// no data, before it is closed (the Mapping's `idle_timeout_ms`).
    pub tunnel_idle: Duration,
    /// `namespace/name`, for `x-legate-route`.
    pub label: HeaderValue,
    pub retry: Option<crate::routes::RetryPolicy>,
    pub breaker: Arc<breaker::Breaker>,
    /// The route's share of the edge-policy state (JWKS keys, token buckets, Redis).
    pub guard: crate::guard::RouteState,
    /// The route label's counters, for retries and circuit-breaker refusals.
    pub stats: Arc<crate::metrics::RouteStats>,
    pub cors: Option<Arc<cors::Policy>>,
    /// Picks the upstream address per request (`load_balancer`, outlier detection, health
    /// checks), for HTTP/1.1 upstreams.
    pub balancer: Option<Arc<balance::Balancer>>,
    /// The pool and balancer health checks of this upstream dial through, when it has checks.
    pub checked: Option<(Arc<pool::HostPool>, Arc<balance::Balancer>)>,
}

/// Idle limit of an upgraded tunnel whose Mapping sets no `idle_timeout_ms` (Envoy's default
/// `stream_idle_timeout`).
const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(300);

/// `load_balancer` of a route that has outlier detection or health checks but no policy.
const DEFAULT_LB: crate::routes::LoadBalancer = crate::routes::LoadBalancer {
    policy: crate::routes::LbPolicy::RoundRobin,
    key: None,
};

/// The health-check supervisor of one upstream health state, and the Mappings using it.
struct Checker {
    health: Arc<health::Health>,
    mappings: Vec<String>,
    pool: Arc<pool::HostPool>,
    balancer: Arc<balance::Balancer>,
    task: Option<tokio::task::AbortHandle>,
    /// The previous graph did not run these checks.
    new: bool,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let cur = self.checkers.get_mut().unwrap_or_else(|e| e.into_inner());
        for c in cur.iter() {
            if let Some(t) = &c.task {
                t.abort();
            }
        }
    }
}

/// How a route reaches its upstream.
#[derive(Clone)]
pub(crate) enum UpstreamClient {
    /// HTTP/1.1: Legate's own pool for this upstream.
    H1(Arc<pool::HostPool>),
    /// HTTP/2 (`grpc`): hyper-util's client, one multiplexed connection.
    H2(Box<client::Client>),
}

/// The gateway's request path and its current snapshot. Cheap to share: `Arc<Proxy>`.
pub struct Proxy {
    shared: Arc<ArcSwap<Snapshot>>,
    settings: Settings,
    secrets: SecretStore,
    clients: client::Clients,
    /// Serializes snapshot builds (swap and certificate refresh); readers never take it.
    writer: Mutex<()>,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    loaded: std::sync::atomic::AtomicBool,
    /// Gateway-made upstream failures (502/503/504), for the reconciler's verification window.
    gateway_errors: std::sync::atomic::AtomicU64,
    /// Requests under a reserved path prefix answered in-process (webhooks on the proxy
    /// listeners), set once at startup.
    local: std::sync::OnceLock<(String, Arc<dyn LocalService>)>,
    /// The ACME manager whose HTTP-01 tokens this listener answers, set once at startup.
    acme: std::sync::OnceLock<Arc<crate::tls::acme::Acme>>,
    breakers: breaker::Breakers,
    /// JWKS key sets, token buckets and Redis clients of the routes' edge policies.
    guards: crate::guard::Registry,
    health: health::Registry,
    /// The health-check supervisors of the live graph's upstreams, by health state.
    checkers: Mutex<Vec<Checker>>,
    shadows: shadow::Shadows,
    metrics: Arc<crate::metrics::Metrics>,
    /// The access log with the metrics, when the log is on.
    logger: Option<Arc<accesslog::Logger>>,
}

/// An in-process handler for a reserved path prefix on the proxy listeners.
pub trait LocalService: Send + Sync + 'static {
    fn call(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<bytes::Bytes>> + Send>>;
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("revision", &self.shared.load().revision)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy serving an empty graph until [`Proxy::swap`] is called.
    pub fn new(settings: Settings) -> Result<Arc<Proxy>, SetupError> {
        let resolver = client::Resolver::new(settings.lookup.clone(), settings.dns_ttl);
        let clients = client::Clients::new(settings.upstream_ca.as_deref(), resolver)?;
        // JWKS fetches trust `--upstream-ca` as the upstreams do.
        let guards = crate::guard::Registry::new(crate::outbound::Outbound::new(
            settings.upstream_ca.as_deref(),
            true,
        )?);
        let secrets = SecretStore::new(settings.secrets_dir.clone());
        let builder = server::http_builder(&settings.limits);
        let metrics = crate::metrics::Metrics::new();
        if let Some(x) = &settings.otlp {
            metrics.attach_otlp(x.counts());
        }
        let logger = settings.access_log.clone().map(|log| {
            Arc::new(accesslog::Logger {
                log,
                metrics: metrics.clone(),
            })
        });
        let proxy = Proxy {
            shared: Arc::new(ArcSwap::from_pointee(Snapshot {
                graph: Graph::empty(),
                routes: Vec::new(),
                certs: CertTable::default(),
                revision: HeaderValue::from_static(""),
                evidence: Arc::default(),
                stats: Vec::new(),
                sample_ratio: settings.trace_sample_ratio.unwrap_or(0.0),
            })),
            settings,
            secrets,
            clients,
            writer: Mutex::new(()),
            builder,
            loaded: std::sync::atomic::AtomicBool::new(false),
            gateway_errors: std::sync::atomic::AtomicU64::new(0),
            local: std::sync::OnceLock::new(),
            acme: std::sync::OnceLock::new(),
            breakers: breaker::Breakers::default(),
            guards,
            health: health::Registry::default(),
            checkers: Mutex::new(Vec::new()),
            shadows: shadow::Shadows::new(metrics.clone()),
            metrics,
            logger,
        };
        Ok(Arc::new(proxy))
    }

    /// Make `graph` the one that new requests see. In-flight requests finish on their graph.
    /// Its revision is named by the graph hash (the reconciler uses [`Proxy::swap_revision`]).
    pub fn swap(&self, graph: Arc<Graph>) {
        let short = graph.hash.get(..12).unwrap_or(&graph.hash).to_string();
        let evidence = crate::reconcile::Evidence::new(graph.len());
        self.swap_revision(graph, &short, evidence)
    }

    /// Make `graph` current as revision `revision`, counting its requests into `evidence`.
    pub fn swap_revision(
        &self,
        graph: Arc<Graph>,
        revision: &str,
        evidence: Arc<crate::reconcile::Evidence>,
    ) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut snap = self.build(graph);
        snap.revision = HeaderValue::from_str(revision).unwrap_or(HeaderValue::from_static(""));
        snap.evidence = evidence;
        self.run_checkers(&snap);
        self.shared.store(Arc::new(snap));
        // Local rate-limit buckets and JWKS keys outlive a revision that leaves them as they
        // were (the new graph was prepared while the old one still held them); the rest go.
        self.guards.prune();
        self.clients.prune();
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Start the health checkers `snap` needs and stop those no route of it uses any more.
    fn run_checkers(&self, snap: &Snapshot) {
        let mut want: Vec<Checker> = Vec::new();
        for (route, prep) in snap.graph.routes.iter().zip(&snap.routes) {
            let Some(b) = prep.as_ref().and_then(|p| p.checked.as_ref()) else {
                continue;
            };
            let Some(h) = &b.1.health else { continue };
            let name = format!("Mapping {}/{}", route.namespace, route.name);
            match want.iter_mut().find(|c| Arc::ptr_eq(&c.health, h)) {
                Some(c) => c.mappings.push(name),
                None => want.push(Checker {
                    health: h.clone(),
                    mappings: vec![name],
                    pool: b.0.clone(),
                    balancer: b.1.clone(),
                    task: None,
                    new: true,
                }),
            }
        }
        let mut cur = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
        for c in want.iter_mut() {
            if let Some(i) = cur.iter().position(|o| Arc::ptr_eq(&o.health, &c.health)) {
                c.task = cur.swap_remove(i).task.take();
                c.new = false;
            }
            if c.task.is_none() {
                // No runtime (e.g. a synchronous test): nothing can run the checks.
                if tokio::runtime::Handle::try_current().is_ok() {
                    c.task = Some(c.health.spawn_checkers(c.pool.clone(), c.balancer.clone()));
                }
            }
        }
        // What is left belongs to upstreams the new graph does not check: stop it.
        for old in cur.drain(..) {
            if let Some(t) = &old.task {
                t.abort();
            }
        }
        *cur = want;
    }

    /// Why upstreams the live graph checks and the previous one did not (a new upstream, or
    /// new checks) are down: every address fails its health checks. Checks the previous graph
    /// already ran are left out: the new revision did not change them, so their failure must
    /// not block it (e.g. a fix elsewhere while that upstream is down).
    pub fn unhealthy_upstreams(&self) -> Vec<String> {
        let cur = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
        cur.iter()
            .filter(|c| c.new)
            .filter_map(|c| {
                c.health.all_down().map(|why| {
                    format!(
                        "{}: upstream {} is unhealthy: {why}",
                        c.mappings.join(", "),
                        c.health.label
                    )
                })
            })
            .collect()
    }

    /// Upstream connection pools held now (tests: none leak across swaps).
    pub fn upstream_pools(&self) -> usize {
        self.clients.pool_count()
    }

    /// Health-check supervisors running now (tests: none leak across swaps).
    pub fn health_checkers(&self) -> usize {
        let cur = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
        cur.iter()
            .filter(|c| c.task.as_ref().is_some_and(|t| !t.is_finished()))
            .count()
    }

    /// Serve requests whose path starts with `prefix` (e.g. `/.legate/hooks/`) with `svc`
    /// instead of routing them. Only the first call takes effect.
    pub fn set_local(&self, prefix: impl Into<String>, svc: Arc<dyn LocalService>) {
        let _ = self.local.set((prefix.into(), svc));
    }

    /// Gateway-made upstream failures so far (502, 503, 504).
    pub fn gateway_errors(&self) -> u64 {
        self.gateway_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gateway's metrics (`GET /metrics` renders them).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The graph new requests see.
    pub fn graph(&self) -> Arc<Graph> {
        self.shared.load().graph.clone()
    }

    /// Whether a graph has been swapped in (readiness).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Reload certificates whose files changed under the secrets directory; returns whether
    /// anything changed. Listeners keep running: the rustls resolver reads the new snapshot.
    pub fn refresh_certs(&self) -> bool {
        if !self.secrets.changed() {
            return false;
        }
        self.reload_certs();
        true
    }

    /// Reload every Host's certificate now (a Secret that was missing may exist now).
    pub fn reload_certs(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.shared.load_full();
        let certs = CertTable::build(
            &cur.graph,
            &self.secrets,
            self.settings.default_cert.as_deref(),
        );
        self.metrics.set_certificates(certs.states(&cur.graph));
        let snap = Snapshot {
            graph: cur.graph.clone(),
            routes: cur.routes.clone(),
            certs,
            revision: cur.revision.clone(),
            evidence: cur.evidence.clone(),
            sample_ratio: cur.sample_ratio,
            stats: cur.stats.clone(),
        };
        self.shared.store(Arc::new(snap));
        tracing::info!("reloaded TLS certificates after a change under the secrets directory");
    }

    /// Answer ACME HTTP-01 challenges of this manager's orders in flight.
    pub fn set_acme(&self, acme: Arc<crate::tls::acme::Acme>) {
        let _ = self.acme.set(acme);
    }

    /// Run the ACME [`pass`](crate::tls::acme::Acme::pass) every `every` against the current
    /// graph, reloading the certificates after one was written. (Here, not in `tls`: tls must
    /// not depend on the proxy.)
    pub async fn run_acme(self: Arc<Self>, acme: Arc<crate::tls::acme::Acme>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if acme.pass(&self.graph()).await {
                let p = self.clone();
                let _ = tokio::task::spawn_blocking(move || p.reload_certs()).await;
            }
        }
    }

    /// The server config of the Host a ClientHello's SNI picks, when it has its own TLS
    /// settings (`Err`: they could not be applied, refuse the handshake).
    pub(crate) fn tls_config_for(
        &self,
        sni: Option<&str>,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ()> {
        let snap = self.shared.load();
        snap.certs.config_for(&snap.graph, sni)
    }

    /// The TLS connectors of a Mapping's `tls: NAME`. A Secret that cannot be read gives
    /// connectors that trust nothing, so the route answers 503 instead of connecting with
    /// less than the TLSContext asks for (preflight reports the Secret first).
    fn origin(&self, spec: &crate::routes::OriginTls) -> client::Origin {
        let make = |alpn: &[u8]| {
            crate::tls::context::origin_config(spec, &self.secrets, self.settings.upstream_ca.as_deref(), alpn)
                .unwrap_or_else(|e| {
                    tracing::error!(context = %spec.context, error = %e, "TLSContext for origination unusable; its routes fail");
                    crate::tls::context::refusing_client_config()
                })
        };
        client::Origin {
            spec: spec.clone(),
            h1: tokio_rustls::TlsConnector::from(Arc::new(make(b"http/1.1"))),
            h2: tokio_rustls::TlsConnector::from(Arc::new(make(b"h2"))),
        }
    }

    /// The certificate source for the TLS listener's resolver.
    pub fn cert_source(&self) -> Arc<dyn CertSource> {
        Arc::new(SnapshotCerts(self.shared.clone()))
    }

    fn build(&self, graph: Arc<Graph>) -> Snapshot {
        let mut routes = Vec::with_capacity(graph.routes.len());
        for route in &graph.routes {
            let prepared = match &route.action {
                Action::Forward(f) => Some(self.prepare(route, f)),
                Action::Redirect(_) => None,
            };
            routes.push(prepared);
        }
        let certs = CertTable::build(&graph, &self.secrets, self.settings.default_cert.as_deref());
        self.metrics.set_certificates(certs.states(&graph));
        Snapshot {
            sample_ratio: self.sample_ratio(&graph),
            revision: HeaderValue::from_static(""),
            evidence: Arc::default(),
            stats: graph
                .routes
                .iter()
                .map(|r| self.metrics.route(&r.stats_name))
                .collect(),
            routes,
            certs,
            graph,
        }
    }

    /// Where spans go under `graph` (the flag's target wins), and the sampling ratio of its new
    /// traces.
    fn sample_ratio(&self, graph: &Graph) -> f64 {
        let tracing = graph.settings.tracing.as_ref();
        if let Some(x) = &self.settings.otlp {
            x.configure(tracing.map(|t| crate::otlp::Target {
                url: t.collector.clone(),
                service_name: t.service_name.clone(),
            }));
        }
        let exporting = self.settings.otlp.as_ref().is_some_and(|x| x.enabled());
        self.settings
            .trace_sample_ratio
            .or(tracing.and_then(|t| t.sampling))
            .unwrap_or(if exporting { 1.0 } else { 0.0 })
    }

    fn prepare(&self, route: &crate::routes::Route, f: &crate::routes::Forward) -> Prepared {
        let authority_str = f.upstream.authority();
        // A compiled Upstream is always a valid authority; the fallback is unreachable in practice.
        let authority = Authority::try_from(authority_str.as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid.invalid"));
        let host_header = if let Some(h) = &f.host_rewrite {
            HeaderValue::from_str(h).ok()
        } else if f.auto_host_rewrite {
            HeaderValue::from_str(&authority_str).ok()
        } else {
            None
        };
        let ops = |list: &[crate::routes::AddHeader]| -> Vec<HeaderOp> {
            list.iter()
                .filter_map(|h| {
                    let parsed = HeaderName::from_bytes(h.name.as_bytes())
                        .ok()
                        .zip(HeaderValue::from_str(&h.value).ok());
                    if parsed.is_none() {
                        tracing::warn!(route = %route.name, header = %h.name, "skipping an invalid header");
                    }
                    parsed.map(|(name, value)| HeaderOp {
                        name,
                        template: h.value.matches('%').count() >= 2,
                        value,
                        append: h.append,
                    })
                })
                .collect()
        };
        let names = |list: &[String]| -> Vec<HeaderName> {
            list.iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect()
        };
        let pool_idle = f.cluster_idle_timeout.or(f.idle_timeout);
        let origin = f.origin_tls.as_ref().map(|o| self.origin(o));
        let origin = origin.as_ref();
        let upstream = if f.http2 {
            UpstreamClient::H2(Box::new(self.clients.get(
                true,
                f.connect_timeout,
                pool_idle,
                origin,
                Some(&f.upstream),
            )))
        } else {
            UpstreamClient::H1(
                self.clients
                    .pool(&f.upstream, f.connect_timeout, pool_idle, origin),
            )
        };
        let wants_health = f.outlier.is_some() || !f.health_checks.is_empty();
        let health = wants_health.then(|| {
            self.health.get(
                format!("{}|{:?}|{:?}", f.upstream, f.outlier, f.health_checks),
                &authority_str,
                f.outlier.as_ref(),
                &f.health_checks,
                &self.metrics,
            )
        });
        let make_balancer = || {
            Arc::new(balance::Balancer::new(
                f.load_balancer.as_ref().unwrap_or(&DEFAULT_LB),
                self.clients.resolver().clone(),
                authority.host(),
                health.clone(),
            ))
        };
        let balancer = match &upstream {
            UpstreamClient::H1(_) if f.load_balancer.is_some() || wants_health => {
                Some(make_balancer())
            }
            _ => None,
        };
        // Health checks run for gRPC upstreams too (verification, metrics), through an
        // HTTP/1.1 pool of the same upstream used only to dial the probes.
        let checked = match (&health, &upstream, &balancer) {
            (Some(h), _, _) if h.checks.is_empty() => None,
            (None, _, _) => None,
            (Some(_), UpstreamClient::H1(pool), Some(b)) => Some((pool.clone(), b.clone())),
            (Some(_), _, _) => Some((
                self.clients
                    .pool(&f.upstream, f.connect_timeout, pool_idle, origin),
                make_balancer(),
            )),
        };
        Prepared {
            balancer,
            checked,
            scheme: match f.upstream.scheme {
                Scheme::Http | Scheme::H2c => UriScheme::HTTP,
                Scheme::Https => UriScheme::HTTPS,
            },
            authority,
            upstream,
            http2: f.http2,
            host_header,
            add_request: ops(&f.add_request_headers),
            remove_request: names(&f.remove_request_headers),
            add_response: ops(&f.add_response_headers),
            remove_response: names(&f.remove_response_headers),
            // `timeout_ms: 0` turns the route timeout off, as in Envoy.
            timeout: f.timeout,
            allow_upgrade: f.allow_upgrade.clone(),
            // The Mapping's `idle_timeout_ms` (Emissary: the route's stream idle timeout), else
            // Envoy's default stream idle timeout.
            tunnel_idle: f.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE),
            label: HeaderValue::from_str(&format!("{}/{}", route.namespace, route.name))
                .unwrap_or(HeaderValue::from_static("-")),
            retry: f.retry.clone(),
            stats: self.metrics.route(&route.stats_name),
            cors: f.cors.clone().map(|c| Arc::new(cors::Policy::new(c))),
            breaker: self.breakers.get(
                format!("{:?}://{authority_str}/{}", f.upstream.scheme, f.http2),
                f.breaker,
            ),
            guard: self.guards.route(f),
        }
    }
}

impl Clone for Prepared {
    fn clone(&self) -> Self {
        Prepared {
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            upstream: self.upstream.clone(),
            http2: self.http2,
            host_header: self.host_header.clone(),
            add_request: self.add_request.clone(),
            remove_request: self.remove_request.clone(),
            add_response: self.add_response.clone(),
            remove_response: self.remove_response.clone(),
            timeout: self.timeout,
            allow_upgrade: self.allow_upgrade.clone(),
            tunnel_idle: self.tunnel_idle,
            label: self.label.clone(),
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            stats: self.stats.clone(),
            cors: self.cors.clone(),
            balancer: self.balancer.clone(),
            checked: self.checked.clone(),
            guard: self.guard.clone(),
        }
    }
}

/// Hands the rustls resolver the certificates of the snapshot current at handshake time.
struct SnapshotCerts(Arc<ArcSwap<Snapshot>>);

impl std::fmt::Debug for SnapshotCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCerts")
    }
}

impl CertSource for SnapshotCerts {
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let snap = self.0.load();
        snap.certs.resolve(&snap.graph, sni)
    }
}
