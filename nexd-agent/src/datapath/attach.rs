//! Attaching and detaching programs, and the leak guard's pin.
//!
//! Every attachment is recorded here and removed by `detach_*`; dropping
//! the `Datapath` detaches them all. The one exception is deliberate: the
//! leak guard attached with `pin = true` (`--kill-switch`) is pinned in
//! bpffs, so it outlives a SIGKILLed nexd and keeps blocking leaks until
//! the next nexd (or an explicit disable) removes the pin.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};
use nexd_common::names;
use tracing::{debug, info, warn};

use super::{AttachMode, Datapath, DatapathError, bpffs, qdisc};

/// An attached program.
pub(super) struct Attached {
    pub(super) program: &'static str,
    pub(super) link: SchedClassifierLinkId,
}

/// Where the leak guard stands.
pub enum GuardState {
    /// Attached and owned: detached when nexd stops or crashes.
    Owned {
        iface: String,
        program: &'static str,
        link: SchedClassifierLinkId,
    },
    /// Attached and pinned at `path` (TCX): survives a crash.
    Pinned {
        iface: String,
        program: &'static str,
        link: PinnedLink,
        /// The pin, `<bpffs>/nexd/<wg>/guard-<uplink>`: its directories
        /// go with it when they are left empty.
        path: PathBuf,
    },
    /// Attached with clsact (no links to pin): a tc filter, which stays in
    /// the kernel when nexd dies, whether or not it crashed.
    Filter {
        iface: String,
        program: &'static str,
    },
}

impl GuardState {
    pub fn iface(&self) -> &str {
        match self {
            GuardState::Owned { iface, .. }
            | GuardState::Pinned { iface, .. }
            | GuardState::Filter { iface, .. } => iface,
        }
    }

    pub fn pinned(&self) -> bool {
        !matches!(self, GuardState::Owned { .. })
    }
}

/// Everything attached, per interface.
#[derive(Default)]
pub struct Attachments {
    tunnel: Option<(String, Vec<Attached>)>,
    steer: BTreeMap<String, Attached>,
    guards: BTreeMap<String, GuardState>,
    /// The exit programs (ingress and egress of the WireGuard interface).
    pub(super) exit: Option<(String, Vec<Attached>)>,
    /// MSS clamps alone (a LAN gateway's interfaces), both directions.
    pub(super) mss: BTreeMap<String, Vec<Attached>>,
    /// Interfaces whose clsact qdisc nexd added (kernels before 6.6): it
    /// goes when nexd's last filter there does.
    clsact: BTreeSet<String>,
}

/// The leak guard's place on a clsact egress: fixed, so the next nexd finds
/// (and replaces) exactly the filter a crashed one left.
const GUARD_FILTER_PRIORITY: u16 = 0x6e78;
const GUARD_FILTER_HANDLE: TcHandle = TcHandle::new(0, 0x6e78);

/// The directory of the pins of the nexd that owns `wg_iface`.
pub fn pin_dir(bpffs: &Path, wg_iface: &str) -> PathBuf {
    bpffs.join("nexd").join(wg_iface)
}

/// Where a new guard is pinned before it is renamed over the real pin
/// (bpffs refuses names with a dot).
fn staging_pin(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(STAGING_SUFFIX);
    path.with_file_name(name)
}

/// Suffix of a guard pinned but not yet renamed into place.
const STAGING_SUFFIX: &str = "-staged";

/// The pin path of the leak guard on `uplink`.
pub fn guard_pin_path(bpffs: &Path, wg_iface: &str, uplink: &str) -> PathBuf {
    pin_dir(bpffs, wg_iface).join(format!("guard-{uplink}"))
}

