//! TLS termination: certificates from Kubernetes-style mounted Secrets and the rustls resolver
//! that picks one per handshake by SNI.
//!
//! Owns: reading `<secrets-dir>/<name>/tls.{crt,key}` (with an mtime cache, so a rotated Secret
//! is noticed without a commit), the per-graph [`CertTable`] (one certificate per Host, plus the
//! default), and the rustls `ServerConfig`. Must not bind sockets or rebuild listeners: the
//! proxy swaps a new table in with its snapshot and the resolver reads whatever is current.
//! A Host with its own TLS settings (`context`) gets its own `ServerConfig`, chosen per
//! ClientHello by SNI ([`CertTable::config_for`]).

pub mod acme;
pub mod cert;
pub mod context;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::routes::Graph;

/// Why a Secret's certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no --secrets-dir is configured, so secret `{0}` cannot be read")]
    NoSecretsDir(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("{path} holds no usable PEM private key")]
    NoKey { path: PathBuf },
    #[error("secret `{name}`: {source}")]
    Key { name: String, source: rustls::Error },
    #[error("{path} holds no PEM certificate revocation list")]
    NoCrl { path: PathBuf },
    #[error("CA secret `{name}` cannot verify client certificates: {reason}")]
    Verifier { name: String, reason: String },
}

/// Modification times of `tls.crt` and `tls.key`.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

#[derive(Clone)]
struct Cached {
    stamp: Stamp,
    key: Arc<CertifiedKey>,
}

