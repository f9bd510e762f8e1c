//! `compile`: validated resources -> one immutable `routes::Graph`.
//!
//! Implements Emissary's semantics: canary groups (Mappings with the same match), weights
//! (unweighted members share what the weighted ones leave), one shadow per group, route
//! order (precedence, prefix length, header and query constraint lengths, prefix, method),
//! and Host association (a Mapping's hostname glob overlaps the Host's, or the Host's
//! mappingSelector selects its labels). Collects every problem; pure.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use sha2::{Digest, Sha256};

use super::diag::Diagnostic;
use super::model::{AddedHeader, HostSpec, MappingSpec, MatchValue, RegexSubst, Resource, Spec};
use crate::routes::{
    Action, AddHeader, Forward, Graph, Group, HostMatch, HostPattern, HostRoute, InsecureAction,
    MethodMatch, PathMatch, Redirect, RedirectPath, Rewrite, Route, RouteId, RouteMatch, Scheme,
    SecretRef, Upstream, ValueMatch, ValueTest,
};

/// Emissary's default request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 3000;
/// Emissary's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3000;
/// Compiled regexes are bounded so a hostile pattern cannot take unbounded memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A Mapping compiled on its own, before grouping.
struct Compiled<'r> {
    res: &'r Resource,
    spec: &'r MappingSpec,
    matcher: RouteMatch,
    action: Action,
    /// Canonical text of the match: members of one group share it.
    group_key: String,
    /// Emissary's route weight: (precedence, prefix length, header length, query length).
    order: (i64, usize, usize, usize, String, String),
    /// The host glob used for Host association, if the Mapping names one.
    assoc_glob: Option<HostPattern>,
    /// For host_redirect Mappings without a hostname: the redirect target, for association.
    redirect_assoc: Option<HostPattern>,
    host_regex: bool,
}

/// Compile resources into a graph. The graph is only meaningful when no diagnostic is an error.
pub fn compile(resources: &[Resource]) -> (Graph, Vec<Diagnostic>) {
    compile_refs(&resources.iter().collect::<Vec<_>>())
}

/// `compile` over borrowed resources (a subset, for skip-invalid mode).
pub fn compile_refs(resources: &[&Resource]) -> (Graph, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut mappings: Vec<Compiled<'_>> = Vec::new();
    let mut hosts: Vec<(&Resource, &HostSpec)> = Vec::new();
    for &r in resources {
        match &r.spec {
            Spec::Mapping(m) => {
                if let Some(c) = compile_mapping(r, m, &mut diags) {
                    mappings.push(c);
                }
            }
            Spec::Host(h) => hosts.push((r, h)),
            Spec::RouteTest(_) | Spec::AuthService(_) | Spec::JwtPolicy(_) | Spec::RateLimit(_) => {
            }
        }
    }
    // Stable route ids: by namespace/name.
    mappings.sort_by(|a, b| (&a.res.namespace, &a.res.name).cmp(&(&b.res.namespace, &b.res.name)));

    // Group by match.
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, m) in mappings.iter().enumerate() {
        by_key.entry(m.group_key.as_str()).or_default().push(i);
    }
    let mut group_list: Vec<Vec<usize>> = by_key.into_values().collect();
    // Match order: Emissary's route weight, descending; then the first member's name.
    group_list.sort_by(|a, b| {
        let (x, y) = (&mappings[a[0]], &mappings[b[0]]);
        y.order
            .cmp(&x.order)
            .then_with(|| x.group_key.cmp(&y.group_key))
    });

    let mut routes: Vec<Route> = Vec::with_capacity(mappings.len());
    let mut route_of: Vec<usize> = vec![0; mappings.len()];
    for (i, m) in mappings.iter().enumerate() {
        route_of[i] = routes.len();
        routes.push(Route {
            id: RouteId(routes.len()),
            name: m.res.name.clone(),
            namespace: m.res.namespace.clone(),
            source: format!("{}:{}", m.res.loc.file, m.res.loc.line),
            stats_name: m
                .spec
                .stats_name
                .clone()
                .unwrap_or_else(|| m.res.name.clone()),
            matcher: m.matcher.clone(),
            precedence: m.spec.precedence,
            action: m.action.clone(),
            group: 0,
        });
    }

    let mut groups: Vec<Group> = Vec::with_capacity(group_list.len());
    let mut group_members: Vec<Vec<usize>> = Vec::with_capacity(group_list.len());
    for members in group_list {
        let gi = groups.len();
        for &m in &members {
            routes[route_of[m]].group = gi;
        }
        let first = &mappings[members[0]];
        let group = build_group(&mappings, &members, &route_of, &mut diags);
        groups.push(Group {
            members: group.0,
            shadow: group.1,
            matcher: first.matcher.clone(),
            precedence: first.spec.precedence,
            serves_without_host: members
                .iter()
                .any(|&m| mappings[m].assoc_glob.is_some() || mappings[m].host_regex),
        });
        group_members.push(members);
    }

    // Hosts and association.
    let mut host_routes = Vec::new();
    let mut selected = vec![false; mappings.len()];
    let mut hosts_sorted = hosts;
    hosts_sorted.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    for (r, h) in hosts_sorted {
        let Some(mut hr) = compile_host(r, h, &mut diags) else {
            continue;
        };
        let selector = h.mapping_selector.as_ref().or(h.selector.as_ref());
        for (gi, members) in group_members.iter().enumerate() {
            let mut assoc = false;
            for &m in members {
                let c = &mappings[m];
                let host_match = c.host_regex
                    || c.assoc_glob
                        .as_ref()
                        .is_some_and(|g| g.overlaps(&hr.hostname))
                    || c.redirect_assoc
                        .as_ref()
                        .is_some_and(|g| g.overlaps(&hr.hostname));
                let sel_match = selector.is_some_and(|s| !s.is_empty() && s.matches(&c.res.labels));
                if host_match || sel_match {
                    selected[m] = true;
                }
                assoc |= host_match || sel_match;
            }
            if assoc {
                hr.groups.push(gi);
            }
        }
        host_routes.push(hr);
    }

    // Emissary's silent trap: a Mapping with no hostname that no Host selects serves nothing.
    for (i, m) in mappings.iter().enumerate() {
        if m.assoc_glob.is_none() && !m.host_regex && !selected[i] {
            diags.push(
                Diagnostic::warning(
                    "unreachable-mapping",
                    &m.res.at("/spec"),
                    format!(
                        "Mapping `{}` has no hostname and no Host selects it, so it serves no traffic",
                        m.res.name
                    ),
                )
                .with_help("add `hostname: \"*\"` to serve every host, or labels that a Host's mappingSelector selects"),
            );
        }
    }

    crate::policy::attach(resources, &mut routes, &host_routes, &groups, &mut diags);
    let hash = graph_hash(&host_routes, &routes, &groups);
    (Graph::build(host_routes, routes, groups, hash), diags)
}

