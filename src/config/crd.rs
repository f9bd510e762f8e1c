//! CustomResourceDefinitions generated from `schemas/`, so the cluster and `legate check` share
//! one description of each kind.
//!
//! Kubernetes wants a *structural* schema: every node typed, no `$ref`, no `const`, no
//! `additionalProperties: false`, and unions only over one type. Subtrees our JSON Schema states
//! as unions of different types are kept open (`x-kubernetes-preserve-unknown-fields`), and so
//! is `spec` as a whole: the API server must not prune a misspelled field, so that Legate's own
//! validation can report it (with its "did you mean") on the resource's status.

use serde_json::{json, Map, Value};

use super::schema::Kind;

/// Plural resource name of a kind.
pub fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Mapping => "mappings",
        Kind::Host => "hosts",
        Kind::RouteTest => "routetests",
        Kind::AuthService => "authservices",
        Kind::JwtPolicy => "jwtpolicies",
        Kind::OidcLogin => "oidclogins",
        Kind::RateLimit => "ratelimits",
        Kind::Module => "modules",
        Kind::TlsContext => "tlscontexts",
        Kind::TracingService => "tracingservices",
        Kind::Listener => "listeners",
        Kind::TcpMapping => "tcpmappings",
    }
}

fn printer_columns(kind: Kind) -> Value {
    let state = json!({"name": "State", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].reason"});
    let age = json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"});
    let col = |name: &str, path: &str| json!({"name": name, "type": "string", "jsonPath": path});
    Value::Array(match kind {
        Kind::Mapping => vec![
            col("Hostname", ".spec.hostname"),
            col("Prefix", ".spec.prefix"),
            col("Service", ".spec.service"),
            state,
            age,
        ],
        Kind::Host => vec![
            col("Hostname", ".spec.hostname"),
            col("TLS Secret", ".spec.tlsSecret.name"),
            state,
            age,
        ],
        Kind::RouteTest => vec![state, age],
        Kind::AuthService => vec![col("Service", ".spec.auth_service"), state, age],
        Kind::JwtPolicy => vec![col("Issuer", ".spec.issuer"), state, age],
        Kind::OidcLogin => vec![col("Issuer", ".spec.issuer"), state, age],
        Kind::RateLimit => vec![col("Backend", ".spec.backend"), state, age],
        Kind::Module => vec![state, age],
        Kind::TlsContext => vec![col("Secret", ".spec.secret"), state, age],
        Kind::TracingService => vec![col("Service", ".spec.service"), state, age],
        Kind::Listener => vec![col("Port", ".spec.port"), state, age],
        Kind::TcpMapping => vec![
            col("Port", ".spec.port"),
            col("Service", ".spec.service"),
            state,
            age,
        ],
    })
}

/// The CRD of `kind` as a JSON value.
pub fn crd(kind: Kind) -> Value {
    let schema: Value = serde_json::from_str(kind.schema_text()).unwrap_or(Value::Null);
    let spec = schema
        .pointer("/properties/spec")
        .cloned()
        .unwrap_or(Value::Null);
    let mut spec = structural(&schema, &spec, 0);
    if let Value::Object(m) = &mut spec {
        m.insert(
            "x-kubernetes-preserve-unknown-fields".into(),
            Value::Bool(true),
        );
        // The server must accept what Legate would reject, so Legate can say why on status.
        m.remove("required");
    }
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let name = kind.name();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.legate.dev", plural(kind)),
            "labels": {"app.kubernetes.io/part-of": "legate"},
            "annotations": {"legate.dev/generated-from": kind.schema_file()},
        },
        "spec": {
            "group": "legate.dev",
            "scope": "Namespaced",
            "names": {
                "kind": name,
                "listKind": format!("{name}List"),
                "plural": plural(kind),
                "singular": name.to_ascii_lowercase(),
                "categories": ["legate"],
            },
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns(kind),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": schema.get("description").cloned().unwrap_or(Value::Null),
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": open,
                    },
                }},
            }],
        },
    })
}

fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with('#') => root.pointer(&r[1..]).unwrap_or(s),
        _ => s,
    }
}

/// Keywords a structural schema keeps as they are.
const KEEP: [&str; 13] = [
    "description",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "enum",
    "format",
    "minProperties",
    "maxProperties",
    "required",
];

fn open_node(description: Option<&Value>) -> Value {
    let mut m = Map::new();
    if let Some(d) = description {
        m.insert("description".into(), d.clone());
    }
    m.insert(
        "x-kubernetes-preserve-unknown-fields".into(),
        Value::Bool(true),
    );
    Value::Object(m)
}

fn structural(root: &Value, s: &Value, depth: usize) -> Value {
    let desc_outer = s.get("description").cloned();
    let s = resolve(root, s);
    let description = desc_outer.as_ref().or(s.get("description"));
    if depth > 32 {
        return open_node(description);
    }
    // Unions of different types cannot be stated structurally: keep the subtree open.
    if s.get("oneOf").is_some() || s.get("anyOf").is_some() {
        let types: Vec<Option<&str>> = s
            .get("oneOf")
            .or_else(|| s.get("anyOf"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|b| resolve(root, b).get("type").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        let one_type = types.first().copied().flatten();
        if one_type.is_none() || types.iter().any(|t| *t != one_type) {
            let mut node = open_node(description);
            if types
                .iter()
                .all(|t| matches!(t, Some("string") | Some("integer")))
                && types.len() == 2
            {
                node["x-kubernetes-int-or-string"] = Value::Bool(true);
                node.as_object_mut()
                    .map(|m| m.remove("x-kubernetes-preserve-unknown-fields"));
            }
            return node;
        }
    }
    let Some(ty) = s.get("type").and_then(Value::as_str) else {
        if let Some(c) = s.get("const") {
            let ty = match c {
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                _ => "string",
            };
            let mut m = Map::new();
            if let Some(d) = description {
                m.insert("description".into(), d.clone());
            }
            m.insert("type".into(), ty.into());
            m.insert("enum".into(), json!([c]));
            return Value::Object(m);
        }
        return open_node(description);
    };
    let mut m = Map::new();
    m.insert("type".into(), ty.into());
    if let Some(d) = description {
        m.insert("description".into(), d.clone());
    }
    for k in KEEP {
        if k == "description" {
            continue;
        }
        if let Some(v) = s.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    if let Some(c) = s.get("const") {
        m.insert("enum".into(), json!([c]));
    }
    match ty {
        "object" => {
            if let Some(props) = s.get("properties").and_then(Value::as_object) {
                let p: Map<String, Value> = props
                    .iter()
                    .map(|(k, v)| (k.clone(), structural(root, v, depth + 1)))
                    .collect();
                m.insert("properties".into(), Value::Object(p));
            } else if let Some(ap) = s.get("additionalProperties").filter(|a| a.is_object()) {
                m.insert(
                    "additionalProperties".into(),
                    structural(root, ap, depth + 1),
                );
            } else if s.get("additionalProperties") != Some(&Value::Bool(false)) {
                m.insert(
                    "x-kubernetes-preserve-unknown-fields".into(),
                    Value::Bool(true),
                );
            }
        }
        "array" => {
            let items = s
                .get("items")
                .map(|i| structural(root, i, depth + 1))
                .unwrap_or_else(|| open_node(None));
            m.insert("items".into(), items);
        }
        _ => {}
    }
    Value::Object(m)
}
