//! `compile`: validated resources -> one immutable `routes::Graph`.
//!
//! Implements Emissary's semantics: canary groups (Emissary's `group_id`: the match, plus the
//! selecting Hosts' labels for a Mapping without a host), weights (unweighted members share
//! what the weighted ones leave), one shadow per group, route order (precedence, prefix length,
//! header and query constraint lengths, prefix, method), and Host association (`matches_httpgroup`
//! with strict selectors: a Host with a mappingSelector needs the labels, and the hostname too
//! when the group has one; a Host without one goes by hostname). Collects every problem; pure.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use sha2::{Digest, Sha256};

use super::diag::Diagnostic;
use super::model::{AddedHeader, HostSpec, MappingSpec, MatchValue, RegexSubst, Resource, Spec};
use super::schema::Kind;
use super::tlscontext::{self, TlsFields};
use crate::routes::{
    AcmeSpec, Action, AddHeader, Forward, Graph, Group, HostMatch, HostPattern, HostRoute,
    InsecureAction, MethodMatch, OriginTls, PathMatch, Redirect, RedirectPath, Rewrite, Route,
    RouteId, RouteMatch, RoutingOptions, Scheme, SecretRef, Upstream, ValueMatch, ValueTest,
    AUTHORITY,
};
use crate::tls::context::TlsPolicy;

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
    /// Canonical text of the match: members of one group share it (Emissary's `group_id`).
    group_key: String,
    /// Emissary's route weight: (precedence, prefix length, header-match length, query-match
    /// length, then the prefix text and the method (`GET` when unset) as tie-breakers). Groups
    /// sort by it descending.
    order: (i64, usize, usize, usize, String, String),
    /// The host glob used for Host association, if the Mapping names one (`hostname`, `host`
    /// or an exact `:authority` header).
    assoc_glob: Option<HostPattern>,
    /// For host_redirect Mappings without a hostname: the redirect target, for association.
    redirect_assoc: Option<HostPattern>,
    host_regex: bool,
}

/// A compiled Host and the selector association reads.
struct HostEntry<'r> {
    res: &'r Resource,
    route: HostRoute,
    /// The `matchLabels` of `mappingSelector` (or of the older `selector` when
    /// `mappingSelector` is absent or empty); `None`: the Host has no selector.
    selector: Option<&'r BTreeMap<String, String>>,
}

/// Compile resources into a graph. The graph is only meaningful when no diagnostic is an error.
pub fn compile(resources: &[Resource]) -> (Graph, Vec<Diagnostic>) {
    compile_refs(&resources.iter().collect::<Vec<_>>())
}

/// `compile` over borrowed resources (a subset, for skip-invalid mode).
pub fn compile_refs(resources: &[&Resource]) -> (Graph, Vec<Diagnostic>) {
    compile_refs_with(resources, &RoutingOptions::default())
}

/// `compile_refs` with routing options (flags; later the Emissary Module).
///
/// Passes, in order: compile each Mapping and Host on its own, associate Host selectors,
/// group Mappings by match and order the groups, number the routes, build each group (weights,
/// shadows), attach groups to Hosts, attach policies, then the Module's settings.
pub fn compile_refs_with(
    resources: &[&Resource],
    options: &RoutingOptions,
) -> (Graph, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let (mut mappings, hosts) = compile_each(resources, &mut diags);
    warn_duplicate_hostnames(&hosts, &mut diags);
    let loose = options.loose_label_selectors;
    for m in &mut mappings {
        add_selector_labels(m, &hosts, loose);
    }
    let group_list = group_by_match(&mappings);
    let (mut routes, route_of) = number_routes(&mappings);
    let (groups, group_members) =
        build_groups(&mappings, group_list, &mut routes, &route_of, &mut diags);
    let host_labels: Vec<&BTreeMap<String, String>> = hosts.iter().map(|h| &h.res.labels).collect();
    let host_routes = associate(hosts, &mappings, &group_members, loose, &mut diags);

    super::guard::attach(resources, &mut routes, &host_routes, &groups, &mut diags);
    // The Module's `strip_matching_host_port` turns the routing option on (the flag can too).
    let mut options = *options;
    options.strip_matching_host_port |=
        super::module::settings(resources).is_some_and(|s| s.strip_matching_host_port);
    let hash = graph_hash(resources, &options);
    let mut graph = Graph::build(host_routes, routes, groups, hash, options);
    super::module::attach(&mut graph, resources, &mut diags);
    graph.settings.tracing = super::tracingservice::compile(resources, &mut diags);
    let (listeners, tcp) =
        super::listener::compile(resources, &graph.hosts, &host_labels, &mut diags);
    graph.set_listeners(listeners, tcp);
    (graph, diags)
}

/// Compile every Mapping and Host on its own, each list in namespace/name order (stable route
/// ids). Other kinds are read by later passes.
fn compile_each<'r>(
    resources: &[&'r Resource],
    diags: &mut Vec<Diagnostic>,
) -> (Vec<Compiled<'r>>, Vec<HostEntry<'r>>) {
    let mut mappings: Vec<Compiled<'r>> = Vec::new();
    let mut host_specs: Vec<(&Resource, &HostSpec)> = Vec::new();
    let contexts = TlsContexts::collect(resources, diags);
    for &r in resources {
        match &r.spec {
            Spec::Mapping(m) => {
                if let Some(c) = compile_mapping(r, m, &contexts, diags) {
                    mappings.push(c);
                }
            }
            Spec::Host(h) => host_specs.push((r, h)),
            Spec::RouteTest(_)
            | Spec::AuthService(_)
            | Spec::JwtPolicy(_)
            | Spec::OidcLogin(_)
            | Spec::RateLimit(_)
            | Spec::Module(_)
            | Spec::TlsContext(_)
            | Spec::TracingService(_) => {}
            Spec::Listener(_) | Spec::TcpMapping(_) => {}
        }
    }
    mappings.sort_by(|a, b| (&a.res.namespace, &a.res.name).cmp(&(&b.res.namespace, &b.res.name)));
    host_specs.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    let hosts = host_specs
        .into_iter()
        .filter_map(|(r, h)| {
            let route = compile_host(r, h, &contexts, diags)?;
            Some(HostEntry {
                res: r,
                route,
                selector: host_selector(r, h, diags),
            })
        })
        .collect();
    (mappings, hosts)
}

/// Mappings with the same match form one group (indexes into `mappings`), in match order:
/// Emissary's route weight, descending; then the canonical match text.
fn group_by_match(mappings: &[Compiled<'_>]) -> Vec<Vec<usize>> {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, m) in mappings.iter().enumerate() {
        by_key.entry(m.group_key.as_str()).or_default().push(i);
    }
    let mut group_list: Vec<Vec<usize>> = by_key.into_values().collect();
    group_list.sort_by(|a, b| {
        let (x, y) = (&mappings[a[0]], &mappings[b[0]]);
        y.order
            .cmp(&x.order)
            .then_with(|| x.group_key.cmp(&y.group_key))
    });
    group_list
}

