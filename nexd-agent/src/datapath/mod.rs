//! The eBPF data path: the one owner of nexd's programs, their links, maps
//! and pins. It loads the object embedded at build time, attaches
//! programs, keeps the maps in sync with what the reconcile loop wants,
//! reads counters, and detaches everything when dropped (except a leak
//! guard pinned on purpose for `--kill-switch`).
//!
//! Attachment uses TCX on kernels that have it (6.6+) and a clsact qdisc
//! with direct-action cls_bpf filters otherwise.

mod attach;
mod bpffs;
pub mod exit;
mod maps;
mod qdisc;

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, Map, MapData, MapError, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    util::KernelVersion,
};
use nexd_common::{
    config::DatapathConfig,
    counters::{Counter, CounterValue},
    names,
};
use tracing::{debug, info, warn};

pub use attach::{GuardState, guard_pin_path, guards_on, pin_dir, remove_leftovers};
pub use bpffs::{check_persistent as check_bpffs_persistent, is_bpffs};
pub use maps::{BypassSet, GuardSet, guard_set};
pub use nexd_common::exit::{EXIT_CLIENTS_MAX, MssConfig};

/// The eBPF object built from `nexd-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nexd"));

/// The programs every node may need, loaded (verified) at start-up, so a
/// kernel that refuses one fails nexd at once.
const PROGRAMS: [&str; 7] = [
    names::TUNNEL_INGRESS_PROG,
    names::TUNNEL_EGRESS_PROG,
    names::STEER_PROG,
    names::STEER_L3_PROG,
    names::GUARD_PROG,
    names::GUARD_L3_PROG,
    names::NOOP_PROG,
];

/// The programs only exit nodes and LAN gateways need, verified on first
/// use (attach or test run): their verification (the TCP options walk
/// above all) costs start-up time every other node need not pay, seconds
/// under emulation. `Datapath::verify_all` verifies them up front.
const ON_DEMAND: [&str; 6] = [
    names::EXIT_INGRESS_PROG,
    names::EXIT_INGRESS_L2_PROG,
    names::EXIT_EGRESS_PROG,
    names::EXIT_EGRESS_L2_PROG,
    names::MSS_CLAMP_PROG,
    names::MSS_CLAMP_L2_PROG,
];

/// Why the data path could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the eBPF object has no {kind} called {name}; nexd and its embedded programs disagree")]
    Missing { kind: &'static str, name: String },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {name} to {iface} ({direction}) failed: {source}")]
    Attach {
        name: String,
        iface: String,
        direction: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("adding a clsact qdisc to {iface} failed: {source}")]
    Qdisc {
        iface: String,
        source: Box<aya::programs::tc::TcError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning the leak guard at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error(transparent)]
    ExitClients(#[from] exit::ExitClientError),
    #[error(
        "the exit node's policy has no entry for its own mesh addresses: attaching now would \
         cut it off from its mesh peers (sync the policy first)"
    )]
    ExitNotReady,
    #[error("cannot count the CPUs for a per-CPU map: {0}")]
    Cpus(String),
}

impl DatapathError {
    fn program(name: &str, e: aya::programs::ProgramError) -> Self {
        DatapathError::Program {
            name: name.to_owned(),
            source: Box::new(e),
        }
    }

    fn map(name: &'static str, e: aya::maps::MapError) -> Self {
        DatapathError::Map {
            name,
            source: Box::new(e),
        }
    }

    fn missing_map(name: &str) -> Self {
        DatapathError::Missing {
            kind: "map",
            name: name.to_owned(),
        }
    }
}

/// The classifier called `name` in `ebpf` (loaded or not).
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Missing {
            kind: "program",
            name: name.to_owned(),
        })?
        .try_into()
        .map_err(|e| DatapathError::program(name, e))
}

pub use nexd_proto::{AttachMode, CounterTotal};

/// How programs attach on the running kernel: TCX on 6.6 and later,
/// clsact before.
pub fn running_kernel_mode() -> AttachMode {
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        AttachMode::Tcx
    } else {
        AttachMode::Clsact
    }
}

/// How large to make the maps whose size is chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Exit node clients: slots of the client maps, limits and per-CPU
    /// counters (about 160 bytes per slot and CPU for the counters). A
    /// device that never serves as an exit node can pass 1.
    pub exit_clients: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            exit_clients: EXIT_CLIENTS_MAX,
        }
    }
}

