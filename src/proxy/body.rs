//! Body types of the request path: the downstream request body streamed upstream (with the
//! optional size limit), and the response body that is either streamed from the upstream or a
//! small local answer. Only `buffer_small` reads a body whole, and only under a small cap; the
//! AuthService's `include_body` reads the start of one ahead (`ReqBody::read_ahead` sends it
//! first, then streams the rest).
//!
//! A leaf: knows no other part of the proxy. Bodies other layers define (the pooled HTTP/1.1
//! body that returns its connection, the access-logged body) travel as [`RespBody::Dyn`], so this
//! enum does not list every kind of body.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// What the client receives: an upstream's body, streamed, or a small local one.
pub enum RespBody {
    /// From an HTTP/2 upstream.
    Streamed(Incoming),
    Local(Option<Bytes>),
    /// A body with something to release when it is dropped (circuit-breaker slots).
    Held(Box<RespBody>, Box<dyn std::any::Any + Send + Sync>),
    /// An upstream body under the route timeout and the idle limit between chunks.
    Limited(Box<Deadline>),
    /// A body another layer defines: a pooled HTTP/1.1 upstream body (its connection goes back
    /// to the pool when it ends), or any of the above counted for the access log.
    Dyn(DynBody),
}

/// A body of a kind this module does not know.
pub type DynBody = Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync + Unpin>;

/// Errors a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The route timeout or the idle limit ended a response body mid-way.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("the route timeout passed while the response body was streaming")]
    Route,
    #[error("no response body data for the route's idle_timeout_ms")]
    Idle,
}

/// A response body that ends when the route's deadline passes, or when no frame arrives for
/// `idle`: with an error (HTTP/2: the stream is reset; HTTP/1.1: the connection closes without
/// the final chunk), or for gRPC with `grpc-status: 4` (DEADLINE_EXCEEDED) in trailers.
pub struct Deadline {
    inner: RespBody,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    grpc: bool,
    done: bool,
}

impl Deadline {
    pub fn new(
        inner: RespBody,
        deadline: Option<tokio::time::Instant>,
        idle: Duration,
        grpc: bool,
    ) -> Deadline {
        Deadline {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            grpc,
            done: false,
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<BodyTimeout> {
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Some(BodyTimeout::Route);
            }
        }
        if self.idle_timer.as_mut().poll(cx).is_ready() {
            return Some(BodyTimeout::Idle);
        }
        None
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) {
            if matches!(r, Some(Ok(_))) {
                let next = tokio::time::Instant::now() + this.idle;
                this.idle_timer.as_mut().reset(next);
            }
            return Poll::Ready(r);
        }
        let Some(why) = this.expired(cx) else {
            return Poll::Pending;
        };
        this.done = true;
        tracing::info!(reason = %why, "response body cut off");
        if this.grpc {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("4"));
            t.insert(
                "grpc-message",
                http::HeaderValue::from_static("upstream timeout"),
            );
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(Some(Err(Box::new(why))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A local response body.
pub fn full(b: Bytes) -> RespBody {
    RespBody::Local((!b.is_empty()).then_some(b))
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let boxed = |r: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>| {
            r.map(|o| o.map(|f| f.map_err(BoxError::from)))
        };
        match self.get_mut() {
            RespBody::Streamed(b) => boxed(Pin::new(b).poll_frame(cx)),
            RespBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Held(b, _) => Pin::new(&mut **b).poll_frame(cx),
            RespBody::Dyn(b) => Pin::new(&mut **b).poll_frame(cx),
            RespBody::Limited(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Streamed(b) => b.is_end_stream(),
            RespBody::Local(b) => b.is_none(),
            RespBody::Held(b, _) => b.is_end_stream(),
            RespBody::Dyn(b) => b.is_end_stream(),
            RespBody::Limited(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Streamed(b) => b.size_hint(),
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            RespBody::Held(b, _) => b.size_hint(),
            RespBody::Dyn(b) => b.size_hint(),
            RespBody::Limited(b) => b.size_hint(),
        }
    }
}

/// The request body exceeded `--max-body-bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct TooLarge;

/// Reading the downstream request body failed: the client's fault, never the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum ClientBody {
    /// The client went away mid-body (logged as 499).
    #[error("the client aborted the request body: {0}")]
    Aborted(String),
    /// The body's framing is broken (a bad chunk size line, say).
    #[error("malformed request body: {0}")]
    Malformed(String),
}

impl ClientBody {
    /// Classify a failure reading the downstream body.
    pub fn of(e: hyper::Error) -> ClientBody {
        use std::io::ErrorKind::*;
        let mut aborted = e.is_incomplete_message() || e.is_canceled() || e.is_closed();
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                aborted |= matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                );
            }
            src = s.source();
        }
        if aborted {
            ClientBody::Aborted(e.to_string())
        } else {
            ClientBody::Malformed(e.to_string())
        }
    }
}

