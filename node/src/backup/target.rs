//! Where backups are kept: objects named by `/`-separated keys. A
//! `file:///path` target is a directory (an NFS mount, a USB disk): each
//! object is written to a temporary name, synced, renamed into place and
//! its directory synced, so a crash leaves either the old object or the
//! new one, never a torn one, and never a name without its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("{url:?} is not a backup target: {why} (targets are file:///absolute/path)")]
    BadUrl { url: String, why: String },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("object key {0:?} is not valid")]
    BadKey(String),
}

/// A parsed target address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file target needs an absolute path: file:///var/backups/ballast"));
            }
            let path = Path::new(path);
            if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(bad("the path may not contain '..'"));
            }
            return Ok(Self::File(path.to_path_buf()));
        }
        if url.starts_with("s3://") {
            return Err(bad("s3:// targets are not built yet"));
        }
        Err(bad("unknown scheme"))
    }

    #[must_use]
    pub fn open(&self) -> FileTarget {
        match self {
            Self::File(root) => FileTarget { root: root.clone() },
        }
    }
}

/// A directory holding a target's objects.
#[derive(Clone, Debug)]
pub struct FileTarget {
    root: PathBuf,
}

fn check_key(key: &str) -> Result<(), TargetError> {
    let ok = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(TargetError::BadKey(key.to_owned()))
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TargetError + 'a {
    move |error| TargetError::Io {
        what,
        path: path.display().to_string(),
        error,
    }
}

impl FileTarget {
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, TargetError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Makes the target's directory if it is missing (its parent must exist).
    pub fn ensure(&self) -> Result<(), TargetError> {
        match std::fs::create_dir(&self.root) {
            Ok(()) => sync_dir(self.root.parent().unwrap_or(Path::new("/"))),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(io("cannot make the target directory", &self.root)(error)),
        }
    }

    /// The object's bytes, None if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TargetError> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io("cannot read", &path)(error)),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool, TargetError> {
        let path = self.path(key)?;
        path.try_exists().map_err(io("cannot look at", &path))
    }

    /// Writes the object whole (replacing it), durably.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), TargetError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent: the root").to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io("cannot make", &dir))?;
        let name = path.file_name().expect("a key names a file").to_string_lossy();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temporary = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(io("cannot write", &temporary)(error));
        }
        std::fs::rename(&temporary, &path).map_err(io("cannot rename into", &path))?;
        sync_dir(&dir)
    }

    /// Removes the object (Ok if it was not there).
    pub fn delete(&self, key: &str) -> Result<(), TargetError> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io("cannot remove", &path)(error)),
        }
    }

    /// The keys of the objects under `prefix` (a directory key), sorted;
    /// temporary files of unfinished writes are not listed.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, TargetError> {
        let dir = self.path(prefix)?;
        let mut keys = Vec::new();
        let mut stack = vec![(dir, prefix.to_owned())];
        while let Some((dir, key)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io("cannot list", &dir)(error)),
            };
            for entry in entries {
                let entry = entry.map_err(io("cannot list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let child = format!("{key}/{name}");
                if entry.file_type().map_err(io("cannot list", &dir))?.is_dir() {
                    stack.push((entry.path(), child));
                } else {
                    keys.push(child);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

fn sync_dir(dir: &Path) -> Result<(), TargetError> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io("cannot sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            TargetUrl::parse("file:///var/b").unwrap(),
            TargetUrl::File("/var/b".into())
        );
        for bad in ["file://relative", "file:///a/../b", "ftp://x", "/var/b", "s3://bucket"] {
            assert!(TargetUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects_are_written_whole_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = TargetUrl::File(dir.path().join("t")).open();
        target.ensure().unwrap();
        target.put("chunks/ab/abcd", b"one").unwrap();
        target.put("chunks/ab/abcd", b"two").unwrap();
        target.put("backups/x.json", b"{}").unwrap();
        assert_eq!(target.get("chunks/ab/abcd").unwrap().unwrap(), b"two");
        assert!(target.get("chunks/ab/none").unwrap().is_none());
        std::fs::write(dir.path().join("t/chunks/ab/.abcd.tmp-1-2"), b"torn").unwrap();
        assert_eq!(target.list("chunks").unwrap(), vec!["chunks/ab/abcd"]);
        target.delete("chunks/ab/abcd").unwrap();
        target.delete("chunks/ab/abcd").unwrap();
        assert!(!target.exists("chunks/ab/abcd").unwrap());
        for bad in ["", "../x", "a//b", "a/./b", "a b"] {
            assert!(target.get(bad).is_err(), "{bad:?}");
        }
    }
}
