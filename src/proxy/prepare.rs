//! Turns a compiled graph into the [`Snapshot`] requests read: each forwarding route's header
//! edits parsed, its upstream reachable (HTTP/1.1 or HTTP/2 pool, balancer, health, breaker) and
//! its edge-policy state looked up in the registries the proxy owns.
//!
//! Runs on every swap, never per request. Nothing imports this module: the proxy's `swap`
//! calls [`Proxy::build`].

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme as UriScheme};

use super::Proxy;
use crate::proxy::headers::HeaderOp;
use crate::proxy::request::cors;
use crate::proxy::request::snapshot::{Prepared, Snapshot};
use crate::proxy::upstream::balance::Balancer;
use crate::proxy::upstream::connect::Origin;
use crate::proxy::upstream::{Target, UpstreamClient};
use crate::routes::{Action, Graph, Scheme};
use crate::tls::CertTable;

/// Idle limit of an upgraded tunnel whose Mapping sets no `idle_timeout_ms` (Envoy's default
/// `stream_idle_timeout`).
const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(300);

/// `load_balancer` of a route that has outlier detection or health checks but no policy.
const DEFAULT_LB: crate::routes::LoadBalancer = crate::routes::LoadBalancer {
    policy: crate::routes::LbPolicy::RoundRobin,
    key: None,
};

impl Proxy {
    pub(super) fn build(&self, graph: Arc<Graph>) -> Snapshot {
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
            UpstreamClient::H2(self.clients.h2_pool(
                &f.upstream,
                f.connect_timeout,
                pool_idle,
                origin,
            ))
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
        let balancer = (f.load_balancer.is_some() || wants_health).then(|| {
            Arc::new(Balancer::new(
                f.load_balancer.as_ref().unwrap_or(&DEFAULT_LB),
                self.clients.resolver().clone(),
                authority.host(),
                health.clone(),
            ))
        });
        // Health checks dial their probes through the upstream's HTTP/1.1 pool (gRPC checks
        // over its HTTP/2 connector), one fresh connection per check.
        let checked = match (&health, &balancer) {
            (Some(h), Some(b)) if !h.checks.is_empty() => {
                let pool = match &upstream {
                    UpstreamClient::H1(pool) => pool.clone(),
                    UpstreamClient::H2(_) => {
                        self.clients
                            .pool(&f.upstream, f.connect_timeout, pool_idle, origin)
                    }
                };
                Some((pool, b.clone()))
            }
            _ => None,
        };
        let target = Target {
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
            // `timeout_ms: 0` turns the route timeout off, as in Envoy.
            timeout: f.timeout,
            // The Mapping's `idle_timeout_ms` (Emissary: the route's stream idle timeout), else
            // Envoy's default stream idle timeout.
            tunnel_idle: f.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE),
            retry: f.retry.clone(),
            stats: self.metrics.route(&route.stats_name),
            breaker: self.breakers.get(
                format!("{:?}://{authority_str}/{}", f.upstream.scheme, f.http2),
                f.breaker,
            ),
        };
        Prepared {
            target,
            add_request: ops(&f.add_request_headers),
            remove_request: names(&f.remove_request_headers),
            add_response: ops(&f.add_response_headers),
            remove_response: names(&f.remove_response_headers),
            allow_upgrade: f.allow_upgrade.clone(),
            label: HeaderValue::from_str(&format!("{}/{}", route.namespace, route.name))
                .unwrap_or(HeaderValue::from_static("-")),
            cors: f.cors.clone().map(|c| Arc::new(cors::Policy::new(c))),
            guard: self.guards.route(f),
        }
    }

    /// The TLS connectors of a Mapping's `tls: NAME`. A Secret that cannot be read gives
    /// connectors that trust nothing, so the route answers 503 instead of connecting with
    /// less than the TLSContext asks for (preflight reports the Secret first).
    fn origin(&self, spec: &crate::routes::OriginTls) -> Origin {
        let make = |alpn: &[u8]| {
            crate::tls::context::origin_config(spec, &self.secrets, self.settings.upstream_ca.as_deref(), alpn)
                .unwrap_or_else(|e| {
                    tracing::error!(context = %spec.context, error = %e, "TLSContext for origination unusable; its routes fail");
                    crate::tls::context::refusing_client_config()
                })
        };
        Origin {
            spec: spec.clone(),
            h1: tokio_rustls::TlsConnector::from(Arc::new(make(b"http/1.1"))),
            h2: tokio_rustls::TlsConnector::from(Arc::new(make(b"h2"))),
        }
    }
}
