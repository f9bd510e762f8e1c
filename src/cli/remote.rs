//! `legate status|revisions|sync|pin|unpin|explain` and `legate routes --live`: talk to a
//! running gateway's admin API; human-readable tables, or the API's JSON with `--json`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use serde_json::Value;

/// Where the gateway's admin API is, and the token for mutating calls.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The admin listener of the gateway.
    #[arg(
        long,
        env = "LEGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8877"
    )]
    pub admin: String,
    /// File holding the admin bearer token (or LEGATE_ADMIN_TOKEN).
    #[arg(long, env = "LEGATE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Revision (commit id or content hash) to serve; history shows the candidates.
    pub revision: String,
    /// Wait for the verification window's verdict (exit 0 verified, 1 rolled back or
    /// degraded, 3 interrupted by a newer revision).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub remote: Remote,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait for the verification window's verdict (exit 0 verified, 1 rolled back or
    /// degraded, 3 interrupted by a newer revision).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub remote: Remote,
}

/// Sync, pin or unpin; with `wait`, then poll the history until the swapped-in revision's
/// window has a verdict.
#[allow(
    clippy::disallowed_methods,
    reason = "a blocking CLI loop outside any runtime waits on the wall clock"
)]
pub fn run_waiting(call: Call<'_>, r: &Remote, wait: bool) -> anyhow::Result<i32> {
    let code = run(call, r)?;
    if !wait || code != 0 {
        return Ok(code);
    }
    let Some((rev, started)) = LAST_SWAP.with(|l| l.borrow_mut().take()) else {
        return Ok(code);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        let (status, body) = request(r, "GET", "/api/revisions")?;
        if status != 200 {
            bail!("GET /api/revisions answered {status}");
        }
        let v: Value = serde_json::from_slice(&body).context("the history is not JSON")?;
        let e = v.as_array().into_iter().flatten().find(|e| {
            e["revision"].as_str() == Some(rev.as_str())
                && e["started_at"].as_u64() == Some(started)
        });
        let outcome = e.and_then(|e| e["outcome"].as_str()).unwrap_or("Verifying");
        if outcome != "Verifying" {
            let e = e.cloned().unwrap_or(Value::Null);
            if r.json {
                outln!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
            } else {
                outln!("verdict: {}", entry_line(&e));
            }
            return Ok(match outcome {
                "Applied" => 0,
                "Interrupted" => 3,
                _ => 1,
            });
        }
        if std::time::Instant::now() > deadline {
            bail!("no verdict for {rev} after an hour");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

thread_local! {
    /// The revision and start time of the entry the last sync/pin/unpin swapped in.
    static LAST_SWAP: std::cell::RefCell<Option<(String, u64)>> = const { std::cell::RefCell::new(None) };
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Request path.
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// `name:value`, repeatable.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[command(flatten)]
    pub remote: Remote,
}

/// What to ask the gateway.
pub enum Call<'a> {
    Status,
    Revisions,
    Sync,
    Pin(&'a str),
    Unpin,
    Routes,
    Explain(&'a ExplainArgs),
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Make the call and print its answer; returns the exit code.
pub fn run(call: Call<'_>, r: &Remote) -> anyhow::Result<i32> {
    let (method, path) = match &call {
        Call::Status => ("GET", "/api/status".to_string()),
        Call::Revisions => ("GET", "/api/revisions".to_string()),
        Call::Sync => ("POST", "/api/sync".to_string()),
        Call::Pin(rev) => ("POST", format!("/api/pin/{}", enc(rev))),
        Call::Unpin => ("POST", "/api/unpin".to_string()),
        Call::Routes => ("GET", "/api/routes".to_string()),
        Call::Explain(e) => {
            let mut q = format!(
                "method={}&host={}&path={}",
                enc(&e.method),
                enc(&e.host),
                enc(&e.path)
            );
            for h in &e.headers {
                q.push_str(&format!("&header={}", enc(h)));
            }
            ("GET", format!("/api/routes/explain?{q}"))
        }
    };
    let (status, body) = request(r, method, &path)?;
    if status == 401 {
        eprintln!("legate: the admin API wants a token: --token-file or LEGATE_ADMIN_TOKEN");
        return Ok(2);
    }
    let v: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    if v["entry"]["outcome"] == "Verifying" {
        if let (Some(rev), Some(at)) = (
            v["entry"]["revision"].as_str(),
            v["entry"]["started_at"].as_u64(),
        ) {
            LAST_SWAP.with(|l| *l.borrow_mut() = Some((rev.to_string(), at)));
        }
    }
    if r.json {
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        out!("{}", human(&call, &v));
    }
    Ok(if (200..300).contains(&status) { 0 } else { 1 })
}

fn request(r: &Remote, method: &str, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let token = match &r.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LEGATE_ADMIN_TOKEN").ok(),
    };
    let base: http::Uri = r
        .admin
        .parse()
        .with_context(|| format!("--admin `{}` is not a URL", r.admin))?;
    if base.scheme_str() != Some("http") {
        bail!("--admin must be an http:// URL (the admin listener is plain HTTP)");
    }
    let authority = base.authority().context("--admin has no host")?.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"));
    if let Some(t) = &token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::new()))?;
    rt.block_on(async {
        // The admin API is plain HTTP: no TLS config to read.
        let client = crate::outbound::Outbound::new(None, true)?;
        let resp = client
            .send(req, std::time::Duration::from_secs(600), 64 * 1024 * 1024)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {authority}: {e}"))?;
        anyhow::Ok((resp.status.as_u16(), resp.body))
    })
}

fn when(ms: &Value) -> String {
    match ms.as_u64() {
        Some(ms) => {
            let mut out = Vec::new();
            crate::proxy::accesslog::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                &mut out,
            );
            String::from_utf8_lossy(&out).into_owned()
        }
        None => "-".into(),
    }
}

fn short(v: &Value) -> String {
    v.as_str()
        .map(|s| s.get(..12).unwrap_or(s).to_string())
        .unwrap_or_else(|| "-".into())
}

fn entry_line(e: &Value) -> String {
    let mut s = format!(
        "{} {}",
        short(&e["revision"]),
        e["outcome"].as_str().unwrap_or("?")
    );
    if let Some(c) = e.get("commit").filter(|c| c.is_object()) {
        s.push_str(&format!(
            " \"{}\" by {}",
            c["summary"].as_str().unwrap_or(""),
            c["author"].as_str().unwrap_or("")
        ));
    }
    s.push_str(&format!(" at {}", when(&e["finished_at"])));
    if let Some(r) = e["reason"].as_str() {
        s.push_str(&format!(" ({r})"));
    } else if let Some(v) = e["verdict"]["summary"].as_str() {
        s.push_str(&format!(
            " ({}: {v})",
            e["verdict"]["judgement"].as_str().unwrap_or("")
        ));
    }
    s
}

fn human(call: &Call<'_>, v: &Value) -> String {
    let mut o = String::new();
    match call {
        Call::Status => {
            o.push_str(&format!(
                "source:        {}\n",
                v["source"].as_str().unwrap_or("-")
            ));
            o.push_str(&format!(
                "mode:          {}{}\n",
                v["mode"].as_str().unwrap_or("-"),
                v["pinned"]
                    .as_str()
                    .map(|p| format!(" at {p}"))
                    .unwrap_or_default()
            ));
            let live = match v.get("live") {
                Some(e) if e.is_object() => format!(
                    "{} [{}], graph {}, {} route(s)",
                    entry_line(e),
                    v["state"].as_str().unwrap_or("-"),
                    e["graph"].as_str().unwrap_or("-"),
                    e["routes"]
                ),
                _ => short(&v["applied"]),
            };
            if let Some(id) = v["applied"].as_str() {
                o.push_str(&format!("revision:      {id}\n"));
            }
            o.push_str(&format!(
                "live:          {live}{}\n",
                if v["serving_cached"] == true {
                    " [served from the cache]"
                } else {
                    ""
                }
            ));
            if let Some(e) = v.get("last_attempt").filter(|e| e.is_object()) {
                o.push_str(&format!("last attempt:  {}\n", entry_line(e)));
                for d in e["diagnostics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|d| d["severity"] == "error")
                    .take(10)
                {
                    o.push_str(&format!(
                        "  {}:{}:{}: {}\n",
                        d["file"].as_str().unwrap_or(""),
                        d["line"],
                        d["column"],
                        d["message"].as_str().unwrap_or("")
                    ));
                }
            }
            if let Some(vr) = v["verifying"].as_str() {
                let w = &v["window"];
                o.push_str(&format!(
                    "verifying:     {} ({} changed route(s), ends in {} ms)\n",
                    vr.get(..12).unwrap_or(vr),
                    w["judged"],
                    w["ends_in_ms"]
                ));
                for r in w["routes"].as_array().into_iter().flatten().take(10) {
                    o.push_str(&format!(
                        "  {} ({}): {} request(s), {} failed, {} upstream 5xx\n",
                        r["mapping"].as_str().unwrap_or(""),
                        r["why"].as_str().unwrap_or(""),
                        r["requests"],
                        r["failures"],
                        r["upstream_5xx"]
                    ));
                }
            }
            if v["verified"].is_string() && v["verified"] != v["applied"] {
                o.push_str(&format!(
                    "verified:      {} (the rollback target)\n",
                    short(&v["verified"])
                ));
            }
            if v["head"].is_string() && v["head"] != v["applied"] {
                o.push_str(&format!(
                    "head:          {}{}\n",
                    short(&v["head"]),
                    if v["out_of_sync"] == true {
                        " (out of sync: pinned)"
                    } else {
                        ""
                    }
                ));
            }
            if let Some(rt) = v.get("retry").filter(|r| r.is_object()) {
                o.push_str(&format!(
                    "retry:         {} ({}) attempt {} at {}, after probes of {}{}\n",
                    short(&rt["revision"]),
                    rt["kind"].as_str().unwrap_or(""),
                    rt["attempts"].as_u64().unwrap_or(0) + 1,
                    when(&rt["next_at"]),
                    rt["upstreams"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|u| u.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default(),
                    rt["last_probe_error"]
                        .as_str()
                        .map(|e| format!("; last probe: {e}"))
                        .unwrap_or_default()
                ));
            }
            if v["draining"] == true {
                o.push_str("draining:      yes (not ready)\n");
            }
            if let Some(err) = v["source_error"].as_str() {
                o.push_str(&format!(
                    "source error:  {err} ({} in a row)\n",
                    v["consecutive_failures"]
                ));
            }
            o.push_str(&format!(
                "passes:        {}, last at {}\n",
                v["passes"],
                when(&v["last_pass_at"])
            ));
        }
        Call::Revisions => {
            o.push_str(&format!(
                "{:<13} {:<11} {:<25} {:>6}  {}\n",
                "REVISION", "OUTCOME", "FINISHED", "ROUTES", "COMMIT / REASON"
            ));
            for e in v.as_array().into_iter().flatten() {
                let what = match e.get("commit").filter(|c| c.is_object()) {
                    Some(c) => format!(
                        "\"{}\" by {}",
                        c["summary"].as_str().unwrap_or(""),
                        c["author"].as_str().unwrap_or("")
                    ),
                    None => String::new(),
                };
                let reason = e["reason"]
                    .as_str()
                    .map(|r| format!(" — {r}"))
                    .unwrap_or_default();
                o.push_str(&format!(
                    "{:<13} {:<11} {:<25} {:>6}  {what}{reason}\n",
                    short(&e["revision"]),
                    e["outcome"].as_str().unwrap_or("?"),
                    when(&e["finished_at"]),
                    e["routes"]
                ));
            }
        }
        Call::Sync | Call::Pin(_) | Call::Unpin => {
            let result = v["result"].as_str().unwrap_or("?");
            match v.get("entry").filter(|e| e.is_object()) {
                Some(e) => o.push_str(&format!("{result}: {}\n", entry_line(e))),
                None => o.push_str(&format!(
                    "{result}{}{}\n",
                    v["revision"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default(),
                    v["error"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )),
            }
        }
        Call::Routes => {
            // The same layout as `legate routes` (crate::cli::output::route_table).
            let table = |title: String, rows: &Value, o: &mut String| {
                o.push_str(&format!("{title}\n"));
                let rows = rows.as_array().map(Vec::as_slice).unwrap_or(&[]);
                if rows.is_empty() {
                    o.push_str("  (no routes)\n");
                }
                o.push_str(&format!(
                    "  {:<4} {:<5} {:<24} {:<40} {:<28} {:>6}  upstream\n",
                    "#", "prec", "host", "match", "mapping", "weight"
                ));
                for (i, g) in rows.iter().enumerate() {
                    let shadow = g.get("shadow").filter(|s| s.is_object());
                    let members = g["members"].as_array().into_iter().flatten();
                    let rows = members
                        .map(|m| (m, &m["weight"], ""))
                        .chain(shadow.map(|s| (s, &s["percent"], "shadow ")));
                    for (m, share, kind) in rows {
                        o.push_str(&format!(
                            "  {:<4} {:<5} {:<24} {:<40} {:<28} {:>5}%  {kind}{}\n",
                            i + 1,
                            g["precedence"].to_string(),
                            g["host"].as_str().unwrap_or(""),
                            g["match"].as_str().unwrap_or(""),
                            m["mapping"].as_str().unwrap_or(""),
                            share.to_string(),
                            m["action"].as_str().unwrap_or("")
                        ));
                    }
                }
                o.push('\n');
            };
            for h in v["hosts"].as_array().into_iter().flatten() {
                let tls = match h["tls_secret"].as_str() {
                    Some(s) => format!("tls={s}"),
                    None => "no tls".into(),
                };
                table(
                    format!(
                        "Host {} ({}; {tls}; insecure={})",
                        h["host"].as_str().unwrap_or(""),
                        h["hostname"].as_str().unwrap_or(""),
                        h["insecure"].as_str().unwrap_or("")
                    ),
                    &h["routes"],
                    &mut o,
                );
            }
            if v["hosts"].as_array().is_none_or(|h| h.is_empty()) {
                table(
                    crate::routes::DEFAULT_HOST_TITLE.into(),
                    &v["fallback"],
                    &mut o,
                );
            }
        }
        Call::Explain(_) => explain_text(v, &mut o),
    }
    o
}

/// `legate explain` as text: the table, the earlier candidates and why each lost, the winner.
fn explain_text(v: &Value, o: &mut String) {
    match &v["table"] {
        Value::String(t) => o.push_str(&format!("table: {t}\n")),
        t => o.push_str(&format!(
            "table: Host {} ({})\n",
            t["host"].as_str().unwrap_or(""),
            t["hostname"].as_str().unwrap_or("")
        )),
    }
    for c in v["candidates"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  {:<4} {:<40} lost: {}\n",
            c["position"].to_string(),
            c["match"].as_str().unwrap_or(""),
            c["lost"].as_str().unwrap_or("")
        ));
    }
    if v["matched"] != true {
        o.push_str("no route: the gateway answers 404\n");
        return;
    }
    o.push_str(&format!(
        "  {:<4} {:<40} wins\n",
        v["position"].to_string(),
        v["match"].as_str().unwrap_or("")
    ));
    for m in v["members"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "       {} ({}%) from {}: {} -> upstream path {}\n",
            m["mapping"].as_str().unwrap_or(""),
            m["weight"],
            m["source"].as_str().unwrap_or(""),
            m["action"].as_str().unwrap_or(""),
            m["upstream_path"].as_str().unwrap_or("-")
        ));
    }
}
