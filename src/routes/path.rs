//! Request path normalization, done once per request before anything looks at the path; the
//! proxy, its policies, the hooks prefix, `/api/routes/explain` and route tests all use it, and
//! the normalized path is the one forwarded, so what was matched is what the upstream sees.
//!
//! The rules are Envoy's `normalize_path` (what Emissary turns on), with Legate's choices where
//! Envoy has a knob:
//! - a percent-encoded unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded, exactly once
//!   (`%252e` stays `%252e`); every other escape keeps its bytes with uppercase hex;
//! - dot segments are removed (RFC 3986 §5.2.4), also encoded ones (`%2e%2e`) and those with a
//!   path parameter (`..;x`, `.;x`: the Tomcat/Spring reading); other `;` stay;
//! - an escaped slash (`%2F`, `%5C`) or a raw `\` (read as `%5C`) is refused by default
//!   ([`EscapedSlashes::Reject`]) or kept as an opaque escape, never a separator;
//! - case is kept; `//` is kept unless `merge_slashes`; the query is not touched.
//!
//! A malformed escape (`%` without two hex digits) is refused.

use std::borrow::Cow;

/// What to do with `%2F`, `%5C` and `\` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400 unless the matched Mapping opts in (`allow_escaped_slashes`).
    #[default]
    Reject,
    /// Keep them as escapes (`\` becomes `%5C`), for every route.
    Keep,
}

/// How paths are normalized (graph-wide; the Module's `merge_slashes` and
/// `reject_requests_with_escaped_slashes` set it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NormalizeOptions {
    /// Collapse runs of `/` into one.
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// A normalized path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    pub path: Cow<'a, str>,
    /// The path holds `%2F` or `%5C` (kept as escapes); under [`EscapedSlashes::Reject`] the
    /// request is refused unless its route opts in.
    pub escaped_slash: bool,
}

/// Why a path cannot be normalized (the request is answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("malformed percent-encoding in the path")]
    BadEscape,
}

/// The normalized form of `path` (without the query); borrows when already normal.
pub fn normalize(path: &str, opts: NormalizeOptions) -> Result<Normalized<'_>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(b, opts.merge_slashes) {
        return Ok(Normalized {
            path: Cow::Borrowed(path),
            escaped_slash: false,
        });
    }
    let (decoded, escaped_slash) = decode_unreserved(b)?;
    let segments = remove_dot_segments(&decoded, opts.merge_slashes);
    Ok(Normalized {
        path: Cow::Owned(segments),
        escaped_slash,
    })
}

