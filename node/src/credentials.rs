//! Who may call a node's internal listener, and what each caller may do.
//!
//! Four kinds of callers, four credentials (docs/security.md):
//!
//! | caller | credential | may call |
//! |---|---|---|
//! | another node | the cluster secret | everything |
//! | a gateway | the gateway secret | `GatewayService`; `GetClusterMap`, `ClusterStatus` |
//! | an operator's tool | the admin secret | `AdminService`; `GetClusterMap` |
//! | the app's backend | an API key | the `PushService` methods its scopes name |
//!
//! Secrets travel in the `rim-cluster-secret` metadata entry (its name is
//! historical: it carries whichever secret the caller holds), API keys in
//! `rim-api-key`. Nodes keep only the SHA-256 digest of each API key.
//! Every comparison takes the same time wherever the values differ, and the
//! caller's [`Role`] travels to the handler in the request's extensions.
//!
//! Fallbacks, for development and upgrades, each logged as a warning at
//! start-up: without a gateway or admin secret, gateways or tools present
//! the cluster secret (and so get a node's rights); without API keys, the
//! push API accepts the cluster secret. Once API keys are configured, the
//! push API accepts nothing else. With `strict_credentials` a node refuses
//! to start while any fallback (or the token key derived from the cluster
//! secret) would be in use, or while a separate secret equals the cluster
//! secret: what a cluster exposed to the internet should run with.
//!
//! Invariant: a request reaches a handler only with a credential that one of
//! the four matches, and only a handler whose service admits that role.

use std::sync::Arc;

use rim_proto::ErrorCode;
use rim_proto::metadata::{CLUSTER_SECRET_METADATA_KEY, secrets_equal};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::config::NodeConfig;
use crate::error::{Error, Result};

/// Metadata entry carrying an API key of the push API.
pub const API_KEY_METADATA_KEY: &str = "rim-api-key";

/// What an API key may do: `push.users`, `push.group`, `push.room`,
/// `push.all`, or `push` for all four; in the server API
/// (docs/server-api.md) `users` (UpsertUser), `tokens` (IssueToken) and
/// `sessions` (RevokeDevice, LogoutUser), `groups` (group administration);
/// and `events` (`GET /events`, docs/integration.md, and the server API's
/// dead letters). Each scope but `push` is granted only by itself.
pub const SCOPES: [&str; 10] = [
    "push",
    "push.users",
    "push.group",
    "push.room",
    "push.all",
    "users",
    "tokens",
    "sessions",
    "events",
    "groups",
];

/// One API key of the push API (`[[api_keys]]` in the node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs (never the key).
    pub name: String,
    /// Lowercase hex SHA-256 of the key (`printf %s KEY | sha256sum`).
    pub sha256: String,
    /// What the key may do ([`SCOPES`]).
    pub scopes: Vec<String>,
}

/// One token signing key (`[[token_keys]]` in the node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyConfig {
    /// The key's id, for configuration and logs.
    pub id: String,
    /// The secret the key is derived from (at least 16 bytes).
    pub secret: String,
}

/// Who a caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Another node (the cluster secret).
    Peer,
    /// A gateway.
    Gateway,
    /// An operator's tool.
    Admin,
    /// The app's backend, with the scopes of its API key.
    Push {
        /// The key's name.
        key: String,
        /// Its scopes.
        scopes: Vec<String>,
    },
}

impl Role {
    /// Whether this caller may use the push API's `scope`.
    pub fn may_push(&self, scope: &str, keys_configured: bool) -> bool {
        match self {
            Role::Push { scopes, .. } => scopes.iter().any(|s| s == "push" || s == scope),
            Role::Peer => !keys_configured,
            Role::Gateway | Role::Admin => false,
        }
    }

