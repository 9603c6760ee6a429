//! The daemon's configuration: an optional TOML file, overridden by flags.
//!
//! ```toml
//! data_dir = "/var/lib/ballast"
//! listen_api = "127.0.0.1:9410"
//! listen_nbd = "127.0.0.1:10809"
//! listen_peer = "127.0.0.1:9411"
//! cores = "0-3"          # reactor cores (default: every core the process may use)
//! thread_pool = false    # force the pread/pwrite engine instead of io_uring
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

pub const DEFAULT_LISTEN_API: &str = "127.0.0.1:9410";
pub const DEFAULT_LISTEN_NBD: &str = "127.0.0.1:10809";

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
}

/// The file's settings (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub listen_api: Option<String>,
    pub listen_nbd: Option<String>,
    pub listen_peer: Option<String>,
    pub cores: Option<String>,
    pub thread_pool: Option<bool>,
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
    pub listen_peer: Option<SocketAddr>,
    pub cores: Option<String>,
    pub thread_pool: bool,
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
        let listen_peer = overrides.listen_peer.or(file.listen_peer);
        Ok(Self {
            data_dir,
            listen_api: address("listen_api", &listen_api)?,
            listen_nbd: address("listen_nbd", &listen_nbd)?,
            listen_peer: listen_peer.map(|peer| address("listen_peer", &peer)).transpose()?,
            cores: overrides.cores.or(file.cores),
            thread_pool: overrides.thread_pool.or(file.thread_pool).unwrap_or(false),
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