/// Whether the path needs no work: no `%`, `\`, `;`, no dot segment and (when merging) no `//`.
fn is_plain(p: &[u8], merge: bool) -> bool {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' | b'\\' | b';' => return false,
            b'/' => {
                let rest = &p[i + 1..];
                if merge && rest.first() == Some(&b'/') {
                    return false;
                }
                let seg = rest.split(|&c| c == b'/').next().unwrap_or(&[]);
                if seg == b"." || seg == b".." {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode escapes of unreserved characters once, uppercase the others, turn `\` into `%5C`;
/// also reports whether an escaped slash is left.
fn decode_unreserved(p: &[u8]) -> Result<(String, bool), PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(p.len() + 2);
    let mut escaped_slash = false;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    p.get(i + 1).copied().and_then(hex),
                    p.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = h << 4 | l;
                if is_unreserved(c) {
                    out.push(c as char);
                } else {
                    escaped_slash |= c == b'/' || c == b'\\';
                    out.push('%');
                    out.push(HEX[h as usize] as char);
                    out.push(HEX[l as usize] as char);
                }
                i += 3;
            }
            b'\\' => {
                escaped_slash = true;
                out.push_str("%5C");
                i += 1;
            }
            c => {
                // Non-ASCII bytes cannot reach here through `http::Uri`; keep the text valid
                // UTF-8 for any caller anyway by escaping them.
                if c.is_ascii() {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(HEX[(c >> 4) as usize] as char);
                    out.push(HEX[(c & 0xf) as usize] as char);
                }
                i += 1;
            }
        }
    }
    Ok((out, escaped_slash))
}

/// What a segment means for dot-segment removal: `..;x` and `.;x` count as `..` and `.`.
fn dot_kind(seg: &str) -> u8 {
    let name = seg.split(';').next().unwrap_or(seg);
    match name {
        "." => 1,
        ".." => 2,
        _ => 0,
    }
}

/// RFC 3986 §5.2.4 over `/`-separated segments (empty segments kept unless `merge`).
fn remove_dot_segments(path: &str, merge: bool) -> String {
    // `path` starts with `/`: the first split element is the empty string before it.
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    let last = segs.len().saturating_sub(1);
    let mut trailing = false;
    for (i, seg) in segs.iter().enumerate() {
        match dot_kind(seg) {
            1 => trailing = i == last,
            2 => {
                out.pop();
                trailing = i == last;
            }
            _ if seg.is_empty() && merge && i != last => {}
            _ if seg.is_empty() && merge => trailing = true,
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || out.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str, merge: bool) -> Result<(String, bool), PathError> {
        let opts = NormalizeOptions {
            merge_slashes: merge,
            escaped_slashes: EscapedSlashes::Reject,
        };
        normalize(p, opts).map(|n| (n.path.into_owned(), n.escaped_slash))
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a/b",
            "/a/b/",
            "/a/.hidden",
            "/a/..b",
            "/a//b",
            "/A/B",
        ] {
            let n = normalize(p, NormalizeOptions::default()).unwrap();
            assert!(matches!(n.path, Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn rules() {
        // (input, merge_slashes, output, escaped slash)
        let cases = [
            ("/a/./b", false, "/a/b", false),
            ("/a/../b", false, "/b", false),
            ("/../../x", false, "/x", false),
            ("/a/b/..", false, "/a/", false),
            ("/a/b/.", false, "/a/b/", false),
            ("/..", false, "/", false),
            ("/%73ecure/x", false, "/secure/x", false),
            ("/public/%2e%2e/secure/x", false, "/secure/x", false),
            ("/public/%2E./secure", false, "/secure", false),
            ("/a/%252e%252e/b", false, "/a/%252e%252e/b", false),
            ("/a/%2a%3f", false, "/a/%2A%3F", false),
            ("/a/%7e%41%5a", false, "/a/~AZ", false),
            ("/a/%c3%a9", false, "/a/%C3%A9", false),
            ("/public/..;x/secure", false, "/secure", false),
            ("/public/.;x/secure", false, "/public/secure", false),
            ("/a;b/c;d=1", false, "/a;b/c;d=1", false),
            ("/Public/X", false, "/Public/X", false),
            ("//a//b", false, "//a//b", false),
            ("//a//b", true, "/a/b", false),
            ("/a//", true, "/a/", false),
            ("/a//../b", false, "/a/b", false),
            ("/a%2fb", false, "/a%2Fb", true),
            ("/a%5Cb", false, "/a%5Cb", true),
            ("/a\\..\\b", false, "/a%5C..%5Cb", true),
            ("/a%2F..%2Fb", false, "/a%2F..%2Fb", true),
        ];
        for (i, merge, o, slash) in cases {
            assert_eq!(norm(i, merge), Ok((o.to_string(), slash)), "{i}");
        }
    }

    #[test]
    fn malformed() {
        for p in ["/a%", "/a%2", "/a%zz", "/a%2g/b"] {
            assert_eq!(norm(p, false), Err(PathError::BadEscape), "{p}");
        }
        assert_eq!(norm("*", false), Err(PathError::NotAbsolute));
        assert_eq!(norm("", false), Err(PathError::NotAbsolute));
    }

    #[test]
    fn idempotent() {
        for p in ["/a/%2e%2e/b", "/%252e/x", "/a\\b", "/x/..;y/z", "//a/./b//"] {
            let once = norm(p, false).unwrap().0;
            assert_eq!(norm(&once, false).unwrap().0, once, "{p}");
        }
    }
}
