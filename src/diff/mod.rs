//! `legate diff`: what a change does to the routes, not to the YAML.
//!
//! Owns: comparing two compiled graphs (route by route, per Host table, in match order) and the
//! findings a YAML diff hides: a new or changed route that takes another's traffic (shadowing),
//! a route that becomes unreachable, canary share changes, a Host that loses TLS, changed
//! redirects. Pure: both sides arrive compiled by the same `config` code as the gateway.
//!
//! Shadowing is found with witness requests: for each route with a literal match, a request
//! it must serve (its prefix, host, method, exact headers and query) is routed through both
//! graphs; where the answer changes, the finding names who serves it now.

pub mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::routes::describe::{describe_action, describe_match, host_of};
use crate::routes::{
    Action, Graph, HostMatch, HostPattern, MethodMatch, PathMatch, RequestHead, Route, ValueTest,
};

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RouteDiff {
    pub tables: Vec<TableDiff>,
    pub hosts: Vec<HostChange>,
    pub findings: Vec<Finding>,
    /// Mappings whose compiled route differs in any field.
    pub changed_mappings: usize,
    pub added_mappings: usize,
    pub removed_mappings: usize,
}

impl RouteDiff {
    /// Whether anything about routing changed.
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|t| t.entries.is_empty()) && self.hosts.is_empty()
    }
}

/// Changes in the route table of one Host (or of the hostname fallback).
#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    /// `Host default/www (www.example.test)` or the fallback's title.
    pub title: String,
    pub entries: Vec<Entry>,
    /// Routes in the table after the change.
    pub routes_after: usize,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One route that was added, removed or changed in a table.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub kind: ChangeKind,
    /// `namespace/name` of the Mapping.
    pub mapping: String,
    /// Match position (1-based) before and after, when present.
    pub before: Option<usize>,
    pub after: Option<usize>,
    /// What the route matches (after the change, or before for removed routes).
    pub matches: String,
    /// Field-by-field differences: (field, before, after).
    pub fields: Vec<(String, String, String)>,
}

/// A Host added, removed or changed.
#[derive(Debug, Clone, Serialize)]
pub struct HostChange {
    pub kind: ChangeKind,
    pub host: String,
    pub fields: Vec<(String, String, String)>,
}

/// Something a reviewer must not miss.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub kind: FindingKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    Shadowed,
    Unreachable,
    TrafficMoved,
    CanaryShift,
    TlsLost,
    RedirectChanged,
}

/// A Host's TLS settings in one line, for the Host field diff.
fn tls_settings(t: &crate::tls::context::TlsPolicy) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &t.context {
        parts.push(format!("TLSContext {c}"));
    }
    if t.min_version.is_some() || t.max_version.is_some() {
        parts.push(format!("versions {:?}..{:?}", t.min_version, t.max_version));
    }
    if let Some(ca) = &t.client_ca {
        let how = if t.cert_required {
            "required"
        } else {
            "optional"
        };
        parts.push(format!("client certificates {how} (CA {})", ca.name));
    }
    if let Some(crl) = &t.crl {
        parts.push(format!("CRL {}", crl.name));
    }
    if !t.cipher_suites.is_empty() {
        parts.push(format!("ciphers {}", t.cipher_suites.join(",")));
    }
    if !t.ecdh_curves.is_empty() {
        parts.push(format!("curves {}", t.ecdh_curves.join(",")));
    }
    if !t.alpn.is_empty() {
        parts.push(format!("alpn {}", t.alpn.join(",")));
    }
    parts.join("; ")
}

