//! The reconciler over a directory source: apply, reject, retry, verify and roll back, pin,
//! restart from the cache, webhooks, and the directory watch under a burst of writes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use legate::admin::{self, AdminState, HookSecret};
use legate::reconcile::{self, Handle, Live, Outcome, PassResult, RejectKind, Settings};
use legate::source::dir::DirSource;
use legate::source::Source;

use crate::support::eventually;

pub fn mapping(name: &str, prefix: &str, service: &str) -> String {
    format!(
        "apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n"
    )
}

/// A Mapping with a field the schema does not know: a config error.
pub fn bad_mapping(name: &str) -> String {
    format!(
        "apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: \"*\"\n  prefix: /bad/\n  service: 127.0.0.1:9\n  no_such_field: 1\n"
    )
}

/// Settings for tests: no polling (passes run on `sync()`), no verification window.
pub fn settings(cache: Option<&Path>) -> Settings {
    let mut s = Settings {
        poll: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(20),
        cache_dir: cache.map(Path::to_path_buf),
        ..Settings::default()
    };
    s.verify.window = Duration::ZERO;
    s
}

pub fn outcome(r: &PassResult) -> Option<Outcome> {
    match r {
        PassResult::Recorded { entry } => Some(entry.outcome),
        _ => None,
    }
}

fn start_dir(dir: &Path, cache: Option<&Path>, s: Settings) -> (Handle, Arc<Live>) {
    let live = Live::new();
    let src = Arc::new(DirSource::new(
        dir,
        s.config.tree.clone(),
        cache.map(Path::to_path_buf),
    ));
    let h = reconcile::start(src, live.clone(), s, None);
    (h, live)
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test]
async fn good_revision_goes_live_bad_is_rejected_fix_goes_live() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, settings(None));
    let r = h.sync().await;
    assert!(
        matches!(
            r,
            PassResult::Recorded { .. } | PassResult::Unchanged { .. }
        ),
        "{r:?}"
    );
    assert_eq!(live.load().len(), 1);
    let good = h.status().applied.clone().unwrap();

    write(d.path(), "b.yaml", &bad_mapping("b"));
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Rejected), "{r:?}");
    let PassResult::Recorded { entry } = r else {
        unreachable!()
    };
    assert_eq!(entry.reject, Some(RejectKind::Config));
    assert!(
        entry.diagnostics.iter().any(|d| d.file == "b.yaml"),
        "{:?}",
        entry.diagnostics
    );
    // The old graph keeps serving.
    assert_eq!(live.load().len(), 1);
    assert_eq!(h.status().applied.as_deref(), Some(good.as_str()));

    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().len(), 2);
    let hist = h.history();
    let outcomes: Vec<_> = hist.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Applied, Outcome::Rejected, Outcome::Superseded]
    );
}

#[tokio::test]
async fn missing_secret_is_retried_and_applies_once_present() {
    let d = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "host.yaml",
        "apiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: www\nspec:\n  hostname: www.example.test\n  tlsSecret:\n    name: www-example-tls\n",
    );
    let mut s = settings(None);
    s.secrets_dir = Some(secrets.path().to_path_buf());
    let (h, live) = start_dir(d.path(), None, s);
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.outcome, Outcome::Rejected);
    assert_eq!(entry.reject, Some(RejectKind::External));
    assert!(entry.diagnostics.iter().any(|d| d.code == "tls-secret"));
    assert!(live.load().hosts.is_empty());

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/secrets/www-example-tls");
    let dst = secrets.path().join("www-example-tls");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["tls.crt", "tls.key"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().hosts.len(), 1);
    // The retried rejection was kept as one entry, not one per attempt.
    assert_eq!(h.history().len(), 2);
}

/// The newest history entry once it is no longer verifying.
pub async fn verdict_of(h: &Handle, rev: &str) -> reconcile::Entry {
    let mut last = None;
    eventually(&format!("a verdict for {rev}"), || {
        last = h
            .history()
            .into_iter()
            .find(|e| e.revision == rev)
            .filter(|e| e.outcome != Outcome::Verifying);
        last.is_some()
    })
    .await;
    last.unwrap()
}

fn route_index(live: &Live, name: &str) -> usize {
    live.load()
        .routes
        .iter()
        .position(|r| r.name == name)
        .unwrap()
}

pub fn swapped(r: &PassResult) -> reconcile::Entry {
    match r {
        PassResult::Recorded { entry } => (**entry).clone(),
        other => panic!("{other:?}"),
    }
}

/// The entry of the first revision (the loop's own first pass swaps it in).
pub async fn first(h: &Handle) -> reconcile::Entry {
    h.sync().await;
    h.history().last().cloned().expect("a first entry")
}

