//! Kubernetes mode against `FakeApiServer`: a small HTTP/1.1 server started by each test that
//! serves list and watch (a chunked stream of JSON events) for the Legate CRDs and Secrets,
//! get, create and replace of single objects (Secrets written by ACME), applies and records
//! status merge patches, and keeps a Lease. No cluster runs here, so what
//! only a real API server checks (CRD acceptance, RBAC, the status subresource) stays
//! unverified; this checks what the gateway does with what an API server says.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use legate::cluster::{spawn_status, start_status, Leader, LeaseConfig};
use legate::source::kube::{self as ksrc, KubeOptions, Snapshot};
use legate::source::Source;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::support::eventually;

const MAPPINGS: &str = "legate.dev/v1alpha1/mappings";
const HOSTS: &str = "legate.dev/v1alpha1/hosts";
const SECRETS: &str = "v1/secrets";

/// What the fake API server holds and saw.
#[derive(Default)]
struct State {
    rv: u64,
    /// Collection (`group/version/plural`) -> (namespace, name) -> object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// (resourceVersion, collection, event type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    /// Bumped to cut every open watch.
    epoch: u64,
    patches: Vec<(String, Value)>,
    /// Object creates and replaces (method, path), Secrets written by ACME among them.
    writes: Vec<(String, String)>,
    lease_calls: Vec<String>,
    lists: usize,
    watches: usize,
    /// Serve the getambassador.io/v3alpha1 group (its CRDs are "installed").
    ambassador: bool,
    /// Leave the edge-security CRDs out of the legate.dev discovery (a cluster not upgraded).
    old_crds: bool,
}

/// A fake Kubernetes API server: list, watch, status patches and Leases, over plain HTTP.
struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let (s, c) = (state.clone(), changed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(conn, s.clone(), c.clone()));
            }
        });
        FakeApiServer {
            addr,
            state,
            changed,
            task,
        }
    }

    fn client(&self) -> ::kube::Client {
        let mut cfg = ::kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        cfg.default_namespace = "default".into();
        cfg.read_timeout = Some(Duration::from_secs(60));
        ::kube::Client::try_from(cfg).unwrap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Create or update an object, as `kubectl apply` would (generation follows the spec).
    fn apply(&self, collection: &str, obj: Value) {
        let mut st = self.lock();
        apply_in(&mut st, collection, obj, true);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Apply a Mapping for any host: `prefix` to `service`.
    fn apply_route(&self, ns: &str, name: &str, prefix: &str, service: &str) {
        let spec = json!({"hostname": "*", "prefix": prefix, "service": service});
        self.apply(MAPPINGS, mapping(ns, name, spec));
    }

    fn delete(&self, collection: &str, ns: &str, name: &str) {
        let mut st = self.lock();
        delete_in(&mut st, collection, ns, name, true);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Cut every open watch connection mid-stream.
    fn drop_watches(&self) {
        self.lock().epoch += 1;
        self.changed.notify_waiters();
    }

    /// Change objects while the history is compacted away, then cut the watches: a watch
    /// resumed from an old resourceVersion gets `410 Gone`, and only a relist sees the change.
    fn compact_with(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.lock();
        f(&mut st);
        st.compacted = st.rv + 1;
        st.rv += 1;
        st.epoch += 1;
        drop(st);
        self.changed.notify_waiters();
    }

    fn writes(&self) -> Vec<(String, String)> {
        self.lock().writes.clone()
    }

    /// An object as the server holds it.
    fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(collection)
            .and_then(|c| c.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    fn patches(&self) -> Vec<(String, Value)> {
        self.lock().patches.clone()
    }

    fn patches_for(&self, name: &str) -> Vec<Value> {
        self.patches()
            .into_iter()
            .filter(|(p, _)| p.ends_with(&format!("/{name}/status")))
            .map(|(_, v)| v)
            .collect()
    }
}

fn meta_key(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_string(),
        m["name"].as_str().unwrap().to_string(),
    )
}

fn apply_in(st: &mut State, collection: &str, mut obj: Value, record: bool) {
    st.rv += 1;
    let rv = st.rv;
    let key = meta_key(&obj);
    let coll = st.objects.entry(collection.to_string()).or_default();
    let (kind, generation, status) = match coll.get(&key) {
        Some(old) => {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let g = if old.get("spec") != obj.get("spec") {
                g + 1
            } else {
                g
            };
            ("MODIFIED", g, old.get("status").cloned())
        }
        None => ("ADDED", 1, None),
    };
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    obj["metadata"]["generation"] = json!(generation);
    obj["metadata"]["uid"] = json!(format!("uid-{}-{}", key.0, key.1));
    if let (Some(s), None) = (status, obj.get("status")) {
        obj["status"] = s;
    }
    coll.insert(key, obj.clone());
    if record {
        st.events.push((rv, collection.to_string(), kind, obj));
    }
}

fn delete_in(st: &mut State, collection: &str, ns: &str, name: &str, record: bool) {
    st.rv += 1;
    let rv = st.rv;
    let removed = st
        .objects
        .get_mut(collection)
        .and_then(|c| c.remove(&(ns.to_string(), name.to_string())));
    if let (Some(mut obj), true) = (removed, record) {
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, collection.to_string(), "DELETED", obj));
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Standard base64, for Secret data.
fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn respond(conn: &mut TcpStream, code: u16, body: &Value) {
    let text = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        text.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(text.as_bytes()).await;
    let _ = conn.shutdown().await;
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Which collection and scope a path names.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match *segs.first()? {
        "api" => (segs.get(1)?.to_string(), &segs[2..]),
        "apis" => (format!("{}/{}", segs.get(1)?, segs.get(2)?), &segs[3..]),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let plural = rest.first()?;
    Some(Target {
        collection: format!("{gv}/{plural}"),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn selected(obj: &Value, t: &Target, q: &BTreeMap<String, String>) -> bool {
    let (ns, _) = meta_key(obj);
    if t.namespace.as_ref().is_some_and(|n| *n != ns) {
        return false;
    }
    if let Some(sel) = q.get("labelSelector").filter(|s| !s.is_empty()) {
        for term in sel.split(',') {
            let Some((k, v)) = term.split_once('=') else {
                return false;
            };
            if obj["metadata"]["labels"][k].as_str() != Some(v) {
                return false;
            }
        }
    }
    if let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) {
        if let Some(ty) = sel.strip_prefix("type=") {
            if obj["type"].as_str() != Some(ty) {
                return false;
            }
        }
    }
    true
}

async fn serve(mut conn: TcpStream, state: Arc<Mutex<State>>, changed: Arc<Notify>) {
    let Some(req) = read_request(&mut conn).await else {
        return;
    };
    if req.path == "/apis/getambassador.io/v3alpha1" {
        if !state.lock().unwrap().ambassador {
            return respond(&mut conn, 404, &status(404, "NotFound", "no such group")).await;
        }
        let list = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "getambassador.io/v3alpha1",
            "resources": [
                {"name": "mappings", "singularName": "mapping", "namespaced": true, "kind": "Mapping", "verbs": ["get", "list", "watch"]},
                {"name": "hosts", "singularName": "host", "namespaced": true, "kind": "Host", "verbs": ["get", "list", "watch"]},
                {"name": "tlscontexts", "singularName": "tlscontext", "namespaced": true, "kind": "TLSContext", "verbs": ["get", "list", "watch"]}]});
        return respond(&mut conn, 200, &list).await;
    }
    if req.path == "/apis/legate.dev/v1alpha1" {
        let mut kinds = vec![
            ("mappings", "Mapping"),
            ("hosts", "Host"),
            ("routetests", "RouteTest"),
        ];
        if !state.lock().unwrap().old_crds {
            kinds.extend([
                ("authservices", "AuthService"),
                ("jwtpolicies", "JWTPolicy"),
                ("ratelimits", "RateLimit"),
            ]);
        }
        let resources: Vec<Value> = kinds
            .iter()
            .map(|(p, k)| json!({"name": p, "singularName": k.to_lowercase(), "namespaced": true, "kind": k, "verbs": ["get", "list", "watch"]}))
            .collect();
        let list = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "legate.dev/v1alpha1", "resources": resources});
        return respond(&mut conn, 200, &list).await;
    }
    let Some(t) = parse_target(&req.path) else {
        return respond(&mut conn, 404, &status(404, "NotFound", "no such path")).await;
    };
    if t.collection.starts_with("coordination.k8s.io/v1/leases") {
        return lease(&mut conn, &state, &req, &t).await;
    }
    match (req.method.as_str(), &t.name) {
        ("GET", None)
            if req
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch_stream(conn, state, changed, req, t).await
        }
        ("GET", None) => {
            let body = {
                let mut st = state.lock().unwrap();
                st.lists += 1;
                let items: Vec<Value> = st
                    .objects
                    .get(&t.collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| selected(o, &t, &req.query))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
            };
            respond(&mut conn, 200, &body).await
        }
        ("PATCH", Some(name)) if t.subresource.as_deref() == Some("status") => {
            let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let out = {
                let mut st = state.lock().unwrap();
                st.patches.push((req.path.clone(), patch.clone()));
                let ns = t.namespace.clone().unwrap_or_default();
                let current = st
                    .objects
                    .get(&t.collection)
                    .and_then(|c| c.get(&(ns, name.clone())))
                    .cloned();
                current.map(|mut obj| {
                    merge(&mut obj, &patch);
                    // A status write is an update too: it comes back through the watch.
                    apply_in(&mut st, &t.collection, obj.clone(), true);
                    obj
                })
            };
            changed.notify_waiters();
            match out {
                Some(obj) => respond(&mut conn, 200, &obj).await,
                None => respond(&mut conn, 404, &status(404, "NotFound", "gone")).await,
            }
        }
        ("GET", Some(name)) => {
            let ns = t.namespace.clone().unwrap_or_default();
            let found = state
                .lock()
                .unwrap()
                .objects
                .get(&t.collection)
                .and_then(|c| c.get(&(ns, name.clone())))
                .cloned();
            match found {
                Some(obj) => respond(&mut conn, 200, &obj).await,
                None => respond(&mut conn, 404, &status(404, "NotFound", "not found")).await,
            }
        }
        ("POST", None) | ("PUT", Some(_)) if t.subresource.is_none() => {
            let (code, body) = write_object(&state, &req, &t);
            changed.notify_waiters();
            respond(&mut conn, code, &body).await
        }
        _ => {
            respond(
                &mut conn,
                405,
                &status(405, "MethodNotAllowed", "not faked"),
            )
            .await
        }
    }
}

