//! Emissary input beyond v3alpha1 Mappings and Hosts (issue 14): `getambassador.io/v2` and v1
//! converted on load and by `legate convert`, the `ambassador` Module acted on through the
//! running gateway, annotation resources, and warnings that say what unimplemented kinds and
//! fields lose. CLI behaviour runs the real binary; request behaviour the in-process gateway.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::config_cli::{check, legate, text_tree as tree};
use crate::support::{free_addr, get, send, Gateway, Killed, Upstream};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn routes(dir: &Path) -> String {
    text(&legate(&["routes", dir.to_str().unwrap()]))
}

const V2_MAPPING: &str = "# the quote service\n---\napiVersion: getambassador.io/v2\nkind: Mapping\nmetadata:\n  name: quote\n  labels: {team: quote}\nspec:\n  prefix: /quote/\n  service: quote:8443\n  tls: true\n  host: quote.example.com\n  headers:\n    x-canary: true\n    x-off: false\n  use_websocket: true\n  add_request_headers:\n    x-a: one\n  cors:\n    origins: https://a.test,https://b.test\n---\napiVersion: getambassador.io/v1\nkind: Mapping\nmetadata:\n  name: legacy\n  labels: {team: quote}\nspec:\n  prefix: /legacy/\n  service: legacy\n";

const V2_HOST: &str = "apiVersion: getambassador.io/v2\nkind: Host\nmetadata:\n  name: quote\nspec:\n  hostname: quote.example.com\n  ambassadorId: [default]\n  selector:\n    matchLabels: {team: quote}\n  acmeProvider:\n    authority: none\n  requestPolicy:\n    insecure:\n      action: Route\n";

