//! API authentication: every request but the health probes carries
//! `Authorization: Bearer <JWT>` (HS256). Two issuers are trusted:
//! - the cluster (`ballast:cluster:<id>`), whose secret is made at
//!   `cluster init` and kept in the replicated state: its tokens work on
//!   every node (`ballast auth token create`);
//! - this node (`ballast:node:<uuid>`), with a secret in the data
//!   directory: it signs the node's own admin token before the node is in a
//!   cluster.
//!
//! - optionally an identity provider (`jwt_issuer` with
//!   `jwt_public_key_file` or `jwt_jwks_file`): its tokens (RS256, ES256 or
//!   EdDSA) carry `sub`, `iss`, `exp` and a `role` claim (`admin`; `user`
//!   when missing).
//!
//! `DATA_DIR/admin.token` (0600, so root only) holds an admin token for the
//! CLI on the node's host: cluster-signed once the node is in a cluster.
//! Roles: `admin` (everything) and `user` (only volumes it owns).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;

/// The node's own token secret (hex of 32 random bytes).
pub const NODE_SECRET_FILE: &str = "api.secret";
/// The admin token the CLI on this host uses.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Life of the node's admin token (it is rewritten at every start).
pub const ADMIN_TOKEN_SECONDS: u64 = 10 * 365 * 86_400;
/// Longest life of a minted token.
pub const TOKEN_SECONDS_MAX: u64 = 366 * 86_400;
/// Life of the token a node uses to forward a request for its caller.
pub const FORWARD_TOKEN_SECONDS: u64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    /// Its name, as tokens and certificates carry it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
        }
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    /// Groups the subject belongs to (volume group ACLs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// Who is asking (from a verified token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub subject: String,
    pub role: Role,
    /// Its groups: it may use volumes whose group ACL names one.
    pub groups: Vec<String>,
}

impl Caller {
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Ok if the caller may act on a volume owned by `owner` ("" = admin's)
    /// whose group ACL is `group` ("" = none).
    pub fn may_use(&self, volume: &str, owner: &str, group: &str) -> Result<(), String> {
        let owns = !owner.is_empty() && owner == self.subject;
        let member = !group.is_empty() && self.groups.iter().any(|g| g == group);
        if self.is_admin() || owns || member {
            return Ok(());
        }
        Err(format!("volume {volume} belongs to another user"))
    }
}

tokio::task_local! {
    /// The caller of the API request being served (for forwarding).
    pub static CALLER: Caller;
}

/// The signing secrets this node trusts.
pub struct Authenticator {
    node_secret: Vec<u8>,
    node_issuer: String,
    cluster: Arc<Cluster>,
    data_dir: PathBuf,
    external: Option<ExternalIssuer>,
}

/// What an identity provider's token must say (`role` may be left out).
#[derive(Debug, Deserialize)]
struct ExternalClaims {
    sub: String,
    #[serde(default = "user_role")]
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
}

fn user_role() -> Role {
    Role::User
}

/// An identity provider whose tokens the API accepts, by its public keys.
pub struct ExternalIssuer {
    issuer: String,
    keys: Vec<ExternalKey>,
}

struct ExternalKey {
    /// The JWKS key id, if any (a token naming another is not tried on it).
    id: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

impl ExternalIssuer {
    /// Tokens of `issuer`, checked with the PEM public key in
    /// `public_key_file` (RSA, EC P-256 or Ed25519) and/or the keys of the
    /// JWKS document in `jwks_file`.
    pub fn load(issuer: &str, public_key_file: Option<&Path>, jwks_file: Option<&Path>) -> Result<Self, String> {
        if issuer.trim().is_empty() {
            return Err("jwt_issuer is empty".into());
        }
        let mut keys = Vec::new();
        if let Some(path) = public_key_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read jwt_public_key_file {}: {e}", path.display()))?;
            let key = DecodingKey::from_ec_pem(&pem)
                .map(|key| (key, Algorithm::ES256))
                .or_else(|_| DecodingKey::from_rsa_pem(&pem).map(|key| (key, Algorithm::RS256)))
                .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|key| (key, Algorithm::EdDSA)))
                .map_err(|_| {
                    format!(
                        "jwt_public_key_file {} holds no RSA, EC P-256 or Ed25519 public key in PEM",
                        path.display()
                    )
                })?;
            keys.push(ExternalKey {
                id: None,
                key: key.0,
                algorithm: key.1,
            });
        }
        if let Some(path) = jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read jwt_jwks_file {}: {e}", path.display()))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("jwt_jwks_file {} is not a JWKS: {e}", path.display()))?;
            for jwk in &set.keys {
                use jsonwebtoken::jwk::AlgorithmParameters as Params;
                let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                    (Some(named), _) => named
                        .to_string()
                        .parse::<Algorithm>()
                        .map_err(|e| format!("jwt_jwks_file {}: {e}", path.display()))?,
                    (None, Params::EllipticCurve(_)) => Algorithm::ES256,
                    (None, Params::RSA(_)) => Algorithm::RS256,
                    (None, Params::OctetKeyPair(_)) => Algorithm::EdDSA,
                    (None, Params::OctetKey(_)) => {
                        return Err(format!(
                            "jwt_jwks_file {}: shared-secret keys are not accepted",
                            path.display()
                        ))
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwt_jwks_file {}: {e}", path.display()))?;
                keys.push(ExternalKey {
                    id: jwk.common.key_id.clone(),
                    key,
                    algorithm,
                });
            }
        }
        if keys.is_empty() {
            return Err("jwt_issuer needs jwt_public_key_file or jwt_jwks_file (with at least one key)".into());
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            keys,
        })
    }

    fn verify(&self, token: &str) -> Result<Caller, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let mut errors = Vec::new();
        for key in &self.keys {
            if key.algorithm != header.alg || (header.kid.is_some() && key.id.is_some() && header.kid != key.id) {
                continue;
            }
            let mut validation = Validation::new(key.algorithm);
            validation.set_issuer(&[&self.issuer]);
            validation.set_required_spec_claims(&["exp", "iss", "sub"]);
            validation.validate_aud = false;
            validation.leeway = 30;
            match jsonwebtoken::decode::<ExternalClaims>(token, &key.key, &validation) {
                Ok(data) => {
                    return Ok(Caller {
                        subject: data.claims.sub,
                        role: data.claims.role,
                        groups: data.claims.groups,
                    })
                }
                Err(error) => errors.push(error.to_string()),
            }
        }
        if errors.is_empty() {
            errors.push(format!("no key of {} for a {:?} token", self.issuer, header.alg));
        }
        Err(errors.join("; "))
    }
}

