//! The exit node's data path: what its programs on the WireGuard interface
//! read and write.
//!
//! * a policy trie per family (destination prefix -> [`PolicyValue`]
//!   encoded as a `u8`): the exit node's own mesh addresses (local, pass),
//!   denied prefixes with their [`DenyReason`], and allow entries that
//!   override a shorter deny prefix;
//! * a client map per family (mesh address -> client slot, `u32`);
//! * per slot: a [`ClientLimit`] (shared between CPUs: the token buckets)
//!   and [`ClientCounters`] (per CPU);
//! * [`ExitConfig`] (one slot) and [`MssConfig`] (one slot, also read by
//!   the LAN gateway's MSS clamp).

/// Why the exit node dropped a packet of a client it serves. The
/// discriminant indexes [`ClientCounters::denied`], so values are fixed
/// forever: new reasons get new numbers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DenyReason {
    /// RFC 1918 private space.
    Private = 0,
    /// 100.64.0.0/10 outside the mesh (carrier-grade NAT space).
    Cgnat = 1,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal = 2,
    /// Cloud metadata services (169.254.169.254, fd00:ec2::254,
    /// 168.63.129.16).
    Metadata = 3,
    /// Unique local IPv6, fc00::/7.
    Ula = 4,
    /// 127.0.0.0/8, ::1.
    Loopback = 5,
    /// 224.0.0.0/4, ff00::/8.
    Multicast = 6,
    /// A subnet the exit host is connected to or routes to (not through
    /// the uplink's default route).
    Connected = 7,
    /// One of the exit host's own addresses (not its mesh services).
    HostAddress = 8,
    /// Another mesh member through the exit node: the mesh is reached
    /// directly through WireGuard, never relayed.
    Mesh = 9,
    /// Reserved space: 0.0.0.0/8, 240.0.0.0/4 (with the broadcast
    /// address), ::/128, ::ffff:0:0/96, 100::/64.
    Reserved = 10,
    /// Over the client's rate limit, from the client.
    RateFromClient = 11,
    /// Over the client's rate limit, to the client.
    RateToClient = 12,
    /// IPv6 prefixes that carry IPv4 addresses to a translator or relay:
    /// the local-use NAT64 prefix 64:ff9b:1::/48 and 6to4's 2002::/16
    /// (through a NAT64 gateway or a 6to4 router in the exit host's
    /// network they reach IPv4 space the IPv4 policy denies). Inside the
    /// well-known NAT64 prefix 64:ff9b::/96 each IPv4 deny is repeated
    /// with its own reason instead.
    Translated = 13,
}

impl DenyReason {
    /// Number of reasons (slots of [`ClientCounters::denied`]).
    pub const COUNT: usize = 14;

    /// Every reason, in index order.
    pub const ALL: [DenyReason; Self::COUNT] = [
        DenyReason::Private,
        DenyReason::Cgnat,
        DenyReason::LinkLocal,
        DenyReason::Metadata,
        DenyReason::Ula,
        DenyReason::Loopback,
        DenyReason::Multicast,
        DenyReason::Connected,
        DenyReason::HostAddress,
        DenyReason::Mesh,
        DenyReason::Reserved,
        DenyReason::RateFromClient,
        DenyReason::RateToClient,
        DenyReason::Translated,
    ];

    /// The stable snake_case name used by `nexctl` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DenyReason::Private => "private",
            DenyReason::Cgnat => "cgnat",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Metadata => "metadata",
            DenyReason::Ula => "ula",
            DenyReason::Loopback => "loopback",
            DenyReason::Multicast => "multicast",
            DenyReason::Connected => "connected",
            DenyReason::HostAddress => "host_address",
            DenyReason::Mesh => "mesh",
            DenyReason::Reserved => "reserved",
            DenyReason::RateFromClient => "rate_limit_from_client",
            DenyReason::RateToClient => "rate_limit_to_client",
            DenyReason::Translated => "translated",
        }
    }

    /// The index into [`ClientCounters::denied`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The reason with this index, if any.
    pub const fn from_index(i: usize) -> Option<DenyReason> {
        if i < Self::COUNT {
            Some(Self::ALL[i])
        } else {
            None
        }
    }
}

/// What a policy trie entry says about a destination. Stored as one `u8`
/// (see [`PolicyValue::encode`]); an address without an entry is the
/// internet: allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyValue {
    /// Allowed (an operator's `--exit-allow` inside a denied prefix).
    Allow,
    /// The exit node's own mesh address: mesh services (announcements,
    /// DNS), reachable by every mesh member, not exit traffic.
    Local,
    /// Denied, for this reason.
    Deny(DenyReason),
}

/// Encoded [`PolicyValue::Allow`].
pub const POLICY_ALLOW: u8 = 0xfe;
/// Encoded [`PolicyValue::Local`].
pub const POLICY_LOCAL: u8 = 0xff;

impl PolicyValue {
    /// The trie value: a deny reason's index, or [`POLICY_ALLOW`] /
    /// [`POLICY_LOCAL`].
    pub const fn encode(self) -> u8 {
        match self {
            PolicyValue::Allow => POLICY_ALLOW,
            PolicyValue::Local => POLICY_LOCAL,
            PolicyValue::Deny(r) => r as u8,
        }
    }

