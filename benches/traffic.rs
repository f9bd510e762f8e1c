//! Traffic-policy measurements (bench/traffic/run.sh drives this; not a criterion bench).
//!
//! In-process modes start the real gateway (library) on 127.0.0.1 with the integration tests'
//! upstreams and count where 100,000 requests went:
//!   split            canary 70/30 and 50/30/20 by Mapping weight
//!   hash             ring_hash and maglev over 5 addresses of one name, 100,000 distinct keys
//!   retry            upstream failing 50% with 503, retry_policy 5xx num_retries 3, 64 clients
//! Peer modes, for comparing the `legate` binary with a direct connection:
//!   ws-echo ADDR     RFC 6455 echo server (tests/it/support/ws.rs)
//!   ws-rtt ADDR PATH N   N sequential text round trips: median and p99 in microseconds
//!   grpc-echo ADDR   h2c gRPC unary echo: answers the request message, trailer grpc-status 0

// Measurements are wall-clock figures by definition.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use support::{compile, mapping, FakeDns, Gateway, Upstream};

const REQUESTS: u64 = 100_000;
const CLIENTS: u64 = 64;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` appends `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let _ = rustls::crypto::ring::default_provider().install_default();
    match arg(0) {
        "split" => split().await,
        "hash" => hash().await,
        "retry" => retry().await,
        "ws-echo" => {
            let _s = support::ws::EchoServer::start_at("e", arg(1).parse().unwrap()).await;
            std::future::pending::<()>().await;
        }
        "ws-rtt" => ws_rtt(arg(1).parse().unwrap(), arg(2), arg(3).parse().unwrap()).await,
        "grpc-echo" => grpc_echo(arg(1).parse().unwrap()).await,
        _ => {
            eprintln!(
                "usage: traffic split|hash|retry|ws-echo ADDR|ws-rtt ADDR PATH N|grpc-echo ADDR"
            );
            std::process::exit(2);
        }
    }
}

/// `n` GETs to `url` from `CLIENTS` concurrent keep-alive clients, `key(i)` as header `x-user`;
/// returns the count per status code.
async fn load(url: String, n: u64, key: Option<fn(u64) -> String>) -> BTreeMap<u16, u64> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS as usize)
        .build_http::<support::TestBody>();
    let next = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, next, url) = (client.clone(), next.clone(), url.clone());
        set.spawn(async move {
            let mut seen = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return seen;
                }
                let mut b = Request::get(&url);
                if let Some(k) = key {
                    b = b.header("x-user", k(i));
                }
                let resp = client.request(b.body(support::empty()).unwrap()).await;
                let status = match resp {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.into_body().collect().await;
                        s
                    }
                    Err(_) => 0,
                };
                *seen.entry(status).or_insert(0) += 1;
            }
        });
    }
    let mut all = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        for (s, c) in r.unwrap() {
            *all.entry(s).or_insert(0) += c;
        }
    }
    all
}

/// Print each upstream's share against its ideal one and the largest deviation from it.
fn report(label: &str, ups: &[&Upstream], ideal: &[f64], secs: f64) {
    let hits: Vec<u64> = ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).collect();
    let total: u64 = hits.iter().sum();
    let mut worst: f64 = 0.0;
    let mut worst_rel: f64 = 0.0;
    let mut parts = Vec::new();
    for ((u, h), want) in ups.iter().zip(&hits).zip(ideal) {
        let share = *h as f64 * 100.0 / total as f64;
        worst = worst.max((share - want).abs());
        worst_rel = worst_rel.max((share - want).abs() / want);
        parts.push(format!("{}={:.2}% (ideal {want:.2}%)", u.name, share));
    }
    println!(
        "{label:<24} {total} requests in {secs:.1} s: {}; max deviation {worst:.2} points ({:.1}% of the ideal share)",
        parts.join(", "),
        worst_rel * 100.0
    );
}

fn reset(ups: &[&Upstream]) {
    for u in ups {
        u.hits.store(0, Ordering::Relaxed);
    }
}

async fn split() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let member = |name: &str, up: &Upstream, w: u32| {
        mapping(
            name,
            &format!(
                "hostname: '*'\nprefix: /c/\nservice: {}\nweight: {w}",
                up.service()
            ),
        )
    };
    let gw = Gateway::start(&(member("a", &a, 70) + &member("b", &b, 30))).await;
    let t = Instant::now();
    let codes = load(gw.url("/c/x"), REQUESTS, None).await;
    report(
        "canary 70/30",
        &[&a, &b],
        &[70.0, 30.0],
        t.elapsed().as_secs_f64(),
    );
    check_ok(&codes);
    reset(&[&a, &b, &c]);
    gw.proxy.swap(compile(
        &(member("a", &a, 50) + &member("b", &b, 30) + &member("c", &c, 20)),
    ));
    let t = Instant::now();
    let codes = load(gw.url("/c/x"), REQUESTS, None).await;
    report(
        "canary 50/30/20",
        &[&a, &b, &c],
        &[50.0, 30.0, 20.0],
        t.elapsed().as_secs_f64(),
    );
    check_ok(&codes);
}