fn window_settings(window_ms: u64) -> Settings {
    let mut s = settings(None);
    s.verify.window = Duration::from_millis(window_ms);
    s.verify.probe_interval = Duration::from_millis(20);
    s.verify.min_requests = 5;
    s
}

#[tokio::test]
async fn verification_failure_rolls_back_to_the_last_verified_graph() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, window_settings(300));
    let first = first(&h).await;
    assert_eq!(first.outcome, Outcome::Verifying);
    // No traffic: verified, unobserved, and a rollback target.
    let v = verdict_of(&h, &first.revision).await;
    assert_eq!(v.outcome, Outcome::Applied, "{v:?}");
    assert_eq!(
        v.verdict.as_ref().unwrap().judgement,
        reconcile::Judgement::VerifiedUnobserved
    );
    let good = live.load();

    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let e = swapped(&h.sync().await);
    // The answer comes at swap time: the new revision serves and its window runs.
    assert_eq!(e.outcome, Outcome::Verifying);
    assert_eq!(h.status().applied.as_deref(), Some(e.revision.as_str()));
    assert_eq!(h.status().state, Some(reconcile::LiveState::Verifying));
    let (rev, ev) = live.served();
    assert_eq!(rev, e.revision);
    // The unchanged route failing does not count; the new one failing does.
    for _ in 0..20 {
        ev.record(
            route_index(&live, "a"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    for _ in 0..10 {
        ev.record(
            route_index(&live, "b"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    let v = verdict_of(&h, &e.revision).await;
    assert_eq!(v.outcome, Outcome::RolledBack, "{v:?}");
    let reason = v.reason.unwrap();
    assert!(reason.contains("Mapping default/b"), "{reason}");
    assert!(!reason.contains("default/a"), "{reason}");
    assert!(reason.contains("10 of 10"), "{reason}");
    assert!(Arc::ptr_eq(&live.load(), &good));
    assert_eq!(h.status().applied, Some(first.revision.clone()));
    assert_eq!(
        h.status().state,
        Some(reconcile::LiveState::VerifiedUnobserved)
    );
    let retry = h.status().retry.expect("a retry is scheduled");
    assert_eq!(retry.revision, e.revision);
    assert_eq!(retry.upstreams, vec!["127.0.0.1:9002".to_string()]);
    // A new head cancels the retry.
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9003"));
    let next = swapped(&h.sync().await);
    assert_eq!(next.outcome, Outcome::Verifying);
    assert!(h.status().retry.is_none());
}

#[tokio::test]
async fn a_pinned_revision_that_fails_is_degraded_and_never_swapped_back() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, window_settings(300));
    let a = first(&h).await;
    assert_eq!(verdict_of(&h, &a.revision).await.outcome, Outcome::Applied);
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let b = swapped(&h.sync().await);
    assert_eq!(verdict_of(&h, &b.revision).await.outcome, Outcome::Applied);
    // Pinning a removes only b's route, which nothing else may catch: verified at once.
    let p = swapped(&h.pin(&a.revision).await);
    assert_eq!(p.outcome, Outcome::Applied, "{p:?}");
    assert_eq!(live.load().len(), 1);
    // Pinning b again: its route is new against a, the last verified revision, and fails.
    let p = swapped(&h.pin(&b.revision).await);
    assert_eq!(p.outcome, Outcome::Verifying);
    let dd = b.clone();
    let (_, ev) = live.served();
    for _ in 0..10 {
        ev.record(
            route_index(&live, "b"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    let v = verdict_of(&h, &dd.revision).await;
    assert_eq!(v.outcome, Outcome::Degraded, "{v:?}");
    assert!(v.reason.unwrap().starts_with("pinned"));
    // Still the pinned revision, still pinned.
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(dd.revision.as_str()));
    assert_eq!(st.pinned.as_deref(), Some(dd.revision.as_str()));
    assert_eq!(st.state, Some(reconcile::LiveState::Degraded));
    assert_eq!(live.load().len(), 2);
}

#[tokio::test]
async fn a_restart_serves_a_verified_revision_without_a_window_and_rewatches_an_unverified_one() {
    let d = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let mut s = window_settings(300);
    s.cache_dir = Some(cache.path().to_path_buf());
    let (h, _live) = start_dir(d.path(), Some(cache.path()), s.clone());
    let a = first(&h).await;
    let v = verdict_of(&h, &a.revision).await;
    assert_eq!(v.outcome, Outcome::Applied);
    drop(h);
    // Restart with the directory broken: the verified revision serves at once, as verified.
    write(d.path(), "z.yaml", &bad_mapping("z"));
    let mut long = s.clone();
    long.verify.window = Duration::from_secs(3600);
    let (h, live) = start_dir(d.path(), Some(cache.path()), long.clone());
    eventually("the cached revision serves", || {
        h.status().applied.is_some()
    })
    .await;
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(a.revision.as_str()));
    assert_eq!(st.state, Some(reconcile::LiveState::FromCache));
    assert!(st.verifying.is_none());
    assert_eq!(live.load().len(), 1);
    assert_eq!(
        st.live.unwrap().verdict.unwrap().judgement,
        reconcile::Judgement::VerifiedUnobserved
    );
    // A new revision is swapped in and its window (an hour) runs; restart in the middle.
    std::fs::remove_file(d.path().join("z.yaml")).unwrap();
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let b = swapped(&h.sync().await);
    assert_eq!(b.outcome, Outcome::Verifying);
    drop(h);
    let (h, live) = start_dir(d.path(), Some(cache.path()), long);
    eventually("b serves again", || {
        h.status().verifying.as_deref() == Some(b.revision.as_str())
    })
    .await;
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(b.revision.as_str()));
    // Judged against the verified revision a, restored beside it.
    assert_eq!(st.verified.as_deref(), Some(a.revision.as_str()));
    assert_eq!(live.load().len(), 2);
    let (_, ev) = live.served();
    for _ in 0..10 {
        ev.record(
            route_index(&live, "b"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    let v = verdict_of(&h, &b.revision).await;
    assert_eq!(v.outcome, Outcome::RolledBack, "{v:?}");
    assert_eq!(live.load().len(), 1);
    let retry = h.status().retry.expect("a retry");
    drop(h);
    // The retry survives a restart (the head is still b: it stays scheduled).
    let (h, _live) = start_dir(d.path(), Some(cache.path()), s);
    eventually("the retry restored", || h.status().retry.is_some()).await;
    let again = h.status().retry.unwrap();
    assert_eq!(again.revision, b.revision);
    assert_eq!(again.next_at, retry.next_at);
    assert_eq!(h.status().applied.as_deref(), Some(a.revision.as_str()));
}

#[tokio::test]
async fn a_failing_first_revision_keeps_serving_as_degraded() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, window_settings(5000));
    let e = first(&h).await;
    assert_eq!(e.outcome, Outcome::Verifying);
    let (_, ev) = live.served();
    for _ in 0..10 {
        ev.record(0, reconcile::Observed::UpstreamFailure);
    }
    let v = verdict_of(&h, &e.revision).await;
    assert_eq!(v.outcome, Outcome::Degraded, "{v:?}");
    assert!(v.reason.unwrap().contains("no verified revision"));
    // Still served: never rolled back to nothing.
    assert_eq!(live.load().len(), 1);
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(e.revision.as_str()));
    assert_eq!(st.state, Some(reconcile::LiveState::Degraded));
    assert_eq!(st.retry.unwrap().kind, "reverify");
}

#[tokio::test]
async fn newer_revisions_interrupt_the_window_and_are_judged_against_the_verified_one() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, window_settings(1500));
    let a = first(&h).await;
    assert_eq!(verdict_of(&h, &a.revision).await.outcome, Outcome::Applied);

    // b adds a route; c, right behind it, adds another. Neither pass waits for a window.
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let b = swapped(&h.sync().await);
    assert_eq!(b.outcome, Outcome::Verifying);
    let (_, ev_b) = live.served();
    for _ in 0..3 {
        ev_b.record(
            route_index(&live, "b"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    // An invalid revision is rejected at once while b's window runs on.
    write(d.path(), "z.yaml", &bad_mapping("z"));
    let z = swapped(&h.sync().await);
    assert_eq!(z.outcome, Outcome::Rejected);
    assert_eq!(h.status().verifying.as_deref(), Some(b.revision.as_str()));
    std::fs::remove_file(d.path().join("z.yaml")).unwrap();

    write(d.path(), "c.yaml", &mapping("c", "/c/", "127.0.0.1:9003"));
    let c = swapped(&h.sync().await);
    assert_eq!(c.outcome, Outcome::Verifying);
    let hist = h.history();
    let old_b = hist.iter().find(|e| e.revision == b.revision).unwrap();
    assert_eq!(old_b.outcome, Outcome::Interrupted);
    // c is judged against a, so b's route is judged too, with the evidence b's window saw.
    let (_, ev_c) = live.served();
    for _ in 0..2 {
        ev_c.record(
            route_index(&live, "b"),
            reconcile::Observed::UpstreamFailure,
        );
    }
    let v = verdict_of(&h, &c.revision).await;
    assert_eq!(v.outcome, Outcome::RolledBack, "{v:?}");
    assert!(v.reason.as_deref().unwrap().contains("5 of 5"), "{v:?}");
    assert_eq!(h.status().applied, Some(a.revision.clone()));
    assert_eq!(live.load().len(), 1);
}

#[tokio::test]
async fn health_probe_to_a_down_upstream_rolls_back() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    // An upstream that answers 200 for the first revision.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = up.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    write(
        d.path(),
        "a.yaml",
        &mapping("a", "/a/", &up_addr.to_string()),
    );
    let mut s = settings(None);
    s.verify.window = Duration::from_millis(500);
    s.verify.probe_interval = Duration::from_millis(20);
    s.verify.probe_failures = 2;
    s.verify.probe_path = Some("/healthz".into());
    let (h, live) = start_dir(d.path(), None, s);
    let a = first(&h).await;
    assert_eq!(verdict_of(&h, &a.revision).await.outcome, Outcome::Applied);
    let good = live.load();

    write(d.path(), "b.yaml", &mapping("b", "/b/", &dead.to_string()));
    let b = swapped(&h.sync().await);
    let entry = verdict_of(&h, &b.revision).await;
    assert_eq!(entry.outcome, Outcome::RolledBack, "{entry:?}");
    assert!(entry.reason.as_deref().unwrap().contains("health probe"));
    assert!(Arc::ptr_eq(&live.load(), &good));
}

#[tokio::test]
async fn pin_and_unpin() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, settings(None));
    h.sync().await;
    let rev_a = h.status().applied.unwrap();
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    assert_eq!(outcome(&h.sync().await), Some(Outcome::Applied));
    let rev_b = h.status().applied.unwrap();
    assert_ne!(rev_a, rev_b);
    assert_eq!(live.load().len(), 2);

    let r = h.pin(&rev_a).await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().len(), 1);
    assert_eq!(h.status().pinned.as_deref(), Some(rev_a.as_str()));
    // While pinned, new content is not followed.
    write(d.path(), "c.yaml", &mapping("c", "/c/", "127.0.0.1:9003"));
    h.sync().await;
    assert_eq!(live.load().len(), 1);
    assert!(h.history()[0].pinned);

    let r = h.unpin().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().len(), 3);
    assert_eq!(h.status().pinned, None);
    // An unknown revision cannot be pinned.
    let r = h.pin("0123456789abcdef").await;
    assert!(matches!(r, PassResult::SourceFailed { .. }), "{r:?}");
    assert_eq!(h.status().pinned, None);
}

