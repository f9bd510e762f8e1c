//! Traffic policy end to end (issue 5): canary splits, shadowing, retries and circuit breakers,
//! through the real gateway on 127.0.0.1:0 with real upstreams that fail, stall or count on
//! command.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::support::*;

/// An upstream whose answers a test scripts: `answer(n, request)` for the n-th request (from 0).
pub(crate) struct Scripted {
    pub(crate) addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub(crate) async fn start<F, Fut>(answer: F) -> Scripted
    where
        F: Fn(u64, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        Scripted::start_at("127.0.0.1:0".parse().unwrap(), answer).await
    }

    /// On a chosen address (e.g. a second loopback IP with the same port as another upstream).
    pub(crate) async fn start_at<F, Fut>(at: SocketAddr, answer: F) -> Scripted
    where
        F: Fn(u64, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (answer, h) = (answer.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let n = h.fetch_add(1, Ordering::SeqCst);
                        let fut = answer(n, req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Scripted { addr, hits, task }
    }

    pub(crate) fn service(&self) -> String {
        self.addr.to_string()
    }

    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

pub(crate) fn answer(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// `n` GETs of `url` running in the background.
pub(crate) fn spawn_gets(url: &str, n: usize) -> Vec<tokio::task::JoinHandle<Got>> {
    (0..n)
        .map(|_| {
            let u = url.to_string();
            tokio::spawn(async move { get(&u, &[]).await })
        })
        .collect()
}

/// A gate upstream requests wait at until the test opens it.
pub(crate) fn gate() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    tokio::sync::watch::channel(false)
}

fn body(b: &'static str) -> TestBody {
    Full::new(Bytes::from_static(b.as_bytes()))
        .map_err(|e| match e {})
        .boxed()
}

fn canary(a: &Upstream, wa: u32, b: &Upstream, wb: u32) -> String {
    mapping(
        "stable",
        &format!(
            "hostname: '*'\nprefix: /c/\nservice: {}\nweight: {wa}",
            a.service()
        ),
    ) + &mapping(
        "canary",
        &format!(
            "hostname: '*'\nprefix: /c/\nservice: {}\nweight: {wb}",
            b.service()
        ),
    )
}

/// `n` requests to `path`, 8 at a time; the count answered by each of `a` and `b`.
async fn split(gw: &Gateway, path: &str, n: usize) -> (u64, u64) {
    let client = client();
    let url = gw.url(path);
    let mut a = 0;
    let mut b = 0;
    let mut left = n;
    while left > 0 {
        let batch = left.min(8);
        left -= batch;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (c, u) = (client.clone(), url.clone());
            set.spawn(async move {
                let req = http::Request::get(u).body(empty()).unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.headers()["x-upstream"].to_str().unwrap().to_string()
            });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap().as_str() {
                "a" => a += 1,
                "b" => b += 1,
                other => panic!("unexpected upstream {other}"),
            }
        }
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_is_accurate_over_10k_requests() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&canary(&a, 70, &b, 30)).await;
    let (na, nb) = split(&gw, "/c/x", 10_000).await;
    assert_eq!(na + nb, 10_000);
    let share = na as f64 / 100.0;
    assert!(
        (69.0..=71.0).contains(&share),
        "70/30 measured as {share}/{}",
        100.0 - share
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), na);
    assert_eq!(b.hits.load(Ordering::SeqCst), nb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_change_on_the_next_request_after_a_swap() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&canary(&a, 50, &b, 50)).await;
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert!(na > 0 && nb > 0, "both members take traffic at 50/50");

    // All traffic to b: every request after the swap goes there, none to a.
    gw.proxy.swap(compile(&canary(&a, 0, &b, 100)));
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert_eq!((na, nb), (0, 200));

    gw.proxy.swap(compile(&canary(&a, 100, &b, 0)));
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert_eq!((na, nb), (200, 0));
}

fn shadowed(real: &str, shadow: &str, extra: &str) -> String {
    route("real", "/s/", real, "")
        + &route(
            "shadow",
            "/s/",
            shadow,
            &format!("shadow: true\ntimeout_ms: 60000\n{extra}"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_shadow_never_delays_requests_and_copies_are_bounded() {
    let real = Upstream::start("real").await;
    let (open, rx) = gate();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    // Records what it got, then never answers while the gate is shut.
    let shadow = Scripted::start(move |_, req: Request<Incoming>| {
        let (mut rx, seen) = (rx.clone(), s2.clone());
        async move {
            let host = req.headers()["host"].to_str().unwrap().to_string();
            let (parts, b) = req.into_parts();
            let b = b.collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push((parts.method.to_string(), host, b.len()));
            let _ = rx.wait_for(|v| *v).await;
            answer(500, "shadow answer, discarded")
        }
    })
    .await;
    let gw = Gateway::start(&shadowed(&real.service(), &shadow.service(), "")).await;

    // Every real request is answered by the real upstream while its copies hang.
    for _ in 0..19 {
        let r = get(&gw.url("/s/x"), &[("host", "app.test")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["upstream"], "real");
    }
    let r = send("POST", &gw.url("/s/p"), &[], body("hello")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], 5);
    eventually("the shadow saw 20 copies", || shadow.hits() == 20).await;
    {
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|(m, _, n)| m == "POST" && *n == 5));
        assert!(seen.iter().any(|(_, h, _)| h == "app.test-shadow"));
    }
    assert_eq!(
        gw.proxy.shadow_stats(),
        legate::proxy::ShadowStats {
            sent: 20,
            dropped: 0
        }
    );

    // A streamed body (no length) is not copied; the real request still goes through whole.
    let r = send(
        "POST",
        &gw.url("/s/big"),
        &[],
        Generated::new(200_000).map_err(|e| match e {}).boxed(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], 200_000);
    assert_eq!(gw.proxy.shadow_stats().dropped, 1);

    // At most 64 copies in flight: 20 hang already, so of 60 more, 44 are copied, 16 dropped.
    for _ in 0..60 {
        assert_eq!(get(&gw.url("/s/x"), &[]).await.status, 200);
    }
    assert_eq!(
        gw.proxy.shadow_stats(),
        legate::proxy::ShadowStats {
            sent: 64,
            dropped: 17
        }
    );
    eventually("the shadow saw 64 copies", || shadow.hits() == 64).await;
    assert_eq!(real.hits.load(Ordering::SeqCst), 81);

    // Once the shadow answers, slots free up and copies flow again.
    open.send(true).unwrap();
    eventually("the copies finished", || gw.proxy.shadow_in_flight() == 0).await;
    assert_eq!(get(&gw.url("/s/x"), &[]).await.status, 200);
    eventually("a new copy arrived", || shadow.hits() == 65).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_shadow_and_weighted_shadow() {
    let real = Upstream::start("real").await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = Gateway::start(&shadowed(&real.service(), &dead_addr.to_string(), "")).await;
    for _ in 0..20 {
        let r = get(&gw.url("/s/x"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["upstream"], "real");
    }
    assert_eq!(gw.proxy.shadow_stats().sent, 20);

    // weight: 0 copies nothing; weight 100 (the default) copies everything.
    let shadow = Upstream::start("shadow").await;
    gw.proxy.swap(compile(&shadowed(
        &real.service(),
        &shadow.service(),
        "weight: 0",
    )));
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/s/x"), &[]).await.status, 200);
    }
    assert_eq!(shadow.hits.load(Ordering::SeqCst), 0);
    assert_eq!(gw.proxy.shadow_stats().sent, 20);
}

/// An upstream answering `status` to its first `fails` requests, then 200 with the request's
/// body length.
pub(crate) async fn flaky(fails: u64, status: u16) -> Scripted {
    Scripted::start(move |n, req: Request<Incoming>| async move {
        let len = req.into_body().collect().await.unwrap().to_bytes().len();
        if n < fails {
            answer(status, "failing")
        } else {
            answer(200, format!("ok after {n} body {len}"))
        }
    })
    .await
}

fn retrying(up: &Scripted, policy: &str) -> String {
    let policy: String = policy.lines().map(|l| format!("  {l}\n")).collect();
    route(
        "r",
        "/r/",
        &up.service(),
        &format!("retry_policy:\n{policy}"),
    )
}

/// One retry case: the upstream fails `fails` times with `status` and then answers 200.
struct RetryCase {
    what: &'static str,
    fails: u64,
    status: u16,
    /// The Mapping's `retry_policy`; `None`: the Mapping has none.
    policy: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
    want: StatusCode,
    /// The body the client gets, when it is checked.
    body: Option<&'static str>,
    attempts: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_success_within_num_retries() {
    let cases = [
        RetryCase {
            what: "fails twice, then succeeds: 3 attempts allowed",
            fails: 2,
            status: 503,
            policy: Some("retry_on: 5xx\nnum_retries: 3"),
            headers: &[],
            want: StatusCode::OK,
            body: Some("ok after 2 body 0"),
            attempts: 3,
        },
        RetryCase {
            what:
                "num_retries defaults to 1: two failures exhaust it, the last answer goes through",
            fails: 2,
            status: 503,
            policy: Some("retry_on: gateway-error"),
            headers: &[],
            want: StatusCode::SERVICE_UNAVAILABLE,
            body: Some("failing"),
            attempts: 2,
        },
        RetryCase {
            what: "gateway-error does not cover a 500",
            fails: 1,
            status: 500,
            policy: Some("retry_on: gateway-error\nnum_retries: 3"),
            headers: &[],
            want: StatusCode::INTERNAL_SERVER_ERROR,
            body: None,
            attempts: 1,
        },
        RetryCase {
            what: "retriable-4xx retries a 409",
            fails: 1,
            status: 409,
            policy: Some("retry_on: retriable-4xx"),
            headers: &[],
            want: StatusCode::OK,
            body: None,
            attempts: 2,
        },
        RetryCase {
            what: "retriable-status-codes: the codes the client lists",
            fails: 1,
            status: 418,
            policy: Some("retry_on: retriable-status-codes"),
            headers: &[("x-envoy-retriable-status-codes", "429,418")],
            want: StatusCode::OK,
            body: None,
            attempts: 2,
        },
        RetryCase {
            what: "no policy: no retry",
            fails: 1,
            status: 503,
            policy: None,
            headers: &[],
            want: StatusCode::SERVICE_UNAVAILABLE,
            body: None,
            attempts: 1,
        },
    ];
    for c in cases {
        let up = flaky(c.fails, c.status).await;
        let yaml = match c.policy {
            Some(p) => retrying(&up, p),
            None => route("r", "/r/", &up.service(), ""),
        };
        let gw = Gateway::start(&yaml).await;
        let r = get(&gw.url("/r/x"), c.headers).await;
        assert_eq!(r.status, c.want, "{}", c.what);
        if let Some(body) = c.body {
            assert_eq!(r.body, body, "{}", c.what);
        }
        assert_eq!(up.hits(), c.attempts, "{}", c.what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_small_bodies_only() {
    let up = flaky(1, 503).await;
    let gw = Gateway::start(&retrying(&up, "retry_on: 5xx\nnum_retries: 2")).await;
    // A small body with a length is read whole and sent again, complete.
    let r = send("POST", &gw.url("/r/x"), &[], body("0123456789")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "ok after 1 body 10")
    );
    assert_eq!(up.hits(), 2);

    // A streamed body (no length) cannot be replayed: the first answer goes through.
    let up = flaky(1, 503).await;
    let gw = Gateway::start(&retrying(&up, "retry_on: 5xx\nnum_retries: 2")).await;
    let streamed = Generated::new(10_000).map_err(|e| match e {}).boxed();
    let r = send("POST", &gw.url("/r/x"), &[], streamed).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 1);

    // Over the 64 KiB cap, even with a length: not replayed.
    let up = flaky(1, 503).await;
    let gw = Gateway::start(&retrying(&up, "retry_on: 5xx\nnum_retries: 2")).await;
    let big = Full::new(Bytes::from(vec![b'x'; 64 * 1024 + 1]))
        .map_err(|e| match e {})
        .boxed();
    let r = send("POST", &gw.url("/r/x"), &[], big).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_stalled_attempt() {
    // The first attempt never answers; the second does.
    let up = Scripted::start(|n, _req| async move {
        if n == 0 {
            std::future::pending::<()>().await;
        }
        answer(200, "second")
    })
    .await;
    let gw = Gateway::start(&retrying(
        &up,
        "retry_on: 5xx\nnum_retries: 1\nper_try_timeout: 200ms",
    ))
    .await;
    let r = get(&gw.url("/r/x"), &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "second"));
    assert_eq!(up.hits(), 2);

    // When every attempt's connection is refused, the client gets a 502, not a hang.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let yaml = route(
        "r",
        "/r/",
        &addr.to_string(),
        "retry_policy:\n  retry_on: connect-failure\n  num_retries: 2",
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(get(&gw.url("/r/x"), &[]).await.status, 502);
}

/// An upstream holding every request at a gate; answers 200 once it opens.
pub(crate) async fn gated(rx: tokio::sync::watch::Receiver<bool>) -> Scripted {
    Scripted::start(move |_, _req| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
            answer(200, "done")
        }
    })
    .await
}

fn breaker(up: &Scripted, limits: &str) -> String {
    let limits: String = limits.lines().map(|l| format!("    {l}\n")).collect();
    let extra = format!("timeout_ms: 60000\ncircuit_breakers:\n  - priority: default\n{limits}");
    route("b", "/b/", &up.service(), &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_breaker_answers_503_at_once() {
    let (open, rx) = gate();
    let up = gated(rx).await;
    let gw = Gateway::start(&breaker(&up, "max_requests: 2")).await;
    let url = gw.url("/b/x");
    let held = spawn_gets(&url, 2);
    eventually("two requests reached the upstream", || up.hits() == 2).await;

    // The third is refused by the gateway while the two are in flight; it never reaches the
    // upstream.
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-legate-overloaded"), Some("circuit-breaker"));
    assert_eq!(up.hits(), 2);

    open.send(true).unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Slots come back when responses end.
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-legate-overloaded"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_and_pending_breaker() {
    let (open, rx) = gate();
    let up = gated(rx).await;
    let gw = Gateway::start(&breaker(&up, "max_connections: 1\nmax_pending_requests: 1")).await;
    let url = gw.url("/b/x");
    let spawn = |u: String| tokio::spawn(async move { get(&u, &[]).await });
    let first = spawn(url.clone());
    eventually("the first request holds the connection", || up.hits() == 1).await;

    // Of two more, one waits as the pending request and the other is refused at once.
    let mut rest = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let u = url.clone();
        rest.spawn(async move { get(&u, &[]).await });
    }
    let refused = rest.join_next().await.unwrap().unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.header("x-legate-overloaded"),
        Some("circuit-breaker")
    );
    assert_eq!(up.hits(), 1);

    open.send(true).unwrap();
    assert_eq!(first.await.unwrap().status, 200);
    let waited = rest.join_next().await.unwrap().unwrap();
    assert_eq!(waited.status, 200);
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_breaker_admits_concurrent_clients() {
    // Envoy's defaults (1024 requests) do not get in the way of 50 concurrent clients.
    let (open, rx) = gate();
    let up = gated(rx).await;
    let gw = Gateway::start(&route("b", "/b/", &up.service(), "timeout_ms: 60000")).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let u = gw.url("/b/x");
        set.spawn(async move { get(&u, &[]).await.status });
    }
    eventually("50 requests in flight", || up.hits() == 50).await;
    open.send(true).unwrap();
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_breaker_stops_retries() {
    let up = flaky(1, 503).await;
    let yaml = route(
        "r",
        "/r/",
        &up.service(),
        "retry_policy:\n  retry_on: 5xx\n  num_retries: 3\ncircuit_breakers:\n  - max_retries: 0",
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(get(&gw.url("/r/x"), &[]).await.status, 503);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_answered_and_headers_on_responses() {
    let up = Upstream::start("app").await;
    let yaml = route("api", "/api/", &up.service(), "cors:\n  origins: https://app.example.com, https://.*\\.example\\.org\n  methods: [GET, PUT]\n  headers: x-custom,content-type\n  exposed_headers: [x-upstream]\n  credentials: true\n  max_age: '600'") + &route("open", "/open/", &up.service(), "cors:\n  origins: ['*']");
    let gw = Gateway::start(&yaml).await;
    let preflight = |origin: &'static str, path: &'static str| {
        let url = gw.url(path);
        async move {
            send(
                "OPTIONS",
                &url,
                &[
                    ("origin", origin),
                    ("access-control-request-method", "PUT"),
                    ("access-control-request-headers", "x-custom"),
                ],
                empty(),
            )
            .await
        }
    };

    // A browser preflight from an allowed origin: answered by the gateway.
    let r = preflight("https://app.example.com", "/api/items").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,PUT"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("x-custom,content-type")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);

    // A regex origin, anchored.
    let r = preflight("https://shop.example.org", "/api/items").await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example.org")
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);

    // A disallowed origin: no CORS headers; its preflight goes upstream like any request.
    let r = preflight("https://shop.example.org.evil.test", "/api/items").await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.json()["method"], "OPTIONS");
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
    let r = get(&gw.url("/api/items"), &[("origin", "https://evil.test")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);

    // An actual request from an allowed origin: CORS headers on the upstream's response.
    let r = get(
        &gw.url("/api/items"),
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(r.json()["upstream"], "app");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-upstream")
    );

    // No Origin: not a CORS request, nothing added.
    let r = get(&gw.url("/api/items"), &[]).await;
    assert_eq!(r.header("access-control-allow-origin"), None);

    // `*` allows any origin, echoed back; no credentials header unless configured.
    let r = preflight("https://anyone.test", "/open/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://anyone.test")
    );
    assert_eq!(r.header("access-control-allow-credentials"), None);
}

/// A gRPC-style call (HTTP/2 prior knowledge, `application/grpc`) through the gateway.
async fn grpc_call(gw: &Gateway, path: &str) -> (StatusCode, http::HeaderMap) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let req = Request::post(gw.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body("\0\0\0\0\0"))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let (parts, b) = resp.into_parts();
    let _ = b.collect().await.unwrap();
    (status, parts.headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_get_grpc_status_errors() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (_open, rx) = gate();
    let slow = gated(rx).await;
    let yaml = route("dead", "/dead.Svc/", &dead_addr.to_string(), "grpc: true")
        + &route(
            "slow",
            "/slow.Svc/",
            &slow.service(),
            "grpc: true\ntimeout_ms: 200",
        );
    let gw = Gateway::start(&yaml).await;

    let (status, h) = grpc_call(&gw, "/dead.Svc/Call").await;
    assert_eq!(status, 200);
    assert_eq!(h["grpc-status"], "14", "UNAVAILABLE");
    assert_eq!(h["grpc-message"], "upstream unavailable");
    assert_eq!(h["content-type"], "application/grpc");

    let (status, h) = grpc_call(&gw, "/slow.Svc/Call").await;
    assert_eq!(status, 200);
    assert_eq!(h["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert_eq!(slow.hits(), 1);

    let (_, h) = grpc_call(&gw, "/nothing.Svc/Call").await;
    assert_eq!(h["grpc-status"], "12", "UNIMPLEMENTED");

    // A plain HTTP request on the same route still gets a plain HTTP error.
    assert_eq!(get(&gw.url("/dead.Svc/Call"), &[]).await.status, 502);
}

/// Two upstreams `a` (127.0.0.1) and `b` (127.0.0.2) on one port behind the name `svc.test`.
async fn two_addresses() -> (Upstream, Upstream, Arc<FakeDns>) {
    let a = Upstream::start("a").await;
    let port = a.addr.port();
    let b = Upstream::start_on("b", format!("127.0.0.2:{port}").parse().unwrap()).await;
    let dns = Arc::new(FakeDns::default());
    dns.answers.lock().unwrap().insert(
        "svc.test".into(),
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    );
    (a, b, dns)
}

async fn balanced(port: u16, dns: &Arc<FakeDns>, lb: &str) -> Gateway {
    let lb: String = lb.lines().map(|l| format!("  {l}\n")).collect();
    let yaml = mapping(
        "lb",
        &format!("hostname: '*'\nprefix: /lb/\nservice: svc.test:{port}\nload_balancer:\n{lb}"),
    );
    let settings = legate::proxy::Settings {
        lookup: dns.clone(),
        ..Default::default()
    };
    Gateway::with(&yaml, settings).await
}

async fn who(gw: &Gateway, headers: &[(&str, &str)]) -> String {
    let r = get(&gw.url("/lb/x"), headers).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["upstream"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_per_request() {
    let (a, b, dns) = two_addresses().await;
    let gw = balanced(a.addr.port(), &dns, "policy: round_robin").await;
    // One keep-alive client: without per-request balancing, its connection would pin one address.
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..100 {
        let req = Request::get(gw.url("/lb/x")).body(empty()).unwrap();
        let resp = c.request(req).await.unwrap();
        seen.push(resp.headers()["x-upstream"].to_str().unwrap().to_string());
        let _ = resp.into_body().collect().await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "alternates: {seen:?}"
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), 50);
    assert_eq!(b.hits.load(Ordering::SeqCst), 50);
}

async fn sticky_by(gw: &Gateway, header: &str, value: impl Fn(usize) -> String) {
    let mut per_upstream = std::collections::HashMap::new();
    for k in 0..100 {
        let v = value(k);
        let first = who(gw, &[(header, &v)]).await;
        for _ in 0..3 {
            assert_eq!(who(gw, &[(header, &v)]).await, first, "key {v} is sticky");
        }
        *per_upstream.entry(first).or_insert(0) += 1;
    }
    // 100 keys spread over both addresses (each well within 20..80 for any sane hash).
    for up in ["a", "b"] {
        let n = per_upstream.get(up).copied().unwrap_or(0);
        assert!((20..=80).contains(&n), "{per_upstream:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_by_header_and_maglev_by_cookie_are_sticky() {
    let (a, _b, dns) = two_addresses().await;
    let gw = balanced(a.addr.port(), &dns, "policy: ring_hash\nheader: x-user").await;
    sticky_by(&gw, "x-user", |k| format!("user-{k}")).await;
    let gw = balanced(
        a.addr.port(),
        &dns,
        "policy: maglev\ncookie:\n  name: session",
    )
    .await;
    sticky_by(&gw, "cookie", |k| format!("theme=dark; session=s{k}")).await;
    // source_ip: every request from this client reaches one address.
    let gw = balanced(a.addr.port(), &dns, "policy: ring_hash\nsource_ip: true").await;
    let first = who(&gw, &[]).await;
    for _ in 0..20 {
        assert_eq!(who(&gw, &[]).await, first);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_busy_address() {
    let (open, rx) = gate();
    let b = Upstream::start("b").await;
    let port = b.addr.port();
    // `a` on 127.0.0.2 holds requests at the gate; `b` answers at once.
    let a = Scripted::start_at(
        format!("127.0.0.2:{port}").parse().unwrap(),
        move |_, _req| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
                answer(200, "a")
            }
        },
    )
    .await;
    let dns = Arc::new(FakeDns::default());
    dns.answers.lock().unwrap().insert(
        "svc.test".into(),
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    );
    let gw = balanced(port, &dns, "policy: least_request").await;
    // Send until one request is stuck at `a` (ties are broken at random).
    let mut stuck = None;
    for _ in 0..64 {
        let b_before = b.hits.load(Ordering::SeqCst);
        let u = gw.url("/lb/x");
        let h = tokio::spawn(async move { get(&u, &[]).await });
        eventually("the request reached an upstream", || {
            a.hits() == 1 || b.hits.load(Ordering::SeqCst) > b_before
        })
        .await;
        if a.hits() == 1 {
            stuck = Some(h);
            break;
        }
        assert_eq!(h.await.unwrap().status, 200);
    }
    let stuck = stuck.expect("some request picked `a`");
    // With one request in flight at `a`, every new request goes to the idle `b`.
    let before = b.hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/lb/x"), &[]).await.status, 200);
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), before + 20);
    assert_eq!(a.hits(), 1);
    open.send(true).unwrap();
    assert_eq!(stuck.await.unwrap().body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_not_shadowed() {
    let real = Upstream::start("real").await;
    let shadow = Upstream::start("shadow").await;
    let yaml = route("real", "/s/", &real.service(), "allow_upgrade: [websocket]")
        + &route("shadow", "/s/", &shadow.service(), "shadow: true");
    let gw = Gateway::start(&yaml).await;
    let r = get(
        &gw.url("/s/ws"),
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    )
    .await;
    assert_eq!(r.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        gw.proxy.shadow_stats(),
        legate::proxy::ShadowStats {
            sent: 0,
            dropped: 1
        }
    );
    assert_eq!(get(&gw.url("/s/plain"), &[]).await.status, 200);
    eventually("the plain request was copied", || {
        shadow.hits.load(Ordering::SeqCst) == 1
    })
    .await;
}
