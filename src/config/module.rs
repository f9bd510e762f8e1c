//! Emissary's `Module` (name `ambassador`): its `config` read key by key.
//!
//! Owns: which Module keys Legate acts on, which it ignores as Emissary does, and what each of
//! the rest loses; the Mapping defaults a Module sets (applied to every Mapping's spec before
//! `compile`, so each route carries its own values), and the graph-wide
//! [`crate::routes::Settings`] the proxy reads per request. Pure.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::diag::{did_you_mean, Diagnostic};
use super::model::{Loaded, MappingSpec, Resource, Spec};
use super::schema::{self, Kind};
use super::yaml::{escape_pointer, Document};
use crate::routes::settings::{IpFilter, IpRule};
use crate::routes::{Graph, Settings};

/// A Module as read: its config, and what Legate made of it.
#[derive(Debug, Clone, Default)]
pub struct ModuleSpec {
    pub config: Map<String, Value>,
    /// Mapping fields every Mapping without them gets (Module keys named as Mapping fields).
    pub mapping_defaults: Map<String, Value>,
    /// Emissary's `defaults` for Mappings: `remove_*_headers`, `add_*_headers`, `stats_name`.
    pub defaults: Map<String, Value>,
    pub settings: Settings,
}

/// Module keys that are Mapping fields: a Mapping without the field takes the Module's value.
const MAPPING_DEFAULT_KEYS: [(&str, &str); 7] = [
    ("cluster_request_timeout_ms", "timeout_ms"),
    ("cors", "cors"),
    ("retry_policy", "retry_policy"),
    ("circuit_breakers", "circuit_breakers"),
    ("load_balancer", "load_balancer"),
    ("add_linkerd_headers", "add_linkerd_headers"),
    ("cluster_idle_timeout_ms", "cluster_idle_timeout_ms"),
];

/// The keys of Emissary's `defaults` that reach a Mapping (`irhttpmapping.py`).
const DEFAULTS_KEYS: [&str; 5] = [
    "add_request_headers",
    "add_response_headers",
    "remove_request_headers",
    "remove_response_headers",
    "stats_name",
];

/// Keys that change nothing in current Emissary either.
const IGNORED: [(&str, &str); 3] = [
    (
        "xff_num_trusted_hops",
        "Emissary reads the trusted hop count from the Listener's `l7Depth`, and so does Legate (`--xff-trusted-hops` on the listen flags' ports)",
    ),
    (
        "x_forwarded_proto_redirect",
        "insecure requests are redirected by each Host's `requestPolicy.insecure.action`",
    ),
    ("regex_type", "regexes are always RE2 (Legate's `regex` crate has the same syntax)"),
];

