//! The compiled route graph and request matching.
//!
//! Owns: the immutable [`Graph`] that `config::compile` builds, and the lookup that turns a
//! request head into the route group that serves it. Must not do I/O, allocate per lookup
//! beyond a small candidate list, or know about YAML: it is pure and shared by the proxy,
//! `legate routes`, `legate diff` and route tests.
//!
//! Lookup structure: a request first selects a *table*: the Host whose hostname best matches
//! its authority (exact name, then the longest wildcard; the port is part of the authority), or,
//! only when no Host is defined at all, the default Host's table (`*`: the Mappings that carry a
//! hostname), as in Emissary. With Hosts defined, an authority that matches none is not routed.
//! Each table indexes its groups by path:
//! a byte trie of literal prefixes (one for case-sensitive, one for lowercase case-insensitive
//! prefixes), a hash map for exact paths, and a `RegexSet` for regex prefixes. Walking the trie
//! along the path yields only the groups whose prefix is a prefix of the path, so a lookup
//! touches a handful of candidates however many routes are loaded; the candidate with the
//! lowest match-order index whose remaining conditions hold wins.

mod action;
pub mod describe;
pub mod guard;
mod host;
mod index;
pub mod listener;
pub mod path;
pub mod settings;
pub mod tls;
mod traffic;
mod types;

pub(crate) use host::split_port;
pub use host::HostPattern;
pub use index::Table;
pub use listener::{ListenerProtocol, ListenerRoute, SecurityModel, TcpRoute};
pub use settings::Settings;
pub use traffic::*;
pub use types::*;

use std::sync::Arc;

/// The request facts routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The authority from `:authority`/`Host` as routing sees it (see [`route_authority`]):
    /// lowercase, with its port unless the graph strips a matching one.
    pub host: &'a str,
    pub method: &'a str,
    /// Normalized path, without the query string.
    pub path: &'a str,
    /// Raw query string without `?`, if any.
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// Options that change how a graph routes: set by `config::compile` (from flags, and from the
/// Emissary Module once it is read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoutingOptions {
    /// Emissary Module's `strip_matching_host_port`: a port in the authority equal to the
    /// listener's own port is removed before Host matching (`foo:8080` on port 8080 matches a
    /// Host `foo`). Off by default, as in Emissary: the port is part of the match.
    pub strip_matching_host_port: bool,
    /// Emissary's `DISABLE_STRICT_LABEL_SELECTORS`: a Host attaches a Mapping when its hostname
    /// OR its labels match, and one matching label is enough. Read by compile only.
    pub loose_label_selectors: bool,
}

/// The authority a request is routed by: without user info and a trailing dot on the name,
/// lowercase, and without the port when `strip_port` names it (the listener's port, when
/// [`RoutingOptions::strip_matching_host_port`] is on).
pub fn route_authority(authority: &str, strip_port: Option<u16>) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let a = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (name, port) = host::split_port(a);
    let port = port.filter(|p| strip_port.is_none_or(|s| p.parse::<u16>().ok() != Some(s)));
    let name = name.strip_suffix('.').unwrap_or(name);
    let lower = a.bytes().any(|b| b.is_ascii_uppercase());
    match port {
        None if !lower => Cow::Borrowed(name),
        Some(_) if !lower && name.len() + 1 + port.map_or(0, str::len) == a.len() => {
            Cow::Borrowed(a)
        }
        _ => {
            let mut s = name.to_ascii_lowercase();
            if let Some(p) = port {
                s.push(':');
                s.push_str(p);
            }
            Cow::Owned(s)
        }
    }
}

/// How a request arrived, for choosing its Host and applying the insecure action.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival<'a> {
    /// TLS, or `X-Forwarded-Proto: https` from trusted hops: the insecure action is skipped.
    pub secure: bool,
    /// Over TLS: `Some`, holding the SNI the client sent (if any). Cleartext: `None`.
    pub tls_sni: Option<Option<&'a str>>,
    /// The Listener (index in `Graph::listeners`) it arrived on: only the Hosts it binds serve
    /// it. `None`: a listener of the flags, which serves every Host.
    pub listener: Option<usize>,
}

