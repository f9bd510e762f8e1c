//! One HTTP client for the gateway's own outbound calls (not proxied traffic): JWKS fetches,
//! revision notifications, the verification probe and the CLI's admin calls.
//!
//! hyper-util's client over `http://` or `https://`, with the shared rustls client config of
//! `tls::client_config` (webpki roots plus `--upstream-ca`, ring). `legate run` sets the
//! process-wide client once with [`init`]; until then (tests, the CLI) [`global`] is one with
//! the webpki roots only. Owns no policy: each caller sets its own timeout and body limit.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::tls::TlsError;

/// A status and the body, read up to the caller's limit.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// The outbound client; cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbound")
    }
}

static GLOBAL: OnceLock<Result<Outbound, String>> = OnceLock::new();
/// The TLS config [`init`] was given, for the unpooled clients made later ([`unpooled`]).
static TLS: OnceLock<rustls::ClientConfig> = OnceLock::new();

/// Set the process-wide client (`legate run`, with `--upstream-ca`). A second call keeps the
/// first client.
pub fn init(extra_ca: Option<&Path>) -> Result<(), TlsError> {
    let tls = crate::tls::client_config(extra_ca, &[])?;
    let _ = TLS.set(tls.clone());
    let _ = GLOBAL.set(Ok(Outbound::with_tls(tls, true)));
    Ok(())
}

/// A client that opens a connection per request, trusting what [`init`] was given (the
/// verification probe measures a fresh connect every time).
pub fn unpooled() -> Result<Outbound, String> {
    match TLS.get() {
        Some(tls) => Ok(Outbound::with_tls(tls.clone(), false)),
        None => Outbound::new(None, false).map_err(|e| e.to_string()),
    }
}

/// The process-wide client (an error only if no TLS config could be built at all).
pub fn global() -> Result<&'static Outbound, String> {
    GLOBAL
        .get_or_init(|| Outbound::new(None, true).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

impl Outbound {
    /// A client trusting the webpki roots plus `extra_ca`; `pooled: false` opens a connection
    /// per request (the verification probe measures a fresh connect every time).
    pub fn new(extra_ca: Option<&Path>, pooled: bool) -> Result<Outbound, TlsError> {
        let tls = crate::tls::client_config(extra_ca, &[])?;
        Ok(Outbound::with_tls(tls, pooled))
    }

    /// `tls` must name no ALPN protocols (the connector sets them).
    fn with_tls(tls: rustls::ClientConfig, pooled: bool) -> Outbound {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut b = Client::builder(TokioExecutor::new());
        if !pooled {
            b.pool_max_idle_per_host(0);
        }
        Outbound {
            client: b.build(https),
        }
    }

    /// Send `req` (an absolute URI) and read the answer's body up to `max_body` bytes, all
    /// within `timeout`. Errors are one line with their causes.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, String> {
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }

    /// `GET url`: the status only, the body not read (the verification probe).
    pub async fn status(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<u16, String> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            Ok(Err(e)) => Err(error_chain(&e)),
            Ok(Ok(resp)) => Ok(resp.status().as_u16()),
        }
    }
}

/// An error with its causes, one line (hyper's own message alone says little).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
