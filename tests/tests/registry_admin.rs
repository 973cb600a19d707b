//! The admin side of membership through etcd (`nexctl mesh`), against a
//! real etcd from Debian's etcd-server in test namespaces.
//!
//! Proves: init writes the key pair (0600) and refuses a second init;
//! approve allocates addresses and sets roles, revoke removes the device
//! and frees its addresses; list (column/json) shows them; import of a mesh
//! file and export back round-trip; two admins approving at once never
//! hand out one address (40 approvals in 8 parallel streams); records
//! written straight into etcd (unsigned, signed by another admin, moved to
//! another key, tampered to change an address or make a device an exit
//! node) are ignored and listed with their reason; exit statuses for an
//! unreachable etcd, a bad command line and an unknown device; a join
//! request replaced under the same name (issue 21) is shown with a note
//! and refused by `approve --fingerprint`, and the device's own request
//! is approved by its fingerprint; `snapshot-key` and `refresh-snapshot`
//! keep the mesh's signed snapshot, against which `list` shows a
//! rolled-back record as such, and the refresher warns about it.

use std::{
    collections::HashSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nexd_testkit::{Netns, bins, etcd::EtcdCluster, topology::Switch};
use serde_json::Value;

/// An etcd member and an admin namespace on one switch.
struct Lab {
    etcd: EtcdCluster,
    admin: Netns,
    _sw: Switch,
    dir: PathBuf,
}

impl Lab {
    fn new(name: &str) -> anyhow::Result<Self> {
        Self::build(name, false)
    }

    fn build(name: &str, tls: bool) -> anyhow::Result<Self> {
        let mut sw = Switch::new("regsw")?;
        let etcd = if tls {
            EtcdCluster::start_tls(&mut sw, &["198.51.100.11/24"])?
        } else {
            EtcdCluster::start(&mut sw, &["198.51.100.11/24"])?
        };
        let admin = Netns::new("admin")?;
        sw.attach(&admin, "eth0", &["198.51.100.100/24"])?;
        let dir = std::env::temp_dir().join(format!("nexd-regadmin-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Lab {
            etcd,
            admin,
            _sw: sw,
            dir,
        })
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `nexctl mesh --registry <url> ARGS` in the admin namespace.
    fn mesh(&self, prefix: &str, args: &[&str]) -> anyhow::Result<Output> {
        let nexctl = bins::nexctl()?;
        let url = self.etcd.url(prefix);
        let mut full = vec![nexctl.to_str().context("path")?, "mesh", "--registry", &url];
        full.extend_from_slice(args);
        self.admin.exec_output(&full, Duration::from_secs(30))
    }

    /// Like `mesh`, failing unless nexctl exits 0; returns stdout.
    fn ok(&self, prefix: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.mesh(prefix, args)?;
        if !out.status.success() {
            bail!(
                "nexctl mesh {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn list(&self, prefix: &str, key: &Path) -> anyhow::Result<Value> {
        let k = key.to_str().context("path")?;
        let text = self.ok(prefix, &["list", "--admin-key", k, "--output=json"])?;
        serde_json::from_str(&text).with_context(|| format!("list is not JSON: {text}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A WireGuard public key (from `wg`, as a device would have).
fn wg_key() -> anyhow::Result<String> {
    let private = nexd_testkit::cmd::run("wg", ["genkey"])?;
    let mut c = std::process::Command::new("wg");
    c.arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The etcd key id of a WireGuard key (URL-safe base64, no padding).
fn key_id(k: &str) -> String {
    k.trim_end_matches('=').replace('+', "-").replace('/', "_")
}

/// Writes a join request as a device would.
fn request(lab: &Lab, prefix: &str, name: &str) -> anyhow::Result<String> {
    let k = wg_key()?;
    let body = serde_json::json!({
        "name": name, "public_key": k, "listen_port": 51820,
        "endpoint": "192.0.2.9:51820", "exit_node": false, "requested_at": 1
    });
    lab.etcd.put(
        &format!("/{prefix}/requests/{}", key_id(&k)),
        &body.to_string(),
    )?;
    Ok(k)
}

fn device<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
}

#[test]
fn init_approve_revoke_list_import_export() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("rt")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?;

    // init: key pair written, 0600, public key printed; a second init refused.
    let out = lab.ok("m1", &["init", "--admin-key", k, "--mtu", "1380"])?;
    let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin key mode");
    let public = std::fs::read_to_string(lab.key("admin.key.pub"))?;
    assert!(out.contains(public.trim()), "{out}");
    let again = lab.mesh(
        "m1",
        &[
            "init",
            "--admin-key",
            lab.key("other.key").to_str().context("p")?,
        ],
    )?;
    assert_eq!(again.status.code(), Some(1), "second init: {again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a mesh"),
        "{again:?}"
    );
    assert!(
        !lab.key("other.key").exists(),
        "a refused init leaves no key behind"
    );

    // Two devices ask; approve one by name with roles, the other by key.
    let ka = request(&lab, "m1", "alpha")?;
    let kb = request(&lab, "m1", "beta")?;
    let reqs: Value = serde_json::from_str(&lab.ok(
        "m1",
        &[
            "requests",
            "--registry-admin-key",
            public.trim(),
            "-o",
            "json",
        ],
    )?)?;
    assert_eq!(reqs.as_array().map(Vec::len), Some(2), "{reqs}");
    lab.ok(
        "m1",
        &[
            "approve",
            "alpha",
            "--admin-key",
            k,
            "--exit-node",
            "--exit-clients",
            "beta",
        ],
    )?;
    let out = lab.ok("m1", &["approve", &kb, "--admin-key", k])?;
    assert!(out.contains("100.64.0.2"), "{out}");
    let l = lab.list("m1", &key)?;
    let a = device(&l, "alpha").context("alpha listed")?;
    assert_eq!(a["public_key"], ka.as_str());
    assert_eq!(a["ipv4"], "100.64.0.1");
    assert_eq!(a["ipv6"], "fd6e:6578:6400::1");
    assert_eq!(a["exit_node"], true);
    assert_eq!(a["exit_clients"], serde_json::json!(["beta"]));
    assert_eq!(device(&l, "beta").context("beta")?["exit_node"], false);
    assert_eq!(l["ignored"], serde_json::json!([]));
    // Requests are gone once approved.
    let reqs = lab.ok("m1", &["requests", "--admin-key", k, "-o", "no-header"])?;
    assert!(reqs.trim().is_empty(), "{reqs}");
    // Column output names the roles.
    let cols = lab.ok("m1", &["list", "--admin-key", k])?;
    assert!(cols.starts_with("NAME"), "{cols}");
    assert!(cols.contains("exit-node:beta"), "{cols}");
    // Role change keeps the addresses.
    lab.ok(
        "m1",
        &["approve", "alpha", "--admin-key", k, "--no-exit-node"],
    )?;
    let l = lab.list("m1", &key)?;
    assert_eq!(device(&l, "alpha").context("alpha")?["exit_node"], false);
    assert_eq!(device(&l, "alpha").context("alpha")?["ipv4"], "100.64.0.1");

    // Revoke: gone from the list, a signed revocation left, addresses free.
    lab.ok("m1", &["revoke", "alpha", "--admin-key", k])?;
    let l = lab.list("m1", &key)?;
    assert!(device(&l, "alpha").is_none(), "{l}");
    assert!(
        lab.etcd
            .get(&format!("/m1/revoked/{}", key_id(&ka)))?
            .is_some()
    );
    assert!(lab.etcd.get("/m1/alloc/v4/100.64.0.1")?.is_none());
    // The next device gets the freed address.
    request(&lab, "m1", "gamma")?;
    let out = lab.ok("m1", &["approve", "gamma", "--admin-key", k])?;
    assert!(out.contains("100.64.0.1"), "{out}");

    // Unknown device: failure (1) naming it; nothing changed.
    let out = lab.mesh("m1", &["approve", "nobody", "--admin-key", k])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"nobody\""),
        "{out:?}"
    );

    // Export, import into a fresh prefix, export again: same mesh, exit
    // roles included.
    lab.ok(
        "m1",
        &[
            "approve",
            "gamma",
            "--admin-key",
            k,
            "--exit-node",
            "--exit-clients",
            "beta",
        ],
    )?;
    let first = lab.ok("m1", &["export", "--admin-key", k])?;
    assert!(first.contains("mtu = 1380"), "{first}");
    assert!(
        first.contains("exit_node = true\nexit_clients = [\"beta\"]"),
        "{first}"
    );
    let file = lab.dir.join("exported.toml");
    std::fs::write(&file, &first)?;
    let key2 = lab.key("admin2.key");
    let k2 = key2.to_str().context("p")?;
    let out = lab.ok(
        "m2",
        &[
            "import",
            file.to_str().context("p")?,
            "--admin-key",
            k2,
            "--new-admin-key",
        ],
    )?;
    assert!(
        out.contains("imported") && out.contains("admin public key"),
        "{out}"
    );
    assert_eq!(
        std::fs::metadata(&key2)?.permissions().mode() & 0o777,
        0o600
    );
    let second = lab.ok("m2", &["export", "--admin-key", k2])?;
    let body = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&first), body(&second));
    let l2 = lab.list("m2", &key2)?;
    assert_eq!(l2["devices"].as_array().map(Vec::len), Some(2), "{l2}");
    assert_eq!(device(&l2, "gamma").context("gamma")?["exit_node"], true);
    assert_eq!(
        device(&l2, "beta").context("beta")?["endpoint"],
        serde_json::Value::Null
    );
    // Import refuses a prefix that already holds a mesh.
    let out = lab.mesh(
        "m2",
        &["import", file.to_str().context("p")?, "--admin-key", k2],
    )?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    Ok(())
}

#[test]
fn concurrent_approvals_never_share_an_address() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    const STREAMS: usize = 8;
    const EACH: usize = 5;
    let lab = Lab::new("cc")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?.to_owned();
    lab.ok("cc", &["init", "--admin-key", &k])?;
    for s in 0..STREAMS {
        for i in 0..EACH {
            request(&lab, "cc", &format!("d{s}-{i}"))?;
        }
    }
    let lab = std::sync::Arc::new(lab);
    let threads: Vec<_> = (0..STREAMS)
        .map(|s| {
            let lab = lab.clone();
            let k = k.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for i in 0..EACH {
                    lab.ok("cc", &["approve", &format!("d{s}-{i}"), "--admin-key", &k])?;
                }
                Ok(())
            })
        })
        .collect();
    // Join every approver before looking at any result: the lab (etcd,
    // namespaces) must be dropped, not leaked with a thread still holding it.
    let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    for r in results {
        r.map_err(|_| anyhow::anyhow!("approver panicked"))??;
    }
    let l = lab.list("cc", &key)?;
    let devices = l["devices"].as_array().context("devices")?;
    assert_eq!(devices.len(), STREAMS * EACH, "{l}");
    let v4: HashSet<&str> = devices.iter().filter_map(|d| d["ipv4"].as_str()).collect();
    let v6: HashSet<&str> = devices.iter().filter_map(|d| d["ipv6"].as_str()).collect();
    assert_eq!(v4.len(), STREAMS * EACH, "duplicate IPv4 addresses: {l}");
    assert_eq!(v6.len(), STREAMS * EACH, "duplicate IPv6 addresses: {l}");
    assert_eq!(l["ignored"], serde_json::json!([]), "{l}");
    let allocs = lab
        .etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/cc/alloc/"])?;
    assert_eq!(
        allocs.lines().filter(|l| !l.is_empty()).count(),
        2 * STREAMS * EACH
    );
    Ok(())
}

