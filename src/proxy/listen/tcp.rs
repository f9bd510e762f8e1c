//! TCPMappings: a connection on a TCP or TLS listener port is proxied to the mapping's service.
//! On a port whose mappings name a `host`, the TLS ClientHello is peeked (not consumed) for its
//! SNI: a mapping with a certificate terminates TLS with it (rustls) and proxies the cleartext;
//! one without passes the untouched TLS stream through. The route is chosen once, at accept, on
//! the graph live then: a later revision (even one removing the mapping) does not cut the
//! connection, which ends when either side closes or after the mapping's `idle_timeout_ms`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proxy::conn::ConnHold;
use crate::proxy::tunnel::pipe;
use crate::proxy::Proxy;
use crate::routes::listener::pick_tcp;

/// Largest ClientHello read for its SNI (rustls accepts none larger either).
const MAX_HELLO: usize = 16 * 1024;

impl Proxy {
    /// Serve one connection accepted on a TCPMapping port.
    pub(super) async fn serve_tcp(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        port: u16,
        hold: ConnHold,
    ) {
        let graph = self.shared.load().graph.clone();
        let by_sni = graph.tcp.iter().any(|r| r.port == port && r.sni.is_some());
        let sni = if by_sni {
            let by = tokio::time::Instant::now() + self.settings.limits.header_read_timeout;
            match tokio::time::timeout_at(by, peek_sni(&stream)).await {
                Ok(Ok(sni)) => sni,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TCPMapping: no TLS ClientHello");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TCPMapping: no ClientHello within the header timeout");
                    return;
                }
            }
        } else {
            None
        };
        let n = self.tcp_seq.fetch_add(1, Ordering::Relaxed);
        let Some(route) = pick_tcp(&graph.tcp, port, sni.as_deref(), n) else {
            tracing::debug!(%remote, port, sni = sni.as_deref().unwrap_or(""), "no TCPMapping for this connection");
            return;
        };
        let up = match TcpStream::connect(route.service.as_str()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%remote, service = %route.service, error = %e, "TCPMapping upstream connect failed");
                return;
            }
        };
        let _ = up.set_nodelay(true);
        let idle = route.idle_timeout;
        let tls = match &route.terminate {
            None => None,
            Some(secret) => match self
                .secrets
                .load(&secret.name)
                .map_err(|e| e.to_string())
                .and_then(|k| crate::tls::single_cert_config(k).map_err(|e| e.to_string()))
            {
                Ok(cfg) => Some(cfg),
                Err(e) => {
                    tracing::warn!(%remote, secret = %secret.name, error = %e, "TCPMapping: certificate unavailable");
                    return;
                }
            },
        };
        drop(graph);
        match tls {
            Some(cfg) => serve_terminated(stream, up, cfg, idle, remote).await,
            None => pipe(stream, up, idle).await,
        }
        drop(hold);
    }
}

/// TLS ends here (with the mapping's certificate); the cleartext goes upstream.
async fn serve_terminated(
    stream: TcpStream,
    up: TcpStream,
    cfg: rustls::ServerConfig,
    idle: Duration,
    remote: SocketAddr,
) {
    match tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        .accept(stream)
        .await
    {
        Ok(s) => pipe(s, up, idle).await,
        Err(e) => tracing::debug!(%remote, error = %e, "TCPMapping: TLS handshake failed"),
    }
}

/// The SNI of the ClientHello at the start of `stream`, read without consuming it.
async fn peek_sni(stream: &TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        stream.readable().await?;
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a ClientHello",
            ));
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(hello)) => {
                return Ok(hello
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase))
            }
            Ok(None) if n < MAX_HELLO => {}
            Ok(None) => return Err(std::io::Error::other("ClientHello too large")),
            Err((e, _)) => return Err(std::io::Error::other(e)),
        }
        if n == seen {
            // More of the ClientHello is on its way: peek returns what is buffered at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = n;
    }
}