type Members = (Vec<(RouteId, u32)>, Option<(RouteId, u32)>);

/// Weights and shadow of one group.
fn build_group(
    mappings: &[Compiled<'_>],
    members: &[usize],
    route_of: &[usize],
    diags: &mut Vec<Diagnostic>,
) -> Members {
    let mut shadow: Option<(RouteId, u32)> = None;
    let mut live: Vec<usize> = Vec::new();
    for &m in members {
        let c = &mappings[m];
        if c.spec.shadow {
            if let Some((first, _)) = shadow {
                let first_name = mappings
                    .iter()
                    .enumerate()
                    .find(|(i, _)| route_of[*i] == first.0)
                    .map(|(_, c)| c.res.name.as_str())
                    .unwrap_or("?");
                diags.push(
                    Diagnostic::error(
                        "second-shadow",
                        &c.res.at("/spec/shadow"),
                        format!(
                            "Mapping `{}` is a second shadow for `{}`; a match group has at most one shadow (`{first_name}` is already one)",
                            c.res.name,
                            c.spec.prefix
                        ),
                    )
                    .with_help("remove `shadow: true` from one of them, or give them different matches"),
                );
            } else {
                shadow = Some((RouteId(route_of[m]), c.spec.weight.unwrap_or(100).min(100)));
            }
        } else {
            live.push(m);
        }
    }
    if live.is_empty() {
        return (Vec::new(), shadow);
    }
    // Redirect and forward members cannot share a group: which answers would be random.
    let redirects = live
        .iter()
        .filter(|&&m| matches!(mappings[m].action, Action::Redirect(_)))
        .count();
    if redirects > 0 && redirects < live.len() {
        for &m in &live {
            let c = &mappings[m];
            diags.push(
                Diagnostic::error(
                    "conflicting-group",
                    &c.res.at("/spec"),
                    format!(
                        "Mapping `{}` shares its match with Mappings of which some redirect and some forward",
                        c.res.name
                    ),
                )
                .with_help("give the redirect its own match (another prefix, host or header)"),
            );
        }
    }
    let weighted: u32 = live.iter().filter_map(|&m| mappings[m].spec.weight).sum();
    let unweighted: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&m| mappings[m].spec.weight.is_none())
        .collect();
    if weighted > 100 {
        for &m in &live {
            let c = &mappings[m];
            if c.spec.weight.is_some() {
                diags.push(
                    Diagnostic::error(
                        "weights-over-100",
                        &c.res.at("/spec/weight"),
                        format!(
                            "the weights of the Mappings matching `{}` add up to {weighted}, over 100",
                            c.spec.prefix
                        ),
                    )
                    .with_help("make the weights of one match group add up to at most 100"),
                );
            }
        }
    }
    if unweighted.len() > 1 {
        let names: Vec<&str> = unweighted
            .iter()
            .map(|&m| mappings[m].res.name.as_str())
            .collect();
        let c = &mappings[unweighted[1]];
        diags.push(
            Diagnostic::warning(
                "accidental-split",
                &c.res.at("/spec"),
                format!(
                    "Mappings {} have the same match and no weight, so they split traffic evenly",
                    names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .with_help("give each a `weight`, or make the matches differ if this was not a canary"),
        );
    }
    // Shares in percent, in member order.
    let mut shares: Vec<(usize, u32)> = Vec::new();
    if !unweighted.is_empty() {
        let rest = 100u32.saturating_sub(weighted);
        let n = unweighted.len() as u32;
        let mut k = 0u32;
        for &m in &live {
            match mappings[m].spec.weight {
                Some(w) => shares.push((m, w)),
                None => {
                    shares.push((m, rest / n + u32::from(k < rest % n)));
                    k += 1;
                }
            }
        }
    } else if weighted == 0 {
        let c = &mappings[live[0]];
        diags.push(Diagnostic::warning(
            "zero-weight",
            &c.res.at("/spec/weight"),
            format!(
                "every Mapping matching `{}` has weight 0: none takes traffic",
                c.spec.prefix
            ),
        ));
        return (Vec::new(), shadow);
    } else {
        // Emissary normalizes weights that do not add up to 100.
        let mut acc = 0;
        for (idx, &m) in live.iter().enumerate() {
            let w = mappings[m].spec.weight.unwrap_or(0);
            let share = if idx + 1 == live.len() {
                100 - acc
            } else {
                (w * 100).checked_div(weighted).unwrap_or(0)
            };
            acc += share;
            shares.push((m, share));
        }
    }
    let mut cum = 0;
    let mut out = Vec::new();
    for (m, s) in shares {
        cum += s;
        out.push((RouteId(route_of[m]), cum.min(100)));
    }
    (out, shadow)
}

fn compile_mapping<'r>(
    res: &'r Resource,
    spec: &'r MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<Compiled<'r>> {
    let before = diags
        .iter()
        .filter(|d| d.severity == super::Severity::Error)
        .count();
    let case_sensitive = spec.case_sensitive.unwrap_or(true);
    let err =
        |diags: &mut Vec<Diagnostic>, ptr: &str, code: &'static str, msg: String, help: &str| {
            diags.push(Diagnostic::error(code, &res.at(ptr), msg).with_help(help.to_string()));
        };

    // Path.
    let path = if spec.prefix_regex {
        match build_regex(&spec.prefix, !case_sensitive, true) {
            Ok(r) => Some(PathMatch::Regex(r)),
            Err(e) => {
                err(
                    diags,
                    "/spec/prefix",
                    "bad-regex",
                    format!("prefix regex does not compile: {}", regex_error(&e)),
                    "fix the regular expression (RE2 syntax: no look-around or backreferences)",
                );
                None
            }
        }
    } else {
        if !spec.prefix.starts_with('/') {
            err(
                diags,
                "/spec/prefix",
                "bad-prefix",
                format!("prefix `{}` does not start with `/`", spec.prefix),
                "write the path prefix starting with `/`, as in `/api/`",
            );
        }
        Some(if spec.prefix_exact {
            PathMatch::Exact(spec.prefix.clone())
        } else {
            PathMatch::Prefix(spec.prefix.clone())
        })
    };

    // Host at the route level, and the glob used for Host association.
    let mut assoc_glob = None;
    let mut host_regex = false;
    let host = if let Some(h) = &spec.hostname {
        if spec.host.is_some() {
            diags.push(
                Diagnostic::warning(
                    "host-and-hostname",
                    &res.at("/spec/host"),
                    "both `hostname` and `host` are set; `host` is ignored",
                )
                .with_help("keep `hostname` (`host` is its deprecated form)"),
            );
        }
        match host_glob(res, "/spec/hostname", h, diags) {
            Ok(p) => {
                assoc_glob = Some(p.clone());
                if p == HostPattern::Any {
                    HostMatch::Any
                } else {
                    HostMatch::Glob(p)
                }
            }
            Err(e) => {
                err(diags, "/spec/hostname", "bad-hostname", format!("hostname is not a valid host glob: {e}"), "use a host name, `*`, or a glob with one `*` at the start (`*.example.com`) or end");
                HostMatch::Any
            }
        }
    } else if let Some(h) = &spec.host {
        if spec.host_regex {
            host_regex = true;
            match build_regex(h, true, true) {
                Ok(r) => HostMatch::Regex(r),
                Err(e) => {
                    err(
                        diags,
                        "/spec/host",
                        "bad-regex",
                        format!("host regex does not compile: {}", regex_error(&e)),
                        "fix the regular expression",
                    );
                    HostMatch::Any
                }
            }
        } else {
            match host_glob(res, "/spec/host", h, diags) {
                Ok(p) => {
                    assoc_glob = Some(p.clone());
                    HostMatch::Glob(p)
                }
                Err(e) => {
                    err(
                        diags,
                        "/spec/host",
                        "bad-hostname",
                        format!("host is not a valid host name: {e}"),
                        "use a host name such as `api.example.com`",
                    );
                    HostMatch::Any
                }
            }
        }
    } else {
        HostMatch::Any
    };
    // Emissary associates a host_redirect Mapping with Hosts through its target host too; that
    // glob is used for association only, the route still matches any authority.
    let redirect_assoc = if assoc_glob.is_none() && !host_regex && spec.host_redirect {
        redirect_target(&spec.service).ok().and_then(|t| {
            t.split(':')
                .next()
                .and_then(|h| h.parse::<HostPattern>().ok())
        })
    } else {
        None
    };

    let method = match &spec.method {
        None => None,
        Some(m) if spec.method_regex => match build_regex(m, false, true) {
            Ok(r) => Some(MethodMatch::Regex(r)),
            Err(e) => {
                err(
                    diags,
                    "/spec/method",
                    "bad-regex",
                    format!("method regex does not compile: {}", regex_error(&e)),
                    "fix the regular expression",
                );
                None
            }
        },
        Some(m) => Some(MethodMatch::Exact(m.to_ascii_uppercase())),
    };

    let headers = value_matches(
        res,
        "headers",
        &spec.headers,
        &spec.regex_headers,
        true,
        diags,
    );
    let query = value_matches(
        res,
        "query_parameters",
        &spec.query_parameters,
        &spec.regex_query_parameters,
        false,
        diags,
    );

    // Action.
    let redirect_fields = spec.path_redirect.is_some()
        || spec.prefix_redirect.is_some()
        || spec.regex_redirect.is_some();
    let action = if spec.host_redirect {
        let target = match redirect_target(&spec.service) {
            Ok(t) => Some(t),
            Err(e) => {
                err(
                    diags,
                    "/spec/service",
                    "bad-service",
                    format!("redirect target `{}` is not a host: {e}", spec.service),
                    "with host_redirect, `service` is the host (and port) to redirect to",
                );
                None
            }
        };
        let mut n = 0;
        let path = if let Some(p) = &spec.path_redirect {
            n += 1;
            RedirectPath::Replace(p.clone())
        } else {
            RedirectPath::Keep
        };
        let path = if let Some(p) = &spec.prefix_redirect {
            n += 1;
            RedirectPath::Prefix(p.clone())
        } else {
            path
        };
        let path = if let Some(rs) = &spec.regex_redirect {
            n += 1;
            match regex_subst(rs) {
                Ok((pattern, substitution)) => RedirectPath::Regex {
                    pattern,
                    substitution,
                },
                Err(e) => {
                    err(
                        diags,
                        "/spec/regex_redirect/pattern",
                        "bad-regex",
                        format!(
                            "regex_redirect pattern does not compile: {}",
                            regex_error(&e)
                        ),
                        "fix the regular expression",
                    );
                    path
                }
            }
        } else {
            path
        };
        if n > 1 {
            err(
                diags,
                "/spec/host_redirect",
                "conflicting-redirect",
                "more than one of path_redirect, prefix_redirect and regex_redirect is set".into(),
                "keep one of them",
            );
        }
        target.map(|host| {
            Action::Redirect(Redirect {
                host: Some(host),
                path,
                status: spec.redirect_response_code.unwrap_or(301),
            })
        })
    } else {
        if redirect_fields || spec.redirect_response_code.is_some() {
            diags.push(
                Diagnostic::warning(
                    "redirect-without-host-redirect",
                    &res.at("/spec"),
                    "redirect fields are ignored because `host_redirect` is not true",
                )
                .with_help(
                    "set `host_redirect: true` (and `service` to the target host) to redirect",
                ),
            );
        }
        compile_forward(res, spec, diags).map(|f| Action::Forward(Box::new(f)))
    };

    let errors_now = diags
        .iter()
        .filter(|d| d.severity == super::Severity::Error)
        .count();
    let (path, action) = match (path, action) {
        (Some(p), Some(a)) if errors_now == before => (p, a),
        _ => return None,
    };

    // Emissary's route weight (irhttpmapping.py `_route_weight`).
    let mut hdr_len = 0usize;
    for h in &headers {
        hdr_len += h.name.len() + test_len(&h.test);
    }
    match &host {
        HostMatch::Any => {}
        HostMatch::Glob(p) => hdr_len += ":authority".len() + p.to_string().len(),
        HostMatch::Regex(r) => hdr_len += ":authority".len() + r.as_str().len() + 1,
    }
    if let Some(m) = &spec.method {
        hdr_len += ":method".len() + m.len() + usize::from(spec.method_regex);
    }
    let q_len: usize = query.iter().map(|q| q.name.len() + test_len(&q.test)).sum();
    let order = (
        spec.precedence,
        spec.prefix.len(),
        hdr_len,
        q_len,
        spec.prefix.clone(),
        spec.method.clone().unwrap_or_else(|| "GET".into()),
    );
    let matcher = RouteMatch {
        path,
        case_sensitive,
        host,
        method,
        headers,
        query,
    };
    let group_key = match_key(&matcher, spec);
    Some(Compiled {
        res,
        spec,
        matcher,
        action,
        group_key,
        order,
        assoc_glob,
        redirect_assoc,
        host_regex,
    })
}

/// Parse a hostname glob; Emissary also accepts `name:port`, which Legate matches by name only.
fn host_glob(
    res: &Resource,
    ptr: &str,
    raw: &str,
    diags: &mut Vec<Diagnostic>,
) -> Result<HostPattern, String> {
    let (name, port) = match raw.rsplit_once(':') {
        Some((n, p))
            if !n.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (n, Some(p))
        }
        _ => (raw, None),
    };
    let pat = name.parse::<HostPattern>()?;
    if port.is_some() {
        diags.push(
            Diagnostic::warning(
                "hostname-port",
                &res.at(ptr),
                format!(
                    "the port in `{raw}` is ignored: Legate matches host names without the port"
                ),
            )
            .with_help(format!(
                "write `{name}`; to tell ports apart, use separate listeners"
            )),
        );
    }
    Ok(pat)
}

