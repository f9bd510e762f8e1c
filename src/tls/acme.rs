//! ACME (RFC 8555) certificates for Hosts with an `acmeProvider`: orders a certificate by
//! HTTP-01 (instant-acme does the protocol), answers the challenge tokens of its orders in
//! flight on the HTTP listener, and writes the issued pair where the Host's `tlsSecret` points:
//! `<secrets-dir>/<name>/tls.{crt,key}`, where the secret store's reload picks it up, or in
//! Kubernetes mode the `kubernetes.io/tls` Secret itself, through the API, which the Secret
//! watch then brings to every replica.
//!
//! Owns: the account key (`<privateKeySecret>/tls.key`), the per-Host order state shown by
//! `GET /api/certificates` and the metrics, renewal at two thirds of the lifetime, exponential
//! backoff after a failure, and what keeps replicas from ordering the same certificate (a lock
//! file in a shared secrets directory; the Lease in Kubernetes mode). Must not route requests
//! or build TLS configs.

use std::collections::{BTreeMap, HashMap};
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
use tokio::sync::watch;

use crate::metrics::AcmeStatus;
use crate::routes::{AcmeSpec, Graph, SecretRef};

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

/// Where certificates and account keys are kept, and who may order.
enum Store {
    /// `<dir>/<name>/tls.{crt,key}`; a lock file per secret keeps replicas sharing the
    /// directory from ordering together.
    Dir(PathBuf),
    /// Kubernetes Secrets, read and written through the API; only the Lease holder orders.
    Kube {
        client: ::kube::Client,
        leader: watch::Receiver<bool>,
    },
}

/// The type of the Secret a certificate is written to.
const TLS_TYPE: &str = "kubernetes.io/tls";