/// Removes what a previous nexd for `wg_iface` left of the data path: its
/// pinned leak guards and (on clsact kernels) its filters on `ifaces`.
/// With `keep_guard` the leak guards stay (a restarted nexd whose kill
/// switch still holds takes them over in place). Returns what was removed,
/// one line each.
pub fn remove_leftovers(
    bpffs: &Path,
    wg_iface: &str,
    ifaces: &[String],
    keep_guard: bool,
    clsact_added: &[String],
) -> Vec<String> {
    let mut removed = Vec::new();
    let dir = pin_dir(bpffs, wg_iface);
    if keep_guard {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let pin = entry.path();
                // A guard pinned but never renamed into place (a crash in
                // between): the real pin is the one taken over.
                if pin.to_string_lossy().ends_with(STAGING_SUFFIX) {
                    if std::fs::remove_file(&pin).is_ok() {
                        removed.push(format!(
                            "the half-installed leak guard pin {}",
                            pin.display()
                        ));
                    }
                } else {
                    info!(pin = %pin.display(), "keeping the leak guard a previous nexd pinned: the kill switch still holds");
                }
            }
        }
    } else if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let pin = entry.path();
            match std::fs::remove_file(&pin) {
                Ok(()) => {
                    warn!(path = %pin.display(), "removed a leak guard left by a previous nexd");
                    removed.push(format!("the leak guard pinned at {}", pin.display()));
                }
                Err(e) => warn!(path = %pin.display(), error = %e, "cannot remove a leftover pin"),
            }
        }
        remove_empty_pin_dirs(&dir.join("guard"));
    }
    if super::running_kernel_mode() == AttachMode::Clsact {
        for iface in ifaces {
            let guards: &[(&str, TcAttachType)] = if keep_guard {
                &[]
            } else {
                &[
                    (names::GUARD_PROG, TcAttachType::Egress),
                    (names::GUARD_L3_PROG, TcAttachType::Egress),
                ]
            };
            for &(prog, dir) in guards.iter().chain(&[
                (names::STEER_PROG, TcAttachType::Ingress),
                (names::STEER_L3_PROG, TcAttachType::Ingress),
                (names::TUNNEL_INGRESS_PROG, TcAttachType::Ingress),
                (names::TUNNEL_EGRESS_PROG, TcAttachType::Egress),
                (names::EXIT_INGRESS_PROG, TcAttachType::Ingress),
                (names::EXIT_INGRESS_L2_PROG, TcAttachType::Ingress),
                (names::EXIT_EGRESS_PROG, TcAttachType::Egress),
                (names::EXIT_EGRESS_L2_PROG, TcAttachType::Egress),
                (names::MSS_CLAMP_PROG, TcAttachType::Ingress),
                (names::MSS_CLAMP_PROG, TcAttachType::Egress),
                (names::MSS_CLAMP_L2_PROG, TcAttachType::Ingress),
                (names::MSS_CLAMP_L2_PROG, TcAttachType::Egress),
            ]) {
                if tc::qdisc_detach_program(iface, dir, prog).is_ok() {
                    warn!(
                        iface,
                        program = prog,
                        "removed a tc filter left by a previous nexd"
                    );
                    removed.push(format!(
                        "the tc filter {prog} on {iface} ({})",
                        direction(dir)
                    ));
                }
            }
        }
        // The clsact qdiscs the previous nexd added, where nothing is
        // left on them (a kept guard keeps its qdisc).
        for iface in clsact_added {
            match qdisc::remove_clsact_if_empty(iface) {
                Ok(true) => removed.push(format!("the clsact qdisc on {iface}")),
                Ok(false) => {}
                Err(e) => {
                    warn!(iface, error = %e, "cannot remove a clsact qdisc a previous nexd added")
                }
            }
        }
    }
    removed
}