/// Emissary Module keys Legate does not act on, with what is lost.
const NOT_APPLIED: [(&str, &str); 42] = [
    ("admin_port", "the admin listener is `--admin-listen`"),
    (
        "allow_chunked_length",
        "requests with both Content-Length and chunked encoding are refused",
    ),
    ("ambassador_id", ""),
    (
        "auth_enabled",
        "the AuthService applies whenever one exists",
    ),
    ("buffer_limit_bytes", "Envoy's per-connection buffer size"),
    (
        "cluster_max_connection_lifetime_ms",
        "upstream connections are not closed by age",
    ),
    ("debug_mode", "Envoy debug logging; use `RUST_LOG`"),
    (
        "default_label_domain",
        "rate-limit labels name their domain (default `ambassador`)",
    ),
    (
        "default_labels",
        "default rate-limit labels are not added to Mappings",
    ),
    ("diag_port", "there is no diagnostics UI; see the admin API"),
    ("enable_grpc_http11_bridge", "gRPC-over-HTTP/1.1 bridging"),
    ("enable_grpc_web", "gRPC-Web translation"),
    (
        "enable_http10",
        "HTTP/1.0 requests are served as hyper serves them",
    ),
    (
        "enable_ipv4",
        "upstream names resolve to every address family",
    ),
    (
        "enable_ipv6",
        "upstream names resolve to every address family",
    ),
    (
        "envoy_log_format",
        "the access log is Legate's JSON line (`--access-log`)",
    ),
    (
        "envoy_log_path",
        "the access log goes where `--access-log` says",
    ),
    ("envoy_log_type", "the access log is always JSON"),
    ("envoy_validation_timeout", "there is no Envoy to validate"),
    ("error_response_overrides", "error bodies are Legate's own"),
    ("features", ""),
    (
        "forward_client_cert_details",
        "client certificates are not forwarded",
    ),
    ("grpc_stats", "no per-method gRPC statistics"),
    ("gzip", "responses are not compressed by the gateway"),
    (
        "header_case_overrides",
        "header names are sent lowercase (HTTP/1.1) as hyper writes them",
    ),
    (
        "headers_with_underscores_action",
        "headers with underscores are passed on",
    ),
    ("keepalive", "no TCP keepalive to upstreams"),
    (
        "listener_idle_timeout_ms",
        "the connection idle timeout is `--idle-timeout-ms`",
    ),
    (
        "liveness_probe",
        "the probes are `/ambassador/v0/check_alive` and `/healthz` on the admin listener",
    ),
    ("lua_scripts", "no Lua"),
    ("proper_case", "header names are sent lowercase"),
    (
        "prune_unreachable_routes",
        "routes are kept per Host as association decides",
    ),
    (
        "readiness_probe",
        "the probes are `/ambassador/v0/check_ready` and `/readyz` on the admin listener",
    ),
    (
        "regex_max_size",
        "regexes are bounded by Legate's own size limit",
    ),
    ("resolver", "services resolve through DNS"),
    ("runtime_flags", "there is no Envoy runtime"),
    (
        "service_port",
        "the listeners are `--http-listen` and `--https-listen`",
    ),
    (
        "set_current_client_cert_details",
        "client certificates are not forwarded",
    ),
    (
        "statsd",
        "metrics are Prometheus on the admin listener (`/metrics`)",
    ),
    ("suppress_envoy_headers", "Legate adds no x-envoy-* headers"),
    ("use_proxy_proto", "the PROXY protocol is not read"),
    (
        "use_ambassador_namespace_for_service_resolution",
        "a bare `service` is resolved as written (in Kubernetes mode: in the Mapping's namespace)",
    ),
];

/// Keys acted on (besides the Mapping defaults).
const ACTED: [&str; 12] = [
    "defaults",
    "use_remote_address",
    "server_name",
    "ip_allow",
    "ip_deny",
    "reject_requests_with_escaped_slashes",
    "strip_matching_host_port",
    "merge_slashes",
    "preserve_external_request_id",
    "buffer",
    "max_request_headers_kb",
    "diagnostics",
];

/// Read a Module's config: every key is acted on, ignored as Emissary ignores it, or warned
/// with what is lost. Values of acted-on keys are checked; bad ones are errors.
pub fn read(
    res_doc: &Document,
    file: &str,
    name: &str,
    spec: &Value,
) -> (ModuleSpec, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let at = |p: &str| schema::locate(res_doc, file, p);
    let config = spec
        .get("config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = ModuleSpec {
        config: config.clone(),
        ..ModuleSpec::default()
    };
    if name != "ambassador" {
        let what = if name == "tls" {
            "the `tls` Module is Emissary's old TLS setup; give each Host its `tlsSecret` instead"
        } else {
            "only the Module named `ambassador` configures Emissary"
        };
        diags.push(
            Diagnostic::warning(
                "module-ignored",
                &at("/metadata/name"),
                format!("Module `{name}` is ignored: {what}"),
            )
            .with_help("name the Module `ambassador` to configure the gateway"),
        );
        return (out, diags);
    }
    for (key, value) in &config {
        let ptr = format!("/spec/config/{}", escape_pointer(key));
        if let Some((_, field)) = MAPPING_DEFAULT_KEYS.iter().find(|(k, _)| k == key) {
            out.mapping_defaults.insert((*field).into(), value.clone());
            continue;
        }
        if ACTED.contains(&key.as_str()) {
            if let Err(msg) = act(key, value, &mut out) {
                diags.push(
                    Diagnostic::error("bad-module", &at(&ptr), format!("Module `{key}`: {msg}"))
                        .with_help(
                            "fix the value, as Emissary's Module documentation describes it",
                        ),
                );
            } else if let Some(d) = acted_warning(key, value, &at(&ptr)) {
                diags.push(d);
            }
            continue;
        }
        if let Some((_, why)) = IGNORED.iter().find(|(k, _)| k == key) {
            diags.push(
                Diagnostic::warning(
                    "module-ignored-key",
                    &at(&ptr),
                    format!("Module `{key}` does nothing in current Emissary and is ignored"),
                )
                .with_help(*why),
            );
            continue;
        }
        if let Some((_, lost)) = NOT_APPLIED.iter().find(|(k, _)| k == key) {
            if lost.is_empty() {
                continue;
            }
            diags.push(
                Diagnostic::warning(
                    "module-not-implemented",
                    &at(&ptr),
                    format!("Module `{key}` is not implemented by Legate; it is ignored"),
                )
                .with_help(format!("what is lost: {lost}")),
            );
            continue;
        }
        let known = MAPPING_DEFAULT_KEYS
            .iter()
            .map(|(k, _)| *k)
            .chain(ACTED)
            .chain(IGNORED.iter().map(|(k, _)| *k))
            .chain(NOT_APPLIED.iter().map(|(k, _)| *k));
        let mut d = Diagnostic::warning(
            "module-unknown-key",
            &at(&ptr),
            format!("Module `{key}` is not a key Emissary knows; it is ignored"),
        );
        if let Some(s) = did_you_mean(key, known) {
            d = d.with_help(format!("did you mean `{s}`?"));
        }
        diags.push(d);
    }
    diags.extend(check_mapping_defaults(res_doc, file, &out));
    (out, diags)
}

