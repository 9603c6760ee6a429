//! The node's data directory: who this node is and which disks it owns.
//!
//! ```text
//! DIR/node.toml    node_uuid, cluster_uuid (once joined), created
//! DIR/disks.toml   [[disk]] path, disk_uuid, size_bytes, segment_size_bytes, enrolled_unix_seconds
//! DIR/.lock        flock: one ballast process per data directory
//! ```
//! Files are replaced atomically (write, fsync, rename, fsync directory).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kernel_iface::lockfile::{LockError, LockFile};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The data directory of a node installed as a service (`ballast install`
/// writes it into the config); the CLI looks there last.
pub const DEFAULT_DIR: &str = "/var/lib/ballast";
const NODE_FILE: &str = "node.toml";
const DISKS_FILE: &str = "disks.toml";
const LOCK_FILE: &str = ".lock";

/// Errors reading or writing the data directory.
#[derive(Debug, Error)]
pub enum DataDirError {
    /// I/O on a file of the directory failed
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// a file does not parse
    #[error("{path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// the directory is not initialised
    #[error("{path} is not a ballast data directory (no node.toml); enroll a disk into it first: ballast disk enroll --data-dir {path} DEVICE")]
    Missing { path: PathBuf },
    /// another process uses it
    #[error(transparent)]
    Locked(#[from] LockError),
}

/// This node's identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_uuid: uuid::Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_uuid: Option<uuid::Uuid>,
    pub created_unix_seconds: u64,
}

/// One enrolled disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub path: PathBuf,
    pub disk_uuid: uuid::Uuid,
    pub size_bytes: u64,
    pub segment_size_bytes: u64,
    pub enrolled_unix_seconds: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct DisksFile {
    #[serde(default, rename = "disk")]
    disks: Vec<DiskRecord>,
}

/// An open (and locked) data directory.
pub struct DataDir {
    path: PathBuf,
    pub node: NodeIdentity,
    _lock: LockFile,
}

impl DataDir {
    /// Opens `path`; with `create`, makes it (0700) and a new node identity
    /// when missing.
    pub fn open(path: &Path, create: bool) -> Result<Self, DataDirError> {
        let io = |source| DataDirError::Io {
            path: path.to_owned(),
            source,
        };
        if !path.join(NODE_FILE).exists() {
            if !create {
                return Err(DataDirError::Missing { path: path.to_owned() });
            }
            fs::create_dir_all(path).map_err(io)?;
            fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)?;
        }
        let lock = LockFile::acquire(&path.join(LOCK_FILE))?;
        let node_path = path.join(NODE_FILE);
        let node = if node_path.exists() {
            read_toml(&node_path)?
        } else {
            let node = NodeIdentity {
                node_uuid: uuid::Uuid::new_v4(),
                cluster_uuid: None,
                created_unix_seconds: now_unix_seconds(),
            };
            write_atomic(&node_path, &to_toml(&node_path, &node)?)?;
            node
        };
        Ok(Self {
            path: path.to_owned(),
            node,
            _lock: lock,
        })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Enrolled disks, in enrollment order.
    pub fn disks(&self) -> Result<Vec<DiskRecord>, DataDirError> {
        let path = self.path.join(DISKS_FILE);
        if !path.exists() {
            return Ok(Vec::new());
        }
        Ok(read_toml::<DisksFile>(&path)?.disks)
    }

    /// Records a newly enrolled disk (replacing a record of the same path).
    pub fn add_disk(&self, record: DiskRecord) -> Result<(), DataDirError> {
        let path = self.path.join(DISKS_FILE);
        let mut file = DisksFile { disks: self.disks()? };
        file.disks
            .retain(|disk| disk.path != record.path && disk.disk_uuid != record.disk_uuid);
        file.disks.push(record);
        write_atomic(&path, &to_toml(&path, &file)?)
    }

    /// Forgets an enrolled disk (drained by `disk remove`): the node no
    /// longer opens it. True if it was recorded.
    pub fn remove_disk(&self, disk_uuid: uuid::Uuid) -> Result<bool, DataDirError> {
        let path = self.path.join(DISKS_FILE);
        let mut file = DisksFile { disks: self.disks()? };
        let before = file.disks.len();
        file.disks.retain(|disk| disk.disk_uuid != disk_uuid);
        if file.disks.len() == before {
            return Ok(false);
        }
        write_atomic(&path, &to_toml(&path, &file)?)?;
        Ok(true)
    }
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DataDirError> {
    let text = fs::read_to_string(path).map_err(|source| DataDirError::Io {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| DataDirError::Parse {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

fn to_toml<T: Serialize>(path: &Path, value: &T) -> Result<String, DataDirError> {
    toml::to_string_pretty(value).map_err(|error| DataDirError::Parse {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// Replaces `path` with `contents` so a crash leaves the old or the new file.
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), DataDirError> {
    write_atomic_bytes(path, contents.as_bytes(), 0o600)
}

/// Replaces `path` with `bytes`, permissions `mode`, so a crash (or a
/// reader, or a process running the old file) sees the old or the new
/// file, never half of one.
pub fn write_atomic_bytes(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    };
    // Beside it, named after the whole file name (`a.b` -> `a.b.tmp`, so
    // `10.0.0.1:1` and `10.0.0.2:1` do not share one).
    let mut temporary_name = path.file_name().unwrap_or_default().to_os_string();
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        // An existing temporary file keeps its mode through open(2).
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io(source));
    }
    if let Some(parent) = path.parent() {
        File::open(parent).and_then(|dir| dir.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn now_unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_an_identity_that_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let first = DataDir::open(&path, true).unwrap().node;
        let second = DataDir::open(&path, false).unwrap().node;
        assert_eq!(first, second);
    }

    #[test]
    fn opening_a_missing_directory_without_create_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = DataDir::open(&dir.path().join("nope"), false).err().unwrap();
        assert!(error.to_string().contains("ballast disk enroll"), "{error}");
    }

    #[test]
    fn two_processes_cannot_use_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DataDir::open(dir.path(), true).unwrap();
        assert!(matches!(DataDir::open(dir.path(), true), Err(DataDirError::Locked(_))));
    }

    #[test]
    fn disk_records_round_trip_and_replace_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path(), true).unwrap();
        let record = DiskRecord {
            path: "/dev/loop9".into(),
            disk_uuid: uuid::Uuid::new_v4(),
            size_bytes: 1 << 30,
            segment_size_bytes: 8 << 20,
            enrolled_unix_seconds: 5,
        };
        data.add_disk(record.clone()).unwrap();
        let mut replaced = record.clone();
        replaced.disk_uuid = uuid::Uuid::new_v4();
        data.add_disk(replaced.clone()).unwrap();
        assert_eq!(data.disks().unwrap(), vec![replaced]);
    }

    #[test]
    fn a_corrupt_disks_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path(), true).unwrap();
        fs::write(dir.path().join(DISKS_FILE), "[[disk]\npath=").unwrap();
        let error = data.disks().unwrap_err();
        assert!(error.to_string().contains("disks.toml"), "{error}");
    }
}
