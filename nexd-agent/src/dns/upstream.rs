//! The upstream side: the exit node's own resolvers, from its resolv.conf,
//! behind hickory's forwarding zone handler for the root zone.

use std::{net::IpAddr, sync::Arc, time::Duration};

use hickory_server::{
    proto::rr::{LowerName, Name},
    resolver::{
        config::{NameServerConfig, ResolveHosts, ResolverOpts},
        system_conf::parse_resolv_conf,
    },
    store::forwarder::{ForwardConfig, ForwardZoneHandler},
    zone_handler::Catalog,
};

use super::{DnsConfig, DnsError};

/// Per-attempt timeout towards an upstream, at most (resolv.conf's own
/// default is 5 s, which with two attempts outlasts the client).
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per upstream, at most.
const MAX_ATTEMPTS: usize = 2;

/// The upstreams `text` (a resolv.conf) names, without `own` addresses
/// (a resolver that lists the exit node's mesh address would forward to
/// itself), and the options to use them with. Pure, for tests.
pub(super) fn upstreams(
    text: &[u8],
    own: &[IpAddr],
    cache_entries: u64,
) -> Result<(Vec<NameServerConfig>, ResolverOpts), String> {
    let (conf, sys) = parse_resolv_conf(text).map_err(|e| e.to_string())?;
    let servers: Vec<NameServerConfig> = conf
        .name_servers()
        .iter()
        .filter(|s| !own.contains(&s.ip) && !s.ip.is_unspecified())
        .cloned()
        .collect();
    if servers.is_empty() {
        return Err("its nameservers are this exit node's own mesh addresses".into());
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = sys
        .timeout
        .clamp(Duration::from_millis(500), MAX_ATTEMPT_TIMEOUT);
    opts.attempts = sys.attempts.clamp(1, MAX_ATTEMPTS);
    opts.edns0 = sys.edns0;
    opts.cache_size = cache_entries;
    // A forwarder hands clients every record of the answer (CNAME chains).
    opts.preserve_intermediates = true;
    // Clients get the exit node's resolvers' view, not its /etc/hosts.
    opts.use_hosts_file = ResolveHosts::Never;
    // Search domains are applied by the client, never here.
    opts.ndots = 0;
    Ok((servers, opts))
}

/// A catalog answering every name through the upstreams of
/// `config.resolv_conf`.
pub(super) fn catalog(config: &DnsConfig) -> Result<Catalog, DnsError> {
    let path = &config.resolv_conf;
    let text = std::fs::read(path).map_err(|source| DnsError::ResolvConf {
        path: path.clone(),
        source,
    })?;
    let (name_servers, options) = upstreams(&text, &config.bind, config.limits.cache_entries)
        .map_err(|reason| DnsError::NoUpstream {
            path: path.clone(),
            reason,
        })?;
    let servers: Vec<IpAddr> = name_servers.iter().map(|s| s.ip).collect();
    let handler = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: Some(options),
    })
    .build()
    .map_err(DnsError::Forwarder)?;
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(Name::root()), vec![Arc::new(handler)]);
    tracing::debug!(?servers, resolv_conf = %path.display(), "DNS upstreams");
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ip;

    #[test]
    fn nameservers_and_bounded_options_are_taken_from_resolv_conf() {
        let text = b"# comment\nsearch corp.example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions timeout:30 attempts:5 ndots:5\n";
        let (servers, opts) = upstreams(text, &[], 100).expect("ok");
        let ips: Vec<IpAddr> = servers.iter().map(|s| s.ip).collect();
        assert_eq!(ips, [ip("192.0.2.53"), ip("2001:db8::53")]);
        assert_eq!(opts.timeout, MAX_ATTEMPT_TIMEOUT);
        assert_eq!(opts.attempts, MAX_ATTEMPTS);
        assert_eq!(opts.ndots, 0, "search domains are the client's");
        assert_eq!(opts.cache_size, 100);
        assert_eq!(opts.use_hosts_file, ResolveHosts::Never);
    }

    #[test]
    fn the_exit_nodes_own_addresses_are_no_upstream() {
        let own = [ip("100.64.0.1"), ip("fd6e:6578:6400::1")];
        let text = b"nameserver 100.64.0.1\nnameserver 192.0.2.53\n";
        let (servers, _) = upstreams(text, &own, 1).expect("ok");
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].ip, ip("192.0.2.53"));
        let loop_only = b"nameserver 100.64.0.1\nnameserver fd6e:6578:6400::1\n";
        assert!(upstreams(loop_only, &own, 1).is_err());
        assert!(upstreams(b"# nothing\n", &own, 1).is_err());
    }
}
