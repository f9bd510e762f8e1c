//! Verification window: after a swap, watch the new revision for a while and say whether to
//! keep it. Three signals: HTTP health probes to the revision's upstreams, the gateway's own
//! error counter, and the Mappings' active health checks (both hooks the proxy implements):
//! an upstream whose every address fails its checks fails the revision.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::routes::{Action, Graph, Scheme};

/// Gateway-generated failures (upstream connect errors, gateway 5xx), counted by the proxy.
pub trait ErrorCounter: Send + Sync + 'static {
    /// A monotonically increasing count.
    fn gateway_errors(&self) -> u64;

    /// One line per upstream of the live graph whose every address fails its active health
    /// checks, naming its Mappings (default: none known).
    fn unhealthy_upstreams(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How a new revision is watched after the swap.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// Length of the window; zero disables verification.
    pub window: Duration,
    /// Path probed with `GET` on every plain-HTTP upstream of the revision (`None`: no probes).
    pub probe_path: Option<String>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Consecutive failed probes of one upstream that fail the revision.
    pub probe_failures: u32,
    /// Gateway errors tolerated during the window.
    pub max_new_errors: u64,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            window: Duration::from_secs(10),
            probe_path: None,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            probe_failures: 3,
            max_new_errors: 0,
        }
    }
}

/// Watch `graph` for the window. `Err` carries the reason to roll back.
pub async fn verify(
    graph: &Graph,
    s: &VerifySettings,
    errors: Option<&dyn ErrorCounter>,
) -> Result<(), String> {
    if s.window.is_zero() {
        return Ok(());
    }
    let deadline = Instant::now() + s.window;
    let base = errors.map(|e| e.gateway_errors());
    let targets = match &s.probe_path {
        Some(p) => probe_targets(graph)
            .into_iter()
            .map(|a| (a, p.clone()))
            .collect(),
        None => Vec::new(),
    };
    if targets.is_empty() && errors.is_none() {
        // Nothing to watch: waiting would only delay the next revision.
        return Ok(());
    }
    let mut failed: HashMap<String, (u32, String)> = HashMap::new();
    loop {
        for (addr, path) in &targets {
            match probe(addr, path, s.probe_timeout).await {
                Ok(()) => {
                    failed.remove(addr);
                }
                Err(why) => {
                    let e = failed.entry(addr.clone()).or_insert((0, String::new()));
                    e.0 += 1;
                    e.1 = why;
                    if e.0 >= s.probe_failures.max(1) {
                        return Err(format!(
                            "health probe GET {path} to {addr} failed {} times: {}",
                            e.0, e.1
                        ));
                    }
                }
            }
        }
        if let (Some(c), Some(b)) = (errors, base) {
            let new = c.gateway_errors().saturating_sub(b);
            if new > s.max_new_errors {
                return Err(format!(
                    "{new} gateway error(s) during the verification window (tolerated: {})",
                    s.max_new_errors
                ));
            }
        }
        if let Some(why) = errors.and_then(|c| c.unhealthy_upstreams().into_iter().next()) {
            return Err(why);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        tokio::time::sleep(s.probe_interval.min(deadline - now)).await;
    }
}

/// `host:port` of every plain-HTTP upstream, deduplicated.
pub fn probe_targets(graph: &Graph) -> Vec<String> {
    let mut set = BTreeSet::new();
    for r in &graph.routes {
        if let Action::Forward(f) = &r.action {
            if f.upstream.scheme == Scheme::Http {
                set.insert(f.upstream.authority());
            }
        }
    }
    set.into_iter().collect()
}

/// One `GET` over HTTP/1.1; a 2xx or 3xx status is healthy.
async fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(), String> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: legate-verify\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = s
                .read(&mut buf[n..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if k == 0 {
                break;
            }
            n += k;
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "not an HTTP response".to_string())?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("status {code}"))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}
