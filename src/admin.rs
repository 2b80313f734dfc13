//! `rim admin`: cluster status, replica changes and the cluster's limits
//! through the nodes' admin services (internal listener, admin secret).
//!
//! A node reports only the groups it hosts; on a cluster larger than the
//! replication factor no node hosts them all. So `status` and the replica
//! changes ask the given node for the cluster map, then every node of the
//! map for its groups, and take each group as its leader reports it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rim_cluster::{LinkTls, LinkTlsConfig};
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::*;

/// Flags of `rim admin`.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Internal address of any node.
    #[arg(long, default_value = "127.0.0.1:7101", env = "RIM_ADMIN_ADDR")]
    addr: String,
    /// The nodes' admin secret (`admin_secret`), or their cluster secret
    /// where no admin secret is set.
    #[arg(long, alias = "admin-secret", env = "RIM_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: String,
    #[command(flatten)]
    tls: LinkTlsArgs,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// Nodes, groups, leaders, terms, applied indexes and replica lag.
    Status,
    /// Add a node as a voter of every group (learner first, then promoted).
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's internal address.
        #[arg(long)]
        internal_addr: String,
    },
    /// Remove a node from every group (refused if a group would lose its majority).
    RemoveNode {
        /// The node to remove.
        #[arg(long)]
        id: u64,
    },
    /// Move the leadership of one group to another voter (docs/operations.md,
    /// "Leader transfer and balance"); fails, leaving the leader in place,
    /// if the target is down or does not catch up.
    TransferLeader {
        /// The group (0 = the meta group).
        shard: u32,
        /// The node that should lead it; 0 = the most caught-up other voter.
        node: u64,
    },
    /// The cluster's limits, and the version each group hosted by the
    /// `--addr` node applies with.
    Limits,
    /// Change some of the cluster's limits; the others keep their values.
    /// Every group applies the change within a second or so.
    SetLimits(Box<LimitFlags>),
}

/// Declares the `set-limits` flags, one per field of `ClusterLimits`, how
/// they change a value, and how `limits` prints one.
macro_rules! limit_flags {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty,)*) => {
        /// Flags of `rim admin set-limits` (docs/operations.md).
        #[derive(Args, Debug, Default)]
        pub struct LimitFlags {
            $($(#[doc = $doc])* #[arg(long)] $field: Option<$ty>,)*
        }

        impl LimitFlags {
            /// `current` with the flags given.
            fn apply(&self, mut current: ClusterLimits) -> ClusterLimits {
                $(if let Some(v) = self.$field {
                    current.$field = v;
                })*
                current
            }
        }

        fn print_limits(l: &ClusterLimits) {
            println!("cluster limits v{}", l.version);
            $(println!("  {:<26} {}", stringify!($field).replace('_', "-"), l.$field);)*
        }
    };
}

limit_flags! {
    /// Largest message content in bytes.
    max_content_bytes: u64,
    /// Most user ids a message may mention.
    max_mentions: u32,
    /// Largest encoded client operation in bytes.
    max_op_bytes: u64,
    /// Longest client_msg_id in bytes.
    max_client_msg_id: u32,
    /// Longest name, nickname, URL or remark in bytes.
    max_name_bytes: u32,
    /// Largest `extra` blob in bytes.
    max_extra_bytes: u64,
    /// Groups with more members use read diffusion (0: every group does).
    small_group_limit: u32,
    /// Most members a group may have.
    max_group_members: u32,
    /// Most user ids in one membership operation.
    max_members_per_op: u32,
    /// Retention of new rooms: most entries (0: unbounded).
    room_max_count: u64,
    /// Retention of new rooms: oldest entry age in ms (0: unbounded).
    room_max_age_ms: i64,
    /// Most entries one append trims from a list.
    max_trim_per_op: u64,
    /// Dedup window in entries of a list (0: keep forever).
    dedup_window: u64,
    /// How long a sender may recall a message, in ms (0: no limit).
    recall_window_ms: i64,
    /// How long before an orphaned account name may be claimed again, in ms.
    orphan_claim_ms: i64,
    /// No events (webhooks, GET /events) are produced (true/false).
    events_disabled: bool,
    /// How long an event is kept and retried, in ms.
    event_retention_ms: i64,
    /// No device.online / device.offline events (true/false).
    presence_events_disabled: bool,
    /// How long a closed connection may be followed by a new one before the device counts as offline, in ms.
    offline_grace_ms: i64,
    /// No push.needed events (true/false).
    push_needed_disabled: bool,
    /// How long a received message may stay unacknowledged by a device before push.needed, in ms.
    push_needed_after_ms: i64,
}

/// TLS of the links to the nodes' internal listeners (`rim admin`, and
/// any other tool dialling them).
#[derive(Args, Debug, Default)]
pub struct LinkTlsArgs {
    /// CA bundle (PEM) verifying the nodes: connect over TLS.
    #[arg(long = "ca", env = "RIM_TLS_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM), for nodes that require one.
    #[arg(long = "cert", env = "RIM_TLS_CERT", requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", env = "RIM_TLS_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Name the nodes' certificates carry (default: each address's host).
    #[arg(long = "server-name", env = "RIM_TLS_SERVER_NAME", requires = "ca")]
    server_name: Option<String>,
}

impl LinkTlsArgs {
    /// The loaded TLS material, if a CA was given.
    pub fn load(self) -> anyhow::Result<Option<LinkTls>> {
        let Some(ca) = self.ca else { return Ok(None) };
        let files = LinkTlsConfig {
            ca,
            cert: self.cert,
            key: self.key,
            require_client_cert: false,
            server_name: self.server_name,
        };
        Ok(Some(LinkTls::load(&files)?))
    }
}

/// How this tool reaches the nodes: the credential it presents and the
/// TLS of its links.
struct Admin {
    secret: String,
    tls: Option<LinkTls>,
}

impl Admin {
    fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(Duration::from_secs(120));
        r.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, self.secret.parse().context("bad secret")?);
        Ok(r)
    }

    async fn client(&self, addr: &str) -> anyhow::Result<AdminServiceClient<tonic::transport::Channel>> {
        let ch = rim_cluster::tls::endpoint(addr, self.tls.as_ref())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(AdminServiceClient::new(ch))
    }
}

