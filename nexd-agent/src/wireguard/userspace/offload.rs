//! TUN offloads, the pure part: the virtio-net header in front of every
//! packet of a TUN opened with `IFF_VNET_HDR`, cutting the kernel's TSO/USO
//! super-packets into segments of at most the MTU (`split`, the send side),
//! and grouping decrypted segments of one flow back into one super-packet
//! (`plan` + `merge_headers`, the receive side, i.e. GRO in user space).
//!
//! Why: without offloads every 1,420-byte packet costs a TUN syscall each
//! way. With them one `read` brings up to 64 KiB of one TCP or UDP flow and
//! one `writev` hands back as much, so the per-packet cost is the crypto.
//!
//! The rules follow the kernel's own GSO/GRO and wireguard-go's
//! `tun/offload_linux.go`: headers come from the packet, not from the
//! kernel's `hdr_len`; segments get their IPv4 id incremented, the TCP
//! sequence advanced, FIN/PSH only on the last and CWR only on the first;
//! segments are merged only with headers equal in every field a merged
//! packet keeps, consecutive sequence numbers, verified checksums, and
//! only ACK/PSH as TCP flags.

use std::net::IpAddr;

/// Size of `struct virtio_net_hdr` (TUN's default vnet header size).
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Most segments merged into one super-packet (the kernel's historic
/// `UDP_MAX_SEGMENTS`, and a fair bound for TCP too).
pub const MAX_SEGMENTS: usize = 64;

/// Largest IP packet a super-packet may become.
const MAX_SUPER_PACKET: usize = 65_535;

/// `struct virtio_net_hdr`, in the host's byte order (what TUN uses unless
/// told otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a TUN read could not be turned into packets (the read is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("shorter than its virtio-net header")]
    Short,
    #[error("checksum offset outside the packet")]
    ChecksumOffset,
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
    #[error("GSO packet with headers that do not match its GSO type")]
    Headers,
    #[error("GSO segment does not fit the scratch buffer")]
    SegmentTooLarge,
}

// ---- checksums ---------------------------------------------------------------

/// Adds `data` as big-endian 16-bit words to `acc` (one's complement sum,
/// folded later).
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 bits.
    acc as u16
}

/// Sum of the TCP/UDP pseudo-header of `pkt` for an L4 length `l4_len`.
fn pseudo_header(pkt: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    sum(addrs, u64::from(proto) + l4_len as u64)
}

fn set_ipv4_checksum(pkt: &mut [u8], ihl: usize) {
    pkt[10..12].fill(0);
    let c = !fold(sum(&pkt[..ihl], 0));
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
}

fn checksum_field(tcp: bool) -> usize {
    if tcp { 16 } else { 6 }
}

/// Computes the full TCP or UDP checksum of `pkt` (L4 header at `l4`).
fn set_l4_checksum(pkt: &mut [u8], v6: bool, l4: usize, tcp: bool) {
    let at = l4 + checksum_field(tcp);
    pkt[at..at + 2].fill(0);
    let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    let mut c = !fold(pseudo_header(pkt, v6, proto, pkt.len() - l4) + sum(&pkt[l4..], 0));
    if !tcp && c == 0 {
        // UDP sends a computed zero as all ones (zero means "none").
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Whether the TCP or UDP checksum of `pkt` verifies.
fn l4_checksum_ok(pkt: &[u8], v6: bool, l4: usize, tcp: bool) -> bool {
    if !tcp && !v6 && pkt[l4 + 6..l4 + 8] == [0, 0] {
        // IPv4 UDP without a checksum.
        return true;
    }
    let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    fold(pseudo_header(pkt, v6, proto, pkt.len() - l4) + sum(&pkt[l4..], 0)) == 0xffff
}

// ---- IP headers --------------------------------------------------------------

/// Where the transport header of `pkt` starts and which protocol it is:
/// IPv4 (options allowed, not a fragment) or IPv6 without extension headers.
fn transport(pkt: &[u8]) -> Option<(bool, usize, u8)> {
    match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
            (frag == 0).then_some((false, ihl, pkt[9]))
        }
        6 if pkt.len() >= 40 => Some((true, 40, pkt[6])),
        _ => None,
    }
}

