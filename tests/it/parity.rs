//! Routing semantics as Emissary's (issue #14, "Routing semantics to fix"), through the running
//! gateway with real upstreams and clients: canary group identity, hostless Mappings, the
//! default Host, ports and SNI, `:authority` forms, insecure actions and strict selectors.

use std::collections::BTreeMap;
use std::process::Command;

use legate::proxy::Settings;
use legate::routes::RoutingOptions;

use crate::support::*;

/// A `getambassador.io/v3alpha1` document.
fn doc(kind: &str, name: &str, labels: &str, spec: &str) -> String {
    let spec: String = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n{spec}")
}

/// A Host that routes cleartext, optionally selecting `key: value`.
fn plain_host(name: &str, hostname: &str, selector: Option<(&str, &str)>) -> String {
    let mut spec =
        format!("hostname: '{hostname}'\nrequestPolicy: {{insecure: {{action: Route}}}}");
    if let Some((k, v)) = selector {
        spec.push_str(&format!("\nmappingSelector: {{matchLabels: {{{k}: {v}}}}}"));
    }
    doc("Host", name, "", &spec)
}

/// Which upstream answered each of `n` requests.
async fn upstreams(url: &str, host: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = get(url, &[("host", host)]).await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        let up = r.json()["upstream"].as_str().unwrap().to_string();
        *seen.entry(up).or_insert(0) += 1;
    }
    seen
}

fn all(name: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(name.to_string(), n)])
}

fn settings(f: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings::default();
    f(&mut s);
    s
}

/// Items 1 and 2: hostless Mappings on one prefix selected by different Hosts are two groups
/// (Emissary's `group_id` carries the selecting Hosts' labels), and a hostless Mapping no Host
/// selects never joins a `hostname: "*"` group. Before, both split 50/50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_groups_follow_the_selecting_hosts() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let yaml = [
        plain_host("foo", "foo.test", Some(("host", "foo"))),
        plain_host("bar", "bar.test", Some(("host", "bar"))),
        plain_host("all", "*", None),
        doc(
            "Mapping",
            "api-foo",
            "host: foo",
            &format!("prefix: /api/\nservice: {}", a.service()),
        ),
        doc(
            "Mapping",
            "api-bar",
            "host: bar",
            &format!("prefix: /api/\nservice: {}", b.service()),
        ),
        doc(
            "Mapping",
            "star",
            "",
            &format!("hostname: '*'\nprefix: /s/\nservice: {}", c.service()),
        ),
        doc(
            "Mapping",
            "stray",
            "",
            &format!("prefix: /s/\nservice: {}", a.service()),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    assert_eq!(
        upstreams(&gw.url("/api/x"), "foo.test", 20).await,
        all("a", 20)
    );
    assert_eq!(
        upstreams(&gw.url("/api/x"), "bar.test", 20).await,
        all("b", 20)
    );
    assert_eq!(
        upstreams(&gw.url("/s/x"), "other.test", 20).await,
        all("c", 20)
    );
}

/// Item 3: with Hosts defined, an authority that matches none is 404, also where a Mapping's
/// own hostname matches it and where the Host would redirect; the port is part of the match
/// unless `strip_matching_host_port` is on and it is the listener's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_authorities_and_ports() {
    let up = Upstream::start("a").await;
    let svc = up.service();
    let yaml = [
        // No TLS, no requestPolicy: Redirect (Emissary's default).
        doc("Host", "shop", "", "hostname: shop.test"),
        plain_host("alt", "alt.test:8443", None),
        doc(
            "Mapping",
            "app",
            "",
            &format!("hostname: '*'\nprefix: /app/\nservice: {svc}"),
        ),
        doc(
            "Mapping",
            "own",
            "",
            &format!("hostname: '*.fallback.test'\nprefix: /f/\nservice: {svc}"),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let status = |path: &'static str, host: String| {
        let url = gw.url(path);
        async move { get(&url, &[("host", host.as_str())]).await.status }
    };
    assert_eq!(status("/app/x", "shop.test".into()).await, 301);
    assert_eq!(status("/app/x", "other.test".into()).await, 404);
    assert_eq!(status("/f/x", "a.fallback.test".into()).await, 404);
    assert_eq!(status("/app/x", "alt.test:8443".into()).await, 200);
    assert_eq!(status("/app/x", "alt.test".into()).await, 404);
    assert_eq!(status("/app/x", "shop.test:8080".into()).await, 404);

    let strip = RoutingOptions {
        strip_matching_host_port: true,
        ..RoutingOptions::default()
    };
    let gw = Gateway::with_graph(compile_with(&yaml, strip), Settings::default()).await;
    let port = gw.http.port();
    let status = |host: String| {
        let url = gw.url("/app/x");
        async move { get(&url, &[("host", host.as_str())]).await.status }
    };
    assert_eq!(status(format!("shop.test:{port}")).await, 301);
    assert_eq!(status(format!("shop.test:{}", port + 1)).await, 404);
    assert_eq!(status("alt.test:8443".into()).await, 200);
}