fn test_len(t: &ValueTest) -> usize {
    match t {
        ValueTest::Exact(v) => v.len(),
        // The regex source minus our anchors, plus one as Emissary counts regexes.
        ValueTest::Regex(r) => r.as_str().len().saturating_sub(6) + 1,
        ValueTest::Present => 0,
    }
}

fn match_key(m: &RouteMatch, spec: &MappingSpec) -> String {
    let mut k = String::new();
    let _ = write!(
        k,
        "{}|{}|{}|{}|",
        match &m.path {
            PathMatch::Prefix(_) => "prefix",
            PathMatch::Exact(_) => "exact",
            PathMatch::Regex(_) => "regex",
        },
        spec.prefix,
        m.case_sensitive,
        spec.precedence
    );
    match &m.host {
        HostMatch::Any => k.push('*'),
        HostMatch::Glob(p) => {
            let _ = write!(k, "g:{p}");
        }
        HostMatch::Regex(r) => {
            let _ = write!(k, "r:{}", r.as_str());
        }
    }
    let _ = write!(
        k,
        "|{:?}|",
        m.method.as_ref().map(|mm| match mm {
            MethodMatch::Exact(s) => format!("={s}"),
            MethodMatch::Regex(r) => format!("~{}", r.as_str()),
        })
    );
    for list in [&m.headers, &m.query] {
        for v in list {
            let _ = write!(k, "{}{};", v.name, show_test(&v.test));
        }
        k.push('|');
    }
    k
}

