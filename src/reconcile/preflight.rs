//! Preflight: checks a compiled revision needs from outside the repository (TLS secret files,
//! OIDCLogin secrets).
//! Kept out of `config`, which is pure.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::model::Spec;
use crate::config::{Diagnostic, Resource};

/// Every Host's `tlsSecret` must exist under `dir` as `<name>/tls.crt` and `<name>/tls.key`,
/// parse as PEM, and the key must belong to the certificate.
pub fn check_secrets(resources: &[Resource], dir: &Path) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in resources {
        match &r.spec {
            Spec::TlsContext(f) => check_tls_fields(r, "/spec", f, dir, &mut out),
            Spec::Host(h) => {
                if let Some(f) = &h.tls {
                    check_tls_fields(r, "/spec/tls", f, dir, &mut out);
                }
            }
            Spec::OidcLogin(o) => {
                if let Err(msg) = crate::guard::oidc::read_secrets_checked(&dir.join(&o.secret)) {
                    out.push(
                        Diagnostic::error(
                            "oidc-secret",
                            &r.at("/spec/secret"),
                            format!("OIDCLogin `{}`: {msg}", r.name),
                        )
                        .with_help(format!(
                            "provide {0}/client-secret and {0}/session-keys (one base64 32-byte key per line, e.g. `openssl rand -base64 32`)",
                            dir.join(&o.secret).display()
                        )),
                    );
                }
            }
            _ => {}
        }
        let Spec::Host(h) = &r.spec else { continue };
        let Some(secret) = &h.tls_secret else {
            continue;
        };
        if h.acme_on() {
            // ACME writes this Secret; until then the Host has no certificate, not an error.
            continue;
        }
        let loc = r.at("/spec/tlsSecret/name");
        let base = dir.join(&secret.name);
        let fail = |msg: String| {
            Diagnostic::error("tls-secret", &loc, format!("Host `{}`: {msg}", r.name)).with_help(
                format!(
                    "provide {}/tls.crt and tls.key (PEM), as a mounted Kubernetes Secret would",
                    base.display()
                ),
            )
        };
        match load_pair(&base) {
            Ok(()) => {}
            Err(msg) => out.push(fail(format!("TLS secret `{}` {msg}", secret.name))),
        }
    }
    out
}

/// Load and cross-check one secret directory.
pub fn load_pair(base: &Path) -> Result<(), String> {
    let crt_path = base.join("tls.crt");
    let key_path = base.join("tls.key");
    if !crt_path.exists() {
        return Err(format!("is missing: {} not found", crt_path.display()));
    }
    if !key_path.exists() {
        return Err(format!("is incomplete: {} not found", key_path.display()));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt_path)
        .map_err(|e| format!("has an unreadable tls.crt: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("has a tls.crt that is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("has no certificate in tls.crt".into());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("has a tls.key that is not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("has a tls.key rustls cannot use: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "has a tls.key that does not belong to tls.crt".to_string()
        }
        other => format!("could not be checked: {other}"),
    })
}

/// A TLSContext's (or Host `tls` block's) `secret`, `ca_secret` and `crl_secret` must be
/// readable the way the gateway reads them (see `tls::SecretStore`).
fn check_tls_fields(
    r: &Resource,
    base: &str,
    f: &crate::config::tlscontext::TlsFields,
    dir: &Path,
    out: &mut Vec<Diagnostic>,
) {
    let store = crate::tls::SecretStore::new(Some(dir.to_path_buf()));
    let mut fail = |field: &str, name: &str, msg: String, want: &str| {
        out.push(
            Diagnostic::error(
                "tls-secret",
                &r.at(&format!("{base}/{field}")),
                format!("{} `{}`: `{field}: {name}` {msg}", r.kind.name(), r.name),
            )
            .with_help(format!(
                "provide {} (PEM)",
                dir.join(name).join(want).display()
            )),
        )
    };
    let named = |v: &Option<String>| v.clone().filter(|n| !n.is_empty());
    if let Some(name) = named(&f.secret) {
        if let Err(msg) = load_pair(&dir.join(&name)) {
            fail("secret", &name, msg, "tls.crt and tls.key");
        }
    }
    if let Some(name) = named(&f.ca_secret) {
        if let Err(e) = store.load_ca(&name) {
            fail("ca_secret", &name, format!("is unusable: {e}"), "ca.crt");
        }
    }
    if let Some(name) = named(&f.crl_secret) {
        if let Err(e) = store.load_crl(&name) {
            fail("crl_secret", &name, format!("is unusable: {e}"), "crl.pem");
        }
    }
}
