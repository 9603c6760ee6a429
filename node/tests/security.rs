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

/// An API call with `token` (None: no Authorization header); status and body.
fn call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut request = ureq::request(method, url);
    if let Some(token) = token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => request.set("content-type", "application/json").send_string(body),
        None => request.call(),
    };
    match result {
        Ok(response) => (response.status(), response.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap_or_default()),
        Err(error) => panic!("{method} {url}: {error}"),
    }
}

#[test]
fn the_api_needs_a_valid_token_and_users_touch_only_their_own_volumes() {
    let test = "the_api_needs_a_valid_token";
    let cluster = TestCluster::start(test, 2, &[]);
    let (node, other) = (&cluster.nodes[0], &cluster.nodes[1]);
    let api = node.api_url();
    let admin = node.token();
    // The admin token file is root-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(node.token_file()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // No token, a forged one, one of another issuer, an expired one: 401.
    assert_eq!(call("GET", &format!("{api}/v1/volumes"), None, None).0, 401);
    let forged = node::api::auth::mint(
        b"not the secret",
        "ballast:cluster:x",
        "mallory",
        node::api::auth::Role::Admin,
        600,
    )
    .unwrap();
    assert_eq!(call("GET", &format!("{api}/v1/volumes"), Some(&forged), None).0, 401);
    let status: serde_json::Value = serde_json::from_str(&node.cli_ok(&["cluster", "status", "--json"])).unwrap();
    let cluster_id = status["cluster_id"].as_str().unwrap();
    let wrong_issuer = node::api::auth::mint(
        b"x",
        &format!("ballast:cluster:{cluster_id}"),
        "mallory",
        node::api::auth::Role::Admin,
        600,
    )
    .unwrap();
    assert_eq!(
        call("GET", &format!("{api}/v1/volumes"), Some(&wrong_issuer), None).0,
        401
    );
    // Expired: signed right (the node's own secret and issuer), but an hour ago.
    let node_status = node.status();
    let issuer = format!("ballast:node:{}", node_status["node_uuid"].as_str().unwrap());
    let secret = std::fs::read_to_string(node.data().join("api.secret")).unwrap();
    let stale = node::api::auth::Claims {
        sub: "root".into(),
        role: node::api::auth::Role::Admin,
        iss: issuer.clone(),
        iat: 0,
        exp: node::datadir::now_unix_seconds() - 3600,
        groups: Vec::new(),
    };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &stale,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    let (code, body) = call("GET", &format!("{api}/v1/volumes"), Some(&expired), None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("xpired"), "{body}");
    let fresh = node::api::auth::mint(
        secret.trim().as_bytes(),
        &issuer,
        "root",
        node::api::auth::Role::Admin,
        600,
    )
    .unwrap();
    assert_eq!(
        call("GET", &format!("{api}/v1/volumes"), Some(&fresh), None).0,
        200,
        "the control"
    );
    // The health probes need none.
    assert_eq!(call("GET", &format!("{api}/healthz"), None, None).0, 200);

    // Alice and bob are users; a token made on one node works on the other.
    let alice = node.cli_ok(&["auth", "token", "create", "--subject", "alice", "--role", "user"]);
    let bob = other.cli_ok(&["auth", "token", "create", "--subject", "bob", "--role", "user"]);
    let (alice, bob) = (alice.trim(), bob.trim());
    let create = r#"{"name":"alices","size_bytes":16777216,"replicas":2}"#;
    let (code, body) = call("POST", &format!("{api}/v1/volumes"), Some(alice), Some(create));
    assert_eq!(code, 201, "{body}");
    assert!(body.contains(r#""owner":"alice""#), "{body}");
    let volume = format!("{api}/v1/volumes/alices");
    assert_eq!(call("GET", &volume, Some(alice), None).0, 200);
    assert_eq!(
        call(
            "GET",
            &format!("{}/v1/volumes/alices", other.api_url()),
            Some(alice),
            None
        )
        .0,
        200
    );
    // Bob may not see, grow, attach or delete it; nor do cluster work.
    assert_eq!(call("GET", &volume, Some(bob), None).0, 403);
    assert_eq!(
        call("PATCH", &volume, Some(bob), Some(r#"{"size_bytes":33554432}"#)).0,
        403
    );
    assert_eq!(call("POST", &format!("{volume}/attach"), Some(bob), Some("{}")).0, 403);
    assert_eq!(call("DELETE", &volume, Some(bob), None).0, 403);
    let (code, list) = call("GET", &format!("{api}/v1/volumes"), Some(bob), None);
    assert_eq!((code, list.as_str()), (200, "[]"));
    assert_eq!(
        call("POST", &format!("{api}/v1/cluster/tokens"), Some(bob), Some("{}")).0,
        403
    );
    assert_eq!(call("GET", &format!("{api}/metrics"), Some(bob), None).0, 403);
    // The admin can; alice can delete her own.
    assert_eq!(call("GET", &volume, Some(&admin), None).0, 200);
    assert_eq!(call("DELETE", &volume, Some(alice), None).0, 204);

    // The audit trail of the node holds every change and every refusal
    // above, with who and from where; no read that was allowed, no token.
    let data = node.data().to_str().unwrap().to_owned();
    let trail = common::run(&["audit", "--data-dir", &data, "--json"]);
    assert!(trail.status.success(), "{}", common::text(&trail));
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&trail.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let has = |subject: &str, action: &str, target: &str, status: u64| {
        entries.iter().any(|entry| {
            entry["subject"] == subject
                && entry["action"] == action
                && entry["target"] == target
                && entry["status"] == status
                && entry["source"].as_str().unwrap().starts_with("127.")
        })
    };
    // A create names its volume, which the path does not.
    assert!(has("alice", "POST", "/v1/volumes/alices", 201), "create: {entries:#?}");
    assert!(
        has("alice", "DELETE", "/v1/volumes/alices", 204),
        "delete: {entries:#?}"
    );
    assert!(has("bob", "DELETE", "/v1/volumes/alices", 403), "a 403: {entries:#?}");
    assert!(has("bob", "GET", "/metrics", 403), "a refused read: {entries:#?}");
    assert!(has("-", "GET", "/v1/volumes", 401), "a 401: {entries:#?}");
    assert!(
        !entries
            .iter()
            .any(|entry| entry["action"] == "GET" && entry["status"] == 200),
        "allowed reads are not audited: {entries:#?}"
    );
    let stored = std::fs::read_to_string(node.data().join("audit.log")).unwrap();
    for secret in [admin.as_str(), alice, bob, forged.as_str()] {
        assert!(!stored.contains(secret), "a token in the audit log");
    }
    let recent = common::run(&["audit", "--data-dir", &data, "--since", "1h"]);
    let recent = common::text(&recent);
    assert!(recent.contains("alice") && recent.contains("403"), "{recent}");
}

/// A JWT signed ES256 by `key` (PKCS#8 PEM), with these claims.
fn es256_token(key_pem: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A JWKS document holding `key`'s public half (EC P-256) under `kid`.
fn jwks_of(key: &rcgen::KeyPair, kid: &str) -> String {
    use base64::Engine;
    let raw = key.public_key_raw(); // 0x04 || X || Y
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": encode(&raw[1..33]), "y": encode(&raw[33..65]),
    }]})
    .to_string()
}

#[test]
fn the_api_accepts_tokens_of_a_configured_identity_provider_by_public_key_and_jwks() {
    let test = "the_api_accepts_tokens_of_a_configured_identity_provider";
    let scratch = common::scratch();
    let pem_key = rcgen::KeyPair::generate().unwrap();
    let jwks_key = rcgen::KeyPair::generate().unwrap();
    let stranger = rcgen::KeyPair::generate().unwrap();
    let public_pem = scratch.path().join("idp.pem");
    let jwks = scratch.path().join("jwks.json");
    std::fs::write(&public_pem, pem_key.public_key_pem()).unwrap();
    std::fs::write(&jwks, jwks_of(&jwks_key, "k2")).unwrap();
    let node = common::node::TestNode::start_unclustered(
        test,
        "127.0.0.1",
        &[256 << 20],
        &[
            "--jwt-issuer",
            "https://idp.example",
            "--jwt-public-key-file",
            public_pem.to_str().unwrap(),
            "--jwt-jwks-file",
            jwks.to_str().unwrap(),
        ],
    );
    node.cli_ok(&["cluster", "init"]);
    let api = node.api_url();
    let now = node::datadir::now_unix_seconds();
    let claims = |sub: &str, role: Option<&str>, iss: &str, exp: u64| {
        let mut claims = serde_json::json!({"sub": sub, "iss": iss, "iat": now, "exp": exp});
        if let Some(role) = role {
            claims["role"] = role.into();
        }
        claims
    };
    let idp = "https://idp.example";
    let admin = es256_token(
        &pem_key.serialize_pem(),
        None,
        &claims("ops", Some("admin"), idp, now + 600),
    );
    let carol = es256_token(
        &jwks_key.serialize_pem(),
        Some("k2"),
        &claims("carol", None, idp, now + 600),
    );
    // The key in the PEM file signs an admin; the JWKS key a user (no role claim: user).
    assert_eq!(call("GET", &format!("{api}/v1/cluster"), Some(&admin), None).0, 200);
    let (code, body) = call(
        "POST",
        &format!("{api}/v1/volumes"),
        Some(&carol),
        Some(r#"{"name":"carols","size_bytes":16777216}"#),
    );
    assert_eq!(code, 201, "{body}");
    assert!(body.contains(r#""owner":"carol""#), "{body}");
    assert_eq!(call("GET", &format!("{api}/v1/cluster"), Some(&carol), None).0, 403);
    // Refused: another key, another issuer, expired, a JWKS kid that is not there.
    let forged = es256_token(
        &stranger.serialize_pem(),
        None,
        &claims("ops", Some("admin"), idp, now + 600),
    );
    let (code, body) = call("GET", &format!("{api}/v1/volumes"), Some(&forged), None);
    assert_eq!(code, 401, "{body}");
    let other_issuer = es256_token(
        &pem_key.serialize_pem(),
        None,
        &claims("ops", Some("admin"), "https://evil.example", now + 600),
    );
    assert_eq!(
        call("GET", &format!("{api}/v1/volumes"), Some(&other_issuer), None).0,
        401
    );
    let expired = es256_token(
        &pem_key.serialize_pem(),
        None,
        &claims("ops", Some("admin"), idp, now - 3600),
    );
    assert_eq!(call("GET", &format!("{api}/v1/volumes"), Some(&expired), None).0, 401);
    let unknown_kid = es256_token(
        &stranger.serialize_pem(),
        Some("k9"),
        &claims("carol", None, idp, now + 600),
    );
    assert_eq!(
        call("GET", &format!("{api}/v1/volumes"), Some(&unknown_kid), None).0,
        401
    );
    // The cluster's own tokens still work beside it.
    assert_eq!(
        call("GET", &format!("{api}/v1/volumes"), Some(&node.token()), None).0,
        200
    );
}

#[test]
fn a_volumes_group_acl_lets_members_in_and_keeps_others_out() {
    let test = "a_volumes_group_acl_lets_members_in";
    let node = common::node::TestNode::start(test, 256 << 20);
    let api = node.api_url();
    let token = |subject: &str, groups: &[&str]| {
        let mut args = vec!["auth", "token", "create", "--subject", subject];
        for group in groups {
            args.extend(["--group", group]);
        }
        node.cli_ok(&args).trim().to_owned()
    };
    let (alice, carol, bob) = (token("alice", &[]), token("carol", &["dba"]), token("bob", &["ops"]));
    let (code, body) = call(
        "POST",
        &format!("{api}/v1/volumes"),
        Some(&alice),
        Some(r#"{"name":"shared","size_bytes":16777216,"group":"dba"}"#),
    );
    assert_eq!(code, 201, "{body}");
    assert!(body.contains(r#""group":"dba""#), "{body}");
    let volume = format!("{api}/v1/volumes/shared");
    // Carol is in dba: she sees and uses it; bob (ops) does not.
    assert_eq!(call("GET", &volume, Some(&carol), None).0, 200);
    let (code, list) = call("GET", &format!("{api}/v1/volumes"), Some(&carol), None);
    assert!(code == 200 && list.contains("shared"), "{list}");
    assert_eq!(call("GET", &volume, Some(&bob), None).0, 403);
    let (code, list) = call("GET", &format!("{api}/v1/volumes"), Some(&bob), None);
    assert_eq!((code, list.as_str()), (200, "[]"));
    assert_eq!(call("POST", &format!("{volume}/attach"), Some(&bob), Some("{}")).0, 403);
    // A user's client certificate may carry only groups the user is in.
    let cert = |token: &str, groups: &str| {
        call(
            "POST",
            &format!("{api}/v1/auth/certs"),
            Some(token),
            Some(&format!(
                r#"{{"subject":"carol","role":"user","ttl_seconds":86400,"groups":{groups}}}"#
            )),
        )
        .0
    };
    assert_eq!(cert(&carol, r#"["dba"]"#), 201);
    assert_eq!(cert(&carol, r#"["ops"]"#), 403);
    // Members have the owner's rights, delete included.
    assert_eq!(call("DELETE", &volume, Some(&bob), None).0, 403);
    assert_eq!(call("DELETE", &volume, Some(&carol), None).0, 204);
}
