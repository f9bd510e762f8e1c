//! File descriptors: raise the open-file soft limit at start, and size `--max-connections` to
//! what it allows. Every proxied connection may hold two descriptors (the client's and an
//! upstream's), and the admin listener, the config source, logs and pools need some of their
//! own, so those are kept back: the admin API must answer while the proxy is saturated.

/// Descriptors kept back for everything but proxied connections (admin connections, upstream
/// pools' spares, git, files, listeners).
pub const RESERVED: u64 = crate::admin::MAX_CONNECTIONS as u64 + 192;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force (`None`
/// when it cannot be read, or is unlimited).
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current?;
    let Some(hard) = cur.maximum else {
        // Unlimited hard limit: ask for a generous soft one.
        let want = soft.max(1 << 20);
        let ok = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: None,
            },
        )
        .is_ok();
        return Some(if ok { want } else { soft });
    };
    if hard > soft {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return Some(hard);
        }
    }
    Some(soft)
}

/// The `--max-connections` a soft limit of `soft` descriptors can honour: two per connection
/// after [`RESERVED`], at least 1.
pub fn connection_budget(requested: usize, soft: Option<u64>) -> usize {
    match soft {
        None => requested,
        Some(soft) => {
            let usable = (soft.saturating_sub(RESERVED) / 2).max(1);
            requested.min(usize::try_from(usable).unwrap_or(usize::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_descriptors_back() {
        assert_eq!(connection_budget(10_000, None), 10_000);
        // The common 1024: the default 10,000 is out of reach.
        let at_1024 = connection_budget(10_000, Some(1024));
        assert_eq!(at_1024 as u64, (1024 - RESERVED) / 2);
        assert_eq!(connection_budget(100, Some(1024)), 100);
        assert_eq!(connection_budget(10_000, Some(1 << 20)), 10_000);
        assert_eq!(connection_budget(10_000, Some(10)), 1);
    }

    #[test]
    fn raising_never_lowers() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let after = raise_nofile_limit();
        if let (Some(b), Some(a)) = (before, after) {
            assert!(a >= b);
        }
    }
}