fn show_test(t: &ValueTest) -> String {
    match t {
        ValueTest::Exact(v) => format!("={v}"),
        ValueTest::Regex(r) => format!("~{}", r.as_str()),
        ValueTest::Present => "?".into(),
    }
}

fn value_matches(
    res: &Resource,
    field: &str,
    exact: &BTreeMap<String, MatchValue>,
    regex: &BTreeMap<String, String>,
    is_header: bool,
    diags: &mut Vec<Diagnostic>,
) -> Vec<ValueMatch> {
    let regex_field = if is_header {
        "regex_headers"
    } else {
        "regex_query_parameters"
    };
    let mut out = Vec::new();
    let name_ok = |n: &str| !is_header || http::HeaderName::from_bytes(n.as_bytes()).is_ok();
    for (name, v) in exact {
        let ptr = format!("/spec/{field}/{}", super::yaml::escape_pointer(name));
        if !name_ok(name) {
            diags.push(bad_header_name(res, &ptr, name));
            continue;
        }
        let test = match v {
            MatchValue::Text(s) => ValueTest::Exact(s.clone()),
            MatchValue::Number(n) => ValueTest::Exact(n.to_string()),
            MatchValue::Flag(true) => ValueTest::Present,
            MatchValue::Flag(false) => {
                diags.push(Diagnostic::error("bad-match", &res.at(&ptr), format!("`{name}: false` cannot be matched")).with_help("`true` means \"must be present\"; to match the text false, quote it: `\"false\"`"));
                continue;
            }
        };
        let name = if is_header {
            name.to_ascii_lowercase()
        } else {
            name.clone()
        };
        out.push(ValueMatch { name, test });
    }
    for (name, pat) in regex {
        let ptr = format!("/spec/{regex_field}/{}", super::yaml::escape_pointer(name));
        if !name_ok(name) {
            diags.push(bad_header_name(res, &ptr, name));
            continue;
        }
        match build_regex(pat, false, true) {
            Ok(r) => out.push(ValueMatch {
                name: if is_header {
                    name.to_ascii_lowercase()
                } else {
                    name.clone()
                },
                test: ValueTest::Regex(r),
            }),
            Err(e) => diags.push(
                Diagnostic::error(
                    "bad-regex",
                    &res.at(&ptr),
                    format!("regex for `{name}` does not compile: {}", regex_error(&e)),
                )
                .with_help("fix the regular expression (RE2 syntax)"),
            ),
        }
    }
    out.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then_with(|| show_test(&a.test).cmp(&show_test(&b.test)))
    });
    out
}

