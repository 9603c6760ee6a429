//! The Docker volume plugin at the protocol level: requests exactly as
//! dockerd sends them (HTTP/1.1 POST over the unix socket, JSON body, no
//! Content-Type) to a real `ballast plugin serve` next to a real node:
//! create, two containers mounting one volume, a plugin restart that keeps
//! the mount counts, the last unmount detaching, remove, and errors in
//! `Err`. (`docker_engine.rs` runs the plugin under a real Docker engine.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::host_attach_available;
use common::node::TestNode;
use common::plugin::{mounted, AttachLeftovers, PluginProcess};

/// One plugin call, the way dockerd makes it.
fn call(socket: &Path, endpoint: &str, body: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    // One write: a handler that ignores the body (Capabilities) is answered,
    // and the connection closed, as soon as the headers are read; a body
    // written separately after that close fails with EPIPE (seen once in a
    // loaded run).
    let request = format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{endpoint}: {response}");
    let json = &response[response.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(json).unwrap_or_else(|_| panic!("{endpoint}: not JSON: {json}"))
}

#[test]
fn the_docker_plugin_creates_mounts_counts_containers_survives_a_restart_and_removes() {
    let test = "the_docker_plugin_creates_mounts_counts_containers";
    if !host_attach_available(test, &["mkfs.ext4", "mkfs.xfs", "blkid"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    let socket = node.dir.path().join("ballast.sock");
    let mounts = node.dir.path().join("mounts");
    let mountpoint = mounts.join("v1");
    let _leftovers = AttachLeftovers {
        mountpoints: vec![mountpoint.clone()],
        fuse_dirs: vec![node.data_dir.join("attach")],
    };
    let apis = [node.api_url()];
    let mut plugin = PluginProcess::start(&apis, &node.token_file(), &socket, &mounts);

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
    let _plugin = PluginProcess::start(&apis, &node.token_file(), &socket, &mounts);
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

    // fs=xfs at Create is the filesystem made at the first Mount.
    let created = call(
        &socket,
        "VolumeDriver.Create",
        r#"{"Name":"x1","Opts":{"size":"512MiB","fs":"xfs"}}"#,
    );
    assert_eq!(created["Err"], "", "{created}");
    let xfs_mountpoint = mounts.join("x1");
    let _xfs_leftovers = AttachLeftovers {
        mountpoints: vec![xfs_mountpoint.clone()],
        fuse_dirs: Vec::new(),
    };
    let mounted = call(&socket, "VolumeDriver.Mount", r#"{"Name":"x1","ID":"container-x"}"#);
    assert_eq!(mounted["Err"], "", "{mounted}");
    let mounts_table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts_table
        .lines()
        .find(|line| line.split_whitespace().nth(1) == xfs_mountpoint.to_str())
        .unwrap_or_else(|| panic!("x1 not mounted: {mounts_table}"));
    assert_eq!(line.split_whitespace().nth(2), Some("xfs"), "{line}");
    assert_eq!(
        call(&socket, "VolumeDriver.Unmount", r#"{"Name":"x1","ID":"container-x"}"#)["Err"],
        ""
    );
    assert_eq!(call(&socket, "VolumeDriver.Remove", r#"{"Name":"x1"}"#)["Err"], "");
    let bad_fs = call(&socket, "VolumeDriver.Create", r#"{"Name":"x2","Opts":{"fs":"ntfs"}}"#);
    assert!(bad_fs["Err"].as_str().unwrap().contains("ext4 or xfs"), "{bad_fs}");
}