/// The destination address of an IP packet.
pub fn destination(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let a: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        6 => {
            let a: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

// ---- the send side: one TUN read -> packets ------------------------------------

/// Calls `emit` with every IP packet that the TUN read `frame` (virtio-net
/// header, then the packet) carries, and returns how many. A GSO
/// super-packet is cut into `gso_size` segments in `scratch`, the way the
/// kernel's own segmentation would; a packet that only wants its checksum
/// completed gets it in place.
pub fn split(
    frame: &mut [u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, SplitError> {
    let hdr = VirtioNetHdr::decode(frame).ok_or(SplitError::Short)?;
    let pkt = &mut frame[VNET_HDR_LEN..];
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start);
            let at = start + usize::from(hdr.csum_offset);
            if at + 2 > pkt.len() || start > pkt.len() {
                return Err(SplitError::ChecksumOffset);
            }
            // The field holds the pseudo-header sum; summing from
            // csum_start over it gives the full checksum.
            let c = !fold(sum(&pkt[start..], 0));
            pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        emit(pkt);
        return Ok(1);
    }
    let tcp = match gso {
        GSO_TCPV4 | GSO_TCPV6 => true,
        GSO_UDP_L4 => false,
        other => return Err(SplitError::UnsupportedGso(other)),
    };
    let (v6, l4, proto) = transport(pkt).ok_or(SplitError::Headers)?;
    if proto != if tcp { PROTO_TCP } else { PROTO_UDP }
        || (gso == GSO_TCPV4 && v6)
        || (gso == GSO_TCPV6 && !v6)
    {
        return Err(SplitError::Headers);
    }
    let l4_len = if tcp {
        let off = pkt.get(l4 + 12).ok_or(SplitError::Headers)?;
        usize::from(off >> 4) * 4
    } else {
        8
    };
    let hdr_len = l4 + l4_len;
    if l4_len < if tcp { 20 } else { 8 } || pkt.len() < hdr_len || hdr.gso_size == 0 {
        return Err(SplitError::Headers);
    }
    let mss = usize::from(hdr.gso_size);
    let payload = pkt.len() - hdr_len;
    if hdr_len + mss.min(payload) > scratch.len() {
        return Err(SplitError::SegmentTooLarge);
    }
    if payload <= mss {
        // One segment: only the checksum to complete.
        if !v6 {
            set_ipv4_checksum(pkt, l4);
        }
        set_l4_checksum(pkt, v6, l4, tcp);
        emit(pkt);
        return Ok(1);
    }
    let seq0 = u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let mut off = 0;
    let mut i: u16 = 0;
    while off < payload {
        let n = mss.min(payload - off);
        let last = off + n == payload;
        let seg = &mut scratch[..hdr_len + n];
        seg[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
        seg[hdr_len..].copy_from_slice(&pkt[hdr_len + off..hdr_len + off + n]);
        // Lengths fit in u16: the segment is at most the scratch buffer,
        // itself checked against the packet, which came with a u16 length.
        if v6 {
            seg[4..6].copy_from_slice(&((hdr_len - 40 + n) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&((hdr_len + n) as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i).to_be_bytes());
            set_ipv4_checksum(seg, l4);
        }
        if tcp {
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
            if !last {
                seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[l4 + 13] &= !TCP_CWR;
            }
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
        }
        set_l4_checksum(seg, v6, l4, tcp);
        emit(seg);
        off += n;
        i = i.wrapping_add(1);
    }
    Ok(usize::from(i))
}

// ---- the receive side: packets -> super-packets --------------------------------

/// What of a packet matters for merging it with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    v6: bool,
    tcp: bool,
    /// Offset of the transport header.
    l4: usize,
    /// IP + transport header length.
    hdr_len: usize,
    payload: usize,
    seq: u32,
    psh: bool,
    /// IPv4 without DF: ids must be consecutive to be merged.
    ipv4_id: Option<u16>,
}

/// The packets that may be merged: IPv4 without options and not a fragment,
/// or IPv6 without extension headers; TCP with payload and only ACK (and
/// PSH) set, or UDP with payload.
fn flow_of(p: &[u8]) -> Option<Flow> {
    let (v6, l4, proto) = transport(p)?;
    if !v6 && l4 != 20 {
        return None;
    }
    let ipv4_id = (!v6 && p[6] & 0x40 == 0).then(|| u16::from_be_bytes([p[4], p[5]]));
    match proto {
        PROTO_TCP => {
            let thl = usize::from(*p.get(l4 + 12)? >> 4) * 4;
            let flags = *p.get(l4 + 13)?;
            if thl < 20 || p.len() <= l4 + thl || flags & !(TCP_ACK | TCP_PSH) != 0 {
                return None;
            }
            if flags & TCP_ACK == 0 {
                return None;
            }
            Some(Flow {
                v6,
                tcp: true,
                l4,
                hdr_len: l4 + thl,
                payload: p.len() - l4 - thl,
                seq: u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]),
                psh: flags & TCP_PSH != 0,
                ipv4_id,
            })
        }
        PROTO_UDP if p.len() > l4 + 8 => Some(Flow {
            v6,
            tcp: false,
            l4,
            hdr_len: l4 + 8,
            payload: p.len() - l4 - 8,
            seq: 0,
            psh: false,
            ipv4_id,
        }),
        _ => None,
    }
}

/// Same flow, and equal in every header field a merged packet keeps
/// (lengths, ids, sequence numbers, checksums and PSH may differ).
fn same_headers(a: &[u8], b: &[u8], f: &Flow) -> bool {
    let ip = if f.v6 {
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    } else {
        a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    };
    let l4 = f.l4;
    ip && if f.tcp {
        a[l4..l4 + 4] == b[l4..l4 + 4]
            && a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
            && a[l4 + 13] & !TCP_PSH == b[l4 + 13] & !TCP_PSH
            && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
            && a[l4 + 18..f.hdr_len] == b[l4 + 18..f.hdr_len]
    } else {
        a[l4..l4 + 4] == b[l4..l4 + 4]
    }
}

/// One write to the TUN: a single packet, or segments of one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Indices into the planned packets, in order; the first one's headers
    /// become the super-packet's.
    pub members: Vec<usize>,
    flow: Option<Flow>,
    /// Payload of each segment (the last may be shorter).
    gso_size: usize,
    /// Payload of all members.
    total: usize,
    next_seq: u32,
    next_id: u16,
    open: bool,
}

