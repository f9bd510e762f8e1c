//! The raw resource model and the loader: files -> documents -> identified, schema-checked
//! resources. Nothing here interprets routing; that is `compile`.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::Value;

use super::convert;
use super::diag::{did_you_mean, Diagnostic, Location};
use super::schema::{self, Kind};
use super::tree::ConfigTree;
use super::yaml::{self, Document, YamlLimits};
use super::Options;

/// API versions whose Mapping/Host spec Legate reads.
pub const API_VERSIONS: [&str; 2] = ["getambassador.io/v3alpha1", "legate.dev/v1alpha1"];

/// getambassador.io kinds (Emissary's and Edge Stack's) that Legate knows of but does not
/// implement: what a user loses, and the nearest Legate equivalent.
const EMISSARY_KINDS: [(&str, &str); 12] = [
    ("ConsulResolver", "services are resolved through DNS, not Consul; point `service` at a name DNS resolves"),
    ("DevPortal", "an Edge Stack developer portal (no effect in Emissary itself); nothing replaces it"),
    ("Filter", "an Edge Stack filter (no effect in Emissary); for JWT checks use a `legate.dev/v1alpha1` JWTPolicy, for external auth an AuthService"),
    ("FilterPolicy", "an Edge Stack filter policy (no effect in Emissary); JWTPolicy's `mappings`/`mappingSelector`/`hosts` say where a check applies"),
    ("KubernetesEndpointResolver", "upstreams are balanced over the addresses DNS returns; use a headless Service name to reach the endpoints"),
    ("KubernetesServiceResolver", "services are resolved through DNS, which is what this resolver does"),
    ("LogService", "no remote access-log service; the JSON access log goes to `--access-log`"),
    ("RateLimit", "an Edge Stack rate limit (no effect in Emissary): use Legate's own `legate.dev/v1alpha1` RateLimit with the Mappings' `labels`"),
    ("RateLimitService", "no external rate-limit service: use a `legate.dev/v1alpha1` RateLimit (local or Redis) with the same Mapping `labels`"),
    ("WebApplicationFirewall", "an Edge Stack firewall; nothing replaces it"),
    ("WebApplicationFirewallPolicy", "an Edge Stack firewall policy; nothing replaces it"),
    ("AuthFilter", "an Edge Stack kind; use an AuthService"),
];

/// Legate's own kinds, read only under `legate.dev` (under `getambassador.io` a `RateLimit` is
/// Edge Stack's, with another spec).
const LEGATE_ONLY: [Kind; 4] = [
    Kind::RateLimit,
    Kind::JwtPolicy,
    Kind::OidcLogin,
    Kind::RouteTest,
];

/// A Mapping or Host that passed the schema, for this gateway's ambassador_id.
#[derive(Debug, Clone)]
pub struct Resource {
    pub kind: Kind,
    pub api_version: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Where the document starts.
    pub loc: Location,
    pub spec: Spec,
    /// The document itself, to locate compile errors by JSON pointer.
    pub doc: Document,
}

