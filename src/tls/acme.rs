//! ACME (RFC 8555) certificates for Hosts with an `acmeProvider`: orders a certificate by
//! HTTP-01 (instant-acme does the protocol), answers the challenge tokens of its orders in
//! flight on the HTTP listener, and writes the issued pair where the Host's `tlsSecret` points
//! (`<secrets-dir>/<name>/tls.{crt,key}`), where the secret store's reload picks it up.
//!
//! Owns: the account key (`<privateKeySecret>/tls.key`), the per-Host order state shown by
//! `GET /api/certificates` and the metrics, renewal at two thirds of the lifetime, exponential
//! backoff after a failure, and the lock file that keeps replicas sharing a secrets directory
//! from ordering the same certificate. Must not route requests or build TLS configs.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, Key, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::metrics::AcmeStatus;
use crate::routes::{AcmeSpec, Graph};

/// Where HTTP-01 tokens are fetched (RFC 8555 section 8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The lock file in a `tlsSecret` directory while a replica orders its certificate.
const LOCK_FILE: &str = ".acme.lock";
/// A lock older than this is left over from a crashed replica and is taken over.
const STALE_LOCK: Duration = Duration::from_secs(600);
/// First retry delay after a failed order; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// One order may take this long before it counts as failed.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Per-Host bookkeeping between passes.
#[derive(Default)]
struct HostState {
    failures: u32,
    next_attempt: Option<SystemTime>,
}

/// The ACME manager of one gateway process.
pub struct Acme {
    dir: PathBuf,
    /// Extra CA to trust for the ACME directory (`--upstream-ca`).
    ca: Option<PathBuf>,
    metrics: Arc<crate::metrics::Metrics>,
    /// token -> key authorization, for orders in flight.
    tokens: Mutex<HashMap<String, String>>,
    hosts: Mutex<HashMap<String, HostState>>,
    first_backoff: Duration,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("dir", &self.dir).finish()
    }
}