impl Arrival<'_> {
    /// A cleartext request (`secure` false) or one whose TLS is not modelled (`secure` true).
    pub fn plain(secure: bool) -> Arrival<'static> {
        Arrival {
            secure,
            tls_sni: None,
            listener: None,
        }
    }
}

/// What a request gets once its Host's `requestPolicy.insecure` is applied.
#[derive(Debug, Clone, Copy)]
pub enum Routed<'g> {
    Route(Matched<'g>),
    /// A cleartext request on a Host whose insecure action is `Redirect`: to `https://`.
    RedirectToHttps,
    /// A cleartext request on a Host whose insecure action is `Reject`: Emissary leaves the
    /// route out, so the answer is 404.
    Rejected,
    /// No Host or no route matches (404).
    NoRoute,
}

/// The title listings give the default Host's table (used only when no Host is defined).
pub const DEFAULT_HOST_TITLE: &str = "Default Host * (no Host is defined)";

/// Emissary routes ACME HTTP-01 challenges whatever the Host's insecure action.
const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// The outcome of a lookup.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'g> {
    /// The Host resource whose table served the lookup (None: the default Host, present only
    /// when no Host is defined).
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
    pub options: RoutingOptions,
    /// One table per entry of `hosts`, then the default Host's table.
    pub(crate) tables: Vec<Table>,
    pub(crate) host_index: host::HostIndex,
    /// TLS Hosts by name without port: which one a handshake's SNI picked.
    pub(crate) sni_index: host::HostIndex,
    /// Emissary's TLS filter chains: per distinct hostname without port, the index of the
    /// Hosts that carry it (by index in `hosts`); `chain_of[i]` is Host `i`'s chain.
    chains: Vec<host::HostIndex>,
    chain_of: Vec<usize>,
    /// Graph-wide request settings (the `ambassador` Module).
    pub settings: Settings,
    /// The ports this revision opens (Listeners, and synthesized ones for TCPMappings);
    /// without a Listener resource the listen flags apply.
    pub listeners: Vec<ListenerRoute>,
    /// Per entry of `listeners`, the index of the Hosts it binds.
    listener_hosts: Vec<host::HostIndex>,
    /// TCPMappings, in namespace/name order.
    pub tcp: Vec<TcpRoute>,
}

impl Graph {
    /// How request paths are normalized: the Module's `merge_slashes`; escaped slashes are
    /// refused unless the matched Mapping sets `allow_escaped_slashes` (the Module's
    /// `reject_requests_with_escaped_slashes: true` refuses them before routing).
    pub fn normalize_options(&self) -> path::NormalizeOptions {
        path::NormalizeOptions {
            merge_slashes: self.settings.merge_slashes.unwrap_or(false),
            escaped_slashes: path::EscapedSlashes::Reject,
        }
    }

    /// A graph that routes nothing.
    pub fn empty() -> Arc<Graph> {
        Arc::new(Graph::build(
            Vec::new(),
            Vec::new(),
            Vec::new(),
            String::new(),
            RoutingOptions::default(),
        ))
    }

    pub(crate) fn build(
        hosts: Vec<HostRoute>,
        routes: Vec<Route>,
        groups: Vec<Group>,
        hash: String,
        options: RoutingOptions,
    ) -> Graph {
        let host_index = host::HostIndex::new(&hosts);
        let sni_index = host::HostIndex::for_sni(&hosts);
        let (chains, chain_of) = host::HostIndex::chains(&hosts);
        let mut tables = Vec::with_capacity(hosts.len() + 1);
        for h in &hosts {
            tables.push(Table::new(&routes, &groups, &h.groups));
        }
        let fallback: Vec<usize> = if hosts.is_empty() {
            groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.serves_without_host)
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        tables.push(Table::new(&routes, &groups, &fallback));
        Graph {
            hash,
            hosts,
            routes,
            groups,
            options,
            tables,
            host_index,
            sni_index,
            chains,
            chain_of,
            settings: Settings::default(),
            listeners: Vec::new(),
            listener_hosts: Vec::new(),
            tcp: Vec::new(),
        }
    }