/// Warnings for settings that load but are not fully applied.
fn acted_warning(key: &str, value: &Value, loc: &super::diag::Location) -> Option<Diagnostic> {
    match (key, value) {
        ("use_remote_address", Value::Bool(false)) => Some(
            Diagnostic::note(
                "module-xff",
                loc,
                "with `use_remote_address: false` the client's X-Forwarded-For is forwarded as sent (the gateway does not add the connection's address)",
            )
            .with_help("only use it when a trusted proxy in front sets X-Forwarded-For"),
        ),
        _ => None,
    }
}

fn act(key: &str, value: &Value, out: &mut ModuleSpec) -> Result<(), String> {
    let s = &mut out.settings;
    let boolean = |v: &Value| {
        v.as_bool()
            .ok_or_else(|| "expected true or false".to_string())
    };
    match key {
        "defaults" => {
            let obj = value
                .as_object()
                .ok_or("expected an object of defaults (for example `httpmapping: {...}`)")?;
            // `defaults.httpmapping.K` wins over `defaults.K` (irresource.py `lookup_default`).
            for k in DEFAULTS_KEYS {
                let v = obj
                    .get("httpmapping")
                    .and_then(|c| c.get(k))
                    .or_else(|| obj.get(k));
                if let Some(v) = v {
                    out.defaults.insert(k.into(), v.clone());
                }
            }
        }
        "use_remote_address" => s.use_remote_address = boolean(value)?,
        "server_name" => {
            let name = value.as_str().ok_or("expected a string")?;
            http::HeaderValue::from_str(name).map_err(|_| "not a valid header value")?;
            s.server_name = Some(name.to_string());
        }
        "ip_allow" | "ip_deny" => {
            if s.ip_filter.is_some() {
                return Err("only one of ip_allow and ip_deny may be set".into());
            }
            s.ip_filter = Some(ip_filter(key == "ip_allow", value)?);
        }
        "reject_requests_with_escaped_slashes" => s.reject_escaped_slashes = boolean(value)?,
        "strip_matching_host_port" => s.strip_matching_host_port = boolean(value)?,
        "merge_slashes" => s.merge_slashes = Some(boolean(value)?),
        "preserve_external_request_id" => {
            s.preserve_external_request_id = Some(boolean(value)?);
        }
        "buffer" => {
            let max = value
                .get("max_request_bytes")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .ok_or("expected `{max_request_bytes: N}` with N > 0")?;
            s.max_request_body_bytes = Some(max);
        }
        "max_request_headers_kb" => {
            let kb = value
                .as_u64()
                .filter(|n| (1..=8192).contains(n))
                .ok_or("expected a number of KiB between 1 and 8192")?;
            s.max_request_header_bytes = Some(kb as usize * 1024);
        }
        "diagnostics" => {
            s.diagnostics = match value {
                Value::Bool(b) => *b,
                Value::Object(o) => o.get("enabled").and_then(Value::as_bool).unwrap_or(false),
                _ => return Err("expected `{enabled: true|false}`".into()),
            };
        }
        _ => {}
    }
    Ok(())
}

