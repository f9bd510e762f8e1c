//! The ports a revision asks for (Emissary's `Listener`, and the ports of its TCPMappings) and
//! its TCP routes, as plain compiled values. Pure: which sockets are open is the proxy's
//! business; this only says what a revision wants and how a request on a port is judged.

use std::time::Duration;

use serde::Serialize;

use super::{HostPattern, SecretRef};

/// What a listener speaks (Emissary's protocol stacks without PROXY and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ListenerProtocol {
    /// `[HTTP, TCP]`: HTTP/1.1 and h2c.
    Http,
    /// `[TLS, HTTP, TCP]`: HTTP/1.1 and HTTP/2 over TLS, certificates by SNI.
    Https,
    /// `[TCP]`: TCPMappings, plain.
    Tcp,
    /// `[TLS, TCP]`: TCPMappings chosen by SNI (terminated or passed through).
    Tls,
}

impl ListenerProtocol {
    /// Whether requests on it are HTTP (routed by Hosts and Mappings).
    pub fn is_http(self) -> bool {
        matches!(self, ListenerProtocol::Http | ListenerProtocol::Https)
    }
}

/// How a listener decides whether a request is secure (Emissary's `securityModel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SecurityModel {
    /// `X-Forwarded-Proto: https` makes it secure; the client's header is believed only with
    /// `l7Depth` >= 1, else the connection's own scheme decides.
    Xfp,
    /// Every request is secure (TLS ends in front of the gateway).
    Secure,
    /// Every request is insecure: the Host's insecure action always applies.
    Insecure,
}

/// A compiled Listener (or one synthesized for a TCPMapping's port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerRoute {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    pub security: SecurityModel,
    /// Layer-7 proxies in front: trusted `X-Forwarded-For` hops, and whether `XFP` believes
    /// the client's `X-Forwarded-Proto`.
    pub l7_depth: usize,
    /// Indexes into `Graph::hosts` of the Hosts it serves (by its `hostBinding`).
    pub hosts: Vec<usize>,
    /// No Listener resource asked for it: opened for a TCPMapping's port.
    pub synthesized: bool,
    /// `file:line` of the resource.
    pub source: String,
}

impl ListenerRoute {
    /// Whether a request counts as secure on this listener, given the connection's TLS and the
    /// request's `X-Forwarded-Proto` (if any).
    pub fn secure(&self, tls: bool, forwarded_proto: Option<&[u8]>) -> bool {
        match self.security {
            SecurityModel::Secure => true,
            SecurityModel::Insecure => false,
            SecurityModel::Xfp => match forwarded_proto.filter(|_| self.l7_depth > 0) {
                Some(p) => p.eq_ignore_ascii_case(b"https"),
                None => tls,
            },
        }
    }

    /// `Listener namespace/name` (or the port, when synthesized), for messages.
    pub fn describe(&self) -> String {
        if self.synthesized {
            format!("TCPMapping port {}", self.port)
        } else {
            format!(
                "Listener {}/{} ({})",
                self.namespace, self.name, self.source
            )
        }
    }
}

/// A compiled TCPMapping: connections on `port` (with this SNI, when `sni` is set) go to
/// `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRoute {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    /// The TLS server name it serves (`host`); `None`: every connection on the port.
    pub sni: Option<HostPattern>,
    /// Upstream `host:port`.
    pub service: String,
    /// Share of new connections among the routes of the same port and SNI.
    pub weight: Option<u32>,
    /// Closed after this long without a byte either way.
    pub idle_timeout: Duration,
    /// TLS is terminated with this certificate (a Host's or a TLSContext's secret for `sni`);
    /// `None` with an `sni`: the TLS stream passes through, routed by its SNI.
    pub terminate: Option<SecretRef>,
    pub source: String,
}

