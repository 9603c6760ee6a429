//! Peer-port security on real processes: the peer port speaks mutual TLS
//! with certificates of the cluster's CA (made at `cluster init`, issued
//! to joining nodes); a plaintext client, or one whose certificate comes
//! from another CA, is refused and logged while the cluster keeps working;
//! `cluster rotate-certs` renews every node's certificate without downtime.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{wait_until, TestCluster};
use node::peer::frame::FrameKind;
use node::peer::tls::{self, Bundle, PeerTls};

fn client_with(bundle: &Bundle, cluster_id: uuid::Uuid) -> node::peer::client::PeerClient {
    let tls = Arc::new(PeerTls::default());
    tls.install(bundle).unwrap();
    let identity: Arc<dyn Fn() -> (Option<uuid::Uuid>, u64) + Send + Sync> = Arc::new(move || (Some(cluster_id), 77));
    node::peer::client::PeerClient::new(identity, None, tls)
}

#[test]
fn the_peer_port_refuses_strangers_and_keeps_serving_and_certificates_rotate_without_downtime() {
    let test = "the_peer_port_refuses_strangers";
    let cluster = TestCluster::start(test, 2, &[]);
    let status: serde_json::Value =
        serde_json::from_str(&cluster.nodes[0].cli_ok(&["cluster", "status", "--json"])).unwrap();
    let cluster_id: uuid::Uuid = status["cluster_id"].as_str().unwrap().parse().unwrap();
    let address = cluster.nodes[0].peer_address();
    let member = tls::read_bundle(cluster.nodes[1].data())
        .unwrap()
        .expect("node 1 has a certificate");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cluster.nodes[1].data().join("tls/node.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    // Plaintext: the peer's bytes are not a TLS hello; nothing comes back.
    let mut plain = std::net::TcpStream::connect(&address).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"BLPF\x00\x00\x00\x00 a plaintext hello").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.windows(4).any(|w| w == b"BLPF"),
        "a plaintext client got frames back"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ping = |client: &node::peer::client::PeerClient| {
        runtime.block_on(client.call(&address, FrameKind::Ping, &[], Duration::from_secs(10)))
    };
    // A member's certificate works (the control)...
    ping(&client_with(&member, cluster_id)).expect("a member's certificate is accepted");
    // ...one from another CA, presented to this cluster, does not.
    let other_ca = tls::new_ca(uuid::Uuid::new_v4()).unwrap();
    let foreign = tls::issue(&other_ca, cluster_id, 77).unwrap();
    let impostor = Bundle {
        ca_pem: member.ca_pem.clone(),
        ..foreign
    };
    let refused = ping(&client_with(&impostor, cluster_id)).expect_err("a foreign certificate must be refused");
    assert!(
        refused.to_string().contains("TLS") || refused.to_string().contains("peer"),
        "{refused}"
    );
    wait_until("the refusal is logged", || {
        cluster.nodes[0].log_text().contains("TLS handshake failed")
    });
    // The cluster did not notice: both nodes up, a replicated volume works.
    cluster.nodes[0].cli_ok(&["volume", "create", "s", "--size", "16MiB", "--repl", "2"]);

    // Rotation: every node gets a new certificate; peers keep talking.
    let before = std::fs::read_to_string(cluster.nodes[1].data().join("tls/node.crt")).unwrap();
    let rotated = cluster.nodes[0].cli_ok(&["cluster", "rotate-certs", "--all"]);
    assert_eq!(rotated.matches("new certificate").count(), 2, "{rotated}");
    let after = std::fs::read_to_string(cluster.nodes[1].data().join("tls/node.crt")).unwrap();
    assert_ne!(before, after);
    cluster.nodes[1].cli_ok(&["volume", "create", "t", "--size", "16MiB", "--repl", "2"]);
    let renewed = tls::read_bundle(cluster.nodes[1].data()).unwrap().unwrap();
    ping(&client_with(&renewed, cluster_id)).expect("the renewed certificate is accepted");
}
