//! Request path normalization, done once per request before matching; the normalized path is
//! also the one forwarded, so what was matched is what the upstream sees.
//!
//! Removes dot segments (RFC 3986 5.2.4) and merges duplicate slashes. Percent-encodings are
//! left alone: `%2F` stays an opaque byte sequence, never a separator.

use std::borrow::Cow;

/// The normalized form of `path` (which must start with `/`); borrows when already normal.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if !needs_work(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
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
    Cow::Owned(s)
}

/// Whether the path has `//`, or a `.`/`..` segment.
fn needs_work(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'/' {
            match p.get(i + 1) {
                Some(b'/') => return true,
                Some(b'.') => {
                    let rest = &p[i + 2..];
                    if rest.is_empty()
                        || rest[0] == b'/'
                        || (rest[0] == b'.' && (rest.len() == 1 || rest[1] == b'/'))
                    {
                        return true;
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/a/.hidden", "/a/..b", "/a%2F..%2Fb"] {
            assert!(matches!(normalize(p), std::borrow::Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        let cases = [
            ("//a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../x", "/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a//", "/a/"),
            ("/..", "/"),
            ("/a/%2e%2e/b", "/a/%2e%2e/b"),
            ("/a%2F..//b", "/a%2F../b"),
        ];
        for (i, o) in cases {
            assert_eq!(normalize(i), o, "{i}");
        }
    }
}
