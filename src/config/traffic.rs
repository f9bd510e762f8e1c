//! Raw `retry_policy`, `circuit_breakers` and `cors` of a Mapping, and their compilation into
//! `routes::RetryPolicy`, `routes::BreakerLimits` and `routes::Cors`. Pure: no I/O.

use std::time::Duration;

use serde::Deserialize;

use super::diag::Diagnostic;
use super::model::{OneOrMany, Resource};
use crate::routes::{
    BreakerLimits, Cors, HashKey, HealthCheck, LbPolicy, LoadBalancer, OriginMatch,
    OutlierDetection, Probe, RetryOn, RetryPolicy,
};

/// `retry_policy` as written.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct RetryPolicySpec {
    pub retry_on: Option<String>,
    pub num_retries: Option<u32>,
    pub per_try_timeout: Option<String>,
}

/// One `circuit_breakers` entry as written.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct BreakerSpec {
    pub priority: Option<String>,
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

/// Compile `retry_policy`; `None` when absent or invalid (invalid adds an error).
pub fn retry(
    res: &Resource,
    spec: Option<&RetryPolicySpec>,
    diags: &mut Vec<Diagnostic>,
) -> Option<RetryPolicy> {
    let spec = spec?;
    let on = match spec.retry_on.as_deref() {
        // Emissary requires retry_on; Envoy's default class is the safest reading of a policy
        // that names none.
        None => RetryOn::GatewayError,
        Some(s) => match RetryOn::parse(s) {
            Some(on) => on,
            None => {
                diags.push(
                    Diagnostic::error(
                        "bad-retry-on",
                        &res.at("/spec/retry_policy/retry_on"),
                        format!("`{s}` is not a retry_on value"),
                    )
                    .with_help("use 5xx, gateway-error, connect-failure, retriable-4xx, refused-stream, retriable-status-codes or reset"),
                );
                return None;
            }
        },
    };
    let per_try_timeout = match spec.per_try_timeout.as_deref() {
        None => None,
        Some(s) => Some(positive(
            res,
            "/spec/retry_policy/per_try_timeout",
            s,
            diags,
        )?),
    };
    Some(RetryPolicy {
        on,
        num_retries: spec.num_retries.unwrap_or(1),
        per_try_timeout,
    })
}

/// Compile `circuit_breakers`: the `default`-priority entry (Legate routes everything at
/// default priority), missing fields at Envoy's defaults.
pub fn breaker(spec: &[BreakerSpec]) -> BreakerLimits {
    let d = BreakerLimits::default();
    let Some(b) = spec
        .iter()
        .find(|b| b.priority.as_deref().unwrap_or("default") == "default")
    else {
        return d;
    };
    BreakerLimits {
        max_connections: b.max_connections.unwrap_or(d.max_connections),
        max_pending_requests: b.max_pending_requests.unwrap_or(d.max_pending_requests),
        max_requests: b.max_requests.unwrap_or(d.max_requests),
        max_retries: b.max_retries.unwrap_or(d.max_retries),
    }
}

/// `cors` as written (each list may also be one comma-separated string).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct CorsSpec {
    pub origins: OneOrMany,
    pub methods: OneOrMany,
    pub headers: OneOrMany,
    pub exposed_headers: OneOrMany,
    pub credentials: bool,
    pub max_age: Option<String>,
    #[serde(rename = "v2CommaSeparatedOrigins")]
    pub v2_comma_separated_origins: Option<bool>,
}

