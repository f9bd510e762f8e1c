//! TLSContext and Host `tls` settings through the running gateway: client certificates (mTLS)
//! accepted and refused with curl, TLS versions, ALPN, and origination with a client
//! certificate to an upstream that requires one.

use std::path::{Path, PathBuf};

use legate::proxy::Settings;

use crate::support::{compile_with, curl, host, make_secret, mapping, Gateway, Upstream};

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `<dir>/<secret>/ca.crt` (+ `ca.key`), as a `ca_secret`.
fn make_ca(dir: &Path, secret: &str) -> PathBuf {
    let d = dir.join(secret);
    std::fs::create_dir_all(&d).unwrap();
    let (crt, key) = (d.join("ca.crt"), d.join("ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={secret}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    crt
}

/// A client certificate signed by the CA in `ca_dir`, written as `<dir>/<name>/tls.{crt,key}`.
fn make_client(dir: &Path, name: &str, ca_dir: &Path) -> (PathBuf, PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let (crt, key, csr) = (d.join("tls.crt"), d.join("tls.key"), d.join("req.csr"));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={name}/O=Legate Tests"),
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
    ]);
    let ext = d.join("ext.cnf");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=DNS:localhost,DNS:client.test\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        ca_dir.join("ca.crt").to_str().unwrap(),
        "-CAkey",
        ca_dir.join("ca.key").to_str().unwrap(),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    (crt, key)
}

