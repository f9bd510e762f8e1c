//! The reconciler over a directory source: apply, reject, retry, verify and roll back, pin,
//! restart from the cache, webhooks, and the directory watch under a burst of writes.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use legate::admin::{self, AdminState, HookSecret};
use legate::reconcile::{
    self, ErrorCounter, Handle, Live, Outcome, PassResult, RejectKind, Settings,
};
use legate::source::dir::DirSource;
use legate::source::Source;

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

/// Poll `cond` until it holds; panics after a generous deadline (a hang, not a timing check).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
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

/// Gateway errors: constant until `broken`, then one more at every look.
struct Counting {
    n: AtomicU64,
    broken: std::sync::atomic::AtomicBool,
}
impl ErrorCounter for Counting {
    fn gateway_errors(&self) -> u64 {
        if self.broken.load(Ordering::SeqCst) {
            self.n.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.n.load(Ordering::SeqCst)
        }
    }
}

#[tokio::test]
async fn verification_failure_rolls_back_to_the_previous_graph() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", &mapping("a", "/a/", "127.0.0.1:9001"));
    let live = Live::new();
    let src = Arc::new(DirSource::new(d.path(), Default::default(), None));
    let mut s = settings(None);
    s.verify.window = Duration::from_millis(200);
    s.verify.probe_interval = Duration::from_millis(20);
    let counter = Arc::new(Counting {
        n: AtomicU64::new(0),
        broken: Default::default(),
    });
    let h = reconcile::start(src, live.clone(), s, Some(counter.clone()));
    h.sync().await;
    assert_eq!(h.history()[0].outcome, Outcome::Applied);
    let first = live.load();
    let first_rev = h.status().applied.unwrap();

    counter.broken.store(true, Ordering::SeqCst);
    write(d.path(), "b.yaml", &mapping("b", "/b/", "127.0.0.1:9002"));
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.outcome, Outcome::RolledBack);
    assert!(
        entry.reason.as_deref().unwrap().contains("gateway error"),
        "{:?}",
        entry.reason
    );
    assert!(Arc::ptr_eq(&live.load(), &first));
    assert_eq!(h.status().applied, Some(first_rev));
    assert_eq!(h.history()[1].outcome, Outcome::Applied);
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
    h.sync().await;
    assert_eq!(h.history()[0].outcome, Outcome::Applied);
    let good = live.load();

    write(d.path(), "b.yaml", &mapping("b", "/b/", &dead.to_string()));
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
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
    };
    assert_eq!(
        st(admin::handle(
            hook_req("/hooks/github", &[("x-hub-signature-256", &good)], body),
            &open
        )
        .await),
        404
    );

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

#[tokio::test(start_paused = true)]
async fn verification_window_passes_when_quiet_and_fails_on_errors() {
    use legate::reconcile::verify::{verify, VerifySettings};
    struct Fixed(AtomicU64);
    impl ErrorCounter for Fixed {
        fn gateway_errors(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    let g = legate::routes::Graph::empty();
    let s = VerifySettings {
        window: Duration::from_secs(10),
        ..VerifySettings::default()
    };
    let c = Arc::new(Fixed(AtomicU64::new(5)));
    let t = tokio::time::Instant::now();
    assert!(verify(&g, &s, Some(c.as_ref())).await.is_ok());
    assert!(t.elapsed() >= Duration::from_secs(10));

    let c2 = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        c2.0.fetch_add(1, Ordering::SeqCst);
    });
    let t = tokio::time::Instant::now();
    let err = verify(&g, &s, Some(c.as_ref())).await.unwrap_err();
    assert!(err.contains("1 gateway error"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Zero disables the window.
    let off = VerifySettings {
        window: Duration::ZERO,
        ..s
    };
    c.0.fetch_add(100, Ordering::SeqCst);
    assert!(verify(&g, &off, Some(c.as_ref())).await.is_ok());
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
