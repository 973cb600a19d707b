//! `nexctl mesh ...`: the mesh admin's commands. They talk to etcd
//! directly (not to a nexd) and sign with the admin key; see
//! `registry::admin` for what each does in etcd.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::Subcommand;
use serde::Serialize;

use super::{
    exit,
    output::{OutputFormat, Table, render},
    registry_args::RegistryArgs,
};
use crate::{
    keys::PublicKey,
    mesh::{
        self, DEFAULT_AGENT_PORT, DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, DEFAULT_KEEPALIVE,
        DEFAULT_MTU,
    },
    registry::{
        AdminKey, AdminPublicKey, RegistryError,
        admin::{Admin, AdminError, RoleChange, View},
        admin_key::{self, AdminKeyError},
        records::{Settings, SnapshotPolicy},
        requests,
        verify::Record,
    },
};

#[derive(Debug, clap::Args)]
pub struct MeshArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(subcommand)]
    pub command: MeshCommand,
}

/// The admin's private key file.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyFile {
    /// The mesh admin's private key (ed25519, mode 0600).
    #[arg(long, env = "NEXCTL_ADMIN_KEY", value_name = "FILE")]
    pub admin_key: PathBuf,
}

/// For commands that only read: the private key file or, without it,
/// --registry-admin-key.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadKey {
    /// The mesh admin's private key (its public half verifies what is read);
    /// or give --registry-admin-key.
    #[arg(long, env = "NEXCTL_ADMIN_KEY", value_name = "FILE")]
    pub admin_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Create the admin key pair and the mesh settings in an empty prefix.
    Init(InitArgs),
    /// Change the mesh settings (MTU, keepalive, agent port; prefixes only
    /// while there is no device).
    Set(SetArgs),
    /// Devices asking to join.
    Requests(ReadKey),
    /// Approve a device asking to join (allocating its addresses), or
    /// change the roles of an approved one.
    Approve(ApproveArgs),
    /// Remove a device from the mesh.
    Revoke(RevokeArgs),
    /// Approved devices, and records ignored because they are not validly
    /// signed.
    List(ReadKey),
    /// Write a mesh file's settings and devices into an empty prefix.
    Import(ImportArgs),
    /// Print the membership as a mesh file.
    Export(ReadKey),
    /// Turn on the mesh's signed snapshot (or rotate its key): create the
    /// snapshot key if FILE does not exist, name it in the settings, and
    /// write the first snapshot. Devices that start without a cache then
    /// believe a membership only while a valid snapshot covers it.
    SnapshotKey(SnapshotKeyArgs),
    /// Sign and write a new snapshot with the snapshot key (run it
    /// periodically where that key is kept, well within the validity).
    RefreshSnapshot(RefreshArgs),
    /// Sign the settings and every device in force again, as `list` shows
    /// them, with new serials: after restoring etcd from an older backup,
    /// devices ignore the restored records as rolled back until then.
    Resign(ResignArgs),
}