fn bad_header_name(res: &Resource, ptr: &str, name: &str) -> Diagnostic {
    Diagnostic::error(
        "bad-header-name",
        &res.at(ptr),
        format!("`{name}` is not a valid header name"),
    )
    .with_help("header names are tokens: letters, digits and `-`")
}

fn compile_forward(
    res: &Resource,
    spec: &MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<Forward> {
    let mut upstream: Upstream = match spec.service.parse() {
        Ok(u) => u,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    "bad-service",
                    &res.at("/spec/service"),
                    format!("service `{}` is not a usable address: {e}", spec.service),
                )
                .with_help("write `host`, `host:port`, `http://host:port` or `https://host:port`"),
            );
            return None;
        }
    };
    let tls_wanted = match &spec.tls {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        _ => false,
    };
    if tls_wanted && upstream.scheme == Scheme::Http {
        if spec.service.starts_with("http://") {
            diags.push(
                Diagnostic::warning(
                    "tls-and-http",
                    &res.at("/spec/tls"),
                    "`tls` is set but the service says http://; TLS is used",
                )
                .with_help("write the service as https://... to make this explicit"),
            );
        }
        upstream.scheme = Scheme::Https;
        if !spec.service.contains(':') {
            upstream.port = 443;
        }
    }
    let rewrite = match (&spec.regex_rewrite, &spec.rewrite) {
        (Some(rs), r) => {
            if r.is_some() {
                diags.push(
                    Diagnostic::warning(
                        "rewrite-ignored",
                        &res.at("/spec/rewrite"),
                        "`rewrite` is ignored because `regex_rewrite` is set",
                    )
                    .with_help("remove one of them"),
                );
            }
            match regex_subst(rs) {
                Ok((pattern, substitution)) => Rewrite::Regex {
                    pattern,
                    substitution,
                },
                Err(e) => {
                    diags.push(
                        Diagnostic::error(
                            "bad-regex",
                            &res.at("/spec/regex_rewrite/pattern"),
                            format!(
                                "regex_rewrite pattern does not compile: {}",
                                regex_error(&e)
                            ),
                        )
                        .with_help("fix the regular expression (RE2 syntax)"),
                    );
                    return None;
                }
            }
        }
        (None, Some(r)) if r.is_empty() => Rewrite::Keep,
        (None, Some(r)) => Rewrite::Prefix(r.clone()),
        (None, None) => {
            if spec.prefix_regex {
                diags.push(Diagnostic::warning("regex-default-rewrite", &res.at("/spec/prefix"), "with `prefix_regex`, the default `rewrite: /` replaces the whole path with `/` (as in Emissary)").with_help("set `rewrite: \"\"` to forward the path unchanged"));
            }
            Rewrite::Prefix("/".into())
        }
    };
    let mut allow_upgrade: Vec<String> = spec
        .allow_upgrade
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if spec.use_websocket && !allow_upgrade.iter().any(|u| u == "websocket") {
        allow_upgrade.push("websocket".into());
    }
    let headers = |map: &BTreeMap<String, AddedHeader>,
                   field: &str,
                   diags: &mut Vec<Diagnostic>|
     -> Vec<AddHeader> {
        let mut out = Vec::new();
        for (name, v) in map {
            let ptr = format!("/spec/{field}/{}", super::yaml::escape_pointer(name));
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                diags.push(bad_header_name(res, &ptr, name));
                continue;
            }
            let (value, append) = match v {
                AddedHeader::Full { value, append } => (value.clone(), append.unwrap_or(true)),
                AddedHeader::Text(s) => (s.clone(), true),
                AddedHeader::Other(o) => (
                    match o {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                    true,
                ),
            };
            if http::HeaderValue::from_str(&value).is_err() {
                diags.push(
                    Diagnostic::error(
                        "bad-header-value",
                        &res.at(&ptr),
                        format!("the value of `{name}` has characters a header cannot carry"),
                    )
                    .with_help("remove control characters and line breaks"),
                );
                continue;
            }
            for var in unsupported_vars(&value) {
                diags.push(Diagnostic::warning("header-variable", &res.at(&ptr), format!("`%{var}%` is not substituted by Legate; it is sent as written")).with_help("supported: %DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, %PROTOCOL%, %REQ(header)%"));
            }
            out.push(AddHeader {
                name: name.to_ascii_lowercase(),
                value,
                append,
            });
        }
        out
    };
    let h2c = upstream.scheme == Scheme::H2c;
    if spec.grpc || h2c {
        // One multiplexed HTTP/2 connection per upstream: no per-request address choice yet.
        for (field, set) in [
            ("load_balancer", spec.load_balancer.is_some()),
            ("outlier_detection", spec.outlier_detection.is_some()),
        ] {
            if set {
                diags.push(
                    Diagnostic::warning(
                        "http2-not-balanced",
                        &res.at(&format!("/spec/{field}")),
                        format!(
                            "`{field}` is not applied to HTTP/2 (gRPC, h2c) upstreams yet: \
                             requests share one multiplexed connection per upstream"
                        ),
                    )
                    .with_help("health_checks do apply; remove the field or expect no effect"),
                );
            }
        }
    }
    warn_stream_timeout(res, spec, diags);
    let add_request_headers = headers(&spec.add_request_headers, "add_request_headers", diags);
    let add_response_headers = headers(&spec.add_response_headers, "add_response_headers", diags);
    let lower = |v: Vec<String>| {
        v.into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    Some(Forward {
        upstream,
        rewrite,
        host_rewrite: spec.host_rewrite.clone(),
        auto_host_rewrite: spec.auto_host_rewrite,
        add_request_headers,
        remove_request_headers: lower(spec.remove_request_headers.to_vec()),
        add_response_headers,
        remove_response_headers: lower(spec.remove_response_headers.to_vec()),
        timeout: match spec.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        connect_timeout: Duration::from_millis(
            spec.connect_timeout_ms
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS)
                .max(1),
        ),
        idle_timeout: spec
            .idle_timeout_ms
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        allow_upgrade,
        http2: spec.grpc || h2c,
        retry: super::policy::retry(res, spec.retry_policy.as_ref(), diags),
        breaker: super::policy::breaker(&spec.circuit_breakers),
        cors: super::policy::cors(res, spec.cors.as_ref(), diags).map(std::sync::Arc::new),
        load_balancer: spec
            .load_balancer
            .as_ref()
            .map(super::policy::load_balancer),
        outlier: super::policy::outlier(res, spec.outlier_detection.as_ref(), diags),
        health_checks: super::policy::health_checks(res, &spec.health_checks, diags),
        ext_auth: None,
        jwt: None,
        rate_limits: Vec::new(),
        allow_escaped_slashes: spec.allow_escaped_slashes,
    })
}

