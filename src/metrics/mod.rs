//! Metrics: the gateway's counters, gauges and histograms, and their Prometheus text exposition.
//!
//! Owns: the per-route request statistics (resolved once per graph swap, so a request only bumps
//! atomics: no lock, no string hashing, no allocation), the gateway-wide counters, the reconcile
//! counters fed from the reconciler's history events, and `render` for `GET /metrics`. Must not
//! know about HTTP serving or routing: the proxy says what happened, this module counts it.
//!
//! Label values are bounded: a route label is a Mapping's `stats_name` (operator-chosen, from the
//! config), method and status are classes, and the live revision appears only in one info metric.

mod recent;
mod source;
mod upstream;

pub use recent::{Recent, RouteRate, Traffic};

pub use upstream::{BreakerLimit, RetryReason, UpstreamStats};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};

/// Route label of requests no Mapping matched.
pub const NO_ROUTE: &str = "none";

const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "DELETE", "other"];
const STATUSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Upper bounds of the duration buckets, in microseconds (1 ms .. 10 s).
const BUCKETS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// The method class index of a request method.
pub fn method_class(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        _ => 5,
    }
}

/// Request statistics of one route label, shared by every Mapping with that `stats_name` and
/// kept across graph swaps so counters only ever grow.
#[derive(Debug, Default)]
pub struct RouteStats {
    requests: [[AtomicU64; 5]; 6],
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Retries and circuit-breaker refusals of this route's upstream.
    pub upstream: UpstreamStats,
    /// Failures the gateway answered itself: connect failures, timeouts, gateway 5xx.
    failures: [AtomicU64; 3],
}

impl RouteStats {
    /// Count one answered request (`method`: see [`method_class`]); `took` is the time to the
    /// response head.
    pub fn record(&self, method: usize, status: StatusCode, took: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[method.min(5)][class].fetch_add(1, Relaxed);
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        // Non-cumulative buckets here; `render` accumulates them.
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Count a request whose upstream connection could not be established.
    pub fn connect_failure(&self) {
        self.failures[0].fetch_add(1, Relaxed);
    }

    /// Count a request answered 504 because the upstream exceeded the route timeout.
    pub fn timeout(&self) {
        self.failures[1].fetch_add(1, Relaxed);
    }

    /// Count a 5xx the gateway made itself (not relayed from an upstream).
    pub fn gateway_5xx(&self) {
        self.failures[2].fetch_add(1, Relaxed);
    }
}

/// Endpoint health of one upstream (a Mapping's `service`, as configured): outlier ejections
/// and, as the balancer last saw them, how many addresses it has, ejected and failing checks.
#[derive(Debug, Default)]
pub struct EndpointStats {
    ejections: AtomicU64,
    addresses: AtomicU64,
    ejected: AtomicU64,
    unhealthy: AtomicU64,
}

impl EndpointStats {
    /// Count one outlier ejection.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Relaxed);
    }

    /// The address counts the balancer just saw.
    pub fn set_addresses(&self, total: usize, ejected: usize, unhealthy: usize) {
        self.addresses.store(total as u64, Relaxed);
        self.ejected.store(ejected as u64, Relaxed);
        self.unhealthy.store(unhealthy as u64, Relaxed);
    }
}

/// What became of the spans handed to the OTLP exporter.
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub exported: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped: AtomicU64,
    /// Posted, but the collector refused them or could not be reached.
    pub failed: AtomicU64,
}

/// Every metric of one gateway process. Cheap to share: `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    none: Arc<RouteStats>,
    /// By upstream service (from the config, so bounded like route labels).
    upstreams: Mutex<BTreeMap<String, Arc<EndpointStats>>>,
    connections: AtomicI64,
    access_log_dropped: AtomicU64,
    /// Recorded revisions by outcome: applied, rejected, rolled back, superseded.
    outcomes: [AtomicU64; REVISION_OUTCOMES.len()],
    shadow: upstream::ShadowCounts,
    /// The OTLP exporter's span counts, when tracing export is on.
    otlp: std::sync::OnceLock<Arc<SpanCounts>>,
    fetch: source::FetchStats,
    /// Each TLS Host's certificate, as last loaded.
    certificates: Mutex<Vec<CertState>>,
    /// ACME state by Host hostname ([`crate::tls::acme`]).
    acme: Mutex<std::collections::HashMap<String, AcmeStatus>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let none = Arc::new(RouteStats::default());
        let mut routes = BTreeMap::new();
        routes.insert(NO_ROUTE.to_string(), none.clone());
        Metrics {
            routes: Mutex::new(routes),
            none,
            upstreams: Mutex::new(BTreeMap::new()),
            connections: AtomicI64::new(0),
            access_log_dropped: AtomicU64::new(0),
            outcomes: Default::default(),
            shadow: Default::default(),
            otlp: std::sync::OnceLock::new(),
            certificates: Mutex::new(Vec::new()),
            acme: Mutex::new(std::collections::HashMap::new()),
            fetch: Default::default(),
        }
    }
}

