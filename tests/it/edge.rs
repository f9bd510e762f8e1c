//! Edge hardening through the running gateway: request-head smuggling, host confusion and path
//! normalization cases as one table each, so every later change of the request path runs them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

/// A raw HTTP/1.1 exchange's status and, when the upstream answered, what it saw.
struct Seen {
    status: u16,
    upstream: Option<String>,
    path: Option<String>,
    host: Option<String>,
}

async fn exchange(addr: SocketAddr, head: &str) -> Seen {
    let text = raw(addr, head.as_bytes()).await;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?} for {head:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let doc: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let field = |f: &dyn Fn(&serde_json::Value) -> Option<String>| doc.as_ref().and_then(f);
    Seen {
        status,
        upstream: field(&|d| d["upstream"].as_str().map(str::to_string)),
        path: field(&|d| d["path"].as_str().map(str::to_string)),
        host: field(&|d| d["headers"]["host"][0].as_str().map(str::to_string)),
    }
}

/// A request head, then what must happen: status, upstream, upstream path, Host it saw.
type Case = (
    String,
    u16,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

/// A gateway with a protected `/secure/` route and a catch-all, on two virtual hosts.
async fn edge_gateway(secure: &Upstream, open: &Upstream, admin: &Upstream) -> Gateway {
    let yaml = [
        host("public", "public.example", "requestPolicy:\n  insecure:\n    action: Route"),
        host("admin", "admin.internal", "requestPolicy:\n  insecure:\n    action: Route"),
        mapping(
            "secure",
            &format!("hostname: public.example\nprefix: /secure/\nservice: {}\nrewrite: ''", secure.service()),
        ),
        mapping(
            "open",
            &format!("hostname: public.example\nprefix: /\nservice: {}\nrewrite: ''", open.service()),
        ),
        mapping(
            "slashes",
            &format!(
                "hostname: public.example\nprefix: /api/v4/projects/\nservice: {}\nrewrite: ''\nallow_escaped_slashes: true",
                open.service()
            ),
        ),
        mapping(
            "admin",
            &format!("hostname: admin.internal\nprefix: /\nservice: {}\nrewrite: ''", admin.service()),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    gw.proxy.set_local("/.legate/hooks/", Arc::new(Hook));
    gw
}

/// Stands in for the webhooks on the proxy listeners.
struct Hook;

impl legate::proxy::LocalService for Hook {
    fn call(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> Pin<Box<dyn Future<Output = http::Response<bytes::Bytes>> + Send>> {
        let doc = serde_json::json!({"upstream": "hook", "path": req.uri().path()});
        Box::pin(async move {
            let mut r = http::Response::new(bytes::Bytes::from(doc.to_string()));
            *r.status_mut() = http::StatusCode::ACCEPTED;
            r
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_are_checked_and_normalized_once() {
    let secure = Upstream::start("secure").await;
    let open = Upstream::start("open").await;
    let admin = Upstream::start("admin").await;
    let gw = edge_gateway(&secure, &open, &admin).await;
    let pub_ = "Host: public.example\r\nConnection: close\r\n\r\n";
    // (request head, status, upstream, upstream path, Host the upstream saw)
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\n{pub_}");
    let cases: Vec<Case> = vec![
        // Paths: what reaches an upstream is normalized, and routed as normalized.
        (get("/secure/x"), 200, Some("secure"), Some("/secure/x"), Some("public.example")),
        (get("/%73ecure/x"), 200, Some("secure"), Some("/secure/x"), None),
        (get("/public/%2e%2e/secure/x"), 200, Some("secure"), Some("/secure/x"), None),
        (get("/public/%2E%2e/secure/x"), 200, Some("secure"), Some("/secure/x"), None),
        (get("/public/../secure/x"), 200, Some("secure"), Some("/secure/x"), None),
        (get("/public/..;x/secure/x"), 200, Some("secure"), Some("/secure/x"), None),
        (get("/secure/.;x/y"), 200, Some("secure"), Some("/secure/y"), None),
        (get("/public/%252e%252e/secure/x"), 200, Some("open"), Some("/public/%252e%252e/secure/x"), None),
        (get("/Secure/x"), 200, Some("open"), Some("/Secure/x"), None),
        (get("/a;b/c?q=%2e%2e"), 200, Some("open"), Some("/a;b/c"), None),
        (get("/%c3%a9t%c3%a9"), 200, Some("open"), Some("/%C3%A9t%C3%A9"), None),
        (get("//secure//x"), 200, Some("open"), Some("//secure//x"), None),
        (get("/public%2F..%2Fsecure/x"), 400, None, None, None),
        (get("/public%5c..%5csecure/x"), 400, None, None, None),
        (get("/public\\..\\secure/x"), 400, None, None, None),
        (get("/bad%zz"), 400, None, None, None),
        (get("/bad%2"), 400, None, None, None),
        // The hooks prefix is matched on the normalized path, never proxied with its signature.
        (get("/x/../.legate/hooks/github"), 202, Some("hook"), Some("/.legate/hooks/github"), None),
        (get("/%2elegate/hooks/github"), 202, Some("hook"), Some("/.legate/hooks/github"), None),
        // The per-Mapping opt-in keeps escaped slashes as escapes.
        (get("/api/v4/projects/group%2fname"), 200, Some("open"), Some("/api/v4/projects/group%2Fname"), None),
        // Host confusion: the absolute-form target's authority wins and is what is forwarded.
        (
            "GET http://public.example/x HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n".into(),
            200, Some("open"), Some("/x"), Some("public.example"),
        ),
        (
            "GET http://admin.internal/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n".into(),
            200, Some("admin"), Some("/x"), Some("admin.internal"),
        ),
        ("GET /x HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        ("GET http://public.example/x HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        ("GET /x HTTP/1.0\r\n\r\n".into(), 400, None, None, None),
        (
            "GET /x HTTP/1.1\r\nHost: public.example\r\nHost: admin.internal\r\nConnection: close\r\n\r\n".into(),
            400, None, None, None,
        ),
        ("GET /x HTTP/1.1\r\nHost: u@admin.internal\r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        (
            "GET http://u@public.example/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n".into(),
            400, None, None, None,
        ),
        ("GET /x HTTP/1.1\r\nHost: public.example:abc\r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        ("GET /x HTTP/1.1\r\nHost: pub lic\r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        ("GET /x HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n".into(), 400, None, None, None),
        // Valid names keep working: a trailing dot, a port, another case.
        ("GET /x HTTP/1.1\r\nHost: public.example.\r\nConnection: close\r\n\r\n".into(), 200, Some("open"), Some("/x"), Some("public.example.")),
        ("GET /x HTTP/1.1\r\nHost: PUBLIC.example\r\nConnection: close\r\n\r\n".into(), 200, Some("open"), Some("/x"), Some("PUBLIC.example")),
        ("GET /x HTTP/1.0\r\nHost: public.example\r\n\r\n".into(), 200, Some("open"), Some("/x"), None),
        // Underscores in names and IPv6 literals are valid hosts (no Host serves them: 404).
        ("GET /x HTTP/1.1\r\nHost: my_host.internal\r\nConnection: close\r\n\r\n".into(), 404, None, None, None),
        ("GET /x HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n".into(), 404, None, None, None),
        // Header names with an underscore are refused (Envoy's edge guidance).
        (format!("GET /secure/x HTTP/1.1\r\nx_user_id: 1\r\n{pub_}"), 400, None, None, None),
        // Smuggling: the parser refuses conflicting framing; nothing reaches an upstream.
        // Both framings: read by Transfer-Encoding alone (RFC 9112 §6.3), the length dropped.
        (
            format!("POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n{pub_}0\r\n\r\nGET /smuggled HTTP/1.1\r\n{pub_}"),
            200, Some("open"), Some("/x"), None,
        ),
        (
            format!("POST /x HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n{pub_}abcd"),
            400, None, None, None,
        ),
        (
            format!("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n{pub_}0\r\n\r\n"),
            400, None, None, None,
        ),
        (format!("GET /x HTTP/1.1\r\nX-A : b\r\n{pub_}"), 400, None, None, None),
        (format!("GET /x HTTP/1.1\r\n X-A: b\r\n{pub_}"), 400, None, None, None),
    ];
    let mut failures = Vec::new();
    for (req, status, upstream, path, host) in &cases {
        let seen = exchange(gw.http, req).await;
        let ok = seen.status == *status
            && (upstream.is_none() || seen.upstream.as_deref() == *upstream)
            && (path.is_none() || seen.path.as_deref() == *path)
            && (host.is_none() || seen.host.as_deref() == *host)
            && (*status < 300 || seen.upstream.is_none());
        if !ok {
            failures.push(format!(
                "{req:?}: want {status} {upstream:?} {path:?} {host:?}, got {} {:?} {:?} {:?}",
                seen.status, seen.upstream, seen.path, seen.host
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An HTTP/2 request over a prior-knowledge connection; `(status, upstream JSON)`.
async fn h2_get(addr: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (resp, _) = client.send_request(b.body(()).unwrap(), true).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_is_checked_and_reaches_h2_upstreams_as_authority_only() {
    let h1 = Upstream::start("h1").await;
    let h2 = Upstream::start("h2").await;
    let yaml = [
        host("public", "public.example", "requestPolicy:\n  insecure:\n    action: Route"),
        mapping(
            "h1",
            &format!("hostname: public.example\nprefix: /h1/\nservice: {}", h1.service()),
        ),
        mapping(
            "grpc",
            &format!("hostname: public.example\nprefix: /g/\nservice: {}\ngrpc: true", h2.service()),
        ),
        mapping(
            "rewritten",
            &format!(
                "hostname: public.example\nprefix: /r/\nservice: h2c://{}\nhost_rewrite: inside.example",
                h2.service()
            ),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    // `host` differing from `:authority` makes the request malformed (RFC 9113 §8.3.1).
    let (status, _) = h2_get(
        gw.http,
        "http://public.example/h1/x",
        &[("host", "admin.internal")],
    )
    .await;
    assert_eq!(status, 400);
    let (status, seen) = h2_get(
        gw.http,
        "http://public.example/h1/x",
        &[("host", "public.example")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["headers"]["host"][0], "public.example");
    assert_eq!(seen["headers"]["x-forwarded-host"][0], "public.example");
    // To an HTTP/2 upstream: the client's authority as `:authority`, no `host` header.
    let (status, seen) = h2_get(gw.http, "http://public.example/g/x", &[]).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["version"], "HTTP/2.0");
    assert_eq!(seen["authority"], "public.example");
    assert!(seen["headers"].get("host").is_none(), "{seen}");
    let (status, seen) = h2_get(gw.http, "http://public.example/r/x", &[]).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["authority"], "inside.example");
    assert!(seen["headers"].get("host").is_none(), "{seen}");
}

/// Write `bytes`, optionally close the sending half (a client gone mid-upload), read the answer.
async fn send_raw(addr: SocketAddr, bytes: &[u8], half_close: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_or_aborted_request_bodies_are_the_clients_failure() {
    let up = Upstream::start("app").await;
    let yaml = mapping(
        "app",
        &format!(
            "hostname: '*'\nprefix: /\nservice: {}\nrewrite: ''",
            up.service()
        ),
    );
    let gw = Gateway::start(&yaml).await;
    let head = "POST /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n";
    // (request, close the sending half after it, status)
    let cases = [
        (
            format!("{head}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
            false,
            400,
        ),
        (
            format!("{head}Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n"),
            false,
            400,
        ),
        (
            format!("{head}Transfer-Encoding: chunked\r\n\r\n64\r\nhello"),
            true,
            499,
        ),
        (format!("{head}Content-Length: 100\r\n\r\nhello"), true, 499),
    ];
    for (req, half, status) in &cases {
        let resp = send_raw(gw.http, req.as_bytes(), *half).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{req:?}: {resp}"
        );
    }
    // None of it is the gateway's or an upstream's failure: nothing for a rollback to count.
    assert_eq!(gw.proxy.gateway_errors(), 0);
    let metrics = gw.proxy.metrics().render(None);
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("legate_gateway_errors_total"))
        .unwrap_or("legate_gateway_errors_total 0");
    assert!(counted.ends_with(" 0"), "{counted}");
}

/// An HTTP/1.1 upstream that answers every request with `answer`, then holds the connection.
async fn stalling_upstream(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                // Hold the connection until the gateway gives up on it.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, task)
}

/// An h2c upstream that sends the head and one data frame, then stalls.
async fn stalling_h2_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(resp, false) {
                        let _ = send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), false);
                        held.push(send);
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_and_idle_limit_cover_the_whole_response() {
    let (stall, _t) =
        stalling_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await;
    let (grpc, _g) = stalling_h2_upstream().await;
    let yaml = [
        route("whole", "/whole/", &stall.to_string(), "timeout_ms: 300"),
        route(
            "idle",
            "/idle/",
            &stall.to_string(),
            "timeout_ms: 0\nidle_timeout_ms: 300",
        ),
        route(
            "grpc",
            "/svc.Greeter/",
            &grpc.to_string(),
            "grpc: true\ntimeout_ms: 300",
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    for path in ["/whole/x", "/idle/x"] {
        // HTTP/1.1: the head and the data so far, then the connection closes without the final
        // chunk, so the client knows the body is cut off.
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let got = tokio::time::timeout(Duration::from_secs(20), raw(gw.http, req.as_bytes()))
            .await
            .expect("the gateway let a stalled response hold the connection");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.contains("hello"), "{got}");
        assert!(!got.ends_with("0\r\n\r\n"), "{got}");
    }
    // HTTP/2: the stream is reset.
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://t/whole/x")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match body.data().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("stalled HTTP/2 response not ended");
    assert!(
        ended.is_err_and(|e| e.is_reset()),
        "the stream should be reset"
    );
    // gRPC: DEADLINE_EXCEEDED in trailers after the data already sent.
    let req = http::Request::builder()
        .method("POST")
        .uri("http://t/svc.Greeter/Hello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        d.unwrap();
    }
    let trailers = tokio::time::timeout(Duration::from_secs(20), body.trailers())
        .await
        .unwrap()
        .unwrap()
        .expect("trailers");
    assert_eq!(trailers["grpc-status"], "4");
}

#[test]
fn check_points_out_stream_mappings_under_a_route_timeout() {
    let yaml = [
        mapping(
            "grpc",
            "hostname: '*'\nprefix: /g/\nservice: g:50051\ngrpc: true",
        ),
        mapping(
            "ws",
            "hostname: '*'\nprefix: /ws/\nservice: w\nallow_upgrade: [websocket]",
        ),
        mapping(
            "off",
            "hostname: '*'\nprefix: /s/\nservice: s\ngrpc: true\ntimeout_ms: 0",
        ),
        mapping("plain", "hostname: '*'\nprefix: /p/\nservice: p"),
    ]
    .concat();
    let tree = Tree::new(&yaml);
    let out = legate::config::check_dir(tree.path(), &legate::config::Options::default());
    let flagged: Vec<&str> = out
        .diagnostics
        .iter()
        .filter(|d| d.code == "stream-timeout")
        .map(|d| d.message.as_str())
        .collect();
    // gRPC only: an upgraded tunnel is not under the route timeout.
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert!(flagged.iter().all(|m| m.contains("3000 ms")), "{flagged:?}");
}

/// Wait (up to 20 s) until the gateway holds at most `n` connections; returns how many it held.
async fn settle_connections(gw: &Gateway, n: usize) -> usize {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let open = gw.running().open_connections();
        if open <= n || tokio::time::Instant::now() > end {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_closed_after_the_header_timeout_from_accept() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start("app").await;
    let yaml = mapping(
        "app",
        &format!("hostname: '*'\nprefix: /\nservice: {}", up.service()),
    );
    let mut settings = legate::proxy::Settings::default();
    settings.limits.header_read_timeout = Duration::from_millis(300);
    let gw = Gateway::with(&yaml, settings).await;
    const EACH: usize = 10;
    let mut held = Vec::new();
    for _ in 0..EACH {
        // Never a byte (the plain listener sniffs the protocol with no timer of its own).
        held.push(tokio::net::TcpStream::connect(gw.http).await.unwrap());
        // An HTTP/2 preface and SETTINGS, then no request (HTTP/2 has no header timer).
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        held.push(s);
        // A TCP connection to the TLS listener that never starts the handshake.
        held.push(tokio::net::TcpStream::connect(gw.https).await.unwrap());
    }
    // A slowloris: a head that never ends, one byte at a time.
    let mut slow = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let dribble = tokio::spawn(async move {
        let _ = slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"x").await.is_err() {
                return true;
            }
        }
        false
    });
    assert_eq!(
        settle_connections(&gw, 0).await,
        0,
        "idle clients still held"
    );
    assert!(dribble.await.unwrap(), "the slowloris was never cut off");
    // A client that does send its request is served as before.
    assert_eq!(get(&gw.url("/x"), &[]).await.status, 200);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_outlives_descriptor_exhaustion() {
    use std::process::{Command, Stdio};
    let (http, admin) = (free_addr(), free_addr());
    let tree = Tree::new(&mapping(
        "m",
        "hostname: '*'\nprefix: /\nservice: 127.0.0.1:9",
    ));
    // A low open-file limit (soft and hard) with the default --max-connections 10,000.
    let script = format!(
        "ulimit -n 512 && exec {} run --dir {} --http-listen {http} --https-listen off \
         --admin-listen {admin} --header-read-timeout-ms 60000 --verify-window 0",
        env!("CARGO_BIN_EXE_legate"),
        tree.path().display()
    );
    let _gw = Killed(
        Command::new("bash")
            .args(["-c", &script])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let healthz = format!("http://{admin}/healthz");
    let answered = || async {
        tokio::time::timeout(
            Duration::from_secs(5),
            client().get(healthz.parse().unwrap()),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200))
    };
    crate::support::eventually_async("the gateway to start", answered).await;
    // More idle clients than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..700 {
        if let Ok(s) = tokio::net::TcpStream::connect(http).await {
            idle.push(s);
        }
    }
    // The admin API answers during the flood and after it.
    assert!(
        answered().await,
        "admin listener unreachable while the proxy is saturated"
    );
    drop(idle);
    assert!(answered().await, "admin listener gone after the flood");
}

/// A TLS upstream whose handshake takes 300 ms (so a dial is still in progress when the
/// request that asked for it is reset); counts the TCP connections it accepts.
async fn slow_tls_upstream(
    cert_dir: &std::path::Path,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert_dir.join("tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(cert_dir.join("tls.key")).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_do_not_cost_an_upstream_dial_each() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_secret(certs.path(), "up", &["localhost"]);
    let (up, accepted, _t) = slow_tls_upstream(&certs.path().join("up")).await;
    let yaml = mapping(
        "app",
        &format!(
            "hostname: '*'\nprefix: /\nservice: https://localhost:{}",
            up.port()
        ),
    );
    let settings = legate::proxy::Settings {
        upstream_ca: Some(ca),
        ..Default::default()
    };
    let gw = Gateway::with(&yaml, settings).await;
    const RESETS: usize = 150;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    for i in 0..RESETS {
        let req = http::Request::builder()
            .uri(format!("http://t/r{i}"))
            .body(())
            .unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        client = client.ready().await.unwrap();
    }
    // A request that is not reset is served, on a connection the resets' dials left behind.
    let r = get(&gw.url("/after"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let dials = accepted.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("{RESETS} reset streams made {dials} upstream dials");
    assert!(
        dials <= 33,
        "{dials} upstream dials for {RESETS} reset streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_framing_faults_are_not_passed_on() {
    // (upstream answer, status the client gets, body it gets)
    let cases: [(&'static [u8], u16, Option<&str>); 2] = [
        // Both framings: Transfer-Encoding wins (RFC 9112 §6.3); the stale length is dropped.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            Some("hello"),
        ),
        // A switch nobody asked for.
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
            502,
            None,
        ),
    ];
    for (answer, status, body) in cases {
        let (up, _t) = stalling_upstream(answer).await;
        let yaml = route("app", "/", &up.to_string(), "");
        let gw = Gateway::start(&yaml).await;
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            raw(
                gw.http,
                b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ),
        )
        .await
        .expect("the client was left waiting");
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got}");
        let head = got.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(!head.contains("content-length: 100"), "{got}");
        if let Some(b) = body {
            assert!(got.contains(b), "{got}");
        }
    }
}

/// `legate run` on `tree` with these extra flags; returns the process and the admin address.
fn legate_run(tree: &Tree, extra: &[&str]) -> (Killed, SocketAddr) {
    let (http, admin) = (free_addr(), free_addr());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("run")
        .arg("--dir")
        .arg(tree.path())
        .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
        .args(["--admin-listen", &admin.to_string(), "--verify-window", "0"])
        .args(extra)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (Killed(child), admin)
}

/// Poll `GET url` (JSON) until `ok` holds, up to 30 s.
async fn poll_json(url: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got =
            tokio::time::timeout(Duration::from_secs(5), client().get(url.parse().unwrap())).await;
        if let Ok(Ok(resp)) = got {
            use http_body_util::BodyExt;
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if ok(&v) {
                return v;
            }
            assert!(tokio::time::Instant::now() < end, "gave up waiting: {v}");
        }
        assert!(tokio::time::Instant::now() < end, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_dir_is_reported_cleaned_up_and_recovered() {
    let tree = Tree::new(&mapping(
        "m",
        "hostname: '*'\nprefix: /\nservice: 127.0.0.1:9",
    ));
    let cache = tempfile::tempdir().unwrap();
    // Writing the snapshot's temporary file hits a full device.
    std::os::unix::fs::symlink("/dev/full", cache.path().join("dir-snapshot.tmp")).unwrap();
    let cache_arg = cache.path().to_str().unwrap().to_string();
    let (_gw, admin) = legate_run(&tree, &["--cache-dir", &cache_arg]);
    let status = format!("http://{admin}/api/status");
    let st = poll_json(&status, |s| {
        s["applied"].is_string() && s["cache_error"].is_string()
    })
    .await;
    assert!(
        st["cache_error"]
            .as_str()
            .unwrap()
            .contains("dir-snapshot.json"),
        "{st}"
    );
    let metrics = client()
        .get(format!("http://{admin}/metrics").parse().unwrap())
        .await
        .unwrap();
    let text = {
        use http_body_util::BodyExt;
        metrics.into_body().collect().await.unwrap().to_bytes()
    };
    assert!(String::from_utf8_lossy(&text).contains("legate_cache_write_failing 1"));
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Space is back: the next pass writes the applied revision and the report clears.
    let sync = http::Request::post(format!("http://{admin}/api/sync"))
        .body(empty())
        .unwrap();
    let _ = client().request(sync).await.unwrap();
    poll_json(&status, |s| s["cache_error"].is_null()).await;
    let snap = std::fs::read(cache.path().join("dir-snapshot.json")).expect("snapshot written");
    let snap: serde_json::Value = serde_json::from_slice(&snap).unwrap();
    assert_eq!(snap["id"], st["applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_webhooks_do_not_cause_a_fetch_each() {
    use http_body_util::BodyExt;
    let tree = Tree::new(&mapping(
        "m",
        "hostname: '*'\nprefix: /\nservice: 127.0.0.1:9",
    ));
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cret").unwrap();
    let secret_arg = secret.path().to_str().unwrap().to_string();
    let (_gw, admin) = legate_run(&tree, &["--webhook-secret-file", &secret_arg]);
    let status = format!("http://{admin}/api/status");
    let before = poll_json(&status, |s| s["applied"].is_string()).await["passes"]
        .as_u64()
        .unwrap();
    let body = br#"{"ref":"refs/heads/main"}"#;
    let sig = legate::admin::hooks::sign(b"s3cret", body);
    for _ in 0..20 {
        let req = http::Request::post(format!("http://{admin}/hooks/generic"))
            .header("x-legate-signature", &sig)
            .body(
                http_body_util::Full::new(bytes::Bytes::from_static(body))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    // One fetch at once, one at the end of the gap for the deliveries inside it.
    let after = poll_json(&status, |s| s["passes"].as_u64() >= Some(before + 2)).await["passes"]
        .as_u64()
        .unwrap();
    assert!(
        after < before + 5,
        "20 deliveries made {} passes",
        after - before
    );
}

#[test]
fn diff_points_out_a_new_stream_mapping_under_a_route_timeout() {
    let base = Tree::new(&mapping("plain", "hostname: '*'\nprefix: /p/\nservice: p"));
    let head = Tree::new(
        &[
            mapping("plain", "hostname: '*'\nprefix: /p/\nservice: p"),
            mapping(
                "grpc",
                "hostname: '*'\nprefix: /g/\nservice: g:50051\ngrpc: true",
            ),
        ]
        .concat(),
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args([
            "diff",
            base.path().to_str().unwrap(),
            head.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("covers the whole response"), "{err}");
    assert!(err.contains("timeout_ms: 0"), "{err}");
}
