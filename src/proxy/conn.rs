//! Facts about a downstream connection that the listener hands each request: the peer, TLS,
//! SNI, the verified client certificate, and what keeps the connection counted.
//!
//! A leaf shared by `listen` (which fills them in) and `request` (which reads them), so the
//! request layer need not know the listener.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

/// What keeps a downstream connection counted (its `--max-connections` slot and its place in
/// the open-connections gauge); an upgraded connection's tunnel keeps a clone.
#[derive(Clone)]
#[allow(dead_code)] // held only for what its drop releases
pub(crate) struct ConnHold(
    pub(crate) Arc<(tokio::sync::OwnedSemaphorePermit, crate::metrics::ConnGuard)>,
);

/// Facts about the downstream connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The listener's own port (what `strip_matching_host_port` compares with).
    pub local_port: u16,
    /// Trusted `X-Forwarded-For` hops: `--xff-trusted-hops` on the flags' listeners, the
    /// Listener's `l7Depth` on a revision's own (set per request from the live graph).
    pub xff_hops: usize,
}

/// The SNI a TLS client sent, carried in each request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Sni(pub(crate) Arc<str>);

/// The `x-forwarded-client-cert` value of the connection's verified client certificate.
#[derive(Debug, Clone)]
pub(crate) struct ClientCert(pub(crate) HeaderValue);
