//! Header handling shared by both directions: hop-by-hop stripping, forwarding headers, request
//! ids, the configured add/remove lists, and the per-thread RNG used for weights and ids.
//!
//! A leaf every layer may use: imports nothing else of the proxy.

use std::cell::Cell;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// A header to add, parsed once.
#[derive(Debug, Clone)]
pub(crate) struct HeaderOp {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub append: bool,
    /// The value holds `%VARIABLE%`s substituted per request (see [`substitute`]).
    pub template: bool,
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_LEGATE_ROUTE: HeaderName = HeaderName::from_static("x-legate-route");
/// Set on a 503 a circuit breaker answered.
pub static X_LEGATE_OVERLOADED: HeaderName = HeaderName::from_static("x-legate-overloaded");
pub static X_LEGATE_REVISION: HeaderName = HeaderName::from_static("x-legate-revision");

/// Remove hop-by-hop headers: the names `Connection` lists, then the fixed set. `keep_te` keeps
/// `te: trailers` (the only TE value allowed on HTTP/2, which gRPC needs).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    if h.contains_key(header::CONNECTION) {
        // Rare: collect the listed names first, then remove them.
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if n == header::TE && keep_te_trailers {
                continue;
            }
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    if let Some(te) = h.get(header::TE) {
        let trailers = te.as_bytes().eq_ignore_ascii_case(b"trailers");
        if !(keep_te_trailers && trailers) {
            h.remove(header::TE);
        }
    }
    h.remove(header::TRAILER);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
}

/// The protocol a request asks to upgrade to (the first `Upgrade` token, without version) when
/// it also lists `upgrade` in `Connection`.
pub fn requested_upgrade(h: &HeaderMap) -> Option<&str> {
    let up = h.get(header::UPGRADE)?;
    let conn_says = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !conn_says {
        return None;
    }
    Some(up.to_str().ok()?.split(['/', ',']).next()?.trim())
}

/// The request's `Upgrade` value when it asks for a protocol in `allowed` (lowercase) and lists
/// `upgrade` in `Connection`.
pub fn allowed_upgrade(h: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    let proto = requested_upgrade(h)?;
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(proto))
        .then(|| h.get(header::UPGRADE).cloned())
        .flatten()
}

/// What `%VARIABLE%`s in added header values refer to.
#[derive(Debug, Clone, Copy)]
pub struct VarContext {
    pub peer: std::net::SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
}

/// Envoy's header variables that Legate substitutes: `%DOWNSTREAM_REMOTE_ADDRESS%`,
/// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`, `%PROTOCOL%` and `%REQ(name)%` (a request
/// header, empty when absent). Anything else is kept as written (compile warns about it).
pub fn substitute(template: &str, ctx: &VarContext, req: &HeaderMap) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let var = &after[..end];
        use std::fmt::Write;
        match var {
            "DOWNSTREAM_REMOTE_ADDRESS" => {
                let _ = write!(out, "{}", ctx.peer);
            }
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
                let _ = write!(out, "{}", ctx.peer.ip());
            }
            "PROTOCOL" => out.push_str(ctx.protocol),
            v if v.starts_with("REQ(") && v.ends_with(')') => {
                let name = &v[4..v.len() - 1];
                if let Some(val) = req.get(name).and_then(|x| x.to_str().ok()) {
                    out.push_str(val);
                }
            }
            _ => {
                // Not ours: keep it, including both percent signs.
                out.push('%');
                out.push_str(var);
                out.push('%');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Apply `remove` then `add` (`append: false` replaces existing values). `req` is the request's
/// headers as received, for `%REQ(..)%`.
pub fn edit(
    h: &mut HeaderMap,
    remove: &[HeaderName],
    add: &[HeaderOp],
    ctx: &VarContext,
    req: Option<&HeaderMap>,
) {
    for n in remove {
        h.remove(n);
    }
    for op in add {
        let value = if op.template {
            let text = substitute(op.value.to_str().unwrap_or(""), ctx, req.unwrap_or(h));
            HeaderValue::from_str(&text).unwrap_or_else(|_| op.value.clone())
        } else {
            op.value.clone()
        };
        if op.append {
            h.append(op.name.clone(), value);
        } else {
            h.insert(op.name.clone(), value);
        }
    }
}

/// Set `X-Forwarded-For`: the peer address appended to the last `trusted_hops` entries of the
/// client's header (all of it is dropped when no hop is trusted, so a client cannot spoof it).
pub fn set_forwarded_for(h: &mut HeaderMap, peer: IpAddr, trusted_hops: usize) {
    let mut ip_buf = String::with_capacity(48);
    use std::fmt::Write;
    let _ = write!(ip_buf, "{peer}");
    if trusted_hops > 0 {
        let mut entries: Vec<String> = Vec::new();
        for v in h.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                entries.extend(
                    s.split(',')
                        .map(|e| e.trim().to_string())
                        .filter(|e| !e.is_empty()),
                );
            }
        }
        if !entries.is_empty() {
            let start = entries.len().saturating_sub(trusted_hops);
            let mut v = entries[start..].join(", ");
            v.push_str(", ");
            v.push_str(&ip_buf);
            if let Ok(hv) = HeaderValue::from_str(&v) {
                h.insert(X_FORWARDED_FOR.clone(), hv);
                return;
            }
        }
    }
    if let Ok(hv) = HeaderValue::from_str(&ip_buf) {
        h.insert(X_FORWARDED_FOR.clone(), hv);
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// A fast non-cryptographic random number (xorshift64*), per thread.
pub fn rand_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Whether a request is gRPC (`content-type: application/grpc`, `application/grpc+proto`...).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A roll in `0..100` for weighted picks.
///
/// Not independent draws: a Weyl sequence (golden-ratio stride from a random start) shared by all
/// threads. Every run of `n` consecutive rolls covers `0..100` with an error of about `log n / n`,
/// so a 70/30 canary measures 70/30 over any 10,000 requests instead of drifting by a few points
/// as independent draws do; the stride also keeps every subsequence (every other request, say)
/// spread evenly.
pub fn roll() -> u32 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let x = NEXT
        .get_or_init(|| std::sync::atomic::AtomicU64::new(rand_u64()))
        .fetch_add(GOLDEN, std::sync::atomic::Ordering::Relaxed);
    roll_of(x)
}