impl Resource {
    /// Location of a field of this resource.
    pub fn at(&self, pointer: &str) -> Location {
        schema::locate(&self.doc, &self.loc.file, pointer)
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub enum Spec {
    Mapping(Box<MappingSpec>),
    Host(Box<HostSpec>),
    RouteTest(Box<super::routetest::RouteTestSpec>),
    AuthService(Box<super::guard::AuthServiceSpec>),
    JwtPolicy(Box<super::guard::JwtPolicySpec>),
    OidcLogin(Box<super::oidc::OidcLoginSpec>),
    RateLimit(Box<super::guard::RateLimitSpec>),
    Module(Box<super::module::ModuleSpec>),
    TlsContext(Box<super::tlscontext::TlsFields>),
    TracingService(Box<super::tracingservice::TracingServiceSpec>),
    Listener(Box<super::listener::ListenerSpec>),
    TcpMapping(Box<super::listener::TcpMappingSpec>),
}

/// A header or query value to match: a string, or `true` for "present".
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MatchValue {
    Text(String),
    Flag(bool),
    Number(serde_json::Number),
}

/// An added header: a scalar or `{value, append}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum AddedHeader {
    Full {
        value: String,
        #[serde(default)]
        append: Option<bool>,
    },
    Text(String),
    Other(Value),
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RegexSubst {
    pub pattern: String,
    pub substitution: String,
}

/// The Mapping spec fields Legate acts on (the schema admits the rest).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct MappingSpec {
    pub prefix: String,
    pub prefix_regex: bool,
    pub prefix_exact: bool,
    pub hostname: Option<String>,
    pub host: Option<String>,
    pub host_regex: bool,
    pub method: Option<String>,
    pub method_regex: bool,
    pub headers: BTreeMap<String, MatchValue>,
    pub regex_headers: BTreeMap<String, String>,
    pub query_parameters: BTreeMap<String, MatchValue>,
    pub regex_query_parameters: BTreeMap<String, String>,
    pub case_sensitive: Option<bool>,
    pub precedence: i64,
    pub service: String,
    pub rewrite: Option<String>,
    pub regex_rewrite: Option<RegexSubst>,
    pub host_rewrite: Option<String>,
    pub auto_host_rewrite: bool,
    pub add_request_headers: BTreeMap<String, AddedHeader>,
    pub remove_request_headers: OneOrMany,
    pub add_response_headers: BTreeMap<String, AddedHeader>,
    pub remove_response_headers: OneOrMany,
    pub host_redirect: bool,
    pub path_redirect: Option<String>,
    pub prefix_redirect: Option<String>,
    pub regex_redirect: Option<RegexSubst>,
    pub redirect_response_code: Option<u16>,
    pub weight: Option<u32>,
    pub shadow: bool,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub cluster_idle_timeout_ms: Option<u64>,
    pub allow_upgrade: Vec<String>,
    pub use_websocket: bool,
    pub grpc: bool,
    pub tls: Option<Value>,
    pub stats_name: Option<String>,
    pub retry_policy: Option<super::traffic::RetryPolicySpec>,
    pub circuit_breakers: Vec<super::traffic::BreakerSpec>,
    pub cors: Option<super::traffic::CorsSpec>,
    pub load_balancer: Option<super::traffic::LoadBalancerSpec>,
    /// An object, or (Emissary's CRD type) a string holding one.
    pub outlier_detection: Option<Value>,
    pub health_checks: Vec<super::traffic::HealthCheckSpec>,
    pub bypass_auth: bool,
    /// Legate's own: route paths with `%2F`/`%5C` here instead of refusing them.
    pub allow_escaped_slashes: bool,
    /// Add `l5d-dst-override` (Linkerd) with the service's authority.
    pub add_linkerd_headers: bool,
    /// Rate-limit descriptor groups, read by `config::guard` (RateLimit descriptors).
    pub labels: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct SecretName {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct LabelSelector {
    #[serde(rename = "matchLabels")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(rename = "matchExpressions")]
    pub match_expressions: Vec<LabelExpr>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct LabelExpr {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Kubernetes label-selector semantics. An empty selector selects everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let val = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => val.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => val.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => val.is_some(),
                    "DoesNotExist" => val.is_none(),
                    _ => false,
                }
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct InsecurePolicy {
    pub action: Option<String>,
    #[serde(rename = "additionalPort")]
    pub additional_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RequestPolicy {
    pub insecure: InsecurePolicy,
}

/// The Host spec fields Legate acts on.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct HostSpec {
    pub hostname: Option<String>,
    #[serde(rename = "tlsSecret")]
    pub tls_secret: Option<SecretName>,
    pub tls: Option<super::tlscontext::TlsFields>,
    #[serde(rename = "tlsContext")]
    pub tls_context: Option<SecretName>,
    #[serde(rename = "requestPolicy")]
    pub request_policy: RequestPolicy,
    #[serde(rename = "mappingSelector")]
    pub mapping_selector: Option<LabelSelector>,
    /// Deprecated name of `mappingSelector`.
    pub selector: Option<LabelSelector>,
    #[serde(rename = "acmeProvider")]
    pub acme_provider: Option<AcmeProvider>,
}

impl HostSpec {
    /// Whether the certificate comes from ACME (an `acmeProvider` authority other than `none`):
    /// its `tlsSecret` is written by the gateway, so a missing one is not an error.
    pub fn acme_on(&self) -> bool {
        self.acme_provider
            .as_ref()
            .and_then(|p| p.authority.as_deref())
            .is_some_and(|a| !a.eq_ignore_ascii_case("none"))
    }
}

/// A Host's `acmeProvider`: where to order its certificate from.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct AcmeProvider {
    pub authority: Option<String>,
    pub email: Option<String>,
    #[serde(rename = "privateKeySecret")]
    pub private_key_secret: Option<SecretName>,
}

/// What the loader produced from a tree.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub diagnostics: Vec<Diagnostic>,
    pub files: usize,
}

/// Read every file of `tree` and turn its documents into resources.
pub fn load(tree: &dyn ConfigTree, opts: &Options) -> Loaded {
    let mut out = Loaded::default();
    let read = match tree.read(&opts.tree) {
        Ok(r) => r,
        Err(e) => {
            out.diagnostics
                .push(Diagnostic::error("unreadable", &Location::default(), e));
            return out;
        }
    };
    out.diagnostics.extend(read.diagnostics);
    out.files = read.files.len();
    let limits = YamlLimits {
        // Proportional to the file: a real config file never expands 64x.
        max_nodes: 200_000,
        max_depth: 64,
    };
    let mut seen: HashMap<(Kind, String, String), Location> = HashMap::new();
    for file in &read.files {
        let docs = match yaml::parse_documents(&file.text, limits) {
            Ok(d) => d,
            Err(e) => {
                out.diagnostics.push(
                    Diagnostic::error(
                        "yaml",
                        &Location {
                            file: file.path.clone(),
                            line: e.pos.line,
                            column: e.pos.column,
                            pointer: String::new(),
                        },
                        e.message,
                    )
                    .with_help("fix the YAML; nothing in this file was loaded"),
                );
                continue;
            }
        };
        let mut converted: Option<(usize, Location)> = None;
        for doc in docs {
            for mut doc in expand_lists(doc) {
                for inner in
                    super::annotations::documents(&doc, &file.path, opts, &mut out.diagnostics)
                {
                    load_document(inner, &file.path, opts, &mut seen, &mut out);
                }
                if convert_older(&mut doc) {
                    let loc = schema::locate(&doc, &file.path, "/apiVersion");
                    converted.get_or_insert((0, loc)).0 += 1;
                }
                load_document(doc, &file.path, opts, &mut seen, &mut out);
            }
        }
        if let Some((n, loc)) = converted {
            out.diagnostics.push(
                Diagnostic::note(
                    "converted",
                    &loc,
                    format!(
                        "{n} resource(s) in this file are an older getambassador.io version, read as {} the way Emissary converts them",
                        convert::TARGET
                    ),
                )
                .with_help(format!(
                    "`legate convert {} --write` rewrites the file as {}",
                    file.path,
                    convert::TARGET
                )),
            );
        }
    }
    super::module::apply_defaults(&mut out);
    // Emissary's order: the Mapping's own timeout_ms, the Module's, then the gateway default.
    for r in &mut out.resources {
        if let Spec::Mapping(m) = &mut r.spec {
            m.timeout_ms.get_or_insert(opts.default_timeout_ms);
        }
    }
    out
}

/// Rewrite a `getambassador.io/v2` (or `v1`) document as v3alpha1 in place; whether it was one.
pub(super) fn convert_older(doc: &mut Document) -> bool {
    let api = doc.value.get("apiVersion").and_then(Value::as_str);
    let kind = doc.value.get("kind").and_then(Value::as_str);
    match (api, kind) {
        (Some(a), Some(k)) if convert::converts(a, k) => {
            doc.value = convert::to_v3alpha1(&doc.value);
            // Findings about a renamed field point at the line of the field as written.
            let moved: Vec<(String, yaml::Pos)> = doc
                .positions
                .iter()
                .filter_map(|(p, pos)| {
                    convert::RENAMED.iter().find_map(|(from, to)| {
                        p.strip_prefix(from)
                            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                            .map(|rest| (format!("{to}{rest}"), *pos))
                    })
                })
                .collect();
            for (p, pos) in moved {
                doc.positions.entry(p).or_insert(pos);
            }
            true
        }
        _ => false,
    }
}

/// A document holding a YAML list of resources, or a Kubernetes `kind: List`, becomes one
/// document per item (positions re-rooted).
pub(super) fn expand_lists(doc: Document) -> Vec<Document> {
    let items_prefix = match &doc.value {
        Value::Array(_) => "",
        Value::Object(o)
            if o.get("kind").and_then(Value::as_str) == Some("List")
                && o.get("items").is_some_and(Value::is_array) =>
        {
            "/items"
        }
        _ => return vec![doc],
    };
    let items = match doc.value {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("items") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let prefix = format!("{items_prefix}/{i}");
            let positions = doc
                .positions
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&prefix)
                        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                        .map(|rest| (rest.to_string(), *v))
                })
                .collect::<HashMap<_, _>>();
            let pos = positions.get("").copied().unwrap_or(doc.pos);
            Document {
                value,
                pos,
                positions,
            }
        })
        .collect()
}

