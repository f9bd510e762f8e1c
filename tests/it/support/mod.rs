//! Shared helpers for the integration tests: a real upstream server, the real gateway started
//! in-process on 127.0.0.1:0, HTTP clients (hyper, raw TCP, curl) and test certificates.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use legate::proxy::{Listeners, Proxy, Running, Settings};

pub mod git;
pub mod ws;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A real upstream: answers every request with JSON describing what it received. Query
/// parameters steer it: `sleep_ms=N` delays the answer, `download=N` streams N bytes back,
/// `hop=1` adds hop-by-hop headers to the response, `status=N` sets the status.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    /// Requests served.
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_with(name, None).await
    }

    /// An upstream speaking TLS with this certificate (HTTP/1.1 and h2 by ALPN).
    pub async fn start_tls(name: &str, cert_dir: &Path) -> Upstream {
        Upstream::start_tls_on(name, cert_dir, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A TLS upstream on a chosen address (e.g. another loopback IP, same port).
    pub async fn start_tls_on(name: &str, cert_dir: &Path, addr: SocketAddr) -> Upstream {
        let mut cfg = server_tls(cert_dir);
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Upstream::listen(name, TcpListener::bind(addr).await.unwrap(), Some(acceptor))
    }

    /// An upstream on a chosen address (e.g. another loopback IP, same port).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        Upstream::listen(name, TcpListener::bind(addr).await.unwrap(), None)
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        Upstream::listen(name, TcpListener::bind("127.0.0.1:0").await.unwrap(), tls)
    }

    fn listen(
        name: &str,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let (n, h) = (name.to_string(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, h, tls) = (n.clone(), h.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (n, h) = (n.clone(), h.clone());
                        async move { Ok::<_, Infallible>(upstream_answer(req, &n, &h).await) }
                    });
                    let b = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = b
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ =
                                    b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            task,
        }
    }

    /// `127.0.0.1:port`, for a Mapping's `service`.
    pub fn service(&self) -> String {
        self.addr.to_string()
    }
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then_some(v)
    })
}