/// Picks the TCP route for a connection on `port` whose TLS SNI (if any) is `sni`: the routes of
/// the most specific matching `host` (exact, then the longest glob, then none), split by weight
/// with `n`, a per-connection counter.
pub fn pick_tcp<'g>(
    routes: &'g [TcpRoute],
    port: u16,
    sni: Option<&str>,
    n: u64,
) -> Option<&'g TcpRoute> {
    let rank = |r: &TcpRoute| -> Option<(u8, usize)> {
        match (&r.sni, sni) {
            (None, _) => Some((0, 0)),
            (Some(p), Some(s)) if p.matches(s) => Some(match p {
                HostPattern::Exact(e) => (3, e.len()),
                HostPattern::Suffix(x) | HostPattern::Prefix(x) => (2, x.len()),
                HostPattern::Any => (1, 0),
            }),
            _ => None,
        }
    };
    let best = routes
        .iter()
        .filter(|r| r.port == port)
        .filter_map(|r| rank(r).map(|k| (k, r)))
        .map(|(k, _)| k)
        .max()?;
    let members: Vec<&TcpRoute> = routes
        .iter()
        .filter(|r| r.port == port && rank(r) == Some(best))
        .collect();
    split(&members, n)
}

/// The member the `n`th connection goes to: weighted members take their percentage of each
/// run of 100, unweighted ones share the rest evenly.
fn split<'g>(members: &[&'g TcpRoute], n: u64) -> Option<&'g TcpRoute> {
    let weighted: u64 = members.iter().filter_map(|m| m.weight).map(u64::from).sum();
    let free: Vec<&&TcpRoute> = members.iter().filter(|m| m.weight.is_none()).collect();
    let slot = n % 100;
    let mut acc = 0u64;
    for m in members.iter().filter(|m| m.weight.is_some()) {
        acc += u64::from(m.weight.unwrap_or(0));
        if slot < acc {
            return Some(m);
        }
    }
    if !free.is_empty() {
        return Some(free[(n as usize) % free.len()]);
    }
    // Weights under 100 and no unweighted member: the weights are shares of their sum.
    if weighted == 0 {
        return members.first().copied();
    }
    let slot = n % weighted;
    let mut acc = 0u64;
    members
        .iter()
        .find(|m| {
            acc += u64::from(m.weight.unwrap_or(0));
            slot < acc
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, port: u16, sni: Option<&str>, weight: Option<u32>) -> TcpRoute {
        TcpRoute {
            name: name.into(),
            namespace: "default".into(),
            port,
            sni: sni.map(|s| s.parse().unwrap()),
            service: format!("{name}:1"),
            weight,
            idle_timeout: Duration::from_secs(1),
            terminate: None,
            source: String::new(),
        }
    }

    #[test]
    fn the_most_specific_sni_wins_and_weights_split() {
        let rs = vec![
            route("any", 1, None, None),
            route("wild", 1, Some("*.example.com"), None),
            route("exact", 1, Some("a.example.com"), None),
            route("other-port", 2, None, None),
        ];
        assert_eq!(
            pick_tcp(&rs, 1, Some("a.example.com"), 0).unwrap().name,
            "exact"
        );
        assert_eq!(
            pick_tcp(&rs, 1, Some("b.example.com"), 0).unwrap().name,
            "wild"
        );
        assert_eq!(pick_tcp(&rs, 1, Some("x.test"), 0).unwrap().name, "any");
        assert_eq!(pick_tcp(&rs, 1, None, 0).unwrap().name, "any");
        assert!(pick_tcp(&rs, 3, None, 0).is_none());
        let w = vec![route("a", 1, None, Some(30)), route("b", 1, None, None)];
        let to_a = (0..100).filter(|n| pick_tcp(&w, 1, None, *n).unwrap().name == "a");
        assert_eq!(to_a.count(), 30);
    }

    #[test]
    fn security_models() {
        let mut l = ListenerRoute {
            name: "l".into(),
            namespace: "default".into(),
            port: 1,
            protocol: ListenerProtocol::Http,
            security: SecurityModel::Xfp,
            l7_depth: 0,
            hosts: Vec::new(),
            synthesized: false,
            source: String::new(),
        };
        assert!(
            !l.secure(false, Some(b"https")),
            "XFP without l7Depth ignores the header"
        );
        assert!(l.secure(true, Some(b"http")));
        l.l7_depth = 1;
        assert!(l.secure(false, Some(b"https")));
        assert!(!l.secure(true, Some(b"http")));
        assert!(l.secure(true, None));
        l.security = SecurityModel::Secure;
        assert!(l.secure(false, None));
        l.security = SecurityModel::Insecure;
        assert!(!l.secure(true, Some(b"https")));
    }
}
