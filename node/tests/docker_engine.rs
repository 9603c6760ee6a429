//! The Docker volume plugin under a real Docker engine (a private dockerd
//! this test starts, with an image imported from a busybox rootfs: no
//! registry is needed), on a local 3-node cluster: `docker volume create
//! -d ballast`, a container writes files and syncs, the node serving the
//! plugin is killed -9 while the container runs, and a new container
//! mounting the volume through the next node sees every synced file.
//!
//! And ballast as a Docker managed plugin (`scripts/docker-plugin.sh`):
//! created from a local directory, enabled with nothing else of ballast
//! running on the host, serving volumes to containers, refusing to be
//! disabled while a container uses one, and keeping them across a disable
//! and enable.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::cluster::{wait_until, TestCluster};
use common::plugin::{mounted, AttachLeftovers, PluginProcess};
use common::{have_tool, host_attach_available, scratch, text};

const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);
const IMAGE: &str = "ballast-test/busybox";
/// Where dockerd looks for plugin sockets (fixed, whatever its other paths).
const PLUGIN_DIR: &str = "/run/docker/plugins";

/// A dockerd of the test's own (own data root, exec root and API socket;
/// no bridge, no iptables), stopped by pid with everything it ran.
struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dockerd {
    fn start() -> Self {
        let dir = scratch();
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.path().join("docker.sock").display()))
            .args([
                "--bridge",
                "none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver",
                "vfs",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let dockerd = Self { child, dir };
        let started = Instant::now();
        while !dockerd.docker_quiet(&["info"]).status.success() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "dockerd did not start:\n{}",
                dockerd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        dockerd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn docker_quiet(&self, args: &[&str]) -> Output {
        common::node::run_with_timeout(
            Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", self.dir.path().join("docker.sock").display()))
                .args(args),
            DOCKER_TIMEOUT,
        )
    }

    /// `docker ARGS`, which must succeed; its stdout.
    fn docker(&self, args: &[&str]) -> String {
        let output = self.docker_quiet(args);
        assert!(output.status.success(), "docker {args:?}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `script` in a new container with volume v1 at /data; its stdout.
    fn run_on_v1(&self, script: &str) -> String {
        self.docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            "v1:/data",
            IMAGE,
            "sh",
            "-c",
            script,
        ])
    }

    /// Imports a one-binary image: busybox and its applet links.
    fn import_busybox(&self) {
        let rootfs = self.dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        let busybox = rootfs.join("bin/busybox");
        std::fs::copy("/bin/busybox", &busybox).unwrap();
        std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755)).unwrap();
        for applet in ["sh", "ls", "cat", "dd", "sync", "sleep", "sha256sum", "echo", "seq"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tar = rootfs.with_extension("tar");
        let packed = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(packed.status.success(), "tar: {}", text(&packed));
        self.docker(&["import", tar.to_str().unwrap(), IMAGE]);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let containers = self.docker_quiet(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&containers.stdout).split_whitespace() {
            let _ = self.docker_quiet(&["rm", "-f", id]);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether this host can run the test; records why not.
fn available(test: &str) -> bool {
    host_attach_available(test, &["mkfs.ext4", "blkid"])
        && have_tool(test, "dockerd")
        && have_tool(test, "docker")
        && have_tool(test, "busybox")
}

/// `sha256sum` lines of a container's files, sorted (as printed by busybox).
fn sums(output: &str) -> Vec<String> {
    let mut lines: Vec<String> = output
        .lines()
        .filter(|line| line.contains("/data/f"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_docker_volume_keeps_its_synced_files_when_the_node_serving_the_plugin_is_killed() {
    let test = "a_docker_volume_keeps_its_synced_files_when_the_node_serving_the_plugin_is_killed";
    if !available(test) {
        return;
    }
    let dockerd = Dockerd::start();
    dockerd.import_busybox();
    let mut cluster = TestCluster::start(test, 3, &[]);
    let token_file = cluster.nodes[0].dir.path().join("plugin.token");
    let token = cluster.nodes[0].cli_ok(&[
        "auth",
        "token",
        "create",
        "--subject",
        "docker-plugin",
        "--role",
        "admin",
        "--ttl",
        "1h",
    ]);
    std::fs::write(&token_file, token.trim()).unwrap();

    let driver = format!("ballast-test-{}", std::process::id());
    std::fs::create_dir_all(PLUGIN_DIR).unwrap();
    let socket = Path::new(PLUGIN_DIR).join(format!("{driver}.sock"));
    let mounts = cluster.nodes[0].dir.path().join("mounts");
    let _leftovers = AttachLeftovers {
        mountpoints: vec![mounts.join("v1")],
        fuse_dirs: cluster.nodes.iter().map(|node| node.data_dir.join("attach")).collect(),
    };
    // The plugin uses node 0 first, node 1 when node 0 does not answer.
    let apis = [cluster.nodes[0].api_url(), cluster.nodes[1].api_url()];
    let _plugin = PluginProcess::start(&apis, &token_file, &socket, &mounts);

    dockerd.docker(&[
        "volume",
        "create",
        "-d",
        &driver,
        "--opt",
        "size=1GiB",
        "--opt",
        "repl=3",
        "v1",
    ]);
    let listed = dockerd.docker(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(listed.contains(&format!("{driver} v1")), "{listed}");

    // A container writes files, syncs, prints their sums and stays up.
    let writer = "for i in $(seq 1 16); do dd if=/dev/urandom of=/data/f$i bs=64k count=4 2>/dev/null; done; \
                  sync; sha256sum /data/f*; echo synced; sleep 600";
    dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "writer",
        "--network",
        "none",
        "-v",
        "v1:/data",
        IMAGE,
        "sh",
        "-c",
        writer,
    ]);
    let mut logs = String::new();
    wait_until("the writer container synced its files", || {
        logs = dockerd.docker(&["logs", "writer"]);
        logs.contains("synced")
    });
    let before = sums(&logs);
    assert_eq!(before.len(), 16, "{logs}");
    let holder = cluster.nodes[0].node_id();
    let inspect: serde_json::Value = cluster.nodes[0].inspect("v1");
    assert_eq!(inspect["attached_to"], holder, "{inspect:#}");

    // The node the plugin attached through dies under the running container.
    cluster.nodes[0].kill9();
    cluster.wait_seen_down(1, holder);
    // Removing the container makes dockerd unmount; the plugin releases the dead device.
    dockerd.docker(&["rm", "-f", "writer"]);

    let reader = dockerd.run_on_v1("sha256sum /data/f*");
    assert_eq!(
        sums(&reader),
        before,
        "files after the failover differ from those synced before it"
    );
    let inspect: serde_json::Value = cluster.nodes[1].inspect("v1");
    // The reader left: the volume was detached again from node 1's host.
    assert_eq!(inspect["attached_to"], 0, "{inspect:#}");
    assert_eq!(inspect["coordinator"], cluster.nodes[1].node_id(), "{inspect:#}");
    // Nothing of the dead attachment is left on the host: no mount, no loop device.
    assert!(!mounted(&mounts.join("v1")), "the volume is still mounted");
    let dead_attach = cluster.nodes[0].data_dir.join("attach").display().to_string();
    let loops = String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout).into_owned();
    assert!(
        !loops.contains(&dead_attach),
        "a loop device of the dead node is left: {loops}"
    );

    dockerd.docker(&["volume", "rm", "v1"]);
    let listed = dockerd.docker(&["volume", "ls", "-q"]);
    assert!(!listed.contains("v1"), "{listed}");
}

/// Disables and removes a managed plugin (on drop, before its dockerd stops).
struct ManagedPlugin<'a> {
    dockerd: &'a Dockerd,
    name: String,
}

impl Drop for ManagedPlugin<'_> {
    fn drop(&mut self) {
        let containers = self.dockerd.docker_quiet(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&containers.stdout).split_whitespace() {
            let _ = self.dockerd.docker_quiet(&["rm", "-f", id]);
        }
        let _ = self.dockerd.docker_quiet(&["plugin", "disable", "-f", &self.name]);
        let _ = self.dockerd.docker_quiet(&["plugin", "rm", "-f", &self.name]);
    }
}

#[test]
fn the_managed_plugin_serves_volumes_alone_refuses_to_stop_while_used_and_keeps_them_across_a_restart() {
    let test = "the_managed_plugin_serves_volumes_alone";
    if !available(test) || !have_tool(test, "bash") {
        return;
    }
    let dockerd = Dockerd::start();
    dockerd.import_busybox();
    let Some(disk) = common::loop_device(test, dockerd.dir.path(), 1 << 30) else {
        return;
    };
    let data = dockerd.dir.path().join("ballast-data");
    std::fs::create_dir_all(&data).unwrap();
    let name = format!("ballast-managed-{}", std::process::id());
    let created = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/docker-plugin.sh"))
        .args(["--name", &name, "--binary", env!("CARGO_BIN_EXE_ballast")])
        .arg("--dir")
        .arg(dockerd.dir.path().join("plugin"))
        .arg("--docker-host")
        .arg(format!("unix://{}", dockerd.dir.path().join("docker.sock").display()))
        .output()
        .unwrap();
    assert!(created.status.success(), "docker-plugin.sh: {}", text(&created));
    let plugin = ManagedPlugin {
        dockerd: &dockerd,
        name: name.clone(),
    };
    // Ports of its own: the host network is shared with whatever else runs here.
    let port = 20000 + (std::process::id() % 10000) as u16;
    dockerd.docker(&[
        "plugin",
        "set",
        &name,
        &format!("data.source={}", data.display()),
        &format!("DISKS={}", disk.path().display()),
        &format!("LISTEN_API=127.0.0.1:{port}"),
        &format!("LISTEN_NBD=127.0.0.1:{}", port + 1),
        &format!("LISTEN_PEER=127.0.0.1:{}", port + 2),
    ]);
    let enabled = dockerd.docker_quiet(&["plugin", "enable", &name]);
    assert!(
        enabled.status.success(),
        "enable: {}\n{}",
        text(&enabled),
        dockerd.log()
    );
    // No ballast process of this test's but the plugin's own.
    dockerd.docker(&["volume", "create", "-d", &name, "--opt", "size=256MiB", "v1"]);
    let run = |script: &str| dockerd.run_on_v1(script);
    run("echo kept > /data/note; dd if=/dev/urandom of=/data/blob bs=64k count=16 2>/dev/null; sync; sha256sum /data/blob > /data/blob.sum; sync");
    let read = run("cat /data/note; sha256sum /data/blob; cat /data/blob.sum");
    let lines: Vec<&str> = read.lines().collect();
    assert_eq!(lines.len(), 3, "{read}");
    assert_eq!(lines[0], "kept", "{read}");
    assert_eq!(
        lines[1], lines[2],
        "the blob read back differs from what was written: {read}"
    );
    // The node keeps its data in the host directory the plugin was given.
    assert!(data.join("disks.toml").exists(), "no data directory on the host side");

    // A container holding the volume: the plugin may not be disabled (Docker
    // refuses while any volume of the driver exists).
    dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "holder",
        "--network",
        "none",
        "-v",
        "v1:/data",
        IMAGE,
        "sleep",
        "600",
    ]);
    let refused = dockerd.docker_quiet(&["plugin", "disable", &name]);
    assert!(!refused.status.success(), "disabled while a container uses its volume");
    assert!(text(&refused).contains("in use"), "{}", text(&refused));
    dockerd.docker(&["rm", "-f", "holder"]);

    // Disabled (the node stops with it; -f because Docker counts the
    // volume itself as a use) and enabled again: the disk is not enrolled
    // twice, the cluster not made again, the volume still there.
    dockerd.docker(&["plugin", "disable", "-f", &name]);
    let enabled = dockerd.docker_quiet(&["plugin", "enable", &name]);
    assert!(
        enabled.status.success(),
        "enable again: {}\n{}",
        text(&enabled),
        dockerd.log()
    );
    let listed = dockerd.docker(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(
        listed.contains(&format!("{name}:latest v1")) || listed.contains(&format!("{name} v1")),
        "{listed}"
    );
    let again = run("cat /data/note; sha256sum /data/blob; cat /data/blob.sum");
    assert_eq!(again, read, "the volume changed across the plugin's restart");

    dockerd.docker(&["volume", "rm", "v1"]);
    dockerd.docker(&["plugin", "disable", &name]);
    dockerd.docker(&["plugin", "rm", &name]);
    drop(plugin);
    let log = dockerd.log();
    assert!(log.contains("docker volume plugin ready"), "{log}");
}
