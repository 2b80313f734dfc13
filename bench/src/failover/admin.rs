//! The cluster as its admin service shows it (`AdminService.ClusterStatus`
//! with the cluster secret): the cluster map, and who leads each group
//! (the target shard's leader before the kill, the new one after it).
//!
//! Invariants:
//!
//! * Every admin call has a connect and a request timeout of
//!   [`ADMIN_TIMEOUT`]; [`leaders`] asks again every 50 ms and fails after
//!   its timeout.
//! * A group's leader is the one named at the highest term over the nodes
//!   asked (the killed node skipped), so a node with a stale view does not
//!   win.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::{ClusterMap, ClusterStatusReply, ClusterStatusRequest};

use crate::target::Spawned;

/// Timeout of one admin call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks node `internal`'s admin service for its status.
async fn cluster_status(internal: &str, secret: &str) -> anyhow::Result<ClusterStatusReply> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{internal}"))?
        .connect_timeout(ADMIN_TIMEOUT)
        .connect_lazy();
    let mut r = tonic::Request::new(ClusterStatusRequest::default());
    r.set_timeout(ADMIN_TIMEOUT);
    r.metadata_mut().insert(
        rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY,
        secret.parse().context("cluster secret is not valid metadata")?,
    );
    let mut client = AdminServiceClient::new(ch);
    Ok(tokio::time::timeout(ADMIN_TIMEOUT, client.cluster_status(r))
        .await
        .context("admin call timed out")??
        .into_inner())
}

/// The cluster map, from the first node that answers.
pub(super) async fn cluster_map(sp: &Spawned) -> anyhow::Result<ClusterMap> {
    let mut last = None;
    for node in sp.nodes() {
        match cluster_status(&node.internal, sp.secret()).await {
            Ok(r) if r.map.is_some() => return r.map.context("no map"),
            Ok(_) => last = Some(anyhow::anyhow!("node {} has no cluster map yet", node.id)),
            Err(e) => last = Some(e.context(format!("node {}", node.id))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node")).context("reading the cluster map"))
}

/// Every group's leader as `group → (node, term)`: over the statuses of
/// the nodes not in `skip`, the leader named at the highest term. Asks
/// again every 50 ms until `done` holds for it or `timeout` passes.
pub(super) async fn leaders(
    sp: &Spawned,
    skip: &[u64],
    timeout: Duration,
    done: impl Fn(&BTreeMap<u32, (u64, u64)>) -> bool,
) -> anyhow::Result<BTreeMap<u32, (u64, u64)>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut best: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let mut errors = Vec::new();
        for node in sp.nodes().iter().filter(|n| !skip.contains(&n.id)) {
            match cluster_status(&node.internal, sp.secret()).await {
                Ok(r) => {
                    for g in r.groups.iter().filter(|g| g.leader_node_id != 0) {
                        let e = best.entry(g.group_id).or_insert((g.leader_node_id, g.term));
                        if g.term > e.1 {
                            *e = (g.leader_node_id, g.term);
                        }
                    }
                }
                Err(e) => errors.push(format!("node {}: {e:#}", node.id)),
            }
        }
        if done(&best) {
            return Ok(best);
        }
        if Instant::now() >= deadline {
            bail!("not within {timeout:?} (leaders seen {best:?}; errors {errors:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
