//! Text, Markdown (for a pull-request comment) and JSON renderings of a `RouteDiff`.

use std::fmt::Write as _;

use super::{ChangeKind, FindingKind, RouteDiff};

/// The marker the CI recipes look for to update their previous comment.
pub const COMMENT_MARKER: &str = "<!-- legate-diff -->";

fn sign(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Added => "+",
        ChangeKind::Removed => "-",
        ChangeKind::Changed => "~",
    }
}

fn finding_label(k: FindingKind) -> &'static str {
    match k {
        FindingKind::Shadowed => "SHADOWED",
        FindingKind::Unreachable => "UNREACHABLE",
        FindingKind::TrafficMoved => "TRAFFIC MOVED",
        FindingKind::CanaryShift => "CANARY",
        FindingKind::TlsLost => "TLS LOST",
        FindingKind::RedirectChanged => "REDIRECT",
    }
}

fn summary(d: &RouteDiff) -> String {
    format!(
        "{} Mapping(s) added, {} removed, {} changed; {} Host change(s); {} finding(s)",
        d.added_mappings,
        d.removed_mappings,
        d.changed_mappings,
        d.hosts.len(),
        d.findings.len()
    )
}

pub fn text(d: &RouteDiff) -> String {
    let mut s = String::new();
    if d.is_empty() {
        s.push_str("No route changes.\n");
        return s;
    }
    let _ = writeln!(s, "{}", summary(d));
    if !d.findings.is_empty() {
        let _ = writeln!(s, "\nAttention:");
        for f in &d.findings {
            let _ = writeln!(s, "  ! {}: {}", finding_label(f.kind), f.message);
        }
    }
    for h in &d.hosts {
        let _ = writeln!(s, "\n{} Host {}", sign(h.kind), h.host);
        for (f, b, a) in &h.fields {
            let _ = writeln!(s, "    {f}: {} -> {}", or_dash(b), or_dash(a));
        }
    }
    for t in d.tables.iter().filter(|t| !t.entries.is_empty()) {
        let _ = writeln!(s, "\n{} ({} route(s) after)", t.title, t.routes_after);
        for e in &t.entries {
            let pos = match (e.before, e.after) {
                (Some(b), Some(a)) if a != b => format!("#{b}->#{a}"),
                (_, Some(a)) => format!("#{a}"),
                (Some(b), None) => format!("was #{b}"),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                s,
                "  {} {:<8} {}  {}",
                sign(e.kind),
                pos,
                e.mapping,
                e.matches
            );
            if e.kind == ChangeKind::Changed {
                for (f, b, a) in &e.fields {
                    let _ = writeln!(s, "      {f}: {} -> {}", or_dash(b), or_dash(a));
                }
            } else if e.kind == ChangeKind::Added {
                for (f, _, a) in e
                    .fields
                    .iter()
                    .filter(|(f, _, _)| f == "action" || f == "redirect" || f == "weight")
                {
                    let _ = writeln!(s, "      {f}: {a}");
                }
            }
        }
    }
    s
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('`', "'").replace('<', "&lt;")
}

/// The pull-request comment when a side does not validate: no route diff, the errors instead
/// (with the same marker, so the next push edits this comment).
pub fn markdown_invalid(sides: &[(&str, Vec<String>)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{COMMENT_MARKER}");
    let _ = writeln!(s, "### Legate route diff\n");
    s.push_str(":x: No route diff: the configuration does not validate.\n\n");
    for (label, errors) in sides {
        let _ = writeln!(
            s,
            "**{}**, {} error(s):\n",
            label.replace('<', "&lt;"),
            errors.len()
        );
        s.push_str("```\n");
        for e in errors {
            let _ = writeln!(s, "{}", e.replace("```", "'''"));
        }
        s.push_str("```\n\n");
    }
    s
}

pub fn markdown(d: &RouteDiff) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{COMMENT_MARKER}");
    let _ = writeln!(s, "### Legate route diff\n");
    if d.is_empty() {
        s.push_str("No route changes.\n");
        return s;
    }
    let _ = writeln!(s, "{}\n", summary(d));
    if !d.findings.is_empty() {
        for f in &d.findings {
            // Findings are list items: backticks render as code there, only HTML needs escaping.
            let _ = writeln!(
                s,
                "- :warning: **{}**: {}",
                finding_label(f.kind),
                f.message.replace('<', "&lt;")
            );
        }
        s.push('\n');
    }
    if !d.hosts.is_empty() {
        let _ = writeln!(
            s,
            "| | Host | field | before | after |\n|---|---|---|---|---|"
        );
        for h in &d.hosts {
            if h.fields.is_empty() {
                let _ = writeln!(s, "| {} | `{}` | | | |", sign(h.kind), h.host);
            }
            for (f, b, a) in &h.fields {
                let _ = writeln!(
                    s,
                    "| {} | `{}` | {f} | {} | {} |",
                    sign(h.kind),
                    h.host,
                    md_escape(or_dash(b)),
                    md_escape(or_dash(a))
                );
            }
        }
        s.push('\n');
    }
    for t in d.tables.iter().filter(|t| !t.entries.is_empty()) {
        let long = t.entries.len() > 10;
        if long {
            let _ = writeln!(
                s,
                "<details><summary>{} — {} change(s)</summary>\n",
                md_escape(&t.title),
                t.entries.len()
            );
        } else {
            let _ = writeln!(s, "**{}**\n", md_escape(&t.title));
        }
        let _ = writeln!(
            s,
            "| | # | Mapping | match | change |\n|---|---|---|---|---|"
        );
        for e in &t.entries {
            let pos = match (e.before, e.after) {
                (Some(b), Some(a)) if a != b => format!("{b}→{a}"),
                (_, Some(a)) => a.to_string(),
                (Some(b), None) => format!("({b})"),
                (None, None) => String::new(),
            };
            let change = match e.kind {
                ChangeKind::Added => e
                    .fields
                    .iter()
                    .filter(|(f, _, _)| f == "action" || f == "redirect" || f == "weight")
                    .map(|(f, _, a)| format!("{f}: {}", md_escape(a)))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                ChangeKind::Removed => "removed".into(),
                ChangeKind::Changed => e
                    .fields
                    .iter()
                    .map(|(f, b, a)| {
                        format!("{f}: {} → {}", md_escape(or_dash(b)), md_escape(or_dash(a)))
                    })
                    .collect::<Vec<_>>()
                    .join("<br>"),
            };
            let _ = writeln!(
                s,
                "| {} | {pos} | `{}` | `{}` | {change} |",
                sign(e.kind),
                e.mapping,
                md_escape(&e.matches)
            );
        }
        if long {
            s.push_str("\n</details>\n");
        }
        s.push('\n');
    }
    s
}

pub fn json(d: &RouteDiff) -> String {
    serde_json::to_string_pretty(d).unwrap_or_default()
}
