//! Kubernetes source: Mappings, Hosts, RouteTests and the edge-security kinds (AuthService,
//! JWTPolicy, RateLimit), and Emissary's TLSContexts, Listeners and TCPMappings, watched in a
//! cluster become revisions.
//!
//! Owns: the watches (kube-runtime's watcher, which relists after `410 Gone` and restarts
//! dropped watches), the in-memory store of watched objects, turning a consistent snapshot of
//! it into a [`MemTree`] (one file per object, `kube/<namespace>/<Kind>/<name>.yaml`, so a
//! diagnostic's `file` names its object), setting invalid objects aside one by one, and
//! materializing the TLS and CRL Secrets named by Hosts and TLSContexts into a private secrets directory. Like every
//! source it only produces revisions: it never swaps a graph (that is `reconcile`) and never
//! writes status (that is `crate::cluster`, which reads the [`Snapshot`]s published here).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject};
use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::Client;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::{hex, MemFile, MemTree, Revision, Source, SourceError};
use crate::config::model::Spec;
use crate::config::{self, Diagnostic, Severity};

/// How many recent revisions are kept so they can be pinned.
const RECENT: usize = 8;

/// What to watch and how.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Watch one namespace; `None` watches all namespaces.
    pub namespace: Option<String>,
    /// Label selector (`app=x,tier!=y`) applied to every watched kind except Secrets.
    pub selector: Option<String>,
    /// Also watch `getambassador.io/v3alpha1` Mappings and Hosts when their CRDs exist.
    pub ambassador: bool,
    /// Quiet time after the last change before a snapshot is taken.
    pub debounce: Duration,
    /// Where the Secrets named by Hosts and TLSContexts are written, as
    /// `<dir>/<name>/tls.crt|tls.key` (or `crl.pem` for a `crl_secret`); pass the same
    /// directory to the proxy as its secrets directory.
    pub secrets_dir: PathBuf,
    /// How revisions are read and judged (`ambassador_id`, strictness).
    pub config: config::Options,
}

impl KubeOptions {
    pub fn new(secrets_dir: impl Into<PathBuf>) -> KubeOptions {
        KubeOptions {
            namespace: None,
            selector: None,
            ambassador: true,
            debounce: Duration::from_millis(250),
            secrets_dir: secrets_dir.into(),
            config: config::Options::default(),
        }
    }
}

/// Why the kube source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Api(#[from] ::kube::Error),
    #[error("cannot prepare the secrets directory {path}: {message}")]
    SecretsDir { path: String, message: String },
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
}

/// A client from `kubeconfig` when given, else inferred: in-cluster (the pod's ServiceAccount)
/// or `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
        None => ::kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// One watched kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KindRef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
}

impl KindRef {
    fn new(group: &str, version: &str, kind: &str, plural: &str) -> KindRef {
        KindRef {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.clone(),
            version: self.version.clone(),
            api_version: self.api_version(),
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }
}

/// The kinds Legate serves from, in its own group.
pub fn legate_kinds() -> Vec<KindRef> {
    vec![
        KindRef::new("legate.dev", "v1alpha1", "Mapping", "mappings"),
        KindRef::new("legate.dev", "v1alpha1", "Host", "hosts"),
        KindRef::new("legate.dev", "v1alpha1", "RouteTest", "routetests"),
        KindRef::new("legate.dev", "v1alpha1", "AuthService", "authservices"),
        KindRef::new("legate.dev", "v1alpha1", "JWTPolicy", "jwtpolicies"),
        KindRef::new("legate.dev", "v1alpha1", "RateLimit", "ratelimits"),
    ]
}

/// The Emissary kinds, watched when their CRDs are installed.
pub fn ambassador_kinds() -> Vec<KindRef> {
    vec![
        KindRef::new("getambassador.io", "v3alpha1", "Mapping", "mappings"),
        KindRef::new("getambassador.io", "v3alpha1", "Host", "hosts"),
        KindRef::new(
            "getambassador.io",
            "v3alpha1",
            "AuthService",
            "authservices",
        ),
        KindRef::new("getambassador.io", "v3alpha1", "TLSContext", "tlscontexts"),
        KindRef::new("getambassador.io", "v3alpha1", "Listener", "listeners"),
        KindRef::new("getambassador.io", "v3alpha1", "TCPMapping", "tcpmappings"),
    ]
}

/// Whether the Secret a [`named_secrets`] pointer names is a CRL (an Opaque Secret holding
/// `crl.pem`) rather than a `kubernetes.io/tls` Secret.
fn names_crl(pointer: &str) -> bool {
    pointer.ends_with("/crl_secret")
}

/// The Secrets a resource names, each with the JSON pointer that names it and its
/// namespace: a Host's `tlsSecret` and its `tls` block's `ca_secret` and `crl_secret`, a
/// TLSContext's `secret`, `ca_secret` and `crl_secret` (a TLSContext's names are in its own
/// namespace, as in Emissary).
fn named_secrets(r: &config::Resource) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    match &r.spec {
        Spec::Host(h) => {
            if let Some(s) = &h.tls_secret {
                let ns = s.namespace.clone().unwrap_or_else(|| r.namespace.clone());
                out.push(("/spec/tlsSecret/name", ns, s.name.clone()));
            }
            if let Some(ca) = h.tls.as_ref().and_then(|t| t.ca_secret.clone()) {
                out.push(("/spec/tls/ca_secret", r.namespace.clone(), ca));
            }
            if let Some(crl) = h.tls.as_ref().and_then(|t| t.crl_secret.clone()) {
                out.push(("/spec/tls/crl_secret", r.namespace.clone(), crl));
            }
        }
        Spec::TlsContext(t) => {
            if let Some(s) = &t.secret {
                out.push(("/spec/secret", r.namespace.clone(), s.clone()));
            }
            if let Some(ca) = &t.ca_secret {
                out.push(("/spec/ca_secret", r.namespace.clone(), ca.clone()));
            }
            if let Some(crl) = &t.crl_secret {
                out.push(("/spec/crl_secret", r.namespace.clone(), crl.clone()));
            }
        }
        _ => {}
    }
    out
}

