//! Encryption at rest of a volume's data: keys, key wrapping and the block
//! cipher. Pure functions over byte slices, no I/O.
//!
//! Data: each 4096-byte block is one AES-XTS-256 data unit (IEEE 1619) whose
//! tweak is the block's LBA as a 128-bit little-endian number, so equal
//! blocks encrypt differently at every address and a block is rewritten in
//! place without touching its neighbours. XTS hides contents but does not
//! authenticate them: the store's checksums catch corruption, not forgery.
//! A block of all zero bytes on disk reads back as zeros (unwritten and
//! trimmed regions), which shows which blocks hold data, as dm-crypt with
//! discards does.
//!
//! Keys: a volume's 64-byte data key ([`VolumeKey`]) is never stored in the
//! clear. A [`WrappedKey`] keeps it sealed by AES-256-GCM under the cluster's
//! key-encryption key ([`ClusterKey`]) or under a key that Argon2id derives
//! from a passphrase. The caller's `context` (the volume's identity) is the
//! GCM associated data, so a wrapped key opens only for its own volume.
//! Secret bytes are zeroized on drop and never printed.

use std::fmt;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// One encryption data unit: a volume block.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES as u64 == super::io::BLOCK_BYTES);

/// Two AES-256 keys: XTS's data key, then its tweak key.
pub const VOLUME_KEY_BYTES: usize = 64;
/// The cluster's AES-256-GCM key-encryption key.
pub const CLUSTER_KEY_BYTES: usize = 32;
pub const PASSPHRASE_BYTES_MIN: usize = 8;
pub const PASSPHRASE_BYTES_MAX: usize = 1024;
pub const SALT_BYTES: usize = 16;
pub const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
const WRAPPED_BYTES: usize = VOLUME_KEY_BYTES + TAG_BYTES;
/// Prefixed to the caller's context in the GCM associated data, so these
/// wraps can never be confused with anything else the cluster key seals.
const AAD_DOMAIN: &[u8] = b"ballast volume key v1\0";

/// Argon2id cost of a passphrase-derived key-encryption key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// What new passphrase wraps use: 64 MiB, 3 passes, 1 lane.
pub const KDF_PARAMS_DEFAULT: KdfParams = KdfParams {
    memory_kib: 64 * 1024,
    iterations: 3,
    parallelism: 1,
};
/// Bounds on parameters read from a key record, so an altered record cannot
/// make an unlock allocate or compute without limit.
pub const KDF_MEMORY_KIB_MAX: u32 = 1024 * 1024;
pub const KDF_ITERATIONS_MAX: u32 = 64;
pub const KDF_PARALLELISM_MAX: u32 = 16;

/// Errors of key wrapping and unwrapping.
#[derive(Debug, Error)]
pub enum CryptError {
    /// GCM rejected the passphrase-derived key.
    #[error("wrong passphrase for this volume's key")]
    WrongPassphrase,
    /// GCM rejected the cluster key, or the record or its context changed.
    #[error("the cluster key does not open this volume's key (wrong cluster key or the key record was altered)")]
    WrongClusterKey,
    /// `unwrap_cluster` on a passphrase-wrapped key.
    #[error("this volume's key is wrapped by a passphrase; unlock it with `ballast volume unlock NAME --passphrase-file FILE`")]
    NeedsPassphrase,
    /// `unwrap_passphrase` on a cluster-wrapped key.
    #[error("this volume's key is wrapped by the cluster key, not a passphrase")]
    NotPassphrase,
    /// The passphrase's length is outside the limits.
    #[error("passphrase must be 8 to 1024 bytes")]
    BadPassphrase,
    /// Argon2 refused its parameters, or they are outside the limits.
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// A volume's data key. Zeroized on drop; never printed or serialized.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct VolumeKey([u8; VOLUME_KEY_BYTES]);

impl VolumeKey {
    pub fn generate() -> Self {
        let mut key = VolumeKey([0; VOLUME_KEY_BYTES]);
        OsRng.fill_bytes(&mut key.0);
        key
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(..)")
    }
}

/// The cluster's key-encryption key, kept in the replicated cluster state.
/// Zeroized on drop; serialized as a hex string; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClusterKey([u8; CLUSTER_KEY_BYTES]);

impl ClusterKey {
    pub fn generate() -> Self {
        let mut key = ClusterKey([0; CLUSTER_KEY_BYTES]);
        OsRng.fill_bytes(&mut key.0);
        key
    }