/// The `struct __sk_buff` fields a test run may set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestContext {
    /// `skb->mark`.
    pub mark: u32,
    /// `skb->ingress_ifindex`: non-zero makes an egress packet look
    /// forwarded (received on that interface) rather than locally made.
    pub ingress_ifindex: u32,
    /// `skb_shinfo(skb)->gso_segs`.
    pub gso_segs: u32,
    /// `skb_shinfo(skb)->gso_size` (a GSO packet from a TUN has a size
    /// but no segment count yet).
    pub gso_size: u32,
}

/// What a test run returned, with the packet as the program left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    pub outcome: TestOutcome,
    pub packet: Vec<u8>,
}

/// What a `BPF_PROG_TEST_RUN` of a classifier returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestOutcome {
    /// The TC action (as i32: -1 is TCX_NEXT / TC_ACT_UNSPEC).
    pub action: i32,
    /// `skb->mark` after the program.
    pub mark: u32,
    /// Average time per run, as the kernel measured it.
    pub nanos_per_run: u64,
}

/// The loaded object and its attachments.
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    pub(crate) mode: AttachMode,
    pub(crate) attached: attach::Attachments,
    pub(crate) bypass: maps::BypassSet,
    pub(crate) mesh_prefixes: std::collections::HashSet<ipnet::IpNet>,
    pub(crate) endpoints: std::collections::HashSet<std::net::SocketAddr>,
    pub(crate) guard_set: maps::GuardSet,
    pub(crate) exit: exit::ExitState,
    config: DatapathConfig,
    _logger: Option<tokio::task::JoinHandle<()>>,
}

