//! The Docker volume plugin (plugin protocol v1, `VolumeDriver`), served on
//! a unix socket (default /run/docker/plugins/ballast.sock, where dockerd
//! finds it) by `ballast plugin serve` next to the host's node.
//!
//! Create makes a volume through the node's API (options: size, repl,
//! fs, encrypted, group); Mount attaches it to this host and mounts it
//! under the mounts directory (`volume mount`), counting the containers
//! (mount ids) that use it; Unmount unmounts and detaches when the last
//! one leaves. The counts are kept in `MOUNTS_DIR/plugin-state.json`, so a
//! restarted plugin still knows which containers hold which volume.
//! Docker sends no Content-Type and reads errors from the `Err` field.
//!
//! `--api` may list several nodes of this host (comma-separated): each
//! call goes to the first that answers, so when the plugin's node dies
//! (kill -9, crash) the next one serves the plugin, and a volume whose
//! host attachment died with it is attached again through that node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::client::ApiClient;

/// Where dockerd looks for plugin sockets.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ballast.sock";
/// Where volumes are mounted for containers.
pub const DEFAULT_MOUNTS: &str = "/var/lib/ballast/mounts";
/// The reference counts, in the mounts directory.
pub const STATE_FILE: &str = "plugin-state.json";
/// Content type of every answer.
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// How the plugin runs.
#[derive(Clone, Debug)]
pub struct PluginOptions {
    pub socket: PathBuf,
    /// The node APIs of this host, in order of preference.
    pub apis: Vec<String>,
    pub mounts: PathBuf,
}

/// How long a node may take to answer the plugin's "are you there".
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

struct Plugin {
    options: PluginOptions,
    /// Volume name → the mount ids (containers) using it on this host.
    refs: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Volume name → the block device it was mounted from.
    devices: Mutex<BTreeMap<String, PathBuf>>,
    /// Volume name → the filesystem Create asked for (made at first mount).
    filesystems: Mutex<BTreeMap<String, String>>,
    /// Index in `options.apis` of the node last used.
    current: Mutex<usize>,
}

/// One plugin call's body, as dockerd sends it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Request {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "ID")]
    id: String,
    #[serde(default)]
    opts: Option<BTreeMap<String, String>>,
}

/// The plugin's state file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    refs: BTreeMap<String, BTreeSet<String>>,
    #[serde(default)]
    devices: BTreeMap<String, PathBuf>,
    #[serde(default)]
    filesystems: BTreeMap<String, String>,
}

/// A call's body: JSON, or nothing (dockerd sends none to some calls).
pub fn decode_request(body: &[u8]) -> serde_json::Result<Request> {
    if body.is_empty() {
        Ok(Request::default())
    } else {
        serde_json::from_slice(body)
    }
}

/// What a Create asks for: the volume, the filesystem to make at its
/// first mount, and its I/O priority and limits if any option set them.
pub type CreateAsked = (crate::api::CreateBody, String, Option<crate::cluster::volumes::QosBody>);

/// The options a Create takes.
const CREATE_OPTIONS: [&str; 8] = [
    "size",
    "repl",
    "fs",
    "encrypted",
    "group",
    "io_priority",
    "iops_limit",
    "mib_per_s_limit",
];

/// The volume a Create asks for (see `CreateAsked`).
pub fn create_body(request: &Request) -> Result<CreateAsked> {
    let opts = request.opts.clone().unwrap_or_default();
    for key in opts.keys() {
        if !CREATE_OPTIONS.contains(&key.as_str()) {
            anyhow::bail!("unknown option {key:?}: ballast takes {}", CREATE_OPTIONS.join(", "));
        }
    }
    let size = opts.get("size").map_or("1GiB", String::as_str);
    let body = crate::api::CreateBody {
        name: request.name.clone(),
        size_bytes: crate::size::parse_size(size).with_context(|| format!("bad size {size:?}"))?,
        block_size_bytes: 4096,
        replicas: opts
            .get("repl")
            .map(|text| text.parse::<u32>())
            .transpose()
            .context("repl must be a number (1 to 5)")?
            .unwrap_or(1),
        encrypted: opts.get("encrypted").is_some_and(|v| v == "true" || v == "1"),
        passphrase: None,
        group: opts.get("group").cloned().unwrap_or_default(),
    };
    let fs = opts.get("fs").map_or("ext4", String::as_str);
    if fs != "ext4" && fs != "xfs" {
        anyhow::bail!("fs must be ext4 or xfs");
    }
    let limit = |key: &str| -> Result<Option<u64>> {
        opts.get(key)
            .map(|text| text.parse::<u64>())
            .transpose()
            .with_context(|| format!("{key} must be a whole number"))
    };
    let qos = crate::cluster::volumes::QosBody {
        io_priority: opts
            .get("io_priority")
            .map(|text| text.parse())
            .transpose()
            .map_err(anyhow::Error::msg)?
            .unwrap_or_default(),
        iops_limit: limit("iops_limit")?,
        mib_per_s_limit: limit("mib_per_s_limit")?,
    };
    crate::volume::qos::Limits {
        iops: qos.iops_limit,
        mib_per_s: qos.mib_per_s_limit,
    }
    .check()
    .map_err(anyhow::Error::msg)?;
    let asked = ["io_priority", "iops_limit", "mib_per_s_limit"]
        .iter()
        .any(|key| opts.contains_key(*key));
    Ok((body, fs.to_owned(), asked.then_some(qos)))
}

