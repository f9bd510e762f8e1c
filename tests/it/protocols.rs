//! Protocols through the gateway with real peers (issue 5): gRPC with the grpcio C-core client
//! and server (unary, the three streaming kinds, trailers, deadlines, unavailable upstreams), and
//! WebSocket connections that stay open across graph swaps.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::support::ws::{self, EchoServer};
use crate::support::*;

const PIP: &str = "python3 -m pip install grpcio==1.84.0";

fn grpc_peer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/grpc_peer.py")
}

/// Whether grpcio is importable. Without it the test fails under CI (`CI` set) and is skipped
/// with a note otherwise.
fn have_grpcio(test: &str) -> bool {
    let ok = Command::new("python3")
        .arg(grpc_peer())
        .arg("check")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        crate::support::tool_missing(test, &format!("python3 grpcio is not installed ({PIP})"));
    }
    ok
}

/// The grpcio server (`grpc_peer.py serve`): its port; it exits when dropped.
fn grpc_server() -> (Killed, u16) {
    let mut child = Command::new("python3")
        .arg(grpc_peer())
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let out = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    let port = line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("grpc_peer.py serve printed {line:?}"));
    (child, port)
}

/// Every client scenario of `grpc_peer.py client` against `target`, as JSON.
async fn grpc_client(target: String) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(grpc_peer())
            .args(["client", &target])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "grpc_peer.py client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "grpc_peer.py client printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_real_client_and_server_stream_trailers_and_errors() {
    if !have_grpcio("grpc_real_client_and_server_stream_trailers_and_errors") {
        return;
    }
    let (_server, port) = tokio::task::spawn_blocking(grpc_server).await.unwrap();
    let dead = free_addr();
    let yaml = mapping(
        "echo",
        &format!("hostname: '*'\nprefix: /legate.test.Echo/\nrewrite: ''\nservice: 127.0.0.1:{port}\ngrpc: true"),
    ) + &mapping(
        "timeout",
        &format!(
            "hostname: '*'\nprefix: /legate.test.Timeout/\nrewrite: /legate.test.Echo/\n\
             service: 127.0.0.1:{port}\ngrpc: true\ntimeout_ms: 300"
        ),
    ) + &route("dead", "/legate.test.Dead/", &dead.to_string(), "grpc: true");
    let gw = Gateway::start(&yaml).await;
    let r = grpc_client(gw.http.to_string()).await;

    let unary = &r["unary"];
    assert_eq!(unary["code"], "OK", "{r}");
    assert_eq!(unary["resp"], "echo:hello");
    assert_eq!(
        unary["initial"]["x-initial"], "i",
        "initial metadata: {unary}"
    );
    assert_eq!(
        unary["trailing"]["x-trailer"], "t-value",
        "trailers: {unary}"
    );
    assert_eq!(
        unary["trailing"]["x-bin-bin"], "0001ff",
        "binary trailer: {unary}"
    );

    // grpc-status, the percent-encoded grpc-message and custom trailers of a failed call.
    let fail = &r["fail"];
    assert_eq!(fail["code"], "INVALID_ARGUMENT", "{fail}");
    assert_eq!(fail["details"], "bad request: caf\u{e9} 50%");
    assert_eq!(fail["trailing"]["x-why"], "because");

    assert_eq!(r["server_stream"]["code"], "OK", "{r}");
    assert_eq!(
        r["server_stream"]["msgs"],
        serde_json::json!(["first", "msg-1", "msg-2", "msg-3"])
    );
    assert_eq!(r["client_stream"]["resp"], "4:a,b,c,d", "{r}");
    assert_eq!(r["bidi"]["code"], "OK", "{r}");
    assert_eq!(
        r["bidi"]["msgs"],
        serde_json::json!(["echo:m0", "echo:m1", "echo:m2", "echo:m3", "echo:m4"])
    );

    // The client's own deadline (grpc-timeout): DEADLINE_EXCEEDED, and the cancellation reaches
    // the upstream instead of leaving the call running there.
    assert_eq!(r["client_deadline"]["code"], "DEADLINE_EXCEEDED", "{r}");
    assert_eq!(r["stats"], "cancelled=1", "upstream saw the cancellation");
    // The Mapping's timeout_ms: the gateway answers DEADLINE_EXCEEDED itself.
    assert_eq!(r["route_timeout"]["code"], "DEADLINE_EXCEEDED", "{r}");
    assert_eq!(r["route_timeout"]["details"], "upstream timeout");
    assert_eq!(r["unavailable"]["code"], "UNAVAILABLE", "{r}");
    assert_eq!(r["unavailable"]["details"], "upstream unavailable");
}

