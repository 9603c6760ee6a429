//! Durable volume metadata: a redb database in the data directory
//! (`volumes.redb`). Every change is one transaction committed with an
//! fsync before the caller is answered, so metadata survives kill -9.
//!
//! Volume ids are never reused: a counter in the same database hands them
//! out, so data of a deleted volume that a crash left on disk can never
//! appear in a new volume (start-up deletes such orphans).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const VOLUMES: TableDefinition<&str, &str> = TableDefinition::new("volumes");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_VOLUME_ID: &str = "next_volume_id";

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
    pub created_unix_seconds: u64,
    pub state: VolumeState,
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
            let counters = txn.open_table(COUNTERS).map_err(|e| self.error(e))?;
            let mut tables = Tables {
                volumes,
                counters,
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

    /// Adds a volume, giving it the next id (at least `id_floor`).
    pub fn create(&self, mut record: VolumeRecord, id_floor: u64) -> Result<VolumeRecord, MetaError> {
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
            let next = tables
                .counters
                .get(NEXT_VOLUME_ID)
                .map_err(|e| tables.error(e))?
                .map_or(1, |value| value.value())
                .max(id_floor)
                .max(1);
            record.id = next;
            let path = tables.path;
            tables
                .counters
                .insert(NEXT_VOLUME_ID, next + 1)
                .map_err(|e| db_error(path, e))?;
            tables.put(&record)?;
            Ok(record)
        })
    }

    /// Adds a volume whose id was handed out elsewhere (the cluster); the
    /// local counter moves past it so local and cluster ids never collide.
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
            let next = tables
                .counters
                .get(NEXT_VOLUME_ID)
                .map_err(|e| tables.error(e))?
                .map_or(1, |value| value.value());
            let path = tables.path;
            tables
                .counters
                .insert(NEXT_VOLUME_ID, next.max(record.id + 1))
                .map_err(|e| db_error(path, e))?;
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
    counters: redb::Table<'txn, &'static str, u64>,
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

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            id: 0,
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            replicas: 1,
            disk_uuid: uuid::Uuid::nil(),
            epoch: 1,
            created_unix_seconds: 0,
            state: VolumeState::Ready,
        }
    }

    #[test]
    fn ids_are_never_reused_after_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let meta = MetaStore::open(dir.path()).unwrap();
            let first = meta.create(record("a"), 0).unwrap();
            meta.remove("a").unwrap();
            first
        };
        let meta = MetaStore::open(dir.path()).unwrap();
        let second = meta.create(record("a"), 0).unwrap();
        assert!(second.id > first.id);
        assert_eq!(meta.volumes().unwrap(), vec![second]);
    }

    #[test]
    fn id_floor_skips_ids_found_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.create(record("a"), 50).unwrap().id, 50);
        assert_eq!(meta.create(record("b"), 0).unwrap().id, 51);
    }

    #[test]
    fn duplicate_names_and_missing_volumes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        meta.create(record("a"), 0).unwrap();
        assert!(matches!(meta.create(record("a"), 0), Err(MetaError::Exists { .. })));
        assert!(matches!(meta.remove("b"), Err(MetaError::Missing { .. })));
        assert!(matches!(meta.update(&record("b")), Err(MetaError::Missing { .. })));
    }
}