/// Per-route facts compared field by field.
fn fields_of(g: &Graph, r: &Route) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let grp = &g.groups[r.group];
    m.insert("match", describe_match(g, r.group));
    m.insert("host", host_of(&r.matcher.host));
    m.insert("precedence", r.precedence.to_string());
    let share = grp
        .shares()
        .iter()
        .find(|(id, _)| *id == r.id)
        .map(|(_, s)| format!("{s}%"));
    match (share, grp.shadow) {
        (Some(s), _) => {
            m.insert("weight", s);
        }
        (None, Some((id, pct))) if id == r.id => {
            m.insert("shadow", format!("{pct}% of requests copied"));
        }
        _ => {}
    }
    match &r.action {
        Action::Forward(f) => {
            m.insert("upstream", f.upstream.to_string());
            m.insert("action", describe_action(&r.action));
            m.insert("timeout", fmt_dur(f.timeout));
            m.insert("connect_timeout", fmt_dur(Some(f.connect_timeout)));
            m.insert("idle_timeout", fmt_dur(f.idle_timeout));
            if f.cluster_idle_timeout.is_some() {
                m.insert("cluster_idle_timeout", fmt_dur(f.cluster_idle_timeout));
            }
            if let Some(h) = &f.host_rewrite {
                m.insert("host_rewrite", h.clone());
            }
            if f.auto_host_rewrite {
                m.insert("auto_host_rewrite", "true".into());
            }
            let hdrs = |v: &[crate::routes::AddHeader]| {
                v.iter()
                    .map(|h| {
                        format!(
                            "{}={}{}",
                            h.name,
                            h.value,
                            if h.append { "" } else { " (replace)" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for (k, v) in [
                ("add_request_headers", hdrs(&f.add_request_headers)),
                ("add_response_headers", hdrs(&f.add_response_headers)),
                (
                    "remove_request_headers",
                    f.remove_request_headers.join(", "),
                ),
                (
                    "remove_response_headers",
                    f.remove_response_headers.join(", "),
                ),
                ("allow_upgrade", f.allow_upgrade.join(", ")),
            ] {
                if !v.is_empty() {
                    m.insert(k, v);
                }
            }
            if f.http2 {
                m.insert("grpc", "true".into());
            }
            m.extend(crate::guard::describe(f));
        }
        Action::Redirect(_) => {
            m.insert("redirect", describe_action(&r.action));
        }
    }
    m
}

fn fmt_dur(d: Option<std::time::Duration>) -> String {
    match d {
        None => "none".into(),
        Some(d) => format!("{}ms", d.as_millis()),
    }
}

fn key(r: &Route) -> String {
    format!("{}/{}", r.namespace, r.name)
}

/// Tables of a graph keyed by a stable identity: the Host's `namespace/name`, or "" for the
/// default Host (which serves only when no Host is defined).
fn tables(g: &Graph) -> Vec<(String, String, &[usize])> {
    let mut out: Vec<(String, String, &[usize])> = g
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            (
                format!("{}/{}", h.namespace, h.name),
                format!("Host {}/{} ({})", h.namespace, h.name, h.hostname),
                g.tables[i].groups.as_slice(),
            )
        })
        .collect();
    out.push((
        String::new(),
        crate::routes::DEFAULT_HOST_TITLE.into(),
        g.tables[g.hosts.len()].groups.as_slice(),
    ));
    out
}

/// Route order within a table: mapping key -> (1-based position, route).
fn ordered<'g>(g: &'g Graph, groups: &[usize]) -> Vec<(String, usize, &'g Route)> {
    let mut out = Vec::new();
    for (pos, &gi) in groups.iter().enumerate() {
        let grp = &g.groups[gi];
        let mut ids: Vec<_> = grp.members.iter().map(|(id, _)| *id).collect();
        if let Some((s, _)) = grp.shadow {
            ids.push(s);
        }
        for id in ids {
            let r = g.route(id);
            out.push((key(r), pos + 1, r));
        }
    }
    out
}

/// Compare two graphs.
///
/// Passes: count Mappings, compare Hosts, compare each route table, then the findings a
/// reviewer must not miss (per-Mapping shifts, traffic that moves, routes that become
/// unreachable), once each.
pub fn diff(base: &Graph, head: &Graph) -> RouteDiff {
    let mut d = RouteDiff::default();
    let base_routes: Routes<'_> = base.routes.iter().map(|r| (key(r), r)).collect();
    let head_routes: Routes<'_> = head.routes.iter().map(|r| (key(r), r)).collect();
    count_mappings(&mut d, base, head, &base_routes, &head_routes);
    diff_hosts(&mut d, base, head);
    diff_ports(&mut d, base, head);
    let bt = tables(base);
    let ht = tables(head);
    diff_tables(&mut d, base, head, &bt, &ht);
    per_mapping_findings(&mut d, base, head, &base_routes, &head_routes);
    moved_traffic_findings(&mut d, base, head, &bt, &head_routes);
    unreachable_findings(&mut d, base, head, &ht, &base_routes);
    dedup_findings(&mut d);
    d
}

/// Routes by `namespace/name`.
type Routes<'g> = BTreeMap<String, &'g Route>;

/// Route tables: (key, title, group indexes in match order).
type Tables<'g> = [(String, String, &'g [usize])];

