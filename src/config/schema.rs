//! JSON Schema validation of documents, with positions and "did you mean".
//!
//! The schema files in `schemas/` are embedded here and are the only description of the
//! resource shapes: field lists for suggestions and the implementation status of each field
//! (`x-legate-status`: implemented, planned, unsupported) are read from them, not restated.

use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::Validator;
use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic, Location};
use super::yaml::{escape_pointer, Document};

/// The kinds Legate implements, each with its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Mapping,
    Host,
    RouteTest,
    AuthService,
    JwtPolicy,
    OidcLogin,
    RateLimit,
    Module,
    TlsContext,
    TracingService,
    Listener,
    TcpMapping,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Mapping,
        Kind::Host,
        Kind::RouteTest,
        Kind::AuthService,
        Kind::JwtPolicy,
        Kind::OidcLogin,
        Kind::RateLimit,
        Kind::Module,
        Kind::TlsContext,
        Kind::TracingService,
        Kind::Listener,
        Kind::TcpMapping,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mapping => "Mapping",
            Kind::Host => "Host",
            Kind::RouteTest => "RouteTest",
            Kind::AuthService => "AuthService",
            Kind::JwtPolicy => "JWTPolicy",
            Kind::OidcLogin => "OIDCLogin",
            Kind::RateLimit => "RateLimit",
            Kind::Module => "Module",
            Kind::TlsContext => "TLSContext",
            Kind::TracingService => "TracingService",
            Kind::Listener => "Listener",
            Kind::TcpMapping => "TCPMapping",
        }
    }

    /// Kinds that exist only in Emissary's group (`getambassador.io`): never read under
    /// `legate.dev`, and Legate installs no CRD for them.
    pub fn emissary_only(self) -> bool {
        matches!(
            self,
            Kind::Module
                | Kind::TlsContext
                | Kind::TracingService
                | Kind::Listener
                | Kind::TcpMapping
        )
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The schema file's text, as shipped in `schemas/`.
    pub fn schema_text(self) -> &'static str {
        match self {
            Kind::Mapping => include_str!("../../schemas/mapping.schema.json"),
            Kind::Host => include_str!("../../schemas/host.schema.json"),
            Kind::RouteTest => include_str!("../../schemas/routetest.schema.json"),
            Kind::AuthService => include_str!("../../schemas/authservice.schema.json"),
            Kind::JwtPolicy => include_str!("../../schemas/jwtpolicy.schema.json"),
            Kind::OidcLogin => include_str!("../../schemas/oidclogin.schema.json"),
            Kind::RateLimit => include_str!("../../schemas/ratelimit.schema.json"),
            Kind::Module => include_str!("../../schemas/module.schema.json"),
            Kind::TlsContext => include_str!("../../schemas/tlscontext.schema.json"),
            Kind::TracingService => include_str!("../../schemas/tracingservice.schema.json"),
            Kind::Listener => include_str!("../../schemas/listener.schema.json"),
            Kind::TcpMapping => include_str!("../../schemas/tcpmapping.schema.json"),
        }
    }

    pub fn schema_file(self) -> &'static str {
        match self {
            Kind::Mapping => "schemas/mapping.schema.json",
            Kind::Host => "schemas/host.schema.json",
            Kind::RouteTest => "schemas/routetest.schema.json",
            Kind::AuthService => "schemas/authservice.schema.json",
            Kind::JwtPolicy => "schemas/jwtpolicy.schema.json",
            Kind::OidcLogin => "schemas/oidclogin.schema.json",
            Kind::RateLimit => "schemas/ratelimit.schema.json",
            Kind::Module => "schemas/module.schema.json",
            Kind::TlsContext => "schemas/tlscontext.schema.json",
            Kind::TracingService => "schemas/tracingservice.schema.json",
            Kind::Listener => "schemas/listener.schema.json",
            Kind::TcpMapping => "schemas/tcpmapping.schema.json",
        }
    }

    fn compiled(self) -> &'static Compiled {
        static MAPPING: OnceLock<Compiled> = OnceLock::new();
        static HOST: OnceLock<Compiled> = OnceLock::new();
        static ROUTE_TEST: OnceLock<Compiled> = OnceLock::new();
        static AUTH_SERVICE: OnceLock<Compiled> = OnceLock::new();
        static JWT_POLICY: OnceLock<Compiled> = OnceLock::new();
        static OIDC_LOGIN: OnceLock<Compiled> = OnceLock::new();
        static RATE_LIMIT: OnceLock<Compiled> = OnceLock::new();
        static MODULE: OnceLock<Compiled> = OnceLock::new();
        static TLS_CONTEXT: OnceLock<Compiled> = OnceLock::new();
        static TRACING_SERVICE: OnceLock<Compiled> = OnceLock::new();
        static LISTENER: OnceLock<Compiled> = OnceLock::new();
        static TCP_MAPPING: OnceLock<Compiled> = OnceLock::new();
        let cell = match self {
            Kind::Mapping => &MAPPING,
            Kind::Host => &HOST,
            Kind::RouteTest => &ROUTE_TEST,
            Kind::AuthService => &AUTH_SERVICE,
            Kind::JwtPolicy => &JWT_POLICY,
            Kind::OidcLogin => &OIDC_LOGIN,
            Kind::RateLimit => &RATE_LIMIT,
            Kind::Module => &MODULE,
            Kind::TlsContext => &TLS_CONTEXT,
            Kind::TracingService => &TRACING_SERVICE,
            Kind::Listener => &LISTENER,
            Kind::TcpMapping => &TCP_MAPPING,
        };
        cell.get_or_init(|| Compiled::new(self))
    }
}

