//! One-line descriptions of matches and actions, shared by `legate routes`, `legate diff` and
//! the admin API.

use std::fmt::Write as _;

use super::types::{header_ok, query_has};
use super::{
    Action, Graph, HostMatch, MethodMatch, PathMatch, RedirectPath, RequestHead, Rewrite, ValueTest,
};

/// Describe a route's match in one short line.
pub fn describe_match(g: &Graph, group: usize) -> String {
    let m = &g.groups[group].matcher;
    let mut s = String::new();
    if let Some(mm) = &m.method {
        match mm {
            MethodMatch::Exact(x) => {
                let _ = write!(s, "{x} ");
            }
            MethodMatch::Regex(r) => {
                let _ = write!(s, "~{} ", strip_anchor(r.as_str()));
            }
        }
    }
    match &m.path {
        PathMatch::Prefix(p) => s.push_str(&format!("{p}*")),
        PathMatch::Exact(p) => s.push_str(&format!("={p}")),
        PathMatch::Regex(r) => s.push_str(&format!("~{}", strip_anchor(r.as_str()))),
    }
    if !m.case_sensitive {
        s.push_str(" (any case)");
    }
    for h in &m.headers {
        let _ = write!(s, " [{}{}]", h.name, show(&h.test));
    }
    for q in &m.query {
        let _ = write!(s, " ?{}{}", q.name, show(&q.test));
    }
    s
}

fn strip_anchor(s: &str) -> &str {
    s.strip_prefix("^(?:")
        .and_then(|x| x.strip_suffix(")$"))
        .unwrap_or(s)
}

fn show(t: &ValueTest) -> String {
    match t {
        ValueTest::Exact(v) => format!("={v}"),
        ValueTest::Regex(r) => format!("~{}", strip_anchor(r.as_str())),
        ValueTest::Present => " present".into(),
    }
}

/// Why the group at `group` does not serve `req`: the first condition it fails, in the order
/// the matcher checks them (path, host, method, headers, query); `None` when it matches.
pub fn why_not(g: &Graph, group: usize, req: &RequestHead<'_>) -> Option<String> {
    let m = &g.groups[group].matcher;
    let path = req.path;
    let same = |a: &str, b: &str| {
        if m.case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    };
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => path.get(..p.len()).is_some_and(|head| same(head, p)),
        PathMatch::Exact(p) => same(path, p),
        PathMatch::Regex(r) => r.is_match(path),
    };
    if !path_ok {
        let what = match &m.path {
            PathMatch::Prefix(p) => format!("does not start with {p}"),
            PathMatch::Exact(p) => format!("is not {p}"),
            PathMatch::Regex(r) => format!("does not match ~{}", strip_anchor(r.as_str())),
        };
        let case = if m.case_sensitive { "" } else { " (any case)" };
        return Some(format!("path {path} {what}{case}"));
    }
    if !m.host.matches(req.host) {
        return Some(format!(
            "host {} does not match {}",
            req.host,
            host_of(&m.host)
        ));
    }
    if let Some(mm) = m.method.as_ref().filter(|mm| !mm.matches(req.method)) {
        let want = match mm {
            MethodMatch::Exact(x) => x.clone(),
            MethodMatch::Regex(r) => format!("~{}", strip_anchor(r.as_str())),
        };
        return Some(format!("method {} is not {want}", req.method));
    }
    if let Some(h) = m.headers.iter().find(|h| !header_ok(h, req)) {
        return Some(format!("header fails [{}{}]", h.name, show(&h.test)));
    }
    let q = req.query.unwrap_or("");
    if let Some(p) = m.query.iter().find(|p| !query_has(q, &p.name, &p.test)) {
        return Some(format!("query fails ?{}{}", p.name, show(&p.test)));
    }
    None
}

pub fn host_of(m: &HostMatch) -> String {
    match m {
        HostMatch::Any => "*".into(),
        HostMatch::Glob(p) => p.to_string(),
        HostMatch::Regex(r) => format!("~{}", strip_anchor(r.as_str())),
    }
}

