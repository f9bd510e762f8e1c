//! Emissary's `Listener` and `TCPMapping`: read, checked and compiled into the graph's
//! [`ListenerRoute`]s and [`TcpRoute`]s. Pure, like the rest of `config`: whether a port can be
//! bound is found out by the proxy before a revision is applied.
//!
//! As in Emissary (`irlistener.py`, `v3listener.py`): a Listener takes the Hosts its
//! `hostBinding` names (namespace `SELF` or `ALL`, and `selector.matchLabels`); an HTTP Listener
//! that takes no Host is disabled (warned); a TCPMapping on a port no Listener opens gets a
//! synthesized one (`TLS` when it names a `host`, else `TCP`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::diag::{Diagnostic, Location};
use super::model::{LabelSelector, Resource, Spec};
use crate::routes::{
    HostPattern, HostRoute, ListenerProtocol, ListenerRoute, SecretRef, SecurityModel, TcpRoute,
};

/// A Listener's spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct ListenerSpec {
    pub port: u16,
    pub protocol: Option<String>,
    #[serde(rename = "protocolStack")]
    pub protocol_stack: Vec<String>,
    #[serde(rename = "securityModel")]
    pub security_model: String,
    #[serde(rename = "l7Depth")]
    pub l7_depth: usize,
    #[serde(rename = "hostBinding")]
    pub host_binding: HostBinding,
}

/// Which Hosts a Listener takes.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct HostBinding {
    pub namespace: Option<NamespaceBinding>,
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct NamespaceBinding {
    pub from: Option<String>,
}

/// A TCPMapping's spec (the fields Legate reads; the schema admits Emissary's others).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct TcpMappingSpec {
    pub port: u16,
    pub service: String,
    pub host: Option<String>,
    pub weight: Option<u32>,
    pub idle_timeout_ms: Option<Value>,
    /// TLS to the upstream: refused (not implemented), never silently sent in cleartext.
    pub tls: Option<Value>,
}

/// Envoy's TCP proxy idle timeout when a TCPMapping sets none (as a WebSocket tunnel's).
const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(300);

/// Compile the revision's Listeners and TCPMappings against its compiled Hosts.
pub fn compile(
    resources: &[&Resource],
    hosts: &[HostRoute],
    host_labels: &[&BTreeMap<String, String>],
    diags: &mut Vec<Diagnostic>,
) -> (Vec<ListenerRoute>, Vec<TcpRoute>) {
    let mut listeners: Vec<ListenerRoute> = Vec::new();
    let mut tcp: Vec<TcpRoute> = Vec::new();
    let mut sorted: Vec<&Resource> = resources.to_vec();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for r in &sorted {
        match &r.spec {
            Spec::Listener(l) => {
                if let Some(l) = compile_listener(r, l, hosts, host_labels, diags) {
                    match listeners.iter().find(|o| o.port == l.port) {
                        Some(o) => diags.push(
                            Diagnostic::error(
                                "duplicate-listener-port",
                                &r.at("/spec/port"),
                                format!("port {} is already opened by {}", l.port, o.describe()),
                            )
                            .with_help("one Listener per port: merge them or pick another port"),
                        ),
                        None => listeners.push(l),
                    }
                }
            }
            Spec::TcpMapping(t) => {
                if let Some(t) = compile_tcp(r, t, hosts, resources, diags) {
                    tcp.push(t);
                }
            }
            _ => {}
        }
    }
    place_tcp(&mut listeners, &tcp, resources, diags);
    disable_idle(&mut listeners, hosts.is_empty(), &tcp, resources, diags);
    listeners.sort_by_key(|l| l.port);
    (listeners, tcp)
}

fn compile_listener(
    r: &Resource,
    l: &ListenerSpec,
    hosts: &[HostRoute],
    host_labels: &[&BTreeMap<String, String>],
    diags: &mut Vec<Diagnostic>,
) -> Option<ListenerRoute> {
    let protocol = protocol(r, l, diags)?;
    let security = match l.security_model.as_str() {
        "XFP" => SecurityModel::Xfp,
        "SECURE" => SecurityModel::Secure,
        "INSECURE" => SecurityModel::Insecure,
        other => {
            diags.push(Diagnostic::error(
                "listener-security-model",
                &r.at("/spec/securityModel"),
                format!("securityModel `{other}` is not XFP, SECURE or INSECURE"),
            ));
            return None;
        }
    };
    let bound = bound_hosts(r, &l.host_binding, hosts, host_labels, diags)?;
    Some(ListenerRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        port: l.port,
        protocol,
        security,
        l7_depth: l.l7_depth,
        hosts: bound,
        synthesized: false,
        source: format!("{}:{}", r.loc.file, r.loc.line),
    })
}

