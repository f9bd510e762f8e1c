//! Upstream endpoint health end to end (issue 5): load balancing over https and IP-literal
//! upstreams, outlier ejection, active health checks, their place in the reconciler's
//! verification window, and the circuit breaker's count of open connections. Real upstreams on
//! several 127.0.0.x addresses fail, refuse or reset on command.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::support::*;
use crate::traffic::{answer, Scripted};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(host: &str, port: u16) -> SocketAddr {
    format!("{host}:{port}").parse().unwrap()
}

/// A gateway resolving `svc.test` to `addrs`, with one Mapping `/h/` to `service` plus `extra`.
async fn gateway(addrs: &[&str], service: &str, extra: &str) -> Gateway {
    gateway_with(addrs, service, extra, Settings::default()).await
}

use legate::proxy::Settings;

async fn gateway_with(addrs: &[&str], service: &str, extra: &str, base: Settings) -> Gateway {
    let dns = Arc::new(FakeDns::default());
    dns.answers
        .lock()
        .unwrap()
        .insert("svc.test".into(), addrs.iter().map(|a| ip(a)).collect());
    let yaml = route("h", "/h/", service, extra);
    Gateway::with(
        &yaml,
        Settings {
            lookup: dns,
            ..base
        },
    )
    .await
}

/// An upstream that answers its name, or 503 while `failing` is set.
async fn failing_on(addr: SocketAddr, name: &'static str, failing: Arc<AtomicBool>) -> Scripted {
    Scripted::start_at(addr, move |_, _req| {
        let f = failing.load(Ordering::SeqCst);
        async move {
            if f {
                answer(503, name)
            } else {
                answer(200, name)
            }
        }
    })
    .await
}

/// Status and body of one request through the gateway.
async fn call(gw: &Gateway) -> (u16, String) {
    let r = get(&gw.url("/h/x"), &[]).await;
    (r.status.as_u16(), r.body)
}