/// The `outcome` label values of `legate_reconcile_revisions_total`, in the order they are shown.
pub const REVISION_OUTCOMES: [&str; 7] = [
    "applied",
    "rejected",
    "rolled_back",
    "superseded",
    "verifying",
    "degraded",
    "interrupted",
];

/// The reconciler facts `render` shows, read at scrape time (the reconciler fills it in:
/// metrics depends on nothing above it).
#[derive(Debug, Default, Clone)]
pub struct ReconcileView {
    pub revision: Option<String>,
    pub passes: u64,
    pub fetch_failures: u64,
    pub consecutive_failures: u32,
    /// Unix milliseconds.
    pub last_pass_at: Option<u64>,
    pub last_fetch_ok_at: Option<u64>,
    /// The source's head is known and is not the serving revision (rejected, rolled back,
    /// not applied yet, or pinned).
    pub out_of_sync: bool,
}

/// Decrements the open-connection gauge when dropped.
#[derive(Debug)]
pub struct ConnGuard(Arc<Metrics>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The statistics of a route label (called when a graph is prepared, not per request).
    pub fn route(&self, stats_name: &str) -> Arc<RouteStats> {
        let mut m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(stats_name.to_string()).or_default().clone()
    }

    /// The endpoint-health statistics of an upstream service (called when a graph is prepared).
    pub fn upstream(&self, service: &str) -> Arc<EndpointStats> {
        let mut m = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(service.to_string()).or_default().clone()
    }

    /// The statistics of requests no route matched.
    pub fn no_route(&self) -> &Arc<RouteStats> {
        &self.none
    }

    pub fn access_log_dropped(&self) {
        self.access_log_dropped.fetch_add(1, Relaxed);
    }

    /// Show the OTLP exporter's span counts (once, at start).
    pub fn attach_otlp(&self, counts: Arc<SpanCounts>) {
        let _ = self.otlp.set(counts);
    }

    /// Count one shadow copy started (`true`) or not made (`false`).
    pub fn shadow(&self, sent: bool) {
        let c = if sent {
            &self.shadow.sent
        } else {
            &self.shadow.dropped
        };
        c.fetch_add(1, Relaxed);
    }

    /// Shadow copies started and not made so far.
    pub fn shadow_counts(&self) -> (u64, u64) {
        (
            self.shadow.sent.load(Relaxed),
            self.shadow.dropped.load(Relaxed),
        )
    }

    /// Count one read of the source (`kind`: [`crate::source::Source::kind`]) and its duration.
    pub fn source_fetch(&self, kind: &str, ok: bool, took: Duration) {
        self.fetch.observe(kind, ok, took);
    }

    /// Count an open downstream connection until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ConnGuard {
        self.connections.fetch_add(1, Relaxed);
        ConnGuard(self.clone())
    }

    /// Count one recorded history entry; `outcome` is one of [`REVISION_OUTCOMES`] (the
    /// reconciler's outcome names), anything else is ignored.
    pub fn revision_outcome(&self, outcome: &str) {
        if let Some(i) = REVISION_OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[i].fetch_add(1, Relaxed);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, rec: Option<&ReconcileView>) -> String {
        let mut out = String::with_capacity(4096);
        let routes: Vec<(String, Arc<RouteStats>)> = {
            let m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| (escape(k), v.clone())).collect()
        };

        head(
            &mut out,
            "legate_requests_total",
            "counter",
            "Requests answered, by route (Mapping stats_name; none: no route matched), method class and status class.",
        );
        for (name, s) in &routes {
            for (mi, m) in METHODS.iter().enumerate() {
                for (si, st) in STATUSES.iter().enumerate() {
                    let n = s.requests[mi][si].load(Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "legate_requests_total{{route=\"{name}\",method=\"{m}\",status=\"{st}\"}} {n}"
                        );
                    }
                }
            }
        }

        head(
            &mut out,
            "legate_request_duration_seconds",
            "histogram",
            "Time from request to response head, by route.",
        );
        for (name, s) in &routes {
            histogram(
                &mut out,
                "legate_request_duration_seconds",
                &format!("route=\"{name}\","),
                BUCKETS_US.iter().map(|b| *b as f64 / 1e6),
                &s.buckets,
                s.count.load(Relaxed),
                s.sum_us.load(Relaxed),
            );
        }
        upstream::render(&mut out, &routes, &self.shadow);

        let by_route = [
            (
                "legate_upstream_connect_failures_total",
                "Requests whose upstream connection could not be established, by route.",
            ),
            (
                "legate_upstream_timeouts_total",
                "Requests answered 504 because the upstream exceeded the route timeout, by route.",
            ),
            (
                "legate_gateway_errors_total",
                "5xx responses made by the gateway itself (not relayed from an upstream), by route (none: before a route matched).",
            ),
        ];
        for (i, (name, help)) in by_route.into_iter().enumerate() {
            head(&mut out, name, "counter", help);
            for (route, s) in &routes {
                let n = s.failures[i].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "{name}{{route=\"{route}\"}} {n}");
                }
            }
        }
        head(
            &mut out,
            "legate_access_log_dropped_total",
            "counter",
            "Access log lines dropped because the writer fell behind.",
        );
        let _ = writeln!(
            out,
            "legate_access_log_dropped_total {}",
            self.access_log_dropped.load(Relaxed)
        );
        if let Some(c) = self.otlp.get() {
            head(
                &mut out,
                "legate_otlp_spans_total",
                "counter",
                "Trace spans by outcome: exported, dropped (queue full), failed (the collector refused or was unreachable).",
            );
            for (o, n) in [
                ("exported", &c.exported),
                ("dropped", &c.dropped),
                ("failed", &c.failed),
            ] {
                let _ = writeln!(
                    out,
                    "legate_otlp_spans_total{{outcome=\"{o}\"}} {}",
                    n.load(Relaxed)
                );
            }
        }
        head(
            &mut out,
            "legate_downstream_connections",
            "gauge",
            "Open downstream connections.",
        );
        let _ = writeln!(
            out,
            "legate_downstream_connections {}",
            self.connections.load(Relaxed).max(0)
        );

        self.render_upstreams(&mut out);
        self.render_cert_expiry(&mut out);
        self.render_acme(&mut out);

        head(
            &mut out,
            "legate_reconcile_revisions_total",
            "counter",
            "Revisions recorded by the reconciler, by outcome.",
        );
        for (i, o) in REVISION_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "legate_reconcile_revisions_total{{outcome=\"{o}\"}} {}",
                self.outcomes[i].load(Relaxed)
            );
        }

        self.fetch.render(&mut out);

        if let Some(r) = rec {
            let now = now_ms();
            head(
                &mut out,
                "legate_reconcile_passes_total",
                "counter",
                "Reconcile passes, by whether the source could be read.",
            );
            let ok = r.passes.saturating_sub(r.fetch_failures);
            let _ = writeln!(
                out,
                "legate_reconcile_passes_total{{outcome=\"fetched\"}} {ok}"
            );
            let _ = writeln!(
                out,
                "legate_reconcile_passes_total{{outcome=\"source_failed\"}} {}",
                r.fetch_failures
            );
            head(
                &mut out,
                "legate_source_consecutive_failures",
                "gauge",
                "Source failures since the last successful fetch.",
            );
            let _ = writeln!(
                out,
                "legate_source_consecutive_failures {}",
                r.consecutive_failures
            );
            let ages = [
                (
                    "legate_source_last_success_age_seconds",
                    "Seconds since the source was last read successfully (absent before the first).",
                    r.last_fetch_ok_at,
                ),
                (
                    "legate_reconcile_last_pass_age_seconds",
                    "Seconds since the last reconcile pass ended (absent before the first).",
                    r.last_pass_at,
                ),
            ];
            for (name, help, at) in ages {
                head(&mut out, name, "gauge", help);
                if let Some(at) = at {
                    let _ = writeln!(out, "{name} {}", now.saturating_sub(at) as f64 / 1e3);
                }
            }
            head(
                &mut out,
                "legate_source_out_of_sync",
                "gauge",
                "1 while the source's head is not the serving revision (rejected, rolled back, or pinned).",
            );
            let _ = writeln!(out, "legate_source_out_of_sync {}", u8::from(r.out_of_sync));
            head(
                &mut out,
                "legate_revision_info",
                "gauge",
                "The revision being served (value always 1).",
            );
            if let Some(rev) = &r.revision {
                let _ = writeln!(
                    out,
                    "legate_revision_info{{revision=\"{}\"}} 1",
                    escape(rev)
                );
            }
        }
        out
    }
}

