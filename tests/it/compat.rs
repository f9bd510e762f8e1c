//! The Emissary compatibility corpus (`tests/fixtures/emissary-compat`, copied from
//! `shared/emissary-compat`): each file loads as its own revision and behaves as
//! EXPECTATIONS.md says.

use std::path::{Path, PathBuf};

use legate::config::{self, Diagnostic, Options, Outcome, Severity};
use legate::routes::{Action, Graph, RequestHead, Rewrite, RouteId, Routed};

fn fixture(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emissary-compat");
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(name))
        .unwrap_or_else(|| panic!("no fixture {name}"));
    std::fs::read_to_string(entry.path()).unwrap()
}

/// Load `text` as the only file of a revision.
fn load_text(text: &str, opts: &Options) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    config::check_dir(dir.path(), opts)
}

fn load(name: &str) -> Outcome {
    load_text(&fixture(name), &Options::default())
}

/// Rule 9: documentation examples omit `hostname`; add `hostname: "*"` to every Mapping.
fn with_star_hostname(text: &str) -> String {
    let mut out = String::new();
    let mut in_mapping = false;
    for line in text.lines() {
        if line.starts_with("kind:") {
            in_mapping = line.contains("Mapping");
        }
        out.push_str(line);
        out.push('\n');
        if in_mapping && line.trim_end() == "spec:" {
            out.push_str("  hostname: \"*\"\n");
        }
    }
    out
}

/// Drop the `n`th (0-based) `---` document.
fn without_doc(text: &str, n: usize) -> String {
    let mut docs: Vec<&str> = text.split("\n---\n").collect();
    docs.remove(n + 1); // docs[0] is the comment header before the first `---`
    docs.join("\n---\n")
}

fn errors(o: &Outcome) -> Vec<&Diagnostic> {
    o.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect()
}

fn with_code<'a>(o: &'a Outcome, code: &str) -> Vec<&'a Diagnostic> {
    o.diagnostics.iter().filter(|d| d.code == code).collect()
}

fn serve<'g>(
    g: &'g Graph,
    host: &str,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &[(&str, &str)],
) -> Option<&'g str> {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let head = RequestHead {
        host,
        method,
        path,
        query,
        headers: &map,
    };
    let m = g.lookup(&head)?;
    let id: RouteId = m.group.pick(0)?;
    Some(g.route(id).name.as_str())
}

fn get<'g>(g: &'g Graph, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<&'g str> {
    serve(g, host, "GET", path, None, headers)
}

#[test]
fn every_file_loads_without_panicking_and_reports_positions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emissary-compat");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 16);
    for f in files {
        let o = load_text(&std::fs::read_to_string(&f).unwrap(), &Options::default());
        for d in &o.diagnostics {
            assert!(d.line >= 1 && d.column >= 1, "{}: {d}", f.display());
            assert_eq!(d.file, "config.yaml");
        }
    }
}

#[test]
fn f01_header_routing_honours_ambassador_id() {
    let o = load("01-");
    assert!(o.is_ok());
    assert_eq!(o.resources.len(), 0);
    let notes = with_code(&o, "other-ambassador-id");
    assert_eq!(notes.len(), 2);
    assert!(
        notes[0].message.contains("(env('SLOT'))"),
        "{}",
        notes[0].message
    );

    let opts = Options {
        ambassador_id: "(env('SLOT'))".into(),
        ..Options::default()
    };
    let o = load_text(&fixture("01-"), &opts);
    let g = o.graph.expect("valid");
    assert_eq!(
        get(
            &g,
            "any.host",
            "/header-routing/x",
            &[("x-route", "target2")]
        ),
        Some("header-routing-target2")
    );
    assert_eq!(
        get(&g, "any.host", "/header-routing/x", &[]),
        Some("header-routing-target1")
    );
    assert_eq!(
        get(&g, "any.host", "/header-routing/x", &[("x-route", "other")]),
        Some("header-routing-target1")
    );
}

#[test]
fn f04_grpc_keeps_path_and_speaks_http2() {
    let opts = Options {
        ambassador_id: "(env('SLOT'))".into(),
        ..Options::default()
    };
    let o = load_text(&fixture("04-"), &opts);
    let g = o.graph.expect("valid");
    assert_eq!(g.routes.len(), 1);
    let Action::Forward(f) = &g.routes[0].action else {
        panic!("forward")
    };
    assert!(matches!(f.rewrite, Rewrite::Keep));
    assert!(f.http2);
}