#[tokio::test]
async fn restart_serves_the_cached_revision_when_the_directory_is_broken() {
    let d = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, _live) = start_dir(d.path(), Some(cache.path()), settings(Some(cache.path())));
    h.sync().await;
    assert_eq!(h.history()[0].outcome, Outcome::Applied);
    let good = h.status().applied.unwrap();
    drop(h);

    // The directory is now broken, and the gateway restarts.
    write(d.path(), "a.yaml", &bad_mapping("a"));
    let (h, live) = start_dir(d.path(), Some(cache.path()), settings(Some(cache.path())));
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Rejected), "{r:?}");
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(good.as_str()));
    assert!(st.serving_cached);
    assert_eq!(live.load().len(), 1);
    let hist = h.history();
    assert!(hist
        .iter()
        .any(|e| e.from_cache && e.outcome == Outcome::Applied));
}

#[tokio::test]
async fn directory_watch_ends_on_the_final_content_after_100_writes() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let live = Live::new();
    let running = reconcile::launch(
        reconcile::SourceSpec::Dir(d.path().to_path_buf()),
        live.clone(),
        settings(None),
        None,
    )
    .await
    .unwrap();
    let h = running.handle.clone();
    h.sync().await;
    for i in 0..100 {
        write(
            d.path(),
            "a.yaml",
            &mapping("a", &format!("/a{i}/"), "127.0.0.1:9001"),
        );
        if i % 10 == 0 {
            // Editors save through a rename: replace the file now and then.
            let tmp = d.path().join(".a.yaml.swp");
            std::fs::write(&tmp, mapping("a", &format!("/a{i}/"), "127.0.0.1:9001")).unwrap();
            std::fs::rename(&tmp, d.path().join("a.yaml")).unwrap();
        }
    }
    write(
        d.path(),
        "a.yaml",
        &mapping("a", "/final/", "127.0.0.1:9001"),
    );
    let want = DirSource::new(d.path(), Default::default(), None)
        .current(None)
        .unwrap()
        .id;
    eventually("the final content to be applied", || {
        h.status().applied.as_deref() == Some(want.as_str())
    })
    .await;
    let g = live.load();
    assert_eq!(g.routes[0].matcher.path.as_str(), "/final/");
}