fn tlscontext(name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

async fn start(yaml: &str, secrets: &Path) -> Gateway {
    let strip = legate::routes::RoutingOptions {
        strip_matching_host_port: true,
        ..Default::default()
    };
    let settings = Settings {
        secrets_dir: Some(secrets.to_path_buf()),
        ..Settings::default()
    };
    Gateway::with_graph(compile_with(yaml, strip), settings).await
}

/// curl to `https://<name>:<port>/s/x` trusting `ca`, with extra arguments.
fn args(name: &str, port: u16, ca: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-i".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("{name}:{port}:127.0.0.1"),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(format!("https://{name}:{port}/s/x"));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_by_a_tlscontext_are_verified() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    let server_ca = make_secret(s, "secure-tls", &["secure.test"]);
    let open_ca = make_secret(s, "open-tls", &["open.test"]);
    make_ca(s, "client-ca");
    let (good_crt, good_key) = make_client(s, "alice", &s.join("client-ca"));
    make_ca(s, "other-ca");
    let (bad_crt, bad_key) = make_client(s, "mallory", &s.join("other-ca"));
    let yaml = [
        tlscontext(
            "secure-ctx",
            "hosts: [secure.test]\nsecret: secure-tls\nca_secret: client-ca\ncert_required: true",
        ),
        host(
            "secure",
            "secure.test",
            "tlsSecret:\n  name: secure-tls\nrequestPolicy:\n  insecure:\n    action: Route",
        ),
        host(
            "open",
            "open.test",
            "tlsSecret:\n  name: open-tls\nrequestPolicy:\n  insecure:\n    action: Route",
        ),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let gw = start(&yaml, s).await;
    let port = gw.https.port();
    let cert = |c: &Path, k: &Path| {
        vec![
            "--cert".to_string(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]
    };
    let with = |name: &str, ca: &Path, extra: &[String]| {
        let e: Vec<&str> = extra.iter().map(String::as_str).collect();
        args(name, port, ca, &e)
    };

    // Signed by the client CA: accepted and routed.
    let (ok, out, err) = curl(&with(
        "secure.test",
        &server_ca,
        &cert(&good_crt, &good_key),
    ))
    .await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("HTTP/2 200") || out.contains(" 200"),
        "{out}"
    );

    // No certificate: the handshake is refused.
    let (ok, out, _) = curl(&with("secure.test", &server_ca, &[])).await;
    assert!(!ok, "served without a client certificate: {out}");

    // A certificate from another CA: refused.
    let (ok, out, _) = curl(&with("secure.test", &server_ca, &cert(&bad_crt, &bad_key))).await;
    assert!(!ok, "served with an untrusted client certificate: {out}");

    // The client CA Secret is rotated to the other CA: picked up without a revision.
    std::fs::copy(s.join("other-ca/ca.crt"), s.join("client-ca/ca.crt")).unwrap();
    assert!(gw.proxy.refresh_certs(), "a changed ca.crt is noticed");
    let (ok, out, err) = curl(&with("secure.test", &server_ca, &cert(&bad_crt, &bad_key))).await;
    assert!(ok && out.contains(" 200"), "{err}{out}");
    let (ok, out, _) = curl(&with(
        "secure.test",
        &server_ca,
        &cert(&good_crt, &good_key),
    ))
    .await;
    assert!(!ok, "the old CA still trusted: {out}");

    // Not reachable around its handshake: its cleartext `Route` action does not serve it
    // without a certificate check (the HTTP listener checks none).
    let r = crate::support::get(&gw.url("/s/x"), &[("host", "secure.test")]).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = crate::support::get(&gw.url("/s/x"), &[("host", "open.test")]).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The other Host on the same listener asks for no certificate, and a client's own
    // x-forwarded-client-cert is not passed on.
    let forged = [
        "-H".to_string(),
        "x-forwarded-client-cert: Subject=\"CN=admin\"".into(),
    ];
    let (ok, out, err) = curl(&with("open.test", &open_ca, &forged)).await;
    assert!(ok, "{err}");
    assert!(out.contains(" 200"), "{out}");
    assert!(!out.contains("x-forwarded-client-cert"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_tls_block_sets_versions_and_alpn() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    let ca13 = make_secret(s, "new-tls", &["new.test"]);
    let ca_any = make_secret(s, "any-tls", &["any.test"]);
    let yaml = [
        host(
            "new",
            "new.test",
            "tlsSecret:\n  name: new-tls\ntls:\n  min_tls_version: v1.3\n  alpn_protocols: http/1.1",
        ),
        host("any", "any.test", "tlsSecret:\n  name: any-tls"),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let gw = start(&yaml, s).await;
    let port = gw.https.port();

    // Every TLS Host's certificate expiry is exported (the test certificates last 2 days).
    let text = gw.proxy.metrics().render(None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for h in ["new.test", "any.test"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "legate_tls_certificate_expiry_timestamp_seconds{{host=\"{h}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no expiry for {h}:\n{text}"));
        let at: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((now + 86_400..=now + 3 * 86_400).contains(&at), "{line}");
    }

    // TLS 1.2 is refused by the Host that wants 1.3, accepted by the other one.
    let (ok, out, _) = curl(&args("new.test", port, &ca13, &["--tls-max", "1.2"])).await;
    assert!(!ok, "TLS 1.2 accepted: {out}");
    let (ok, out, err) = curl(&args("any.test", port, &ca_any, &["--tls-max", "1.2"])).await;
    assert!(ok && out.contains(" 200"), "{err}{out}");

    // ALPN `http/1.1` only: curl asking for h2 gets HTTP/1.1; the other Host speaks h2.
    let (ok, out, err) = curl(&args("new.test", port, &ca13, &["--http2"])).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (ok, out, err) = curl(&args("any.test", port, &ca_any, &["--http2"])).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_tls_context_originates_with_a_client_certificate() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    // The upstream is a second gateway whose Host requires client certificates from `client-ca`.
    make_secret(s, "inner-tls", &["inner.test"]);
    std::fs::create_dir_all(s.join("inner-ca")).unwrap();
    std::fs::copy(s.join("inner-tls/tls.crt"), s.join("inner-ca/ca.crt")).unwrap();
    make_ca(s, "client-ca");
    make_client(s, "alice", &s.join("client-ca"));
    let inner_yaml = [
        host(
            "inner",
            "inner.test",
            "tlsSecret:\n  name: inner-tls\ntls:\n  ca_secret: client-ca\n  cert_required: true",
        ),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let inner = start(&inner_yaml, s).await;
    let inner_port = inner.https.port();
    let outer_yaml = [
        tlscontext(
            "with-cert",
            "secret: alice\nca_secret: inner-ca\nsni: inner.test",
        ),
        tlscontext("without-cert", "ca_secret: inner-ca\nsni: inner.test"),
        host("outer", "'*'", "requestPolicy:\n  insecure:\n    action: Route"),
        mapping(
            "good",
            &format!("prefix: /good/\nrewrite: /s/\nhost_rewrite: inner.test\nservice: https://127.0.0.1:{inner_port}\ntls: with-cert"),
        ),
        mapping(
            "bare",
            &format!("prefix: /bare/\nrewrite: /s/\nhost_rewrite: inner.test\nservice: https://127.0.0.1:{inner_port}\ntls: without-cert"),
        ),
    ]
    .concat();
    let outer = start(&outer_yaml, s).await;

    // The client certificate from the TLSContext's `secret` gets through; the upstream is
    // verified against `ca_secret` under the TLSContext's `sni`.
    let r = crate::support::get(&outer.url("/good/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["upstream"], "a", "{}", r.body);

    // Without a client certificate the upstream refuses the handshake.
    let r = crate::support::get(&outer.url("/bare/x"), &[]).await;
    assert!(
        matches!(r.status.as_u16(), 502 | 503),
        "{:?} {}",
        r.status,
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origination_client_certificate_is_reloaded_when_its_files_change() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    make_secret(s, "inner-tls", &["inner.test"]);
    std::fs::create_dir_all(s.join("inner-ca")).unwrap();
    std::fs::copy(s.join("inner-tls/tls.crt"), s.join("inner-ca/ca.crt")).unwrap();
    make_ca(s, "client-ca");
    make_ca(s, "stranger-ca");
    // At first the client certificate is signed by a CA the upstream does not trust.
    make_client(s, "alice", &s.join("stranger-ca"));
    let inner_yaml = [
        host(
            "inner",
            "inner.test",
            "tlsSecret:\n  name: inner-tls\ntls:\n  ca_secret: client-ca\n  cert_required: true",
        ),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let inner = start(&inner_yaml, s).await;
    let outer_yaml = [
        tlscontext("ctx", "secret: alice\nca_secret: inner-ca\nsni: inner.test"),
        host("outer", "'*'", "requestPolicy:\n  insecure:\n    action: Route"),
        mapping(
            "good",
            &format!(
                "prefix: /good/\nrewrite: /s/\nhost_rewrite: inner.test\nservice: https://127.0.0.1:{}\ntls: ctx",
                inner.https.port()
            ),
        ),
    ]
    .concat();
    let outer = start(&outer_yaml, s).await;
    let r = crate::support::get(&outer.url("/good/x"), &[]).await;
    assert!(
        matches!(r.status.as_u16(), 502 | 503),
        "{:?} {}",
        r.status,
        r.body
    );

    // The secret is rotated to a certificate of the trusted CA: the next handshake uses it,
    // with no new revision.
    make_client(s, "alice", &s.join("client-ca"));
    let mut last = r.status;
    for _ in 0..200 {
        let r = crate::support::get(&outer.url("/good/x"), &[]).await;
        last = r.status;
        if last == 200 {
            assert_eq!(r.json()["upstream"], "a", "{}", r.body);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the rotated client certificate was not used: last status {last}");
}

/// Revoke `client` (a directory made by `make_client`) and write the CA's CRL as
/// `<dir>/<secret>/crl.pem`.
fn revoke(dir: &Path, secret: &str, ca_dir: &Path, client: &Path) {
    let db = ca_dir.join("index.txt");
    std::fs::write(&db, "").unwrap();
    std::fs::write(ca_dir.join("crlnumber"), "01\n").unwrap();
    let cnf = ca_dir.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            // A v2 CRL with a number and the issuer's key id: webpki refuses v1 CRLs.
            "[ca]\ndefault_ca=d\n[d]\ndatabase={}\ncrlnumber={}\ndefault_md=sha256\ndefault_crl_days=2\ncrl_extensions=ext\n[ext]\nauthorityKeyIdentifier=keyid:always\n",
            db.display(),
            ca_dir.join("crlnumber").display()
        ),
    )
    .unwrap();
    let (key, crt) = (ca_dir.join("ca.key"), ca_dir.join("ca.crt"));
    let common = [
        "-config",
        cnf.to_str().unwrap(),
        "-keyfile",
        key.to_str().unwrap(),
        "-cert",
        crt.to_str().unwrap(),
    ];
    let mut a = vec!["ca"];
    a.extend(common);
    let revoked = client.join("tls.crt");
    a.extend(["-revoke", revoked.to_str().unwrap()]);
    openssl(&a);
    let out = dir.join(secret);
    std::fs::create_dir_all(&out).unwrap();
    let crl = out.join("crl.pem");
    let mut a = vec!["ca"];
    a.extend(common);
    a.extend(["-gencrl", "-out", crl.to_str().unwrap()]);
    openssl(&a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificates_are_refused_and_secrets_are_preflighted() {
    let up = Upstream::start("a").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    let server_ca = make_secret(s, "crl-tls", &["crl.test"]);
    make_ca(s, "client-ca");
    let (good_crt, good_key) = make_client(s, "alice", &s.join("client-ca"));
    let (bad_crt, bad_key) = make_client(s, "bob", &s.join("client-ca"));
    revoke(s, "client-crl", &s.join("client-ca"), &s.join("bob"));
    let yaml = [
        tlscontext(
            "crl-ctx",
            "hosts: [crl.test]\nsecret: crl-tls\nca_secret: client-ca\ncrl_secret: client-crl\ncert_required: true",
        ),
        host("crl", "crl.test", ""),
        mapping("m", &format!("prefix: /s/\nservice: {}", up.service())),
    ]
    .concat();
    let gw = start(&yaml, s).await;
    let port = gw.https.port();
    let cert = |c: &Path, k: &Path| {
        args(
            "crl.test",
            port,
            &server_ca,
            &["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()],
        )
    };
    let (ok, out, err) = curl(&cert(&good_crt, &good_key)).await;
    assert!(ok && out.contains(" 200"), "{err}{out}");
    let (ok, out, _) = curl(&cert(&bad_crt, &bad_key)).await;
    assert!(!ok, "a revoked certificate was accepted: {out}");

    // Preflight (`legate check --secrets-dir`, and every revision) reads the same files.
    let tree = crate::support::Tree::new(&yaml);
    let loaded =
        legate::config::check_dir(tree.path(), &legate::config::Options::default()).resources;
    assert!(legate::reconcile::preflight::check_secrets(&loaded, s).is_empty());
    std::fs::remove_file(s.join("client-crl/crl.pem")).unwrap();
    std::fs::remove_file(s.join("client-ca/ca.crt")).unwrap();
    let found = legate::reconcile::preflight::check_secrets(&loaded, s);
    let text: Vec<String> = found.iter().map(|d| d.message.clone()).collect();
    assert!(
        text.iter().any(|m| m.contains("`ca_secret: client-ca`"))
            && text.iter().any(|m| m.contains("`crl_secret: client-crl`")),
        "{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_states_in_the_admin_api_follow_the_secrets_directory() {
    use crate::support::{free_addr, get, Killed};
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();
    make_secret(s, "a-tls", &["a.test"]);
    make_secret(s, "b-tls", &["b.test"]);
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("hosts.yaml"),
        [
            host("a", "a.test", "tlsSecret:\n  name: a-tls"),
            host("b", "b.test", "tlsSecret:\n  name: b-tls"),
        ]
        .concat(),
    )
    .unwrap();
    let (http, https, admin) = (free_addr(), free_addr(), free_addr());
    let _gw = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(config.path())
            .arg("--secrets-dir")
            .arg(s)
            .args(["--secrets-poll-secs", "1", "--verify-window", "0"])
            .args(["--http-listen", &http.to_string()])
            .args(["--https-listen", &https.to_string()])
            .args(["--admin-listen", &admin.to_string(), "--access-log", "off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{admin}/api/certificates");
    let state = |v: &serde_json::Value, host: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["host"] == host))
            .map(|c| c["state"].as_str().unwrap_or_default().to_string())
    };
    let mut loaded = serde_json::Value::Null;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            let r = get(&url, &[]).await;
            if r.status == 200 && state(&r.json(), "b.test").as_deref() == Some("loaded") {
                loaded = r.json();
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        state(&loaded, "a.test").as_deref(),
        Some("loaded"),
        "{loaded}"
    );
    assert!(loaded[0]["not_after"].as_i64().is_some(), "{loaded}");

    // b's Secret disappears: b is reported unavailable, a keeps serving.
    std::fs::remove_dir_all(s.join("b-tls")).unwrap();
    let mut seen = serde_json::Value::Null;
    for _ in 0..300 {
        let r = get(&url, &[]).await.json();
        if state(&r, "b.test").as_deref() == Some("unavailable") {
            seen = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        state(&seen, "b.test").as_deref(),
        Some("unavailable"),
        "{seen}"
    );
    assert_eq!(state(&seen, "a.test").as_deref(), Some("loaded"), "{seen}");
    let metrics = get(&format!("http://{admin}/metrics"), &[]).await.body;
    assert!(
        metrics.contains("legate_tls_certificate_expiry_timestamp_seconds{host=\"a.test\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("legate_tls_certificate_expiry_timestamp_seconds{host=\"b.test\"}"),
        "{metrics}"
    );
}