/// nexd's leak guard programs attached to `iface`'s egress now, whoever
/// attached them (a check after an offline clean-up).
pub fn guards_on(iface: &str) -> Vec<String> {
    let is_guard = |n: &str| n == names::GUARD_PROG || n == names::GUARD_L3_PROG;
    match super::running_kernel_mode() {
        AttachMode::Tcx => SchedClassifier::query_tcx(iface, TcAttachType::Egress)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .filter_map(|p| p.name_as_str().map(str::to_owned))
                    .filter(|n| is_guard(n))
                    .collect()
            })
            .unwrap_or_default(),
        // Filters have no query in aya; `tc` names their programs.
        AttachMode::Clsact => std::process::Command::new("tc")
            .args(["filter", "show", "dev", iface, "egress"])
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                [names::GUARD_PROG, names::GUARD_L3_PROG]
                    .into_iter()
                    .filter(|g| {
                        text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                            .any(|w| w == *g)
                    })
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Removes a pin's directories, `<bpffs>/nexd/<wg>` and `<bpffs>/nexd`,
/// where they are empty (another interface's pins keep theirs): a stopped
/// nexd leaves nothing in bpffs (seen under systemd on a TCX kernel).
fn remove_empty_pin_dirs(pin: &Path) {
    let wg_dir = pin.parent();
    for dir in [wg_dir, wg_dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
    {
        // Fails, as it should, on a directory that still holds something.
        let _ = std::fs::remove_dir(dir);
    }
}

fn direction(t: TcAttachType) -> &'static str {
    if t == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    }
}

impl Datapath {
    pub(super) fn attach_one(
        &mut self,
        name: &'static str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        self.ensure_loaded(name)?;
        if self.mode == AttachMode::Clsact && qdisc::add_clsact(iface)? {
            self.attached.clsact.insert(iface.to_owned());
        }
        let link = self
            .classifier(name)?
            .attach(iface, dir)
            .map_err(|source| DatapathError::Attach {
                name: name.to_owned(),
                iface: iface.to_owned(),
                direction: direction(dir),
                source: Box::new(source),
            })?;
        debug!(
            iface,
            program = name,
            direction = direction(dir),
            "eBPF program attached"
        );
        Ok(link)
    }