/// Create (`POST`: 409 when it exists) or replace (`PUT`: 404 when missing, 409 when the
/// resourceVersion is not the current one) one object; the change reaches the watches.
fn write_object(state: &Mutex<State>, req: &Request, t: &Target) -> (u16, Value) {
    let Ok(mut obj) = serde_json::from_slice::<Value>(&req.body) else {
        return (400, status(400, "BadRequest", "not JSON"));
    };
    if obj["metadata"]["namespace"].is_null() {
        obj["metadata"]["namespace"] = json!(t.namespace.clone().unwrap_or_default());
    }
    let key = meta_key(&obj);
    let mut st = state.lock().unwrap();
    st.writes.push((req.method.clone(), req.path.clone()));
    let existing = st
        .objects
        .get(&t.collection)
        .and_then(|c| c.get(&key))
        .cloned();
    match (req.method.as_str(), existing) {
        ("POST", Some(_)) => return (409, status(409, "AlreadyExists", "exists")),
        ("PUT", None) => return (404, status(404, "NotFound", "not found")),
        ("PUT", Some(e))
            if e["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] =>
        {
            return (409, status(409, "Conflict", "the object has been modified"))
        }
        _ => {}
    }
    apply_in(&mut st, &t.collection, obj, true);
    (200, st.objects[&t.collection][&key].clone())
}

async fn lease(conn: &mut TcpStream, state: &Mutex<State>, req: &Request, t: &Target) {
    let (code, body) = {
        let mut st = state.lock().unwrap();
        st.lease_calls.push(req.method.clone());
        let ns = t.namespace.clone().unwrap_or_default();
        let coll = "coordination.k8s.io/v1/leases";
        match req.method.as_str() {
            "GET" => {
                let name = t.name.clone().unwrap_or_default();
                match st.objects.get(coll).and_then(|c| c.get(&(ns, name))) {
                    Some(l) => (200, l.clone()),
                    None => (404, status(404, "NotFound", "no lease")),
                }
            }
            "POST" | "PUT" => {
                let obj: Value = serde_json::from_slice(&req.body).unwrap();
                let key = meta_key(&obj);
                let existing = st.objects.get(coll).and_then(|c| c.get(&key)).cloned();
                let conflict = match (&existing, req.method.as_str()) {
                    (Some(_), "POST") => true,
                    (None, "PUT") => true,
                    (Some(e), _) => {
                        e["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
                    }
                    _ => false,
                };
                if conflict {
                    (409, status(409, "Conflict", "lease changed"))
                } else {
                    apply_in(&mut st, coll, obj, false);
                    (200, st.objects[coll][&key].clone())
                }
            }
            _ => (405, status(405, "MethodNotAllowed", "")),
        }
    };
    respond(conn, code, &body).await
}

async fn watch_stream(
    mut conn: TcpStream,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    req: Request,
    t: Target,
) {
    let mut from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let (epoch, gone) = {
        let mut st = state.lock().unwrap();
        st.watches += 1;
        (st.epoch, from < st.compacted)
    };
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if gone {
        let ev =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        let _ = write_chunk(&mut conn, &ev).await;
        let _ = conn.write_all(b"0\r\n\r\n").await;
        return;
    }
    loop {
        let wake = changed.notified();
        let (batch, cut) = {
            let st = state.lock().unwrap();
            let batch: Vec<(u64, &'static str, Value)> = st
                .events
                .iter()
                .filter(|(rv, c, _, o)| {
                    *rv > from && *c == t.collection && selected(o, &t, &req.query)
                })
                .map(|(rv, _, ty, o)| (*rv, *ty, o.clone()))
                .collect();
            (batch, st.epoch != epoch)
        };
        if cut {
            // Drop the connection mid-stream, with no final chunk: a broken watch.
            return;
        }
        for (rv, ty, obj) in batch {
            from = rv;
            if write_chunk(&mut conn, &json!({"type": ty, "object": obj}))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), wake).await;
    }
}

async fn write_chunk(conn: &mut TcpStream, ev: &Value) -> std::io::Result<()> {
    let line = format!("{ev}\n");
    conn.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await
}

// ---- helpers ----

fn mapping(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "legate.dev/v1alpha1", "kind": "Mapping",
           "metadata": {"name": name, "namespace": ns, "labels": {"gateway": "test"}}, "spec": spec})
}

