//! Upgraded connections (WebSocket and other `101 Switching Protocols`) and TCPMapping
//! connections: bytes copied both ways until either side closes or the tunnel is idle, and [`LastSeen`], the idle clock shared with
//! the listener's connection idle timeout.
//!
//! A leaf: the request layer spawns a tunnel after a switch; the listener times idle
//! connections with the same clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Copy bytes both ways between an upgraded client connection and upstream connection, until
/// either side closes or no byte has passed either way for `idle`.
/// `_hold` (the downstream connection's slot) is kept until the tunnel ends.
pub(crate) async fn tunnel<H>(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _hold: H,
    idle: Duration,
) {
    let (d, u) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    pipe(
        hyper_util::rt::TokioIo::new(d),
        hyper_util::rt::TokioIo::new(u),
        idle,
    )
    .await
}

/// Copy bytes both ways between two connections until either side closes or no byte has
/// passed either way for `idle` (upgraded tunnels, TCPMappings).
pub(crate) async fn pipe<D, U>(d: D, u: U, idle: Duration)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let seen = Arc::new(LastSeen::new());
    let mut d = Watched(d, seen.clone());
    let mut u = Watched(u, seen.clone());
    let copy = tokio::io::copy_bidirectional(&mut d, &mut u);
    tokio::pin!(copy);
    let mut check = Box::pin(tokio::time::sleep(idle));
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
                return;
            }
            _ = &mut check => match seen.idle_deadline(idle) {
                None => {
                    tracing::debug!(idle_ms = idle.as_millis() as u64, "tunnel idle: closed");
                    return;
                }
                Some(at) => check.as_mut().reset(at),
            }
        }
    }
}

/// One side of a tunnel, noting every read that brought bytes.
struct Watched<T>(T, Arc<LastSeen>);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.1.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// When something last happened on a connection (a request ended, a tunnel moved bytes), in
/// milliseconds since it opened: one atomic store per event, for idle timeouts.
pub(crate) struct LastSeen {
    base: Instant,
    last_ms: AtomicU64,
}

impl LastSeen {
    pub(crate) fn new() -> LastSeen {
        LastSeen {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `None` when nothing happened for `idle`; else when to look again.
    pub(crate) fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let at = last + idle;
        (at > Instant::now()).then_some(at)
    }
}
