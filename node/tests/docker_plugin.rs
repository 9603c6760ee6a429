//! The Docker volume plugin at the protocol level: requests exactly as
//! dockerd sends them (HTTP/1.1 POST over the unix socket, JSON body, no
//! Content-Type) to a real `ballast plugin serve` next to a real node:
//! create, two containers mounting one volume, a plugin restart that keeps
//! the mount counts, the last unmount detaching, remove, and errors in
//! `Err`. (The run with a real Docker engine is still to come: issue 8.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::TestNode;
use common::{ballast, host_attach_available};

struct PluginProcess {
    child: Child,
}

impl PluginProcess {
    fn start(node: &TestNode, socket: &Path, mounts: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = ballast()
            .env("BALLAST_API", node.api_url())
            .env("BALLAST_TOKEN_FILE", node.token_file())
            .args(["plugin", "serve", "--socket"])
            .arg(socket)
            .arg("--mounts")
            .arg(mounts)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "plugin socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    /// SIGTERM by pid, then reap.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// Unmounts, detaches and unmounts FUSE on any exit.
struct Leftovers {
    mountpoint: PathBuf,
    fuse_dir: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        if let Ok(output) = Command::new("losetup").arg("-a").output() {
            let fuse_dir = self.fuse_dir.display().to_string();
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                if line.contains(&fuse_dir) {
                    if let Some(device) = line.split(':').next() {
                        let _ = Command::new("losetup").arg("-d").arg(device).output();
                    }
                }
            }
        }
        let _ = Command::new("fusermount3").arg("-u").arg(&self.fuse_dir).output();
    }
}

/// One plugin call, the way dockerd makes it.
fn call(socket: &Path, endpoint: &str, body: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        stream,
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{endpoint}: {response}");
    let json = &response[response.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(json).unwrap_or_else(|_| panic!("{endpoint}: not JSON: {json}"))
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(path.to_str().unwrap()))
}

#[test]
fn the_docker_plugin_creates_mounts_counts_containers_survives_a_restart_and_removes() {
    let test = "the_docker_plugin_creates_mounts_counts_containers";
    if !host_attach_available(test, &["fusermount3", "mkfs.ext4", "blkid"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    let socket = node.dir.path().join("ballast.sock");
    let mounts = node.dir.path().join("mounts");
    let mountpoint = mounts.join("v1");
    let _leftovers = Leftovers {
        mountpoint: mountpoint.clone(),
        fuse_dir: node.data_dir.join("attach"),
    };
    let mut plugin = PluginProcess::start(&node, &socket, &mounts);

    assert_eq!(call(&socket, "Plugin.Activate", "")["Implements"][0], "VolumeDriver");
    assert_eq!(
        call(&socket, "VolumeDriver.Capabilities", "{}")["Capabilities"]["Scope"],
        "global"
    );
    let bad = call(
        &socket,
        "VolumeDriver.Create",
        r#"{"Name":"v2","Opts":{"sise":"1GiB"}}"#,
    );
    assert!(bad["Err"].as_str().unwrap().contains("unknown option"), "{bad}");
    let created = call(
        &socket,
        "VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"size":"64MiB"}}"#,
    );
    assert_eq!(created["Err"], "", "{created}");
    let list = call(&socket, "VolumeDriver.List", "{}");
    assert!(
        list["Volumes"].as_array().unwrap().iter().any(|v| v["Name"] == "v1"),
        "{list}"
    );

    // Two containers mount it; the first unmount leaves it mounted.
    let first = call(&socket, "VolumeDriver.Mount", r#"{"Name":"v1","ID":"container-a"}"#);
    assert_eq!(first["Err"], "", "{first}");
    assert_eq!(first["Mountpoint"], mountpoint.to_str().unwrap());
    std::fs::write(mountpoint.join("data.txt"), "from container a\n").unwrap();
    let second = call(&socket, "VolumeDriver.Mount", r#"{"Name":"v1","ID":"container-b"}"#);
    assert_eq!(second["Mountpoint"], first["Mountpoint"]);
    assert_eq!(
        call(&socket, "VolumeDriver.Unmount", r#"{"Name":"v1","ID":"container-a"}"#)["Err"],
        ""
    );
    assert!(mounted(&mountpoint), "unmounted while container b uses it");

    // A restarted plugin still knows container b holds it.
    plugin.stop();
    let _plugin = PluginProcess::start(&node, &socket, &mounts);
    let path = call(&socket, "VolumeDriver.Path", r#"{"Name":"v1"}"#);
    assert_eq!(path["Mountpoint"], mountpoint.to_str().unwrap(), "{path}");
    let removing = call(&socket, "VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    assert!(removing["Err"].as_str().unwrap().contains("mounted"), "{removing}");
    assert_eq!(
        call(&socket, "VolumeDriver.Unmount", r#"{"Name":"v1","ID":"container-b"}"#)["Err"],
        ""
    );
    assert!(!mounted(&mountpoint), "still mounted after the last container left");
    let get = call(&socket, "VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert_eq!(get["Volume"]["Name"], "v1", "{get}");
    assert_eq!(get["Volume"]["Mountpoint"], "");

    // The data is on the volume: mounting again finds it.
    call(&socket, "VolumeDriver.Mount", r#"{"Name":"v1","ID":"container-c"}"#);
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("data.txt")).unwrap(),
        "from container a\n"
    );
    call(&socket, "VolumeDriver.Unmount", r#"{"Name":"v1","ID":"container-c"}"#);
    assert_eq!(call(&socket, "VolumeDriver.Remove", r#"{"Name":"v1"}"#)["Err"], "");
    let gone = call(&socket, "VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert!(gone["Err"].as_str().unwrap().contains("does not exist"), "{gone}");
    // Errors come back in Err, the plugin keeps serving.
    let unknown = call(&socket, "VolumeDriver.Unmount", r#"{"Name":"nope","ID":"x"}"#);
    assert!(!unknown["Err"].as_str().unwrap().is_empty());
    let garbage = call(&socket, "VolumeDriver.Mount", "{not json");
    assert!(
        garbage["Err"].as_str().unwrap().contains("bad request body"),
        "{garbage}"
    );
    assert_eq!(call(&socket, "Plugin.Activate", "")["Implements"][0], "VolumeDriver");
}