    /// `plain` sealed under this key (AES-256-GCM, a random nonce first),
    /// bound to `domain` (what it is, so one sealed thing cannot pass for another).
    #[must_use]
    pub fn seal_bytes(&self, domain: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0; NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let mut buffer = Zeroizing::new(Vec::with_capacity(plain.len() + TAG_BYTES));
        buffer.extend_from_slice(plain);
        Aes256Gcm::new((&self.0).into())
            .encrypt_in_place(Nonce::from_slice(&nonce), domain, &mut *buffer)
            .expect("AES-GCM seals into a buffer with room for the tag");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buffer);
        out
    }

    /// What `seal_bytes(domain, ..)` sealed; Err if altered, or sealed under another key or domain.
    pub fn open_bytes(&self, domain: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(CryptError::WrongClusterKey);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let mut buffer = Zeroizing::new(body.to_vec());
        Aes256Gcm::new((&self.0).into())
            .decrypt_in_place(Nonce::from_slice(nonce), domain, &mut *buffer)
            .map_err(|_| CryptError::WrongClusterKey)?;
        Ok(buffer)
    }
}

impl PartialEq for ClusterKey {
    /// Without an early exit, so a comparison does not time the secret.
    fn eq(&self, other: &Self) -> bool {
        let diff = (self.0.iter().zip(&other.0)).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}
impl Eq for ClusterKey {}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl Serialize for ClusterKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(hex::encode(&self.0));
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for ClusterKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        let mut key = ClusterKey([0; CLUSTER_KEY_BYTES]);
        // The message never quotes the text: it may be most of a key.
        hex::decode_into(&text, &mut key.0)
            .map_err(|()| serde::de::Error::custom("a cluster key is 64 hexadecimal characters"))?;
        Ok(key)
    }
}

/// A volume key as kept at rest: sealed, never in the clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub scheme: WrapScheme,
    #[serde(with = "hex::serde_bytes")]
    pub nonce: [u8; NONCE_BYTES],
    /// AES-256-GCM of the 64-byte volume key, tag included.
    #[serde(with = "hex::serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// Which key-encryption key seals a [`WrappedKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WrapScheme {
    Cluster,
    Passphrase {
        #[serde(with = "hex::serde_bytes")]
        salt: Vec<u8>,
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    },
}

impl WrappedKey {
    /// Seals `key` under the cluster key, bound to `context`.
    pub fn with_cluster_key(key: &VolumeKey, cluster: &ClusterKey, context: &[u8]) -> Result<Self, CryptError> {
        Ok(seal(key, &cluster.0, context, WrapScheme::Cluster))
    }

    /// Seals `key` under a key derived from `passphrase` with the default
    /// Argon2id cost, bound to `context`.
    pub fn with_passphrase(key: &VolumeKey, passphrase: &[u8], context: &[u8]) -> Result<Self, CryptError> {
        Self::with_passphrase_params(key, passphrase, context, KDF_PARAMS_DEFAULT)
    }

    /// As [`Self::with_passphrase`] with a chosen cost (tests use a cheap one).
    pub(crate) fn with_passphrase_params(
        key: &VolumeKey,
        passphrase: &[u8],
        context: &[u8],
        params: KdfParams,
    ) -> Result<Self, CryptError> {
        let mut salt = vec![0; SALT_BYTES];
        OsRng.fill_bytes(&mut salt);
        let kek = derive_kek(passphrase, &salt, params)?;
        let scheme = WrapScheme::Passphrase {
            salt,
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
        };
        Ok(seal(key, &kek, context, scheme))
    }

