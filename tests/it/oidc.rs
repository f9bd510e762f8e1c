//! OIDCLogin end to end against a real OpenID provider (`oidc-provider` from npm, run by node
//! from tests/fixtures/oidc; `.ci/run` installs it) and curl as the browser, keeping cookies in
//! a jar and following the redirect chain. The gateway is reached as `app.test` (curl's
//! `--connect-to`), the name the provider has as redirect URI, so several gateways on their own
//! ports can share one jar, as replicas behind one name would.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use legate::proxy::Settings;

use crate::support::{curl, free_addr, tool_missing, Gateway, Killed, Upstream};

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// The provider process; its issuer is `http://127.0.0.1:<port>`.
struct Idp {
    issuer: String,
    _child: Killed,
}

impl Idp {
    /// Start the provider with ID tokens (and access tokens) valid `id_ttl` seconds; `None`
    /// (after `tool_missing`) when node or the npm package is missing.
    fn start(test: &str, id_ttl: u64) -> Option<Idp> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oidc");
        if !dir.join("node_modules/oidc-provider").is_dir() {
            tool_missing(
                test,
                "tests/fixtures/oidc/node_modules is missing (run `npm ci` there)",
            );
            return None;
        }
        let port = free_addr().port();
        let child = Command::new("node")
            .arg("provider.js")
            .current_dir(&dir)
            .env("PORT", port.to_string())
            .env(
                "REDIRECT_URIS",
                "http://app.test/.legate/callback,https://app.test/.legate/callback",
            )
            .env("POST_LOGOUT_URIS", "http://app.test/bye")
            .env("ID_TOKEN_TTL", id_ttl.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tool_missing(test, &format!("node cannot be started: {e}"));
                return None;
            }
        };
        let out = child.stdout.take().unwrap();
        let child = Killed(child);
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening"), "provider said {line:?}");
        Some(Idp {
            issuer: format!("http://127.0.0.1:{port}"),
            _child: child,
        })
    }

    /// A JWT access token for https://api.test (client credentials).
    async fn api_token(&self) -> String {
        let (ok, out, err) = curl(&[
            "-u".into(),
            "legate:test-secret".into(),
            "-d".into(),
            "grant_type=client_credentials&resource=https://api.test&scope=api".into(),
            format!("{}/token", self.issuer),
        ])
        .await;
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }
}

/// `--secrets-dir` with the login's secret `app-oidc` holding these session keys.
fn secrets(keys: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("app-oidc");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("client-secret"), "test-secret\n").unwrap();
    std::fs::write(s.join("session-keys"), keys).unwrap();
    dir
}

fn config(issuer: &str, upstream: &str, extra: &str) -> String {
    format!(
        "---
apiVersion: legate.dev/v1alpha1
kind: OIDCLogin
metadata:
  name: app-login
spec:
  issuer: {issuer}
  client_id: legate
  secret: app-oidc
  audiences: [https://api.test]
  post_logout_redirect_uri: http://app.test/bye
  forward_claims:
    sub: x-user
    email: x-email
  mappings: [app]
{extra}{}",
        crate::support::route("app", "/", upstream, "")
    )
}

async fn gateway(yaml: &str, secrets: &Path) -> Gateway {
    let settings = Settings {
        secrets_dir: Some(secrets.to_path_buf()),
        ..Settings::default()
    };
    Gateway::with(yaml, settings).await
}

/// Where a gateway listens: an in-process `Gateway` or a `legate run` process.
trait Reach {
    /// The plain HTTP and the TLS address.
    fn ends(&self) -> (SocketAddr, SocketAddr);
}

impl Reach for Gateway {
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        (self.http, self.https)
    }
}

/// `legate run` (the binary) on a config dir, with `--secrets-dir`; plain HTTP only.
struct Process {
    http: SocketAddr,
    _child: Killed,
}

impl Reach for Process {
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        (self.http, self.http)
    }
}