    /// Attaches every program of `programs` to `iface`, or none: one
    /// that fails takes those attached before it back off.
    pub(super) fn attach_all<const N: usize>(
        &mut self,
        iface: &str,
        programs: [(&'static str, TcAttachType); N],
    ) -> Result<Vec<Attached>, DatapathError> {
        let mut links = Vec::with_capacity(N);
        for (program, dir) in programs {
            match self.attach_one(program, iface, dir) {
                Ok(link) => links.push(Attached { program, link }),
                Err(e) => {
                    for a in links {
                        let _ = self.detach_on(iface, a);
                    }
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    fn detach_one(&mut self, a: Attached) -> Result<(), DatapathError> {
        let name = a.program;
        self.classifier(name)?
            .detach(a.link)
            .map_err(|e| DatapathError::program(name, e))
    }

    /// Attaches the tunnel observers to the WireGuard interface.
    pub(super) fn attach_tunnel(&mut self, iface: &str) -> Result<(), DatapathError> {
        let mut links = Vec::new();
        for (name, dir) in [
            (names::TUNNEL_INGRESS_PROG, TcAttachType::Ingress),
            (names::TUNNEL_EGRESS_PROG, TcAttachType::Egress),
        ] {
            let link = self.attach_one(name, iface, dir)?;
            links.push(Attached {
                program: name,
                link,
            });
        }
        self.attached.tunnel = Some((iface.to_owned(), links));
        Ok(())
    }

    /// Attaches the steering classifier to a LAN interface's ingress.
    /// `l2` says whether the interface has an Ethernet header.
    pub fn attach_steer(&mut self, iface: &str, l2: bool) -> Result<(), DatapathError> {
        if self.attached.steer.contains_key(iface) {
            return Ok(());
        }
        let name = if l2 {
            names::STEER_PROG
        } else {
            names::STEER_L3_PROG
        };
        let link = self.attach_one(name, iface, TcAttachType::Ingress)?;
        self.attached.steer.insert(
            iface.to_owned(),
            Attached {
                program: name,
                link,
            },
        );
        info!(iface, "steering classifier attached");
        Ok(())
    }

    /// Detaches the steering classifier from `iface`.
    pub fn detach_steer(&mut self, iface: &str) -> Result<(), DatapathError> {
        if let Some(a) = self.attached.steer.remove(iface) {
            self.detach_on(iface, a)?;
            info!(iface, "steering classifier detached");
        }
        Ok(())
    }

    /// Detaches `a` from `iface`; an interface that is gone took its
    /// programs with it, which is not an error (a LAN veth whose peer
    /// namespace was deleted, a USB NIC unplugged).
    pub(super) fn detach_on(&mut self, iface: &str, a: Attached) -> Result<(), DatapathError> {
        let r = match self.detach_one(a) {
            Err(_) if !interface_exists(iface) => {
                debug!(iface, "interface is gone, and its eBPF programs with it");
                Ok(())
            }
            r => r,
        };
        self.release_clsact(iface);
        r
    }

    /// Removes the clsact qdisc nexd added to `iface` once nexd's last
    /// filter there is gone.
    fn release_clsact(&mut self, iface: &str) {
        if !self.attached.clsact.contains(iface) {
            return;
        }
        if !interface_exists(iface) {
            self.attached.clsact.remove(iface);
            return;
        }
        match qdisc::remove_clsact_if_empty(iface) {
            Ok(_) if !qdisc::has_clsact(iface) => {
                self.attached.clsact.remove(iface);
            }
            Ok(_) => {}
            Err(e) => warn!(iface, error = %e, "cannot remove the clsact qdisc nexd added"),
        }
    }

    /// Takes over the clsact qdiscs a previous nexd added (its record
    /// says where) and that are still there: they go with this nexd's
    /// last filter on them.
    pub fn adopt_clsact(&mut self, ifaces: &[String]) {
        for i in ifaces {
            if qdisc::has_clsact(i) {
                self.attached.clsact.insert(i.clone());
            }
        }
    }

    /// Interfaces whose clsact qdisc nexd added (for its record).
    pub fn clsact_interfaces(&self) -> Vec<String> {
        self.attached.clsact.iter().cloned().collect()
    }

    /// LAN interfaces with the steering classifier attached.
    pub fn steered_interfaces(&self) -> Vec<String> {
        self.attached.steer.keys().cloned().collect()
    }

    /// Attaches the leak guard to the uplink's egress. With `pin`, the link
    /// is pinned under `bpffs` so the guard survives a crash.
    /// Attaches the leak guard to `iface`'s egress. With `pin` (the kill
    /// switch) it must outlive nexd: on TCX its link is pinned at
    /// `guard_pin_path`, on clsact it is a tc filter at a fixed priority
    /// and handle. A guard a previous nexd left there (a crash) is not
    /// removed and re-added: this program is swapped into its place
    /// atomically (`bpf_link_update` on the pinned TCX link, a filter
    /// replace at the same priority and handle on clsact), so the uplink is
    /// never unguarded, not even between two netlink calls.
    pub fn attach_guard(
        &mut self,
        iface: &str,
        l2: bool,
        pin: Option<(&Path, &str)>,
    ) -> Result<(), DatapathError> {
        if self.attached.guards.contains_key(iface) {
            return Ok(());
        }
        let name = if l2 {
            names::GUARD_PROG
        } else {
            names::GUARD_L3_PROG
        };
        let state = match (pin, self.mode) {
            (None, _) => {
                let link = self.attach_one(name, iface, TcAttachType::Egress)?;
                GuardState::Owned {
                    iface: iface.to_owned(),
                    program: name,
                    link,
                }
            }
            (Some(_), AttachMode::Clsact) => self.attach_guard_filter(name, iface)?,
            (Some((bpffs_root, wg_iface)), AttachMode::Tcx) => {
                let path = guard_pin_path(bpffs_root, wg_iface, iface);
                match self.adopt_pinned_guard(name, iface, &path) {
                    Ok(Some(state)) => state,
                    Ok(None) => self.attach_pinned_guard(name, iface, &path)?,
                    Err(e) => {
                        warn!(iface, error = %e, "cannot take over the leak guard a previous nexd pinned; attaching a new one first, then removing it");
                        self.attach_pinned_guard(name, iface, &path)?
                    }
                }
            }
        };
        info!(
            iface,
            pinned = state.pinned(),
            "leak guard attached to the uplink"
        );
        self.attached.guards.insert(iface.to_owned(), state);
        Ok(())
    }

    /// A fresh TCX guard, pinned. The pin is made under a temporary name
    /// and renamed over `path`: if an old pin is there, its link (and
    /// the old program) goes only once the new one is in force.
    fn attach_pinned_guard(
        &mut self,
        name: &'static str,
        iface: &str,
        path: &Path,
    ) -> Result<GuardState, DatapathError> {
        let pin_err = |reason: String| DatapathError::Pin {
            path: path.to_owned(),
            reason,
        };
        let bpffs_root = path
            .ancestors()
            .nth(3)
            .ok_or_else(|| pin_err("not under a bpffs".into()))?;
        bpffs::ensure_mounted(bpffs_root)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
        }
        let link = self.attach_one(name, iface, TcAttachType::Egress)?;
        let owned = self
            .classifier(name)?
            .take_link(link)
            .map_err(|e| DatapathError::program(name, e))?;
        let fd: FdLink = owned.try_into().map_err(|e| pin_err(format!("{e}")))?;
        let tmp = staging_pin(path);
        let _ = std::fs::remove_file(&tmp);
        let pinned = fd.pin(&tmp).map_err(|e| pin_err(e.to_string()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| pin_err(format!("renaming {}: {e}", tmp.display())))?;
        drop(pinned);
        let link = PinnedLink::from_pin(path).map_err(|e| pin_err(e.to_string()))?;
        Ok(GuardState::Pinned {
            iface: iface.to_owned(),
            program: name,
            link,
            path: path.to_owned(),
        })
    }

    /// Swaps this program into the TCX link a previous nexd pinned at
    /// `path`, if there is one and it still guards `iface`. `Ok(None)`:
    /// nothing to adopt.
    fn adopt_pinned_guard(
        &mut self,
        name: &'static str,
        iface: &str,
        path: &Path,
    ) -> Result<Option<GuardState>, DatapathError> {
        if !path.exists() {
            return Ok(None);
        }
        let pin_err = |reason: String| DatapathError::Pin {
            path: path.to_owned(),
            reason,
        };
        let old = PinnedLink::from_pin(path).map_err(|e| pin_err(e.to_string()))?;
        let fd: FdLink = old.into();
        let link = SchedClassifierLink::try_from(fd).map_err(|e| pin_err(e.to_string()))?;
        let prog = self.classifier(name)?;
        let id = prog
            .attach_to_link(link)
            .map_err(|e| DatapathError::program(name, e))?;
        // The pin holds the link; our descriptor of it can go.
        drop(
            prog.take_link(id)
                .map_err(|e| DatapathError::program(name, e))?,
        );
        // The link may belong to an interface of this name that was
        // deleted and made again: then it guards nothing.
        let ours = self.classifier(name)?.info().map(|i| i.id()).ok();
        let on_iface = SchedClassifier::query_tcx(iface, TcAttachType::Egress)
            .map(|(_, progs)| progs.iter().any(|p| Some(p.id()) == ours))
            .unwrap_or(false);
        if !on_iface {
            return Ok(None);
        }
        let link = PinnedLink::from_pin(path).map_err(|e| pin_err(e.to_string()))?;
        info!(iface, path = %path.display(), "took over the leak guard a previous nexd left (program swapped in place)");
        Ok(Some(GuardState::Pinned {
            iface: iface.to_owned(),
            program: name,
            link,
            path: path.to_owned(),
        }))
    }

    /// A guard filter on clsact, at nexd's fixed priority and handle; one
    /// already there (a previous nexd's) is replaced in place.
    fn attach_guard_filter(
        &mut self,
        name: &'static str,
        iface: &str,
    ) -> Result<GuardState, DatapathError> {
        if qdisc::add_clsact(iface)? {
            self.attached.clsact.insert(iface.to_owned());
        }
        let attach_err = |source| DatapathError::Attach {
            name: name.to_owned(),
            iface: iface.to_owned(),
            direction: "egress",
            source: Box::new(source),
        };
        let prog = self.classifier(name)?;
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: GUARD_FILTER_PRIORITY,
            handle: GUARD_FILTER_HANDLE,
            ..NlOptions::default()
        });
        let id = match prog.attach_with_options(iface, TcAttachType::Egress, options) {
            Ok(id) => id,
            Err(aya::programs::ProgramError::TcError(tc::TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let old = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Egress,
                    GUARD_FILTER_PRIORITY,
                    GUARD_FILTER_HANDLE,
                    None,
                )
                .map_err(|e| attach_err(aya::programs::ProgramError::IOError(e)))?;
                let id = prog.attach_to_link(old).map_err(attach_err)?;
                info!(
                    iface,
                    "took over the leak guard filter a previous nexd left (replaced in place)"
                );
                id
            }
            Err(e) => return Err(attach_err(e)),
        };
        // A tc filter outlives its program's descriptors: forget the link
        // so dropping the data path does not delete it.
        let link = prog
            .take_link(id)
            .map_err(|e| DatapathError::program(name, e))?;
        std::mem::forget(link);
        Ok(GuardState::Filter {
            iface: iface.to_owned(),
            program: name,
        })
    }

    pub fn detach_guards(&mut self) -> Result<(), DatapathError> {
        let guards = std::mem::take(&mut self.attached.guards);
        for state in guards.into_values() {
            self.detach_guard_state(state)?;
        }
        Ok(())
    }

    fn detach_guard_state(&mut self, state: GuardState) -> Result<(), DatapathError> {
        let iface = state.iface().to_owned();
        match state {
            GuardState::Owned { program, link, .. } => {
                self.detach_on(&iface, Attached { program, link })?;
            }
            GuardState::Pinned { link, path, .. } => match link.unpin() {
                // Dropping the last reference detaches it.
                Ok(fd) => {
                    drop(fd);
                    remove_empty_pin_dirs(&path);
                }
                Err(e) => warn!(error = %e, "cannot remove the leak guard's pin"),
            },
            GuardState::Filter { program, .. } => {
                if let Err(e) = tc::qdisc_detach_program(&iface, TcAttachType::Egress, program) {
                    warn!(iface, error = %e, "cannot remove the leak guard filter");
                }
                self.release_clsact(&iface);
            }
        }
        info!(iface, "leak guard detached");
        Ok(())
    }

    /// Where leak guards are attached.
    pub fn guards(&self) -> impl Iterator<Item = &GuardState> {
        self.attached.guards.values()
    }

    /// Detaches everything (the guards' pins included), going on past
    /// failures so that one stuck program does not leave the others
    /// attached; returns the first error.
    pub(super) fn detach_all(&mut self) -> Result<(), DatapathError> {
        let mut results = vec![self.detach_guards(), self.detach_exit()];
        for iface in self.mss_clamped_interfaces() {
            results.push(self.detach_mss_clamp(&iface));
        }
        for iface in self.steered_interfaces() {
            results.push(self.detach_steer(&iface));
        }
        if let Some((iface, links)) = self.attached.tunnel.take() {
            for a in links {
                results.push(self.detach_on(&iface, a));
            }
        }
        results.into_iter().collect()
    }

    /// The WireGuard interface the tunnel observers are attached to.
    pub fn tunnel_interface(&self) -> Option<&str> {
        self.attached.tunnel.as_ref().map(|(i, _)| i.as_str())
    }
}

/// Whether a network interface called `iface` exists in this namespace.
fn interface_exists(iface: &str) -> bool {
    nix::net::if_::if_nametoindex(iface).is_ok()
}