#[test]
fn f05_selector_and_hostname_route_separately() {
    let o = load("05-");
    let g = o.graph.expect("valid");
    assert_eq!(
        get(&g, "foo.example.com", "/test/", &[]),
        Some("star-backend-foo")
    );
    assert_eq!(
        get(&g, "bar.example.com", "/test/", &[]),
        Some("star-backend-bar")
    );
    assert_eq!(get(&g, "baz.example.com", "/test/", &[]), None);
}

#[test]
fn f06_listeners_and_tlscontext_load_and_missing_secret_reported() {
    let o = load("06-");
    assert!(o.is_ok(), "{:?}", errors(&o));
    let kinds = with_code(&o, "kind-not-implemented");
    // Listener is implemented: both ports open, each taking both Hosts (`from: ALL`).
    assert!(!kinds.iter().any(|d| d.message.contains("Listener")));
    let g = o.graph.as_ref().expect("valid");
    let ports: Vec<(u16, usize)> = g
        .listeners
        .iter()
        .map(|l| (l.port, l.hosts.len()))
        .collect();
    assert_eq!(ports, vec![(8080, 2), (8443, 2)]);
    // TLSContext is implemented: read, and named by both Hosts without a complaint.
    assert!(!kinds.iter().any(|d| d.message.contains("TLSContext")));
    assert!(o
        .resources
        .iter()
        .any(|r| r.kind == config::schema::Kind::TlsContext));
    assert_eq!(
        o.resources
            .iter()
            .filter(|r| r.kind == config::schema::Kind::Host)
            .count(),
        2
    );
    let empty = tempfile::tempdir().unwrap();
    let secrets = legate::reconcile::preflight::check_secrets(&o.resources, empty.path());
    assert!(!secrets.is_empty());
    assert!(secrets
        .iter()
        .all(|d| d.severity == Severity::Error && d.message.contains("tls-cert")));
    assert!(secrets.iter().any(|d| d.message.contains("minimal-host")));
}

#[test]
fn f07_schema_breakers_are_located_and_the_rest_loads() {
    let o = load("07-");
    let errs = errors(&o);
    let lb: Vec<_> = errs
        .iter()
        .filter(|d| d.pointer.ends_with("/spec/load_balancer/policy"))
        .collect();
    assert_eq!(lb.len(), 1, "{errs:?}");
    assert!(lb[0].line > 1);
    assert!(lb[0].message.contains("some_policy"), "{}", lb[0].message);
    assert!(lb[0].help.as_deref().unwrap_or("").contains("round_robin"));
    // The deliberately odd documents fail (two more out-of-range redirect codes), one is for
    // another ambassador_id, one name is used twice (rule 5); the other 31 Mappings load.
    assert_eq!(with_code(&o, "schema").len(), 3);
    assert_eq!(with_code(&o, "duplicate-resource").len(), 2);
    assert_eq!(with_code(&o, "other-ambassador-id").len(), 1);
    assert_eq!(o.resources.len(), 31);
}

#[test]
fn f08_host_list_loads_and_its_duplicate_is_named() {
    let o = load("08-");
    // The round-trip list reuses one Host name: rule 5 makes that an error naming both places.
    let dup = with_code(&o, "duplicate-resource");
    assert_eq!(errors(&o).len(), 2, "{:?}", errors(&o));
    assert_eq!(dup.len(), 2);
    assert!(dup[0].message.contains("host-preview-enabled-true"));
    assert_eq!(o.resources.len(), 11);
}

#[test]
fn f09_canary_warns_then_splits_90_10() {
    let o = load("09-");
    assert_eq!(with_code(&o, "unreachable-mapping").len(), 2);
    let o = load_text(&with_star_hostname(&fixture("09-")), &Options::default());
    let g = o.graph.expect("valid");
    let m = g
        .lookup(&RequestHead {
            host: "x",
            method: "GET",
            path: "/backend/",
            query: None,
            headers: &http::HeaderMap::new(),
        })
        .unwrap();
    let mut v2 = 0;
    for roll in 0..100 {
        if g.route(m.group.pick(roll).unwrap()).name == "quote-backend2" {
            v2 += 1;
        }
    }
    assert_eq!(v2, 10);
}

#[test]
fn f10_second_shadow_is_an_error_first_is_kept() {
    let o = load("10-");
    let e = with_code(&o, "second-shadow");
    assert_eq!(e.len(), 1);
    assert!(e[0].message.contains("myservice-shaddow"));
    let o = load_text(&without_doc(&fixture("10-"), 2), &Options::default());
    let g = o.graph.expect("valid");
    assert_eq!(get(&g, "h", "/myservice/a", &[]), Some("myservice"));
    let m = g
        .lookup(&RequestHead {
            host: "h",
            method: "GET",
            path: "/myservice/a",
            query: None,
            headers: &http::HeaderMap::new(),
        })
        .unwrap();
    let (shadow, pct) = m.group.shadow.expect("shadow");
    assert_eq!(g.route(shadow).name, "myservice-shadow");
    assert_eq!(pct, 100);
}