/// A WebSocket route to `service` under `/ws/`, named `name`, with extra spec lines.
fn ws_route(name: &str, service: &str, extra: &str) -> String {
    mapping(
        name,
        &format!("hostname: '*'\nprefix: /ws/\nservice: {service}\n{extra}"),
    )
}

fn other_route(up: &Upstream) -> String {
    route("other", "/other/", &up.service(), "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_stays_open_across_graph_swaps() {
    let (a, b) = (EchoServer::start("a").await, EchoServer::start("b").await);
    let plain = Upstream::start("plain").await;
    let gw = Gateway::start(&ws_route("ws", &a.service(), "allow_upgrade: [websocket]")).await;
    let mut first = ws::Client::connect(gw.http, "t", "/ws/chat").await.unwrap();
    assert!(first.head.contains("upgrade: websocket"), "{}", first.head);
    assert_eq!(first.echo("1").await, "a:1");

    // Weights moved to b and another route added: the open connection stays on a.
    let split = ws_route("ws-a", &a.service(), "use_websocket: true\nweight: 0")
        + &ws_route("ws-b", &b.service(), "use_websocket: true\nweight: 100")
        + &other_route(&plain);
    gw.proxy.swap(compile(&split));
    assert_eq!(first.echo("2").await, "a:2");
    // Server-initiated frames keep flowing too.
    assert_eq!(first.echo("tick").await, "a:tick");
    assert_eq!(first.recv().await.unwrap(), (ws::TEXT, b"a:tick".to_vec()));
    // A new upgrade follows the new graph.
    let mut second = ws::Client::connect(gw.http, "t", "/ws/chat").await.unwrap();
    assert_eq!(second.echo("x").await, "b:x");
    assert_eq!(get(&gw.url("/other/"), &[]).await.status, 200);

    // The Mapping removed entirely: both open connections keep working, new upgrades get 404.
    gw.proxy.swap(compile(&other_route(&plain)));
    assert_eq!(first.echo("3").await, "a:3");
    assert_eq!(second.echo("y").await, "b:y");
    let big = vec![7u8; 70_000];
    first.send(ws::BINARY, &big).await.unwrap();
    assert_eq!(first.recv().await.unwrap(), (ws::BINARY, big));
    let refused = ws::Client::connect(gw.http, "t", "/ws/chat").await.err();
    let refused = refused.expect("no route for a new upgrade");
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");

    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_needs_allow_upgrade_or_use_websocket() {
    let up = EchoServer::start("e").await;
    let yaml = route("uw", "/uw/", &up.service(), "use_websocket: true")
        + &route("plain", "/plain/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    let mut c = ws::Client::connect(gw.http, "t", "/uw/").await.unwrap();
    assert_eq!(c.echo("hi").await, "e:hi");
    c.close().await.unwrap();

    // Without allow_upgrade the gateway refuses the WebSocket itself (403, as Envoy), never a
    // 101, and the upstream never sees the request.
    let before = up.hits();
    let refused = ws::Client::connect(gw.http, "t", "/plain/").await.err();
    let refused = refused.expect("no upgrade without allow_upgrade");
    assert!(
        refused.starts_with("HTTP/1.1 403"),
        "not refused: {refused}"
    );
    assert_eq!(up.hits(), before, "a refused upgrade reached the upstream");
}

/// Poll (bounded) until a new WebSocket to `/ws/` gets `want` (an echo prefix, or a status line
/// start for a refusal): the sign that the binary applied the new revision.
async fn until_new_upgrades(http: std::net::SocketAddr, want: &str) {
    let mut last = String::new();
    for _ in 0..300 {
        last = match ws::Client::connect(http, "t", "/ws/").await {
            Ok(mut c) => c.echo("probe").await,
            Err(head) => head,
        };
        if last.starts_with(want) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("new upgrades never got {want:?}; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_stays_open_across_revisions_of_the_binary() {
    let (a, b) = (EchoServer::start("a").await, EchoServer::start("b").await);
    let http = free_addr();
    let tree = Tree::new(&ws_route("ws", &a.service(), "use_websocket: true"));
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(tree.path())
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", "off", "--verify-window", "0"])
            .args(["--access-log", "off"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until_new_upgrades(http, "a:").await;
    let mut open = ws::Client::connect(http, "t", "/ws/").await.unwrap();
    assert_eq!(open.echo("1").await, "a:1");

    // A new revision sends the route to b: the open connection stays on a.
    let config = tree.path().join("config.yaml");
    std::fs::write(&config, ws_route("ws", &b.service(), "use_websocket: true")).unwrap();
    until_new_upgrades(http, "b:").await;
    assert_eq!(open.echo("2").await, "a:2");

    // A revision without the Mapping: new upgrades find no route, the open one still echoes.
    let other = mapping(
        "other",
        "hostname: '*'\nprefix: /other/\nservice: 127.0.0.1:9",
    );
    std::fs::write(&config, other).unwrap();
    until_new_upgrades(http, "HTTP/1.1 404").await;
    assert_eq!(open.echo("3").await, "a:3");
    open.close().await.unwrap();
}

/// An upgraded connection is still a client connection: it holds its `--max-connections` slot
/// (and its place in the open-connections count) until the tunnel ends, not only until the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_hold_their_connection_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = EchoServer::start("e").await;
    let mut settings = legate::proxy::Settings::default();
    settings.limits.max_connections = 1;
    let gw = Gateway::with(
        &ws_route("ws", &up.service(), "allow_upgrade: [websocket]"),
        settings,
    )
    .await;
    let mut c = ws::Client::connect(gw.http, "t", "/ws/").await.unwrap();
    assert_eq!(c.echo("one").await, "e:one");
    assert_eq!(gw.running().open_connections(), 1);
    // The one slot is the tunnel's: another connection is closed without an answer.
    async fn served(http: std::net::SocketAddr) -> bool {
        let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
            return false;
        };
        if s.write_all(b"GET /ws/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut b = [0u8; 9];
        s.read_exact(&mut b).await.is_ok() && &b == b"HTTP/1.1 "
    }
    assert!(!served(gw.http).await, "a second connection was served");
    assert_eq!(c.echo("two").await, "e:two");
    c.close().await.unwrap();
    // Once the tunnel ends the slot frees up (polled: the close travels through two sockets).
    let mut freed = false;
    for _ in 0..200 {
        if served(gw.http).await {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "the tunnel's slot never came back");
}

/// A tunnel that passes no bytes either way for the Mapping's `idle_timeout_ms` is closed by
/// the gateway; traffic in either direction keeps it open past that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_close_after_the_mappings_idle_timeout() {
    let up = EchoServer::start("e").await;
    let gw = Gateway::start(&ws_route(
        "ws",
        &up.service(),
        "allow_upgrade: [websocket]\nidle_timeout_ms: 400",
    ))
    .await;
    let mut c = ws::Client::connect(gw.http, "t", "/ws/").await.unwrap();
    // A message every 150 ms: open for 900 ms, more than twice the idle limit.
    for i in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(c.echo(&format!("m{i}")).await, format!("e:m{i}"));
    }
    // Then silence: the gateway ends the tunnel, and the client's next read ends with it.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), c.recv()).await;
    let ended = ended.expect("the idle tunnel was never closed");
    assert!(ended.is_err(), "a frame instead of the end: {ended:?}");
    // The route still takes new upgrades.
    let mut again = ws::Client::connect(gw.http, "t", "/ws/").await.unwrap();
    assert_eq!(again.echo("back").await, "e:back");
}
