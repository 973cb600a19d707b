//! The eBPF data path: the one owner of nexd's programs, their links and
//! maps. It loads the object embedded at build time, attaches programs,
//! reads counters, and detaches everything when dropped.
//!
//! Attachment uses TCX on kernels that have it (6.6+) and a clsact qdisc
//! with a direct-action cls_bpf filter otherwise; aya picks by kernel
//! version.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, tc},
    util::KernelVersion,
};
use nexd_common::{
    counters::{Counter, CounterValue},
    names,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

/// The eBPF object built from `nexd-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nexd"));

/// Why the data path could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the eBPF object has no {kind} called {name}; nexd and its embedded programs disagree")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {name} to {iface} ({direction}) failed: {source}")]
    Attach {
        name: &'static str,
        iface: String,
        direction: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("adding a clsact qdisc to {iface} failed: {source}")]
    Qdisc {
        iface: String,
        source: Box<tc::TcError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// Packets and bytes of one counter, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterTotal {
    pub packets: u64,
    pub bytes: u64,
}

/// How programs are attached on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

/// The loaded object and its attachments. Dropping it detaches every
/// program and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    iface: String,
    mode: AttachMode,
}

impl Datapath {
    /// Loads the programs and attaches the tunnel observers to `iface`.
    pub fn attach(iface: &str) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let mode = if tcx {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        };
        if mode == AttachMode::Clsact {
            // EEXIST means the qdisc is already there, which is fine.
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(DatapathError::Qdisc {
                        iface: iface.to_owned(),
                        source: Box::new(source),
                    });
                }
            }
        }
        for (name, direction) in [
            (names::TUNNEL_INGRESS_PROG, TcAttachType::Ingress),
            (names::TUNNEL_EGRESS_PROG, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    name,
                    source: Box::new(source),
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                name,
                source: Box::new(source),
            })?;
            prog.attach(iface, direction)
                .map_err(|source| DatapathError::Attach {
                    name,
                    iface: iface.to_owned(),
                    direction: if direction == TcAttachType::Ingress {
                        "ingress"
                    } else {
                        "egress"
                    },
                    source: Box::new(source),
                })?;
            debug!(iface, program = name, "eBPF program attached");
        }
        info!(iface, ?mode, "eBPF tunnel counters attached");
        Ok(Datapath {
            ebpf,
            iface: iface.to_owned(),
            mode,
        })
    }

    /// The interface the tunnel programs are attached to.
    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// TCX or clsact.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Every counter, summed over CPUs, keyed by its stable name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, CounterTotal>, DatapathError> {
        let name = names::COUNTERS_MAP;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let array: PerCpuArray<&aya::maps::MapData, CounterValue> = PerCpuArray::try_from(map)
            .map_err(|source| DatapathError::Map {
                name,
                source: Box::new(source),
            })?;
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let per_cpu = array
                .get(&counter.index(), 0)
                .map_err(|source| DatapathError::Map {
                    name,
                    source: Box::new(source),
                })?;
            let total = per_cpu
                .iter()
                .fold(CounterTotal::default(), |acc, v| CounterTotal {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.insert(counter.name(), total);
        }
        Ok(out)
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so map
/// creation does not fail there. Newer kernels ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, fully initialised struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
