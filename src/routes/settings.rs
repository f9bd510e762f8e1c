//! Graph-wide request settings: what Emissary's `Module` (name `ambassador`) and
//! `TracingService` set for every request rather than per Mapping. Plain data compiled with the routes, so a revision's
//! settings change together with its routes and the proxy reads them per request.

use std::net::IpAddr;

/// Settings carried by a compiled graph. `Default` is what a revision without a Module gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `use_remote_address` (default true): the gateway sets `X-Forwarded-For` from the
    /// connection's address; false passes the client's header through unchanged.
    pub use_remote_address: bool,
    /// `server_name`: the `Server` header of every response, when set.
    pub server_name: Option<String>,
    /// `ip_allow` / `ip_deny`.
    pub ip_filter: Option<IpFilter>,
    /// `reject_requests_with_escaped_slashes`: 400 for a path holding `%2F` or `%5C`.
    pub reject_escaped_slashes: bool,
    /// `merge_slashes` as written (Legate merges duplicate slashes whatever it says).
    pub merge_slashes: Option<bool>,
    /// `strip_matching_host_port`: drop the `:port` of `Host` when it is the listener's port.
    pub strip_matching_host_port: bool,
    /// `preserve_external_request_id`: `Some(false)` replaces a client's `X-Request-Id`.
    pub preserve_external_request_id: Option<bool>,
    /// `buffer.max_request_bytes`: largest request body (the smaller of this and the flag).
    pub max_request_body_bytes: Option<u64>,
    /// `max_request_headers_kb` in bytes (the smaller of this and the flag).
    pub max_request_header_bytes: Option<usize>,
    /// `diagnostics.enabled`: `/ambassador/v0/` on the proxy listeners is the gateway's own.
    pub diagnostics: bool,
    /// Span export from a `TracingService` (`--otlp-endpoint` wins over it).
    pub tracing: Option<Tracing>,
}

/// Where a `TracingService` sends spans, and how it samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The collector's OTLP/HTTP traces URL (`http://<service>/v1/traces`).
    pub collector: http::Uri,
    /// `config.service_name` (default `legate`).
    pub service_name: String,
    /// `sampling.overall` as a ratio; `None`: not set.
    pub sampling: Option<f64>,
    /// `tag_headers`, lowercase: request headers copied onto the server span.
    pub tag_headers: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            use_remote_address: true,
            server_name: None,
            ip_filter: None,
            reject_escaped_slashes: false,
            merge_slashes: None,
            strip_matching_host_port: false,
            preserve_external_request_id: None,
            max_request_body_bytes: None,
            max_request_header_bytes: None,
            diagnostics: false,
            tracing: None,
        }
    }
}

/// The path prefix Emissary keeps for itself (diagnostics and probes).
pub const DIAG_PREFIX: &str = "/ambassador/v0/";

/// Emissary's `ip_allow` (only listed sources pass) or `ip_deny` (listed sources are refused).
#[derive(Debug, Clone, PartialEq)]
pub struct IpFilter {
    pub allow: bool,
    pub rules: Vec<IpRule>,
}

/// One `{peer: CIDR}` or `{remote: CIDR}` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct IpRule {
    /// `peer`: the connection's address; otherwise `remote`: the client address after the
    /// trusted `X-Forwarded-For` hops.
    pub peer: bool,
    pub net: Cidr,
}

impl IpFilter {
    /// Whether a request from `peer` whose client address is `remote` may pass.
    pub fn admits(&self, peer: IpAddr, remote: IpAddr) -> bool {
        let hit = self
            .rules
            .iter()
            .any(|r| r.net.contains(if r.peer { peer } else { remote }));
        hit == self.allow
    }
}

/// An address block: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`/{l}` is not a prefix length (0-{max})"))?,
        };
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether a raw request path holds an escaped slash or backslash (Envoy's
/// `path_with_escaped_slashes_action: REJECT_REQUEST` looks for the same four spellings).
pub fn has_escaped_slash(path: &str) -> bool {
    let b = path.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && (w[1] == b'2' && matches!(w[2], b'f' | b'F')
                || w[1] == b'5' && matches!(w[2], b'c' | b'C'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    #[test]
    fn escaped_slashes() {
        assert!(has_escaped_slash("/a%2Fb"));
        assert!(has_escaped_slash("/a%5cb"));
        assert!(!has_escaped_slash("/a%20b/c"));
    }
}
