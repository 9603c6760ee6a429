//! The audit trail: one JSON line for every API request that changes
//! something (any method but GET and HEAD) and for every API request refused
//! for its credentials (401) or its rights (403), and for every NBD export
//! opened (200) or refused by policy (403), in `DATA_DIR/audit.log`.
//!
//! The file is created 0600 and only ever appended to; past
//! `ROTATE_BYTES` it becomes `audit.log.1` (the older ones shift up, the
//! oldest of `KEEP` goes). A line holds who (subject and role, from the
//! verified token; "-" when there was none), from where, what (method and
//! path), and the answer's HTTP status, never a token, a key or a body.
//! `ballast audit` reads them back.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file, in the data directory.
pub const FILE: &str = "audit.log";
/// Size past which the file is rotated.
pub const ROTATE_BYTES: u64 = 16 << 20;
/// Rotated files kept (`audit.log.1` .. `audit.log.KEEP`).
pub const KEEP: u32 = 4;

/// One audited request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The verified token's subject; "-" when the request had none that verified.
    pub subject: String,
    /// "admin", "user", or "-".
    pub role: String,
    /// The client's address.
    pub source: String,
    /// The HTTP method: POST, PUT, PATCH, DELETE (or GET when refused);
    /// "NBD open" for an NBD export.
    pub action: String,
    /// The path acted on, e.g. /v1/volumes/db1/snapshots; the volume for NBD.
    pub target: String,
    /// The answer's HTTP status (201, 401, 403, 409...).
    pub status: u16,
}

impl Entry {
    /// An entry of now for `caller` ("-" as subject and role without one).
    #[must_use]
    pub fn now(
        caller: Option<&crate::api::auth::Caller>,
        source: String,
        action: String,
        target: String,
        status: u16,
    ) -> Self {
        let (subject, role) = caller.map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |caller| (caller.subject.clone(), caller.role.as_str().to_owned()),
        );
        Self {
            time_unix_ms: now_unix_ms(),
            subject,
            role,
            source,
            action,
            target,
            status,
        }
    }
}

/// The append-only log of one node.
pub struct AuditLog {
    path: PathBuf,
    file: parking_lot::Mutex<Option<File>>,
}

impl AuditLog {
    /// The log in `data_dir` (opened on the first entry).
    #[must_use]
    pub fn in_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(FILE),
            file: parking_lot::Mutex::new(None),
        }
    }

    /// Appends `entry`. A failure is logged, never the request's: the
    /// request was already answered.
    pub fn record(&self, entry: &Entry) {
        let mut line = serde_json::to_vec(entry).expect("an entry serializes");
        line.push(b'\n');
        let mut file = self.file.lock();
        if let Err(error) = self.append(&mut file, &line) {
            *file = None;
            tracing::warn!(path = %self.path.display(), %error, "cannot write the audit log");
        }
    }

    fn append(&self, file: &mut Option<File>, line: &[u8]) -> std::io::Result<()> {
        if file.is_none() {
            *file = Some(open_append(&self.path)?);
        }
        let length = file.as_ref().map_or(Ok(0), |open| open.metadata().map(|m| m.len()))?;
        if length > 0 && length + line.len() as u64 > ROTATE_BYTES {
            *file = None;
            rotate(&self.path)?;
            *file = Some(open_append(&self.path)?);
        }
        file.as_mut().expect("opened above").write_all(line)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// `audit.log.N` → `.N+1` (the oldest dropped), `audit.log` → `.1`.
fn rotate(path: &Path) -> std::io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    let _ = std::fs::remove_file(numbered(KEEP));
    for n in (1..KEEP).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

/// Every entry of the log in `data_dir` (rotated files first, oldest
/// first) at or after `since_unix_ms`. A line that does not parse is
/// reported as an error, with its file and line number.
pub fn read(data_dir: &Path, since_unix_ms: u64) -> anyhow::Result<Vec<Entry>> {
    let path = data_dir.join(FILE);
    let mut files: Vec<PathBuf> = (1..=KEEP)
        .rev()
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        })
        .collect();
    files.push(path);
    let mut entries = Vec::new();
    for file in files {
        let Ok(opened) = File::open(&file) else {
            continue;
        };
        for (number, line) in std::io::BufReader::new(opened).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_str(&line)
                .map_err(|error| anyhow::anyhow!("{}:{}: not an audit entry: {error}", file.display(), number + 1))?;
            if entry.time_unix_ms >= since_unix_ms {
                entries.push(entry);
            }
        }
    }
    Ok(entries)
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> Entry {
        Entry {
            time_unix_ms: n,
            subject: "alice".into(),
            role: "user".into(),
            source: "127.0.0.1:5000".into(),
            action: "POST".into(),
            target: format!("/v1/volumes/v{n}"),
            status: 201,
        }
    }

    #[test]
    fn entries_are_appended_as_private_json_lines_and_read_back_since_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::in_dir(dir.path());
        for n in 1..=3 {
            log.record(&entry(n));
        }
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(FILE)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(dir.path(), 0).unwrap(), vec![entry(1), entry(2), entry(3)]);
        assert_eq!(read(dir.path(), 2).unwrap(), vec![entry(2), entry(3)]);
    }

    #[test]
    fn a_full_log_rotates_keeping_every_entry_of_the_kept_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        // A log just under the limit: the next entry goes to a new file.
        let filler = serde_json::to_string(&entry(0)).unwrap() + "\n";
        let copies = usize::try_from(ROTATE_BYTES).unwrap() / filler.len();
        std::fs::write(&path, filler.repeat(copies)).unwrap();
        let log = AuditLog::in_dir(dir.path());
        log.record(&entry(7));
        assert!(dir.path().join("audit.log.1").exists());
        let entries = read(dir.path(), 0).unwrap();
        assert_eq!(entries.len(), copies + 1);
        assert_eq!(entries.last(), Some(&entry(7)));
    }

    #[test]
    fn a_damaged_line_is_reported_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "{\"time_unix_ms\": 1}\n").unwrap();
        let error = read(dir.path(), 0).unwrap_err().to_string();
        assert!(error.contains("audit.log:1"), "{error}");
    }
}