/// One route per Mapping, in Mapping order; `route_of[i]` is the route of Mapping `i`.
fn number_routes(mappings: &[Compiled<'_>]) -> (Vec<Route>, Vec<usize>) {
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
    (routes, route_of)
}

/// Build each group (weights, shadow) in match order and point its routes at it; also returns
/// each group's Mapping indexes, for Host association.
fn build_groups(
    mappings: &[Compiled<'_>],
    group_list: Vec<Vec<usize>>,
    routes: &mut [Route],
    route_of: &[usize],
    diags: &mut Vec<Diagnostic>,
) -> (Vec<Group>, Vec<Vec<usize>>) {
    let mut groups: Vec<Group> = Vec::with_capacity(group_list.len());
    let mut group_members: Vec<Vec<usize>> = Vec::with_capacity(group_list.len());
    for members in group_list {
        let gi = groups.len();
        for &m in &members {
            routes[route_of[m]].group = gi;
        }
        let first = &mappings[members[0]];
        let group = build_group(mappings, &members, route_of, diags);
        groups.push(Group {
            members: group.0,
            shadow: group.1,
            matcher: first.matcher.clone(),
            precedence: first.spec.precedence,
            serves_without_host: GroupAssoc::of(mappings, &members).has_hostname(),
        });
        group_members.push(members);
    }
    (groups, group_members)
}

/// What Host association reads of a group (Emissary's `IRHTTPMappingGroup`): its host glob or
/// regex (shared by all members, being part of the match) and its members' labels merged in
/// member order, later ones winning.
struct GroupAssoc<'a> {
    glob: Option<&'a HostPattern>,
    regex: bool,
    labels: BTreeMap<String, String>,
}

impl<'a> GroupAssoc<'a> {
    fn of(mappings: &'a [Compiled<'_>], members: &[usize]) -> GroupAssoc<'a> {
        let first = &mappings[members[0]];
        let mut labels = BTreeMap::new();
        for &m in members {
            labels.extend(
                mappings[m]
                    .res
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        GroupAssoc {
            glob: first.assoc_glob.as_ref().or_else(|| {
                members
                    .iter()
                    .find_map(|&m| mappings[m].redirect_assoc.as_ref())
            }),
            regex: first.host_regex,
            labels,
        }
    }

    fn has_hostname(&self) -> bool {
        self.regex || self.glob.is_some()
    }

    /// Emissary's `IRHost.matches_httpgroup`, strict by default: a Host with a selector takes a
    /// group whose labels match and, when the group has a hostname, whose glob overlaps too; a
    /// Host without one takes groups by hostname only. Loose (`DISABLE_STRICT_LABEL_SELECTORS`):
    /// hostname OR labels.
    fn attaches_to(&self, host: &HostEntry<'_>, loose: bool) -> bool {
        let host_match = self.regex || self.glob.is_some_and(|g| g.overlaps(&host.route.hostname));
        let sel_match = host
            .selector
            .map(|sel| selector_matches(sel, &self.labels, loose));
        if loose {
            return host_match || sel_match == Some(true);
        }
        match (sel_match, self.has_hostname()) {
            (Some(sel), true) => sel && host_match,
            (Some(sel), false) => sel,
            (None, has_hostname) => has_hostname && host_match,
        }
    }
}

/// Emissary's `selector_matches`: only `matchLabels`; every label must match (strict), or any
/// one (loose). No labels to match selects everything.
fn selector_matches(
    want: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    loose: bool,
) -> bool {
    if want.is_empty() {
        return true;
    }
    let hit = |(k, v): (&String, &String)| labels.get(k) == Some(v);
    if loose {
        want.iter().any(hit)
    } else {
        want.iter().all(hit)
    }
}

/// Emissary's `group_id` for a Mapping without a host: the `matchLabels` of every Host whose
/// selector matches it join its identity, so Mappings selected by different Hosts are
/// different groups even on the same match.
fn add_selector_labels(m: &mut Compiled<'_>, hosts: &[HostEntry<'_>], loose: bool) {
    if m.assoc_glob.is_some() {
        return;
    }
    for h in hosts {
        if let Some(sel) = h.selector {
            if selector_matches(sel, &m.res.labels, loose) {
                for (k, v) in sel {
                    let _ = write!(m.group_key, "L{k}={v};");
                }
            }
        }
    }
}

/// The selector a Host associates by: `mappingSelector`, else the older `selector`; an empty
/// one counts as none. Only `matchLabels` is read, as in Emissary.
fn host_selector<'r>(
    r: &'r Resource,
    h: &'r HostSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<&'r BTreeMap<String, String>> {
    let (sel, field) = match (&h.mapping_selector, &h.selector) {
        (Some(s), _) if !s.is_empty() => (s, "mappingSelector"),
        (_, Some(s)) if !s.is_empty() => (s, "selector"),
        _ => return None,
    };
    if !sel.match_expressions.is_empty() {
        diags.push(
            Diagnostic::warning(
                "selector-expressions-ignored",
                &r.at(&format!("/spec/{field}/matchExpressions")),
                format!(
                    "Host `{}`: `matchExpressions` is not read (as in Emissary, only `matchLabels` selects Mappings)",
                    r.name
                ),
            )
            .with_help("express the selection with `matchLabels`"),
        );
    }
    Some(&sel.match_labels)
}

