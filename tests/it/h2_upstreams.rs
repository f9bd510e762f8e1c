//! HTTP/2 upstreams (`grpc: true`) balanced, ejected and bounded like HTTP/1.1 ones (issue 16):
//! one multiplexed connection per address, `load_balancer` per request, outlier ejection per
//! address, and `max_connections` counting open connections. The upstreams speak HTTP/2 only
//! (prior knowledge), on several 127.0.0.x addresses behind one name, and count the connections
//! they accept.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::health::metric;
use crate::support::*;
use crate::traffic::gate;

/// `mode` value: answer a trailers-only gRPC `UNAVAILABLE` (HTTP 200, `grpc-status: 14`).
const GRPC_UNAVAILABLE: u16 = 1014;

/// An HTTP/2-only upstream answering its name (body and `x-upstream`).
struct H2Up {
    addr: SocketAddr,
    /// Connections accepted.
    conns: Arc<AtomicU64>,
    /// Requests answered.
    hits: Arc<AtomicU64>,
    /// 0: 200; an HTTP status: that status; [`GRPC_UNAVAILABLE`]: a gRPC failure.
    mode: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Up {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Up {
    async fn start(at: &str, name: &'static str) -> H2Up {
        H2Up::gated(at, name, watch::channel(true).1).await
    }

    /// Requests wait until `open` holds true.
    async fn gated(at: &str, name: &'static str, open: watch::Receiver<bool>) -> H2Up {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, hits) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mode = Arc::new(AtomicU16::new(0));
        let (c, h, m) = (conns.clone(), hits.clone(), mode.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (h, m, open) = (h.clone(), m.clone(), open.clone());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (h, m, mut open) = (h.clone(), m.clone(), open.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(req.version(), Version::HTTP_2);
                        let _ = open.wait_for(|o| *o).await;
                        let mut r = Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                        r.headers_mut().insert("x-upstream", name.parse().unwrap());
                        match m.load(Ordering::SeqCst) {
                            0 => {}
                            GRPC_UNAVAILABLE => {
                                r.headers_mut()
                                    .insert("content-type", "application/grpc".parse().unwrap());
                                r.headers_mut().insert("grpc-status", "14".parse().unwrap());
                            }
                            status => *r.status_mut() = status.try_into().unwrap(),
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        H2Up {
            addr,
            conns,
            hits,
            mode,
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
}

/// A gateway resolving `svc.test` to `addrs`, with one gRPC Mapping `/h/` to `svc.test:port`.
async fn gateway(addrs: &[&str], port: u16, extra: &str) -> Gateway {
    let dns = Arc::new(FakeDns::default());
    dns.answers.lock().unwrap().insert(
        "svc.test".into(),
        addrs.iter().map(|a| a.parse().unwrap()).collect(),
    );
    let yaml = mapping(
        "h",
        &format!("hostname: '*'\nprefix: /h/\nservice: svc.test:{port}\ngrpc: true\n{extra}"),
    );
    let settings = legate::proxy::Settings {
        lookup: dns,
        ..Default::default()
    };
    Gateway::with(&yaml, settings).await
}

/// `a` on 127.0.0.1 and `b` on 127.0.0.2 (one port), and a gateway to both with `extra`.
async fn pair(extra: &str) -> (H2Up, H2Up, Gateway) {
    let a = H2Up::start("127.0.0.1:0", "a").await;
    let port = a.addr.port();
    let b = H2Up::start(&format!("127.0.0.2:{port}"), "b").await;
    let gw = gateway(&["127.0.0.1", "127.0.0.2"], port, extra).await;
    (a, b, gw)
}

/// Status and body of one request through the gateway.
async fn call(gw: &Gateway, headers: &[(&str, &str)]) -> (u16, String) {
    let r = get(&gw.url("/h/x"), headers).await;
    (r.status.as_u16(), r.body)
}

fn ejections(gw: &Gateway, port: u16) -> Option<u64> {
    metric(
        gw,
        &format!("legate_upstream_outlier_ejections_total{{upstream=\"svc.test:{port}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_per_request_over_one_connection_per_address() {
    let (a, b, gw) = pair("load_balancer:\n  policy: round_robin").await;
    // One keep-alive client: the balancing is per request, not per downstream connection.
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..40 {
        let resp = c
            .request(Request::get(gw.url("/h/x")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        seen.push(resp.headers()["x-upstream"].to_str().unwrap().to_string());
        let _ = resp.into_body().collect().await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "alternates: {seen:?}"
    );
    assert_eq!((a.hits(), b.hits()), (20, 20));
    // Every request to an address went over its one multiplexed connection.
    assert_eq!((a.conns(), b.conns()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_by_header_is_sticky_and_spreads_keys() {
    let (_a, _b, gw) = pair("load_balancer:\n  policy: ring_hash\n  header: x-user").await;
    let mut on_a = 0;
    for k in 0..60 {
        let user = format!("user-{k}");
        let (status, first) = call(&gw, &[("x-user", &user)]).await;
        assert_eq!(status, 200);
        for _ in 0..2 {
            assert_eq!(call(&gw, &[("x-user", &user)]).await.1, first, "{user}");
        }
        on_a += usize::from(first == "a");
    }
    assert!((12..=48).contains(&on_a), "60 keys spread: {on_a} on a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_busy_address() {
    let (open, rx) = gate();
    let b = H2Up::start("127.0.0.1:0", "b").await;
    let port = b.addr.port();
    // `a` holds its requests at the gate; `b` answers at once.
    let a = H2Up::gated(&format!("127.0.0.2:{port}"), "a", rx).await;
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2"],
        port,
        "load_balancer:\n  policy: least_request",
    )
    .await;
    // Send until one request is stuck at `a` (ties are broken at random).
    let mut stuck = None;
    for _ in 0..64 {
        let before = b.hits();
        let u = gw.url("/h/x");
        let h = tokio::spawn(async move { get(&u, &[]).await });
        eventually("the request reached an upstream", || {
            a.hits() == 1 || b.hits() > before
        })
        .await;
        if a.hits() == 1 {
            stuck = Some(h);
            break;
        }
        assert_eq!(h.await.unwrap().status, 200);
    }
    let stuck = stuck.expect("some request picked `a`");
    // With a request in flight on `a`'s connection, every new request goes to the idle `b`.
    let before = b.hits();
    for _ in 0..20 {
        assert_eq!(call(&gw, &[]).await, (200, "b".to_string()));
    }
    assert_eq!(b.hits(), before + 20);
    assert_eq!(a.hits(), 1);
    open.send(true).unwrap();
    assert_eq!(stuck.await.unwrap().body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_the_failing_address() {
    let (a, b, gw) = pair("load_balancer:\n  policy: round_robin\noutlier_detection:\n  consecutive_5xx: 3\n  base_ejection_time: 30s\n  max_ejection_percent: 50").await;
    a.mode.store(503, Ordering::SeqCst);
    // Round robin: `a` answers every other request, 503 each time, until its third in a row.
    let mut failures = 0;
    for _ in 0..6 {
        if call(&gw, &[]).await.0 == 503 {
            failures += 1;
        }
    }
    assert_eq!((failures, a.hits()), (3, 3));
    assert_eq!(ejections(&gw, a.addr.port()), Some(1));
    // Ejected: everything goes to `b`, even once `a` would answer again.
    a.mode.store(0, Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(call(&gw, &[]).await, (200, "b".to_string()));
    }
    assert_eq!(a.hits(), 3, "no request reached the ejected address");
    assert_eq!(b.hits(), 23);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_unavailable_answer_counts_as_a_5xx_for_ejection() {
    let (a, b, gw) = pair("load_balancer:\n  policy: round_robin\noutlier_detection:\n  consecutive_5xx: 2\n  base_ejection_time: 30s\n  max_ejection_percent: 50").await;
    a.mode.store(GRPC_UNAVAILABLE, Ordering::SeqCst);
    let mut unavailable = 0;
    for _ in 0..4 {
        let r = get(&gw.url("/h/x"), &[]).await;
        // Passed on as the upstream sent it: HTTP 200 with the gRPC status in the head.
        assert_eq!(r.status, 200);
        if r.header("grpc-status") == Some("14") {
            unavailable += 1;
        }
    }
    assert_eq!((unavailable, a.hits()), (2, 2));
    assert_eq!(ejections(&gw, a.addr.port()), Some(1));
    for _ in 0..10 {
        assert_eq!(call(&gw, &[]).await, (200, "b".to_string()));
    }
    assert_eq!(b.hits(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_is_ejected_as_a_gateway_failure() {
    let good = H2Up::start("127.0.0.1:0", "good").await;
    let port = good.addr.port();
    // Nothing listens on 127.0.0.3 at that port: every connection is refused.
    let gw = gateway(
        &["127.0.0.1", "127.0.0.3"],
        port,
        "outlier_detection:\n  consecutive_5xx: 0\n  consecutive_gateway_failure: 2\n  base_ejection_time: 30s\n  max_ejection_percent: 100",
    )
    .await;
    let mut bad = 0;
    for _ in 0..8 {
        match call(&gw, &[]).await.0 {
            200 => {}
            502 => bad += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    // Two failures, then out of rotation.
    assert_eq!(bad, 2);
    for _ in 0..20 {
        assert_eq!(call(&gw, &[]).await, (200, "good".to_string()));
    }
    assert_eq!(ejections(&gw, port), Some(1));
    assert_eq!(good.conns(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_open_connections() {
    let (a, b, gw) =
        pair("load_balancer:\n  policy: round_robin\ncircuit_breakers:\n- max_connections: 1")
            .await;
    let mut who = Vec::new();
    for _ in 0..6 {
        let (status, body) = call(&gw, &[]).await;
        assert_eq!(status, 200);
        who.push(body);
    }
    assert!(who.windows(2).all(|w| w[0] != w[1]), "{who:?}");
    // One open connection at a time: the unused one to the other address is closed before a
    // new one is dialled, so every request needs its own (two would be kept otherwise).
    assert_eq!(a.conns() + b.conns(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_a_new_address_waits_as_a_pending_request() {
    let (open, rx) = gate();
    let a = H2Up::gated("127.0.0.1:0", "a", rx.clone()).await;
    let port = a.addr.port();
    let b = H2Up::gated(&format!("127.0.0.2:{port}"), "b", rx).await;
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2"],
        port,
        "load_balancer:\n  policy: round_robin\ncircuit_breakers:\n- max_connections: 1\n  max_pending_requests: 1",
    )
    .await;
    let url = gw.url("/h/x");
    let first = {
        let u = url.clone();
        tokio::spawn(async move { get(&u, &[]).await })
    };
    eventually("the first request holds the one connection", || {
        a.hits() + b.hits() == 1
    })
    .await;
    // Of the next three, one shares the busy connection (multiplexed), one waits for a
    // connection to the other address as the pending request, and one is refused at once.
    let mut rest = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let u = url.clone();
        rest.spawn(async move { get(&u, &[]).await });
    }
    let refused = rest.join_next().await.unwrap().unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.header("x-legate-overloaded"),
        Some("circuit-breaker")
    );
    eventually("two requests on the one connection", || {
        a.hits() + b.hits() == 2
    })
    .await;
    assert_eq!(a.conns() + b.conns(), 1);

    open.send(true).unwrap();
    assert_eq!(first.await.unwrap().status, 200);
    while let Some(r) = rest.join_next().await {
        assert_eq!(r.unwrap().status, 200);
    }
    // The waiting request got its connection once the other one carried no request.
    assert_eq!((a.conns(), b.conns()), (1, 1));
    assert_eq!(a.hits() + b.hits(), 3);
}
