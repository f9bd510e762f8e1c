//! Traffic policy end to end (issue 5): canary splits, shadowing, retries and circuit breakers,
//! through the real gateway on 127.0.0.1:0 with real upstreams that fail, stall or count on
//! command.

use std::sync::atomic::Ordering;

use crate::support::*;

fn canary(a: &Upstream, wa: u32, b: &Upstream, wb: u32) -> String {
    mapping(
        "stable",
        &format!(
            "hostname: '*'\nprefix: /c/\nservice: {}\nweight: {wa}",
            a.service()
        ),
    ) + &mapping(
        "canary",
        &format!(
            "hostname: '*'\nprefix: /c/\nservice: {}\nweight: {wb}",
            b.service()
        ),
    )
}

/// `n` requests to `path`, 8 at a time; the count answered by each of `a` and `b`.
async fn split(gw: &Gateway, path: &str, n: usize) -> (u64, u64) {
    let client = client();
    let url = gw.url(path);
    let mut a = 0;
    let mut b = 0;
    let mut left = n;
    while left > 0 {
        let batch = left.min(8);
        left -= batch;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (c, u) = (client.clone(), url.clone());
            set.spawn(async move {
                let req = http::Request::get(u).body(empty()).unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.headers()["x-upstream"].to_str().unwrap().to_string()
            });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap().as_str() {
                "a" => a += 1,
                "b" => b += 1,
                other => panic!("unexpected upstream {other}"),
            }
        }
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_is_accurate_over_10k_requests() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&canary(&a, 70, &b, 30)).await;
    let (na, nb) = split(&gw, "/c/x", 10_000).await;
    assert_eq!(na + nb, 10_000);
    let share = na as f64 / 100.0;
    assert!(
        (69.0..=71.0).contains(&share),
        "70/30 measured as {share}/{}",
        100.0 - share
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), na);
    assert_eq!(b.hits.load(Ordering::SeqCst), nb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_change_on_the_next_request_after_a_swap() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&canary(&a, 50, &b, 50)).await;
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert!(na > 0 && nb > 0, "both members take traffic at 50/50");

    // All traffic to b: every request after the swap goes there, none to a.
    gw.proxy.swap(compile(&canary(&a, 0, &b, 100)));
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert_eq!((na, nb), (0, 200));

    gw.proxy.swap(compile(&canary(&a, 100, &b, 0)));
    let (na, nb) = split(&gw, "/c/x", 200).await;
    assert_eq!((na, nb), (200, 0));
}
