//! Emissary's `TracingService`: where spans go, how new traces are sampled, and which request
//! headers become span attributes. Compiled into the graph's [`Tracing`] settings; the proxy's
//! exporter reads them per revision (`--otlp-endpoint` wins over them).
//!
//! Legate speaks one tracer, OTLP/HTTP protobuf (driver `opentelemetry`). Emissary's Envoy sends
//! that driver's spans over OTLP/gRPC to `service`; Legate posts to `http://<service>/v1/traces`,
//! so `service` names the collector's HTTP port (4318). `zipkin` and `datadog` are accepted
//! with a warning and export nothing; `lightstep` is refused, as Emissary refuses it.

use serde::Deserialize;
use serde_json::Value;

use super::diag::Diagnostic;
use super::model::{Resource, Spec};
use crate::routes::settings::Tracing;

/// The TracingService spec fields Legate reads (the schema admits the rest).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct TracingServiceSpec {
    pub driver: String,
    pub service: String,
    pub sampling: Option<Sampling>,
    pub tag_headers: Vec<String>,
    /// Driver settings, kept whole to warn about each one not read.
    pub config: serde_json::Map<String, Value>,
}

/// `sampling`: percentages.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Sampling {
    pub overall: Option<u8>,
    pub client: Option<u8>,
    pub random: Option<u8>,
}

/// The OTLP/HTTP traces URL of a collector: `host:port` becomes `http://host:port/v1/traces`;
/// a URL without a path gets `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT` does); a URL with
/// a path is used as it is.
pub fn traces_url(s: &str) -> Result<http::Uri, String> {
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = full
        .parse()
        .map_err(|e| format!("`{s}` is not a URL or host:port: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("`{s}` is not an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{s}` names no host"));
    }
    if uri.path().is_empty() || uri.path() == "/" {
        let base = full.trim_end_matches('/');
        return format!("{base}/v1/traces")
            .parse()
            .map_err(|e| format!("`{s}`: {e}"));
    }
    Ok(uri)
}

/// The revision's span export settings, from its one TracingService (if any).
pub fn compile(resources: &[&Resource], diags: &mut Vec<Diagnostic>) -> Option<Tracing> {
    let found: Vec<(&Resource, &TracingServiceSpec)> =
        super::model::of_kind(resources, |s| match s {
            Spec::TracingService(t) => Some(&**t),
            _ => None,
        });
    let (first, spec) = *found.first()?;
    for (extra, _) in &found[1..] {
        diags.push(
            Diagnostic::error(
                "duplicate-tracingservice",
                &extra.at("/metadata/name"),
                format!(
                    "TracingService `{}` is a second TracingService; `{}` is already the gateway's (Emissary refuses more than one too)",
                    extra.id(),
                    first.id()
                ),
            )
            .with_help("keep one TracingService per gateway, or use ambassador_id to split gateways"),
        );
    }
    let r = first;
    match spec.driver.as_str() {
        "opentelemetry" => {}
        "lightstep" => {
            diags.push(
                Diagnostic::error(
                    "tracing-driver",
                    &r.at("/spec/driver"),
                    "the `lightstep` driver is not supported (Emissary refuses it since 3.4)",
                )
                .with_help("use `driver: opentelemetry` with `service` at an OTLP/HTTP collector (Lightstep accepts OTLP)"),
            );
            return None;
        }
        other => {
            diags.push(
                Diagnostic::warning(
                    "tracing-not-exported",
                    &r.at("/spec/driver"),
                    format!("driver `{other}`: Legate exports spans over OTLP only, so no span leaves the gateway (W3C `traceparent` is still propagated)"),
                )
                .with_help("use `driver: opentelemetry` with `service` at the collector's OTLP/HTTP port: Jaeger, Tempo, Datadog's agent and the OpenTelemetry Collector listen on 4318"),
            );
            return None;
        }
    }
    let collector = match traces_url(&spec.service) {
        Ok(u) => u,
        Err(e) => {
            diags.push(
                Diagnostic::error("tracing-service", &r.at("/spec/service"), e)
                    .with_help("write the collector's OTLP/HTTP address as host:port (e.g. `jaeger.monitoring:4318`) or as a URL"),
            );
            return None;
        }
    };
    if collector.port_u16() == Some(4317) {
        diags.push(
            Diagnostic::warning(
                "tracing-grpc-port",
                &r.at("/spec/service"),
                "port 4317 is OTLP/gRPC's; Legate posts OTLP/HTTP protobuf, which collectors take on 4318",
            )
            .with_help("point `service` at the collector's OTLP/HTTP port (4318 by default)"),
        );
    }
    let sampling = spec.sampling.as_ref();
    for (field, set) in [
        ("client", sampling.and_then(|s| s.client)),
        ("random", sampling.and_then(|s| s.random)),
    ] {
        if set.is_some() {
            diags.push(
                Diagnostic::warning(
                    "not-implemented",
                    &r.at(&format!("/spec/sampling/{field}")),
                    format!("TracingService `sampling.{field}` is not applied"),
                )
                .with_help("Legate samples new traces by `sampling.overall` (or --otlp-sample-ratio) and keeps a client's sampled flag"),
            );
        }
    }
    for key in spec.config.keys().filter(|k| *k != "service_name") {
        diags.push(
            Diagnostic::warning(
                "not-implemented",
                &r.at(&format!("/spec/config/{key}")),
                format!("TracingService `config.{key}` is not read"),
            )
            .with_help("only `config.service_name` applies to OTLP export"),
        );
    }
    let service_name = spec
        .config
        .get("service_name")
        .and_then(Value::as_str)
        .unwrap_or("legate")
        .to_string();
    Some(Tracing {
        collector,
        service_name,
        sampling: sampling
            .and_then(|s| s.overall)
            .map(|p| f64::from(p.min(100)) / 100.0),
        tag_headers: spec
            .tag_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn collector_urls() {
        let u = |s: &str| traces_url(s).map(|u| u.to_string());
        assert_eq!(u("jaeger:4318").unwrap(), "http://jaeger:4318/v1/traces");
        assert_eq!(
            u("http://jaeger:4318").unwrap(),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            u("https://c.example/").unwrap(),
            "https://c.example/v1/traces"
        );
        assert_eq!(u("http://c:4318/custom").unwrap(), "http://c:4318/custom");
        assert!(u("grpc://c:4317").is_err());
        assert!(u("http://").is_err());
        assert!(u("a b").is_err());
    }
}