    /// Attach the revision's listeners and TCP routes (compile's last pass).
    pub(crate) fn set_listeners(&mut self, listeners: Vec<ListenerRoute>, tcp: Vec<TcpRoute>) {
        self.listener_hosts = listeners
            .iter()
            .map(|l| host::HostIndex::subset(&self.hosts, &l.hosts))
            .collect();
        self.listeners = listeners;
        self.tcp = tcp;
    }

    /// Whether the revision names its own listeners (a Listener resource): then the listen
    /// flags do not apply.
    pub fn has_own_listeners(&self) -> bool {
        self.listeners.iter().any(|l| !l.synthesized)
    }

    /// The listener of this revision on `port` (index in `listeners`).
    pub fn listener_on(&self, port: u16) -> Option<usize> {
        self.listeners.iter().position(|l| l.port == port)
    }

    /// The Host resource that serves `host` (an authority as [`route_authority`] gives it).
    pub fn host_for(&self, host: &str) -> Option<&HostRoute> {
        self.host_index.find(host).map(|i| &self.hosts[i])
    }

    /// The table (index in `tables`) that serves an authority outside TLS, as [`Graph::lookup`]
    /// picks it: a Host's, the default Host's when none is defined, or `None` (404).
    pub fn table_for(&self, host: &str) -> Option<usize> {
        match self.host_index.find(host) {
            Some(i) => Some(i),
            None if self.hosts.is_empty() => Some(self.hosts.len()),
            None => None,
        }
    }

    /// Index in `hosts` of the TLS Host whose certificate a handshake with this SNI gets: the
    /// best match by name (without port); no SNI gets a `*` TLS Host. `None`: no TLS Host.
    pub fn host_for_sni(&self, sni: Option<&str>) -> Option<usize> {
        self.sni_index.find(sni.unwrap_or(""))
    }

    /// The Host that serves an authority. Over TLS (`tls_sni` is `Some`, holding the SNI the
    /// client sent, if any) only the Hosts named like the one the SNI picked are candidates:
    /// Emissary builds one filter chain per TLS Host name, holding only the virtual hosts of
    /// that name, so a known SNI with another authority is not routed. Without a TLS Host for
    /// the SNI (the `--default-cert` case) every Host is a candidate.
    fn host_index_for(&self, authority: &str, via: &Arrival<'_>) -> Option<usize> {
        let bound = via.listener.and_then(|l| self.listener_hosts.get(l));
        let Some(t) = via.tls_sni.and_then(|sni| self.host_for_sni(sni)) else {
            return bound.unwrap_or(&self.host_index).find(authority);
        };
        let found = self.chains[self.chain_of[t]].find(authority)?;
        // A Listener serves only the Hosts it binds.
        match via.listener.and_then(|l| self.listeners.get(l)) {
            Some(l) if !l.hosts.contains(&found) => None,
            _ => Some(found),
        }
    }

    /// The group that serves this request head, if any (the insecure action not applied).
    pub fn lookup<'g>(&'g self, req: &RequestHead<'_>) -> Option<Matched<'g>> {
        self.lookup_via(req, &Arrival::plain(false))
    }

