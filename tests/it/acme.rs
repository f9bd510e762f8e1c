//! ACME on Hosts against pebble (Let's Encrypt's test server): HTTP-01 answered by the
//! gateway's HTTP listener, the certificate served by SNI, renewal, a failed order reported.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use legate::proxy::Settings;
use legate::tls::acme::Acme;

use crate::support::{curl, free_addr, host, send, tool_missing, Gateway, Killed, TestBody};

fn body(s: &'static str) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes::Bytes::from(s))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_hosts_get_certificates_from_pebble_through_the_gateway() {
    for tool in ["pebble", "pebble-challtestsrv", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            tool_missing(
                "acme_hosts_get_certificates_from_pebble_through_the_gateway",
                &format!("{tool} is not installed (Debian package pebble)"),
            );
            return;
        }
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    pebble_certs(w);
    let secrets = tempfile::tempdir().unwrap();
    let (acme_addr, pebble_mgmt, dns, chall_mgmt) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let directory = format!("https://{acme_addr}/dir");
    let yaml = [
        acme_host("good", "good.acme.test", &directory),
        acme_host("bad", "bad.acme.test", &directory),
    ]
    .concat();
    let gw = Gateway::with(
        &yaml,
        Settings {
            secrets_dir: Some(secrets.path().to_path_buf()),
            ..Settings::default()
        },
    )
    .await;

    // DNS for pebble's validation: every name is 127.0.0.1 (the gateway), except bad.acme.test.
    let _dns = Killed(
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
            "managementListenAddress": pebble_mgmt.to_string(),
            "certificate": w.join("cert.pem"),
            "privateKey": w.join("key.pem"),
            "httpPort": gw.http.port(),
            "tlsPort": free_addr().port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }})
        .to_string(),
    )
    .unwrap();
    let _pebble = Killed(
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
            && tokio::net::TcpStream::connect(chall_mgmt).await.is_ok();
        if up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // bad.acme.test resolves to an address nothing listens on: its validation fails.
    let r = send(
        "POST",
        &format!("http://{chall_mgmt}/add-a"),
        &[("content-type", "application/json")],
        body(r#"{"host":"bad.acme.test","addresses":["127.0.0.2"]}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let acme = Acme::new(
        secrets.path().to_path_buf(),
        Some(w.join("ca.pem")),
        gw.proxy.metrics().clone(),
    );
    gw.proxy.set_acme(acme.clone());
    let graph = gw.proxy.graph();
    assert!(acme.pass(&graph).await, "a certificate was written");
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

    let root = w.join("pebble-root.pem");
    // Pebble's management listener has a certificate of its own making: `-k` on loopback.
    let (ok, pem, err) = curl(&["-k".into(), format!("https://{pebble_mgmt}/roots/0")]).await;
    assert!(ok, "{err}");
    std::fs::write(&root, pem).unwrap();
    let served = |root: std::path::PathBuf, port: u16| async move {
        curl(&[
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{ssl_verify_result}".into(),
            "--cacert".into(),
            root.display().to_string(),
            "--resolve".into(),
            format!("good.acme.test:{port}:127.0.0.1"),
            format!("https://good.acme.test:{port}/"),
        ])
        .await
    };
    let (ok, out, err) = served(root.clone(), gw.https.port()).await;
    assert!(
        ok,
        "the gateway serves a certificate pebble issued: {out} {err}"
    );
    assert_eq!(out, "0");

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
    let now = SystemTime::now();
    assert!(
        !acme.pass_at(&graph, now).await,
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
    let (ok, out, err) = served(root, gw.https.port()).await;
    assert!(ok && out == "0", "{out} {err}");
    // bad was retried (its backoff had passed by then) and failed again, backing off longer.
    let bad = status(&gw, "bad.acme.test");
    assert_eq!(bad["acme"]["failures"], 2, "{bad}");
    assert!(
        bad["acme"]["next_attempt"].as_i64().unwrap() > bad_next,
        "{bad}"
    );
}