#[test]
fn v2_and_v1_load_as_emissary_converts_them_with_one_note_per_file() {
    let dir = tree(&[("mappings.yaml", V2_MAPPING), ("host.yaml", V2_HOST)]);
    let o = check(dir.path(), &["--strict"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(out.matches("note[converted]").count(), 2, "{out}");
    assert!(
        out.contains("mappings.yaml:3:1: note[converted]: 2 resource(s)"),
        "{out}"
    );
    assert!(
        out.contains("legate convert mappings.yaml --write"),
        "{out}"
    );
    let table = routes(dir.path());
    // host -> hostname glob, tls: true -> https://, `true` header -> regex `.*`, `false` dropped.
    assert!(
        table.contains("Host default/quote (quote.example.com"),
        "{table}"
    );
    assert!(
        table.contains("quote.example.com        /quote/* [x-canary~.*]"),
        "{table}"
    );
    assert!(table.contains("https://quote:8443"), "{table}");
    assert!(!table.contains("x-off"), "{table}");
    // A v1 Mapping without host serves every host (`hostname: "*"`).
    assert!(
        table.contains("*                        /legacy/*"),
        "{table}"
    );
}

const OTHER: &str = "# untouched\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";

#[test]
fn legate_convert_rewrites_files_that_then_check_the_same() {
    let dir = tree(&[
        ("mappings.yaml", V2_MAPPING),
        ("host.yaml", V2_HOST),
        ("other.yaml", OTHER),
    ]);
    let before = routes(dir.path());
    let dry = legate(&["convert", dir.path().to_str().unwrap()]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    let printed = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(printed.contains("(2 resource(s) converted)"), "{printed}");
    assert!(printed.contains("hostname: quote.example.com"), "{printed}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("mappings.yaml")).unwrap(),
        V2_MAPPING,
        "without --write nothing changes"
    );

    let w = legate(&["convert", dir.path().to_str().unwrap(), "--write"]);
    assert_eq!(w.status.code(), Some(0), "{}", text(&w));
    let m = std::fs::read_to_string(dir.path().join("mappings.yaml")).unwrap();
    assert!(m.starts_with("# the quote service\n---\n"), "{m}");
    assert!(
        !m.contains("getambassador.io/v2") && !m.contains("/v1\n"),
        "{m}"
    );
    assert!(m.contains("allow_upgrade:\n  - websocket"), "{m}");
    assert!(m.contains("service: \"https://quote:8443\""), "{m}");
    assert!(m.contains("x-a:\n      value: one"), "{m}");
    let h = std::fs::read_to_string(dir.path().join("host.yaml")).unwrap();
    assert!(h.contains("mappingSelector:"), "{h}");
    assert!(!h.contains("ambassadorId"), "{h}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("other.yaml")).unwrap(),
        OTHER
    );
    let after = check(dir.path(), &["--strict"]);
    assert_eq!(after.status.code(), Some(0), "{}", text(&after));
    assert!(!text(&after).contains("note[converted]"));
    assert_eq!(routes(dir.path()), before);
    // A second run has nothing left to do.
    let again = legate(&["convert", dir.path().to_str().unwrap()]);
    assert!(
        text(&again).contains("nothing to convert"),
        "{}",
        text(&again)
    );
}

fn doc(api: &str, kind: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

const V3: &str = "getambassador.io/v3alpha1";

#[test]
fn edge_stack_and_unimplemented_kinds_warn_with_what_is_lost() {
    let mut y = String::new();
    for kind in [
        "RateLimit",
        "Filter",
        "FilterPolicy",
        "DevPortal",
        "LogService",
    ] {
        y += &doc(V3, kind, &kind.to_lowercase(), "  domain: ambassador\n");
    }
    let dir = tree(&[("edge.yaml", &y)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(
        out.matches("warning[kind-not-implemented]").count(),
        5,
        "{out}"
    );
    // Never read as Legate's own RateLimit (whose schema would refuse this spec).
    assert!(
        out.contains("kind `RateLimit` is not implemented by Legate")
            && out.contains("use Legate's own `legate.dev/v1alpha1` RateLimit"),
        "{out}"
    );
    assert!(
        out.contains("kind `LogService` is not implemented") && out.contains("--access-log"),
        "{out}"
    );
    assert_eq!(check(dir.path(), &["--strict"]).status.code(), Some(1));
}

#[test]
fn acme_none_is_silent_and_a_named_mapping_tls_is_refused() {
    let host = |authority: &str| {
        doc(
            V3,
            "Host",
            "h",
            &format!("  hostname: a.test\n  requestPolicy: {{insecure: {{action: Route}}}}\n  acmeProvider:\n    authority: {authority}\n"),
        )
    };
    let quiet = tree(&[("h.yaml", &host("none"))]);
    let o = check(quiet.path(), &["--strict"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let acme = tree(&[("h.yaml", &host("https://acme.example/dir"))]);
    let o = check(acme.path(), &[]);
    assert!(text(&o).contains("acmeProvider"), "{}", text(&o));

    let named = doc(
        V3,
        "Mapping",
        "m",
        "  hostname: '*'\n  prefix: /m/\n  service: m:8443\n  tls: upstream-ctx\n",
    );
    let dir = tree(&[("m.yaml", &named)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "m.yaml:10:3: error[unknown-tlscontext]: `tls: upstream-ctx` names a TLSContext that does not exist"
        ),
        "{out}"
    );
    assert!(out.contains("https://host:port"), "{out}");
}

#[test]
fn authservice_fields_load_and_a_second_authservice_is_refused_with_why() {
    let auth = doc(
        V3,
        "AuthService",
        "auth",
        "  auth_service: auth:3000\n  timeout_ms: 0\n  add_auth_headers: {x-from: gateway}\n  allow_request_body: true\n  protocol_version: v3\n  stats_name: auth\n  add_linkerd_headers: false\n  circuit_breakers:\n    - max_requests: 10\n",
    );
    let dir = tree(&[("auth.yaml", &auth)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("unknown-field"), "{out}");
    for field in [
        "protocol_version",
        "stats_name",
        "add_linkerd_headers",
        "circuit_breakers",
    ] {
        assert!(
            out.contains(&format!("AuthService `{field}` is an Emissary field")),
            "{field}: {out}"
        );
    }
    let two = auth.clone() + &doc(V3, "AuthService", "auth2", "  auth_service: auth2:3000\n");
    let dir = tree(&[("auth.yaml", &two)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("Emissary would merge them into one auth filter"),
        "{out}"
    );
}

#[test]
fn a_second_host_redirect_in_one_group_is_an_error() {
    let m = |name: &str, target: &str| {
        doc(
            V3,
            "Mapping",
            name,
            &format!(
                "  hostname: '*'\n  prefix: /old/\n  host_redirect: true\n  service: {target}\n"
            ),
        )
    };
    let dir = tree(&[("r.yaml", &(m("a", "one.test") + &m("b", "two.test")))]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("error[second-redirect]: Mapping `b` is a second host_redirect for the same match as `a`"),
        "{out}"
    );
}

#[test]
fn module_keys_are_acted_on_ignored_or_warned_by_name() {
    let module = doc(
        V3,
        "Module",
        "ambassador",
        "  config:\n    cluster_request_timeout_ms: 1200\n    xff_num_trusted_hops: 1\n    regex_type: unsafe\n    lua_scripts: x\n    enable_grpc_web: true\n    server_nam: typo\n",
    );
    let dir = tree(&[("module.yaml", &module)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("Module `xff_num_trusted_hops` does nothing in current Emissary")
            && out.contains("--xff-trusted-hops"),
        "{out}"
    );
    assert!(out.contains("Module `regex_type` does nothing"), "{out}");
    assert!(
        out.contains("Module `lua_scripts` is not implemented by Legate")
            && out.contains("what is lost: no Lua"),
        "{out}"
    );
    assert!(
        out.contains("Module `enable_grpc_web` is not implemented"),
        "{out}"
    );
    assert!(out.contains("did you mean `server_name`?"), "{out}");
    assert!(!out.contains("cluster_request_timeout_ms"), "{out}");

    // Bad values of keys Legate acts on are errors that point into the Module.
    let bad = doc(
        V3,
        "Module",
        "ambassador",
        "  config:\n    ip_allow:\n      - peer: 10.0.0.0/99\n    cors:\n      origins: 7\n",
    );
    let dir = tree(&[("module.yaml", &bad)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "module.yaml:8:5: error[bad-module]: Module `ip_allow`: `/99` is not a prefix length"
        ),
        "{out}"
    );
    assert!(out.contains("(at /spec/config/cors/origins)"), "{out}");

    // Another Module name is warned, never read as the gateway's settings.
    let other = doc(V3, "Module", "tls", "  config: {}\n");
    let dir = tree(&[("module.yaml", &other)]);
    assert!(text(&check(dir.path(), &[])).contains("Module `tls` is ignored"));
}

#[test]
fn annotation_resources_take_the_parents_namespace_and_labels() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\n  namespace: store\n  labels: {team: shop}\n  annotations:\n    getambassador.io/config: |\n      ---\n      apiVersion: ambassador/v2\n      kind: Mapping\n      name: shop-api\n      prefix: /shop/\n      service: shop.store\n      host: shop.test\n      ---\n      apiVersion: getambassador.io/v3alpha1\n      kind: Mapping\n      metadata:\n        name: hostless\n      spec:\n        prefix: /cart/\n        service: cart.store\nspec:\n  ports: [{port: 80}]\n";
    let host = "apiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: shop\nspec:\n  hostname: shop.test\n  requestPolicy: {insecure: {action: Route}}\n  mappingSelector:\n    matchLabels: {team: shop}\n";
    let dir = tree(&[("svc.yaml", svc), ("host.yaml", host)]);
    let o = check(dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("svc.yaml:8:5: note[annotation-resources]: 2 resource(s) read from the getambassador.io/config annotation of Service `shop` (namespace `store`)"),
        "{out}"
    );
    let table = routes(dir.path());
    assert!(table.contains("store/shop-api"), "{table}");
    // The hostless Mapping carries the Service's labels, which the Host selects.
    assert!(table.contains("store/hostless"), "{table}");
    assert!(!out.contains("unreachable-mapping"), "{out}");
}

// --- The Module through the running gateway ---

fn module(config: &str) -> String {
    let config: String = config.lines().map(|l| format!("    {l}\n")).collect();
    format!("---\napiVersion: {V3}\nkind: Module\nmetadata:\n  name: ambassador\nspec:\n  config:\n{config}")
}

fn route(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    let extra: String = extra.lines().map(|l| format!("  {l}\n")).collect();
    format!("---\napiVersion: {V3}\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: '*'\n  prefix: {prefix}\n  service: {service}\n{extra}")
}

#[tokio::test]
async fn module_request_timeout_and_defaults_reach_every_mapping_without_their_own() {
    let up = Upstream::start("up").await;
    let s = up.service();
    let yaml = module(
        "cluster_request_timeout_ms: 200\nadd_linkerd_headers: true\ndefaults:\n  httpmapping:\n    add_request_headers: {x-default: from-module}\n    add_response_headers: {x-served-by: legate}\n  remove_response_headers: [x-upstream]",
    ) + &route("plain", "/plain/", &s, "")
        + &route(
            "own",
            "/own/",
            &s,
            "timeout_ms: 2000\nadd_request_headers: {x-own: yes}\nadd_linkerd_headers: false\nremove_response_headers: []",
        );
    let gw = Gateway::start(&yaml).await;
    let slow = get(&gw.url("/plain/x?sleep_ms=600"), &[]).await;
    assert_eq!(slow.status, 504, "the Module's timeout applies");
    let fine = get(&gw.url("/own/x?sleep_ms=600"), &[]).await;
    assert_eq!(fine.status, 200, "a Mapping's own timeout_ms wins");

    let r = get(&gw.url("/plain/x"), &[]).await;
    assert_eq!(r.seen("x-default").as_deref(), Some("from-module"));
    assert_eq!(r.seen("l5d-dst-override"), Some(s.clone()));
    assert_eq!(r.header("x-served-by"), Some("legate"));
    assert_eq!(
        r.header("x-upstream"),
        None,
        "defaults.remove_response_headers"
    );
    let o = get(&gw.url("/own/x"), &[]).await;
    assert_eq!(
        o.seen("x-default"),
        None,
        "a Mapping's own add_request_headers win"
    );
    assert_eq!(o.seen("x-own").as_deref(), Some("yes"));
    assert_eq!(o.seen("l5d-dst-override"), None);
    assert_eq!(o.header("x-upstream"), Some("up"));
}

#[tokio::test]
async fn module_cors_retry_breakers_and_balancer_are_mapping_defaults() {
    let up = Upstream::start("up").await;
    let s = up.service();
    let yaml = module(
        "cors:\n  origins: https://app.test\n  methods: GET\nretry_policy: {retry_on: 5xx, num_retries: 2}\ncircuit_breakers:\n  max_requests: 7\nload_balancer: {policy: least_request}",
    ) + &route("a", "/a/", &s, "")
        + &route("b", "/b/", &s, "cors: {origins: https://other.test}");
    let gw = Gateway::start(&yaml).await;
    let pre = |path: &'static str| {
        let url = gw.url(path);
        async move {
            send(
                "OPTIONS",
                &url,
                &[
                    ("origin", "https://app.test"),
                    ("access-control-request-method", "GET"),
                ],
                crate::support::empty(),
            )
            .await
        }
    };
    let a = pre("/a/x").await;
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://app.test"),
        "{a:?}"
    );
    let b = pre("/b/x").await;
    assert_eq!(
        b.header("access-control-allow-origin"),
        None,
        "the Mapping's own cors wins"
    );

    let graph = crate::support::compile(&yaml);
    let forward = |name: &str| match &graph.routes.iter().find(|r| r.name == name).unwrap().action {
        legate::routes::Action::Forward(f) => f.clone(),
        _ => unreachable!(),
    };
    let fa = forward("a");
    assert_eq!(fa.retry.as_ref().map(|r| r.num_retries), Some(2));
    assert_eq!(fa.breaker.max_requests, 7);
    assert!(fa.load_balancer.is_some());
    // A 5xx is retried under the Module's retry_policy: the upstream sees three requests.
    let before = up.hits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&gw.url("/a/x?status=503"), &[]).await.status, 503);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed) - before,
        3
    );
}

#[tokio::test]
async fn module_edge_settings_apply_per_request() {
    let up = Upstream::start("up").await;
    let s = up.service();
    let base = route("a", "/a/", &s, "");

    // server_name overwrites Server on every response, the gateway's own 404 included.
    let gw = Gateway::start(&(module("server_name: edge-1") + &base)).await;
    assert_eq!(
        get(&gw.url("/a/x"), &[]).await.header("server"),
        Some("edge-1")
    );
    assert_eq!(
        get(&gw.url("/none"), &[]).await.header("server"),
        Some("edge-1")
    );
    let plain = Gateway::start(&base).await;
    assert_eq!(
        get(&plain.url("/a/x"), &[]).await.header("server"),
        Some("test-upstream")
    );

    // ip_allow / ip_deny on the connection's address (`peer`).
    let deny = Gateway::start(&(module("ip_deny:\n  - peer: 127.0.0.0/8") + &base)).await;
    let r = get(&deny.url("/a/x"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (403, "RBAC: access denied")
    );
    let allow = Gateway::start(&(module("ip_allow:\n  - peer: 127.0.0.1") + &base)).await;
    assert_eq!(get(&allow.url("/a/x"), &[]).await.status, 200);
    let other = Gateway::start(&(module("ip_allow:\n  - remote: 10.0.0.0/8") + &base)).await;
    assert_eq!(get(&other.url("/a/x"), &[]).await.status, 403);

    // Escaped slashes.
    // Legate refuses them by default (Emissary keeps them); a Mapping opts in with
    // `allow_escaped_slashes` (tests/it/edge.rs).
    assert_eq!(get(&plain.url("/a/x%2Fy"), &[]).await.status, 400);
    let strict =
        Gateway::start(&(module("reject_requests_with_escaped_slashes: true") + &base)).await;
    assert_eq!(get(&strict.url("/a/x%2Fy"), &[]).await.status, 400);
    assert_eq!(get(&strict.url("/a/x%5cy"), &[]).await.status, 400);
    assert_eq!(get(&strict.url("/a/x%20y"), &[]).await.status, 200);
}

#[tokio::test]
async fn module_forwarding_headers_and_limits() {
    let up = Upstream::start("up").await;
    let s = up.service();
    let base = route("a", "/a/", &s, "");
    let hdrs = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-request-id", "client-id"),
    ];

    let plain = Gateway::start(&base).await;
    let r = get(&plain.url("/a/x"), &hdrs).await;
    assert_eq!(r.seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen("x-request-id").as_deref(), Some("client-id"));

    let gw = Gateway::start(
        &(module("use_remote_address: false\npreserve_external_request_id: false") + &base),
    )
    .await;
    let r = get(&gw.url("/a/x"), &hdrs).await;
    assert_eq!(r.seen("x-forwarded-for").as_deref(), Some("203.0.113.9"));
    let id = r.seen("x-request-id").unwrap();
    assert_ne!(id, "client-id");

    let limits = Gateway::start(
        &(module("buffer: {max_request_bytes: 16}\nmax_request_headers_kb: 1") + &base),
    )
    .await;
    let body = |n: usize| {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; n]))
            .map_err(|e| match e {})
            .boxed()
    };
    assert_eq!(
        send("POST", &limits.url("/a/x"), &[], body(16))
            .await
            .status,
        200
    );
    assert_eq!(
        send("POST", &limits.url("/a/x"), &[], body(17))
            .await
            .status,
        413
    );
    let big = "v".repeat(1100);
    assert_eq!(
        get(&limits.url("/a/x"), &[("x-big", &big)]).await.status,
        431
    );
    assert_eq!(
        get(&plain.url("/a/x"), &[("x-big", &big)]).await.status,
        200
    );
}

#[tokio::test]
async fn ambassador_v0_is_for_user_mappings_unless_diagnostics_is_enabled() {
    let up = Upstream::start("up").await;
    let user = route("diag", "/ambassador/v0/", &up.service(), "");
    let gw = Gateway::start(&user).await;
    let r = get(&gw.url("/ambassador/v0/check_alive"), &[]).await;
    assert_eq!(r.json()["upstream"], "up");

    let yaml = module("diagnostics: {enabled: true}") + &user;
    let tree = crate::support::Tree::new(&yaml);
    let o = legate(&["check", tree.path().to_str().unwrap()]);
    assert!(
        text(&o).contains("warning[diagnostics-prefix]"),
        "{}",
        text(&o)
    );
    let gw = Gateway::start(&yaml).await;
    let alive = get(&gw.url("/ambassador/v0/check_alive"), &[]).await;
    assert_eq!(alive.status, 200);
    assert!(alive.body.contains("liveness check OK"), "{}", alive.body);
    assert_eq!(
        get(&gw.url("/ambassador/v0/check_ready"), &[]).await.status,
        200
    );
    assert_eq!(get(&gw.url("/ambassador/v0/diag/"), &[]).await.status, 404);
}

/// `legate run --default-timeout-ms` is the timeout of Mappings with no `timeout_ms` of their
/// own (and no Module's `cluster_request_timeout_ms`); a Mapping's own value wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_default_timeout_applies_to_mappings_without_their_own() {
    let up = Upstream::start("up").await;
    let s = up.service();
    let (http, admin) = (free_addr(), free_addr());
    let dir = tree(&[(
        "config.yaml",
        &(route("plain", "/plain/", &s, "") + &route("own", "/own/", &s, "timeout_ms: 5000")),
    )]);
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(["--default-timeout-ms", "150"])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0", "--access-log", "off"])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(admin).await;
    let slow = get(&format!("http://{http}/plain/x?sleep_ms=800"), &[]).await;
    assert_eq!(slow.status, 504, "the flag's 150 ms applies: {}", slow.body);
    let own = get(&format!("http://{http}/own/x?sleep_ms=800"), &[]).await;
    assert_eq!(own.status, 200, "a Mapping's own timeout_ms wins");
}

