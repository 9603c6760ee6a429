//! Mutual TLS on the peer port (Raft and replication). `cluster init`
//! makes a cluster CA (ECDSA P-256, rcgen); every member holds a node
//! certificate it signed, in `DATA_DIR/tls/` (files 0600), and presents it
//! both as a server and as a client. A peer is a member only if its
//! certificate chains to the cluster's CA: another cluster's node, or a
//! client with no certificate, is not. Connections without a client
//! certificate may only ask to join (`handshake::Admitted::JoinOnly`).
//!
//! Joining: the token carries the CA's fingerprint, so the new node checks
//! it talks to a real member before it sends anything; it first gets its
//! certificate (the leader signs one for it), then joins over mTLS.
//!
//! The CA key lives in the replicated cluster state (so any member can
//! admit and renew), which makes every member's `cluster.redb` (0600) as
//! sensitive as the CA itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name every node certificate carries and every client checks.
pub const SERVER_NAME: &str = "ballast-node";
/// Where a node keeps its certificate, key and the CA certificate.
pub const TLS_DIR: &str = "tls";
/// How long a node certificate is valid (renew with `cluster rotate-certs`).
pub const NODE_CERT_DAYS: u64 = 365;
/// Hex digits of the CA fingerprint a join token carries (128 bits).
pub const FINGERPRINT_HEX: usize = 32;

/// The cluster CA (kept in the cluster state).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "ClusterCa({})", fingerprint(&self.cert_pem).unwrap_or_default())
    }
}

/// A node's certificate, its key and the CA certificate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// When the node certificate expires (Unix seconds; 0: unknown).
    #[serde(default)]
    pub expires_unix: u64,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bundle(ca {})", fingerprint(&self.ca_pem).unwrap_or_default())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params(cluster_id: uuid::Uuid) -> Result<rcgen::CertificateParams, String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("ballast cluster {cluster_id} CA"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A new CA for `cluster_id`.
pub fn new_ca(cluster_id: uuid::Uuid) -> Result<ClusterCa, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca_params(cluster_id)?.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(ClusterCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a leaf certificate says (see `sign`).
struct Leaf {
    common_name: String,
    dns_names: Vec<String>,
    ip_addresses: Vec<std::net::IpAddr>,
    uris: Vec<String>,
    server: bool,
    client: bool,
    days: u64,
}

/// Signs a new key's certificate with the cluster CA.
fn sign(ca: &ClusterCa, cluster_id: uuid::Uuid, leaf: Leaf) -> Result<Bundle, String> {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).map_err(|e| format!("the cluster CA key: {e}"))?;
    // The same subject and key as the stored CA certificate: an issuer for signing.
    let issuer = ca_params(cluster_id)?.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(leaf.dns_names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, leaf.common_name);
    for ip in leaf.ip_addresses {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    for uri in leaf.uris {
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from(uri).map_err(|e| e.to_string())?,
        ));
    }
    params.extended_key_usages = Vec::new();
    if leaf.server {
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    }
    if leaf.client {
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    }
    // qemu's certificate checks want key encipherment too (as with RSA keys).
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    let now = crate::datadir::now_unix_seconds();
    params.not_before = date_of(now.saturating_sub(86_400));
    params.not_after = date_of(now + leaf.days * 86_400);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer, &ca_key).map_err(|e| e.to_string())?;
    Ok(Bundle {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        // The certificate's last day starts at this midnight.
        expires_unix: (now + leaf.days * 86_400) / 86_400 * 86_400,
    })
}

/// A certificate for node `node_id`, signed by the cluster CA.
pub fn issue(ca: &ClusterCa, cluster_id: uuid::Uuid, node_id: u64) -> Result<Bundle, String> {
    sign(
        ca,
        cluster_id,
        Leaf {
            common_name: format!("ballast node {node_id}"),
            dns_names: vec![SERVER_NAME.to_owned()],
            ip_addresses: Vec::new(),
            uris: vec![format!("urn:ballast:{cluster_id}:node:{node_id}")],
            server: true,
            client: true,
            days: NODE_CERT_DAYS,
        },
    )
}

/// The certificate a node's NBD listener presents: NBD clients (GnuTLS in
/// libnbd, qemu) check the host name or address they dialled against it,
/// so it names them all (`names`: DNS names or IP addresses).
pub fn issue_nbd_server(
    ca: &ClusterCa,
    cluster_id: uuid::Uuid,
    node_id: u64,
    names: &[String],
) -> Result<Bundle, String> {
    let mut dns_names = vec![SERVER_NAME.to_owned()];
    let mut ip_addresses = Vec::new();
    for name in names {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => ip_addresses.push(ip),
            Err(_) => dns_names.push(name.clone()),
        }
    }
    sign(
        ca,
        cluster_id,
        Leaf {
            common_name: format!("ballast node {node_id} NBD"),
            dns_names,
            ip_addresses,
            uris: vec![format!("urn:ballast:{cluster_id}:nbd:{node_id}")],
            server: true,
            client: false,
            days: NODE_CERT_DAYS,
        },
    )
}