#[test]
fn records_written_past_the_admin_are_ignored_with_a_reason() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("forge")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?;
    lab.ok("f", &["init", "--admin-key", k])?;
    let ka = request(&lab, "f", "alpha")?;
    lab.ok("f", &["approve", "alpha", "--admin-key", k])?;
    let a_path = format!("/f/devices/{}", key_id(&ka));
    let a_value = lab.etcd.get(&a_path)?.context("alpha's record")?;

    // Another admin's mesh, to borrow a validly signed record from.
    let other = lab.key("other.key");
    let o = other.to_str().context("p")?;
    lab.ok("g", &["init", "--admin-key", o])?;
    let kx = request(&lab, "g", "intruder")?;
    lab.ok(
        "g",
        &["approve", "intruder", "--admin-key", o, "--exit-node"],
    )?;
    let x_value = lab
        .etcd
        .get(&format!("/g/devices/{}", key_id(&kx)))?
        .context("x")?;

    // 1. A new device, unsigned.
    let ku = wg_key()?;
    let unsigned = serde_json::json!({"name": "sneaky", "public_key": ku, "ipv4": "100.64.0.50",
        "ipv6": "fd6e:6578:6400::50", "listen_port": 51820, "exit_node": true, "serial": 99});
    let u_path = format!("/f/devices/{}", key_id(&ku));
    lab.etcd.put(&u_path, &unsigned.to_string())?;
    // 2. Signed by another admin (and for another prefix).
    let x_path = format!("/f/devices/{}", key_id(&kx));
    lab.etcd.put(&x_path, &x_value)?;
    // 3. Alpha's valid record copied under another device's key.
    let km = wg_key()?;
    let m_path = format!("/f/devices/{}", key_id(&km));
    lab.etcd.put(&m_path, &a_value)?;
    // 4. Alpha's own record changed: another address, made exit node.
    let tampered = a_value
        .replace("100.64.0.1", "100.64.0.77")
        .replace("\\\"exit_node\\\":false", "\\\"exit_node\\\":true");
    assert_ne!(tampered, a_value);
    lab.etcd.put(&a_path, &tampered)?;

    let out = lab.mesh("f", &["list", "--admin-key", k, "-o", "json"])?;
    assert!(out.status.success(), "{out:?}");
    let l: Value = serde_json::from_slice(&out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("4 registry record(s) ignored"), "{stderr}");
    assert_eq!(
        l["devices"],
        serde_json::json!([]),
        "nothing unsigned is listed: {l}"
    );
    let reason = |p: &str| {
        l["ignored"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["key"] == p))
            .and_then(|i| i["reason"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(reason(&u_path), "missing signature");
    for p in [&x_path, &m_path, &a_path] {
        assert!(
            reason(p).contains("does not verify with the admin key"),
            "{p}: {l}"
        );
    }
    // Writing the original back restores alpha.
    lab.etcd.put(&a_path, &a_value)?;
    let l = lab.list("f", &key)?;
    assert_eq!(
        device(&l, "alpha").context("alpha back")?["ipv4"],
        "100.64.0.1"
    );
    Ok(())
}

#[test]
fn exit_statuses_name_the_problem() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("exit")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?;
    let nexctl = bins::nexctl()?;
    let n = nexctl.to_str().context("path")?;
    // No --registry: usage.
    let out = lab.admin.exec_output(
        &[n, "mesh", "list", "--admin-key", k],
        Duration::from_secs(20),
    )?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--registry"),
        "{out:?}"
    );
    // A bad URL: clap's usage error names it.
    let out = lab.admin.exec_output(
        &[
            n,
            "mesh",
            "--registry",
            "http://198.51.100.11:2379/x",
            "list",
        ],
        Duration::from_secs(20),
    )?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Nobody listens there: unreachable (3), within the request deadline.
    let started = std::time::Instant::now();
    let out = lab.admin.exec_output(
        &[
            n,
            "mesh",
            "--registry",
            "etcd://198.51.100.11:2999/x",
            "init",
            "--admin-key",
            k,
        ],
        Duration::from_secs(30),
    )?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!key.exists(), "a failed init leaves no key behind");
    // A key file others can read is refused before anything happens.
    lab.ok("x", &["init", "--admin-key", k])?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let out = lab.mesh("x", &["list", "--admin-key", k])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn tls_client_certificates_and_passwords() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    // TLS with client certificates.
    let lab = Lab::build("tls", true)?;
    let pki = lab.etcd.pki().context("pki")?;
    let (ca, cert, key) = (pki.ca(), pki.client_cert(), pki.client_key());
    let tls = [
        "--registry-ca",
        ca.to_str().context("p")?,
        "--registry-cert",
        cert.to_str().context("p")?,
        "--registry-key",
        key.to_str().context("p")?,
    ];
    let admin_key = lab.key("admin.key");
    let k = admin_key.to_str().context("p")?;
    let mut args = tls.to_vec();
    args.extend(["init", "--admin-key", k]);
    lab.ok("t", &args)?;
    let mut args = tls.to_vec();
    args.extend(["list", "--admin-key", k, "-o", "json"]);
    let l: Value = serde_json::from_str(&lab.ok("t", &args)?)?;
    assert_eq!(l["devices"], serde_json::json!([]));
    // Without a client certificate etcd refuses the connection.
    let out = lab.mesh(
        "t",
        &[
            "--registry-ca",
            ca.to_str().context("p")?,
            "list",
            "--admin-key",
            k,
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("without a client certificate: {err}");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(err.contains("198.51.100.11:2379"), "{err}");
    // Plain text to a TLS member fails too.
    let out = lab.mesh("t", &["list", "--admin-key", k])?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    drop(lab);

    // etcd users and passwords.
    let mut lab = Lab::new("auth")?;
    lab.etcd.enable_auth("s3cret")?;
    let good = lab.key("good.pw");
    std::fs::write(&good, "s3cret\n")?;
    let bad = lab.key("bad.pw");
    std::fs::write(&bad, "wrong\n")?;
    let user = |f: &PathBuf| -> anyhow::Result<Vec<String>> {
        Ok(vec![
            "--registry-user".into(),
            "root".into(),
            "--registry-password-file".into(),
            f.to_str().context("p")?.to_owned(),
        ])
    };
    let key = lab.key("admin.key");
    let k = key.to_str().context("p")?;
    let mut args = user(&good)?;
    args.extend(["init".into(), "--admin-key".into(), k.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.ok("p", &refs)?;
    let mut args = user(&bad)?;
    args.extend(["list".into(), "--admin-key".into(), k.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.mesh("p", &refs)?;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("wrong password: {err}");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(err.contains("refused"), "{err}");
    Ok(())
}

#[test]
fn a_replaced_join_request_is_refused_by_fingerprint() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("fp")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?;
    lab.ok("fp", &["init", "--admin-key", k])?;
    let requests = || -> anyhow::Result<Vec<Value>> {
        let text = lab.ok("fp", &["requests", "--admin-key", k, "-o", "json"])?;
        Ok(serde_json::from_str::<Vec<Value>>(&text)?)
    };
    // The genuine laptop asks; the admin notes its fingerprint (the
    // device's log shows the same).
    let genuine = request(&lab, "fp", "laptop")?;
    let rows = requests()?;
    let fingerprint = rows[0]["fingerprint"]
        .as_str()
        .context("fingerprint")?
        .to_owned();
    assert_eq!(fingerprint.len(), 24, "{rows:?}");
    // Someone with the device credential deletes it and asks as "laptop".
    lab.etcd
        .etcdctl(&["del", "--", &format!("/fp/requests/{}", key_id(&genuine))])?;
    let impostor = request(&lab, "fp", "laptop")?;
    let out = lab.mesh(
        "fp",
        &[
            "approve",
            "laptop",
            "--admin-key",
            k,
            "--fingerprint",
            &fingerprint,
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("approving the replaced request: {err}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("replaced") && err.contains(&fingerprint),
        "{err}"
    );
    assert!(device(&lab.list("fp", &key)?, "laptop").is_none());
    // The genuine device asks again (as it does when its request goes):
    // two keys under one name, noted in the listing.
    let body = serde_json::json!({"name": "laptop", "public_key": genuine, "listen_port": 51820});
    lab.etcd.put(
        &format!("/fp/requests/{}", key_id(&genuine)),
        &body.to_string(),
    )?;
    let rows = requests()?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(
            r["note"]
                .as_str()
                .is_some_and(|n| n.contains("2 keys ask as")),
            "{r}"
        );
    }
    // Approved by its fingerprint: the genuine key, not the impostor's.
    let out = lab.ok(
        "fp",
        &[
            "approve",
            "laptop",
            "--admin-key",
            k,
            "--fingerprint",
            &fingerprint,
        ],
    )?;
    assert!(
        out.contains(&genuine) && out.contains(&fingerprint),
        "{out}"
    );
    let l = lab.list("fp", &key)?;
    assert_eq!(
        device(&l, "laptop").context("laptop")?["public_key"],
        genuine.as_str()
    );
    // The impostor's request is left, noted as asking for a member's name.
    let rows = requests()?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["public_key"], impostor.as_str());
    assert!(
        rows[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("held by member")),
        "{rows:?}"
    );
    Ok(())
}

#[test]
fn the_snapshot_through_nexctl_and_a_rollback_it_exposes() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("snap")?;
    let key = lab.key("admin.key");
    let k = key.to_str().context("path")?;
    lab.ok("s", &["init", "--admin-key", k])?;
    let public = std::fs::read_to_string(lab.key("admin.key.pub"))?
        .trim()
        .to_owned();
    let ka = request(&lab, "s", "alpha")?;
    lab.ok("s", &["approve", &ka, "--admin-key", k, "--exit-node"])?;

    // Snapshots on: a new key (0600), the settings naming it, a first
    // snapshot, and the refresher's memory next to the key.
    let snap = lab.key("snapshot.key");
    let sk = snap.to_str().context("path")?;
    let out = lab.ok(
        "s",
        &[
            "snapshot-key",
            "--admin-key",
            k,
            "--snapshot-key",
            sk,
            "--max-validity",
            "1h",
        ],
    )?;
    println!("{out}");
    assert!(
        out.contains("snapshot version") && out.contains("1 devices"),
        "{out}"
    );
    assert_eq!(
        std::fs::metadata(&snap)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(lab.key("snapshot.key.last").exists());
    assert!(lab.etcd.get("/s/snapshot")?.is_some());
    let refresh = |extra: &[&str]| -> anyhow::Result<Output> {
        let mut args = vec![
            "refresh-snapshot",
            "--snapshot-key",
            sk,
            "--registry-admin-key",
            &public,
        ];
        args.extend_from_slice(extra);
        lab.mesh("s", &args)
    };

    // The role change, then a snapshot; an etcd writer puts the
    // exit-node record back: `list` shows it rolled back, not alpha as
    // exit node again.
    let a_path = format!("/s/devices/{}", key_id(&ka));
    let as_exit_node = lab.etcd.get(&a_path)?.context("alpha")?;
    lab.ok(
        "s",
        &["approve", "alpha", "--admin-key", k, "--no-exit-node"],
    )?;
    let out = refresh(&["--validity", "30m"])?;
    assert!(out.status.success(), "{out:?}");
    lab.etcd.put(&a_path, &as_exit_node)?;
    let l = lab.list("s", &key)?;
    assert!(
        device(&l, "alpha").is_none(),
        "the rolled-back record is listed: {l}"
    );
    let reason = l["ignored"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["key"] == a_path.as_str()))
        .and_then(|i| i["reason"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.starts_with("rolled back") && reason.contains("snapshot"),
        "{l}"
    );
    // The refresher sees it too: it warns, and keeps the newer serial.
    let out = refresh(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("refresh over a rollback: {err}");
    assert!(out.status.success(), "{out:?}");
    assert!(
        err.contains("rolled back") && err.contains(&a_path),
        "{err}"
    );
    assert!(device(&lab.list("s", &key)?, "alpha").is_none());

    // A mesh given its snapshot key at init: its first settings name it,
    // and a snapshot is there at once.
    let snap2 = lab.key("snapshot2.key");
    let out = lab.ok(
        "s2",
        &[
            "init",
            "--admin-key",
            lab.key("admin2.key").to_str().context("p")?,
            "--snapshot-key",
            snap2.to_str().context("p")?,
            "--max-validity",
            "2h",
        ],
    )?;
    assert!(
        out.contains("snapshot version") && out.contains("7200 s"),
        "{out}"
    );
    assert!(snap2.exists() && lab.etcd.get("/s2/snapshot")?.is_some());
    let first = lab.etcd.get("/s2/settings")?.context("settings")?;
    assert!(
        first.contains("max_validity") && first.contains("serial\\\":1"),
        "{first}"
    );

    // Refused: another key than the settings name (the admin's own), a
    // validity beyond theirs, and no admin key to verify with.
    let out = lab.mesh(
        "s",
        &[
            "refresh-snapshot",
            "--snapshot-key",
            k,
            "--registry-admin-key",
            &public,
        ],
    )?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("name snapshot key"),
        "{out:?}"
    );
    let out = refresh(&["--validity", "2h"])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = lab.mesh("s", &["refresh-snapshot", "--snapshot-key", sk])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    Ok(())
}