fn csv(v: &OneOrMany) -> Vec<String> {
    v.to_vec()
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Compile `cors`. An origin is `*`, an exact origin, or (when it holds regex syntax) an
/// anchored regex, as Emissary reads them.
pub fn cors(res: &Resource, spec: Option<&CorsSpec>, diags: &mut Vec<Diagnostic>) -> Option<Cors> {
    let spec = spec?;
    let mut origins = Vec::new();
    for o in csv(&spec.origins) {
        if o == "*" {
            origins.push(OriginMatch::Any);
        } else if o.contains(['^', '$', '*', '+', '?', '(', '[', '{', '|', '\\']) {
            match regex::Regex::new(&format!("^(?:{o})$")) {
                Ok(r) => origins.push(OriginMatch::Regex(r)),
                Err(_) => diags.push(
                    Diagnostic::error(
                        "bad-regex",
                        &res.at("/spec/cors/origins"),
                        format!("the origin `{o}` is neither an origin nor a valid regex"),
                    )
                    .with_help("write an origin like https://app.example.com, `*`, or a regex such as https://.*\\.example\\.com"),
                ),
            }
        } else {
            origins.push(OriginMatch::Exact(o));
        }
    }
    Some(Cors {
        origins,
        methods: csv(&spec.methods),
        headers: csv(&spec.headers),
        exposed_headers: csv(&spec.exposed_headers),
        credentials: spec.credentials,
        // The schema admits digits only.
        max_age: spec.max_age.as_deref().and_then(|s| s.parse().ok()),
    })
}

/// `load_balancer` as written.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct LoadBalancerSpec {
    pub policy: Option<String>,
    pub cookie: Option<CookieSpec>,
    pub header: Option<String>,
    pub source_ip: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct CookieSpec {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<String>,
}

/// Compile `load_balancer` (the schema has already checked the policy names).
pub fn load_balancer(spec: &LoadBalancerSpec) -> LoadBalancer {
    let policy = match spec.policy.as_deref() {
        Some("least_request") => LbPolicy::LeastRequest,
        Some("ring_hash") => LbPolicy::RingHash,
        Some("maglev") => LbPolicy::Maglev,
        _ => LbPolicy::RoundRobin,
    };
    let key = if let Some(h) = &spec.header {
        Some(HashKey::Header(h.to_ascii_lowercase()))
    } else if let Some(c) = &spec.cookie {
        Some(HashKey::Cookie(c.name.clone()))
    } else if spec.source_ip == Some(true) {
        Some(HashKey::SourceIp)
    } else {
        None
    };
    LoadBalancer { policy, key }
}

/// `outlier_detection` as written (Envoy's field names).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierSpec {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_failure: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

/// A positive duration at `ptr`, or an error diagnostic.
fn positive(res: &Resource, ptr: &str, s: &str, diags: &mut Vec<Diagnostic>) -> Option<Duration> {
    match go_duration(s) {
        Some(d) if !d.is_zero() => Some(d),
        _ => {
            diags.push(
                Diagnostic::error(
                    "bad-duration",
                    &res.at(ptr),
                    format!("`{s}` is not a positive duration"),
                )
                .with_help("write a duration such as 250ms, 2s or 1m30s"),
            );
            None
        }
    }
}

/// Compile `outlier_detection`: an object, or a string holding one in YAML or JSON (the field
/// is a string in Emissary's CRD). Missing fields take Envoy's defaults.
pub fn outlier(
    res: &Resource,
    spec: Option<&serde_json::Value>,
    diags: &mut Vec<Diagnostic>,
) -> Option<OutlierDetection> {
    const PTR: &str = "/spec/outlier_detection";
    let value = match spec? {
        serde_json::Value::String(s) if s.trim().is_empty() => return None,
        serde_json::Value::String(s) => {
            super::yaml::parse_documents(s, super::yaml::YamlLimits::default())
                .ok()
                .and_then(|mut d| (!d.is_empty()).then(|| d.remove(0).value))
                .unwrap_or(serde_json::Value::Null)
        }
        v => v.clone(),
    };
    let spec: OutlierSpec = match serde_json::from_value(value) {
        Ok(s) => s,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    "bad-outlier-detection",
                    &res.at(PTR),
                    format!("outlier_detection is not an outlier detection policy: {e}"),
                )
                .with_help("write a mapping such as {consecutive_5xx: 5, base_ejection_time: 30s, max_ejection_percent: 10}"),
            );
            return None;
        }
    };
    let d = OutlierDetection::default();
    let dur = |field: &str, v: &Option<String>, dflt: Duration, diags: &mut Vec<Diagnostic>| {
        v.as_deref().map_or(Some(dflt), |s| {
            positive(res, &format!("{PTR}/{field}"), s, diags)
        })
    };
    let interval = dur("interval", &spec.interval, d.interval, diags)?;
    let base_ejection_time = dur(
        "base_ejection_time",
        &spec.base_ejection_time,
        d.base_ejection_time,
        diags,
    )?;
    Some(OutlierDetection {
        consecutive_5xx: spec.consecutive_5xx.unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: spec
            .consecutive_gateway_failure
            .unwrap_or(d.consecutive_gateway_failure),
        interval,
        base_ejection_time,
        max_ejection_percent: spec
            .max_ejection_percent
            .unwrap_or(d.max_ejection_percent)
            .min(100),
    })
}

