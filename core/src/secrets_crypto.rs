//! Encryption at rest of tenant secrets: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`)
//! with a random 24-byte nonce per value, and `"<tenant_id>/<name>"` as associated data so a
//! ciphertext moved to another row or tenant does not decrypt.
//!
//! Keys come from the API's configuration as `id:key` entries (32-byte keys, hex or base64)
//! plus the id of the active key. Every stored value records the id of the key that sealed
//! it: rotating means adding a new key, making it active, and keeping the old one configured
//! for as long as values sealed with it exist (re-putting a secret re-seals it with the
//! active key). The 192-bit random nonce makes nonce reuse negligible without a counter.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ids::TenantId;

/// Bytes of an XChaCha20-Poly1305 nonce.
pub const NONCE_BYTES: usize = 24;
/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
const MAX_KEY_ID_BYTES: usize = 64;

/// `[secrets]` of the API settings: `DROVER_SECRETS__KEYS="k1:<key>,k2:<key>"` and
/// `DROVER_SECRETS__ACTIVE_KEY_ID=k2`. Empty keys = secrets are disabled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SecretsSettings {
    /// Comma-separated `id:key` entries; each key is 32 bytes as 64 hex digits or base64.
    pub keys: SecretString,
    /// The key new values are sealed with. May be empty when exactly one key is configured.
    pub active_key_id: String,
}

/// The fixed key `drover dev` falls back to when none is configured. It is public, so values
/// sealed with it are not protected: development only.
const DEV_KEY_HEX: &str = "64726f7665722d6465762d6b65792d6e6f742d7365637265742d303030303030";

impl SecretsSettings {
    /// True when at least one key entry is given.
    pub fn is_configured(&self) -> bool {
        !self.keys.expose_secret().trim().is_empty()
    }

    /// The development settings: one public key with id `dev`. Never for real deployments.
    pub fn development() -> Self {
        Self {
            keys: SecretString::from(format!("dev:{DEV_KEY_HEX}")),
            active_key_id: "dev".to_owned(),
        }
    }
}

impl Default for SecretsSettings {
    fn default() -> Self {
        Self {
            keys: SecretString::from(String::new()),
            active_key_id: String::new(),
        }
    }
}

/// Why the key configuration is unusable. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    #[error("secrets key entry {index} must look like `id:key`")]
    Malformed { index: usize },
    #[error("secrets key id {id:?} must be 1..64 characters of [A-Za-z0-9._-]")]
    BadId { id: String },
    #[error("secrets key {id:?} must be 32 bytes as 64 hex digits or base64")]
    BadKey { id: String },
    #[error("secrets key id {id:?} is configured twice")]
    Duplicate { id: String },
    #[error("secrets.active_key_id {id:?} names no configured key")]
    UnknownActive { id: String },
    #[error("secrets.active_key_id must be set when several keys are configured")]
    NoActive,
}

/// Why sealing or opening failed. Never contains the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsCryptoError {
    #[error("no secrets key with id {0:?} is configured")]
    UnknownKey(String),
    #[error("stored nonce has {0} bytes, expected {NONCE_BYTES}")]
    BadNonce(usize),
    #[error("decryption failed: wrong key or tampered data")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
    #[error("decrypted value is not UTF-8")]
    NotUtf8,
}

/// A value as stored: which key sealed it, its nonce and the ciphertext with the tag.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_bytes", &self.ciphertext.len())
            .finish()
    }
}