    /// Whether this caller may use `scope` of the server API: a `push.*`
    /// scope as [`Role::may_push`], any other only if the key names it.
    pub fn may(&self, scope: &str, keys_configured: bool) -> bool {
        if scope.starts_with("push") {
            return self.may_push(scope, keys_configured);
        }
        match self {
            Role::Push { scopes, .. } => scopes.iter().any(|s| s == scope),
            Role::Peer => !keys_configured,
            Role::Gateway | Role::Admin => false,
        }
    }
}

struct ApiKey {
    name: String,
    digest: [u8; 32],
    scopes: Vec<String>,
}

/// The credentials a node accepts.
#[derive(Clone)]
pub struct Credentials {
    cluster: String,
    gateway: Option<String>,
    admin: Option<String>,
    api_keys: Arc<Vec<ApiKey>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.api_keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("Credentials")
            .field("gateway", &self.gateway.is_some())
            .field("admin", &self.admin.is_some())
            .field("api_keys", &names)
            .finish()
    }
}

impl Credentials {
    /// The credentials of `config` (checked: see [`NodeConfig::validate`]).
    pub fn from_config(config: &NodeConfig) -> Result<Credentials> {
        let secret = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let mut api_keys = Vec::new();
        for k in &config.api_keys {
            let digest = decode_digest(&k.sha256).ok_or_else(|| {
                Error::Config(format!("api key {:?}: sha256 must be 64 hex digits", k.name))
            })?;
            if let Some(bad) = k.scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
                return Err(Error::Config(format!("api key {:?}: unknown scope {bad:?}", k.name)));
            }
            api_keys.push(ApiKey { name: k.name.clone(), digest, scopes: k.scopes.clone() });
        }
        let creds = Credentials {
            cluster: config.cluster_secret.clone(),
            gateway: secret(&config.gateway_secret),
            admin: secret(&config.admin_secret),
            api_keys: Arc::new(api_keys),
        };
        let fallbacks = creds.fallbacks(config);
        if config.strict_credentials && !fallbacks.is_empty() {
            return Err(Error::Config(format!("strict_credentials: {}", fallbacks.join("; "))));
        }
        Ok(creds)
    }

    /// The fallbacks `config` leaves in use (module docs), as sentences.
    fn fallbacks(&self, config: &NodeConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        let same = |s: &Option<String>| s.as_deref() == Some(self.cluster.as_str());
        if self.gateway.is_none() {
            out.push("no gateway_secret: gateways authenticate with the cluster secret");
        } else if same(&self.gateway) {
            out.push("gateway_secret equals the cluster secret");
        }
        if self.admin.is_none() {
            out.push("no admin_secret: admin tools authenticate with the cluster secret");
        } else if same(&self.admin) {
            out.push("admin_secret equals the cluster secret");
        }
        if self.api_keys.is_empty() {
            out.push("no api_keys: the push API accepts the cluster secret");
        }
        if config.token_keys.is_empty() {
            out.push("no token_keys: the token key is derived from the cluster secret");
        }
        out
    }

    /// Logs the fallbacks in use (module docs).
    pub fn warn_fallbacks(&self, config: &NodeConfig) {
        for f in self.fallbacks(config) {
            tracing::warn!("{f}");
        }
    }

    /// Whether API keys are configured (then only they open the push API).
    pub fn api_keys_configured(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// The role the credential in `metadata` proves, if any.
    pub fn role(&self, metadata: &MetadataMap) -> Option<Role> {
        if let Some(given) = metadata.get(CLUSTER_SECRET_METADATA_KEY).map(|v| v.as_bytes()) {
            // Every comparison runs, whichever matches.
            let peer = secrets_equal(given, self.cluster.as_bytes());
            let gateway = self.gateway.as_ref().is_some_and(|s| secrets_equal(given, s.as_bytes()));
            let admin = self.admin.as_ref().is_some_and(|s| secrets_equal(given, s.as_bytes()));
            return match (peer, admin, gateway) {
                (true, _, _) => Some(Role::Peer),
                (_, true, _) => Some(Role::Admin),
                (_, _, true) => Some(Role::Gateway),
                _ => None,
            };
        }
        self.api_key_role(metadata.get(API_KEY_METADATA_KEY)?.as_bytes())
    }

    /// The role of an API key, if it is one of the configured keys.
    fn api_key_role(&self, given: &[u8]) -> Option<Role> {
        let digest: [u8; 32] = Sha256::digest(given).into();
        let mut found = None;
        for k in self.api_keys.iter() {
            if secrets_equal(&digest, &k.digest) && found.is_none() {
                found = Some(Role::Push { key: k.name.clone(), scopes: k.scopes.clone() });
            }
        }
        found
    }

    /// An interceptor admitting the callers `admit` accepts; the caller's
    /// [`Role`] goes into the request's extensions for the handler.
    pub fn interceptor(
        &self,
        service: &'static str,
        admit: fn(&Role) -> bool,
    ) -> impl Fn(Request<()>) -> std::result::Result<Request<()>, Status> + Clone + use<> {
        self.intercept(service, admit, ErrorCode::ErrorPermissionDenied)
    }

    /// As [`Credentials::interceptor`], except that a request without a
    /// valid credential is refused `ERROR_UNAUTHENTICATED` (the server
    /// API's contract, docs/server-api.md).
    pub fn api_interceptor(
        &self,
        service: &'static str,
        admit: fn(&Role) -> bool,
    ) -> impl Fn(Request<()>) -> std::result::Result<Request<()>, Status> + Clone + use<> {
        self.intercept(service, admit, ErrorCode::ErrorUnauthenticated)
    }

    fn intercept(
        &self,
        service: &'static str,
        admit: fn(&Role) -> bool,
        unknown: ErrorCode,
    ) -> impl Fn(Request<()>) -> std::result::Result<Request<()>, Status> + Clone + use<> {
        let creds = self.clone();
        move |mut req: Request<()>| match creds.role(req.metadata()) {
            Some(role) if admit(&role) => {
                req.extensions_mut().insert(role);
                Ok(req)
            }
            Some(_) => Err(denied(&format!("this credential may not call {service}"))),
            None => Err(rim_proto::error::status(unknown, "a valid credential is required")),
        }
    }
}