/// Which object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: KindRef,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The file that stands for this object in a revision.
    pub fn file(&self) -> String {
        let kind = if self.kind.group == "legate.dev" {
            self.kind.kind.clone()
        } else {
            format!("{}.{}", self.kind.kind, self.kind.group)
        };
        format!("kube/{}/{}/{}.yaml", self.namespace, kind, self.name)
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{} {}/{}",
            self.kind.kind, self.kind.group, self.namespace, self.name
        )
    }
}

/// What the source keeps of one watched object.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub generation: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    /// The status as last seen, so a new leader does not rewrite an equal status.
    pub status: Option<Value>,
}

/// A TLS Secret's key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPair {
    pub crt: Vec<u8>,
    pub key: Vec<u8>,
}

/// The verdict on one object in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub object: ObjectRef,
    pub generation: Option<i64>,
    /// False when the object was set aside.
    pub accepted: bool,
    /// Short CamelCase reason for the `Accepted` condition.
    pub reason: String,
    /// The diagnostics as `legate check` prints them (warnings too when accepted).
    pub message: String,
    pub diagnostics: Vec<Diagnostic>,
    pub status: Option<Value>,
}

/// A consistent snapshot of the watched objects and what became of each.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The revision of the accepted objects only.
    pub revision: Revision,
    /// Every object for this gateway (objects for another `ambassador_id` are not listed).
    pub verdicts: Vec<Verdict>,
}

/// Everything the watches have seen.
#[derive(Debug, Default, Clone)]
pub struct Store {
    pub objects: BTreeMap<ObjectRef, StoredObject>,
    pub secrets: BTreeMap<(String, String), TlsPair>,
    /// The `crl.pem` of Opaque Secrets that hold one.
    pub crls: BTreeMap<(String, String), Vec<u8>>,
}

impl Store {
    /// Whether the Secret a [`named_secrets`] pointer names is there, of the right kind.
    fn holds(&self, pointer: &str, ns: &str, name: &str) -> bool {
        let key = (ns.to_string(), name.to_string());
        if names_crl(pointer) {
            self.crls.contains_key(&key)
        } else {
            self.secrets.contains_key(&key)
        }
    }
}

