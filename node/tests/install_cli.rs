//! `ballast install` / `uninstall` into a scratch root: what is written,
//! that systemd accepts the units, that the user's config and data are
//! never touched, and that bad input changes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{record_skip, run, scratch, text};

const UNITS: [&str; 2] = [
    "etc/systemd/system/ballast-node.service",
    "etc/systemd/system/ballast-plugin.service",
];

fn install(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["install", "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn uninstall(root: &Path) -> std::process::Output {
    run(&["uninstall", "--root", root.to_str().unwrap()])
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// `systemd-analyze verify` of the installed units under `root` (the
/// system's own units copied in, so their dependencies resolve); None when
/// the host has no systemd-analyze.
fn verify_units(root: &Path) -> Option<std::process::Output> {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        return None;
    }
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|dir| Path::new(dir).join("sysinit.target").exists())?;
    let copy = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&copy).unwrap();
    assert!(Command::new("cp")
        .args(["-r", system_units])
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let mut command = Command::new("systemd-analyze");
    command
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()));
    for unit in UNITS {
        command.arg(root.join(unit));
    }
    let output = command.output().unwrap();
    std::fs::remove_dir_all(root.join("usr/lib")).unwrap();
    Some(output)
}

#[test]
fn install_writes_units_systemd_accepts_keeps_the_users_config_and_uninstall_leaves_only_data() {
    let dir = scratch();
    let root = dir.path().join("root");

    let planned = install(&root, &["--dry-run"]);
    assert!(planned.status.success(), "{}", text(&planned));
    assert!(
        text(&planned).contains("etc/ballast/ballast.toml"),
        "{}",
        text(&planned)
    );
    assert!(!root.exists(), "a dry run changed nothing");

    let installed = install(&root, &[]);
    assert!(installed.status.success(), "{}", text(&installed));
    assert_eq!(
        files(&root),
        [
            "etc/ballast/ballast.toml",
            "etc/systemd/system/ballast-node.service",
            "etc/systemd/system/ballast-plugin.service",
            "usr/local/bin/ballast",
        ]
    );
    let binary = root.join("usr/local/bin/ballast");
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_ballast")).unwrap(),
        "the running binary is what was installed"
    );
    let mode = |relative: &str| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root.join(relative)).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode("usr/local/bin/ballast"), 0o755);
    assert_eq!(mode("etc/ballast/ballast.toml"), 0o640);
    assert_eq!(mode(UNITS[0]), 0o644);
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(version.status.success(), "the installed binary runs");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ballast/ballast.toml")).unwrap(),
        node::install::DEFAULT_CONFIG
    );

    match verify_units(&root) {
        Some(verified) => assert!(
            verified.status.success() && verified.stderr.is_empty(),
            "systemd-analyze verify: {}",
            text(&verified)
        ),
        None => record_skip(
            "install_writes_units_systemd_accepts (the unit check only)",
            "systemd-analyze is not installed (apt-get install systemd)",
        ),
    }

    // The user's config survives a reinstall and an uninstall; data is never touched.
    let edited = "data_dir = \"/srv/ballast\"\n";
    std::fs::write(root.join("etc/ballast/ballast.toml"), edited).unwrap();
    let data = root.join("var/lib/ballast/volumes.redb");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(&data, b"precious").unwrap();
    let again = install(&root, &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("keep"), "{}", text(&again));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ballast/ballast.toml")).unwrap(),
        edited
    );

    let removed = uninstall(&root);
    assert!(removed.status.success(), "{}", text(&removed));
    assert_eq!(
        files(&root),
        ["etc/ballast/ballast.toml", "var/lib/ballast/volumes.redb"],
        "{}",
        text(&removed)
    );
    assert_eq!(std::fs::read(&data).unwrap(), b"precious");

    // An unchanged config goes with the rest.
    std::fs::remove_file(root.join("etc/ballast/ballast.toml")).unwrap();
    assert!(install(&root, &[]).status.success());
    assert!(uninstall(&root).status.success());
    assert_eq!(files(&root), ["var/lib/ballast/volumes.redb"]);
}

#[test]
fn install_refuses_a_missing_binary_a_non_executable_and_a_running_install_changing_nothing() {
    let dir = scratch();
    let root = dir.path().join("root");

    let missing = install(&root, &["--binary", "/nonexistent/ballast"]);
    assert!(!missing.status.success());
    assert!(text(&missing).contains("/nonexistent/ballast"), "{}", text(&missing));
    let not_elf = dir.path().join("ballast.txt");
    std::fs::write(&not_elf, "#!/bin/sh\n").unwrap();
    let refused = install(&root, &["--binary", not_elf.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("not an executable"), "{}", text(&refused));
    assert!(!root.exists(), "nothing was written");

    // A process runs the installed binary: install and uninstall refuse.
    assert!(install(&root, &[]).status.success());
    let binary = root.join("usr/local/bin/ballast");
    let before = std::fs::read(&binary).unwrap();
    let socket = dir.path().join("plugin.sock");
    let mut running = Command::new(&binary)
        .args(["plugin", "serve", "--api", "http://127.0.0.1:1", "--socket"])
        .arg(&socket)
        .arg("--mounts")
        .arg(dir.path().join("mounts"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(socket.exists(), "the plugin started from the installed binary");
    let pid = running.id().to_string();
    let over = install(&root, &[]);
    let under = uninstall(&root);
    let _ = running.kill();
    let _ = running.wait();
    for refused in [&over, &under] {
        assert!(!refused.status.success(), "{}", text(refused));
        assert!(
            text(refused).contains(&pid) && text(refused).contains("nothing was changed"),
            "{}",
            text(refused)
        );
    }
    assert_eq!(std::fs::read(&binary).unwrap(), before, "the binary was left as it was");
    assert!(uninstall(&root).status.success(), "once stopped, it uninstalls");
    assert!(files(&root).is_empty());
}

#[test]
fn the_managed_plugin_entrypoint_refuses_a_bad_init_no_disks_and_a_missing_disk_starting_nothing() {
    let dir = scratch();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let bad_init = run(&["plugin", "managed", "--data-dir", data_arg, "--init", "cluster"]);
    assert_eq!(bad_init.status.code(), Some(2), "{}", text(&bad_init));
    assert!(text(&bad_init).contains("use single"), "{}", text(&bad_init));
    let no_disks = run(&["plugin", "managed", "--data-dir", data_arg]);
    assert!(!no_disks.status.success());
    assert!(
        text(&no_disks).contains("no disk to store volumes on"),
        "{}",
        text(&no_disks)
    );
    let missing = dir.path().join("no-such-disk");
    let missing_disk = run(&[
        "plugin",
        "managed",
        "--data-dir",
        data_arg,
        "--disks",
        missing.to_str().unwrap(),
    ]);
    assert!(!missing_disk.status.success());
    assert!(
        text(&missing_disk).contains("enrolling") && text(&missing_disk).contains("does not exist"),
        "{}",
        text(&missing_disk)
    );
    // Nothing was started or enrolled: no token (the node never ran), no disk recorded.
    assert!(!data.join("admin.token").exists());
    assert!(
        !data.join("disks.toml").exists()
            || std::fs::read_to_string(data.join("disks.toml"))
                .unwrap()
                .trim()
                .is_empty()
    );
}