impl Process {
    async fn start(tree: &Path, secrets: &Path) -> Process {
        let (http, admin) = (free_addr(), free_addr());
        let child = Killed(
            Command::new(env!("CARGO_BIN_EXE_legate"))
                .arg("run")
                .arg("--dir")
                .arg(tree)
                .arg("--secrets-dir")
                .arg(secrets)
                .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
                .args(["--admin-listen", &admin.to_string(), "--verify-window", "0"])
                .args(["--access-log", "off"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let ready = format!("http://{admin}/readyz");
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && crate::support::get(&ready, &[]).await.status == 200
            {
                return Process {
                    http,
                    _child: child,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("legate run did not become ready");
    }
}

/// curl as a browser: one cookie jar, `app.test` pointed at a gateway.
struct Browser {
    jar: PathBuf,
    /// The CA to trust for `https://app.test`.
    ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// What curl saw: the last status, the URL it ended at, the body, the response headers.
#[derive(Debug)]
struct Seen {
    status: u16,
    url: String,
    body: String,
    headers: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().rev().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// What the upstream saw for a request header.
    fn seen(&self, header: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not the upstream's JSON ({e}): {self:?}"));
        v["headers"][header][0].as_str().map(str::to_string)
    }
}

impl Browser {
    fn new() -> Browser {
        let dir = tempfile::tempdir().unwrap();
        Browser {
            jar: dir.path().join("jar"),
            ca: None,
            _dir: dir,
        }
    }

    /// GET `url` through `gw` (as `app.test`), following redirects when `follow`.
    async fn get(&self, gw: &impl Reach, url: &str, headers: &[&str], follow: bool) -> Seen {
        let (http, https) = gw.ends();
        let dir = tempfile::tempdir().unwrap();
        let hdrs = dir.path().join("h");
        let mut args = vec![
            "-b".into(),
            self.jar.display().to_string(),
            "-c".into(),
            self.jar.display().to_string(),
            "--connect-to".into(),
            format!("app.test:80:{http}"),
            "--connect-to".into(),
            format!("app.test:443:{https}"),
            "-D".into(),
            hdrs.display().to_string(),
            "-w".into(),
            "\n%{http_code} %{url_effective}".into(),
        ];
        if follow {
            args.push("-L".into());
        }
        if let Some(ca) = &self.ca {
            args.push("--cacert".into());
            args.push(ca.display().to_string());
        }
        for h in headers {
            args.push("-H".into());
            args.push(h.to_string());
        }
        args.push(url.into());
        let (ok, out, err) = curl(&args).await;
        assert!(ok, "curl {url}: {err}");
        let (body, last) = out.rsplit_once('\n').unwrap();
        let (status, url) = last.split_once(' ').unwrap();
        Seen {
            status: status.parse().unwrap(),
            url: url.to_string(),
            body: body.to_string(),
            headers: std::fs::read_to_string(hdrs).unwrap_or_default(),
        }
    }

    /// Browse to `url` and follow the whole login chain.
    async fn browse(&self, gw: &impl Reach, url: &str) -> Seen {
        self.get(gw, url, &["Accept: text/html"], true).await
    }

    /// A call by a program (no `text/html`), with the jar's cookies.
    async fn call(&self, gw: &impl Reach, url: &str, headers: &[&str]) -> Seen {
        let mut h = vec!["Accept: application/json"];
        h.extend_from_slice(headers);
        self.get(gw, url, &h, false).await
    }

    /// The value of a cookie in the jar.
    fn cookie(&self, name: &str) -> Option<String> {
        let jar = std::fs::read_to_string(&self.jar).ok()?;
        jar.lines().find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 7 && f[5] == name).then(|| f[6].to_string())
        })
    }

    /// The names of the jar's cookies starting with `prefix` that have a value.
    fn cookie_names(&self, prefix: &str) -> Vec<String> {
        let jar = std::fs::read_to_string(&self.jar).unwrap_or_default();
        jar.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 7 && f[5].starts_with(prefix) && !f[6].is_empty())
                    .then(|| f[5].to_string())
            })
            .collect()
    }

    /// Replace a cookie's value in the jar.
    fn set_cookie(&self, name: &str, value: &str) {
        let jar = std::fs::read_to_string(&self.jar).unwrap();
        let out: Vec<String> = jar
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split('\t').collect();
                if f.len() == 7 && f[5] == name {
                    f[6] = value;
                }
                f.join("\t")
            })
            .collect();
        std::fs::write(&self.jar, out.join("\n") + "\n").unwrap();
    }
}