    /// The value a trie entry holds, if it is one nexd writes.
    pub const fn decode(v: u8) -> Option<PolicyValue> {
        match v {
            POLICY_ALLOW => Some(PolicyValue::Allow),
            POLICY_LOCAL => Some(PolicyValue::Local),
            _ => match DenyReason::from_index(v as usize) {
                Some(r) => Some(PolicyValue::Deny(r)),
                None => None,
            },
        }
    }
}

/// The bit of the packet mark (`skb->mark`) the exit node's ingress
/// program sets on every packet of a served client it lets through. The
/// exit node's nftables forward chain drops packets from the tunnel
/// without it and clears it on the rest: whatever stops the programs
/// (a killed nexd whose TCX links die with it, a detach by anyone), the
/// table left behind forwards nothing they did not see. Other packets'
/// marks are left alone; a firewall that rewrites the whole mark of
/// packets from the tunnel before the forward hook makes them dropped
/// (counted as `unchecked`).
pub const EXIT_PASSED_MARK: u32 = 1 << 24;

/// Flag: the exit programs enforce (authorization, policy, limits) and
/// count. Off: they pass everything untouched.
pub const FLAG_EXIT_ENFORCE: u32 = 1 << 0;

/// Slot 0 of the exit config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitConfig {
    /// `FLAG_EXIT_*` bits.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Slot 0 of the MSS map: the largest TCP MSS a SYN may announce, per
/// family (the tunnel's MTU minus the IP and TCP headers). 0: no clamping
/// for that family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MssConfig {
    pub mss_v4: u16,
    pub mss_v6: u16,
}

/// One direction's token bucket, as a GCRA ("virtual scheduling"): the
/// bucket is `tat_ns`, the time at which it would be empty again; a
/// packet of `len` bytes advances it by `len` times the time a byte takes
/// at the rate, and is admitted while that stays within `burst_ns` of now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Nanoseconds per byte at the rate, fixed point with
    /// [`BUCKET_FRAC_BITS`] fractional bits (a multiply and a shift per
    /// packet instead of a division); 0 = unlimited.
    pub ns_per_byte: u64,
    /// The burst, as time at the rate (burst bytes / rate).
    pub burst_ns: u64,
    /// Theoretical arrival time, ns of the kernel's monotonic clock;
    /// written by the programs only (user space writes 0).
    pub tat_ns: u64,
}

/// Fractional bits of [`Bucket::ns_per_byte`]: 1/65536 ns per byte, exact
/// to 0.01% at 10 Gbit/s; a 64 KiB packet at 1 byte/s still fits in u64.
pub const BUCKET_FRAC_BITS: u32 = 16;

/// A client's limits (slot of the limits array, shared by all CPUs so
/// that a client's packets on every CPU draw from the same bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientLimit {
    /// Traffic from the client (the exit node's WireGuard ingress).
    pub from_client: Bucket,
    /// Traffic to the client (the exit node's WireGuard egress).
    pub to_client: Bucket,
}

/// A client's counters on one CPU (slot of the per-CPU counters array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientCounters {
    /// Forwarded from the client (received on the exit's WireGuard
    /// interface): packets (GSO segments) and bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Sent to the client (forwarded replies).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped packets, by [`DenyReason`] index. More slots than reasons
    /// (a power of two), so the programs index it with a mask the
    /// verifier can follow, and new reasons fit without a layout change.
    pub denied: [u64; DENIED_SLOTS],
}

/// Slots of [`ClientCounters::denied`].
pub const DENIED_SLOTS: usize = 16;
const _: () = assert!(DenyReason::COUNT <= DENIED_SLOTS && DENIED_SLOTS.is_power_of_two());

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all four): repr(C), Copy, made of u16/u32/u64 fields laid out
    // without padding (ExitConfig 2 x u32; MssConfig 2 x u16; Bucket 3 x
    // u64; ClientLimit 2 x Bucket; ClientCounters 20 x u64).
    unsafe impl aya::Pod for super::ExitConfig {}
    unsafe impl aya::Pod for super::MssConfig {}
    unsafe impl aya::Pod for super::ClientLimit {}
    unsafe impl aya::Pod for super::ClientCounters {}
}

/// Default capacity of the client maps, the limits and the counters
/// (user space may load with fewer: `Datapath::load_with`).
pub const EXIT_CLIENTS_MAX: u32 = 16_384;
/// Capacity of each policy trie (allocated on demand).
pub const EXIT_POLICY_MAX_ENTRIES: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_values_round_trip() {
        for r in DenyReason::ALL {
            let v = PolicyValue::Deny(r);
            assert_eq!(PolicyValue::decode(v.encode()), Some(v));
            assert_eq!(DenyReason::from_index(r.index()), Some(r));
        }
        for v in [PolicyValue::Allow, PolicyValue::Local] {
            assert_eq!(PolicyValue::decode(v.encode()), Some(v));
        }
        assert_eq!(PolicyValue::decode(DenyReason::COUNT as u8), None);
    }

    #[test]
    fn reasons_are_in_index_order() {
        for (i, r) in DenyReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn map_values_have_no_padding() {
        assert_eq!(size_of::<ExitConfig>(), 8);
        assert_eq!(size_of::<MssConfig>(), 4);
        assert_eq!(size_of::<ClientLimit>(), 48);
        assert_eq!(size_of::<ClientCounters>(), 8 * (4 + DENIED_SLOTS));
    }
}
