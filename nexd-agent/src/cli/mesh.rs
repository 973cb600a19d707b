//! `nexctl mesh ...`: the mesh admin's commands. They talk to etcd
//! directly (not to a nexd) and sign with the admin key; see
//! `registry::admin` for what each does in etcd.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;
use serde::Serialize;

use super::{
    nexctl::exit,
    output::{self, OutputFormat, Table},
    registry_args::RegistryArgs,
};
use crate::{
    mesh::{self, DEFAULT_AGENT_PORT, DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, DEFAULT_KEEPALIVE, DEFAULT_MTU},
    registry::{
        AdminKey, AdminPublicKey, RegistryError,
        admin::{Admin, AdminError, RoleChange},
        admin_key::{self, AdminKeyError},
        records::Settings,
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
    #[arg(long, value_delimiter = ',', value_name = "NAMES", conflicts_with = "all_exit_clients")]
    pub exit_clients: Option<Vec<String>>,
    /// As exit node, serve every device (the default).
    #[arg(long)]
    pub all_exit_clients: bool,
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
pub fn run(format: OutputFormat, args: MeshArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(dispatch(format, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.status())
        }
    }
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

async fn dispatch(format: OutputFormat, args: MeshArgs) -> Result<(), Failure> {
    let r = &args.registry;
    // Where before what: a missing --registry is a usage error whatever
    // else is wrong.
    r.etcd_config().map_err(Failure::Usage)?.ok_or_else(no_registry)?;
    match args.command {
        MeshCommand::Init(a) => init(r, a).await,
        MeshCommand::Set(a) => set(r, a).await,
        MeshCommand::Requests(k) => requests(format, r, &k).await,
        MeshCommand::Approve(a) => approve(r, a).await,
        MeshCommand::Revoke(a) => {
            let key = AdminKey::load(&a.key.admin_key)?;
            let d = connect(r).await?.revoke(&key, &a.device).await?;
            println!(
                "revoked {} ({}); its addresses {} and {} are free again",
                d.name, d.public_key, d.ipv4, d.ipv6
            );
            Ok(())
        }
        MeshCommand::List(k) => list(format, r, &k).await,
        MeshCommand::Import(a) => {
            let mesh = mesh::read(&a.file).map_err(|e| Failure::Other(e.to_string()))?;
            let key = AdminKey::load(&a.key.admin_key)?;
            let mut admin = connect(r).await?;
            let n = admin.import(&key, &mesh).await?;
            println!(
                "imported {} with {n} devices into {}",
                a.file.display(),
                r.registry.as_ref().map(ToString::to_string).unwrap_or_default(),
            );
            Ok(())
        }
        MeshCommand::Export(k) => export(r, &k).await,
    }
}

async fn init(r: &RegistryArgs, a: InitArgs) -> Result<(), Failure> {
    let settings = Settings {
        ipv4_prefix: a.ipv4_prefix,
        ipv6_prefix: a.ipv6_prefix,
        mtu: a.mtu,
        persistent_keepalive: a.keepalive,
        agent_port: a.agent_port,
        serial: 1,
    };
    crate::registry::verify::check_settings(&settings).map_err(Failure::Usage)?;
    if a.admin_key.exists() {
        return Err(AdminKeyError::Exists {
            path: a.admin_key.clone(),
        }
        .into());
    }
    let mut admin = connect(r).await?;
    let key = AdminKey::generate();
    // The key first: a mesh whose key was never written could never be
    // changed again.
    key.create_file(&a.admin_key)?;
    match admin.init(&key, settings).await {
        Ok(s) => {
            println!(
                "initialised the mesh at {}: {} and {}, MTU {}, keepalive {} s, agent port {}",
                r.registry.as_ref().map(ToString::to_string).unwrap_or_default(),
                s.ipv4_prefix,
                s.ipv6_prefix,
                s.mtu,
                s.persistent_keepalive,
                s.agent_port
            );
            println!(
                "admin private key: {} (mode 0600: keep it offline)",
                a.admin_key.display()
            );
            println!(
                "admin public key: {} (also in {}; give it to every device as --registry-admin-key)",
                key.public_key(),
                admin_key::public_path(&a.admin_key).display()
            );
            Ok(())
        }
        Err(e) => {
            // Nothing was written to etcd: the new key serves no mesh.
            let _ = std::fs::remove_file(&a.admin_key);
            let _ = std::fs::remove_file(admin_key::public_path(&a.admin_key));
            Err(e.into())
        }
    }
}

async fn set(r: &RegistryArgs, a: SetArgs) -> Result<(), Failure> {
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
    println!(
        "mesh settings now: {} and {}, MTU {}, keepalive {} s, agent port {} (serial {})",
        s.ipv4_prefix, s.ipv6_prefix, s.mtu, s.persistent_keepalive, s.agent_port, s.serial
    );
    Ok(())
}

async fn approve(r: &RegistryArgs, a: ApproveArgs) -> Result<(), Failure> {
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
    };
    let done = connect(r).await?.approve(&key, &a.device, &change).await?;
    let d = &done.record;
    let roles = roles_text(&d.roles);
    if !done.changed {
        println!(
            "{} ({}) is already approved with these roles ({roles}); nothing changed",
            d.name, d.public_key
        );
    } else if done.new_member {
        println!(
            "approved {} ({}): {} and {}, roles: {roles}",
            d.name, d.public_key, d.ipv4, d.ipv6
        );
    } else {
        println!("{} ({}) now has roles: {roles}", d.name, d.public_key);
    }
    Ok(())
}

fn roles_text(r: &crate::registry::records::Roles) -> String {
    match (&r.exit_node, &r.exit_clients) {
        (false, _) => "member".into(),
        (true, None) => "exit node (serves every device)".into(),
        (true, Some(c)) => format!("exit node (serves {})", c.join(",")),
    }
}

#[derive(Serialize)]
struct RequestRow {
    name: String,
    public_key: String,
    endpoint: Option<String>,
    listen_port: u16,
    asks_exit_node: bool,
    requested_at: u64,
}

async fn requests(format: OutputFormat, r: &RegistryArgs, k: &ReadKey) -> Result<(), Failure> {
    let public = verifying_key(r, k)?;
    let view = connect(r).await?.read(public).await?;
    let rows: Vec<RequestRow> = view
        .store
        .requests()
        .map(|q| RequestRow {
            name: q.name.clone(),
            public_key: q.public_key.to_string(),
            endpoint: q.endpoint.clone(),
            listen_port: q.listen_port,
            asks_exit_node: q.exit_node,
            requested_at: q.requested_at,
        })
        .collect();
    output::print(format, &rows, || {
        let mut t = Table::new(&["NAME", "PUBLIC KEY", "ENDPOINT", "LISTEN PORT", "ASKS EXIT NODE"]);
        for q in &rows {
            t.row(vec![
                q.name.clone(),
                q.public_key.clone(),
                q.endpoint.clone().unwrap_or_else(|| "-".into()),
                q.listen_port.to_string(),
                if q.asks_exit_node { "yes" } else { "no" }.into(),
            ]);
        }
        t
    });
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

async fn list(format: OutputFormat, r: &RegistryArgs, k: &ReadKey) -> Result<(), Failure> {
    let public = verifying_key(r, k)?;
    let view = connect(r).await?.read(public).await?;
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
    output::print(format, &listing, || {
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

async fn export(r: &RegistryArgs, k: &ReadKey) -> Result<(), Failure> {
    let public = verifying_key(r, k)?;
    let view = connect(r).await?.read(public).await?;
    let m = view.membership()?;
    let with_roles: Vec<&str> = m
        .mesh
        .devices
        .iter()
        .filter(|d| m.roles.get(&d.public_key).is_some_and(|r| r.exit_node))
        .map(|d| d.name.as_str())
        .collect();
    print!(
        "{}",
        mesh::render(
            &m.mesh,
            &[format!(
                "exported by nexctl from {} at revision {} (validly signed records only)",
                r.registry.as_ref().map(ToString::to_string).unwrap_or_default(),
                view.store.revision
            )]
        )
    );
    warn_ignored(&m.ignored);
    if !with_roles.is_empty() {
        eprintln!(
            "warning: the mesh file has no place for roles yet; not exported: exit node role of {}",
            with_roles.join(", ")
        );
    }
    Ok(())
}
