//! Peer endpoints given as DNS names, resolved off the event loop.
//!
//! A lookup can take seconds (a dead resolver: the 3 s timeout, per name).
//! Done inline, every reload, phase change and nexctl call would wait
//! behind DNS, and a failover with it. So a task of its own resolves the
//! names, concurrently and each with a timeout, and hands the results to
//! the event loop as a message; the loop keeps the cache and reconfigures
//! only the peers whose address changed. A name that stops resolving keeps
//! its last good address: a flaky resolver must not take a peer down.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::mesh::{Endpoint, Host, Mesh};

/// How long one lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often names are looked up again (dynamic DNS, moved peers).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The outcome of one round of lookups: every name asked for, with its
/// address or why it has none.
#[derive(Debug)]
pub struct Resolved(pub Vec<(Endpoint, Result<SocketAddr, String>)>);

/// The cache of resolved endpoints and the handle on the resolver task.
pub struct Endpoints {
    cache: HashMap<Endpoint, SocketAddr>,
    requests: mpsc::UnboundedSender<Vec<Endpoint>>,
    task: JoinHandle<()>,
    last_request: Option<Instant>,
}

impl Endpoints {
    /// Starts the resolver task; its results arrive on `results`.
    pub fn start(results: mpsc::Sender<Resolved>) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(resolver(rx, results));
        Endpoints {
            cache: HashMap::new(),
            requests,
            task,
            last_request: None,
        }
    }

    /// The addresses known so far (names only; literal addresses need no
    /// lookup).
    pub fn cache(&self) -> &HashMap<Endpoint, SocketAddr> {
        &self.cache
    }

    /// Asks for every name in `mesh` to be looked up (again).
    pub fn refresh(&mut self, mesh: &Mesh, now: Instant) {
        self.last_request = Some(now);
        let names = names_of(mesh);
        if names.is_empty() {
            return;
        }
        debug!(count = names.len(), "resolving peer endpoints");
        if self.requests.send(names).is_err() {
            warn!("the endpoint resolver task is gone; names are not resolved again");
        }
    }

    /// Whether the periodic refresh is due.
    pub fn due(&self, now: Instant) -> bool {
        self.last_request
            .is_none_or(|t| now.saturating_duration_since(t) >= REFRESH_INTERVAL)
    }

    /// Takes a round of results into the cache; returns whether any
    /// address changed. Names the mesh no longer has are forgotten.
    pub fn absorb(&mut self, mesh: &Mesh, resolved: Resolved) -> bool {
        let wanted: HashSet<Endpoint> = names_of(mesh).into_iter().collect();
        let before = self.cache.len();
        self.cache.retain(|ep, _| wanted.contains(ep));
        let mut changed = self.cache.len() != before;
        for (ep, result) in resolved.0 {
            if !wanted.contains(&ep) {
                continue;
            }
            match result {
                Ok(addr) => {
                    if self.cache.insert(ep.clone(), addr) != Some(addr) {
                        info!(endpoint = %ep, %addr, "peer endpoint resolved");
                        changed = true;
                    }
                }
                Err(reason) => match self.cache.get(&ep) {
                    Some(last) => {
                        warn!(endpoint = %ep, %reason, last = %last, "cannot resolve peer endpoint; keeping its last address")
                    }
                    None => warn!(endpoint = %ep, %reason, "cannot resolve peer endpoint"),
                },
            }
        }
        changed
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every endpoint of `mesh` given as a name, each once.
fn names_of(mesh: &Mesh) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    mesh.devices
        .iter()
        .filter_map(|d| d.endpoint.clone())
        .filter(|ep| matches!(ep.host, Host::Name(_)) && seen.insert(ep.clone()))
        .collect()
}

/// The task: takes the newest request (older ones queued behind it are
/// superseded), resolves its names concurrently, reports.
async fn resolver(
    mut requests: mpsc::UnboundedReceiver<Vec<Endpoint>>,
    results: mpsc::Sender<Resolved>,
) {
    while let Some(mut names) = requests.recv().await {
        while let Ok(newer) = requests.try_recv() {
            names = newer;
        }
        let lookups = names.into_iter().map(|ep| async move {
            let result = lookup(&ep).await;
            (ep, result)
        });
        let resolved = Resolved(futures::future::join_all(lookups).await);
        if results.send(resolved).await.is_err() {
            return;
        }
    }
}

async fn lookup(ep: &Endpoint) -> Result<SocketAddr, String> {
    let Host::Name(name) = &ep.host else {
        return Err("not a name".into());
    };
    match tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((name.as_str(), ep.port)),
    )
    .await
    {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| "the name has no addresses".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keys::PrivateKey, mesh::Device};

    fn mesh_with_endpoints(endpoints: &[Option<Endpoint>]) -> Mesh {
        crate::testing::mesh(endpoints.iter().enumerate().map(|(i, ep)| Device {
            endpoint: ep.clone(),
            ..crate::testing::device(i, PrivateKey::generate().public_key())
        }))
    }

    fn name(n: &str) -> Endpoint {
        Endpoint {
            host: Host::Name(n.into()),
            port: 51820,
        }
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_address_and_removed_names_go() {
        let (tx, _rx) = mpsc::channel(1);
        let mut eps = Endpoints::start(tx);
        let mesh = mesh_with_endpoints(&[Some(name("a.example")), Some(name("b.example"))]);
        let a: SocketAddr = "192.0.2.1:51820".parse().expect("sa");
        let b: SocketAddr = "192.0.2.2:51820".parse().expect("sa");
        assert!(eps.absorb(
            &mesh,
            Resolved(vec![(name("a.example"), Ok(a)), (name("b.example"), Ok(b))])
        ));
        // The same answers again: nothing changed.
        assert!(!eps.absorb(&mesh, Resolved(vec![(name("a.example"), Ok(a))])));
        // A failure keeps the last good address.
        assert!(!eps.absorb(
            &mesh,
            Resolved(vec![(name("a.example"), Err("timeout".into()))])
        ));
        assert_eq!(eps.cache().get(&name("a.example")), Some(&a));
        // b leaves the mesh: forgotten.
        let smaller = mesh_with_endpoints(&[Some(name("a.example"))]);
        assert!(eps.absorb(&smaller, Resolved(Vec::new())));
        assert_eq!(eps.cache().len(), 1);
    }

    #[test]
    fn only_names_are_looked_up_each_once() {
        let literal = Endpoint {
            host: Host::Ip("192.0.2.9".parse().expect("ip")),
            port: 1,
        };
        let mesh = mesh_with_endpoints(&[
            Some(name("a.example")),
            Some(literal),
            Some(name("a.example")),
            None,
        ]);
        assert_eq!(names_of(&mesh), vec![name("a.example")]);
    }
}