/// Item 3 over TLS: the SNI picks the certificate among TLS Hosts (a `*` TLS Host takes
/// unknown names), and the request is routed only among the Hosts of that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_the_hosts() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let ca_one = make_secret(secrets.path(), "one-tls", &["one.test"]);
    let ca_star = make_secret(secrets.path(), "star-tls", &["nobody.test", "two.test"]);
    let yaml = [
        doc(
            "Host",
            "one",
            "",
            "hostname: one.test\ntlsSecret: {name: one-tls}",
        ),
        doc(
            "Host",
            "star",
            "",
            "hostname: '*'\ntlsSecret: {name: star-tls}",
        ),
        plain_host("two", "two.test", None),
        doc(
            "Mapping",
            "app",
            "",
            &format!("hostname: '*'\nprefix: /app/\nservice: {}", up.service()),
        ),
    ]
    .concat();
    let strip = RoutingOptions {
        strip_matching_host_port: true,
        ..RoutingOptions::default()
    };
    let dir = secrets.path().to_path_buf();
    let gw = Gateway::with_graph(
        compile_with(&yaml, strip),
        settings(|s| s.secrets_dir = Some(dir)),
    )
    .await;
    let port = gw.https.port();
    let fetch = |sni: &str, ca: &std::path::Path, host: Option<&str>| {
        let mut a = vec![
            "-o".to_string(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "--resolve".into(),
            format!("{sni}:{port}:127.0.0.1"),
        ];
        if let Some(h) = host {
            a.extend(["-H".into(), format!("Host: {h}")]);
        }
        a.push(format!("https://{sni}:{port}/app/x"));
        async move { curl(&a).await }
    };
    let (ok, code, err) = fetch("one.test", &ca_one, None).await;
    assert!(ok, "{err}");
    assert_eq!(code, "200");
    // An unknown SNI gets the `*` TLS Host's certificate (curl verifies it for the name).
    let (ok, code, err) = fetch("nobody.test", &ca_star, None).await;
    assert!(ok, "{err}");
    assert_eq!(code, "200");
    // A known SNI with another authority: not routed.
    let (ok, code, err) = fetch("one.test", &ca_one, Some("two.test")).await;
    assert!(ok, "{err}");
    assert_eq!(code, "404");
    let (ok, code, err) = fetch("one.test", &ca_one, Some("nobody.test")).await;
    assert!(ok, "{err}");
    assert_eq!(code, "404");
}

/// Item 4: an exact `:authority` header is the Mapping's host (it attaches to that Host only),
/// `:authority: true` is a presence test, a `regex_headers` `:authority` is only a header
/// match, `host_regex` attaches to every Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_header_forms() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let yaml = [
        plain_host("api", "api.test", None),
        plain_host("web", "web.test", None),
        doc(
            "Mapping",
            "exact",
            "",
            &format!("prefix: /e/\nservice: {}\nheaders: {{':authority': api.test}}", a.service()),
        ),
        doc(
            "Mapping",
            "regex",
            "",
            &format!(
                "hostname: '*'\nprefix: /r/\nservice: {}\nregex_headers: {{':authority': 'web[.].*'}}",
                b.service()
            ),
        ),
        doc(
            "Mapping",
            "present",
            "",
            &format!(
                "hostname: '*'\nprefix: /p/\nservice: {}\nheaders: {{':authority': true}}",
                b.service()
            ),
        ),
        doc(
            "Mapping",
            "hre",
            "",
            &format!("host: '(api|web)[.]test'\nhost_regex: true\nprefix: /h/\nservice: {}", c.service()),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let fetch = |path: &'static str, host: &'static str| {
        let url = gw.url(path);
        async move {
            let r = get(&url, &[("host", host)]).await;
            match r.status.as_u16() {
                200 => r.json()["upstream"].as_str().unwrap().to_string(),
                s => s.to_string(),
            }
        }
    };
    assert_eq!(fetch("/e/x", "api.test").await, "a");
    assert_eq!(fetch("/e/x", "web.test").await, "404");
    assert_eq!(fetch("/r/x", "web.test").await, "b");
    assert_eq!(fetch("/r/x", "api.test").await, "404");
    assert_eq!(fetch("/p/x", "api.test").await, "b");
    assert_eq!(fetch("/h/x", "api.test").await, "c");
    assert_eq!(fetch("/h/x", "web.test").await, "c");
}