fn count_mappings(
    d: &mut RouteDiff,
    base: &Graph,
    head: &Graph,
    base_routes: &Routes<'_>,
    head_routes: &Routes<'_>,
) {
    d.added_mappings = head_routes
        .keys()
        .filter(|k| !base_routes.contains_key(*k))
        .count();
    d.removed_mappings = base_routes
        .keys()
        .filter(|k| !head_routes.contains_key(*k))
        .count();
    d.changed_mappings = head_routes
        .iter()
        .filter(|(k, r)| {
            base_routes
                .get(*k)
                .is_some_and(|b| fields_of(base, b) != fields_of(head, r))
        })
        .count();
}

fn diff_hosts(d: &mut RouteDiff, base: &Graph, head: &Graph) {
    let bh: BTreeMap<String, &crate::routes::HostRoute> = base
        .hosts
        .iter()
        .map(|h| (format!("{}/{}", h.namespace, h.name), h))
        .collect();
    let hh: BTreeMap<String, &crate::routes::HostRoute> = head
        .hosts
        .iter()
        .map(|h| (format!("{}/{}", h.namespace, h.name), h))
        .collect();
    let host_fields = |h: &crate::routes::HostRoute| -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        m.insert("hostname", h.hostname.to_string());
        m.insert(
            "tls",
            h.tls_secret
                .as_ref()
                .map(|s| format!("secret {}/{}", s.namespace, s.name))
                .unwrap_or_else(|| "none".into()),
        );
        m.insert("insecure", format!("{:?}", h.insecure));
        if let Some(t) = &h.tls {
            m.insert("tls settings", tls_settings(t));
        }
        m
    };
    for k in bh.keys().chain(hh.keys()).collect::<BTreeSet<_>>() {
        match (bh.get(k), hh.get(k)) {
            (Some(_), None) => d.hosts.push(HostChange {
                kind: ChangeKind::Removed,
                host: k.clone(),
                fields: vec![],
            }),
            (None, Some(h)) => d.hosts.push(HostChange {
                kind: ChangeKind::Added,
                host: k.clone(),
                fields: host_fields(h)
                    .into_iter()
                    .map(|(f, v)| (f.to_string(), String::new(), v))
                    .collect(),
            }),
            (Some(b), Some(h)) => {
                let fb = host_fields(b);
                let fh = host_fields(h);
                let fields = field_changes(&fb, &fh);
                if !fields.is_empty() {
                    let requires = |h: &crate::routes::HostRoute| {
                        h.tls.as_ref().is_some_and(|t| t.cert_required)
                    };
                    if requires(b) && !requires(h) {
                        d.findings.push(Finding {
                            kind: FindingKind::TlsLost,
                            message: format!(
                                "Host `{k}` ({}) no longer requires client certificates",
                                h.hostname
                            ),
                        });
                    }
                    if b.tls_secret.is_some() && h.tls_secret.is_none() {
                        d.findings.push(Finding {
                            kind: FindingKind::TlsLost,
                            message: format!(
                                "Host `{k}` ({}) loses TLS: it will serve cleartext only",
                                h.hostname
                            ),
                        });
                    }
                    d.hosts.push(HostChange {
                        kind: ChangeKind::Changed,
                        host: k.clone(),
                        fields,
                    });
                }
            }
            (None, None) => {}
        }
    }
}

/// Each table present on either side, in head order, then the base's own.
fn diff_tables(d: &mut RouteDiff, base: &Graph, head: &Graph, bt: &Tables<'_>, ht: &Tables<'_>) {
    let mut keys: Vec<&String> = Vec::new();
    for (k, _, _) in ht.iter().chain(bt.iter()) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for tk in keys {
        let t = diff_table(base, head, bt, ht, tk);
        d.tables.push(t);
    }
}

