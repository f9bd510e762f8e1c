//! Emissary's Listener and TCPMapping through the running gateway: ports a revision opens and
//! closes, a busy port rejecting a revision, security models, host binding, TCP proxying.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use legate::proxy::Settings;
use legate::reconcile::{self, Outcome, PassResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{compile, free_addr, get, host, make_secret, route, Gateway, Upstream};

/// A Listener document (Emissary's group: Legate has no Listener of its own).
fn listener(name: &str, ns: &str, port: u16, spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: Listener\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  port: {port}\n{spec}")
}

/// An HTTP Listener taking every Host.
fn http_listener(name: &str, port: u16, security: &str) -> String {
    listener(
        name,
        "default",
        port,
        &format!(
            "protocol: HTTP\nsecurityModel: {security}\nhostBinding:\n  namespace:\n    from: ALL"
        ),
    )
}

fn tcp_mapping(name: &str, port: u16, service: &str, extra: &str) -> String {
    let extra: String = extra
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: TCPMapping\nmetadata:\n  name: {name}\nspec:\n  port: {port}\n  service: {service}\n{extra}")
}

/// A Host that routes cleartext (`Route`), so only a Listener's security model redirects.
fn open_host(name: &str, hostname: &str) -> String {
    host(
        name,
        hostname,
        "requestPolicy:\n  insecure:\n    action: Route",
    )
}

fn port() -> u16 {
    free_addr().port()
}

fn at(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

/// Wait until connecting to `port` is refused (the listener is closed).
async fn until_refused(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("port {port} still accepts connections");
}

/// One HTTP/1.1 request on an open keep-alive connection; the status code.
async fn request_on(s: &mut TcpStream, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The upstream answers with a Content-Length body: read the head, then that many bytes.
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

async fn sync(h: &reconcile::Handle) -> reconcile::Entry {
    // The directory watch may have run the pass already: then its entry is in the history.
    match h.sync().await {
        PassResult::Recorded { entry } => *entry,
        PassResult::Unchanged { revision } => h
            .history()
            .into_iter()
            .find(|e| e.revision == revision)
            .unwrap_or_else(|| panic!("no entry for {revision}")),
        other => panic!("no revision recorded: {other:?}"),
    }
}

fn write(dir: &std::path::Path, yaml: &str) {
    std::fs::write(dir.join("config.yaml"), yaml).unwrap();
}

/// The gateway following a directory through the real reconciler.
async fn gateway_on_dir(
    dir: &std::path::Path,
    settings: Settings,
) -> (Gateway, reconcile::Running) {
    let gw = Gateway::with_graph(legate::routes::Graph::empty(), settings).await;
    let sink: Arc<dyn reconcile::GraphSink> = gw.proxy.clone();
    let running = reconcile::launch(
        reconcile::SourceSpec::Dir(dir.to_path_buf()),
        sink,
        crate::reconcile::settings(None),
        None,
    )
    .await
    .unwrap();
    (gw, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_opens_its_port_and_removing_it_closes_it_while_other_connections_go_on() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (port(), port());
    let base = [open_host("h", "x.test"), route("r", "/", &up.service(), "")].concat();
    write(
        dir.path(),
        &[base.as_str(), &http_listener("one", p1, "XFP")].concat(),
    );
    let (gw, running) = gateway_on_dir(dir.path(), Settings::default()).await;
    let h = running.handle.clone();
    let e = sync(&h).await;
    assert_eq!(e.outcome, Outcome::Applied, "{e:?}");

    // The Listener's port serves; the --http-listen flag's listener is closed (the revision
    // names its own listeners).
    let r = get(&at(p1, "/a"), &[("host", "x.test")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    until_refused(gw.http.port()).await;

    // A keep-alive connection on the first Listener.
    let mut kept = TcpStream::connect(("127.0.0.1", p1)).await.unwrap();
    assert_eq!(request_on(&mut kept, "/first").await, 200);

    // A second Listener opens; the first keeps its socket and its connections.
    write(
        dir.path(),
        &[
            base.as_str(),
            &http_listener("one", p1, "XFP"),
            &http_listener("two", p2, "XFP"),
        ]
        .concat(),
    );
    assert_eq!(sync(&h).await.outcome, Outcome::Applied);
    assert_eq!(get(&at(p2, "/b"), &[("host", "x.test")]).await.status, 200);
    assert_eq!(request_on(&mut kept, "/second").await, 200);

    // Removing the second closes its port; the kept connection on the first still works.
    write(
        dir.path(),
        &[base.as_str(), &http_listener("one", p1, "XFP")].concat(),
    );
    assert_eq!(sync(&h).await.outcome, Outcome::Applied);
    until_refused(p2).await;
    assert_eq!(request_on(&mut kept, "/third").await, 200);

    // Without any Listener the flags' listener is opened again, on the same address.
    write(dir.path(), &base);
    assert_eq!(sync(&h).await.outcome, Outcome::Applied);
    assert_eq!(get(&gw.url("/c"), &[("host", "x.test")]).await.status, 200);
    until_refused(p1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_cannot_be_bound_rejects_the_revision_and_the_last_good_one_serves() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let base = [open_host("h", "x.test"), route("r", "/", &up.service(), "")].concat();
    write(dir.path(), &base);
    let (gw, running) = gateway_on_dir(dir.path(), Settings::default()).await;
    let h = running.handle.clone();
    assert_eq!(sync(&h).await.outcome, Outcome::Applied);

    let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = busy.local_addr().unwrap().port();
    write(
        dir.path(),
        &[base.as_str(), &http_listener("busy", taken, "XFP")].concat(),
    );
    let e = sync(&h).await;
    assert_eq!(e.outcome, Outcome::Rejected, "{e:?}");
    let reason = e.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&format!("127.0.0.1:{taken}")) && reason.contains("Listener default/busy"),
        "{reason}"
    );
    assert!(
        e.diagnostics.iter().any(|d| d.code == "listener-bind"),
        "{:?}",
        e.diagnostics
    );
    // The flags' listener (the last good revision) still serves.
    assert_eq!(get(&gw.url("/a"), &[("host", "x.test")]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_models_decide_whether_a_request_is_secure() {
    let up = Upstream::start("up").await;
    let (xfp0, xfp1, secure, insecure) = (port(), port(), port(), port());
    // The Host keeps Emissary's default insecure action: Redirect.
    let yaml = [
        host("h", "x.test", ""),
        route("r", "/", &up.service(), ""),
        http_listener("xfp0", xfp0, "XFP"),
        listener(
            "xfp1",
            "default",
            xfp1,
            "protocol: HTTP\nsecurityModel: XFP\nl7Depth: 1\nhostBinding:\n  namespace:\n    from: ALL",
        ),
        http_listener("secure", secure, "SECURE"),
        http_listener("insecure", insecure, "INSECURE"),
    ]
    .concat();
    let _gw = Gateway::with_graph(compile(&yaml), Settings::default()).await;
    let https = [("host", "x.test"), ("x-forwarded-proto", "https")];
    let plain = [("host", "x.test")];
    // XFP without l7Depth: the client's X-Forwarded-Proto is not believed.
    assert_eq!(get(&at(xfp0, "/"), &https).await.status, 301);
    assert_eq!(get(&at(xfp0, "/"), &plain).await.status, 301);
    // XFP with l7Depth 1: the hop in front says https.
    assert_eq!(get(&at(xfp1, "/"), &https).await.status, 200);
    assert_eq!(get(&at(xfp1, "/"), &plain).await.status, 301);
    // SECURE always routes, INSECURE always redirects.
    assert_eq!(get(&at(secure, "/"), &plain).await.status, 200);
    assert_eq!(get(&at(insecure, "/"), &https).await.status, 301);

    // l7Depth is also the trusted X-Forwarded-For depth: the hop's entry is kept on xfp1 and
    // dropped on the SECURE listener (l7Depth 0).
    let xff = [
        ("host", "x.test"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "203.0.113.9"),
    ];
    let seen = get(&at(xfp1, "/"), &xff).await.seen("x-forwarded-for");
    assert_eq!(seen.as_deref(), Some("203.0.113.9, 127.0.0.1"));
    let seen = get(&at(secure, "/"), &xff).await.seen("x-forwarded-for");
    assert_eq!(seen.as_deref(), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_binding_by_namespace_and_selector() {
    let up = Upstream::start("up").await;
    let (own, labelled, none) = (port(), port(), port());
    let other_ns = open_host("b", "b.test").replace(
        "  name: b\n",
        "  name: b\n  namespace: other\n  labels:\n    team: b\n",
    );
    let yaml = [
        open_host("a", "a.test"),
        other_ns,
        route("r", "/", &up.service(), ""),
        // SELF: the Hosts of the Listener's namespace (default).
        listener(
            "own",
            "default",
            own,
            "protocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: SELF",
        ),
        // ALL namespaces, narrowed by labels.
        listener(
            "labelled",
            "default",
            labelled,
            "protocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL\n  selector:\n    matchLabels:\n      team: b",
        ),
        // Takes no Host: disabled, as in Emissary.
        listener(
            "none",
            "default",
            none,
            "protocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  selector:\n    matchLabels:\n      team: nobody",
        ),
    ]
    .concat();
    let graph = compile(&yaml);
    let _gw = Gateway::with_graph(graph.clone(), Settings::default()).await;
    assert_eq!(get(&at(own, "/"), &[("host", "a.test")]).await.status, 200);
    assert_eq!(get(&at(own, "/"), &[("host", "b.test")]).await.status, 404);
    assert_eq!(
        get(&at(labelled, "/"), &[("host", "b.test")]).await.status,
        200
    );
    assert_eq!(
        get(&at(labelled, "/"), &[("host", "a.test")]).await.status,
        404
    );
    assert!(graph.listener_on(none).is_none());
    // `legate routes` shows which Hosts each port serves.
    let table = legate::cli::output::route_table(&graph);
    assert!(
        table.contains(&format!(
            "port {own:<6} Http   Xfp       l7Depth=0 default/own"
        )),
        "{table}"
    );
    assert!(TcpStream::connect(("127.0.0.1", none)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_serves_the_hosts_certificates() {
    let up = Upstream::start("up").await;
    let secrets = tempfile::tempdir().unwrap();
    let ca = make_secret(secrets.path(), "a-tls", &["a.test"]);
    let p = port();
    let yaml = [
        host("a", "a.test", "tlsSecret:\n  name: a-tls"),
        route("r", "/", &up.service(), ""),
        listener(
            "tls",
            "default",
            p,
            "protocol: HTTPS\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL",
        ),
    ]
    .concat();
    let settings = Settings {
        secrets_dir: Some(secrets.path().to_path_buf()),
        ..Settings::default()
    };
    let _gw = Gateway::with_graph(compile(&yaml), settings).await;
    // The Host's certificate by SNI, and the request is secure (TLS), so it routes.
    let (ok, out, err) = crate::support::curl(&[
        "-s".into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("a.test:{p}:127.0.0.1"),
        "-H".into(),
        "host: a.test".into(),
        format!("https://a.test:{p}/x"),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "200", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_on_the_flags_ports_reuse_their_sockets_in_the_real_binary() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (http, https, admin) = (free_addr(), free_addr(), free_addr());
    // Emissary's usual pair: the same ports as the listen flags.
    let yaml = [
        open_host("h", "x.test"),
        route("r", "/", &up.service(), ""),
        http_listener("http", http.port(), "XFP"),
        listener(
            "https",
            "default",
            https.port(),
            "protocol: HTTPS\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL",
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let _gw = legate_run(
        dir.path(),
        &[
            "--http-listen",
            &http.to_string(),
            "--https-listen",
            &https.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ],
    );
    let mut status = 0;
    for _ in 0..400 {
        if TcpStream::connect(http).await.is_ok() {
            status = get(&format!("http://{http}/a"), &[("host", "x.test")])
                .await
                .status
                .as_u16();
            if status == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 200, "the Listener on the --http-listen port serves");
}

/// `legate run --dir <dir>` with no verification window or access log, and `args`.
fn legate_run(dir: &std::path::Path, args: &[&str]) -> crate::support::Killed {
    crate::support::Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(dir)
            .args(["--verify-window", "0", "--access-log", "off"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A TCP echo server: every connection gets back what it sends.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_mapping_proxies_its_port_and_its_connections_survive_the_reload_that_removes_it() {
    let echo = echo().await;
    let p = port();
    let up = Upstream::start("up").await;
    let http = [open_host("h", "x.test"), route("r", "/", &up.service(), "")].concat();
    let yaml = [
        http.as_str(),
        &tcp_mapping("echo", p, &echo.to_string(), ""),
    ]
    .concat();
    let gw = Gateway::with_graph(compile(&yaml), Settings::default()).await;
    let mut s = TcpStream::connect(("127.0.0.1", p)).await.unwrap();
    echoes(&mut s, b"hello").await;
    // HTTP goes on on the flags' listener: a TCPMapping's port is not a Listener of its own.
    assert_eq!(get(&gw.url("/"), &[("host", "x.test")]).await.status, 200);

    gw.proxy.swap(compile(&http));
    until_refused(p).await;
    echoes(&mut s, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_mapping_closes_a_connection_idle_for_its_idle_timeout() {
    let echo = echo().await;
    let p = port();
    let yaml = tcp_mapping("echo", p, &echo.to_string(), "idle_timeout_ms: 200");
    let _gw = Gateway::with_graph(compile(&yaml), Settings::default()).await;
    let mut s = TcpStream::connect(("127.0.0.1", p)).await.unwrap();
    echoes(&mut s, b"hello").await;
    // Nothing more is sent: the gateway closes the connection (the read sees its end).
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// A TLS client trusting `ca`, connecting to `port` with SNI `name`.
async fn tls_connect(
    port: u16,
    name: &str,
    ca: &std::path::Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mappings_route_tls_by_sni_terminating_with_a_hosts_certificate_or_passing_through() {
    let secrets = tempfile::tempdir().unwrap();
    let gw_cert = make_secret(secrets.path(), "a-tls", &["a.test"]);
    let up_cert = make_secret(secrets.path(), "b-upstream", &["b.test"]);
    // b.test's upstream speaks TLS itself (passthrough); a.test's is a plain echo (terminated).
    let plain_echo = echo().await;
    let tls_up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_up.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(crate::support::server_tls(
        &secrets.path().join("b-upstream"),
    )));
    tokio::spawn(async move {
        while let Ok((s, _)) = tls_up.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    let p = port();
    let yaml = [
        host("a", "a.test", "tlsSecret:\n  name: a-tls"),
        tcp_mapping("a", p, &plain_echo.to_string(), "host: a.test"),
        tcp_mapping("b", p, &tls_addr.to_string(), "host: b.test"),
    ]
    .concat();
    let graph = compile(&yaml);
    let settings = Settings {
        secrets_dir: Some(secrets.path().to_path_buf()),
        ..Settings::default()
    };
    let _gw = Gateway::with_graph(graph, settings).await;
    // Terminated: the gateway's certificate for a.test, cleartext to the echo.
    let mut a = tls_connect(p, "a.test", &gw_cert).await;
    echoes(&mut a, b"to a").await;
    // Passed through: the upstream's own certificate for b.test, end to end.
    let mut b = tls_connect(p, "b.test", &up_cert).await;
    echoes(&mut b, b"to b").await;
}

/// `legate run`'s first revision asks for a port something else holds: it is rejected with
/// `listener-bind` like a later revision (the admin API and `legate status` say so, /readyz
/// stays 503) while the flags' listener answers; once the port is free a resync applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_revision_whose_port_cannot_be_bound_is_rejected_in_the_real_binary() {
    use crate::support::eventually_async;
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().port();
    let (http, admin) = (free_addr(), free_addr());
    let yaml = [
        open_host("h", "x.test"),
        route("r", "/", &up.service(), ""),
        http_listener("busy", taken, "XFP"),
    ]
    .concat();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let _gw = legate_run(
        dir.path(),
        &[
            "--poll",
            "1s",
            "--http-listen",
            &http.to_string(),
            "--https-listen",
            "off",
            "--admin-listen",
            &admin.to_string(),
        ],
    );
    let status_url = format!("http://{admin}/api/status");
    let rejected = |v: &serde_json::Value| {
        v["last_attempt"]["outcome"] == "Rejected"
            && v["last_attempt"]["diagnostics"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["code"] == "listener-bind"))
    };
    eventually_async("the first revision rejected with listener-bind", || async {
        TcpStream::connect(admin).await.is_ok() && rejected(&get(&status_url, &[]).await.json())
    })
    .await;
    let status = get(&status_url, &[]).await.json();
    assert!(status["applied"].is_null(), "{status}");
    assert_eq!(
        get(&format!("http://{admin}/readyz"), &[]).await.status,
        503,
        "not ready: no graph serves"
    );
    // The flags' listener is open (nothing routes yet).
    assert_eq!(
        get(&at(http.port(), "/a"), &[("host", "x.test")])
            .await
            .status,
        404
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["status", "--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "cannot listen on 127.0.0.1:{taken} for Listener default/busy"
        )),
        "{text}"
    );

    // The port freed, the next resync applies the revision on it.
    drop(busy);
    eventually_async("the revision applied once the port is free", || async {
        TcpStream::connect(("127.0.0.1", taken)).await.is_ok()
            && get(&at(taken, "/a"), &[("host", "x.test")]).await.status == 200
    })
    .await;
    assert_eq!(
        get(&format!("http://{admin}/readyz"), &[]).await.status,
        200
    );
}
