//! The keys of a backup target and what they seal. One master key (a
//! 32-byte key file, or a passphrase through Argon2id with the target's
//! salt) gives three keys by HMAC-SHA256 with fixed labels: the chunk-id
//! key (a chunk is named by the HMAC of its plain bytes, so equal data
//! deduplicates and names reveal nothing without the key), the data key
//! (AES-256-GCM over the lz4-compressed chunk, its id as associated data,
//! so a body cannot be swapped under another name), and the check key (a
//! known value in the target's config tells a wrong secret from damage).

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::volume::crypt::{KdfParams, NONCE_BYTES, SALT_BYTES};

/// Bytes of a key file's key (raw, or 64 hex digits).
pub const KEY_BYTES: usize = 32;
/// Starts every sealed chunk: format 1.
const CHUNK_MAGIC: &[u8; 4] = b"BBC1";
const TAG_BYTES: usize = 16;

/// What opens a target: a passphrase or a 32-byte key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    Passphrase(Zeroizing<String>),
    Key(Zeroizing<String>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Passphrase(_) => "Secret::Passphrase(..)",
            Self::Key(_) => "Secret::Key(..)",
        })
    }
}

impl Secret {
    /// A key file's content: 32 raw bytes or 64 hex digits (a newline allowed).
    pub fn from_key_file(bytes: &[u8]) -> Result<Self, CryptoError> {
        let text = String::from_utf8_lossy(bytes);
        let hex = text.trim();
        if hex.len() == 2 * KEY_BYTES && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Key(Zeroizing::new(hex.to_ascii_lowercase())));
        }
        if bytes.len() == KEY_BYTES {
            return Ok(Self::Key(Zeroizing::new(to_hex(bytes))));
        }
        Err(CryptoError::BadKeyFile(bytes.len()))
    }

    fn kind(&self) -> SecretKind {
        match self {
            Self::Passphrase(_) => SecretKind::Passphrase,
            Self::Key(_) => SecretKind::Key,
        }
    }
}

/// How a target's master key is made (kept in its config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    Passphrase,
    Key,
}

/// The key-derivation record of a target's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kind: SecretKind,
    /// Argon2id's salt (hex), for a passphrase.
    pub salt: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// HMAC of a fixed label under the check key (hex).
    pub check: String,
}

#[derive(Debug, Error)]
pub enum CryptoError {
    #[error("a key file holds 32 bytes, raw or as 64 hex digits; this one holds {0} bytes")]
    BadKeyFile(usize),
    #[error("this target is opened with a {wanted:?}, not a {given:?} (see its config)")]
    WrongKind { wanted: SecretKind, given: SecretKind },
    #[error("wrong passphrase or key for this backup target")]
    WrongSecret,
    #[error("cannot derive the key: {0}")]
    Kdf(String),
    #[error("chunk {id} is damaged: {why}")]
    Damaged { id: String, why: String },
}

type HmacSha256 = Hmac<Sha256>;

/// The keys of one target, derived from its secret.
pub struct Keys {
    id: Zeroizing<[u8; 32]>,
    data: Aes256Gcm,
    manifest: Zeroizing<[u8; 32]>,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[must_use]
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Keys {
    /// A new target's key record for `secret` (a fresh salt), and its keys.
    pub fn create(secret: &Secret, params: KdfParams) -> Result<(KeyRecord, Self), CryptoError> {
        let mut salt = [0u8; SALT_BYTES];
        OsRng.fill_bytes(&mut salt);
        let mut record = KeyRecord {
            kind: secret.kind(),
            salt: to_hex(&salt),
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
            check: String::new(),
        };
        let (keys, check) = Self::derive(secret, &record)?;
        record.check = check;
        Ok((record, keys))
    }

    /// The keys of the target whose config holds `record`; Err if `secret` is not its secret.
    pub fn open(secret: &Secret, record: &KeyRecord) -> Result<Self, CryptoError> {
        if secret.kind() != record.kind {
            return Err(CryptoError::WrongKind {
                wanted: record.kind,
                given: secret.kind(),
            });
        }
        let (keys, check) = Self::derive(secret, record)?;
        if check != record.check {
            return Err(CryptoError::WrongSecret);
        }
        Ok(keys)
    }

    fn derive(secret: &Secret, record: &KeyRecord) -> Result<(Self, String), CryptoError> {
        let master: Zeroizing<Vec<u8>> = match secret {
            Secret::Key(hex) => Zeroizing::new(from_hex(hex).ok_or(CryptoError::BadKeyFile(hex.len()))?),
            Secret::Passphrase(passphrase) => {
                let salt = from_hex(&record.salt).ok_or_else(|| CryptoError::Kdf("salt is not hex".into()))?;
                let params = KdfParams {
                    memory_kib: record.memory_kib,
                    iterations: record.iterations,
                    parallelism: record.parallelism,
                };
                let key = crate::volume::crypt::derive_kek(passphrase.as_bytes(), &salt, params)
                    .map_err(|error| CryptoError::Kdf(error.to_string()))?;
                Zeroizing::new(key.to_vec())
            }
        };
        let id = Zeroizing::new(hmac(&master, &[b"ballast backup chunk id v1"]));
        let data = Zeroizing::new(hmac(&master, &[b"ballast backup data v1"]));
        let manifest = Zeroizing::new(hmac(&master, &[b"ballast backup manifest v1"]));
        let check = to_hex(&hmac(&master, &[b"ballast backup key check v1"]));
        let keys = Self {
            id,
            data: Aes256Gcm::new_from_slice(&data[..]).expect("a 32-byte key"),
            manifest,
        };
        Ok((keys, check))
    }

    /// The name of a chunk holding `plain`.
    #[must_use]
    pub fn chunk_id(&self, plain: &[u8]) -> String {
        to_hex(&hmac(&self.id[..], &[plain]))
    }

    /// MAC of a manifest's bytes (hex).
    #[must_use]
    pub fn manifest_mac(&self, bytes: &[u8]) -> String {
        to_hex(&hmac(&self.manifest[..], &[bytes]))
    }

    /// `plain` compressed and sealed, for the chunk named `id`.
    #[must_use]
    pub fn seal(&self, id: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let mut body = lz4_flex::compress_prepend_size(plain);
        let tag = self
            .data
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), id.as_bytes(), &mut body)
            .expect("AES-GCM seals any length this small");
        let mut out = Vec::with_capacity(CHUNK_MAGIC.len() + NONCE_BYTES + body.len() + TAG_BYTES);
        out.extend_from_slice(CHUNK_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        out
    }