/// One `health_checks` entry as written (Emissary's v3alpha1 field names).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct HealthCheckSpec {
    pub unhealthy_threshold: Option<u32>,
    pub healthy_threshold: Option<u32>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub health_check: ProbeSpec,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct ProbeSpec {
    pub http: Option<HttpProbeSpec>,
    pub grpc: Option<GrpcProbeSpec>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct HttpProbeSpec {
    pub path: String,
    pub hostname: Option<String>,
    pub add_request_headers: std::collections::BTreeMap<String, super::model::AddedHeader>,
    pub remove_request_headers: OneOrMany,
    pub expected_statuses: Vec<StatusRange>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct GrpcProbeSpec {
    pub upstream_name: String,
    pub authority: Option<String>,
}

/// Emissary's (and Envoy's usual) defaults: a check every 5 s, 3 s to answer, unhealthy after 2
/// failures, healthy again after 1 pass.
pub const HC_INTERVAL: Duration = Duration::from_secs(5);
pub const HC_TIMEOUT: Duration = Duration::from_secs(3);
pub const HC_UNHEALTHY: u32 = 2;
pub const HC_HEALTHY: u32 = 1;

/// Compile `health_checks`.
pub fn health_checks(
    res: &Resource,
    specs: &[HealthCheckSpec],
    diags: &mut Vec<Diagnostic>,
) -> Vec<HealthCheck> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let at = format!("/spec/health_checks/{i}");
        let dur = |f: &str, v: &Option<String>, d: Duration, diags: &mut Vec<Diagnostic>| {
            v.as_deref()
                .map_or(Some(d), |s| positive(res, &format!("{at}/{f}"), s, diags))
        };
        let interval = dur("interval", &spec.interval, HC_INTERVAL, diags);
        let timeout = dur("timeout", &spec.timeout, HC_TIMEOUT, diags);
        let probe = match (&spec.health_check.http, &spec.health_check.grpc) {
            (Some(h), _) => {
                if h.expected_statuses.iter().any(|r| r.min > r.max) {
                    diags.push(
                        Diagnostic::error(
                            "bad-status-range",
                            &res.at(&format!("{at}/health_check/http/expected_statuses")),
                            "a status range has min above max",
                        )
                        .with_help("write ranges such as {min: 200, max: 399}"),
                    );
                    continue;
                }
                Some(Probe::Http {
                    path: h.path.clone(),
                    hostname: h.hostname.clone(),
                    add_headers: h
                        .add_request_headers
                        .iter()
                        .filter_map(|(k, v)| match v {
                            super::model::AddedHeader::Full { value, .. }
                            | super::model::AddedHeader::Text(value) => {
                                Some((k.to_ascii_lowercase(), value.clone()))
                            }
                            super::model::AddedHeader::Other(_) => None,
                        })
                        .collect(),
                    remove_headers: h
                        .remove_request_headers
                        .to_vec()
                        .iter()
                        .map(|s| s.to_ascii_lowercase())
                        .collect(),
                    expected: if h.expected_statuses.is_empty() {
                        vec![(200, 299)]
                    } else {
                        h.expected_statuses.iter().map(|r| (r.min, r.max)).collect()
                    },
                })
            }
            (None, Some(g)) => Some(Probe::Grpc {
                service: g.upstream_name.clone(),
                authority: g.authority.clone(),
            }),
            // The schema requires exactly one.
            (None, None) => None,
        };
        if let (Some(interval), Some(timeout), Some(probe)) = (interval, timeout, probe) {
            out.push(HealthCheck {
                interval,
                timeout,
                unhealthy_threshold: spec.unhealthy_threshold.unwrap_or(HC_UNHEALTHY).max(1),
                healthy_threshold: spec.healthy_threshold.unwrap_or(HC_HEALTHY).max(1),
                probe,
            });
        }
    }
    out
}

/// A Go-style duration (`1h2m3.5s`, `250ms`, `10us`), as the schema's pattern admits.
pub fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&n| n > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let units: [(&str, f64); 7] = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ];
        let (unit, scale) = units.iter().find(|(u, _)| rest.starts_with(u))?;
        total += value * scale;
        rest = &rest[unit.len()..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("10us"), Some(Duration::from_micros(10)));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("ms"), None);
    }

    #[test]
    fn breaker_defaults_and_priority() {
        assert_eq!(breaker(&[]), BreakerLimits::default());
        let b = breaker(&[
            BreakerSpec {
                priority: Some("high".into()),
                max_requests: Some(1),
                ..Default::default()
            },
            BreakerSpec {
                max_requests: Some(5),
                ..Default::default()
            },
        ]);
        assert_eq!(b.max_requests, 5);
        assert_eq!(b.max_connections, 1024);
        assert_eq!(b.max_retries, 3);
    }
}