fn host(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "legate.dev/v1alpha1", "kind": "Host",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

struct Running {
    watch: ksrc::KubeWatch,
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    _dir: tempfile::TempDir,
    secrets: std::path::PathBuf,
}

async fn start_source(fake: &FakeApiServer, namespace: Option<&str>) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let mut opts = KubeOptions::new(&secrets);
    opts.namespace = namespace.map(str::to_string);
    opts.debounce = Duration::from_millis(50);
    let watch = ksrc::start(fake.client(), opts, None).await.unwrap();
    let rx = watch.snapshots();
    Running {
        watch,
        rx,
        _dir: dir,
        secrets,
    }
}

/// Wait (at most 15 s) for a snapshot that satisfies `pred`.
async fn wait_snapshot(
    rx: &mut watch::Receiver<Option<Arc<Snapshot>>>,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            if pred(&s) {
                return s;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            let last = rx.borrow().clone();
            panic!(
                "timed out waiting for {what}; last snapshot: {:?}",
                last.map(|s| (files(&s), s.verdicts.clone()))
            );
        }
    }
}

fn files(s: &Snapshot) -> Vec<String> {
    s.revision
        .tree
        .read(&Default::default())
        .unwrap()
        .files
        .into_iter()
        .map(|f| f.path)
        .collect()
}

fn text_of(s: &Snapshot, path: &str) -> String {
    s.revision
        .tree
        .read(&Default::default())
        .unwrap()
        .files
        .into_iter()
        .find(|f| f.path == path)
        .map(|f| f.text)
        .unwrap_or_default()
}

/// The `service:` of a Mapping file, unquoted.
fn service_of(yaml: &str) -> String {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("service:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

/// Route names of the graph compiled from the snapshot, the way the reconciler compiles it.
fn routes(s: &Snapshot) -> Vec<String> {
    let out = legate::config::load_and_compile(&*s.revision.tree, &Default::default());
    let g = out
        .graph
        .unwrap_or_else(|| panic!("snapshot does not compile: {:?}", out.diagnostics));
    let mut names: Vec<String> = g.routes.iter().map(|r| r.name.clone()).collect();
    names.sort();
    names
}

fn has_routes<'a>(want: &'a [&'a str]) -> impl Fn(&Snapshot) -> bool + 'a {
    move |s| routes(s) == want
}

/// Host `default/site` for `site.acme.test`, its certificate ordered from `directory` into
/// Secret `site-tls`, the account key in `acme-account`.
fn acme_site(directory: &str) -> Value {
    host(
        "default",
        "site",
        json!({"hostname": "site.acme.test", "tlsSecret": {"name": "site-tls"},
               "acmeProvider": {"authority": directory, "email": "ops@example.test",
                                "privateKeySecret": {"name": "acme-account"}}}),
    )
}

fn always_leader() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    std::mem::forget(tx);
    rx
}

// ---- tests ----

#[tokio::test]
async fn kube_objects_added_changed_and_deleted_reach_the_graph() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "a", "/a/", "a.default:80");
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "a", has_routes(&["a"])).await;
    assert_eq!(files(&s), ["kube/default/Mapping/a.yaml"]);
    assert_eq!(run.watch.source().current(None).unwrap().id, s.revision.id);

    // Changed: the new prefix is what the graph holds.
    fake.apply_route("default", "a", "/a2/", "a.default:80");
    let s = wait_snapshot(&mut run.rx, "a changed", |s| {
        text_of(s, "kube/default/Mapping/a.yaml").contains("/a2/")
    })
    .await;
    assert!(text_of(&s, "kube/default/Mapping/a.yaml").contains("generation: 2"));

    // Added and deleted.
    fake.apply_route("default", "b", "/b/", "b.default:80");
    wait_snapshot(&mut run.rx, "a and b", has_routes(&["a", "b"])).await;
    fake.delete(MAPPINGS, "default", "a");
    let s = wait_snapshot(&mut run.rx, "only b", has_routes(&["b"])).await;
    // Older revisions stay available for pinning.
    assert_eq!(
        run.watch.source().at(&s.revision.id).unwrap().id,
        s.revision.id
    );

    // Objects in another namespace are not watched in namespace mode.
    fake.apply_route("other", "c", "/c/", "c.other:80");
    fake.apply_route("default", "d", "/d/", "d.default:80");
    wait_snapshot(&mut run.rx, "b and d, not c", has_routes(&["b", "d"])).await;
}

#[tokio::test]
async fn kube_an_invalid_object_gets_accepted_false_and_the_others_serve() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "good", "/good/", "good.default:80");
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "bad",
            json!({"hostname": "*", "prefix": "/bad/", "servce": "bad.default:80"}),
        ),
    );
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "good only", has_routes(&["good"])).await;
    let bad = s.verdicts.iter().find(|v| v.object.name == "bad").unwrap();
    assert!(!bad.accepted);
    assert!(
        bad.message.contains("kube/default/Mapping/bad.yaml"),
        "{}",
        bad.message
    );

    let (served_tx, served) = watch::channel(None::<legate::cluster::Served>);
    let _status = spawn_status(fake.client(), run.rx.clone(), served, always_leader());
    served_tx.send_replace(Some(s.revision.id.clone().into()));
    let rev = s.revision.id.clone();
    eventually("status of good with its revision", || {
        fake.patches_for("good")
            .last()
            .is_some_and(|p| p["status"]["revision"] == json!(rev))
    })
    .await;
    eventually("status of bad", || !fake.patches_for("bad").is_empty()).await;
    let p = fake.patches_for("bad").last().unwrap().clone();
    let cond = &p["status"]["conditions"][0];
    assert_eq!(cond["type"], "Accepted");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Invalid");
    let msg = cond["message"].as_str().unwrap();
    // The message is what `legate check` prints: file:line:col: error[code]: ...
    assert!(msg.starts_with("kube/default/Mapping/bad.yaml:"), "{msg}");
    assert!(msg.contains("error["), "{msg}");
    assert!(msg.contains("servce"), "{msg}");
    assert_eq!(p["status"]["observedGeneration"], 1);
    assert_eq!(p["status"]["revision"], Value::Null);
    let g = fake.patches_for("good").last().unwrap().clone();
    assert_eq!(g["status"]["conditions"][0]["status"], "True");

    // Fixing the object accepts it, and both serve from the new revision.
    fake.apply_route("default", "bad", "/bad/", "bad.default:80");
    let s2 = wait_snapshot(&mut run.rx, "both", has_routes(&["bad", "good"])).await;
    served_tx.send_replace(Some(s2.revision.id.clone().into()));
    let rev2 = s2.revision.id.clone();
    eventually("bad accepted at generation 2", || {
        fake.patches_for("bad").last().is_some_and(|p| {
            p["status"]["conditions"][0]["status"] == "True"
                && p["status"]["observedGeneration"] == 2
                && p["status"]["revision"] == json!(rev2)
        })
    })
    .await;
}

