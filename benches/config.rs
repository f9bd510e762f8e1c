//! Criterion benchmarks of the config pipeline and the route lookup.
//!
//! - `load_validate_compile/10k_mappings_100_hosts`: the whole `check` path on an in-memory
//!   tree (parse, schema, compile, index). Target: under 1 s.
//! - `lookup/10k_routes`: `Graph::lookup` for request heads at 10,000 routes. Target: median
//!   under 2 µs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use legate::config::{load_and_compile, MemTree, Options};
use legate::routes::RequestHead;

/// The same tree as bench/config/gen.py.
fn tree(n: usize, hosts: usize) -> MemTree {
    let mut t = MemTree::new();
    let mut h = String::new();
    for i in 0..hosts {
        h.push_str(&format!("---\napiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: host-{i}\nspec:\n  hostname: h{i}.example.com\n  requestPolicy:\n    insecure:\n      action: Route\n"));
    }
    t = t.with("hosts.yaml", h);
    for start in (0..n).step_by(100) {
        let mut f = String::new();
        for i in start..(start + 100).min(n) {
            let extra = match i % 10 {
                0 => "  headers:\n    x-tier: gold\n",
                1 => "  method: POST\n",
                _ => "",
            };
            f.push_str(&format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: m-{i}\nspec:\n  hostname: h{}.example.com\n  prefix: /svc-{i}/api/\n  service: svc-{i}.apps:8080\n  timeout_ms: 5000\n{extra}", i % hosts));
        }
        t = t.with(&format!("mappings-{:04}.yaml", start / 100), f);
    }
    t
}

fn bench(c: &mut Criterion) {
    let t = tree(10_000, 100);
    let opts = Options::default();
    let mut g = c.benchmark_group("load_validate_compile");
    g.sample_size(10);
    g.bench_function("10k_mappings_100_hosts", |b| {
        b.iter(|| {
            let o = load_and_compile(black_box(&t), &opts);
            assert!(o.is_ok());
            o
        })
    });
    g.finish();

    let graph = load_and_compile(&t, &opts).graph.expect("valid");
    assert_eq!(graph.len(), 10_000);
    let headers = http::HeaderMap::new();
    let mut gold = http::HeaderMap::new();
    gold.insert("x-tier", "gold".parse().unwrap());
    let paths: Vec<(String, String)> = (0..1000)
        .map(|k| {
            let i = (k * 7919) % 10_000;
            (
                format!("h{}.example.com", i % 100),
                format!("/svc-{i}/api/items/42"),
            )
        })
        .collect();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("10k_routes_hit", |b| {
        let mut k = 0;
        b.iter(|| {
            let (host, path) = &paths[k % paths.len()];
            k += 1;
            let head = RequestHead {
                host,
                method: "GET",
                path,
                query: None,
                headers: &headers,
            };
            black_box(graph.lookup(black_box(&head)).is_some())
        })
    });
    g.bench_function("10k_routes_header_match", |b| {
        let head = RequestHead {
            host: "h0.example.com",
            method: "GET",
            path: "/svc-0/api/x",
            query: None,
            headers: &gold,
        };
        b.iter(|| black_box(graph.lookup(black_box(&head)).is_some()))
    });
    g.bench_function("10k_routes_miss", |b| {
        let head = RequestHead {
            host: "h5.example.com",
            method: "GET",
            path: "/nothing/here/at/all",
            query: None,
            headers: &headers,
        };
        b.iter(|| black_box(graph.lookup(black_box(&head)).is_none()))
    });
    g.bench_function("10k_routes_unknown_host", |b| {
        let head = RequestHead {
            host: "unknown.example.org",
            method: "GET",
            path: "/svc-5/api/x",
            query: None,
            headers: &headers,
        };
        b.iter(|| black_box(graph.lookup(black_box(&head))).is_some())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