/// Wait (at most 30 s) until the gateway's admin listener says ready.
async fn wait_ready(admin: std::net::SocketAddr) {
    let ready = format!("http://{admin}/readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = crate::support::client()
            .request(
                http::Request::get(&ready)
                    .body(crate::support::empty())
                    .unwrap(),
            )
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emissary_probe_paths_answer_on_the_admin_listener() {
    let (echo, http, admin) = (free_addr(), free_addr(), free_addr());
    let dir = tree(&[(
        "config.yaml",
        &(V2_MAPPING
            .replace("quote:8443", &echo.to_string())
            .replace("  tls: true\n", "")),
    )]);
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(["--demo-echo", &echo.to_string()])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0"])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Ready once the (converted) revision is applied.
    let ready = format!("http://{admin}/ambassador/v0/check_ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = crate::support::client()
            .request(
                http::Request::get(&ready)
                    .body(crate::support::empty())
                    .unwrap(),
            )
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alive = get(&format!("http://{admin}/ambassador/v0/check_alive"), &[]).await;
    assert_eq!(alive.status, 200);
    let r = get(
        &format!("http://{http}/quote/x"),
        &[("host", "quote.example.com"), ("x-canary", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// An HTTP/1.1 upstream that counts the connections it accepts.
async fn counting_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn module_cluster_idle_timeout_closes_idle_upstream_connections() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = counting_upstream().await;
    let (addr2, accepted2) = counting_upstream().await;
    let yaml = module("cluster_idle_timeout_ms: 50")
        + &route("short", "/short/", &addr.to_string(), "")
        + &route(
            "long",
            "/long/",
            &addr2.to_string(),
            "cluster_idle_timeout_ms: 60000",
        );
    let gw = Gateway::start(&yaml).await;
    for prefix in ["/short/", "/long/"] {
        assert_eq!(get(&gw.url(prefix), &[]).await.status, 200);
        assert_eq!(get(&gw.url(prefix), &[]).await.status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "back to back: one connection"
    );
    assert_eq!(accepted2.load(Ordering::SeqCst), 1);
    // Idle for longer than the Module's 50 ms: the next request needs a new connection; the
    // Mapping that sets its own (long) timeout keeps its connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&gw.url("/short/"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/long/"), &[]).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(accepted2.load(Ordering::SeqCst), 1);
}

/// `strip_matching_host_port`: the port of an authority that equals the listener's own is
/// dropped before Host matching, so `foo.example:<port>` reaches Host `foo.example`; without the
/// Module the port is part of the match and the request is 404.
#[tokio::test]
async fn module_strip_matching_host_port_reaches_host_matching() {
    let up = Upstream::start("up").await;
    let host = format!(
        "---\napiVersion: {V3}\nkind: Host\nmetadata:\n  name: foo\nspec:\n  hostname: foo.example\n  requestPolicy: {{insecure: {{action: Route}}}}\n"
    );
    let base = host + &route("a", "/a/", &up.service(), "");
    for (yaml, want) in [
        (module("strip_matching_host_port: true") + &base, 200),
        (base.clone(), 404),
    ] {
        let gw = Gateway::start(&yaml).await;
        let authority = format!("foo.example:{}", gw.http.port());
        let r = get(&gw.url("/a/x"), &[("host", authority.as_str())]).await;
        assert_eq!(r.status.as_u16(), want, "{yaml}\n{}", r.body);
    }
}