/// A TLS Host's certificate: `loaded` (with its `notAfter`, Unix seconds) or `unavailable`
/// (its Secret could not be read; the logs say why).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertState {
    pub host: String,
    pub secret: String,
    pub state: &'static str,
    pub not_after: Option<i64>,
    /// The ACME order state, for a Host with an `acmeProvider`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeStatus>,
}

/// Where a Host's ACME certificate stands: `ordering`, `valid` (with `not_after` and
/// `renew_at`) or `failed` (with `reason`, `failures` in a row and `next_attempt`); times in
/// Unix seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AcmeStatus {
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<i64>,
    pub failures: u32,
}

impl AcmeStatus {
    pub fn ordering() -> AcmeStatus {
        AcmeStatus {
            state: "ordering",
            not_after: None,
            renew_at: None,
            reason: None,
            next_attempt: None,
            failures: 0,
        }
    }

    pub fn valid(not_after: i64, renew_at: i64) -> AcmeStatus {
        AcmeStatus {
            state: "valid",
            not_after: Some(not_after),
            renew_at: Some(renew_at),
            ..AcmeStatus::ordering()
        }
    }

    pub fn failed(reason: String, next_attempt: i64, failures: u32) -> AcmeStatus {
        AcmeStatus {
            state: "failed",
            reason: Some(reason),
            next_attempt: Some(next_attempt),
            failures,
            ..AcmeStatus::ordering()
        }
    }
}