#[derive(Debug, clap::Args)]
pub struct ResignArgs {
    #[command(flatten)]
    pub key: KeyFile,
    /// Sign above this serial too: the highest a device reports in its
    /// ignored records ("older than serial N already verified").
    #[arg(long, value_name = "SERIAL", default_value_t = 0)]
    pub above: u64,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotKeyArgs {
    #[command(flatten)]
    pub key: KeyFile,
    /// The snapshot key (ed25519, mode 0600; its public half goes to
    /// FILE.pub): created if it does not exist.
    #[arg(long, value_name = "FILE")]
    pub snapshot_key: PathBuf,
    /// The longest a snapshot may stay valid: how long a rolled-back etcd
    /// can fool a device that has never seen the mesh (s, m, h or d).
    #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = parse_duration)]
    pub max_validity: u64,
}

#[derive(Debug, clap::Args)]
pub struct RefreshArgs {
    /// The snapshot key named in the settings. Its last snapshot is kept
    /// in FILE.last, so etcd cannot make it sign anything older.
    #[arg(long, value_name = "FILE")]
    pub snapshot_key: PathBuf,
    /// How long the new snapshot is valid (default: the most the settings
    /// allow).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub validity: Option<u64>,
}

/// `90s`, `30m`, `6h`, `1d` or plain seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (n, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 6h, 1d)"))?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where to write the new admin private key (0600; the public key goes
    /// to FILE.pub). Refused if the file exists.
    #[arg(long, env = "NEXCTL_ADMIN_KEY", value_name = "FILE")]
    pub admin_key: PathBuf,
    #[arg(long, default_value = DEFAULT_IPV4_PREFIX)]
    pub ipv4_prefix: ipnet::Ipv4Net,
    #[arg(long, default_value = DEFAULT_IPV6_PREFIX)]
    pub ipv6_prefix: ipnet::Ipv6Net,
    #[arg(long, default_value_t = DEFAULT_MTU)]
    pub mtu: u32,
    /// Persistent keepalive in seconds (0: off).
    #[arg(long, default_value_t = DEFAULT_KEEPALIVE)]
    pub keepalive: u16,
    /// UDP port of the in-tunnel announcements.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    pub agent_port: u16,
    /// Also create the mesh's snapshot key here (0600; refused if the file
    /// exists) and name it in the very first settings, so no settings
    /// without it are ever signed (see `snapshot-key`).
    #[arg(long, value_name = "FILE")]
    pub snapshot_key: Option<PathBuf>,
    /// With --snapshot-key: the longest a snapshot may stay valid.
    #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = parse_duration)]
    pub max_validity: u64,
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub key: KeyFile,
    #[arg(long)]
    pub ipv4_prefix: Option<ipnet::Ipv4Net>,
    #[arg(long)]
    pub ipv6_prefix: Option<ipnet::Ipv6Net>,
    #[arg(long)]
    pub mtu: Option<u32>,
    #[arg(long)]
    pub keepalive: Option<u16>,
    #[arg(long)]
    pub agent_port: Option<u16>,
}

#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// The device: its name or WireGuard public key.
    #[arg(value_name = "NAME|KEY")]
    pub device: String,
    #[command(flatten)]
    pub key: KeyFile,
    /// The device may serve as exit node.
    #[arg(long, conflicts_with = "no_exit_node")]
    pub exit_node: bool,
    /// The device may no longer serve as exit node.
    #[arg(long)]
    pub no_exit_node: bool,
    /// As exit node, serve only these devices (names, comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAMES",
        conflicts_with = "all_exit_clients"
    )]
    pub exit_clients: Option<Vec<String>>,
    /// As exit node, serve every device (the default).
    #[arg(long)]
    pub all_exit_clients: bool,
    /// As exit node, how much it can forward ("2gbit", "500mbit"): clients
    /// spread over exit nodes by it, and an exit node cannot claim more.
    #[arg(long, value_name = "RATE", value_parser = crate::mesh::rate::parse, conflicts_with = "no_exit_capacity")]
    pub exit_capacity: Option<crate::mesh::Rate>,
    /// Forget the exit node's capacity (its link speed counts).
    #[arg(long)]
    pub no_exit_capacity: bool,
    /// Approve only if the device's key has this fingerprint (the device
    /// logs it while it waits; `nexctl mesh requests` shows it): a join
    /// request replaced under the same name is refused.
    #[arg(long, value_name = "FINGERPRINT")]
    pub fingerprint: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The device: its name or WireGuard public key.
    #[arg(value_name = "NAME|KEY")]
    pub device: String,
    #[command(flatten)]
    pub key: KeyFile,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The mesh file to import.
    pub file: PathBuf,
    #[command(flatten)]
    pub key: KeyFile,
    /// Create the admin key pair at --admin-key first (as `init` does;
    /// refused if the file exists).
    #[arg(long)]
    pub new_admin_key: bool,
}

/// A failure with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Key(#[from] AdminKeyError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::Usage(_) => exit::USAGE,
            Failure::Key(_) | Failure::Other(_) => exit::FAILURE,
            Failure::Admin(AdminError::Registry(r)) => match r {
                RegistryError::Unreachable { .. } => exit::UNREACHABLE,
                RegistryError::Refused { .. } => exit::PERMISSION,
                RegistryError::Config(_) | RegistryError::Etcd { .. } => exit::FAILURE,
            },
            Failure::Admin(AdminError::Unavailable(_)) => exit::UNAVAILABLE,
            Failure::Admin(AdminError::Refused(_) | AdminError::Encode(_)) => exit::FAILURE,
        }
    }
}