fn now() -> u64 {
    crate::datadir::now_unix_seconds()
}

/// 32 random bytes, as hex (from the OS; uuid v4 uses getrandom).
#[must_use]
pub fn new_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Signs a token.
pub fn mint(secret: &[u8], issuer: &str, subject: &str, role: Role, seconds: u64) -> Result<String, String> {
    mint_for(
        secret,
        issuer,
        &Caller {
            subject: subject.to_owned(),
            role,
            groups: Vec::new(),
        },
        seconds,
    )
}

/// Signs a token for `caller` (its subject, role and groups).
pub fn mint_for(secret: &[u8], issuer: &str, caller: &Caller, seconds: u64) -> Result<String, String> {
    let iat = now();
    let claims = Claims {
        sub: caller.subject.clone(),
        role: caller.role,
        iss: issuer.to_owned(),
        iat,
        exp: iat + seconds,
        groups: caller.groups.clone(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign a token: {e}"))
}

fn verify(token: &str, secret: &[u8], issuer: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    validation.leeway = 30;
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation).map(|data| data.claims)
}

/// A 0600 file replaced atomically (file and directory fsynced).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    crate::datadir::write_atomic(path, text).map_err(std::io::Error::other)
}

impl Authenticator {
    /// Loads (or makes) the node secret in `data_dir`; `external`: an
    /// identity provider to trust as well.
    pub fn open(
        data_dir: &Path,
        node_uuid: uuid::Uuid,
        cluster: Arc<Cluster>,
        external: Option<ExternalIssuer>,
    ) -> anyhow::Result<Self> {
        let path = data_dir.join(NODE_SECRET_FILE);
        let secret = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let secret = new_secret();
                write_private(&path, &secret)?;
                secret
            }
            Err(error) => return Err(error.into()),
        };
        Ok(Self {
            node_secret: secret.into_bytes(),
            node_issuer: format!("ballast:node:{node_uuid}"),
            cluster,
            data_dir: data_dir.to_owned(),
            external,
        })
    }

    /// The cluster's issuer and secret, once the node is in a cluster.
    fn cluster_key(&self) -> Option<(String, Vec<u8>)> {
        let id = self.cluster.cluster_id()?;
        let secret = self.cluster.with_state(|state| state.api_secret.clone())?;
        Some((format!("ballast:cluster:{id}"), secret.0.into_bytes()))
    }

    /// Checks a bearer token.
    pub fn check(&self, token: &str) -> Result<Caller, String> {
        let mut errors = Vec::new();
        let signed_with_key = jsonwebtoken::decode_header(token).is_ok_and(|header| header.alg != Algorithm::HS256);
        if let Some(external) = self.external.as_ref().filter(|_| signed_with_key) {
            return external
                .verify(token)
                .map_err(|error| format!("invalid token ({error})"));
        }
        if let Some((issuer, secret)) = self.cluster_key() {
            match verify(token, &secret, &issuer) {
                Ok(claims) => return Ok(caller(claims)),
                Err(error) => errors.push(error.to_string()),
            }
        }
        match verify(token, &self.node_secret, &self.node_issuer) {
            Ok(claims) => Ok(caller(claims)),
            Err(error) => {
                errors.push(error.to_string());
                Err(format!("invalid token ({})", errors.join("; ")))
            }
        }
    }

    /// A cluster-signed token for `caller` (needs the node to be in a cluster).
    pub fn mint_cluster(&self, caller: &Caller, seconds: u64) -> Result<String, String> {
        let (issuer, secret) = self
            .cluster_key()
            .ok_or("this node is not in a cluster (tokens are signed with the cluster's secret)")?;
        mint_for(&secret, &issuer, caller, seconds)
    }

    /// Writes `DATA_DIR/admin.token`: cluster-signed when in a cluster.
    pub fn write_admin_token(&self) -> Result<(), String> {
        let subject = format!("admin@{}", self.cluster.local.name);
        let admin = Caller {
            subject: subject.clone(),
            role: Role::Admin,
            groups: Vec::new(),
        };
        let token = match self.mint_cluster(&admin, ADMIN_TOKEN_SECONDS) {
            Ok(token) => token,
            Err(_) => mint(
                &self.node_secret,
                &self.node_issuer,
                &subject,
                Role::Admin,
                ADMIN_TOKEN_SECONDS,
            )?,
        };
        write_private(&self.data_dir.join(ADMIN_TOKEN_FILE), &format!("{token}\n"))
            .map_err(|e| format!("cannot write the admin token: {e}"))
    }

    /// A short-lived cluster token for `caller`, to forward its request to
    /// another node (None: not in a cluster).
    #[must_use]
    pub fn forwarding_token(&self, caller: &Caller) -> Option<String> {
        self.mint_cluster(caller, FORWARD_TOKEN_SECONDS).ok()
    }
}