/// One upstream's address health, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamView {
    pub upstream: String,
    pub addresses: u64,
    pub ejected: u64,
    pub unhealthy: u64,
    pub ejections: u64,
}

impl Metrics {
    /// Replace the certificate states (called whenever the certificates are loaded).
    pub fn set_certificates(&self, certs: Vec<CertState>) {
        *self.certificates.lock().unwrap_or_else(|e| e.into_inner()) = certs;
    }

    /// Each TLS Host's certificate, for `GET /api/certificates`, with its ACME state.
    pub fn certificates(&self) -> Vec<CertState> {
        let mut certs = self
            .certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let acme = self.acme.lock().unwrap_or_else(|e| e.into_inner());
        for c in &mut certs {
            c.acme = acme.get(&c.host).cloned();
        }
        certs
    }

    /// Record the ACME state of a Host (by hostname).
    pub fn set_acme(&self, host: &str, status: AcmeStatus) {
        self.acme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_string(), status);
    }

    /// Forget the ACME state of Hosts no longer in the config.
    pub fn retain_acme(&self, hosts: &[String]) {
        self.acme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h, _| hosts.contains(h));
    }

    fn render_acme(&self, out: &mut String) {
        let acme: Vec<(String, AcmeStatus)> = self
            .acme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(h, s)| (h.clone(), s.clone()))
            .collect();
        head(
            out,
            "legate_acme_certificate_state",
            "gauge",
            "ACME state of a Host's certificate (1 for the current state: ordering, valid, failed), by Host hostname.",
        );
        for (h, s) in &acme {
            for st in ["ordering", "valid", "failed"] {
                let _ = writeln!(
                    out,
                    "legate_acme_certificate_state{{host=\"{}\",state=\"{st}\"}} {}",
                    escape(h),
                    u8::from(s.state == st)
                );
            }
        }
        head(
            out,
            "legate_acme_failures",
            "gauge",
            "Failed ACME orders in a row for a Host's certificate (0 after a success), by Host hostname.",
        );
        for (h, s) in &acme {
            let _ = writeln!(
                out,
                "legate_acme_failures{{host=\"{}\"}} {}",
                escape(h),
                s.failures
            );
        }
    }

    fn render_cert_expiry(&self, out: &mut String) {
        let certs = self.certificates();
        head(
            out,
            "legate_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the certificate served for a TLS Host expires (notAfter, Unix seconds), by Host hostname.",
        );
        for c in certs {
            if let Some(t) = c.not_after {
                let _ = writeln!(
                    out,
                    "legate_tls_certificate_expiry_timestamp_seconds{{host=\"{}\"}} {t}",
                    escape(&c.host)
                );
            }
        }
    }

    /// Address health of every upstream with outlier detection or health checks.
    pub fn upstream_health(&self) -> Vec<UpstreamView> {
        let m = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(k, u)| UpstreamView {
                upstream: k.clone(),
                addresses: u.addresses.load(Relaxed),
                ejected: u.ejected.load(Relaxed),
                unhealthy: u.unhealthy.load(Relaxed),
                ejections: u.ejections.load(Relaxed),
            })
            .collect()
    }

    fn render_upstreams(&self, out: &mut String) {
        let ups: Vec<(String, Arc<EndpointStats>)> = {
            let m = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| (escape(k), v.clone())).collect()
        };
        head(
            out,
            "legate_upstream_outlier_ejections_total",
            "counter",
            "Upstream addresses ejected by outlier detection, by upstream service.",
        );
        for (name, u) in &ups {
            let _ = writeln!(
                out,
                "legate_upstream_outlier_ejections_total{{upstream=\"{name}\"}} {}",
                u.ejections.load(Relaxed)
            );
        }
        head(
            out,
            "legate_upstream_addresses",
            "gauge",
            "Addresses of an upstream service with outlier detection or health checks, as last balanced: all, ejected, failing health checks.",
        );
        for (name, u) in &ups {
            for (state, v) in [
                ("all", &u.addresses),
                ("ejected", &u.ejected),
                ("unhealthy", &u.unhealthy),
            ] {
                let _ = writeln!(
                    out,
                    "legate_upstream_addresses{{upstream=\"{name}\",state=\"{state}\"}} {}",
                    v.load(Relaxed)
                );
            }
        }
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The series of one histogram: `labels` is empty or ends with a comma, `buckets` are
/// non-cumulative counts under `bounds` (seconds), `sum_us` in microseconds.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: impl Iterator<Item = f64>,
    buckets: &[AtomicU64],
    count: u64,
    sum_us: u64,
) {
    let mut cum = 0;
    for (b, n) in bounds.zip(buckets) {
        cum += n.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}le=\"{b}\"}} {}",
            cum.min(count)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
    let labels = labels.trim_end_matches(',');
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_accumulates_buckets() {
        let m = Metrics::new();
        let r = m.route("api");
        r.record(
            method_class(&Method::GET),
            StatusCode::OK,
            Duration::from_millis(3),
        );
        r.record(
            method_class(&Method::PATCH),
            StatusCode::BAD_GATEWAY,
            Duration::from_secs(60),
        );
        assert!(Arc::ptr_eq(&r, &m.route("api")));
        let text = m.render(None);
        assert!(
            text.contains("legate_requests_total{route=\"api\",method=\"GET\",status=\"2xx\"} 1\n")
        );
        assert!(text
            .contains("legate_requests_total{route=\"api\",method=\"other\",status=\"5xx\"} 1\n"));
        assert!(text
            .contains("legate_request_duration_seconds_bucket{route=\"api\",le=\"0.0025\"} 0\n"));
        assert!(
            text.contains("legate_request_duration_seconds_bucket{route=\"api\",le=\"0.005\"} 1\n")
        );
        assert!(
            text.contains("legate_request_duration_seconds_bucket{route=\"api\",le=\"10\"} 1\n")
        );
        assert!(
            text.contains("legate_request_duration_seconds_bucket{route=\"api\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("legate_request_duration_seconds_count{route=\"none\"} 0\n"));
    }

    #[test]
    fn upstream_health_is_rendered() {
        let m = Metrics::new();
        let u = m.upstream("svc.test:80");
        u.ejected();
        u.set_addresses(3, 1, 0);
        let text = m.render(None);
        assert!(
            text.contains("legate_upstream_outlier_ejections_total{upstream=\"svc.test:80\"} 1\n")
        );
        assert!(text
            .contains("legate_upstream_addresses{upstream=\"svc.test:80\",state=\"ejected\"} 1\n"));
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
