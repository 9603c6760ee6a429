//! Where backups are kept: objects named by `/`-separated keys. A
//! `file:///path` target is a directory (an NFS mount, a USB disk): each
//! object is written to a temporary name, synced, renamed into place and
//! its directory synced, so a crash leaves either the old object or the
//! new one, never a torn one, and never a name without its bytes. An
//! `s3://bucket/prefix` target is any S3-compatible store (`object_store`;
//! a PUT is whole or absent there too). Every call blocks: the node makes
//! them on blocking threads, the CLI from its main thread.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("{url:?} is not a backup target: {why} (targets are file:///absolute/path or s3://bucket[/prefix])")]
    BadUrl { url: String, why: String },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error(
        "the target is full: {what} {path}: {error}; free space there, or delete old backups (`ballast backup delete`)"
    )]
    Full {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("the S3 store refused the credentials: {what} {key}: {error} (check --credentials-file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may use this bucket)")]
    Denied {
        what: &'static str,
        key: String,
        error: String,
    },
    #[error("object key {0:?} is not valid")]
    BadKey(String),
    #[error("{what} {key}: {error}")]
    S3 {
        what: &'static str,
        key: String,
        error: String,
    },
}

/// A parsed target address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
}

/// How to reach an S3-compatible target; what is not given is taken from
/// the usual AWS_* variables of the process that opens the target.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetOptions {
    /// The endpoint (e.g. http://10.0.0.5:9000 for MinIO); AWS when None.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for TargetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
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
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !bucket_ok {
                return Err(bad("a bucket name is 3-63 of a-z 0-9 . -"));
            }
            let prefix = prefix.trim_end_matches('/').to_owned();
            if !prefix.is_empty() {
                check_key(&prefix).map_err(|_| bad("the prefix is /-separated parts of A-Z a-z 0-9 - _ ."))?;
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix,
            });
        }
        Err(bad("unknown scheme"))
    }

    /// Opens the target (`options` for S3).
    pub fn open(&self, options: &TargetOptions) -> Result<Target, TargetError> {
        match self {
            Self::File(root) => Ok(Target::File(FileTarget { root: root.clone() })),
            Self::S3 { bucket, prefix } => Ok(Target::S3(S3Target::new(bucket, prefix, options)?)),
        }
    }
}

/// An opened target.
#[derive(Clone, Debug)]
pub enum Target {
    File(FileTarget),
    S3(S3Target),
}