    pub fn unwrap_cluster(&self, cluster: &ClusterKey, context: &[u8]) -> Result<VolumeKey, CryptError> {
        match self.scheme {
            WrapScheme::Cluster => open(self, &cluster.0, context, CryptError::WrongClusterKey),
            WrapScheme::Passphrase { .. } => Err(CryptError::NeedsPassphrase),
        }
    }

    pub fn unwrap_passphrase(&self, passphrase: &[u8], context: &[u8]) -> Result<VolumeKey, CryptError> {
        let WrapScheme::Passphrase {
            salt,
            memory_kib,
            iterations,
            parallelism,
        } = &self.scheme
        else {
            return Err(CryptError::NotPassphrase);
        };
        let params = KdfParams {
            memory_kib: *memory_kib,
            iterations: *iterations,
            parallelism: *parallelism,
        };
        let kek = derive_kek(passphrase, salt, params)?;
        open(self, &kek, context, CryptError::WrongPassphrase)
    }

    pub fn needs_passphrase(&self) -> bool {
        matches!(self.scheme, WrapScheme::Passphrase { .. })
    }
}

fn associated_data(context: &[u8]) -> Vec<u8> {
    [AAD_DOMAIN, context].concat()
}

fn seal(key: &VolumeKey, kek: &[u8; CLUSTER_KEY_BYTES], context: &[u8], scheme: WrapScheme) -> WrappedKey {
    let mut nonce = [0; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    // Room for the tag up front: a reallocation would leave a copy of the
    // key in freed memory.
    let mut buffer = Zeroizing::new(Vec::with_capacity(WRAPPED_BYTES));
    buffer.extend_from_slice(&key.0);
    let gcm = Aes256Gcm::new(kek.into());
    gcm.encrypt_in_place(Nonce::from_slice(&nonce), &associated_data(context), &mut *buffer)
        .expect("AES-GCM seals 64 bytes into a buffer with room for the tag");
    assert_eq!(buffer.len(), WRAPPED_BYTES);
    WrappedKey {
        scheme,
        nonce,
        ciphertext: buffer.to_vec(),
    }
}

fn open(
    wrapped: &WrappedKey,
    kek: &[u8; CLUSTER_KEY_BYTES],
    context: &[u8],
    rejected: CryptError,
) -> Result<VolumeKey, CryptError> {
    if wrapped.ciphertext.len() != WRAPPED_BYTES {
        return Err(rejected);
    }
    let mut buffer = Zeroizing::new(wrapped.ciphertext.clone());
    let gcm = Aes256Gcm::new(kek.into());
    let nonce = Nonce::from_slice(&wrapped.nonce);
    if gcm
        .decrypt_in_place(nonce, &associated_data(context), &mut *buffer)
        .is_err()
    {
        return Err(rejected);
    }
    assert_eq!(buffer.len(), VOLUME_KEY_BYTES);
    let mut key = VolumeKey([0; VOLUME_KEY_BYTES]);
    key.0.copy_from_slice(&buffer);
    Ok(key)
}

/// Argon2id of `passphrase`; checks every input against the limits first.
pub(crate) fn derive_kek(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; CLUSTER_KEY_BYTES]>, CryptError> {
    if !(PASSPHRASE_BYTES_MIN..=PASSPHRASE_BYTES_MAX).contains(&passphrase.len()) {
        return Err(CryptError::BadPassphrase);
    }
    if salt.len() != SALT_BYTES
        || params.memory_kib > KDF_MEMORY_KIB_MAX
        || params.iterations > KDF_ITERATIONS_MAX
        || params.parallelism > KDF_PARALLELISM_MAX
    {
        return Err(CryptError::Kdf(format!(
            "parameters out of bounds: {params:?}, salt of {} bytes",
            salt.len()
        )));
    }
    let argon_params = Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(CLUSTER_KEY_BYTES),
    )
    .map_err(|e| CryptError::Kdf(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let mut kek = Zeroizing::new([0; CLUSTER_KEY_BYTES]);
    argon
        .hash_password_into(passphrase, salt, &mut *kek)
        .map_err(|e| CryptError::Kdf(e.to_string()))?;
    Ok(kek)
}

/// Encrypts and decrypts whole volume blocks in place.
pub struct VolumeCipher {
    data: Aes256,
    tweak: Aes256,
}

/// AES blocks (16 bytes) in one data unit.
const AES_BLOCKS: usize = BLOCK_BYTES / 16;

impl VolumeCipher {
    pub fn new(key: &VolumeKey) -> Self {
        let (data_key, tweak_key) = key.0.split_at(VOLUME_KEY_BYTES / 2);
        // IEEE 1619 requires distinct halves; random keys never collide.
        assert!(data_key != tweak_key, "XTS key halves are equal");
        VolumeCipher {
            data: Aes256::new_from_slice(data_key).expect("32-byte AES-256 key"),
            tweak: Aes256::new_from_slice(tweak_key).expect("32-byte AES-256 key"),
        }
    }

    /// `data.len()` is a multiple of [`BLOCK_BYTES`]; block `i` of `data` is
    /// volume block `first_lba + i`.
    pub fn encrypt_blocks(&self, first_lba: u64, data: &mut [u8]) {
        for (lba, block) in blocks(first_lba, data) {
            self.xts(lba, block, true);
            debug_assert!(!is_zero(block), "ciphertext collides with the unwritten marker");
        }
    }

    /// Inverse of [`Self::encrypt_blocks`], except that an all-zero block
    /// stays zeros: unwritten and trimmed regions read back as zeros (a real
    /// ciphertext block is all zero with probability 2^-32768).
    pub fn decrypt_blocks(&self, first_lba: u64, data: &mut [u8]) {
        for (lba, block) in blocks(first_lba, data) {
            if !is_zero(block) {
                self.xts(lba, block, false);
            }
        }
    }

    /// XTS-AES (IEEE 1619) of one data unit: every 16-byte block is
    /// XORed with its tweak, run through AES, XORed again. The 256 blocks
    /// go through AES in one call, so AES-NI pipelines them (8 at a time);
    /// a block at a time runs several times slower.
    fn xts(&self, lba: u64, unit: &mut [u8], encrypt: bool) {
        let mut first = aes::Block::from(u128::from(lba).to_le_bytes());
        self.tweak.encrypt_block(&mut first);
        let mut tweak = u128::from_le_bytes(first.into());
        let mut tweaks = [0u128; AES_BLOCKS];
        let mut blocks = [aes::Block::default(); AES_BLOCKS];
        for ((slot, block), bytes) in tweaks.iter_mut().zip(&mut blocks).zip(unit.chunks_exact(16)) {
            *slot = tweak;
            let word = u128::from_le_bytes(bytes.try_into().expect("16 bytes")) ^ tweak;
            *block = aes::Block::from(word.to_le_bytes());
            // The next tweak: times x in GF(2^128), little-endian (IEEE 1619 5.2).
            tweak = (tweak << 1) ^ ((tweak >> 127) * 0x87);
        }
        if encrypt {
            self.data.encrypt_blocks(&mut blocks);
        } else {
            self.data.decrypt_blocks(&mut blocks);
        }
        for ((slot, block), bytes) in tweaks.iter().zip(&blocks).zip(unit.chunks_exact_mut(16)) {
            let word = u128::from_le_bytes((*block).into()) ^ slot;
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        // The tweaks are AES of the LBA under the tweak key: not left on the stack.
        tweaks.zeroize();
    }
}

impl fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeCipher(..)")
    }
}

/// Each block of `data` with its LBA. Safety over speed: `assert!`, since a
/// tail left out would reach the disk in the clear.
fn blocks(first_lba: u64, data: &mut [u8]) -> impl Iterator<Item = (u64, &mut [u8])> {
    assert_eq!(data.len() % BLOCK_BYTES, 0, "not whole blocks");
    let block_count = (data.len() / BLOCK_BYTES) as u64;
    assert!(first_lba.checked_add(block_count).is_some(), "LBA overflow");
    (first_lba..).zip(data.chunks_exact_mut(BLOCK_BYTES))
}

fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&byte| byte == 0)
}

