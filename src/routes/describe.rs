//! One-line descriptions of matches and actions, shared by `legate routes`, `legate diff` and
//! the admin API.

use std::fmt::Write as _;

use super::{Action, Graph, HostMatch, MethodMatch, PathMatch, RedirectPath, Rewrite, ValueTest};

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