impl Target {
    /// What to call the target in messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::File(file) => file.root.display().to_string(),
            Self::S3(s3) => s3.describe(),
        }
    }

    pub fn ensure(&self) -> Result<(), TargetError> {
        match self {
            Self::File(file) => file.ensure(),
            Self::S3(_) => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TargetError> {
        match self {
            Self::File(file) => file.get(key),
            Self::S3(s3) => s3.get(key),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool, TargetError> {
        match self {
            Self::File(file) => file.exists(key),
            Self::S3(s3) => s3.exists(key),
        }
    }

    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), TargetError> {
        match self {
            Self::File(file) => file.put(key, bytes),
            Self::S3(s3) => s3.put(key, bytes),
        }
    }

    pub fn delete(&self, key: &str) -> Result<(), TargetError> {
        match self {
            Self::File(file) => file.delete(key),
            Self::S3(s3) => s3.delete(key),
        }
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<String>, TargetError> {
        match self {
            Self::File(file) => file.list(prefix),
            Self::S3(s3) => s3.list(prefix),
        }
    }

    /// Deletes `key` without waiting where waiting may not be allowed (a
    /// lock released by a drop inside the node's runtime).
    pub fn delete_soon(&self, key: &str) {
        let outcome = match self {
            Self::File(file) => file.delete(key),
            Self::S3(s3) => s3.delete_soon(key),
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "cannot remove a backup target's object");
        }
    }
}

/// Runs the S3 client's futures: on the node's runtime (from its blocking
/// threads), or on a runtime of its own in the CLI.
#[derive(Clone, Debug)]
enum Exec {
    Node(tokio::runtime::Handle),
    Own(Arc<tokio::runtime::Runtime>),
}

/// An S3-compatible bucket, under a prefix.
#[derive(Clone)]
pub struct S3Target {
    store: Arc<object_store::aws::AmazonS3>,
    bucket: String,
    prefix: String,
    exec: Exec,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl S3Target {
    fn new(bucket: &str, prefix: &str, options: &TargetOptions) -> Result<Self, TargetError> {
        use object_store::aws::AmazonS3Builder;
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // A target that does not answer fails in seconds, not after object_store's 3 minutes of
        // retries. (Client options first: they replace the allow_http set below.)
        builder = builder
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
                backoff: object_store::BackoffConfig::default(),
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(std::time::Duration::from_secs(5))
                    .with_timeout(std::time::Duration::from_secs(120)),
            );
        if let Some(endpoint) = &options.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let region = options
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_owned());
        builder = builder.with_region(region);
        if let Some(id) = &options.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret.as_str());
        }
        let store = builder.build().map_err(|error| TargetError::S3 {
            what: "cannot set up",
            key: format!("s3://{bucket}"),
            error: error.to_string(),
        })?;
        let exec = match tokio::runtime::Handle::try_current() {
            Ok(handle) => Exec::Node(handle),
            Err(_) => Exec::Own(Arc::new(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| TargetError::S3 {
                        what: "cannot start an S3 client for",
                        key: format!("s3://{bucket}"),
                        error: error.to_string(),
                    })?,
            )),
        };
        Ok(Self {
            store: Arc::new(store),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            exec,
        })
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<object_store::path::Path, TargetError> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        })
    }

    fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        match &self.exec {
            Exec::Node(handle) => handle.block_on(future),
            Exec::Own(runtime) => runtime.block_on(future),
        }
    }

    fn error(&self, what: &'static str, key: &str, error: &object_store::Error) -> TargetError {
        let key = format!("{}/{key}", self.describe());
        match error {
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => TargetError::Denied {
                what,
                key,
                error: s3_said(&source.to_string()),
            },
            other => TargetError::S3 {
                what,
                key,
                error: s3_said(&other.to_string()),
            },
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TargetError> {
        use object_store::ObjectStore;
        let path = self.path(key)?;
        self.block_on(async {
            match self.store.get(&path).await {
                Ok(answer) => answer
                    .bytes()
                    .await
                    .map(|bytes| Some(bytes.to_vec()))
                    .map_err(|error| self.error("cannot read", key, &error)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(error) => Err(self.error("cannot read", key, &error)),
            }
        })
    }

    fn exists(&self, key: &str) -> Result<bool, TargetError> {
        use object_store::ObjectStore;
        let path = self.path(key)?;
        self.block_on(async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(error) => Err(self.error("cannot look at", key, &error)),
            }
        })
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), TargetError> {
        use object_store::ObjectStore;
        let path = self.path(key)?;
        let payload = object_store::PutPayload::from(bytes.to_vec());
        self.block_on(self.store.put(&path, payload))
            .map(|_| ())
            .map_err(|error| self.error("cannot write", key, &error))
    }

    fn delete(&self, key: &str) -> Result<(), TargetError> {
        use object_store::ObjectStore;
        let path = self.path(key)?;
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error("cannot remove", key, &error)),
        }
    }

    fn delete_soon(&self, key: &str) -> Result<(), TargetError> {
        use object_store::ObjectStore;
        match &self.exec {
            Exec::Own(_) => self.delete(key),
            Exec::Node(handle) => {
                let (store, path) = (Arc::clone(&self.store), self.path(key)?);
                handle.spawn(async move { store.delete(&path).await });
                Ok(())
            }
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, TargetError> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let path = self.path(prefix)?;
        let root = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut keys: Vec<String> = self
            .block_on(self.store.list(Some(&path)).try_collect::<Vec<_>>())
            .map_err(|error| self.error("cannot list", prefix, &error))?
            .into_iter()
            .filter_map(|meta| meta.location.as_ref().strip_prefix(&root).map(str::to_owned))
            .collect();
        keys.sort();
        Ok(keys)
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

/// An S3 client error as the status and the store's own code and message
/// (`403 Forbidden: InvalidAccessKeyId: The AWS Access Key Id ...`) when
/// it sent its XML error body; otherwise as it is.
fn s3_said(text: &str) -> String {
    let tag = |name: &str| {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        let start = text.find(&open)? + open.len();
        let end = start + text[start..].find(&close)?;
        Some(&text[start..end])
    };
    let (Some(code), Some(message)) = (tag("Code"), tag("Message")) else {
        return text.to_owned();
    };
    let status = text
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.split_once(": <"))
        .map_or(String::new(), |(status, _)| format!("{status}: "));
    format!("{status}{code}: {message}")
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TargetError + 'a {
    move |error| {
        let path = path.display().to_string();
        if matches!(
            error.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) {
            TargetError::Full { what, path, error }
        } else {
            TargetError::Io { what, path, error }
        }
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
    fn an_s3_error_body_is_told_by_its_code_and_message() {
        let said = "Error performing GET http://h/b/config.json in 3ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our records.</Message><RequestId>x</RequestId></Error>";
        assert_eq!(
            s3_said(said),
            "403 Forbidden: InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records."
        );
        assert_eq!(s3_said("connection refused"), "connection refused");
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            TargetUrl::parse("file:///var/b").unwrap(),
            TargetUrl::File("/var/b".into())
        );
        assert_eq!(
            TargetUrl::parse("s3://my-bucket/backups/pg/").unwrap(),
            TargetUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "backups/pg".into()
            }
        );
        for bad in [
            "file://relative",
            "file:///a/../b",
            "ftp://x",
            "/var/b",
            "s3://B",
            "s3://bucket/a//b",
        ] {
            assert!(TargetUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects_are_written_whole_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let Target::File(target) = TargetUrl::File(dir.path().join("t"))
            .open(&TargetOptions::default())
            .unwrap()
        else {
            unreachable!()
        };
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
