//! The proxy: listeners, connections, and the per-request path from a request to an upstream
//! response or a local answer (redirect, 404, error).
//!
//! Owns: the one pointer to the current [`Snapshot`] (graph + what the request path derives from
//! it: parsed upstream authorities, header values, TLS certificates), the HTTP server (hyper 1,
//! HTTP/1.1 and h2/h2c), the pooled upstream clients, limits, and the mapping of every failure to
//! a response (`respond`). Must not parse or compile configuration (that is `config`) nor match
//! routes itself (that is `routes`): it asks the graph and does what the route says. A request
//! reads the snapshot once at its start and finishes on it, so a swap never disturbs it.
//!
//! This file holds the [`Proxy`] type, its construction, swaps and public API; the layers are:
//! - `listen`: listeners, accept with the connection limit, TLS handshake, hyper's server, idle
//!   timeout (`impl Proxy { start }`);
//! - `request`: the per-request path as named phases over one `RequestCtx`
//!   (`impl Proxy { handle }`), and the snapshot each request reads;
//! - `upstream`: endpoints, balancing, health, pools, the one dialer, breakers, retries;
//! - leaves every layer may use: `respond` (failures to responses), `body`, `headers`, `conn`
//!   (downstream connection facts), `tunnel` (upgraded connections), `observe` (metrics,
//!   access log, trace context);
//! - `prepare`: builds a snapshot from a graph on each swap.

// Layers, in the order a request meets them; arrows point down only (checked by
// `scripts/check-module-cycles.py`):
//   listen -> request -> upstream;   conn, tunnel, body, headers, respond, observe: leaves.
mod listen;
mod request;
mod upstream;

mod body;
mod conn;
mod headers;
mod observe;
mod prepare;
mod respond;
mod tunnel;

pub mod echo;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderValue;

use crate::routes::Graph;
use crate::tls::{CertSource, CertTable, SecretStore};
use request::snapshot::Snapshot;

pub use listen::fds;
pub use listen::ports::bind;
pub use listen::{Listeners, Running};
pub use observe::{accesslog, trace};
pub use request::head::valid_authority;
pub use request::shadow::ShadowStats;
pub use respond::{ProxyError, SetupError};
pub use upstream::connect::{Lookup, SystemLookup};

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
    /// The address a revision's Listener ports are opened on; `None`: the address of the
    /// flags' listeners, else 0.0.0.0.
    pub listener_ip: Option<std::net::IpAddr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            xff_trusted_hops: 0,
            debug_headers: false,
            https_redirect_port: 443,
            limits: Limits::default(),
            secrets_dir: None,
            default_cert: None,
            upstream_ca: None,
            dns_ttl: Duration::from_secs(30),
            lookup: Arc::new(upstream::connect::SystemLookup),
            access_log: None,
            trace_sample_ratio: None,
            otlp: None,
            metrics: true,
            listener_ip: None,
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

    fn prepare(&self, graph: &Graph) -> Result<(), String> {
        self.prepare_listeners(graph)
    }
}

impl crate::reconcile::UpstreamHealth for Proxy {
    fn unhealthy_upstreams(&self) -> Vec<String> {
        Proxy::unhealthy_upstreams(self)
    }
}

/// The gateway's request path and its current snapshot. Cheap to share: `Arc<Proxy>`.
pub struct Proxy {
    shared: Arc<ArcSwap<Snapshot>>,
    settings: Settings,
    secrets: SecretStore,
    clients: upstream::Clients,
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
    breakers: upstream::breaker::Breakers,
    /// JWKS key sets, token buckets and Redis clients of the routes' edge policies.
    guards: crate::guard::Registry,
    health: upstream::health::Registry,
    /// The health-check supervisors of the live graph's upstreams, by health state.
    checkers: upstream::checks::Checkers,
    shadows: request::shadow::Shadows,
    metrics: Arc<crate::metrics::Metrics>,
    /// Where answered requests are counted and logged.
    observer: observe::Observer,
    /// The sockets served: the flags' and each revision's own ports.
    listeners: Mutex<listen::ports::ListenerSet>,
    /// Itself, for the accept loops a swap starts.
    me: std::sync::Weak<Proxy>,
    /// Connections accepted on TCP ports, for the weighted split of TCPMappings.
    tcp_seq: std::sync::atomic::AtomicU64,
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
        let resolver = upstream::connect::Resolver::new(settings.lookup.clone(), settings.dns_ttl);
        let clients = upstream::Clients::new(settings.upstream_ca.as_deref(), resolver)?;
        // JWKS fetches trust `--upstream-ca` as the upstreams do.
        let guards = crate::guard::Registry::new(
            crate::outbound::Outbound::new(settings.upstream_ca.as_deref(), true)?,
            settings.secrets_dir.clone(),
        );
        let secrets = SecretStore::new(settings.secrets_dir.clone());
        let builder = listen::http_builder(&settings.limits);
        let settings_metrics = settings.metrics;
        let otlp_exporter = settings.otlp.clone();
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
        Ok(Arc::new_cyclic(|me| Proxy {
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
            breakers: upstream::breaker::Breakers::default(),
            guards,
            health: upstream::health::Registry::default(),
            checkers: upstream::checks::Checkers::default(),
            shadows: request::shadow::Shadows::new(metrics.clone()),
            observer: observe::Observer {
                metrics: metrics.clone(),
                logger,
                count: settings_metrics,
                otlp: otlp_exporter,
            },
            metrics,
            listeners: Mutex::default(),
            me: me.clone(),
            tcp_seq: std::sync::atomic::AtomicU64::new(0),
        }))
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
        self.checkers.run(
            snap.graph
                .routes
                .iter()
                .zip(&snap.routes)
                .filter_map(|(r, p)| {
                    let name = format!("Mapping {}/{}", r.namespace, r.name);
                    Some((name, p.as_ref()?.target.checked.as_ref()?))
                }),
        );
        let graph = snap.graph.clone();
        self.shared.store(Arc::new(snap));
        if let Some(me) = self.me.upgrade() {
            me.apply_listeners(&graph);
        }
        // Local rate-limit buckets and JWKS keys outlive a revision that leaves them as they
        // were (the new graph was prepared while the old one still held them); the rest go.
        self.guards.prune();
        self.clients.prune();
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Why upstreams the live graph checks and the previous one did not (a new upstream, or
    /// new checks) are down: every address fails its health checks.
    pub fn unhealthy_upstreams(&self) -> Vec<String> {
        self.checkers.unhealthy()
    }

    /// Health-check supervisors running now (tests: none leak across swaps).
    pub fn health_checkers(&self) -> usize {
        self.checkers.running()
    }

    /// Shadow copies made and dropped so far.
    pub fn shadow_stats(&self) -> ShadowStats {
        let (sent, dropped) = self.metrics.shadow_counts();
        ShadowStats { sent, dropped }
    }

    /// Shadow copies in flight now.
    pub fn shadow_in_flight(&self) -> usize {
        self.shadows.in_flight()
    }

    /// Upstream connection pools held now (tests: none leak across swaps).
    pub fn upstream_pools(&self) -> usize {
        self.clients.pool_count()
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
            stats: cur.stats.clone(),
            sample_ratio: cur.sample_ratio,
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

    /// The certificate source for the TLS listener's resolver.
    pub fn cert_source(&self) -> Arc<dyn CertSource> {
        Arc::new(SnapshotCerts(self.shared.clone()))
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