/// The caller's role, as the interceptor recorded it.
pub fn role_of<T>(req: &Request<T>) -> Option<&Role> {
    req.extensions().get::<Role>()
}

/// `ERROR_PERMISSION_DENIED` with `why`.
pub fn denied(why: &str) -> Status {
    rim_proto::error::status(ErrorCode::ErrorPermissionDenied, why)
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex SHA-256 of `key`: what `[[api_keys]] sha256` holds.
pub fn api_key_digest(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            cluster_secret: "cluster-secret-0123456789".into(),
            gateway_secret: "gateway-secret-0123456789".into(),
            admin_secret: "admin-secret-0123456789".into(),
            api_keys: vec![ApiKeyConfig {
                name: "backend".into(),
                sha256: api_key_digest("key-of-the-backend"),
                scopes: vec!["push.users".into()],
            }],
            ..NodeConfig::default()
        }
    }

    fn with(key: &'static str, value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(key, value.parse().unwrap());
        m
    }

    #[test]
    fn each_credential_proves_its_role_only() {
        let c = Credentials::from_config(&config()).unwrap();
        let secret = |v: &str| c.role(&with(CLUSTER_SECRET_METADATA_KEY, v));
        assert_eq!(secret("cluster-secret-0123456789"), Some(Role::Peer));
        assert_eq!(secret("gateway-secret-0123456789"), Some(Role::Gateway));
        assert_eq!(secret("admin-secret-0123456789"), Some(Role::Admin));
        assert_eq!(secret("admin-secret-012345678"), None);
        assert_eq!(c.role(&MetadataMap::new()), None);
        let push = c.role(&with(API_KEY_METADATA_KEY, "key-of-the-backend")).unwrap();
        assert!(push.may_push("push.users", true));
        assert!(!push.may_push("push.all", true), "only its scopes");
        assert!(!push.may("tokens", true) && push.may("push.users", true));
        let all_push = Role::Push { key: "k".into(), scopes: vec!["push".into()] };
        assert!(!all_push.may("users", true), "`push` grants the push scopes only");
        assert_eq!(c.role(&with(API_KEY_METADATA_KEY, "key-of-the-backenD")), None);
        // A secret is not an API key, nor the other way round.
        assert_eq!(c.role(&with(API_KEY_METADATA_KEY, "cluster-secret-0123456789")), None);
        assert_eq!(secret("key-of-the-backend"), None);
        assert!(!Role::Peer.may_push("push.users", true), "with keys configured, only keys push");
        assert!(Role::Peer.may_push("push.users", false), "the fallback");
        assert!(!format!("{c:?}").contains("secret-0123"), "Debug never shows a secret");
    }

    #[test]
    fn without_separate_secrets_the_cluster_secret_is_everything() {
        let c = Credentials::from_config(&NodeConfig {
            cluster_secret: "cluster-secret-0123456789".into(),
            ..NodeConfig::default()
        })
        .unwrap();
        assert_eq!(c.role(&with(CLUSTER_SECRET_METADATA_KEY, "cluster-secret-0123456789")), Some(Role::Peer));
        assert_eq!(c.role(&with(CLUSTER_SECRET_METADATA_KEY, "")), None, "an empty secret never matches");
        assert!(!c.api_keys_configured());
    }

    #[test]
    fn strict_credentials_refuse_every_fallback() {
        let strict = |c: NodeConfig| Credentials::from_config(&NodeConfig { strict_credentials: true, ..c });
        let key = TokenKeyConfig { id: "k1".into(), secret: "token-key-secret-0123456789abcdef".into() };
        let full = NodeConfig { token_keys: vec![key], ..config() };
        assert!(strict(full.clone()).is_ok(), "every credential separate");
        let refused = |c: NodeConfig, want: &str| {
            let e = strict(c).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should name {want:?}");
            assert!(!e.contains("0123456789"), "no secret in the message: {e}");
        };
        refused(NodeConfig { gateway_secret: String::new(), ..full.clone() }, "no gateway_secret");
        refused(NodeConfig { admin_secret: String::new(), ..full.clone() }, "no admin_secret");
        refused(NodeConfig { api_keys: Vec::new(), ..full.clone() }, "no api_keys");
        refused(NodeConfig { token_keys: Vec::new(), ..full.clone() }, "no token_keys");
        let cluster = full.cluster_secret.clone();
        refused(NodeConfig { admin_secret: cluster.clone(), ..full.clone() }, "admin_secret equals");
        refused(NodeConfig { gateway_secret: cluster, ..full.clone() }, "gateway_secret equals");
        // Not strict: the same configurations start, with warnings.
        assert!(Credentials::from_config(&NodeConfig { api_keys: Vec::new(), ..full }).is_ok());
    }

    #[test]
    fn bad_api_key_configurations_are_refused() {
        let mut c = config();
        c.api_keys[0].sha256 = "not hex".into();
        assert!(Credentials::from_config(&c).is_err());
        let mut c = config();
        c.api_keys[0].scopes = vec!["admin".into()];
        assert!(Credentials::from_config(&c).is_err());
    }

    #[test]
    fn the_interceptor_admits_and_records_roles() {
        let c = Credentials::from_config(&config()).unwrap();
        let gate = c.interceptor("GatewayService", |r| matches!(r, Role::Peer | Role::Gateway));
        let mut ok = Request::new(());
        ok.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, "gateway-secret-0123456789".parse().unwrap());
        let ok = gate(ok).unwrap();
        assert_eq!(role_of(&ok), Some(&Role::Gateway));
        let mut admin = Request::new(());
        admin.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, "admin-secret-0123456789".parse().unwrap());
        let refused = gate(admin).unwrap_err();
        assert_eq!(rim_proto::error::code_of_status(&refused), ErrorCode::ErrorPermissionDenied);
        assert!(gate(Request::new(())).is_err());
    }
}