/// Flip one character in the middle of a sealed value.
fn tamper(v: &str) -> String {
    let mut b = v.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_login_session_bearer_replicas_rotation_and_logout() {
    let test = "oidc_login_session_bearer_replicas_rotation_and_logout";
    let Some(idp) = Idp::start(test, 300) else {
        return;
    };
    let up = Upstream::start("app").await;
    let yaml = config(&idp.issuer, &up.service(), "");
    let keys1 = secrets(K1);
    let a = gateway(&yaml, keys1.path()).await;
    let alice = Browser::new();

    // A program without a session gets 401, never a redirect.
    let r = alice.call(&a, "http://app.test/page", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A browser is sent through the provider and back to the page it asked for.
    let r = alice.browse(&a, "http://app.test/page?x=1").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.url, "http://app.test/page?x=1");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    assert_eq!(r.seen("x-email").as_deref(), Some("alice@example.test"));
    let upstream_cookies = r.seen("cookie").unwrap_or_default();
    assert!(
        !upstream_cookies.contains("legate_session"),
        "the session cookie stays at the gateway: {upstream_cookies}"
    );
    let session = alice.cookie("legate_session").expect("session cookie set");
    assert!(
        std::fs::read_to_string(&alice.jar)
            .unwrap()
            .contains("#HttpOnly_app.test"),
        "HttpOnly"
    );

    // The session admits programs too; a claim header the client sends is replaced.
    let r = alice
        .call(&a, "http://app.test/api", &["x-user: mallory"])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));

    // A second gateway with the same key accepts the session: nothing is shared but the key.
    let b = gateway(&yaml, keys1.path()).await;
    let r = alice.call(&b, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));

    // Rotation: a gateway whose newest key is K2 still opens sessions sealed with K1...
    let keys2 = secrets(&format!("{K2}\n{K1}\n"));
    let c = gateway(&yaml, keys2.path()).await;
    let r = alice.call(&c, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // ...and seals new ones with K2, which a gateway knowing only K1 cannot open.
    let bob = Browser::new();
    let r = bob.browse(&c, "http://app.test/").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(bob.call(&c, "http://app.test/api", &[]).await.status, 200);
    assert_eq!(bob.call(&a, "http://app.test/api", &[]).await.status, 401);

    // A tampered session cookie is refused.
    alice.set_cookie("legate_session", &tamper(&session));
    assert_eq!(alice.call(&a, "http://app.test/api", &[]).await.status, 401);
    alice.set_cookie("legate_session", &session);
    assert_eq!(alice.call(&a, "http://app.test/api", &[]).await.status, 200);

    // Bearer tokens of the provider pass (their claims forwarded); others do not.
    let token = idp.api_token().await;
    let nobody = Browser::new();
    let auth = format!("Authorization: Bearer {token}");
    let r = nobody.call(&a, "http://app.test/api", &[&auth]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.seen("x-user").as_deref(),
        Some("legate"),
        "sub of a client token"
    );
    let forged = format!("Authorization: Bearer {}", tamper(&token));
    let r = nobody.call(&a, "http://app.test/api", &[&forged]).await;
    assert_eq!(r.status, 401, "{r:?}");
    // A bearer header is a program's: 401, not a login redirect, even from a browser.
    let r = nobody
        .get(
            &a,
            "http://app.test/",
            &["Accept: text/html", &forged],
            false,
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");

    // Another site cannot log the user out: a link or form there is refused, as the browser
    // names it (Sec-Fetch-Site) or by its Origin; the session lives on.
    for h in [
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Site: same-site",
        "Origin: http://evil.test",
    ] {
        let r = alice
            .get(&a, "http://app.test/.legate/logout", &[h], false)
            .await;
        assert_eq!(r.status, 403, "{h}: {r:?}");
        assert!(r.body.contains("another site"), "{}", r.body);
    }
    assert_eq!(alice.call(&a, "http://app.test/api", &[]).await.status, 200);

    // Logout from the site's own page clears the session and hands over to the provider's
    // end_session_endpoint.
    let r = alice
        .get(
            &a,
            "http://app.test/.legate/logout",
            &["Sec-Fetch-Site: same-origin", "Origin: http://app.test"],
            false,
        )
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with(&format!("{}/session/end?client_id=legate", idp.issuer)),
        "{loc}"
    );
    assert!(
        loc.contains("post_logout_redirect_uri=http%3A%2F%2Fapp.test%2Fbye"),
        "{loc}"
    );
    assert!(loc.contains("&id_token_hint=ey"), "{loc}");
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(alice.cookie("legate_session").unwrap_or_default(), "");
    assert_eq!(alice.call(&a, "http://app.test/api", &[]).await.status, 401);
    // The provider serves its logout page for that request.
    let (ok, out, _) = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        loc,
    ])
    .await;
    assert!(ok && out == "200", "{out}");
}

