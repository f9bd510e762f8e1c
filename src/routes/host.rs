//! Host name globs (`*`, `*.example.com`, `api.*`, exact, each optionally with `:port`) and the
//! index that picks the Host resource for a request's authority.
//!
//! As in Envoy's virtual-host domains (which Emissary generates from Hosts), a glob is compared
//! with the whole authority: `foo.example` does not match `foo.example:8080`, unless the port was
//! stripped first (`strip_matching_host_port`), and `foo.example:8443` matches only that port.

use std::collections::HashMap;
use std::fmt;

use super::types::validate_dns_name;
use super::HostRoute;

/// A validated host name glob, compared with `host[:port]`. Matching is case-insensitive;
/// patterns are stored lowercase, a port (if any) as part of the text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `*`
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`; matches one or more leading characters.
    /// `*.example.com:8443` is stored as `.example.com:8443`.
    Suffix(String),
    /// `api.*` stored as `api.`.
    Prefix(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(e) => e.eq_ignore_ascii_case(host),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            HostPattern::Prefix(p) => {
                host.len() > p.len()
                    && host.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
        }
    }

    /// Whether some host name matches both globs (Emissary's `hostglob_matches`).
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        use HostPattern::*;
        match (self, other) {
            (Any, _) | (_, Any) => true,
            (Exact(a), b) | (b, Exact(a)) => b.matches(a) || matches!(b, Exact(e) if e == a),
            (Suffix(a), Suffix(b)) => a.ends_with(b.as_str()) || b.ends_with(a.as_str()),
            (Prefix(a), Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
            // `api.*` and `*.example.com` share `api.example.com`.
            (Suffix(_), Prefix(_)) | (Prefix(_), Suffix(_)) => true,
        }
    }

    /// Specificity for choosing among several matching Hosts, in Envoy's virtual-host order:
    /// exact names, then suffix wildcards, then prefix wildcards (longest first), then `*`.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(e) => (4, e.len()),
            HostPattern::Suffix(s) => (3, s.len()),
            HostPattern::Prefix(p) => (2, p.len()),
            HostPattern::Any => (1, 0),
        }
    }

    /// The glob without its port: what a TLS client's SNI is compared with.
    pub fn without_port(&self) -> HostPattern {
        let cut = |s: &str| split_port(s).0.to_string();
        match self {
            HostPattern::Any | HostPattern::Prefix(_) => self.clone(),
            HostPattern::Exact(e) => HostPattern::Exact(cut(e)),
            HostPattern::Suffix(s) if s.starts_with(':') => HostPattern::Any,
            HostPattern::Suffix(s) => HostPattern::Suffix(cut(s)),
        }
    }
}

/// `name` and `port` of `name:port` (`[v6]:port` too); the port only when it is all digits.
pub(crate) fn split_port(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once(':') {
        Some((n, p))
            if (!n.contains(':') || n.ends_with(']'))
                && !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (n, Some(p))
        }
        _ => (s, None),
    }
}

impl std::str::FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        let (name, port) = split_port(&s);
        let port_suffix = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => format!(":{n}"),
                _ => return Err(format!("`{s}`: `{p}` is not a port (1-65535)")),
            },
            None => String::new(),
        };
        if name.contains(':') && !name.starts_with('[') {
            return Err(format!(
                "`{s}`: after the name only a port may follow `:` (as in `example.com:8443`)"
            ));
        }
        if name == "*" {
            // `*:8443`: any name on that port.
            return Ok(HostPattern::Suffix(port_suffix));
        }
        let stars = name.matches('*').count();
        if stars > 1 {
            return Err(format!(
                "`{s}` has more than one `*`; use one, at the start or the end"
            ));
        }
        if let Some(rest) = name.strip_prefix('*') {
            if !rest.starts_with('.') {
                return Err(format!(
                    "`{s}`: a leading `*` must be followed by `.` (as in `*.example.com`)"
                ));
            }
            validate_dns_name(&rest[1..]).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(HostPattern::Suffix(format!("{rest}{port_suffix}")));
        }
        if let Some(rest) = name.strip_suffix('*') {
            if !rest.ends_with('.') {
                return Err(format!(
                    "`{s}`: a trailing `*` must follow a `.` (as in `api.*`)"
                ));
            }
            if port.is_some() {
                return Err(format!(
                    "`{s}`: a glob ending in `*` cannot name a port (the `*` would swallow it)"
                ));
            }
            validate_dns_name(&rest[..rest.len() - 1]).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(HostPattern::Prefix(rest.to_string()));
        }
        if stars == 1 {
            return Err(format!("`{s}`: `*` may only stand at the start or the end"));
        }
        if let Some(v6) = name.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{s}` is not an IPv6 address"))?;
            return Ok(HostPattern::Exact(format!("{name}{port_suffix}")));
        }
        validate_dns_name(name).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(HostPattern::Exact(format!("{name}{port_suffix}")))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(e) => f.write_str(e),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
            HostPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Finds the Host for a request authority: an exact hash lookup first, then the most specific
/// wildcard. Of two Hosts with the same hostname the later one wins, as in Emissary (compile
/// warns about it).
#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    exact: HashMap<String, usize>,
    /// Wildcard Hosts, most specific first.
    wild: Vec<(HostPattern, usize)>,
}

