//! `legate run` as a whole process: the reconciler driving the proxy, route tests rejecting a
//! revision while the old one serves, revision notifications to a receiver started here, the
//! admin token, and webhooks served on the proxy listener.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::support::{get, mapping, send, TestBody, Tree};

fn body(b: &'static [u8]) -> TestBody {
    Full::new(Bytes::from_static(b))
        .map_err(|e| match e {})
        .boxed()
}

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
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

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let good = mapping(
        "echo",
        &format!("hostname: '*'\nprefix: /echo/\nservice: {echo}\nrewrite: /"),
    );
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
    let extra = mapping(
        "echo-two",
        &format!("hostname: '*'\nprefix: /two/\nservice: {echo}\nrewrite: /"),
    );
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
