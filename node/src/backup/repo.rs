//! A backup target's layout (format 1; `disk-layout/FORMAT.md`, "Backup
//! targets"):
//!
//! - `config.json`: format, chunk size, the key record (how the secret
//!   makes the keys, and a check value).
//! - `chunks/<first two hex digits>/<id>`: one sealed chunk each, named by
//!   the HMAC of its plain bytes (`crypto`), shared by every backup and
//!   volume of the target that holds the same bytes.
//! - `backups/<backup id>.json`: one manifest per backup, written last, so
//!   a backup that did not finish is never listed: the volume, its size,
//!   the snapshot it was read from, its parent, and every chunk in order
//!   (null for a chunk of zeros), with a MAC under the manifest key. A
//!   chunk that changed in a few blocks since the parent is a patch: the
//!   parent's chunk (its base) plus an object holding only the blocks that
//!   differ from it, so an incremental after scattered small writes sends
//!   about the bytes written, not a whole chunk per write.
//! - `locks/<name>.json`: a backup, restore or verify holds a shared lock,
//!   a delete an exclusive one; each refuses to start while the other kind
//!   is held and fresh (refreshed within `LOCK_STALE_SECONDS`), so a delete
//!   never frees a chunk that a running backup has found and reuses.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::crypto::{CryptoError, KeyRecord, Keys, Secret};
use super::target::{Target, TargetError, TargetOptions, TargetUrl};
use crate::volume::crypt::KdfParams;

/// The target's layout (`config.json`).
pub const FORMAT: u32 = 1;
/// The manifest's format: 2 added `patches`. Both are read.
pub const MANIFEST_FORMAT: u32 = 2;
pub const MANIFEST_FORMATS_READ: std::ops::RangeInclusive<u32> = 1..=MANIFEST_FORMAT;
/// Bytes per chunk: 64 blocks.
pub const CHUNK_BYTES: u64 = 256 * 1024;
/// A patch names blocks of this size, one bit each in a `u64`.
pub const PATCH_BLOCK: u64 = 4096;
const _: () = assert!(CHUNK_BYTES / PATCH_BLOCK == 64);
/// A lock not refreshed for this long belongs to a process that died.
pub const LOCK_STALE_SECONDS: u64 = 30 * 60;
/// A holder refreshes its lock this often.
pub const LOCK_REFRESH_SECONDS: u64 = 60;
const CONFIG: &str = "config.json";

#[derive(Debug, Error)]
pub enum RepoError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Locked(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub format: u32,
    pub chunk_bytes: u64,
    pub created_unix_seconds: u64,
    pub key: KeyRecord,
}

/// One backup: what it holds and where its chunks are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub volume: String,
    pub size_bytes: u64,
    /// The snapshot of the volume it was read from, and that snapshot's data id.
    pub snapshot: String,
    pub snapshot_id: u64,
    /// The cluster the volume lives in (an incremental backup reads the
    /// difference from its parent's snapshot only in that cluster).
    pub cluster_id: String,
    pub created_unix_seconds: u64,
    /// The backup whose chunks this one kept where the volume had not changed.
    pub parent: Option<String>,
    pub chunk_bytes: u64,
    /// Every chunk of the volume in order; None: all zeros (or, with a
    /// patch, the base the patch applies to).
    pub chunks: Vec<Option<String>>,
    /// The chunks stored as their base (`chunks`) plus changed blocks,
    /// sorted by chunk (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<Patch>,
    /// Bytes read from the volume, and sent to the target (after compression).
    pub read_bytes: u64,
    pub stored_bytes: u64,
    /// MAC of this manifest with `mac` empty.
    pub mac: String,
}

/// Chunk `chunk` is its base with the blocks `blocks` marks (bit i:
/// bytes `i * PATCH_BLOCK ..` of the chunk) replaced by object `id`'s
/// bytes, those blocks in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub chunk: u32,
    pub blocks: u64,
    pub id: String,
}

/// One chunk of a backup: its base (None: zeros) and its patch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub base: Option<String>,
    pub patch: Option<Patch>,
}

impl Entry {
    #[must_use]
    pub fn is_zeros(&self) -> bool {
        self.base.is_none() && self.patch.is_none()
    }
}

