//! Edge security end to end: a real auth service, real upstreams and the real gateway on
//! 127.0.0.1:0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::support::*;

/// What the auth service saw of one request.
#[derive(Debug, Clone)]
struct Asked {
    method: String,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A real HTTP auth service. `Bearer good` is allowed (granting `x-user` and `x-internal`),
/// `Bearer slow` is allowed after 2 s, anything else is denied with 401, a challenge and a body.
struct AuthServer {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AuthServer {
    async fn start() -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(decide(req, &log).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        AuthServer { addr, asked, task }
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

async fn decide(req: Request<Incoming>, log: &Mutex<Vec<Asked>>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.lock().unwrap().push(Asked {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    // A body containing `forbidden` is refused: the auth service judged what it was sent.
    if body.windows(9).any(|w| w == b"forbidden") {
        return Response::builder()
            .status(403)
            .body(Full::new(Bytes::from_static(b"body refused\n")))
            .unwrap();
    }
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let allow = || {
        Response::builder()
            .status(200)
            .header("x-user", "alice")
            .header("x-internal", "not-for-upstream")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    match auth {
        "Bearer good" => allow(),
        "Bearer slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            allow()
        }
        _ => Response::builder()
            .status(401)
            .header("www-authenticate", "Bearer realm=\"test\"")
            .header("x-deny-reason", "no token")
            .body(Full::new(Bytes::from_static(b"denied by auth\n")))
            .unwrap(),
    }
}

fn auth_service(spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: AuthService\nmetadata:\n  name: auth\nspec:\n{spec}")
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_allows_denies_copies_headers_and_bypasses() {
    let up = Upstream::start("app").await;
    let auth = AuthServer::start().await;
    let svc = up.service();
    let yaml = [
        auth_service(&format!(
            "auth_service: {}\npath_prefix: /extauth\ntimeout_ms: 500\nallowed_request_headers: [x-tenant]\nallowed_authorization_headers: [x-user]\nstatus_on_error:\n  code: 503",
            auth.addr
        )),
        route("secure", "/secure/", &svc, ""),
        route("public", "/public/", &svc, "bypass_auth: true"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;

    // Allowed: the upstream gets the granted header, not the one the AuthService does not list.
    let r = get(
        &gw.url("/secure/a?q=1"),
        &[
            ("authorization", "Bearer good"),
            ("x-tenant", "t1"),
            ("x-other", "o"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    assert_eq!(r.seen("x-internal"), None);
    assert_eq!(r.json()["path"], "/a");
    let asked = auth.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].method, "GET");
    assert_eq!(asked[0].path, "/extauth/secure/a?q=1");
    assert_eq!(asked[0].headers["x-tenant"], "t1");
    assert_eq!(asked[0].headers["authorization"], "Bearer good");
    assert!(asked[0].headers.get("x-other").is_none());
    assert!(asked[0].headers.get("x-forwarded-for").is_some());

    // A client cannot smuggle a granted header past a denial, nor keep its own on an allow.
    let r = get(
        &gw.url("/secure/a"),
        &[("authorization", "Bearer good"), ("x-user", "mallory")],
    )
    .await;
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));

    // Denied: the auth service's answer reaches the client, the upstream is not called.
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let r = get(&gw.url("/secure/a"), &[("authorization", "Bearer bad")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"test\""));
    assert_eq!(r.header("x-deny-reason"), Some("no token"));
    assert_eq!(r.body, "denied by auth\n");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);

    // bypass_auth: served without asking.
    let before = auth.asked().len();
    let r = get(&gw.url("/public/x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(auth.asked().len(), before);

    // Slow past timeout_ms: status_on_error.
    let started = std::time::Instant::now();
    let r = get(&gw.url("/secure/a"), &[("authorization", "Bearer slow")]).await;
    assert_eq!(r.status, 503);
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_sees_the_normalized_path_the_real_peer_and_its_grants_survive() {
    let up = Upstream::start("app").await;
    let auth = AuthServer::start().await;
    let svc = up.service();
    let yaml = [
        auth_service(&format!(
            "auth_service: {}\npath_prefix: /extauth\nallowed_authorization_headers: [x-user]",
            auth.addr
        )),
        route("secure", "/secure/", &svc, ""),
        route("public", "/public/", &svc, "bypass_auth: true"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let resp = raw(
        gw.http,
        b"GET /public/%2e%2e/secure/a?q=1 HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer good\r\n\
          X-Forwarded-For: 6.6.6.6\r\nConnection: close, x-user\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The grant is added after hop-by-hop stripping: `Connection: x-user` cannot remove it.
    assert!(resp.contains(r#""x-user":["alice"]"#), "{resp}");
    assert!(resp.contains(r#""path":"/a""#), "{resp}");
    let asked = auth.asked();
    assert_eq!(asked.len(), 1);
    // The normalized client path, before the Mapping's prefix rewrite.
    assert_eq!(asked[0].path, "/extauth/secure/a?q=1");
    // The real peer, not the client's claim; the checked authority.
    assert_eq!(asked[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(asked[0].headers["host"], "app.example");
    assert_eq!(asked[0].headers["x-forwarded-host"], "app.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_down_refuses_or_fails_open() {
    let up = Upstream::start("app").await;
    let svc = up.service();
    let down = closed_port().await;
    let route = route("secure", "/secure/", &svc, "");

    // Default: 403.
    let gw = Gateway::start(&(auth_service(&format!("auth_service: {down}")) + &route)).await;
    let r = get(&gw.url("/secure/a"), &[("authorization", "Bearer good")]).await;
    assert_eq!(r.status, 403);

    // failure_mode_allow: the request passes.
    let gw = Gateway::start(
        &(auth_service(&format!("auth_service: {down}\nfailure_mode_allow: true")) + &route),
    )
    .await;
    let r = get(&gw.url("/secure/a"), &[]).await;
    assert_eq!(r.status, 200);

    // Once an auth service answers, its answer is used again.
    let auth = AuthServer::start().await;
    let gw =
        Gateway::start(&(auth_service(&format!("auth_service: {}", auth.addr)) + &route)).await;
    assert_eq!(get(&gw.url("/secure/a"), &[]).await.status, 401);
}

/// A body of `n` bytes that is not one repeated byte (so a reordering or a cut shows), sent in
/// 1000-byte frames without a Content-Length.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn chunked(body: &[u8]) -> TestBody {
    use http_body_util::BodyExt;
    let frames: Vec<Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
        body.chunks(1000)
            .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
}

fn sha256_hex(b: &[u8]) -> String {
    hex(&<sha2::Sha256 as sha2::Digest>::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_include_body_sends_the_body_and_still_forwards_it() {
    let up = Upstream::start("app").await;
    let auth = AuthServer::start().await;
    let svc = up.service();
    let routes = [route("secure", "/secure/", &svc, "")].concat();
    let spec = |extra: &str| {
        auth_service(&format!(
            "auth_service: {}\ntimeout_ms: 2000\n{extra}",
            auth.addr
        ))
    };
    let good = [
        ("authorization", "Bearer good"),
        ("content-type", "application/x-test"),
    ];

    // Whole bodies up to max_bytes: the auth service gets the body, the upstream the same body.
    let gw = Gateway::start(&(spec("include_body:\n  max_bytes: 4096") + &routes)).await;
    let body = pattern(3000);
    let r = send("POST", &gw.url("/secure/up"), &good, chunked(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = auth.asked().pop().unwrap();
    assert_eq!(seen.body.as_ref(), &body[..]);
    assert_eq!(seen.headers["content-length"], "3000");
    assert_eq!(seen.headers["x-envoy-auth-partial-body"], "false");
    assert_eq!(seen.headers["content-type"], "application/x-test");
    assert_eq!(r.json()["body_bytes"], 3000);
    assert_eq!(r.json()["body_sha256"], sha256_hex(&body));
    // With a Content-Length too.
    let r = send("POST", &gw.url("/secure/up"), &good, full(&body)).await;
    assert_eq!(r.json()["body_sha256"], sha256_hex(&body));
    assert_eq!(auth.asked().pop().unwrap().body.as_ref(), &body[..]);
    // The auth service decides on the body.
    let r = send(
        "POST",
        &gw.url("/secure/up"),
        &good,
        full(b"this is forbidden"),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "body refused\n");

    // Larger than max_bytes without allow_partial: 413, as Envoy answers; nothing reaches the
    // auth service or the upstream, streamed or announced by Content-Length.
    let (asked, hits) = (
        auth.asked().len(),
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    let big = pattern(10_000);
    let r = send("POST", &gw.url("/secure/up"), &good, chunked(&big)).await;
    assert_eq!(r.status, 413);
    let r = send("POST", &gw.url("/secure/up"), &good, full(&big)).await;
    assert_eq!(r.status, 413);
    assert_eq!(auth.asked().len(), asked);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);

    // allow_partial: the auth service gets the first max_bytes, the upstream all of it.
    let gw = Gateway::start(
        &(spec("include_body:\n  max_bytes: 4096\n  allow_partial: true") + &routes),
    )
    .await;
    let big = pattern(300_000);
    let r = send("POST", &gw.url("/secure/up"), &good, chunked(&big)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = auth.asked().pop().unwrap();
    assert_eq!(seen.body.as_ref(), &big[..4096]);
    assert_eq!(seen.headers["x-envoy-auth-partial-body"], "true");
    assert_eq!(r.json()["body_bytes"], 300_000);
    assert_eq!(r.json()["body_sha256"], sha256_hex(&big));

    // Without include_body the auth service gets no body and the body streams upstream.
    let gw = Gateway::start(&(spec("") + &routes)).await;
    let r = send("POST", &gw.url("/secure/up"), &good, chunked(&big)).await;
    assert_eq!(r.status, 200);
    let seen = auth.asked().pop().unwrap();
    assert!(seen.body.is_empty());
    assert_eq!(seen.headers["content-length"], "0");
    assert!(seen.headers.get("x-envoy-auth-partial-body").is_none());
    assert_eq!(r.json()["body_sha256"], sha256_hex(&big));
}

/// A client that sends part of a body and stalls is answered 408 once the gateway has waited
/// its stall limit (10 s) for more; the auth service and the upstream never see the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_include_body_does_not_wait_forever_for_a_stalled_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("app").await;
    let auth = AuthServer::start().await;
    let yaml = auth_service(&format!(
        "auth_service: {}\ntimeout_ms: 2000\ninclude_body:\n  max_bytes: 4096",
        auth.addr
    )) + &route("secure", "/secure/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        b"POST /secure/up HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer good\r\n\
          Content-Length: 1000\r\n\r\nonly the first bytes",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    // Bounded well past the 10 s stall limit, so a gateway that waits forever fails the test.
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut head))
        .await
        .expect("the gateway waited for the stalled body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");
    assert!(auth.asked().is_empty());
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

fn full(b: &[u8]) -> TestBody {
    use http_body_util::BodyExt;
    Full::new(Bytes::copy_from_slice(b))
        .map_err(|e| match e {})
        .boxed()
}

/// Emissary's other AuthService fields: `add_auth_headers` reach the auth service,
/// `allow_request_body` sends the first 4096 bytes (partial allowed), and `timeout_ms: 0` waits
/// as long as the auth service takes (Envoy's "no timeout").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_auth_emissary_fields_add_headers_allow_body_and_zero_timeout() {
    let up = Upstream::start("app").await;
    let auth = AuthServer::start().await;
    let routes = route("secure", "/secure/", &up.service(), "");
    let spec = auth_service(&format!(
        "auth_service: {}\ntimeout_ms: 0\nallow_request_body: true\nadd_auth_headers:\n  x-from: gateway",
        auth.addr
    ));
    let gw = Gateway::start(&(spec + &routes)).await;
    let body = pattern(5000);
    let r = send(
        "POST",
        &gw.url("/secure/up"),
        &[("authorization", "Bearer good")],
        full(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["body_sha256"],
        sha256_hex(&body),
        "the upstream gets it all"
    );
    let seen = auth.asked().pop().unwrap();
    assert_eq!(seen.headers["x-from"], "gateway");
    assert_eq!(seen.body.as_ref(), &body[..4096]);
    assert_eq!(seen.headers["x-envoy-auth-partial-body"], "true");
    // The auth service answers after 2 s: still within "no timeout".
    let r = get(&gw.url("/secure/slow"), &[("authorization", "Bearer slow")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn authservice_problems_are_diagnosed() {
    let check = |yaml: &str| {
        let tree = Tree::new(yaml);
        legate::config::check_dir(tree.path(), &legate::config::Options::default())
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let out = check(&auth_service("auth_service: auth:3000\nproto: grpc"));
    assert!(out.contains("proto: grpc"), "{out}");
    let out = check(&auth_service("auth_service: https://auth:3000"));
    assert!(out.contains("must be plain HTTP"), "{out}");
    let out = check(&auth_service("auth_servise: auth:3000"));
    assert!(out.contains("did you mean `auth_service`"), "{out}");
    let two = auth_service("auth_service: a:1")
        + &auth_service("auth_service: b:1").replace("name: auth", "name: auth2");
    let out = check(&two);
    assert!(out.contains("second AuthService"), "{out}");
}

// ---- JWT ----

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{self as sig, KeyPair};

/// Signing keys made in the test, and their public JWKs.
struct Keys {
    rsa: sig::RsaKeyPair,
    ec: sig::EcdsaKeyPair,
    ed: sig::Ed25519KeyPair,
    /// The RSA public key as PEM: what an attacker would use as an HMAC secret.
    rsa_pub_pem: Vec<u8>,
}

impl Keys {
    fn new(dir: &std::path::Path) -> Keys {
        let rng = ring::rand::SystemRandom::new();
        let pem = dir.join("rsa.pem");
        let der = dir.join("rsa.der");
        let pubpem = dir.join("rsa.pub.pem");
        let ok = |args: &[&str]| {
            let st = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
        };
        let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
        ok(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &p(&pem),
        ]);
        ok(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &p(&pem),
            "-outform",
            "DER",
            "-out",
            &p(&der),
        ]);
        ok(&["pkey", "-in", &p(&pem), "-pubout", "-out", &p(&pubpem)]);
        let rsa = sig::RsaKeyPair::from_pkcs8(&std::fs::read(&der).unwrap()).unwrap();
        let ec_doc =
            sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec = sig::EcdsaKeyPair::from_pkcs8(
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            ec_doc.as_ref(),
            &rng,
        )
        .unwrap();
        Keys {
            rsa,
            ec,
            ed: ed25519(),
            rsa_pub_pem: std::fs::read(&pubpem).unwrap(),
        }
    }

    fn jwks(&self) -> String {
        let rsa = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(self.rsa.public());
        let ec = self.ec.public_key().as_ref();
        serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "r1", "alg": "RS256", "n": B64.encode(&rsa.n), "e": B64.encode(&rsa.e)},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": B64.encode(&ec[1..33]), "y": B64.encode(&ec[33..65])},
            {"kty": "OKP", "kid": "d1", "crv": "Ed25519", "x": B64.encode(self.ed.public_key().as_ref())},
        ]})
        .to_string()
    }
}

fn ed25519() -> sig::Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let doc = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    sig::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

fn ed_jwk(kid: &str, key: &sig::Ed25519KeyPair) -> String {
    serde_json::json!({"keys": [
        {"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": B64.encode(key.public_key().as_ref())},
    ]})
    .to_string()
}

enum Signer<'a> {
    Rsa(&'a sig::RsaKeyPair),
    Ec(&'a sig::EcdsaKeyPair),
    Ed(&'a sig::Ed25519KeyPair),
    Hmac(&'a [u8]),
    Unsigned,
}

fn token(header: serde_json::Value, claims: serde_json::Value, signer: Signer<'_>) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let s: Vec<u8> = match signer {
        Signer::Rsa(k) => {
            let mut out = vec![0; k.public().modulus_len()];
            k.sign(&sig::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut out)
                .unwrap();
            out
        }
        Signer::Ec(k) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
        Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        Signer::Hmac(secret) => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
        }
        Signer::Unsigned => Vec::new(),
    };
    format!("{input}.{}", B64.encode(s))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": "https://issuer.test",
        "aud": ["other", "api"],
        "sub": "alice",
        "email": "alice@example.test",
        "exp": now() + 600,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn jwt_policy(spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: legate.dev/v1alpha1\nkind: JWTPolicy\nmetadata:\n  name: api-jwt\nspec:\n{spec}")
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_accepts_valid_tokens_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks()).unwrap();
    let up = Upstream::start("app").await;
    let svc = up.service();
    let yaml = [
        jwt_policy(&format!(
            "issuer: https://issuer.test\naudiences: [api]\njwks:\n  file: {}\nclock_skew_seconds: 30\nrequired_claims: [sub]\nforward_claims:\n  sub: x-user\n  email: x-email\nmappings: [secure]",
            jwks.display()
        )),
        route("secure", "/secure/", &svc, ""),
        route("open", "/open/", &svc, ""),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let url = gw.url("/secure/x");
    let call = |t: String| {
        let url = url.clone();
        async move {
            let auth = bearer(&t);
            get(
                &url,
                &[("authorization", auth.as_str()), ("x-user", "mallory")],
            )
            .await
        }
    };
    let h = |alg: &str, kid: &str| serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"});
    let c = || claims(serde_json::json!({}));

    // Valid, each algorithm; claims forwarded, the client's own x-user replaced.
    for t in [
        token(h("RS256", "r1"), c(), Signer::Rsa(&keys.rsa)),
        token(h("ES256", "e1"), c(), Signer::Ec(&keys.ec)),
        token(h("EdDSA", "d1"), c(), Signer::Ed(&keys.ed)),
        // No kid: every key of the algorithm is tried.
        token(
            serde_json::json!({"alg": "EdDSA"}),
            c(),
            Signer::Ed(&keys.ed),
        ),
    ] {
        let r = call(t).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
        assert_eq!(r.seen("x-email").as_deref(), Some("alice@example.test"));
    }
    // Expired within the clock skew: accepted.
    let r = call(token(
        h("EdDSA", "d1"),
        claims(serde_json::json!({"exp": now() - 10})),
        Signer::Ed(&keys.ed),
    ))
    .await;
    assert_eq!(r.status, 200);

    let other = ed25519();
    let none = token(serde_json::json!({"alg": "none"}), c(), Signer::Unsigned);
    let refused = [
        (
            "expired",
            token(
                h("EdDSA", "d1"),
                claims(serde_json::json!({"exp": now() - 3600})),
                Signer::Ed(&keys.ed),
            ),
        ),
        (
            "not yet valid",
            token(
                h("EdDSA", "d1"),
                claims(serde_json::json!({"nbf": now() + 3600})),
                Signer::Ed(&keys.ed),
            ),
        ),
        (
            "wrong audience",
            token(
                h("RS256", "r1"),
                claims(serde_json::json!({"aud": "billing"})),
                Signer::Rsa(&keys.rsa),
            ),
        ),
        (
            "wrong issuer",
            token(
                h("RS256", "r1"),
                claims(serde_json::json!({"iss": "https://evil.test"})),
                Signer::Rsa(&keys.rsa),
            ),
        ),
        (
            "missing sub",
            token(
                h("RS256", "r1"),
                claims(serde_json::json!({"sub": null})),
                Signer::Rsa(&keys.rsa),
            ),
        ),
        (
            "wrong key",
            token(h("EdDSA", "d1"), c(), Signer::Ed(&other)),
        ),
        ("alg none", none.clone()),
        (
            "alg none, signature stripped",
            none.trim_end_matches('.').to_string(),
        ),
        (
            "HS256 keyed with the RSA public key",
            token(h("HS256", "r1"), c(), Signer::Hmac(&keys.rsa_pub_pem)),
        ),
        (
            "RS256 header on an Ed25519 kid",
            token(h("RS256", "d1"), c(), Signer::Ed(&keys.ed)),
        ),
        ("tampered payload", {
            let t = token(h("EdDSA", "d1"), c(), Signer::Ed(&keys.ed));
            let parts: Vec<&str> = t.split('.').collect();
            let evil = B64.encode(claims(serde_json::json!({"sub": "root"})).to_string());
            format!("{}.{}.{}", parts[0], evil, parts[2])
        }),
        ("garbage", "not.a.jwt".to_string()),
    ];
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    for (why, t) in refused {
        let r = call(t).await;
        assert_eq!(r.status, 401, "{why}: {}", r.body);
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{why}: {challenge}"
        );
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "a refused request reached the upstream"
    );

    // No token at all: a bare challenge.
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    // Routes the policy does not cover need no token.
    assert_eq!(get(&gw.url("/open/x"), &[]).await.status, 200);
}

/// Serves a JWKS document that the test can change or break.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<Option<String>>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
    /// Accept requests and never answer them.
    hang: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        JwksServer::start_with(doc, None).await
    }

    /// Over HTTPS with the certificate in `cert_dir` (`make_secret`).
    async fn start_tls(doc: String, cert_dir: &std::path::Path) -> JwksServer {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(cert_dir)));
        JwksServer::start_with(doc, Some(acceptor)).await
    }

    async fn start_with(doc: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(Some(doc)));
        let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, f, h) = (doc.clone(), fetches.clone(), hang.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (d, f, h) = (d.clone(), f.clone(), h.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        let hang = h.load(std::sync::atomic::Ordering::SeqCst);
                        async move {
                            if hang {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(match body {
                                Some(b) => Response::new(Full::new(Bytes::from(b))),
                                None => Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            })
                        }
                    });
                    let b = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = b.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        JwksServer {
            addr,
            doc,
            fetches,
            hang,
            task,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_from_an_https_url_are_fetched_trusting_the_upstream_ca() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_secret(certs.path(), "jwks", &["localhost"]);
    let k1 = ed25519();
    let jwks = JwksServer::start_tls(ed_jwk("k1", &k1), &certs.path().join("jwks")).await;
    let up = Upstream::start("app").await;
    let yaml = jwt_policy(&format!(
        "jwks:\n  url: https://localhost:{}/jwks.json\nmappings: [secure]",
        jwks.addr.port()
    )) + &mapping(
        "secure",
        &format!("hostname: '*'\nprefix: /secure/\nservice: {}", up.service()),
    );
    let t = bearer(&token(
        serde_json::json!({"alg": "EdDSA", "kid": "k1"}),
        claims(serde_json::json!({})),
        Signer::Ed(&k1),
    ));
    let settings = legate::proxy::Settings {
        upstream_ca: Some(ca),
        ..Default::default()
    };
    let gw = Gateway::with(&yaml, settings).await;
    let r = get(&gw.url("/secure/x"), &[("authorization", t.as_str())]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Without `--upstream-ca` the JWKS server's certificate is not trusted: no keys, refused.
    let untrusted = Gateway::start(&yaml).await;
    let r = get(
        &untrusted.url("/secure/x"),
        &[("authorization", t.as_str())],
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_from_a_url_are_cached_refreshed_and_kept_on_failure() {
    let (k1, k2) = (ed25519(), ed25519());
    let jwks = JwksServer::start(ed_jwk("k1", &k1)).await;
    let up = Upstream::start("app").await;
    let yaml = [
        jwt_policy(&format!(
            "jwks:\n  url: http://{}/jwks.json\n  refresh_seconds: 1\nhosts: [api]",
            jwks.addr
        )),
        // Plain HTTP in this test: a Host's default insecure action is Redirect.
        host(
            "api",
            "api.test",
            "requestPolicy:\n  insecure:\n    action: Route",
        ),
        mapping(
            "secure",
            &format!("prefix: /secure/\nservice: {}", up.service()),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let url = gw.url("/secure/x");
    let h = |kid: &str| serde_json::json!({"alg": "EdDSA", "kid": kid});
    let t1 = bearer(&token(
        h("k1"),
        claims(serde_json::json!({})),
        Signer::Ed(&k1),
    ));
    let t2 = bearer(&token(
        h("k2"),
        claims(serde_json::json!({})),
        Signer::Ed(&k2),
    ));
    let call = |t: &str| {
        let (url, t) = (url.clone(), t.to_string());
        async move {
            get(&url, &[("host", "api.test"), ("authorization", t.as_str())])
                .await
                .status
        }
    };

    // The Host's Mappings require a token; the keys are fetched once, then cached.
    assert_eq!(call(&t1).await, 200);
    assert_eq!(call(&t1).await, 200);
    assert_eq!(jwks.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(get(&url, &[("host", "api.test")]).await.status, 401);

    // The JWKS endpoint fails: the cached keys are kept.
    *jwks.doc.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&t1).await, 200);
    // The refresh runs in the background; the cached keys keep serving meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while jwks.fetches.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&t1).await, 200);

    // Rotation: once the endpoint serves k2, k2 is accepted (after the failure back-off).
    *jwks.doc.lock().unwrap() = Some(ed_jwk("k2", &k2));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&t2).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "rotated key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call(&t1).await, 401);
}

#[test]
fn jwtpolicy_problems_are_diagnosed() {
    let check = |yaml: &str| {
        let tree = Tree::new(yaml);
        legate::config::check_dir(tree.path(), &legate::config::Options::default())
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let m = mapping("secure", "hostname: '*'\nprefix: /s/\nservice: app");
    let out = check(
        &(jwt_policy("jwks:\n  file: /k.json\nalgorithms: [HS256]\nmappings: [secure]") + &m),
    );
    assert!(out.contains("HS256"), "{out}");
    let out =
        check(&(jwt_policy("jwks:\n  url: http://keys.example/jwks\nmappings: [secure]") + &m));
    assert!(out.contains("not an https:// URL"), "{out}");
    let out = check(&(jwt_policy("jwks: {}\nmappings: [secure]") + &m));
    assert!(out.contains("exactly one of"), "{out}");
    let out = check(&(jwt_policy("jwks:\n  file: /k.json\nmappings: [secur]") + &m));
    assert!(out.contains("Mapping `secur`"), "{out}");
    let two = jwt_policy("jwks:\n  file: /k.json\nmappings: [secure]")
        + &jwt_policy(
            "jwks:\n  file: /k.json\nmappingSelector:\n  matchLabels:\n    gateway: test",
        )
        .replace("name: api-jwt", "name: other")
        + &m;
    let out = check(&two);
    assert!(out.contains("covered by JWTPolicy"), "{out}");
}

// ---- Rate limits ----

fn rate_limit(name: &str, spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: legate.dev/v1alpha1\nkind: RateLimit\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// Emissary-style descriptor groups on a Mapping.
const LABELS: &str = "labels:
  ambassador:
    - per_client:
      - remote_address:
          key: remote_address
    - per_tenant:
      - generic_key:
          value: tenant-api
      - request_headers:
          key: tenant
          header_name: x-tenant";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limits_by_client_and_header_with_headers_on_429() {
    let up = Upstream::start("app").await;
    let svc = up.service();
    let yaml = [
        rate_limit(
            "local",
            "limits:
  - name: client
    group: per_client
    requests: 3
    per: minute
  - name: tenant
    group: per_tenant
    requests: 2
    per: hour",
        ),
        route("limited", "/limited/", &svc, LABELS),
        route("free", "/free/", &svc, ""),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let url = gw.url("/limited/x");

    // Without x-tenant the tenant descriptor does not apply: only the per-client limit counts.
    for _ in 0..3 {
        assert_eq!(get(&url, &[]).await.status, 200);
    }
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 429);
    // 3 per minute: one token every 20 s.
    assert_eq!(r.header("retry-after"), Some("20"));
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("ratelimit-reset"), Some("60"));
    assert_eq!(r.body, "too many requests\n");
    // Another route is not counted.
    assert_eq!(get(&gw.url("/free/x"), &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_per_header_value() {
    let up = Upstream::start("app").await;
    let svc = up.service();
    let yaml = [
        rate_limit(
            "tenants",
            "limits:
  - name: tenant
    group: per_tenant
    requests: 1
    per: second
    burst: 2",
        ),
        route("limited", "/limited/", &svc, LABELS),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let url = gw.url("/limited/x");
    let as_tenant = |t: &'static str| {
        let url = url.clone();
        async move { get(&url, &[("x-tenant", t)]).await.status }
    };
    // Burst 2 per tenant value; tenant b has its own bucket.
    assert_eq!(as_tenant("a").await, 200);
    assert_eq!(as_tenant("a").await, 200);
    assert_eq!(as_tenant("a").await, 429);
    assert_eq!(as_tenant("b").await, 200);
    // The refill itself is timed on tokio's paused clock:
    // policy::ratelimit::tests::a_local_bucket_refills_at_its_rate_on_the_tokio_clock.
}

/// A real redis-server on a free port, killed on drop.
struct RedisServer {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// With extra `redis-server` arguments (e.g. `--requirepass`).
    async fn start_with(extra: &[&str]) -> RedisServer {
        let addr = closed_port().await;
        let child = std::process::Command::new("redis-server")
            .args(extra)
            .args([
                "--port",
                &addr.port().to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        // Owned from here on, so the process is killed and reaped on every path.
        let server = RedisServer { addr, child };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on {addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limit_is_shared_by_two_gateways_and_fail_modes_hold_when_redis_dies() {
    let redis = RedisServer::start().await;
    let up = Upstream::start("app").await;
    let svc = up.service();
    let yaml = [
        rate_limit(
            "shared",
            &format!(
                "backend: redis\nredis:\n  address: {}\n  timeout_ms: 200\nfailure_mode: open\nlimits:\n  - name: client\n    group: per_client\n    requests: 4\n    per: minute",
                redis.addr
            ),
        ),
        rate_limit(
            "strict",
            &format!(
                "backend: redis\nredis:\n  address: {}\n  timeout_ms: 200\nfailure_mode: closed\nlimits:\n  - name: client\n    domain: strict\n    group: per_client\n    requests: 100\n    per: second",
                redis.addr
            ),
        ),
        route("limited", "/limited/", &svc, LABELS),
        route("strict", "/strict/", &svc, "labels:\n  strict:\n    - per_client:\n      - remote_address:\n          key: remote_address"),
    ]
    .concat();
    let (a, b) = (Gateway::start(&yaml).await, Gateway::start(&yaml).await);

    // Four requests in all, spread over both gateways; the fifth is refused by either.
    let mut allowed = 0;
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = get(&gw.url("/limited/x"), &[]).await;
        match r.status.as_u16() {
            200 => allowed += 1,
            429 => assert_eq!(r.header("ratelimit-limit"), Some("4")),
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(allowed, 4);
    assert_eq!(get(&a.url("/limited/x"), &[]).await.status, 429);
    assert_eq!(get(&b.url("/limited/x"), &[]).await.status, 429);
    assert_eq!(get(&a.url("/strict/x"), &[]).await.status, 200);

    // Redis dies: `open` keeps serving (quickly), `closed` answers 503; the gateway stays up.
    drop(redis);
    let started = std::time::Instant::now();
    assert_eq!(get(&a.url("/limited/x"), &[]).await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = get(&b.url("/strict/x"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(get(&b.url("/limited/x"), &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limit_authenticates_with_the_password_of_its_url() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]).await;
    let up = Upstream::start("app").await;
    let svc = up.service();
    let limit = |name: &str, domain: &str, password: &str| {
        rate_limit(
            name,
            &format!(
                "backend: redis\nredis:\n  address: redis://:{password}@{}\n  timeout_ms: 1000\nfailure_mode: closed\nlimits:\n  - {{name: client, domain: {domain}, group: per_client, requests: 2, per: hour}}",
                redis.addr
            ),
        )
    };
    let yaml = [
        limit("good", "good", "s3cret"),
        limit("bad", "bad", "wrong"),
        route("good", "/good/", &svc, "labels:\n  good:\n    - per_client:\n      - remote_address:\n          key: remote_address"),
        route("bad", "/bad/", &svc, "labels:\n  bad:\n    - per_client:\n      - remote_address:\n          key: remote_address"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    // The right password: the limit counts in Redis (2 allowed, then refused).
    assert_eq!(get(&gw.url("/good/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/good/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/good/x"), &[]).await.status, 429);
    // A wrong password is a Redis that does not answer: `failure_mode: closed` refuses.
    assert_eq!(get(&gw.url("/bad/x"), &[]).await.status, 503);
}

#[test]
fn ratelimit_problems_are_diagnosed() {
    let check = |yaml: &str| {
        let tree = Tree::new(yaml);
        legate::config::check_dir(tree.path(), &legate::config::Options::default())
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let m = mapping(
        "m",
        &format!("hostname: '*'\nprefix: /s/\nservice: app\n{LABELS}"),
    );
    let out = check(
        &(rate_limit(
            "r",
            "backend: redis\nlimits:\n  - {name: a, group: per_client, requests: 1, per: second}",
        ) + &m),
    );
    assert!(out.contains("needs `redis.address`"), "{out}");
    let out = check(
        &(rate_limit(
            "r",
            "backend: redis\nredis: {address: 'redis://host:notaport'}\nlimits:\n  - {name: a, group: per_client, requests: 1, per: second}",
        ) + &m),
    );
    assert!(out.contains("is not a Redis address"), "{out}");
    let out = check(
        &(rate_limit(
            "r",
            "limits:\n  - {name: a, group: nobody, requests: 1, per: second}",
        ) + &m),
    );
    assert!(out.contains("counts nothing"), "{out}");
    let claim_route = mapping(
        "byuser",
        "hostname: '*'\nprefix: /u/\nservice: app\nlabels:\n  ambassador:\n    - per_user:\n      - jwt_claim: {claim: sub}",
    );
    let out = check(
        &(rate_limit(
            "r",
            "limits:\n  - {name: a, group: per_user, requests: 1, per: second}",
        ) + &claim_route),
    );
    assert!(out.contains("no JWTPolicy or OIDCLogin covers it"), "{out}");
    let out = check(
        &(rate_limit(
            "r",
            "limits:\n  - {name: a, group: per_client, requests: 1, per: day}",
        ) + &m),
    );
    assert!(out.contains("per"), "{out}");
}

// A remembered token's expiry is tested on an injected clock:
// policy::jwt::tests::exp_and_nbf_are_judged_at_the_given_time_for_a_remembered_token_too.

// ---- JWT claims as rate-limit keys, RateLimit-* on allowed responses ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_claims_key_rate_limits_and_allowed_responses_report_the_tightest_limit() {
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, ed_jwk("k", &key)).unwrap();
    let up = Upstream::start("app").await;
    let svc = up.service();
    let labels = "labels:
  ambassador:
    - per_user:
      - jwt_claim:
          claim: sub
          key: user
    - per_client:
      - remote_address:
          key: remote_address";
    let yaml = [
        jwt_policy(&format!(
            "jwks:\n  file: {}\nmappings: [users, quiet]",
            jwks.display()
        )),
        rate_limit(
            "users",
            "limits:\n  - {name: user, group: per_user, requests: 3, per: minute}",
        ),
        rate_limit(
            "clients",
            "limits:\n  - {name: client, group: per_client, requests: 100, per: minute}",
        ),
        rate_limit(
            "quiet",
            "response_headers: false\nlimits:\n  - {name: q, domain: quiet, group: per_user, requests: 100, per: minute}",
        ),
        route("users", "/users/", &svc, labels),
        route("quiet", "/quiet/", &svc, "labels:\n  quiet:\n    - per_user:\n      - jwt_claim: {claim: sub}"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let tok = |sub: Option<&str>| {
        let c = match sub {
            Some(s) => claims(serde_json::json!({"sub": s})),
            None => claims(serde_json::json!({"sub": null})),
        };
        bearer(&token(
            serde_json::json!({"alg": "EdDSA", "kid": "k"}),
            c,
            Signer::Ed(&key),
        ))
    };
    let (alice, bob, nobody) = (tok(Some("alice")), tok(Some("bob")), tok(None));
    let url = gw.url("/users/x");
    let call = |t: &str| {
        let (url, t) = (url.clone(), t.to_string());
        async move { get(&url, &[("authorization", t.as_str())]).await }
    };

    // Requests without a valid token are refused by the JWTPolicy before any limit counts them.
    for _ in 0..5 {
        assert_eq!(get(&url, &[]).await.status, 401);
        assert_eq!(
            get(&url, &[("authorization", "Bearer not.a.jwt")])
                .await
                .status,
            401
        );
    }
    // Alice's own bucket: 3 a minute; each allowed answer reports the tighter (per-user) limit.
    for left in ["2", "1", "0"] {
        let r = call(&alice).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("ratelimit-limit"), Some("3"));
        assert_eq!(r.header("ratelimit-remaining"), Some(left));
        assert!(r.header("ratelimit-reset").unwrap().parse::<u64>().unwrap() <= 60);
    }
    let r = call(&alice).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    // Bob is keyed apart from Alice (same client address).
    let r = call(&bob).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-remaining"), Some("2"));
    // A valid token without the claim: the per-user group does not apply; the per-client one
    // does and is then the tightest.
    for _ in 0..5 {
        let r = call(&nobody).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-limit"), Some("100"));
    }
    // response_headers: false: counted, not reported.
    let r = get(&gw.url("/quiet/x"), &[("authorization", alice.as_str())]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-limit"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_buckets_survive_a_new_revision_that_keeps_their_limit() {
    let up = Upstream::start("app").await;
    let svc = up.service();
    let limited = route("limited", "/limited/", &svc, LABELS);
    let limit = |n: u32| {
        rate_limit(
            "local",
            &format!("limits:\n  - {{name: client, group: per_client, requests: {n}, per: hour}}"),
        )
    };
    let gw = Gateway::start(&(limit(2) + &limited)).await;
    let url = gw.url("/limited/x");
    assert_eq!(get(&url, &[]).await.status, 200);
    assert_eq!(get(&url, &[]).await.status, 200);
    assert_eq!(get(&url, &[]).await.status, 429);

    // Another route added: the limit is the same, so the client's bucket is still empty.
    let other = route("other", "/other/", &svc, "");
    gw.proxy.swap(compile(&(limit(2) + &limited + &other)));
    assert_eq!(get(&gw.url("/other/x"), &[]).await.status, 200);
    assert_eq!(get(&url, &[]).await.status, 429);

    // The limit itself changed: new buckets.
    gw.proxy.swap(compile(&(limit(5) + &limited + &other)));
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-remaining"), Some("4"));
}

// ---- Two legate processes, one Redis ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limit_holds_across_two_legate_processes() {
    let redis = RedisServer::start().await;
    let up = Upstream::start("app").await;
    let limit = 10;
    let yaml = rate_limit(
        "shared",
        &format!(
            "backend: redis\nredis:\n  address: {}\n  timeout_ms: 1000\nfailure_mode: closed\nlimits:\n  - {{name: client, group: per_client, requests: {limit}, per: hour}}",
            redis.addr
        ),
    ) + &mapping(
        "limited",
        &format!(
            "hostname: '*'\nprefix: /limited/\nservice: {}\n{LABELS}",
            up.service()
        ),
    ) + &route("ready", "/ready/", &up.service(), "");
    let tree = Tree::new(&yaml);
    let start = || {
        let http = free_addr();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(tree.path())
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", "off", "--verify-window", "0"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (Killed(child), http)
    };
    let (_a, a) = start();
    let (_b, b) = start();
    // Both serve the config (through a route without limits).
    for addr in [a, b] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let probe = tokio::time::timeout(
                Duration::from_secs(2),
                client().request(
                    Request::get(format!("http://{addr}/ready/"))
                        .body(empty())
                        .unwrap(),
                ),
            )
            .await;
            if matches!(probe, Ok(Ok(r)) if r.status() == 200) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{addr} never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut allowed = [0; 2];
    for i in 0..3 * limit {
        let (n, addr) = if i % 2 == 0 { (0, a) } else { (1, b) };
        let r = get(&format!("http://{addr}/limited/x"), &[]).await;
        match r.status.as_u16() {
            200 => allowed[n] += 1,
            429 => {}
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    // One limit for both: 10 in all, not 10 each; both processes took part.
    assert_eq!(allowed[0] + allowed[1], limit, "{allowed:?}");
    assert!(allowed[0] > 0 && allowed[1] > 0, "{allowed:?}");
}

// ---- JWKS refresh off the request path ----

/// A gateway whose `/secure/` route requires a token verified with `jwks`'s keys.
async fn jwks_gateway(jwks: &JwksServer, refresh_seconds: u64, up: &Upstream) -> Gateway {
    Gateway::start(&jwks_config(jwks, refresh_seconds, up)).await
}

fn jwks_config(jwks: &JwksServer, refresh_seconds: u64, up: &Upstream) -> String {
    jwt_policy(&format!(
        "jwks:\n  url: http://{}/jwks.json\n  refresh_seconds: {refresh_seconds}\nmappings: [secure]",
        jwks.addr
    )) + &route("secure", "/secure/", &up.service(), "")
}

/// `Bearer <token>` signed by `key`, naming `kid`.
fn ed_bearer(kid: &str, key: &sig::Ed25519KeyPair) -> String {
    bearer(&token(
        serde_json::json!({"alg": "EdDSA", "kid": kid}),
        claims(serde_json::json!({})),
        Signer::Ed(key),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_requests_do_not_wait_for_a_hung_jwks_refresh() {
    let k1 = ed25519();
    let jwks = JwksServer::start(ed_jwk("k1", &k1)).await;
    let up = Upstream::start("app").await;
    let gw = jwks_gateway(&jwks, 1, &up).await;
    let url = gw.url("/secure/x");
    let t1 = ed_bearer("k1", &k1);
    let fetches = || jwks.fetches.load(std::sync::atomic::Ordering::SeqCst);
    // Cold start: the first request waits for the first key set.
    assert_eq!(
        get(&url, &[("authorization", t1.as_str())]).await.status,
        200
    );
    assert_eq!(fetches(), 1);

    // The JWKS server now accepts and never answers; the refresh is due.
    jwks.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A fetch gives up after 5 s; a request that waited for one would not be back in 3 s.
    let auth = [("authorization", t1.as_str())];
    let unhurried = || tokio::time::timeout(Duration::from_secs(3), get(&url, &auth));
    for _ in 0..5 {
        let r = unhurried()
            .await
            .expect("answered from the cached keys, without waiting for the refresh");
        assert_eq!(r.status, 200);
    }
    // The refresh did start, once, and is still hanging.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while fetches() < 2 {
        assert!(std::time::Instant::now() < deadline, "no refresh started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fetches(), 2);

    // A new revision reading the same JWKS starts with the keys in hand, not cold.
    let other = route("other", "/other/", &up.service(), "");
    gw.proxy
        .swap(compile(&(jwks_config(&jwks, 1, &up) + &other)));
    let r = unhurried()
        .await
        .expect("the new revision verifies with the keys it was handed");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_an_unknown_key_id_triggers_one_early_refresh() {
    let (k1, k2, k3) = (ed25519(), ed25519(), ed25519());
    let jwks = JwksServer::start(ed_jwk("k1", &k1)).await;
    let up = Upstream::start("app").await;
    let gw = jwks_gateway(&jwks, 3600, &up).await;
    let url = gw.url("/secure/x");
    let (t1, t2, t3) = (
        ed_bearer("k1", &k1),
        ed_bearer("k2", &k2),
        ed_bearer("k3", &k3),
    );
    let call = |tok: &str| {
        let (url, tok) = (url.clone(), tok.to_string());
        async move { get(&url, &[("authorization", tok.as_str())]).await }
    };
    let fetches = || jwks.fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(&t1).await.status, 200);
    assert_eq!(fetches(), 1);

    // The issuer rotates in k2 long before refresh_seconds: a k2 token is refused once and
    // makes the gateway fetch again; k2 tokens are then accepted.
    let both = serde_json::json!({"keys": [
        {"kty": "OKP", "kid": "k1", "crv": "Ed25519", "x": B64.encode(k1.public_key().as_ref())},
        {"kty": "OKP", "kid": "k2", "crv": "Ed25519", "x": B64.encode(k2.public_key().as_ref())},
    ]});
    *jwks.doc.lock().unwrap() = Some(both.to_string());
    let r = call(&t2).await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("unknown key id"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&t2).await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "k2 never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fetches(), 2);
    assert_eq!(call(&t1).await.status, 200);

    // Unknown ids sent over and over are refused; that they refresh at most once per
    // interval is `guard::jwt`'s paused-clock test
    // `unknown_key_ids_refresh_at_most_once_per_interval`.
    for _ in 0..10 {
        assert_eq!(call(&t3).await.status, 401);
    }
}