/// The plugin's state file's text.
pub fn decode_state(text: &str) -> serde_json::Result<Saved> {
    serde_json::from_str(text)
}

impl Plugin {
    /// The first node of this host that answers, starting from the one
    /// used last; an error naming every node tried if none does.
    fn node(&self) -> Result<(ApiClient, String)> {
        let apis = &self.options.apis;
        let mut current = self.current.lock();
        let mut failures = Vec::new();
        for step in 0..apis.len() {
            let index = (*current + step) % apis.len();
            let api = &apis[index];
            match ApiClient::with_timeout(api, PROBE_TIMEOUT).get::<Value>("/healthz") {
                Ok(_) => {
                    if index != *current {
                        tracing::warn!(from = %apis[*current], to = %api, "the plugin's node does not answer; using the next node of this host");
                        *current = index;
                    }
                    return Ok((ApiClient::new(api), api.clone()));
                }
                Err(error) => failures.push(format!("{api}: {error}")),
            }
        }
        anyhow::bail!("no ballast node of this host answers: {}", failures.join("; "))
    }

    fn client(&self) -> Result<ApiClient> {
        Ok(self.node()?.0)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.options.mounts.join(name)
    }

    fn save(&self, refs: &BTreeMap<String, BTreeSet<String>>) -> Result<()> {
        let text = serde_json::to_string_pretty(&Saved {
            refs: refs.clone(),
            devices: self.devices.lock().clone(),
            filesystems: self.filesystems.lock().clone(),
        })?;
        // Fsynced, then renamed, then the directory fsynced: a crash leaves
        // the old counts or the new ones, never a torn file.
        crate::datadir::write_atomic_bytes(&self.options.mounts.join(STATE_FILE), text.as_bytes(), 0o644)?;
        Ok(())
    }

    fn create(&self, request: &Request) -> Result<Value> {
        let (body, fs, qos) = create_body(request)?;
        let client = self.client()?;
        let _: crate::volume::VolumeInfo = client.post("/v1/volumes", &body)?;
        if let Some(qos) = qos {
            let path = format!("/v1/volumes/{}", crate::cli::volume::path_segment(&request.name));
            if let Err(error) = client.put_json::<_, crate::volume::VolumeInfo>(&format!("{path}/qos"), &qos) {
                // Not left half made: the volume goes with the refusal.
                let _ = client.delete(&path);
                return Err(error.into());
            }
        }
        self.filesystems.lock().insert(request.name.clone(), fs);
        self.save(&self.refs.lock())?;
        Ok(json!({ "Err": "" }))
    }

    fn remove(&self, request: &Request) -> Result<Value> {
        if self.refs.lock().get(&request.name).is_some_and(|ids| !ids.is_empty()) {
            anyhow::bail!("volume {} is mounted by a container on this host", request.name);
        }
        self.client()?.delete(&format!(
            "/v1/volumes/{}",
            crate::cli::volume::path_segment(&request.name)
        ))?;
        self.filesystems.lock().remove(&request.name);
        self.save(&self.refs.lock())?;
        Ok(json!({ "Err": "" }))
    }

    fn mount(&self, request: &Request) -> Result<Value> {
        let mountpoint = self.mountpoint(&request.name);
        let mut refs = self.refs.lock();
        let first = refs.get(&request.name).is_none_or(BTreeSet::is_empty);
        if first {
            let (client, api) = self.node()?;
            let fs = self
                .filesystems
                .lock()
                .get(&request.name)
                .cloned()
                .unwrap_or_else(|| "ext4".to_owned());
            let device = crate::cli::volume::mount_volume(&client, &api, &request.name, &mountpoint, &fs)?;
            self.devices.lock().insert(request.name.clone(), device);
        }
        refs.entry(request.name.clone()).or_default().insert(request.id.clone());
        self.save(&refs)?;
        tracing::info!(volume = %request.name, id = %request.id, users = refs[&request.name].len(), "plugin mount");
        Ok(json!({ "Mountpoint": mountpoint, "Err": "" }))
    }