async fn upstream_answer(
    req: Request<Incoming>,
    name: &str,
    hits: &AtomicU64,
) -> Response<TestBody> {
    hits.fetch_add(1, Ordering::Relaxed);
    let mut req = req;
    if let Some(proto) = req.headers().get("upgrade").cloned() {
        // Accept any upgrade and echo the tunnelled bytes back.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = on.await {
                let mut io = TokioIo::new(io);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert("upgrade", proto);
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return resp;
    }
    let (parts, mut body) = req.into_parts();
    let q = parts.uri.query();
    // Count and hash the body as it streams in; nothing is kept.
    let mut body_bytes = 0u64;
    let mut digest = <sha2::Sha256 as sha2::Digest>::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                    sha2::Digest::update(&mut digest, d);
                }
            }
            Err(_) => break,
        }
    }
    if let Some(ms) = query_param(q, "sleep_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let doc = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "query": q,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        "body_sha256": hex(&sha2::Digest::finalize(digest)),
    });
    let body: TestBody = match query_param(q, "download").and_then(|v| v.parse().ok()) {
        Some(n) => Generated::new(n).map_err(|e| match e {}).boxed(),
        None => Full::new(Bytes::from(doc.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    };
    let mut resp = Response::new(body);
    if let Some(s) = query_param(q, "status").and_then(|v| v.parse().ok()) {
        *resp.status_mut() = StatusCode::from_u16(s).unwrap();
    }
    let h = resp.headers_mut();
    h.insert("x-upstream", name.parse().unwrap());
    h.insert("server", "test-upstream".parse().unwrap());
    if query_param(q, "close") == Some("1") {
        // Forces the gateway to open a new upstream connection for the next request.
        h.insert("connection", "close".parse().unwrap());
    }
    if query_param(q, "hop") == Some("1") {
        h.insert("connection", "x-hop-listed".parse().unwrap());
        h.insert("x-hop-listed", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("trailer", "x-t".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
    }
    resp
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A body of `n` bytes generated on the fly in 64 KiB chunks (nothing held in memory).
pub struct Generated {
    left: u64,
    chunk: Bytes,
}

impl Generated {
    pub fn new(n: u64) -> Generated {
        Generated {
            left: n,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown on purpose: sent chunked, so no Content-Length shortcut applies.
        SizeHint::default()
    }
}

/// A config tree on disk: YAML documents plus, optionally, a secrets directory.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new(yaml: &str) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
        Tree { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Compile YAML into a graph with the real config pipeline; panics with the diagnostics.
pub fn compile(yaml: &str) -> Arc<legate::routes::Graph> {
    compile_with(yaml, legate::routes::RoutingOptions::default())
}

/// `compile` with routing options (strict selectors off, host-port stripping).
pub fn compile_with(
    yaml: &str,
    routing: legate::routes::RoutingOptions,
) -> Arc<legate::routes::Graph> {
    let tree = Tree::new(yaml);
    let opts = legate::config::Options {
        routing,
        ..legate::config::Options::default()
    };
    let out = legate::config::check_dir(tree.path(), &opts);
    match out.graph {
        Some(g) => g,
        None => panic!(
            "config does not compile:\n{}",
            out.diagnostics
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// A Mapping document.
pub fn mapping(name: &str, spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n  labels:\n    gateway: test\nspec:\n{spec}")
}

/// A Mapping for any host: `prefix` to `service`, then the `extra` spec lines.
pub fn route(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    mapping(
        name,
        &format!("hostname: '*'\nprefix: {prefix}\nservice: {service}\n{extra}"),
    )
}

/// A Host document selecting Mappings labelled `gateway: test`.
pub fn host(name: &str, hostname: &str, extra: &str) -> String {
    let extra: String = extra
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: {name}\nspec:\n  hostname: {hostname}\n  mappingSelector:\n    matchLabels:\n      gateway: test\n{extra}")
}

/// The gateway, in-process, on 127.0.0.1:0.
pub struct Gateway {
    pub proxy: Arc<Proxy>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    running: Option<Running>,
}

impl Gateway {
    pub async fn start(yaml: &str) -> Gateway {
        Gateway::with(yaml, Settings::default()).await
    }

    pub async fn with(yaml: &str, settings: Settings) -> Gateway {
        Gateway::with_graph(compile(yaml), settings).await
    }

    pub async fn with_graph(graph: Arc<legate::routes::Graph>, settings: Settings) -> Gateway {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let proxy = Proxy::new(settings).unwrap();
        proxy.swap(graph);
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = Arc::new(legate::tls::server_config(proxy.cert_source()).unwrap());
        let running = proxy
            .start(Listeners {
                http: Some(http),
                https: Some((https, tls)),
            })
            .unwrap();
        Gateway {
            proxy,
            http: running.http_addr.unwrap(),
            https: running.https_addr.unwrap(),
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn shutdown(&mut self, deadline: Duration) -> bool {
        self.running.take().unwrap().shutdown(deadline).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            // Stop accepting; connections end with the test runtime.
            tokio::spawn(r.shutdown(Duration::from_millis(1)));
        }
    }
}

/// A response read whole (test responses are small unless streamed on purpose).
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    /// The upstream's JSON description of what it received.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {}", self.status, self.body))
    }

    /// What the upstream saw for a request header (first value).
    pub fn seen(&self, header: &str) -> Option<String> {
        self.json()["headers"][header][0]
            .as_str()
            .map(str::to_string)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A pooled hyper HTTP/1.1 client.
pub fn client() -> hyper_util::client::legacy::Client<HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty() -> TestBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// Send a request with the given headers to the gateway's plain listener.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: TestBody) -> Got {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client().request(b.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    send("GET", url, headers, empty()).await
}

/// Write raw bytes on a new connection and read until the server closes it or `until` is seen.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Run curl with these arguments; returns (exit success, stdout, stderr).
pub async fn curl(args: &[String]) -> (bool, String, String) {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(&args)
            .output()
            .expect("curl is installed");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A TLS server config serving the certificate `make_secret` wrote to `cert_dir`.
pub fn server_tls(cert_dir: &Path) -> rustls::ServerConfig {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert_dir.join("tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(cert_dir.join("tls.key")).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

/// A self-signed certificate for `names`, written as a mounted Secret `<dir>/<secret>/tls.*`.
/// Returns the certificate path (to pass as `--cacert`).
pub fn make_secret(dir: &Path, secret: &str, names: &[&str]) -> PathBuf {
    let d = dir.join(secret);
    std::fs::create_dir_all(&d).unwrap();
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={}", names[0]))
        .arg("-addext")
        .arg(format!("subjectAltName={}", san.join(",")))
        // A leaf, not a CA: rustls (webpki) refuses a CA certificate as a server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(d.join("tls.key"))
        .arg("-out")
        .arg(d.join("tls.crt"))
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.join("tls.crt")
}

/// Peak resident set size (VmHWM) of another process, in bytes (0 if unreadable).
pub fn process_peak_rss(pid: u32) -> u64 {
    vm_hwm(&format!("/proc/{pid}/status"))
}

fn vm_hwm(status: &str) -> u64 {
    let s = std::fs::read_to_string(status).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// An injected DNS: fixed answers per name, switchable to failing, counting lookups.
#[derive(Debug, Default)]
pub struct FakeDns {
    pub answers: std::sync::Mutex<std::collections::HashMap<String, Vec<std::net::IpAddr>>>,
    pub failing: std::sync::atomic::AtomicBool,
    pub lookups: AtomicU64,
}

impl legate::proxy::Lookup for FakeDns {
    fn lookup(&self, name: &str) -> std::io::Result<Vec<std::net::IpAddr>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected DNS failure"));
        }
        self.answers
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
    }
}

/// A loopback address with a port that was free a moment ago (for processes that bind it).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process killed (and reaped) when the test ends, pass or fail.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test's tool is missing: under CI (`CI` set, as `.ci/run` runs) that is a failure, never a
/// pass; on a developer's machine the test says what it skipped and how to install the tool.
#[track_caller]
pub fn tool_missing(test: &str, what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {what} (required under CI: .ci/run installs it)"
    );
    eprintln!("SKIPPED {test}: {what}");
}

/// Poll `cond` every 10 ms until it holds; panics after 30 s (a hang, not a timing check).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for a condition that has to await (a request, a connect).
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