struct Compiled {
    schema: Value,
    validator: Validator,
}

impl Compiled {
    fn new(kind: Kind) -> Compiled {
        // The schemas are part of the binary and covered by tests: failing here is a build bug.
        let schema: Value = serde_json::from_str(kind.schema_text())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", kind.schema_file()));
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(false)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", kind.schema_file()));
        Compiled { schema, validator }
    }
}

/// Implementation status of a spec field, from the schema's `x-legate-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldStatus {
    Implemented,
    Planned,
    Unsupported,
}

/// One spec field as the schema describes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FieldInfo {
    pub name: String,
    pub status: FieldStatus,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The spec fields of `kind`, alphabetically, with their status.
pub fn fields(kind: Kind) -> Vec<FieldInfo> {
    let schema = &kind.compiled().schema;
    let Some(props) = schema
        .pointer("/properties/spec/properties")
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let mut out: Vec<FieldInfo> = props
        .iter()
        .map(|(name, p)| FieldInfo {
            name: name.clone(),
            status: match p.get("x-legate-status").and_then(Value::as_str) {
                Some("planned") => FieldStatus::Planned,
                Some("unsupported") => FieldStatus::Unsupported,
                _ => FieldStatus::Implemented,
            },
            description: p
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            note: p
                .get("x-legate-note")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Validate one document of a known kind. Returns every schema error, located.
pub fn validate(kind: Kind, doc: &Document, file: &str) -> Vec<Diagnostic> {
    let compiled = kind.compiled();
    let mut out = Vec::new();
    for err in compiled.validator.iter_errors(&doc.value) {
        let path = err.instance_path().as_str().to_string();
        match err.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let allowed = allowed_properties(&compiled.schema, &path);
                for name in unexpected {
                    let pointer = format!("{path}/{}", escape_pointer(name));
                    let loc = locate(doc, file, &pointer);
                    let where_ = if path.is_empty() {
                        "the top level".to_string()
                    } else {
                        format!("`{}`", path.trim_start_matches('/').replace('/', "."))
                    };
                    let mut d = Diagnostic::error(
                        "unknown-field",
                        &loc,
                        format!("unknown field `{name}` in {where_}"),
                    );
                    d = match did_you_mean(name, allowed.iter().map(String::as_str)) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None if !allowed.is_empty() => d.with_help(format!(
                            "remove it; known fields here: {}",
                            abbreviate(&allowed)
                        )),
                        None => d,
                    };
                    out.push(d);
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let loc = locate(doc, file, &path);
                out.push(
                    Diagnostic::error(
                        "missing-field",
                        &loc,
                        format!(
                            "`{}` is required here",
                            if path.is_empty() {
                                name.to_string()
                            } else {
                                format!("{}.{name}", path.trim_start_matches('/').replace('/', "."))
                            }
                        ),
                    )
                    .with_help(format!("add `{name}`")),
                );
            }
            ValidationErrorKind::AnyOf { .. } | ValidationErrorKind::OneOfNotValid { .. } => {
                let loc = locate(doc, file, &path);
                let expected = schema_at(&compiled.schema, &path)
                    .and_then(|s| s.get("description"))
                    .and_then(Value::as_str)
                    .or_else(|| {
                        parent_schema(&compiled.schema, &path)
                            .and_then(|s| s.get("description"))
                            .and_then(Value::as_str)
                    });
                let mut d = Diagnostic::error(
                    "schema",
                    &loc,
                    format!("{} has the wrong form", show_path(&path)),
                );
                if let Some(e) = expected {
                    d = d.with_help(format!("expected: {e}"));
                }
                out.push(d);
            }
            ValidationErrorKind::Enum { options } => {
                let loc = locate(doc, file, &path);
                let allowed: Vec<String> = options
                    .as_array()
                    .map(|a| a.iter().map(|v| v.to_string()).collect())
                    .unwrap_or_default();
                let got = doc
                    .value
                    .pointer(&path)
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let mut d = Diagnostic::error(
                    "schema",
                    &loc,
                    format!("{}: {got} is not allowed", show_path(&path)),
                )
                .with_help(format!("use one of: {}", allowed.join(", ")));
                if let Some(s) = got
                    .as_str()
                    .get(1..got.len().saturating_sub(1))
                    .and_then(|g| did_you_mean(g, allowed.iter().map(|a| a.trim_matches('"'))))
                {
                    d = d.with_help(format!(
                        "did you mean \"{s}\"? (allowed: {})",
                        allowed.join(", ")
                    ));
                }
                out.push(d);
            }
            _ => {
                let loc = locate(doc, file, &path);
                let help = schema_at(&compiled.schema, &path)
                    .and_then(|s| s.get("description"))
                    .and_then(Value::as_str)
                    .map(|d| format!("{}: {d}", show_path(&path)));
                let mut d =
                    Diagnostic::error("schema", &loc, format!("{}: {}", show_path(&path), err));
                if let Some(h) = help {
                    d = d.with_help(h);
                }
                out.push(d);
            }
        }
    }
    out
}

/// Warnings for spec fields that load but do nothing yet.
pub fn status_warnings(kind: Kind, doc: &Document, file: &str) -> Vec<Diagnostic> {
    warnings_by_status(&kind.compiled().schema, kind.name(), doc, file)
}

/// [`status_warnings`] against any schema carrying `x-legate-status` marks.
fn warnings_by_status(schema: &Value, kind: &str, doc: &Document, file: &str) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let Some(spec) = doc.value.get("spec").and_then(Value::as_object) else {
        return out;
    };
    for key in spec.keys() {
        let Some(p) = schema.pointer(&format!(
            "/properties/spec/properties/{}",
            escape_pointer(key)
        )) else {
            continue;
        };
        let status = p.get("x-legate-status").and_then(Value::as_str);
        let note = p.get("x-legate-note").and_then(Value::as_str);
        let (code, what) = match status {
            Some("planned") => ("not-implemented-yet", "is accepted but not acted on yet"),
            Some("unsupported") => (
                "not-implemented",
                "is an Emissary field Legate does not implement; it is ignored",
            ),
            _ => continue,
        };
        let loc = locate(doc, file, &format!("/spec/{}", escape_pointer(key)));
        let mut d = Diagnostic::warning(code, &loc, format!("{kind} `{key}` {what}"));
        // Say what is lost: the field's own note, else what the field would have done.
        let description = p.get("description").and_then(Value::as_str);
        match (note, description) {
            (Some(n), _) => d = d.with_help(n.to_string()),
            (None, Some(desc)) => d = d.with_help(format!("what is lost: {desc}")),
            (None, None) => {}
        }
        out.push(d);
    }
    out
}

