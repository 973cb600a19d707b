//! WireGuard keys: the wire format (base64), and the device's own private
//! key, created once in the state directory and reused on every start so
//! the device keeps its identity in the mesh file.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// File name of the private key inside the state directory.
pub const PRIVATE_KEY_FILE: &str = "private.key";

/// A Curve25519 public key: how the mesh file names a device and how
/// WireGuard names a peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// Why a string is not a key. Kept small so parsers can wrap it with the
/// location of the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not valid base64")]
    Base64,
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

fn decode_key(s: &str) -> Result<[u8; 32], KeyParseError> {
    let bytes = BASE64.decode(s.trim()).map_err(|_| KeyParseError::Base64)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyParseError::Length(bytes.len()))
}

impl PublicKey {
    /// The key as hex, which the WireGuard UAPI speaks.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Parses the hex form used by the UAPI.
    pub fn from_hex(s: &str) -> Option<Self> {
        hex_decode(s).map(PublicKey)
    }

    /// The first characters of the key, enough to tell peers apart in logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The device's private key. Debug never prints the key material.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        PrivateKey(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    /// A key from raw bytes (clamped by X25519 as usual).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// Raw key bytes, for handing to a WireGuard backend.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key as hex, which the WireGuard UAPI speaks.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0.to_bytes())
    }

    /// The key in base64, as `wg genkey` writes it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// Diffie-Hellman with a peer's public key: both ends compute the same
    /// secret, which authenticates messages between agents.
    pub fn shared_secret(&self, peer: &PublicKey) -> [u8; 32] {
        self.0
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0))
            .to_bytes()
    }
}

impl FromStr for PrivateKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(|b| PrivateKey(x25519_dalek::StaticSecret::from(b)))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

/// What can go wrong with the key file; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read private key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write private key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("private key {path} is not a WireGuard key: {source}")]
    Parse {
        path: PathBuf,
        source: KeyParseError,
    },
    #[error(
        "private key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("no private key at {path}; run `nexd keygen` first")]
    Missing { path: PathBuf },
}

/// Path of the private key inside `state_dir`.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PRIVATE_KEY_FILE)
}

/// Reads the private key from `state_dir`.
pub fn load(state_dir: &Path) -> Result<PrivateKey, KeyFileError> {
    let path = key_path(state_dir);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KeyFileError::Missing { path });
        }
        Err(source) => return Err(KeyFileError::Read { path, source }),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path, mode });
    }
    let text = fs::read_to_string(&path).map_err(|source| KeyFileError::Read {
        path: path.clone(),
        source,
    })?;
    text.parse()
        .map_err(|source| KeyFileError::Parse { path, source })
}

/// Reads the private key, creating it (mode 0600, directory 0700) when it
/// does not exist yet. Returns whether it was created.
pub fn load_or_create(state_dir: &Path) -> Result<(PrivateKey, bool), KeyFileError> {
    match load(state_dir) {
        Ok(key) => return Ok((key, false)),
        Err(KeyFileError::Missing { .. }) => {}
        Err(e) => return Err(e),
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| KeyFileError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
    let path = key_path(state_dir);
    let key = PrivateKey::generate();
    // create_new: if another process raced us, fail instead of overwriting
    // an identity that may already be in a mesh file.
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{}", key.to_base64())?;
        f.sync_all()
    };
    write().map_err(|source| KeyFileError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((key, true))
}

fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let key = PrivateKey::generate();
        let public = key.public_key();
        let parsed: PublicKey = public.to_string().parse().expect("parse");
        assert_eq!(parsed, public);
        assert_eq!(PublicKey::from_hex(&public.to_hex()), Some(public));
        let again: PrivateKey = key.to_base64().parse().expect("parse private");
        assert_eq!(again.public_key(), public);
    }

    #[test]
    fn bad_keys_are_rejected_with_reason() {
        assert_eq!(
            "not base64!".parse::<PublicKey>(),
            Err(KeyParseError::Base64)
        );
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyParseError::Length(3)));
        assert_eq!(PublicKey::from_hex("zz"), None);
    }

    #[test]
    fn shared_secret_is_symmetric() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_eq!(
            a.shared_secret(&b.public_key()),
            b.shared_secret(&a.public_key())
        );
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("nexd-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (k1, created) = load_or_create(&dir).expect("create");
        assert!(created);
        let (k2, created) = load_or_create(&dir).expect("reuse");
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        let mode = fs::metadata(key_path(&dir))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        fs::set_permissions(key_path(&dir), fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(load(&dir), Err(KeyFileError::Permissions { .. })));
        let _ = fs::remove_dir_all(&dir);
    }
}