/// Follow the chain by hand from a protected page to the callback URL the provider sends the
/// browser to (not requested).
async fn to_callback(browser: &Browser, gw: &Gateway) -> String {
    let mut url = "http://app.test/page".to_string();
    for _ in 0..10 {
        let r = browser.get(gw, &url, &["Accept: text/html"], false).await;
        assert!(matches!(r.status, 302 | 303), "{r:?}");
        let next = r.header("location").unwrap();
        // The provider's redirects are relative to it.
        url = if next.starts_with('/') {
            let base = r.url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
            format!("{base}{next}")
        } else {
            next
        };
        if url.starts_with("http://app.test/.legate/callback") {
            return url;
        }
    }
    panic!("no callback after 10 redirects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_callback_refuses_tampered_cookies_and_states() {
    let test = "oidc_callback_refuses_tampered_cookies_and_states";
    let Some(idp) = Idp::start(test, 300) else {
        return;
    };
    let up = Upstream::start("app").await;
    let keys = secrets(K1);
    let gw = gateway(&config(&idp.issuer, &up.service(), ""), keys.path()).await;
    let b = Browser::new();
    let callback = to_callback(&b, &gw).await;
    let names = b.cookie_names("legate_session_login_");
    assert_eq!(names.len(), 1, "one login in flight: {names:?}");
    let login_name = names[0].clone();
    let login = b.cookie(&login_name).expect("login cookie");

    // Another state than the one sealed in the login cookie.
    let (head, state) = callback.split_once("state=").unwrap();
    let rest = state
        .split_once('&')
        .map_or(String::new(), |(_, r)| format!("&{r}"));
    let wrong = format!("{head}state=forged{rest}");
    let r = b.get(&gw, &wrong, &[], false).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("state does not match"), "{}", r.body);
    // No state at all.
    let r = b.get(&gw, &format!("{head}x=1{rest}"), &[], false).await;
    assert_eq!(r.status, 400, "{r:?}");

    // An answer naming another issuer (RFC 9207 mix-up defence).
    assert!(callback.contains("&iss="), "{callback}");
    let (before, _) = callback.split_once("&iss=").unwrap();
    let r = b
        .get(
            &gw,
            &format!("{before}&iss=https%3A%2F%2Fevil.test"),
            &[],
            false,
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("another issuer"), "{}", r.body);

    // A tampered login cookie, then none (another browser).
    b.set_cookie(&login_name, &tamper(&login));
    let r = b.get(&gw, &callback, &[], false).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("no valid login cookie"), "{}", r.body);
    let r = Browser::new().get(&gw, &callback, &[], false).await;
    assert_eq!(r.status, 400, "{r:?}");
    // The provider's own refusal is passed on as 403 with its error code.
    let r = b
        .get(
            &gw,
            "http://app.test/.legate/callback?error=access_denied&error_description=%3Cb%3E",
            &[],
            false,
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("(access_denied)") && !r.body.contains('<'),
        "{}",
        r.body
    );
    // A browser's POST without a session is refused, not redirected (its body would be lost).
    let (ok, out, err) = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-X".into(),
        "POST".into(),
        "-H".into(),
        "Accept: text/html".into(),
        "--connect-to".into(),
        format!("app.test:80:{}", gw.http),
        "http://app.test/form".into(),
    ])
    .await;
    assert!(ok && out == "401", "{out} {err}");

    // The untouched cookie and state complete the login (the code was never spent above).
    b.set_cookie(&login_name, &login);
    let r = b.get(&gw, &callback, &[], false).await;
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some("/page"));
    let cookies: Vec<&str> = r
        .headers
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .collect();
    assert!(
        cookies.iter().any(|c| c.contains("legate_session=")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Lax")
            && !c.contains("Secure")),
        "{cookies:?}"
    );
    assert!(cookies
        .iter()
        .any(|c| c.contains(&format!("{login_name}=;"))));
    let r = b.call(&gw, "http://app.test/page", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // The same callback again: the code is spent (whether or not the client dropped the
    // cleared login cookie: curl 7.88 keeps it).
    let r = b.get(&gw, &callback, &[], false).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("login failed"), "{}", r.body);
    drop(idp);
}

/// A browser logged in through a gateway whose ID tokens live `id_ttl` seconds and are renewed
/// in their last `refresh_before`.
struct LoggedIn {
    idp: Idp,
    gw: Gateway,
    b: Browser,
    _up: Upstream,
    _keys: tempfile::TempDir,
}