fn ip_filter(allow: bool, value: &Value) -> Result<IpFilter, String> {
    let list = value
        .as_array()
        .ok_or("expected a list of `{peer: CIDR}` or `{remote: CIDR}`")?;
    let mut rules = Vec::new();
    for item in list {
        let (kind, cidr) = match item.as_object().map(|o| o.iter().collect::<Vec<_>>()) {
            Some(pairs) if pairs.len() == 1 => (pairs[0].0.as_str(), pairs[0].1),
            _ => return Err("each entry is `{peer: CIDR}` or `{remote: CIDR}`".into()),
        };
        let peer = match kind {
            "peer" => true,
            "remote" => false,
            other => return Err(format!("`{other}` is neither `peer` nor `remote`")),
        };
        let net = cidr
            .as_str()
            .ok_or("the CIDR is a string such as `10.0.0.0/8`")?
            .parse()?;
        rules.push(IpRule { peer, net });
    }
    Ok(IpFilter { allow, rules })
}

/// The Module's Mapping-default values against the Mapping schema, located in the Module.
fn check_mapping_defaults(doc: &Document, file: &str, m: &ModuleSpec) -> Vec<Diagnostic> {
    let mut spec = Map::new();
    spec.insert("prefix".into(), Value::String("/".into()));
    spec.insert("service".into(), Value::String("module-defaults".into()));
    let mut positions = HashMap::new();
    for (module_key, field) in MAPPING_DEFAULT_KEYS {
        if let Some(v) = m.config.get(module_key) {
            let v = if field == "circuit_breakers" && v.is_object() {
                Value::Array(vec![v.clone()])
            } else {
                v.clone()
            };
            spec.insert(field.into(), v);
            let from = format!("/spec/config/{module_key}");
            for (p, pos) in &doc.positions {
                if let Some(rest) = p.strip_prefix(&from) {
                    positions.insert(format!("/spec/{field}{rest}"), *pos);
                }
            }
        }
    }
    for (k, v) in &m.defaults {
        spec.insert(k.clone(), v.clone());
    }
    let synthetic = Document {
        value: serde_json::json!({
            "apiVersion": "getambassador.io/v3alpha1",
            "kind": "Mapping",
            "metadata": {"name": "module-defaults"},
            "spec": spec,
        }),
        pos: doc.pos,
        positions,
    };
    schema::validate(Kind::Mapping, &synthetic, file)
        .into_iter()
        .map(|mut d| {
            if let Some(rest) = d.pointer.strip_prefix("/spec/") {
                let field = rest.split('/').next().unwrap_or_default();
                let key = MAPPING_DEFAULT_KEYS
                    .iter()
                    .find(|(_, f)| *f == field)
                    .map_or(field, |(k, _)| k);
                d.pointer = format!("/spec/config/{key}{}", &rest[field.len()..]);
            }
            d.message = format!("Module default for Mappings: {}", d.message);
            d
        })
        .collect()
}

/// The active Module (`ambassador`) of a revision; a second one is an error.
fn active(resources: &[Resource], diags: &mut Vec<Diagnostic>) -> Option<usize> {
    let found: Vec<usize> = resources
        .iter()
        .enumerate()
        .filter(|(_, r)| r.name == "ambassador" && matches!(r.spec, Spec::Module(_)))
        .map(|(i, _)| i)
        .collect();
    for &extra in found.iter().skip(1) {
        diags.push(
            Diagnostic::error(
                "duplicate-module",
                &resources[extra].at("/metadata/name"),
                format!(
                    "a second Module `ambassador` ({}); the first is {}",
                    resources[extra].id(),
                    resources[found[0]].loc
                ),
            )
            .with_help("keep one `ambassador` Module per gateway (ambassador_id splits gateways)"),
        );
    }
    found.first().copied()
}

/// Give every Mapping the Module's defaults for the fields it does not set itself, then turn
/// `add_linkerd_headers` into the `l5d-dst-override` header Emissary adds.
pub fn apply_defaults(loaded: &mut Loaded) {
    let mut diags = Vec::new();
    let module =
        active(&loaded.resources, &mut diags).and_then(|i| match &loaded.resources[i].spec {
            Spec::Module(m) => Some((**m).clone()),
            _ => None,
        });
    loaded.diagnostics.extend(diags);
    for r in &mut loaded.resources {
        let Spec::Mapping(spec) = &mut r.spec else {
            continue;
        };
        let written = r
            .doc
            .value
            .get("spec")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(m) = &module {
            let mut extra = Map::new();
            for (field, v) in m.mapping_defaults.iter().chain(&m.defaults) {
                if !written.contains_key(field) {
                    let v = if field == "circuit_breakers" && v.is_object() {
                        Value::Array(vec![v.clone()])
                    } else {
                        v.clone()
                    };
                    extra.insert(field.clone(), v);
                }
            }
            if !extra.is_empty() {
                let mut merged = written.clone();
                merged.extend(extra);
                // Both were checked against the Mapping schema, so this reads.
                if let Ok(s) = serde_json::from_value::<MappingSpec>(Value::Object(merged)) {
                    **spec = s;
                }
            }
        }
        if spec.add_linkerd_headers && !spec.host_redirect {
            if let Ok(up) = spec.service.parse::<crate::routes::Upstream>() {
                spec.add_request_headers
                    .entry("l5d-dst-override".into())
                    .or_insert(super::model::AddedHeader::Text(up.authority()));
            }
        }
    }
}