/// Rewrite a bare `service: quote` to `quote.<namespace>`, as Emissary reads it. Services with
/// a dot, an IP address, `localhost`, or Mappings that redirect are left alone.
pub fn qualify_service(service: &str, namespace: &str) -> Option<String> {
    let (scheme, rest) = match service.find("://") {
        Some(i) => service.split_at(i + 3),
        None => ("", service),
    };
    if rest.starts_with('[') {
        return None;
    }
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    if host.is_empty()
        || host.contains('.')
        || host.contains('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok()
    {
        return None;
    }
    Some(match port {
        Some(p) => format!("{scheme}{host}.{namespace}:{p}"),
        None => format!("{scheme}{host}.{namespace}"),
    })
}

/// The YAML document that stands for one object.
pub fn object_yaml(obj: &ObjectRef, stored: &StoredObject) -> String {
    let mut spec = stored.spec.clone();
    if obj.kind.kind == "Mapping" {
        let redirect = spec.get("host_redirect").and_then(Value::as_bool) == Some(true);
        if let Some(Value::String(s)) = spec.get_mut("service") {
            if !redirect {
                if let Some(q) = qualify_service(s, &obj.namespace) {
                    *s = q;
                }
            }
        }
    }
    let mut meta = serde_json::Map::new();
    meta.insert("name".into(), json!(obj.name));
    meta.insert("namespace".into(), json!(obj.namespace));
    if !stored.labels.is_empty() {
        meta.insert("labels".into(), json!(stored.labels));
    }
    if let Some(g) = stored.generation {
        meta.insert("generation".into(), json!(g));
    }
    let doc = json!({
        "apiVersion": obj.kind.api_version(),
        "kind": obj.kind.kind,
        "metadata": Value::Object(meta),
        "spec": spec,
    });
    config::yaml::to_yaml(&doc)
}

/// What [`judge`] found.
#[derive(Debug)]
pub struct Judged {
    /// The accepted objects, one file each.
    pub tree: MemTree,
    pub verdicts: Vec<Verdict>,
    /// `(namespace, name)` of the TLS Secrets named by accepted Hosts and TLSContexts.
    pub tls: Vec<(String, String)>,
    /// `(namespace, name)` of the CRL Secrets they name.
    pub crls: Vec<(String, String)>,
}

/// Judge a store: compile every object, set aside the ones with errors (and Hosts whose TLS
/// Secret is missing), compile the rest again until what is left is clean.
pub fn judge(store: &Store, opts: &config::Options) -> Judged {
    judge_with(store, opts, &BTreeMap::new())
}

/// [`judge`], with Mappings a verification window failed (`(namespace, name)` and why) set
/// aside first, with reason `VerificationFailed`.
pub fn judge_with(
    store: &Store,
    opts: &config::Options,
    aside: &BTreeMap<(String, String), String>,
) -> Judged {
    let mut files: BTreeMap<String, (ObjectRef, String)> = BTreeMap::new();
    for (obj, stored) in &store.objects {
        files.insert(obj.file(), (obj.clone(), object_yaml(obj, stored)));
    }
    let mut rejected = verification_failed(&files, aside);
    let loaded = config::load(&tree_of(&files, &rejected), opts);
    // A document the schema refused never became a resource: its object is set aside whole.
    for d in &loaded.diagnostics {
        let error =
            d.severity == Severity::Error || (opts.strict && d.severity == Severity::Warning);
        if error && files.contains_key(&d.file) {
            rejected
                .entry(d.file.clone())
                .or_insert_with(|| ("Invalid".into(), Vec::new()));
        }
    }
    let preset = loaded
        .resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (reason, errors) = rejected.get(&r.loc.file)?;
            let s = config::SetAside {
                reason: reason.clone(),
                errors: errors.clone(),
            };
            Some((i, s))
        })
        .collect();
    let screened = config::compile_setting_aside(&loaded.resources, opts, preset, &|r| {
        missing_tls_secret(store, r)
    });
    let set_aside: Vec<(String, config::SetAside)> = screened
        .aside
        .iter()
        .map(|(i, s)| (loaded.resources[*i].loc.file.clone(), s.clone()))
        .collect();
    let outcome = screened.into_outcome(loaded, opts);
    for (file, s) in set_aside {
        rejected.entry(file).or_insert((s.reason, s.errors));
    }
    for (file, (reason, diags)) in rejected.iter_mut() {
        if reason == "VerificationFailed" {
            continue;
        }
        // Keep every finding of the file (warnings too) next to the errors.
        diags.extend(
            outcome
                .diagnostics
                .iter()
                .filter(|d| &d.file == file)
                .cloned(),
        );
        diags.sort_by_key(|d| (d.line, d.column));
        diags.dedup();
    }
    let tree = tree_of(&files, &rejected);
    let loaded: BTreeSet<&str> = outcome
        .resources
        .iter()
        .map(|r| r.loc.file.as_str())
        .collect();
    let mut verdicts = Vec::new();
    for (file, (obj, _)) in &files {
        let stored = &store.objects[obj];
        let base = Verdict {
            object: obj.clone(),
            generation: stored.generation,
            accepted: false,
            reason: String::new(),
            message: String::new(),
            diagnostics: Vec::new(),
            status: stored.status.clone(),
        };
        if let Some((reason, diags)) = rejected.get(file) {
            verdicts.push(Verdict {
                reason: reason.clone(),
                message: render(diags),
                diagnostics: diags.clone(),
                ..base
            });
        } else if loaded.contains(file.as_str()) {
            let diags: Vec<Diagnostic> = outcome
                .diagnostics
                .iter()
                .filter(|d| &d.file == file)
                .cloned()
                .collect();
            let (accepted, reason) = if outcome.graph.is_some() {
                (true, "Accepted")
            } else {
                // Errors no single object is to blame for: nothing serves from this snapshot.
                (false, "RevisionRejected")
            };
            let message = if diags.is_empty() {
                if accepted {
                    "accepted".to_string()
                } else {
                    render(&outcome.diagnostics)
                }
            } else {
                render(&diags)
            };
            verdicts.push(Verdict {
                accepted,
                reason: reason.into(),
                message,
                diagnostics: diags,
                ..base
            });
        }
        // Otherwise the object is for another ambassador_id: not ours to judge.
    }
    let (crls, tls): (Vec<_>, Vec<_>) = outcome
        .resources
        .iter()
        .flat_map(named_secrets)
        .partition(|(pointer, _, _)| names_crl(pointer));
    let names = |v: Vec<(&str, String, String)>| v.into_iter().map(|(_, ns, n)| (ns, n)).collect();
    Judged {
        tree,
        verdicts,
        tls: names(tls),
        crls: names(crls),
    }
}