impl Datapath {
    /// Loads the object and verifies the programs every node needs
    /// (`PROGRAMS`; the exit node's and the MSS clamp are verified on
    /// first use), attaching nothing. `BPF_PROG_TEST_RUN` works on a
    /// detached data path.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(LoadOptions::default())
    }

    /// [`Datapath::load`] with map sizes of one's choosing.
    pub fn load_with(opts: LoadOptions) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        let clients = opts.exit_clients.max(1);
        // No kernel BTF: the programs carry no CO-RE relocations, and
        // parsing /sys/kernel/btf/vmlinux (which `Ebpf::load` does twice)
        // was most of nexd's peak memory.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(names::EXIT_CLIENTS_V4_MAP, clients)
            .map_max_entries(names::EXIT_CLIENTS_V6_MAP, clients)
            .map_max_entries(names::EXIT_LIMITS_MAP, clients)
            .map_max_entries(names::EXIT_CLIENT_COUNTERS_MAP, clients)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in PROGRAMS {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        Ok(Datapath {
            ebpf,
            mode: running_kernel_mode(),
            attached: attach::Attachments::default(),
            bypass: maps::BypassSet::default(),
            mesh_prefixes: Default::default(),
            endpoints: Default::default(),
            guard_set: Default::default(),
            exit: exit::ExitState::new(clients),
            config: DatapathConfig::default(),
            _logger: None,
        })
    }

    /// The classifier called `name` (loaded or not).
    pub(crate) fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    /// The map called `name` as the map type `M` (read-only).
    pub(crate) fn typed_map<'a, M>(&'a self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| DatapathError::missing_map(name))?;
        M::try_from(map).map_err(|e| DatapathError::map(name, e))
    }

    /// The map called `name` as the map type `M`, to write.
    pub(crate) fn typed_map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::missing_map(name))?;
        M::try_from(map).map_err(|e| DatapathError::map(name, e))
    }

    /// Writes the one entry of the array map `name` (the configuration
    /// maps: a single value the programs read).
    pub(crate) fn set_single<T: Pod>(
        &mut self,
        name: &'static str,
        value: T,
    ) -> Result<(), DatapathError> {
        let mut arr: Array<&mut MapData, T> = self.typed_map_mut(name)?;
        arr.set(0, value, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Loads (verifies) `name` if it is not yet: the programs of
    /// [`ON_DEMAND`] are loaded on first use.
    pub(crate) fn ensure_loaded(&mut self, name: &str) -> Result<(), DatapathError> {
        let prog = self.classifier(name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| DatapathError::program(name, e))?;
            debug!(program = name, "eBPF program verified on first use");
        }
        Ok(())
    }

    /// Verifies every program now, those loaded on demand included (an
    /// exit node can call this at start to fail early; tests do).
    pub fn verify_all(&mut self) -> Result<(), DatapathError> {
        for name in PROGRAMS.iter().chain(ON_DEMAND.iter()) {
            self.ensure_loaded(name)?;
        }
        Ok(())
    }

    /// Loads and attaches the tunnel observers to the WireGuard interface.
    pub fn start(tunnel_iface: &str) -> Result<Self, DatapathError> {
        Self::start_with(tunnel_iface, LoadOptions::default())
    }

    /// [`Datapath::start`] with map sizes of one's choosing: a node that
    /// does not serve as an exit node passes `exit_clients: 1` and saves
    /// the client maps' memory and their set-up time.
    pub fn start_with(tunnel_iface: &str, opts: LoadOptions) -> Result<Self, DatapathError> {
        let mut dp = Self::load_with(opts)?;
        dp.forward_logs();
        dp.attach_tunnel(tunnel_iface)?;
        info!(iface = tunnel_iface, mode = ?dp.mode, "eBPF data path loaded, tunnel counters attached");
        Ok(dp)
    }

    /// Forwards the programs' aya-log records into nexd's log (they are
    /// only produced when asked, e.g. guard drop logging).
    fn forward_logs(&mut self) {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => {
                // SAFETY: the logger owns its ring buffer's descriptor and
                // keeps it open, unchanged, for as long as it lives, which
                // is as long as the AsyncFd that owns it.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        logger,
                        tokio::io::Interest::READABLE,
                    )
                };
                match registered {
                    Ok(mut fd) => {
                        self._logger = Some(tokio::spawn(async move {
                            loop {
                                let Ok(mut guard) = fd.readable_mut().await else {
                                    return;
                                };
                                guard.get_inner_mut().flush();
                                guard.clear_ready();
                            }
                        }));
                    }
                    Err(e) => debug!(error = %e, "cannot poll the eBPF log buffer"),
                }
            }
            Err(e) => debug!(error = %e, "eBPF logging not available"),
        }
    }

    /// TCX or clsact.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Writes the runtime configuration (flags, fwmark).
    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<(), DatapathError> {
        if cfg == self.config {
            return Ok(());
        }
        self.set_single(names::CONFIG_MAP, cfg)?;
        self.config = cfg;
        debug!(
            flags = cfg.flags,
            fwmark = cfg.fwmark,
            "data path config written"
        );
        Ok(())
    }

    /// The configuration last written.
    pub fn config(&self) -> DatapathConfig {
        self.config
    }

    /// Every counter, summed over CPUs, keyed by its stable name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, CounterTotal>, DatapathError> {
        let name = names::COUNTERS_MAP;
        let array: PerCpuArray<&MapData, CounterValue> = self.typed_map(name)?;
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let per_cpu = array
                .get(&counter.index(), 0)
                .map_err(|e| DatapathError::map(name, e))?;
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

    /// Runs `program` once (or `repeat` times) over `packet` with
    /// BPF_PROG_TEST_RUN, starting from `skb->mark = mark`.
    pub fn test_run(
        &mut self,
        program: &str,
        packet: &[u8],
        mark: u32,
        repeat: u32,
    ) -> Result<TestOutcome, DatapathError> {
        let ctx = TestContext {
            mark,
            ..Default::default()
        };
        self.test_run_with(program, packet, ctx, repeat)
            .map(|o| o.outcome)
    }

    /// Runs `program` `repeat` times over `packet` with BPF_PROG_TEST_RUN
    /// from the context `ctx`; returns the packet as the program left it.
    /// The kernel always hands a classifier an Ethernet frame here, so
    /// programs for L3 links are tested through their `_l2` variants.
    pub fn test_run_with(
        &mut self,
        program: &str,
        packet: &[u8],
        ctx: TestContext,
        repeat: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        self.ensure_loaded(program)?;
        let prog = self.classifier(program)?;
        // The kernel accepts a context with only the writable fields set.
        let mut ctx_in = [0u8; SK_BUFF_SIZE];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&ctx.mark.to_ne_bytes());
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ctx.ingress_ifindex.to_ne_bytes());
        ctx_in[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&ctx.gso_segs.to_ne_bytes());
        ctx_in[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&ctx.gso_size.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_SIZE];
        let mut data_out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut data_out);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        opts.repeat = repeat.max(1);
        let r = prog
            .test_run(opts)
            .map_err(|e| DatapathError::program(program, e))?;
        let mut m = [0u8; 4];
        m.copy_from_slice(&ctx_out[SKB_MARK..SKB_MARK + 4]);
        data_out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            outcome: TestOutcome {
                action: r.return_value as i32,
                mark: u32::from_ne_bytes(m),
                nanos_per_run: r.duration.as_nanos() as u64,
            },
            packet: data_out,
        })
    }
}

/// Size of the UAPI `struct __sk_buff`, and the offsets of the fields a
/// test run sets (include/uapi/linux/bpf.h).
const SK_BUFF_SIZE: usize = 192;
const SKB_MARK: usize = 8;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            warn!(error = %e, "detaching eBPF programs failed");
        }
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
