//! Per-table path index: byte tries for literal prefixes, hash maps for exact paths, and an
//! ordered list for regex paths. See the module docs of `routes` for why.

use std::collections::HashMap;

use super::{Graph, Group, PathMatch, RequestHead, Route};

#[derive(Debug, Default)]
struct Trie {
    nodes: Vec<Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// Groups whose prefix ends here, ascending (= match order).
    groups: Vec<u32>,
}

impl Trie {
    fn insert(&mut self, key: &[u8], group: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
        }
        let mut cur = 0usize;
        for &b in key {
            let next = match self.nodes[cur].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[cur].children[i].1 as usize,
                Err(i) => {
                    let id = self.nodes.len();
                    self.nodes.push(Node::default());
                    self.nodes[cur].children.insert(i, (b, id as u32));
                    id
                }
            };
            cur = next;
        }
        self.nodes[cur].groups.push(group);
    }

    /// Visit the group lists of every node along `path` (every stored prefix of it).
    #[inline]
    fn walk(&self, path: &[u8], lowercase: bool, mut visit: impl FnMut(&[u32]) -> bool) {
        if self.nodes.is_empty() {
            return;
        }
        let mut cur = 0usize;
        if !self.nodes[0].groups.is_empty() && !visit(&self.nodes[0].groups) {
            return;
        }
        for &b in path {
            let b = if lowercase { b.to_ascii_lowercase() } else { b };
            let node = &self.nodes[cur];
            let Ok(i) = node.children.binary_search_by_key(&b, |c| c.0) else {
                return;
            };
            cur = node.children[i].1 as usize;
            let groups = &self.nodes[cur].groups;
            if !groups.is_empty() && !visit(groups) {
                return;
            }
        }
    }
}

/// The routes of one Host (or of the hostname fallback), indexed by path.
#[derive(Debug, Default)]
pub struct Table {
    prefix: Trie,
    prefix_ci: Trie,
    exact: HashMap<String, Vec<u32>>,
    exact_ci: HashMap<String, Vec<u32>>,
    /// Regex groups in match order.
    regex: Vec<u32>,
    /// All groups of the table in match order, for listings.
    pub groups: Vec<usize>,
}

impl Table {
    pub(crate) fn new(_routes: &[Route], groups: &[Group], ids: &[usize]) -> Table {
        let mut t = Table {
            groups: ids.to_vec(),
            ..Table::default()
        };
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        for &gi in &ids {
            let g = &groups[gi];
            let id = gi as u32;
            match (&g.matcher.path, g.matcher.case_sensitive) {
                (PathMatch::Prefix(p), true) => t.prefix.insert(p.as_bytes(), id),
                (PathMatch::Prefix(p), false) => {
                    t.prefix_ci.insert(p.to_ascii_lowercase().as_bytes(), id)
                }
                (PathMatch::Exact(p), true) => t.exact.entry(p.clone()).or_default().push(id),
                (PathMatch::Exact(p), false) => t
                    .exact_ci
                    .entry(p.to_ascii_lowercase())
                    .or_default()
                    .push(id),
                (PathMatch::Regex(_), _) => t.regex.push(id),
            }
        }
        t
    }

    /// The first group in match order that matches the request.
    pub(crate) fn find(&self, graph: &Graph, req: &RequestHead<'_>) -> Option<usize> {
        let mut best = u32::MAX;
        let mut consider = |list: &[u32]| {
            for &g in list {
                if g >= best {
                    break;
                }
                if graph.groups[g as usize].matcher.matches_rest(req) {
                    best = g;
                    break;
                }
            }
            true
        };
        let path = req.path.as_bytes();
        self.prefix.walk(path, false, &mut consider);
        self.prefix_ci.walk(path, true, &mut consider);
        if let Some(list) = self.exact.get(req.path) {
            consider(list);
        }
        if !self.exact_ci.is_empty() {
            if let Some(list) = self.exact_ci.get(&req.path.to_ascii_lowercase()) {
                consider(list);
            }
        }
        for &g in &self.regex {
            if g >= best {
                break;
            }
            let group = &graph.groups[g as usize];
            // Regexes of case-insensitive Mappings are compiled with the `i` flag.
            if let PathMatch::Regex(re) = &group.matcher.path {
                if re.is_match(req.path) && group.matcher.matches_rest(req) {
                    best = g;
                    break;
                }
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }
}