fn load_document(
    doc: Document,
    file: &str,
    opts: &Options,
    seen: &mut HashMap<(Kind, String, String), Location>,
    out: &mut Loaded,
) {
    let at = |p: &str| schema::locate(&doc, file, p);
    let obj = match &doc.value {
        Value::Null => return,
        Value::Object(o) => o,
        _ => {
            out.diagnostics.push(
                Diagnostic::warning(
                    "not-a-resource",
                    &at(""),
                    "document is not a resource (no apiVersion/kind); skipped",
                )
                .with_help("remove it, or give it apiVersion, kind, metadata and spec"),
            );
            return;
        }
    };
    let api = obj.get("apiVersion").and_then(Value::as_str);
    let kind_s = obj.get("kind").and_then(Value::as_str);
    let (Some(api), Some(kind_s)) = (api, kind_s) else {
        out.diagnostics.push(
            Diagnostic::warning(
                "not-a-resource",
                &at(""),
                "document has no apiVersion/kind, so it is not a resource; skipped",
            )
            .with_help("if it is a fragment copied from documentation, delete it; otherwise add apiVersion and kind"),
        );
        return;
    };
    let group = api.split('/').next().unwrap_or(api);
    let ours = group == "getambassador.io" || group == "legate.dev";
    if !API_VERSIONS.contains(&api) {
        if ours {
            let mut d = Diagnostic::error(
                "api-version",
                &at("/apiVersion"),
                format!("apiVersion `{api}` is not supported"),
            );
            d = match did_you_mean(api, API_VERSIONS) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d.with_help(format!(
                    "use one of: {} (getambassador.io/v2 and v1 are converted on load; older versions must be rewritten as v3alpha1)",
                    API_VERSIONS.join(", ")
                )),
            };
            out.diagnostics.push(d);
        } else if let Some(s) = near_miss_group(group) {
            out.diagnostics.push(
                Diagnostic::error(
                    "api-version",
                    &at("/apiVersion"),
                    format!("apiVersion `{api}` looks like a misspelling"),
                )
                .with_help(format!("did you mean `{s}`?")),
            );
        } else {
            let annotated = obj
                .get("metadata")
                .and_then(|m| m.get("annotations"))
                .is_some_and(|a| a.get(super::annotations::CONFIG_ANNOTATION).is_some());
            // A Service or Ingress whose annotation was read has its own note.
            if !(annotated && matches!(kind_s, "Service" | "Ingress")) {
                out.diagnostics.push(Diagnostic::note(
                    "other-api",
                    &at(""),
                    format!("{kind_s} of apiVersion `{api}` is not Legate's; skipped"),
                ));
            }
        }
        return;
    }
    let kind = Kind::from_name(kind_s)
        .filter(|k| !(group == "getambassador.io" && LEGATE_ONLY.contains(k)))
        .filter(|k| !(group == "legate.dev" && k.emissary_only()));
    let Some(kind) = kind else {
        let lost = EMISSARY_KINDS.iter().find(|(k, _)| *k == kind_s);
        if let (Some((_, lost)), "getambassador.io") = (lost, group) {
            out.diagnostics.push(
                Diagnostic::warning(
                    "kind-not-implemented",
                    &at("/kind"),
                    format!(
                        "kind `{kind_s}` is not implemented by Legate; this resource is ignored"
                    ),
                )
                .with_help(format!(
                    "what is lost and the nearest Legate equivalent: {lost}"
                )),
            );
        } else {
            let known: Vec<&str> = Kind::ALL
                .iter()
                .map(|k| k.name())
                .chain(EMISSARY_KINDS.iter().map(|(k, _)| *k))
                .collect();
            let mut d = Diagnostic::error(
                "unknown-kind",
                &at("/kind"),
                format!("`{api}` has no kind `{kind_s}`"),
            );
            if let Some(s) = did_you_mean(kind_s, known) {
                d = d.with_help(format!("did you mean `{s}`?"));
            }
            out.diagnostics.push(d);
        }
        return;
    };
    // ambassador_id decides whether this gateway reads the resource at all.
    let ids = ambassador_ids(obj.get("spec"));
    if kind != Kind::RouteTest && !ids.iter().any(|i| i == &opts.ambassador_id) {
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        out.diagnostics.push(
            Diagnostic::note(
                "other-ambassador-id",
                &at("/spec/ambassador_id"),
                format!(
                    "{kind_s} `{name}` is for ambassador_id {} and this gateway is `{}`; skipped",
                    ids.iter()
                        .map(|i| format!("`{i}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    opts.ambassador_id
                ),
            )
            .with_help("run with --ambassador-id to serve it"),
        );
        return;
    }
    let errors = schema::validate(kind, &doc, file);
    if !errors.is_empty() {
        out.diagnostics.extend(errors);
        return;
    }
    out.diagnostics
        .extend(schema::status_warnings(kind, &doc, file));
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default().to_string();
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(&opts.namespace)
        .to_string();
    let labels: BTreeMap<String, String> = meta
        .get("labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    let spec_value = obj.get("spec").cloned().unwrap_or(Value::Null);
    let spec = match kind {
        Kind::Mapping => {
            serde_json::from_value::<MappingSpec>(spec_value).map(|s| Spec::Mapping(Box::new(s)))
        }
        Kind::Host => {
            serde_json::from_value::<HostSpec>(spec_value).map(|s| Spec::Host(Box::new(s)))
        }
        Kind::RouteTest => serde_json::from_value::<super::routetest::RouteTestSpec>(spec_value)
            .map(|s| Spec::RouteTest(Box::new(s))),
        Kind::AuthService => serde_json::from_value::<super::guard::AuthServiceSpec>(spec_value)
            .map(|s| Spec::AuthService(Box::new(s))),
        Kind::JwtPolicy => serde_json::from_value::<super::guard::JwtPolicySpec>(spec_value)
            .map(|s| Spec::JwtPolicy(Box::new(s))),
        Kind::OidcLogin => serde_json::from_value::<super::oidc::OidcLoginSpec>(spec_value)
            .map(|s| Spec::OidcLogin(Box::new(s))),
        Kind::RateLimit => serde_json::from_value::<super::guard::RateLimitSpec>(spec_value)
            .map(|s| Spec::RateLimit(Box::new(s))),
        Kind::TlsContext => serde_json::from_value::<super::tlscontext::TlsFields>(spec_value)
            .map(|s| Spec::TlsContext(Box::new(s))),
        Kind::TracingService => {
            serde_json::from_value::<super::tracingservice::TracingServiceSpec>(spec_value)
                .map(|s| Spec::TracingService(Box::new(s)))
        }
        Kind::Listener => serde_json::from_value::<super::listener::ListenerSpec>(spec_value)
            .map(|s| Spec::Listener(Box::new(s))),
        Kind::TcpMapping => serde_json::from_value::<super::listener::TcpMappingSpec>(spec_value)
            .map(|s| Spec::TcpMapping(Box::new(s))),
        Kind::Module => {
            let (m, d) = super::module::read(&doc, file, &name, &spec_value);
            let bad = d.iter().any(|d| d.severity == super::Severity::Error);
            out.diagnostics.extend(d);
            if bad {
                return;
            }
            Ok(Spec::Module(Box::new(m)))
        }
    };
    let spec = match spec {
        Ok(s) => s,
        Err(e) => {
            // The schema admitted something the model cannot hold: say so plainly.
            out.diagnostics.push(Diagnostic::error(
                "model",
                &at("/spec"),
                format!("spec passed the schema but could not be read: {e}"),
            ));
            return;
        }
    };
    let loc = Location {
        pointer: String::new(),
        ..at("/metadata/name")
    };
    let key = (kind, namespace.clone(), name.clone());
    if let Some(first) = seen.get(&key) {
        out.diagnostics.push(
            Diagnostic::error(
                "duplicate-resource",
                &loc,
                format!(
                    "{} `{namespace}/{name}` is defined twice: here and at {first}",
                    kind.name()
                ),
            )
            .with_help("rename one of them or delete the copy"),
        );
        out.diagnostics.push(
            Diagnostic::error(
                "duplicate-resource",
                first,
                format!(
                    "{} `{namespace}/{name}` is defined twice: here and at {loc}",
                    kind.name()
                ),
            )
            .with_help("rename one of them or delete the copy"),
        );
        // Neither copy is used: which one would win is not knowable from the files.
        out.resources
            .retain(|r| !(r.kind == kind && r.namespace == namespace && r.name == name));
        return;
    }
    seen.insert(key, loc.clone());
    out.resources.push(Resource {
        kind,
        api_version: api.to_string(),
        name,
        namespace,
        labels,
        loc,
        spec,
        doc,
    });
}

fn near_miss_group(group: &str) -> Option<&'static str> {
    ["getambassador.io", "legate.dev"]
        .into_iter()
        .find(|g| strsim::damerau_levenshtein(group, g) <= 3)
}

/// The ambassador_ids a resource is for (`default` when none is given).
fn ambassador_ids(spec: Option<&Value>) -> Vec<String> {
    match spec.and_then(|s| s.get("ambassador_id")) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let v: Vec<String> = a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            if v.is_empty() {
                vec!["default".into()]
            } else {
                v
            }
        }
        _ => vec!["default".into()],
    }
}