/// Reads Secrets from disk and remembers what it read, keyed by secret name.
pub struct SecretStore {
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, Cached>>,
    /// CA and CRL files read for client-certificate checks, with their modification times.
    others: Mutex<HashMap<PathBuf, Option<SystemTime>>>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    // `metadata` follows symlinks: Kubernetes swaps a `..data` symlink on rotation.
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl SecretStore {
    pub fn new(dir: Option<PathBuf>) -> SecretStore {
        SecretStore {
            dir,
            cache: Mutex::new(HashMap::new()),
            others: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn paths(&self, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| TlsError::NoSecretsDir(name.to_string()))?;
        let d = dir.join(name);
        Ok((d.join("tls.crt"), d.join("tls.key")))
    }

    /// The certificate of secret `name`, from the cache when its files did not change.
    pub fn load(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let (crt, key) = self.paths(name)?;
        let stamp = (mtime(&crt), mtime(&key));
        if let Some(c) = self.lock().get(name) {
            if c.stamp == stamp && stamp.0.is_some() {
                return Ok(c.key.clone());
            }
        }
        let loaded = Arc::new(load_pair(name, &crt, &key)?);
        self.lock().insert(
            name.to_string(),
            Cached {
                stamp,
                key: loaded.clone(),
            },
        );
        Ok(loaded)
    }

    /// The CA certificates of secret `name`: its `ca.crt`, else its `tls.crt` (Emissary keeps
    /// a `ca_secret`'s CA in `tls.crt`).
    pub fn load_ca(&self, name: &str) -> Result<rustls::RootCertStore, TlsError> {
        let dir = self.secret_dir(name)?;
        let ca = dir.join("ca.crt");
        let path = if ca.exists() { ca } else { dir.join("tls.crt") };
        let pem = self.read_other(&path)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(TlsError::NoCert { path });
        }
        Ok(roots)
    }

    /// The revocation lists in `crl.pem` of secret `name`.
    pub fn load_crl(
        &self,
        name: &str,
    ) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsError> {
        let path = self.secret_dir(name)?.join("crl.pem");
        let pem = self.read_other(&path)?;
        let crls: Vec<_> = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .collect();
        if crls.is_empty() {
            return Err(TlsError::NoCrl { path });
        }
        Ok(crls)
    }

    /// The client certificate and key (`tls.crt`/`tls.key`) of secret `name`, for origination.
    pub fn load_client_pair(
        &self,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let (crt, key) = self.paths(name)?;
        let crt_pem = self.read_other(&crt)?;
        let key_pem = self.read_other(&key)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt_pem)
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(TlsError::NoCert { path: crt });
        }
        let key_der =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey { path: key })?;
        Ok((certs, key_der))
    }

    fn secret_dir(&self, name: &str) -> Result<PathBuf, TlsError> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| TlsError::NoSecretsDir(name.to_string()))?;
        Ok(dir.join(name))
    }

    /// Read a file and remember its modification time, so [`SecretStore::changed`] sees a
    /// rotated CA or CRL.
    fn read_other(&self, path: &Path) -> Result<Vec<u8>, TlsError> {
        let stamp = mtime(path);
        let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), stamp);
        Ok(bytes)
    }

    /// Whether a cached secret's files changed on disk since they were read.
    pub fn changed(&self) -> bool {
        let others_changed = self
            .others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(p, stamp)| mtime(p) != *stamp);
        if others_changed {
            return true;
        }
        let names: Vec<(String, Stamp)> = self
            .lock()
            .iter()
            .map(|(n, c)| (n.clone(), c.stamp))
            .collect();
        names
            .into_iter()
            .any(|(name, stamp)| match self.paths(&name) {
                Ok((crt, key)) => (mtime(&crt), mtime(&key)) != stamp,
                Err(_) => false,
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn load_pair(name: &str, crt: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let crt_pem = read(crt)?;
    let key_pem = read(key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: crt.to_path_buf(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        path: key.to_path_buf(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key_der, &provider).map_err(|source| TlsError::Key {
        name: name.to_string(),
        source,
    })
}

/// The server config a Host's handshakes use.
#[derive(Clone)]
enum HostConfig {
    /// The listener's own config (no TLS settings on the Host).
    Listener,
    Own(Arc<rustls::ServerConfig>),
    /// The Host's settings could not be applied (a CA or CRL Secret is unreadable): its
    /// handshakes fail rather than skip a client-certificate check.
    Broken,
}

/// The certificates of one graph: one per Host (by index in `Graph::hosts`) and the default.
#[derive(Default, Clone)]
pub struct CertTable {
    by_host: Vec<Option<Arc<CertifiedKey>>>,
    configs: Vec<HostConfig>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertTable")
            .field(
                "hosts",
                &self.by_host.iter().filter(|c| c.is_some()).count(),
            )
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl CertTable {
    /// Load (or reuse) the certificate of every Host with a `tlsSecret`. A Secret that cannot be
    /// read is logged and leaves its Host without a certificate (its handshakes fail or get the
    /// default), so one bad Secret never takes the others down.
    pub fn build(graph: &Graph, store: &SecretStore, default: Option<&str>) -> CertTable {
        let by_host = graph
            .hosts
            .iter()
            .map(|h| {
                let secret = h.tls_secret.as_ref()?;
                match store.load(&secret.name) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        tracing::error!(host = %h.hostname, error = %e, "TLS certificate unavailable");
                        None
                    }
                }
            })
            .collect();
        let default = default.and_then(|name| match store.load(name) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %e, "default TLS certificate unavailable");
                None
            }
        });
        let by_host: Vec<Option<Arc<CertifiedKey>>> = by_host;
        let configs = graph
            .hosts
            .iter()
            .zip(&by_host)
            .map(|(h, key)| {
                let Some(policy) = &h.tls else {
                    return HostConfig::Listener;
                };
                let key = key.clone().or_else(|| default.clone());
                match context::server_config(policy, key, store) {
                    Ok(c) => HostConfig::Own(Arc::new(c)),
                    Err(e) => {
                        tracing::error!(host = %h.hostname, error = %e, "Host TLS settings unavailable; its handshakes fail");
                        HostConfig::Broken
                    }
                }
            })
            .collect();
        CertTable {
            by_host,
            configs,
            default,
        }
    }

    /// The state of each TLS Host's certificate: its `notAfter` (Unix seconds) when loaded.
    pub fn states(&self, graph: &Graph) -> Vec<crate::metrics::CertState> {
        graph
            .hosts
            .iter()
            .zip(&self.by_host)
            .filter_map(|(h, k)| {
                let secret = h.tls_secret.as_ref()?;
                let not_after = k
                    .as_ref()
                    .and_then(|k| k.cert.first())
                    .and_then(|leaf| cert::not_after(leaf));
                Some(crate::metrics::CertState {
                    host: h.hostname.to_string(),
                    secret: secret.name.clone(),
                    state: if k.is_some() { "loaded" } else { "unavailable" },
                    not_after,
                    acme: None,
                })
            })
            .collect()
    }

    /// The server config for a ClientHello with this SNI: `Ok(None)` for the listener's own,
    /// `Err(())` when the Host's TLS settings could not be applied (refuse the handshake).
    #[allow(clippy::result_unit_err)]
    pub fn config_for(
        &self,
        graph: &Graph,
        sni: Option<&str>,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ()> {
        let lower = sni.map(str::to_ascii_lowercase);
        let Some(i) = graph.host_for_sni(lower.as_deref()) else {
            return Ok(None);
        };
        match self.configs.get(i) {
            Some(HostConfig::Own(c)) => Ok(Some(c.clone())),
            Some(HostConfig::Broken) => Err(()),
            Some(HostConfig::Listener) | None => Ok(None),
        }
    }

    /// The certificate for a handshake with this SNI (`None`: the client sent none): the TLS
    /// Host whose hostname (without port) best matches it, else a `*` TLS Host, else the
    /// `--default-cert`; with none of them the handshake fails, as in Emissary.
    pub fn resolve(&self, graph: &Graph, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let lower;
        let sni = match sni {
            Some(n) if n.bytes().any(|b| b.is_ascii_uppercase()) => {
                lower = n.to_ascii_lowercase();
                Some(lower.as_str())
            }
            other => other,
        };
        if let Some(i) = graph.host_for_sni(sni) {
            if let Some(Some(k)) = self.by_host.get(i) {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

/// Where the resolver gets the current certificates from.
pub trait CertSource: Send + Sync + fmt::Debug {
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>>;
}

/// The rustls resolver: asks the current snapshot at every handshake.
#[derive(Debug)]
pub struct Resolver(pub Arc<dyn CertSource>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello.server_name())
    }
}

/// The server config of the HTTPS listener: HTTP/2 and HTTP/1.1 by ALPN, ring crypto.
pub fn server_config(source: Arc<dyn CertSource>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(source)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A server config that presents one certificate whatever the SNI, with no ALPN: TLS
/// terminated for a TCPMapping.
pub fn single_cert_config(key: Arc<CertifiedKey>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(key))))
}

/// Always the same certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The roots an upstream's certificate may chain to: the webpki roots plus an optional extra CA
/// bundle (`--upstream-ca`), which must hold at least one certificate.
pub fn default_roots(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
            if roots.add(c).is_ok() {
                n += 1;
            }
        }
        if n == 0 {
            return Err(TlsError::NoCert {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(roots)
}

/// The client config for `https://` upstreams: webpki roots plus an optional extra CA bundle.
pub fn client_config(
    extra_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = default_roots(extra_ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Key {
            name: "client".into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