    fn lookup_via<'g>(&'g self, req: &RequestHead<'_>, via: &Arrival<'_>) -> Option<Matched<'g>> {
        let host_idx = self.host_index_for(req.host, via);
        let table = match host_idx {
            Some(i) => &self.tables[i],
            None if self.hosts.is_empty() => &self.tables[self.hosts.len()],
            None => return None,
        };
        let group = table.find(self, req)?;
        Some(Matched {
            host: host_idx.map(|i| &self.hosts[i]),
            group: &self.groups[group],
            group_index: group,
        })
    }

    /// Route a request, applying its Host's insecure action when it is not `secure` (TLS, or
    /// `X-Forwarded-Proto: https` from trusted hops). As in Emissary the action is part of
    /// each route: a request no route matches is 404 either way, and a route for
    /// `/.well-known/acme-challenge/` is served even under `Redirect` or `Reject`.
    pub fn route_request<'g>(&'g self, req: &RequestHead<'_>, via: Arrival<'_>) -> Routed<'g> {
        let Some(m) = self.lookup_via(req, &via) else {
            return Routed::NoRoute;
        };
        let secure = via.secure;
        let action = match m.host {
            Some(h) if !secure => h.insecure,
            _ => InsecureAction::Route,
        };
        match action {
            InsecureAction::Route if !self.client_cert_checked(m.host, via.tls_sni) => {
                Routed::Rejected
            }
            InsecureAction::Route => Routed::Route(m),
            _ if is_acme(m.group) => Routed::Route(m),
            InsecureAction::Redirect => Routed::RedirectToHttps,
            InsecureAction::Reject => match self.acme_lookup(req, m.host) {
                Some(m) => Routed::Route(m),
                None => Routed::Rejected,
            },
        }
    }

    /// A Host that requires client certificates is served only on connections whose handshake
    /// it chose by SNI (so it checked the certificate): not over cleartext, not behind a
    /// default certificate or another name's connection (HTTP/2 coalescing).
    fn client_cert_checked(&self, host: Option<&HostRoute>, tls_sni: Option<Option<&str>>) -> bool {
        let Some(h) = host.filter(|h| h.tls.as_ref().is_some_and(|t| t.cert_required)) else {
            return true;
        };
        let Some(sni) = tls_sni else {
            return false;
        };
        let lower = sni.map(str::to_ascii_lowercase);
        self.host_for_sni(lower.as_deref())
            .is_some_and(|i| std::ptr::eq(&self.hosts[i], h))
    }

    /// Under `Reject` only the ACME challenge routes exist: the first one that matches.
    fn acme_lookup<'g>(
        &'g self,
        req: &RequestHead<'_>,
        host: Option<&HostRoute>,
    ) -> Option<Matched<'g>> {
        let host = host?;
        let hi = self.hosts.iter().position(|h| std::ptr::eq(h, host))?;
        let gi = self.tables[hi].groups.iter().copied().find(|&gi| {
            let g = &self.groups[gi];
            is_acme(g) && req.path.starts_with(ACME_PREFIX) && g.matcher.matches_rest(req)
        })?;
        Some(Matched {
            host: Some(&self.hosts[hi]),
            group: &self.groups[gi],
            group_index: gi,
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

fn is_acme(g: &Group) -> bool {
    matches!(&g.matcher.path, PathMatch::Prefix(p) if p == ACME_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::route_authority;

    #[test]
    fn authority_keeps_its_port_unless_stripped() {
        assert_eq!(
            route_authority("Example.COM:8080", None),
            "example.com:8080"
        );
        assert_eq!(
            route_authority("example.com:8080", None),
            "example.com:8080"
        );
        assert_eq!(
            route_authority("example.com:8080", Some(8080)),
            "example.com"
        );
        assert_eq!(
            route_authority("example.com:8081", Some(8080)),
            "example.com:8081"
        );
        assert_eq!(route_authority("example.com", Some(8080)), "example.com");
        assert_eq!(route_authority("[::1]:80", Some(80)), "[::1]");
        assert_eq!(route_authority("[::1]:80", None), "[::1]:80");
        assert_eq!(route_authority("u@h.test:1", None), "h.test:1");
        assert_eq!(route_authority("h.test.", None), "h.test");
        assert_eq!(route_authority("H.test.:9", None), "h.test:9");
    }
}
