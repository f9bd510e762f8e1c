//! `getambassador.io/v2` (and `v1`) documents rewritten as `getambassador.io/v3alpha1`, the way
//! Emissary's own conversion does (`pkg/api/getambassador.io/v2/handwritten.conversion.go`).
//!
//! Owns: the pure value-to-value conversion, used by the loader (an older document is read as
//! its v3alpha1 form, with a note) and by `legate convert` (which writes that form back). Must
//! not read files or judge the result: the converted document goes through the same schema and
//! compile as any other.

use serde_json::{Map, Value};

/// The apiVersion every converted document gets.
pub const TARGET: &str = "getambassador.io/v3alpha1";

/// Older getambassador.io versions Legate converts on load.
pub const OLDER: [&str; 2] = ["getambassador.io/v2", "getambassador.io/v1"];

/// Fields the conversion renames (JSON pointers, old to new), so findings keep their lines.
pub const RENAMED: [(&str, &str); 8] = [
    ("/spec/host", "/spec/hostname"),
    ("/spec/headers", "/spec/regex_headers"),
    ("/spec/query_parameters", "/spec/regex_query_parameters"),
    ("/spec/use_websocket", "/spec/allow_upgrade"),
    ("/spec/selector", "/spec/mappingSelector"),
    ("/spec/ambassadorId", "/spec/ambassador_id"),
    ("/spec/v3StatsName", "/spec/stats_name"),
    ("/spec/v3health_checks", "/spec/health_checks"),
];

/// Whether `api`/`kind` is an older version this module converts. There is no v1 Host.
pub fn converts(api: &str, kind: &str) -> bool {
    match api {
        "getambassador.io/v2" => true,
        "getambassador.io/v1" => kind != "Host",
        _ => false,
    }
}

/// The v3alpha1 form of an older document (`apiVersion` already checked with [`converts`]).
/// Kinds without spec changes only get the new apiVersion.
pub fn to_v3alpha1(doc: &Value) -> Value {
    let mut out = doc.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    obj.insert("apiVersion".into(), Value::String(TARGET.into()));
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let kind = kind.to_string();
    if let Some(Value::Object(spec)) = obj.get_mut("spec") {
        match kind.as_str() {
            "Mapping" => mapping(spec),
            "Host" => host(spec),
            "AuthService" => {
                rename(
                    spec,
                    &[
                        ("v3StatsName", "stats_name"),
                        ("v3CircuitBreakers", "circuit_breakers"),
                    ],
                );
                tls_and_service(spec, "auth_service");
            }
            "RateLimitService" | "TCPMapping" => tls_and_service(spec, "service"),
            _ => {}
        }
    }
    out
}

/// v2 spellings of fields that exist under another name in v3alpha1 (generated conversion).
fn rename(spec: &mut Map<String, Value>, renames: &[(&str, &str)]) {
    for (old, new) in renames {
        if let Some(v) = spec.remove(*old) {
            spec.entry(*new).or_insert(v);
        }
    }
}

fn mapping(spec: &mut Map<String, Value>) {
    rename(
        spec,
        &[
            ("v3StatsName", "stats_name"),
            ("v3health_checks", "health_checks"),
        ],
    );
    tls_and_service(spec, "service");
    bool_matches(spec, "headers", "regex_headers");
    bool_matches(spec, "query_parameters", "regex_query_parameters");
    // v2 `host` is v3alpha1's `hostname`, unless it is a regex (then it stays `host`).
    let host_regex = spec.get("host_regex").and_then(Value::as_bool) == Some(true);
    if !host_regex {
        match spec.remove("host") {
            Some(Value::String(h)) if !h.is_empty() => {
                spec.insert("hostname".into(), Value::String(h));
            }
            _ => {
                spec.insert("hostname".into(), Value::String("*".into()));
            }
        }
        spec.remove("host_regex");
    }
    if spec.remove("use_websocket").and_then(|v| v.as_bool()) == Some(true) {
        let list = spec
            .entry("allow_upgrade")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            if !a.iter().any(|v| {
                v.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("websocket"))
            }) {
                a.push(Value::String("websocket".into()));
            }
        }
    }
    for key in ["add_request_headers", "add_response_headers"] {
        if let Some(Value::Object(h)) = spec.get_mut(key) {
            for v in h.values_mut() {
                if !v.is_object() && !v.is_null() {
                    let s = match &*v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    *v = serde_json::json!({ "value": s });
                }
            }
        }
    }
    if let Some(Value::Object(cors)) = spec.get_mut("cors") {
        for key in ["origins", "methods", "headers", "exposed_headers"] {
            if let Some(Value::String(s)) = cors.get(key) {
                let list = s
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| Value::String(p.into()))
                    .collect();
                cors.insert(key.into(), Value::Array(list));
            }
        }
    }
    if let Some(Value::Object(domains)) = spec.get_mut("labels") {
        for groups in domains.values_mut() {
            let Value::Array(groups) = groups else {
                continue;
            };
            for group in groups.iter_mut() {
                let Value::Object(group) = group else {
                    continue;
                };
                for specifiers in group.values_mut() {
                    if let Value::Array(list) = specifiers {
                        for s in list.iter_mut() {
                            *s = label_specifier(s);
                        }
                    }
                }
            }
        }
    }
}