impl LoggedIn {
    async fn start(test: &str, id_ttl: u64, refresh_before: u64) -> Option<LoggedIn> {
        let idp = Idp::start(test, id_ttl)?;
        let up = Upstream::start("app").await;
        let keys = secrets(K1);
        let extra = format!("  refresh_before_seconds: {refresh_before}\n");
        let gw = gateway(&config(&idp.issuer, &up.service(), &extra), keys.path()).await;
        let b = Browser::new();
        assert_eq!(b.browse(&gw, "http://app.test/").await.status, 200);
        Some(LoggedIn {
            idp,
            gw,
            b,
            _up: up,
            _keys: keys,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_session_is_renewed_by_refresh_token_and_ends_when_it_cannot_be() {
    let test = "oidc_session_is_renewed_by_refresh_token_and_ends_when_it_cannot_be";
    // ID tokens live 2 s; sessions are renewed within 1 s of their end.
    let Some(LoggedIn { idp, gw, b, .. }) = LoggedIn::start(test, 2, 1).await else {
        return;
    };
    let first = b.cookie("legate_session").unwrap();

    // The provider's clock decides: wait until the ID token has expired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = b.call(&gw, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    assert!(r
        .header("set-cookie")
        .unwrap()
        .starts_with("legate_session="));
    let renewed = b.cookie("legate_session").unwrap();
    assert_ne!(first, renewed);

    // The old session, past its end, is no longer accepted once the provider cannot renew it.
    let addr: SocketAddr = idp.issuer.trim_start_matches("http://").parse().unwrap();
    drop(idp);
    // Past the renewed session's end (whole seconds).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "provider stopped"
    );
    let r = b.call(&gw, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = b
        .get(&gw, "http://app.test/", &["Accept: text/html"], false)
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(r.header("location").unwrap().contains("/auth?"), "{r:?}");
}

#[test]
fn oidclogin_secrets_are_checked_before_a_revision_is_applied() {
    // `legate check --secrets-dir` runs the reconciler's preflight: a revision naming a
    // missing or unusable OIDC secret is refused, and the gateway keeps serving the last one.
    let yaml = config("https://idp.example.com", "app:8080", "");
    let tree = crate::config_cli::text_tree(&[("login.yaml", yaml.as_str())]);
    let run = |dir: &Path| {
        let o = crate::config_cli::check(tree.path(), &["--secrets-dir", dir.to_str().unwrap()]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let good = secrets(K1);
    let (code, out) = run(good.path());
    assert_eq!(code, Some(0), "{out}");

    let empty = tempfile::tempdir().unwrap();
    let (code, out) = run(empty.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("error[oidc-secret]: OIDCLogin `app-login`"),
        "{out}"
    );
    assert!(out.contains("client-secret"), "{out}");

    let short = secrets("c2hvcnQ=\n");
    let (code, out) = run(short.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("session-keys: line 1"), "{out}");
    assert!(
        !out.contains("test-secret"),
        "the client secret is never printed: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_cookies_are_secure_over_tls() {
    let test = "oidc_cookies_are_secure_over_tls";
    let Some(idp) = Idp::start(test, 300) else {
        return;
    };
    let up = Upstream::start("app").await;
    let keys = secrets(K1);
    let ca = crate::support::make_secret(keys.path(), "app-tls", &["app.test"]);
    let yaml = config(&idp.issuer, &up.service(), "")
        + &crate::support::host("app", "app.test", "tlsSecret:\n  name: app-tls");
    let gw = gateway(&yaml, keys.path()).await;
    let mut b = Browser::new();
    b.ca = Some(ca);
    // The redirect URI the provider gets is https (it knows only that one and the http one).
    let r = b.browse(&gw, "https://app.test/page").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.url, "https://app.test/page");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    let jar = std::fs::read_to_string(&b.jar).unwrap();
    let line = jar
        .lines()
        .find(|l| l.contains("\tlegate_session\t"))
        .unwrap();
    // Netscape jar fields: domain, subdomains, path, secure, ...
    assert_eq!(line.split('\t').nth(3), Some("TRUE"), "Secure: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sessions_are_shared_by_two_legate_processes_with_one_key_file() {
    let test = "oidc_sessions_are_shared_by_two_legate_processes_with_one_key_file";
    let Some(idp) = Idp::start(test, 300) else {
        return;
    };
    let up = Upstream::start("app").await;
    let tree = crate::support::Tree::new(&config(&idp.issuer, &up.service(), ""));
    // Two replicas given the same key file; a third with a key of its own.
    let shared = secrets(K1);
    let other = secrets(K2);
    let (first, second, stranger) = tokio::join!(
        Process::start(tree.path(), shared.path()),
        Process::start(tree.path(), shared.path()),
        Process::start(tree.path(), other.path()),
    );

    // Log in through the first process; the second accepts the session cookie it set.
    let alice = Browser::new();
    let r = alice.browse(&first, "http://app.test/page").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    let r = alice.call(&second, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
    let r = alice
        .get(
            &second,
            "http://app.test/page",
            &["Accept: text/html"],
            false,
        )
        .await;
    assert_eq!(r.status, 200, "no login again at the second: {r:?}");

    // A session sealed with a key the second process does not have is refused there: 401 for
    // a program, a fresh login for a browser.
    let bob = Browser::new();
    assert_eq!(bob.browse(&stranger, "http://app.test/").await.status, 200);
    assert_eq!(
        bob.call(&stranger, "http://app.test/api", &[]).await.status,
        200
    );
    let r = bob.call(&second, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = bob
        .get(
            &second,
            "http://app.test/page",
            &["Accept: text/html"],
            false,
        )
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(r.header("location").unwrap().contains("/auth?"), "{r:?}");
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        5,
        "only admitted requests reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_two_logins_started_in_parallel_both_finish() {
    let test = "oidc_two_logins_started_in_parallel_both_finish";
    let Some(idp) = Idp::start(test, 300) else {
        return;
    };
    let up = Upstream::start("app").await;
    let keys = secrets(K1);
    let gw = gateway(&config(&idp.issuer, &up.service(), ""), keys.path()).await;
    let b = Browser::new();
    // Two tabs start a login before either comes back from the provider.
    let first = to_callback(&b, &gw).await;
    let second = to_callback(&b, &gw).await;
    assert_ne!(first, second);
    let names = b.cookie_names("legate_session_login_");
    assert_eq!(names.len(), 2, "a login cookie each: {names:?}");

    // They come back in the order they started, then the other way round: both finish.
    // Each callback clears its own login cookie and leaves the other tab's alone.
    let mut cleared = Vec::new();
    for callback in [&first, &second] {
        let r = b.get(&gw, callback, &[], false).await;
        assert_eq!(r.status, 302, "{r:?}");
        assert_eq!(r.header("location").as_deref(), Some("/page"));
        let clears: Vec<&String> = names
            .iter()
            .filter(|n| r.headers.contains(&format!("{n}=; ")))
            .collect();
        assert_eq!(clears.len(), 1, "{r:?}");
        cleared.push(clears[0].clone());
    }
    assert_ne!(cleared[0], cleared[1]);
    let r = b.call(&gw, "http://app.test/page", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen("x-user").as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_a_failed_refresh_is_not_retried_on_every_request() {
    let test = "oidc_a_failed_refresh_is_not_retried_on_every_request";
    // ID tokens live 6 s and are renewed in their last 5 s; a failed renewal waits
    // max(5 s / 6, 2 s) = 2 s before the next try.
    let Some(LoggedIn { idp, gw, b, .. }) = LoggedIn::start(test, 6, 5).await else {
        return;
    };

    // The provider goes away; in its place a listener that counts the gateway's attempts
    // and closes each connection (the token endpoint fails).
    let addr: SocketAddr = idp.issuer.trim_start_matches("http://").parse().unwrap();
    drop(idp);
    let dead = tokio::net::TcpListener::bind(addr).await.unwrap();
    let tries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = tries.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = dead.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let tries = move || tries.load(std::sync::atomic::Ordering::SeqCst);
    // Into the refresh window (whole seconds on the provider's clock).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The first request in the window tries, fails, and is still admitted by the session; the
    // cookie it gets back says when to try again.
    let r = b.call(&gw, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(tries(), 1, "one refresh attempt");
    assert!(r
        .header("set-cookie")
        .is_some_and(|c| c.starts_with("legate_session=")));
    // The next ones do not ask the provider again.
    for _ in 0..3 {
        let r = b.call(&gw, "http://app.test/api", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("set-cookie").is_none(), "{r:?}");
    }
    assert_eq!(tries(), 1, "the failed refresh was not retried at once");
    // After the wait it is tried again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = b.call(&gw, "http://app.test/api", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(tries(), 2, "tried again after the wait");
}
