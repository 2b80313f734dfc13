//! Node configuration: one typed struct, layered from defaults, a TOML file,
//! command-line flags and `RIM_*` environment variables (each overriding the
//! previous), then checked by [`NodeConfig::validate`].
//!
//! Every field has a default suited to a local 3-node cluster on a loaded
//! 2-core machine: elections slow enough not to flap at idle. openraft 0.9
//! waits a leader lease (`election_max_ms`) plus a random election timeout
//! before a follower campaigns, so failover takes about 0.8-1.6 s plus the
//! vote round with the defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rim_proto::ids::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Configuration of one logic node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (≥ 1, unique in the cluster, never reused).
    pub id: NodeId,
    /// Data directory (RocksDB and snapshots).
    pub data: PathBuf,
    /// Internal listener: Raft, gateway and admin gRPC (cluster secret required).
    pub listen: String,
    /// Client-facing gRPC listener.
    pub client_listen: String,
    /// HTTP listener for `/metrics` and `/healthz`.
    pub http_listen: String,
    /// Create a new cluster from `peers` (ignored once the data dir is initialised).
    pub bootstrap: bool,
    /// Initial members for `bootstrap`: node id → internal address.
    #[serde(with = "peers_serde")]
    pub peers: BTreeMap<NodeId, String>,
    /// Dial these peers at these addresses instead of the addresses the
    /// cluster knows them by (Raft membership, cluster map): node id →
    /// address. Only this node's outgoing internal calls use it, so a test
    /// harness can route each link through its own proxy while gateways,
    /// hints and the membership keep the real addresses. Empty in production.
    #[serde(with = "peers_serde")]
    pub peer_via: BTreeMap<NodeId, String>,
    /// Internal address of a running node to join (new node, empty data dir).
    pub join: Option<String>,
    /// Data shards of a new cluster.
    pub shards: u32,
    /// Slots of a new cluster (fixed forever).
    pub slots: u32,
    /// Replicas per shard.
    pub replication: usize,
    /// The secret nodes authenticate each other with (Raft, forwarded
    /// calls, joining). Without the secrets below, it stands in for them.
    pub cluster_secret: String,
    /// TLS of the internal and client gRPC listeners and of every call this
    /// node makes to its peers (`[tls]` in TOML; none: plaintext). The
    /// internal listener requires client certificates when
    /// `require_client_cert` is set; the client listener never does.
    pub tls: Option<rim_cluster::LinkTlsConfig>,
    /// App-signed tokens (`[jwt]` and `[[jwt.keys]]` in TOML; no keys: off).
    /// With keys, a sign-in may present a JWT an app signed for its own
    /// user and device instead of a rim token (docs/security.md).
    pub jwt: crate::jwt::JwtConfig,
    /// The app's `before_send` hook (`[before_send]` in TOML; no `url`:
    /// none). See `crate::hooks`.
    pub before_send: crate::hooks::BeforeSendConfig,
    /// The app's `UserIntService.Auth` (gim's contract; `[auth_callback]`
    /// in TOML; no url: off): checks sign-in tokens that are neither rim
    /// tokens nor app-signed JWTs (docs/security.md).
    pub auth_callback: crate::auth_callback::AuthCallbackConfig,
    /// The secret gateways present (empty: the cluster secret).
    pub gateway_secret: String,
    /// Refuse to start unless every credential is separate: a gateway and
    /// an admin secret (each unlike the cluster secret), API keys and token
    /// keys configured (`node/src/credentials.rs`). Off by default for
    /// development; turn it on for a cluster exposed to the internet.
    pub strict_credentials: bool,
    /// The secret admin tools present (empty: the cluster secret).
    pub admin_secret: String,
    /// API keys of the push API, stored as SHA-256 digests (`[[api_keys]]`;
    /// none: the push API accepts the cluster secret).
    pub api_keys: Vec<crate::credentials::ApiKeyConfig>,
    /// Token signing keys (`[[token_keys]]`; none: one key derived from the
    /// cluster secret). Every key verifies; `token_signing_key` signs.
    pub token_keys: Vec<crate::credentials::TokenKeyConfig>,
    /// The id of the token key that signs new tokens (default: the first).
    pub token_signing_key: String,
    /// Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout.
    pub election_min_ms: u64,
    /// Upper bound of the election timeout.
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many applied entries.
    pub snapshot_after: u64,
    /// Log entries kept behind a snapshot (lets slightly lagging followers
    /// catch up from the log instead of a snapshot).
    pub keep_logs_after_snapshot: u64,
    /// Lifetime of issued device tokens.
    pub token_ttl_secs: u64,
    /// Development mode: phone sign-in accepts this fixed code (logged loudly).
    pub dev_code: Option<String>,
    /// Serve reads from the local replica without a read barrier (weaker:
    /// may miss the latest writes; see docs/consistency.md).
    pub follower_reads: bool,
    /// Fsync log writes. Turning this off breaks durability; for benchmarks only.
    pub fsync: bool,
    /// Most operations batched into one Raft entry.
    pub max_batch_ops: usize,
    /// Most proposals in flight per shard (default 1: with one entry in
    /// flight the next batch grows meanwhile; 4 cost latency and bought no
    /// throughput on the reference machine, docs/benchmarks.md).
    pub max_inflight_proposals: usize,
    /// Deadline of a client request inside the node.
    pub request_timeout_ms: u64,
    /// Groups with more members use read diffusion (0: all of them). Read
    /// only when this node bootstraps a cluster or seeds the limits of one
    /// that has none (see [`NodeConfig::initial_limits`]).
    pub small_group_limit: u32,
    /// The other limits a new cluster starts with (`[cluster_limits]` in
    /// TOML; missing keys: the defaults). Read only at bootstrap, like
    /// `small_group_limit`: afterwards the cluster's limits are replicated
    /// state, shown by `rim admin limits` and changed by `rim admin
    /// set-limits` (docs/operations.md).
    pub cluster_limits: rim_raft_store::Limits,
    /// Client rate limits and load shedding (`[limits]` in TOML;
    /// docs/security.md lists every limit with its default).
    pub limits: crate::throttle::RateLimits,
    /// Webhook endpoints events are POSTed to (`[[webhooks]]`; none: no
    /// deliveries, `GET /events` still serves). Every node must list the
    /// same ones (docs/integration.md).
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// Deliberately broken behaviour for the consistency harness's self-test
    /// (`[sabotage]` in TOML, `--sabotage` / `RIM_SABOTAGE=a,b`). All off by
    /// default; never turn one on outside tests (docs/consistency.md,
    /// "Deliberately broken builds").
    pub sabotage: Sabotage,
    /// Leader balance (`[balance]`, `--no-balance`; see `crate::balance`).
    pub balance: BalanceConfig,
}