fn show_path(p: &str) -> String {
    if p.is_empty() {
        "the document".into()
    } else {
        format!("`{}`", p.trim_start_matches('/').replace('/', "."))
    }
}

fn abbreviate(names: &[String]) -> String {
    if names.len() <= 8 {
        names.join(", ")
    } else {
        format!(
            "{}, ... ({} in all; `legate schema` lists them)",
            names[..8].join(", "),
            names.len()
        )
    }
}

pub(crate) fn locate(doc: &Document, file: &str, pointer: &str) -> Location {
    let pos = doc.pos_of(pointer);
    Location {
        file: file.to_string(),
        line: pos.line,
        column: pos.column,
        pointer: pointer.to_string(),
    }
}

fn resolve<'a>(root: &'a Value, mut s: &'a Value) -> &'a Value {
    for _ in 0..8 {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) if r.starts_with('#') => match root.pointer(&r[1..]) {
                Some(t) => s = t,
                None => break,
            },
            _ => break,
        }
    }
    s
}

/// The subschema that describes the instance at `pointer` (following properties, items,
/// additionalProperties, $ref and the first fitting anyOf/oneOf branch).
fn schema_at<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut s = resolve(root, root);
    if pointer.is_empty() {
        return Some(s);
    }
    for seg in pointer.trim_start_matches('/').split('/') {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        s = step(root, s, &seg)?;
    }
    Some(s)
}

