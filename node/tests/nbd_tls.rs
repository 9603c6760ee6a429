//! NBD over TLS with real clients: libnbd (nbdinfo) and fio's nbd engine
//! dial `nbds://` with a client certificate from `ballast auth cert
//! create`; plaintext, strangers' certificates and other users' volumes
//! are refused, and the node keeps serving.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::node::{run_with_timeout, TestNode};
use common::{have_tool, text};

const DISK_BYTES: u64 = 1 << 30;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn nbdinfo(uri: &str) -> std::process::Output {
    run_with_timeout(Command::new("nbdinfo").arg("--json").arg(uri), TOOL_TIMEOUT)
}

fn tls_uri(node: &TestNode, volume: &str, certificates: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{volume}?tls-certificates={}",
        node.nbd_port,
        certificates.display()
    )
}

fn call(method: &str, url: &str, token: &str, body: &str) -> (u16, String) {
    let request = ureq::request(method, url).set("Authorization", &format!("Bearer {token}"));
    match request.send_string(body) {
        Ok(response) => (response.status(), response.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap_or_default()),
        Err(error) => panic!("{method} {url}: {error}"),
    }
}

/// Writes a client certificate of another cluster in libnbd's layout.
fn stranger_certificates(dir: &Path) {
    let cluster = uuid::Uuid::new_v4();
    let ca = node::peer::tls::new_ca(cluster).unwrap();
    let bundle = node::peer::tls::issue_client(&ca, cluster, "alice", node::api::auth::Role::Admin, &[], 30).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &bundle.ca_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), &bundle.cert_pem).unwrap();
    std::fs::write(dir.join("client-key.pem"), &bundle.key_pem).unwrap();
}