/// A short-lived cluster token for the caller of the request being served,
/// to forward it to another node (None outside a request or a cluster).
#[must_use]
pub fn forwarding_token(cluster: &Cluster) -> Option<String> {
    let caller = CALLER.try_with(Caller::clone).ok()?;
    let id = cluster.cluster_id()?;
    let secret = cluster.with_state(|state| state.api_secret.clone())?;
    mint_for(
        secret.0.as_bytes(),
        &format!("ballast:cluster:{id}"),
        &caller,
        FORWARD_TOKEN_SECONDS,
    )
    .ok()
}

fn caller(claims: Claims) -> Caller {
    Caller {
        subject: claims.sub,
        role: claims.role,
        groups: claims.groups,
    }
}

/// The token the CLI sends to the node at `api_url`: `BALLAST_TOKEN`,
/// else the file named by `BALLAST_TOKEN_FILE`, else the admin token of
/// the node on this host that serves `api_url` (`local_nodes`), else
/// `/var/lib/ballast/admin.token`, where readable.
#[must_use]
pub fn cli_token(api_url: &str) -> Option<String> {
    if let Ok(token) = std::env::var("BALLAST_TOKEN") {
        if !token.trim().is_empty() {
            return Some(token.trim().to_owned());
        }
    }
    let read = |path: PathBuf| std::fs::read_to_string(path).ok().map(|text| text.trim().to_owned());
    if let Some(path) = std::env::var_os("BALLAST_TOKEN_FILE") {
        return read(PathBuf::from(path));
    }
    crate::local_nodes::data_dir_of(api_url)
        .and_then(|data_dir| read(data_dir.join(ADMIN_TOKEN_FILE)))
        .or_else(|| read(PathBuf::from(crate::datadir::DEFAULT_DIR).join(ADMIN_TOKEN_FILE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_secret_issuer_and_lifetime() {
        let token = mint(b"secret", "ballast:cluster:x", "alice", Role::User, 60).unwrap();
        let claims = verify(&token, b"secret", "ballast:cluster:x").unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("alice", Role::User));
        assert!(verify(&token, b"other", "ballast:cluster:x").is_err(), "forged");
        assert!(verify(&token, b"secret", "ballast:cluster:y").is_err(), "wrong issuer");
        let mut claims = claims;
        claims.exp = now() - 3600;
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(verify(&expired, b"secret", "ballast:cluster:x").is_err(), "expired");
    }

    #[test]
    fn users_use_only_their_own_volumes_and_admins_all() {
        let alice = Caller {
            subject: "alice".into(),
            role: Role::User,
            groups: vec!["dba".into()],
        };
        assert!(alice.may_use("v", "alice", "").is_ok());
        assert!(alice.may_use("v", "bob", "").is_err());
        assert!(alice.may_use("v", "", "").is_err());
        assert!(
            alice.may_use("v", "bob", "dba").is_ok(),
            "a member of the volume's group"
        );
        assert!(alice.may_use("v", "bob", "ops").is_err());
        let root = Caller {
            subject: "root".into(),
            role: Role::Admin,
            groups: Vec::new(),
        };
        assert!(root.may_use("v", "bob", "").is_ok());
    }
}