/// What a route does, in one short line.
pub fn describe_action(a: &Action) -> String {
    match a {
        Action::Forward(f) => {
            let mut s = f.upstream.to_string();
            match &f.rewrite {
                Rewrite::Keep => {}
                Rewrite::Prefix(p) => {
                    let _ = write!(s, " rewrite={p}");
                }
                Rewrite::Regex {
                    pattern,
                    substitution,
                } => {
                    let _ = write!(s, " regex_rewrite={}=>{}", pattern.as_str(), substitution);
                }
            }
            s
        }
        Action::Redirect(r) => {
            let mut s = format!("redirect {}", r.status);
            if let Some(h) = &r.host {
                let _ = write!(s, " host={h}");
            }
            match &r.path {
                RedirectPath::Keep => {}
                RedirectPath::Replace(p) => {
                    let _ = write!(s, " path={p}");
                }
                RedirectPath::Prefix(p) => {
                    let _ = write!(s, " prefix={p}");
                }
                RedirectPath::Regex {
                    pattern,
                    substitution,
                } => {
                    let _ = write!(s, " regex={}=>{}", pattern.as_str(), substitution);
                }
            }
            s
        }
    }
}

/// The route table as JSON (also used by the admin API).
pub fn route_table_json(g: &Graph) -> serde_json::Value {
    let table = |groups: &[usize]| -> Vec<serde_json::Value> {
        groups
            .iter()
            .map(|&gi| {
                let grp = &g.groups[gi];
                serde_json::json!({
                    "match": describe_match(g, gi),
                    "host": host_of(&grp.matcher.host),
                    "precedence": grp.precedence,
                    "members": grp.shares().iter().map(|(id, share)| {
                        let r = g.route(*id);
                        serde_json::json!({"mapping": format!("{}/{}", r.namespace, r.name), "weight": share, "action": describe_action(&r.action), "source": r.source})
                    }).collect::<Vec<_>>(),
                    "shadow": grp.shadow.map(|(id, pct)| {
                        let r = g.route(id);
                        serde_json::json!({"mapping": format!("{}/{}", r.namespace, r.name), "percent": pct, "action": describe_action(&r.action)})
                    }),
                })
            })
            .collect()
    };
    serde_json::json!({
        "hash": g.hash,
        "hosts": g.hosts.iter().enumerate().map(|(i, h)| serde_json::json!({
            "host": format!("{}/{}", h.namespace, h.name),
            "hostname": h.hostname.to_string(),
            "tls_secret": h.tls_secret.as_ref().map(|s| s.name.clone()),
            "insecure": format!("{:?}", h.insecure),
            "routes": table(&g.tables[i].groups),
        })).collect::<Vec<_>>(),
        "fallback": table(&g.tables[g.hosts.len()].groups),
    })
}

#[cfg(test)]
mod why_not_tests {
    use super::*;
    use crate::config::{load_and_compile, MemTree, Options};

    fn graph(mappings: &[&str]) -> std::sync::Arc<Graph> {
        let yaml: String = mappings
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                format!("---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {{name: m{i}}}\nspec: {spec}\n")
            })
            .collect();
        let o = load_and_compile(
            &MemTree::new().with("c.yaml", yaml.as_str()),
            &Options::default(),
        );
        o.graph.unwrap_or_else(|| panic!("{:?}", o.diagnostics))
    }

    /// The first condition a group fails is named, in the matcher's order.
    #[test]
    fn names_the_first_failing_condition() {
        let g = graph(&[
            "{hostname: \"*\", prefix: /api/, service: a}",
            "{hostname: \"*\", prefix: /x/, method: POST, service: b}",
            "{hostname: \"*\", prefix: /x/, headers: {x-v: \"2\"}, service: c}",
            "{hostname: api.test, prefix: /x/, service: d}",
            "{hostname: \"*\", prefix: /X/, case_sensitive: false, query_parameters: {q: \"1\"}, service: e}",
        ]);
        let headers = http::HeaderMap::new();
        let head = RequestHead {
            host: "web.test",
            method: "GET",
            path: "/x/1",
            query: None,
            headers: &headers,
        };
        let group_of = |svc: &str| {
            g.routes
                .iter()
                .find(|r| describe_action(&r.action).contains(svc))
                .map(|r| r.group)
                .unwrap()
        };
        let why = |svc: &str| why_not(&g, group_of(svc), &head);
        assert_eq!(
            why("//a:").as_deref(),
            Some("path /x/1 does not start with /api/")
        );
        assert_eq!(why("//b:").as_deref(), Some("method GET is not POST"));
        assert_eq!(why("//c:").as_deref(), Some("header fails [x-v=2]"));
        assert_eq!(
            why("//d:").as_deref(),
            Some("host web.test does not match api.test")
        );
        assert_eq!(why("//e:").as_deref(), Some("query fails ?q=1"));
        let with_q = RequestHead {
            query: Some("q=1"),
            ..head
        };
        assert_eq!(why_not(&g, group_of("//e:"), &with_q), None);
    }
}