#[tokio::test]
async fn kube_status_is_written_only_when_it_changes() {
    let fake = FakeApiServer::start().await;
    for n in ["m1", "m2", "m3"] {
        fake.apply_route("default", n, &format!("/{n}/"), "x.default:80");
    }
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "three", has_routes(&["m1", "m2", "m3"])).await;
    let (served_tx, served) =
        watch::channel(Some(legate::cluster::Served::from(s.revision.id.clone())));
    let status = spawn_status(fake.client(), run.rx.clone(), served, always_leader());
    eventually("three statuses", || fake.patches().len() >= 3).await;
    let once_each = |names: &[&str]| {
        for n in names {
            assert_eq!(fake.patches_for(n).len(), 1, "{n}: {:#?}", fake.patches());
        }
    };
    // Our own writes come back through the watch as MODIFIED events; a watch restart replays
    // everything; the served revision is re-announced. None of it is a change of status.
    fake.drop_watches();
    served_tx.send_replace(Some(s.revision.id.clone().into()));
    // Then a change that is one: an invalid object (the revision stays the same). The writer
    // handles changes in order, so once its status is written the ones before were handled.
    let invalid = |n: &str| {
        mapping(
            "default",
            n,
            json!({"hostname": "*", "prefix": "/x/", "servce": "x:80"}),
        )
    };
    fake.apply(MAPPINGS, invalid("bad1"));
    eventually("bad1's status", || !fake.patches_for("bad1").is_empty()).await;
    once_each(&["m1", "m2", "m3"]);

    // A restarted writer (a new leader) reads the statuses back and writes only what changed.
    wait_snapshot(&mut run.rx, "every status seen", |s| {
        s.verdicts.len() == 4 && s.verdicts.iter().all(|v| v.status.is_some())
    })
    .await;
    status.abort();
    let (_tx2, served2) =
        watch::channel(Some(legate::cluster::Served::from(s.revision.id.clone())));
    let other = spawn_status(fake.client(), run.rx.clone(), served2, always_leader());
    fake.apply(MAPPINGS, invalid("bad2"));
    eventually("bad2's status", || !fake.patches_for("bad2").is_empty()).await;
    other.abort();
    once_each(&["m1", "m2", "m3", "bad1"]);
}

#[tokio::test]
async fn kube_watch_restarts_after_the_server_drops_the_connection() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "a", "/a/", "a.default:80");
    let mut run = start_source(&fake, Some("default")).await;
    wait_snapshot(&mut run.rx, "a", has_routes(&["a"])).await;
    eventually("watches open", || fake.lock().watches >= 3).await;
    let watches = fake.lock().watches;
    let lists = fake.lock().lists;
    fake.drop_watches();
    fake.apply_route("default", "b", "/b/", "b.default:80");
    wait_snapshot(&mut run.rx, "b after the drop", has_routes(&["a", "b"])).await;
    let st = fake.lock();
    assert!(st.watches > watches, "the watch was not restarted");
    // Resumed from the last resourceVersion: no relist was needed.
    assert_eq!(st.lists, lists);
}

#[tokio::test]
async fn kube_a_relist_after_410_gone_heals() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "a", "/a/", "a.default:80");
    let mut run = start_source(&fake, Some("default")).await;
    wait_snapshot(&mut run.rx, "a", has_routes(&["a"])).await;
    let lists = fake.lock().lists;
    // While the history is compacted away: a is deleted and d added, with no events to replay.
    fake.compact_with(|st| {
        delete_in(st, MAPPINGS, "default", "a", false);
        apply_in(
            st,
            MAPPINGS,
            mapping(
                "default",
                "d",
                json!({"hostname": "*", "prefix": "/d/", "service": "d.default:80"}),
            ),
            false,
        );
    });
    wait_snapshot(&mut run.rx, "d only, after a relist", has_routes(&["d"])).await;
    assert!(fake.lock().lists > lists, "no relist happened");
}

#[tokio::test]
async fn kube_a_bare_service_means_the_mapping_namespace() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("shop", "quote", "/q/", "quote");
    fake.apply_route("web", "other", "/o/", "other.elsewhere:8080");
    // All namespaces.
    let mut run = start_source(&fake, None).await;
    let s = wait_snapshot(&mut run.rx, "both", has_routes(&["other", "quote"])).await;
    let q = text_of(&s, "kube/shop/Mapping/quote.yaml");
    assert_eq!(service_of(&q), "quote.shop", "{q}");
    let o = text_of(&s, "kube/web/Mapping/other.yaml");
    assert_eq!(service_of(&o), "other.elsewhere:8080", "{o}");
}

#[tokio::test]
async fn kube_tls_secrets_named_by_hosts_are_written_to_the_secrets_dir() {
    let fake = FakeApiServer::start().await;
    fake.apply(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "site-tls", "namespace": "default"},
               "data": {"tls.crt": b64("CERT-1"), "tls.key": b64("KEY-1")}}),
    );
    fake.apply(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "not-tls", "namespace": "default"}, "data": {}}),
    );
    fake.apply(
        HOSTS,
        host(
            "default",
            "site",
            json!({"hostname": "site.example.com", "tlsSecret": {"name": "site-tls"}}),
        ),
    );
    fake.apply(
        HOSTS,
        host(
            "default",
            "nokey",
            json!({"hostname": "nokey.example.com", "tlsSecret": {"name": "missing"}}),
        ),
    );
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "site host", |s| {
        files(s) == ["kube/default/Host/site.yaml"]
    })
    .await;
    let nokey = s
        .verdicts
        .iter()
        .find(|v| v.object.name == "nokey")
        .unwrap();
    assert!(!nokey.accepted);
    assert_eq!(nokey.reason, "SecretMissing");
    assert!(
        nokey.message.contains("default/missing"),
        "{}",
        nokey.message
    );
    let crt = std::fs::read_to_string(run.secrets.join("site-tls/tls.crt")).unwrap();
    assert_eq!(crt, "CERT-1");
    let first = s.revision.id.clone();

    // A rotated certificate is a new revision (the proxy must load it), swapped atomically.
    fake.apply(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "site-tls", "namespace": "default"},
               "data": {"tls.crt": b64("CERT-2"), "tls.key": b64("KEY-2")}}),
    );
    let s = wait_snapshot(&mut run.rx, "new revision", |s| s.revision.id != first).await;
    assert_eq!(
        std::fs::read_to_string(run.secrets.join("site-tls/tls.key")).unwrap(),
        "KEY-2"
    );
    assert_eq!(files(&s), ["kube/default/Host/site.yaml"]);
    // Only the current pair is left behind the symlink.
    let dirs = std::fs::read_dir(&run.secrets).unwrap().count();
    assert_eq!(dirs, 2, "expected the link and one data directory");
}

