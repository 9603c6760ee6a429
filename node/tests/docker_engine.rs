//! The Docker volume plugin under a real Docker engine (a private dockerd
//! this test starts, with an image imported from a busybox rootfs: no
//! registry is needed), on a local 3-node cluster: `docker volume create
//! -d ballast`, a container writes files and syncs, the node serving the
//! plugin is killed -9 while the container runs, and a new container
//! mounting the volume through the next node sees every synced file.

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

    let reader = dockerd.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        "v1:/data",
        IMAGE,
        "sh",
        "-c",
        "sha256sum /data/f*",
    ]);
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