/// The byte ranges within a chunk of `len` bytes that `blocks` marks, as
/// (start, end) runs.
#[must_use]
pub fn block_runs(blocks: u64, len: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for bit in 0..64 {
        if blocks & (1 << bit) == 0 {
            continue;
        }
        let (start, end) = (bit * PATCH_BLOCK, ((bit + 1) * PATCH_BLOCK).min(len));
        if start >= end {
            break;
        }
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

impl Manifest {
    /// Chunks that hold data (not zeros).
    #[must_use]
    pub fn data_chunks(&self) -> usize {
        (0..self.chunks.len()).filter(|i| !self.entry(*i).is_zeros()).count()
    }

    /// Chunk `index`: its base and patch.
    #[must_use]
    pub fn entry(&self, index: usize) -> Entry {
        let base = self.chunks.get(index).cloned().flatten();
        let patch = u32::try_from(index)
            .ok()
            .and_then(|chunk| self.patches.binary_search_by_key(&chunk, |p| p.chunk).ok())
            .map(|at| self.patches[at].clone());
        Entry { base, patch }
    }

    /// Every object this backup needs: chunks and patches.
    pub fn objects(&self) -> impl Iterator<Item = &str> {
        self.chunks
            .iter()
            .flatten()
            .map(String::as_str)
            .chain(self.patches.iter().map(|p| p.id.as_str()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LockRecord {
    exclusive: bool,
    what: String,
    host: String,
    pid: u32,
    refreshed_unix_seconds: u64,
}

/// An opened target.
pub struct Repo {
    target: Target,
    keys: Keys,
    pub config: Config,
}

fn chunk_key(id: &str) -> String {
    format!("chunks/{}/{id}", id.get(..2).unwrap_or("00"))
}

fn manifest_key(id: &str) -> String {
    format!("backups/{id}.json")
}

fn now() -> u64 {
    crate::datadir::now_unix_seconds()
}

/// The id of a backup of `volume` taken at `unix_seconds` (UTC), before
/// any suffix that makes it unique.
#[must_use]
pub fn backup_id(volume: &str, unix_seconds: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_seconds).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{volume}-{:04}{:02}{:02}-{:02}{:02}{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

impl Repo {
    /// Opens the target at `url` with `secret`; Err if it holds no backups
    /// yet (unless `create`: then it is set up, with `params` for a passphrase).
    pub fn open(
        url: &TargetUrl,
        options: &TargetOptions,
        secret: &Secret,
        create: Option<KdfParams>,
    ) -> Result<Self, RepoError> {
        let target = url.open(options)?;
        let config = match target.get(CONFIG)? {
            Some(bytes) => {
                let config: Config = serde_json::from_slice(&bytes)
                    .map_err(|error| RepoError::Format(format!("the target's {CONFIG} is not readable: {error}")))?;
                if config.format != FORMAT {
                    return Err(RepoError::Format(format!(
                        "the target is format {}; this ballast reads format {FORMAT}",
                        config.format
                    )));
                }
                if config.chunk_bytes != CHUNK_BYTES {
                    return Err(RepoError::Format(format!(
                        "the target's chunks are {} bytes; this ballast uses {CHUNK_BYTES}",
                        config.chunk_bytes
                    )));
                }
                config
            }
            None => {
                let Some(params) = create else {
                    return Err(RepoError::NotFound(format!(
                        "{} holds no ballast backups (no {CONFIG})",
                        target.describe()
                    )));
                };
                target.ensure()?;
                let (key, keys) = Keys::create(secret, params)?;
                let config = Config {
                    format: FORMAT,
                    chunk_bytes: CHUNK_BYTES,
                    created_unix_seconds: now(),
                    key,
                };
                let bytes = serde_json::to_vec_pretty(&config).expect("a config serializes");
                target.put(CONFIG, &bytes)?;
                return Ok(Self { target, keys, config });
            }
        };
        let keys = Keys::open(secret, &config.key)?;
        Ok(Self { target, keys, config })
    }

    #[must_use]
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Stores `plain` as a chunk unless the target has it; returns its id
    /// and the bytes sent (0 when it was there).
    pub fn put_chunk(&self, plain: &[u8]) -> Result<(String, u64), RepoError> {
        let id = self.keys.chunk_id(plain);
        let key = chunk_key(&id);
        if self.target.exists(&key)? {
            return Ok((id, 0));
        }
        let sealed = self.keys.seal(&id, plain);
        self.target.put(&key, &sealed)?;
        Ok((id, sealed.len() as u64))
    }

    /// The plain bytes of chunk `id`, checked.
    pub fn get_chunk(&self, id: &str) -> Result<Vec<u8>, RepoError> {
        let sealed = self
            .target
            .get(&chunk_key(id))?
            .ok_or_else(|| RepoError::NotFound(format!("chunk {id} is missing")))?;
        let plain = self
            .keys
            .open_chunk(id, &sealed, usize::try_from(CHUNK_BYTES).unwrap_or(usize::MAX))?;
        Ok(plain)
    }

    /// The bytes of chunk `entry` (`len` bytes long), checked; None: zeros.
    pub fn chunk_data(&self, entry: &Entry, len: u64) -> Result<Option<Vec<u8>>, RepoError> {
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        let mut data = match &entry.base {
            Some(id) => {
                let data = self.get_chunk(id)?;
                if data.len() != size {
                    return Err(RepoError::Format(format!(
                        "chunk {id} holds {} bytes, the backup says {len}",
                        data.len()
                    )));
                }
                data
            }
            None if entry.patch.is_none() => return Ok(None),
            None => vec![0; size],
        };
        if let Some(patch) = &entry.patch {
            let blocks = self.get_chunk(&patch.id)?;
            let runs = block_runs(patch.blocks, len);
            let wanted: u64 = runs.iter().map(|(start, end)| end - start).sum();
            if blocks.len() as u64 != wanted {
                return Err(RepoError::Format(format!(
                    "patch {} holds {} bytes, its blocks need {wanted}",
                    patch.id,
                    blocks.len()
                )));
            }
            let mut from = 0usize;
            for (start, end) in runs {
                let n = usize::try_from(end - start).unwrap_or(usize::MAX);
                let start = usize::try_from(start).unwrap_or(usize::MAX);
                data[start..start + n].copy_from_slice(&blocks[from..from + n]);
                from += n;
            }
        }
        Ok(Some(data))
    }

    fn mac_of(&self, manifest: &Manifest) -> String {
        let mut unsigned = manifest.clone();
        unsigned.mac.clear();
        self.keys
            .manifest_mac(&serde_json::to_vec(&unsigned).expect("a manifest serializes"))
    }

    /// Writes `manifest` (its MAC set here): the backup is listed from now on.
    pub fn put_manifest(&self, manifest: &mut Manifest) -> Result<(), RepoError> {
        manifest.mac = self.mac_of(manifest);
        let bytes = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
        self.target.put(&manifest_key(&manifest.id), &bytes)?;
        Ok(())
    }

    /// Backup `id`'s manifest, checked.
    pub fn manifest(&self, id: &str) -> Result<Manifest, RepoError> {
        let key = manifest_key(id);
        let bytes = self
            .target
            .get(&key)
            .map_err(|error| match error {
                TargetError::BadKey(_) => RepoError::NotFound(format!("no backup {id:?} in this target")),
                other => other.into(),
            })?
            .ok_or_else(|| RepoError::NotFound(format!("no backup {id:?} in this target")))?;
        let unreadable = |error: serde_json::Error| {
            RepoError::Format(format!("the manifest of backup {id} is not readable: {error}"))
        };
        // The format first: a newer one may have fields this build does not know.
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(unreadable)?;
        let format = value.get("format").and_then(serde_json::Value::as_u64);
        if !format.is_some_and(|f| u32::try_from(f).is_ok_and(|f| MANIFEST_FORMATS_READ.contains(&f))) {
            return Err(RepoError::Format(format!(
                "the manifest of backup {id} is format {}; this ballast reads formats {} to {} (a newer ballast wrote it)",
                format.map_or_else(|| "unknown".to_owned(), |f| f.to_string()),
                MANIFEST_FORMATS_READ.start(),
                MANIFEST_FORMATS_READ.end()
            )));
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(unreadable)?;
        if manifest.id != id {
            return Err(RepoError::Format(format!(
                "the manifest named {id} is that of backup {:?}",
                manifest.id
            )));
        }
        if self.mac_of(&manifest) != manifest.mac {
            return Err(RepoError::Format(format!(
                "the manifest of backup {id} fails its MAC: altered, or written with another key"
            )));
        }
        Ok(manifest)
    }

    /// Every backup's manifest, oldest first.
    pub fn manifests(&self) -> Result<Vec<Manifest>, RepoError> {
        let mut all = Vec::new();
        for key in self.target.list("backups")? {
            let Some(id) = key.strip_prefix("backups/").and_then(|k| k.strip_suffix(".json")) else {
                continue;
            };
            all.push(self.manifest(id)?);
        }
        all.sort_by(|a, b| (a.created_unix_seconds, &a.id).cmp(&(b.created_unix_seconds, &b.id)));
        Ok(all)
    }

    /// A new backup id for `volume`, unused in this target.
    pub fn new_backup_id(&self, volume: &str) -> Result<String, RepoError> {
        let base = backup_id(volume, now());
        let mut id = base.clone();
        let mut n = 1;
        while self.target.exists(&manifest_key(&id))? {
            n += 1;
            id = format!("{base}-{n}");
        }
        Ok(id)
    }

    /// Takes a lock for `what`: shared (backups, restores, verifies) or
    /// exclusive (deletes). Refused while a fresh lock of the other kind,
    /// or any other exclusive one, is held.
    pub fn lock(&self, exclusive: bool, what: &str) -> Result<Lock, RepoError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{}-{}-{nanos}", if exclusive { "x" } else { "s" }, std::process::id());
        let lock = Lock {
            target: self.target.clone(),
            key: format!("locks/{name}.json"),
            exclusive,
            what: what.to_owned(),
            refreshed: AtomicU64::new(0),
        };
        lock.refresh()?;
        for key in self.target.list("locks")? {
            if key == lock.key {
                continue;
            }
            let Some(bytes) = self.target.get(&key)? else { continue };
            let Ok(other) = serde_json::from_slice::<LockRecord>(&bytes) else {
                continue;
            };
            if other.refreshed_unix_seconds + LOCK_STALE_SECONDS < now() {
                continue;
            }
            if exclusive || other.exclusive {
                let holder = format!("{} (pid {} on {})", other.what, other.pid, other.host);
                drop(lock);
                return Err(RepoError::Locked(format!(
                    "the target is in use by {holder}; retry when it ends (a lock not refreshed for {} min is ignored)",
                    LOCK_STALE_SECONDS / 60
                )));
            }
        }
        Ok(lock)
    }

    /// Checks every chunk of backup `id` (every backup: None) is there and
    /// intact, each chunk once; `progress(done, total)` after each.
    pub fn verify(&self, id: Option<&str>, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, RepoError> {
        let manifests = match id {
            Some(id) => vec![self.manifest(id)?],
            None => self.manifests()?,
        };
        let mut wanted: Vec<&str> = manifests.iter().flat_map(Manifest::objects).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut report = VerifyReport {
            backups: manifests.iter().map(|m| m.id.clone()).collect(),
            chunks: wanted.len() as u64,
            ..VerifyReport::default()
        };
        let total = wanted.len() as u64;
        for (done, chunk) in wanted.into_iter().enumerate() {
            match self.get_chunk(chunk) {
                Ok(plain) => report.bytes += plain.len() as u64,
                Err(RepoError::NotFound(_)) => report.missing.push(chunk.to_owned()),
                Err(RepoError::Crypto(error)) => report.damaged.push(error.to_string()),
                Err(other) => return Err(other),
            }
            progress(done as u64 + 1, total);
        }
        Ok(report)
    }

    /// Deletes backup `id` and frees the chunks no other backup uses.
    pub fn delete(&self, id: &str) -> Result<DeleteReport, RepoError> {
        let _lock = self.lock(true, &format!("delete of {id}"))?;
        self.manifest(id)?;
        self.target.delete(&manifest_key(id))?;
        let mut kept: std::collections::HashSet<String> = std::collections::HashSet::new();
        for manifest in self.manifests()? {
            kept.extend(manifest.objects().map(str::to_owned));
        }
        let mut report = DeleteReport::default();
        for key in self.target.list("chunks")? {
            let id = key.rsplit('/').next().unwrap_or_default();
            if !kept.contains(id) {
                let size = self.target.get(&key)?.map_or(0, |b| b.len() as u64);
                self.target.delete(&key)?;
                report.chunks_freed += 1;
                report.bytes_freed += size;
            }
        }
        report.chunks_kept = kept.len() as u64;
        Ok(report)
    }
}

/// A held lock; released when dropped.
pub struct Lock {
    target: Target,
    key: String,
    exclusive: bool,
    what: String,
    refreshed: AtomicU64,
}

impl Lock {
    /// Rewrites the lock's time if `LOCK_REFRESH_SECONDS` have passed.
    pub fn refresh(&self) -> Result<(), RepoError> {
        let now = now();
        if self.refreshed.load(Ordering::Relaxed) + LOCK_REFRESH_SECONDS > now {
            return Ok(());
        }
        let record = LockRecord {
            exclusive: self.exclusive,
            what: self.what.clone(),
            host: crate::daemon::config::host_name(),
            pid: std::process::id(),
            refreshed_unix_seconds: now,
        };
        let bytes = serde_json::to_vec(&record).expect("a lock serializes");
        self.target.put(&self.key, &bytes)?;
        self.refreshed.store(now, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.target.delete_soon(&self.key);
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub backups: Vec<String>,
    pub chunks: u64,
    pub bytes: u64,
    pub missing: Vec<String>,
    pub damaged: Vec<String>,
}

impl VerifyReport {
    #[must_use]
    pub fn intact(&self) -> bool {
        self.missing.is_empty() && self.damaged.is_empty()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeleteReport {
    pub chunks_freed: u64,
    pub bytes_freed: u64,
    pub chunks_kept: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::crypto::tests::CHEAP;
    use zeroize::Zeroizing;

    fn secret() -> Secret {
        Secret::Passphrase(Zeroizing::new("correct horse".into()))
    }

    fn manifest(repo: &Repo, id: &str, chunks: Vec<Option<String>>) -> Manifest {
        let mut manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: id.into(),
            volume: "v".into(),
            size_bytes: chunks.len() as u64 * CHUNK_BYTES,
            snapshot: "s".into(),
            snapshot_id: 3,
            cluster_id: "c".into(),
            created_unix_seconds: 1,
            parent: None,
            chunk_bytes: CHUNK_BYTES,
            chunks,
            patches: Vec::new(),
            read_bytes: 0,
            stored_bytes: 0,
            mac: String::new(),
        };
        repo.put_manifest(&mut manifest).unwrap();
        manifest
    }

    #[test]
    fn a_target_dedups_verifies_and_frees_only_unshared_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let url = TargetUrl::File(dir.path().join("t"));
        assert!(matches!(
            Repo::open(&url, &TargetOptions::default(), &secret(), None),
            Err(RepoError::NotFound(_))
        ));
        let repo = Repo::open(&url, &TargetOptions::default(), &secret(), Some(CHEAP)).unwrap();
        let (a, sent) = repo.put_chunk(&[1u8; 4096]).unwrap();
        assert!(sent > 0);
        assert_eq!(repo.put_chunk(&[1u8; 4096]).unwrap(), (a.clone(), 0), "deduplicated");
        let (b, _) = repo.put_chunk(&[2u8; 4096]).unwrap();
        manifest(&repo, "one", vec![Some(a.clone()), None]);
        manifest(&repo, "two", vec![Some(a.clone()), Some(b.clone())]);
        let report = repo.verify(None, |_, _| {}).unwrap();
        assert!(report.intact() && report.chunks == 2, "{report:?}");

        let freed = repo.delete("two").unwrap();
        assert_eq!((freed.chunks_freed, freed.chunks_kept), (1, 1));
        assert_eq!(repo.get_chunk(&a).unwrap(), vec![1u8; 4096]);
        assert!(matches!(repo.get_chunk(&b), Err(RepoError::NotFound(_))));
        assert!(matches!(repo.delete("two"), Err(RepoError::NotFound(_))));

        // Damage is found without a restore, and named.
        let path = dir.path().join("t").join(chunk_key(&a));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let report = repo.verify(Some("one"), |_, _| {}).unwrap();
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        std::fs::remove_file(&path).unwrap();
        let report = repo.verify(Some("one"), |_, _| {}).unwrap();
        assert_eq!(report.missing, vec![a]);

        // A wrong secret opens nothing; an altered manifest is refused.
        let wrong = Secret::Passphrase(Zeroizing::new("wrong horse".into()));
        assert!(matches!(
            Repo::open(&url, &TargetOptions::default(), &wrong, None),
            Err(RepoError::Crypto(CryptoError::WrongSecret))
        ));
        let key = dir.path().join("t/backups/one.json");
        let original = std::fs::read_to_string(&key).unwrap();
        std::fs::write(&key, original.replace("\"v\"", "\"w\"")).unwrap();
        assert!(matches!(repo.manifest("one"), Err(RepoError::Format(_))));
        // A manifest of a format this build does not read is named as such.
        std::fs::write(&key, original.replace("\"format\": 2", "\"format\": 9")).unwrap();
        let Err(RepoError::Format(why)) = repo.manifest("one") else {
            panic!("a format-9 manifest was read")
        };
        assert!(why.contains("format 9"), "{why}");
    }

    #[test]
    fn a_delete_waits_for_a_running_backup_and_a_backup_for_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let url = TargetUrl::File(dir.path().join("t"));
        let repo = Repo::open(&url, &TargetOptions::default(), &secret(), Some(CHEAP)).unwrap();
        manifest(&repo, "one", vec![None]);
        let backup = repo.lock(false, "backup of v").unwrap();
        let second = repo.lock(false, "restore of v").unwrap();
        let Err(RepoError::Locked(why)) = repo.delete("one") else {
            panic!("a delete ran beside a backup")
        };
        assert!(why.contains("backup of v") || why.contains("restore of v"), "{why}");
        drop((backup, second));
        let exclusive = repo.lock(true, "delete of one").unwrap();
        assert!(matches!(repo.lock(false, "backup of v"), Err(RepoError::Locked(_))));
        drop(exclusive);
        assert!(
            dir.path().join("t/locks").read_dir().unwrap().next().is_none(),
            "locks released"
        );
        repo.delete("one").unwrap();
    }

    #[test]
    fn a_patched_chunk_reads_as_its_base_with_the_changed_blocks_and_keeps_both_alive() {
        let dir = tempfile::tempdir().unwrap();
        let url = TargetUrl::File(dir.path().join("t"));
        let repo = Repo::open(&url, &TargetOptions::default(), &secret(), Some(CHEAP)).unwrap();
        let len = CHUNK_BYTES;
        let (chunk, b) = (
            usize::try_from(CHUNK_BYTES).unwrap(),
            usize::try_from(PATCH_BLOCK).unwrap(),
        );
        let (base, _) = repo.put_chunk(&vec![1u8; chunk]).unwrap();
        let blocks = 0b1001u64;
        let mut changed = vec![7u8; b];
        changed.extend(vec![9u8; b]);
        let (patch_id, sent) = repo.put_chunk(&changed).unwrap();
        assert!(sent < 2 * PATCH_BLOCK + 64, "a patch costs its blocks: {sent}");
        let patch = Patch {
            chunk: 0,
            blocks,
            id: patch_id.clone(),
        };
        let entry = Entry {
            base: Some(base.clone()),
            patch: Some(patch.clone()),
        };
        let data = repo.chunk_data(&entry, len).unwrap().unwrap();
        assert!(data[..b].iter().all(|x| *x == 7) && data[3 * b..4 * b].iter().all(|x| *x == 9));
        assert!(data[b..3 * b].iter().chain(&data[4 * b..]).all(|x| *x == 1));
        // Over zeros, and a patch whose size does not match its blocks.
        let over_zeros = Entry {
            base: None,
            patch: Some(patch.clone()),
        };
        let data = repo.chunk_data(&over_zeros, len).unwrap().unwrap();
        assert!(data[b..3 * b].iter().all(|x| *x == 0) && data[3 * b] == 9);
        let wrong = Entry {
            base: None,
            patch: Some(Patch {
                blocks: 0b111,
                ..patch.clone()
            }),
        };
        assert!(matches!(repo.chunk_data(&wrong, len), Err(RepoError::Format(_))));
        assert_eq!(repo.chunk_data(&Entry::default(), len).unwrap(), None);

        let mut full = manifest(&repo, "full", vec![Some(base.clone()), None]);
        let mut incremental = full.clone();
        incremental.id = "incremental".into();
        incremental.patches = vec![Patch {
            chunk: 1,
            ..patch.clone()
        }];
        incremental.chunks[0] = None;
        repo.put_manifest(&mut incremental).unwrap();
        assert_eq!(
            repo.manifest("incremental").unwrap().entry(1).patch,
            Some(Patch { chunk: 1, ..patch })
        );
        assert_eq!(incremental.data_chunks(), 1);
        let report = repo.verify(Some("incremental"), |_, _| {}).unwrap();
        assert_eq!((report.chunks, report.intact()), (1, true), "the patch is checked");
        // Deleting the full backup keeps the patch; deleting the other frees it.
        incremental.chunks[0] = Some(base.clone());
        repo.put_manifest(&mut incremental).unwrap();
        assert_eq!(repo.delete("full").unwrap().chunks_freed, 0);
        assert_eq!(repo.delete("incremental").unwrap().chunks_freed, 2);

        // A format-1 manifest (no patches) is still read.
        full.format = 1;
        repo.put_manifest(&mut full).unwrap();
        assert_eq!(repo.manifest("full").unwrap().entry(0).base, Some(base));
    }

    #[test]
    fn backup_ids_read_as_utc_times() {
        assert_eq!(backup_id("pg", 1_796_662_328), "pg-20261207-165208");
    }
}