#[test]
fn nbd_over_tls_admits_only_the_owners_certificate_and_refuses_plaintext_and_strangers() {
    let test = "nbd_over_tls_admits_only_the_owners_certificate";
    if !have_tool(test, "nbdinfo") || !have_tool(test, "fio") {
        return;
    }
    let node = TestNode::start_unclustered(test, "127.0.0.1", &[DISK_BYTES], &["--nbd-tls", "required"]);
    node.cli_ok(&["cluster", "init"]);
    let alice = node.cli_ok(&["auth", "token", "create", "--subject", "alice", "--role", "user"]);
    let alice = alice.trim();
    let (code, body) = call(
        "POST",
        &format!("{}/v1/volumes", node.api_url()),
        alice,
        r#"{"name":"alices","size_bytes":134217728,"replicas":1}"#,
    );
    assert_eq!(code, 201, "{body}");
    let certs = node.dir.path().join("certs");
    let (alice_dir, bob_dir, admin_dir, stranger_dir) = (
        certs.join("alice"),
        certs.join("bob"),
        certs.join("admin"),
        certs.join("stranger"),
    );
    node.cli_ok(&[
        "auth",
        "cert",
        "create",
        "--subject",
        "bob",
        "--out",
        bob_dir.to_str().unwrap(),
    ]);
    node.cli_ok(&[
        "auth",
        "cert",
        "create",
        "--subject",
        "root",
        "--role",
        "admin",
        "--out",
        admin_dir.to_str().unwrap(),
    ]);
    // A user gets a certificate for itself, not for someone else.
    let (code, body) = call(
        "POST",
        &format!("{}/v1/auth/certs", node.api_url()),
        alice,
        r#"{"subject":"bob","role":"user","ttl_seconds":864000}"#,
    );
    assert_eq!(code, 403, "{body}");
    let own = common::ballast()
        .env("BALLAST_API", node.api_url())
        .env("BALLAST_TOKEN", alice)
        .args(["auth", "cert", "create", "--subject", "alice", "--ttl", "10d", "--out"])
        .arg(&alice_dir)
        .output()
        .unwrap();
    assert!(own.status.success(), "{}", text(&own));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(alice_dir.join("client-key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the client key is private");
    stranger_certificates(&stranger_dir);

    // The owner over TLS: nbdinfo sees the export; fio writes and verifies through it.
    let info = nbdinfo(&tls_uri(&node, "alices", &alice_dir));
    assert!(info.status.success(), "{}", text(&info));
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("134217728"),
        "{}",
        text(&info)
    );
    // fio's engine may not name local files in the URI: libnbd then reads
    // the certificates from $HOME/.pki/libnbd, for a user other than root
    // (root's is /etc/pki/libnbd, which a test must not touch).
    let fio_home = tempfile::tempdir().unwrap();
    let pki = fio_home.path().join(".pki/libnbd");
    std::fs::create_dir_all(&pki).unwrap();
    for file in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(alice_dir.join(file), pki.join(file)).unwrap();
    }
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(fio_home.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let fio = run_with_timeout(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"])
            .current_dir(fio_home.path())
            .env("HOME", fio_home.path())
            .args([
                "--name=tls",
                "--ioengine=nbd",
                &format!("--uri=nbds://127.0.0.1:{}/alices", node.nbd_port),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=16M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--output-format=json",
            ]),
        TOOL_TIMEOUT,
    );
    assert!(fio.status.success(), "{}", text(&fio));
    assert!(
        String::from_utf8_lossy(&fio.stdout).contains("\"error\" : 0"),
        "{}",
        text(&fio)
    );
    // qemu (GnuTLS through its own NBD client) with the same files.
    if have_tool(test, "qemu-img") {
        let qemu = run_with_timeout(
            Command::new("qemu-img").args([
                "info",
                "--object",
                &format!("tls-creds-x509,id=t0,dir={},endpoint=client", alice_dir.display()),
                "--image-opts",
                &format!(
                    "driver=nbd,host=127.0.0.1,port={},export=alices,tls-creds=t0",
                    node.nbd_port
                ),
            ]),
            TOOL_TIMEOUT,
        );
        assert!(qemu.status.success(), "{}", text(&qemu));
        assert!(text(&qemu).contains("128 MiB"), "{}", text(&qemu));
    }
    // An admin certificate opens every volume.
    let info = nbdinfo(&tls_uri(&node, "alices", &admin_dir));
    assert!(info.status.success(), "{}", text(&info));

    // Refused: plaintext on a TLS-required listener, bob on alice's volume,
    // another cluster's certificate, and TLS without a client certificate.
    let plaintext = nbdinfo(&node.uri("alices"));
    assert!(!plaintext.status.success(), "plaintext got in: {}", text(&plaintext));
    assert!(text(&plaintext).contains("TLS"), "{}", text(&plaintext));
    let bob = nbdinfo(&tls_uri(&node, "alices", &bob_dir));
    assert!(!bob.status.success(), "bob opened alice's volume: {}", text(&bob));
    let stranger = nbdinfo(&tls_uri(&node, "alices", &stranger_dir));
    assert!(!stranger.status.success(), "a stranger got in: {}", text(&stranger));
    let anonymous = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/alices?tls-verify-peer=false",
        node.nbd_port
    ));
    assert!(
        !anonymous.status.success(),
        "no certificate got in: {}",
        text(&anonymous)
    );
    let log = node.log_text();
    assert!(log.contains("NBD TLS handshake refused"), "refusals are logged");
    assert!(log.contains("volume alices belongs to another user (the client certificate names bob)"));
    // The audit trail has the opens and the policy refusal, with who.
    let trail = common::run(&["audit", "--data-dir", node.data().to_str().unwrap(), "--json"]);
    assert!(trail.status.success(), "{}", text(&trail));
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&trail.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let has = |subject: &str, status: u64| {
        entries.iter().any(|entry| {
            entry["action"] == "NBD open"
                && entry["target"] == "alices"
                && entry["subject"] == subject
                && entry["status"] == status
                && entry["source"].as_str().unwrap().starts_with("127.0.0.1:")
        })
    };
    assert!(has("alice", 200), "alice's open: {entries:#?}");
    assert!(has("bob", 403), "bob's refusal: {entries:#?}");

    // Still serving.
    let info = nbdinfo(&tls_uri(&node, "alices", &alice_dir));
    assert!(info.status.success(), "{}", text(&info));
}
