//! Durable volume metadata: a redb database in the data directory
//! (`volumes.redb`). Every change is one transaction committed with an
//! fsync before the caller is answered, so metadata survives kill -9.
//!
//! Volume ids come from the cluster, which never reuses one, so data of a
//! deleted volume that a crash left on disk can never appear in a new
//! volume (start-up deletes such orphans; a replica created under an id
//! whose stale data is still on disk releases it first).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const VOLUMES: TableDefinition<&str, &str> = TableDefinition::new("volumes");

/// File name inside the data directory.
pub const META_FILE: &str = "volumes.redb";

/// Lifecycle of a volume's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// serving
    Ready,
    /// being deleted: its data is being released; start-up finishes the job
    Deleting,
}

/// What the node keeps about one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Store-wide id of the volume's data (never reused).
    pub id: u64,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    pub replicas: u32,
    /// The enrolled disk holding the data.
    pub disk_uuid: uuid::Uuid,
    /// Fencing epoch carried in every record written for the volume.
    pub epoch: u64,
    /// Mutations sent at an older epoch are refused: raised by a new
    /// coordinator's fence (kept here so a restart does not forget it).
    #[serde(default)]
    pub fence_floor: u64,
    pub created_unix_seconds: u64,
    pub state: VolumeState,
    /// Data is encrypted (AES-XTS, `crypt`): I/O needs the key, which is
    /// never kept here.
    #[serde(default)]
    pub encrypted: bool,
    /// A snapshot's copy (read-only), named `VOLUME@SNAPSHOT`: the data id
    /// of the volume it was taken of.
    #[serde(default)]
    pub snapshot_of: Option<u64>,
}

/// Errors of the metadata database.
#[derive(Debug, Error)]
pub enum MetaError {
    /// the database could not be opened or written
    #[error("volume metadata {path}: {reason}")]
    Database { path: PathBuf, reason: String },
    /// a volume of that name exists
    #[error("volume {name} already exists")]
    Exists { name: String },
    /// no volume of that name
    #[error("volume {name} does not exist")]
    Missing { name: String },
}

/// The open metadata database.
pub struct MetaStore {
    db: Database,
    path: PathBuf,
}

impl MetaStore {
    /// Opens (or creates) `DIR/volumes.redb`.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        let path = dir.join(META_FILE);
        let db = Database::create(&path).map_err(|error| MetaError::Database {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        let store = Self { db, path };
        // Make the tables exist so read transactions find them.
        store.write(|tables| {
            let _ = tables;
            Ok(())
        })?;
        Ok(store)
    }

    fn error(&self, error: impl std::fmt::Display) -> MetaError {
        MetaError::Database {
            path: self.path.clone(),
            reason: error.to_string(),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T, MetaError>) -> Result<T, MetaError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let result = {
            let volumes = txn.open_table(VOLUMES).map_err(|e| self.error(e))?;
            let mut tables = Tables {
                volumes,
                path: &self.path,
            };
            f(&mut tables)
        };
        match result {
            Ok(value) => {
                txn.commit().map_err(|e| self.error(e))?;
                Ok(value)
            }
            Err(error) => {
                txn.abort().map_err(|e| self.error(e))?;
                Err(error)
            }
        }
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(VOLUMES).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (_, value) = entry.map_err(|e| self.error(e))?;
            out.push(decode(&self.path, value.value())?);
        }
        Ok(out)
    }

    /// Adds the record of a volume (its id comes from the cluster, which
    /// never reuses one).
    pub fn insert(&self, record: &VolumeRecord) -> Result<(), MetaError> {
        assert!(record.id > 0, "volume ids start at 1");
        self.write(|tables| {
            if tables
                .volumes
                .get(record.name.as_str())
                .map_err(|e| tables.error(e))?
                .is_some()
            {
                return Err(MetaError::Exists {
                    name: record.name.clone(),
                });
            }
            tables.put(record)
        })
    }

    /// Replaces the record of an existing volume.
    pub fn update(&self, record: &VolumeRecord) -> Result<(), MetaError> {
        self.write(|tables| {
            if tables
                .volumes
                .get(record.name.as_str())
                .map_err(|e| tables.error(e))?
                .is_none()
            {
                return Err(MetaError::Missing {
                    name: record.name.clone(),
                });
            }
            tables.put(record)
        })
    }

    /// Removes a volume's record.
    pub fn remove(&self, name: &str) -> Result<(), MetaError> {
        self.write(|tables| {
            let path = tables.path;
            let removed = tables.volumes.remove(name).map_err(|e| db_error(path, e))?.is_some();
            if removed {
                Ok(())
            } else {
                Err(MetaError::Missing { name: name.to_owned() })
            }
        })
    }
}

struct Tables<'txn> {
    volumes: redb::Table<'txn, &'static str, &'static str>,
    path: &'txn Path,
}

fn db_error(path: &Path, error: impl std::fmt::Display) -> MetaError {
    MetaError::Database {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

impl Tables<'_> {
    fn error(&self, error: impl std::fmt::Display) -> MetaError {
        db_error(self.path, error)
    }

    fn put(&mut self, record: &VolumeRecord) -> Result<(), MetaError> {
        let json = serde_json::to_string(record).map_err(|e| self.error(e))?;
        let path = self.path;
        self.volumes
            .insert(record.name.as_str(), json.as_str())
            .map_err(|e| db_error(path, e))?;
        Ok(())
    }
}

fn decode(path: &Path, json: &str) -> Result<VolumeRecord, MetaError> {
    serde_json::from_str(json).map_err(|error| MetaError::Database {
        path: path.to_owned(),
        reason: format!("unreadable volume record: {error}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, id: u64) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            id,
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            replicas: 1,
            disk_uuid: uuid::Uuid::nil(),
            epoch: 1,
            fence_floor: 0,
            created_unix_seconds: 0,
            state: VolumeState::Ready,
            encrypted: false,
            snapshot_of: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let meta = MetaStore::open(dir.path()).unwrap();
            meta.insert(&record("a", 7)).unwrap();
            meta.insert(&record("b", 9)).unwrap();
            meta.remove("b").unwrap();
        }
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.volumes().unwrap(), vec![record("a", 7)]);
    }

    #[test]
    fn duplicate_names_and_missing_volumes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        meta.insert(&record("a", 1)).unwrap();
        assert!(matches!(meta.insert(&record("a", 2)), Err(MetaError::Exists { .. })));
        assert!(matches!(meta.remove("b"), Err(MetaError::Missing { .. })));
        assert!(matches!(meta.update(&record("b", 3)), Err(MetaError::Missing { .. })));
    }
}
