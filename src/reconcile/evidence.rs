//! Evidence for a verification window: what the request path counts per route of the serving
//! revision, and which routes a revision changed, so a window judges only those.
//!
//! Owns: the per-route counters a swapped-in revision carries ([`Evidence`]; the proxy adds to
//! them, it never reads them), route fingerprints and the changed-route set. Pure apart from
//! the atomics: no I/O, no clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::routes::{Action, Graph, PathMatch, Route};

/// Counters of one revision's routes, indexed by `RouteId`. The proxy records every request
/// that matched a route; a new revision gets new counters, so nothing needs a baseline.
#[derive(Debug, Default)]
pub struct Evidence {
    routes: Box<[RouteCount]>,
}

#[derive(Debug, Default)]
struct RouteCount {
    requests: AtomicU64,
    failures: AtomicU64,
    upstream_5xx: AtomicU64,
}

/// How one answered request counts against its revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Answered; neither a gateway-made upstream failure nor an upstream 5xx.
    Fine,
    /// The gateway failed to reach or hear from the upstream (connect error, reset, timeout).
    UpstreamFailure,
    /// The upstream itself answered 5xx.
    Upstream5xx,
    /// Not the revision's doing (a client error, a policy's answer): not counted at all.
    NotCounted,
}

impl Evidence {
    /// Counters for a graph of `routes` routes.
    pub fn new(routes: usize) -> Arc<Evidence> {
        Arc::new(Evidence {
            routes: (0..routes).map(|_| RouteCount::default()).collect(),
        })
    }

    /// Count one request served by route `route`.
    pub fn record(&self, route: usize, what: Observed) {
        let Some(c) = self.routes.get(route) else {
            return;
        };
        if what == Observed::NotCounted {
            return;
        }
        c.requests.fetch_add(1, Ordering::Relaxed);
        match what {
            Observed::UpstreamFailure => {
                c.failures.fetch_add(1, Ordering::Relaxed);
            }
            Observed::Upstream5xx => {
                c.upstream_5xx.fetch_add(1, Ordering::Relaxed);
            }
            Observed::Fine | Observed::NotCounted => {}
        }
    }

    /// What route `route` has seen so far.
    pub fn get(&self, route: usize) -> Tally {
        self.routes.get(route).map_or(Tally::default(), |c| Tally {
            requests: c.requests.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            upstream_5xx: c.upstream_5xx.load(Ordering::Relaxed),
        })
    }
}

/// Requests and failures of one route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub requests: u64,
    /// Gateway-made upstream failures (connect errors, resets, timeouts).
    pub failures: u64,
    /// 5xx answers sent by the upstream itself.
    pub upstream_5xx: u64,
}

impl Tally {
    pub fn plus(self, o: Tally) -> Tally {
        Tally {
            requests: self.requests + o.requests,
            failures: self.failures + o.failures,
            upstream_5xx: self.upstream_5xx + o.upstream_5xx,
        }
    }
}

/// A route a revision changed, and so the window judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Index in the new graph (`RouteId.0`).
    pub index: usize,
    pub fingerprint: String,
    /// `namespace/name` of the Mapping.
    pub mapping: String,
    /// `host:port` of the upstream (none for a redirect).
    pub upstream: Option<String>,
    /// `new`, `changed` or `receives traffic of <mapping>`.
    pub why: String,
}

fn key(r: &Route) -> String {
    format!("{}/{}", r.namespace, r.name)
}

/// One fingerprint per route (indexed by `RouteId`): equal when everything that decides how the
/// route serves is equal (match, precedence, action with its upstream and policies, the group's
/// weights and shadow, the Hosts and TLS secrets it is served under). The Mapping's file and
/// line are left out: moving a Mapping within the repository changes nothing it serves.
pub fn fingerprints(g: &Graph) -> Vec<String> {
    let labels: Vec<String> = g.routes.iter().map(key).collect();
    g.routes
        .iter()
        .map(|r| {
            let mut h = Sha256::new();
            h.update(format!("{:?}|{}|{:?}", r.matcher, r.precedence, r.action).as_bytes());
            if let Some(grp) = g.groups.get(r.group) {
                for (id, share) in grp.shares() {
                    h.update(format!("|m:{}={share}", labels[id.0]).as_bytes());
                }
                if let Some((id, pct)) = grp.shadow {
                    h.update(format!("|s:{}={pct}", labels[id.0]).as_bytes());
                }
                h.update(format!("|g:{}", grp.precedence).as_bytes());
            }
            for host in g.hosts.iter().filter(|h| h.groups.contains(&r.group)) {
                h.update(
                    format!(
                        "|h:{}/{}:{:?}:{:?}:{:?}:{:?}",
                        host.namespace,
                        host.name,
                        host.hostname,
                        host.tls_secret,
                        host.insecure,
                        host.insecure_additional_port
                    )
                    .as_bytes(),
                );
            }
            crate::source::hex(&h.finalize()[..12])
        })
        .collect()
}