/// The resources of one kind with their specs (`pick` returns the spec of that kind), sorted by
/// namespace and name so that what compile does with them never depends on file order.
pub(crate) fn of_kind<'r, T: ?Sized>(
    resources: &[&'r Resource],
    pick: impl Fn(&'r Spec) -> Option<&'r T>,
) -> Vec<(&'r Resource, &'r T)> {
    let mut found: Vec<(&Resource, &T)> = resources
        .iter()
        .filter_map(|r| pick(&r.spec).map(|s| (*r, s)))
        .collect();
    found.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemTree, Options};

    /// Emissary's order for a route's timeout: the Mapping's `timeout_ms`, the Module's
    /// `cluster_request_timeout_ms`, then the gateway's default (`--default-timeout-ms`).
    #[test]
    fn the_default_timeout_fills_mappings_without_their_own_or_the_modules() {
        let mapping = |name: &str, extra: &str| {
            format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: '*'\n  prefix: /{name}/\n  service: s\n{extra}")
        };
        let module = "---\napiVersion: getambassador.io/v3alpha1\nkind: Module\nmetadata:\n  name: ambassador\nspec:\n  config:\n    cluster_request_timeout_ms: 700\n";
        let timeouts = |text: String| {
            let opts = Options {
                default_timeout_ms: 250,
                ..Options::default()
            };
            let loaded = load(&MemTree::new().with("m.yaml", text), &opts);
            assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
            let mut out: Vec<(String, Option<u64>)> = loaded
                .resources
                .iter()
                .filter_map(|r| match &r.spec {
                    Spec::Mapping(m) => Some((r.name.clone(), m.timeout_ms)),
                    _ => None,
                })
                .collect();
            out.sort();
            out
        };
        let own = || mapping("own", "  timeout_ms: 50\n");
        assert_eq!(
            timeouts(mapping("plain", "") + &own()),
            vec![("own".into(), Some(50)), ("plain".into(), Some(250))]
        );
        assert_eq!(
            timeouts(module.to_string() + &mapping("plain", "") + &own()),
            vec![("own".into(), Some(50)), ("plain".into(), Some(700))]
        );
    }
}