/// The leader balancer (`[balance]`): on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// Whether the meta group's leader moves shard leaders (off: leaders
    /// stay where elections put them; `TransferLeader` still works).
    pub enabled: bool,
    /// How often the balancer looks at the leaders.
    pub interval_ms: u64,
    /// Least time between two moves.
    pub cooldown_ms: u64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig { enabled: true, interval_ms: 1_000, cooldown_ms: 3_000 }
    }
}

/// Switches that deliberately break a safety property, so that a consistency
/// checker can be shown to catch the resulting anomaly. Test-only: a node
/// with any of them on logs an error at start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sabotage {
    /// A send is answered with a predicted seq and message id as soon as the
    /// shard leader queued its proposal, before it commits: a leader that is
    /// cut off or dies right then loses acked sends.
    pub ack_before_commit: bool,
    /// Reads skip the read barrier and serve the local replica as it is
    /// (a lagging or partitioned follower misses acked writes).
    pub stale_reads: bool,
    /// Log appends (and state-machine writes) bypass the write-ahead log: no
    /// fsync, reported flushed at once, and lost by a process crash as by a
    /// power cut. A crash of a majority loses acked entries.
    pub skip_fsync: bool,
    /// `Deliver` ignores the "already holds this message id" check: a relay
    /// retry duplicates messages in recipients' lists.
    pub no_relay_dedup: bool,
    /// Webhook delivery treats every 5th event as delivered without
    /// sending it: the app never hears of those messages.
    pub drop_events: bool,
}

