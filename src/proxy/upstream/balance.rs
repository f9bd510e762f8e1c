//! Load balancing across the addresses of an upstream (Emissary's `load_balancer`):
//! round_robin (per request), least_request (the less busy of two distinct random addresses,
//! Envoy's default choice count), and ring_hash / maglev keyed by a header, a cookie or the
//! client address, so one key keeps reaching one address while the set is stable and moves as
//! little as possible when it changes. A request without the key gets a random address.
//!
//! Every upstream with a policy, outlier detection or health checks is balanced here, HTTP/1.1
//! and HTTP/2 alike: DNS names with their resolved addresses, IP literals as their one
//! address, `http` and `https` (the pool dials the picked address and keeps the service name
//! for TLS). Before picking, `health` removes ejected and unhealthy addresses.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::header;
use http::request::Parts;
use hyper_util::client::legacy::connect::dns::Name;

use super::connect::Resolver;
use super::health::{Addresses, Health};
use crate::routes::{HashKey, LbPolicy, LoadBalancer};

/// Smallest hash ring, in points over all addresses (Envoy's `minimum_ring_size` is 1024; more
/// points even out the shares: 5 addresses at 100 points each were measured 25% off their share).
const MIN_RING_SIZE: usize = 4096;
/// Fewest points per address, whatever the address count.
const MIN_POINTS_PER_ADDRESS: usize = 100;
/// Maglev lookup-table size (prime).
const MAGLEV_SIZE: usize = 65_537;

/// The client address of a request, carried in its extensions for `source_ip` hashing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub IpAddr);

/// An address set and its lookup table: (hash point, index into the set).
type Table = (Vec<IpAddr>, Vec<(u64, usize)>);

pub(crate) struct Balancer {
    lb: LoadBalancer,
    resolver: Resolver,
    host: String,
    /// The address of an IP-literal upstream (no lookup).
    literal: Option<IpAddr>,
    pub health: Option<Arc<Health>>,
    next: AtomicUsize,
    busy: Arc<Mutex<HashMap<IpAddr, u32>>>,
    /// The table built for the last address set (ring points, or the maglev table).
    table: Mutex<Option<Table>>,
}

/// Counts a request on its address (least_request) until dropped.
pub(crate) struct Busy(Arc<Mutex<HashMap<IpAddr, u32>>>, IpAddr);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

/// FNV-1a over the bytes a value hashes as, finished with splitmix64's mixer. Our own, not
/// `DefaultHasher` (whose algorithm may change between Rust releases), so replicas built by
/// different toolchains place keys alike during a rolling upgrade.
struct StableHasher(u64);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = StableHasher(0xcbf2_9ce4_8422_2325);
    v.hash(&mut h);
    h.finish()
}

impl Balancer {
    /// A balancer for `host` (a DNS name or an IP literal).
    pub fn new(
        lb: &LoadBalancer,
        resolver: Resolver,
        host: &str,
        health: Option<Arc<Health>>,
    ) -> Self {
        Balancer {
            lb: lb.clone(),
            resolver,
            host: host.to_string(),
            literal: IpAddr::from_str(host.trim_matches(['[', ']'])).ok(),
            health,
            next: AtomicUsize::new(0),
            busy: Arc::new(Mutex::new(HashMap::new())),
            table: Mutex::new(None),
        }
    }

    /// Every address of the upstream, sorted (empty when the name does not resolve).
    pub async fn addresses(&self) -> Vec<IpAddr> {
        use tower_service::Service;
        if let Some(ip) = self.literal {
            return vec![ip];
        }
        let Ok(name) = Name::from_str(&self.host) else {
            return Vec::new();
        };
        let mut addrs: Vec<IpAddr> = match self.resolver.clone().call(name).await {
            Ok(a) => a.map(|a| a.ip()).collect(),
            Err(_) => return Vec::new(),
        };
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The address for this request; `None` leaves the choice to the pool.
    pub async fn pick(&self, head: &Parts) -> Option<(IpAddr, Option<Busy>)> {
        let mut addrs = self.addresses().await;
        if let Some(h) = &self.health {
            h.filter(&mut addrs);
        }
        let n = addrs.len();
        if n == 0 {
            return None;
        }
        let random = || (crate::proxy::headers::rand_u64() % n as u64) as usize;
        let i = match self.lb.policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LbPolicy::LeastRequest => {
                let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
                // Two distinct addresses: with two, the less busy always wins.
                let a = random();
                let b =
                    (a + 1 + (crate::proxy::headers::rand_u64() % (n as u64 - 1).max(1)) as usize)
                        % n;
                let load = |i: usize| busy.get(&addrs[i]).copied().unwrap_or(0);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            LbPolicy::RingHash | LbPolicy::Maglev => match self.key(head) {
                None => random(),
                Some(k) => self.lookup(&addrs, k),
            },
        };
        let ip = addrs[i];
        let busy = (self.lb.policy == LbPolicy::LeastRequest).then(|| {
            *self
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(ip)
                .or_insert(0) += 1;
            Busy(self.busy.clone(), ip)
        });
        Some((ip, busy))
    }

    fn key(&self, head: &Parts) -> Option<u64> {
        match self.lb.key.as_ref()? {
            HashKey::Header(h) => head.headers.get(h.as_str()).map(|v| hash_of(v.as_bytes())),
            HashKey::Cookie(name) => head
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_of(v)),
            HashKey::SourceIp => head.extensions.get::<ClientIp>().map(|c| hash_of(c.0)),
        }
    }