fn upstream(r: &Route) -> Option<String> {
    match &r.action {
        Action::Forward(f) => Some(f.upstream.authority()),
        Action::Redirect(_) => None,
    }
}

/// Whether requests `old` used to match may now fall to `catcher`: its path match is a prefix
/// of `old`'s (a regex `old` may send anything anywhere: only `/` catch-alls are assumed).
fn may_catch(catcher: &Route, old: &Route) -> bool {
    let PathMatch::Prefix(p) = &catcher.matcher.path else {
        return false;
    };
    match &old.matcher.path {
        PathMatch::Prefix(o) | PathMatch::Exact(o) => o.starts_with(p.as_str()),
        PathMatch::Regex(_) => p == "/",
    }
}

/// The routes of `new` a window must judge against the last verified graph: new and changed
/// Mappings, and unchanged ones that may now receive traffic a removed or changed Mapping used
/// to take (deleting `/a/` sends `/a/x` to a `/` catch-all). With no verified graph, every route.
pub fn changed(verified: Option<&Graph>, new: &Graph) -> Vec<Changed> {
    let fps = fingerprints(new);
    let mk = |i: usize, why: String| Changed {
        index: i,
        fingerprint: fps[i].clone(),
        mapping: key(&new.routes[i]),
        upstream: upstream(&new.routes[i]),
        why,
    };
    let Some(old) = verified else {
        return (0..new.routes.len()).map(|i| mk(i, "new".into())).collect();
    };
    let old_fps = fingerprints(old);
    let old_by_key: HashMap<String, usize> = old
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (key(r), i))
        .collect();
    let new_fp_by_key: HashMap<String, &str> = new
        .routes
        .iter()
        .zip(&fps)
        .map(|(r, f)| (key(r), f.as_str()))
        .collect();
    // Old routes whose traffic may have moved: removed, or changed.
    let gone: Vec<&Route> = old
        .routes
        .iter()
        .zip(&old_fps)
        .filter(|(r, f)| new_fp_by_key.get(&key(r)) != Some(&f.as_str()))
        .map(|(r, _)| r)
        .collect();
    let mut out = Vec::new();
    for (i, r) in new.routes.iter().enumerate() {
        match old_by_key.get(&key(r)) {
            None => out.push(mk(i, "new".into())),
            Some(&o) if old_fps[o] != fps[i] => out.push(mk(i, "changed".into())),
            Some(_) => {
                if let Some(from) = gone.iter().find(|g| key(g) != key(r) && may_catch(r, g)) {
                    out.push(mk(i, format!("may receive traffic of {}", key(from))));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(docs: &[(&str, &str, &str)]) -> Arc<Graph> {
        let mut yaml = String::new();
        for (name, prefix, svc) in docs {
            yaml.push_str(&format!(
                "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {svc}\n"
            ));
        }
        let tree = crate::source::MemTree {
            files: vec![crate::source::MemFile {
                path: "m.yaml".into(),
                text: yaml,
            }],
            diagnostics: Vec::new(),
        };
        crate::config::load_and_compile(&tree, &crate::config::Options::default())
            .graph
            .expect("compiles")
    }

    fn names(c: &[Changed]) -> Vec<(&str, &str)> {
        c.iter()
            .map(|c| (c.mapping.as_str(), c.why.as_str()))
            .collect()
    }

    #[test]
    fn only_what_changed_is_judged() {
        let a = graph(&[("a", "/a/", "h1:80"), ("b", "/b/", "h2:80")]);
        let b = graph(&[("a", "/a/", "h1:80"), ("b", "/b/", "h3:80")]);
        assert_eq!(
            names(&changed(Some(&a), &b)),
            vec![("default/b", "changed")]
        );
        // Same content, nothing to judge; the first revision has everything to judge.
        assert!(changed(Some(&a), &a).is_empty());
        assert_eq!(changed(None, &a).len(), 2);
    }

    #[test]
    fn a_catch_all_taking_moved_traffic_counts_as_changed() {
        let a = graph(&[
            ("a", "/a/", "h1:80"),
            ("all", "/", "h2:80"),
            ("b", "/b/", "h3:80"),
        ]);
        let b = graph(&[("all", "/", "h2:80"), ("b", "/b/", "h3:80")]);
        assert_eq!(
            names(&changed(Some(&a), &b)),
            vec![("default/all", "may receive traffic of default/a")]
        );
    }

    #[test]
    fn counts_are_per_route() {
        let e = Evidence::new(2);
        e.record(1, Observed::UpstreamFailure);
        e.record(1, Observed::Fine);
        e.record(1, Observed::NotCounted);
        e.record(0, Observed::Upstream5xx);
        e.record(7, Observed::Fine);
        assert_eq!(
            e.get(1),
            Tally {
                requests: 2,
                failures: 1,
                upstream_5xx: 0
            }
        );
        assert_eq!(e.get(0).upstream_5xx, 1);
    }
}
