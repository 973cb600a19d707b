//! The mesh admin's ed25519 key pair. The private key signs every
//! membership record and lives only with the admin (written 0600 where the
//! admin says, never into etcd); devices are given the public key and
//! believe nothing in the registry that it did not sign.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// First line of a private key file: says what the file is to someone who
/// finds it.
const PRIVATE_HEADER: &str =
    "# nexd mesh admin private key (ed25519): signs membership; keep it offline";

/// First line of a snapshot key file.
const SNAPSHOT_HEADER: &str = "# nexd mesh snapshot key (ed25519): signs only the mesh's snapshot; kept where `nexctl mesh refresh-snapshot` runs";

/// The admin's signing key (also the type of a mesh's snapshot key).
/// Debug never prints the key material.
pub struct AdminKey(SigningKey);

/// The admin's public key: what every device checks signatures against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AdminPublicKey(VerifyingKey);

/// Why a key or key file was not accepted; every file error names the path.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    #[error("{0:?} is not an admin public key: {1}")]
    ParsePublic(String, String),
    #[error("cannot read admin key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write admin key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("admin key {path} already exists; refusing to overwrite it (move it away first)")]
    Exists { path: PathBuf },
    #[error("admin key {path} is not an ed25519 private key: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "admin key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

impl AdminKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        AdminKey(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// A key from its 32-byte seed (tests and benches).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        AdminKey(SigningKey::from_bytes(&seed))
    }

    pub fn public_key(&self) -> AdminPublicKey {
        AdminPublicKey(self.0.verifying_key())
    }

    /// Signs `message` (already the canonical encoding, see `signed`).
    pub fn sign(&self, message: &[u8]) -> Signature {
        self.0.sign(message)
    }

    /// Writes the key to `path` (mode 0600, never over an existing file)
    /// and the public key next to it as `<path>.pub`.
    pub fn create_file(&self, path: &Path) -> Result<(), AdminKeyError> {
        self.create_file_with(path, PRIVATE_HEADER)
    }

    /// `create_file` for a mesh's snapshot key: the same format, a first
    /// line that says what it is.
    pub fn create_snapshot_key_file(&self, path: &Path) -> Result<(), AdminKeyError> {
        self.create_file_with(path, SNAPSHOT_HEADER)
    }

    fn create_file_with(&self, path: &Path, header: &str) -> Result<(), AdminKeyError> {
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            writeln!(f, "{header}")?;
            writeln!(f, "{}", BASE64.encode(self.0.to_bytes()))?;
            f.sync_all()
        };
        write().map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                AdminKeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                AdminKeyError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let public = public_path(path);
        fs::write(&public, format!("{}\n", self.public_key())).map_err(|source| {
            AdminKeyError::Write {
                path: public,
                source,
            }
        })
    }

    /// Reads a key file written by `create_file`; refuses one that group or
    /// others can read.
    pub fn load(path: &Path) -> Result<Self, AdminKeyError> {
        let read_err = |source| AdminKeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(read_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AdminKeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        let parse_err = |reason: String| AdminKeyError::Parse {
            path: path.to_owned(),
            reason,
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| parse_err("the file has no key line".into()))?;
        let bytes = BASE64
            .decode(line)
            .map_err(|_| parse_err("the key line is not base64".into()))?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| parse_err(format!("decodes to {} bytes, not 32", bytes.len())))?;
        Ok(AdminKey::from_seed(seed))
    }
}

/// `<path>.pub`.
pub fn public_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminKey(public {})", self.public_key())
    }
}

impl AdminPublicKey {
    /// Whether `signature` over `message` was made by this key. Strict
    /// verification: rejects the malleable and small-order edge cases that
    /// plain ed25519 verification lets through.
    pub fn verifies(&self, message: &[u8], signature: &Signature) -> bool {
        self.0.verify_strict(message, signature).is_ok()
    }
}

impl fmt::Display for AdminPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for AdminPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminPublicKey({self})")
    }
}

impl serde::Serialize for AdminPublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AdminPublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for AdminPublicKey {
    type Err = AdminKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |m: &str| AdminKeyError::ParsePublic(s.to_owned(), m.to_owned());
        let bytes = BASE64
            .decode(s.trim())
            .map_err(|_| fail("not valid base64"))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| fail("an ed25519 public key has 32 bytes"))?;
        VerifyingKey::from_bytes(&arr)
            .map(AdminPublicKey)
            .map_err(|_| fail("not a point on the curve"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_mode_and_no_overwrite() {
        let dir = std::env::temp_dir().join(format!("nexd-admin-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("admin.key");
        let key = AdminKey::generate();
        key.create_file(&path).expect("create");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = AdminKey::load(&path).expect("load");
        assert_eq!(again.public_key(), key.public_key());
        let public: AdminPublicKey = fs::read_to_string(public_path(&path))
            .expect("pub")
            .trim()
            .parse()
            .expect("parse pub");
        assert_eq!(public, key.public_key());
        assert!(matches!(
            AdminKey::generate().create_file(&path),
            Err(AdminKeyError::Exists { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            AdminKey::load(&path),
            Err(AdminKeyError::Permissions { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn signatures_verify_only_with_the_signing_key() {
        let a = AdminKey::generate();
        let b = AdminKey::generate();
        let sig = a.sign(b"hello");
        assert!(a.public_key().verifies(b"hello", &sig));
        assert!(!a.public_key().verifies(b"hellp", &sig));
        assert!(!b.public_key().verifies(b"hello", &sig));
        assert!("AAAA".parse::<AdminPublicKey>().is_err());
    }
}