fn step<'a>(root: &'a Value, s: &'a Value, seg: &str) -> Option<&'a Value> {
    let s = resolve(root, s);
    if let Some(p) = s.get("properties").and_then(|p| p.get(seg)) {
        return Some(resolve(root, p));
    }
    if seg.parse::<usize>().is_ok() {
        if let Some(i) = s.get("items") {
            return Some(resolve(root, i));
        }
    }
    if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
        return Some(resolve(root, a));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = s.get(key).and_then(Value::as_array) {
            for b in branches {
                if let Some(found) = step(root, b, seg) {
                    return Some(found);
                }
            }
        }
    }
    None
}

fn parent_schema<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    let parent = &pointer[..pointer.rfind('/')?];
    schema_at(root, parent)
}

/// Property names an object at `pointer` may have.
fn allowed_properties(root: &Value, pointer: &str) -> Vec<String> {
    let Some(s) = schema_at(root, pointer) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    let mut collect = |s: &Value| {
        if let Some(p) = s.get("properties").and_then(Value::as_object) {
            names.extend(p.keys().cloned());
        }
    };
    collect(s);
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = s.get(key).and_then(Value::as_array) {
            for b in branches {
                collect(resolve(root, b));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::{parse_documents, YamlLimits};

    fn doc(text: &str) -> Document {
        parse_documents(text, YamlLimits::default())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn schemas_compile_and_list_fields() {
        for k in Kind::ALL {
            assert!(!fields(k).is_empty(), "{k:?}");
        }
        assert!(fields(Kind::Mapping).len() > 60 && fields(Kind::Host).len() >= 10);
        let m = fields(Kind::Mapping);
        let get = |n: &str| m.iter().find(|f| f.name == n).unwrap().status;
        assert_eq!(get("prefix"), FieldStatus::Implemented);
        assert_eq!(get("retry_policy"), FieldStatus::Implemented);
        assert_eq!(get("health_checks"), FieldStatus::Implemented);
        assert_eq!(get("outlier_detection"), FieldStatus::Implemented);
        assert_eq!(get("envoy_override"), FieldStatus::Unsupported);
    }

    #[test]
    fn typo_gets_suggestion_and_position() {
        let d = doc("apiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hosname: a.example.com\n");
        let errs = validate(Kind::Host, &d, "h.yaml");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].code, "unknown-field");
        assert_eq!((errs[0].line, errs[0].column), (6, 3));
        assert_eq!(errs[0].pointer, "/spec/hosname");
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `hostname`?"));
    }

    #[test]
    fn wrong_type_is_located() {
        let d = doc("apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  prefix: /a/\n  service: a\n  timeout_ms: soon\n");
        let errs = validate(Kind::Mapping, &d, "m.yaml");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 8);
        assert_eq!(errs[0].pointer, "/spec/timeout_ms");
        assert!(errs[0].message.contains("integer"), "{}", errs[0].message);
    }

    #[test]
    fn planned_fields_warn() {
        // No embedded schema has a planned field today; the mark is checked on a small schema.
        let schema = serde_json::json!({"properties": {"spec": {"properties": {
            "soon": {"x-legate-status": "planned", "x-legate-note": "arrives later"},
            "done": {"x-legate-status": "implemented"},
        }}}});
        let d = doc("apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  done: 1\n  soon: 2\n");
        let w = warnings_by_status(&schema, "Mapping", &d, "m.yaml");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].code, "not-implemented-yet");
        assert!(w[0].message.contains("`soon`"), "{}", w[0].message);
        assert_eq!(w[0].line, 7);
    }
}