/// The downstream request body on its way upstream, counting bytes against the limit; or a
/// small body read whole beforehand (retries and shadow copies replay it).
#[derive(Debug)]
pub struct ReqBody {
    inner: Source,
    /// Bytes still allowed; `u64::MAX` when unlimited.
    left: u64,
}

#[derive(Debug)]
enum Source {
    Stream(Incoming),
    /// Taken on the first poll.
    Buffered(Option<Bytes>),
    /// Bytes already read from the stream (each part taken when sent), then the stream.
    Prefixed {
        head: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
        rest: Incoming,
    },
}

impl ReqBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> ReqBody {
        ReqBody {
            inner: Source::Stream(inner),
            left: limit.unwrap_or(u64::MAX),
        }
    }

    /// A body already read whole (already checked against the limit).
    pub fn buffered(b: Bytes) -> ReqBody {
        ReqBody {
            inner: Source::Buffered((!b.is_empty()).then_some(b)),
            left: u64::MAX,
        }
    }

    /// The body whose start was read ahead (for the auth service) and whose rest, if any,
    /// is still in `rest`; the read bytes count against the limit.
    pub fn read_ahead(
        ahead: crate::guard::ReadAhead,
        rest: Incoming,
        limit: Option<u64>,
    ) -> Result<ReqBody, TooLarge> {
        let left = limit.unwrap_or(u64::MAX);
        let read = ahead.data.len() as u64;
        if read > left {
            return Err(TooLarge);
        }
        if ahead.complete && ahead.trailers.is_none() {
            // Read whole: replayable like any small buffered body.
            return Ok(ReqBody::buffered(ahead.data));
        }
        Ok(ReqBody {
            inner: Source::Prefixed {
                head: (!ahead.data.is_empty()).then_some(ahead.data),
                trailers: ahead.trailers,
                rest,
            },
            left: left - read,
        })
    }

    /// A copy to send again, when this body was read whole and not yet sent.
    pub fn replay(&self) -> Option<ReqBody> {
        match &self.inner {
            Source::Buffered(b) => Some(ReqBody::buffered(b.clone().unwrap_or_default())),
            Source::Stream(s) if s.is_end_stream() => Some(ReqBody::buffered(Bytes::new())),
            Source::Stream(_) | Source::Prefixed { .. } => None,
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
        let inner = match &mut self.inner {
            Source::Stream(s) => s,
            Source::Buffered(b) => return Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Source::Prefixed {
                head,
                trailers,
                rest,
            } => {
                if let Some(d) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(t) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                rest
            }
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
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
            Some(Err(e)) => Some(Err(Box::new(ClientBody::of(e)))),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Stream(s) => s.is_end_stream(),
            Source::Buffered(b) => b.is_none(),
            Source::Prefixed {
                head,
                trailers,
                rest,
            } => head.is_none() && trailers.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Stream(s) => s.size_hint(),
            Source::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            Source::Prefixed { head, rest, .. } => {
                let n = head.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower().saturating_add(n));
                if let Some(u) = r.upper() {
                    h.set_upper(u.saturating_add(n));
                }
                h
            }
        }
    }
}