    /// The index in `addrs` for hash `k`, from the (cached) ring or maglev table.
    fn lookup(&self, addrs: &[IpAddr], k: u64) -> usize {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.as_ref().is_none_or(|(a, _)| a != addrs) {
            let table = match self.lb.policy {
                LbPolicy::Maglev => maglev(addrs),
                _ => ring(addrs),
            };
            *t = Some((addrs.to_vec(), table));
        }
        let Some((_, table)) = t.as_ref() else {
            return 0;
        };
        match self.lb.policy {
            LbPolicy::Maglev => table[(k % MAGLEV_SIZE as u64) as usize].1,
            _ => {
                let at = table.partition_point(|(h, _)| *h < k);
                table[at % table.len()].1
            }
        }
    }
}

/// A hash ring: at least `MIN_RING_SIZE` points in all and `MIN_POINTS_PER_ADDRESS` per
/// address, sorted by hash.
fn ring(addrs: &[IpAddr]) -> Vec<(u64, usize)> {
    let per = MIN_RING_SIZE
        .div_ceil(addrs.len().max(1))
        .max(MIN_POINTS_PER_ADDRESS);
    let mut points: Vec<(u64, usize)> = addrs
        .iter()
        .enumerate()
        .flat_map(|(i, a)| (0..per).map(move |p| (hash_of((a, p)), i)))
        .collect();
    points.sort_unstable();
    points
}

/// Maglev's lookup table (Eisenbud et al., 2016): each address fills slots along its own
/// permutation in turn until the table is full.
fn maglev(addrs: &[IpAddr]) -> Vec<(u64, usize)> {
    let m = MAGLEV_SIZE as u64;
    let perms: Vec<(u64, u64)> = addrs
        .iter()
        .map(|a| {
            (
                hash_of((a, "offset")) % m,
                hash_of((a, "skip")) % (m - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; addrs.len()];
    let mut table = vec![(0u64, usize::MAX); MAGLEV_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c].1 == usize::MAX {
                    table[c] = (c as u64, i);
                    filled += 1;
                    break;
                }
            }
            if filled == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    table
}

impl Addresses for Balancer {
    async fn addresses(&self) -> Vec<IpAddr> {
        Balancer::addresses(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FNV-1a + splitmix64 hash of `b"legate"`, computed outside this code (a few lines of Python).
    const PINNED_LEGATE: u64 = 0xf09d_b056_ca73_fe61;

    fn addrs(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    #[test]
    fn maglev_spreads_evenly_and_moves_little() {
        let t = maglev(&addrs(4));
        let mut counts = [0usize; 4];
        for (_, i) in &t {
            counts[*i] += 1;
        }
        for c in counts {
            assert!((16_000..=16_800).contains(&c), "{counts:?}");
        }
        // Removing one address moves mostly only its own slots.
        let t3 = maglev(&addrs(3));
        let moved = t
            .iter()
            .zip(&t3)
            .filter(|((_, a), (_, b))| *a != 3 && a != b)
            .count();
        assert!(moved < MAGLEV_SIZE / 10, "{moved} slots moved");
    }

    #[test]
    fn ring_is_balanced_enough() {
        let r = ring(&addrs(5));
        assert_eq!(r.len(), 4100);
        let mut counts = [0u64; 5];
        for k in 0..100_000u64 {
            let h = hash_of(k);
            let at = r.partition_point(|(p, _)| *p < h);
            counts[r[at % r.len()].1] += 1;
        }
        // Ideal share 20,000 each; within 10% of it.
        for c in counts {
            assert!((18_000..=22_000).contains(&c), "{counts:?}");
        }
        assert_eq!(ring(&addrs(200)).len(), 20_000);
    }

    #[test]
    fn hashing_is_fixed_across_builds() {
        // Pinned values: a change here moves sticky sessions between replicas of two versions.
        assert_ne!(hash_of("a"), hash_of("b"));
        let mut h = StableHasher(0xcbf2_9ce4_8422_2325);
        h.write(b"legate");
        assert_eq!(h.finish(), PINNED_LEGATE);
    }
}