/// One v2 rate-limit label specifier in its v3alpha1 longhand.
fn label_specifier(s: &Value) -> Value {
    use serde_json::json;
    match s {
        Value::String(k) => match k.as_str() {
            "source_cluster" | "destination_cluster" | "remote_address" => {
                json!({ k.clone(): { "key": k } })
            }
            other => json!({ "generic_key": { "value": other } }),
        },
        Value::Object(o) => {
            // Already longhand v3alpha1 (a known specifier kind whose value is an object).
            const V3: [&str; 5] = [
                "source_cluster",
                "destination_cluster",
                "remote_address",
                "request_headers",
                "generic_key",
            ];
            if o.len() == 1
                && o.iter()
                    .all(|(k, v)| V3.contains(&k.as_str()) && v.is_object())
            {
                return s.clone();
            }
            if let Some(Value::String(g)) = o.get("generic_key") {
                let mut gk = Map::new();
                gk.insert("value".into(), Value::String(g.clone()));
                if let Some(k) = o.get("v3Key").or_else(|| o.get("key")) {
                    gk.insert("key".into(), k.clone());
                }
                return json!({ "generic_key": gk });
            }
            // `{key: {header, omit_if_not_present}}`.
            if let Some((key, Value::Object(h))) = o.iter().next() {
                let mut rh = Map::new();
                rh.insert("key".into(), Value::String(key.clone()));
                if let Some(name) = h.get("header") {
                    rh.insert("header_name".into(), name.clone());
                }
                if let Some(omit) = h.get("omit_if_not_present") {
                    rh.insert("omit_if_not_present".into(), omit.clone());
                }
                return json!({ "request_headers": rh });
            }
            s.clone()
        }
        other => other.clone(),
    }
}

/// `headers: {x: true}` becomes `regex_headers: {x: ".*"}`; `false` is dropped.
fn bool_matches(spec: &mut Map<String, Value>, exact: &str, regex: &str) {
    let Some(Value::Object(m)) = spec.get_mut(exact) else {
        return;
    };
    let mut present = Vec::new();
    m.retain(|k, v| match v {
        Value::Bool(true) => {
            present.push(k.clone());
            false
        }
        Value::Bool(false) => false,
        _ => true,
    });
    if m.is_empty() {
        spec.remove(exact);
    }
    if present.is_empty() {
        return;
    }
    let r = spec
        .entry(regex)
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(r) = r {
        for k in present {
            r.entry(k).or_insert_with(|| Value::String(".*".into()));
        }
    }
}

/// v2 `tls: true` (or a scheme-less service with it) becomes an `https://` service; a named
/// `tls` (a TLSContext) is kept as it is; `tls: false` or `""` is dropped.
fn tls_and_service(spec: &mut Map<String, Value>, service_key: &str) {
    let tls = spec.remove("tls");
    let named = match &tls {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    if let Some(name) = named {
        spec.insert("tls".into(), Value::String(name));
        return;
    }
    if tls.and_then(|v| v.as_bool()) != Some(true) {
        return;
    }
    if let Some(Value::String(svc)) = spec.get_mut(service_key) {
        let lower = svc.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return;
        }
        let bare = if lower.starts_with("http://") {
            &svc["http://".len()..]
        } else {
            svc.as_str()
        };
        *svc = format!("https://{bare}");
    }
}