fn hook_req(
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder().method("POST").uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(body))).unwrap()
}

#[tokio::test]
async fn webhooks_check_signatures_and_trigger_a_pass() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let (h, live) = start_dir(d.path(), None, settings(None));
    h.sync().await;
    let state = AdminState {
        reconciler: h.clone(),
        hook_secret: Some(Arc::new(HookSecret::new("s3cret").unwrap())),
        token: None,
        graph: None,
        metrics: None,
        recent: None,
    };
    let body: &'static [u8] = br#"{"ref":"refs/heads/main"}"#;
    let good = admin::hooks::sign(b"s3cret", body);
    let bad = admin::hooks::sign(b"other", body);

    let st = |r: http::Response<Full<Bytes>>| r.status().as_u16();
    assert_eq!(
        st(admin::handle(hook_req("/hooks/github", &[], body), &state).await),
        401
    );
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/github", &[("x-hub-signature-256", &bad)], body),
            &state
        )
        .await),
        401
    );
    assert_eq!(
        st(admin::handle(
            hook_req(
                "/hooks/github",
                &[("x-hub-signature-256", "sha256=zz")],
                body
            ),
            &state
        )
        .await),
        401
    );
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/gitlab", &[("x-gitlab-token", "wrong")], body),
            &state
        )
        .await),
        401
    );
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/gitlab", &[("x-gitlab-token", "s3cret")], body),
            &state
        )
        .await),
        202
    );
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/generic", &[("x-legate-signature", &good)], body),
            &state
        )
        .await),
        202
    );
    let big: &'static [u8] = Box::leak(vec![b'x'; (1 << 20) + 1].into_boxed_slice());
    let sig = admin::hooks::sign(b"s3cret", big);
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/github", &[("x-hub-signature-256", &sig)], big),
            &state
        )
        .await),
        413
    );
    // No secret configured: the hooks do not exist.
    let open = AdminState {
        reconciler: h.clone(),
        hook_secret: None,
        token: None,
        graph: None,
        metrics: None,
        recent: None,
    };
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/github", &[("x-hub-signature-256", &good)], body),
            &open
        )
        .await),
        404
    );
    // Without a token, a browser's change is taken only from a loopback name: a page whose
    // name was rebound to 127.0.0.1 is same-origin, but not loopback by name.
    let sync_from = |host: &str| {
        http::Request::post("/api/sync")
            .header("host", host)
            .header("origin", format!("http://{host}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for (host, code) in [
        ("evil.test:8877", 403),
        ("127.evil.test:8877", 403),
        ("127.0.0.1:8877", 200),
        ("localhost:8877", 200),
        ("[::1]:8877", 200),
    ] {
        assert_eq!(
            st(admin::handle(sync_from(host), &open).await),
            code,
            "{host}"
        );
    }

    // A good signature makes the new content go live without a poll.
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/github", &[("x-hub-signature-256", &good)], body),
            &state
        )
        .await),
        202
    );
    eventually("the hook to apply b.yaml", || live.load().len() == 2).await;

    // Status and history over the same handler.
    let r = admin::handle(
        http::Request::get("/api/status")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        &state,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = admin::handle(
        http::Request::get("/api/revisions")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        &state,
    )
    .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn directory_watch_follows_a_root_replaced_by_rename() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cfg");
    std::fs::create_dir(&root).unwrap();
    write(&root, "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let live = Live::new();
    let running = reconcile::launch(
        reconcile::SourceSpec::Dir(root.clone()),
        live.clone(),
        settings(None),
        None,
    )
    .await
    .unwrap();
    let h = running.handle.clone();
    h.sync().await;
    assert_eq!(live.load().len(), 1);

    // `git checkout`-style swap of the whole directory.
    let next = tmp.path().join("cfg.new");
    std::fs::create_dir(&next).unwrap();
    write(&next, "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    write(&next, "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    std::fs::rename(&root, tmp.path().join("cfg.old")).unwrap();
    std::fs::rename(&next, &root).unwrap();
    eventually("the replaced directory to be applied", || {
        live.load().len() == 2
    })
    .await;

    // The watch was re-armed on the new directory: a later edit inside it is seen too.
    write(&root, "c.yaml", &mapping("c", "/c/", "127.0.0.1:9003"));
    eventually("an edit in the new directory to be applied", || {
        live.load().len() == 3
    })
    .await;
}
