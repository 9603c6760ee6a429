//! The daemon's configuration: an optional TOML file, overridden by flags.
//!
//! ```toml
//! data_dir = "/var/lib/ballast"
//! listen_api = "127.0.0.1:9410"
//! listen_nbd = "127.0.0.1:10809"
//! nbd_tls = "required"   # or "plaintext-on-loopback": nbd:// too, when listen_nbd is loopback
//! nbd_tls_names = ["storage-a.example", "10.0.0.5"]  # more names the NBD certificate carries
//! listen_peer = "127.0.0.1:9411"   # other nodes reach this one here (Raft, replication)
//! name = "host-a"        # shown in `ballast cluster status` (default: the host name)
//! labels = { zone = "a", rack = "r12" }   # placement spreads replicas over distinct zones
//! failover_after_s = 4   # as Raft leader: serve a volume elsewhere when its node has shown no sign of life (lease renewal or ping answer) this long (0: never)
//! rebuild_after_s = 600  # as Raft leader: rebuild replicas of a node silent this long elsewhere (0: never)
//! replica_timeout_ms = 5000  # as coordinator: drop a replica from the in-sync set after this long without an answer
//! scrub_interval_hours = 168  # as coordinator: verify every copy of each volume this often (0: only `ballast scrub start`)
//! scrub_mib_per_s = 64   # as coordinator: the most data a verifying scrub reads per second (1 to 10000)
//! discard_mib_per_s = 2560  # freed disk space told to the SSD (discard/TRIM), at most this fast (0: never)
//! alert_webhook = "http://alerts.example:8080/ballast"  # as Raft leader: POST each alert change here as JSON
//! jwt_issuer = "https://idp.example"     # also accept API tokens of this identity provider ...
//! jwt_public_key_file = "/etc/ballast/idp.pem"  # ... signed with this key (RSA, EC P-256, Ed25519)
//! jwt_jwks_file = "/etc/ballast/idp-jwks.json"  # ... or one of these
//! cores = "0-3"          # reactor cores (default: every core the process may use)
//! thread_pool = false    # force the pread/pwrite engine instead of io_uring
//! attach_backend = "auto"  # host attach devices: auto (ublk, else nbd, else fuse-uring when switched on, else fuse), ublk, nbd, fuse-uring, fuse
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

pub const DEFAULT_LISTEN_API: &str = "127.0.0.1:9410";
pub const DEFAULT_LISTEN_NBD: &str = "127.0.0.1:10809";
pub const DEFAULT_LISTEN_PEER: &str = "127.0.0.1:9411";

/// Errors reading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// the file could not be read
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the file is not valid
    #[error("config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// a required setting is missing
    #[error("{0}")]
    Missing(String),
    /// an address does not parse
    #[error("{setting}: {value:?} is not an address like 127.0.0.1:9410")]
    Address { setting: &'static str, value: String },
    /// a label is not KEY=VALUE
    #[error("label {0:?} is not KEY=VALUE (letters, digits, '-', '_', '.')")]
    Label(String),
}

/// The file's settings (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub listen_api: Option<String>,
    pub listen_nbd: Option<String>,
    pub nbd_tls: Option<crate::nbd::tls::TlsMode>,
    pub nbd_tls_names: Option<Vec<String>>,
    pub listen_peer: Option<String>,
    pub cores: Option<String>,
    pub thread_pool: Option<bool>,
    pub name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub failover_after_s: Option<u64>,
    pub rebuild_after_s: Option<u64>,
    pub replica_timeout_ms: Option<u64>,
    pub scrub_interval_hours: Option<u64>,
    pub scrub_mib_per_s: Option<u64>,
    pub discard_mib_per_s: Option<u64>,
    pub alert_webhook: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_jwks_file: Option<PathBuf>,
    pub attach_backend: Option<crate::attach::Backend>,
}

impl ConfigFile {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            reason: error.message().to_owned(),
        })
    }
}

/// The settings the daemon runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen_api: SocketAddr,
    pub listen_nbd: SocketAddr,
    pub nbd_tls: crate::nbd::tls::TlsMode,
    /// More names the NBD certificate carries.
    pub nbd_tls_names: Vec<String>,
    /// How host attach makes block devices.
    pub attach_backend: crate::attach::Backend,
    pub listen_peer: SocketAddr,
    pub cores: Option<String>,
    pub thread_pool: bool,
    /// The node's name in the cluster.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub automation: crate::cluster::automation::Automation,
    pub replica_timeout: std::time::Duration,
    /// How often each volume is verified (None: only on request).
    pub scrub_interval: Option<std::time::Duration>,
    /// The most a verifying scrub reads per second, in bytes.
    pub scrub_bytes_per_s: u64,
    /// The most freed disk space told to the devices per second, in bytes (0: no discards).
    pub discard_bytes_per_s: u64,
    /// Where the leader POSTs alert changes (http:// URL).
    pub alert_webhook: Option<String>,
    /// An identity provider whose API tokens are accepted: (issuer, public key file, JWKS file).
    pub jwt: Option<(String, Option<PathBuf>, Option<PathBuf>)>,
    /// Tests only (a hidden flag): a fault plan for the disks' I/O.
    pub inject_faults: Option<PathBuf>,
}

