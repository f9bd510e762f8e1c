//! Body types of the request path: the downstream request body streamed upstream (with the
//! optional size limit), and the response body that is either streamed from the upstream or a
//! small local answer. Nothing here buffers a whole body.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::PooledBody;

/// What the client receives: an upstream's body, streamed, or a small local one.
pub enum RespBody {
    /// From a pooled HTTP/1.1 upstream connection.
    Pooled(PooledBody),
    /// From an HTTP/2 upstream.
    Streamed(Incoming),
    Local(Option<Bytes>),
    /// Any of the above, counted for the access log.
    Counted(Box<super::accesslog::Counted>),
}

/// A local response body.
pub fn full(b: Bytes) -> RespBody {
    RespBody::Local((!b.is_empty()).then_some(b))
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Pooled(b) => Pin::new(b).poll_frame(cx),
            RespBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            RespBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Counted(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Pooled(b) => b.is_end_stream(),
            RespBody::Streamed(b) => b.is_end_stream(),
            RespBody::Local(b) => b.is_none(),
            RespBody::Counted(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Pooled(b) => b.size_hint(),
            RespBody::Streamed(b) => b.size_hint(),
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            RespBody::Counted(b) => b.size_hint(),
        }
    }
}

/// The request body exceeded `--max-body-bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct TooLarge;

/// The downstream request body on its way upstream, counting bytes against the limit.
#[derive(Debug)]
pub struct ReqBody {
    inner: Incoming,
    /// Bytes still allowed; `u64::MAX` when unlimited.
    left: u64,
}

impl ReqBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> ReqBody {
        ReqBody {
            inner,
            left: limit.unwrap_or(u64::MAX),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    if n > self.left {
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                    self.left -= n;
                }
                Some(Ok(f))
            }
            Some(Err(e)) => Some(Err(Box::new(e))),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