/// Runs `nexctl mesh ...` and returns the process exit status.
///
/// nexctl restores the default SIGPIPE so `nexctl ... | head` ends
/// quietly; but gRPC writes to its sockets with `writev`, which raises
/// SIGPIPE when etcd hangs up (a TLS handshake it refused, say). So the
/// etcd work runs with SIGPIPE ignored, and what goes to stdout is printed
/// only after the connections are gone, with the default restored.
pub fn run(format: OutputFormat, args: MeshArgs) -> ExitCode {
    let result: Result<String, Failure> = with_sigpipe_ignored(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::Other(format!("cannot start the async runtime: {e}")))?;
        let mut out = String::new();
        runtime.block_on(dispatch(&mut out, format, args))?;
        Ok(out)
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.status())
        }
    }
}

fn with_sigpipe_ignored<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: changing a signal disposition; the runtime f starts and ends
    // on this thread, and no other thread of nexctl writes anywhere.
    let before = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let r = f();
    // SAFETY: as above; restores what main() set.
    unsafe {
        libc::signal(libc::SIGPIPE, before);
    }
    r
}

async fn connect(r: &RegistryArgs) -> Result<Admin, Failure> {
    let cfg = r
        .etcd_config()
        .map_err(Failure::Usage)?
        .ok_or_else(no_registry)?;
    Ok(Admin::connect(cfg).await?)
}

fn no_registry() -> Failure {
    Failure::Usage(
        "nexctl mesh needs --registry etcd://HOST:PORT[,HOST:PORT...]/PREFIX (or NEXD_REGISTRY)"
            .into(),
    )
}

fn verifying_key(r: &RegistryArgs, k: &ReadKey) -> Result<AdminPublicKey, Failure> {
    match (&k.admin_key, r.registry_admin_key) {
        (Some(path), _) => Ok(AdminKey::load(path)?.public_key()),
        (None, Some(public)) => Ok(public),
        (None, None) => Err(Failure::Usage(
            "give --registry-admin-key PUBLIC_KEY (or --admin-key FILE) so nexctl can verify what it reads"
                .into(),
        )),
    }
}

/// The registry's records, verified with the admin's public key: what the
/// reading commands show.
async fn read(r: &RegistryArgs, k: &ReadKey) -> Result<View, Failure> {
    let public = verifying_key(r, k)?;
    Ok(connect(r).await?.read(public).await?)
}

