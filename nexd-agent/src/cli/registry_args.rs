//! The options that say where the registry is and how to talk to it,
//! shared by `nexd` (device side) and `nexctl mesh` (admin side), with the
//! same `NEXD_REGISTRY*` variables. What only the device side asks
//! (`--registry-name`, `--registry-endpoint`) is nexd's (`cli::nexd`).

use std::path::PathBuf;

use crate::registry::{AdminPublicKey, Credentials, EtcdConfig, RegistryUrl, TlsFiles};

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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The options alone, as either command line flattens them.
    #[derive(Debug, Parser)]
    struct Options {
        #[command(flatten)]
        registry: RegistryArgs,
    }

    #[test]
    fn etcd_options_check_each_other() {
        let c = Options::try_parse_from([
            "nexd",
            "--registry",
            "etcd://h:1/p",
            "--registry-cert",
            "/c",
        ])
        .expect("parse");
        let e = c.registry.etcd_config().expect_err("cert without key");
        assert!(e.contains("--registry-key"), "{e}");
        let e =
            Options::try_parse_from(["nexd", "--registry", "http://h:1/p"]).expect_err("scheme");
        assert!(e.to_string().contains("etcd://"), "{e}");
    }
}