/// Map a 64-bit fraction of 1 onto `0..100` without modulo bias.
fn roll_of(x: u64) -> u32 {
    (((x >> 32) * 100) >> 32) as u32
}

/// A new request id in UUID v4 text form (random, not cryptographic: ids, not secrets).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let a = rand_u64();
    let b = rand_u64();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[(byte >> 4) as usize];
        out[j + 1] = HEX[(byte & 0xf) as usize];
        j += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rolls_are_uniform_over_every_window() {
        // From several starts, each of the 100 values appears 100 times (±3) in 10,000 rolls,
        // and a 70/30 split stays within 0.1 points; also for every other roll.
        for start in [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX] {
            for step in [1u64, 2] {
                let mut counts = [0u32; 100];
                let mut x = start;
                for _ in 0..10_000 {
                    let r = super::roll_of(x);
                    counts[r as usize] += 1;
                    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(step));
                }
                for (v, c) in counts.iter().enumerate() {
                    assert!((97..=103).contains(c), "value {v} seen {c} times");
                }
                let low: u32 = counts[..70].iter().sum();
                assert!((6990..=7010).contains(&low), "70/30 split gave {low}");
            }
        }
        let r = super::roll();
        assert!(r < 100);
    }

    #[test]
    fn header_variables_are_substituted() {
        let ctx = super::VarContext {
            peer: "10.1.2.3:4567".parse().unwrap(),
            protocol: "HTTP/1.1",
        };
        let mut req = http::HeaderMap::new();
        req.insert("x-user", "ann".parse().unwrap());
        assert_eq!(
            super::substitute(
                "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% via %PROTOCOL% for %REQ(x-user)% %OTHER% 50%",
                &ctx,
                &req
            ),
            "10.1.2.3 via HTTP/1.1 for ann %OTHER% 50%"
        );
        assert_eq!(
            super::substitute("%DOWNSTREAM_REMOTE_ADDRESS%", &ctx, &req),
            "10.1.2.3:4567"
        );
    }

    use super::*;

    #[test]
    fn strips_connection_listed_and_fixed_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut h2 = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        strip_hop_by_hop(&mut h2, true);
        assert_eq!(h2.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn xff_distrusted_and_trusted() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 1.2.3.4"),
        );
        let mut t = h.clone();
        set_forwarded_for(&mut h, peer, 0);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.9");
        set_forwarded_for(&mut t, peer, 1);
        assert_eq!(t.get(&X_FORWARDED_FOR).unwrap(), "1.2.3.4, 10.0.0.9");
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }
}
