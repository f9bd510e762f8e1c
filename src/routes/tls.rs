//! The TLS settings of a Host (Emissary's TLSContext fields) as plain compiled values; the
//! names in them were checked by `config::tlscontext`. `crate::tls::context` builds the rustls
//! configs from them (the graph holds values, `tls` holds what is made of them).

use serde::Serialize;

use super::SecretRef;

/// A TLS protocol version Emissary's fields name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum TlsVersion {
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

impl TlsVersion {
    /// `v1.0` .. `v1.3`, Emissary's spelling.
    pub fn parse(s: &str) -> Option<TlsVersion> {
        match s {
            "v1.0" => Some(TlsVersion::V1_0),
            "v1.1" => Some(TlsVersion::V1_1),
            "v1.2" => Some(TlsVersion::V1_2),
            "v1.3" => Some(TlsVersion::V1_3),
            _ => None,
        }
    }
}

/// The TLS settings of one Host (its `tls` block, its `tlsContext`, or a TLSContext whose
/// `hosts` name it). Every name in it was checked against the tables below by `compile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TlsPolicy {
    /// The TLSContext the settings came from, for messages (`None`: the Host's `tls` block).
    pub context: Option<String>,
    pub min_version: Option<TlsVersion>,
    pub max_version: Option<TlsVersion>,
    /// OpenSSL-style names (`ECDHE-RSA-AES128-GCM-SHA256`); empty: rustls's defaults.
    pub cipher_suites: Vec<String>,
    /// `X25519`, `P-256`, `P-384`; empty: rustls's defaults.
    pub ecdh_curves: Vec<String>,
    /// ALPN protocols offered, in order; empty: `h2`, `http/1.1`.
    pub alpn: Vec<String>,
    /// CA that verifies client certificates (`ca.crt`, else `tls.crt`, of the Secret).
    pub client_ca: Option<SecretRef>,
    /// A client certificate is required (else one is verified when presented).
    pub cert_required: bool,
    /// Revocation list (`crl.pem` of the Secret) checked against client certificates.
    pub crl: Option<SecretRef>,
}