/// The route timeout covers the whole response: point it out on Mappings that look like
/// streams (gRPC, upgrades), whose responses may rightly outlast it.
fn warn_stream_timeout(res: &Resource, spec: &MappingSpec, diags: &mut Vec<Diagnostic>) {
    let streams = spec.grpc || spec.use_websocket || !spec.allow_upgrade.is_empty();
    let ms = spec.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !streams || ms == 0 {
        return;
    }
    diags.push(
        Diagnostic::warning(
            "stream-timeout",
            &res.at("/spec/timeout_ms"),
            format!(
                "the route timeout ({ms} ms) covers the whole response: a gRPC stream, long poll \
                 or slow download on this Mapping is cut off after it"
            ),
        )
        .with_help(
            "set `timeout_ms: 0` for streaming routes (upgraded tunnels use idle_timeout_ms)",
        ),
    );
}

/// Variables in `%NAME%` form that the proxy does not substitute.
fn unsupported_vars(v: &str) -> Vec<String> {
    const SUPPORTED: [&str; 3] = [
        "DOWNSTREAM_REMOTE_ADDRESS",
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
        "PROTOCOL",
    ];
    let mut out = Vec::new();
    let mut parts = v.split('%');
    parts.next();
    while let (Some(name), Some(_)) = (parts.next(), parts.clone().next()) {
        if !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_uppercase()
                    || b == b'_'
                    || b == b'('
                    || b == b')'
                    || b == b'-'
                    || b.is_ascii_alphanumeric()
            })
            && !SUPPORTED.contains(&name)
            && !name.starts_with("REQ(")
        {
            out.push(name.to_string());
        }
        parts.next();
    }
    out
}

/// `host[:port]` of a redirect target (`service` may carry a scheme).
fn redirect_target(service: &str) -> Result<String, String> {
    let u: Upstream = service
        .parse()
        .map_err(|e: crate::routes::UpstreamError| e.0)?;
    let explicit_port = service
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty());
    Ok(if explicit_port {
        u.authority()
    } else if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host
    })
}

/// The regex crate's error, as one line (its Display repeats the pattern with a caret).
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or(text)
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled pattern exceeds {limit} bytes; simplify it")
        }
        other => other.to_string(),
    }
}

fn regex_subst(rs: &RegexSubst) -> Result<(Regex, String), regex::Error> {
    let re = build_regex(&rs.pattern, false, false)?;
    Ok((re, envoy_substitution(&rs.substitution)))
}

/// Envoy writes group references as `\1`; the regex crate as `${1}`. A literal `$` is `$$`.
pub fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    let d = *d;
                    chars.next();
                    let _ = write!(out, "${{{d}}}");
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// Compile a regex with bounded size; `anchored` requires a full match (Envoy's safe_regex).
fn build_regex(pat: &str, case_insensitive: bool, anchored: bool) -> Result<Regex, regex::Error> {
    let src = if anchored {
        format!("^(?:{pat})$")
    } else {
        pat.to_string()
    };
    RegexBuilder::new(&src)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

fn compile_host(r: &Resource, h: &HostSpec, diags: &mut Vec<Diagnostic>) -> Option<HostRoute> {
    let hostname = match host_glob(
        r,
        "/spec/hostname",
        h.hostname.as_deref().unwrap_or("*"),
        diags,
    ) {
        Ok(p) => p,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    "bad-hostname",
                    &r.at("/spec/hostname"),
                    format!("hostname is not a valid host glob: {e}"),
                )
                .with_help("use a host name, `*`, or a glob like `*.example.com`"),
            );
            return None;
        }
    };
    if h.mapping_selector.is_some() && h.selector.is_some() {
        diags.push(
            Diagnostic::warning(
                "selector-ignored",
                &r.at("/spec/selector"),
                "both `mappingSelector` and `selector` are set; `selector` is ignored",
            )
            .with_help("remove `selector` (the deprecated name)"),
        );
    }
    let tls_secret = h.tls_secret.as_ref().map(|s| SecretRef {
        namespace: s.namespace.clone().unwrap_or_else(|| r.namespace.clone()),
        name: s.name.clone(),
    });
    let insecure = match h.request_policy.insecure.action.as_deref() {
        Some("Reject") => InsecureAction::Reject,
        Some("Route") => InsecureAction::Route,
        Some("Redirect") => InsecureAction::Redirect,
        _ if tls_secret.is_some() => InsecureAction::Redirect,
        _ => InsecureAction::Route,
    };
    if insecure != InsecureAction::Route && tls_secret.is_none() {
        diags.push(
            Diagnostic::warning(
                "insecure-without-tls",
                &r.at("/spec/requestPolicy/insecure/action"),
                format!(
                    "Host `{}` has no TLS, so `{insecure:?}` turns away all of its traffic",
                    r.name
                ),
            )
            .with_help("add a `tlsSecret`, or set `requestPolicy.insecure.action: Route`"),
        );
    }
    Some(HostRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        hostname,
        tls_secret,
        insecure,
        insecure_additional_port: h
            .request_policy
            .insecure
            .additional_port
            .and_then(|p| u16::try_from(p).ok()),
        groups: Vec::new(),
        source: format!("{}:{}", r.loc.file, r.loc.line),
    })
}