fn host(spec: &mut Map<String, Value>) {
    if let Some(Value::Object(tls)) = spec.get_mut("tls") {
        rename(tls, &[("v3CRLSecret", "crl_secret")]);
    }
    if let Some(sel) = spec.remove("selector") {
        spec.entry("mappingSelector").or_insert(sel);
    }
    // v2's deprecated `ambassadorId` merges into `ambassador_id`.
    if let Some(old) = spec.remove("ambassadorId") {
        let mut ids: Vec<Value> = match spec.remove("ambassador_id") {
            Some(Value::Array(a)) => a,
            Some(Value::String(s)) => vec![Value::String(s)],
            _ => Vec::new(),
        };
        match old {
            Value::Array(a) => ids.extend(a),
            Value::String(s) => ids.push(Value::String(s)),
            _ => {}
        }
        spec.insert("ambassador_id".into(), Value::Array(ids));
    }
}

/// Convert the older documents of one file's text. Documents that need no conversion keep
/// their text byte for byte; a converted one is written anew (its own comments are lost, the
/// comment lines before it are kept). `None` when nothing in the file needed converting.
pub fn convert_text(text: &str) -> Result<Option<(String, usize)>, super::yaml::YamlError> {
    let mut out = String::with_capacity(text.len());
    let mut total = 0;
    for (sep, chunk) in split_documents(text) {
        out.push_str(sep);
        let docs = super::yaml::parse_documents(chunk, super::yaml::YamlLimits::default())?;
        let [doc] = docs.as_slice() else {
            out.push_str(chunk);
            continue;
        };
        let mut value = doc.value.clone();
        let n = convert_value(&mut value);
        if n == 0 {
            out.push_str(chunk);
            continue;
        }
        total += n;
        // Keep the comments and blank lines that lead the document.
        for line in chunk.lines() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                out.push_str(line);
                out.push('\n');
            } else {
                break;
            }
        }
        out.push_str(&super::yaml::to_yaml(&value));
    }
    Ok((total > 0).then_some((out, total)))
}

