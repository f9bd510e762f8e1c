//! The proxy end to end: the real gateway on 127.0.0.1:0, real upstreams, real clients (hyper,
//! raw TCP, curl). Each routing rule and action, rewrites, redirects, headers, errors, TLS/SNI,
//! HTTP/2, limits at their value and one past, streaming, reload under load, shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use legate::proxy::{Limits, Settings};

use crate::support::*;

fn settings_with(f: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings::default();
    f(&mut s);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_exact_regex_and_no_route() {
    let up = Upstream::start("a").await;
    let svc = up.service();
    let yaml = [
        route("pre", "/pre/", &svc, ""),
        route("exact", "/exact", &svc, "prefix_exact: true\nrewrite: /was-exact"),
        route(
            "rx",
            "'/api/v[0-9]+/items/.*'",
            &svc,
            "prefix_regex: true\nregex_rewrite:\n  pattern: '^/api/v([0-9]+)/items/(.*)$'\n  substitution: '/items/\\2/v\\1'",
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;

    // (request path, status, the path the upstream saw)
    let cases = [
        // Prefix with the default rewrite "/": the matched prefix is replaced.
        ("/pre/a/b?x=1", 200, Some("/a/b")),
        // Exact: only the exact path; the whole path is the matched part of the rewrite.
        ("/exact", 200, Some("/was-exact")),
        ("/exact/more", 404, None),
        // Regex: the whole path must match; regex_rewrite with capture groups.
        ("/api/v2/items/abc", 200, Some("/items/abc/v2")),
        ("/api/vX/items/abc", 404, None),
    ];
    for (path, status, seen) in cases {
        let r = get(&gw.url(path), &[]).await;
        assert_eq!(r.status, status, "{path}");
        if let Some(seen) = seen {
            assert_eq!(r.json()["path"], seen, "{path}");
        }
    }
    assert_eq!(
        get(&gw.url("/pre/a/b?x=1"), &[]).await.json()["query"],
        "x=1"
    );

    // No route: 404 with a short body.
    let r = get(&gw.url("/nothing/here"), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "no route\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_is_normalized_once_and_forwarded_normalized() {
    let up = Upstream::start("a").await;
    let yaml = route("keep", "/app/", &up.service(), "rewrite: ''");
    let gw = Gateway::start(&yaml).await;
    let resp = raw(
        gw.http,
        b"GET /x/../app//a/./b%2e%2e/%2e%2E/c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Dot segments (encoded too) removed; duplicate slashes kept (no `merge_slashes`).
    assert!(resp.contains(r#""path":"/app//a/c""#), "{resp}");
    // Encoded slashes are refused unless the Mapping opts in (tests/it/edge.rs has the table).
    let resp = raw(
        gw.http,
        b"GET /app/b%2F..%2Fc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_query_method_case_and_precedence() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (sa, sb) = (a.service(), b.service());
    let yaml = [
        route("base", "/r/", &sa, ""),
        route("hdr", "/r/", &sb, "headers:\n  x-v: two"),
        route(
            "rxhdr",
            "/r/",
            &sb,
            "regex_headers:\n  x-tier: '^(gold|platinum)$'",
        ),
        route("q", "/q/", &sb, "query_parameters:\n  mode: preview"),
        route("qbase", "/q/", &sa, ""),
        route("post", "/m/", &sb, "method: POST"),
        route("mbase", "/m/", &sa, ""),
        route("ci", "/CaSe/", &sb, "case_sensitive: false"),
        route("cs", "/Strict/", &sb, ""),
        route("long", "/p/long/", &sa, ""),
        route("prec", "/p/", &sb, "precedence: 10"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;

    // (method, path, headers, the upstream that answers; None: no route, 404)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case; 15] = [
        ("GET", "/r/x", &[], Some("a")),
        ("GET", "/r/x", &[("x-v", "two")], Some("b")),
        ("GET", "/r/x", &[("x-v", "three")], Some("a")),
        ("GET", "/r/x", &[("x-tier", "gold")], Some("b")),
        ("GET", "/r/x", &[("x-tier", "golden")], Some("a")),
        ("GET", "/q/x?mode=preview", &[], Some("b")),
        ("GET", "/q/x?a=1&mode=preview", &[], Some("b")),
        ("GET", "/q/x?mode=live", &[], Some("a")),
        ("POST", "/m/x", &[], Some("b")),
        ("GET", "/m/x", &[], Some("a")),
        ("GET", "/case/x", &[], Some("b")),
        ("GET", "/CASE/x", &[], Some("b")),
        ("GET", "/Strict/x", &[], Some("b")),
        ("GET", "/strict/x", &[], None),
        // Higher precedence wins over a longer prefix.
        ("GET", "/p/long/x", &[], Some("b")),
    ];
    for (method, path, headers, want) in cases {
        let r = send(method, &gw.url(path), headers, empty()).await;
        match want {
            Some(up) => assert_eq!(r.json()["upstream"], up, "{method} {path} {headers:?}"),
            None => assert_eq!(r.status, 404, "{method} {path} {headers:?}"),
        }
    }
}

/// Issue #14 changed this test: an authority that matches no Host is 404 (Emissary has no
/// "hostname fallback" once a Host exists), and the port is part of the match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_association_and_unknown_authorities() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (sa, sb) = (a.service(), b.service());
    let yaml = [
        host(
            "shop",
            "shop.test",
            "requestPolicy:\n  insecure:\n    action: Route",
        ),
        // Labelled, no hostname: served only through the Host that selects it.
        mapping("labelled", &format!("prefix: /l/\nservice: {sa}")),
        // Own hostname, but no Host for it: not served.
        mapping(
            "byname",
            &format!("hostname: '*.fallback.test'\nprefix: /f/\nservice: {sb}"),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let r = get(&gw.url("/l/x"), &[("host", "shop.test")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["upstream"], "a");
    // Authority case does not matter; a port does (no strip_matching_host_port).
    assert_eq!(
        get(&gw.url("/l/x"), &[("host", "SHOP.test")]).await.status,
        200
    );
    assert_eq!(
        get(&gw.url("/l/x"), &[("host", "shop.test:8080")])
            .await
            .status,
        404
    );
    // Unknown authority: nothing is served, whatever the Mappings' own hostnames.
    assert_eq!(
        get(&gw.url("/l/x"), &[("host", "other.test")]).await.status,
        404
    );
    assert_eq!(
        get(&gw.url("/f/x"), &[("host", "a.fallback.test")])
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_host_header() {
    let up = Upstream::start("a").await;
    let svc = up.service();
    let yaml = [
        route("keep", "/keep/", &svc, "rewrite: ''"),
        route("pre", "/pre/", &svc, "rewrite: /new/"),
        route("hr", "/hr/", &svc, "host_rewrite: internal.test"),
        route("auto", "/auto/", &svc, "auto_host_rewrite: true"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let r = get(&gw.url("/keep/a"), &[("host", "front.test")]).await;
    assert_eq!(r.json()["path"], "/keep/a");
    // Default: the client's Host is preserved.
    assert_eq!(r.seen("host").as_deref(), Some("front.test"));
    assert_eq!(
        get(&gw.url("/pre/a/b"), &[]).await.json()["path"],
        "/new/a/b"
    );
    let r = get(&gw.url("/hr/a"), &[("host", "front.test")]).await;
    assert_eq!(r.seen("host").as_deref(), Some("internal.test"));
    assert_eq!(r.seen("x-forwarded-host").as_deref(), Some("front.test"));
    let r = get(&gw.url("/auto/a"), &[("host", "front.test")]).await;
    assert_eq!(r.seen("host"), Some(svc.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects() {
    let redirect = |name: &str, prefix: &str, to: &str, extra: &str| {
        route(name, prefix, to, &format!("host_redirect: true\n{extra}"))
    };
    let yaml = [
        redirect("path", "/old/", "docs.test", "path_redirect: /docs/\nredirect_response_code: 301"),
        redirect("prefix", "/blog/", "www.test", "prefix_redirect: /news/\nredirect_response_code: 302"),
        redirect(
            "rx",
            "/rx/",
            "www.test",
            "regex_redirect:\n  pattern: '^/rx/([a-z]+)/(.*)$'\n  substitution: '/\\2/\\1'\nredirect_response_code: 307",
        ),
        redirect("hostonly", "/moved/", "elsewhere.test", ""),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    // (request path, status, Location)
    let cases = [
        ("/old/page", 301, "http://docs.test/docs/"),
        (
            "/blog/2024/post?q=1",
            302,
            "http://www.test/news/2024/post?q=1",
        ),
        ("/rx/abc/def", 307, "http://www.test/def/abc"),
        ("/moved/x", 301, "http://elsewhere.test/moved/x"),
    ];
    for (path, status, location) in cases {
        let r = get(&gw.url(path), &[]).await;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(r.header("location"), Some(location), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_add_and_remove_both_ways() {
    let up = Upstream::start("a").await;
    let yaml = route("h", "/h/", &up.service(), "add_request_headers:\n  x-added: one\n  x-replaced:\n    value: mine\n    append: false\n  x-appended:\n    value: two\n    append: true\nremove_request_headers:\n- cookie\nadd_response_headers:\n  x-resp: yes\nremove_response_headers:\n- server");
    let gw = Gateway::start(&yaml).await;
    let r = get(
        &gw.url("/h/"),
        &[
            ("x-replaced", "client"),
            ("x-appended", "one"),
            ("cookie", "secret=1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["headers"]["x-added"], serde_json::json!(["one"]));
    assert_eq!(j["headers"]["x-replaced"], serde_json::json!(["mine"]));
    assert_eq!(
        j["headers"]["x-appended"],
        serde_json::json!(["one", "two"])
    );
    assert!(j["headers"]["cookie"].is_null());
    assert_eq!(r.header("x-resp"), Some("yes"));
    assert_eq!(r.header("server"), None);
    assert_eq!(r.header("x-upstream"), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stripped_both_ways() {
    let up = Upstream::start("a").await;
    let yaml = route("h", "/h/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    let resp = raw(
        gw.http,
        b"GET /h/?hop=1 HTTP/1.1\r\nHost: t\r\nConnection: close, x-listed\r\nx-listed: 1\r\nKeep-Alive: timeout=1\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: h2c\r\nx-normal: 1\r\n\r\n",
    )
    .await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = body.trim();
    // The upstream saw none of the hop-by-hop request headers, but the end-to-end one.
    let body_json = body
        .find('{')
        .map(|i| &body[i..body.rfind('}').unwrap() + 1])
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(body_json).unwrap();
    for h in [
        "x-listed",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(j["headers"][h].is_null(), "{h} reached the upstream: {j}");
    }
    assert_eq!(j["headers"]["x-normal"], serde_json::json!(["1"]));
    // And the client got none of the upstream's hop-by-hop response headers.
    let head = head.to_ascii_lowercase();
    for h in [
        "x-hop-listed",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !head.contains(&format!("\n{h}:")),
            "{h} reached the client: {head}"
        );
    }
    assert!(head.contains("\nx-upstream: a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id() {
    let up = Upstream::start("a").await;
    let yaml = route("h", "/h/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    // A client-sent X-Forwarded-For is replaced when no hop is trusted.
    let r = get(
        &gw.url("/h/"),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("host", "front.test"),
        ],
    )
    .await;
    assert_eq!(r.seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(r.seen("x-forwarded-host").as_deref(), Some("front.test"));
    let id = r.seen("x-request-id").unwrap();
    assert_eq!(id.len(), 36, "{id}");
    let r2 = get(&gw.url("/h/"), &[]).await;
    assert_ne!(
        r2.seen("x-request-id").unwrap(),
        id,
        "ids are fresh per request"
    );
    // A client's request id is kept.
    let r = get(&gw.url("/h/"), &[("x-request-id", "abc-123")]).await;
    assert_eq!(r.seen("x-request-id").as_deref(), Some("abc-123"));

    // With one trusted hop, the last entry the trusted proxy appended is kept.
    let gw = Gateway::with(&yaml, settings_with(|s| s.xff_trusted_hops = 1)).await;
    let r = get(&gw.url("/h/"), &[("x-forwarded-for", "6.6.6.6, 10.1.2.3")]).await;
    assert_eq!(
        r.seen("x-forwarded-for").as_deref(),
        Some("10.1.2.3, 127.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_headers_name_route_and_revision() {
    let up = Upstream::start("a").await;
    let yaml = route("dbg", "/d/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    assert_eq!(
        get(&gw.url("/d/"), &[]).await.header("x-legate-route"),
        None
    );
    let gw = Gateway::with(&yaml, settings_with(|s| s.debug_headers = true)).await;
    let r = get(&gw.url("/d/"), &[]).await;
    assert_eq!(r.header("x-legate-route"), Some("default/dbg"));
    let rev = r.header("x-legate-revision").unwrap();
    assert!(gw.proxy.graph().hash.starts_with(rev) && !rev.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_504_dead_upstream_502_and_weights() {
    let up = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // A port with nothing listening: bind, note the port, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = [
        route("slow", "/slow/", &up.service(), "timeout_ms: 200"),
        route("dead", "/dead/", &dead.to_string(), ""),
        route("w1", "/w/", &up.service(), "weight: 50"),
        route("w2", "/w/", &b.service(), "weight: 50"),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let r = get(&gw.url("/slow/?sleep_ms=2000"), &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body, "upstream timeout\n");
    assert_eq!(get(&gw.url("/slow/?sleep_ms=10"), &[]).await.status, 200);
    let r = get(&gw.url("/dead/"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.body, "upstream unavailable\n", "no internals leak");

    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let r = get(&gw.url("/w/"), &[]).await;
        seen.insert(r.json()["upstream"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "a 50/50 split reaches both members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_http2_insecure_policy_and_rotation() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let ca_one = make_secret(secrets.path(), "one-tls", &["one.test"]);
    let ca_two = make_secret(secrets.path(), "two-tls", &["two.test"]);
    let ca_dflt = make_secret(secrets.path(), "fallback-tls", &["fallback.test"]);
    let yaml = [
        host("one", "one.test", "tlsSecret:\n  name: one-tls"),
        host(
            "two",
            "two.test",
            "tlsSecret:\n  name: two-tls\nrequestPolicy:\n  insecure:\n    action: Reject",
        ),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let dir = secrets.path().to_path_buf();
    // The clients name the listener's port in the authority: strip it, as Emissary's Module
    // `strip_matching_host_port` does (the port is otherwise part of the Host match).
    let strip = legate::routes::RoutingOptions {
        strip_matching_host_port: true,
        ..Default::default()
    };
    let gw = Gateway::with_graph(
        compile_with(&yaml, strip),
        settings_with(|s| {
            s.secrets_dir = Some(dir.clone());
            s.https_redirect_port = 8443;
        }),
    )
    .await;
    let port = gw.https.port();
    let tls_get = |name: &str, ca: &std::path::Path, extra: &[&str]| {
        let mut a = vec![
            "-i".to_string(),
            "--cacert".into(),
            ca.display().to_string(),
            "--resolve".into(),
            format!("{name}:{port}:127.0.0.1"),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(format!("https://{name}:{port}/s/x"));
        a
    };
    // SNI picks the certificate: each is only valid for its own name, and curl verifies it.
    let (ok, out, err) = curl(&tls_get("one.test", &ca_one, &["--http2"])).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains(r#""x-forwarded-proto":["https"]"#), "{out}");
    let (ok, out, err) = curl(&tls_get("two.test", &ca_two, &["--http1.1"])).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The other Host's certificate does not verify for this name.
    let (ok, _, _) = curl(&tls_get("one.test", &ca_two, &[])).await;
    assert!(!ok);
    // Unknown SNI, no default certificate: the handshake fails.
    let (ok, _, err) = curl(&tls_get("nobody.test", &ca_one, &["-k"])).await;
    assert!(!ok, "handshake should fail: {err}");

    // Insecure policy on the plain listener: Redirect (default for TLS Hosts) and Reject.
    let r = get(&gw.url("/s/x?q=1"), &[("host", "one.test")]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://one.test:8443/s/x?q=1"));
    // Reject leaves the route out, as in Emissary: 404.
    let r = get(&gw.url("/s/x"), &[("host", "two.test")]).await;
    assert_eq!(r.status, 404);

    // A rotated Secret is served after a refresh, without a new graph or a rebind.
    make_secret(secrets.path(), "one-tls", &["one.test"]);
    let new_ca = secrets.path().join("one-tls/tls.crt");
    let rotated = std::fs::read(&new_ca).unwrap();
    let (ok, _, _) = curl(&tls_get("one.test", &new_ca, &[])).await;
    assert!(!ok, "old certificate still served before refresh");
    assert!(gw.proxy.refresh_certs());
    let (ok, out, err) = curl(&tls_get("one.test", &new_ca, &[])).await;
    assert!(ok, "{err}");
    assert!(out.contains(" 200"), "{out}");
    assert_eq!(std::fs::read(&new_ca).unwrap(), rotated);
    drop(ca_one);

    // A default certificate for unknown SNI.
    let gw2 = Gateway::with(
        &yaml,
        settings_with(|s| {
            s.secrets_dir = Some(dir.clone());
            s.default_cert = Some("fallback-tls".into());
        }),
    )
    .await;
    let port2 = gw2.https.port();
    let (ok, _, err) = curl(&[
        "--cacert".into(),
        ca_dflt.display().to_string(),
        "--resolve".into(),
        format!("fallback.test:{port2}:127.0.0.1"),
        format!("https://fallback.test:{port2}/s/x"),
    ])
    .await;
    assert!(ok, "default certificate served: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_upgrade_attempt() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/s/", &up.service(), "");
    let gw = Gateway::start(&yaml).await;
    let (ok, out, err) = curl(&[
        "-i".into(),
        "--http2-prior-knowledge".into(),
        gw.url("/s/x"),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    // The upstream is spoken to over HTTP/1.1 whatever the client used.
    assert!(out.contains(r#""version":"HTTP/1.1""#), "{out}");
    // `Upgrade: h2c` (curl --http2 on http://) is ignored: the answer comes over HTTP/1.1.
    let (ok, out, err) = curl(&["-i".into(), "--http2".into(), gw.url("/s/x")]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// 200 MiB up and 200 MiB down through the real binary, which must stream rather than buffer:
/// its own peak RSS (VmHWM of the gateway process alone, not of this test binary, where other
/// tests run beside it) grows by far less than one body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    const N: u64 = 200 * 1024 * 1024;
    let up = Upstream::start("a").await;
    let yaml = route("big", "/big/", &up.service(), "timeout_ms: 600000");
    let dir = crate::config_cli::text_tree(&[("config.yaml", &yaml)]);
    let (http, admin) = (free_addr(), free_addr());
    let gw = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0", "--access-log", "off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://{http}");
    let ready = format!("http://{admin}/readyz");
    eventually_async("the gateway to serve its revision", || async {
        let req = http::Request::get(&ready).body(empty()).unwrap();
        client().request(req).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let peak = || process_peak_rss(gw.0.id());
    let before = peak();
    // Upload: generated on the fly, chunked; the upstream counts what arrives.
    let body =
        http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(Generated::new(N), |e| {
            match e {}
        }));
    let r = send("POST", &format!("{base}/big/up"), &[], body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], N);
    // Download: the upstream generates N bytes; count them as they arrive.
    let resp = client()
        .request(
            http::Request::get(format!("{base}/big/down?download={N}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = http_body_util::BodyExt::frame(&mut body).await {
        if let Some(d) = f.unwrap().data_ref() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, N);
    // 400 MiB went through; had either been buffered whole, the peak would have grown by more.
    let grown = peak().saturating_sub(before);
    assert!(before > 0, "VmHWM of the gateway could not be read");
    assert!(
        grown < 100 * 1024 * 1024,
        "the gateway's peak RSS grew by {grown} bytes"
    );
}

fn limits(f: impl FnOnce(&mut Limits)) -> Settings {
    settings_with(|s| f(&mut s.limits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_uri_length() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(&yaml, limits(|l| l.max_uri_bytes = 100)).await;
    let at = format!("/{}", "a".repeat(99));
    assert_eq!(get(&gw.url(&at), &[]).await.status, 200);
    let past = format!("/{}", "a".repeat(100));
    let r = get(&gw.url(&past), &[]).await;
    assert_eq!(r.status, 414);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_count_and_size() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(
        &yaml,
        limits(|l| {
            l.max_headers = 10;
            l.max_header_bytes = 1000;
        }),
    )
    .await;
    // The hyper client adds `host`: 1 + 9 = 10 headers.
    let names: Vec<String> = (0..10).map(|i| format!("x-h{i}")).collect();
    let hs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    assert_eq!(get(&gw.url("/"), &hs[..9]).await.status, 200);
    assert_eq!(get(&gw.url("/"), &hs[..10]).await.status, 431);

    // Size: name + value bytes. `host` + `127.0.0.1:PORT` plus one filler header.
    let host_len = 4 + gw.http.to_string().len();
    let filler = 1000 - host_len - "x-fill".len();
    let v = "v".repeat(filler);
    assert_eq!(get(&gw.url("/"), &[("x-fill", &v)]).await.status, 200);
    let v = "v".repeat(filler + 1);
    assert_eq!(get(&gw.url("/"), &[("x-fill", &v)]).await.status, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_body_size() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(&yaml, limits(|l| l.max_body_bytes = Some(1000))).await;
    let full = |n: usize| {
        http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
            http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; n])),
            |e| match e {},
        ))
    };
    let r = send("POST", &gw.url("/"), &[], full(1000)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], 1000);
    assert_eq!(
        send("POST", &gw.url("/"), &[], full(1001)).await.status,
        413
    );
    // Chunked (no Content-Length): counted while streaming.
    let chunked = |n: u64| {
        http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(Generated::new(n), |e| {
            match e {}
        }))
    };
    assert_eq!(
        send("POST", &gw.url("/"), &[], chunked(1000)).await.status,
        200
    );
    assert_eq!(
        send("POST", &gw.url("/"), &[], chunked(1001)).await.status,
        413
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_read_timeout_and_idle_timeout() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(
        &yaml,
        limits(|l| {
            l.header_read_timeout = Duration::from_millis(300);
            l.idle_timeout = Duration::from_millis(300);
        }),
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A head that never completes: the gateway closes the connection (no response needed).
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("closed by the header read timeout");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        n.is_err() || text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // A complete request is served, then the idle keep-alive connection is closed.
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
        .await
        .expect("idle connection closed")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_max_connections() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(&yaml, limits(|l| l.max_connections = 3)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn request_on(s: &mut tokio::net::TcpStream) -> bool {
        if s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut b = [0u8; 12];
        s.read_exact(&mut b).await.is_ok() && &b == b"HTTP/1.1 200"
    }
    // At the limit: three kept-alive connections all served.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        assert!(request_on(&mut s).await);
        open.push(s);
    }
    assert_eq!(gw.running().open_connections(), 3);
    // One past: refused (closed without an answer); the gateway keeps serving the others.
    let mut extra = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    assert!(!request_on(&mut extra).await);
    let mut s0 = open.remove(0);
    let mut buf = vec![0u8; 4096];
    let _ = s0.read(&mut buf).await; // rest of the first response
    drop(s0);
    // Once one closes, a new connection is accepted again (poll for the slot to free up).
    let mut served = false;
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        if request_on(&mut s).await {
            served = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_h2_concurrent_streams_advertised() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let gw = Gateway::with(&yaml, limits(|l| l.max_h2_streams = 7)).await;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut h2, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // Drive the connection and publish the server's advertised stream limit as it arrives.
    let (tx, advertised) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| {
            let r = std::pin::Pin::new(&mut conn).poll(cx);
            let _ = tx.send(conn.max_concurrent_send_streams());
            r
        })
        .await;
    });
    // Streams up to the limit run concurrently and all succeed.
    let mut pending = Vec::new();
    for _ in 0..7 {
        h2 = h2.ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/?sleep_ms=50", gw.http))
            .body(())
            .unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        pending.push(resp);
    }
    for p in pending {
        assert_eq!(p.await.unwrap().status(), 200);
    }
    assert_eq!(
        *advertised.borrow(),
        7,
        "the server's SETTINGS advertise the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let ya = route("r", "/r/", &a.service(), "");
    let yb = route("r", "/r/", &b.service(), "") + &route("extra", "/x/", &b.service(), "");
    let (ga, gb) = (compile(&ya), compile(&yb));
    let gw = Gateway::start(&ya).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (done, ok, bad, url) = (done.clone(), ok.clone(), bad.clone(), gw.url("/r/x"));
        clients.push(tokio::spawn(async move {
            let c = client();
            while !done.load(Ordering::Relaxed) {
                let req = http::Request::get(&url).body(empty()).unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Wait until traffic flows, then swap 100 times while it does.
    while ok.load(Ordering::Relaxed) < 10 {
        tokio::task::yield_now().await;
    }
    for i in 0..100 {
        let g = if i % 2 == 0 { gb.clone() } else { ga.clone() };
        gw.proxy.swap(g);
        let target = ok.load(Ordering::Relaxed) + 3;
        while ok.load(Ordering::Relaxed) < target && bad.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "every request succeeds across swaps"
    );
    assert!(ok.load(Ordering::Relaxed) >= 300);
    assert!(a.hits.load(Ordering::Relaxed) > 0 && b.hits.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight() {
    let up = Upstream::start("a").await;
    let yaml = route("m", "/", &up.service(), "");
    let mut gw = Gateway::start(&yaml).await;
    let url = gw.url("/?sleep_ms=300");
    let inflight = tokio::spawn(async move { get(&url, &[]).await });
    // Wait until the request reached the upstream, then shut down.
    while up.hits.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let addr = gw.http;
    assert!(
        gw.shutdown(Duration::from_secs(20)).await,
        "drained before the deadline"
    );
    assert_eq!(inflight.await.unwrap().status, 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// The binary: `legate run` with the demo echo upstream, readiness, a proxied request, SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_quickstart_and_exits_zero_on_sigterm() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (echo, http, admin) = (free(), free(), free());
    let tree = Tree::new(&route("echo", "/echo/", &echo.to_string(), "rewrite: /"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("run")
        .arg("--dir")
        .arg(tree.path())
        .args(["--demo-echo", &echo.to_string()])
        .args(["--http-listen", &http.to_string()])
        .args(["--https-listen", "off"])
        .args(["--admin-listen", &admin.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Readiness: poll /readyz until it answers 200.
    let mut ready = false;
    for _ in 0..500 {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            client().request(
                http::Request::get(format!("http://{admin}/readyz"))
                    .body(empty())
                    .unwrap(),
            ),
        )
        .await
        {
            if r.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "gateway became ready");
    let r = get(&format!("http://{http}/echo/hello?a=1"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/hello");
    assert_eq!(r.json()["query"], "a=1");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `--workers 2`: a second thread with a single-threaded runtime accepts on the listener too.
/// Idle, it sleeps in its reactor; it wakes (voluntary context switches) only because it
/// watches the listener and serves what it accepted. Every connection is answered, and SIGTERM
/// drains both workers and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_two_workers_serves_every_connection_and_exits_zero_on_sigterm() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (echo, http) = (free(), free());
    let tree = Tree::new(&mapping(
        "echo",
        &format!("hostname: '*'\nprefix: /echo/\nservice: {echo}\nrewrite: /"),
    ));
    // Killed: a failed assertion must not leave the gateway running.
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(tree.path())
            .args(["--demo-echo", &echo.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--https-listen", "off", "--admin-listen", "off"])
            .args(["--workers", "2", "--access-log", "off"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let threads = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Ready once a request is routed (the route comes with the first revision).
    let url = format!("http://{http}/echo/w");
    let mut ready = false;
    for _ in 0..500 {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client().request(http::Request::get(&url).body(empty()).unwrap()),
        );
        if let Ok(Ok(r)) = r.await {
            if r.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "gateway became ready");
    assert!(
        threads().iter().any(|t| t == "legate-worker-1"),
        "{:?}",
        threads()
    );
    let worker_wakeups = || -> u64 {
        let dir = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "legate-worker-1" {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("voluntary_ctxt_switches:"))
                    .unwrap();
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no worker thread")
    };
    let before = worker_wakeups();
    // Each `get` is a new client, so a new connection.
    let answered = futures::future::join_all(
        (0..64).map(|_| tokio::time::timeout(Duration::from_secs(10), get(&url, &[]))),
    )
    .await;
    let ok = answered
        .iter()
        .filter(|r| matches!(r, Ok(g) if g.status == 200))
        .count();
    assert_eq!(
        ok, 64,
        "every connection answered, whichever worker took it"
    );
    let woke = worker_wakeups() - before;
    assert!(woke >= 5, "the second worker took part ({woke} wake-ups)");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    for _ in 0..300 {
        status = child.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exited 0 after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_http2_upstreams() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_secret(certs.path(), "up", &["localhost"]);
    let tls_up = Upstream::start_tls("tls", &certs.path().join("up")).await;
    let h2_up = Upstream::start("h2").await;
    let yaml = [
        mapping(
            "tls",
            &format!(
                "hostname: '*'\nprefix: /tls/\nservice: https://localhost:{}",
                tls_up.addr.port()
            ),
        ),
        route("grpc", "/g/", &h2_up.service(), "grpc: true"),
        mapping(
            "h2c",
            &format!(
                "hostname: '*'\nprefix: /h2c/\nservice: h2c://{}",
                h2_up.service()
            ),
        ),
    ]
    .concat();
    // The upstream's certificate is verified: trusted through --upstream-ca only.
    let gw = Gateway::with(&yaml, settings_with(|s| s.upstream_ca = Some(ca.clone()))).await;
    let r = get(&gw.url("/tls/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["upstream"], "tls");
    assert_eq!(r.json()["version"], "HTTP/1.1");
    let r = get(&gw.url("/g/x"), &[("te", "trailers")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], "HTTP/2.0", "h2c to a grpc upstream");
    assert_eq!(r.seen("te").as_deref(), Some("trailers"));
    let r = get(&gw.url("/h2c/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["version"],
        "HTTP/2.0",
        "an h2c:// service is spoken to over HTTP/2"
    );
    let untrusted = Gateway::start(&yaml).await;
    assert_eq!(get(&untrusted.url("/tls/x"), &[]).await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_only_when_allowed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    let yaml = [
        route("ws", "/ws/", &up.service(), "allow_upgrade:\n- websocket"),
        route("plain", "/plain/", &up.service(), ""),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        b"GET /ws/ HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = [0u8; 23];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");
    // A WebSocket not allowed on this route is refused by the gateway.
    let resp = raw(
        gw.http,
        b"GET /plain/ HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("not allowed on this route (allow_upgrade)"),
        "{resp}"
    );
    // Any other upgrade may be ignored (RFC 9110): the request is proxied without it.
    let resp = raw(
        gw.http,
        b"GET /plain/ HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, close\r\nUpgrade: TLS/1.2\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_use_every_address_and_survive_lookup_failures() {
    let a = Upstream::start("a").await;
    let port = a.addr.port();
    // Same port on a second loopback address.
    let b = Upstream::start_on("b", format!("127.0.0.2:{port}").parse().unwrap()).await;
    let dns = Arc::new(FakeDns::default());
    dns.answers.lock().unwrap().insert(
        "svc.test".into(),
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    );
    let yaml = mapping(
        "dns",
        &format!("hostname: '*'\nprefix: /d/\nservice: svc.test:{port}"),
    );
    let lookup: Arc<dyn legate::proxy::Lookup> = dns.clone();
    let gw = Gateway::with(
        &yaml,
        settings_with(|s| {
            s.lookup = lookup;
            s.dns_ttl = Duration::ZERO; // re-resolve for every new connection
        }),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        // `close=1`: the upstream closes, so every request needs a new upstream connection.
        let r = get(&gw.url("/d/?close=1"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        seen.insert(r.json()["upstream"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen.len(),
        2,
        "both resolved addresses take connections: {seen:?}"
    );
    let before = dns.lookups.load(Ordering::SeqCst);
    assert!(before >= 6, "re-resolved after the TTL ({before} lookups)");
    dns.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let r = get(&gw.url("/d/?close=1"), &[]).await;
        assert_eq!(r.status, 200, "last good addresses kept when DNS fails");
    }
    assert!(dns.lookups.load(Ordering::SeqCst) > before);
    // A name that never resolved: 502.
    let yaml = mapping(
        "nx",
        &format!("hostname: '*'\nprefix: /n/\nservice: nowhere.test:{port}"),
    );
    let lookup: Arc<dyn legate::proxy::Lookup> = dns.clone();
    let gw = Gateway::with(&yaml, settings_with(|s| s.lookup = lookup)).await;
    assert_eq!(get(&gw.url("/n/"), &[]).await.status, 502);
    drop(b);
}

/// `timeout_ms: 0` turns the route timeout off (as documented); `--default-timeout-ms` only
/// fills Mappings without their own (`emissary::run_default_timeout_applies_...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ms_zero_disables_the_route_timeout() {
    let up = Upstream::start("a").await;
    let svc = up.service();
    let yaml = route("off", "/off/", &svc, "timeout_ms: 0")
        + &route("short", "/short/", &svc, "timeout_ms: 50");
    let gw = Gateway::start(&yaml).await;
    // The upstream answers after 400 ms: past the other route's 50 ms.
    assert_eq!(get(&gw.url("/off/?sleep_ms=400"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/short/?sleep_ms=400"), &[]).await.status, 504);
}