/// Emissary keeps one virtual host per hostname, silently the later Host's; Legate does the
/// same and says so.
fn warn_duplicate_hostnames(hosts: &[HostEntry<'_>], diags: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<&HostPattern, &HostEntry<'_>> = HashMap::new();
    for h in hosts {
        if let Some(earlier) = seen.insert(&h.route.hostname, h) {
            diags.push(
                Diagnostic::warning(
                    "duplicate-hostname",
                    &earlier.res.at("/spec/hostname"),
                    format!(
                        "Hosts `{}` and `{}` ({}) both have hostname `{}`; only `{}` (the later by namespace/name) serves it, as in Emissary",
                        earlier.res.id(),
                        h.res.id(),
                        h.route.source,
                        h.route.hostname,
                        h.res.id()
                    ),
                )
                .with_help("give each Host its own hostname, or merge them into one"),
            );
        }
    }
}

/// Attach groups to Hosts and report the Mappings that end up on none.
fn associate(
    hosts: Vec<HostEntry<'_>>,
    mappings: &[Compiled<'_>],
    group_members: &[Vec<usize>],
    loose: bool,
    diags: &mut Vec<Diagnostic>,
) -> Vec<HostRoute> {
    let assoc: Vec<GroupAssoc<'_>> = group_members
        .iter()
        .map(|members| GroupAssoc::of(mappings, members))
        .collect();
    let mut attached = vec![false; group_members.len()];
    let mut host_routes = Vec::with_capacity(hosts.len());
    for h in hosts {
        let groups: Vec<usize> = (0..assoc.len())
            .filter(|&gi| assoc[gi].attaches_to(&h, loose))
            .collect();
        for &gi in &groups {
            attached[gi] = true;
        }
        host_routes.push(HostRoute { groups, ..h.route });
    }
    // Without Hosts, the default Host (`*`, no selector) takes the groups with a hostname.
    if host_routes.is_empty() {
        for (gi, a) in assoc.iter().enumerate() {
            attached[gi] |= a.has_hostname();
        }
    }
    for (gi, members) in group_members.iter().enumerate() {
        if attached[gi] {
            continue;
        }
        for &m in members {
            diags.push(unreachable(&mappings[m], host_routes.is_empty()));
        }
    }
    host_routes
}

/// Emissary's silent trap: a Mapping no Host attaches serves nothing.
fn unreachable(m: &Compiled<'_>, no_hosts: bool) -> Diagnostic {
    let named = m.assoc_glob.is_some() || m.host_regex || m.redirect_assoc.is_some();
    let (message, help) = if !named || no_hosts {
        (
            format!(
                "Mapping `{}` has no hostname and no Host selects it, so it serves no traffic",
                m.res.name
            ),
            "add `hostname: \"*\"` to serve every host, or labels that a Host's mappingSelector selects"
                .to_string(),
        )
    } else {
        (
            format!(
                "Mapping `{}` is attached to no Host (its hostname overlaps no Host's, or a Host with a mappingSelector does not select its labels), so it serves no traffic",
                m.res.name
            ),
            "a Host with a mappingSelector takes only Mappings whose labels it selects: add them, or a Host for this hostname (strict selectors, as in Emissary)".to_string(),
        )
    };
    Diagnostic::warning("unreachable-mapping", &m.res.at("/spec"), message).with_help(help)
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
    // Emissary keeps one host_redirect per group (it logs and drops the others).
    if redirects > 1 && redirects == live.len() {
        let first = &mappings[live[0]];
        for &m in &live[1..] {
            let c = &mappings[m];
            diags.push(
                Diagnostic::error(
                    "second-redirect",
                    &c.res.at("/spec/host_redirect"),
                    format!(
                        "Mapping `{}` is a second host_redirect for the same match as `{}`; a match group redirects one way only",
                        c.res.name, first.res.name
                    ),
                )
                .with_help("delete one of them, or give them different matches"),
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

/// Compile one Mapping on its own (no grouping, no Hosts): its match, its action, its weight.
/// `None` when it has an error (every error is in `diags`).
fn compile_mapping<'r>(
    res: &'r Resource,
    spec: &'r MappingSpec,
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Compiled<'r>> {
    let before = error_count(diags);
    let case_sensitive = spec.case_sensitive.unwrap_or(true);
    let path = compile_path(res, spec, case_sensitive, diags);
    let RouteHost {
        host,
        assoc_glob,
        host_regex,
    } = compile_route_host(res, spec, diags);
    let redirect_assoc = redirect_assoc(spec, assoc_glob.as_ref(), host_regex);
    let method = compile_method(res, spec, diags);
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
    let action = compile_action(res, spec, contexts, diags);
    let (path, action) = match (path, action) {
        (Some(p), Some(a)) if error_count(diags) == before => (p, a),
        _ => return None,
    };
    let order = route_weight(spec, &host, &headers, &query);
    let matcher = RouteMatch {
        path,
        case_sensitive,
        host,
        method,
        headers,
        query,
    };
    let group_key = match_key(&matcher, spec, assoc_glob.as_ref());
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

fn error_count(diags: &[Diagnostic]) -> usize {
    diags
        .iter()
        .filter(|d| d.severity == super::Severity::Error)
        .count()
}

/// Push an error at `ptr` of `res` with its help text.
fn push_error(
    diags: &mut Vec<Diagnostic>,
    res: &Resource,
    ptr: &str,
    code: &'static str,
    msg: String,
    help: &str,
) {
    diags.push(Diagnostic::error(code, &res.at(ptr), msg).with_help(help.to_string()));
}

/// The path match: a prefix (exact or not) or a regex. `None` when the regex is bad.
fn compile_path(
    res: &Resource,
    spec: &MappingSpec,
    case_sensitive: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<PathMatch> {
    if spec.prefix_regex {
        match build_regex(&spec.prefix, !case_sensitive, true) {
            Ok(r) => Some(PathMatch::Regex(r)),
            Err(e) => {
                push_error(
                    diags,
                    res,
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
            push_error(
                diags,
                res,
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
    }
}

/// The host a route matches and the glob Host association reads.
struct RouteHost {
    host: HostMatch,
    /// The host glob used for Host association, if the Mapping names one.
    assoc_glob: Option<HostPattern>,
    host_regex: bool,
}

/// Host at the route level, and the glob used for Host association (Emissary's
/// `IRHTTPMapping.__init__`: an exact `:authority` header acts as `host`, `host` overrides it,
/// `hostname` overrides both).
fn compile_route_host(
    res: &Resource,
    spec: &MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> RouteHost {
    let mut assoc_glob = None;
    let mut host_regex = false;
    let authority_header = spec.headers.iter().find_map(|(k, v)| match v {
        MatchValue::Text(t) if k.eq_ignore_ascii_case(AUTHORITY) => Some((k, t)),
        _ => None,
    });
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
        match h.parse::<HostPattern>() {
            Ok(p) => {
                assoc_glob = Some(p.clone());
                if p == HostPattern::Any {
                    HostMatch::Any
                } else {
                    HostMatch::Glob(p)
                }
            }
            Err(e) => {
                push_error(diags, res, "/spec/hostname", "bad-hostname", format!("hostname is not a valid host glob: {e}"), "use a host name, `*`, or a glob with one `*` at the start (`*.example.com`) or end");
                HostMatch::Any
            }
        }
    } else if let Some(h) = &spec.host {
        if spec.host_regex {
            host_regex = true;
            match build_regex(h, true, true) {
                Ok(r) => HostMatch::Regex(r),
                Err(e) => {
                    push_error(
                        diags,
                        res,
                        "/spec/host",
                        "bad-regex",
                        format!("host regex does not compile: {}", regex_error(&e)),
                        "fix the regular expression",
                    );
                    HostMatch::Any
                }
            }
        } else {
            exact_host(res, "/spec/host", "host", h, diags).map_or(HostMatch::Any, |p| {
                assoc_glob = Some(p.clone());
                HostMatch::Glob(p)
            })
        }
    } else if let Some((name, h)) = authority_header {
        let ptr = format!("/spec/headers/{}", super::yaml::escape_pointer(name));
        exact_host(res, &ptr, ":authority", h, diags).map_or(HostMatch::Any, |p| {
            assoc_glob = Some(p.clone());
            HostMatch::Glob(p)
        })
    } else {
        HostMatch::Any
    };
    RouteHost {
        host,
        assoc_glob,
        host_regex,
    }
}

/// Emissary associates a host_redirect Mapping with Hosts through its target host too; that
/// glob is used for association only, the route still matches any authority.
fn redirect_assoc(
    spec: &MappingSpec,
    assoc_glob: Option<&HostPattern>,
    host_regex: bool,
) -> Option<HostPattern> {
    if assoc_glob.is_none() && !host_regex && spec.host_redirect {
        redirect_target(&spec.service).ok().and_then(|t| {
            t.split(':')
                .next()
                .and_then(|h| h.parse::<HostPattern>().ok())
        })
    } else {
        None
    }
}

fn compile_method(
    res: &Resource,
    spec: &MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<MethodMatch> {
    match &spec.method {
        None => None,
        Some(m) if spec.method_regex => match build_regex(m, false, true) {
            Ok(r) => Some(MethodMatch::Regex(r)),
            Err(e) => {
                push_error(
                    diags,
                    res,
                    "/spec/method",
                    "bad-regex",
                    format!("method regex does not compile: {}", regex_error(&e)),
                    "fix the regular expression",
                );
                None
            }
        },
        Some(m) => Some(MethodMatch::Exact(m.to_ascii_uppercase())),
    }
}

/// A redirect (`host_redirect: true`) or a forward; redirect fields without `host_redirect`
/// are warned.
fn compile_action(
    res: &Resource,
    spec: &MappingSpec,
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Action> {
    if spec.host_redirect {
        return compile_redirect(res, spec, diags);
    }
    let redirect_fields = spec.path_redirect.is_some()
        || spec.prefix_redirect.is_some()
        || spec.regex_redirect.is_some();
    if redirect_fields || spec.redirect_response_code.is_some() {
        diags.push(
            Diagnostic::warning(
                "redirect-without-host-redirect",
                &res.at("/spec"),
                "redirect fields are ignored because `host_redirect` is not true",
            )
            .with_help("set `host_redirect: true` (and `service` to the target host) to redirect"),
        );
    }
    compile_forward(res, spec, contexts, diags).map(|f| Action::Forward(Box::new(f)))
}

/// `host_redirect: true`: `service` is the target host; at most one path rewrite.
fn compile_redirect(
    res: &Resource,
    spec: &MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<Action> {
    let target = match redirect_target(&spec.service) {
        Ok(t) => Some(t),
        Err(e) => {
            push_error(
                diags,
                res,
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
                push_error(
                    diags,
                    res,
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
        push_error(
            diags,
            res,
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
}

/// Emissary's route weight (irhttpmapping.py `_route_weight`): see [`Compiled::order`].
fn route_weight(
    spec: &MappingSpec,
    host: &HostMatch,
    headers: &[ValueMatch],
    query: &[ValueMatch],
) -> (i64, usize, usize, usize, String, String) {
    let mut hdr_len = 0usize;
    for h in headers {
        hdr_len += h.name.len() + test_len(&h.test);
    }
    match host {
        HostMatch::Any => {}
        HostMatch::Glob(p) => hdr_len += ":authority".len() + p.to_string().len(),
        HostMatch::Regex(r) => hdr_len += ":authority".len() + r.as_str().len() + 1,
    }
    if let Some(m) = &spec.method {
        hdr_len += ":method".len() + m.len() + usize::from(spec.method_regex);
    }
    let q_len: usize = query.iter().map(|q| q.name.len() + test_len(&q.test)).sum();
    (
        spec.precedence,
        spec.prefix.len(),
        hdr_len,
        q_len,
        spec.prefix.clone(),
        spec.method.clone().unwrap_or_else(|| "GET".into()),
    )
}

/// An exact host (`host` without `host_regex`, or an exact `:authority` header): a `*` in it
/// is an error, as in Emissary's v3alpha1 ("cannot match anything"); `hostname` is the glob.
fn exact_host(
    res: &Resource,
    ptr: &str,
    field: &str,
    raw: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<HostPattern> {
    if raw.contains('*') {
        diags.push(
            Diagnostic::error(
                "host-glob",
                &res.at(ptr),
                format!("{field} exact-match `{raw}` contains *, which cannot match anything"),
            )
            .with_help(format!(
                "write `hostname: \"{raw}\"` for a glob, or set `host_regex: true` with a regular expression"
            )),
        );
        return None;
    }
    match raw.parse::<HostPattern>() {
        Ok(p) => Some(p),
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    "bad-hostname",
                    &res.at(ptr),
                    format!("{field} is not a valid host name: {e}"),
                )
                .with_help("use a host name such as `api.example.com`"),
            );
            None
        }
    }
}

fn test_len(t: &ValueTest) -> usize {
    match t {
        ValueTest::Exact(v) => v.len(),
        // The regex source minus our anchors, plus one as Emissary counts regexes.
        ValueTest::Regex(r) => r.as_str().len().saturating_sub(6) + 1,
        ValueTest::Present => 0,
    }
}

fn match_key(m: &RouteMatch, spec: &MappingSpec, glob: Option<&HostPattern>) -> String {
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
    // `hostname: "*"` is part of the identity (Emissary's `:authority` header), so a Mapping
    // without a host never joins a `*` group.
    match (&m.host, glob) {
        (HostMatch::Regex(r), _) => {
            let _ = write!(k, "r:{}", r.as_str());
        }
        (_, Some(p)) => {
            let _ = write!(k, "g:{p}");
        }
        (_, None) => k.push('-'),
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
    let name_ok = |n: &str| {
        !is_header
            || n.eq_ignore_ascii_case(AUTHORITY)
            || http::HeaderName::from_bytes(n.as_bytes()).is_ok()
    };
    for (name, v) in exact {
        if is_header && name.eq_ignore_ascii_case(AUTHORITY) && matches!(v, MatchValue::Text(_)) {
            // An exact `:authority` is the Mapping's host (see `compile_mapping`).
            continue;
        }
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
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Forward> {
    let (upstream, origin_tls) = compile_upstream(res, spec, contexts, diags)?;
    let rewrite = compile_rewrite(res, spec, diags)?;
    let allow_upgrade = allow_upgrade(spec);
    let h2c = upstream.scheme == Scheme::H2c;
    warn_stream_timeout(res, spec, diags);
    let add_request_headers =
        added_headers(res, &spec.add_request_headers, "add_request_headers", diags);
    let add_response_headers = added_headers(
        res,
        &spec.add_response_headers,
        "add_response_headers",
        diags,
    );
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
        cluster_idle_timeout: spec
            .cluster_idle_timeout_ms
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        allow_upgrade,
        http2: spec.grpc || h2c,
        retry: super::traffic::retry(res, spec.retry_policy.as_ref(), diags),
        breaker: super::traffic::breaker(&spec.circuit_breakers),
        cors: super::traffic::cors(res, spec.cors.as_ref(), diags).map(std::sync::Arc::new),
        load_balancer: spec
            .load_balancer
            .as_ref()
            .map(super::traffic::load_balancer),
        outlier: super::traffic::outlier(res, spec.outlier_detection.as_ref(), diags),
        health_checks: super::traffic::health_checks(res, &spec.health_checks, diags),
        ext_auth: None,
        jwt: None,
        oidc: None,
        rate_limits: Vec::new(),
        origin_tls,
        allow_escaped_slashes: spec.allow_escaped_slashes,
    })
}

/// The upstream address of `service`, switched to TLS by `tls`, and the TLSContext that
/// `tls: NAME` originates with.
fn compile_upstream(
    res: &Resource,
    spec: &MappingSpec,
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(Upstream, Option<OriginTls>)> {
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
    let origin_tls = match origination(res, spec, contexts, diags) {
        Ok(o) => o,
        Err(()) => return None,
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
    Some((upstream, origin_tls))
}

/// `regex_rewrite`, else `rewrite` (Emissary's default: `/`). `None` when the regex is bad.
fn compile_rewrite(
    res: &Resource,
    spec: &MappingSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<Rewrite> {
    Some(match (&spec.regex_rewrite, &spec.rewrite) {
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
    })
}

/// Upgrade protocols allowed (lowercase); `use_websocket` adds `websocket`.
fn allow_upgrade(spec: &MappingSpec) -> Vec<String> {
    let mut allow_upgrade: Vec<String> = spec
        .allow_upgrade
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if spec.use_websocket && !allow_upgrade.iter().any(|u| u == "websocket") {
        allow_upgrade.push("websocket".into());
    }
    allow_upgrade
}

/// `add_request_headers` / `add_response_headers`: invalid names and values are errors and
/// left out; unsupported `%VAR%`s are warned.
fn added_headers(
    res: &Resource,
    map: &BTreeMap<String, AddedHeader>,
    field: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<AddHeader> {
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
}

/// The route timeout covers the whole response: point it out on gRPC Mappings, whose streams
/// may rightly outlast it. Upgrade Mappings are left alone: the timeout stops at the 101, and a
/// tunnel has its own idle limit.
fn warn_stream_timeout(res: &Resource, spec: &MappingSpec, diags: &mut Vec<Diagnostic>) {
    let streams = spec.grpc;
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

fn compile_host(
    r: &Resource,
    h: &HostSpec,
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<HostRoute> {
    let hostname = match h.hostname.as_deref().unwrap_or("*").parse::<HostPattern>() {
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
    if h.mapping_selector.as_ref().is_some_and(|s| !s.is_empty()) && h.selector.is_some() {
        diags.push(
            Diagnostic::warning(
                "selector-ignored",
                &r.at("/spec/selector"),
                "both `mappingSelector` and `selector` are set; `selector` is ignored",
            )
            .with_help("remove `selector` (the deprecated name)"),
        );
    }
    let mut tls_secret = h.tls_secret.as_ref().map(|s| SecretRef {
        namespace: s.namespace.clone().unwrap_or_else(|| r.namespace.clone()),
        name: s.name.clone(),
    });
    let host_name = h.hostname.as_deref().unwrap_or("*");
    let (tls, redirect_from) = host_tls(r, h, host_name, contexts, &mut tls_secret, diags)?;
    if tls.is_some() && tls_secret.is_none() {
        diags.push(
            Diagnostic::warning(
                "tls-settings-without-certificate",
                &r.at("/spec"),
                format!(
                    "Host `{}` has TLS settings but no certificate, so it terminates no TLS and the settings do nothing",
                    r.name
                ),
            )
            .with_help("add a `tlsSecret` (or a `secret` in its TLSContext)"),
        );
    }
    if redirect_from.is_some() && h.request_policy.insecure.action.as_deref() == Some("Route") {
        diags.push(
            Diagnostic::warning(
                "redirect-cleartext-ignored",
                &r.at("/spec/requestPolicy/insecure/action"),
                format!(
                    "Host `{}`: its TLS settings ask to redirect cleartext (`redirect_cleartext_from`) but `requestPolicy.insecure.action` is `Route`, which wins",
                    r.name
                ),
            )
            .with_help("drop one of them"),
        );
    }
    // Emissary's default is Redirect, with or without TLS on the Host.
    let insecure = match h.request_policy.insecure.action.as_deref() {
        Some("Reject") => InsecureAction::Reject,
        Some("Route") => InsecureAction::Route,
        _ => InsecureAction::Redirect,
    };
    if h.request_policy.insecure.action.is_none() && tls_secret.is_none() {
        diags.push(
            Diagnostic::warning(
                "insecure-default-redirect",
                &r.at("/spec"),
                format!(
                    "Host `{}` has no TLS and no `requestPolicy.insecure.action`: as in Emissary, its plain-HTTP requests are redirected to HTTPS",
                    r.name
                ),
            )
            .with_help("set `requestPolicy.insecure.action: Route` when TLS ends in front of the gateway (unless that proxy sends `X-Forwarded-Proto` and `--xff-trusted-hops` is 1 or more), or add a `tlsSecret`"),
        );
    } else if insecure != InsecureAction::Route && tls_secret.is_none() {
        diags.push(
            Diagnostic::warning(
                "insecure-without-tls",
                &r.at("/spec/requestPolicy/insecure/action"),
                format!(
                    "Host `{}` has no TLS, so `{insecure:?}` turns away every request that is not already secure",
                    r.name
                ),
            )
            .with_help("add a `tlsSecret`; or, when TLS ends in front of the gateway, let `--xff-trusted-hops` trust its `X-Forwarded-Proto` or set `requestPolicy.insecure.action: Route`"),
        );
    }
    let acme = host_acme(r, h, tls_secret.is_some(), diags);
    Some(HostRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        hostname,
        tls_secret,
        tls,
        acme,
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

/// `tls: NAME` on a Mapping: the TLSContext's client certificate, CA and SNI for origination.
/// Emissary reports an unknown name and then speaks plain HTTP; silently sending plaintext is
/// worse than refusing, so Legate refuses.
fn origination(
    res: &Resource,
    spec: &MappingSpec,
    contexts: &TlsContexts<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Result<Option<OriginTls>, ()> {
    let Some(serde_json::Value::String(name)) = &spec.tls else {
        return Ok(None);
    };
    if name.is_empty() {
        return Ok(None);
    }
    let Some((cr, f)) = contexts.get(name) else {
        diags.push(
            Diagnostic::error(
                "unknown-tlscontext",
                &res.at("/spec/tls"),
                format!(
                    "`tls: {name}` names a TLSContext that does not exist (or has errors), so no TLS settings can be found for it (Emissary would report the unknown name and send plain HTTP)"
                ),
            )
            .with_help("add the TLSContext, or to originate TLS with the default settings remove `tls` and write the service as `https://host:port`"),
        );
        return Err(());
    };
    let secret = |n: &Option<String>| {
        n.as_ref().filter(|n| !n.is_empty()).map(|n| SecretRef {
            namespace: cr.namespace.clone(),
            name: n.clone(),
        })
    };
    Ok(Some(OriginTls {
        context: cr.name.clone(),
        client_cert: secret(&f.secret),
        ca: secret(&f.ca_secret),
        sni: f.sni.clone().filter(|s| !s.is_empty()),
    }))
}

/// The TLSContexts of a revision, by name (Mappings and Hosts name them without a namespace).
struct TlsContexts<'r> {
    by_name: BTreeMap<&'r str, (&'r Resource, &'r TlsFields)>,
}

impl<'r> TlsContexts<'r> {
    fn collect(resources: &[&'r Resource], diags: &mut Vec<Diagnostic>) -> TlsContexts<'r> {
        let mut by_name: BTreeMap<&'r str, (&'r Resource, &'r TlsFields)> = BTreeMap::new();
        let mut sorted: Vec<&'r Resource> = resources
            .iter()
            .copied()
            .filter(|r| matches!(r.spec, Spec::TlsContext(_)))
            .collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for r in sorted {
            let Spec::TlsContext(f) = &r.spec else {
                continue;
            };
            if let Some((first, _)) = by_name.get(r.name.as_str()) {
                diags.push(
                    Diagnostic::error(
                        "duplicate-tlscontext",
                        &r.at("/metadata/name"),
                        format!(
                            "TLSContext `{}` is also defined in namespace `{}`; names are used without a namespace, so this one is ignored",
                            r.name, first.namespace
                        ),
                    )
                    .with_help("rename one of them"),
                );
                continue;
            }
            // Checked once here, so a bad context is reported even when nothing names it.
            let mut own = Vec::new();
            if tlscontext::compile_policy(r, "/spec", f, Some(&r.name), &mut own).is_some() {
                by_name.insert(&r.name, (r, f.as_ref()));
            }
            diags.extend(own);
        }
        TlsContexts { by_name }
    }

    fn get(&self, name: &str) -> Option<(&'r Resource, &'r TlsFields)> {
        self.by_name.get(name).copied()
    }

    /// The context whose `hosts` lists this hostname or Host name exactly (Emissary matches
    /// no globs here).
    fn for_host(&self, hostname: &str, host_name: &str) -> Option<(&'r Resource, &'r TlsFields)> {
        self.by_name
            .values()
            .find(|(_, f)| f.hosts.iter().any(|h| h == hostname || h == host_name))
            .copied()
    }
}

/// A Host's `acmeProvider` when ACME is on: an authority other than `none`, a `tlsSecret` to
/// store the certificate in and a `privateKeySecret` for the account key; else an error.
fn host_acme(
    r: &Resource,
    h: &HostSpec,
    has_secret: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<AcmeSpec> {
    let p = h.acme_provider.as_ref()?;
    let authority = p.authority.as_deref().unwrap_or("none");
    if authority.eq_ignore_ascii_case("none") {
        return None;
    }
    let mut bad = |what: &str, help: &str| {
        diags.push(
            Diagnostic::error(
                "acme-incomplete",
                &r.at("/spec/acmeProvider"),
                format!("Host `{}`: `acmeProvider` {what}", r.name),
            )
            .with_help(help.to_string()),
        );
    };
    if !(authority.starts_with("https://") || authority.starts_with("http://")) {
        bad(
            &format!("authority `{authority}` is not a URL"),
            "give the ACME directory URL (e.g. https://acme-v02.api.letsencrypt.org/directory) or `none`",
        );
        return None;
    }
    if !has_secret {
        bad(
            "has no `tlsSecret` to store the certificate in",
            "add `tlsSecret: {name: ...}` to the Host",
        );
        return None;
    }
    let Some(key) = &p.private_key_secret else {
        bad(
            "has no `privateKeySecret` for the account key",
            "add `privateKeySecret: {name: ...}`; Legate creates its `tls.key` when missing",
        );
        return None;
    };
    Some(AcmeSpec {
        authority: authority.to_string(),
        email: p.email.clone(),
        account_secret: key.name.clone(),
    })
}

/// The TLS settings of a Host: its `tls` block, its `tlsContext`, or the TLSContext whose
/// `hosts` name it; with the `redirect_cleartext_from` port. Fills `tls_secret` from the
/// context's `secret` when the Host has none. `None`: an error was reported.
#[allow(clippy::type_complexity)]
fn host_tls(
    r: &Resource,
    h: &HostSpec,
    hostname: &str,
    contexts: &TlsContexts<'_>,
    tls_secret: &mut Option<SecretRef>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(Option<TlsPolicy>, Option<i64>)> {
    let named = h.tls_context.as_ref().map(|c| c.name.as_str());
    if named.is_some() && h.tls.is_some() {
        diags.push(
            Diagnostic::error(
                "tls-and-tlscontext",
                &r.at("/spec/tlsContext"),
                format!("Host `{}` sets both `tls` and `tlsContext`", r.name),
            )
            .with_help("keep one: the inline `tls` block or the named TLSContext"),
        );
        return None;
    }
    if let Some(f) = &h.tls {
        tlscontext::serving_notes(r, "/spec/tls", f, diags);
        let p = tlscontext::compile_policy(r, "/spec/tls", f, None, diags)?;
        return Some((Some(p), f.redirect_cleartext_from));
    }
    let found = match named {
        Some(name) => match contexts.get(name) {
            Some(c) => Some(c),
            None => {
                diags.push(
                    Diagnostic::error(
                        "unknown-tlscontext",
                        &r.at("/spec/tlsContext/name"),
                        format!("Host `{}` names TLSContext `{name}`, which does not exist (or has errors)", r.name),
                    )
                    .with_help("add the TLSContext or fix the name"),
                );
                return None;
            }
        },
        None => contexts.for_host(hostname, &r.name),
    };
    let Some((cr, f)) = found else {
        return Some((None, None));
    };
    if let Some(secret) = f.secret.as_deref().filter(|s| !s.is_empty()) {
        match tls_secret {
            Some(own) if own.name != secret => {
                diags.push(
                    Diagnostic::error(
                        "tls-secret-mismatch",
                        &r.at("/spec/tlsSecret/name"),
                        format!(
                            "Host `{}` serves secret `{}` but its TLSContext `{}` names secret `{secret}`",
                            r.name, own.name, cr.name
                        ),
                    )
                    .with_help("name the same Secret in both, or drop `secret` from the TLSContext"),
                );
                return None;
            }
            Some(_) => {}
            None => {
                *tls_secret = Some(SecretRef {
                    namespace: cr.namespace.clone(),
                    name: secret.to_string(),
                })
            }
        }
    }
    let p = tlscontext::compile_policy(cr, "/spec", f, Some(&cr.name), &mut Vec::new())?;
    Some((Some(p), f.redirect_cleartext_from))
}

/// The revision identity of a graph: SHA-256 over a canonical JSON form of what it is compiled
/// from (the routing options and every resource but RouteTests: kind, apiVersion, namespace,
/// name, labels and spec, keys sorted, resources in (kind, namespace, name) order). Never over
/// `Debug` text, so reformatting a type's `Debug` cannot change which revision is which; YAML
/// layout, key order, comments and file names do not count either.
fn graph_hash(resources: &[&Resource], options: &RoutingOptions) -> String {
    let digest = Sha256::digest(canonical_input(resources, options).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The canonical text [`graph_hash`] digests.
fn canonical_input(resources: &[&Resource], options: &RoutingOptions) -> String {
    #[derive(serde::Serialize)]
    struct Input<'a> {
        options: Options,
        resources: Vec<Res<'a>>,
    }
    #[derive(serde::Serialize)]
    struct Options {
        strip_matching_host_port: bool,
        loose_label_selectors: bool,
    }
    #[derive(serde::Serialize)]
    struct Res<'a> {
        kind: &'static str,
        api_version: &'a str,
        namespace: &'a str,
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        spec: serde_json::Value,
    }
    let mut res: Vec<Res<'_>> = resources
        .iter()
        .filter(|r| r.kind != Kind::RouteTest)
        .map(|r| Res {
            kind: r.kind.name(),
            api_version: &r.api_version,
            namespace: &r.namespace,
            name: &r.name,
            labels: &r.labels,
            spec: sorted_keys(r.doc.value.get("spec").unwrap_or(&serde_json::Value::Null)),
        })
        .collect();
    res.sort_by(|a, b| (a.kind, a.namespace, a.name).cmp(&(b.kind, b.namespace, b.name)));
    let input = Input {
        options: Options {
            strip_matching_host_port: options.strip_matching_host_port,
            loose_label_selectors: options.loose_label_selectors,
        },
        resources: res,
    };
    serde_json::to_string(&input).unwrap_or_default()
}

/// `v` with every object's keys in sorted order, whatever order the map type keeps.
fn sorted_keys(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut kv: Vec<_> = m.iter().collect();
            kv.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.clone(), sorted_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
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

    fn doc(kind: &str, name: &str, labels: &str, spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!("---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n{spec}")
    }

    fn compile_with(text: &str, routing: RoutingOptions) -> Outcome {
        let opts = Options {
            routing,
            ..Options::default()
        };
        load_and_compile(&MemTree::new().with("m.yaml", text), &opts)
    }

    /// Every member with its share for a request to `host` + `path`, the insecure action
    /// applied as for a cleartext request when `secure` is false.
    fn served(o: &Outcome, host: &str, path: &str, secure: bool) -> Vec<(String, u32)> {
        served_with(o, host, path, secure, &http::HeaderMap::new())
    }

    fn served_with(
        o: &Outcome,
        host: &str,
        path: &str,
        secure: bool,
        headers: &http::HeaderMap,
    ) -> Vec<(String, u32)> {
        let g = o.graph.as_ref().expect("valid config");
        let head = RequestHead {
            host,
            method: "GET",
            path,
            query: None,
            headers,
        };
        match g.route_request(&head, crate::routes::Arrival::plain(secure)) {
            crate::routes::Routed::Route(m) => m
                .group
                .shares()
                .into_iter()
                .map(|(id, s)| (g.route(id).name.clone(), s))
                .collect(),
            other => vec![(format!("{other:?}").split('(').next().unwrap().into(), 0)],
        }
    }

    fn one(name: &str) -> Vec<(String, u32)> {
        vec![(name.to_string(), 100)]
    }

    fn route(h: &str) -> String {
        format!("hostname: '{h}'\nrequestPolicy: {{insecure: {{action: Route}}}}")
    }

    #[test]
    fn hostless_mappings_selected_by_different_hosts_are_different_groups() {
        let t = doc("Host", "foo", "", &(route("foo.test") + "\nmappingSelector: {matchLabels: {host: foo}}"))
            + &doc("Host", "bar", "", &(route("bar.test") + "\nmappingSelector: {matchLabels: {host: bar}}"))
            + &doc("Mapping", "api-foo", "host: foo, extra: '1'", "prefix: /api/\nservice: a")
            + &doc("Mapping", "api-bar", "host: bar", "prefix: /api/\nservice: b")
            // Only the selector's labels count: `extra` does not split this from api-foo.
            + &doc("Mapping", "api-foo-2", "host: foo, extra: '2'", "prefix: /api/\nservice: c\nweight: 10");
        let o = compile_text(&t);
        assert!(o.is_ok(), "{:?}", o.diagnostics);
        assert_eq!(
            served(&o, "foo.test", "/api/x", true),
            [("api-foo".to_string(), 90), ("api-foo-2".to_string(), 10)]
        );
        assert_eq!(served(&o, "bar.test", "/api/x", true), one("api-bar"));
    }

    #[test]
    fn same_hostname_and_prefix_is_one_group_with_merged_labels() {
        let t = doc(
            "Host",
            "foo",
            "",
            &(route("*") + "\nmappingSelector: {matchLabels: {host: foo}}"),
        ) + &doc(
            "Host",
            "bar",
            "",
            &(route("bar.test") + "\nmappingSelector: {matchLabels: {host: bar}}"),
        ) + &doc(
            "Mapping",
            "m1",
            "host: foo",
            "hostname: '*'\nprefix: /api/\nservice: a",
        ) + &doc(
            "Mapping",
            "m2",
            "host: bar",
            "hostname: '*'\nprefix: /api/\nservice: b",
        );
        let o = compile_text(&t);
        // One group; its merged labels end with `host: bar` (the later member wins), so only
        // the `bar` Host selects it, with both members.
        let both = vec![("m1".to_string(), 50), ("m2".to_string(), 50)];
        assert_eq!(served(&o, "bar.test", "/api/", true), both);
        assert_eq!(
            served(&o, "other.test", "/api/", true),
            vec![("NoRoute".to_string(), 0)]
        );
    }

    #[test]
    fn unselected_hostless_mapping_never_joins_a_star_group() {
        let t = doc("Host", "all", "", &route("*"))
            + &doc(
                "Mapping",
                "star",
                "",
                "hostname: '*'\nprefix: /api/\nservice: a",
            )
            + &doc("Mapping", "lost", "", "prefix: /api/\nservice: b");
        let o = compile_text(&t);
        assert_eq!(served(&o, "x.test", "/api/", true), one("star"));
        assert!(!codes(&o).contains(&"accidental-split"), "{:?}", codes(&o));
        assert!(o
            .diagnostics
            .iter()
            .any(|d| d.code == "unreachable-mapping" && d.message.contains("`lost`")));
    }

    #[test]
    fn default_host_only_without_hosts() {
        let m = doc(
            "Mapping",
            "byname",
            "",
            "hostname: '*.fallback.test'\nprefix: /f/\nservice: a",
        ) + &doc(
            "Mapping",
            "star",
            "",
            "hostname: '*'\nprefix: /s/\nservice: a",
        );
        let o = compile_text(&m);
        assert_eq!(served(&o, "a.fallback.test", "/f/", false), one("byname"));
        assert_eq!(served(&o, "x.test:8080", "/s/", false), one("star"));
        let o = compile_text(&(doc("Host", "shop", "", &route("shop.test")) + &m));
        let none = vec![("NoRoute".to_string(), 0)];
        assert_eq!(served(&o, "a.fallback.test", "/f/", false), none);
        assert_eq!(served(&o, "x.test", "/s/", false), none);
        assert_eq!(served(&o, "shop.test", "/s/", false), one("star"));
        assert!(o
            .diagnostics
            .iter()
            .any(|d| d.code == "unreachable-mapping" && d.message.contains("`byname`")));
    }

    #[test]
    fn ports_are_matched_unless_stripped() {
        let t = doc("Host", "plain", "", &route("foo.test"))
            + &doc("Host", "alt", "", &route("foo.test:8443"))
            + &doc(
                "Mapping",
                "a",
                "",
                "hostname: foo.test\nprefix: /a/\nservice: a",
            )
            + &doc(
                "Mapping",
                "b",
                "",
                "hostname: 'foo.test:8443'\nprefix: /b/\nservice: b",
            )
            + &doc("Mapping", "s", "", "hostname: '*'\nprefix: /s/\nservice: b");
        let o = compile_text(&t);
        assert!(o.is_ok(), "{:?}", o.diagnostics);
        let none = vec![("NoRoute".to_string(), 0)];
        assert_eq!(served(&o, "foo.test", "/a/", true), one("a"));
        assert_eq!(served(&o, "foo.test:8080", "/a/", true), none);
        assert_eq!(served(&o, "foo.test:8443", "/b/", true), one("b"));
        assert_eq!(served(&o, "foo.test:8443", "/a/", true), none);
        assert_eq!(served(&o, "foo.test", "/b/", true), none);
        assert_eq!(served(&o, "foo.test:8443", "/s/", true), one("s"));
        let o = compile_with(
            &t,
            RoutingOptions {
                strip_matching_host_port: true,
                ..RoutingOptions::default()
            },
        );
        assert!(o.graph.as_ref().unwrap().options.strip_matching_host_port);
    }

    #[test]
    fn duplicate_hostnames_warn_and_the_later_wins() {
        let t = doc(
            "Host",
            "a-first",
            "",
            &(route("dup.test") + "\nmappingSelector: {matchLabels: {h: a}}"),
        ) + &doc(
            "Host",
            "b-second",
            "",
            &(route("dup.test") + "\nmappingSelector: {matchLabels: {h: b}}"),
        ) + &doc("Mapping", "ma", "h: a", "prefix: /x/\nservice: a")
            + &doc("Mapping", "mb", "h: b", "prefix: /x/\nservice: b");
        let o = compile_text(&t);
        let d = o
            .diagnostics
            .iter()
            .find(|d| d.code == "duplicate-hostname")
            .expect("warned");
        assert!(d.message.contains("default/b-second"), "{}", d.message);
        assert_eq!(served(&o, "dup.test", "/x/", true), one("mb"));
    }

    #[test]
    fn authority_header_forms() {
        let t = doc("Host", "api", "", &route("api.test"))
            + &doc("Host", "web", "", &route("web.test"))
            // Exact :authority acts as `host`: attaches to api.test only.
            + &doc("Mapping", "exact", "", "prefix: /e/\nservice: a\nheaders: {':authority': api.test}")
            // Presence check: a header match only, so without a hostname no Host takes it...
            + &doc("Mapping", "present", "", "prefix: /p/\nservice: a\nheaders: {':authority': true}")
            // ...with one, it matches any authority.
            + &doc("Mapping", "present-star", "", "hostname: '*'\nprefix: /ps/\nservice: a\nheaders: {':authority': true}")
            // A regex is only a header match: no Host attachment by it.
            + &doc("Mapping", "regex", "", "prefix: /r/\nservice: a\nregex_headers: {':authority': 'web\\..*'}")
            + &doc("Mapping", "regex-star", "", "hostname: '*'\nprefix: /rs/\nservice: a\nregex_headers: {':authority': 'web\\..*'}")
            // host_regex attaches to every Host.
            + &doc("Mapping", "hre", "", "host: '.*'\nhost_regex: true\nprefix: /h/\nservice: a")
            // hostname overrides host.
            + &doc("Mapping", "both", "", "host: web.test\nhostname: api.test\nprefix: /b/\nservice: a");
        let o = compile_text(&t);
        assert!(o.is_ok(), "{:?}", o.diagnostics);
        let none = vec![("NoRoute".to_string(), 0)];
        assert_eq!(served(&o, "api.test", "/e/", true), one("exact"));
        assert_eq!(served(&o, "web.test", "/e/", true), none);
        assert_eq!(served(&o, "api.test", "/p/", true), none);
        assert_eq!(served(&o, "web.test", "/ps/", true), one("present-star"));
        assert_eq!(served(&o, "web.test", "/r/", true), none);
        assert_eq!(served(&o, "web.test", "/rs/", true), one("regex-star"));
        assert_eq!(served(&o, "api.test", "/rs/", true), none);
        assert_eq!(served(&o, "api.test", "/h/", true), one("hre"));
        assert_eq!(served(&o, "web.test", "/h/", true), one("hre"));
        assert_eq!(served(&o, "api.test", "/b/", true), one("both"));
        assert_eq!(served(&o, "web.test", "/b/", true), none);
        let unreachable: Vec<_> = o
            .diagnostics
            .iter()
            .filter(|d| d.code == "unreachable-mapping")
            .map(|d| d.message.split('`').nth(1).unwrap())
            .collect();
        assert_eq!(unreachable, ["present", "regex"]);
    }

    #[test]
    fn acme_provider_needs_a_url_a_tls_secret_and_an_account_key() {
        let host = |acme: &str| {
            doc(
                "Host",
                "h",
                "",
                &format!("hostname: a.test\ntlsSecret: {{name: a-tls}}\nacmeProvider: {acme}"),
            )
        };
        let o = compile_text(&host(
            "{authority: 'https://acme.test/dir', email: o@a.test, privateKeySecret: {name: acct}}",
        ));
        let g = o.graph.as_ref().expect("valid config");
        let acme = g.hosts[0].acme.as_ref().expect("ACME on");
        assert_eq!(acme.authority, "https://acme.test/dir");
        assert_eq!(acme.account_secret, "acct");
        let o = compile_text(&host("{authority: none}"));
        assert!(o.graph.as_ref().unwrap().hosts[0].acme.is_none());
        for bad in [
            "{authority: letsencrypt, privateKeySecret: {name: acct}}",
            "{authority: 'https://acme.test/dir'}",
        ] {
            let o = compile_text(&host(bad));
            assert_eq!(codes(&o), ["acme-incomplete"], "{bad}: {:?}", o.diagnostics);
        }
    }

    #[test]
    fn star_in_an_exact_host_is_an_error() {
        for spec in [
            "host: '*.example.com'\nprefix: /x/\nservice: a",
            "headers: {':authority': '*.example.com'}\nprefix: /x/\nservice: a",
        ] {
            let o = compile_text(&doc("Mapping", "m", "", spec));
            let d = o
                .diagnostics
                .iter()
                .find(|d| d.code == "host-glob")
                .unwrap_or_else(|| panic!("{spec}: {:?}", o.diagnostics));
            assert!(d
                .message
                .contains("contains *, which cannot match anything"));
            assert!(!o.is_ok());
        }
        // A glob belongs in `hostname`.
        let o = compile_text(&doc(
            "Mapping",
            "m",
            "",
            "hostname: '*.example.com'\nprefix: /x/\nservice: a",
        ));
        assert!(o.is_ok());
    }

    #[test]
    fn insecure_default_is_redirect_even_without_tls() {
        let t = doc("Host", "plain", "", "hostname: plain.test")
            + &doc(
                "Host",
                "rej",
                "",
                "hostname: rej.test\nrequestPolicy: {insecure: {action: Reject}}",
            )
            + &doc("Mapping", "app", "", "hostname: '*'\nprefix: /\nservice: a")
            + &doc(
                "Mapping",
                "acme",
                "",
                "hostname: '*'\nprefix: /.well-known/acme-challenge/\nservice: b",
            );
        let o = compile_text(&t);
        let d = o
            .diagnostics
            .iter()
            .find(|d| d.code == "insecure-default-redirect")
            .expect("warned");
        assert!(d.help.as_deref().unwrap().contains("action: Route"));
        let g = o.graph.as_ref().unwrap();
        assert_eq!(g.hosts[0].insecure, InsecureAction::Redirect);
        let redirect = vec![("RedirectToHttps".to_string(), 0)];
        assert_eq!(served(&o, "plain.test", "/x", false), redirect);
        assert_eq!(served(&o, "plain.test", "/x", true), one("app"));
        assert_eq!(
            served(&o, "rej.test", "/x", false),
            vec![("Rejected".to_string(), 0)]
        );
        // ACME challenges are routed under Redirect and Reject alike.
        for host in ["plain.test", "rej.test"] {
            assert_eq!(
                served(&o, host, "/.well-known/acme-challenge/t", false),
                one("acme")
            );
        }
    }

    /// The shape of Emissary's `cmd/entrypoint/testdata/hostsem-hostsel` and
    /// `hostsem-disjoint-hosts` (written anew): per-Host selectors over hostless Mappings, the
    /// older `selector`, and each Host's insecure action on the routes it takes.
    #[test]
    fn emissary_hostsem_expectations() {
        let h = |name: &str, action: &str, sel: &str| {
            doc(
                "Host",
                &format!("{name}-host"),
                "",
                &format!("hostname: {name}.example.com\ntlsSecret: {{name: {name}-secret}}\nrequestPolicy: {{insecure: {{action: {action}}}}}\n{sel}: {{matchLabels: {{{name}-host: 'yes'}}}}"),
            )
        };
        let t = h("h1", "Route", "mappingSelector")
            + &h("h2", "Redirect", "selector")
            + &h("h3", "Reject", "mappingSelector")
            + &doc(
                "Mapping",
                "quote-1",
                "h1-host: 'yes'",
                "prefix: /quote-1/\nservice: quote",
            )
            + &doc(
                "Mapping",
                "quote-2",
                "h2-host: 'yes'",
                "prefix: /quote-2/\nservice: quote",
            )
            + &doc(
                "Mapping",
                "quote",
                "h1-host: 'yes', h2-host: 'yes', h3-host: 'yes'",
                "prefix: /quote/\nservice: quote",
            )
            + &doc(
                "Mapping",
                "ignored",
                "ignore-this-mapping: 'yes'",
                "prefix: /ignore/\nservice: quote",
            );
        let o = compile_text(&t);
        assert!(o.is_ok(), "{:?}", o.diagnostics);
        let none = vec![("NoRoute".to_string(), 0)];
        // hostsel: each hostless Mapping on its own Host only.
        assert_eq!(
            served(&o, "h1.example.com", "/quote-1/", false),
            one("quote-1")
        );
        assert_eq!(served(&o, "h2.example.com", "/quote-1/", true), none);
        assert_eq!(
            served(&o, "h2.example.com", "/quote-2/", false),
            vec![("RedirectToHttps".to_string(), 0)]
        );
        assert_eq!(
            served(&o, "h2.example.com", "/quote-2/", true),
            one("quote-2")
        );
        // disjoint-hosts: one Mapping every Host selects; the insecure action per Host.
        assert_eq!(served(&o, "h1.example.com", "/quote/", false), one("quote"));
        assert_eq!(served(&o, "h3.example.com", "/quote/", true), one("quote"));
        assert_eq!(
            served(&o, "h3.example.com", "/quote/", false),
            vec![("Rejected".to_string(), 0)]
        );
        assert_eq!(served(&o, "h1.example.com", "/ignore/", true), none);
    }

    #[test]
    fn strict_selectors_and_the_loose_opt_out() {
        let t = doc("Host", "h", "", &(route("h.test") + "\nmappingSelector: {matchLabels: {team: a, tier: web}}"))
            + &doc("Host", "old", "", &(route("old.test") + "\nmappingSelector: {}\nselector: {matchLabels: {team: b}}"))
            + &doc("Host", "bare", "", &route("bare.test"))
            // Hostname overlaps, labels match: attached.
            + &doc("Mapping", "both", "team: a, tier: web", "hostname: '*.test'\nprefix: /both/\nservice: a")
            // Hostname overlaps, one label of two: strict says no.
            + &doc("Mapping", "partial", "team: a", "hostname: h.test\nprefix: /partial/\nservice: a")
            // Labels match, hostname does not overlap: strict says no.
            + &doc("Mapping", "elsewhere", "team: a, tier: web", "hostname: x.test\nprefix: /else/\nservice: a")
            // Hostname overlaps, no labels: strict says no.
            + &doc("Mapping", "nolabel", "", "hostname: h.test\nprefix: /nolabel/\nservice: a")
            // The older `selector`, used because `mappingSelector` is empty.
            + &doc("Mapping", "legacy", "team: b", "prefix: /legacy/\nservice: a");
        let o = compile_text(&t);
        let none = vec![("NoRoute".to_string(), 0)];
        assert_eq!(served(&o, "h.test", "/both/", true), one("both"));
        assert_eq!(served(&o, "bare.test", "/both/", true), one("both"));
        assert_eq!(served(&o, "h.test", "/partial/", true), none);
        assert_eq!(served(&o, "h.test", "/else/", true), none);
        assert_eq!(served(&o, "old.test", "/legacy/", true), one("legacy"));
        // A Host without a selector never takes a hostless Mapping.
        assert_eq!(served(&o, "bare.test", "/legacy/", true), none);

        let loose = compile_with(
            &t,
            RoutingOptions {
                loose_label_selectors: true,
                ..RoutingOptions::default()
            },
        );
        assert_eq!(served(&o, "h.test", "/nolabel/", true), none);
        // Loose: one label is enough, and the hostname alone is enough.
        assert_eq!(served(&loose, "h.test", "/partial/", true), one("partial"));
        assert_eq!(served(&loose, "h.test", "/nolabel/", true), one("nolabel"));
        // Attached by labels, but the route still matches its own hostname only.
        assert_eq!(served(&loose, "h.test", "/else/", true), none);
        assert!(loose.graph.as_ref().unwrap().hosts[1]
            .groups
            .iter()
            .any(|&gi| loose.graph.as_ref().unwrap().groups[gi]
                .matcher
                .path
                .as_str()
                == "/else/"));
    }

    #[test]
    fn balancing_fields_on_http2_upstreams_compile_without_a_warning() {
        let o = compile_text(&mapping(
            "g",
            "hostname: '*'\nprefix: /g/\nservice: g:50051\ngrpc: true\nload_balancer: {policy: round_robin}\noutlier_detection: {consecutive_5xx: 3}",
        ));
        assert!(o.graph.is_some());
        // Balanced per request and ejected per address like HTTP/1.1 upstreams (no
        // `http2-not-balanced` any more).
        assert!(
            !codes(&o).contains(&"http2-not-balanced"),
            "{:?}",
            codes(&o)
        );
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
    fn hash_is_over_a_canonical_json_of_the_input_not_debug_text() {
        let h = |t: &str| compile_text(t).graph.unwrap().hash.clone();
        let text = mapping("x", "service: a\nprefix: /x/\nhostname: '*'");
        let canonical = concat!(
            r#"{"options":{"strip_matching_host_port":false,"loose_label_selectors":false},"#,
            r#""resources":[{"kind":"Mapping","api_version":"legate.dev/v1alpha1","#,
            r#""namespace":"default","name":"x","labels":{},"#,
            r#""spec":{"hostname":"*","prefix":"/x/","service":"a"}}]}"#
        );
        let want: String = Sha256::digest(canonical.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(h(&text), want);
        // Key order, quoting and comments are layout, not content.
        let relaid = mapping(
            "x",
            "# the x route\nhostname: \"*\"\nprefix: /x/\nservice: a",
        );
        assert_eq!(h(&relaid), want);
        // A RouteTest checks the graph; it is not part of it.
        let with_test = text.clone()
            + "---\napiVersion: legate.dev/v1alpha1\nkind: RouteTest\nmetadata:\n  name: t\nspec:\n  cases:\n    - request: {path: /x/}\n      expect: {mapping: x}\n";
        let o = compile_text(&with_test);
        assert_eq!(o.graph.as_ref().unwrap().hash, want, "{:?}", o.diagnostics);
    }

    #[test]
    fn envoy_substitutions_convert() {
        assert_eq!(envoy_substitution("/v\\1/\\2"), "/v${1}/${2}");
        assert_eq!(envoy_substitution("/cost$5"), "/cost$$5");
    }

    #[test]
    fn host_association_by_glob_and_selector() {
        let t = "---\napiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hostname: h.example\n  mappingSelector:\n    matchLabels: {team: a}\n".to_string()
            + "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: sel\n  labels: {team: a}\nspec:\n  prefix: /sel/\n  service: a\n"
            + &mapping("other", "prefix: /other/\nservice: a")
            + "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: glob\n  labels: {team: a}\nspec:\n  hostname: '*.example'\n  prefix: /glob/\n  service: a\n"
            + &mapping("unlabelled-glob", "hostname: '*.example'\nprefix: /nolabel/\nservice: a");
        let o = compile_text(&t);
        assert_eq!(route_for(&o, "GET", "/sel/", &[]).as_deref(), Some("sel"));
        assert_eq!(route_for(&o, "GET", "/glob/", &[]).as_deref(), Some("glob"));
        assert_eq!(route_for(&o, "GET", "/other/", &[]), None);
        // Strict selectors: the hostname overlaps but the Host's selector does not take it.
        assert_eq!(route_for(&o, "GET", "/nolabel/", &[]), None);
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

#[cfg(test)]
mod default_host_tests {
    use crate::config::{load_and_compile, MemTree, Options};
    use crate::routes::{Arrival, RequestHead, Routed};

    /// With every Host invalid (left out under skip-invalid), the default Host serves again.
    #[test]
    fn all_hosts_invalid_brings_the_default_host_back() {
        let text = "---\napiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: bad\nspec:\n  hostname: 'a*b.example'\n---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  hostname: '*'\n  prefix: /m/\n  service: m\n";
        let opts = Options {
            skip_invalid: true,
            ..Options::default()
        };
        let o = load_and_compile(&MemTree::new().with("m.yaml", text), &opts);
        let g = o.graph.expect("the valid part compiles");
        assert!(g.hosts.is_empty());
        let headers = http::HeaderMap::new();
        let head = RequestHead {
            host: "any.test",
            method: "GET",
            path: "/m/x",
            query: None,
            headers: &headers,
        };
        assert!(matches!(
            g.route_request(&head, Arrival::plain(false)),
            Routed::Route(m) if m.host.is_none()
        ));
    }
}