#[test]
fn f12_timeouts_load() {
    let o = load("12-");
    let g = o.graph.expect("valid");
    let Action::Forward(f) = &g.routes[0].action else {
        panic!()
    };
    assert!(f.timeout.is_some() && f.idle_timeout.is_some());
}

#[test]
fn f15_cors_comma_form_loads() {
    let o = load_text(&with_star_hostname(&fixture("15-")), &Options::default());
    assert!(o.is_ok(), "{:?}", errors(&o));
    assert!(
        with_code(&o, "not-implemented-yet").is_empty(),
        "cors is implemented: not warned"
    );
    let g = o.graph.expect("valid");
    let Action::Forward(f) = &g.routes[0].action else {
        panic!()
    };
    let cors = f.cors.as_ref().expect("cors compiled");
    assert!(cors.allows("http://foo.example") && cors.allows("http://bar.example"));
    assert!(!cors.allows("http://baz.example"));
    assert_eq!(cors.methods, ["POST", "GET", "OPTIONS"]);
    assert_eq!(cors.exposed_headers, ["X-Custom-Header"]);
    assert_eq!(cors.max_age, Some(86400));
    assert!(cors.credentials);
}

#[test]
fn f16_typo_fragments_and_duplicate() {
    let o = load("16-");
    let typo: Vec<_> = with_code(&o, "unknown-field")
        .into_iter()
        .filter(|d| d.message.contains("hosname"))
        .collect();
    assert_eq!(typo.len(), 1);
    assert_eq!(typo[0].help.as_deref(), Some("did you mean `hostname`?"));
    assert!(!with_code(&o, "not-a-resource").is_empty());
    let dup = with_code(&o, "duplicate-resource");
    assert_eq!(dup.len(), 2, "both locations named");
    assert!(dup[0].message.contains("minimal-host"));
    assert_ne!(dup[0].line, dup[1].line);
}

#[test]
fn f17_host_exact_and_regex() {
    let o = load("17-");
    let g = o.graph.expect("valid");
    assert_eq!(
        get(&g, "quote.datawire.io", "/backend/", &[]),
        Some("quote-backend-2")
    );
    assert_eq!(
        get(&g, "quote3.datawire.io", "/backend/", &[]),
        Some("quote-backend-3")
    );
    assert_eq!(get(&g, "quote1.datawire.io", "/backend/", &[]), None);
}

#[test]
fn f18_duplicate_then_header_routing() {
    let o = load("18-");
    assert_eq!(with_code(&o, "duplicate-resource").len(), 2);
    let text = with_star_hostname(&without_doc(&fixture("18-"), 3));
    let o = load_text(&text, &Options::default());
    let g = o.graph.expect("valid");
    assert_eq!(
        get(
            &g,
            "h",
            "/backend/",
            &[("x-quote-mode", "backend"), ("x-random-header", "datawire")]
        ),
        Some("quote-backend")
    );
    assert_eq!(
        get(&g, "h", "/backend/", &[("x-quote-mode", "anything")]),
        Some("quote-mode")
    );
    assert_eq!(get(&g, "h", "/backend/", &[]), Some("quote-regular"));
}

#[test]
fn f19_query_true_is_a_presence_test() {
    let text = with_star_hostname(&without_doc(&fixture("19-"), 3));
    let o = load_text(&text, &Options::default());
    let g = o.graph.expect("valid");
    assert_eq!(
        serve(
            &g,
            "h",
            "GET",
            "/backend/",
            Some("quote-mode=backend&random-query-parameter=datawire"),
            &[]
        ),
        Some("quote-backend")
    );
    assert_eq!(
        serve(&g, "h", "GET", "/backend/", Some("quote-mode=x"), &[]),
        Some("quote-mode")
    );
    assert_eq!(
        serve(&g, "h", "GET", "/backend/", Some("quote-mode"), &[]),
        Some("quote-mode")
    );
    assert_eq!(
        serve(&g, "h", "GET", "/backend/", None, &[]),
        Some("quote-regular")
    );
}

