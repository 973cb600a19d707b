//! What the exit node's connection tracking holds, for `status` and the
//! metrics: entries against the table's size, and how many of them are
//! masqueraded with how many ports the busiest destination uses (a
//! masqueraded flow needs a port of its own per uplink address and
//! destination: ports 1024-65535, 64,512 of them, is what the exit
//! node's table gives TCP and UDP).
//!
//! Read from the kernel's text interfaces of the namespace: the
//! `nf_conntrack_count` and `nf_conntrack_max` sysctls, and
//! `/proc/net/nf_conntrack` (its entries, parsed here; kernels built
//! without `CONFIG_NF_CONNTRACK_PROCFS` lack it, and then only the counts
//! are shown). Read on demand: the file has a line per flow.

use std::{collections::HashMap, net::IpAddr};

use nexd_proto::ConntrackInfo;

/// Ports a masqueraded TCP or UDP flow can get per destination.
pub const PORTS_PER_DESTINATION: u64 = 65535 - 1024 + 1;

/// Masqueraded flows in `/proc/net/nf_conntrack` text, and the busiest
/// destination (protocol, address, port and the address masqueraded to)
/// with its number of flows.
pub fn masquerade_use(text: &str) -> (u64, Option<(String, u64)>) {
    let mut masqueraded = 0u64;
    let mut by_destination: HashMap<(String, IpAddr, String, IpAddr), u64> = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(proto) = fields.nth(2) else {
            continue;
        };
        // Original direction first, then the reply's: src, dst and for
        // TCP and UDP the ports, each "key=value".
        let (mut src, mut dst, mut dport) = (Vec::new(), Vec::new(), Vec::new());
        for f in fields {
            if let Some(v) = f.strip_prefix("src=") {
                src.extend(v.parse::<IpAddr>().ok());
            } else if let Some(v) = f.strip_prefix("dst=") {
                dst.extend(v.parse::<IpAddr>().ok());
            } else if let Some(v) = f.strip_prefix("dport=") {
                dport.push(v.to_owned());
            }
        }
        // Not a flow line (both directions' addresses): skipped.
        let (Ok([orig_src, _]), Ok([orig_dst, reply_dst])) =
            (<[IpAddr; 2]>::try_from(src), <[IpAddr; 2]>::try_from(dst))
        else {
            continue;
        };
        // Masqueraded: the reply goes to another address than the one
        // the flow came from.
        if orig_src == reply_dst {
            continue;
        }
        masqueraded += 1;
        let port = dport.first().cloned().unwrap_or_default();
        *by_destination
            .entry((proto.to_owned(), orig_dst, port, reply_dst))
            .or_default() += 1;
    }
    let busiest =
        by_destination
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|((proto, dst, port, via), n)| {
                let to = match dst {
                    IpAddr::V6(a) => format!("[{a}]"),
                    IpAddr::V4(a) => a.to_string(),
                };
                let port = if port.is_empty() {
                    String::new()
                } else {
                    format!(":{port}")
                };
                (format!("{proto} {to}{port} as {via}"), n)
            });
    (masqueraded, busiest)
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The exit node's connection tracking now; `None` without conntrack
/// (the module not loaded: nothing is tracked).
pub fn read() -> Option<ConntrackInfo> {
    let entries = read_number("/proc/sys/net/netfilter/nf_conntrack_count")?;
    let max = read_number("/proc/sys/net/netfilter/nf_conntrack_max");
    let (masqueraded, busiest) = match std::fs::read_to_string("/proc/net/nf_conntrack") {
        Ok(text) => {
            let (m, b) = masquerade_use(&text);
            (Some(m), b)
        }
        Err(_) => (None, None),
    };
    Some(ConntrackInfo {
        entries,
        max,
        masqueraded,
        busiest_destination: busiest.as_ref().map(|(d, _)| d.clone()),
        busiest_destination_ports: busiest.map(|(_, n)| n),
        ports_per_destination: PORTS_PER_DESTINATION,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
ipv4     2 udp      17 29 src=100.64.0.2 dst=203.0.113.10 sport=1 dport=7777 [UNREPLIED] src=203.0.113.10 dst=192.0.2.1 sport=7777 dport=1024 mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=100.64.0.2 dst=203.0.113.10 sport=2 dport=7777 [UNREPLIED] src=203.0.113.10 dst=192.0.2.1 sport=7777 dport=1025 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=100.64.0.3 dst=198.51.100.7 sport=40000 dport=443 src=198.51.100.7 dst=192.0.2.1 sport=443 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=100.64.0.3 dst=203.0.113.10 type=8 code=0 id=7 src=203.0.113.10 dst=192.0.2.1 type=0 code=0 id=7 mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=192.0.2.1 dst=192.0.2.254 sport=5353 dport=53 src=192.0.2.254 dst=192.0.2.1 sport=53 dport=5353 mark=0 zone=0 use=2
ipv6     10 udp      17 29 src=fd6e:6578:6400::2 dst=2001:db8:203::10 sport=9 dport=7777 src=2001:db8:203::10 dst=2001:db8:1::1 sport=7777 dport=1024 mark=0 zone=0 use=2
garbage
";

    #[test]
    fn masqueraded_flows_and_the_busiest_destination() {
        let (n, busiest) = masquerade_use(TABLE);
        // Not the exit host's own lookup (not masqueraded), not garbage.
        assert_eq!(n, 5);
        assert_eq!(
            busiest,
            Some(("udp 203.0.113.10:7777 as 192.0.2.1".to_owned(), 2))
        );
        assert_eq!(masquerade_use(""), (0, None));
    }
}
