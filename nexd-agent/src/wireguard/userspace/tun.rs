//! The TUN device of the userspace backend: its one file descriptor, opened
//! with `IFF_VNET_HDR` and TCP/UDP segmentation offloads where the kernel
//! accepts them, and the writes of a batch of decrypted packets (merged
//! into super-packets by `offload`).
//!
//! With the offloads, the kernel hands nexd up to 64 KiB of one TCP (TSO)
//! or UDP (USO, Linux 6.2+) flow per read, and accepts as much per write,
//! each prefixed with a virtio-net header (`offload`). Negotiation falls
//! back step by step: TSO and USO, TSO alone, and finally a plain TUN
//! without the header (one packet per read and write), so nexd runs on any
//! kernel with TUN, only slower.
//!
//! The link exists as long as the descriptor is open: closing it (when the
//! backend stops) removes the interface with its addresses and routes.

use std::{
    fs::{File, OpenOptions},
    io::{self, IoSlice, Write as _},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::fs::OpenOptionsExt as _,
    },
};

use tracing::{debug, trace, warn};

use super::{
    batch::PlainBatch,
    offload::{self, VNET_HDR_LEN},
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_USO4: u32 = 0x20;
const TUN_F_USO6: u32 = 0x40;

/// What the TUN does for nexd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Every read and write carries a virtio-net header.
    pub vnet_hdr: bool,
    /// TCP super-packets (both directions).
    pub tso: bool,
    /// UDP super-packets (both directions).
    pub uso: bool,
}

/// The offload sets to ask for, best first; the first the kernel accepts
/// wins. Without any, the TUN is reopened without the vnet header.
const OFFLOAD_STEPS: [(u32, Offloads); 2] = [
    (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
        Offloads {
            vnet_hdr: true,
            tso: true,
            uso: true,
        },
    ),
    (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
        Offloads {
            vnet_hdr: true,
            tso: true,
            uso: false,
        },
    ),
];

/// Asks for each offload step in turn; the first accepted one, or `None`
/// when the kernel took none (the caller then drops the vnet header). Pure
/// given `set`.
pub fn negotiate(mut set: impl FnMut(u32) -> io::Result<()>) -> (Option<Offloads>, Vec<io::Error>) {
    let mut refused = Vec::new();
    for (flags, offloads) in OFFLOAD_STEPS {
        match set(flags) {
            Ok(()) => return (Some(offloads), refused),
            Err(e) => refused.push(e),
        }
    }
    (None, refused)
}

/// The open TUN device.
pub struct Tun {
    file: File,
    offloads: Offloads,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_fd(name: &str, flags: libc::c_short) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must have 1 to 15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (16-byte name, flags, padding to 40 bytes).
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl Tun {
    /// Creates the interface `name` (down, no address) and negotiates the
    /// offloads.
    pub fn open(name: &str) -> io::Result<Tun> {
        let refusals = match open_fd(name, IFF_VNET_HDR) {
            Ok(file) => {
                let fd = file.as_raw_fd();
                let (offloads, refused) = negotiate(|flags| {
                    // SAFETY: TUNSETOFFLOAD takes the flags by value.
                    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                if let Some(offloads) = offloads {
                    if !refused.is_empty() {
                        warn!(iface = name, error = %refused[0], "TUN UDP segmentation offload (Linux 6.2+) refused; TCP offloads only");
                    }
                    return Ok(Tun { file, offloads });
                }
                // Close it so the name is free again.
                drop(file);
                refused
            }
            Err(e) => vec![e],
        };
        warn!(
            iface = name,
            errors = ?refusals.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "TUN offloads unavailable; one packet per read and write (slower)"
        );
        Ok(Tun {
            file: open_fd(name, 0)?,
            offloads: Offloads {
                vnet_hdr: false,
                tso: false,
                uso: false,
            },
        })
    }

    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One packet (with its vnet header when on); `WouldBlock` when none.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of its length.
            let r = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// One packet from its parts (vnet header first when on).
    fn write(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(parts)
    }

    /// Writes every packet of `batch`, segments of one flow merged into
    /// super-packets where the offloads allow (`offload::plan`), and
    /// empties it; returns how many packets were refused.
    pub fn write_batch(&self, batch: &mut PlainBatch) -> usize {
        let mut failed = 0;
        if !self.offloads.vnet_hdr {
            for i in 0..batch.len() {
                if let Err(e) = self.write(&[IoSlice::new(batch.packet(i))]) {
                    trace!(error = %e, "TUN write failed");
                    failed += 1;
                }
            }
            batch.clear();
            return failed;
        }
        let pkts: Vec<&[u8]> = (0..batch.len()).map(|i| batch.packet(i)).collect();
        let zero = [0u8; VNET_HDR_LEN];
        let mut head = [0u8; 128];
        for g in offload::plan(&pkts, self.offloads.uso) {
            let first = pkts[g.members[0]];
            if g.is_single() {
                if let Err(e) = self.write(&[IoSlice::new(&zero), IoSlice::new(first)]) {
                    trace!(error = %e, "TUN write failed");
                    failed += 1;
                }
                continue;
            }
            let hl = g.header_len();
            let last_psh = g.members.last().is_some_and(|&m| offload::has_psh(pkts[m]));
            head[..hl].copy_from_slice(&first[..hl]);
            let vnet = offload::merge_headers(&mut head[..hl], &g, last_psh).encode();
            let mut iov = Vec::with_capacity(g.members.len() + 2);
            iov.push(IoSlice::new(&vnet));
            iov.push(IoSlice::new(&head[..hl]));
            iov.extend(g.members.iter().map(|&m| IoSlice::new(&pkts[m][hl..])));
            if let Err(e) = self.write(&iov) {
                // The merged packet was refused: the segments one by one.
                debug!(error = %e, segments = g.members.len(), "TUN refused a merged packet");
                for &m in &g.members {
                    if self
                        .write(&[IoSlice::new(&zero), IoSlice::new(pkts[m])])
                        .is_err()
                    {
                        failed += 1;
                    }
                }
            }
        }
        batch.clear();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn the_best_accepted_offloads_win() {
        let mut asked = Vec::new();
        let (got, refused) = negotiate(|f| {
            asked.push(f);
            Ok(())
        });
        assert_eq!(got.map(|o| (o.tso, o.uso)), Some((true, true)));
        assert!(refused.is_empty());
        assert_eq!(asked.len(), 1);
    }

    #[test]
    fn an_old_kernel_gets_tso_only() {
        let (got, refused) = negotiate(|f| {
            if f & TUN_F_USO4 != 0 {
                Err(refuse(libc::EINVAL))
            } else {
                Ok(())
            }
        });
        assert_eq!(
            got,
            Some(Offloads {
                vnet_hdr: true,
                tso: true,
                uso: false
            })
        );
        assert_eq!(refused.len(), 1);
    }

    #[test]
    fn no_offloads_at_all_means_no_vnet_header() {
        let (got, refused) = negotiate(|_| Err(refuse(libc::EINVAL)));
        assert_eq!(got, None);
        assert_eq!(refused.len(), 2);
    }
}