/// Mappings a verification window failed, set aside before anything is compiled, with reason
/// `VerificationFailed`.
fn verification_failed(
    files: &BTreeMap<String, (ObjectRef, String)>,
    aside: &BTreeMap<(String, String), String>,
) -> BTreeMap<String, (String, Vec<Diagnostic>)> {
    let mut rejected = BTreeMap::new();
    for (file, (obj, _)) in files {
        let key = (obj.namespace.clone(), obj.name.clone());
        let Some(why) = aside.get(&key).filter(|_| obj.kind.kind == "Mapping") else {
            continue;
        };
        let loc = config::Location {
            file: file.clone(),
            line: 1,
            column: 1,
            pointer: String::new(),
        };
        let d = Diagnostic::error(
            "verification-failed",
            &loc,
            format!("set aside: its route failed the gateway's verification window: {why}"),
        )
        .with_help("fix the Mapping or its upstream; a changed object is tried again");
        rejected.insert(file.clone(), ("VerificationFailed".into(), vec![d]));
    }
    rejected
}

/// A Host whose TLS Secret is not in the store cannot serve: set it aside (`SecretMissing`).
/// The first TLS Secret `r` names (a Host's or a TLSContext's, see [`named_secrets`]) that the
/// store does not hold: the object is set aside with `SecretMissing`.
/// A Host with ACME on is the exception for its `tlsSecret`: the gateway creates that Secret
/// ([`crate::tls::acme`]), so the Host serves (without a certificate) until it exists.
fn missing_tls_secret(store: &Store, r: &config::Resource) -> Option<(String, Diagnostic)> {
    let acme = matches!(&r.spec, Spec::Host(h) if h.acme_on());
    let acme_writes = |pointer: &str| acme && pointer == "/spec/tlsSecret/name";
    let (pointer, ns, name) = named_secrets(r)
        .into_iter()
        .find(|(pointer, ns, name)| !acme_writes(pointer) && !store.holds(pointer, ns, name))?;
    let d = if names_crl(pointer) {
        Diagnostic::error(
            "tls-secret",
            &r.at(pointer),
            format!("CRL Secret `{ns}/{name}` is not there (or is not Opaque with `crl.pem`)"),
        )
        .with_help("create it with `kubectl create secret generic NAME --from-file=crl.pem`, or fix the name")
    } else {
        Diagnostic::error(
            "tls-secret",
            &r.at(pointer),
            format!("TLS Secret `{ns}/{name}` is not there (or is not of type kubernetes.io/tls)"),
        )
        .with_help("create the Secret with `kubectl create secret tls`, or fix the name")
    };
    Some(("SecretMissing".into(), d))
}

fn tree_of(
    files: &BTreeMap<String, (ObjectRef, String)>,
    rejected: &BTreeMap<String, (String, Vec<Diagnostic>)>,
) -> MemTree {
    MemTree {
        files: files
            .iter()
            .filter(|(f, _)| !rejected.contains_key(*f))
            .map(|(f, (_, text))| MemFile {
                path: f.clone(),
                text: text.clone(),
            })
            .collect(),
        diagnostics: Vec::new(),
    }
}

/// Diagnostics as `legate check` prints them, one per line.
pub fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files of one Secret as the secrets directory holds them: `(file name, bytes)`.
type SecretFiles<'s> = Vec<(&'static str, &'s [u8])>;

