//! An exclusive, non-blocking lock on a file (flock), held while the value
//! lives: one ballast process per data directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

/// Errors taking the lock.
#[derive(Debug, Error)]
pub enum LockError {
    /// another process holds the lock
    #[error("{path} is locked by another ballast process (pid {holder}); stop it first")]
    Held { path: PathBuf, holder: String },
    /// the lock file could not be opened
    #[error("cannot open lock file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
}

/// A held lock; released on drop (and by the kernel if the process dies).
pub struct LockFile {
    _lock: Flock<File>,
}

impl LockFile {
    /// Takes the lock on `path` (created 0600 if missing) and writes our pid in it.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.to_owned(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = lock.seek(SeekFrom::Start(0));
                let _ = writeln!(lock, "{}", std::process::id());
                Ok(Self { _lock: lock })
            }
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                Err(LockError::Held {
                    path: path.to_owned(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.to_owned()
                    },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = LockFile::acquire(&path).unwrap();
        match LockFile::acquire(&path) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, std::process::id().to_string())
            }
            other => panic!("second lock must be refused, got {:?}", other.err()),
        }
        drop(first);
        LockFile::acquire(&path).expect("lock is free again after drop");
    }
}