/// Parses `KEY=VALUE` labels (flags), checking their characters.
pub fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for pair in pairs {
        let (key, value) = pair.split_once('=').ok_or_else(|| ConfigError::Label(pair.clone()))?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    check_labels(&labels)?;
    Ok(labels)
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let ok = |text: &str| {
        !text.is_empty()
            && text.len() <= 63
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    for (key, value) in labels {
        if !ok(key) || !ok(value) {
            return Err(ConfigError::Label(format!("{key}={value}")));
        }
    }
    Ok(())
}

fn automation(failover_after_s: Option<u64>, rebuild_after_s: Option<u64>) -> crate::cluster::automation::Automation {
    let defaults = crate::cluster::automation::Automation::default();
    let seconds = |value: Option<u64>, default: Option<std::time::Duration>| match value {
        None => default,
        Some(0) => None,
        Some(seconds) => Some(std::time::Duration::from_secs(seconds)),
    };
    crate::cluster::automation::Automation {
        failover_after: seconds(failover_after_s, defaults.failover_after),
        rebuild_after: seconds(rebuild_after_s, defaults.rebuild_after),
    }
}

/// This host's name (for the node's default name).
#[must_use]
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "ballast".into())
}

fn address(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Address {
        setting,
        value: value.to_owned(),
    })
}

