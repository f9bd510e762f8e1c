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
    log.lock().unwrap().push(Asked {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req.headers().clone(),
    });
    let auth = req
        .headers()
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
        mapping("secure", &format!("hostname: '*'\nprefix: /secure/\nservice: {svc}")),
        mapping(
            "public",
            &format!("hostname: '*'\nprefix: /public/\nservice: {svc}\nbypass_auth: true"),
        ),
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
async fn ext_auth_down_refuses_or_fails_open() {
    let up = Upstream::start("app").await;
    let svc = up.service();
    let down = closed_port().await;
    let route = mapping(
        "secure",
        &format!("hostname: '*'\nprefix: /secure/\nservice: {svc}"),
    );

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
