//! Emissary's TLSContext and a Host's inline `tls` block (the same fields): read, checked and
//! compiled into a [`TlsPolicy`]. Pure: no Secret is read here (preflight and `tls` do that).

use serde::Deserialize;
use serde_json::Value;

use super::diag::Diagnostic;
use super::model::Resource;
use crate::routes::SecretRef;
use crate::tls::context::{self, TlsPolicy, TlsVersion};

/// The fields of a TLSContext spec (a Host's `tls` block has the same ones but `hosts`/`secret`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct TlsFields {
    pub ambassador_id: Option<Value>,
    pub hosts: Vec<String>,
    pub secret: Option<String>,
    pub cert_chain_file: Option<String>,
    pub private_key_file: Option<String>,
    pub ca_secret: Option<String>,
    pub cacert_chain_file: Option<String>,
    pub crl_secret: Option<String>,
    pub alpn_protocols: Option<String>,
    pub cert_required: Option<bool>,
    pub min_tls_version: Option<String>,
    pub max_tls_version: Option<String>,
    pub cipher_suites: Vec<String>,
    pub ecdh_curves: Vec<String>,
    pub secret_namespacing: Option<bool>,
    pub redirect_cleartext_from: Option<i64>,
    pub sni: Option<String>,
}

/// Compile the fields found at `base` (`/spec` of a TLSContext, `/spec/tls` of a Host) of `r`.
/// Errors go to `diags`; `None` when any field is unusable.
pub fn compile_policy(
    r: &Resource,
    base: &str,
    f: &TlsFields,
    context_name: Option<&str>,
    diags: &mut Vec<Diagnostic>,
) -> Option<TlsPolicy> {
    let at = |field: &str| r.at(&format!("{base}/{field}"));
    let before = diags.len();
    let version = |field: &str, v: &Option<String>, diags: &mut Vec<Diagnostic>| {
        let v = v.as_deref()?;
        let parsed = TlsVersion::parse(v);
        if parsed.is_none() {
            diags.push(
                Diagnostic::error(
                    "tls-version",
                    &at(field),
                    format!("`{field}: {v}` is not a TLS version"),
                )
                .with_help("use one of v1.2, v1.3 (rustls does not speak v1.0 or v1.1)"),
            );
        }
        parsed
    };
    let mut min = version("min_tls_version", &f.min_tls_version, diags);
    let max = version("max_tls_version", &f.max_tls_version, diags);
    if min.is_some_and(|m| m < TlsVersion::V1_2) {
        diags.push(
            Diagnostic::warning(
                "tls-version-floor",
                &at("min_tls_version"),
                "rustls speaks TLS 1.2 and 1.3 only, so the lowest version accepted is v1.2",
            )
            .with_help("write `min_tls_version: v1.2` to say what is served"),
        );
        min = Some(TlsVersion::V1_2);
    }
    if max.is_some_and(|m| m < TlsVersion::V1_2) {
        diags.push(
            Diagnostic::error(
                "tls-version",
                &at("max_tls_version"),
                "rustls speaks TLS 1.2 and 1.3 only; a maximum below v1.2 leaves no version",
            )
            .with_help("use `max_tls_version: v1.2` or `v1.3`"),
        );
    }
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi {
            diags.push(Diagnostic::error(
                "tls-version",
                &at("min_tls_version"),
                "`min_tls_version` is above `max_tls_version`: no version is left",
            ));
        }
    }
    let mut suites = Vec::new();
    for (i, entry) in f.cipher_suites.iter().enumerate() {
        // Envoy's equal-preference group `[A|B]`: rustls has no such groups, so each member is
        // taken in order.
        for name in entry.trim_matches(|c| c == '[' || c == ']').split('|') {
            match context::canonical_suite(name) {
                Some(n) => suites.push(n.to_string()),
                None => diags.push(
                    Diagnostic::error(
                        "tls-cipher-suite",
                        &at(&format!("cipher_suites/{i}")),
                        format!("cipher suite `{}` is not one rustls supports", name.trim()),
                    )
                    .with_help(format!(
                        "use some of: {} (TLS 1.3 suites are always offered and cannot be chosen, as in Envoy)",
                        context::cipher_suite_names().join(", ")
                    )),
                ),
            }
        }
    }
    let mut curves = Vec::new();
    for (i, name) in f.ecdh_curves.iter().enumerate() {
        match context::canonical_curve(name) {
            Some(n) => curves.push(n.to_string()),
            None => diags.push(
                Diagnostic::error(
                    "tls-curve",
                    &at(&format!("ecdh_curves/{i}")),
                    format!("ECDH curve `{name}` is not one rustls supports"),
                )
                .with_help(format!(
                    "use some of: {}",
                    context::curve_names().join(", ")
                )),
            ),
        }
    }
    let mut alpn = Vec::new();
    for p in f.alpn_protocols.iter().flat_map(|s| s.split(',')) {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        if context::ALPN.contains(&p) {
            alpn.push(p.to_string());
        } else {
            diags.push(
                Diagnostic::error(
                    "tls-alpn",
                    &at("alpn_protocols"),
                    format!("ALPN protocol `{p}` is not one the gateway speaks"),
                )
                .with_help(format!("use some of: {}", context::ALPN.join(", "))),
            );
        }
    }
    let secret = |name: &Option<String>| {
        name.as_ref().filter(|n| !n.is_empty()).map(|n| SecretRef {
            namespace: r.namespace.clone(),
            name: n.clone(),
        })
    };
    let client_ca = secret(&f.ca_secret);
    let crl = secret(&f.crl_secret);
    if client_ca.is_none() && f.cert_required == Some(true) {
        diags.push(
            Diagnostic::error(
                "tls-cert-required",
                &at("cert_required"),
                "`cert_required: true` needs a `ca_secret` to verify client certificates with",
            )
            .with_help("name the Secret holding the client CA in `ca_secret`"),
        );
    }
    if client_ca.is_none() && crl.is_some() {
        diags.push(Diagnostic::error(
            "tls-crl",
            &at("crl_secret"),
            "`crl_secret` applies to client certificates, which are only checked with a `ca_secret`",
        ));
    }
    // A TLSContext's own fields get the schema's "not implemented" warning; inside a Host's
    // `tls` block the schema marks nothing, so the same warning is given here.
    let files = [
        ("cert_chain_file", &f.cert_chain_file),
        ("private_key_file", &f.private_key_file),
        ("cacert_chain_file", &f.cacert_chain_file),
    ];
    for (field, set) in files {
        if set.is_some() && base != "/spec" {
            diags.push(
                Diagnostic::warning(
                    "not-implemented",
                    &at(field),
                    format!("`{field}` names a file inside Emissary's pod; Legate reads certificates only from Secrets, so it is ignored"),
                )
                .with_help("put the PEM in a Secret under --secrets-dir and use `ca_secret` (a Host: `tlsSecret`)"),
            );
        }
    }
    if f.secret_namespacing.is_some() && base != "/spec" {
        diags.push(
            Diagnostic::warning(
                "tls-secret-namespacing",
                &at("secret_namespacing"),
                "`secret_namespacing` is ignored: a secret name is always a directory under --secrets-dir",
            ),
        );
    }
    if diags[before..]
        .iter()
        .any(|d| d.severity == super::Severity::Error)
    {
        return None;
    }
    Some(TlsPolicy {
        context: context_name.map(str::to_string),
        min_version: min,
        max_version: max,
        cipher_suites: suites,
        ecdh_curves: curves,
        alpn,
        client_ca,
        cert_required: f.cert_required.unwrap_or(false),
        crl,
    })
}