/// Why an order failed, for the status.
type Failure = String;

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) is renewed: at two
/// thirds of its lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// The delay before the next attempt after `failures` failed orders in a row.
pub fn backoff(first: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    first.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Acme {
    pub fn new(
        dir: PathBuf,
        ca: Option<PathBuf>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Acme> {
        Arc::new(Acme {
            dir,
            ca,
            metrics,
            tokens: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            first_backoff: FIRST_BACKOFF,
        })
    }

    /// The response to `GET /.well-known/acme-challenge/<token>` for a token of an order in
    /// flight; `None` for anything else (it routes as usual).
    pub fn answer(&self, path: &str) -> Option<http::Response<bytes::Bytes>> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        let body = self.lock_tokens().get(token)?.clone();
        http::Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes::Bytes::from(body))
            .ok()
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, host: &str, status: AcmeStatus) {
        self.metrics.set_acme(host, status);
    }

    /// Check every ACME Host of `graph` once: order the certificates that are missing,
    /// unreadable or past two thirds of their lifetime (unless backing off). Returns whether a
    /// certificate was written.
    pub async fn pass(self: &Arc<Self>, graph: &Graph) -> bool {
        self.pass_at(graph, SystemTime::now()).await
    }

    /// [`Acme::pass`] as if the time were `now` (renewal and backoff are decided against it).
    pub async fn pass_at(self: &Arc<Self>, graph: &Graph, now: SystemTime) -> bool {
        let mut due = Vec::new();
        let mut live = Vec::new();
        for h in &graph.hosts {
            let (Some(spec), Some(secret)) = (&h.acme, &h.tls_secret) else {
                continue;
            };
            let host = h.hostname.to_string();
            live.push(host.clone());
            let valid = self.current(&secret.name);
            if let Some((nb, na)) = valid {
                if unix(now) < renew_at(nb, na) {
                    self.set_status(&host, AcmeStatus::valid(na, renew_at(nb, na)));
                    continue;
                }
            }
            let next = self
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&host)
                .and_then(|s| s.next_attempt);
            if next.is_some_and(|t| t > now) {
                continue;
            }
            due.push((host, spec.clone(), secret.name.clone()));
        }
        self.metrics.retain_acme(&live);
        let runs = due.into_iter().map(|(host, spec, secret)| {
            let me = self.clone();
            async move {
                me.set_status(&host, AcmeStatus::ordering());
                let r = tokio::time::timeout(ORDER_TIMEOUT, me.order(&host, &spec, &secret)).await;
                let r = match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("the order took longer than {ORDER_TIMEOUT:?}")),
                };
                me.finish(&host, &secret, r, now)
            }
        });
        futures::future::join_all(runs).await.into_iter().any(|b| b)
    }

    /// Record an order's outcome; returns whether a certificate was written.
    fn finish(&self, host: &str, secret: &str, r: Result<bool, Failure>, now: SystemTime) -> bool {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let st = hosts.entry(host.to_string()).or_default();
        match r {
            Ok(written) => {
                st.failures = 0;
                st.next_attempt = None;
                drop(hosts);
                if let Some((nb, na)) = self.current(secret) {
                    self.set_status(host, AcmeStatus::valid(na, renew_at(nb, na)));
                }
                written
            }
            Err(reason) => {
                st.failures += 1;
                let next = now + backoff(self.first_backoff, st.failures);
                st.next_attempt = Some(next);
                tracing::error!(host, error = %reason, "ACME order failed");
                self.set_status(host, AcmeStatus::failed(reason, unix(next), st.failures));
                false
            }
        }
    }

    /// Validity of the certificate now stored in secret `name`, when it parses and its key is
    /// there.
    fn current(&self, name: &str) -> Option<(i64, i64)> {
        let d = self.dir.join(name);
        if !d.join("tls.key").exists() {
            return None;
        }
        let pem = std::fs::read(d.join("tls.crt")).ok()?;
        let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
        super::cert::validity(&leaf)
    }

    /// Order one certificate. `Ok(false)`: another replica holds the lock.
    async fn order(&self, host: &str, spec: &AcmeSpec, secret: &str) -> Result<bool, Failure> {
        if host.contains('*') {
            return Err(format!(
                "`{host}` is a wildcard: HTTP-01 cannot validate it (use a tlsSecret you provide)"
            ));
        }
        let Some(_lock) = Lock::take(&self.dir.join(secret))? else {
            tracing::info!(host, "another replica is ordering this certificate");
            return Ok(false);
        };
        let account = self.account(spec).await?;
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| format!("new order: {e}"))?;
        let mut tokens = Vec::new();
        let res = self.validate(&mut order, &mut tokens).await;
        {
            let mut t = self.lock_tokens();
            for k in &tokens {
                t.remove(k);
            }
        }
        res?;
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain = order
            .poll_certificate(&RetryPolicy::default())
            .await
            .map_err(|e| format!("certificate: {e}"))?;
        let d = self.dir.join(secret);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        write_atomic(&d.join("tls.key"), key_pem.as_bytes())?;
        write_atomic(&d.join("tls.crt"), chain.as_bytes())?;
        tracing::info!(host, secret, "ACME certificate issued");
        Ok(true)
    }

    async fn validate(
        &self,
        order: &mut instant_acme::Order,
        tokens: &mut Vec<String>,
    ) -> Result<(), Failure> {
        let mut auths = order.authorizations();
        while let Some(a) = auths.next().await {
            let mut a = a.map_err(|e| format!("authorization: {e}"))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or("the authority offers no http-01 challenge")?;
            let token = ch.token.clone();
            self.lock_tokens()
                .insert(token.clone(), ch.key_authorization().as_str().to_string());
            tokens.push(token);
            ch.set_ready()
                .await
                .map_err(|e| format!("challenge: {e}"))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::default())
            .await
            .map_err(|e| format!("validation: {e}"))?;
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .and_then(|p| p.detail.clone())
                .unwrap_or_default();
            return Err(format!("order is {status:?} {detail}").trim().to_string());
        }
        Ok(())
    }

    /// The ACME account for this authority, with the key in `<privateKeySecret>/tls.key`
    /// (created when missing).
    async fn account(&self, spec: &AcmeSpec) -> Result<Account, Failure> {
        let key = self.account_key(&spec.account_secret)?;
        let builder = match &self.ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        }
        .map_err(|e| format!("ACME client: {e}"))?;
        let contact = spec.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let k = Key::from_pkcs8_der(PrivatePkcs8KeyDer::from(key.clone()))
            .map_err(|e| format!("account key: {e}"))?;
        let (account, _) = builder
            .create_from_key(
                (k, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key))),
                spec.authority.clone(),
            )
            .await
            .map_err(|e| format!("account at {}: {e}", spec.authority))?;
        if !contacts.is_empty() {
            if let Err(e) = account.update_contacts(&contacts).await {
                tracing::warn!(error = %e, "ACME account contact not updated");
            }
        }
        Ok(account)
    }

    fn account_key(&self, name: &str) -> Result<Vec<u8>, Failure> {
        let path = self.dir.join(name).join("tls.key");
        if let Ok(pem) = std::fs::read(&path) {
            return PrivatePkcs8KeyDer::from_pem_slice(&pem)
                .map(|k| k.secret_pkcs8_der().to_vec())
                .map_err(|_| {
                    format!(
                        "{} holds no PKCS#8 P-256 key (the ACME account key)",
                        path.display()
                    )
                });
        }
        let (_, der) = Key::generate_pkcs8().map_err(|e| format!("account key: {e}"))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.secret_pkcs8_der());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        write_atomic(&path, pem.as_bytes())?;
        Ok(der.secret_pkcs8_der().to_vec())
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a reader never sees half.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let tmp = path.with_extension("acme-tmp");
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The lock file of one secret directory, removed when dropped.
struct Lock(PathBuf);

impl Lock {
    /// `Ok(None)`: another replica holds a fresh lock.
    fn take(dir: &Path) -> Result<Option<Lock>, Failure> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(Some(Lock(path)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a < STALE_LOCK) {
                        return Ok(None);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(format!("lock {}: {e}", path.display())),
            }
        }
        Ok(None)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime() {
        assert_eq!(renew_at(0, 90), 60);
        assert_eq!(renew_at(1000, 1300), 1200);
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let f = Duration::from_secs(60);
        assert_eq!(backoff(f, 1), f);
        assert_eq!(backoff(f, 2), f * 2);
        assert_eq!(backoff(f, 4), f * 8);
        assert_eq!(backoff(f, 40), MAX_BACKOFF);
    }

    #[test]
    fn a_fresh_lock_keeps_a_second_replica_out() {
        let d = tempfile::tempdir().unwrap();
        let a = Lock::take(d.path()).unwrap();
        assert!(a.is_some());
        assert!(Lock::take(d.path()).unwrap().is_none());
        drop(a);
        assert!(Lock::take(d.path()).unwrap().is_some());
    }
}
