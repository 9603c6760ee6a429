//! Data management on a real node (issue 11): thin provisioning and TRIM —
//! a volume uses disk space only for what was written, and a discard
//! gives the space back (the volume's allocation at once, the disk's live
//! blocks with it; the cleaner then reuses the segments).

mod common;

use std::process::Command;

use common::node::TestNode;
use common::{have_tool, text};

fn qemu_io(uri: &str, command: &str) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .unwrap()
}

fn disk_used_bytes(node: &TestNode) -> u64 {
    let status: serde_json::Value = serde_json::from_str(&node.cli_ok(&["node", "status", "--json"])).unwrap();
    status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["used_bytes"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_volume_uses_space_only_for_written_data_and_a_trim_gives_it_back() {
    let test = "a_volume_uses_space_only_for_written_data";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.create_volume("thin", "1GiB");
    assert_eq!(node.inspect("thin")["used_bytes"], 0, "a new volume holds nothing");
    let uri = node.uri("thin");
    let written = qemu_io(&uri, "write -P 0x61 64M 96M");
    assert!(written.status.success(), "{}", text(&written));
    let info = node.inspect("thin");
    assert_eq!(info["size_bytes"], 1u64 << 30);
    assert_eq!(info["used_bytes"], 96u64 << 20, "allocated: what was written");
    let before = disk_used_bytes(&node);
    assert!(before >= 96 << 20, "{before}");
    let inspect = node.cli_ok(&["volume", "inspect", "thin"]);
    assert!(inspect.contains("used:"), "{inspect}");

    let trimmed = qemu_io(&uri, "discard 64M 80M");
    assert!(trimmed.status.success(), "{}", text(&trimmed));
    assert_eq!(
        node.inspect("thin")["used_bytes"],
        16u64 << 20,
        "allocation drops with the trim"
    );
    let after = disk_used_bytes(&node);
    assert!(
        before - after >= 80 << 20,
        "the disk's live data drops too: {before} -> {after}"
    );
    // The trimmed range reads as zeroes, the rest as written.
    let zeroes = qemu_io(&uri, "read -P 0 64M 80M");
    assert!(
        zeroes.status.success() && !text(&zeroes).contains("failed"),
        "{}",
        text(&zeroes)
    );
    let kept = qemu_io(&uri, "read -P 0x61 144M 16M");
    assert!(
        kept.status.success() && !text(&kept).contains("failed"),
        "{}",
        text(&kept)
    );

    // The space is reusable: more than the disk holds goes through once trimmed space is cleaned.
    for round in 0..4u64 {
        let written = qemu_io(&uri, &format!("write -P {:#x} 256M 300M", 0x70 + round));
        assert!(written.status.success(), "round {round}: {}", text(&written));
        let trimmed = qemu_io(&uri, "discard 256M 300M");
        assert!(trimmed.status.success(), "round {round}: {}", text(&trimmed));
    }
    assert_eq!(node.inspect("thin")["used_bytes"], 16u64 << 20);
}