/// Runs an admin command.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let admin = Admin { secret: args.cluster_secret, tls: args.tls.load()? };
    let mut c = admin.client(&args.addr).await?;
    match args.cmd {
        AdminCmd::Status => {
            let s = cluster_status(&admin, &mut c).await?;
            print_status(&s);
        }
        AdminCmd::AddNode { id, internal_addr } => {
            for g in groups_by_leader(&admin, &mut c).await? {
                let mut leader = admin.client(&g.1).await?;
                let req = AddNodeRequest {
                    node_id: id,
                    internal_addr: internal_addr.clone(),
                    group_ids: vec![g.0],
                    ..Default::default()
                };
                leader.add_node(admin.request(req)?).await.with_context(|| format!("group {}", g.0))?;
                println!("group {:>3}: node {id} added", g.0);
            }
        }
        AdminCmd::TransferLeader { shard, node } => {
            let started = std::time::Instant::now();
            let req = TransferLeaderRequest {
                group_id: shard,
                to_node_id: node,
                campaign: false,
                forwarded: false,
            };
            let reply = c
                .transfer_leader(admin.request(req)?)
                .await
                .with_context(|| format!("transferring the leadership of group {shard}"))?;
            println!(
                "group {shard}: leader is now node {} ({} ms)",
                reply.into_inner().leader_node_id,
                started.elapsed().as_millis()
            );
        }
        AdminCmd::RemoveNode { id } => {
            for g in groups_by_leader(&admin, &mut c).await? {
                let mut leader = admin.client(&g.1).await?;
                let req = RemoveNodeRequest { node_id: id, group_ids: vec![g.0] };
                leader.remove_node(admin.request(req)?).await.with_context(|| format!("group {}", g.0))?;
                println!("group {:>3}: node {id} removed", g.0);
            }
        }
        AdminCmd::Limits => {
            let r = c.get_limits(admin.request(GetLimitsRequest {})?).await?.into_inner();
            match &r.limits {
                Some(l) => print_limits(l),
                None => {
                    println!("the cluster holds no limits yet: every group applies the built-in defaults")
                }
            }
            println!("groups on the --addr node, with the limits version each applies:");
            for g in &r.groups {
                println!("  group {:>3}: v{}", g.group_id, g.version);
            }
        }
        AdminCmd::SetLimits(flags) => {
            let r = c.get_limits(admin.request(GetLimitsRequest {})?).await?.into_inner();
            let current = r.limits.context("the cluster holds no limits yet; retry in a moment")?;
            let want = flags.apply(current);
            if want == current {
                bail!("no flag changes a limit (see `rim admin set-limits --help`)");
            }
            let req = SetLimitsRequest { limits: Some(want) };
            let r = c.set_limits(admin.request(req)?).await?.into_inner();
            print_limits(&r.limits.context("the node stored no limits")?);
        }
    }
    Ok(())
}