/// Added, changed (fields, relative position) and removed routes of table `tk`.
fn diff_table(
    base: &Graph,
    head: &Graph,
    bt: &Tables<'_>,
    ht: &Tables<'_>,
    tk: &String,
) -> TableDiff {
    let b = bt.iter().find(|(k, _, _)| k == tk);
    let h = ht.iter().find(|(k, _, _)| k == tk);
    let title = h.or(b).map(|t| t.1.clone()).unwrap_or_default();
    let bo = b.map(|(_, _, g)| ordered(base, g)).unwrap_or_default();
    let ho = h.map(|(_, _, g)| ordered(head, g)).unwrap_or_default();
    let b_index: HashMap<&str, usize> = bo
        .iter()
        .enumerate()
        .map(|(i, x)| (x.0.as_str(), i))
        .collect();
    let h_keys: HashSet<&str> = ho.iter().map(|x| x.0.as_str()).collect();
    // Rank among the routes present on both sides: a route whose rank changes moved
    // relative to the others (it is matched before or after different routes now).
    let rank = |list: &[(String, usize, &Route)],
                other: &dyn Fn(&str) -> bool|
     -> HashMap<String, usize> {
        list.iter()
            .filter(|x| other(&x.0))
            .enumerate()
            .map(|(i, x)| (x.0.clone(), i))
            .collect()
    };
    let b_rank = rank(&bo, &|k| h_keys.contains(k));
    let h_rank = rank(&ho, &|k| b_index.contains_key(k));
    let mut entries = Vec::new();
    for (k, pos, r) in &ho {
        match b_index.get(k.as_str()).map(|&i| &bo[i]) {
            None => entries.push(Entry {
                kind: ChangeKind::Added,
                mapping: k.clone(),
                before: None,
                after: Some(*pos),
                matches: describe_match(head, r.group),
                fields: fields_of(head, r)
                    .into_iter()
                    .map(|(f, v)| (f.to_string(), String::new(), v))
                    .collect(),
            }),
            Some((_, bpos, br)) => {
                let mut fields = field_changes(&fields_of(base, br), &fields_of(head, r));
                if b_rank.get(k) != h_rank.get(k) {
                    fields.push(("position".into(), format!("#{bpos}"), format!("#{pos}")));
                }
                if !fields.is_empty() {
                    entries.push(Entry {
                        kind: ChangeKind::Changed,
                        mapping: k.clone(),
                        before: Some(*bpos),
                        after: Some(*pos),
                        matches: describe_match(head, r.group),
                        fields,
                    });
                }
            }
        }
    }
    for (k, pos, r) in &bo {
        if !h_keys.contains(k.as_str()) {
            entries.push(Entry {
                kind: ChangeKind::Removed,
                mapping: k.clone(),
                before: Some(*pos),
                after: None,
                matches: describe_match(base, r.group),
                fields: vec![],
            });
        }
    }
    entries.sort_by_key(|e| (e.after.or(e.before).unwrap_or(0), e.kind as u8));
    TableDiff {
        title,
        entries,
        routes_after: ho.len(),
    }
}

/// Canary shares and redirects, per Mapping.
fn per_mapping_findings(
    d: &mut RouteDiff,
    base: &Graph,
    head: &Graph,
    base_routes: &Routes<'_>,
    head_routes: &Routes<'_>,
) {
    for (k, r) in head_routes {
        let Some(b) = base_routes.get(k) else {
            continue;
        };
        let (fb, fh) = (fields_of(base, b), fields_of(head, r));
        if let (Some(wb), Some(wh)) = (fb.get("weight"), fh.get("weight")) {
            if wb != wh {
                d.findings.push(Finding {
                    kind: FindingKind::CanaryShift,
                    message: format!(
                        "`{k}` ({}) now takes {wh} of its traffic, was {wb}",
                        describe_match(head, r.group)
                    ),
                });
            }
        }
        if let (Some(rb), Some(rh)) = (fb.get("redirect"), fh.get("redirect")) {
            if rb != rh {
                d.findings.push(Finding {
                    kind: FindingKind::RedirectChanged,
                    message: format!("`{k}` redirects differently: {rb} -> {rh}"),
                });
            }
        }
        if fb.contains_key("redirect") != fh.contains_key("redirect") {
            d.findings.push(Finding {
                kind: FindingKind::RedirectChanged,
                message: format!(
                    "`{k}` now {}",
                    if fh.contains_key("redirect") {
                        "redirects instead of forwarding"
                    } else {
                        "forwards instead of redirecting"
                    }
                ),
            });
        }
    }
}

