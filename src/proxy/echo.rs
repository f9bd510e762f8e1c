//! The demo echo upstream behind `legate run --demo-echo ADDR`: answers every request with a
//! JSON description of what it received (method, path, query, headers), so the quickstart
//! works with nothing else installed and shows what each Mapping changed. Not for production.

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Serve the echo upstream on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    // Count the body without keeping it: the echo reports its size only.
    let mut body_bytes = 0u64;
    let mut body = body;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            body_bytes += d.len() as u64;
        }
    }
    let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (n, v) in &parts.headers {
        headers
            .entry(n.as_str())
            .or_default()
            .push(v.to_str().unwrap_or("<binary>"));
    }
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    text.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("legate-demo-echo"));
    Ok(resp)
}