/// The map as the given node knows it, and every group of the cluster as
/// its leader reports it (else as any node hosting it does), merged into one
/// status reply. Nodes that do not answer are listed as unreachable.
async fn cluster_status(
    admin: &Admin,
    c: &mut AdminServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<ClusterStatusReply> {
    let first = c.cluster_status(admin.request(ClusterStatusRequest::default())?).await?.into_inner();
    let map = first.map.clone().context("node has no cluster map")?;
    let mut groups: std::collections::BTreeMap<u32, GroupStatus> = std::collections::BTreeMap::new();
    let mut unreachable = Vec::new();
    let mut merge = |from: u64, reply: &ClusterStatusReply| {
        for g in &reply.groups {
            if g.leader_node_id == from || !groups.contains_key(&g.group_id) {
                groups.insert(g.group_id, g.clone());
            }
        }
    };
    merge(first.node_id, &first);
    for n in map.nodes.iter().filter(|n| n.node_id != first.node_id && n.state != NodeState::Removed as i32) {
        let reply = match admin.client(&n.internal_addr).await {
            Ok(mut other) => other.cluster_status(admin.request(ClusterStatusRequest::default())?).await,
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match reply {
            Ok(r) => merge(n.node_id, &r.into_inner()),
            Err(_) => unreachable.push(n.node_id),
        }
    }
    Ok(ClusterStatusReply {
        node_id: first.node_id,
        map: Some(map),
        groups: groups.into_values().collect(),
        unreachable_node_ids: unreachable,
    })
}

/// Every group of the cluster with its leader's internal address.
async fn groups_by_leader(
    admin: &Admin,
    c: &mut AdminServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<(u32, String)>> {
    let s = cluster_status(admin, c).await?;
    let map = s.map.context("node has no cluster map")?;
    let mut out = Vec::new();
    for g in &s.groups {
        let Some(leader) = map.nodes.iter().find(|n| n.node_id == g.leader_node_id) else {
            bail!("group {} has no known leader; retry", g.group_id);
        };
        out.push((g.group_id, leader.internal_addr.clone()));
    }
    Ok(out)
}

fn print_status(s: &ClusterStatusReply) {
    if let Some(map) = &s.map {
        println!("cluster map v{} ({} slots)", map.version, map.slots);
        println!("{:>5}  {:<22} {:<22} {:<22}", "node", "internal", "client", "http");
        for n in &map.nodes {
            println!("{:>5}  {:<22} {:<22} {:<22}", n.node_id, n.internal_addr, n.client_addr, n.http_addr);
        }
        println!();
    }
    if !s.unreachable_node_ids.is_empty() {
        println!("unreachable nodes: {:?}", s.unreachable_node_ids);
    }
    println!("groups, as their leaders report them:");
    println!(
        "{:>5}  {:>6}  {:>6}  {:>9}  {:>9}  {:>9}  replicas (node:lag)",
        "group", "leader", "term", "last_log", "applied", "snapshot"
    );
    for g in &s.groups {
        let reps: Vec<String> = g
            .replicas
            .iter()
            .map(|r| {
                let learner = if r.role == ReplicaRole::Learner as i32 { "L" } else { "" };
                format!("{}{learner}:{}", r.node_id, r.lag)
            })
            .collect();
        println!(
            "{:>5}  {:>6}  {:>6}  {:>9}  {:>9}  {:>9}  {}",
            g.group_id,
            g.leader_node_id,
            g.term,
            g.last_log_index,
            g.applied_index,
            g.snapshot_index,
            reps.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: LimitFlags,
    }

    #[test]
    fn set_limits_flags_change_only_the_limits_they_name() {
        let cli = Cli::parse_from(["rim", "--max-content-bytes", "500", "--small-group-limit", "0"]);
        let current = ClusterLimits {
            version: 3,
            max_content_bytes: 1000,
            small_group_limit: 7,
            dedup_window: 9,
            ..ClusterLimits::default()
        };
        let want = cli.flags.apply(current);
        assert_eq!(want, ClusterLimits { max_content_bytes: 500, small_group_limit: 0, ..current });
        assert!(Cli::try_parse_from(["rim", "--max-content-bytes", "-1"]).is_err());
    }
}