#[tokio::test]
async fn kube_tlscontexts_are_watched_and_their_secrets_written_to_the_secrets_dir() {
    let fake = FakeApiServer::start().await;
    fake.lock().ambassador = true;
    const CONTEXTS: &str = "getambassador.io/v3alpha1/tlscontexts";
    let tls_secret = |name: &str, crt: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": name, "namespace": "default"},
               "data": {"tls.crt": b64(crt), "tls.key": b64("KEY")}})
    };
    fake.apply(SECRETS, tls_secret("site-tls", "SITE"));
    fake.apply(SECRETS, tls_secret("clients", "CLIENT-CA"));
    let context = |name: &str, spec: Value| {
        json!({"apiVersion": "getambassador.io/v3alpha1", "kind": "TLSContext",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    fake.apply(
        CONTEXTS,
        context(
            "mtls",
            json!({"secret": "site-tls", "ca_secret": "clients", "cert_required": true}),
        ),
    );
    fake.apply(CONTEXTS, context("broken", json!({"secret": "nowhere"})));
    fake.apply(
        HOSTS,
        host(
            "default",
            "site",
            json!({"hostname": "site.example.com", "tlsSecret": {"name": "site-tls"}, "tlsContext": {"name": "mtls"}}),
        ),
    );
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "the Host and its TLSContext", |s| {
        files(s).contains(&"kube/default/TLSContext.getambassador.io/mtls.yaml".to_string())
            && files(s).contains(&"kube/default/Host/site.yaml".to_string())
    })
    .await;
    // The context's CA Secret is written beside the certificate, where preflight and the
    // handshake read it.
    assert_eq!(
        std::fs::read_to_string(run.secrets.join("clients/tls.crt")).unwrap(),
        "CLIENT-CA"
    );
    assert_eq!(
        std::fs::read_to_string(run.secrets.join("site-tls/tls.crt")).unwrap(),
        "SITE"
    );
    // A TLSContext whose Secret is missing is set aside alone.
    let broken = s
        .verdicts
        .iter()
        .find(|v| v.object.name == "broken")
        .unwrap();
    assert!(!broken.accepted);
    assert_eq!(broken.reason, "SecretMissing");
    assert!(
        broken.message.contains("default/nowhere"),
        "{}",
        broken.message
    );
}

#[tokio::test]
async fn kube_only_the_lease_holder_writes_status() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "a", "/a/", "a.default:80");
    // Another replica holds a fresh Lease.
    let now = k8s_openapi::chrono::Utc::now();
    let lease = |holder: &str, renewed: k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "legate-status", "namespace": "default"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 2,
                        "renewTime": renewed.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}})
    };
    {
        let mut st = fake.lock();
        apply_in(
            &mut st,
            "coordination.k8s.io/v1/leases",
            lease("other", now + k8s_openapi::chrono::Duration::seconds(3600)),
            false,
        );
    }
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "a", has_routes(&["a"])).await;
    let mut cfg = LeaseConfig::new("default", "me");
    cfg.duration = Duration::from_secs(2);
    cfg.retry = Duration::from_millis(100);
    let (_tx, served) = watch::channel(Some(legate::cluster::Served::from(s.revision.id.clone())));
    let status = start_status(fake.client(), run.rx.clone(), served, cfg);
    let leader = status.is_leader();
    // A follower retries the Lease every 100 ms: after three looks it has had every chance.
    eventually("three looks at the Lease", || {
        fake.lock().lease_calls.len() >= 3
    })
    .await;
    assert!(fake.patches().is_empty(), "a follower wrote status");
    assert!(!*leader.borrow());
    assert!(fake.lock().lease_calls.iter().all(|m| m == "GET"));

    // The other replica stops renewing: its Lease expires and we take over.
    {
        let mut st = fake.lock();
        apply_in(
            &mut st,
            "coordination.k8s.io/v1/leases",
            lease("other", now - k8s_openapi::chrono::Duration::seconds(60)),
            false,
        );
    }
    eventually("status written by the new leader", || {
        !fake.patches().is_empty()
    })
    .await;
    assert!(*leader.borrow());
    let held = fake.lock().objects["coordination.k8s.io/v1/leases"]
        [&("default".to_string(), "legate-status".to_string())]
        .clone();
    assert_eq!(held["spec"]["holderIdentity"], "me");
    assert_eq!(held["spec"]["leaseTransitions"], 1);
    // And it keeps renewing.
    let puts = fake
        .lock()
        .lease_calls
        .iter()
        .filter(|m| *m == "PUT")
        .count();
    eventually("renewals", || {
        fake.lock()
            .lease_calls
            .iter()
            .filter(|m| *m == "PUT")
            .count()
            >= puts + 2
    })
    .await;
}

#[tokio::test]
async fn kube_a_new_lease_is_created_when_none_exists() {
    let fake = FakeApiServer::start().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = LeaseConfig::new("default", "me");
    cfg.retry = Duration::from_millis(100);
    let leader = Leader::spawn(fake.client(), cfg);
    let mut rx = leader.watch();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l))
        .await
        .expect("never became leader")
        .unwrap();
    let calls = fake.lock().lease_calls.clone();
    assert_eq!(&calls[..2], ["GET", "POST"]);
}