#[test]
fn f21_header_forms_and_variables() {
    let o = load("21-");
    assert!(o.is_ok(), "{:?}", errors(&o));
    // The two variables named in EXPECTATIONS.md are substituted by the proxy: no warning.
    assert!(with_code(&o, "header-variable")
        .iter()
        .all(|d| !d.message.contains("PROTOCOL") && !d.message.contains("WITHOUT_PORT")));
    let g = o.graph.unwrap();
    let mut appends = std::collections::HashSet::new();
    for r in &g.routes {
        if let Action::Forward(f) = &r.action {
            for h in &f.add_request_headers {
                appends.insert(h.append);
            }
        }
    }
    assert!(
        appends.contains(&true) && appends.contains(&false),
        "both forms present: {appends:?}"
    );
}

#[test]
fn f22_prefix_regex() {
    let o = load_text(&with_star_hostname(&fixture("22-")), &Options::default());
    let g = o.graph.expect("valid");
    assert_eq!(get(&g, "h", "/v1/qotm/x", &[]), Some("qotm"));
    assert_eq!(get(&g, "h", "/v2/qotm/x", &[]), Some("qotm"));
    assert_eq!(get(&g, "h", "/v3/qotm/x", &[]), None);
}

/// Every member of the group a request reaches, with its share, once the Host's insecure
/// action is applied (`secure`: the request came over TLS); or how it was turned away.
fn served(g: &Graph, host: &str, path: &str, secure: bool) -> Result<Vec<(String, u32)>, String> {
    let map = http::HeaderMap::new();
    let head = RequestHead {
        host,
        method: "GET",
        path,
        query: None,
        headers: &map,
    };
    match g.route_request(&head, legate::routes::Arrival::plain(secure)) {
        Routed::Route(m) => Ok(m
            .group
            .shares()
            .into_iter()
            .map(|(id, s)| (g.route(id).name.clone(), s))
            .collect()),
        other => Err(format!("{other:?}")),
    }
}

fn only(name: &str) -> Result<Vec<(String, u32)>, String> {
    Ok(vec![(name.to_string(), 100)])
}

fn doc(kind: &str, name: &str, labels: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n{spec}")
}

#[test]
fn rule10_canary_groups_follow_group_id() {
    // File 05's Hosts select `host: foo` / `host: bar`; two hostless canaries on one prefix.
    let text = fixture("05-")
        + &doc(
            "Mapping",
            "api-foo",
            "host: foo",
            "prefix: /api/\nservice: a",
        )
        + &doc(
            "Mapping",
            "api-bar",
            "host: bar",
            "prefix: /api/\nservice: b",
        )
        + &doc(
            "Mapping",
            "api-star",
            "",
            "hostname: '*'\nprefix: /api/\nservice: c",
        )
        + &doc("Mapping", "api-lost", "", "prefix: /api/\nservice: d");
    let o = load_text(&text, &Options::default());
    let g = o.graph.as_ref().expect("valid");
    // Each Host serves only its own hostless Mapping: two groups, not a 50/50 split. (The
    // unlabelled `*` Mapping is attached to no Host: both Hosts have selectors.)
    assert_eq!(
        served(g, "foo.example.com", "/api/x", true),
        only("api-foo")
    );
    assert_eq!(
        served(g, "bar.example.com", "/api/x", true),
        only("api-bar")
    );
    // The hostless, unselected Mapping joins no group and serves nothing.
    assert!(with_code(&o, "unreachable-mapping")
        .iter()
        .any(|d| d.message.contains("`api-lost`")));
    assert!(with_code(&o, "accidental-split").is_empty());
    // Same hostname and prefix, selected by different Hosts: still one group.
    assert_eq!(
        served(g, "foo.example.com", "/test/", true),
        only("star-backend-foo")
    );
}

#[test]
fn rule11_default_host_only_without_hosts() {
    // File 17 has no Host: the default Host serves its Mappings with a host.
    let o = load("17-");
    let g = o.graph.expect("valid");
    assert_eq!(
        served(&g, "quote.datawire.io", "/backend/", false),
        only("quote-backend-2")
    );
    // With a Host, an authority that matches none is not routed, whatever the Mappings' hosts.
    let text = fixture("17-")
        + &doc(
            "Host",
            "other",
            "",
            "hostname: other.example.com\nrequestPolicy: {insecure: {action: Route}}",
        );
    let o = load_text(&text, &Options::default());
    let g = o.graph.expect("valid");
    assert_eq!(
        served(&g, "quote.datawire.io", "/backend/", false),
        Err("NoRoute".into())
    );
}

