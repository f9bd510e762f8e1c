//! Route tests: `RouteTest` resources state what the compiled routes must do with given
//! requests. They run against the compiled graph with the same lookup, rewrite and redirect
//! code as the proxy, in `legate check` and before the gateway applies a revision.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::diag::Diagnostic;
use super::model::{Resource, Spec};
use crate::routes::{Action, Arrival, Graph, RequestHead, RouteId, Routed};

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RouteTestSpec {
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Case {
    #[serde(default)]
    pub name: Option<String>,
    pub request: TestRequest,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct TestRequest {
    pub method: Option<String>,
    pub host: Option<String>,
    pub path: String,
    pub query: Option<Query>,
    pub headers: BTreeMap<String, String>,
    pub tls: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Query {
    Raw(String),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Expect {
    pub mapping: Option<String>,
    pub upstream: Option<String>,
    pub path: Option<String>,
    pub redirect: Option<String>,
    pub status: Option<u16>,
    #[serde(rename = "noRoute")]
    pub no_route: Option<bool>,
}

/// What the gateway does with a request, as far as a route test can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    NoRoute,
    /// The request is refused with 400 (a malformed path, an escaped slash).
    BadRequest(&'static str),
    InsecureRejected,
    Redirect {
        status: u16,
        location: String,
        mapping: Option<String>,
    },
    Forward {
        mapping: String,
        upstream: String,
        path: String,
    },
}

/// Run every RouteTest against `graph`; each failing case is an error at the case.
pub fn run<'r>(
    graph: &Graph,
    resources: impl IntoIterator<Item = &'r Resource>,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in resources {
        let Spec::RouteTest(t) = &r.spec else {
            continue;
        };
        for (i, case) in t.cases.iter().enumerate() {
            let failures = check_case(graph, case);
            if failures.is_empty() {
                continue;
            }
            let label = case
                .name
                .clone()
                .unwrap_or_else(|| format!("case {}", i + 1));
            out.push(
                Diagnostic::error(
                    "route-test-failed",
                    &r.at(&format!("/spec/cases/{i}")),
                    format!("RouteTest `{}` {label}: {}", r.name, failures.join("; ")),
                )
                .with_help("fix the routes, or update the test if the change is intended"),
            );
        }
    }
    out
}

/// Route one test request the way the proxy would.
pub fn simulate(graph: &Graph, req: &TestRequest) -> Vec<Verdict> {
    let host = req
        .host
        .as_deref()
        .unwrap_or("localhost")
        .to_ascii_lowercase();
    let method = req.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let query = match &req.query {
        None => None,
        Some(Query::Raw(s)) => Some(s.trim_start_matches('?').to_string()),
        Some(Query::Map(m)) => Some(
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&"),
        ),
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in &req.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.append(n, v);
        }
    }
    // The proxy's normalizer, so a case sees the path the gateway routes on.
    let normalized = match crate::routes::path::normalize(&req.path, graph.normalize_options()) {
        Ok(n) => n,
        Err(crate::routes::path::PathError::NotAbsolute) => return vec![Verdict::NoRoute],
        Err(crate::routes::path::PathError::BadEscape) => {
            return vec![Verdict::BadRequest(
                "malformed percent-encoding in the path",
            )]
        }
    };
    let path: &str = &normalized.path;
    let host_route = graph.host_for(&host);
    // By default a request arrives the way its Host serves it: over TLS when the Host has TLS.
    let tls = req
        .tls
        .unwrap_or_else(|| host_route.is_some_and(|h| h.tls_secret.is_some()));
    let head = RequestHead {
        host: &host,
        method: &method,
        path,
        query: query.as_deref(),
        headers: &headers,
    };
    // Over TLS the client's SNI is the host name, as a browser sends it.
    let sni = crate::routes::split_port(&host).0;
    let via = Arrival {
        secure: tls,
        tls_sni: tls.then_some(Some(sni)),
        listener: None,
    };
    let m = match graph.route_request(&head, via) {
        Routed::Route(m) => m,
        Routed::NoRoute => return vec![Verdict::NoRoute],
        Routed::Rejected => return vec![Verdict::InsecureRejected],
        Routed::RedirectToHttps => {
            let name = crate::routes::split_port(&host).0;
            let mut loc = format!("https://{name}{path}");
            if let Some(q) = &query {
                loc.push('?');
                loc.push_str(q);
            }
            return vec![Verdict::Redirect {
                status: 301,
                location: loc,
                mapping: None,
            }];
        }
    };
    let scheme = if tls { "https" } else { "http" };
    let refuse_slash = normalized.escaped_slash
        && graph.normalize_options().escaped_slashes == crate::routes::path::EscapedSlashes::Reject;
    m.group
        .shares()
        .into_iter()
        .filter(|(_, share)| *share > 0)
        .map(|(id, _)| {
            let allowed =
                matches!(&graph.route(id).action, Action::Forward(f) if f.allow_escaped_slashes);
            if refuse_slash && !allowed {
                return Verdict::BadRequest("escaped slash in the path (allow_escaped_slashes)");
            }
            verdict_for(graph, id, scheme, &host, path, query.as_deref())
        })
        .collect()
}

fn verdict_for(
    graph: &Graph,
    id: RouteId,
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
) -> Verdict {
    let route = graph.route(id);
    let mapping = format!("{}/{}", route.namespace, route.name);
    match &route.action {
        Action::Redirect(_) => {
            let (status, location) = route
                .redirect_location(scheme, host, path, query)
                .unwrap_or((301, String::new()));
            Verdict::Redirect {
                status,
                location,
                mapping: Some(mapping),
            }
        }
        Action::Forward(f) => Verdict::Forward {
            mapping,
            upstream: f.upstream.to_string(),
            path: route.upstream_path(path, query).unwrap_or_default(),
        },
    }
}

fn same_mapping(want: &str, got: &str) -> bool {
    if want.contains('/') {
        want == got
    } else {
        got.rsplit('/').next() == Some(want)
    }
}

fn same_upstream(want: &str, got: &str) -> bool {
    // `got` is always `scheme://host:port`; accept `host:port` and `scheme://host:port`.
    want == got || got.split_once("://").is_some_and(|(_, a)| a == want)
}

fn show(v: &Verdict) -> String {
    match v {
        Verdict::NoRoute => "no route (404)".into(),
        Verdict::BadRequest(why) => format!("bad request (400): {why}"),
        Verdict::InsecureRejected => {
            "no route (404): the Host rejects cleartext (`insecure.action: Reject`)".into()
        }
        Verdict::Redirect {
            status,
            location,
            mapping,
        } => match mapping {
            Some(m) => format!("{status} redirect to {location} by {m}"),
            None => format!("{status} redirect to {location} (Host insecure policy)"),
        },
        Verdict::Forward {
            mapping,
            upstream,
            path,
        } => format!("{mapping} -> {upstream}{path}"),
    }
}

/// The reasons a case fails (empty: it passes).
fn check_case(graph: &Graph, case: &Case) -> Vec<String> {
    let verdicts = simulate(graph, &case.request);
    let e = &case.expect;
    let got = || verdicts.iter().map(show).collect::<Vec<_>>().join(" | ");
    if e.no_route == Some(true) {
        // A Host's `Reject` is a 404 too, as in Emissary.
        return if matches!(
            verdicts.as_slice(),
            [Verdict::NoRoute] | [Verdict::InsecureRejected]
        ) {
            Vec::new()
        } else {
            vec![format!("expected no route, got {}", got())]
        };
    }
    // With a canary group, the case names a member or every member must satisfy it.
    let candidates: Vec<&Verdict> = match &e.mapping {
        Some(want) => {
            let hit: Vec<&Verdict> = verdicts
                .iter()
                .filter(|v| match v {
                    Verdict::Forward { mapping, .. } => same_mapping(want, mapping),
                    Verdict::Redirect {
                        mapping: Some(m), ..
                    } => same_mapping(want, m),
                    _ => false,
                })
                .collect();
            if hit.is_empty() {
                return vec![format!("expected Mapping `{want}`, got {}", got())];
            }
            hit
        }
        None => verdicts.iter().collect(),
    };
    let mut failures = Vec::new();
    for v in candidates {
        let mut bad = Vec::new();
        match v {
            Verdict::Forward { upstream, path, .. } => {
                if let Some(u) = &e.upstream {
                    if !same_upstream(u, upstream) {
                        bad.push(format!("expected upstream `{u}`"));
                    }
                }
                if let Some(p) = &e.path {
                    if p != path {
                        bad.push(format!("expected upstream path `{p}`"));
                    }
                }
                if e.redirect.is_some() || e.status.is_some() {
                    bad.push("expected a redirect".into());
                }
            }
            Verdict::Redirect {
                status, location, ..
            } => {
                if let Some(l) = &e.redirect {
                    if l != location {
                        bad.push(format!("expected redirect to `{l}`"));
                    }
                }
                if let Some(s) = e.status {
                    if s != *status {
                        bad.push(format!("expected status {s}"));
                    }
                }
                if e.upstream.is_some() || e.path.is_some() {
                    bad.push("expected the request to be forwarded".into());
                }
            }
            Verdict::NoRoute | Verdict::InsecureRejected | Verdict::BadRequest(_) => {
                bad.push("expected the request to be served".into());
            }
        }
        if !bad.is_empty() {
            failures.push(format!("{}, got {}", bad.join(" and "), show(v)));
        }
    }
    failures
}