#[tokio::test]
async fn kube_emissary_kinds_are_watched_when_installed_and_ambassador_id_is_honoured() {
    let fake = FakeApiServer::start().await;
    fake.lock().ambassador = true;
    let amb = |name: &str, spec: Value| {
        json!({"apiVersion": "getambassador.io/v3alpha1", "kind": "Mapping",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    const AMB: &str = "getambassador.io/v3alpha1/mappings";
    fake.apply(
        AMB,
        amb(
            "ours",
            json!({"hostname": "*", "prefix": "/ours/", "service": "ours"}),
        ),
    );
    fake.apply(
        AMB,
        amb("theirs", json!({"hostname": "*", "prefix": "/theirs/", "service": "t", "ambassador_id": ["other"]})),
    );
    fake.apply_route("default", "native", "/n/", "n.default:80");
    let mut run = start_source(&fake, Some("default")).await;
    // Legate's six kinds, and the three Emissary kinds the group serves (not its AuthService).
    assert_eq!(run.watch.kinds().len(), 9);
    let s = wait_snapshot(
        &mut run.rx,
        "ours and native",
        has_routes(&["native", "ours"]),
    )
    .await;
    assert_eq!(
        service_of(&text_of(
            &s,
            "kube/default/Mapping.getambassador.io/ours.yaml"
        )),
        "ours.default"
    );
    // Another gateway's object is neither served nor given a status by this one.
    assert!(s.verdicts.iter().all(|v| v.object.name != "theirs"));
}

#[tokio::test]
async fn kube_the_label_selector_limits_what_is_watched() {
    let fake = FakeApiServer::start().await;
    fake.apply_route("default", "labelled", "/l/", "l.default:80");
    let mut other = mapping(
        "default",
        "unlabelled",
        json!({"hostname": "*", "prefix": "/u/", "service": "u.default:80"}),
    );
    other["metadata"]["labels"] = json!({"gateway": "other"});
    fake.apply(MAPPINGS, other);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = KubeOptions::new(dir.path().join("secrets"));
    opts.namespace = Some("default".into());
    opts.selector = Some("gateway=test".into());
    opts.debounce = Duration::from_millis(50);
    let watch = ksrc::start(fake.client(), opts, None).await.unwrap();
    let mut rx = watch.snapshots();
    wait_snapshot(&mut rx, "only the labelled one", has_routes(&["labelled"])).await;
}

/// Not a pass/fail check: how long a change takes to reach a snapshot, and how long judging
/// (compile, set aside, compile again) takes for many objects. `cargo test -- --ignored
/// kube_timings --nocapture`.
#[tokio::test]
#[ignore]
async fn kube_timings() {
    let fake = FakeApiServer::start().await;
    let n = 1000;
    for i in 0..n {
        fake.apply(
            MAPPINGS,
            mapping(
                "default",
                &format!("m{i}"),
                json!({"hostname": "*", "prefix": format!("/m{i}/"), "service": "x.default:80"}),
            ),
        );
    }
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "bad",
            json!({"hostname": "*", "prefix": "/bad/", "servce": "x"}),
        ),
    );
    let t = std::time::Instant::now();
    let mut run = start_source(&fake, Some("default")).await;
    wait_snapshot(&mut run.rx, "all", |s| s.verdicts.len() == n + 1).await;
    println!(
        "initial list of {} objects to first snapshot: {:?} (debounce 50 ms)",
        n + 1,
        t.elapsed()
    );
    let mut lat = Vec::new();
    for i in 0..10 {
        let t = std::time::Instant::now();
        let name = format!("new{i}");
        fake.apply(
            MAPPINGS,
            mapping(
                "default",
                &name,
                json!({"hostname": "*", "prefix": format!("/new{i}/"), "service": "x.default:80"}),
            ),
        );
        wait_snapshot(&mut run.rx, "new", |s| {
            s.verdicts.iter().any(|v| v.object.name == name)
        })
        .await;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "change to snapshot with {} objects: median {:?}, max {:?} (debounce 50 ms)",
        n + 11,
        lat[5],
        lat[9]
    );
}

/// `legate run --kubernetes` against `fake` (namespace `default`), with the demo echo upstream
/// on `echo`, plain HTTP and admin listeners on free ports, and `args`.
struct KubeRun {
    http: SocketAddr,
    admin: SocketAddr,
    _gw: crate::support::Killed,
    _dir: tempfile::TempDir,
}

impl KubeRun {
    /// What the gateway wrote to stderr so far (for a failing test's message).
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("legate.log")).unwrap_or_default()
    }

    fn start(fake: &FakeApiServer, echo: SocketAddr, args: &[&str]) -> KubeRun {
        KubeRun::start_on(fake, echo, crate::support::free_addr(), "off", args)
    }

    /// [`KubeRun::start`] with the HTTP listener on `http` and `--https-listen https`.
    fn start_on(
        fake: &FakeApiServer,
        echo: SocketAddr,
        http: SocketAddr,
        https: &str,
        args: &[&str],
    ) -> KubeRun {
        let admin = crate::support::free_addr();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                fake.addr
            ),
        )
        .unwrap();
        let gw = crate::support::Killed(
            std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
                .args(["run", "--kubernetes", "--namespace", "default"])
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--secrets-dir")
                .arg(dir.path().join("secrets"))
                .args(["--demo-echo", &echo.to_string()])
                .args(["--http-listen", &http.to_string(), "--https-listen", https])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--access-log", "off"])
                .args(args)
                .env("POD_NAMESPACE", "default")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("legate.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        KubeRun {
            http,
            admin,
            _gw: gw,
            _dir: dir,
        }
    }
}

/// The whole `legate run --kubernetes` process against the fake API server: the gateway serves
/// what the API holds, keeps serving it when an invalid object arrives, and the Lease holder
/// writes both objects' status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_legate_run_serves_from_the_api_and_writes_status() {
    let fake = FakeApiServer::start().await;
    let free = crate::support::free_addr;
    let echo = free();
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "echo",
            json!({"hostname": "*", "prefix": "/k/", "service": echo.to_string(), "rewrite": "/"}),
        ),
    );
    let gw = KubeRun::start(&fake, echo, &["--verify-window", "0"]);
    let (http, admin) = (gw.http, gw.admin);
    let url = format!("http://{http}/k/x");
    let mut served = None;
    for _ in 0..300 {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            crate::support::client().request(
                http::Request::get(&url)
                    .body(crate::support::empty())
                    .unwrap(),
            ),
        )
        .await
        {
            if r.status() == 200 {
                served = Some(crate::support::get(&url, &[]).await);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = served.expect("the gateway serves the Mapping from the API");
    assert_eq!(served.json()["path"], "/x");

    // An invalid object is set aside; the valid one keeps serving.
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "typo",
            json!({"hostname": "*", "prefix": "/t/", "servce": "t.default:80"}),
        ),
    );
    eventually("Accepted=False on the invalid object", || {
        fake.patches_for("typo")
            .last()
            .is_some_and(|p| p["status"]["conditions"][0]["status"] == "False")
    })
    .await;
    let p = fake.patches_for("typo").last().unwrap().clone();
    assert!(
        p["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `service`?"),
        "{p}"
    );
    assert_eq!(crate::support::get(&url, &[]).await.status, 200);
    // The valid object's status names the revision the gateway serves.
    let status = crate::support::get(&format!("http://{admin}/api/status"), &[])
        .await
        .json();
    let applied = status["applied"]
        .as_str()
        .expect("a revision applied")
        .to_string();
    eventually("status of echo with the served revision", || {
        fake.patches_for("echo")
            .last()
            .is_some_and(|p| p["status"]["revision"] == json!(applied))
    })
    .await;
}

/// The policies the graph compiled from a snapshot attaches to route `name`:
/// (ext auth, JWT policy name, rate-limit ids).
fn policies_of(s: &Snapshot, name: &str) -> (bool, Option<String>, Vec<String>) {
    let out = legate::config::load_and_compile(&*s.revision.tree, &Default::default());
    let g = out
        .graph
        .unwrap_or_else(|| panic!("snapshot does not compile: {:?}", out.diagnostics));
    let r = g.routes.iter().find(|r| r.name == name).unwrap();
    let legate::routes::Action::Forward(f) = &r.action else {
        panic!("{name} does not forward");
    };
    (
        f.ext_auth.is_some(),
        f.jwt.as_ref().map(|j| j.name.clone()),
        f.rate_limits.iter().map(|l| l.limit.id.clone()).collect(),
    )
}