/// The revision id: the accepted files and the Secrets they serve with.
fn revision_id(tree: &MemTree, secrets: &[(String, SecretFiles<'_>)]) -> String {
    let mut h = Sha256::new();
    h.update(tree.hash().as_bytes());
    for (name, files) in secrets {
        h.update(name.as_bytes());
        h.update([0]);
        for (_, bytes) in files {
            h.update(Sha256::digest(bytes));
        }
    }
    hex(&h.finalize()[..8])
}

/// The Secrets named by the accepted objects, by directory name: key pairs (`tls.crt`,
/// `tls.key`) and CRLs (`crl.pem`).
fn wanted_secrets<'s>(
    store: &'s Store,
    tls: &[(String, String)],
    crls: &[(String, String)],
) -> Vec<(String, SecretFiles<'s>)> {
    let mut out: BTreeMap<String, SecretFiles<'s>> = BTreeMap::new();
    let pairs = tls.iter().filter_map(|k| {
        let p = store.secrets.get(k)?;
        Some((k, vec![("tls.crt", &p.crt[..]), ("tls.key", &p.key[..])]))
    });
    let lists = crls
        .iter()
        .filter_map(|k| Some((k, vec![("crl.pem", &store.crls.get(k)?[..])])));
    for ((ns, name), files) in pairs.chain(lists) {
        if let Some(prev) = out.insert(name.clone(), files.clone()) {
            if prev != files {
                tracing::warn!(secret = %name, namespace = %ns, "two Secrets of the same name in different namespaces; the secrets directory holds one of them");
            }
        }
    }
    out.into_iter().collect()
}

/// Write `<dir>/<name>/<file>` for each of `files` (`tls.crt` and `tls.key`, or `crl.pem`)
/// atomically: they go into a fresh directory and a symlink `<name>` is renamed over, so the
/// proxy never reads a certificate with the other revision's key (the kubelet's atomic writer
/// does the same).
pub fn materialize(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    let mut h = Sha256::new();
    for (file, bytes) in files {
        h.update(file.as_bytes());
        h.update(bytes);
    }
    let data = format!(".{name}.{}", hex(&h.finalize()[..8]));
    let data_path = dir.join(&data);
    let link = dir.join(name);
    if std::fs::read_link(&link).ok().as_deref() == Some(Path::new(&data)) {
        return Ok(());
    }
    if !data_path.exists() {
        let tmp = dir.join(format!("{data}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for (file, bytes) in files {
            write_private(&tmp.join(file), bytes)?;
        }
        std::fs::rename(&tmp, &data_path)?;
    }
    let tmp_link = dir.join(format!(".{name}.link"));
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&data, &tmp_link)?;
    let old = std::fs::read_link(&link).ok();
    if link.is_dir() && old.is_none() {
        // A plain directory left by someone else: a rename cannot replace it.
        std::fs::remove_dir_all(&link)?;
    }
    std::fs::rename(&tmp_link, &link)?;
    if let Some(old) = old {
        let old = dir.join(old);
        if old != data_path {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Shared between the watch tasks and the [`Source`] face.
struct Shared {
    recent: Mutex<VecDeque<(String, Arc<MemTree>)>>,
    latest: watch::Sender<Option<Arc<Snapshot>>>,
    describe: String,
    /// Mappings a verification window failed, set aside until their generation changes.
    aside: Mutex<Aside>,
    /// Judge the objects again (something was set aside).
    rejudge: Notify,
}

/// `(namespace, name)` of set-aside Mappings: the reason, and the generation that failed
/// (learnt at the next judgement; a newer one ends the set-aside).
type Aside = BTreeMap<(String, String), (String, Option<Option<i64>>)>;

/// The revisions of the watched objects, as a [`Source`].
#[derive(Clone)]
pub struct KubeSource {
    shared: Arc<Shared>,
}

impl Source for KubeSource {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn describe(&self) -> String {
        self.shared.describe.clone()
    }

    fn current(&self, _applied: Option<&str>) -> Result<Revision, SourceError> {
        match &*self.shared.latest.borrow() {
            Some(s) => Ok(s.revision.clone()),
            None => Err(SourceError::NotFound(
                "the Kubernetes watches have not listed every kind yet".into(),
            )),
        }
    }

    fn at(&self, id: &str) -> Result<Revision, SourceError> {
        let r = self.shared.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .find(|(i, _)| i == id)
            .map(|(i, t)| Revision {
                id: i.clone(),
                commit: None,
                forced: false,
                signature_error: None,
                tree: t.clone(),
            })
            .ok_or_else(|| {
                SourceError::NotFound(format!(
                    "revision {id} is no longer held; the cluster's current objects are"
                ))
            })
    }

    fn remember(&self, _rev: &Revision) -> Result<(), SourceError> {
        // The cluster keeps the objects; after a restart the watches list them again.
        Ok(())
    }

    fn set_aside(&self, mappings: &[String], reason: &str) -> bool {
        let mut aside = self.shared.aside.lock().unwrap_or_else(|e| e.into_inner());
        for m in mappings {
            if let Some((ns, name)) = m.split_once('/') {
                aside.insert(
                    (ns.to_string(), name.to_string()),
                    (reason.to_string(), None),
                );
            }
        }
        drop(aside);
        self.shared.rejudge.notify_one();
        true
    }
}

/// The running watches. Dropping it stops them.
pub struct KubeWatch {
    source: KubeSource,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    kinds: Vec<KindRef>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeWatch {
    /// The [`Source`] face, for the reconciler.
    pub fn source(&self) -> KubeSource {
        self.source.clone()
    }

    /// Every new snapshot (debounced; equal snapshots are not sent again).
    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.clone()
    }

    /// The kinds being watched (the Emissary ones only when their CRDs exist).
    pub fn kinds(&self) -> &[KindRef] {
        &self.kinds
    }
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum Msg {
    Objects(KindRef, ObjEvent),
    Secrets(ObjEvent<TlsPair>),
    Crls(ObjEvent<Vec<u8>>),
}

enum ObjEvent<T = StoredObject> {
    Init,
    InitApply(String, String, T),
    InitDone,
    Apply(String, String, T),
    Delete(String, String),
}

/// Start watching. `trigger` is notified once per new snapshot (the reconciler's "something
/// changed"); the snapshot itself is read with [`Source::current`] or [`KubeWatch::snapshots`].
pub async fn start(
    client: Client,
    opts: KubeOptions,
    trigger: Option<Arc<Notify>>,
) -> Result<KubeWatch, KubeError> {
    std::fs::create_dir_all(&opts.secrets_dir).map_err(|e| KubeError::SecretsDir {
        path: opts.secrets_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let mut kinds = served_legate_kinds(&client).await;
    if opts.ambassador {
        if let Some(served) = served(&client, "getambassador.io/v3alpha1").await {
            if served.iter().any(|r| r == "mappings") {
                kinds.extend(
                    ambassador_kinds()
                        .into_iter()
                        .filter(|k| served.contains(&k.plural)),
                );
            }
        }
    }
    let (tx, rx) = mpsc::channel::<Msg>(1024);
    let mut tasks = Vec::new();
    for kind in &kinds {
        let api: Api<DynamicObject> = match &opts.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &kind.api_resource()),
            None => Api::all_with(client.clone(), &kind.api_resource()),
        };
        let mut cfg = watcher::Config::default();
        if let Some(sel) = &opts.selector {
            cfg = cfg.labels(sel);
        }
        tasks.push(tokio::spawn(watch_objects(
            api,
            cfg,
            kind.clone(),
            tx.clone(),
        )));
    }
    let secrets: Api<Secret> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let cfg = watcher::Config::default().fields("type=kubernetes.io/tls");
    tasks.push(tokio::spawn(watch_secrets(
        secrets.clone(),
        cfg,
        tx.clone(),
        tls_pair,
        Msg::Secrets,
    )));
    // CRLs (`crl_secret`) are Opaque Secrets holding `crl.pem`; only that entry is kept.
    let cfg = watcher::Config::default().fields("type=Opaque");
    tasks.push(tokio::spawn(watch_secrets(
        secrets,
        cfg,
        tx.clone(),
        crl_pem,
        Msg::Crls,
    )));
    drop(tx);

    let describe = format!(
        "kubernetes {} ({}){}",
        opts.namespace
            .as_deref()
            .map(|n| format!("namespace {n}"))
            .unwrap_or_else(|| "all namespaces".into()),
        kinds
            .iter()
            .map(|k| format!("{}.{}", k.plural, k.group))
            .collect::<Vec<_>>()
            .join(", "),
        opts.selector
            .as_deref()
            .map(|s| format!(" selector {s}"))
            .unwrap_or_default(),
    );
    let (latest, snapshots) = watch::channel(None);
    let shared = Arc::new(Shared {
        recent: Mutex::new(VecDeque::new()),
        latest,
        describe,
        aside: Mutex::new(BTreeMap::new()),
        rejudge: Notify::new(),
    });
    tasks.push(tokio::spawn(aggregate(
        rx,
        kinds.clone(),
        opts,
        shared.clone(),
        trigger,
    )));
    Ok(KubeWatch {
        source: KubeSource { shared },
        snapshots,
        kinds,
        tasks,
    })
}

/// The plural resource names a group/version serves, `None` when it is not served.
async fn served(client: &Client, group_version: &str) -> Option<Vec<String>> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Some(list.resources.into_iter().map(|r| r.name).collect()),
        Err(e) => {
            tracing::debug!(error = %e, group_version, "API group is not served");
            None
        }
    }
}

/// Legate's kinds to watch. Mapping, Host and RouteTest always; a kind added later (the
/// edge-security ones) only when its CRD is installed, so a cluster upgraded without
/// re-applying `deploy/crds` keeps serving instead of waiting forever on a 404 watch. When
/// discovery itself fails, every kind is watched (the watches say what is wrong).
async fn served_legate_kinds(client: &Client) -> Vec<KindRef> {
    let all = legate_kinds();
    let Some(served) = served(client, "legate.dev/v1alpha1").await else {
        return all;
    };
    let core = ["mappings", "hosts", "routetests"];
    all.into_iter()
        .filter(|k| {
            let ok = core.contains(&k.plural.as_str()) || served.contains(&k.plural);
            if !ok {
                tracing::warn!(kind = %k.kind, "the {}.legate.dev CRD is not installed; not watching {} (apply deploy/crds)", k.plural, k.kind);
            }
            ok
        })
        .collect()
}

async fn watch_objects(
    api: Api<DynamicObject>,
    cfg: watcher::Config,
    kind: KindRef,
    tx: mpsc::Sender<Msg>,
) {
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // The watcher relists after 410 Gone and re-watches after a dropped stream.
                tracing::warn!(kind = %kind.kind, group = %kind.group, error = %e, "watch interrupted; retrying");
                continue;
            }
        };
        let conv = |o: DynamicObject| {
            let ns = o.metadata.namespace.clone().unwrap_or_default();
            let name = o.metadata.name.clone().unwrap_or_default();
            let stored = StoredObject {
                generation: o.metadata.generation,
                labels: o.metadata.labels.clone().unwrap_or_default(),
                spec: o.data.get("spec").cloned().unwrap_or(Value::Null),
                status: o.data.get("status").cloned(),
            };
            (ns, name, stored)
        };
        let ev = match ev {
            Event::Init => ObjEvent::Init,
            Event::InitDone => ObjEvent::InitDone,
            Event::InitApply(o) => {
                let (ns, n, s) = conv(o);
                ObjEvent::InitApply(ns, n, s)
            }
            Event::Apply(o) => {
                let (ns, n, s) = conv(o);
                ObjEvent::Apply(ns, n, s)
            }
            Event::Delete(o) => {
                let (ns, n, _) = conv(o);
                ObjEvent::Delete(ns, n)
            }
        };
        if tx.send(Msg::Objects(kind.clone(), ev)).await.is_err() {
            return;
        }
    }
}

