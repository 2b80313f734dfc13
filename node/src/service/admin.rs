//! The admin service (internal listener): cluster status, the cluster map,
//! the cluster's limits (`crate::limits`), and replica changes.
//!
//! Replica changes follow openraft's safe path: a new node joins each group
//! as a learner, the call blocks until it caught up, then the voter set is
//! changed with joint consensus. A removal that would leave a group without a
//! reachable majority is refused.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use rim_proto::ErrorCode;
use rim_proto::ids::{NodeId, ShardId};
use rim_proto::v1::admin_service_server::AdminService;
use rim_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::error::Error;
use crate::group::Group;

/// The admin service of a node.
#[derive(Debug, Clone)]
pub struct AdminSvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

/// Status of one hosted group, from its Raft metrics.
pub fn group_status(g: &Group) -> GroupStatus {
    let m = g.raft.metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    let mut replicas = Vec::new();
    let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
    for (id, _) in m.membership_config.membership().nodes() {
        let matched = m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
        let matched = if *id == m.id { Some(last) } else { matched };
        replicas.push(ReplicaStatus {
            node_id: *id,
            role: if voters.contains(id) { ReplicaRole::Voter } else { ReplicaRole::Learner } as i32,
            matched_index: matched.unwrap_or(0),
            lag: matched.map(|x| last.saturating_sub(x)).unwrap_or(0),
        });
    }
    GroupStatus {
        group_id: g.shard.0,
        leader_node_id: m.current_leader.unwrap_or(0),
        term: m.current_term,
        last_log_index: last,
        committed_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        replicas,
    }
}

impl AdminSvc {
    /// Records a group's current voters in the cluster map, registering a
    /// newly added node first if the map does not know it yet.
    async fn record_replicas(&self, g: &Group, added: Option<&NodeInfo>) -> Result<u64, Error> {
        let voters: Vec<u64> = g.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let shard = g.shard.0;
        self.core
            .update_map(|map| {
                if let Some(n) = added
                    && !map.nodes.iter().any(|x| x.node_id == n.node_id)
                {
                    map.nodes.push(n.clone());
                    map.nodes.sort_by_key(|x| x.node_id);
                }
                let known: BTreeSet<u64> = map.nodes.iter().map(|n| n.node_id).collect();
                if let Some(s) = map.shards.iter_mut().find(|s| s.shard_id == shard) {
                    s.replicas = voters
                        .iter()
                        .filter(|v| known.contains(v))
                        .map(|v| Replica { node_id: *v, role: ReplicaRole::Voter as i32 })
                        .collect();
                }
                Ok(())
            })
            .await
    }

    async fn add_to_group(&self, g: &Group, node: NodeId, addr: &str) -> Result<(), Error> {
        let m = g.raft.metrics().borrow().membership_config.clone();
        if m.membership().voter_ids().any(|v| v == node) {
            return Ok(());
        }
        g.raft
            .add_learner(node, BasicNode { addr: addr.to_string() }, true)
            .await
            .map_err(|e| Error::Unavailable(format!("group {}: adding learner {node}: {e}", g.shard)))?;
        let mut voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        voters.insert(node);
        g.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| Error::Unavailable(format!("group {}: promoting {node}: {e}", g.shard)))?;
        Ok(())
    }

    async fn remove_from_group(&self, g: &Group, node: NodeId) -> Result<(), Error> {
        let m = g.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        if !voters.contains(&node) {
            return Ok(());
        }
        let remaining: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != node).collect();
        if remaining.is_empty() {
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                format!("group {}: cannot remove the last voter", g.shard),
            ));
        }
        // Reachable = answers a ping now (or is this node).
        let mut reachable = 0;
        for v in &remaining {
            if *v == m.id || self.ping(g.shard, *v).await {
                reachable += 1;
            }
        }
        if reachable * 2 <= remaining.len() {
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                format!(
                    "group {}: removing node {node} would leave {reachable} reachable of {} voters, no majority",
                    g.shard,
                    remaining.len()
                ),
            ));
        }
        let change = g.raft.change_membership(remaining, false);
        tokio::time::timeout(4 * self.core.timeout, change)
            .await
            .map_err(|_| Error::Timeout(format!("group {}: removing {node} did not commit", g.shard)))?
            .map_err(|e| Error::Unavailable(format!("group {}: removing {node}: {e}", g.shard)))?;
        Ok(())
    }

    /// Whether node `node` answers on its internal listener within a second.
    async fn ping(&self, shard: ShardId, node: NodeId) -> bool {
        let Some(addr) = self.core.node_addr(shard, node) else { return false };
        let req = RaftRequest {
            group_id: u32::MAX,
            payload: Default::default(),
            target_node_id: node,
            from_node_id: self.core.id(),
        };
        let msg = self.core.peers.request(req, Duration::from_secs(1));
        let reply = self
            .core
            .peers
            .call(node, &addr, Duration::from_secs(1), |mut c, _| async move { c.read_index(msg).await })
            .await;
        reply.is_ok()
    }

    /// The groups a request applies to (wire ids), each on its leader (this node).
    fn led_groups(&self, ids: &[u32]) -> Result<Vec<Arc<Group>>, Error> {
        let groups = if ids.is_empty() {
            self.core.all_groups()
        } else {
            ids.iter().filter_map(|id| self.core.group(ShardId(*id))).collect()
        };
        for g in &groups {
            if !g.is_leader() {
                return Err(g.not_leader());
            }
        }
        Ok(groups)
    }
}

