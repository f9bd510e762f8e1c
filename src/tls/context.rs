//! Per-Host TLS settings (Emissary's TLSContext fields) as plain values, the names they accept,
//! and the rustls server configs built from them.
//!
//! Owns: the table of cipher-suite, curve, version and ALPN names Legate accepts (rustls's ring
//! set), and turning a [`TlsPolicy`] plus the Secrets it names into a `ServerConfig`. Must not
//! bind sockets; reading a Secret goes through [`super::SecretStore`].

use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider, SupportedKxGroup};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

use super::{SecretStore, TlsError};
pub use crate::routes::tls::{TlsPolicy, TlsVersion};
use crate::routes::OriginTls;

/// TLS 1.2 suites by their OpenSSL/Envoy names (TLS 1.3 suites are not configurable in Envoy,
/// and rustls always offers all three of them).
fn tls12_suites() -> [(&'static str, SupportedCipherSuite); 6] {
    use ring::cipher_suite as cs;
    [
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ]
}

fn curves() -> [(&'static str, &'static dyn SupportedKxGroup); 3] {
    use ring::kx_group as kx;
    [
        ("X25519", kx::X25519),
        ("P-256", kx::SECP256R1),
        ("P-384", kx::SECP384R1),
    ]
}

/// ALPN protocols Legate's listener speaks.
pub const ALPN: [&str; 2] = ["h2", "http/1.1"];

/// The cipher-suite names accepted in `cipher_suites`.
pub fn cipher_suite_names() -> Vec<&'static str> {
    tls12_suites().iter().map(|(n, _)| *n).collect()
}

/// The curve names accepted in `ecdh_curves`.
pub fn curve_names() -> Vec<&'static str> {
    curves().iter().map(|(n, _)| *n).collect()
}

/// One `cipher_suites` entry in canonical form, or `None` if rustls has no such suite. Envoy's
/// equal-preference groups (`[A|B]`) are accepted and split by the caller.
pub fn canonical_suite(name: &str) -> Option<&'static str> {
    let n = name.trim();
    tls12_suites()
        .iter()
        .find(|(k, s)| k.eq_ignore_ascii_case(n) || format!("{:?}", s.suite()) == n)
        .map(|(k, _)| *k)
}

/// One `ecdh_curves` entry in canonical form (OpenSSL aliases accepted).
pub fn canonical_curve(name: &str) -> Option<&'static str> {
    match name.trim().to_ascii_lowercase().as_str() {
        "x25519" => Some("X25519"),
        "p-256" | "secp256r1" | "prime256v1" => Some("P-256"),
        "p-384" | "secp384r1" => Some("P-384"),
        _ => None,
    }
}

/// The server config of a Host with its own TLS settings, serving `key` (the Host's certificate,
/// or the default one).
pub fn server_config(
    policy: &TlsPolicy,
    key: Option<Arc<CertifiedKey>>,
    store: &SecretStore,
) -> Result<rustls::ServerConfig, TlsError> {
    let base = ring::default_provider();
    let mut provider = CryptoProvider {
        cipher_suites: base.cipher_suites.clone(),
        kx_groups: base.kx_groups.clone(),
        ..base
    };
    if !policy.cipher_suites.is_empty() {
        let wanted: Vec<SupportedCipherSuite> = tls12_suites()
            .into_iter()
            .filter(|(n, _)| policy.cipher_suites.iter().any(|w| w == n))
            .map(|(_, s)| s)
            .collect();
        provider.cipher_suites.retain(|s| match s {
            SupportedCipherSuite::Tls13(_) => true,
            SupportedCipherSuite::Tls12(_) => wanted.contains(s),
        });
    }
    if !policy.ecdh_curves.is_empty() {
        provider.kx_groups = curves()
            .into_iter()
            .filter(|(n, _)| policy.ecdh_curves.iter().any(|w| w == n))
            .map(|(_, g)| g)
            .collect();
    }
    let versions = versions(policy);
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|source| TlsError::Key {
            name: policy.context.clone().unwrap_or_else(|| "tls".into()),
            source,
        })?;
    let builder = match &policy.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = store.load_ca(&ca.name)?;
            let crls = match &policy.crl {
                Some(c) => store.load_crl(&c.name)?,
                None => Vec::new(),
            };
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls);
            if !policy.cert_required {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| TlsError::Verifier {
                name: ca.name.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(Fixed(key)));
    cfg.alpn_protocols = if policy.alpn.is_empty() {
        ALPN.iter().map(|p| p.as_bytes().to_vec()).collect()
    } else {
        policy.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
    };
    Ok(cfg)
}

/// rustls speaks TLS 1.2 and 1.3; `compile` has already refused a range with neither.
fn versions(policy: &TlsPolicy) -> Vec<&'static SupportedProtocolVersion> {
    let min = policy.min_version.unwrap_or(TlsVersion::V1_2);
    let max = policy.max_version.unwrap_or(TlsVersion::V1_3);
    let mut out = Vec::new();
    if min <= TlsVersion::V1_3 && max >= TlsVersion::V1_3 {
        out.push(&rustls::version::TLS13);
    }
    if min <= TlsVersion::V1_2 && max >= TlsVersion::V1_2 {
        out.push(&rustls::version::TLS12);
    }
    out
}

/// Serves one certificate, whatever the SNI (the SNI already chose this config).
#[derive(Debug)]
struct Fixed(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// The client config of a Mapping's `tls: NAME`: the context's `secret` as the client
/// certificate, its `ca_secret` as the only trusted CA (else the default roots and
/// `--upstream-ca`).
pub fn origin_config(
    spec: &OriginTls,
    store: &SecretStore,
    extra_ca: Option<&std::path::Path>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Key {
            name: spec.context.clone(),
            source,
        })?;
    let builder = match &spec.ca {
        Some(ca) => builder.with_root_certificates(store.load_ca(&ca.name)?),
        None => builder.with_root_certificates(super::default_roots(extra_ca)?),
    };
    let mut cfg = match &spec.client_cert {
        Some(secret) => {
            // Read now, so an unusable secret fails the route at once (and is watched for
            // changes); then re-read at each handshake whose files changed since.
            let (crt, key) = store.paths(&secret.name)?;
            store.load_client_pair(&secret.name)?;
            let first = super::load_pair(&secret.name, &crt, &key)?;
            builder.with_client_cert_resolver(Arc::new(ReloadingClientCert {
                name: secret.name.clone(),
                stamp: std::sync::Mutex::new((
                    (super::mtime(&crt), super::mtime(&key)),
                    Arc::new(first),
                )),
                crt,
                key,
            }))
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// An origination client certificate read from its secret's files, re-read when they change
/// (a rotated certificate is used from the next handshake on, without a new revision). A
/// rotation that leaves the files unreadable keeps the last good pair.
#[derive(Debug)]
struct ReloadingClientCert {
    name: String,
    crt: std::path::PathBuf,
    key: std::path::PathBuf,
    stamp: std::sync::Mutex<(super::Stamp, Arc<CertifiedKey>)>,
}

impl rustls::client::ResolvesClientCert for ReloadingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let now = (super::mtime(&self.crt), super::mtime(&self.key));
        let mut cur = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != now {
            match super::load_pair(&self.name, &self.crt, &self.key) {
                Ok(k) => *cur = (now, Arc::new(k)),
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "origination client certificate unreadable after a change; the last good one is used");
                }
            }
        }
        Some(cur.1.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config that trusts no server: connections through it always fail.
pub fn refusing_client_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}
