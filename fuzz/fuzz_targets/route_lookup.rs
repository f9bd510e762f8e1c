//! Arbitrary request heads against a fixed graph: lookup must never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use legate::config::{load_and_compile, MemTree, Options};
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
    let s = String::from_utf8_lossy(data);
    let mut parts = s.splitn(4, '\n');
    let host = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let query = parts.next();
    let mut headers = http::HeaderMap::new();
    if let Some(h) = parts.next() {
        if let Ok(v) = http::HeaderValue::from_str(h) {
            headers.insert("x-quote-mode", v.clone());
            headers.insert("user-agent", v);
        }
    }
    let head = RequestHead { host, method: "GET", path, query, headers: &headers };
    let _ = graph().lookup(&head);
});
