//! TLS on the NBD listener (NBD_OPT_STARTTLS) and who may open which export.
//!
//! The node presents a certificate signed by the cluster CA (made in
//! memory at start, naming the host, its addresses and `nbd_tls_names`),
//! and requires a client certificate signed by the same CA:
//! `ballast auth cert create` issues one for a subject and role. Over TLS
//! a user sees and opens only the volumes it owns; an admin all.
//!
//! TLS is required before any other option (NBD_REP_ERR_TLS_REQD) unless
//! the listener is loopback-only *and* `nbd_tls = "plaintext-on-loopback"`
//! is configured (the host is then trusted, as with the admin token in the
//! data directory). TLS-PSK is not offered: rustls, our one TLS stack, has
//! no external pre-shared keys.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::api::auth::Caller;
use crate::cluster::Cluster;

/// When TLS is required on the NBD listener (`nbd_tls` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Required on every listener.
    #[default]
    Required,
    /// Plaintext accepted (TLS offered) when the listener is loopback-only;
    /// required on any other.
    PlaintextOnLoopback,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "required" => Ok(Self::Required),
            "plaintext-on-loopback" => Ok(Self::PlaintextOnLoopback),
            other => Err(format!(
                "nbd_tls must be required or plaintext-on-loopback, not {other:?}"
            )),
        }
    }
}

/// Whether a listener on `address` must require TLS.
#[must_use]
pub fn required_for(address: SocketAddr, mode: TlsMode) -> bool {
    mode == TlsMode::Required || !address.ip().is_loopback()
}

/// The NBD listener's TLS settings and export access rules.
pub struct NbdSecurity {
    /// TLS before any option (NBD's FORCEDTLS mode).
    pub required: bool,
    cluster: Option<Arc<Cluster>>,
    names: Vec<String>,
    /// The server configuration, for the CA (fingerprint) it was made with.
    server: Mutex<Option<(String, Arc<ServerConfig>)>>,
    /// Where export opens and refusals are recorded.
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

impl NbdSecurity {
    /// For a listener on `address`; `extra_names` are more names (DNS or
    /// IP) clients may dial this node by.
    #[must_use]
    pub fn new(cluster: Arc<Cluster>, address: SocketAddr, mode: TlsMode, extra_names: &[String]) -> Self {
        let mut names = vec![
            crate::daemon::config::host_name(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if !address.ip().is_unspecified() {
            names.push(address.ip().to_string());
        }
        names.extend(extra_names.iter().cloned());
        names.sort();
        names.dedup();
        Self {
            required: required_for(address, mode),
            cluster: Some(cluster),
            names,
            server: Mutex::new(None),
            audit: None,
        }
    }

    /// Plaintext only, no TLS offered, no owners (tests, fuzzing).
    #[must_use]
    pub fn plaintext() -> Self {
        Self {
            required: false,
            cluster: None,
            names: Vec::new(),
            server: Mutex::new(None),
            audit: None,
        }
    }

    /// The TLS server configuration, once the node is in a cluster (its CA
    /// signs the certificate); `Err` says why TLS is not available.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let cluster = self.cluster.as_ref().ok_or("TLS is not configured on this listener")?;
        let (cluster_id, ca) = cluster
            .cluster_id()
            .zip(cluster.with_state(|state| state.ca.clone()))
            .ok_or("this node is not in a cluster yet, so it has no certificate for TLS")?;
        let fingerprint = crate::peer::tls::fingerprint(&ca.cert_pem)?;
        let mut cached = self.server.lock();
        if let Some((made_for, config)) = cached.as_ref() {
            if *made_for == fingerprint {
                return Ok(Arc::clone(config));
            }
        }
        let bundle = crate::peer::tls::issue_nbd_server(&ca, cluster_id, cluster.local.id, &self.names)?;
        let config = server_config(&bundle)?;
        *cached = Some((fingerprint, Arc::clone(&config)));
        Ok(config)
    }

    /// Who the client's (verified) certificate names.
    pub fn identity(&self, connection: &rustls::ServerConnection) -> Result<Caller, String> {
        let cluster_id = self
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.cluster_id())
            .ok_or("this node is not in a cluster")?;
        let cert = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("the client sent no certificate (make one with `ballast auth cert create`)")?;
        crate::peer::tls::identity_of(cert, cluster_id)
    }

