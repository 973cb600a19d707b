//! Attaching and detaching programs, and the leak guard's pin.
//!
//! Every attachment is recorded here and removed by `detach_*`; dropping
//! the `Datapath` detaches them all. The one exception is deliberate: the
//! leak guard attached with `pin = true` (`--kill-switch`) is pinned in
//! bpffs, so it outlives a SIGKILLed nexd and keeps blocking leaks until
//! the next nexd (or an explicit disable) removes the pin.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLinkId},
};
use nexd_common::names;
use tracing::{debug, info, warn};

use super::{AttachMode, Datapath, DatapathError, bpffs};

/// An attached program.
struct Attached {
    program: &'static str,
    link: SchedClassifierLinkId,
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
}

/// The directory of the pins of the nexd that owns `wg_iface`.
pub fn pin_dir(bpffs: &Path, wg_iface: &str) -> PathBuf {
    bpffs.join("nexd").join(wg_iface)
}

/// The pin path of the leak guard on `uplink`.
pub fn guard_pin_path(bpffs: &Path, wg_iface: &str, uplink: &str) -> PathBuf {
    pin_dir(bpffs, wg_iface).join(format!("guard-{uplink}"))
}

/// Removes leak guards pinned by a previous nexd for `wg_iface`, and (on
/// clsact kernels) nexd's filters left on `ifaces`. Returns whether
/// anything was found.
pub fn remove_leftovers(bpffs: &Path, wg_iface: &str, ifaces: &[String]) -> bool {
    let mut found = false;
    let dir = pin_dir(bpffs, wg_iface);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let pin = entry.path();
            found = true;
            match std::fs::remove_file(&pin) {
                Ok(()) => {
                    warn!(path = %pin.display(), "removed a leak guard left by a previous nexd")
                }
                Err(e) => warn!(path = %pin.display(), error = %e, "cannot remove a leftover pin"),
            }
        }
        remove_empty_pin_dirs(&dir.join("guard"));
    }
    if AttachMode::for_running_kernel() == AttachMode::Clsact {
        for iface in ifaces {
            for (prog, dir) in [
                (names::GUARD_PROG, TcAttachType::Egress),
                (names::GUARD_L3_PROG, TcAttachType::Egress),
                (names::STEER_PROG, TcAttachType::Ingress),
                (names::STEER_L3_PROG, TcAttachType::Ingress),
                (names::TUNNEL_INGRESS_PROG, TcAttachType::Ingress),
                (names::TUNNEL_EGRESS_PROG, TcAttachType::Egress),
            ] {
                if tc::qdisc_detach_program(iface, dir, prog).is_ok() {
                    found = true;
                    warn!(
                        iface,
                        program = prog,
                        "removed a tc filter left by a previous nexd"
                    );
                }
            }
        }
    }
    found
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
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Missing {
                kind: "program",
                name: name.to_owned(),
            })?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        if self.mode == AttachMode::Clsact {
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
    fn detach_on(&mut self, iface: &str, a: Attached) -> Result<(), DatapathError> {
        match self.detach_one(a) {
            Err(_) if !interface_exists(iface) => {
                debug!(iface, "interface is gone, and its eBPF programs with it");
                Ok(())
            }
            r => r,
        }
    }

    /// LAN interfaces with the steering classifier attached.
    pub fn steered_interfaces(&self) -> Vec<String> {
        self.attached.steer.keys().cloned().collect()
    }

    /// Attaches the leak guard to the uplink's egress. With `pin`, the link
    /// is pinned under `bpffs` so the guard survives a crash.
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
        let link = self.attach_one(name, iface, TcAttachType::Egress)?;
        let state = match (pin, self.mode) {
            (None, _) => GuardState::Owned {
                iface: iface.to_owned(),
                program: name,
                link,
            },
            (Some(_), AttachMode::Clsact) => {
                // The filter itself persists; nothing to pin.
                let prog = self.classifier(name)?;
                let link = prog
                    .take_link(link)
                    .map_err(|e| DatapathError::program(name, e))?;
                // Not dropping it keeps aya from removing the filter.
                std::mem::forget(link);
                GuardState::Filter {
                    iface: iface.to_owned(),
                    program: name,
                }
            }
            (Some((bpffs_root, wg_iface)), AttachMode::Tcx) => {
                let path = guard_pin_path(bpffs_root, wg_iface, iface);
                let pin_err = |reason: String| DatapathError::Pin {
                    path: path.clone(),
                    reason,
                };
                bpffs::ensure_mounted(bpffs_root)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
                }
                let _ = std::fs::remove_file(&path);
                let owned = self
                    .classifier(name)?
                    .take_link(link)
                    .map_err(|e| DatapathError::program(name, e))?;
                let fd: FdLink = owned.try_into().map_err(|e| pin_err(format!("{e}")))?;
                let pinned = fd.pin(&path).map_err(|e| pin_err(e.to_string()))?;
                GuardState::Pinned {
                    iface: iface.to_owned(),
                    program: name,
                    link: pinned,
                    path,
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

    /// Detaches every leak guard (and removes their pins).
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
            }
        }
        info!(iface, "leak guard detached");
        Ok(())
    }

    /// Where leak guards are attached.
    pub fn guards(&self) -> impl Iterator<Item = &GuardState> {
        self.attached.guards.values()
    }

    /// Detaches everything (the guards' pins included).
    /// Detaches everything, going on past failures so that one stuck
    /// program does not leave the others attached; returns the first error.
    pub(super) fn detach_all(&mut self) -> Result<(), DatapathError> {
        let mut results = vec![self.detach_guards()];
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