    fn unmount(&self, request: &Request) -> Result<Value> {
        let mut refs = self.refs.lock();
        let Some(ids) = refs.get_mut(&request.name) else {
            anyhow::bail!("volume {} is not mounted on this host", request.name);
        };
        ids.remove(&request.id);
        if ids.is_empty() {
            self.release(&request.name)?;
            refs.remove(&request.name);
        }
        self.save(&refs)?;
        tracing::info!(volume = %request.name, id = %request.id, "plugin unmount");
        Ok(json!({ "Err": "" }))
    }

    /// Unmounts `name` and detaches it from this host. If the node that
    /// attached it is gone (its device fails every I/O), the filesystem is
    /// unmounted lazily and the loop device released here, so the volume
    /// can be attached again through another node.
    fn release(&self, name: &str) -> Result<()> {
        let recorded = self.devices.lock().get(name).cloned();
        let detached = self
            .client()
            .and_then(|client| crate::cli::volume::unmount_volume(&client, name));
        match detached {
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(volume = %name, error = %format!("{error:#}"), "no node of this host holds the volume's device any more; releasing it here");
                let mountpoint = self.mountpoint(name);
                crate::attach::unmount_even_if_dead(&mountpoint).map_err(anyhow::Error::msg)?;
                if let Some(device) = recorded {
                    crate::attach::release_stale_loop(&device, name);
                }
            }
        }
        self.devices.lock().remove(name);
        Ok(())
    }

    fn path(&self, request: &Request) -> Value {
        let mounted = self.refs.lock().get(&request.name).is_some_and(|ids| !ids.is_empty());
        let mountpoint = if mounted {
            self.mountpoint(&request.name).display().to_string()
        } else {
            String::new()
        };
        json!({ "Mountpoint": mountpoint, "Err": "" })
    }

    fn get(&self, request: &Request) -> Result<Value> {
        let info: crate::volume::VolumeInfo = self.client()?.get(&format!(
            "/v1/volumes/{}",
            crate::cli::volume::path_segment(&request.name)
        ))?;
        let Value::Object(mut answer) = self.path(request) else {
            unreachable!("path answers an object")
        };
        let volume = json!({
            "Name": info.name,
            "Mountpoint": answer.remove("Mountpoint").unwrap_or_default(),
            "Status": { "size_bytes": info.size_bytes, "replicas": info.replicas, "health": info.health, "coordinator": info.coordinator },
        });
        Ok(json!({ "Volume": volume, "Err": "" }))
    }

    fn list(&self) -> Result<Value> {
        let list: Vec<crate::volume::VolumeInfo> = self.client()?.get("/v1/volumes")?;
        let refs = self.refs.lock();
        let volumes: Vec<Value> = list
            .iter()
            .map(|info| {
                let mounted = refs.get(&info.name).is_some_and(|ids| !ids.is_empty());
                let mountpoint = if mounted {
                    self.mountpoint(&info.name).display().to_string()
                } else {
                    String::new()
                };
                json!({ "Name": info.name, "Mountpoint": mountpoint })
            })
            .collect();
        Ok(json!({ "Volumes": volumes, "Err": "" }))
    }
}

fn answer(value: Value) -> Response {
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], value.to_string()).into_response()
}

/// Runs one plugin call off the async threads; errors go into `Err`.
async fn call(plugin: Arc<Plugin>, body: Bytes, what: fn(&Plugin, &Request) -> Result<Value>) -> Response {
    let request = match decode_request(&body) {
        Ok(request) => request,
        Err(error) => return answer(json!({ "Err": format!("bad request body: {error}") })),
    };
    let done = tokio::task::spawn_blocking(move || what(&plugin, &request)).await;
    match done {
        Ok(Ok(value)) => answer(value),
        Ok(Err(error)) => {
            tracing::warn!(error = %format!("{error:#}"), "plugin call failed");
            answer(json!({ "Err": format!("{error:#}") }))
        }
        Err(error) => answer(json!({ "Err": error.to_string() })),
    }
}

