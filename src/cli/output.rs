//! Output formats for `check` and `routes`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::CheckFormat;
use crate::config::{Diagnostic, Outcome, Severity};
pub use crate::routes::describe::{describe_action, describe_match, host_of, route_table_json};
use crate::routes::Graph;

/// Print a check outcome to stdout in the chosen format.
pub fn print_check(outcome: &Outcome, format: CheckFormat, root: &Path) {
    let c = outcome.counts();
    match format {
        CheckFormat::Text => {
            for d in &outcome.diagnostics {
                outln!("{d}");
            }
            let routes = outcome.graph.as_ref().map(|g| g.len()).unwrap_or(0);
            let verdict = match &outcome.graph {
                Some(_) => format!(
                    "valid: {} file(s), {} resource(s), {routes} route(s)",
                    outcome.files,
                    outcome.resources.len()
                ),
                None => format!(
                    "INVALID: {} file(s), {} resource(s) read, nothing compiled",
                    outcome.files,
                    outcome.resources.len()
                ),
            };
            outln!(
                "{}: {verdict}; {} error(s), {} warning(s), {} note(s)",
                root.display(),
                c.errors,
                c.warnings,
                c.notes
            );
            if outcome.is_ok() && routes == 0 {
                outln!("note: the configuration defines no routes; every request will get 404");
            }
        }
        CheckFormat::Json => {
            let v = json!({
                "valid": outcome.is_ok(),
                "files": outcome.files,
                "resources": outcome.resources.len(),
                "routes": outcome.graph.as_ref().map(|g| g.len()).unwrap_or(0),
                "hash": outcome.graph.as_ref().map(|g| g.hash.clone()),
                "counts": c,
                "diagnostics": outcome.diagnostics,
            });
            outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        CheckFormat::Github => {
            for d in &outcome.diagnostics {
                outln!("{}", github_annotation(d, root));
            }
        }
        CheckFormat::Gitlab => {
            let report: Vec<serde_json::Value> = outcome
                .diagnostics
                .iter()
                .map(|d| gitlab_issue(d, root))
                .collect();
            outln!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        }
    }
}

fn repo_path(d: &Diagnostic, root: &Path) -> String {
    if d.file.is_empty() {
        root.display().to_string()
    } else if root.is_dir() {
        let p = root.join(&d.file);
        p.strip_prefix("./").unwrap_or(&p).display().to_string()
    } else {
        root.display().to_string()
    }
}

/// One entry of a GitLab Code Quality report (the CodeClimate subset GitLab reads).
pub fn gitlab_issue(d: &Diagnostic, root: &Path) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let path = repo_path(d, root);
    let severity = match d.severity {
        Severity::Error => "major",
        Severity::Warning => "minor",
        Severity::Note => "info",
    };
    let mut description = d.message.clone();
    if let Some(h) = &d.help {
        description.push_str(" — ");
        description.push_str(h);
    }
    // Stable across runs and line moves of unrelated content: what, where (by pointer), which file.
    let fp = Sha256::digest(format!("{}|{}|{}|{}", path, d.code, d.pointer, d.message));
    let fingerprint: String = fp.iter().take(16).map(|b| format!("{b:02x}")).collect();
    json!({
        "description": description,
        "check_name": format!("legate/{}", d.code),
        "fingerprint": fingerprint,
        "severity": severity,
        "location": {"path": path, "lines": {"begin": d.line}},
    })
}

/// A GitHub Actions workflow command (`::error file=..,line=..,col=..::message`).
pub fn github_annotation(d: &Diagnostic, root: &Path) -> String {
    let level = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "notice",
    };
    let file = repo_path(d, root);
    let mut msg = d.message.clone();
    if let Some(h) = &d.help {
        msg.push_str(" — ");
        msg.push_str(h);
    }
    format!(
        "::{level} file={},line={},col={},title={}::{}",
        escape_prop(&file),
        d.line,
        d.column,
        escape_prop(&format!("legate {}", d.code)),
        escape_data(&msg)
    )
}

fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_prop(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// The route table as text: one block per Host plus the hostname fallback, in match order.
pub fn route_table(g: &Graph) -> String {
    let mut out = String::new();
    let section = |title: String, groups: &[usize], out: &mut String| {
        let _ = writeln!(out, "{title}");
        if groups.is_empty() {
            let _ = writeln!(out, "  (no routes)");
        }
        let _ = writeln!(
            out,
            "  {:<4} {:<5} {:<24} {:<40} {:<28} {:>6}  upstream",
            "#", "prec", "host", "match", "mapping", "weight"
        );
        for (n, &gi) in groups.iter().enumerate() {
            let grp = &g.groups[gi];
            let host = host_of(&grp.matcher.host);
            let mtch = describe_match(g, gi);
            for (id, share) in grp.shares() {
                let r = g.route(id);
                let _ = writeln!(
                    out,
                    "  {:<4} {:<5} {:<24} {:<40} {:<28} {:>5}%  {}",
                    n + 1,
                    grp.precedence,
                    host,
                    mtch,
                    format!("{}/{}", r.namespace, r.name),
                    share,
                    describe_action(&r.action)
                );
            }
            if let Some((id, pct)) = grp.shadow {
                let r = g.route(id);
                let _ = writeln!(
                    out,
                    "  {:<4} {:<5} {:<24} {:<40} {:<28} {:>5}%  shadow {}",
                    n + 1,
                    grp.precedence,
                    host,
                    mtch,
                    format!("{}/{}", r.namespace, r.name),
                    pct,
                    describe_action(&r.action)
                );
            }
        }
        let _ = writeln!(out);
    };
    for (i, h) in g.hosts.iter().enumerate() {
        let tls = match &h.tls_secret {
            Some(s) => format!("tls={}", s.name),
            None => "no tls".into(),
        };
        section(
            format!(
                "Host {}/{} ({}; {}; insecure={:?})",
                h.namespace, h.name, h.hostname, tls, h.insecure
            ),
            &g.tables[i].groups,
            &mut out,
        );
    }
    if g.hosts.is_empty() {
        section(
            crate::routes::DEFAULT_HOST_TITLE.into(),
            &g.tables[g.hosts.len()].groups,
            &mut out,
        );
    }
    port_table(g, &mut out);
    out
}

/// The revision's own ports (Listeners, TCPMapping ports) and TCP routes, when it has any.
fn port_table(g: &Graph, out: &mut String) {
    if g.listeners.is_empty() {
        return;
    }
    let title = if g.has_own_listeners() {
        "Listeners (the listen flags are not used)"
    } else {
        "Listeners (besides the listen flags)"
    };
    let _ = writeln!(out, "{title}");
    for l in &g.listeners {
        let hosts: Vec<String> = l
            .hosts
            .iter()
            .map(|&i| g.hosts[i].hostname.to_string())
            .collect();
        let what = if l.synthesized {
            "for TCPMappings".to_string()
        } else {
            format!("{}/{}", l.namespace, l.name)
        };
        let _ = writeln!(
            out,
            "  port {:<6} {:<6} {:<9} l7Depth={} {:<28} hosts: {}",
            l.port,
            format!("{:?}", l.protocol),
            format!("{:?}", l.security),
            l.l7_depth,
            what,
            if l.protocol.is_http() {
                hosts.join(", ")
            } else {
                "-".into()
            }
        );
    }
    for t in &g.tcp {
        let sni = t.sni.as_ref().map_or("*".to_string(), |p| p.to_string());
        let tls = match (&t.terminate, &t.sni) {
            (Some(s), _) => format!("TLS terminated ({})", s.name),
            (None, Some(_)) => "TLS passed through".into(),
            (None, None) => "plain".into(),
        };
        let _ = writeln!(
            out,
            "  tcp  {:<6} sni {:<20} {:<28} {} -> {}",
            t.port,
            sni,
            format!("{}/{}", t.namespace, t.name),
            tls,
            t.service
        );
    }
    let _ = writeln!(out);
}
