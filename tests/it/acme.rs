//! ACME on Hosts against pebble (Let's Encrypt's test server): HTTP-01 answered by the
//! gateway's HTTP listener, the certificate served by SNI, renewal, a failed order reported.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use legate::proxy::Settings;
use legate::tls::acme::Acme;

use crate::support::{curl, free_addr, host, send, tool_missing, Gateway, Killed, TestBody};

fn body(s: &str) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes::Bytes::from(s.to_string()))
        .map_err(|e| match e {})
        .boxed()
}

/// A CA and a certificate for 127.0.0.1/localhost signed by it, for pebble's own listeners.
fn pebble_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn acme_host(name: &str, hostname: &str, directory: &str) -> String {
    host(
        name,
        hostname,
        &format!(
            "tlsSecret:\n  name: {name}-tls\nacmeProvider:\n  authority: {directory}\n  email: ops@example.test\n  privateKeySecret:\n    name: acme-account"
        ),
    )
}

fn status(gw: &Gateway, host: &str) -> serde_json::Value {
    let certs = gw.proxy.metrics().certificates();
    serde_json::to_value(certs.iter().find(|c| c.host == host)).unwrap()
}

/// pebble and its DNS (pebble-challtestsrv: every name is 127.0.0.1, the gateway) on loopback,
/// validating HTTP-01 on `http_port`. `None` (after `tool_missing`) when they are not installed.
pub(crate) struct Pebble {
    work: tempfile::TempDir,
    pub(crate) directory: String,
    mgmt: std::net::SocketAddr,
    chall_mgmt: std::net::SocketAddr,
    _procs: Vec<Killed>,
}

impl Pebble {
    pub(crate) async fn start(test: &str, http_port: u16) -> Option<Pebble> {
        for tool in ["pebble", "pebble-challtestsrv", "curl"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                tool_missing(
                    test,
                    &format!("{tool} is not installed (Debian package pebble)"),
                );
                return None;
            }
        }
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        pebble_certs(w);
        let (acme_addr, mgmt, dns, chall_mgmt) =
            (free_addr(), free_addr(), free_addr(), free_addr());
        let dns_srv = Killed(
            Command::new("pebble-challtestsrv")
                .args([
                    "-dns01",
                    &dns.to_string(),
                    "-management",
                    &chall_mgmt.to_string(),
                ])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::fs::write(
            w.join("pebble.json"),
            serde_json::json!({"pebble": {
                "listenAddress": acme_addr.to_string(),
                "managementListenAddress": mgmt.to_string(),
                "certificate": w.join("cert.pem"),
                "privateKey": w.join("key.pem"),
                "httpPort": http_port,
                "tlsPort": free_addr().port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }})
            .to_string(),
        )
        .unwrap();
        let pebble = Killed(
            Command::new("pebble")
                .arg("-config")
                .arg(w.join("pebble.json"))
                .args(["-dnsserver", &dns.to_string()])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_VA_ALWAYS_VALID", "0")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        for _ in 0..200 {
            let up = tokio::net::TcpStream::connect(acme_addr).await.is_ok()
                && tokio::net::TcpStream::connect(mgmt).await.is_ok()
                && tokio::net::TcpStream::connect(chall_mgmt).await.is_ok();
            if up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Pebble {
            work,
            directory: format!("https://{acme_addr}/dir"),
            mgmt,
            chall_mgmt,
            _procs: vec![dns_srv, pebble],
        })
    }

    /// The CA pebble's own listeners present (pass as `--upstream-ca`).
    pub(crate) fn ca(&self) -> std::path::PathBuf {
        self.work.path().join("ca.pem")
    }

