//! Each client address's share of the resolver's bounds: queries in
//! flight, TCP connections and a query rate. The global bounds stay (they
//! cap the resolver whatever the number of clients); these keep one client
//! from taking all of them. Entries exist for served addresses only (the
//! source check comes first) and go when an address stops being served.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use tokio::sync::Semaphore;

use super::Limits;

/// A query's token in the bucket's unit (a millionth of a query), so the
/// refill is exact in whole numbers.
const TOKEN: u128 = 1_000_000;

/// A token bucket of queries: `rate` a second, bursts of twice as many.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    /// In millionths of a query.
    tokens: u128,
    last: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: burst(rate),
            last: now,
        }
    }

    /// Takes one query's token if there is one.
    pub(super) fn take(&mut self, rate: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_micros();
        self.tokens = (self.tokens + elapsed * u128::from(rate)).min(burst(rate));
        self.last = now;
        if self.tokens >= TOKEN {
            self.tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

fn burst(rate: u32) -> u128 {
    2 * u128::from(rate) * TOKEN
}

/// One client address's share.
pub(super) struct Client {
    pub in_flight: Arc<Semaphore>,
    pub tcp: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
    rate: u32,
}

impl Client {
    /// Whether the client may ask one more query now.
    pub(super) fn admit(&self, now: Instant) -> bool {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(self.rate, now)
    }
}

/// The shares of every client address seen.
pub(super) struct Clients {
    limits: Limits,
    by_address: Mutex<HashMap<IpAddr, Arc<Client>>>,
}

impl Clients {
    pub(super) fn new(limits: Limits) -> Self {
        Clients {
            limits,
            by_address: Mutex::default(),
        }
    }

    /// The share of `ip` (made on first use).
    pub(super) fn of(&self, ip: IpAddr) -> Arc<Client> {
        let ip = ip.to_canonical();
        let mut map = self
            .by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(ip).or_insert_with(|| {
            Arc::new(Client {
                in_flight: Arc::new(Semaphore::new(self.limits.per_client_in_flight)),
                tcp: Arc::new(Semaphore::new(self.limits.per_client_tcp_connections)),
                bucket: Mutex::new(Bucket::full(self.limits.per_client_rate, Instant::now())),
                rate: self.limits.per_client_rate,
            })
        }))
    }

    /// Forgets the addresses `keep` says no to (no longer served). Their
    /// queries and connections still running hold their own shares.
    pub(super) fn retain(&self, keep: impl Fn(IpAddr) -> bool) {
        self.by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|ip, _| keep(*ip));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_passes_a_burst_of_twice_the_rate_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10, t0);
        let burst = (0..100).filter(|_| b.take(10, t0)).count();
        assert_eq!(burst, 20);
        assert!(!b.take(10, t0));
        // Over the next second, ten more.
        let later: usize = (1..=100)
            .filter(|i| b.take(10, t0 + Duration::from_millis(10 * i)))
            .count();
        assert_eq!(later, 10);
        // Idle for long: full again, not more.
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(10, t2)).count(), 20);
    }

    #[test]
    fn each_address_has_its_own_share_and_v4_mapped_is_v4() {
        let limits = Limits {
            per_client_in_flight: 2,
            per_client_rate: 1,
            ..Limits::default()
        };
        let c = Clients::new(limits);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let a = c.of(ip("100.64.0.2"));
        let permits: Vec<_> = (0..3)
            .filter_map(|_| Arc::clone(&a.in_flight).try_acquire_owned().ok())
            .collect();
        assert_eq!(permits.len(), 2);
        let same = c.of(ip("::ffff:100.64.0.2"));
        assert!(Arc::clone(&same.in_flight).try_acquire_owned().is_err());
        let b = c.of(ip("100.64.0.3"));
        assert!(Arc::clone(&b.in_flight).try_acquire_owned().is_ok());
        let now = Instant::now();
        assert!(a.admit(now) && a.admit(now) && !a.admit(now));
        assert!(b.admit(now));
        assert_eq!(c.len(), 2);
        c.retain(|a| a == ip("100.64.0.3"));
        assert_eq!(c.len(), 1);
    }
}