/// Lower-case hexadecimal, for keys and ciphertext in the JSON state.
mod hex {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    pub fn encode(bytes: &[u8]) -> String {
        let mut text = String::with_capacity(bytes.len() * 2);
        for byte in bytes {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
        text
    }

    /// Fills `out` from exactly `2 * out.len()` hex digits.
    pub fn decode_into(text: &str, out: &mut [u8]) -> Result<(), ()> {
        if text.len() != out.len() * 2 {
            return Err(());
        }
        for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Ok(())
    }

    fn digit(c: u8) -> Result<u8, ()> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(()),
        }
    }

    /// `#[serde(with)]` for non-secret byte strings (`Vec<u8>`, `[u8; N]`).
    pub mod serde_bytes {
        use serde::{de::Error, Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(bytes: &impl AsRef<[u8]>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&super::encode(bytes.as_ref()))
        }

        pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
        where
            D: Deserializer<'de>,
            T: TryFrom<Vec<u8>>,
        {
            let text = String::deserialize(d)?;
            let mut bytes = vec![0; text.len() / 2];
            super::decode_into(&text, &mut bytes).map_err(|()| D::Error::custom("bad hex"))?;
            T::try_from(bytes).map_err(|_| D::Error::custom("wrong length"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Cheap enough that tests run in milliseconds; never for real keys.
    const KDF_PARAMS_TEST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    const CONTEXT: &[u8] = b"volume vol-a 7d3c";

    fn key_from(bytes: &[u8]) -> VolumeKey {
        let mut key = VolumeKey([0; VOLUME_KEY_BYTES]);
        key.0.copy_from_slice(bytes);
        key
    }

    fn unhex(text: &str) -> Vec<u8> {
        let mut bytes = vec![0; text.len() / 2];
        hex::decode_into(text, &mut bytes).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn encrypt_then_decrypt_round_trips_random_blocks(
            (first_lba, data) in (0u64..1 << 40, 1usize..=8).prop_flat_map(|(lba, count)| {
                (Just(lba), prop::collection::vec(any::<u8>(), count * BLOCK_BYTES))
            }),
        ) {
            let cipher = VolumeCipher::new(&VolumeKey::generate());
            let mut buffer = data.clone();
            cipher.encrypt_blocks(first_lba, &mut buffer);
            prop_assert_ne!(&buffer, &data);
            cipher.decrypt_blocks(first_lba, &mut buffer);
            prop_assert_eq!(buffer, data);
        }
    }

    #[test]
    fn ciphertext_differs_from_plaintext_and_by_lba() {
        let cipher = VolumeCipher::new(&VolumeKey::generate());
        let plain = vec![0x5a; BLOCK_BYTES];
        let mut at_7 = plain.clone();
        let mut at_8 = plain.clone();
        cipher.encrypt_blocks(7, &mut at_7);
        cipher.encrypt_blocks(8, &mut at_8);
        assert_ne!(at_7, plain);
        assert_ne!(at_7, at_8);
        // Two blocks in one call get the same tweaks as one call each.
        let mut both = [plain.clone(), plain].concat();
        cipher.encrypt_blocks(7, &mut both);
        assert_eq!(both, [at_7, at_8].concat());
    }

    #[test]
    fn zero_ciphertext_reads_as_zeros_but_zero_plaintext_encrypts_to_nonzero() {
        let cipher = VolumeCipher::new(&VolumeKey::generate());
        let mut data = vec![0; 3 * BLOCK_BYTES];
        cipher.encrypt_blocks(100, &mut data[BLOCK_BYTES..2 * BLOCK_BYTES]);
        assert!(!is_zero(&data[BLOCK_BYTES..2 * BLOCK_BYTES]));
        cipher.decrypt_blocks(99, &mut data);
        assert!(
            is_zero(&data),
            "unwritten blocks and the encrypted zero block read as zeros"
        );
    }

    #[test]
    #[should_panic(expected = "not whole blocks")]
    fn partial_block_is_refused() {
        let cipher = VolumeCipher::new(&VolumeKey::generate());
        cipher.encrypt_blocks(0, &mut [1; BLOCK_BYTES + 512]);
    }

    /// IEEE 1619-2007 Vector 10 (XTS-AES-256, data unit 0xff, 512 bytes).
    /// XTS has no chaining between 16-byte blocks, so the first 512 bytes of
    /// a 4096-byte unit at LBA 0xff must equal the vector's ciphertext: this
    /// checks the key split, the tweak's encoding and the mode.
    #[test]
    fn xts_aes_256_matches_ieee_1619_vector_10() {
        let key = key_from(&unhex(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592",
        )));
        let expected = unhex(concat!(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
            "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
            "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
            "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
            "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
            "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
            "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
            "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
            "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
            "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
            "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
            "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
            "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
            "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
            "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        ));
        let plain: Vec<u8> = (0..BLOCK_BYTES).map(|i| u8::try_from(i % 256).unwrap()).collect();
        let mut data = plain.clone();
        let cipher = VolumeCipher::new(&key);
        cipher.encrypt_blocks(0xff, &mut data);
        assert_eq!(&data[..512], expected.as_slice());
        cipher.decrypt_blocks(0xff, &mut data);
        assert_eq!(data, plain);
    }

    proptest::proptest! {
        /// The same bytes as the xts-mode crate's XTS over whole 4 KiB sectors.
        #[test]
        fn matches_the_xts_mode_crate(lba in proptest::prelude::any::<u64>(), seed in proptest::prelude::any::<u64>()) {
            use rand::{RngCore, SeedableRng};
            let key = VolumeKey::generate();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut ours = vec![0u8; BLOCK_BYTES];
            rng.fill_bytes(&mut ours);
            let mut theirs = ours.clone();
            let (data_key, tweak_key) = key.0.split_at(VOLUME_KEY_BYTES / 2);
            let reference = xts_mode::Xts128::new(
                Aes256::new_from_slice(data_key).unwrap(),
                Aes256::new_from_slice(tweak_key).unwrap(),
            );
            let lba = lba % (u64::MAX / 2);
            VolumeCipher::new(&key).encrypt_blocks(lba, &mut ours);
            reference.encrypt_sector(&mut theirs, u128::from(lba).to_le_bytes());
            proptest::prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn cluster_wrap_round_trips() {
        let key = VolumeKey::generate();
        let cluster = ClusterKey::generate();
        let wrapped = WrappedKey::with_cluster_key(&key, &cluster, CONTEXT).unwrap();
        assert!(!wrapped.needs_passphrase());
        assert_eq!(wrapped.ciphertext.len(), WRAPPED_BYTES);
        assert!(!wrapped
            .ciphertext
            .windows(16)
            .any(|w| key.0.windows(16).any(|k| k == w)));
        let opened = wrapped.unwrap_cluster(&cluster, CONTEXT).unwrap();
        assert_eq!(opened.0, key.0);
    }

    #[test]
    fn cluster_unwrap_fails_on_wrong_key_context_or_tampering() {
        let key = VolumeKey::generate();
        let cluster = ClusterKey::generate();
        let wrapped = WrappedKey::with_cluster_key(&key, &cluster, CONTEXT).unwrap();
        let wrong_key = wrapped.unwrap_cluster(&ClusterKey::generate(), CONTEXT);
        assert!(matches!(wrong_key, Err(CryptError::WrongClusterKey)));
        let moved = wrapped.unwrap_cluster(&cluster, b"volume vol-b 0001");
        assert!(matches!(moved, Err(CryptError::WrongClusterKey)));
        let mut tampered = wrapped.clone();
        tampered.ciphertext[5] ^= 1;
        let tampered = tampered.unwrap_cluster(&cluster, CONTEXT);
        assert!(matches!(tampered, Err(CryptError::WrongClusterKey)));
        let mut truncated = wrapped.clone();
        truncated.ciphertext.pop();
        let truncated = truncated.unwrap_cluster(&cluster, CONTEXT);
        assert!(matches!(truncated, Err(CryptError::WrongClusterKey)));
        let not_passphrase = wrapped.unwrap_passphrase(b"long enough", CONTEXT);
        assert!(matches!(not_passphrase, Err(CryptError::NotPassphrase)));
    }

    #[test]
    fn passphrase_wrap_round_trips_and_rejects_wrong_passphrase() {
        let key = VolumeKey::generate();
        let phrase = b"correct horse battery staple";
        let wrapped = WrappedKey::with_passphrase_params(&key, phrase, CONTEXT, KDF_PARAMS_TEST).unwrap();
        assert!(wrapped.needs_passphrase());
        assert_eq!(wrapped.unwrap_passphrase(phrase, CONTEXT).unwrap().0, key.0);
        let wrong = wrapped.unwrap_passphrase(b"correct horse battery stapler", CONTEXT);
        assert!(matches!(wrong, Err(CryptError::WrongPassphrase)));
        let moved = wrapped.unwrap_passphrase(phrase, b"another volume");
        assert!(matches!(moved, Err(CryptError::WrongPassphrase)));
        let cluster = wrapped.unwrap_cluster(&ClusterKey::generate(), CONTEXT);
        assert!(matches!(cluster, Err(CryptError::NeedsPassphrase)));
    }

    #[test]
    fn passphrase_wrap_with_default_params_round_trips() {
        let key = VolumeKey::generate();
        let wrapped = WrappedKey::with_passphrase(&key, b"eight by", CONTEXT).unwrap();
        let WrapScheme::Passphrase { memory_kib, salt, .. } = &wrapped.scheme else {
            panic!("not a passphrase scheme: {:?}", wrapped.scheme);
        };
        assert_eq!(*memory_kib, KDF_PARAMS_DEFAULT.memory_kib);
        assert_eq!(salt.len(), SALT_BYTES);
        assert_eq!(wrapped.unwrap_passphrase(b"eight by", CONTEXT).unwrap().0, key.0);
    }

    #[test]
    fn passphrase_length_and_kdf_params_are_bounded() {
        let key = VolumeKey::generate();
        for phrase in [&b"seven b"[..], &[b'x'; PASSPHRASE_BYTES_MAX + 1][..]] {
            let result = WrappedKey::with_passphrase_params(&key, phrase, CONTEXT, KDF_PARAMS_TEST);
            assert!(matches!(result, Err(CryptError::BadPassphrase)));
        }
        let mut wrapped = WrappedKey::with_passphrase_params(&key, b"eight by", CONTEXT, KDF_PARAMS_TEST).unwrap();
        if let WrapScheme::Passphrase { memory_kib, .. } = &mut wrapped.scheme {
            *memory_kib = u32::MAX;
        }
        let result = wrapped.unwrap_passphrase(b"eight by", CONTEXT);
        assert!(matches!(result, Err(CryptError::Kdf(_))));
    }

    #[test]
    fn wrapped_key_and_cluster_key_survive_json() {
        let key = VolumeKey::generate();
        let cluster = ClusterKey::generate();
        let by_cluster = WrappedKey::with_cluster_key(&key, &cluster, CONTEXT).unwrap();
        let by_phrase = WrappedKey::with_passphrase_params(&key, b"eight by", CONTEXT, KDF_PARAMS_TEST).unwrap();
        for wrapped in [by_cluster, by_phrase] {
            let json = serde_json::to_string(&wrapped).unwrap();
            let back: WrappedKey = serde_json::from_str(&json).unwrap();
            assert_eq!(back, wrapped);
        }
        let json = serde_json::to_string(&cluster).unwrap();
        assert_eq!(json, format!("\"{}\"", hex::encode(&cluster.0)));
        let back: ClusterKey = serde_json::from_str(&json).unwrap();
        assert!(back == cluster);
        let bad = serde_json::from_str::<ClusterKey>("\"abcd\"").unwrap_err();
        assert!(!bad.to_string().contains("abcd"));
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let key = VolumeKey::generate();
        let cluster = ClusterKey::generate();
        let printed = [
            format!("{key:?}"),
            format!("{cluster:?}"),
            format!("{:?}", VolumeCipher::new(&key)),
        ];
        assert_eq!(printed, ["VolumeKey(..)", "ClusterKey(..)", "VolumeCipher(..)"]);
    }

    #[test]
    fn volume_cipher_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<VolumeCipher>();
        shared::<ClusterKey>();
    }
}
