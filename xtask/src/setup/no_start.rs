//! Installing Debian packages without starting the services they bring
//! (etcd, prometheus, keepalived, conntrackd): the tests run these
//! daemons inside their own network namespaces, with their own files, and
//! one started by the package in the root namespace would act on the
//! machine's own network (conntrackd syncing its conntrack table, keepalived
//! claiming addresses). Debian's maintainer scripts start services through
//! invoke-rc.d or deb-systemd-invoke, which both ask `/usr/sbin/policy-rc.d`
//! first; exit code 101 means "action forbidden".

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where invoke-rc.d and deb-systemd-invoke look for the policy.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// The policy while the packages install: no service may start.
const FORBID_ALL: &str =
    "#!/bin/sh\n# cargo xtask setup: installing packages whose services must not start\nexit 101\n";

/// Installs `debs` with apt-get (no recommends) while no service may
/// start, then checks that no process called one of `daemons` runs in this
/// network namespace. An operator's own policy-rc.d is put back afterwards,
/// failure or not.
pub fn install_without_starting(debs: &[&str], daemons: &[&str]) -> anyhow::Result<()> {
    {
        let _policy = Policy::forbid(Path::new(POLICY_RC_D))?;
        super::exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(debs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let running = running_here(Path::new("/proc"), daemons)?;
    if !running.is_empty() {
        let list: Vec<String> = running
            .iter()
            .map(|(pid, name)| format!("{name} (pid {pid})"))
            .collect();
        bail!(
            "installing {} started {}, which must not run outside the tests' namespaces; stop it",
            debs.join(" "),
            list.join(", ")
        );
    }
    Ok(())
}

/// A policy-rc.d that forbids every service action while it lives; what
/// was there before (nothing, or the operator's own script) comes back when
/// it is dropped.
struct Policy {
    path: PathBuf,
    before: Option<(Vec<u8>, u32)>,
}

impl Policy {
    fn forbid(path: &Path) -> anyhow::Result<Policy> {
        let before = match fs::read(path) {
            Ok(content) => {
                let mode = fs::metadata(path)
                    .with_context(|| format!("cannot stat {}", path.display()))?
                    .permissions()
                    .mode();
                Some((content, mode))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        write_script(path, FORBID_ALL.as_bytes(), 0o755)?;
        Ok(Policy {
            path: path.to_owned(),
            before,
        })
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let restored = match &self.before {
            Some((content, mode)) => write_script(&self.path, content, *mode),
            None => fs::remove_file(&self.path)
                .with_context(|| format!("cannot remove {}", self.path.display())),
        };
        if let Err(e) = restored {
            eprintln!("setup: {e:#}; remove or restore it by hand");
        }
    }
}

fn write_script(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

/// The processes under `proc` named one of `daemons` (by `comm`) that share
/// this process's network namespace: a daemon in a test's namespace is the
/// tests' own, one here is the package's.
fn running_here(proc: &Path, daemons: &[&str]) -> anyhow::Result<Vec<(u32, String)>> {
    let own_ns = fs::read_link(proc.join("self/ns/net")).ok();
    let mut found = Vec::new();
    let entries = fs::read_dir(proc).with_context(|| format!("cannot list {}", proc.display()))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: skip what cannot be read.
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !daemons.contains(&comm) {
            continue;
        }
        let ns = fs::read_link(entry.path().join("ns/net")).ok();
        if ns.is_some() && ns == own_ns {
            found.push((pid, comm.to_owned()));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_forbids_and_puts_back_what_was_there() {
        let dir = std::env::temp_dir().join(format!("nexd-policy-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("policy-rc.d");
        {
            let _p = Policy::forbid(&path).expect("write");
            let text = fs::read_to_string(&path).expect("read");
            assert!(text.starts_with("#!/bin/sh\n") && text.ends_with("exit 101\n"));
            let status = Command::new(&path).status().expect("runs");
            assert_eq!(status.code(), Some(101));
        }
        assert!(!path.exists(), "removed when there was none");

        write_script(&path, b"#!/bin/sh\nexit 0\n", 0o700).expect("operator's own");
        {
            let _p = Policy::forbid(&path).expect("write");
            assert_eq!(fs::read_to_string(&path).expect("read"), FORBID_ALL);
        }
        assert_eq!(fs::read(&path).expect("read"), b"#!/bin/sh\nexit 0\n");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn only_daemons_in_this_namespace_count() {
        // This test process itself is in our namespace under its own name.
        let me = fs::read_to_string("/proc/self/comm").expect("comm");
        let me = me.trim();
        let found = running_here(Path::new("/proc"), &[me]).expect("list");
        assert!(
            found.iter().any(|(pid, _)| *pid == std::process::id()),
            "{found:?}"
        );
        assert!(
            running_here(Path::new("/proc"), &["nexd-no-such-daemon"])
                .expect("list")
                .is_empty()
        );
    }
}