/// Item 5: the default insecure action is Redirect also without TLS, `Reject` is 404, ACME
/// challenges are routed under both, the redirect comes before auth, and `X-Forwarded-Proto`
/// counts only from trusted hops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_actions() {
    let (app, acme) = (Upstream::start("app").await, Upstream::start("acme").await);
    // Nothing listens there: an auth call would fail the request, never redirect it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = [
        doc("AuthService", "auth", "", &format!("auth_service: {dead}\ntimeout_ms: 500")),
        doc("Host", "plain", "", "hostname: plain.test"),
        doc("Host", "rej", "", "hostname: rej.test\nrequestPolicy: {insecure: {action: Reject}}"),
        doc("Mapping", "app", "", &format!("hostname: '*'\nprefix: /app/\nservice: {}", app.service())),
        doc(
            "Mapping",
            "open",
            "",
            &format!("hostname: '*'\nprefix: /open/\nservice: {}\nbypass_auth: true", app.service()),
        ),
        doc(
            "Mapping",
            "acme",
            "",
            &format!(
                "hostname: '*'\nprefix: /.well-known/acme-challenge/\nservice: {}\nbypass_auth: true\nrewrite: ''",
                acme.service()
            ),
        ),
    ]
    .concat();
    let gw = Gateway::start(&yaml).await;
    let r = get(&gw.url("/app/x?q=1"), &[("host", "plain.test")]).await;
    assert_eq!(r.status, 301, "redirected before the (failing) auth call");
    assert_eq!(r.header("location"), Some("https://plain.test/app/x?q=1"));
    assert_eq!(
        get(&gw.url("/app/x"), &[("host", "rej.test")]).await.status,
        404
    );
    // A path no route matches is 404 even under Redirect: the redirect is per route.
    assert_eq!(
        get(&gw.url("/nothing"), &[("host", "plain.test")])
            .await
            .status,
        404
    );
    for host in ["plain.test", "rej.test"] {
        let r = get(
            &gw.url("/.well-known/acme-challenge/tok"),
            &[("host", host)],
        )
        .await;
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.json()["upstream"], "acme");
    }
    // With no trusted hops the client's X-Forwarded-Proto does not make a request secure.
    let xfp = [("host", "plain.test"), ("x-forwarded-proto", "https")];
    assert_eq!(get(&gw.url("/open/x"), &xfp).await.status, 301);

    let gw = Gateway::with(&yaml, settings(|s| s.xff_trusted_hops = 1)).await;
    let r = get(&gw.url("/open/x"), &xfp).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("https"));
    let http = [("host", "plain.test"), ("x-forwarded-proto", "http")];
    assert_eq!(get(&gw.url("/open/x"), &http).await.status, 301);
    assert_eq!(
        get(&gw.url("/open/x"), &[("host", "plain.test")])
            .await
            .status,
        301
    );
}

/// Item 6: a Host with a mappingSelector takes a Mapping with a hostname only when the labels
/// match too, and every label must; `--disable-strict-label-selectors` (Emissary's
/// `DISABLE_STRICT_LABEL_SELECTORS`) restores "hostname OR any label".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_selectors_and_the_opt_out() {
    let up = Upstream::start("a").await;
    let svc = up.service();
    let yaml = [
        doc(
            "Host",
            "h",
            "",
            "hostname: h.test\nrequestPolicy: {insecure: {action: Route}}\nmappingSelector: {matchLabels: {team: a, tier: web}}",
        ),
        doc("Mapping", "nolabel", "", &format!("hostname: '*'\nprefix: /n/\nservice: {svc}")),
        doc("Mapping", "partial", "team: a", &format!("prefix: /p/\nservice: {svc}")),
        doc("Mapping", "full", "team: a, tier: web", &format!("hostname: '*'\nprefix: /f/\nservice: {svc}")),
    ]
    .concat();
    let strict = Gateway::start(&yaml).await;
    let loose = Gateway::with_graph(
        compile_with(
            &yaml,
            RoutingOptions {
                loose_label_selectors: true,
                ..RoutingOptions::default()
            },
        ),
        Settings::default(),
    )
    .await;
    for (path, strict_status, loose_status) in
        [("/n/x", 404, 200), ("/p/x", 404, 200), ("/f/x", 200, 200)]
    {
        let h = [("host", "h.test")];
        assert_eq!(
            get(&strict.url(path), &h).await.status,
            strict_status,
            "strict {path}"
        );
        assert_eq!(
            get(&loose.url(path), &h).await.status,
            loose_status,
            "loose {path}"
        );
    }

    // The same switch on the command line, under Emissary's environment variable.
    let dir = Tree::new(&yaml);
    let check = |env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_legate"));
        c.args(["check", dir.path().to_str().unwrap()]);
        c.env_remove("DISABLE_STRICT_LABEL_SELECTORS");
        if let Some(v) = env {
            c.env("DISABLE_STRICT_LABEL_SELECTORS", v);
        }
        String::from_utf8(c.output().unwrap().stdout).unwrap()
    };
    assert!(check(None).contains("unreachable-mapping"));
    assert!(!check(Some("true")).contains("unreachable-mapping"));
}