impl Group {
    fn single(i: usize) -> Self {
        Group {
            members: vec![i],
            flow: None,
            gso_size: 0,
            total: 0,
            next_seq: 0,
            next_id: 0,
            open: false,
        }
    }

    /// Whether this is one packet written as it is.
    pub fn is_single(&self) -> bool {
        self.members.len() == 1
    }

    /// The header length of the merged packet (the first member's), or 0.
    pub fn header_len(&self) -> usize {
        self.flow.map_or(0, |f| f.hdr_len)
    }
}

/// Groups `pkts` (in arrival order) into TUN writes: consecutive segments of
/// one TCP flow (or UDP flow, with `udp`) become one group, everything else
/// a group of its own. Packets keep their order within a flow. Pure.
pub fn plan(pkts: &[&[u8]], udp: bool) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, p) in pkts.iter().enumerate() {
        let Some(f) = flow_of(p).filter(|f| f.tcp || udp) else {
            groups.push(Group::single(i));
            continue;
        };
        let found = groups.iter_mut().rev().find(|g| {
            g.open
                && g.flow.is_some_and(|gf| {
                    gf.v6 == f.v6
                        && gf.tcp == f.tcp
                        && gf.hdr_len == f.hdr_len
                        && gf.ipv4_id.is_some() == f.ipv4_id.is_some()
                })
                && same_headers(pkts[g.members[0]], p, &f)
        });
        if let Some(g) = found {
            let gf = g.flow.unwrap_or(f);
            let fits = f.payload <= g.gso_size
                && (!f.tcp || f.seq == g.next_seq)
                && f.ipv4_id.is_none_or(|id| id == g.next_id)
                && gf.hdr_len + g.total + f.payload <= MAX_SUPER_PACKET
                && g.members.len() < MAX_SEGMENTS
                && (g.members.len() > 1
                    || l4_checksum_ok(pkts[g.members[0]], gf.v6, gf.l4, gf.tcp))
                && l4_checksum_ok(p, f.v6, f.l4, f.tcp);
            if fits {
                g.members.push(i);
                g.total += f.payload;
                g.next_seq = f.seq.wrapping_add(f.payload as u32);
                g.next_id = g.next_id.wrapping_add(1);
                // A shorter segment or PSH ends the super-packet.
                if f.psh || f.payload < g.gso_size {
                    g.open = false;
                }
                continue;
            }
            // Out of order or different: later packets of this flow must
            // not jump ahead of this one.
            g.open = false;
        }
        groups.push(Group {
            members: vec![i],
            flow: Some(f),
            gso_size: f.payload,
            total: f.payload,
            next_seq: f.seq.wrapping_add(f.payload as u32),
            next_id: f.ipv4_id.map_or(0, |id| id.wrapping_add(1)),
            open: !f.psh,
        });
    }
    groups
}

