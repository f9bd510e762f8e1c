//! `legate status|revisions|sync|pin|unpin|explain`: talk to a running gateway's admin API.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the gateway's admin API is, and the token for mutating calls.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin listener of the gateway.
    #[arg(
        long,
        env = "LEGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8877",
        global = true
    )]
    pub admin: String,
    /// File holding the admin bearer token (or LEGATE_ADMIN_TOKEN).
    #[arg(long, env = "LEGATE_ADMIN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub call: Call,
}

#[derive(Debug, Subcommand)]
pub enum Call {
    /// Live revision, last attempt and its outcome, pin state.
    Status,
    /// Revision history, newest first.
    Revisions,
    /// Fetch and reconcile now (also retries a rejected revision).
    Sync,
    /// Serve this revision and stop following the source (rollback by hand).
    Pin { revision: String },
    /// Follow the source again.
    Unpin,
    /// The compiled route table the gateway serves.
    Routes,
    /// Which Mapping would serve a request, and why.
    Explain {
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "localhost")]
        host: String,
        path: String,
        /// `name:value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
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

pub fn run(a: AdminArgs) -> anyhow::Result<i32> {
    let (method, path) = match &a.call {
        Call::Status => ("GET", "/api/status".to_string()),
        Call::Revisions => ("GET", "/api/revisions".to_string()),
        Call::Sync => ("POST", "/api/sync".to_string()),
        Call::Pin { revision } => ("POST", format!("/api/pin/{}", enc(revision))),
        Call::Unpin => ("POST", "/api/unpin".to_string()),
        Call::Routes => ("GET", "/api/routes".to_string()),
        Call::Explain {
            method,
            host,
            path,
            headers,
        } => {
            let mut q = format!(
                "method={}&host={}&path={}",
                enc(method),
                enc(host),
                enc(path)
            );
            for h in headers {
                q.push_str(&format!("&header={}", enc(h)));
            }
            ("GET", format!("/api/routes/explain?{q}"))
        }
    };
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LEGATE_ADMIN_TOKEN").ok(),
    };
    let base: http::Uri = a
        .admin
        .parse()
        .with_context(|| format!("--admin `{}` is not a URL", a.admin))?;
    if base.scheme_str() != Some("http") {
        bail!("--admin must be an http:// URL (the admin listener is plain HTTP)");
    }
    let authority = base.authority().context("--admin has no host")?.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(async {
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{authority}: connection timed out"))?
        .with_context(|| format!("cannot reach the admin API at {authority}"))?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(&path)
            .header(http::header::HOST, &authority);
        if let Some(t) = &token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = tx.send_request(req.body(Full::new(Bytes::new()))?).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })?;
    outln!("{}", String::from_utf8_lossy(&body).trim_end());
    Ok(match status.as_u16() {
        200..=299 => 0,
        401 => {
            eprintln!("legate: the admin API wants a token: --token-file or LEGATE_ADMIN_TOKEN");
            2
        }
        _ => 1,
    })
}