impl HostIndex {
    pub(crate) fn new(hosts: &[HostRoute]) -> HostIndex {
        HostIndex::of(hosts.iter().map(|h| h.hostname.clone()).enumerate())
    }

    /// The index of some of the Hosts (by index in `hosts`): a Listener's bound Hosts.
    pub(crate) fn subset(hosts: &[HostRoute], which: &[usize]) -> HostIndex {
        HostIndex::of(
            which
                .iter()
                .filter_map(|&i| hosts.get(i).map(|h| (i, h.hostname.clone()))),
        )
    }

    /// The index of the TLS Hosts by name without port: what picks a certificate for an SNI.
    pub(crate) fn for_sni(hosts: &[HostRoute]) -> HostIndex {
        HostIndex::of(
            hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| h.tls_secret.is_some())
                .map(|(i, h)| (i, h.hostname.without_port())),
        )
    }

    /// One index per distinct hostname without port (Emissary's filter chain per TLS name),
    /// and each Host's chain.
    pub(crate) fn chains(hosts: &[HostRoute]) -> (Vec<HostIndex>, Vec<usize>) {
        let mut ids: HashMap<HostPattern, usize> = HashMap::new();
        let mut members: Vec<Vec<(usize, HostPattern)>> = Vec::new();
        let mut chain_of = Vec::with_capacity(hosts.len());
        for (i, h) in hosts.iter().enumerate() {
            let c = *ids.entry(h.hostname.without_port()).or_insert_with(|| {
                members.push(Vec::new());
                members.len() - 1
            });
            members[c].push((i, h.hostname.clone()));
            chain_of.push(c);
        }
        let chains = members
            .into_iter()
            .map(|m| HostIndex::of(m.into_iter()))
            .collect();
        (chains, chain_of)
    }

    fn of(patterns: impl Iterator<Item = (usize, HostPattern)>) -> HostIndex {
        let mut idx = HostIndex::default();
        for (i, p) in patterns {
            match p {
                HostPattern::Exact(e) => {
                    idx.exact.insert(e, i);
                }
                p => {
                    idx.wild.retain(|(q, _)| *q != p);
                    idx.wild.push((p, i));
                }
            }
        }
        idx.wild
            .sort_by(|a, b| b.0.rank().cmp(&a.0.rank()).then(a.1.cmp(&b.1)));
        idx
    }

    pub(crate) fn find(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        self.wild
            .iter()
            .find(|(p, _)| p.matches(host))
            .map(|(_, i)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        s.parse().unwrap()
    }

    #[test]
    fn globs_match() {
        assert!(p("*").matches("anything"));
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(p("api.*").matches("api.example.com"));
        assert!(p("Foo.Example.com").matches("foo.example.com"));
        assert!(!p("foo.example.com").matches("bar.example.com"));
    }

    #[test]
    fn bad_globs_are_refused() {
        for bad in [
            "a*b.com",
            "*example.com",
            "*.*.com",
            "ex ample.com",
            "host:0",
            "host:99999",
            "a:b:8080",
            "api.*:8080",
            "-a.com",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_part_of_the_match() {
        assert_eq!(
            p("Foo.example:8443"),
            HostPattern::Exact("foo.example:8443".into())
        );
        assert!(p("foo.example:8443").matches("foo.example:8443"));
        assert!(!p("foo.example:8443").matches("foo.example"));
        assert!(!p("foo.example").matches("foo.example:8080"));
        assert!(p("*.local:8500").matches("quote.local:8500"));
        assert!(!p("*.local:8500").matches("quote.local"));
        assert!(!p("*.local").matches("quote.local:8500"));
        assert!(p("*:8500").matches("a.b:8500"));
        assert!(p("[::1]:80").matches("[::1]:80"));
        assert_eq!(p("foo.example:8443").without_port(), p("foo.example"));
        assert_eq!(p("*.local:8500").without_port(), p("*.local"));
        assert_eq!(p("*:8500").without_port(), p("*"));
        // Emissary's hostglob_matches compares the text, port included.
        assert!(!p("foo.example:8443").overlaps(&p("foo.example")));
        assert!(p("foo.example:8443").overlaps(&p("*")));
    }

    #[test]
    fn envoy_order_and_later_duplicates_win() {
        let idx = HostIndex::of(
            [
                p("api.*"),
                p("*.example.com"),
                p("*"),
                p("a.example.com"),
                p("a.example.com"),
            ]
            .into_iter()
            .enumerate(),
        );
        assert_eq!(idx.find("a.example.com"), Some(4));
        // A suffix wildcard beats a prefix wildcard of any length.
        assert_eq!(idx.find("api.example.com"), Some(1));
        assert_eq!(idx.find("api.other"), Some(0));
        assert_eq!(idx.find("other"), Some(2));
    }

    #[test]
    fn overlap() {
        assert!(p("*").overlaps(&p("foo.com")));
        assert!(p("*.example.com").overlaps(&p("foo.example.com")));
        assert!(!p("*.example.com").overlaps(&p("foo.other.com")));
        assert!(p("foo.com").overlaps(&p("foo.com")));
        assert!(!p("foo.com").overlaps(&p("bar.com")));
    }
}