fn router(plugin: Arc<Plugin>) -> Router {
    Router::new()
        .route(
            "/Plugin.Activate",
            post(|| async { answer(json!({ "Implements": ["VolumeDriver"] })) }),
        )
        .route(
            "/VolumeDriver.Capabilities",
            post(|| async { answer(json!({ "Capabilities": { "Scope": "global" } })) }),
        )
        .route(
            "/VolumeDriver.Create",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, Plugin::create)),
        )
        .route(
            "/VolumeDriver.Remove",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, Plugin::remove)),
        )
        .route(
            "/VolumeDriver.Mount",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, Plugin::mount)),
        )
        .route(
            "/VolumeDriver.Unmount",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, Plugin::unmount)),
        )
        .route(
            "/VolumeDriver.Path",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, |p, r| Ok(p.path(r)))),
        )
        .route(
            "/VolumeDriver.Get",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, Plugin::get)),
        )
        .route(
            "/VolumeDriver.List",
            post(|State(p): State<Arc<Plugin>>, b: Bytes| call(p, b, |p, _| p.list())),
        )
        .with_state(plugin)
}

/// Serves the plugin until SIGTERM or SIGINT.
pub fn serve(options: PluginOptions) -> Result<()> {
    if options.apis.is_empty() {
        anyhow::bail!("--api names no node");
    }
    if let Some(remote) = options.apis.iter().find(|api| !crate::cli::volume::is_local_api(api)) {
        anyhow::bail!("the plugin mounts on this host: point --api at this host's nodes, not {remote}");
    }
    std::fs::create_dir_all(&options.mounts).with_context(|| format!("cannot make {}", options.mounts.display()))?;
    let saved = match std::fs::read_to_string(options.mounts.join(STATE_FILE)) {
        Ok(text) => decode_state(&text)
            .with_context(|| format!("{} is not plugin state", options.mounts.join(STATE_FILE).display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Saved::default(),
        Err(error) => return Err(error.into()),
    };
    if let Some(parent) = options.socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot make {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(&options.socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&options.socket)
            .with_context(|| format!("cannot listen on {}", options.socket.display()))?;
        tracing::info!(socket = %options.socket.display(), mounts = %options.mounts.display(), nodes = ?options.apis, recovered = saved.refs.len(), "docker volume plugin ready");
        let socket = options.socket.clone();
        let plugin = Arc::new(Plugin {
            options,
            refs: Mutex::new(saved.refs),
            devices: Mutex::new(saved.devices),
            filesystems: Mutex::new(saved.filesystems),
            current: Mutex::new(0),
        });
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(term) = term.as_mut() { term.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        axum::serve(listener, router(plugin)).with_graceful_shutdown(stop).await?;
        let _ = std::fs::remove_file(&socket);
        Ok::<(), anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &str) -> Request {
        decode_request(body.as_bytes()).unwrap()
    }

    #[test]
    fn create_options_become_a_volume_or_a_clear_refusal() {
        let (body, fs, qos) = create_body(&request(r#"{"Name":"v"}"#)).unwrap();
        assert_eq!((body.size_bytes, body.replicas, fs.as_str()), (1 << 30, 1, "ext4"));
        assert!(qos.is_none());
        let (body, fs, qos) = create_body(&request(
            r#"{"Name":"v","Opts":{"size":"10GiB","repl":"3","fs":"xfs","encrypted":"true","group":"db","io_priority":"high","iops_limit":"5000"}}"#,
        ))
        .unwrap();
        assert_eq!((body.size_bytes, body.replicas, fs.as_str()), (10 << 30, 3, "xfs"));
        assert!(body.encrypted && body.group == "db");
        let qos = qos.unwrap();
        assert_eq!(
            (qos.io_priority, qos.iops_limit, qos.mib_per_s_limit),
            (crate::volume::qos::IoPriority::High, Some(5000), None)
        );
        for (opts, refusal) in [
            (r#"{"sise":"1GiB"}"#, "unknown option"),
            (r#"{"size":"lots"}"#, "bad size"),
            (r#"{"repl":"three"}"#, "repl must be a number"),
            (r#"{"fs":"ntfs"}"#, "ext4 or xfs"),
            (r#"{"io_priority":"urgent"}"#, "high, medium or low"),
            (r#"{"iops_limit":"0"}"#, "1 to"),
            (r#"{"mib_per_s_limit":"fast"}"#, "whole number"),
        ] {
            let error = create_body(&request(&format!(r#"{{"Name":"v","Opts":{opts}}}"#))).unwrap_err();
            assert!(format!("{error:#}").contains(refusal), "{opts}: {error:#}");
        }
    }

    #[test]
    fn an_empty_body_is_an_empty_request_and_bad_json_an_error() {
        assert!(decode_request(b"").unwrap().name.is_empty());
        assert!(decode_request(b"{not json").is_err());
        assert!(decode_state("[]").is_err());
        let state = decode_state(r#"{"refs":{"v1":["a"]}}"#).unwrap();
        assert!(state.devices.is_empty() && state.refs["v1"].contains("a"));
    }
}