/// Convert in place: a resource, a YAML list of them or a `kind: List`; how many converted.
fn convert_value(v: &mut Value) -> usize {
    match v {
        Value::Array(items) => items.iter_mut().map(convert_value).sum(),
        Value::Object(o) if o.get("kind").and_then(Value::as_str) == Some("List") => {
            o.get_mut("items").map_or(0, convert_value)
        }
        Value::Object(o) => {
            let api = o
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = o.get("kind").and_then(Value::as_str).unwrap_or_default();
            if converts(api, kind) {
                *v = to_v3alpha1(v);
                1
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// The file's documents as (separator line, text) pairs, split at `---` lines.
fn split_documents(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let (mut sep_start, mut sep_end, mut start) = (0, 0, 0);
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            out.push((&text[sep_start..sep_end], &text[start..pos]));
            sep_start = pos;
            sep_end = pos + line.len();
            start = sep_end;
        }
        pos += line.len();
    }
    out.push((&text[sep_start..sep_end], &text[start..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(spec: Value) -> Value {
        to_v3alpha1(&json!({"apiVersion": "getambassador.io/v2", "kind": "Mapping", "spec": spec}))
            ["spec"]
            .clone()
    }

    #[test]
    fn host_becomes_hostname_and_missing_host_is_star() {
        assert_eq!(
            conv(json!({"prefix": "/a/", "service": "a", "host": "*.example.com"})),
            json!({"prefix": "/a/", "service": "a", "hostname": "*.example.com"})
        );
        assert_eq!(
            conv(json!({"prefix": "/a/", "service": "a"}))["hostname"],
            "*"
        );
        let r = conv(json!({"prefix": "/a/", "service": "a", "host": "^a.*", "host_regex": true}));
        assert_eq!(r["host"], "^a.*");
        assert!(r.get("hostname").is_none());
    }

    #[test]
    fn bool_headers_and_query_parameters() {
        let r = conv(json!({"prefix": "/", "service": "a",
            "headers": {"x-a": true, "x-b": false, "x-c": "c"},
            "query_parameters": {"q": true}}));
        assert_eq!(r["headers"], json!({"x-c": "c"}));
        assert_eq!(r["regex_headers"], json!({"x-a": ".*"}));
        assert_eq!(r["regex_query_parameters"], json!({"q": ".*"}));
        assert!(r.get("query_parameters").is_none());
    }

    #[test]
    fn tls_forms() {
        assert_eq!(
            conv(json!({"service": "a:8443", "tls": true}))["service"],
            "https://a:8443"
        );
        assert_eq!(
            conv(json!({"service": "http://a", "tls": true}))["service"],
            "https://a"
        );
        let named = conv(json!({"service": "a", "tls": "upstream-ctx"}));
        assert_eq!(named["tls"], "upstream-ctx");
        assert_eq!(named["service"], "a");
        let off = conv(json!({"service": "a", "tls": false}));
        assert!(off.get("tls").is_none());
    }

    #[test]
    fn shorthands_expand() {
        let renamed = conv(json!({"service": "a", "v3StatsName": "s", "v3health_checks": []}));
        assert_eq!(renamed["stats_name"], "s");
        assert_eq!(renamed["health_checks"], json!([]));
        let r = conv(json!({"service": "a", "use_websocket": true,
            "add_request_headers": {"x-a": "1", "x-b": {"value": "2", "append": false}},
            "cors": {"origins": "https://a.test, https://b.test"},
            "labels": {"ambassador": [{"g": ["remote_address", "lit",
                {"user": {"header": "x-user", "omit_if_not_present": true}},
                {"generic_key": "gk"}]}]}}));
        assert_eq!(r["allow_upgrade"], json!(["websocket"]));
        assert!(r.get("use_websocket").is_none());
        assert_eq!(
            r["add_request_headers"],
            json!({"x-a": {"value": "1"}, "x-b": {"value": "2", "append": false}})
        );
        assert_eq!(
            r["cors"]["origins"],
            json!(["https://a.test", "https://b.test"])
        );
        assert_eq!(
            r["labels"]["ambassador"][0]["g"],
            json!([
                {"remote_address": {"key": "remote_address"}},
                {"generic_key": {"value": "lit"}},
                {"request_headers": {"key": "user", "header_name": "x-user", "omit_if_not_present": true}},
                {"generic_key": {"value": "gk"}}
            ])
        );
    }

    #[test]
    fn files_keep_what_needs_no_conversion() {
        let text = "# header\n---\n# a v3 one\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: a}\nspec: {prefix: /a/, service: a, hostname: '*'}\n---\n# old\napiVersion: getambassador.io/v2\nkind: Mapping\nmetadata:\n  name: b\nspec:\n  prefix: /b/\n  service: b\n  host: b.test\n";
        let (out, n) = convert_text(text).unwrap().unwrap();
        assert_eq!(n, 1);
        assert!(out.starts_with("# header\n---\n# a v3 one\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: a}\n"), "{out}");
        assert!(
            out.contains("---\n# old\napiVersion: getambassador.io/v3alpha1\n"),
            "{out}"
        );
        assert!(out.contains("hostname: b.test"), "{out}");
        assert!(convert_text(&out).unwrap().is_none());
        assert!(convert_text("apiVersion: v1\nkind: Service\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn host_selector_and_ambassador_id() {
        let h = to_v3alpha1(&json!({"apiVersion": "getambassador.io/v2", "kind": "Host",
            "spec": {"hostname": "a.test", "selector": {"matchLabels": {"a": "b"}},
                     "ambassador_id": ["one"], "ambassadorId": ["two"]}}));
        assert_eq!(h["apiVersion"], TARGET);
        assert_eq!(
            h["spec"]["mappingSelector"],
            json!({"matchLabels": {"a": "b"}})
        );
        assert_eq!(h["spec"]["ambassador_id"], json!(["one", "two"]));
        assert!(converts("getambassador.io/v1", "Mapping"));
        assert!(!converts("getambassador.io/v1", "Host"));
    }
}
