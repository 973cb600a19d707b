//! Sealing and opening signed records.
//!
//! A signed value in etcd is a JSON envelope `{"body": "<JSON text>",
//! "signature": "<base64>"}`. The signature is over the canonical message
//!
//! ```text
//! "nexd-registry-record-v1" 0x00
//! u32 big-endian length of the etcd key, the etcd key (UTF-8)
//! u32 big-endian length of the body, the body bytes exactly as stored
//! ```
//!
//! Signing the stored bytes (not a re-serialisation) means no two encoders
//! can disagree about what was signed. The etcd key is part of the message,
//! so a record copied to another key (another device's path, the settings
//! path, another mesh's prefix) no longer verifies.

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::admin_key::{AdminKey, AdminPublicKey};

const DOMAIN: &[u8] = b"nexd-registry-record-v1\0";

/// Why a value was not accepted. Shown to operators: each says what is
/// wrong in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum Rejection {
    #[error("not a signed record: {0}")]
    Malformed(String),
    #[error("missing signature")]
    MissingSignature,
    #[error("signature is not 64 bytes of base64")]
    BadSignatureEncoding,
    #[error(
        "signature does not verify with the admin key (signed by another key, changed after signing, or copied from another key)"
    )]
    BadSignature,
    #[error("signed body is not a valid record: {0}")]
    BadBody(String),
    #[error("{0}")]
    Invalid(String),
    #[error("revoked: {0}")]
    Revoked(String),
    #[error("conflicts with another record: {0}")]
    Conflict(String),
    #[error("rolled back: {0}")]
    RolledBack(String),
    #[error("too large: {0} bytes (an unsigned record is at most 1024)")]
    TooLarge(usize),
    #[error("unexpected key under the registry prefix")]
    UnknownKey,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    body: String,
    #[serde(default)]
    signature: Option<String>,
}

/// The canonical message for a body stored at `key`.
pub fn message(key: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 8 + key.len() + body.len());
    m.extend_from_slice(DOMAIN);
    for part in [key.as_bytes(), body] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(part);
    }
    m
}

/// The etcd value for `body` stored at `key`, signed by `admin`.
pub fn seal<T: Serialize>(
    admin: &AdminKey,
    key: &str,
    body: &T,
) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_string(body)?;
    let signature = admin.sign(&message(key, body.as_bytes()));
    serde_json::to_vec(&Envelope {
        body,
        signature: Some(BASE64.encode(signature.to_bytes())),
    })
}

/// The body of the value stored at `key`, if `admin` signed it for that key.
pub fn open<T: DeserializeOwned>(
    admin: &AdminPublicKey,
    key: &str,
    value: &[u8],
) -> Result<T, Rejection> {
    let env: Envelope = serde_json::from_slice(value).map_err(|e| {
        // A bare record (someone wrote the body without the envelope) is
        // the common forgery: name it as what it is.
        if serde_json::from_slice::<serde_json::Value>(value).is_ok_and(|v| v.is_object()) {
            Rejection::MissingSignature
        } else {
            Rejection::Malformed(e.to_string())
        }
    })?;
    let sig = env.signature.ok_or(Rejection::MissingSignature)?;
    if sig.is_empty() {
        return Err(Rejection::MissingSignature);
    }
    let bytes = BASE64
        .decode(sig)
        .map_err(|_| Rejection::BadSignatureEncoding)?;
    let arr: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Rejection::BadSignatureEncoding)?;
    if !admin.verifies(
        &message(key, env.body.as_bytes()),
        &Signature::from_bytes(&arr),
    ) {
        return Err(Rejection::BadSignature);
    }
    serde_json::from_str(&env.body).map_err(|e| Rejection::BadBody(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_is_length_prefixed_so_key_and_body_cannot_trade_bytes() {
        // Same concatenation, different split: different messages.
        assert_ne!(message("/a/b", b"c"), message("/a/", b"bc"));
        let m = message("/k", b"{}");
        assert_eq!(&m[..DOMAIN.len()], DOMAIN);
        assert_eq!(&m[DOMAIN.len()..DOMAIN.len() + 4], &[0, 0, 0, 2]);
    }

    #[test]
    fn sealed_records_open_only_with_the_right_key_and_path() {
        let admin = AdminKey::generate();
        let other = AdminKey::generate();
        let body = json!({"name": "a", "n": 1});
        let v = seal(&admin, "/m/devices/x", &body).expect("seal");
        let opened: serde_json::Value =
            open(&admin.public_key(), "/m/devices/x", &v).expect("open");
        assert_eq!(opened, body);
        // Another admin's key.
        assert_eq!(
            open::<serde_json::Value>(&other.public_key(), "/m/devices/x", &v),
            Err(Rejection::BadSignature)
        );
        // The same bytes moved to another key.
        assert_eq!(
            open::<serde_json::Value>(&admin.public_key(), "/m/devices/y", &v),
            Err(Rejection::BadSignature)
        );
        // Re-signed by someone else for the right path.
        let forged = seal(&other, "/m/devices/x", &body).expect("seal");
        assert_eq!(
            open::<serde_json::Value>(&admin.public_key(), "/m/devices/x", &forged),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn tampering_and_missing_signatures_are_named() {
        let admin = AdminKey::generate();
        let pk = admin.public_key();
        let v = seal(&admin, "/k", &json!({"ipv4": "100.64.0.1"})).expect("seal");
        let tampered = String::from_utf8(v.clone())
            .expect("utf8")
            .replace("100.64.0.1", "100.64.0.9");
        assert_eq!(
            open::<serde_json::Value>(&pk, "/k", tampered.as_bytes()),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            open::<serde_json::Value>(&pk, "/k", br#"{"ipv4": "100.64.0.1"}"#),
            Err(Rejection::MissingSignature)
        );
        assert_eq!(
            open::<serde_json::Value>(&pk, "/k", br#"{"body": "{}", "signature": ""}"#),
            Err(Rejection::MissingSignature)
        );
        assert_eq!(
            open::<serde_json::Value>(&pk, "/k", br#"{"body": "{}", "signature": "AAAA"}"#),
            Err(Rejection::BadSignatureEncoding)
        );
        assert!(matches!(
            open::<serde_json::Value>(&pk, "/k", b"not json"),
            Err(Rejection::Malformed(_))
        ));
        // Signed, but not the type the path says.
        let v = seal(&admin, "/k", &json!("a string")).expect("seal");
        assert!(matches!(
            open::<super::super::records::Settings>(&pk, "/k", &v),
            Err(Rejection::BadBody(_))
        ));
    }
}