/// The configured keys. Its `Debug` shows key ids only.
#[derive(Clone)]
pub struct SecretKeys {
    ciphers: BTreeMap<String, XChaCha20Poly1305>,
    active: String,
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys")
            .field("ids", &self.ciphers.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

fn decode_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    let text = text.trim();
    let bytes = if text.len() == 2 * KEY_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
            .ok()?
    };
    bytes.try_into().ok()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl SecretKeys {
    /// The keys of `settings`; `Ok(None)` when none are configured (secrets disabled).
    pub fn from_settings(settings: &SecretsSettings) -> Result<Option<Self>, KeyConfigError> {
        Self::parse(settings.keys.expose_secret(), &settings.active_key_id)
    }

    /// Parses `id:key[,id:key…]`; see [`SecretsSettings`].
    pub fn parse(entries: &str, active: &str) -> Result<Option<Self>, KeyConfigError> {
        let mut ciphers = BTreeMap::new();
        for (index, entry) in entries
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, key) = entry
                .split_once(':')
                .ok_or(KeyConfigError::Malformed { index })?;
            let id = id.trim();
            if !valid_id(id) {
                return Err(KeyConfigError::BadId { id: id.to_owned() });
            }
            let key =
                decode_key(key).ok_or_else(|| KeyConfigError::BadKey { id: id.to_owned() })?;
            let cipher = XChaCha20Poly1305::new(&key.into());
            if ciphers.insert(id.to_owned(), cipher).is_some() {
                return Err(KeyConfigError::Duplicate { id: id.to_owned() });
            }
        }
        if ciphers.is_empty() {
            return Ok(None);
        }
        let active = active.trim();
        let active = if active.is_empty() {
            if ciphers.len() > 1 {
                return Err(KeyConfigError::NoActive);
            }
            ciphers.keys().next().cloned().unwrap_or_default()
        } else if ciphers.contains_key(active) {
            active.to_owned()
        } else {
            return Err(KeyConfigError::UnknownActive {
                id: active.to_owned(),
            });
        };
        Ok(Some(Self { ciphers, active }))
    }

    /// The id new values are sealed with.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Seals `value` for `(tenant, name)` with the active key and a fresh random nonce.
    pub fn seal(
        &self,
        tenant: TenantId,
        name: &str,
        value: &[u8],
    ) -> Result<Sealed, SecretsCryptoError> {
        let cipher = self
            .ciphers
            .get(&self.active)
            .ok_or_else(|| SecretsCryptoError::UnknownKey(self.active.clone()))?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated_data(tenant, name);
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: value,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretsCryptoError::Encrypt)?;
        Ok(Sealed {
            key_id: self.active.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a value sealed for `(tenant, name)` with whichever configured key sealed it.
    pub fn open(
        &self,
        tenant: TenantId,
        name: &str,
        sealed: &Sealed,
    ) -> Result<String, SecretsCryptoError> {
        let cipher = self
            .ciphers
            .get(&sealed.key_id)
            .ok_or_else(|| SecretsCryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.nonce.len() != NONCE_BYTES {
            return Err(SecretsCryptoError::BadNonce(sealed.nonce.len()));
        }
        let aad = associated_data(tenant, name);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretsCryptoError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretsCryptoError::NotUtf8)
    }
}

fn associated_data(tenant: TenantId, name: &str) -> String {
    format!("{tenant}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const T1: TenantId = TenantId(Uuid::from_u128(1));
    const T2: TenantId = TenantId(Uuid::from_u128(2));

    fn b64_key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; KEY_BYTES])
    }

    fn keys(entries: &str, active: &str) -> SecretKeys {
        SecretKeys::parse(entries, active)
            .expect("valid config")
            .expect("keys configured")
    }

    #[test]
    fn round_trip_with_hex_and_base64_keys() {
        for entries in [format!("k1:{HEX_A}"), format!("k1:{}", b64_key(7))] {
            let k = keys(&entries, "");
            let sealed = k.seal(T1, "API_KEY", b"sk-live-0123456789").unwrap();
            assert_eq!(sealed.key_id, "k1");
            assert_eq!(sealed.nonce.len(), NONCE_BYTES);
            assert!(
                !sealed.ciphertext.windows(8).any(|w| w == b"sk-live-"),
                "ciphertext must not contain the plaintext"
            );
            assert_eq!(
                k.open(T1, "API_KEY", &sealed).unwrap(),
                "sk-live-0123456789"
            );
        }
    }

    #[test]
    fn nonces_are_fresh_per_value() {
        let k = keys(&format!("k1:{HEX_A}"), "k1");
        let a = k.seal(T1, "X", b"same value").unwrap();
        let b = k.seal(T1, "X", b"same value").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn unknown_key_id_is_an_error() {
        let k = keys(&format!("k1:{HEX_A}"), "k1");
        let mut sealed = k.seal(T1, "X", b"value-123").unwrap();
        sealed.key_id = "gone".into();
        assert_eq!(
            k.open(T1, "X", &sealed),
            Err(SecretsCryptoError::UnknownKey("gone".into()))
        );
    }

    #[test]
    fn a_different_key_under_the_same_id_fails() {
        let a = keys(&format!("k1:{}", b64_key(1)), "");
        let b = keys(&format!("k1:{}", b64_key(2)), "");
        let sealed = a.seal(T1, "X", b"value-123").unwrap();
        assert_eq!(b.open(T1, "X", &sealed), Err(SecretsCryptoError::Decrypt));
    }

    #[test]
    fn tampering_is_detected() {
        let k = keys(&format!("k1:{HEX_A}"), "");
        let sealed = k.seal(T1, "X", b"value-123").unwrap();

        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert_eq!(k.open(T1, "X", &flipped), Err(SecretsCryptoError::Decrypt));

        let mut nonce = sealed.clone();
        nonce.nonce[3] ^= 0x80;
        assert_eq!(k.open(T1, "X", &nonce), Err(SecretsCryptoError::Decrypt));

        let mut short = sealed.clone();
        short.nonce.pop();
        assert_eq!(
            k.open(T1, "X", &short),
            Err(SecretsCryptoError::BadNonce(23))
        );

        // Moved to another name or tenant: the associated data no longer matches.
        assert_eq!(k.open(T1, "Y", &sealed), Err(SecretsCryptoError::Decrypt));
        assert_eq!(k.open(T2, "X", &sealed), Err(SecretsCryptoError::Decrypt));
    }

    #[test]
    fn rotation_old_keys_open_the_active_key_seals() {
        let old = keys(&format!("k1:{}", b64_key(1)), "");
        let sealed_old = old.seal(T1, "X", b"old-value-1").unwrap();
        let rotated = keys(&format!("k1:{}, k2:{}", b64_key(1), b64_key(2)), "k2");
        assert_eq!(rotated.active_id(), "k2");
        assert_eq!(rotated.open(T1, "X", &sealed_old).unwrap(), "old-value-1");
        let sealed_new = rotated.seal(T1, "X", b"new-value-2").unwrap();
        assert_eq!(sealed_new.key_id, "k2");
        assert_eq!(rotated.open(T1, "X", &sealed_new).unwrap(), "new-value-2");
        // The old configuration cannot read what the new key sealed.
        assert_eq!(
            old.open(T1, "X", &sealed_new),
            Err(SecretsCryptoError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn the_development_key_parses() {
        let dev = SecretsSettings::development();
        assert!(dev.is_configured());
        assert!(!SecretsSettings::default().is_configured());
        let k = SecretKeys::from_settings(&dev).unwrap().unwrap();
        assert_eq!(k.active_id(), "dev");
    }

    #[test]
    fn configuration_errors() {
        assert_eq!(SecretKeys::parse("", "").unwrap().map(|_| ()), None);
        assert_eq!(SecretKeys::parse(" , ", "").unwrap().map(|_| ()), None);
        assert_eq!(
            SecretKeys::parse("nokey", "").unwrap_err(),
            KeyConfigError::Malformed { index: 0 }
        );
        assert!(matches!(
            SecretKeys::parse("bad id:00", "").unwrap_err(),
            KeyConfigError::BadId { .. }
        ));
        assert!(matches!(
            SecretKeys::parse("k1:abcd", "").unwrap_err(),
            KeyConfigError::BadKey { .. }
        ));
        let two = format!("k1:{HEX_A},k2:{HEX_A}");
        assert_eq!(
            SecretKeys::parse(&two, "").unwrap_err(),
            KeyConfigError::NoActive
        );
        assert!(matches!(
            SecretKeys::parse(&two, "k3").unwrap_err(),
            KeyConfigError::UnknownActive { .. }
        ));
        assert!(matches!(
            SecretKeys::parse(&format!("k1:{HEX_A},k1:{HEX_A}"), "k1").unwrap_err(),
            KeyConfigError::Duplicate { .. }
        ));
        let k = keys(&two, "k2");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(HEX_A) && dbg.contains("k2"), "{dbg}");
    }
}