#[test]
fn rule12_strict_selectors() {
    let text = fixture("05-")
        + &doc(
            "Mapping",
            "star-foo",
            "host: foo",
            "hostname: '*'\nprefix: /s/\nservice: a",
        );
    let o = load_text(&text, &Options::default());
    let g = o.graph.as_ref().expect("valid");
    assert_eq!(served(g, "foo.example.com", "/s/", true), only("star-foo"));
    // `*` overlaps bar's hostname, but bar's selector does not take the label.
    assert_eq!(
        served(g, "bar.example.com", "/s/", true),
        Err("NoRoute".into())
    );
    // Emissary's DISABLE_STRICT_LABEL_SELECTORS: the hostname alone is enough.
    let loose = Options {
        routing: legate::routes::RoutingOptions {
            loose_label_selectors: true,
            ..Default::default()
        },
        ..Options::default()
    };
    let g = load_text(&text, &loose).graph.expect("valid");
    assert_eq!(served(&g, "bar.example.com", "/s/", true), only("star-foo"));
}

#[test]
fn rule13_authority_header_and_star_host() {
    // File 17 with its exact `host` written as an exact `:authority` header routes the same.
    let text = fixture("17-").replace(
        "  host: quote.datawire.io\n",
        "  headers:\n    \":authority\": quote.datawire.io\n",
    );
    assert!(text.contains(":authority"));
    let g = load_text(&text, &Options::default()).graph.expect("valid");
    assert_eq!(
        get(&g, "quote.datawire.io", "/backend/", &[]),
        Some("quote-backend-2")
    );
    assert_eq!(get(&g, "quote1.datawire.io", "/backend/", &[]), None);
    // `host` is exact in v3alpha1: a `*` in it is an error.
    let text = fixture("17-").replace("host: quote.datawire.io", "host: '*.datawire.io'");
    let o = load_text(&text, &Options::default());
    let e = with_code(&o, "host-glob");
    assert_eq!(e.len(), 1);
    assert!(e[0]
        .message
        .contains("contains *, which cannot match anything"));
    assert!(!o.is_ok());
}

#[test]
fn rule14_insecure_default_redirect_and_reject() {
    // File 05's Hosts have no TLS and no requestPolicy: Redirect, warned.
    let o = load("05-");
    assert_eq!(with_code(&o, "insecure-default-redirect").len(), 2);
    let g = o.graph.expect("valid");
    assert_eq!(
        served(&g, "foo.example.com", "/test/", false),
        Err("RedirectToHttps".into())
    );
    // The Host comes before the Mapping with the same hostname line.
    let text = fixture("05-").replacen(
        "  hostname: bar.example.com\n",
        "  hostname: bar.example.com\n  requestPolicy:\n    insecure:\n      action: Reject\n",
        1,
    );
    let g = load_text(&text, &Options::default()).graph.expect("valid");
    assert_eq!(
        served(&g, "bar.example.com", "/test/", false),
        Err("Rejected".into())
    );
    assert_eq!(
        served(&g, "bar.example.com", "/test/", true),
        only("star-backend-bar")
    );
}

#[test]
fn rule15_unacted_fields_and_kinds_say_what_is_lost_and_v2_is_converted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emissary-compat");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let o = load_text(&std::fs::read_to_string(&f).unwrap(), &Options::default());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for d in &o.diagnostics {
            // Only the documented typo (`hosname`) is an unknown field.
            if d.code == "unknown-field" {
                assert!(name.starts_with("16-"), "{name}: {d}");
            }
            if matches!(d.code, "not-implemented" | "kind-not-implemented") {
                assert_eq!(d.severity, Severity::Warning, "{name}: {d}");
                assert!(
                    d.help.is_some(),
                    "{name}: says nothing of what is lost: {d}"
                );
            }
        }
    }
    // The canary example as getambassador.io/v2: converted with a note, and v2's missing
    // `host` is `hostname: "*"`, so it routes without the hostname rule 9 adds.
    let v2 = fixture("09-").replace("getambassador.io/v3alpha1", "getambassador.io/v2");
    let o = load_text(&v2, &Options::default());
    assert_eq!(with_code(&o, "converted").len(), 1, "{:?}", o.diagnostics);
    assert!(with_code(&o, "unreachable-mapping").is_empty());
    let g = o.graph.expect("valid");
    let m = g
        .lookup(&RequestHead {
            host: "x",
            method: "GET",
            path: "/backend/",
            query: None,
            headers: &http::HeaderMap::new(),
        })
        .unwrap();
    let v2_share = (0..100)
        .filter(|&roll| g.route(m.group.pick(roll).unwrap()).name == "quote-backend2")
        .count();
    assert_eq!(v2_share, 10);
}