/// Witness requests: who serves each route's own traffic, before and after.
fn moved_traffic_findings(
    d: &mut RouteDiff,
    base: &Graph,
    head: &Graph,
    bt: &Tables<'_>,
    head_routes: &Routes<'_>,
) {
    let head_keys: BTreeSet<&String> = head_routes.keys().collect();
    for (tk, _, groups) in bt {
        let host = tk_host(base, tk);
        for &gi in groups.iter() {
            let grp = &base.groups[gi];
            let Some(w) = witness(&grp.matcher, host.as_ref()) else {
                continue;
            };
            let before = serve(base, &w);
            if before.as_ref() != Some(&gi) {
                continue; // already shadowed before the change
            }
            let before_names = member_names(base, gi);
            let after = serve(head, &w).map(|g| member_names(head, g));
            let still_here = before_names.iter().any(|n| head_keys.contains(n));
            match after {
                Some(after_names) if after_names.iter().any(|n| before_names.contains(n)) => {}
                Some(after_names) => {
                    let kind = if still_here {
                        FindingKind::Shadowed
                    } else {
                        FindingKind::TrafficMoved
                    };
                    let verb = if still_here {
                        "now takes the traffic of"
                    } else {
                        "now serves what was served by"
                    };
                    d.findings.push(Finding {
                        kind,
                        message: format!(
                            "{} {verb} {} (e.g. {})",
                            list(&after_names),
                            list(&before_names),
                            w.show()
                        ),
                    });
                }
                None if still_here => {}
                None => d.findings.push(Finding {
                    kind: FindingKind::TrafficMoved,
                    message: format!(
                        "requests served by {} now get 404 (e.g. {})",
                        list(&before_names),
                        w.show()
                    ),
                }),
            }
        }
    }
}

/// Routes that cannot be reached after the change (and could before, or are new).
fn unreachable_findings(
    d: &mut RouteDiff,
    base: &Graph,
    head: &Graph,
    ht: &Tables<'_>,
    base_routes: &Routes<'_>,
) {
    for (tk, _, groups) in ht {
        let host = tk_host(head, tk);
        for &gi in groups.iter() {
            let grp = &head.groups[gi];
            let Some(w) = witness(&grp.matcher, host.as_ref()) else {
                continue;
            };
            let after = serve(head, &w);
            if after == Some(gi) {
                continue;
            }
            let names = member_names(head, gi);
            let was_reachable = serve(base, &w)
                .is_some_and(|bg| member_names(base, bg).iter().any(|n| names.contains(n)));
            let is_new = names.iter().all(|n| !base_routes.contains_key(n));
            if was_reachable || is_new {
                let by = after
                    .map(|g| list(&member_names(head, g)))
                    .unwrap_or_else(|| "nothing".into());
                d.findings.push(Finding {
                    kind: FindingKind::Unreachable,
                    message: format!(
                        "{} cannot be reached: {by} matches first (e.g. {})",
                        list(&names),
                        w.show()
                    ),
                });
            }
        }
    }
}

/// Once per change: a route attached to several Hosts yields the same finding in each Host's
/// table, differing only in the example request. Keep the first example.
fn dedup_findings(d: &mut RouteDiff) {
    let mut seen = HashSet::new();
    d.findings.retain(|f| {
        let subject = f.message.split(" (e.g. ").next().unwrap_or(&f.message);
        seen.insert((f.kind, subject.to_string()))
    });
    d.findings.sort();
    d.findings.dedup();
}

fn list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn member_names(g: &Graph, gi: usize) -> Vec<String> {
    g.groups[gi]
        .members
        .iter()
        .map(|(id, _)| key(g.route(*id)))
        .collect()
}