/// A `kubernetes.io/tls` Secret's key pair.
fn tls_pair(data: &BTreeMap<String, k8s_openapi::ByteString>) -> Option<TlsPair> {
    Some(TlsPair {
        crt: data.get("tls.crt")?.0.clone(),
        key: data.get("tls.key")?.0.clone(),
    })
}

/// An Opaque Secret's `crl.pem`.
fn crl_pem(data: &BTreeMap<String, k8s_openapi::ByteString>) -> Option<Vec<u8>> {
    Some(data.get("crl.pem")?.0.clone())
}

/// Watch Secrets, keeping what `pick` takes from each (one without it counts as absent).
async fn watch_secrets<T>(
    api: Api<Secret>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Msg>,
    pick: fn(&BTreeMap<String, k8s_openapi::ByteString>) -> Option<T>,
    wrap: fn(ObjEvent<T>) -> Msg,
) {
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "Secret watch interrupted; retrying");
                continue;
            }
        };
        let conv = |s: Secret| {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            let kept = pick(&s.data.unwrap_or_default());
            (ns, name, kept)
        };
        let ev = match ev {
            Event::Init => ObjEvent::Init,
            Event::InitDone => ObjEvent::InitDone,
            Event::InitApply(s) => match conv(s) {
                (ns, n, Some(p)) => ObjEvent::InitApply(ns, n, p),
                _ => continue,
            },
            Event::Apply(s) => match conv(s) {
                (ns, n, Some(p)) => ObjEvent::Apply(ns, n, p),
                // A Secret that lost its key pair is as good as gone.
                (ns, n, None) => ObjEvent::Delete(ns, n),
            },
            Event::Delete(s) => {
                let (ns, n, _) = conv(s);
                ObjEvent::Delete(ns, n)
            }
        };
        if tx.send(wrap(ev)).await.is_err() {
            return;
        }
    }
}