    /// Make `name` resolve to an address nothing listens on, so its validation fails.
    async fn unreachable(&self, name: &str) {
        let r = send(
            "POST",
            &format!("http://{}/add-a", self.chall_mgmt),
            &[("content-type", "application/json")],
            body(&format!(r#"{{"host":"{name}","addresses":["127.0.0.2"]}}"#)),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// pebble's issuing root, written to a file for `curl --cacert`.
    pub(crate) async fn root(&self) -> std::path::PathBuf {
        // Pebble's management listener has a certificate of its own making: `-k` on loopback.
        let (ok, pem, err) = curl(&["-k".into(), format!("https://{}/roots/0", self.mgmt)]).await;
        assert!(ok, "{err}");
        let root = self.work.path().join("pebble-root.pem");
        std::fs::write(&root, pem).unwrap();
        root
    }
}

/// Whether `https://<name>:<port>/` presents a certificate chaining to `root`: curl's verify
/// result (`0`: verified).
pub(crate) async fn served(name: &str, root: &Path, port: u16) -> (bool, String, String) {
    curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{ssl_verify_result}".into(),
        "--cacert".into(),
        root.display().to_string(),
        "--resolve".into(),
        format!("{name}:{port}:127.0.0.1"),
        format!("https://{name}:{port}/"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_hosts_get_certificates_from_pebble_through_the_gateway() {
    let secrets = tempfile::tempdir().unwrap();
    // The gateway first (pebble validates on its HTTP port), with the Hosts pointing at a
    // directory URL known once pebble is up: the graph is swapped in after.
    let gw = Gateway::with(
        "",
        Settings {
            secrets_dir: Some(secrets.path().to_path_buf()),
            ..Settings::default()
        },
    )
    .await;
    let Some(pebble) = Pebble::start(
        "acme_hosts_get_certificates_from_pebble_through_the_gateway",
        gw.http.port(),
    )
    .await
    else {
        return;
    };
    // A Mapping on the challenge prefix: tokens that are not Legate's still reach it.
    let up = crate::support::Upstream::start("wk").await;
    let yaml = [
        acme_host("good", "good.acme.test", &pebble.directory),
        acme_host("bad", "bad.acme.test", &pebble.directory),
        crate::support::mapping(
            "wk",
            &format!(
                "hostname: '*'\nprefix: /.well-known/acme-challenge/\nservice: {}",
                up.service()
            ),
        ),
    ]
    .concat();
    gw.proxy.swap(crate::support::compile(&yaml));
    pebble.unreachable("bad.acme.test").await;

    let acme = Acme::new(
        secrets.path().to_path_buf(),
        Some(pebble.ca()),
        gw.proxy.metrics().clone(),
    );
    gw.proxy.set_acme(acme.clone());
    let graph = gw.proxy.graph();
    assert!(acme.pass(&graph).await, "a certificate was written");
    let other = crate::support::get(
        &gw.url("/.well-known/acme-challenge/not-ours"),
        &[("host", "good.acme.test")],
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "pebble's validation was answered by Legate, the other token by the Mapping"
    );
    gw.proxy.reload_certs();

    // good: issued, valid, served by SNI with pebble's issuer.
    let good = status(&gw, "good.acme.test");
    assert_eq!(good["state"], "loaded", "{good}");
    assert_eq!(good["acme"]["state"], "valid", "{good}");
    let not_after = good["acme"]["not_after"].as_i64().unwrap();
    // bad: failed with the reason and a next attempt; its failure did not stop good.
    let bad = status(&gw, "bad.acme.test");
    assert_eq!(bad["state"], "unavailable", "{bad}");
    assert_eq!(bad["acme"]["state"], "failed", "{bad}");
    assert!(bad["acme"]["next_attempt"].as_i64().is_some(), "{bad}");
    assert!(
        !bad["acme"]["reason"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{bad}"
    );
    assert!(
        !secrets.path().join("bad-tls/tls.crt").exists(),
        "nothing written for a failed order"
    );
    assert!(
        secrets.path().join("acme-account/tls.key").exists(),
        "the account key is kept"
    );
    let root = pebble.root().await;
    let (ok, out, err) = served("good.acme.test", &root, gw.https.port()).await;
    assert!(
        ok && out == "0",
        "the gateway serves a certificate pebble issued: {out} {err}"
    );

    // Metrics carry the ACME state next to the expiry.
    let text = gw.proxy.metrics().render(None);
    assert!(
        text.contains("legate_acme_certificate_state{host=\"good.acme.test\",state=\"valid\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("legate_acme_certificate_state{host=\"bad.acme.test\",state=\"failed\"} 1"),
        "{text}"
    );

    // Nothing to do before two thirds of the lifetime; a new certificate after.
    let before = std::fs::read(secrets.path().join("good-tls/tls.crt")).unwrap();
    let bad_next = bad["acme"]["next_attempt"].as_i64().unwrap();
    assert!(
        !acme.pass_at(&graph, SystemTime::now()).await,
        "not due yet, bad backing off"
    );
    assert_eq!(
        std::fs::read(secrets.path().join("good-tls/tls.crt")).unwrap(),
        before
    );
    let late = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after - 3600).unwrap());
    assert!(acme.pass_at(&graph, late).await, "renewed");
    gw.proxy.reload_certs();
    let after = std::fs::read(secrets.path().join("good-tls/tls.crt")).unwrap();
    assert_ne!(before, after, "a new certificate was written");
    let (ok, out, err) = served("good.acme.test", &root, gw.https.port()).await;
    assert!(ok && out == "0", "{out} {err}");
    // bad was retried (its backoff had passed by then) and failed again, backing off longer.
    let bad = status(&gw, "bad.acme.test");
    assert_eq!(bad["acme"]["failures"], 2, "{bad}");
    assert!(
        bad["acme"]["next_attempt"].as_i64().unwrap() > bad_next,
        "{bad}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_run_orders_an_acme_certificate_and_reports_it_in_the_admin_api() {
    use crate::support::get;
    let (http, https, admin) = (free_addr(), free_addr(), free_addr());
    let Some(pebble) = Pebble::start(
        "legate_run_orders_an_acme_certificate_and_reports_it_in_the_admin_api",
        http.port(),
    )
    .await
    else {
        return;
    };
    pebble.unreachable("bad.acme.test").await;
    let secrets = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("hosts.yaml"),
        [
            acme_host("good", "good.acme.test", &pebble.directory),
            acme_host("bad", "bad.acme.test", &pebble.directory),
        ]
        .concat(),
    )
    .unwrap();
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(config.path())
            .arg("--secrets-dir")
            .arg(secrets.path())
            .arg("--upstream-ca")
            .arg(pebble.ca())
            .args(["--secrets-poll-secs", "1", "--verify-window", "0"])
            .args(["--http-listen", &http.to_string()])
            .args(["--https-listen", &https.to_string()])
            .args(["--admin-listen", &admin.to_string(), "--access-log", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{admin}/api/certificates");
    let find = |v: &serde_json::Value, host: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["host"] == host))
            .cloned()
            .unwrap_or_default()
    };
    let mut seen = serde_json::Value::Null;
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            let r = get(&url, &[]).await;
            if r.status == 200 {
                seen = r.json();
                let good = find(&seen, "good.acme.test");
                let bad = find(&seen, "bad.acme.test");
                if good["state"] == "loaded" && bad["acme"]["state"] == "failed" {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let good = find(&seen, "good.acme.test");
    assert_eq!(good["state"], "loaded", "{seen}");
    assert_eq!(good["acme"]["state"], "valid", "{seen}");
    assert!(good["not_after"].as_i64().is_some(), "{seen}");
    let bad = find(&seen, "bad.acme.test");
    assert_eq!(bad["acme"]["state"], "failed", "{seen}");
    assert!(!secrets.path().join("good-tls/.acme.lock").exists());
    let root = pebble.root().await;
    let (ok, out, err) = served("good.acme.test", &root, https.port()).await;
    assert!(ok && out == "0", "{out} {err}");
}