/// The URI a client certificate carries: who it is, in which cluster.
fn client_uri(cluster_id: uuid::Uuid, role: crate::api::auth::Role, subject: &str) -> String {
    format!("urn:ballast:{cluster_id}:client:{}:{subject}", role.as_str())
}

/// A client certificate for `subject` (NBD over TLS): the NBD listener
/// gives it the same rights as an API token of that subject and role.
pub fn issue_client(
    ca: &ClusterCa,
    cluster_id: uuid::Uuid,
    subject: &str,
    role: crate::api::auth::Role,
    groups: &[String],
    days: u64,
) -> Result<Bundle, String> {
    sign(
        ca,
        cluster_id,
        Leaf {
            common_name: subject.to_owned(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: std::iter::once(client_uri(cluster_id, role, subject))
                .chain(
                    groups
                        .iter()
                        .map(|group| format!("urn:ballast:{cluster_id}:group:{group}")),
                )
                .collect(),
            server: false,
            client: true,
            days,
        },
    )
}

/// Who a verified certificate of cluster `cluster_id` names: a client
/// certificate its subject and role, a node certificate an admin.
pub fn identity_of(cert_der: &[u8], cluster_id: uuid::Uuid) -> Result<crate::api::auth::Caller, String> {
    use crate::api::auth::{Caller, Role};
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?
        .ok_or("the certificate names nobody (no subject alternative name)")?;
    let prefix = format!("urn:ballast:{cluster_id}:");
    let mut found: Option<Caller> = None;
    let mut groups = Vec::new();
    for name in &names.value.general_names {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(&prefix) else {
            continue;
        };
        if let Some(group) = rest.strip_prefix("group:") {
            groups.push(group.to_owned());
        } else if let Some(node) = rest.strip_prefix("node:") {
            found = Some(Caller {
                subject: format!("node {node}"),
                role: Role::Admin,
                groups: Vec::new(),
            });
        } else if let Some(client) = rest.strip_prefix("client:") {
            let (role, subject) = client.split_once(':').ok_or("a malformed client name")?;
            let role = match role {
                "admin" => Role::Admin,
                "user" => Role::User,
                other => return Err(format!("unknown role {other:?} in the certificate")),
            };
            if subject.is_empty() {
                return Err("the certificate has an empty subject".into());
            }
            found = Some(Caller {
                subject: subject.to_owned(),
                role,
                groups: Vec::new(),
            });
        }
    }
    let mut caller =
        found.ok_or_else(|| format!("the certificate is not a client certificate of cluster {cluster_id}"))?;
    caller.groups = groups;
    Ok(caller)
}

/// The calendar day of a Unix time (certificate validity is by day).
fn date_of(unix_seconds: u64) -> time::OffsetDateTime {
    let days = i64::try_from(unix_seconds / 86_400).unwrap_or(0);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    rcgen::date_time_ymd(
        i32::try_from(year).unwrap_or(2000),
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

fn certs_of(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))
}

fn key_of(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or_else(|| "no private key in the PEM".to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a certificate (DER), as the first `FINGERPRINT_HEX` hex digits.
#[must_use]
pub fn fingerprint_der(der: &[u8]) -> String {
    hex(&Sha256::digest(der))[..FINGERPRINT_HEX].to_owned()
}

/// The fingerprint of the first certificate of a PEM.
pub fn fingerprint(pem: &str) -> Result<String, String> {
    let certs = certs_of(pem)?;
    let first = certs.first().ok_or("no certificate in the PEM")?;
    Ok(fingerprint_der(first))
}

fn files(data_dir: &Path) -> [(PathBuf, &'static str); 4] {
    let dir = data_dir.join(TLS_DIR);
    [
        (dir.join("ca.crt"), "ca"),
        (dir.join("node.crt"), "cert"),
        (dir.join("node.key"), "key"),
        (dir.join("node.expires"), "expires"),
    ]
}

/// Writes a bundle into `DATA_DIR/tls/` (0600 files, each replaced atomically).
pub fn write_bundle(data_dir: &Path, bundle: &Bundle) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = data_dir.join(TLS_DIR);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let expires = bundle.expires_unix.to_string();
    for (path, which) in files(data_dir) {
        let text = match which {
            "ca" => &bundle.ca_pem,
            "cert" => &bundle.cert_pem,
            "expires" => &expires,
            _ => &bundle.key_pem,
        };
        crate::datadir::write_atomic(&path, text).map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// The bundle in `DATA_DIR/tls/`, if the node has one.
pub fn read_bundle(data_dir: &Path) -> std::io::Result<Option<Bundle>> {
    let [ca, cert, key, expires] = files(data_dir);
    if !cert.0.exists() {
        return Ok(None);
    }
    Ok(Some(Bundle {
        ca_pem: std::fs::read_to_string(&ca.0)?,
        cert_pem: std::fs::read_to_string(&cert.0)?,
        key_pem: std::fs::read_to_string(&key.0)?,
        expires_unix: std::fs::read_to_string(&expires.0)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0),
    }))
}

/// This node's TLS settings for the peer port (none until it is in a cluster).
#[derive(Default)]
pub struct PeerTls {
    server: RwLock<Option<Arc<ServerConfig>>>,
    client: RwLock<Option<Arc<ClientConfig>>>,
    ca_fingerprint: RwLock<Option<String>>,
    expires_unix: std::sync::atomic::AtomicU64,
}

impl PeerTls {
    /// Builds the server and client configurations from `bundle` and uses
    /// them for every new connection (open ones keep theirs).
    pub fn install(&self, bundle: &Bundle) -> Result<(), String> {
        let provider = provider();
        let ca = certs_of(&bundle.ca_pem)?;
        let mut chain = certs_of(&bundle.cert_pem)?;
        chain.extend(ca.iter().cloned());
        let mut roots = RootCertStore::empty();
        for cert in &ca {
            roots
                .add(cert.clone())
                .map_err(|e| format!("the CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| e.to_string())?;
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key_of(&bundle.key_pem)?)
            .map_err(|e| format!("the node certificate: {e}"))?;
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_of(&bundle.key_pem)?)
            .map_err(|e| format!("the node certificate: {e}"))?;
        *self.server.write() = Some(Arc::new(server));
        *self.client.write() = Some(Arc::new(client));
        *self.ca_fingerprint.write() = Some(fingerprint(&bundle.ca_pem)?);
        self.expires_unix
            .store(bundle.expires_unix, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// When this node's certificate expires (Unix seconds; 0: none or unknown).
    #[must_use]
    pub fn expires_unix(&self) -> u64 {
        self.expires_unix.load(std::sync::atomic::Ordering::Acquire)
    }

    #[must_use]
    pub fn server(&self) -> Option<Arc<ServerConfig>> {
        self.server.read().clone()
    }

    #[must_use]
    pub fn client(&self) -> Option<Arc<ClientConfig>> {
        self.client.read().clone()
    }

    /// The cluster CA's fingerprint (join tokens carry it).
    #[must_use]
    pub fn ca_fingerprint(&self) -> Option<String> {
        self.ca_fingerprint.read().clone()
    }
}

/// A client configuration for joining: no client certificate; the server
/// must chain to a CA whose fingerprint is `ca_fingerprint` (from the token).
pub fn join_client(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let verifier = PinnedCa {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: Arc::clone(&provider),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Checks the server's chain against the CA certificate it sends, once
/// that CA's fingerprint matches the one the join token carries.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| fingerprint_der(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the member's cluster CA does not match the join token's fingerprint (wrong cluster, or someone in between)"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The name clients check on every member's certificate.
#[must_use]
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_days_are_calendar_days() {
        assert_eq!(date_of(0), rcgen::date_time_ymd(1970, 1, 1));
        assert_eq!(date_of(951_782_400), rcgen::date_time_ymd(2000, 2, 29));
        assert_eq!(date_of(1_795_564_800), rcgen::date_time_ymd(2026, 11, 25));
    }

    #[test]
    fn a_node_certificate_chains_to_its_cluster_ca_and_installs() {
        let cluster = uuid::Uuid::new_v4();
        let ca = new_ca(cluster).unwrap();
        let bundle = issue(&ca, cluster, 7).unwrap();
        let tls = PeerTls::default();
        tls.install(&bundle).unwrap();
        assert_eq!(tls.ca_fingerprint().unwrap(), fingerprint(&ca.cert_pem).unwrap());
        assert!(!format!("{ca:?} {bundle:?}").contains("PRIVATE KEY"));
        // Files round-trip with owner-only permissions.
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &bundle).unwrap();
        assert_eq!(read_bundle(dir.path()).unwrap().unwrap(), bundle);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("tls/node.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