/// Where a `redirect_cleartext_from` or `sni` set for serving is explained.
pub fn serving_notes(r: &Resource, base: &str, f: &TlsFields, diags: &mut Vec<Diagnostic>) {
    if f.sni.is_some() {
        diags.push(
            Diagnostic::note(
                "tls-sni-origination",
                &r.at(&format!("{base}/sni")),
                "`sni` is the name sent to upstreams by Mappings with `tls:` naming this context; Hosts are chosen by their hostname",
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_and_compile, MemTree, Options, Outcome, Severity};

    fn run(text: &str) -> Outcome {
        load_and_compile(&MemTree::new().with("t.yaml", text), &Options::default())
    }

    fn ctx(spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!("---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: c\nspec:\n{spec}")
    }

    fn host(spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!("---\napiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hostname: a.test\n  tlsSecret: {{name: s}}\n{spec}")
    }

    fn errors(o: &Outcome) -> Vec<String> {
        o.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| format!("{} {}", d.code, d.help.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn unsupported_cipher_and_curve_names_list_the_supported_ones() {
        let o = run(&ctx(
            "cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256, DES-CBC3-SHA]\necdh_curves: [X448]",
        ));
        let e = errors(&o);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("tls-cipher-suite") && e[0].contains("ECDHE-ECDSA-CHACHA20-POLY1305"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("tls-curve") && e[1].contains("X25519, P-256, P-384"),
            "{e:?}"
        );
    }

    #[test]
    fn host_settings_come_from_tls_then_tlscontext_then_hosts_list() {
        let o =
            run(&(ctx("hosts: [a.test]\nmin_tls_version: v1.3\nalpn_protocols: h2") + &host("")));
        let g = o.graph.expect("valid");
        let p = g.hosts[0].tls.as_ref().expect("context found by hosts");
        assert_eq!(p.context.as_deref(), Some("c"));
        assert_eq!(p.alpn, vec!["h2".to_string()]);

        let o = run(&host("tls:\n  max_tls_version: v1.2\n  cipher_suites: ['[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]']"));
        let g = o.graph.expect("valid");
        let p = g.hosts[0].tls.as_ref().unwrap();
        assert_eq!(p.cipher_suites.len(), 2);

        let o = run(&(ctx("min_tls_version: v1.2")
            + &host("tls: {min_tls_version: v1.3}\ntlsContext: {name: c}")));
        assert!(
            errors(&o)[0].starts_with("tls-and-tlscontext"),
            "{:?}",
            errors(&o)
        );
        let o = run(&host("tlsContext: {name: missing}"));
        assert!(errors(&o)[0].starts_with("unknown-tlscontext"));
        let o = run(&(ctx("secret: other") + &host("tlsContext: {name: c}")));
        assert!(errors(&o)[0].starts_with("tls-secret-mismatch"));
    }

    #[test]
    fn versions_and_client_auth_are_checked() {
        let o = run(&host("tls: {max_tls_version: v1.1}"));
        assert!(errors(&o)[0].starts_with("tls-version"));
        let o = run(&host("tls: {min_tls_version: v1.3, max_tls_version: v1.2}"));
        assert!(errors(&o)[0].starts_with("tls-version"));
        let o = run(&host("tls: {min_tls_version: v1.0}"));
        assert!(errors(&o).is_empty());
        assert!(o.diagnostics.iter().any(|d| d.code == "tls-version-floor"));
        let o = run(&host("tls: {cert_required: true}"));
        assert!(errors(&o)[0].starts_with("tls-cert-required"));
        let o = run(&host("tls: {alpn_protocols: 'h2,h3'}"));
        assert!(errors(&o)[0].starts_with("tls-alpn"));
        let o = run("---\napiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hostname: a.test\n  tls: {min_tls_version: v1.3}\n");
        assert!(o
            .diagnostics
            .iter()
            .any(|d| d.code == "tls-settings-without-certificate"));
    }
}