/// Apply one event to a map; `pending` buffers a relist until it is complete, so a snapshot
/// never shows half a list.
fn apply<T>(
    map: &mut BTreeMap<(String, String), T>,
    pending: &mut Option<BTreeMap<(String, String), T>>,
    ev: ObjEvent<T>,
) -> bool {
    match ev {
        ObjEvent::Init => {
            *pending = Some(BTreeMap::new());
            false
        }
        ObjEvent::InitApply(ns, n, v) => {
            pending.get_or_insert_with(BTreeMap::new).insert((ns, n), v);
            false
        }
        ObjEvent::InitDone => {
            *map = pending.take().unwrap_or_default();
            true
        }
        ObjEvent::Apply(ns, n, v) => {
            map.insert((ns, n), v);
            true
        }
        ObjEvent::Delete(ns, n) => map.remove(&(ns, n)).is_some(),
    }
}

type Keyed<T> = BTreeMap<(String, String), T>;

async fn aggregate(
    mut rx: mpsc::Receiver<Msg>,
    kinds: Vec<KindRef>,
    opts: KubeOptions,
    shared: Arc<Shared>,
    trigger: Option<Arc<Notify>>,
) {
    let mut objects: BTreeMap<KindRef, Keyed<StoredObject>> = BTreeMap::new();
    let mut pending_objects: BTreeMap<KindRef, Option<Keyed<StoredObject>>> = BTreeMap::new();
    let mut listed: BTreeSet<KindRef> = BTreeSet::new();
    let mut secrets: Keyed<TlsPair> = BTreeMap::new();
    let mut pending_secrets: Option<Keyed<TlsPair>> = None;
    let mut secrets_listed = false;
    let mut crls: Keyed<Vec<u8>> = BTreeMap::new();
    let mut pending_crls: Option<Keyed<Vec<u8>>> = None;
    let mut crls_listed = false;
    let mut last_key: Option<(String, Vec<Verdict>)> = None;
    loop {
        // Wait for a change, then for `debounce` of quiet.
        let mut dirty = false;
        let mut next = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => return,
            },
            _ = shared.rejudge.notified() => {
                dirty = true;
                None
            }
        };
        loop {
            if let Some(msg) = next.take() {
                match msg {
                    Msg::Objects(kind, ev) => {
                        if matches!(ev, ObjEvent::InitDone) {
                            listed.insert(kind.clone());
                        }
                        let map = objects.entry(kind.clone()).or_default();
                        let pending = pending_objects.entry(kind).or_default();
                        dirty |= apply(map, pending, ev);
                    }
                    Msg::Secrets(ev) => {
                        if matches!(ev, ObjEvent::InitDone) {
                            secrets_listed = true;
                        }
                        dirty |= apply(&mut secrets, &mut pending_secrets, ev);
                    }
                    Msg::Crls(ev) => {
                        if matches!(ev, ObjEvent::InitDone) {
                            crls_listed = true;
                        }
                        dirty |= apply(&mut crls, &mut pending_crls, ev);
                    }
                }
            }
            match tokio::time::timeout(opts.debounce, rx.recv()).await {
                Ok(Some(m)) => next = Some(m),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        // A snapshot is consistent once every kind has been listed completely.
        let secrets_ready = secrets_listed && crls_listed;
        if !dirty || !secrets_ready || kinds.iter().any(|k| !listed.contains(k)) {
            continue;
        }
        let mut store = Store {
            objects: BTreeMap::new(),
            secrets: secrets.clone(),
            crls: crls.clone(),
        };
        for (kind, map) in &objects {
            for ((ns, name), stored) in map {
                store.objects.insert(
                    ObjectRef {
                        kind: kind.clone(),
                        namespace: ns.clone(),
                        name: name.clone(),
                    },
                    stored.clone(),
                );
            }
        }
        let aside = current_aside(&shared, &store);
        let cfg = opts.config.clone();
        let dir = opts.secrets_dir.clone();
        let built = tokio::task::spawn_blocking(move || build(&store, &cfg, &dir, &aside)).await;
        let (snapshot, tree) = match built {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "building a Kubernetes snapshot failed");
                continue;
            }
        };
        // Status-only changes (our own writes come back through the watch) are no news.
        let key = (
            snapshot.revision.id.clone(),
            snapshot
                .verdicts
                .iter()
                .map(|v| Verdict {
                    status: None,
                    ..v.clone()
                })
                .collect::<Vec<_>>(),
        );
        let news = last_key.as_ref() != Some(&key);
        last_key = Some(key);
        {
            let mut r = shared.recent.lock().unwrap_or_else(|e| e.into_inner());
            if !r.iter().any(|(i, _)| *i == snapshot.revision.id) {
                if r.len() >= RECENT {
                    r.pop_front();
                }
                r.push_back((snapshot.revision.id.clone(), tree));
            }
        }
        // Always refresh the stored statuses; wake the reconciler only on news.
        shared.latest.send_replace(Some(Arc::new(snapshot)));
        if news {
            if let Some(t) = &trigger {
                t.notify_one();
            }
        }
    }
}

