//! The volume CLI and API against a real node: clear errors, durable
//! metadata (kill -9 and clean restarts), delete and resize semantics.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::{run_with_timeout, TestNode};
use common::{have_tool, text};
use node::nbd::proto;

const DISK_BYTES: u64 = 512 << 20;

fn fails_with(node: &TestNode, args: &[&str], expected: &str) {
    let output = node.cli(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "ballast {args:?} should fail: {}",
        text(&output)
    );
    assert!(
        stderr.starts_with("error: ") && stderr.contains(expected),
        "ballast {args:?}: wanted an error containing {expected:?}, got {stderr:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

#[test]
fn bad_names_sizes_options_duplicates_and_missing_volumes_get_one_line_errors() {
    let node = TestNode::start("volume_cli_errors", DISK_BYTES);
    node.create_volume("a", "16MiB");
    fails_with(&node, &["volume", "create", "a", "--size", "16MiB"], "already exists");
    fails_with(
        &node,
        &["volume", "create", "Big", "--size", "1G"],
        "invalid volume name",
    );
    fails_with(
        &node,
        &["volume", "create", "a b", "--size", "1G"],
        "invalid volume name",
    );
    fails_with(&node, &["volume", "create", "b", "--size", "10XB"], "bad --size");
    fails_with(&node, &["volume", "create", "b", "--size", "5000"], "multiple of 4 KiB");
    fails_with(&node, &["volume", "create", "b", "--size", "0"], "at least one");
    fails_with(
        &node,
        &["volume", "create", "b", "--size", "1G", "--repl", "2"],
        "--repl 2",
    );
    fails_with(
        &node,
        &["volume", "create", "b", "--size", "1G", "--block-size", "1024"],
        "block size 1024",
    );
    fails_with(&node, &["volume", "inspect", "nope"], "does not exist");
    fails_with(&node, &["volume", "delete", "nope"], "does not exist");
    fails_with(&node, &["volume", "resize", "nope", "--size", "1G"], "does not exist");
    fails_with(
        &node,
        &["volume", "resize", "a", "--size", "8MiB"],
        "pass --allow-shrink",
    );
    // No node at that address: the error says how to start one.
    let output = common::ballast()
        .env("BALLAST_API", "http://127.0.0.1:9")
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the ballast node") && stderr.contains("ballast node run"),
        "{stderr}"
    );
    // The node still serves after all that.
    assert!(node.cli_ok(&["volume", "list"]).contains("16 MiB"));
}

#[test]
fn the_api_answers_bad_json_and_unknown_paths_with_json_errors() {
    let node = TestNode::start("api_bad_json", DISK_BYTES);
    let agent = ureq::agent();
    let bearer = format!("Bearer {}", node.token());
    for (body, expected) in [
        ("{not json", "bad JSON body"),
        (r#"{"name":"x"}"#, "missing field `size_bytes`"),
        (
            r#"{"name":"x","size_bytes":4096,"colour":"red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"name":"x","size_bytes":-1}"#, "bad JSON body"),
    ] {
        match agent
            .post(&format!("{}/v1/volumes", node.api_url()))
            .set("content-type", "application/json")
            .set("authorization", &bearer)
            .send_string(body)
        {
            Err(ureq::Error::Status(400, response)) => {
                let json: serde_json::Value = response.into_json().unwrap();
                let message = json["error"].as_str().unwrap();
                assert!(message.contains(expected), "{body}: {message}");
            }
            other => panic!("{body}: expected 400, got {other:?}"),
        }
    }
    match agent
        .get(&format!("{}/v1/nothing", node.api_url()))
        .set("authorization", &bearer)
        .call()
    {
        Err(ureq::Error::Status(404, response)) => {
            let json: serde_json::Value = response.into_json().unwrap();
            assert!(json["error"].as_str().is_some());
        }
        other => panic!("expected 404, got {other:?}"),
    }
    node.create_volume("still-fine", "4MiB");
}

fn qemu_io(node: &TestNode, volume: &str, commands: &[&str]) -> String {
    let uri = node.uri(volume);
    let mut args = vec!["-f", "raw", uri.as_str()];
    for command in commands {
        args.extend(["-c", command]);
    }
    let output = run_with_timeout(Command::new("qemu-io").args(&args), Duration::from_secs(120));
    let out = text(&output);
    assert!(
        output.status.success() && !out.contains("Pattern verification failed"),
        "qemu-io {commands:?}: {out}"
    );
    out
}

fn used_bytes(node: &TestNode, volume: &str) -> u64 {
    let info = node.cli_ok(&["volume", "inspect", volume, "--json"]);
    serde_json::from_str::<serde_json::Value>(&info).unwrap()["used_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn volumes_and_their_data_survive_kill_9_and_clean_restarts() {
    let test = "volumes_and_their_data_survive_kill_9_and_clean_restarts";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut node = TestNode::start(test, DISK_BYTES);
    node.create_volume("one", "64MiB");
    node.create_volume("two", "32MiB");
    qemu_io(&node, "one", &["write -P 0x61 0 8M"]);
    qemu_io(&node, "two", &["write -P 0x62 1M 1M", "write -P 0x63 4096 100"]);
    node.kill9();
    node.restart();
    let list: serde_json::Value = serde_json::from_str(&node.cli_ok(&["volume", "list", "--json"])).unwrap();
    let sizes: Vec<(String, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sizes, vec![("one".to_owned(), 64 << 20), ("two".to_owned(), 32 << 20)]);
    qemu_io(&node, "one", &["read -P 0x61 0 8M", "read -P 0 8M 56M"]);
    qemu_io(
        &node,
        "two",
        &["read -P 0x62 1M 1M", "read -P 0x63 4096 100", "read -P 0 4196 3996"],
    );
    // A clean stop checkpoints: the next start replays nothing.
    let status = node.stop();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", node.log_text());
    assert!(node.log_text().contains("node stopped"));
    let before = node.log_text().len();
    node.restart();
    let log = node.log_text();
    assert!(log[before..].contains("replayed_batches=0"), "{}", &log[before..]);
    qemu_io(&node, "one", &["read -P 0x61 0 8M"]);
}

#[test]
fn a_deleted_volume_frees_its_space_and_a_new_one_of_that_name_reads_zeroes() {
    let test = "a_deleted_volume_frees_its_space_and_a_new_one_of_that_name_reads_zeroes";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut node = TestNode::start(test, DISK_BYTES);
    node.create_volume("gone", "64MiB");
    qemu_io(&node, "gone", &["write -P 0x71 0 16M"]);
    assert!(used_bytes(&node, "gone") >= 16 << 20);
    node.cli_ok(&["volume", "delete", "gone"]);
    assert!(!node.cli_ok(&["volume", "list"]).contains("gone"));
    node.create_volume("gone", "64MiB");
    assert_eq!(used_bytes(&node, "gone"), 0);
    qemu_io(&node, "gone", &["read -P 0 0 16M"]);
    node.kill9();
    node.restart();
    assert_eq!(used_bytes(&node, "gone"), 0);
    qemu_io(&node, "gone", &["read -P 0 0 16M"]);
}

/// Opens an NBD connection to `volume` and finishes the handshake.
fn connect(node: &TestNode, volume: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, proto::server_greeting());
    let flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
    stream.write_all(&flags.to_be_bytes()).unwrap();
    let mut option = Vec::new();
    option.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    option.extend_from_slice(&u32::try_from(volume.len()).unwrap().to_be_bytes());
    option.extend_from_slice(volume.as_bytes());
    stream.write_all(&option).unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).unwrap();
    stream
}

#[test]
fn delete_is_refused_while_a_client_is_connected_and_allowed_after() {
    let node = TestNode::start("delete_while_connected", DISK_BYTES);
    node.create_volume("busy", "16MiB");
    let connection = connect(&node, "busy");
    let output = node.cli(&["volume", "delete", "busy"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("in use by 1 NBD connection"),
        "{}",
        text(&output)
    );
    drop(connection);
    let started = Instant::now();
    loop {
        if node.cli(&["volume", "delete", "busy"]).status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "delete still refused after disconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn resize_grows_a_volume_and_new_connections_see_the_new_size() {
    let test = "resize_grows_a_volume_and_new_connections_see_the_new_size";
    if !have_tool(test, "nbdinfo") {
        return;
    }
    let mut node = TestNode::start(test, DISK_BYTES);
    node.create_volume("grow", "16MiB");
    node.cli_ok(&["volume", "resize", "grow", "--size", "1GiB"]);
    let size = |node: &TestNode| -> u64 {
        let output = run_with_timeout(
            Command::new("nbdinfo").args(["--size", &node.uri("grow")]),
            Duration::from_secs(30),
        );
        String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
    };
    assert_eq!(size(&node), 1 << 30);
    node.kill9();
    node.restart();
    assert_eq!(size(&node), 1 << 30);
}

#[test]
fn volumes_are_spread_over_the_enrolled_disks() {
    let node = TestNode::start_with_disks("volumes_spread_over_disks", &[256 << 20, 256 << 20]);
    for name in ["p", "q", "r", "s"] {
        node.create_volume(name, "64MiB");
    }
    let list: serde_json::Value = serde_json::from_str(&node.cli_ok(&["volume", "list", "--json"])).unwrap();
    let mut per_disk = std::collections::BTreeMap::new();
    for volume in list.as_array().unwrap() {
        *per_disk
            .entry(volume["disk_uuid"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(per_disk.values().copied().collect::<Vec<i32>>(), vec![2, 2], "{list}");
}

/// The CLI as a new user on the node's host meets it: no token file set.
fn bare_cli() -> Command {
    let mut command = common::ballast();
    command
        .env_remove("BALLAST_TOKEN_FILE")
        .env_remove("BALLAST_TOKEN")
        .env_remove("BALLAST_API");
    command
}

#[test]
fn the_cli_finds_its_nodes_token_takes_api_before_the_command_and_status_fails_outside_a_cluster() {
    let test = "the_cli_finds_its_nodes_token";
    let node = TestNode::start_unclustered(test, "127.0.0.1", &[DISK_BYTES], &[]);
    let url = node.api_url();
    let with_token = |command: &mut Command| {
        command.env("BALLAST_TOKEN_FILE", node.token_file());
    };

    // Outside a cluster `status` says what to do, and fails.
    let mut status = bare_cli();
    with_token(&mut status);
    let outside = status.args(["--api", &url, "status"]).output().unwrap();
    assert_eq!(outside.status.code(), Some(1), "{}", text(&outside));
    assert!(text(&outside).contains("ballast cluster init"), "{}", text(&outside));
    node.cli_ok(&["cluster", "init"]);
    let inside = node.cli(&["status"]);
    assert!(inside.status.success(), "{}", text(&inside));
    let node_status = node.cli_ok(&["node", "status"]);
    assert!(
        node_status.starts_with(&format!("node {} (ballast", node.node_id())),
        "node status leads with the id the other commands take: {node_status}"
    );

    // `--api` before the command counts; one after it wins.
    let mut list = bare_cli();
    with_token(&mut list);
    let listed = list
        .args(["--api", "http://127.0.0.1:1", "volume", "list", "--api", &url])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed));

    // On the node's host, as root, the token is found without being named.
    if nix::unistd::geteuid().is_root() {
        let found = bare_cli().args(["--api", &url, "volume", "list"]).output().unwrap();
        assert!(found.status.success(), "{}", text(&found));
    } else {
        common::record_skip(test, "not root: the node cannot record itself under /run/ballast");
    }

    // Output into a pipe whose reader goes away ends the command quietly.
    let mut watch = bare_cli();
    with_token(&mut watch);
    let mut child = watch
        .args(["--api", &url, "status", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let ended = common::node::wait_exit_within(
        &mut child,
        Duration::from_secs(30),
        "status --watch after its reader left",
    );
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&ended),
        Some(libc::SIGPIPE),
        "ended by the broken pipe: {ended:?} {stderr}"
    );
}