fn graph_hash(hosts: &[HostRoute], routes: &[Route], groups: &[Group]) -> String {
    let mut h = Sha256::new();
    for host in hosts {
        h.update(format!(
            "H{}/{}|{}|{:?}|{:?}|{:?}|{:?}\n",
            host.namespace,
            host.name,
            host.hostname,
            host.tls_secret,
            host.insecure,
            host.insecure_additional_port,
            host.groups
        ));
    }
    for r in routes {
        h.update(format!(
            "R{}/{}|{:?}|{}|{:?}|{}|{}\n",
            r.namespace, r.name, r.matcher, r.precedence, r.action, r.group, r.stats_name
        ));
    }
    for g in groups {
        h.update(format!(
            "G{:?}|{:?}|{}\n",
            g.members, g.shadow, g.serves_without_host
        ));
    }
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_and_compile, MemTree, Options, Outcome, Severity};
    use crate::routes::RequestHead;

    fn mapping(name: &str, spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n{spec}")
    }

    fn compile_text(text: &str) -> Outcome {
        load_and_compile(&MemTree::new().with("m.yaml", text), &Options::default())
    }

    fn route_for(
        o: &Outcome,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let g = o.graph.as_ref().expect("valid config");
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let head = RequestHead {
            host: "h.example",
            method,
            path,
            query: None,
            headers: &map,
        };
        g.lookup(&head)
            .map(|m| g.route(m.group.pick(0).unwrap()).name.clone())
    }

    #[test]
    fn balancing_fields_on_http2_upstreams_warn() {
        let o = compile_text(
            &(mapping(
                "g",
                "hostname: '*'\nprefix: /g/\nservice: g:50051\ngrpc: true\nload_balancer: {policy: round_robin}\noutlier_detection: {consecutive_5xx: 3}",
            ) + &mapping(
                "h",
                "hostname: '*'\nprefix: /h/\nservice: h:80\nload_balancer: {policy: round_robin}",
            )),
        );
        assert!(o.graph.is_some());
        let w: Vec<_> = o
            .diagnostics
            .iter()
            .filter(|d| d.code == "http2-not-balanced")
            .map(|d| d.pointer.as_str())
            .collect();
        // The gRPC Mapping's two fields; the HTTP/1.1 Mapping's load_balancer is applied.
        assert_eq!(w, ["/spec/load_balancer", "/spec/outlier_detection"]);
    }

    fn codes(o: &Outcome) -> Vec<&'static str> {
        o.diagnostics.iter().map(|d| d.code).collect()
    }

    #[test]
    fn longer_prefix_wins_then_precedence_overrides() {
        let t = mapping("short", "hostname: '*'\nprefix: /api/\nservice: a")
            + &mapping("long", "hostname: '*'\nprefix: /api/v1/\nservice: b");
        let o = compile_text(&t);
        assert_eq!(
            route_for(&o, "GET", "/api/v1/x", &[]).as_deref(),
            Some("long")
        );
        assert_eq!(
            route_for(&o, "GET", "/api/v2/x", &[]).as_deref(),
            Some("short")
        );
        assert_eq!(route_for(&o, "GET", "/other", &[]), None);
        let t = mapping(
            "short",
            "hostname: '*'\nprefix: /api/\nservice: a\nprecedence: 5",
        ) + &mapping("long", "hostname: '*'\nprefix: /api/v1/\nservice: b");
        let o = compile_text(&t);
        assert_eq!(
            route_for(&o, "GET", "/api/v1/x", &[]).as_deref(),
            Some("short")
        );
    }

    #[test]
    fn header_and_method_constraints_order_before_plain() {
        let t = mapping("plain", "hostname: '*'\nprefix: /x/\nservice: a")
            + &mapping(
                "post",
                "hostname: '*'\nprefix: /x/\nservice: b\nmethod: post",
            )
            + &mapping(
                "hdr",
                "hostname: '*'\nprefix: /x/\nservice: c\nheaders:\n  x-canary: 'yes'",
            );
        let o = compile_text(&t);
        assert!(o.is_ok(), "{:?}", o.diagnostics);
        assert_eq!(route_for(&o, "POST", "/x/1", &[]).as_deref(), Some("post"));
        assert_eq!(
            route_for(&o, "GET", "/x/1", &[("x-canary", "yes")]).as_deref(),
            Some("hdr")
        );
        assert_eq!(route_for(&o, "GET", "/x/1", &[]).as_deref(), Some("plain"));
    }

    #[test]
    fn case_insensitive_and_exact_paths() {
        let t = mapping(
            "ci",
            "hostname: '*'\nprefix: /Docs/\ncase_sensitive: false\nservice: a",
        ) + &mapping(
            "exact",
            "hostname: '*'\nprefix: /health\nprefix_exact: true\nservice: b",
        );
        let o = compile_text(&t);
        assert_eq!(route_for(&o, "GET", "/docs/a", &[]).as_deref(), Some("ci"));
        assert_eq!(route_for(&o, "GET", "/DOCS/a", &[]).as_deref(), Some("ci"));
        assert_eq!(
            route_for(&o, "GET", "/health", &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(route_for(&o, "GET", "/healthz", &[]), None);
    }

    #[test]
    fn traffic_policy_fields_compile() {
        let t = mapping(
            "r",
            "hostname: '*'\nprefix: /r/\nservice: a\nretry_policy:\n  retry_on: 5xx\n  per_try_timeout: 1m30s\ncircuit_breakers:\n  - max_requests: 7\ncors:\n  origins: 'https://a.test,https://.*[.]b[.]test'",
        ) + &mapping(
            "bad",
            "hostname: '*'\nprefix: /bad/\nservice: a\ncors:\n  origins: 'https://(unclosed'",
        );
        let o = compile_text(&t);
        assert!(codes(&o).contains(&"bad-regex"), "{:?}", codes(&o));
        let t = t.split("---").take(2).collect::<Vec<_>>().join("---");
        let o = compile_text(&t);
        let g = o.graph.as_ref().unwrap();
        let Action::Forward(f) = &g.routes[0].action else {
            panic!("not a forward");
        };
        let retry = f.retry.as_ref().unwrap();
        assert_eq!(retry.on, crate::routes::RetryOn::FiveXx);
        assert_eq!(retry.num_retries, 1);
        assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(90)));
        assert_eq!(f.breaker.max_requests, 7);
        assert_eq!(f.breaker.max_retries, 3);
        let cors = f.cors.as_ref().unwrap();
        assert!(cors.allows("https://a.test"));
        assert!(cors.allows("https://x.b.test"));
        assert!(!cors.allows("https://x.b.test.evil"));
        assert!(!cors.allows("https://c.test"));
    }

    #[test]
    fn weights_and_unweighted_rest() {
        let t = mapping("a", "hostname: '*'\nprefix: /c/\nservice: a\nweight: 30")
            + &mapping("b", "hostname: '*'\nprefix: /c/\nservice: b")
            + &mapping("c", "hostname: '*'\nprefix: /c/\nservice: c");
        let o = compile_text(&t);
        let g = o.graph.as_ref().unwrap();
        let shares: Vec<u32> = g.groups[0].shares().iter().map(|s| s.1).collect();
        assert_eq!(shares, vec![30, 35, 35]);
        assert!(codes(&o).contains(&"accidental-split"));
    }

    #[test]
    fn semantic_errors_are_all_collected() {
        let t = mapping("w1", "hostname: '*'\nprefix: /w/\nservice: a\nweight: 70")
            + &mapping("w2", "hostname: '*'\nprefix: /w/\nservice: b\nweight: 60")
            + &mapping(
                "re",
                "hostname: '*'\nprefix: '/(unclosed'\nprefix_regex: true\nservice: a",
            )
            + &mapping(
                "glob",
                "hostname: 'a*b.example.com'\nprefix: /g/\nservice: a",
            )
            + &mapping(
                "svc",
                "hostname: '*'\nprefix: /s/\nservice: 'http://bad host'",
            )
            + &mapping(
                "hre",
                "hostname: '*'\nprefix: /h/\nservice: a\nregex_headers:\n  x-a: '(['",
            );
        let o = compile_text(&t);
        assert!(!o.is_ok());
        let c = codes(&o);
        for want in [
            "weights-over-100",
            "bad-regex",
            "bad-hostname",
            "bad-service",
        ] {
            assert!(c.contains(&want), "{want} missing from {c:?}");
        }
        assert_eq!(c.iter().filter(|x| **x == "bad-regex").count(), 2);
        assert!(o
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .all(|d| d.line > 1));
    }

    #[test]
    fn hostless_mapping_without_selector_is_warned() {
        let o = compile_text(&mapping("lost", "prefix: /lost/\nservice: a"));
        assert!(o.is_ok());
        let d = o
            .diagnostics
            .iter()
            .find(|d| d.code == "unreachable-mapping")
            .expect("warned");
        assert!(d.help.as_deref().unwrap().contains("hostname: \"*\""));
        assert_eq!(route_for(&o, "GET", "/lost/", &[]), None);
    }

    #[test]
    fn hash_is_stable_and_content_based() {
        let a = mapping("x", "hostname: '*'\nprefix: /x/\nservice: a")
            + &mapping("y", "hostname: '*'\nprefix: /y/\nservice: b");
        let b = mapping("y", "hostname: '*'\nprefix: /y/\nservice: b")
            + &mapping("x", "hostname: '*'\nprefix: /x/\nservice: a");
        let c = mapping("x", "hostname: '*'\nprefix: /x/\nservice: c")
            + &mapping("y", "hostname: '*'\nprefix: /y/\nservice: b");
        let (ha, hb, hc) = (compile_text(&a), compile_text(&b), compile_text(&c));
        let h = |o: &Outcome| o.graph.as_ref().unwrap().hash.clone();
        assert_eq!(h(&ha), h(&hb));
        assert_ne!(h(&ha), h(&hc));
        assert_eq!(h(&ha).len(), 64);
    }

    #[test]
    fn envoy_substitutions_convert() {
        assert_eq!(envoy_substitution("/v\\1/\\2"), "/v${1}/${2}");
        assert_eq!(envoy_substitution("/cost$5"), "/cost$$5");
    }

    #[test]
    fn host_association_by_glob_or_selector() {
        let t = "---\napiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hostname: h.example\n  mappingSelector:\n    matchLabels: {team: a}\n".to_string()
            + "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: sel\n  labels: {team: a}\nspec:\n  prefix: /sel/\n  service: a\n"
            + &mapping("other", "prefix: /other/\nservice: a")
            + &mapping("glob", "hostname: '*.example'\nprefix: /glob/\nservice: a");
        let o = compile_text(&t);
        assert_eq!(route_for(&o, "GET", "/sel/", &[]).as_deref(), Some("sel"));
        assert_eq!(route_for(&o, "GET", "/glob/", &[]).as_deref(), Some("glob"));
        assert_eq!(route_for(&o, "GET", "/other/", &[]), None);
        assert!(o
            .diagnostics
            .iter()
            .any(|d| d.code == "unreachable-mapping" && d.message.contains("other")));
    }
}

