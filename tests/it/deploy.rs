//! The manifests in `deploy/`: each overlay rendered by `kubectl kustomize` (or `kustomize
//! build`), its content checked (probes, admin binding, least-privilege RBAC per mode), and the
//! rendered objects and the CRDs validated offline against the Kubernetes OpenAPI schemas by
//! the PyPI package `kubernetes-validate`. Neither an API server nor a container engine runs
//! here: CRD acceptance, RBAC enforcement and the Dockerfile build stay unverified.

use std::path::{Path, PathBuf};
use std::process::Command;

use legate::config::yaml::{parse_documents, YamlLimits};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Render an overlay, or `None` (with a message saying why) when no renderer is installed.
fn render(overlay: &str) -> Option<String> {
    let dir = root().join("deploy/overlays").join(overlay);
    let out = if on_path("kubectl") {
        Command::new("kubectl").arg("kustomize").arg(&dir).output()
    } else if on_path("kustomize") {
        Command::new("kustomize").arg("build").arg(&dir).output()
    } else {
        crate::support::tool_missing(
            "deploy rendering",
            "neither kubectl nor kustomize is installed; deploy/ was not rendered",
        );
        return None;
    }
    .unwrap();
    assert!(
        out.status.success(),
        "rendering {overlay} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn docs(yaml: &str) -> Vec<Value> {
    parse_documents(
        yaml,
        YamlLimits {
            max_nodes: 1_000_000,
            max_depth: 64,
        },
    )
    .unwrap()
    .into_iter()
    .map(|d| d.value)
    .filter(|v| !v.is_null())
    .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> Option<&'a Value> {
    objs.iter().find(|o| o["kind"] == kind)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What both modes share.
fn check_common(objs: &[Value], mode: &str) {
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(find(objs, kind).is_some(), "{mode}: no {kind}");
    }
    for o in objs.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(o["metadata"]["namespace"], "legate", "{mode}: {o}");
    }
    let dep = find(objs, "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{mode}");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let args = strs(&c["args"]);
    assert_eq!(args[0], "run");
    assert!(
        // Loopback included, so `kubectl port-forward` reaches `legate status`.
        args.contains(&"--admin-listen=0.0.0.0:8877".to_string()),
        "{args:?}"
    );
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    assert_eq!(
        var("POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        var("LEGATE_ADMIN_TOKEN").unwrap()["valueFrom"]["secretKeyRef"]["name"],
        "legate-admin"
    );
    let ports: Vec<&Value> = c["ports"].as_array().unwrap().iter().collect();
    assert!(ports
        .iter()
        .any(|p| p["name"] == "admin" && p["containerPort"] == 8877));
    // The Service does not expose the admin port.
    let svc = find(objs, "Service").unwrap();
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["targetPort"] != "admin"));
    let sel = &dep["spec"]["selector"]["matchLabels"];
    let pdb = find(objs, "PodDisruptionBudget").unwrap();
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&sel[k], v, "{mode}: the PDB does not select the pods");
    }
    let hpa = find(objs, "HorizontalPodAutoscaler").unwrap();
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_i64().unwrap() >= 2);
}

#[test]
fn deploy_git_mode_renders_with_no_api_access() {
    let Some(text) = render("git-mode") else {
        return;
    };
    let objs = docs(&text);
    check_common(&objs, "git-mode");
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        assert!(find(&objs, kind).is_none(), "git mode needs no {kind}");
    }
    assert_eq!(
        find(&objs, "ServiceAccount").unwrap()["automountServiceAccountToken"],
        false
    );
    let pod = &find(&objs, "Deployment").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    let args = strs(&pod["containers"][0]["args"]);
    assert!(args.iter().any(|a| a.starts_with("--repo=")), "{args:?}");
    assert!(!args.iter().any(|a| a == "--kubernetes"));
    // TLS Secrets are mounted where --secrets-dir reads them: <dir>/<secret>/tls.{crt,key}.
    let dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--secrets-dir="))
        .expect("--secrets-dir");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .expect("a volume at --secrets-dir");
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let sources = vol["projected"]["sources"]
        .as_array()
        .expect("projected Secrets");
    for s in sources {
        let name = s["secret"]["name"].as_str().unwrap();
        let paths: Vec<&str> = s["secret"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [format!("{name}/tls.crt"), format!("{name}/tls.key")],
            "{s}"
        );
    }
    // The cache lives on the pod's volume, not the read-only root filesystem.
    let cache = args
        .iter()
        .find_map(|a| a.strip_prefix("--cache-dir="))
        .expect("--cache-dir");
    assert!(pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| cache.starts_with(m["mountPath"].as_str().unwrap())));
}