impl NodeConfig {
    /// Merges flags (`overrides`) over the file's settings over defaults.
    pub fn resolve(file: ConfigFile, overrides: ConfigFile) -> Result<Self, ConfigError> {
        let data_dir = overrides.data_dir.or(file.data_dir).ok_or_else(|| {
            ConfigError::Missing("no data directory: pass --data-dir DIR or set data_dir in the config file".into())
        })?;
        let listen_api = overrides
            .listen_api
            .or(file.listen_api)
            .unwrap_or_else(|| DEFAULT_LISTEN_API.into());
        let listen_nbd = overrides
            .listen_nbd
            .or(file.listen_nbd)
            .unwrap_or_else(|| DEFAULT_LISTEN_NBD.into());
        let listen_peer = overrides
            .listen_peer
            .or(file.listen_peer)
            .unwrap_or_else(|| DEFAULT_LISTEN_PEER.into());
        let labels = overrides.labels.or(file.labels).unwrap_or_default();
        check_labels(&labels)?;
        Ok(Self {
            inject_faults: None,
            data_dir,
            listen_api: address("listen_api", &listen_api)?,
            listen_nbd: address("listen_nbd", &listen_nbd)?,
            nbd_tls: overrides.nbd_tls.or(file.nbd_tls).unwrap_or_default(),
            nbd_tls_names: overrides.nbd_tls_names.or(file.nbd_tls_names).unwrap_or_default(),
            attach_backend: overrides.attach_backend.or(file.attach_backend).unwrap_or_default(),
            listen_peer: address("listen_peer", &listen_peer)?,
            cores: overrides.cores.or(file.cores),
            thread_pool: overrides.thread_pool.or(file.thread_pool).unwrap_or(false),
            name: overrides.name.or(file.name).unwrap_or_else(host_name),
            labels,
            automation: automation(
                overrides.failover_after_s.or(file.failover_after_s),
                overrides.rebuild_after_s.or(file.rebuild_after_s),
            ),
            replica_timeout: match overrides.replica_timeout_ms.or(file.replica_timeout_ms) {
                None => crate::replication::REPLICA_TIMEOUT_DEFAULT,
                Some(ms) if (100..=600_000).contains(&ms) => std::time::Duration::from_millis(ms),
                Some(ms) => {
                    return Err(ConfigError::Missing(format!(
                        "replica_timeout_ms {ms} is out of range: use 100 to 600000"
                    )))
                }
            },
            scrub_interval: match overrides.scrub_interval_hours.or(file.scrub_interval_hours) {
                None => Some(crate::replication::scrub::SCRUB_INTERVAL_DEFAULT),
                Some(0) => None,
                Some(hours) if hours <= 24 * 366 => Some(std::time::Duration::from_secs(hours * 3600)),
                Some(hours) => {
                    return Err(ConfigError::Missing(format!(
                        "scrub_interval_hours {hours} is out of range: use 0 (off) to 8784"
                    )))
                }
            },
            scrub_bytes_per_s: match overrides.scrub_mib_per_s.or(file.scrub_mib_per_s) {
                None => crate::replication::scrub::SCRUB_BYTES_PER_S_DEFAULT,
                Some(mib) if (1..=10_000).contains(&mib) => mib << 20,
                Some(mib) => {
                    return Err(ConfigError::Missing(format!(
                        "scrub_mib_per_s {mib} is out of range: use 1 to 10000"
                    )))
                }
            },
            discard_bytes_per_s: match overrides.discard_mib_per_s.or(file.discard_mib_per_s) {
                None => crate::engine::DISCARD_BYTES_PER_S_DEFAULT,
                Some(mib) if mib <= 100_000 => mib << 20,
                Some(mib) => {
                    return Err(ConfigError::Missing(format!(
                        "discard_mib_per_s {mib} is out of range: use 0 (no discards) to 100000"
                    )))
                }
            },
            alert_webhook: match overrides.alert_webhook.or(file.alert_webhook) {
                Some(url) if !url.starts_with("http://") && !url.starts_with("https://") => {
                    return Err(ConfigError::Missing(format!(
                        "alert_webhook {url:?} is not an http:// or https:// URL"
                    )))
                }
                other => other,
            },
            jwt: {
                let issuer = overrides.jwt_issuer.or(file.jwt_issuer);
                let key = overrides.jwt_public_key_file.or(file.jwt_public_key_file);
                let jwks = overrides.jwt_jwks_file.or(file.jwt_jwks_file);
                match issuer {
                    Some(issuer) => Some((issuer, key, jwks)),
                    None if key.is_some() || jwks.is_some() => {
                        return Err(ConfigError::Missing(
                            "jwt_public_key_file and jwt_jwks_file need jwt_issuer (the iss their tokens carry)".into(),
                        ))
                    }
                    None => None,
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: ConfigFile =
            toml::from_str("data_dir = \"/a\"\nlisten_nbd = \"127.0.0.1:1\"\ncores = \"0\"").unwrap();
        let flags = ConfigFile {
            listen_nbd: Some("127.0.0.1:2".into()),
            ..ConfigFile::default()
        };
        let config = NodeConfig::resolve(file, flags).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/a"));
        assert_eq!(config.listen_nbd.port(), 2);
        assert_eq!(config.listen_api.port(), 9410);
        assert_eq!(config.cores.as_deref(), Some("0"));
    }

    #[test]
    fn automation_and_replica_timeout_take_zero_as_off_and_bound_the_timeout() {
        let file: ConfigFile =
            toml::from_str("data_dir = \"/a\"\nfailover_after_s = 0\nreplica_timeout_ms = 1500").unwrap();
        let config = NodeConfig::resolve(file, ConfigFile::default()).unwrap();
        assert_eq!(config.automation.failover_after, None);
        assert!(config.automation.rebuild_after.is_some());
        assert_eq!(config.replica_timeout, std::time::Duration::from_millis(1500));
        let file: ConfigFile = toml::from_str("data_dir = \"/a\"\nreplica_timeout_ms = 5").unwrap();
        assert!(NodeConfig::resolve(file, ConfigFile::default()).is_err());
    }

    #[test]
    fn discards_default_on_take_zero_as_off_and_refuse_absurd_rates() {
        let file: ConfigFile = toml::from_str("data_dir = \"/a\"").unwrap();
        let config = NodeConfig::resolve(file, ConfigFile::default()).unwrap();
        assert_eq!(config.discard_bytes_per_s, crate::engine::DISCARD_BYTES_PER_S_DEFAULT);
        let file: ConfigFile = toml::from_str("data_dir = \"/a\"\ndiscard_mib_per_s = 0").unwrap();
        assert_eq!(
            NodeConfig::resolve(file, ConfigFile::default())
                .unwrap()
                .discard_bytes_per_s,
            0
        );
        let file: ConfigFile = toml::from_str("data_dir = \"/a\"\ndiscard_mib_per_s = 1000000").unwrap();
        let error = NodeConfig::resolve(file, ConfigFile::default()).unwrap_err();
        assert!(error.to_string().contains("discard_mib_per_s"), "{error}");
    }

    #[test]
    fn unknown_keys_and_bad_addresses_are_errors() {
        assert!(toml::from_str::<ConfigFile>("datadir = \"/a\"").is_err());
        let file = ConfigFile {
            data_dir: Some("/a".into()),
            listen_api: Some("localhost".into()),
            ..ConfigFile::default()
        };
        assert!(matches!(
            NodeConfig::resolve(file, ConfigFile::default()),
            Err(ConfigError::Address { .. })
        ));
        assert!(matches!(
            NodeConfig::resolve(ConfigFile::default(), ConfigFile::default()),
            Err(ConfigError::Missing(_))
        ));
    }
}