#[cfg(test)]
mod skip_tests {
    use crate::config::{load_and_compile, MemTree, Options, Severity};

    #[test]
    fn skip_invalid_serves_the_valid_resources_and_reports_the_rest() {
        let doc = |name: &str, spec: &str| {
            format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: '*'\n{spec}")
        };
        let text = doc("good", "  prefix: /good/\n  service: good\n")
            + &doc(
                "bad-regex",
                "  prefix: '/(x'\n  prefix_regex: true\n  service: x\n",
            )
            + &doc(
                "schema-bad",
                "  prefix: /s/\n  service: s\n  timeout_ms: soon\n",
            )
            + &doc("also-good", "  prefix: /also/\n  service: also\n");
        let tree = MemTree::new().with("m.yaml", text);
        let strict = load_and_compile(&tree, &Options::default());
        assert!(
            strict.graph.is_none(),
            "whole-revision rejection by default"
        );
        let opts = Options {
            skip_invalid: true,
            ..Options::default()
        };
        let o = load_and_compile(&tree, &opts);
        let g = o.graph.expect("valid part compiles");
        let names: Vec<&str> = g.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["also-good", "good"]);
        let errs: Vec<_> = o
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|d| d.code == "bad-regex"));
        assert!(errs.iter().any(|d| d.pointer == "/spec/timeout_ms"));
    }
}
