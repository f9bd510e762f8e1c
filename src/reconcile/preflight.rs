//! Preflight: checks a compiled revision needs from outside the repository (TLS secret files).
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
        let Spec::Host(h) = &r.spec else { continue };
        let Some(secret) = &h.tls_secret else {
            continue;
        };
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
