//! Per-CPU counters: one slot per verdict a program can reach.
//!
//! Counters are per CPU so the hot path never contends on a cache line; user
//! space sums the CPUs when it reads them.

/// What happened to a packet. The discriminant is the index into the
/// counters map, so values are fixed forever: new verdicts get new numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IP packets the mesh interface received from the tunnel.
    TunnelRx = 0,
    /// IP packets the mesh interface sent into the tunnel.
    TunnelTx = 1,
    /// Frames that were neither IPv4 nor IPv6 (ARP...): passed untouched,
    /// except by the exit node's ingress program, which drops them.
    NotIp = 2,
    /// LAN traffic left to policy routing, which sends it to the exit node.
    SteeredExit = 3,
    /// LAN traffic to a mesh address: goes straight to that peer.
    DirectMesh = 4,
    /// LAN traffic to a bypass prefix (LAN, excluded route, endpoint,
    /// link-local, multicast): marked to leave directly.
    Bypassed = 5,
    /// Uplink traffic the leak guard let through (WireGuard to an
    /// endpoint, bypass prefixes, neighbour discovery, DHCP).
    GuardPassed = 6,
    /// Uplink traffic the leak guard dropped.
    GuardDropped = 7,
    /// IP packets with a header the programs cannot read (truncated, bad
    /// version or length). The classifier passes them on (the kernel drops
    /// them); the leak guard and the exit node's ingress drop them.
    Malformed = 8,
    /// VLAN-tagged frames. The classifier passes them on unsteered; the
    /// leak guard and the exit node's ingress drop them.
    Vlan = 9,
    /// Exit node: packets from the tunnel to the exit node's own mesh
    /// addresses (its mesh services), passed from any mesh member.
    ExitLocal = 10,
    /// Exit node: packets from a source that is not a client it serves
    /// (dropped).
    ExitUnauthorized = 11,
    /// Exit node: clients' packets to a denied destination (dropped; per
    /// client and reason in the client counters).
    ExitDenied = 12,
    /// Exit node: clients' packets over their rate limit, either direction
    /// (dropped).
    ExitRateLimited = 13,
    /// TCP SYNs whose MSS option was lowered to the tunnel's.
    MssClamped = 14,
}

impl Counter {
    /// Number of slots in the counters map.
    pub const COUNT: u32 = 15;

    /// Every counter, in index order, for user space to iterate.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::TunnelRx,
        Counter::TunnelTx,
        Counter::NotIp,
        Counter::SteeredExit,
        Counter::DirectMesh,
        Counter::Bypassed,
        Counter::GuardPassed,
        Counter::GuardDropped,
        Counter::Malformed,
        Counter::Vlan,
        Counter::ExitLocal,
        Counter::ExitUnauthorized,
        Counter::ExitDenied,
        Counter::ExitRateLimited,
        Counter::MssClamped,
    ];

    /// The stable snake_case name used by `nexctl nexd stats` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::TunnelRx => "tunnel_rx",
            Counter::TunnelTx => "tunnel_tx",
            Counter::NotIp => "not_ip",
            Counter::SteeredExit => "steered_exit",
            Counter::DirectMesh => "direct_mesh",
            Counter::Bypassed => "bypassed",
            Counter::GuardPassed => "guard_passed",
            Counter::GuardDropped => "guard_dropped",
            Counter::Malformed => "malformed",
            Counter::Vlan => "vlan",
            Counter::ExitLocal => "exit_local",
            Counter::ExitUnauthorized => "exit_unauthorized",
            Counter::ExitDenied => "exit_denied",
            Counter::ExitRateLimited => "exit_rate_limited",
            Counter::MssClamped => "mss_clamped",
        }
    }

    /// The map index of this counter.
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// One counter slot on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (the skb length the program saw).
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: CounterValue is repr(C), Copy, and made of two u64 with no padding.
unsafe impl aya::Pod for CounterValue {}
