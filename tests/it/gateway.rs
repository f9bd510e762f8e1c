//! `legate run` as a whole process: the reconciler driving the proxy, route tests rejecting a
//! revision while the old one serves, revision notifications to a receiver started here, the
//! admin token, and webhooks served on the proxy listener.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::support::{free_addr as free, get, route, send, Killed, TestBody, Tree};

fn body(b: &'static [u8]) -> TestBody {
    Full::new(Bytes::from_static(b))
        .map_err(|e| match e {})
        .boxed()
}

/// A webhook receiver: every POSTed JSON body arrives on the channel.
async fn receiver() -> (SocketAddr, mpsc::UnboundedReceiver<serde_json::Value>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx
                            .send(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

async fn next_outcome(rx: &mut mpsc::UnboundedReceiver<serde_json::Value>) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a notification")
        .expect("open")
}

const ROUTE_TEST: &str = "---\napiVersion: legate.dev/v1alpha1\nkind: RouteTest\nmetadata:\n  name: echo\nspec:\n  cases:\n    - name: echo strips its prefix\n      request: {path: /echo/hello}\n      expect: {mapping: echo, path: /hello}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_tests_gate_revisions_and_outcomes_are_announced() {
    let (echo, http, admin) = (free(), free(), free());
    let (hook, mut notes) = receiver().await;
    let good = route("echo", "/echo/", &echo.to_string(), "rewrite: /");
    let tree = Tree::new(&(good.clone() + ROUTE_TEST));
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(tree.path())
            .args(["--demo-echo", &echo.to_string()])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0"])
            .args(["--notify-url", &format!("http://{hook}/legate")])
            .env("LEGATE_WEBHOOK_SECRET", "s3cret")
            .env("LEGATE_ADMIN_TOKEN", "t0ken")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let first = next_outcome(&mut notes).await;
    assert_eq!(first["legate"]["outcome"], "Applied", "{first}");
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .starts_with("Legate applied revision"),
        "{first}"
    );
    let applied = first["legate"]["revision"].as_str().unwrap().to_string();
    assert_eq!(
        get(&format!("http://{http}/echo/hello"), &[]).await.json()["path"],
        "/hello"
    );

    // The live route table and an explanation of one request.
    let routes = get(&format!("http://{admin}/api/routes"), &[]).await.json();
    assert_eq!(
        routes["fallback"][0]["members"][0]["mapping"], "default/echo",
        "{routes}"
    );
    let why = get(
        &format!("http://{admin}/api/routes/explain?method=GET&host=example.org&path=/echo/hello"),
        &[],
    )
    .await
    .json();
    assert_eq!(why["matched"], true, "{why}");
    assert_eq!(why["members"][0]["mapping"], "default/echo");
    assert_eq!(why["members"][0]["upstream_path"], "/hello");
    let none = get(
        &format!("http://{admin}/api/routes/explain?path=/nowhere"),
        &[],
    )
    .await
    .json();
    assert_eq!(none["matched"], false);

    // The same through the CLI, and pin/unpin by hand.
    let admin_url = format!("http://{admin}");
    let cli = |args: &[&str], token: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_legate"));
        c.args(args).args(["--admin", &admin_url]);
        if token {
            c.env("LEGATE_ADMIN_TOKEN", "t0ken");
        } else {
            c.env_remove("LEGATE_ADMIN_TOKEN");
        }
        c.output().unwrap()
    };
    let o = cli(&["status", "--json"], false);
    assert_eq!(o.status.code(), Some(0));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["applied"], applied.as_str());
    assert_eq!(st["live"]["outcome"], "Applied");
    let text = String::from_utf8_lossy(&cli(&["status"], false).stdout).into_owned();
    assert!(
        text.contains("mode:          following") && text.contains(&applied[..12]),
        "{text}"
    );
    assert_eq!(
        cli(&["unpin"], false).status.code(),
        Some(2),
        "mutating calls need the token"
    );
    let o = cli(&["pin", &applied], true);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let text = String::from_utf8_lossy(&cli(&["status"], false).stdout).into_owned();
    assert!(
        text.contains(&format!("mode:          pinned at {applied}")),
        "{text}"
    );
    let o = cli(&["unpin"], true);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let text = String::from_utf8_lossy(&cli(&["status"], false).stdout).into_owned();
    assert!(text.contains("mode:          following"), "{text}");
    let revs = String::from_utf8_lossy(&cli(&["revisions"], false).stdout).into_owned();
    assert!(
        revs.starts_with("REVISION") && revs.contains("Applied"),
        "{revs}"
    );
    let o = cli(&["explain", "/echo/x"], false);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("default/echo") && text.contains("  1    /echo/*") && text.contains("wins"),
        "{text}"
    );
    let o = cli(&["explain", "/nowhere"], false);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("lost: path /nowhere does not start with /echo/")
            && text.contains("no route: the gateway answers 404"),
        "{text}"
    );
    let o = cli(&["explain", "/echo/x", "--json"], false);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["position"], 1, "{v}");
    // The live table reads exactly like the one compiled from the same directory.
    let live = String::from_utf8_lossy(&cli(&["routes", "--live"], false).stdout).into_owned();
    let local = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("routes")
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(live, String::from_utf8_lossy(&local.stdout), "{live}");
    assert!(
        live.contains("#    prec") && live.contains("default/echo"),
        "{live}"
    );

    // A change that breaks the route test is rejected; the old routes keep serving.
    let broken = good.replace("rewrite: /", "rewrite: /api/");
    std::fs::write(tree.path().join("config.yaml"), broken + ROUTE_TEST).unwrap();
    let second = next_outcome(&mut notes).await;
    assert_eq!(second["legate"]["outcome"], "Rejected", "{second}");
    let errors = second["legate"]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("route-test-failed")),
        "{second}"
    );
    assert_eq!(
        get(&format!("http://{http}/echo/hello"), &[]).await.json()["path"],
        "/hello"
    );
    let status = get(&format!("http://{admin}/api/status"), &[]).await.json();
    assert_eq!(status["applied"], applied.as_str());
    let history = get(&format!("http://{admin}/api/revisions"), &[])
        .await
        .json();
    assert_eq!(history[0]["outcome"], "Rejected");
    assert!(history[0]["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["code"] == "route-test-failed"));

    // Mutating admin calls need the token; probes do not.
    assert_eq!(
        get(&format!("http://{admin}/readyz"), &[]).await.status,
        200
    );
    let r = send(
        "POST",
        &format!("http://{admin}/api/sync"),
        &[],
        crate::support::empty(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        "POST",
        &format!("http://{admin}/api/sync"),
        &[("authorization", "Bearer t0ken")],
        crate::support::empty(),
    )
    .await;
    // A manual sync judges the broken revision again (409: not applied) and says so again.
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        next_outcome(&mut notes).await["legate"]["outcome"],
        "Rejected"
    );

    // Webhooks on the proxy listener: a bad signature is refused, a good one triggers a pass
    // that picks up the fix.
    let url = format!("http://{http}/.legate/hooks/generic");
    const BODY: &[u8] = b"{\"ref\":\"main\"}";
    let r = send(
        "POST",
        &url,
        &[("x-legate-signature", "sha256=00")],
        body(BODY),
    )
    .await;
    assert_eq!(r.status, 401);
    let extra = route("echo-two", "/two/", &echo.to_string(), "rewrite: /");
    std::fs::write(tree.path().join("config.yaml"), good + &extra + ROUTE_TEST).unwrap();
    let sig = legate::admin::hooks::sign(b"s3cret", BODY);
    let r = send("POST", &url, &[("x-legate-signature", &sig)], body(BODY)).await;
    assert_eq!(r.status, 202);
    let third = next_outcome(&mut notes).await;
    assert_eq!(third["legate"]["outcome"], "Applied", "{third}");
    assert_ne!(third["legate"]["revision"], applied.as_str());
    assert_eq!(
        get(&format!("http://{http}/two/x"), &[]).await.json()["path"],
        "/x"
    );
}
