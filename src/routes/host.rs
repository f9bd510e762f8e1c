//! Host name globs (`*`, `*.example.com`, `api.*`, exact) and the index that picks the Host
//! resource for a request's authority.

use std::collections::HashMap;
use std::fmt;

use super::types::validate_dns_name;
use super::HostRoute;

/// A validated host name glob. Matching is case-insensitive; patterns are stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `*`
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`; matches one or more leading characters.
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

    /// Specificity for choosing among several matching Hosts: exact beats longer wildcards.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(e) => (3, e.len()),
            HostPattern::Suffix(s) | HostPattern::Prefix(s) => (2, s.len()),
            HostPattern::Any => (1, 0),
        }
    }
}

impl std::str::FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        // A port in a hostname glob never matches: Legate compares names without ports.
        if s.contains(':') && !s.starts_with('[') {
            return Err(format!(
                "`{s}` has a port; hostnames are matched without the port, so remove `:{}`",
                s.rsplit(':').next().unwrap_or("")
            ));
        }
        let stars = s.matches('*').count();
        if stars > 1 {
            return Err(format!(
                "`{s}` has more than one `*`; use one, at the start or the end"
            ));
        }
        if let Some(rest) = s.strip_prefix('*') {
            if !rest.starts_with('.') {
                return Err(format!(
                    "`{s}`: a leading `*` must be followed by `.` (as in `*.example.com`)"
                ));
            }
            validate_dns_name(&rest[1..]).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(HostPattern::Suffix(rest.to_string()));
        }
        if let Some(rest) = s.strip_suffix('*') {
            if !rest.ends_with('.') {
                return Err(format!(
                    "`{s}`: a trailing `*` must follow a `.` (as in `api.*`)"
                ));
            }
            validate_dns_name(&rest[..rest.len() - 1]).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(HostPattern::Prefix(rest.to_string()));
        }
        if stars == 1 {
            return Err(format!("`{s}`: `*` may only stand at the start or the end"));
        }
        if let Some(v6) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{s}` is not an IPv6 address"))?;
            return Ok(HostPattern::Exact(s));
        }
        validate_dns_name(&s).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(HostPattern::Exact(s))
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

/// Finds the Host for a request host name: an exact hash lookup first, then the most specific
/// wildcard.
#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    exact: HashMap<String, usize>,
    /// Wildcard Hosts, most specific first.
    wild: Vec<(HostPattern, usize)>,
}

impl HostIndex {
    pub(crate) fn new(hosts: &[HostRoute]) -> HostIndex {
        let mut idx = HostIndex::default();
        for (i, h) in hosts.iter().enumerate() {
            match &h.hostname {
                HostPattern::Exact(e) => {
                    idx.exact.entry(e.clone()).or_insert(i);
                }
                p => idx.wild.push((p.clone(), i)),
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
            "host:8080",
            "-a.com",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
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