/// Listeners and TCPMappings added, removed or changed, listed with the Hosts (a port that
/// opens or closes matters as much as a Host).
fn diff_ports(d: &mut RouteDiff, base: &Graph, head: &Graph) {
    type Fields = BTreeMap<&'static str, String>;
    let ports = |g: &Graph| -> BTreeMap<String, Fields> {
        let mut out = BTreeMap::new();
        for l in g.listeners.iter().filter(|l| !l.synthesized) {
            let mut m = Fields::new();
            m.insert("port", l.port.to_string());
            m.insert("protocol", format!("{:?}", l.protocol));
            m.insert("securityModel", format!("{:?}", l.security));
            m.insert("l7Depth", l.l7_depth.to_string());
            let hosts: Vec<String> = l
                .hosts
                .iter()
                .map(|&i| g.hosts[i].hostname.to_string())
                .collect();
            m.insert("hosts", hosts.join(", "));
            out.insert(format!("Listener {}/{}", l.namespace, l.name), m);
        }
        for t in &g.tcp {
            let mut m = Fields::new();
            m.insert("port", t.port.to_string());
            m.insert("service", t.service.clone());
            m.insert(
                "host",
                t.sni.as_ref().map(|p| p.to_string()).unwrap_or_default(),
            );
            m.insert(
                "weight",
                t.weight.map(|w| w.to_string()).unwrap_or_default(),
            );
            m.insert("idle_timeout_ms", t.idle_timeout.as_millis().to_string());
            let tls = match (&t.terminate, &t.sni) {
                (Some(s), _) => format!("terminated (secret {}/{})", s.namespace, s.name),
                (None, Some(_)) => "passed through".into(),
                (None, None) => "none".into(),
            };
            m.insert("tls", tls);
            out.insert(format!("TCPMapping {}/{}", t.namespace, t.name), m);
        }
        out
    };
    let (b, h) = (ports(base), ports(head));
    for k in b.keys().chain(h.keys()).collect::<BTreeSet<_>>() {
        let change = match (b.get(k), h.get(k)) {
            (Some(_), None) => Some((ChangeKind::Removed, vec![])),
            (None, Some(m)) => Some((
                ChangeKind::Added,
                m.iter()
                    .map(|(f, v)| (f.to_string(), String::new(), v.clone()))
                    .collect(),
            )),
            (Some(x), Some(y)) => {
                let f = field_changes(x, y);
                (!f.is_empty()).then_some((ChangeKind::Changed, f))
            }
            (None, None) => None,
        };
        if let Some((kind, fields)) = change {
            d.hosts.push(HostChange {
                kind,
                host: k.clone(),
                fields,
            });
        }
    }
}

fn field_changes(
    b: &BTreeMap<&'static str, String>,
    h: &BTreeMap<&'static str, String>,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for k in b.keys().chain(h.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (
            b.get(k).cloned().unwrap_or_default(),
            h.get(k).cloned().unwrap_or_default(),
        );
        if x != y {
            out.push((k.to_string(), x, y));
        }
    }
    out
}

fn tk_host(g: &Graph, tk: &str) -> Option<HostPattern> {
    g.hosts
        .iter()
        .find(|h| format!("{}/{}", h.namespace, h.name) == tk)
        .map(|h| h.hostname.clone())
}

/// A request a route group must serve.
#[derive(Debug, Clone)]
struct Witness {
    host: String,
    method: String,
    path: String,
    query: Option<String>,
    headers: http::HeaderMap,
}

impl Witness {
    fn show(&self) -> String {
        let mut s = format!("{} {}{}", self.method, self.host, self.path);
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        for (k, v) in &self.headers {
            s.push_str(&format!(" {k}: {}", v.to_str().unwrap_or("")));
        }
        s
    }
}

fn serve(g: &Graph, w: &Witness) -> Option<usize> {
    let head = RequestHead {
        host: &w.host,
        method: &w.method,
        path: &w.path,
        query: w.query.as_deref(),
        headers: &w.headers,
    };
    g.lookup(&head).map(|m| m.group_index)
}

/// A concrete name a host glob matches.
fn instantiate(p: &HostPattern) -> String {
    match p {
        HostPattern::Any => "example.invalid".into(),
        HostPattern::Exact(e) => e.clone(),
        HostPattern::Suffix(s) => format!("w{s}"),
        HostPattern::Prefix(p) => format!("{p}example"),
    }
}