/// `protocol` or `protocolStack` (exactly one) as one of the stacks Legate serves.
fn protocol(
    r: &Resource,
    l: &ListenerSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<ListenerProtocol> {
    let stack: Vec<&str> = match (&l.protocol, l.protocol_stack.is_empty()) {
        (Some(_), false) => {
            diags.push(
                Diagnostic::error(
                    "listener-protocol",
                    &r.at("/spec/protocolStack"),
                    "`protocol` and `protocolStack` are both set",
                )
                .with_help("keep one (Emissary uses protocolStack and reports the other)"),
            );
            return None;
        }
        (None, true) => {
            diags.push(
                Diagnostic::error(
                    "listener-protocol",
                    &r.at("/spec"),
                    "a Listener needs `protocol` or `protocolStack`",
                )
                .with_help("add `protocol: HTTP` (or HTTPS, TCP, TLS)"),
            );
            return None;
        }
        (Some(p), true) => match p.as_str() {
            "HTTP" => vec!["HTTP", "TCP"],
            "HTTPS" => vec!["TLS", "HTTP", "TCP"],
            "HTTPPROXY" => vec!["PROXY", "HTTP", "TCP"],
            "HTTPSPROXY" => vec!["TLS", "PROXY", "HTTP", "TCP"],
            "TCP" => vec!["TCP"],
            "TLS" => vec!["TLS", "TCP"],
            _ => vec!["UDP"],
        },
        (None, false) => l.protocol_stack.iter().map(String::as_str).collect(),
    };
    let at = if l.protocol.is_some() {
        "/spec/protocol"
    } else {
        "/spec/protocolStack"
    };
    let refuse = |why: &str| {
        Diagnostic::error(
            "listener-protocol",
            &r.at(at),
            format!("the protocol stack [{}] {why}", stack.join(", ")),
        )
        .with_help("Legate serves HTTP, HTTPS, TCP and TLS listeners ([HTTP, TCP], [TLS, HTTP, TCP], [TCP], [TLS, TCP])")
    };
    match stack.as_slice() {
        ["HTTP", "TCP"] => Some(ListenerProtocol::Http),
        ["TLS", "HTTP", "TCP"] => Some(ListenerProtocol::Https),
        ["TCP"] => Some(ListenerProtocol::Tcp),
        ["TLS", "TCP"] => Some(ListenerProtocol::Tls),
        s if s.contains(&"PROXY") => {
            diags.push(refuse(
                "uses the PROXY protocol, which Legate does not read",
            ));
            None
        }
        s if s.contains(&"UDP") => {
            diags.push(refuse("is UDP (HTTP/3), which Legate does not serve"));
            None
        }
        _ => {
            diags.push(refuse("is not a stack Emissary defines"));
            None
        }
    }
}

/// The Hosts (indexes) a `hostBinding` takes, as Emissary's `matches_host`.
fn bound_hosts(
    r: &Resource,
    b: &HostBinding,
    hosts: &[HostRoute],
    host_labels: &[&BTreeMap<String, String>],
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<usize>> {
    let from = b.namespace.as_ref().and_then(|n| n.from.as_deref());
    let all = match from {
        Some("ALL") => true,
        Some("SELF") => false,
        Some(_) => {
            diags.push(
                Diagnostic::error(
                    "listener-host-binding",
                    &r.at("/spec/hostBinding/namespace/from"),
                    "hostBinding.namespace.from SELECTOR is not supported (nor by Emissary)",
                )
                .with_help("use SELF or ALL, and a `selector` to narrow by labels"),
            );
            return None;
        }
        None if b.selector.is_some() => false,
        None => {
            diags.push(
                Diagnostic::error(
                    "listener-host-binding",
                    &r.at("/spec/hostBinding"),
                    "hostBinding needs `namespace.from` or a `selector`",
                )
                .with_help("`hostBinding: {namespace: {from: ALL}}` takes every Host"),
            );
            return None;
        }
    };
    // Without `namespace`, Emissary compares with the Listener's own namespace.
    let selector = b.selector.clone().unwrap_or_default();
    if !selector.match_expressions.is_empty() {
        diags.push(
            Diagnostic::error(
                "listener-host-binding",
                &r.at("/spec/hostBinding/selector/matchExpressions"),
                "hostBinding.selector supports only matchLabels (as in Emissary)",
            )
            .with_help("write the condition as matchLabels"),
        );
        return None;
    }
    Some(
        hosts
            .iter()
            .zip(host_labels)
            .enumerate()
            .filter(|(_, (h, labels))| {
                (all || h.namespace == r.namespace) && selector.matches(labels)
            })
            .map(|(i, _)| i)
            .collect(),
    )
}

fn compile_tcp(
    r: &Resource,
    t: &TcpMappingSpec,
    hosts: &[HostRoute],
    resources: &[&Resource],
    diags: &mut Vec<Diagnostic>,
) -> Option<TcpRoute> {
    let tls_wanted = match &t.tls {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty() && s != "false",
        _ => false,
    } || t.service.starts_with("https://");
    if tls_wanted {
        diags.push(
            Diagnostic::error(
                "tcp-upstream-tls",
                &r.at(if t.tls.is_some() { "/spec/tls" } else { "/spec/service" }),
                format!(
                    "TCPMapping `{}` asks for TLS to its upstream, which Legate does not do yet; it would go in cleartext",
                    r.name
                ),
            )
            .with_help("remove `tls` (and the https:// scheme) if the upstream takes cleartext, or keep this TCPMapping out of Legate's config"),
        );
        return None;
    }
    let service = match tcp_service(&t.service) {
        Ok(s) => s,
        Err(why) => {
            diags.push(
                Diagnostic::error(
                    "bad-service",
                    &r.at("/spec/service"),
                    format!("service `{}` {why}", t.service),
                )
                .with_help("write `host:port` (a TCPMapping has no scheme and no default port)"),
            );
            return None;
        }
    };
    let sni = match t.host.as_deref() {
        None | Some("") => None,
        Some(h) => match h.parse::<HostPattern>() {
            Ok(p) => Some(p.without_port()),
            Err(e) => {
                diags.push(Diagnostic::error("bad-host", &r.at("/spec/host"), e));
                return None;
            }
        },
    };
    let idle_timeout = match idle_ms(t.idle_timeout_ms.as_ref()) {
        Ok(d) => d,
        Err(()) => {
            diags.push(
                Diagnostic::error(
                    "bad-timeout",
                    &r.at("/spec/idle_timeout_ms"),
                    "idle_timeout_ms is not a whole number of milliseconds",
                )
                .with_help("write milliseconds, as `idle_timeout_ms: 30000`"),
            );
            return None;
        }
    };
    let terminate = sni
        .as_ref()
        .and_then(|p| certificate_for(p, hosts, resources));
    Some(TcpRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        port: t.port,
        sni,
        service,
        weight: t.weight,
        idle_timeout,
        terminate,
        source: format!("{}:{}", r.loc.file, r.loc.line),
    })
}

/// `host:port`, checked.
fn tcp_service(s: &str) -> Result<String, String> {
    if s.contains("://") {
        return Err("has a scheme".into());
    }
    let (name, port) = crate::routes::split_port(s);
    match port.and_then(|p| p.parse::<u16>().ok()) {
        Some(p) if p > 0 && !name.is_empty() => Ok(s.to_string()),
        _ => Err("has no port".into()),
    }
}

fn idle_ms(v: Option<&Value>) -> Result<Duration, ()> {
    match v {
        None => Ok(DEFAULT_TCP_IDLE),
        Some(Value::Number(n)) => n.as_u64().map(Duration::from_millis).ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map(Duration::from_millis).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// The certificate TLS for `sni` is terminated with (Emissary's `tlscontext_for_tcpmapping`):
/// a Host with a `tlsSecret` whose hostname overlaps it, else a TLSContext listing it exactly.
fn certificate_for(
    sni: &HostPattern,
    hosts: &[HostRoute],
    resources: &[&Resource],
) -> Option<SecretRef> {
    let mut by_name: Vec<&HostRoute> = hosts.iter().filter(|h| h.tls_secret.is_some()).collect();
    by_name.sort_by_key(|h| h.hostname.to_string());
    if let Some(h) = by_name
        .into_iter()
        .find(|h| h.hostname.without_port().overlaps(sni))
    {
        return h.tls_secret.clone();
    }
    resources.iter().find_map(|r| match &r.spec {
        Spec::TlsContext(f)
            if f.hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&sni.to_string())) =>
        {
            f.secret.as_ref().map(|s| SecretRef {
                namespace: r.namespace.clone(),
                name: s.clone(),
            })
        }
        _ => None,
    })
}

/// Each TCPMapping port needs a TCP or TLS listener: an HTTP Listener on it is an error; none
/// gets a synthesized one (TLS when a mapping on the port names a `host`).
fn place_tcp(
    listeners: &mut Vec<ListenerRoute>,
    tcp: &[TcpRoute],
    resources: &[&Resource],
    diags: &mut Vec<Diagnostic>,
) {
    let at = |t: &TcpRoute| -> Location {
        resources
            .iter()
            .find(|r| {
                matches!(r.spec, Spec::TcpMapping(_))
                    && r.name == t.name
                    && r.namespace == t.namespace
            })
            .map(|r| r.at("/spec/port"))
            .unwrap_or_default()
    };
    for t in tcp {
        let tls = tcp.iter().any(|o| o.port == t.port && o.sni.is_some());
        match listeners.iter().find(|l| l.port == t.port) {
            Some(l) if l.protocol.is_http() => diags.push(
                Diagnostic::error(
                    "tcp-on-http-listener",
                    &at(t),
                    format!(
                        "TCPMapping `{}` is on port {}, which {} serves as HTTP",
                        t.name,
                        t.port,
                        l.describe()
                    ),
                )
                .with_help("give the TCPMapping its own port, or make that Listener `protocol: TCP` or `TLS`"),
            ),
            Some(_) => {}
            None => listeners.push(ListenerRoute {
                name: format!("tcp-{}", t.port),
                namespace: t.namespace.clone(),
                port: t.port,
                protocol: if tls {
                    ListenerProtocol::Tls
                } else {
                    ListenerProtocol::Tcp
                },
                security: SecurityModel::Secure,
                l7_depth: 0,
                hosts: Vec::new(),
                synthesized: true,
                source: t.source.clone(),
            }),
        }
    }
}

/// Emissary disables a listener that serves nothing: an HTTP Listener that takes no Host (when
/// Hosts exist; without any Host the default Host serves every Listener), a TCP one without
/// TCPMappings.
fn disable_idle(
    listeners: &mut Vec<ListenerRoute>,
    no_hosts: bool,
    tcp: &[TcpRoute],
    resources: &[&Resource],
    diags: &mut Vec<Diagnostic>,
) {
    listeners.retain(|l| {
        let serves = if l.protocol.is_http() {
            no_hosts || !l.hosts.is_empty()
        } else {
            tcp.iter().any(|t| t.port == l.port)
        };
        if l.synthesized || serves {
            return true;
        }
        let what = if l.protocol.is_http() { "no Host" } else { "no TCPMapping" };
        let loc = resources
            .iter()
            .find(|r| matches!(r.spec, Spec::Listener(_)) && r.name == l.name && r.namespace == l.namespace)
            .map(|r| r.at("/spec/hostBinding"))
            .unwrap_or_default();
        diags.push(
            Diagnostic::warning(
                "listener-without-hosts",
                &loc,
                format!(
                    "Listener `{}/{}` serves {what}, so port {} is not opened (Emissary disables it too)",
                    l.namespace, l.name, l.port
                ),
            )
            .with_help("HTTP: widen its hostBinding (`namespace: {from: ALL}`) or label a Host for its selector; TCP/TLS: add a TCPMapping on its port"),
        );
        false
    });
}

#[cfg(test)]
mod tests {
    use crate::config::{load_and_compile, MemTree, Options, Outcome, Severity};
    use crate::routes::ListenerProtocol;

    fn run(text: &str) -> Outcome {
        load_and_compile(&MemTree::new().with("t.yaml", text), &Options::default())
    }

    fn doc(kind: &str, name: &str, spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!("---\napiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{spec}")
    }

    fn codes(o: &Outcome, severity: Severity) -> Vec<&'static str> {
        o.diagnostics
            .iter()
            .filter(|d| d.severity == severity)
            .map(|d| d.code)
            .collect()
    }

    const ALL: &str = "securityModel: XFP\nhostBinding: {namespace: {from: ALL}}";

    #[test]
    fn protocols_are_read_and_the_ones_legate_cannot_serve_are_errors() {
        let host = doc("Host", "h", "hostname: a.test");
        let ok = [
            doc(
                "Listener",
                "a",
                &format!("port: 8080\nprotocol: HTTP\n{ALL}"),
            ),
            doc(
                "Listener",
                "b",
                &format!("port: 8443\nprotocolStack: [TLS, HTTP, TCP]\n{ALL}"),
            ),
        ]
        .concat();
        let o = run(&[host.as_str(), &ok].concat());
        let g = o.graph.expect("valid");
        let got: Vec<_> = g.listeners.iter().map(|l| (l.port, l.protocol)).collect();
        assert_eq!(
            got,
            vec![
                (8080, ListenerProtocol::Http),
                (8443, ListenerProtocol::Https)
            ]
        );
        for bad in [
            "protocol: HTTPPROXY",
            "protocol: UDP",
            "protocolStack: [HTTP]",
            "protocol: HTTP\nprotocolStack: [HTTP, TCP]",
        ] {
            let o = run(&doc("Listener", "x", &format!("port: 1\n{bad}\n{ALL}")));
            assert_eq!(
                codes(&o, Severity::Error),
                vec!["listener-protocol"],
                "{bad}"
            );
        }
        let dup = [
            doc("Listener", "a", &format!("port: 1\nprotocol: HTTP\n{ALL}")),
            doc("Listener", "b", &format!("port: 1\nprotocol: HTTPS\n{ALL}")),
        ]
        .concat();
        assert_eq!(
            codes(&run(&dup), Severity::Error),
            vec!["duplicate-listener-port"]
        );
    }

    #[test]
    fn a_listener_serving_nothing_is_disabled_and_tcp_ports_get_their_own() {
        let yaml = [
            doc("Host", "h", "hostname: a.test"),
            doc(
                "Listener",
                "nobody",
                "port: 1\nprotocol: HTTP\nsecurityModel: XFP\nhostBinding: {selector: {matchLabels: {x: y}}}",
            ),
            doc("TCPMapping", "t", "port: 2\nservice: db:5432"),
            doc("TCPMapping", "s", "port: 3\nservice: db:5432\nhost: a.test"),
        ]
        .concat();
        let o = run(&yaml);
        assert!(codes(&o, Severity::Warning).contains(&"listener-without-hosts"));
        let g = o.graph.expect("valid");
        let got: Vec<_> = g
            .listeners
            .iter()
            .map(|l| (l.port, l.protocol, l.synthesized))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, ListenerProtocol::Tcp, true),
                (3, ListenerProtocol::Tls, true)
            ]
        );
        // The flags still serve HTTP: no Listener resource is left.
        assert!(!g.has_own_listeners());
    }

    #[test]
    fn bad_tcp_mappings_are_errors() {
        let http = doc("Listener", "l", &format!("port: 1\nprotocol: HTTP\n{ALL}"));
        for (spec, code) in [
            ("port: 2\nservice: db", "bad-service"),
            ("port: 2\nservice: db:1\ntls: true", "tcp-upstream-tls"),
            ("port: 2\nservice: https://db:1", "tcp-upstream-tls"),
            ("port: 1\nservice: db:1", "tcp-on-http-listener"),
        ] {
            let o = run(&[http.as_str(), &doc("TCPMapping", "t", spec)].concat());
            assert!(
                codes(&o, Severity::Error).contains(&code),
                "{spec}: {:?}",
                o.diagnostics
            );
        }
    }
}