impl Sabotage {
    /// Flag names as on the command line, in field order.
    pub const NAMES: [&'static str; 5] =
        ["ack-before-commit", "stale-reads", "skip-fsync", "no-relay-dedup", "drop-events"];

    /// Parses `ack-before-commit,stale-reads,...` (underscores accepted;
    /// empty or `none`: nothing).
    pub fn parse(s: &str) -> Result<Sabotage> {
        let mut out = Sabotage::default();
        for name in s.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "none") {
            match name.replace('_', "-").as_str() {
                "ack-before-commit" => out.ack_before_commit = true,
                "stale-reads" => out.stale_reads = true,
                "skip-fsync" => out.skip_fsync = true,
                "no-relay-dedup" => out.no_relay_dedup = true,
                "drop-events" => out.drop_events = true,
                _ => {
                    return Err(Error::Config(format!(
                        "sabotage: unknown flag {name:?} (known: {})",
                        Sabotage::NAMES.join(", ")
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Whether any flag is on.
    pub fn any(&self) -> bool {
        self.ack_before_commit
            || self.stale_reads
            || self.skip_fsync
            || self.no_relay_dedup
            || self.drop_events
    }
}

impl std::fmt::Display for Sabotage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = [
            self.ack_before_commit,
            self.stale_reads,
            self.skip_fsync,
            self.no_relay_dedup,
            self.drop_events,
        ];
        let names: Vec<&str> =
            Sabotage::NAMES.iter().zip(on).filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        if names.is_empty() { f.write_str("none") } else { f.write_str(&names.join(",")) }
    }
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            id: 0,
            data: PathBuf::from("rim-data"),
            listen: "127.0.0.1:7101".into(),
            client_listen: "127.0.0.1:7201".into(),
            http_listen: "127.0.0.1:7301".into(),
            bootstrap: false,
            peers: BTreeMap::new(),
            peer_via: BTreeMap::new(),
            join: None,
            shards: 4,
            slots: 256,
            replication: 3,
            cluster_secret: String::new(),
            tls: None,
            jwt: crate::jwt::JwtConfig::default(),
            before_send: crate::hooks::BeforeSendConfig::default(),
            auth_callback: crate::auth_callback::AuthCallbackConfig::default(),
            gateway_secret: String::new(),
            strict_credentials: false,
            admin_secret: String::new(),
            api_keys: Vec::new(),
            token_keys: Vec::new(),
            token_signing_key: String::new(),
            heartbeat_ms: 100,
            election_min_ms: 400,
            election_max_ms: 800,
            snapshot_after: 20_000,
            keep_logs_after_snapshot: 1_000,
            token_ttl_secs: 30 * 24 * 3600,
            dev_code: None,
            follower_reads: false,
            fsync: true,
            max_batch_ops: 512,
            max_inflight_proposals: 1,
            request_timeout_ms: 5_000,
            small_group_limit: 500,
            cluster_limits: rim_raft_store::Limits::default(),
            limits: crate::throttle::RateLimits::default(),
            webhooks: Vec::new(),
            sabotage: Sabotage::default(),
            balance: BalanceConfig::default(),
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_toml(text: &str) -> Result<NodeConfig> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Overrides fields from `RIM_<FIELD>` variables (e.g. `RIM_ID=2`,
    /// `RIM_PEERS=1=a:1,2=b:2`, `RIM_FOLLOWER_READS=true`,
    /// `RIM_SABOTAGE=stale-reads,skip-fsync`).
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<()> {
        let mut table = toml::Table::try_from(&*self).map_err(|e| Error::Config(e.to_string()))?;
        let defaults =
            toml::Table::try_from(NodeConfig::default()).map_err(|e| Error::Config(e.to_string()))?;
        for (k, v) in vars {
            let Some(field) = k.strip_prefix("RIM_").map(str::to_ascii_lowercase) else { continue };
            if field == "peers" || field == "peer_via" {
                let peers = parse_peers(&v)?;
                let value = toml::Value::Table(
                    peers.into_iter().map(|(k, v)| (k.to_string(), toml::Value::String(v))).collect(),
                );
                table.insert(field, value);
                continue;
            }
            if field == "sabotage" {
                let value = toml::Value::try_from(Sabotage::parse(&v)?)
                    .map_err(|e| Error::Config(format!("{k}: {e}")))?;
                table.insert(field, value);
                continue;
            }
            let kind = table.get(&field).or_else(|| defaults.get(&field));
            let value = match kind {
                Some(toml::Value::Integer(_)) => v
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| Error::Config(format!("{k}: expected an integer, got {v:?}")))?,
                Some(toml::Value::Boolean(_)) => v
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| Error::Config(format!("{k}: expected true or false, got {v:?}")))?,
                // Strings, and optional fields absent from the table (dev_code).
                _ if field == "dev_code" || field == "join" || kind.is_some() => toml::Value::String(v),
                _ => continue, // not ours (e.g. RIM_LOG)
            };
            table.insert(field, value);
        }
        *self = table.try_into().map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        Ok(())
    }

    /// Checks the configuration; the error names the broken rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.id == 0 {
            return bad("id must be ≥ 1".into());
        }
        for (name, addr) in [
            ("listen", &self.listen),
            ("client_listen", &self.client_listen),
            ("http_listen", &self.http_listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(format!("{name}: {addr:?} is not an ip:port address"));
            }
        }
        if self.bootstrap {
            if self.peers.is_empty() {
                return bad("bootstrap needs peers (id=addr,...)".into());
            }
            match self.peers.get(&self.id) {
                Some(a) if *a == self.listen => {}
                Some(a) => {
                    return bad(format!("peers lists this node at {a}, but listen is {}", self.listen));
                }
                None => return bad(format!("peers must include this node ({})", self.id)),
            }
            if self.peers.contains_key(&0) {
                return bad("node ids must be ≥ 1".into());
            }
        }
        if let Some(tls) = &self.tls {
            let loaded = rim_cluster::LinkTls::load(tls).map_err(|e| Error::Config(format!("tls: {e}")))?;
            if !loaded.has_identity() {
                return bad("tls: a node serves TLS, so it needs `cert` and `key`".into());
            }
        }
        crate::jwt::JwtVerifier::from_config(&self.jwt)?;
        crate::hooks::BeforeSend::from_config(&self.before_send)?;
        crate::auth_callback::AuthCallback::check_config(&self.auth_callback)?;
        if self.peer_via.contains_key(&self.id) {
            return bad(format!("peer_via must not list this node ({})", self.id));
        }
        if let Some((id, a)) = self.peer_via.iter().find(|(_, a)| a.parse::<std::net::SocketAddr>().is_err())
        {
            return bad(format!("peer_via: {id}={a:?} is not an ip:port address"));
        }
        if self.shards == 0 || self.shards > 4096 {
            return bad(format!("shards must be 1..=4096, got {}", self.shards));
        }
        if self.slots < self.shards {
            return bad(format!("slots ({}) must be ≥ shards ({})", self.slots, self.shards));
        }
        if self.replication == 0 {
            return bad("replication must be ≥ 1".into());
        }
        if self.cluster_secret.len() < 16 {
            return bad("cluster_secret must be at least 16 characters".into());
        }
        for (name, secret) in [("gateway_secret", &self.gateway_secret), ("admin_secret", &self.admin_secret)]
        {
            if !secret.is_empty()
                && (secret.len() < 16
                    || rim_proto::metadata::secrets_equal(secret.as_bytes(), self.cluster_secret.as_bytes()))
            {
                return bad(format!("{name} must be at least 16 characters and differ from cluster_secret"));
            }
        }
        crate::credentials::Credentials::from_config(self)?;
        self.token_keys()?;
        if self.heartbeat_ms == 0 || self.election_min_ms <= 2 * self.heartbeat_ms {
            return bad(format!(
                "election_min_ms ({}) must exceed twice heartbeat_ms ({})",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_max_ms <= self.election_min_ms {
            return bad("election_max_ms must exceed election_min_ms".into());
        }
        if self.max_batch_ops == 0 || self.max_inflight_proposals == 0 || self.request_timeout_ms == 0 {
            return bad("max_batch_ops, max_inflight_proposals and request_timeout_ms must be ≥ 1".into());
        }
        if self.token_ttl_secs == 0 {
            return bad("token_ttl_secs must be ≥ 1".into());
        }
        crate::webhooks::endpoints(&self.webhooks)?;
        if let Err(e) = self.initial_limits().validate() {
            return bad(format!("cluster_limits: {e}"));
        }
        Ok(())
    }

    /// The limits a cluster this node bootstraps starts with (and those it
    /// seeds into a cluster that has none, when it leads the meta group):
    /// `[cluster_limits]` with `small_group_limit`.
    pub fn initial_limits(&self) -> rim_raft_store::Limits {
        rim_raft_store::Limits { small_group_limit: self.small_group_limit, ..self.cluster_limits.clone() }
    }
}

impl NodeConfig {
    /// The token keys: the configured ones, or one derived from the
    /// cluster secret.
    pub fn token_keys(&self) -> Result<rim_cluster::TokenKeys> {
        let config = |e: rim_cluster::Error| Error::Config(format!("token keys: {e}"));
        if self.token_keys.is_empty() {
            let key = rim_cluster::TokenKey::from_secret(&self.cluster_secret).map_err(config)?;
            return Ok(rim_cluster::TokenKeys::single("cluster-secret", key));
        }
        let keys: Vec<(String, String)> =
            self.token_keys.iter().map(|k| (k.id.clone(), k.secret.clone())).collect();
        let signing = if self.token_signing_key.is_empty() { &keys[0].0 } else { &self.token_signing_key };
        rim_cluster::TokenKeys::new(&keys, signing).map_err(config)
    }
}

/// TOML tables have string keys: `[peers]` is read as `"1" = "addr"`.
mod peers_serde {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(peers: &BTreeMap<u64, String>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(peers.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, String>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                k.parse().map(|k| (k, v)).map_err(|_| serde::de::Error::custom(format!("bad node id {k:?}")))
            })
            .collect()
    }
}

/// Parses `1=127.0.0.1:7101,2=127.0.0.1:7102`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| Error::Config(format!("peer {part:?}: expected id=addr")))?;
        let id: u64 = id.trim().parse().map_err(|_| Error::Config(format!("peer {part:?}: bad node id")))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(Error::Config(format!("peer {id} listed twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        NodeConfig {
            id: 1,
            bootstrap: true,
            peers: parse_peers("1=127.0.0.1:7101,2=127.0.0.1:7102").unwrap(),
            cluster_secret: "0123456789abcdef".into(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn layers_file_then_env() {
        let mut c = NodeConfig::from_toml("id = 3\nshards = 8\n[peers]\n1 = \"a:1\"\n").unwrap();
        assert_eq!((c.id, c.shards, c.peers.len()), (3, 8, 1));
        c.apply_env([
            ("RIM_SHARDS".to_string(), "16".to_string()),
            ("RIM_FOLLOWER_READS".into(), "true".into()),
            ("RIM_DEV_CODE".into(), "000000".into()),
            ("RIM_PEERS".into(), "1=x:1,2=y:2".into()),
            ("RIM_LOG".into(), "debug".into()),
            ("PATH".into(), "/bin".into()),
        ])
        .unwrap();
        assert_eq!(c.shards, 16);
        assert!(c.follower_reads);
        assert_eq!(c.dev_code.as_deref(), Some("000000"));
        assert_eq!(c.peers.get(&2).map(String::as_str), Some("y:2"));
        assert_eq!(c.id, 3, "untouched fields keep the file's value");
        assert!(!c.sabotage.any(), "sabotage is off by default");
    }

    #[test]
    fn sabotage_flags_parse_from_toml_and_env() {
        let c = NodeConfig::from_toml("[sabotage]\nskip_fsync = true\n").unwrap();
        assert_eq!(c.sabotage, Sabotage { skip_fsync: true, ..Sabotage::default() });
        let mut c = NodeConfig::default();
        c.apply_env([("RIM_SABOTAGE".to_string(), "ack-before-commit, no_relay_dedup".to_string())]).unwrap();
        assert!(c.sabotage.ack_before_commit && c.sabotage.no_relay_dedup);
        assert!(!c.sabotage.stale_reads && !c.sabotage.skip_fsync);
        assert_eq!(c.sabotage.to_string(), "ack-before-commit,no-relay-dedup");
        let all = Sabotage::parse(&Sabotage::NAMES.join(",")).unwrap();
        assert_eq!(all.to_string(), Sabotage::NAMES.join(","));
        assert_eq!(Sabotage::parse("none").unwrap(), Sabotage::default());
        let e = c.apply_env([("RIM_SABOTAGE".to_string(), "lose-everything".to_string())]).unwrap_err();
        assert!(e.to_string().contains("lose-everything"), "{e}");
        assert!(NodeConfig::from_toml("[sabotage]\nnope = true\n").is_err());
    }

    #[test]
    fn rate_limits_read_from_toml() {
        let c = NodeConfig::from_toml("[limits]\nsends_per_sec = 5\nauth_per_ip_per_sec = 0.5\n").unwrap();
        assert_eq!(c.limits.sends_per_sec, 5.0, "an integer is a rate too");
        assert_eq!(c.limits.auth_per_ip_per_sec, 0.5);
        assert_eq!(
            c.limits.send_burst,
            crate::throttle::RateLimits::default().send_burst,
            "the rest default"
        );
        assert!(NodeConfig::from_toml("[limits]\nsends_per_minute = 5\n").is_err(), "unknown keys refused");
    }

    #[test]
    fn cluster_limits_read_from_toml_and_are_validated() {
        let text = "small_group_limit = 3\n[cluster_limits]\nmax_content_bytes = 1000\n\
                    room_retention = { max_count = 5 }\n";
        let limits = NodeConfig::from_toml(text).unwrap().initial_limits();
        assert_eq!((limits.small_group_limit, limits.max_content_bytes), (3, 1000));
        assert_eq!(limits.room_retention.max_count, 5);
        let d = rim_raft_store::Limits::default();
        assert_eq!(limits.room_retention.max_age_ms, d.room_retention.max_age_ms, "the rest default");
        assert_eq!(limits.max_op_bytes, d.max_op_bytes);
        let e = NodeConfig::from_toml("[cluster_limits]\nsmall_group_limit = 3\n").unwrap_err();
        assert!(e.to_string().contains("small_group_limit"), "configured at the top level only: {e}");
        let mut bad = valid();
        bad.cluster_limits.max_op_bytes = 10;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("cluster_limits") && e.contains("max_op_bytes"), "{e}");
    }

    #[test]
    fn credentials_read_from_toml_and_are_validated() {
        let text = r#"
            gateway_secret = "gateway-secret-0123"
            token_signing_key = "new"
            [[token_keys]]
            id = "old"
            secret = "old-token-secret-0123"
            [[token_keys]]
            id = "new"
            secret = "new-token-secret-0123"
            [[api_keys]]
            name = "backend"
            sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            scopes = ["push.users"]
        "#;
        let c = NodeConfig { ..NodeConfig::from_toml(text).unwrap() };
        let c = NodeConfig {
            id: 1,
            bootstrap: true,
            peers: valid().peers,
            cluster_secret: valid().cluster_secret,
            ..c
        };
        c.validate().unwrap();
        assert_eq!(c.token_keys().unwrap().ids().collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(c.api_keys[0].scopes, ["push.users"]);
        let same = NodeConfig { gateway_secret: c.cluster_secret.clone(), ..c.clone() };
        assert!(same.validate().unwrap_err().to_string().contains("gateway_secret"));
        let unknown = NodeConfig { token_signing_key: "nope".into(), ..c.clone() };
        assert!(unknown.validate().is_err());
        assert_eq!(
            valid().token_keys().unwrap().ids().collect::<Vec<_>>(),
            ["cluster-secret"],
            "the fallback"
        );
    }

    #[test]
    fn peer_via_parses_and_is_validated() {
        let mut c = valid();
        c.apply_env([("RIM_PEER_VIA".to_string(), "2=127.0.0.1:9002".to_string())]).unwrap();
        assert_eq!(c.peer_via.get(&2).map(String::as_str), Some("127.0.0.1:9002"));
        c.validate().unwrap();
        let t = NodeConfig::from_toml("[peer_via]\n3 = \"127.0.0.1:9003\"\n").unwrap();
        assert_eq!(t.peer_via.get(&3).map(String::as_str), Some("127.0.0.1:9003"));
        c.peer_via.insert(1, "127.0.0.1:9001".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("this node"), "{e}");
        c.peer_via = [(2, "nowhere".to_string())].into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("peer_via") && e.contains("nowhere"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = NodeConfig::default();
        let e = c.apply_env([("RIM_SHARDS".to_string(), "many".to_string())]).unwrap_err();
        assert!(e.to_string().contains("RIM_SHARDS"), "{e}");
        assert!(NodeConfig::from_toml("nope = 1").is_err(), "unknown keys are refused");
        assert!(parse_peers("1=a,1=b").is_err());
        assert!(parse_peers("x=a").is_err());
    }

    #[test]
    fn validate_names_the_broken_rule() {
        valid().validate().unwrap();
        let cases: Vec<(NodeConfig, &str)> = vec![
            (NodeConfig { id: 0, ..valid() }, "id"),
            (NodeConfig { listen: "nowhere".into(), ..valid() }, "listen"),
            (NodeConfig { peers: BTreeMap::new(), ..valid() }, "peers"),
            (NodeConfig { id: 3, ..valid() }, "include this node"),
            (NodeConfig { shards: 0, ..valid() }, "shards"),
            (NodeConfig { slots: 2, shards: 4, ..valid() }, "slots"),
            (NodeConfig { cluster_secret: "short".into(), ..valid() }, "cluster_secret"),
            (NodeConfig { election_min_ms: 150, heartbeat_ms: 100, ..valid() }, "election_min_ms"),
            (NodeConfig { election_max_ms: 400, ..valid() }, "election_max_ms"),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }
}
