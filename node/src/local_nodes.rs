//! How the CLI on a node's host finds that node's admin token without
//! being told: a running node records its data directory under
//! `/run/ballast/api/`, in a file named by its API address (root only,
//! removed when it stops); the CLI looks up the address it calls.
//!
//! ```text
//! /run/ballast/api/127.0.0.1:9410    contents: /var/lib/ballast   (the data directory)
//! ```
//! A node listening on every address (0.0.0.0 or [::]) is found by a call
//! to a loopback address of its port. A record left by a killed node names
//! a data directory whose token is still that node's, or is gone: either
//! way nothing is trusted but the token file itself.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Where running nodes record themselves.
pub const RECORDS_DIR: &str = "/run/ballast/api";

/// A node's record; removed when dropped (the node stopped cleanly).
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records that the node serving its API on `listen` keeps its data in
/// `data_dir`; None (logged at debug) where it cannot (not root).
#[must_use]
pub fn record(listen: SocketAddr, data_dir: &Path) -> Option<Record> {
    record_in(Path::new(RECORDS_DIR), listen, data_dir)
}

fn record_in(records: &Path, listen: SocketAddr, data_dir: &Path) -> Option<Record> {
    use std::os::unix::fs::DirBuilderExt;
    prune(records);
    let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let path = records.join(listen.to_string());
    let written = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(records)
        .map_err(|error| error.to_string())
        .and_then(|()| {
            let text = data_dir.to_str().ok_or("the data directory's path is not UTF-8")?;
            crate::datadir::write_atomic(&path, text).map_err(|error| error.to_string())?;
            Ok::<_, String>(path)
        });
    match written {
        Ok(path) => Some(Record { path }),
        Err(error) => {
            tracing::debug!(%error, dir = %records.display(), "cannot record this node for the local CLI");
            None
        }
    }
}

/// Removes the records of killed nodes whose data directory is gone.
fn prune(records: &Path) {
    let Ok(entries) = std::fs::read_dir(records) else {
        return;
    };
    for entry in entries.flatten() {
        let gone = std::fs::read(entry.path())
            .ok()
            .and_then(|text| String::from_utf8(text).ok())
            .is_some_and(|dir| !Path::new(&dir).is_dir());
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The data directory of the node on this host whose API is `api_url`
/// (`http://HOST:PORT`), if one recorded itself.
#[must_use]
pub fn data_dir_of(api_url: &str) -> Option<PathBuf> {
    data_dir_in(Path::new(RECORDS_DIR), api_url)
}

fn data_dir_in(records: &Path, api_url: &str) -> Option<PathBuf> {
    let address = address_of(api_url)?;
    let mut candidates = vec![address];
    if address.ip().is_loopback() {
        // A node listening on every address answers on loopback too.
        candidates.push(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), address.port()));
        candidates.push(SocketAddr::new(IpAddr::from([0u16; 8]), address.port()));
    }
    candidates.into_iter().find_map(|candidate| {
        let text = std::fs::read(records.join(candidate.to_string())).ok()?;
        let path = PathBuf::from(std::ffi::OsString::from(String::from_utf8(text).ok()?));
        path.is_dir().then_some(path)
    })
}

/// `http://HOST:PORT[/...]` as a socket address (`localhost` is 127.0.0.1).
fn address_of(api_url: &str) -> Option<SocketAddr> {
    let rest = api_url
        .strip_prefix("http://")
        .or_else(|| api_url.strip_prefix("https://"))?;
    let authority = rest.split('/').next()?;
    let authority = authority
        .strip_prefix("localhost:")
        .map_or_else(|| authority.to_owned(), |port| format!("127.0.0.1:{port}"));
    authority.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_node_is_found_by_its_api_url_and_forgotten_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (records, data) = (dir.path().join("api"), dir.path().join("data"));
        std::fs::create_dir(&data).unwrap();
        let record = record_in(&records, "127.0.0.5:9410".parse().unwrap(), &data).unwrap();
        let found = data_dir_in(&records, "http://127.0.0.5:9410").unwrap();
        assert_eq!(found, std::fs::canonicalize(&data).unwrap());
        assert_eq!(data_dir_in(&records, "http://127.0.0.5:9410/"), Some(found));
        assert_eq!(data_dir_in(&records, "http://127.0.0.5:9411"), None, "another port");
        assert_eq!(data_dir_in(&records, "http://127.0.0.6:9410"), None, "another address");
        drop(record);
        assert_eq!(data_dir_in(&records, "http://127.0.0.5:9410"), None);
    }

    #[test]
    fn a_node_on_every_address_is_found_through_loopback_and_localhost() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("api");
        let _record = record_in(&records, "0.0.0.0:7000".parse().unwrap(), dir.path()).unwrap();
        assert!(data_dir_in(&records, "http://127.0.0.1:7000").is_some());
        assert!(data_dir_in(&records, "http://localhost:7000").is_some());
        assert_eq!(data_dir_in(&records, "http://10.1.2.3:7000"), None, "not a local call");
    }

    #[test]
    fn a_record_of_a_data_directory_that_is_gone_or_a_bad_url_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("api");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let _record = record_in(&records, "127.0.0.1:7001".parse().unwrap(), &data).unwrap();
        std::fs::remove_dir(&data).unwrap();
        assert_eq!(data_dir_in(&records, "http://127.0.0.1:7001"), None);
        // The next node to record itself clears it away.
        let _other = record_in(&records, "127.0.0.1:7002".parse().unwrap(), dir.path()).unwrap();
        assert!(
            !records.join("127.0.0.1:7001").exists(),
            "a killed node's record of a removed data directory"
        );
        for bad in [
            "",
            "127.0.0.1:7001",
            "http://",
            "http://host-name:7001",
            "ftp://127.0.0.1:7001",
        ] {
            assert_eq!(data_dir_in(&records, bad), None, "{bad:?}");
        }
    }
}