/// The graph-wide settings of the revision's `ambassador` Module, if it has one.
pub fn settings<'r>(resources: &[&'r Resource]) -> Option<&'r Settings> {
    resources.iter().find_map(|r| match &r.spec {
        Spec::Module(m) if r.name == "ambassador" => Some(&m.settings),
        _ => None,
    })
}

/// Put the active Module's settings on the compiled graph; with `diagnostics` enabled, warn
/// about Mappings whose prefix it takes.
pub fn attach(graph: &mut Graph, resources: &[&Resource], diags: &mut Vec<Diagnostic>) {
    let Some(settings) = settings(resources) else {
        return;
    };
    graph.settings = settings.clone();
    if graph.settings.diagnostics {
        for r in resources {
            if let Spec::Mapping(spec) = &r.spec {
                if !spec.prefix_regex
                    && spec
                        .prefix
                        .starts_with(crate::routes::settings::DIAG_PREFIX)
                {
                    diags.push(
                        Diagnostic::warning(
                            "diagnostics-prefix",
                            &r.at("/spec/prefix"),
                            format!(
                                "Mapping `{}` is under `/ambassador/v0/`, which the Module's `diagnostics` keeps for the gateway: it serves nothing",
                                r.name
                            ),
                        )
                        .with_help("set `diagnostics: {enabled: false}` in the Module, or move the Mapping"),
                    );
                }
            }
        }
    }
    // The Module's spec is part of the graph hash already (compile::graph_hash).
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_config(config: Value) -> (ModuleSpec, Vec<Diagnostic>) {
        let spec = json!({ "config": config });
        let doc = Document {
            value: json!({"spec": spec.clone()}),
            pos: Default::default(),
            positions: HashMap::new(),
        };
        read(&doc, "m.yaml", "ambassador", &spec)
    }

    #[test]
    fn defaults_prefer_the_httpmapping_class() {
        let (m, d) = read_config(json!({"defaults": {
            "httpmapping": {"stats_name": "class"},
            "stats_name": "top",
            "add_request_headers": {"x-a": "1"},
            "timeout_ms": 5
        }}));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(m.defaults["stats_name"], "class");
        assert_eq!(m.defaults["add_request_headers"], json!({"x-a": "1"}));
        // Only Emissary's list of defaulted keys reaches Mappings.
        assert!(!m.defaults.contains_key("timeout_ms"));
    }

    #[test]
    fn settings_and_their_errors() {
        let (m, d) = read_config(json!({
            "use_remote_address": false,
            "server_name": "edge",
            "ip_deny": [{"remote": "192.0.2.0/24"}],
            "max_request_headers_kb": 4,
            "diagnostics": {"enabled": true}
        }));
        assert!(
            d.iter()
                .all(|d| d.severity != super::super::Severity::Error),
            "{d:?}"
        );
        let s = &m.settings;
        assert!(!s.use_remote_address && s.diagnostics);
        assert_eq!(s.server_name.as_deref(), Some("edge"));
        assert_eq!(s.max_request_header_bytes, Some(4096));
        let f = s.ip_filter.as_ref().unwrap();
        let (a, b) = ("127.0.0.1".parse().unwrap(), "192.0.2.7".parse().unwrap());
        assert!(!f.admits(a, b) && f.admits(a, a));
        let (_, d) = read_config(json!({"ip_allow": [], "ip_deny": []}));
        assert!(d
            .iter()
            .any(|d| d.message.contains("only one of ip_allow and ip_deny")));
        let (_, d) = read_config(json!({"buffer": {"max_request_bytes": 0}}));
        assert!(d.iter().any(|d| d.code == "bad-module"));
    }
}