    /// Who owns volume `name` ("" = the admins) and its group ACL ("" = none).
    #[must_use]
    pub fn owner_of(&self, name: &str) -> (String, String) {
        // A snapshot `VOLUME@SNAPSHOT` belongs to its volume's owner.
        let name = crate::volume::snapshot::split_name(name).map_or(name, |(volume, _)| volume);
        self.cluster.as_ref().map_or_else(Default::default, |cluster| {
            cluster.with_state(|state| {
                (
                    state.owners.get(name).cloned().unwrap_or_default(),
                    state.groups.get(name).cloned().unwrap_or_default(),
                )
            })
        })
    }
}

fn server_config(bundle: &crate::peer::tls::Bundle) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read_certs = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad certificate PEM: {e}"))
    };
    let ca = read_certs(&bundle.ca_pem)?;
    let mut chain = read_certs(&bundle.cert_pem)?;
    chain.extend(ca.iter().cloned());
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert).map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let key = rustls_pemfile::private_key(&mut bundle.key_pem.as_bytes())
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or("no private key in the PEM")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| e.to_string())?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the NBD certificate: {e}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_required_unless_plaintext_on_loopback_is_configured_for_a_loopback_listener() {
        let at = |text: &str| text.parse::<SocketAddr>().unwrap();
        let plaintext = TlsMode::PlaintextOnLoopback;
        assert!(!required_for(at("127.0.0.1:10809"), plaintext));
        assert!(!required_for(at("[::1]:10809"), plaintext));
        assert!(required_for(at("0.0.0.0:10809"), plaintext));
        assert!(required_for(at("10.1.2.3:10809"), plaintext));
        assert!(required_for(at("127.0.0.1:10809"), TlsMode::default()));
        assert_eq!("required".parse::<TlsMode>(), Ok(TlsMode::Required));
        assert_eq!("plaintext-on-loopback".parse::<TlsMode>(), Ok(plaintext));
        assert!("off".parse::<TlsMode>().is_err());
    }

    #[test]
    fn client_certificates_name_their_subject_and_role_in_their_cluster_only() {
        use crate::api::auth::Role;
        let cluster = uuid::Uuid::new_v4();
        let ca = crate::peer::tls::new_ca(cluster).unwrap();
        let der = |bundle: &crate::peer::tls::Bundle| {
            rustls_pemfile::certs(&mut bundle.cert_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
        };
        let alice = crate::peer::tls::issue_client(&ca, cluster, "alice", Role::User, &["dba".into()], 30).unwrap();
        let caller = crate::peer::tls::identity_of(&der(&alice), cluster).unwrap();
        assert_eq!((caller.subject.as_str(), caller.role), ("alice", Role::User));
        assert_eq!(caller.groups, vec!["dba".to_owned()]);
        let admin = crate::peer::tls::issue_client(&ca, cluster, "ops", Role::Admin, &[], 30).unwrap();
        assert!(crate::peer::tls::identity_of(&der(&admin), cluster).unwrap().is_admin());
        let node = crate::peer::tls::issue(&ca, cluster, 3).unwrap();
        assert!(crate::peer::tls::identity_of(&der(&node), cluster).unwrap().is_admin());
        // The server certificate names nobody; another cluster's id matches nothing.
        let server = crate::peer::tls::issue_nbd_server(&ca, cluster, 3, &["127.0.0.1".into()]).unwrap();
        assert!(crate::peer::tls::identity_of(&der(&server), cluster).is_err());
        assert!(crate::peer::tls::identity_of(&der(&alice), uuid::Uuid::new_v4()).is_err());
        assert!(server_config(&server).is_ok());
    }
}