#[test]
fn deploy_kube_mode_renders_with_least_privilege_rbac() {
    let Some(text) = render("kube-mode") else {
        return;
    };
    let objs = docs(&text);
    check_common(&objs, "kube-mode");
    assert!(
        find(&objs, "ClusterRole").is_none(),
        "namespace mode needs no ClusterRole"
    );
    let role = find(&objs, "Role").unwrap();
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    grants.push((g.clone(), r.clone(), v));
                }
            }
        }
    }
    let has = |g: &str, r: &str, v: &str| {
        grants
            .iter()
            .any(|(gg, rr, vv)| gg == g && rr == r && vv == v)
    };
    for r in [
        "mappings",
        "hosts",
        "routetests",
        "authservices",
        "jwtpolicies",
        "ratelimits",
    ] {
        for v in ["get", "list", "watch"] {
            assert!(has("legate.dev", r, v), "missing {v} {r}");
        }
        assert!(has("legate.dev", &format!("{r}/status"), "patch"));
    }
    for v in ["get", "list", "watch"] {
        assert!(has("", "secrets", v));
    }
    for v in ["get", "create", "update"] {
        assert!(has("coordination.k8s.io", "leases", v));
    }
    // Least privilege: no wildcards, no writes beyond status patches and the Lease.
    for (g, r, v) in &grants {
        assert!(
            g != "*" && r != "*" && v != "*",
            "wildcard grant {g} {r} {v}"
        );
        let write = !matches!(v.as_str(), "get" | "list" | "watch");
        if write {
            assert!(
                (r.ends_with("/status") && v == "patch")
                    || (g == "coordination.k8s.io" && r == "leases"),
                "unexpected write grant: {v} {g}/{r}"
            );
        }
        assert!(r != "secrets" || !write, "secrets must stay read-only");
    }
    let binding = find(&objs, "RoleBinding").unwrap();
    assert_eq!(binding["subjects"][0]["name"], "legate");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let pod = &find(&objs, "Deployment").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], true);
    let args = strs(&pod["containers"][0]["args"]);
    assert!(args.contains(&"--kubernetes".to_string()), "{args:?}");
    assert!(args.contains(&"--namespace=$(POD_NAMESPACE)".to_string()));
    assert!(!args.iter().any(|a| a.starts_with("--repo")));
}

/// `kubernetes-validate` (PyPI), which carries the Kubernetes OpenAPI schemas and runs offline.
fn validator() -> Option<PathBuf> {
    if on_path("kubernetes-validate") {
        return Some(PathBuf::from("kubernetes-validate"));
    }
    crate::support::tool_missing(
        "kubernetes-validate",
        "kubernetes-validate is not installed (pip install kubernetes-validate); \
         the rendered manifests were not schema-checked",
    );
    None
}

fn validate(files: &[&Path]) {
    let Some(bin) = validator() else { return };
    let out = Command::new(bin)
        .arg("--strict")
        .arg("--quiet")
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate rejected the manifests:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn deploy_rendered_manifests_and_crds_pass_kubernetes_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for overlay in ["git-mode", "kube-mode"] {
        let Some(text) = render(overlay) else { return };
        let path = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    for e in std::fs::read_dir(root().join("deploy/crds")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            files.push(p);
        }
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    validate(&refs);
}

#[test]
fn deploy_dockerfile_is_multi_stage_and_non_root() {
    // No container engine runs here: this checks the file's shape, not that it builds.
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let froms = text
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .count();
    assert!(froms >= 2, "not multi-stage");
    let user = text
        .lines()
        .rev()
        .find(|l| l.trim_start().to_ascii_uppercase().starts_with("USER "))
        .expect("no USER");
    let who = user.split_whitespace().nth(1).unwrap();
    assert!(
        who != "root" && who != "0" && !who.starts_with("0:"),
        "{user}"
    );
    assert!(text.contains("ENTRYPOINT"));
}

/// `promtool` (Debian package `prometheus`), or `None` after saying why (a failure under CI).
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some("promtool");
    }
    crate::support::tool_missing(
        "deploy/monitoring",
        "promtool is not installed (Debian package `prometheus`)",
    );
    None
}

fn monitoring() -> PathBuf {
    root().join("deploy/monitoring")
}

/// The alerting rules hold against synthetic series (`legate-rules.test.yaml`).
#[test]
fn deploy_alert_rules_pass_promtool_tests() {
    let Some(p) = promtool() else { return };
    for args in [
        vec!["check", "rules", "legate-rules.yaml"],
        vec!["test", "rules", "legate-rules.test.yaml"],
    ] {
        let o = Command::new(p)
            .args(&args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Every `legate_*` name in `text`, with a histogram's `_bucket`/`_sum`/`_count` kept.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let re = regex::Regex::new(r"\blegate_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

/// The dashboard's queries are valid PromQL (checked by promtool as recording rules, with
/// Grafana's variables filled in) and, like the alerting rules, use only metrics a running
/// gateway exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_dashboard_and_rules_use_only_exported_metrics() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let rules = std::fs::read_to_string(monitoring().join("legate-rules.yaml")).unwrap();

    // A real gateway, one request through it, then its exposition.
    let (echo, http, admin) = (
        crate::support::free_addr(),
        crate::support::free_addr(),
        crate::support::free_addr(),
    );
    let tree = crate::support::Tree::new(&crate::support::mapping(
        "echo",
        &format!("hostname: '*'\nprefix: /echo/\nservice: {echo}\nrewrite: /"),
    ));
    let _gw = crate::support::Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .args(["--dir", tree.path().to_str().unwrap()])
            .args(["--demo-echo", &echo.to_string()])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0", "--access-log", "off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && crate::support::get(&format!("http://{admin}/readyz"), &[])
                .await
                .status
                == 200
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = crate::support::get(&format!("http://{http}/echo/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = crate::support::get(&format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(m.status, 200);
    let exported = m.body;
    let exported = metric_names(&exported);
    for (what, text) in [("dashboard", exprs.join("\n")), ("rules", rules)] {
        let unknown: Vec<_> = metric_names(&text)
            .into_iter()
            .filter(|n| !exported.contains(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "the {what} query metrics the gateway does not export: {unknown:?}\nexported: {exported:?}"
        );
    }

    // PromQL syntax: the queries as recording rules, variables filled in.
    let Some(p) = promtool() else { return };
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        if e.starts_with("label_values(") {
            continue; // a Grafana function, not PromQL
        }
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$route", ".*");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dash.yaml"), file).unwrap();
    let o = Command::new(p)
        .args(["check", "rules", "dash.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
