//! The one place that dials upstreams: TCP, then TLS origination for `https://` upstreams.
//! Knows nothing of pools: `pool` (HTTP/1.1) and `h2` dial through a [`Connector`].
//! `https://` upstreams get TLS origination with rustls (webpki roots plus `--upstream-ca`),
//! certificate verified. DNS names go through [`Resolver`]: every address is used (the start
//! rotates per connection), names are re-resolved after a TTL, and the last good addresses are
//! kept when a lookup fails.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::proxy::respond::SetupError;
use crate::routes::OriginTls;

/// TLS settings of a Mapping's `tls: NAME`: the connectors (HTTP/1.1, HTTP/2 ALPN) built from
/// its TLSContext, and the SNI to send.
#[derive(Clone)]
pub struct Origin {
    pub spec: OriginTls,
    pub h1: TlsConnector,
    pub h2: TlsConnector,
}

/// Makes [`Connector`]s: the shared resolver and the default TLS client configs.
pub struct Connectors {
    resolver: Resolver,
    h1_tls: TlsConnector,
    h2_tls: TlsConnector,
}

impl Connectors {
    pub fn new(extra_ca: Option<&Path>, resolver: Resolver) -> Result<Connectors, SetupError> {
        let h1 = crate::tls::client_config(extra_ca, &[b"http/1.1"])?;
        let h2 = crate::tls::client_config(extra_ca, &[b"h2"])?;
        Ok(Connectors {
            resolver,
            h1_tls: TlsConnector::from(Arc::new(h1)),
            h2_tls: TlsConnector::from(Arc::new(h2)),
        })
    }

    /// The caching resolver every connector uses.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// A connector for upstream connections (`http2`: TLS offers `h2` by ALPN).
    pub fn connector(
        &self,
        http2: bool,
        connect_timeout: Duration,
        origin: Option<&Origin>,
    ) -> Connector {
        let mut http = HttpConnector::new_with_resolver(self.resolver.clone());
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = match (origin, http2) {
            (Some(o), true) => o.h2.clone(),
            (Some(o), false) => o.h1.clone(),
            (None, true) => self.h2_tls.clone(),
            (None, false) => self.h1_tls.clone(),
        };
        Connector {
            http,
            tls,
            sni: origin.and_then(|o| o.spec.sni.clone()),
        }
    }
}

/// TCP, then TLS for `https` URIs.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector<Resolver>,
    tls: TlsConnector,
    /// The TLSContext's `sni`, sent and verified instead of the service's name.
    sni: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    /// Connect to `uri`; for TLS, `server_name` (default: the URI's host) is the SNI and the
    /// name the certificate must hold, so a balancer can dial an address of a named service.
    pub fn dial(
        &mut self,
        uri: Uri,
        server_name: Option<&str>,
    ) -> Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>> {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = self
            .sni
            .as_deref()
            .or(server_name)
            .or(uri.host())
            .unwrap_or("")
            .trim_matches(['[', ']'])
            .to_string();
        let tls = self.tls.clone();
        let connecting = tower_service::Service::call(&mut self.http, uri);
        Box::pin(async move {
            let tcp = connecting.await?;
            if !https {
                return Ok(UpstreamIo::Plain(tcp));
            }
            let name = ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp.into_inner()).await?;
            Ok(UpstreamIo::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// An upstream connection, plain or TLS.
pub enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    /// Boxed: a TLS session is large, and connections are long-lived.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl UpstreamIo {
    /// The address this connection is connected to.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        match self {
            UpstreamIo::Plain(s) => s.inner().peer_addr().ok(),
            UpstreamIo::Tls(s) => s.inner().get_ref().0.peer_addr().ok(),
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

/// A blocking name lookup (the system resolver, or one injected by tests).
pub trait Lookup: Send + Sync + std::fmt::Debug {
    fn lookup(&self, name: &str) -> io::Result<Vec<IpAddr>>;
}

/// `getaddrinfo` through the standard library.
#[derive(Debug)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        use std::net::ToSocketAddrs;
        Ok((name, 0).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

struct Entry {
    addrs: Arc<Vec<IpAddr>>,
    at: Instant,
    next: usize,
}

/// Caching resolver for upstream names (see the module docs).
#[derive(Clone)]
pub struct Resolver {
    lookup: Arc<dyn Lookup>,
    ttl: Duration,
    cache: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Resolver {
    pub fn new(lookup: Arc<dyn Lookup>, ttl: Duration) -> Resolver {
        Resolver {
            lookup,
            ttl,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Cached addresses, rotated so successive connections start at different addresses.
    fn cached(&self, name: &str, fresh_only: bool) -> Option<Vec<SocketAddr>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let e = cache.get_mut(name)?;
        if fresh_only && e.at.elapsed() >= self.ttl {
            return None;
        }
        let n = e.addrs.len();
        if n == 0 {
            return None;
        }
        let start = e.next % n;
        e.next = e.next.wrapping_add(1);
        Some(
            (0..n)
                .map(|i| SocketAddr::new(e.addrs[(start + i) % n], 0))
                .collect(),
        )
    }
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let name = name.as_str().to_string();
        if let Some(addrs) = self.cached(&name, true) {
            return Box::pin(std::future::ready(Ok(addrs.into_iter())));
        }
        let this = self.clone();
        Box::pin(async move {
            let lookup = this.lookup.clone();
            let n = name.clone();
            let result = tokio::task::spawn_blocking(move || lookup.lookup(&n))
                .await
                .map_err(io::Error::other)
                .and_then(|r| r);
            match result {
                Ok(addrs) if !addrs.is_empty() => {
                    let mut cache = this.cache.lock().unwrap_or_else(|e| e.into_inner());
                    // Keep the rotation going across re-resolutions.
                    let next = cache.get(&name).map_or(0, |e| e.next);
                    cache.insert(
                        name.clone(),
                        Entry {
                            addrs: Arc::new(addrs),
                            at: Instant::now(),
                            next,
                        },
                    );
                }
                Ok(_) => tracing::warn!(%name, "DNS lookup returned no addresses"),
                Err(e) => tracing::warn!(%name, error = %e, "DNS lookup failed"),
            }
            // On failure the last good addresses still serve.
            this.cached(&name, false)
                .map(|a| a.into_iter())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {name}"))
                })
        })
    }
}