fn witness(m: &crate::routes::RouteMatch, table_host: Option<&HostPattern>) -> Option<Witness> {
    let path = match &m.path {
        PathMatch::Prefix(p) | PathMatch::Exact(p) => p.clone(),
        PathMatch::Regex(_) => return None,
    };
    let host = match (&m.host, table_host) {
        (HostMatch::Regex(_), _) => return None,
        (HostMatch::Glob(g), Some(HostPattern::Any) | None) => instantiate(g),
        (HostMatch::Glob(HostPattern::Exact(e)), _) => e.clone(),
        (_, Some(t)) => instantiate(t),
        (HostMatch::Any, None) => "example.invalid".into(),
    };
    let method = match &m.method {
        None => "GET".to_string(),
        Some(MethodMatch::Exact(x)) => x.clone(),
        Some(MethodMatch::Regex(_)) => return None,
    };
    let mut headers = http::HeaderMap::new();
    for h in &m.headers {
        let v = match &h.test {
            ValueTest::Exact(v) => v.clone(),
            ValueTest::Present => "1".into(),
            ValueTest::Regex(_) => return None,
        };
        headers.append(
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            http::HeaderValue::from_str(&v).ok()?,
        );
    }
    let mut q = Vec::new();
    for p in &m.query {
        match &p.test {
            ValueTest::Exact(v) => q.push(format!("{}={v}", p.name)),
            ValueTest::Present => q.push(p.name.clone()),
            ValueTest::Regex(_) => return None,
        }
    }
    Some(Witness {
        host,
        method,
        path,
        query: (!q.is_empty()).then(|| q.join("&")),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_and_compile, MemTree, Options};

    fn graph(yaml: &str) -> std::sync::Arc<Graph> {
        let o = load_and_compile(&MemTree::new().with("c.yaml", yaml), &Options::default());
        o.graph.unwrap_or_else(|| panic!("{:?}", o.diagnostics))
    }

    fn doc(kind: &str, name: &str, spec: &str) -> String {
        format!("---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    }

    /// A Listener whose security model changes and a TCPMapping that appears show with the Hosts.
    #[test]
    fn listeners_and_tcp_mappings_are_diffed() {
        let host = doc("Host", "a", "{hostname: a.example.com}");
        let listener = |model: &str| {
            doc(
                "Listener",
                "l",
                &format!("{{port: 8080, protocol: HTTP, securityModel: {model}, hostBinding: {{namespace: {{from: ALL}}}}}}"),
            )
        };
        let base = graph(&(host.clone() + &listener("XFP")));
        let head = graph(
            &(host
                + &listener("SECURE")
                + &doc("TCPMapping", "db", "{port: 5432, service: \"db:5432\"}")),
        );
        let d = diff(&base, &head);
        let got: Vec<_> = d.hosts.iter().map(|h| (h.kind, h.host.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (ChangeKind::Changed, "Listener default/l"),
                (ChangeKind::Added, "TCPMapping default/db")
            ]
        );
        assert_eq!(
            d.hosts[0].fields,
            vec![(
                "securityModel".to_string(),
                "Xfp".to_string(),
                "Secure".to_string()
            )]
        );
    }

    /// Dropping `cert_required` from a Host is a finding, and the settings show as a field.
    #[test]
    fn a_host_that_stops_requiring_client_certificates_is_a_finding() {
        let host = |required: bool| {
            doc(
                "Host",
                "a",
                &format!("{{hostname: a.example.com, tlsSecret: {{name: s}}, tls: {{ca_secret: ca, cert_required: {required}}}}}"),
            )
        };
        let d = diff(&graph(&host(true)), &graph(&host(false)));
        assert!(
            d.findings.iter().any(|f| f.kind == FindingKind::TlsLost
                && f.message.contains("no longer requires client certificates")),
            "{:?}",
            d.findings
        );
        let fields = &d.hosts[0].fields;
        assert!(
            fields.iter().any(|(f, b, h)| f == "tls settings"
                && b.contains("required (CA ca)")
                && h.contains("optional (CA ca)")),
            "{fields:?}"
        );
    }

    /// A route on every Host that a new catch-all shadows is one finding, not one per Host.
    #[test]
    fn a_change_seen_from_several_hosts_is_one_finding() {
        let hosts = doc("Host", "a", "{hostname: a.example.com}")
            + &doc("Host", "b", "{hostname: b.example.com}")
            + &doc("Host", "c", "{hostname: \"*.example.org\"}");
        let users = doc(
            "Mapping",
            "users",
            "{hostname: \"*\", prefix: /users/, service: users}",
        );
        let base = graph(&(hosts.clone() + &users));
        let head = graph(
            &(hosts
                + &users
                + &doc(
                    "Mapping",
                    "catch-all",
                    "{hostname: \"*\", prefix: /, service: web, precedence: 10}",
                )),
        );
        let d = diff(&base, &head);
        let shadowed: Vec<_> = d
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::Shadowed)
            .collect();
        assert_eq!(shadowed.len(), 1, "{:#?}", d.findings);
        assert!(shadowed[0].message.contains("`default/catch-all`"));
        // Each Host's table still lists the change.
        assert_eq!(d.tables.iter().filter(|t| !t.entries.is_empty()).count(), 3);
    }
}