/// The set-aside Mappings still at the generation that failed (a changed object is judged
/// afresh, as an invalid one is once fixed), with their reasons.
fn current_aside(shared: &Shared, store: &Store) -> BTreeMap<(String, String), String> {
    let mut aside = shared.aside.lock().unwrap_or_else(|e| e.into_inner());
    let generation = |ns: &str, name: &str| {
        store
            .objects
            .iter()
            .find(|(o, _)| o.kind.kind == "Mapping" && o.namespace == ns && o.name == name)
            .map(|(_, s)| s.generation)
    };
    aside.retain(
        |(ns, name), (_, failed)| match (generation(ns, name), *failed) {
            (None, _) => false,
            (Some(g), None) => {
                *failed = Some(g);
                true
            }
            (Some(g), Some(f)) => g == f,
        },
    );
    aside
        .iter()
        .map(|(k, (reason, _))| (k.clone(), reason.clone()))
        .collect()
}

fn build(
    store: &Store,
    cfg: &config::Options,
    dir: &Path,
    aside: &BTreeMap<(String, String), String>,
) -> (Snapshot, Arc<MemTree>) {
    let Judged {
        tree,
        verdicts,
        tls,
        crls,
    } = judge_with(store, cfg, aside);
    let wanted = wanted_secrets(store, &tls, &crls);
    for (name, files) in &wanted {
        if let Err(e) = materialize(dir, name, files) {
            tracing::error!(secret = %name, dir = %dir.display(), error = %e, "cannot write a TLS Secret to the secrets directory");
        }
    }
    let id = revision_id(&tree, &wanted);
    let tree = Arc::new(tree);
    (
        Snapshot {
            revision: Revision {
                id,
                commit: None,
                forced: false,
                signature_error: None,
                tree: tree.clone(),
            },
            verdicts,
        },
        tree,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_services_get_the_mapping_namespace() {
        assert_eq!(
            qualify_service("quote", "prod").as_deref(),
            Some("quote.prod")
        );
        assert_eq!(
            qualify_service("quote:8080", "prod").as_deref(),
            Some("quote.prod:8080")
        );
        assert_eq!(
            qualify_service("http://quote:80", "p").as_deref(),
            Some("http://quote.p:80")
        );
        assert_eq!(qualify_service("quote.other", "prod"), None);
        assert_eq!(qualify_service("10.0.0.1:80", "prod"), None);
        assert_eq!(qualify_service("[::1]:80", "prod"), None);
        assert_eq!(qualify_service("localhost:80", "prod"), None);
    }

    #[test]
    fn an_invalid_object_is_set_aside_alone() {
        let kind = legate_kinds()[0].clone();
        let mut store = Store::default();
        let obj = |name: &str| ObjectRef {
            kind: kind.clone(),
            namespace: "default".into(),
            name: name.into(),
        };
        store.objects.insert(
            obj("good"),
            StoredObject {
                generation: Some(1),
                labels: BTreeMap::new(),
                spec: json!({"hostname": "*", "prefix": "/good/", "service": "good:80"}),
                status: None,
            },
        );
        store.objects.insert(
            obj("bad"),
            StoredObject {
                generation: Some(3),
                labels: BTreeMap::new(),
                spec: json!({"hostname": "*", "prefix": "/bad/", "servce": "bad:80"}),
                status: None,
            },
        );
        let Judged { tree, verdicts, .. } = judge(&store, &config::Options::default());
        assert_eq!(tree.files.len(), 1);
        let bad = verdicts.iter().find(|v| v.object.name == "bad").unwrap();
        assert!(!bad.accepted);
        assert!(
            bad.message.contains("kube/default/Mapping/bad.yaml"),
            "{}",
            bad.message
        );
        let good = verdicts.iter().find(|v| v.object.name == "good").unwrap();
        assert!(good.accepted, "{}", good.message);
        assert!(config::load_and_compile(&tree, &config::Options::default()).is_ok());
    }
}