    /// The plain bytes of sealed chunk `id`, checked against its name.
    pub fn open_chunk(&self, id: &str, sealed: &[u8], plain_max: usize) -> Result<Vec<u8>, CryptoError> {
        let damaged = |why: &str| CryptoError::Damaged {
            id: id.to_owned(),
            why: why.to_owned(),
        };
        let header = CHUNK_MAGIC.len() + NONCE_BYTES;
        if sealed.len() < header + TAG_BYTES || &sealed[..CHUNK_MAGIC.len()] != CHUNK_MAGIC {
            return Err(damaged("not a sealed chunk (bad header or too short)"));
        }
        let nonce = Nonce::from_slice(&sealed[CHUNK_MAGIC.len()..header]);
        let (body, tag) = sealed[header..].split_at(sealed.len() - header - TAG_BYTES);
        let mut body = body.to_vec();
        self.data
            .decrypt_in_place_detached(nonce, id.as_bytes(), &mut body, tag.into())
            .map_err(|_| damaged("its authentication tag does not match (altered or truncated)"))?;
        if body.len() >= 4 {
            let size = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
            if size > plain_max {
                return Err(damaged(&format!("it claims {size} bytes, more than a chunk holds")));
            }
        }
        let plain = lz4_flex::decompress_size_prepended(&body).map_err(|error| damaged(&format!("lz4: {error}")))?;
        if self.chunk_id(&plain) != id {
            return Err(damaged("its content does not match its name"));
        }
        Ok(plain)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Cheap Argon2id for tests.
    pub(crate) const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    fn passphrase(text: &str) -> Secret {
        Secret::Passphrase(Zeroizing::new(text.to_owned()))
    }

    #[test]
    fn a_chunk_round_trips_and_its_name_depends_on_the_key() {
        let (record, keys) = Keys::create(&passphrase("correct horse"), CHEAP).unwrap();
        let plain: Vec<u8> = (0..262_144u32).map(|i| (i / 100).to_le_bytes()[0]).collect();
        let id = keys.chunk_id(&plain);
        let sealed = keys.seal(&id, &plain);
        assert!(sealed.len() < plain.len() / 4, "compressed: {}", sealed.len());
        assert_eq!(keys.open_chunk(&id, &sealed, plain.len()).unwrap(), plain);
        let again = Keys::open(&passphrase("correct horse"), &record).unwrap();
        assert_eq!(again.chunk_id(&plain), id, "the same secret names chunks alike");
        let (_, other) = Keys::create(&passphrase("correct horse"), CHEAP).unwrap();
        assert_ne!(other.chunk_id(&plain), id, "another target's salt names them otherwise");
    }

    #[test]
    fn a_wrong_secret_or_kind_is_told_from_damage() {
        let (record, _) = Keys::create(&passphrase("correct horse"), CHEAP).unwrap();
        assert!(matches!(
            Keys::open(&passphrase("wrong horse"), &record),
            Err(CryptoError::WrongSecret)
        ));
        let key = Secret::from_key_file(&[7u8; 32]).unwrap();
        assert!(matches!(Keys::open(&key, &record), Err(CryptoError::WrongKind { .. })));
        let (key_record, _) = Keys::create(&key, CHEAP).unwrap();
        let hex = Secret::from_key_file(format!("{}\n", "07".repeat(32)).as_bytes()).unwrap();
        assert!(Keys::open(&hex, &key_record).is_ok(), "hex and raw are the same key");
        assert!(Secret::from_key_file(b"short").is_err());
    }

    #[test]
    fn an_altered_or_swapped_chunk_is_refused() {
        let (_, keys) = Keys::create(&passphrase("correct horse"), CHEAP).unwrap();
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let (id_a, id_b) = (keys.chunk_id(&a), keys.chunk_id(&b));
        let sealed_a = keys.seal(&id_a, &a);
        let mut flipped = sealed_a.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            keys.open_chunk(&id_a, &flipped, 4096),
            Err(CryptoError::Damaged { .. })
        ));
        assert!(
            keys.open_chunk(&id_b, &sealed_a, 4096).is_err(),
            "a body under another chunk's name"
        );
        assert!(keys.open_chunk(&id_a, &sealed_a[..10], 4096).is_err());
        assert!(keys.open_chunk(&id_a, &sealed_a, 100).is_err(), "larger than a chunk");
    }
}