/// Changes to the cluster need an admin (or a node: a joining node adds
/// itself); a gateway's credential only reads.
fn changes_allowed<T>(req: &Request<T>) -> Result<(), Status> {
    use crate::credentials::{Role, denied, role_of};
    match role_of(req) {
        Some(Role::Admin | Role::Peer) => Ok(()),
        _ => Err(denied("changing the cluster needs the admin secret")),
    }
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusReply>, Status> {
        self.core.refresh_placement()?;
        Ok(Response::new(ClusterStatusReply {
            node_id: self.core.id(),
            map: self.core.placement().ok().map(|p| p.map().clone()),
            groups: self.core.all_groups().iter().map(|g| group_status(g)).collect(),
            unreachable_node_ids: Vec::new(),
        }))
    }

    async fn add_node(&self, req: Request<AddNodeRequest>) -> Result<Response<AddNodeReply>, Status> {
        changes_allowed(&req)?;
        let r = req.into_inner();
        if r.node_id == 0 || r.internal_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                "node_id and an ip:port internal_addr are required",
            )
            .into());
        }
        let info = NodeInfo {
            node_id: r.node_id,
            state: NodeState::Active as i32,
            internal_addr: r.internal_addr.clone(),
            client_addr: r.client_addr.clone(),
            http_addr: r.http_addr.clone(),
        };
        let mut version = 0;
        for g in self.led_groups(&r.group_ids)? {
            self.add_to_group(&g, r.node_id, &r.internal_addr).await?;
            version = self.record_replicas(&g, Some(&info)).await?;
        }
        Ok(Response::new(AddNodeReply { cluster_map_version: version }))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeReply>, Status> {
        changes_allowed(&req)?;
        let r = req.into_inner();
        let mut version = 0;
        for g in self.led_groups(&r.group_ids)? {
            self.remove_from_group(&g, r.node_id).await?;
            version = self.record_replicas(&g, None).await?;
        }
        Ok(Response::new(RemoveNodeReply { cluster_map_version: version }))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderReply>, Status> {
        changes_allowed(&req)?;
        let r = req.into_inner();
        let shard = ShardId(r.group_id);
        let leader = if r.campaign {
            crate::transfer::campaign(&self.core, shard).await?;
            self.core.id()
        } else {
            crate::transfer::transfer(&self.core, shard, r.to_node_id, r.forwarded).await?
        };
        Ok(Response::new(TransferLeaderReply { leader_node_id: leader }))
    }

    async fn get_cluster_map(
        &self,
        _req: Request<GetClusterMapRequest>,
    ) -> Result<Response<GetClusterMapReply>, Status> {
        self.core.refresh_placement()?;
        // The stored map carries no leaders; add what this node knows of the
        // groups it hosts, so gateways go to the leader at once.
        let mut p = (*self.core.placement()?).clone();
        for g in self.core.all_groups() {
            if let Some(l) = g.leader() {
                let _ = p.set_leader(g.shard, l);
            }
        }
        Ok(Response::new(GetClusterMapReply { map: Some(p.into_map()) }))
    }

    async fn get_limits(&self, _req: Request<GetLimitsRequest>) -> Result<Response<GetLimitsReply>, Status> {
        self.core.refresh_placement()?;
        let limits = self.core.placement().ok().and_then(|p| p.map().limits);
        Ok(Response::new(GetLimitsReply { limits, groups: crate::limits::applied(&self.core) }))
    }

    async fn set_limits(&self, req: Request<SetLimitsRequest>) -> Result<Response<SetLimitsReply>, Status> {
        changes_allowed(&req)?;
        let want = req
            .into_inner()
            .limits
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorBadRequest, "limits are required"))?;
        let stored = crate::limits::set(&self.core, want).await?;
        tracing::info!(version = stored.version, "the cluster's limits changed");
        Ok(Response::new(SetLimitsReply { limits: Some(stored) }))
    }
}
