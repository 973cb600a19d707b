//! The options that say where the registry is and how to talk to it,
//! shared by `nexd` (device side) and `nexctl mesh` (admin side), with the
//! same `NEXD_REGISTRY*` variables.

use std::path::PathBuf;

use crate::registry::{
    AdminPublicKey, Credentials, DeviceConfig, EtcdConfig, RegistryUrl, TlsFiles,
};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Membership from etcd instead of the mesh file:
    /// etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
    #[arg(long, global = true, env = "NEXD_REGISTRY", value_name = "URL")]
    pub registry: Option<RegistryUrl>,
    /// CA certificate (PEM) of the etcd members; turns TLS on.
    #[arg(long, global = true, env = "NEXD_REGISTRY_CA", value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth; with
    /// --registry-key.
    #[arg(long, global = true, env = "NEXD_REGISTRY_CERT", value_name = "FILE")]
    pub registry_cert: Option<PathBuf>,
    /// Private key (PEM) of --registry-cert.
    #[arg(long, global = true, env = "NEXD_REGISTRY_KEY", value_name = "FILE")]
    pub registry_key: Option<PathBuf>,
    /// etcd user (etcd's own authentication); the password is read from
    /// --registry-password-file.
    #[arg(long, global = true, env = "NEXD_REGISTRY_USER", value_name = "USER")]
    pub registry_user: Option<String>,
    /// File holding the etcd user's password (first line).
    #[arg(
        long,
        global = true,
        env = "NEXD_REGISTRY_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub registry_password_file: Option<PathBuf>,
    /// The mesh admin's ed25519 public key (`nexctl mesh init` prints it):
    /// only records it signed are believed.
    #[arg(
        long,
        global = true,
        env = "NEXD_REGISTRY_ADMIN_KEY",
        value_name = "PUBLIC_KEY"
    )]
    pub registry_admin_key: Option<AdminPublicKey>,
}

impl RegistryArgs {
    /// The etcd configuration, `None` without `--registry`; an error names
    /// the option that is wrong.
    pub fn etcd_config(&self) -> Result<Option<EtcdConfig>, String> {
        let Some(url) = &self.registry else {
            for (set, name) in [
                (self.registry_ca.is_some(), "--registry-ca"),
                (self.registry_cert.is_some(), "--registry-cert"),
                (self.registry_user.is_some(), "--registry-user"),
            ] {
                if set {
                    return Err(format!("{name} needs --registry (or NEXD_REGISTRY)"));
                }
            }
            return Ok(None);
        };
        let tls = match (&self.registry_ca, &self.registry_cert, &self.registry_key) {
            (None, None, None) => None,
            (Some(ca), cert, key) => {
                if cert.is_some() != key.is_some() {
                    return Err("--registry-cert and --registry-key go together".into());
                }
                Some(TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (None, _, _) => {
                return Err(
                    "--registry-cert/--registry-key need --registry-ca (the CA of the etcd members)"
                        .into(),
                );
            }
        };
        let credentials = match (&self.registry_user, &self.registry_password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "cannot read --registry-password-file {}: {e}",
                        file.display()
                    )
                })?;
                Some(Credentials {
                    user: user.clone(),
                    password: text.lines().next().unwrap_or("").to_owned(),
                })
            }
            (Some(_), None) => {
                return Err("--registry-user needs --registry-password-file".into());
            }
            (None, Some(_)) => {
                return Err("--registry-password-file needs --registry-user".into());
            }
        };
        Ok(Some(EtcdConfig {
            url: url.clone(),
            tls,
            credentials,
        }))
    }
}

/// The device side's configuration from nexd's options; `None` without
/// `--registry` (the mesh file is used). `request_exit_node` is true for
/// `nexd router --exit-node`.
pub fn device_config(
    args: &super::nexd::AgentArgs,
    request_exit_node: bool,
) -> Result<Option<DeviceConfig>, String> {
    let Some(etcd) = args.registry.etcd_config()? else {
        return Ok(None);
    };
    let admin = args.registry.registry_admin_key.ok_or_else(|| {
        "--registry needs --registry-admin-key (the public key `nexctl mesh init` printed)"
            .to_owned()
    })?;
    let name = match &args.registry_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .map_err(|e| format!("cannot read the host name for --registry-name: {e}"))?,
    };
    let listen_port = match &args.registry_endpoint {
        Some(e) => {
            crate::mesh::parse_endpoint(e)
                .map_err(|m| format!("--registry-endpoint {m}"))?
                .port
        }
        None => crate::mesh::DEFAULT_LISTEN_PORT,
    };
    let mut cfg = DeviceConfig::new(etcd, admin, name, listen_port);
    cfg.advertise = args.registry_endpoint.clone();
    cfg.request_exit_node = request_exit_node;
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{cli::nexd::Cli, registry::AdminKey};

    #[test]
    fn registry_options_parse_and_check_each_other() {
        let admin = AdminKey::generate().public_key().to_string();
        let c = Cli::try_parse_from([
            "nexd",
            "--registry",
            "etcd://198.51.100.1:2379,198.51.100.2:2379/nexd",
            "--registry-admin-key",
            &admin,
            "--registry-name",
            "gw1",
            "--registry-endpoint",
            "192.0.2.1:4000",
        ])
        .expect("parse");
        let cfg = device_config(&c.agent, true).expect("valid").expect("some");
        assert_eq!(cfg.etcd.url.endpoints.len(), 2);
        assert_eq!(cfg.name, "gw1");
        assert_eq!(cfg.listen_port, 4000);
        assert!(cfg.request_exit_node);
        assert!(cfg.etcd.tls.is_none());

        let c = Cli::try_parse_from(["nexd"]).expect("none");
        assert!(device_config(&c.agent, false).expect("ok").is_none());

        let c = Cli::try_parse_from(["nexd", "--registry", "etcd://h:1/p"]).expect("no key");
        let e = device_config(&c.agent, false).expect_err("needs the admin key");
        assert!(e.contains("--registry-admin-key"), "{e}");

        let c = Cli::try_parse_from([
            "nexd",
            "--registry",
            "etcd://h:1/p",
            "--registry-cert",
            "/c",
        ])
        .expect("parse");
        let e = c
            .agent
            .registry
            .etcd_config()
            .expect_err("cert without key");
        assert!(e.contains("--registry-key"), "{e}");
        let e = Cli::try_parse_from(["nexd", "--registry", "http://h:1/p"]).expect_err("scheme");
        assert!(e.to_string().contains("etcd://"), "{e}");
    }

    #[test]
    fn registry_options_come_from_the_config_file_too() {
        let dir = std::env::temp_dir().join(format!("nexd-regcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let admin = AdminKey::generate().public_key().to_string();
        let p = dir.join("nexd.toml");
        std::fs::write(
            &p,
            format!(
                "registry = \"etcd://198.51.100.1:2379/nexd\"\nregistry-admin-key = \"{admin}\"\nregistry-name = \"gw9\"\n"
            ),
        )
        .expect("write");
        let cli = crate::cli::config::parse(
            ["nexd", "--config", p.to_str().expect("p")]
                .iter()
                .map(std::ffi::OsString::from)
                .collect(),
        )
        .expect("parse");
        let cfg = device_config(&cli.agent, false).expect("ok").expect("some");
        assert_eq!(cfg.name, "gw9");
        assert_eq!(cfg.etcd.url.prefix, "/nexd");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