pub(crate) fn metric(gw: &Gateway, line_start: &str) -> Option<u64> {
    gw.proxy
        .metrics()
        .render(None)
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_balanced_per_request_with_the_service_name_for_tls() {
    let certs = tempfile::tempdir().unwrap();
    // The certificate names only the service: a dial by address must keep the name for TLS.
    let ca = make_secret(certs.path(), "up", &["svc.test"]);
    let a = Upstream::start_tls("a", &certs.path().join("up")).await;
    let port = a.addr.port();
    let b = Upstream::start_tls_on("b", &certs.path().join("up"), at("127.0.0.2", port)).await;
    let settings = Settings {
        upstream_ca: Some(ca),
        ..Settings::default()
    };
    let gw = gateway_with(
        &["127.0.0.1", "127.0.0.2"],
        &format!("https://svc.test:{port}"),
        "load_balancer:\n  policy: round_robin",
        settings,
    )
    .await;
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
    assert_eq!(a.hits.load(Ordering::SeqCst), 20);
    assert_eq!(b.hits.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_upstream_goes_through_the_balancer() {
    let up = Upstream::start("a").await;
    let gw = gateway(
        &[],
        &up.service(),
        "load_balancer:\n  policy: least_request\noutlier_detection:\n  consecutive_5xx: 1",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(call(&gw).await.0, 200);
    }
    // The balancer saw the literal as its one address (and never ejects the last one).
    let label = format!(
        "legate_upstream_addresses{{upstream=\"{}\",state=",
        up.service()
    );
    assert_eq!(metric(&gw, &format!("{label}\"all\"}}")), Some(1));
    let r = get(&gw.url("/h/x?status=500"), &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(call(&gw).await.0, 200);
    assert_eq!(metric(&gw, &format!("{label}\"ejected\"}}")), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_an_address_until_the_ejection_time_ends() {
    let fail_a = Arc::new(AtomicBool::new(true));
    let a = failing_on(at("127.0.0.1", 0), "a", fail_a.clone()).await;
    let port = a.addr.port();
    let b = failing_on(at("127.0.0.2", port), "b", Arc::default()).await;
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2"],
        &format!("svc.test:{port}"),
        "load_balancer:\n  policy: round_robin\noutlier_detection:\n  consecutive_5xx: 3\n  base_ejection_time: 1s\n  max_ejection_percent: 50",
    )
    .await;
    // Round robin: `a` answers every other request, 503 each time, until its third in a row.
    let mut failures = 0;
    // Taken before the request that ejects `a`, so the ejection happens after it.
    let mut ejected_at = std::time::Instant::now();
    for _ in 0..6 {
        let sent_at = std::time::Instant::now();
        if call(&gw).await.0 == 503 {
            failures += 1;
            ejected_at = sent_at;
        }
    }
    assert_eq!(failures, 3);
    assert_eq!(a.hits(), 3);
    // Ejected: everything goes to `b` (only requests sent within the ejection time count).
    fail_a.store(false, Ordering::SeqCst);
    let mut sent = 0;
    while sent < 20 && ejected_at.elapsed() < Duration::from_millis(800) {
        assert_eq!(call(&gw).await, (200, "b".to_string()));
        sent += 1;
    }
    assert!(sent > 0);
    assert_eq!(a.hits(), 3, "no request reached the ejected address");
    let ejections =
        format!("legate_upstream_outlier_ejections_total{{upstream=\"svc.test:{port}\"}}");
    assert_eq!(metric(&gw, &ejections), Some(1));
    // After the ejection time it takes traffic again.
    let mut back = false;
    for _ in 0..500 {
        if call(&gw).await == (200, "a".to_string()) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "the ejected address takes traffic again");
    assert!(ejected_at.elapsed() >= Duration::from_secs(1));
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_reset_connections_eject_as_gateway_failures() {
    let good = Upstream::start("good").await;
    let port = good.addr.port();
    // 127.0.0.3: nothing listens (refused). 127.0.0.4: accepts, then closes (reset).
    let resetter = TcpListener::bind(at("127.0.0.4", port)).await.unwrap();
    let reset_task = tokio::spawn(async move {
        while let Ok((s, _)) = resetter.accept().await {
            drop(s);
        }
    });
    let gw = gateway(
        &["127.0.0.1", "127.0.0.3", "127.0.0.4"],
        &format!("svc.test:{port}"),
        "outlier_detection:\n  consecutive_5xx: 0\n  consecutive_gateway_failure: 2\n  base_ejection_time: 30s\n  max_ejection_percent: 100",
    )
    .await;
    let mut bad = 0;
    for _ in 0..12 {
        if call(&gw).await.0 == 502 {
            bad += 1;
        }
    }
    // Two failures each, then out of rotation.
    assert_eq!(bad, 4);
    for _ in 0..20 {
        assert_eq!(call(&gw).await.0, 200);
    }
    let ejections =
        format!("legate_upstream_outlier_ejections_total{{upstream=\"svc.test:{port}\"}}");
    assert_eq!(metric(&gw, &ejections), Some(2));
    reset_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_holds() {
    let all_fail = || Arc::new(AtomicBool::new(true));
    let a = failing_on(at("127.0.0.1", 0), "a", all_fail()).await;
    let port = a.addr.port();
    let b = failing_on(at("127.0.0.2", port), "b", all_fail()).await;
    let c = failing_on(at("127.0.0.3", port), "c", all_fail()).await;
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2", "127.0.0.3"],
        &format!("svc.test:{port}"),
        "outlier_detection:\n  consecutive_5xx: 2\n  base_ejection_time: 30s\n  max_ejection_percent: 30",
    )
    .await;
    for _ in 0..30 {
        assert_eq!(call(&gw).await.0, 503);
    }
    // 0 % ejected < 30 %: one goes; then 33 % is not below 30 %: the others stay.
    let up = format!("svc.test:{port}");
    assert_eq!(
        metric(
            &gw,
            &format!("legate_upstream_outlier_ejections_total{{upstream=\"{up}\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &gw,
            &format!("legate_upstream_addresses{{upstream=\"{up}\",state=\"ejected\"}}")
        ),
        Some(1)
    );
    let hits = [a.hits(), b.hits(), c.hits()];
    assert_eq!(hits.iter().filter(|h| **h == 2).count(), 1, "{hits:?}");
    assert_eq!(hits.iter().filter(|h| **h > 10).count(), 2, "{hits:?}");
}

/// An upstream whose `/healthz` answers `health` and whose other paths answer its name;
/// `served` counts the other requests.
async fn checked(
    addr: SocketAddr,
    name: &'static str,
) -> (Scripted, Arc<AtomicU16>, Arc<AtomicU64>) {
    let health = Arc::new(AtomicU16::new(200));
    let served = Arc::new(AtomicU64::new(0));
    let (h, s) = (health.clone(), served.clone());
    let up = Scripted::start_at(addr, move |_, req: Request<hyper::body::Incoming>| {
        let status = if req.uri().path() == "/healthz" {
            assert_eq!(req.headers()["host"], "health.svc");
            assert_eq!(req.headers()["x-check"], "1");
            h.load(Ordering::SeqCst)
        } else {
            s.fetch_add(1, Ordering::SeqCst);
            200
        };
        async move { answer(status, name) }
    })
    .await;
    (up, health, served)
}

const CHECKS: &str = "health_checks:
- interval: 30ms
  timeout: 1s
  unhealthy_threshold: 2
  healthy_threshold: 3
  health_check:
    http:
      path: /healthz
      hostname: health.svc
      add_request_headers:
        x-check: '1'
      expected_statuses:
      - {min: 200, max: 204}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_takes_an_address_out_and_back() {
    let (a, a_health, a_served) = checked(at("127.0.0.1", 0), "a").await;
    let port = a.addr.port();
    let (_b, b_health, _b_served) = checked(at("127.0.0.2", port), "b").await;
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2"],
        &format!("svc.test:{port}"),
        CHECKS,
    )
    .await;
    let up = format!("svc.test:{port}");
    let unhealthy = format!("legate_upstream_addresses{{upstream=\"{up}\",state=\"unhealthy\"}}");
    assert_eq!(call(&gw).await.0, 200);
    // 206 is outside the expected statuses.
    a_health.store(206, Ordering::SeqCst);
    let mut n = 0;
    while metric(&gw, &unhealthy) != Some(1) {
        assert_eq!(call(&gw).await.0, 200);
        n += 1;
        assert!(n < 2000, "address a never left rotation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = a_served.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(call(&gw).await, (200, "b".to_string()));
    }
    assert_eq!(a_served.load(Ordering::SeqCst), before);
    // Healthy again: back after healthy_threshold passes.
    a_health.store(200, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..1000 {
        if call(&gw).await.1 == "a" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(back, "address a takes traffic again");
    // Panic mode: with every address failing, all of them serve.
    a_health.store(500, Ordering::SeqCst);
    b_health.store(500, Ordering::SeqCst);
    let mut n = 0;
    while metric(&gw, &unhealthy) != Some(2) {
        let _ = call(&gw).await;
        n += 1;
        assert!(n < 2000, "both addresses never failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, who) = call(&gw).await;
        assert_eq!(status, 200);
        seen.insert(who);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkers_stop_when_the_upstream_leaves_the_graph() {
    let (a, _h, _s) = checked(at("127.0.0.1", 0), "a").await;
    let port = a.addr.port();
    let gw = gateway(&["127.0.0.1"], &format!("svc.test:{port}"), CHECKS).await;
    eventually("checks run", || a.hits() >= 3).await;
    assert_eq!(gw.proxy.health_checkers(), 1);
    // The same upstream and checks in a new graph: the checker goes on, not a second one.
    gw.proxy.swap(compile(&mapping(
        "h",
        &format!("hostname: '*'\nprefix: /other/\nservice: svc.test:{port}\n{CHECKS}"),
    )));
    assert_eq!(gw.proxy.health_checkers(), 1);
    gw.proxy.swap(compile(&mapping(
        "h",
        &format!("hostname: '*'\nprefix: /h/\nservice: svc.test:{port}"),
    )));
    assert_eq!(gw.proxy.health_checkers(), 0);
    // The clock for "no more checks": a checker on another upstream, same 30 ms interval,
    // started by the next graph. Once it has run twice an in-flight check on `a` has landed;
    // while it runs five more, a checker still alive on `a` would have run too.
    let (b, _hb, _sb) = checked(at("127.0.0.1", 0), "b").await;
    gw.proxy.swap(compile(&mapping(
        "h",
        &format!(
            "hostname: '*'\nprefix: /h/\nservice: svc.test:{}\n{CHECKS}",
            b.addr.port()
        ),
    )));
    assert_eq!(gw.proxy.health_checkers(), 1);
    eventually("b's checks run", || b.hits() >= 2).await;
    let after = a.hits();
    let seen = b.hits();
    eventually("b's checks go on", || b.hits() >= seen + 5).await;
    assert_eq!(
        a.hits(),
        after,
        "no checker outlives its graph (30 ms interval)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_over_h2c() {
    // A grpc.health.v1 server answering SERVING (1) or NOT_SERVING (2).
    let serving = Arc::new(AtomicBool::new(true));
    let s = serving.clone();
    let up = Scripted::start(move |_, req: Request<hyper::body::Incoming>| {
        assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
        assert_eq!(req.version(), http::Version::HTTP_2);
        let status = if s.load(Ordering::SeqCst) { 1 } else { 2 };
        async move {
            let mut r = answer(200, vec![0u8, 0, 0, 0, 2, 0x08, status]);
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            r.headers_mut().insert("grpc-status", "0".parse().unwrap());
            r
        }
    })
    .await;
    let gw = gateway(
        &[],
        &format!("h2c://{}", up.service()),
        "health_checks:\n- interval: 20ms\n  unhealthy_threshold: 1\n  health_check:\n    grpc:\n      upstream_name: echo.Echo",
    )
    .await;
    eventually("a check ran", || up.hits() >= 2).await;
    assert!(gw.proxy.unhealthy_upstreams().is_empty());
    serving.store(false, Ordering::SeqCst);
    eventually("the upstream is reported down", || {
        !gw.proxy.unhealthy_upstreams().is_empty()
    })
    .await;
    let why = gw.proxy.unhealthy_upstreams().remove(0);
    assert!(why.contains("serving status 2"), "{why}");
}

/// gRPC servers over TLS speak HTTP/2 only: the check must offer `h2` by ALPN (a handshake
/// offering only http/1.1 is refused by such a server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_over_tls_offers_h2() {
    use rustls_pki_types::pem::PemObject;
    let certs = tempfile::tempdir().unwrap();
    let ca = make_secret(certs.path(), "up", &["svc.test"]);
    let dir = certs.path().join("up");
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind(at("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let checks = Arc::new(AtomicU64::new(0));
    let counted = checks.clone();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counted = counted.clone();
                    async move {
                        if req.uri().path() == "/grpc.health.v1.Health/Check" {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        // SERVING (1), grpc-status 0.
                        let mut r = answer(200, vec![0u8, 0, 0, 0, 2, 0x08, 1]);
                        r.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        r.headers_mut().insert("grpc-status", "0".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let gw = gateway_with(
        &["127.0.0.1"],
        &format!("https://svc.test:{port}"),
        "grpc: true\nhealth_checks:\n- interval: 20ms\n  unhealthy_threshold: 1\n  health_check:\n    grpc:\n      upstream_name: echo.Echo",
        Settings {
            upstream_ca: Some(ca),
            ..Settings::default()
        },
    )
    .await;
    eventually("checks reached the h2-only TLS server", || {
        checks.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(
        gw.proxy.unhealthy_upstreams().is_empty(),
        "{:?}",
        gw.proxy.unhealthy_upstreams()
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_idle_connections() {
    // Both addresses count the connections they accept.
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let first = TcpListener::bind(at("127.0.0.1", 0)).await.unwrap();
    let port = first.local_addr().unwrap().port();
    let second = TcpListener::bind(at("127.0.0.2", port)).await.unwrap();
    for (l, name) in [(first, "a"), (second, "b")] {
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, std::convert::Infallible>(answer(200, name))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }
    let gw = gateway(
        &["127.0.0.1", "127.0.0.2"],
        &format!("svc.test:{port}"),
        "load_balancer:\n  policy: round_robin\ncircuit_breakers:\n- max_connections: 1",
    )
    .await;
    let mut who = Vec::new();
    for _ in 0..6 {
        let (status, body) = call(&gw).await;
        assert_eq!(status, 200);
        who.push(body);
    }
    assert!(who.windows(2).all(|w| w[0] != w[1]), "{who:?}");
    // One open connection at a time: the idle one to the other address is closed before a new
    // one is dialled, so every request needs its own (two would be kept and reused otherwise).
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_whose_upstream_fails_its_health_checks_rolls_back() {
    use legate::reconcile::{self, Outcome};
    use legate::source::dir::DirSource;

    let (good, good_health, _) = checked(at("127.0.0.1", 0), "good").await;
    let (sick, sick_health, _) = checked(at("127.0.0.1", 0), "sick").await;
    sick_health.store(503, Ordering::SeqCst);
    let proxy = legate::proxy::Proxy::new(Settings::default()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let doc = |name: &str, up: &Scripted| {
        mapping(
            name,
            &format!(
                "hostname: '*'\nprefix: /{name}/\nservice: {}\n{CHECKS}",
                up.service()
            ),
        )
    };
    std::fs::write(d.path().join("a.yaml"), doc("a", &good)).unwrap();
    let src = Arc::new(DirSource::new(d.path(), Default::default(), None));
    let mut s = crate::reconcile::settings(None);
    s.verify.window = Duration::from_secs(1);
    s.verify.probe_interval = Duration::from_millis(20);
    let h = reconcile::start(src, proxy.clone(), s, Some(proxy.clone()));
    let a = crate::reconcile::first(&h).await;
    let a = crate::reconcile::verdict_of(&h, &a.revision).await;
    assert_eq!(a.outcome, Outcome::Applied);
    let first = proxy.graph();

    std::fs::write(d.path().join("b.yaml"), doc("b", &sick)).unwrap();
    let b = crate::reconcile::swapped(&h.sync().await);
    let entry = &crate::reconcile::verdict_of(&h, &b.revision).await;
    assert_eq!(entry.outcome, Outcome::RolledBack);
    let why = entry.reason.as_deref().unwrap_or("");
    assert!(why.contains("Mapping") && why.contains("/b"), "{why}");
    assert!(
        why.contains(&sick.service()) && why.contains("status 503"),
        "{why}"
    );
    assert!(Arc::ptr_eq(&proxy.graph(), &first));
    // The rolled-back revision's checker for `sick` is gone; `good`'s goes on.
    assert_eq!(proxy.health_checkers(), 1);

    // An upstream that was already checked and goes down does not block an unrelated revision.
    std::fs::remove_file(d.path().join("b.yaml")).unwrap();
    good_health.store(503, Ordering::SeqCst);
    let before = good.hits();
    // Two failed checks in a row (unhealthy_threshold) at least.
    eventually("good fails its checks", || good.hits() >= before + 3).await;
    std::fs::write(
        d.path().join("c.yaml"),
        mapping("c", "hostname: '*'\nprefix: /c/\nservice: 127.0.0.1:9"),
    )
    .unwrap();
    let c = crate::reconcile::swapped(&h.sync().await);
    let c = crate::reconcile::verdict_of(&h, &c.revision).await;
    assert_eq!(c.outcome, Outcome::Applied, "{c:?}");
}

#[test]
fn outlier_detection_compiles_from_an_object_or_a_string_and_bad_values_are_errors() {
    let outlier = |spec: &str| {
        let g = compile(&mapping(
            "o",
            &format!("hostname: '*'\nprefix: /o/\nservice: svc.test\n{spec}"),
        ));
        match &g.routes[0].action {
            legate::routes::Action::Forward(f) => (f.outlier.clone(), f.health_checks.clone()),
            _ => panic!("not a forward"),
        }
    };
    let (o, _) =
        outlier("outlier_detection: '{consecutive_gateway_failure: 3, base_ejection_time: 2s}'");
    let o = o.unwrap();
    assert_eq!(o.consecutive_gateway_failure, 3);
    assert_eq!(o.base_ejection_time, Duration::from_secs(2));
    assert_eq!(
        (o.consecutive_5xx, o.max_ejection_percent),
        (5, 10),
        "Envoy's defaults"
    );
    let (o, _) = outlier("outlier_detection:\n  max_ejection_percent: 50");
    assert_eq!(o.unwrap().max_ejection_percent, 50);
    let (_, hc) = outlier("health_checks:\n- health_check:\n    http:\n      path: /hc");
    assert_eq!(hc.len(), 1);
    assert_eq!(hc[0].interval, Duration::from_secs(5));
    assert_eq!(hc[0].timeout, Duration::from_secs(3));
    assert_eq!((hc[0].unhealthy_threshold, hc[0].healthy_threshold), (2, 1));

    for bad in [
        "outlier_detection: 'consecutive_5xx: lots'",
        "outlier_detection: '{base_ejection_time: 0s}'",
        "health_checks:\n- interval: 0s\n  health_check:\n    http:\n      path: /hc",
    ] {
        let tree = Tree::new(&mapping(
            "o",
            &format!("hostname: '*'\nprefix: /o/\nservice: svc.test\n{bad}"),
        ));
        let out = legate::config::check_dir(tree.path(), &legate::config::Options::default());
        assert!(
            out.diagnostics
                .iter()
                .any(|d| d.pointer.starts_with("/spec/outlier_detection")
                    || d.pointer.starts_with("/spec/health_checks")),
            "{bad}: {:?}",
            out.diagnostics
        );
        assert!(out.graph.is_none(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_of_upstreams_that_leave_the_graph_are_dropped() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let to = |svc: String| compile(&route("m", "/m/", &svc, ""));
    let gw = Gateway::start(&route("m", "/m/", &a.service(), "")).await;
    assert_eq!(get(&gw.url("/m/x"), &[]).await.status, 200);
    assert_eq!(gw.proxy.upstream_pools(), 1);
    // Upstream a leaves the graph: its pool (and the idle connection in it) goes with it.
    gw.proxy.swap(to(b.service()));
    assert_eq!(get(&gw.url("/m/x"), &[]).await.status, 200);
    assert_eq!(gw.proxy.upstream_pools(), 1);
    // Back and forth: never more pools than upstreams in use.
    gw.proxy.swap(to(a.service()));
    gw.proxy.swap(to(b.service()));
    assert_eq!(gw.proxy.upstream_pools(), 1);
}