/// `--registry` as given, for messages (`dispatch` checked it is there).
fn registry_url(r: &RegistryArgs) -> String {
    r.registry
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

async fn dispatch(out: &mut String, format: OutputFormat, args: MeshArgs) -> Result<(), Failure> {
    let r = &args.registry;
    // Where before what: a missing --registry is a usage error whatever
    // else is wrong.
    r.etcd_config()
        .map_err(Failure::Usage)?
        .ok_or_else(no_registry)?;
    match args.command {
        MeshCommand::Init(a) => init(out, r, a).await,
        MeshCommand::Set(a) => set(out, r, a).await,
        MeshCommand::Requests(k) => requests(out, format, r, &k).await,
        MeshCommand::Approve(a) => approve(out, r, a).await,
        MeshCommand::Revoke(a) => {
            let key = AdminKey::load(&a.key.admin_key)?;
            let d = connect(r).await?.revoke(&key, &a.device).await?;
            let _ = writeln!(
                out,
                "revoked {} ({}); its addresses {} and {} are free again",
                d.name, d.public_key, d.ipv4, d.ipv6
            );
            Ok(())
        }
        MeshCommand::List(k) => list(out, format, r, &k).await,
        MeshCommand::Import(a) => import(out, r, a).await,
        MeshCommand::Export(k) => export(out, r, &k).await,
        MeshCommand::SnapshotKey(a) => snapshot_key(out, r, a).await,
        MeshCommand::RefreshSnapshot(a) => refresh_snapshot(out, r, a).await,
        MeshCommand::Resign(a) => {
            let key = AdminKey::load(&a.key.admin_key)?;
            let (first, last) = connect(r).await?.resign(&key, a.above).await?;
            let _ = writeln!(
                out,
                "signed the settings and every device in force again, serials {first} to {last}"
            );
            Ok(())
        }
    }
}

async fn init(out: &mut String, r: &RegistryArgs, a: InitArgs) -> Result<(), Failure> {
    let snapshot_key = a.snapshot_key.as_ref().map(|_| AdminKey::generate());
    let settings = Settings {
        ipv4_prefix: a.ipv4_prefix,
        ipv6_prefix: a.ipv6_prefix,
        mtu: a.mtu,
        persistent_keepalive: a.keepalive,
        agent_port: a.agent_port,
        serial: 1,
        snapshots: snapshot_key.as_ref().map(|k| SnapshotPolicy {
            key: k.public_key(),
            max_validity: a.max_validity,
        }),
    };
    crate::registry::verify::check_settings(&settings).map_err(Failure::Usage)?;
    for path in std::iter::once(&a.admin_key).chain(a.snapshot_key.as_ref()) {
        if path.exists() {
            return Err(AdminKeyError::Exists { path: path.clone() }.into());
        }
    }
    let mut admin = connect(r).await?;
    let key = AdminKey::generate();
    // The keys first: a mesh whose key was never written could never be
    // changed again.
    key.create_file(&a.admin_key)?;
    if let (Some(path), Some(sk)) = (&a.snapshot_key, &snapshot_key) {
        sk.create_snapshot_key_file(path)?;
    }
    match admin.init(&key, settings).await {
        Ok(s) => {
            let _ = writeln!(
                out,
                "initialised the mesh at {}: {} and {}, MTU {}, keepalive {} s, agent port {}",
                registry_url(r),
                s.ipv4_prefix,
                s.ipv6_prefix,
                s.mtu,
                s.persistent_keepalive,
                s.agent_port
            );
            let _ = writeln!(
                out,
                "admin private key: {} (mode 0600: keep it offline)",
                a.admin_key.display()
            );
            let _ = writeln!(
                out,
                "admin public key: {} (also in {}; give it to every device as --registry-admin-key)",
                key.public_key(),
                admin_key::public_path(&a.admin_key).display()
            );
            if let (Some(path), Some(sk)) = (&a.snapshot_key, &snapshot_key) {
                write_snapshot(out, &mut admin, key.public_key(), path, sk, None).await?;
                let _ = writeln!(
                    out,
                    "snapshot key: {} (keep it where `nexctl mesh refresh-snapshot --snapshot-key {}` runs, e.g. hourly: dist/nexd-snapshot-refresh.timer)",
                    path.display(),
                    path.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            // Nothing was written to etcd: the new keys serve no mesh.
            for path in std::iter::once(&a.admin_key).chain(a.snapshot_key.as_ref()) {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(admin_key::public_path(path));
            }
            Err(e.into())
        }
    }
}

async fn import(out: &mut String, r: &RegistryArgs, a: ImportArgs) -> Result<(), Failure> {
    let mesh = mesh::read(&a.file).map_err(|e| Failure::Other(e.to_string()))?;
    // Before a new key is created: a refused import leaves nothing behind.
    crate::registry::admin::check_importable(&mesh)?;
    let mut admin = connect(r).await?;
    let path = &a.key.admin_key;
    let key = if a.new_admin_key {
        let key = AdminKey::generate();
        key.create_file(path)?;
        key
    } else {
        AdminKey::load(path)?
    };
    match admin.import(&key, &mesh).await {
        Ok(n) => {
            let _ = writeln!(
                out,
                "imported {} with {n} devices into {}",
                a.file.display(),
                registry_url(r),
            );
            if a.new_admin_key {
                let _ = writeln!(
                    out,
                    "admin public key: {} (also in {}; give it to every device as --registry-admin-key)",
                    key.public_key(),
                    admin_key::public_path(path).display()
                );
            }
            Ok(())
        }
        Err(e) => {
            // A key made for an import that was refused before writing
            // anything signs nothing: remove it. After any other failure
            // something may be signed with it already: keep it.
            if a.new_admin_key && matches!(e, AdminError::Refused(_)) {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(admin_key::public_path(path));
            }
            Err(e.into())
        }
    }
}

async fn set(out: &mut String, r: &RegistryArgs, a: SetArgs) -> Result<(), Failure> {
    let key = AdminKey::load(&a.key.admin_key)?;
    let s = connect(r)
        .await?
        .set(&key, |s| {
            if let Some(v) = a.ipv4_prefix {
                s.ipv4_prefix = v;
            }
            if let Some(v) = a.ipv6_prefix {
                s.ipv6_prefix = v;
            }
            if let Some(v) = a.mtu {
                s.mtu = v;
            }
            if let Some(v) = a.keepalive {
                s.persistent_keepalive = v;
            }
            if let Some(v) = a.agent_port {
                s.agent_port = v;
            }
        })
        .await?;
    let _ = writeln!(
        out,
        "mesh settings now: {} and {}, MTU {}, keepalive {} s, agent port {} (serial {})",
        s.ipv4_prefix, s.ipv6_prefix, s.mtu, s.persistent_keepalive, s.agent_port, s.serial
    );
    Ok(())
}

async fn approve(out: &mut String, r: &RegistryArgs, a: ApproveArgs) -> Result<(), Failure> {
    let key = AdminKey::load(&a.key.admin_key)?;
    let change = RoleChange {
        exit_node: if a.exit_node {
            Some(true)
        } else if a.no_exit_node {
            Some(false)
        } else {
            None
        },
        exit_clients: if a.all_exit_clients {
            Some(None)
        } else {
            a.exit_clients.map(Some)
        },
        exit_capacity: if a.no_exit_capacity {
            Some(None)
        } else {
            a.exit_capacity.map(|r| Some(r.bits_per_second()))
        },
    };
    let done = connect(r)
        .await?
        .approve_expecting(&key, &a.device, a.fingerprint.as_deref(), &change)
        .await?;
    let d = &done.record;
    let roles = roles_text(&d.roles);
    let fingerprint = requests::fingerprint(&d.public_key);
    if done.new_member && a.fingerprint.is_none() && a.device.parse::<PublicKey>().is_err() {
        // By name alone: the name came from an unsigned request anyone
        // with write access to etcd could have replaced.
        eprintln!(
            "warning: {} was approved by name alone; check with the device that its key fingerprint is {fingerprint} (its log shows it), or approve with --fingerprint next time",
            d.name
        );
    }
    if !done.changed {
        let _ = writeln!(
            out,
            "{} ({}) is already approved with these roles ({roles}); nothing changed",
            d.name, d.public_key
        );
    } else if done.new_member {
        let _ = writeln!(
            out,
            "approved {} ({}, fingerprint {fingerprint}): {} and {}, roles: {roles}",
            d.name, d.public_key, d.ipv4, d.ipv6
        );
    } else {
        let _ = writeln!(out, "{} ({}) now has roles: {roles}", d.name, d.public_key);
    }
    Ok(())
}

fn roles_text(r: &crate::registry::records::Roles) -> String {
    // Out of range only in a record not made by nexctl: said, not hidden.
    let capacity =
        r.exit_capacity.map_or_else(
            String::new,
            |bps| match crate::mesh::Rate::from_bits_per_second(bps) {
                Some(c) => format!(", capacity {c}"),
                None => format!(", capacity {bps} bit/s: out of range, ignored"),
            },
        );
    match (&r.exit_node, &r.exit_clients) {
        (false, _) => "member".into(),
        (true, None) => format!("exit node (serves every device{capacity})"),
        (true, Some(c)) => format!("exit node (serves {}{capacity})", c.join(",")),
    }
}

#[derive(Serialize)]
struct RequestRow {
    name: String,
    public_key: String,
    /// What the device shows, to approve with --fingerprint.
    fingerprint: String,
    endpoint: Option<String>,
    listen_port: u16,
    asks_exit_node: bool,
    requested_at: u64,
    /// A name asked by several keys, or held by a member with another
    /// key: a request may have been replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

async fn requests(
    out: &mut String,
    format: OutputFormat,
    r: &RegistryArgs,
    k: &ReadKey,
) -> Result<(), Failure> {
    let view = read(r, k).await?;
    let members = view.membership().ok();
    let mut notes = requests::notes(&view.store, members.as_ref());
    let rows: Vec<RequestRow> = view
        .store
        .requests()
        .map(|q| RequestRow {
            name: q.name.clone(),
            public_key: q.public_key.to_string(),
            fingerprint: requests::fingerprint(&q.public_key),
            endpoint: q.endpoint.clone(),
            listen_port: q.listen_port,
            asks_exit_node: q.exit_node,
            requested_at: q.requested_at,
            note: notes.remove(&q.public_key),
        })
        .collect();
    render(out, format, &rows, || {
        let mut t = Table::new(&[
            "NAME",
            "PUBLIC KEY",
            "FINGERPRINT",
            "ENDPOINT",
            "LISTEN PORT",
            "ASKS EXIT NODE",
            "NOTE",
        ]);
        for q in &rows {
            t.row(vec![
                q.name.clone(),
                q.public_key.clone(),
                q.fingerprint.clone(),
                q.endpoint.clone().unwrap_or_else(|| "-".into()),
                q.listen_port.to_string(),
                if q.asks_exit_node { "yes" } else { "no" }.into(),
                q.note.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        t
    });
    if rows.iter().any(|q| q.note.is_some()) {
        eprintln!(
            "warning: some names are asked by several keys or held by another member (see NOTE): a join request may have been replaced; approve with --fingerprint as the device shows it"
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct DeviceRow {
    name: String,
    public_key: String,
    ipv4: String,
    ipv6: String,
    endpoint: Option<String>,
    /// Whether the device's lease is alive (it published its endpoint).
    online: bool,
    exit_node: bool,
    exit_clients: Option<Vec<String>>,
    serial: u64,
}

#[derive(Serialize)]
struct Listing {
    devices: Vec<DeviceRow>,
    ignored: Vec<crate::registry::verify::Ignored>,
}

async fn list(
    out: &mut String,
    format: OutputFormat,
    r: &RegistryArgs,
    k: &ReadKey,
) -> Result<(), Failure> {
    let view = read(r, k).await?;
    let m = view.membership()?;
    let online: std::collections::HashSet<_> = view
        .store
        .records()
        .filter_map(|(_, rec)| match rec {
            Record::Endpoint(k, _) => Some(*k),
            _ => None,
        })
        .collect();
    let devices: Vec<DeviceRow> = m
        .mesh
        .devices
        .iter()
        .map(|d| {
            let roles = m.roles.get(&d.public_key).cloned().unwrap_or_default();
            DeviceRow {
                name: d.name.clone(),
                public_key: d.public_key.to_string(),
                ipv4: d.ipv4.to_string(),
                ipv6: d.ipv6.to_string(),
                endpoint: d.endpoint.as_ref().map(ToString::to_string),
                online: online.contains(&d.public_key),
                exit_node: roles.exit_node,
                exit_clients: roles.exit_clients,
                serial: m.serials.get(&d.public_key).copied().unwrap_or(0),
            }
        })
        .collect();
    let listing = Listing {
        devices,
        ignored: m.ignored.clone(),
    };
    render(out, format, &listing, || {
        let mut t = Table::new(&[
            "NAME",
            "PUBLIC KEY",
            "MESH IP",
            "ENDPOINT",
            "ONLINE",
            "ROLES",
            "SERIAL",
        ]);
        for d in &listing.devices {
            t.row(vec![
                d.name.clone(),
                d.public_key.clone(),
                format!("{},{}", d.ipv4, d.ipv6),
                d.endpoint.clone().unwrap_or_else(|| "-".into()),
                if d.online { "yes" } else { "no" }.into(),
                match (&d.exit_node, &d.exit_clients) {
                    (false, _) => "-".into(),
                    (true, None) => "exit-node".into(),
                    (true, Some(c)) => format!("exit-node:{}", c.join("+")),
                },
                d.serial.to_string(),
            ]);
        }
        t
    });
    warn_ignored(&m.ignored);
    Ok(())
}

fn warn_ignored(ignored: &[crate::registry::verify::Ignored]) {
    if ignored.is_empty() {
        return;
    }
    eprintln!(
        "warning: {} registry record(s) ignored (not validly signed by the admin key, revoked or conflicting):",
        ignored.len()
    );
    for i in ignored {
        eprintln!("  {}: {}", i.key, i.reason);
    }
}

/// `FILE.last`: the last snapshot a refresher wrote with the key at FILE.
fn last_snapshot_path(key: &std::path::Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".last");
    PathBuf::from(s)
}

/// Signs and writes a snapshot, keeping it in FILE.last; prints what it
/// did, and warns about records found rolled back.
async fn write_snapshot(
    out: &mut String,
    admin: &mut Admin,
    public: AdminPublicKey,
    path: &std::path::Path,
    snapshot_key: &AdminKey,
    validity: Option<u64>,
) -> Result<(), Failure> {
    let last = last_snapshot_path(path);
    let previous = match std::fs::read(&last) {
        Ok(raw) => Some(raw),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Failure::Other(format!(
                "cannot read {}: {e}",
                last.display()
            )));
        }
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Failure::Other(format!("the clock is before 1970: {e}")))?
        .as_millis();
    let now_ms = u64::try_from(now_ms).map_err(|e| Failure::Other(e.to_string()))?;
    let done = admin
        .refresh_snapshot(public, snapshot_key, validity, previous.as_deref(), now_ms)
        .await?;
    // Written after etcd took it: the memory never runs ahead of what
    // devices could have read.
    crate::state_file::replace(&last, &done.raw)
        .map_err(|e| Failure::Other(format!("cannot write {}: {e}", last.display())))?;
    let s = &done.snapshot;
    let _ = writeln!(
        out,
        "snapshot version {}: {} devices in force, serials up to {}, valid until Unix time {} ({} s)",
        s.version,
        s.devices.len(),
        s.serial,
        s.expires,
        s.expires - s.issued
    );
    for r in &done.rolled_back {
        eprintln!(
            "warning: etcd holds a record older than the previous snapshot (rolled back?); the snapshot keeps the newer serial: {r}"
        );
    }
    Ok(())
}

async fn snapshot_key(
    out: &mut String,
    r: &RegistryArgs,
    a: SnapshotKeyArgs,
) -> Result<(), Failure> {
    let key = AdminKey::load(&a.key.admin_key)?;
    let mut admin = connect(r).await?;
    let snapshot_key = if a.snapshot_key.exists() {
        AdminKey::load(&a.snapshot_key)?
    } else {
        let k = AdminKey::generate();
        k.create_snapshot_key_file(&a.snapshot_key)?;
        k
    };
    if snapshot_key.public_key() == key.public_key() {
        return Err(Failure::Usage(
            "the snapshot key must not be the admin key (it is kept online)".into(),
        ));
    }
    let s = admin
        .set_snapshot_key(&key, snapshot_key.public_key(), a.max_validity)
        .await?;
    let _ = writeln!(
        out,
        "the mesh's snapshots are signed by {} (valid at most {} s; settings serial {})",
        snapshot_key.public_key(),
        a.max_validity,
        s.serial
    );
    write_snapshot(
        out,
        &mut admin,
        key.public_key(),
        &a.snapshot_key,
        &snapshot_key,
        None,
    )
    .await?;
    let _ = writeln!(
        out,
        "run `nexctl mesh refresh-snapshot --snapshot-key {}` well within that, e.g. hourly (dist/nexd-snapshot-refresh.timer)",
        a.snapshot_key.display()
    );
    Ok(())
}

async fn refresh_snapshot(
    out: &mut String,
    r: &RegistryArgs,
    a: RefreshArgs,
) -> Result<(), Failure> {
    let public = r.registry_admin_key.ok_or_else(|| {
        Failure::Usage(
            "give --registry-admin-key PUBLIC_KEY: the snapshot covers only what the admin signed"
                .into(),
        )
    })?;
    let snapshot_key = AdminKey::load(&a.snapshot_key)?;
    let mut admin = connect(r).await?;
    write_snapshot(
        out,
        &mut admin,
        public,
        &a.snapshot_key,
        &snapshot_key,
        a.validity,
    )
    .await
}

async fn export(out: &mut String, r: &RegistryArgs, k: &ReadKey) -> Result<(), Failure> {
    let view = read(r, k).await?;
    let m = view.membership()?;
    let with_roles: Vec<&str> = m
        .mesh
        .devices
        .iter()
        .filter(|d| m.roles.get(&d.public_key).is_some_and(|r| r.exit_node))
        .map(|d| d.name.as_str())
        .collect();
    out.push_str(&mesh::render(
        &m.mesh,
        &[format!(
            "exported by nexctl from {} at revision {} (validly signed records only)",
            registry_url(r),
            view.store.revision
        )],
    ));
    warn_ignored(&m.ignored);
    if !with_roles.is_empty() {
        eprintln!(
            "warning: the mesh file has no place for roles yet; not exported: exit node role of {}",
            with_roles.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::nexctl::{Cli, Command};

    fn mesh(args: &[&str]) -> Result<MeshArgs, clap::Error> {
        let mut full = vec!["nexctl", "mesh"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Mesh(m) => Ok(*m),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn approve_roles_parse_and_exclude_each_other() {
        let m = mesh(&[
            "--registry",
            "etcd://h:1/p",
            "approve",
            "gw1",
            "--admin-key",
            "/k",
            "--exit-node",
            "--exit-clients",
            "a,b",
        ])
        .expect("parse");
        let MeshCommand::Approve(a) = m.command else {
            panic!("approve")
        };
        assert!(a.exit_node);
        assert_eq!(a.exit_clients, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert!(
            mesh(&[
                "approve",
                "x",
                "--admin-key",
                "/k",
                "--exit-node",
                "--no-exit-node"
            ])
            .is_err()
        );
        assert!(
            mesh(&[
                "approve",
                "x",
                "--admin-key",
                "/k",
                "--exit-clients",
                "a",
                "--all-exit-clients"
            ])
            .is_err()
        );
        // The registry options work after the verb too, and -o anywhere.
        let m = mesh(&["list", "--registry", "etcd://h:1/p", "-o", "json"]).expect("parse");
        assert!(m.registry.registry.is_some());
    }

    #[test]
    fn approve_takes_an_exit_capacity_as_a_rate() {
        let approve = |extra: &[&str]| {
            let mut args = vec!["approve", "gw1", "--admin-key", "/k", "--exit-node"];
            args.extend_from_slice(extra);
            mesh(&args).map(|m| match m.command {
                MeshCommand::Approve(a) => a,
                other => panic!("{other:?}"),
            })
        };
        let a = approve(&["--exit-capacity", "2gbit"]).expect("parse");
        assert_eq!(
            a.exit_capacity.map(crate::mesh::Rate::bits_per_second),
            Some(2_000_000_000)
        );
        assert!(
            approve(&["--no-exit-capacity"])
                .expect("parse")
                .no_exit_capacity
        );
        let e = approve(&["--exit-capacity", "2gbps"]).expect_err("ambiguous");
        assert!(e.to_string().contains("ambiguous"), "{e}");
        assert!(approve(&["--exit-capacity", "1gbit", "--no-exit-capacity"]).is_err());
        let roles = crate::registry::records::Roles {
            exit_node: true,
            exit_capacity: Some(500_000_000),
            ..Default::default()
        };
        assert_eq!(
            roles_text(&roles),
            "exit node (serves every device, capacity 500mbit)"
        );
    }

    #[test]
    fn durations_parse_with_a_unit_or_as_seconds() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("6h"), Ok(21_600));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("6x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn failures_map_to_nexctl_exit_statuses() {
        let unreachable = Failure::Admin(AdminError::Registry(RegistryError::Unreachable {
            endpoints: "h:1".into(),
            detail: "x".into(),
        }));
        assert_eq!(unreachable.status(), exit::UNREACHABLE);
        let refused = Failure::Admin(AdminError::Registry(RegistryError::Refused {
            endpoints: "h:1".into(),
            detail: "x".into(),
        }));
        assert_eq!(refused.status(), exit::PERMISSION);
        assert_eq!(
            Failure::Admin(AdminError::Unavailable("full".into())).status(),
            exit::UNAVAILABLE
        );
        assert_eq!(
            Failure::Admin(AdminError::Refused("no".into())).status(),
            exit::FAILURE
        );
        assert_eq!(Failure::Usage("u".into()).status(), exit::USAGE);
    }

    #[test]
    fn json_and_columns_render_like_the_other_listings() {
        let rows = vec![RequestRow {
            name: "a".into(),
            public_key: "K".into(),
            fingerprint: "0000-0000-0000-0000-0000".into(),
            endpoint: None,
            listen_port: 51820,
            asks_exit_node: true,
            requested_at: 1,
            note: None,
        }];
        let table = || {
            let mut t = Table::new(&["NAME", "PUBLIC KEY"]);
            t.row(vec!["a".into(), "K".into()]);
            t
        };
        let mut out = String::new();
        render(&mut out, OutputFormat::NoHeader, &rows, table);
        assert_eq!(out, "a      K\n");
        let mut out = String::new();
        render(&mut out, OutputFormat::Json, &rows, table);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v[0]["asks_exit_node"], true);
    }
}