fn check_ok(codes: &BTreeMap<u16, u64>) {
    if codes.keys().any(|&s| s != 200) {
        println!("  WARNING: status codes {codes:?}");
    }
}

async fn hash() {
    const N: usize = 5;
    let first = Upstream::start("127.0.0.1").await;
    let port = first.addr.port();
    let mut ups = vec![first];
    for i in 2..=N {
        let ip = format!("127.0.0.{i}");
        ups.push(Upstream::start_on(&ip, format!("{ip}:{port}").parse().unwrap()).await);
    }
    let dns = Arc::new(FakeDns::default());
    dns.answers
        .lock()
        .unwrap()
        .insert("svc.test".into(), ups.iter().map(|u| u.addr.ip()).collect());
    let refs: Vec<&Upstream> = ups.iter().collect();
    let ideal = vec![100.0 / N as f64; N];
    for policy in ["ring_hash", "maglev"] {
        reset(&refs);
        let yaml = mapping(
            "lb",
            &format!(
                "hostname: '*'\nprefix: /lb/\nservice: svc.test:{port}\n\
                 load_balancer:\n  policy: {policy}\n  header: x-user"
            ),
        );
        let settings = legate::proxy::Settings {
            lookup: dns.clone(),
            ..Default::default()
        };
        let gw = Gateway::with(&yaml, settings).await;
        let t = Instant::now();
        let codes = load(gw.url("/lb/x"), REQUESTS, Some(|i| format!("user-{i}"))).await;
        report(
            &format!("{policy} ({N} addresses)"),
            &refs,
            &ideal,
            t.elapsed().as_secs_f64(),
        );
        check_ok(&codes);
    }
}

/// An upstream answering 503 to about half of the requests (a fixed pseudo-random sequence),
/// counting attempts.
async fn flaky() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let n = h.fetch_add(1, Ordering::Relaxed);
                    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                    if splitmix(n) & 1 == 0 {
                        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn splitmix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn retry() {
    const RETRY_REQUESTS: u64 = 20_000;
    // Envoy's default breaker (max_retries 3) binds first; raised, the 20% budget binds.
    let cases = [
        ("default breaker", ""),
        (
            "max_retries 1000",
            "circuit_breakers:\n- priority: default\n  max_retries: 1000",
        ),
    ];
    for (label, breaker) in cases {
        let (addr, hits) = flaky().await;
        let yaml = mapping(
            "r",
            &format!(
                "hostname: '*'\nprefix: /r/\nservice: {addr}\n\
                 retry_policy:\n  retry_on: 5xx\n  num_retries: 3\n{breaker}"
            ),
        );
        let gw = Gateway::start(&yaml).await;
        let t = Instant::now();
        let codes = load(gw.url("/r/x"), RETRY_REQUESTS, None).await;
        let attempts = hits.load(Ordering::Relaxed);
        let ok = codes.get(&200).copied().unwrap_or(0);
        println!(
            "retry 5xx x3, 50% failing, {label}: {RETRY_REQUESTS} requests ({CLIENTS} concurrent) \
             in {:.1} s: {attempts} upstream attempts, ratio {:.3} (unbounded retries: ~1.875); \
             client 200s {:.1}%, statuses {codes:?}",
            t.elapsed().as_secs_f64(),
            attempts as f64 / RETRY_REQUESTS as f64,
            ok as f64 * 100.0 / RETRY_REQUESTS as f64,
        );
    }
}

async fn ws_rtt(addr: SocketAddr, path: &str, n: usize) {
    let mut c = support::ws::Client::connect(addr, "bench", path)
        .await
        .unwrap_or_else(|head| panic!("no WebSocket at {addr}{path}: {head}"));
    let msg = [b'x'; 32];
    // Warm-up.
    for _ in 0..100 {
        c.send(support::ws::TEXT, &msg).await.unwrap();
        c.recv().await.unwrap();
    }
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.send(support::ws::TEXT, &msg).await.unwrap();
        c.recv().await.unwrap();
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)];
    println!("{} {} {}", n, at(0.5).as_micros(), at(0.99).as_micros());
    let _ = c.close().await;
}

/// A gRPC unary echo over h2c: the request's message back (the body is already framed), then
/// the trailers `grpc-status: 0`.
async fn grpc_echo(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let msg = body.unwrap_or_else(|_| Bytes::new());
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(msg)),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(r)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}
