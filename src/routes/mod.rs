//! The compiled route graph and request matching.
//!
//! Owns: the immutable [`Graph`] that `config::compile` builds, and the lookup that turns a
//! request head into the route group that serves it. Must not do I/O, allocate per lookup
//! beyond a small candidate list, or know about YAML: it is pure and shared by the proxy,
//! `legate routes`, `legate diff` and route tests.
//!
//! Lookup structure: a request first selects a *table*: the Host whose hostname best matches
//! its authority (exact name, then the longest wildcard), or the fallback table of Mappings
//! that carry their own hostname when no Host matches. Each table indexes its groups by path:
//! a byte trie of literal prefixes (one for case-sensitive, one for lowercase case-insensitive
//! prefixes), a hash map for exact paths, and a `RegexSet` for regex prefixes. Walking the trie
//! along the path yields only the groups whose prefix is a prefix of the path, so a lookup
//! touches a handful of candidates however many routes are loaded; the candidate with the
//! lowest match-order index whose remaining conditions hold wins.

mod action;
pub mod describe;
mod host;
mod index;
pub mod path;
mod policy;
mod types;

pub use host::HostPattern;
pub use index::Table;
pub use policy::*;
pub use types::*;

use std::sync::Arc;

/// The request facts routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// Host name from `:authority`/`Host`, without port, lowercase.
    pub host: &'a str,
    pub method: &'a str,
    /// Normalized path, without the query string.
    pub path: &'a str,
    /// Raw query string without `?`, if any.
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// The outcome of a lookup.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'g> {
    /// The Host resource whose table served the lookup (None: the hostname fallback table).
    pub host: Option<&'g HostRoute>,
    pub group: &'g Group,
    /// Index of `group` in `Graph::groups` (its match order).
    pub group_index: usize,
}

/// An immutable, compiled revision of the configuration. Built only by `config::compile`.
#[derive(Debug)]
pub struct Graph {
    /// Hex SHA-256 over the canonical form of the compiled routes: equal configs, equal hash.
    pub hash: String,
    pub hosts: Vec<HostRoute>,
    pub routes: Vec<Route>,
    /// Canary groups in match order (index = match order).
    pub groups: Vec<Group>,
    /// One table per entry of `hosts`, then the fallback table.
    pub(crate) tables: Vec<Table>,
    pub(crate) host_index: host::HostIndex,
    /// How request paths are normalized before lookup (the Module's settings).
    pub normalize: path::NormalizeOptions,
}

impl Graph {
    /// A graph that routes nothing.
    pub fn empty() -> Arc<Graph> {
        Arc::new(Graph::build(
            Vec::new(),
            Vec::new(),
            Vec::new(),
            String::new(),
        ))
    }

    pub(crate) fn build(
        hosts: Vec<HostRoute>,
        routes: Vec<Route>,
        groups: Vec<Group>,
        hash: String,
    ) -> Graph {
        let host_index = host::HostIndex::new(&hosts);
        let mut tables = Vec::with_capacity(hosts.len() + 1);
        for h in &hosts {
            tables.push(Table::new(&routes, &groups, &h.groups));
        }
        let fallback: Vec<usize> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.serves_without_host)
            .map(|(i, _)| i)
            .collect();
        tables.push(Table::new(&routes, &groups, &fallback));
        Graph {
            hash,
            hosts,
            routes,
            groups,
            tables,
            host_index,
            normalize: path::NormalizeOptions::default(),
        }
    }

    /// The Host resource that serves `host` (a lowercase name without port), if any.
    pub fn host_for(&self, host: &str) -> Option<&HostRoute> {
        self.host_index.find(host).map(|i| &self.hosts[i])
    }

    /// The group that serves this request head, if any.
    pub fn lookup<'g>(&'g self, req: &RequestHead<'_>) -> Option<Matched<'g>> {
        let host_idx = self.host_index.find(req.host);
        let table = match host_idx {
            Some(i) => &self.tables[i],
            None => &self.tables[self.hosts.len()],
        };
        let group = table.find(self, req)?;
        Some(Matched {
            host: host_idx.map(|i| &self.hosts[i]),
            group: &self.groups[group],
            group_index: group,
        })
    }

    /// Every route in match order of the given table, for `legate routes` and the admin API.
    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0]
    }

    /// Number of Mappings compiled into routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}
