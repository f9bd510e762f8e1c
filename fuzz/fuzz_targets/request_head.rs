//! Arbitrary request heads through the proxy's first phase: the authority check, the path
//! normalizer (every option) and the route lookup on what it returns. Must never panic; a
//! normalized path is a valid URI path, normal already (normalizing again changes nothing),
//! and holds no dot segment.
#![no_main]

use std::sync::{Arc, OnceLock};

use legate::config::{load_and_compile, MemTree, Options};
use legate::routes::path::{normalize, EscapedSlashes, NormalizeOptions};
use legate::routes::{Graph, RequestHead};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../tests/fixtures/emissary-compat/18-docs-headers-regex-headers.yaml");

fn graph() -> &'static Arc<Graph> {
    static G: OnceLock<Arc<Graph>> = OnceLock::new();
    G.get_or_init(|| {
        let extra = "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: re\nspec:\n  hostname: '*.example.com'\n  prefix: '/(a|b)+/.*'\n  prefix_regex: true\n  case_sensitive: false\n  service: x\n";
        let tree = MemTree::new().with("a.yaml", CONFIG).with("b.yaml", extra);
        load_and_compile(&tree, &Options::default()).graph.unwrap_or_else(Graph::empty)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let opts = NormalizeOptions {
        merge_slashes: flags & 1 != 0,
        escaped_slashes: if flags & 2 != 0 { EscapedSlashes::Keep } else { EscapedSlashes::Reject },
    };
    let s = String::from_utf8_lossy(rest);
    let mut parts = s.splitn(3, '\n');
    let authority = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let ok_authority = legate::proxy::valid_authority(authority.as_bytes());
    // What hyper would hand the proxy: only targets `http::Uri` accepts.
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let Ok(n) = normalize(uri.path(), opts) else { return };
    let path: &str = &n.path;
    assert!(path.starts_with('/'));
    assert!(path.parse::<http::uri::PathAndQuery>().is_ok(), "{path:?}");
    let again = normalize(path, opts).expect("a normalized path normalizes");
    assert_eq!(again.path, path, "not idempotent for {target:?}");
    for seg in path.split('/') {
        let name = seg.split(';').next().unwrap_or(seg);
        assert!(name != "." && name != "..", "dot segment left in {path:?}");
    }
    let host = if ok_authority { authority.to_ascii_lowercase() } else { String::new() };
    let headers = http::HeaderMap::new();
    let head = RequestHead { host: &host, method: "GET", path, query: uri.query(), headers: &headers };
    if let Some(m) = graph().lookup(&head) {
        for (id, _) in m.group.shares() {
            let _ = graph().route(id).upstream_path(path, uri.query());
        }
    }
});