#[tokio::test]
async fn kube_authservice_jwtpolicy_and_ratelimit_are_watched_and_judged() {
    const AUTH: &str = "legate.dev/v1alpha1/authservices";
    const JWT: &str = "legate.dev/v1alpha1/jwtpolicies";
    const RL: &str = "legate.dev/v1alpha1/ratelimits";
    let obj = |kind: &str, name: &str, spec: Value| {
        json!({"apiVersion": "legate.dev/v1alpha1", "kind": kind,
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    let fake = FakeApiServer::start().await;
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "api",
            json!({"hostname": "*", "prefix": "/api/", "service": "api.default:80",
                   "labels": {"ambassador": [{"per_user": [{"jwt_claim": {"claim": "sub", "key": "user"}}]}]}}),
        ),
    );
    fake.apply(
        AUTH,
        obj(
            "AuthService",
            "auth",
            json!({"auth_service": "auth.default:3000", "include_body": {"max_bytes": 4096}}),
        ),
    );
    fake.apply(
        JWT,
        obj(
            "JWTPolicy",
            "api-jwt",
            json!({"jwks": {"url": "https://login.example.test/jwks.json"}, "mappings": ["api"]}),
        ),
    );
    fake.apply(
        RL,
        obj(
            "RateLimit",
            "limits",
            json!({"limits": [{"name": "user", "group": "per_user", "requests": 5, "per": "minute"}]}),
        ),
    );
    // A JWTPolicy Legate refuses: set aside on its own, the rest still serves.
    fake.apply(
        JWT,
        obj(
            "JWTPolicy",
            "bad",
            json!({"jwks": {"url": "https://k.test/j"}, "algorithms": ["HS256"], "mappings": ["api"]}),
        ),
    );
    let mut run = start_source(&fake, Some("default")).await;
    assert_eq!(run.watch.kinds().len(), 6);
    let s = wait_snapshot(&mut run.rx, "the three policies", |s| files(s).len() == 4).await;
    assert!(
        files(&s).contains(&"kube/default/JWTPolicy/api-jwt.yaml".to_string()),
        "{:?}",
        files(&s)
    );
    assert_eq!(
        policies_of(&s, "api"),
        (
            true,
            Some("default/api-jwt".into()),
            vec!["default/limits/user".into()]
        )
    );
    let bad = s.verdicts.iter().find(|v| v.object.name == "bad").unwrap();
    assert!(!bad.accepted);
    assert!(bad.message.contains("HS256"), "{}", bad.message);

    // Deleting the AuthService takes it off the route.
    fake.delete(AUTH, "default", "auth");
    let s = wait_snapshot(&mut run.rx, "no AuthService", |s| files(s).len() == 3).await;
    assert!(!policies_of(&s, "api").0);

    // A cluster whose CRDs predate these kinds: they are not watched, the rest serves.
    let old = FakeApiServer::start().await;
    old.lock().old_crds = true;
    old.apply_route("default", "a", "/a/", "a.default:80");
    let mut run = start_source(&old, Some("default")).await;
    assert_eq!(run.watch.kinds().len(), 3);
    wait_snapshot(&mut run.rx, "a", has_routes(&["a"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_a_mapping_failing_its_window_is_set_aside_and_the_others_stay() {
    let fake = FakeApiServer::start().await;
    let free = crate::support::free_addr;
    let (echo, dead) = (free(), free());
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "echo",
            json!({"hostname": "*", "prefix": "/k/", "service": echo.to_string(), "rewrite": "/"}),
        ),
    );
    let gw = KubeRun::start(
        &fake,
        echo,
        &["--verify-window", "1s", "--verify-min-requests", "3"],
    );
    let (http, admin) = (gw.http, gw.admin);
    let status = || async {
        crate::support::get(&format!("http://{admin}/api/status"), &[])
            .await
            .json()
    };
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut verified = false;
    for _ in 0..500 {
        if let Ok(st) = tokio::time::timeout(Duration::from_secs(2), status()).await {
            if st["live"]["outcome"] == "Applied" {
                verified = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(verified, "the first snapshot is verified");
    eventually("echo's status says verified", || {
        fake.patches_for("echo")
            .last()
            .is_some_and(|p| p["status"]["rollout"] == "verified-unobserved")
    })
    .await;
    let first = status().await["applied"].as_str().unwrap().to_string();

    // Another team's Mapping whose upstream is down.
    fake.apply(
        MAPPINGS,
        mapping(
            "default",
            "dead",
            json!({"hostname": "*", "prefix": "/d/", "service": dead.to_string()}),
        ),
    );
    let url = format!("http://{http}/d/x");
    // Five requests fail at the gateway once `dead` serves (30 s at most: a hang, not timing).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    while failures < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead never answered 502 five times ({failures})"
        );
        if crate::support::get(&url, &[]).await.status == 502 {
            failures += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eventually("dead set aside with VerificationFailed", || {
        fake.patches_for("dead").last().is_some_and(|p| {
            p["status"]["conditions"][0]["status"] == "False"
                && p["status"]["conditions"][0]["reason"] == "VerificationFailed"
        })
    })
    .await;
    let p = fake.patches_for("dead").last().unwrap().clone();
    assert!(
        p["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Mapping default/dead"),
        "{p}"
    );
    // The snapshot without it serves: the other team's route was never reverted.
    for _ in 0..500 {
        if crate::support::get(&url, &[]).await.status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(crate::support::get(&url, &[]).await.status, 404);
    assert_eq!(
        crate::support::get(&format!("http://{http}/k/x"), &[])
            .await
            .status,
        200
    );
    let st = status().await;
    assert_eq!(
        st["applied"],
        first.as_str(),
        "the same objects, the same content id: {st}"
    );
    let h = crate::support::get(&format!("http://{admin}/api/revisions"), &[])
        .await
        .json();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"] == "Degraded"
                && e["reason"]
                    .as_str()
                    .unwrap()
                    .contains("set aside default/dead")),
        "{h}"
    );
}

/// ACME in Kubernetes mode, against pebble: the Lease holder orders and writes the certificate
/// (and the account key) as Secrets through the API; the Secret watch brings the certificate
/// to the secrets directory and it is served by SNI. A follower orders nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_acme_the_lease_holder_orders_into_a_secret_and_a_follower_does_not() {
    use legate::tls::acme::Acme;
    let test = "kube_acme_the_lease_holder_orders_into_a_secret_and_a_follower_does_not";
    let fake = FakeApiServer::start().await;
    let mut run = start_source(&fake, Some("default")).await;
    let gw = crate::support::Gateway::with(
        "",
        legate::proxy::Settings {
            secrets_dir: Some(run.secrets.clone()),
            ..Default::default()
        },
    )
    .await;
    let Some(pebble) = crate::acme::Pebble::start(test, gw.http.port()).await else {
        return;
    };
    // No Secret `site-tls` yet: an ACME Host is accepted all the same (ACME creates it).
    fake.apply(HOSTS, acme_site(&pebble.directory));
    let s = wait_snapshot(&mut run.rx, "the ACME Host accepted", |s| {
        s.verdicts
            .iter()
            .any(|v| v.object.name == "site" && v.accepted)
    })
    .await;
    let compiled = legate::config::load_and_compile(&*s.revision.tree, &Default::default());
    let graph = compiled.graph.expect("the snapshot compiles");
    gw.proxy.swap(graph.clone());

    // A follower: no order, no Secret.
    let (follower_tx, follower_rx) = watch::channel(false);
    let follower = Acme::kubernetes(
        fake.client(),
        follower_rx,
        Some(pebble.ca()),
        gw.proxy.metrics().clone(),
    );
    assert!(!follower.pass(&graph).await, "a follower writes nothing");
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    assert!(fake.get(SECRETS, "default", "site-tls").is_none());
    drop(follower_tx);

    // The Lease holder orders; the HTTP-01 token is answered by the gateway.
    let leader = Acme::kubernetes(
        fake.client(),
        always_leader(),
        Some(pebble.ca()),
        gw.proxy.metrics().clone(),
    );
    gw.proxy.set_acme(leader.clone());
    assert!(leader.pass(&graph).await, "a certificate was written");
    let secret = fake
        .get(SECRETS, "default", "site-tls")
        .expect("the tlsSecret was created");
    assert_eq!(secret["type"], "kubernetes.io/tls", "{secret}");
    assert!(secret["data"]["tls.crt"].is_string() && secret["data"]["tls.key"].is_string());
    let account = fake
        .get(SECRETS, "default", "acme-account")
        .expect("the account key Secret was created");
    assert!(account["data"]["tls.key"].is_string(), "{account}");

    // The Secret watch writes it to the secrets directory in a new revision; served by SNI.
    let before = s.revision.id.clone();
    wait_snapshot(&mut run.rx, "a revision with the issued Secret", |s| {
        s.revision.id != before
    })
    .await;
    let crt = std::fs::read_to_string(run.secrets.join("site-tls/tls.crt")).unwrap();
    assert!(crt.contains("BEGIN CERTIFICATE"), "{crt}");
    gw.proxy.reload_certs();
    let root = pebble.root().await;
    let (ok, out, err) = crate::acme::served("site.acme.test", &root, gw.https.port()).await;
    assert!(ok && out == "0", "served by SNI: {out} {err}");

    // The next pass reads the Secret back: valid, not due, nothing written again.
    let writes = fake.writes().len();
    assert!(!leader.pass(&graph).await);
    assert_eq!(fake.writes().len(), writes, "{:?}", fake.writes());
    let certs = gw.proxy.metrics().certificates();
    let c = certs.iter().find(|c| c.host == "site.acme.test").unwrap();
    let c = serde_json::to_value(c).unwrap();
    assert_eq!(c["acme"]["state"], "valid", "{c}");
}

/// A TLSContext's `crl_secret` in Kubernetes mode: the Opaque Secret's `crl.pem` is written to
/// the secrets directory beside the CA (a new revision when it changes), and a context whose
/// CRL Secret is missing is set aside alone.
#[tokio::test]
async fn kube_crl_secrets_named_by_tlscontexts_are_written_to_the_secrets_dir() {
    let fake = FakeApiServer::start().await;
    fake.lock().ambassador = true;
    const CONTEXTS: &str = "getambassador.io/v3alpha1/tlscontexts";
    fake.apply(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "clients", "namespace": "default"},
               "data": {"tls.crt": b64("CLIENT-CA"), "tls.key": b64("KEY")}}),
    );
    let crl = |body: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "revoked", "namespace": "default"},
               "data": {"crl.pem": b64(body)}})
    };
    fake.apply(SECRETS, crl("CRL-1"));
    let context = |name: &str, crl: &str| {
        json!({"apiVersion": "getambassador.io/v3alpha1", "kind": "TLSContext",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"hosts": [format!("{name}.example.com")], "ca_secret": "clients",
                        "crl_secret": crl, "cert_required": true}})
    };
    fake.apply(CONTEXTS, context("checked", "revoked"));
    fake.apply(CONTEXTS, context("nocrl", "gone"));
    let mut run = start_source(&fake, Some("default")).await;
    let s = wait_snapshot(&mut run.rx, "the TLSContext with its CRL", |s| {
        files(s) == ["kube/default/TLSContext.getambassador.io/checked.yaml"]
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(run.secrets.join("revoked/crl.pem")).unwrap(),
        "CRL-1"
    );
    let nocrl = s
        .verdicts
        .iter()
        .find(|v| v.object.name == "nocrl")
        .unwrap();
    assert!(!nocrl.accepted);
    assert_eq!(nocrl.reason, "SecretMissing");
    assert!(
        nocrl.message.contains("CRL Secret `default/gone`"),
        "{}",
        nocrl.message
    );

    // A new CRL is a new revision, its file swapped in.
    let first = s.revision.id.clone();
    fake.apply(SECRETS, crl("CRL-2"));
    wait_snapshot(&mut run.rx, "a revision with the new CRL", |s| {
        s.revision.id != first
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(run.secrets.join("revoked/crl.pem")).unwrap(),
        "CRL-2"
    );
}

/// `legate run --kubernetes` with an ACME Host: the replica (the Lease holder) orders from
/// pebble, writes the Secret through the API, and serves the certificate by SNI once the
/// Secret watch brings it back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_legate_run_orders_an_acme_certificate_into_a_secret() {
    let test = "kube_legate_run_orders_an_acme_certificate_into_a_secret";
    let free = crate::support::free_addr;
    let (http, https, echo) = (free(), free(), free());
    let Some(pebble) = crate::acme::Pebble::start(test, http.port()).await else {
        return;
    };
    let fake = FakeApiServer::start().await;
    fake.apply(HOSTS, acme_site(&pebble.directory));
    let ca = pebble.ca().display().to_string();
    let gw = KubeRun::start_on(
        &fake,
        echo,
        http,
        &https.to_string(),
        &[
            "--upstream-ca",
            &ca,
            "--secrets-poll-secs",
            "1",
            "--verify-window",
            "0",
        ],
    );
    // A hang guard, not a timing check: long enough for one failed first order (a loaded
    // machine) and its 60 s backoff; the gateway's log is in the message if it never comes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(100);
    while !fake
        .get(SECRETS, "default", "site-tls")
        .is_some_and(|s| s["type"] == "kubernetes.io/tls")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Lease holder wrote no certificate Secret; gateway log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = pebble.root().await;
    crate::support::eventually_async("the issued certificate served by SNI", || async {
        let (ok, out, _) = crate::acme::served("site.acme.test", &root, https.port()).await;
        ok && out == "0"
    })
    .await;
}