/// Turns the headers of a group's first member (`head`, at least
/// `group.header_len()` bytes) into the super-packet's, and returns the
/// virtio-net header for the write. `last_psh` is whether the last member
/// had PSH. For a single packet the header is all zeros (nothing to do).
pub fn merge_headers(head: &mut [u8], group: &Group, last_psh: bool) -> VirtioNetHdr {
    let Some(f) = group.flow.filter(|_| !group.is_single()) else {
        return VirtioNetHdr::default();
    };
    let l4_len = f.hdr_len - f.l4 + group.total;
    // Bounded by MAX_SUPER_PACKET in `plan`.
    if f.v6 {
        head[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        head[2..4].copy_from_slice(&((f.l4 + l4_len) as u16).to_be_bytes());
        set_ipv4_checksum(head, f.l4);
    }
    if f.tcp {
        if last_psh {
            head[f.l4 + 13] |= TCP_PSH;
        }
    } else {
        head[f.l4 + 4..f.l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel
    // completes it per segment.
    let proto = if f.tcp { PROTO_TCP } else { PROTO_UDP };
    let at = f.l4 + checksum_field(f.tcp);
    let partial = fold(pseudo_header(head, f.v6, proto, l4_len));
    head[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (f.tcp, f.v6) {
            (false, _) => GSO_UDP_L4,
            (true, false) => GSO_TCPV4,
            (true, true) => GSO_TCPV6,
        },
        hdr_len: f.hdr_len as u16,
        gso_size: group.gso_size as u16,
        csum_start: f.l4 as u16,
        csum_offset: checksum_field(f.tcp) as u16,
    }
}

/// Whether the TCP packet `p` (as planned in a group) has PSH set.
pub fn has_psh(p: &[u8]) -> bool {
    matches!(flow_of(p), Some(f) if f.tcp && f.psh)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: [u8; 4] = [100, 64, 0, 1];
    const DST4: [u8; 4] = [203, 0, 113, 2];

    fn ipv4(proto: u8, l4: &[u8], id: u16, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&SRC4);
        p[16..20].copy_from_slice(&DST4);
        p.extend_from_slice(l4);
        set_ipv4_checksum(&mut p, 20);
        p
    }

    fn ipv6(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        p[6] = proto;
        p[7] = 64;
        p[8..24].copy_from_slice(
            &"fd00::1"
                .parse::<std::net::Ipv6Addr>()
                .expect("addr")
                .octets(),
        );
        p[24..40].copy_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("addr")
                .octets(),
        );
        p.extend_from_slice(l4);
        p
    }

    fn payload(seed: u32, n: usize) -> Vec<u8> {
        (0..n).map(|i| (seed as usize + i * 7) as u8).collect()
    }

    /// A TCP segment with a timestamp option (32-byte header).
    fn tcp(v6: bool, seq: u32, n: usize, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 32];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        t.extend(payload(seq, n));
        checksummed(v6, PROTO_TCP, &t)
    }

    fn udp(v6: bool, seed: u32, n: usize) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&4000u16.to_be_bytes());
        u[2..4].copy_from_slice(&4001u16.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
        u.extend(payload(seed, n));
        checksummed(v6, PROTO_UDP, &u)
    }

    /// The transport segment `l4` in an IPv4 (DF, id 0) or IPv6 packet,
    /// its checksum computed.
    fn checksummed(v6: bool, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = if v6 {
            ipv6(proto, l4)
        } else {
            ipv4(proto, l4, 0, true)
        };
        let at = if v6 { 40 } else { 20 };
        set_l4_checksum(&mut p, v6, at, proto == PROTO_TCP);
        p
    }

    /// The super-packet the kernel would hand over: one header, the whole
    /// payload, the pseudo-header sum in the checksum field.
    fn super_packet(first: &[u8], total: usize, v6: bool, tcp: bool, mss: u16) -> Vec<u8> {
        let l4 = if v6 { 40 } else { 20 };
        let hdr_len = l4 + if tcp { 32 } else { 8 };
        let mut p = first[..hdr_len].to_vec();
        let seed = if tcp {
            u32::from_be_bytes([first[l4 + 4], first[l4 + 5], first[l4 + 6], first[l4 + 7]])
        } else {
            0
        };
        p.extend(payload(seed, total));
        let group = Group {
            members: vec![0, 1],
            flow: flow_of(first),
            gso_size: usize::from(mss),
            total,
            next_seq: 0,
            next_id: 0,
            open: false,
        };
        let hdr = merge_headers(&mut p[..hdr_len], &group, false);
        let mut frame = hdr.encode().to_vec();
        frame.extend(p);
        frame
    }

    fn split_all(frame: &mut [u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut scratch = vec![0u8; 65_536];
        let mut out = Vec::new();
        let n = split(frame, &mut scratch, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: 1388,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VirtioNetHdr::decode(&h.encode()), Some(h));
        assert_eq!(VirtioNetHdr::decode(&[0; 9]), None);
    }

    #[test]
    fn tso_split_matches_what_the_sender_would_have_sent() {
        for v6 in [false, true] {
            // 3.5 segments, PSH on the super-packet.
            let first = tcp(v6, 1000, 1000, TCP_ACK | TCP_PSH);
            let mut frame = super_packet(&first, 3500, v6, true, 1000);
            let segs = split_all(&mut frame).expect("split");
            assert_eq!(segs.len(), 4, "v6={v6}");
            for (i, s) in segs.iter().enumerate() {
                let last = i == 3;
                let flags = if last { TCP_ACK | TCP_PSH } else { TCP_ACK };
                let mut want = tcp(
                    v6,
                    1000 + 1000 * i as u32,
                    if last { 500 } else { 1000 },
                    flags,
                );
                if !v6 {
                    // The kernel numbers segments from the super-packet's id.
                    want[4..6].copy_from_slice(&(i as u16).to_be_bytes());
                    set_ipv4_checksum(&mut want, 20);
                }
                // The payload bytes are a continuation, not a fresh pattern.
                let l4 = if v6 { 40 } else { 20 };
                assert_eq!(s[..l4 + 32].len(), want[..l4 + 32].len());
                assert_eq!(s.len(), want.len());
                assert!(l4_checksum_ok(s, v6, l4, true), "segment {i} v6={v6}");
                let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
                assert_eq!(seq, 1000 + 1000 * i as u32);
                assert_eq!(s[l4 + 13], flags);
                if !v6 {
                    assert_eq!(fold(sum(&s[..20], 0)), 0xffff, "IPv4 header checksum");
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), i as u16);
                }
            }
        }
    }

    #[test]
    fn split_then_merge_is_the_identity() {
        for (v6, tcp_flow) in [(false, true), (true, true), (false, false), (true, false)] {
            let mss = 1200;
            let first = if tcp_flow {
                tcp(v6, 5, mss, TCP_ACK)
            } else {
                udp(v6, 0, mss)
            };
            let mut frame = super_packet(&first, 4 * mss + 100, v6, tcp_flow, mss as u16);
            let original = frame.clone();
            let segs = split_all(&mut frame).expect("split");
            assert_eq!(segs.len(), 5);
            let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
            let groups = plan(&refs, true);
            assert_eq!(groups.len(), 1, "v6={v6} tcp={tcp_flow}: {groups:?}");
            let g = &groups[0];
            assert_eq!(g.members, vec![0, 1, 2, 3, 4]);
            let mut merged = segs[0][..g.header_len()].to_vec();
            let hdr = merge_headers(&mut merged, g, false);
            for s in &segs {
                merged.extend_from_slice(&s[g.header_len()..]);
            }
            let mut again = hdr.encode().to_vec();
            again.extend(merged);
            // The merged packet equals the one the sender's kernel handed
            // over, except the IPv4 id and header checksum (the first
            // segment's) and the UDP length of the first segment.
            assert_eq!(again.len(), original.len());
            let resplit = split_all(&mut again).expect("split again");
            assert_eq!(resplit, segs, "v6={v6} tcp={tcp_flow}");
        }
    }

    #[test]
    fn needs_csum_without_gso_is_completed() {
        let mut p = tcp(false, 1, 100, TCP_ACK);
        let good = p.clone();
        let partial = fold(pseudo_header(&p, false, PROTO_TCP, p.len() - 20));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        let mut frame = hdr.encode().to_vec();
        frame.extend(p);
        assert_eq!(split_all(&mut frame).expect("split"), vec![good]);
    }

    #[test]
    fn bad_reads_are_refused() {
        assert_eq!(split_all(&mut [0u8; 4]), Err(SplitError::Short));
        let mut bad_csum = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 200,
            ..VirtioNetHdr::default()
        }
        .encode()
        .to_vec();
        bad_csum.extend(tcp(false, 1, 10, TCP_ACK));
        assert_eq!(split_all(&mut bad_csum), Err(SplitError::ChecksumOffset));
        // GSO TCPv4 on a UDP packet, and on an IPv6 packet.
        for pkt in [udp(false, 0, 3000), tcp(true, 0, 3000, TCP_ACK)] {
            let mut f = gso_frame(GSO_TCPV4, 1000, &pkt);
            assert_eq!(split_all(&mut f), Err(SplitError::Headers));
        }
        let mut ufo = gso_frame(3, 1000, &udp(false, 0, 3000));
        assert_eq!(split_all(&mut ufo), Err(SplitError::UnsupportedGso(3)));
        // Garbage never panics.
        for len in 0..80 {
            let garbage: Vec<u8> = (0..len).map(|i| if i == 0 { 0x45 } else { 0xff }).collect();
            let _ = split_all(&mut gso_frame(GSO_TCPV4, 7, &garbage));
        }
    }

    /// A TUN read: a virtio-net header asking for GSO of `gso_type` in
    /// segments of `gso_size`, then `pkt`.
    fn gso_frame(gso_type: u8, gso_size: u16, pkt: &[u8]) -> Vec<u8> {
        let mut f = VirtioNetHdr {
            gso_type,
            gso_size,
            ..VirtioNetHdr::default()
        }
        .encode()
        .to_vec();
        f.extend_from_slice(pkt);
        f
    }

    #[test]
    fn only_mergeable_packets_are_merged() {
        let a = tcp(false, 0, 1000, TCP_ACK);
        let gap = tcp(false, 2000, 1000, TCP_ACK);
        let mut corrupt = tcp(false, 3000, 1000, TCP_ACK);
        corrupt[60] ^= 1;
        let pure_ack = tcp(false, 4000, 0, TCP_ACK);
        let syn = tcp(false, 4000, 10, TCP_ACK | 0x02);
        let groups = plan(&[&a, &gap, &corrupt, &pure_ack, &syn], true);
        let m: Vec<Vec<usize>> = groups.iter().map(|g| g.members.clone()).collect();
        assert_eq!(m, vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
        assert!(groups.iter().all(Group::is_single));
    }

    #[test]
    fn a_bad_checksum_on_the_first_packet_stops_the_merge() {
        let mut a = tcp(false, 0, 1000, TCP_ACK);
        a[60] ^= 1;
        let b = tcp(false, 1000, 1000, TCP_ACK);
        let m: Vec<Vec<usize>> = plan(&[&a, &b], true)
            .into_iter()
            .map(|g| g.members)
            .collect();
        assert_eq!(m, vec![vec![0], vec![1]]);
    }

    #[test]
    fn psh_and_short_segments_end_a_group_and_flows_interleave() {
        let a0 = tcp(false, 0, 1000, TCP_ACK);
        let b0 = tcp(true, 0, 1000, TCP_ACK);
        let a1 = tcp(false, 1000, 1000, TCP_ACK | TCP_PSH);
        let b1 = tcp(true, 1000, 500, TCP_ACK);
        let a2 = tcp(false, 2000, 1000, TCP_ACK);
        let b2 = tcp(true, 1500, 1000, TCP_ACK);
        let groups = plan(&[&a0, &b0, &a1, &b1, &a2, &b2], true);
        let m: Vec<Vec<usize>> = groups.iter().map(|g| g.members.clone()).collect();
        assert_eq!(m, vec![vec![0, 2], vec![1, 3], vec![4], vec![5]]);
        assert!(has_psh(&a1) && !has_psh(&a0));
    }

    #[test]
    fn different_options_or_windows_are_not_merged() {
        let a = tcp(false, 0, 1000, TCP_ACK);
        let mut b = tcp(false, 1000, 1000, TCP_ACK);
        b[20 + 27] = 4; // another timestamp
        set_l4_checksum(&mut b, false, 20, true);
        let mut c = tcp(false, 1000, 1000, TCP_ACK);
        c[20 + 14] = 9; // another window
        set_l4_checksum(&mut c, false, 20, true);
        assert_eq!(plan(&[&a, &b], true).len(), 2);
        assert_eq!(plan(&[&a, &c], true).len(), 2);
    }

    #[test]
    fn ipv4_without_df_needs_consecutive_ids() {
        let t = |seq: u32, id: u16| {
            let full = tcp(false, seq, 1000, TCP_ACK);
            let mut p = ipv4(PROTO_TCP, &full[20..], id, false);
            set_l4_checksum(&mut p, false, 20, true);
            p
        };
        let m = |pkts: &[&[u8]]| {
            plan(pkts, true)
                .into_iter()
                .map(|g| g.members)
                .collect::<Vec<_>>()
        };
        assert_eq!(m(&[&t(0, 7), &t(1000, 8)]), vec![vec![0, 1]]);
        assert_eq!(m(&[&t(0, 7), &t(1000, 9)]), vec![vec![0], vec![1]]);
    }

    #[test]
    fn udp_is_merged_only_when_allowed() {
        let a = udp(false, 0, 1000);
        let b = udp(false, 1, 1000);
        assert_eq!(plan(&[&a, &b], false).len(), 2);
        assert_eq!(plan(&[&a, &b], true).len(), 1);
    }

    #[test]
    fn groups_stop_at_the_segment_and_size_limits() {
        let pkts: Vec<Vec<u8>> = (0..100)
            .map(|i| tcp(false, i * 1000, 1000, TCP_ACK))
            .collect();
        let refs: Vec<&[u8]> = pkts.iter().map(Vec::as_slice).collect();
        let groups = plan(&refs, true);
        assert!(groups.iter().all(|g| g.members.len() <= MAX_SEGMENTS));
        assert!(
            groups
                .iter()
                .all(|g| g.header_len() + g.total <= MAX_SUPER_PACKET)
        );
        assert_eq!(groups.iter().map(|g| g.members.len()).sum::<usize>(), 100);
        // 65,535 bytes hold 65 segments of 1,000 plus headers: 64 is the cap.
        assert_eq!(groups[0].members.len(), MAX_SEGMENTS);
    }

    /// Arbitrary headers and bytes through `split` and `plan`/`merge_headers`
    /// never panic (a deterministic xorshift, so a failure reproduces).
    #[test]
    fn arbitrary_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut scratch = vec![0u8; 2048];
        for _ in 0..20_000 {
            let r = next();
            let len = (r % 1600) as usize;
            let base = match r % 4 {
                0 => tcp(false, 0, len, TCP_ACK),
                1 => tcp(true, 0, len, TCP_ACK),
                2 => udp(r % 8 == 2, 0, len),
                _ => Vec::new(),
            };
            let mut pkt = if base.is_empty() {
                (0..len).map(|_| next() as u8).collect()
            } else {
                base
            };
            // Flip a few bytes, truncate sometimes.
            for _ in 0..(next() % 4) {
                if !pkt.is_empty() {
                    let i = (next() as usize) % pkt.len();
                    pkt[i] = next() as u8;
                }
            }
            if next() % 5 == 0 {
                pkt.truncate((next() as usize) % (pkt.len() + 1));
            }
            let hdr = VirtioNetHdr {
                flags: (next() % 3) as u8,
                gso_type: [0, 1, 3, 4, 5, 0x81][(next() % 6) as usize],
                hdr_len: next() as u16,
                gso_size: (next() % 1500) as u16,
                csum_start: (next() % 80) as u16,
                csum_offset: (next() % 40) as u16,
            };
            let mut frame = hdr.encode().to_vec();
            frame.extend_from_slice(&pkt);
            let _ = split(&mut frame, &mut scratch, |_| {});
            let refs = [pkt.as_slice(), pkt.as_slice()];
            for g in plan(&refs, true) {
                let hl = g.header_len();
                if hl > 0 && hl <= pkt.len() {
                    let mut head = pkt[..hl].to_vec();
                    let _ = merge_headers(&mut head, &g, false);
                }
            }
        }
    }

    #[test]
    fn destinations_are_read_from_both_families() {
        assert_eq!(
            destination(&tcp(false, 0, 1, TCP_ACK)),
            Some(IpAddr::from(DST4))
        );
        assert_eq!(
            destination(&udp(true, 0, 1)),
            Some("2001:db8::2".parse().expect("addr"))
        );
        assert_eq!(destination(&[0x45, 0, 0]), None);
        assert_eq!(destination(&[]), None);
    }
}