/// The ACME manager of one gateway process.
pub struct Acme {
    store: Store,
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
        let store = match &self.store {
            Store::Dir(d) => d.display().to_string(),
            Store::Kube { .. } => "kubernetes".to_string(),
        };
        f.debug_struct("Acme").field("store", &store).finish()
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
    /// Certificates and account keys under the secrets directory `dir`.
    pub fn new(
        dir: PathBuf,
        ca: Option<PathBuf>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Acme> {
        Self::with_store(Store::Dir(dir), ca, metrics)
    }

    /// Kubernetes mode: certificates and account keys in Secrets of the Host's namespace,
    /// ordered and renewed only while `leader` says this replica holds the Lease.
    pub fn kubernetes(
        client: ::kube::Client,
        leader: watch::Receiver<bool>,
        ca: Option<PathBuf>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Acme> {
        Self::with_store(Store::Kube { client, leader }, ca, metrics)
    }

    fn with_store(
        store: Store,
        ca: Option<PathBuf>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Acme> {
        Arc::new(Acme {
            store,
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
            let valid = self.current(secret).await;
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
            if next.is_some_and(|t| t > now) || !self.may_order() {
                continue;
            }
            let account = SecretRef {
                namespace: h.namespace.clone(),
                name: spec.account_secret.clone(),
            };
            due.push((host, spec.clone(), secret.clone(), account));
        }
        self.metrics.retain_acme(&live);
        let runs = due.into_iter().map(|(host, spec, secret, account)| {
            let me = self.clone();
            async move {
                me.set_status(&host, AcmeStatus::ordering());
                let order = me.order(&host, &spec, &secret, &account);
                let r = match tokio::time::timeout(ORDER_TIMEOUT, order).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("the order took longer than {ORDER_TIMEOUT:?}")),
                };
                me.finish(&host, &secret, r, now).await
            }
        });
        futures::future::join_all(runs).await.into_iter().any(|b| b)
    }

    /// Whether this replica orders: always with a secrets directory (the lock file decides
    /// per order), only as the Lease holder in Kubernetes mode (followers serve what the
    /// Secret holds).
    fn may_order(&self) -> bool {
        match &self.store {
            Store::Dir(_) => true,
            Store::Kube { leader, .. } => *leader.borrow(),
        }
    }

    /// Record an order's outcome; returns whether a certificate was written.
    async fn finish(
        &self,
        host: &str,
        secret: &SecretRef,
        r: Result<bool, Failure>,
        now: SystemTime,
    ) -> bool {
        let failed = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            let st = hosts.entry(host.to_string()).or_default();
            match &r {
                Ok(_) => {
                    st.failures = 0;
                    st.next_attempt = None;
                    None
                }
                Err(_) => {
                    st.failures += 1;
                    let next = now + backoff(self.first_backoff, st.failures);
                    st.next_attempt = Some(next);
                    Some((next, st.failures))
                }
            }
        };
        match (r, failed) {
            (Ok(written), _) => {
                if let Some((nb, na)) = self.current(secret).await {
                    self.set_status(host, AcmeStatus::valid(na, renew_at(nb, na)));
                }
                written
            }
            (Err(reason), Some((next, failures))) => {
                tracing::error!(host, error = %reason, "ACME order failed");
                self.set_status(host, AcmeStatus::failed(reason, unix(next), failures));
                false
            }
            (Err(_), None) => false,
        }
    }

    /// Validity of the certificate now stored in `secret`, when it parses and its key is
    /// there.
    async fn current(&self, secret: &SecretRef) -> Option<(i64, i64)> {
        let mut data = self.read(secret).await.ok()??;
        data.remove("tls.key")?;
        let pem = data.remove("tls.crt")?;
        let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
        super::cert::validity(&leaf)
    }

    /// The entries of a secret (`None`: there is none).
    async fn read(&self, secret: &SecretRef) -> Result<Option<BTreeMap<String, Vec<u8>>>, Failure> {
        match &self.store {
            Store::Dir(dir) => {
                let d = dir.join(&secret.name);
                let mut out = BTreeMap::new();
                for k in ["tls.crt", "tls.key"] {
                    if let Ok(b) = std::fs::read(d.join(k)) {
                        out.insert(k.to_string(), b);
                    }
                }
                Ok((!out.is_empty()).then_some(out))
            }
            Store::Kube { client, .. } => kube_secret::read(client, secret).await,
        }
    }

    /// Write `entries` into a secret: files in its directory, or the Kubernetes Secret
    /// (created with `new_type` when missing; its other entries are kept).
    async fn write(
        &self,
        secret: &SecretRef,
        new_type: &str,
        entries: &[(&str, &[u8])],
    ) -> Result<(), Failure> {
        match &self.store {
            Store::Dir(dir) => {
                let d = dir.join(&secret.name);
                std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
                for (k, v) in entries {
                    write_atomic(&d.join(k), v)?;
                }
                Ok(())
            }
            Store::Kube { client, .. } => {
                kube_secret::write(client, secret, new_type, entries).await
            }
        }
    }

    /// Order one certificate. `Ok(false)`: another replica holds the lock.
    async fn order(
        &self,
        host: &str,
        spec: &AcmeSpec,
        secret: &SecretRef,
        account: &SecretRef,
    ) -> Result<bool, Failure> {
        if host.contains('*') {
            return Err(format!(
                "`{host}` is a wildcard: HTTP-01 cannot validate it (use a tlsSecret you provide)"
            ));
        }
        let _lock = match &self.store {
            Store::Dir(dir) => match Lock::take(&dir.join(&secret.name))? {
                Some(l) => Some(l),
                None => {
                    tracing::info!(host, "another replica is ordering this certificate");
                    return Ok(false);
                }
            },
            // The Lease already made this replica the only one ordering.
            Store::Kube { .. } => None,
        };
        let account = self.account(spec, account).await?;
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
        let pair: [(&str, &[u8]); 2] = [
            ("tls.key", key_pem.as_bytes()),
            ("tls.crt", chain.as_bytes()),
        ];
        self.write(secret, TLS_TYPE, &pair).await?;
        tracing::info!(host, secret = %secret.name, namespace = %secret.namespace, "ACME certificate issued");
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
    async fn account(&self, spec: &AcmeSpec, secret: &SecretRef) -> Result<Account, Failure> {
        let key = self.account_key(secret).await?;
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

    async fn account_key(&self, secret: &SecretRef) -> Result<Vec<u8>, Failure> {
        if let Some(pem) = self
            .read(secret)
            .await?
            .and_then(|mut d| d.remove("tls.key"))
        {
            return PrivatePkcs8KeyDer::from_pem_slice(&pem)
                .map(|k| k.secret_pkcs8_der().to_vec())
                .map_err(|_| {
                    format!(
                        "secret `{}` holds no PKCS#8 P-256 key in tls.key (the ACME account key)",
                        secret.name
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
        self.write(secret, "Opaque", &[("tls.key", pem.as_bytes())])
            .await?;
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

/// Secrets through the Kubernetes API.
mod kube_secret {
    use std::collections::BTreeMap;

    use ::kube::api::{Api, PostParams};
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;

    use super::{Failure, SecretRef};

    fn api(client: &::kube::Client, s: &SecretRef) -> Api<Secret> {
        Api::namespaced(client.clone(), &s.namespace)
    }

    pub(super) async fn read(
        client: &::kube::Client,
        s: &SecretRef,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, Failure> {
        let found = api(client, s)
            .get_opt(&s.name)
            .await
            .map_err(|e| format!("cannot read Secret {}/{}: {e}", s.namespace, s.name))?;
        Ok(found.map(|secret| {
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    /// Create the Secret (of `new_type`) or update its entries; an existing Secret must be of
    /// `new_type` when that is `kubernetes.io/tls` (the Secret watch only reads that type).
    pub(super) async fn write(
        client: &::kube::Client,
        s: &SecretRef,
        new_type: &str,
        entries: &[(&str, &[u8])],
    ) -> Result<(), Failure> {
        let api = api(client, s);
        let at = format!("Secret {}/{}", s.namespace, s.name);
        let fail = |e: ::kube::Error| format!("cannot write {at}: {e}");
        let put = |data: &mut BTreeMap<String, ByteString>| {
            for (k, v) in entries {
                data.insert(k.to_string(), ByteString(v.to_vec()));
            }
        };
        match api.get_opt(&s.name).await.map_err(fail)? {
            Some(mut secret) => {
                let ty = secret.type_.clone().unwrap_or_else(|| "Opaque".into());
                if new_type == super::TLS_TYPE && ty != new_type {
                    return Err(format!(
                        "{at} is of type {ty}: ACME stores certificates in a Secret of type {new_type} (delete it or name another tlsSecret)"
                    ));
                }
                put(secret.data.get_or_insert_with(BTreeMap::new));
                api.replace(&s.name, &PostParams::default(), &secret)
                    .await
                    .map_err(fail)?;
            }
            None => {
                let mut data = BTreeMap::new();
                put(&mut data);
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(s.name.clone()),
                        namespace: Some(s.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "legate".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    type_: Some(new_type.to_string()),
                    data: Some(data),
                    ..Secret::default()
                };
                api.create(&PostParams::default(), &secret)
                    .await
                    .map_err(fail)?;
            }
        }
        Ok(())
    }
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
