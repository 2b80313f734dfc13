//! Gateway-facing gRPC (internal listener, cluster secret required).
//!
//! Gateways speak for their connections: the identity comes from the
//! connection context the gateway established at `ConnSignIn`, where the
//! token is checked strictly (signature, expiry, and the device's token
//! version read linearizably, so a logout is effective at once).
//!
//! # Push subscriptions
//!
//! A gateway opens one `Subscribe` stream per shard, to that shard's leader,
//! and keeps it told which user and group ids it has connections for. The
//! leader streams every entry applied to those lists, with its seq. The
//! stream ends (with `StreamEnd` and the leader hint) when this node stops
//! leading the shard, when the gateway falls too far behind (its queue is
//! bounded), or when the node lags behind its own apply events; the gateway
//! then re-subscribes and syncs its connections from their last seq, so a
//! break never loses a message (seqs are gap-free).
//!
//! # Batched sends
//!
//! `SendBatch` carries many `Send`s in one RPC (a gateway batches what its
//! connections send towards one node, to save the per-RPC cost on both
//! sides). Every item goes through [`send_one`], the very function behind
//! `Send`, and all items of a batch run concurrently: their proposals meet
//! in the shard proposers' queues and are group-committed like concurrent
//! unary sends. Invariants:
//!
//! * an item's result is exactly what `Send` would have answered for it:
//!   its output, or the code, message and leader hint of the status `Send`
//!   would have failed with ([`send_result`] reads them off that very
//!   status), so the gateway's retry and leader-following logic cannot tell
//!   the two apart;
//! * one result per item, in the items' order; an item's failure fails only
//!   that item;
//! * a batch holds at most [`MAX_SEND_BATCH`] items; a larger one fails as
//!   a whole with `ERROR_BAD_REQUEST` before any item runs.

use std::collections::HashSet;
use std::sync::Arc;

use futures::Stream;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, Seq, ShardId, UserId};
use rim_proto::store;
use rim_proto::v1::gateway_service_server::GatewayService;
use rim_proto::v1::subscribe_event::Event;
use rim_proto::v1::*;
use rim_raft_store::ListRef;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::client::Caller;
use super::{identity, ops};
use crate::core::Core;
use crate::error::Error;

/// Pushes queued per subscription stream before the stream is ended.
const PUSH_QUEUE: usize = 4_096;
/// Heartbeat interval clients are told to use.
pub const HEARTBEAT_MS: u32 = 30_000;
/// Most items in one `SendBatch`.
pub const MAX_SEND_BATCH: usize = 1_024;

/// The gateway-facing service of a node.
#[derive(Debug, Clone)]
pub struct GatewaySvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

fn conn(core: &Core, c: Option<ConnContext>) -> Result<Caller, Status> {
    Ok(current_conn(core, c)?)
}

/// [`checked_conn`], and the device is still signed in at the version the
/// connection signed in with, as far as this node's replica of the user's
/// shard knows ([`Core::check_device_version`]).
fn current_conn(core: &Core, c: Option<ConnContext>) -> Result<Caller, Error> {
    let version = c.as_ref().and_then(|c| c.token_version);
    let caller = checked_conn(c)?;
    if let Some(version) = version {
        core.check_device_version(caller.user, caller.device, version)?;
    }
    Ok(caller)
}

/// The connection's user and device (the gateway verified its token at
/// sign-in); the user must not be 0.
fn checked_conn(c: Option<ConnContext>) -> Result<Caller, Error> {
    let c = c.ok_or_else(|| Error::rejected(ErrorCode::ErrorBadRequest, "connection context missing"))?;
    ops::check_id("user_id", c.user_id)?;
    Ok(Caller { user: UserId(c.user_id), device: DeviceId(c.device_id) })
}

/// One `Send`: what both `Send` and each item of `SendBatch` run.
async fn send_one(core: &Core, r: ConnSendRequest) -> Result<SendOutput, Error> {
    let c = current_conn(core, r.conn)?;
    let mut input = r.input.unwrap_or_default();
    if input.conversation_kind == ConversationKind::Unspecified as i32 {
        let kind = if r.group { ConversationKind::Group } else { ConversationKind::User };
        input.conversation_kind = kind as i32;
    }
    ops::send(core, c.user, c.device, input).await
}

/// The `SendBatch` result of one item: its output, or what the status
/// `Send` would have returned carries (`rim-code`, message, `rim-leader`).
fn send_result(r: Result<SendOutput, Error>) -> ConnSendResult {
    match r {
        Ok(output) => ConnSendResult { output: Some(output), ..Default::default() },
        Err(e) => {
            let status = Status::from(e);
            ConnSendResult {
                output: None,
                code: rim_proto::error::code_of_status(&status) as i32,
                message: status.message().to_string(),
                leader_addr: rim_proto::error::leader_of_status(&status).unwrap_or_default().to_string(),
                retry_after_ms: rim_proto::error::retry_after_of_status(&status),
            }
        }
    }
}

#[tonic::async_trait]
impl GatewayService for GatewaySvc {
    async fn conn_sign_in(
        &self,
        req: Request<ConnSignInRequest>,
    ) -> Result<Response<ConnSignInReply>, Status> {
        let r = req.into_inner();
        let ctx_gateway = r.conn.as_ref().map(|c| c.gateway_id.clone()).unwrap_or_default();
        let input = r.input.unwrap_or_default();
        // An app-signed token names the app's user and device: they become
        // rim's (created on first sight), and the token's expiry is the
        // connection's. Its signature is checked first too. So do the app's
        // ids and token its auth callback vouches for (gim's way).
        let (user_id, device_id, token_version, expires_at_ms) =
            if let Some(s) = identity::app_sign_in(&self.core, &input).await? {
                (s.user, identity::device_id(&s), s.device.token_version, s.identity.expires_at_ms)
            } else {
                ops::check_id("user_id", input.user_id)?;
                ops::check_id("device_id", input.device_id)?;
                let (user, device) = (UserId(input.user_id), DeviceId(input.device_id));
                // The signature first: a forged token costs no read barrier.
                let claims = self.core.token_claims(user, device, &input.token)?;
                (user, device, claims.token_version, claims.expires_at_ms)
            };
        let shard = self.core.shard_of_user(user_id)?;
        // Linearizable: a logout acknowledged before this sign-in is seen.
        let g = self.core.view(shard).await?;
        let dev = g.device(user_id, device_id).await?;
        match &dev {
            Some(d) if d.token_version == token_version => {}
            Some(_) => return Err(Error::rejected(ErrorCode::ErrorTokenRevoked, "device signed out").into()),
            None => return Err(Error::rejected(ErrorCode::ErrorDeviceNotFound, "unknown device").into()),
        }
        let user = g
            .user(user_id)
            .await?
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorUserNotFound, "user not found"))?;
        // A new session of the device (`device.online` unless it is a
        // reconnect within the grace): committed before the client hears
        // it is signed in.
        let session_epoch = ops::session_started(&self.core, user_id, device_id, &ctx_gateway).await?;
        let head = g.user_head(user_id).await?;
        let groups = g.user_groups(user_id).await?;
        let super_groups = super_group_heads(&self.core, user_id, groups).await;
        Ok(Response::new(ConnSignInReply {
            user: Some(ops::user_view(user, user_id)),
            output: Some(SignInOutput {
                user_id: user_id.0,
                device_id: device_id.0,
                last_seq: head.last_seq,
                ack_seq: dev.map(|d| d.ack_seq).unwrap_or(0),
                server_time_ms: crate::group::now_ms(),
                heartbeat_interval_ms: HEARTBEAT_MS,
                super_groups,
            }),
            token_version,
            shard_id: shard.0,
            token_expires_ms: expires_at_ms,
            session_epoch,
        }))
    }

    async fn sync(&self, req: Request<ConnSyncRequest>) -> Result<Response<SyncOutput>, Status> {
        let r = req.into_inner();
        let c = conn(&self.core, r.conn)?;
        Ok(Response::new(ops::sync(&self.core, c.user, r.input.unwrap_or_default()).await?))
    }

    async fn sync_group(
        &self,
        req: Request<ConnSyncGroupRequest>,
    ) -> Result<Response<SyncGroupOutput>, Status> {
        let r = req.into_inner();
        let c = conn(&self.core, r.conn)?;
        Ok(Response::new(ops::sync_group(&self.core, c.user, r.input.unwrap_or_default()).await?))
    }

    async fn ack(&self, req: Request<ConnAckRequest>) -> Result<Response<AckOutput>, Status> {
        let r = req.into_inner();
        let c = conn(&self.core, r.conn)?;
        Ok(Response::new(ops::ack(&self.core, c.user, c.device, Seq(r.input.unwrap_or_default().seq)).await?))
    }

    async fn send(&self, req: Request<ConnSendRequest>) -> Result<Response<SendOutput>, Status> {
        Ok(Response::new(send_one(&self.core, req.into_inner()).await?))
    }

    async fn send_batch(
        &self,
        req: Request<ConnSendBatchRequest>,
    ) -> Result<Response<ConnSendBatchReply>, Status> {
        let items = req.into_inner().items;
        if items.len() > MAX_SEND_BATCH {
            let e = Error::rejected(
                ErrorCode::ErrorBadRequest,
                format!("a send batch holds at most {MAX_SEND_BATCH} items, not {}", items.len()),
            );
            return Err(e.into());
        }
        metrics::counter!("rim_send_batches_total").increment(1);
        metrics::counter!("rim_send_batch_items_total").increment(items.len() as u64);
        let core = &self.core;
        let results = futures::future::join_all(items.into_iter().map(|r| send_one(core, r))).await;
        Ok(Response::new(ConnSendBatchReply { results: results.into_iter().map(send_result).collect() }))
    }

    async fn recall(&self, req: Request<ConnRecallRequest>) -> Result<Response<SendOutput>, Status> {
        let r = req.into_inner();
        let c = conn(&self.core, r.conn)?;
        Ok(Response::new(ops::recall(&self.core, c.user, c.device, r.input.unwrap_or_default()).await?))
    }

    async fn mark_read(&self, req: Request<ConnReadRequest>) -> Result<Response<ReadOutput>, Status> {
        let r = req.into_inner();
        let c = conn(&self.core, r.conn)?;
        Ok(Response::new(ops::mark_read(&self.core, c.user, c.device, r.input.unwrap_or_default()).await?))
    }

    async fn logout(&self, req: Request<ConnLogoutRequest>) -> Result<Response<ConnLogoutReply>, Status> {
        let c = conn(&self.core, req.into_inner().conn)?;
        ops::revoke(&self.core, c.user, c.device).await?;
        Ok(Response::new(ConnLogoutReply {}))
    }

    async fn offline(&self, req: Request<ConnOfflineRequest>) -> Result<Response<ConnOfflineReply>, Status> {
        // The session closes; the device goes offline after the grace
        // unless it signs in again (`device.offline`). Connections of
        // gateways that predate sessions carry epoch 0: nothing to close.
        let r = req.into_inner();
        let c = checked_conn(r.conn)?;
        tracing::debug!(user = %c.user, device = %c.device, epoch = r.session_epoch, "connection offline");
        if r.session_epoch != 0 {
            ops::session_ended(&self.core, c.user, c.device, r.session_epoch, r.reason).await?;
        }
        Ok(Response::new(ConnOfflineReply {}))
    }

    type SubscribeStream = std::pin::Pin<Box<dyn Stream<Item = Result<SubscribeEvent, Status>> + Send>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.next().await.ok_or_else(|| Status::invalid_argument("empty subscription"))??;
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let core = self.core.clone();
        tokio::spawn(async move {
            // Counted while open: the shard's leader reads which gateway
            // instances are alive off these (`crate::sessions`).
            let group = core.group(ShardId(first.shard_id));
            let gateway = first.gateway_id.clone();
            if let Some(g) = &group {
                g.gateways.opened(&gateway);
            }
            let end = serve_subscription(&core, first, inbound, &tx).await;
            if let Some(g) = &group {
                g.gateways.closed(&gateway);
            }
            metrics::counter!("rim_push_streams_ended_total").increment(1);
            let _ = tx.try_send(Ok(SubscribeEvent { event: Some(Event::End(end)) }));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Runs one subscription until it must end; returns why.
async fn serve_subscription(
    core: &Core,
    first: SubscribeRequest,
    mut inbound: Streaming<SubscribeRequest>,
    tx: &mpsc::Sender<Result<SubscribeEvent, Status>>,
) -> StreamEnd {
    let shard = ShardId(first.shard_id);
    let end = |code: ErrorCode, leader: Option<u64>| StreamEnd {
        code: code as i32,
        leader_node_id: leader.unwrap_or(0),
        leader_addr: leader.and_then(|l| core.node_addr(shard, l)).unwrap_or_default(),
        cluster_map_version: core.placement().map(|p| p.version()).unwrap_or(0),
    };
    let Some(group) = core.group(shard) else {
        // Not hosted here (a cluster larger than the replication factor):
        // point the gateway at the map's leader or a voter of the shard.
        let hint = core.placement().ok().and_then(|p| {
            p.leader_hint(shard).map(|n| n.node_id).or_else(|| p.replicas_of(shard).first().copied())
        });
        return end(ErrorCode::ErrorWrongShard, hint);
    };
    if !group.is_leader() {
        return end(ErrorCode::ErrorNotLeader, group.leader());
    }
    let mut events = group.events.subscribe();
    let mut online = group.online.subscribe();
    let mut metrics_rx = group.raft.metrics();
    let (mut users, mut groups) = (HashSet::new(), HashSet::new());
    apply_request(&first, &mut users, &mut groups);
    if tx.send(Ok(SubscribeEvent { event: Some(Event::Subscribed(users.len() as u64)) })).await.is_err() {
        return end(ErrorCode::Ok, None);
    }
    loop {
        tokio::select! {
            req = inbound.next() => match req {
                Some(Ok(r)) => apply_request(&r, &mut users, &mut groups),
                _ => return end(ErrorCode::Ok, None),
            },
            changed = metrics_rx.changed() => {
                let leader = metrics_rx.borrow().current_leader;
                if changed.is_err() || leader != Some(core.id()) {
                    return end(ErrorCode::ErrorNotLeader, leader);
                }
            }
            ev = events.recv() => match ev {
                Ok(ev) => {
                    for a in &ev.effects.appended {
                        let (kind, owner, hit) = match a.list {
                            ListRef::User(u) => (ListKind::User, u.0, users.contains(&u.0)),
                            ListRef::Group(g) => (ListKind::Group, g.0, groups.contains(&g.0)),
                        };
                        if !hit {
                            continue;
                        }
                        let push = PushedMessage {
                            list_kind: kind as i32,
                            owner_id: owner,
                            seq: a.message.seq,
                            message: Some(a.message.clone()),
                            priority: 0,
                            persisted: true,
                            skip_device_id: 0,
                        };
                        if tx.try_send(Ok(SubscribeEvent { event: Some(Event::Message(push)) })).is_err() {
                            // The gateway is too slow: end the stream; it resyncs.
                            return end(ErrorCode::ErrorBusy, Some(core.id()));
                        }
                    }
                    for (u, d) in &ev.effects.revoked {
                        if users.contains(&u.0) {
                            let kick = KickDevice { user_id: u.0, device_id: d.0, ..Default::default() };
                            if tx.try_send(Ok(SubscribeEvent { event: Some(Event::Kick(kick)) })).is_err() {
                                return end(ErrorCode::ErrorBusy, Some(core.id()));
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(%shard, missed = n, "push stream lagged behind apply; ending it");
                    return end(ErrorCode::ErrorUnavailable, Some(core.id()));
                }
                Err(broadcast::error::RecvError::Closed) => return end(ErrorCode::ErrorUnavailable, None),
            },
            push = online.recv() => match push {
                Ok(p) => forward_online(shard, &p, &users, &groups, tx),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Online-only pushes are never stored: what was missed is gone.
                    tracing::warn!(%shard, missed = n, "push stream lagged behind online pushes");
                    metrics::counter!("rim_push_online_dropped_total").increment(n);
                }
                Err(broadcast::error::RecvError::Closed) => return end(ErrorCode::ErrorUnavailable, None),
            },
            _ = core.stopped() => return end(ErrorCode::ErrorUnavailable, None),
        }
    }
}

/// Sends an online-only push to a stream, once per subscribed target:
/// `all` as one broadcast (owner 0), each subscribed user (USER list), each
/// subscribed group (GROUP list). A full queue drops the push (online-only
/// pushes are best effort, and the next stored entry ends the stream).
fn forward_online(
    shard: ShardId,
    p: &OnlinePush,
    users: &HashSet<u64>,
    groups: &HashSet<u64>,
    tx: &mpsc::Sender<Result<SubscribeEvent, Status>>,
) {
    let Some(push) = &p.push else { return };
    let targets = p
        .all
        .then_some((ListKind::Unspecified, 0))
        .into_iter()
        .chain(p.user_ids.iter().filter(|u| users.contains(u)).map(|u| (ListKind::User, *u)))
        .chain(p.group_ids.iter().filter(|g| groups.contains(g)).map(|g| (ListKind::Group, *g)));
    for (kind, owner) in targets {
        let m = PushedMessage { list_kind: kind as i32, owner_id: owner, ..push.clone() };
        if tx.try_send(Ok(SubscribeEvent { event: Some(Event::Message(m)) })).is_err() {
            tracing::debug!(%shard, owner, "push stream full; online push dropped");
            metrics::counter!("rim_push_online_dropped_total").increment(1);
        }
    }
}

/// The heads of the user's super groups for `SignInOutput`: each group read
/// linearizably on its shard, with the member's join point from the group's
/// member record. Groups that cannot be read (or that the user left in the
/// meantime) are skipped: a sign-in does not fail over them.
async fn super_group_heads(core: &Core, user: UserId, groups: Vec<store::UserGroupRecord>) -> Vec<GroupHead> {
    let supers: Vec<u64> =
        groups.iter().filter(|g| g.kind() == store::GroupKind::Super).map(|g| g.group_id).collect();
    if supers.is_empty() {
        return Vec::new();
    }
    let Ok(placement) = core.placement() else { return Vec::new() };
    let shards = ops::views_lenient(core, supers.iter().map(|g| placement.shard_of_group(GroupId(*g)))).await;
    let mut heads = Vec::with_capacity(supers.len());
    for g in supers {
        let shard = placement.shard_of_group(GroupId(g));
        let replica = match shards.get(&shard) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::warn!(%user, group = g, %shard, error = %e, "sign-in skips an unreadable super group");
                continue;
            }
            None => continue,
        };
        let read = async || -> Result<Option<GroupHead>, Error> {
            let Some(m) = replica.member(GroupId(g), user).await? else { return Ok(None) };
            let head = replica.group_head(GroupId(g)).await?;
            Ok(Some(GroupHead {
                group_id: g,
                last_group_seq: head.last_seq,
                joined_group_seq: m.joined_group_seq,
            }))
        };
        match read().await {
            Ok(Some(h)) => heads.push(h),
            Ok(None) => {}
            Err(e) => tracing::warn!(%user, group = g, error = %e, "sign-in skips an unreadable super group"),
        }
    }
    heads
}

fn apply_request(r: &SubscribeRequest, users: &mut HashSet<u64>, groups: &mut HashSet<u64>) {
    if r.reset {
        users.clear();
        groups.clear();
    }
    users.extend(&r.add_user_ids);
    groups.extend(&r.add_group_ids);
    for u in &r.remove_user_ids {
        users.remove(u);
    }
    for g in &r.remove_group_ids {
        groups.remove(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch item's result carries what the unary `Send`'s status carries.
    #[test]
    fn item_results_carry_what_the_unary_status_carries() {
        let ok = SendOutput { seq: 3, message_id: 11, send_time_ms: 5, group_seq: 0 };
        assert_eq!(send_result(Ok(ok)), ConnSendResult { output: Some(ok), ..Default::default() });

        let errors = [
            Error::NotLeader { shard: ShardId(2), leader: Some(3), addr: Some("10.0.0.3:7101".into()) },
            Error::NotLeader { shard: ShardId(2), leader: None, addr: None },
            Error::rejected(ErrorCode::ErrorUserNotFound, "user not found"),
            Error::Timeout("slow".into()),
            Error::Unavailable("no leader".into()),
            Error::Internal("bug".into()),
        ];
        for e in errors {
            let status = e.to_status();
            let r = send_result(Err(e));
            assert_eq!(r.output, None);
            assert_eq!(r.code, rim_proto::error::code_of_status(&status) as i32);
            assert_ne!(r.code, ErrorCode::Ok as i32);
            assert_eq!(r.message, status.message());
            assert_eq!(
                Some(r.leader_addr.as_str()).filter(|l| !l.is_empty()),
                rim_proto::error::leader_of_status(&status)
            );
        }
        // The hint is the leader's address (docs/protocol.md), never its node id.
        let r = send_result(Err(Error::NotLeader {
            shard: ShardId(2),
            leader: Some(3),
            addr: Some("10.0.0.3:7101".into()),
        }));
        assert_eq!((r.code, r.leader_addr.as_str()), (ErrorCode::ErrorNotLeader as i32, "10.0.0.3:7101"));
        let r = send_result(Err(Error::NotLeader { shard: ShardId(2), leader: Some(3), addr: None }));
        assert_eq!(r.leader_addr, "", "a node id is not an address");
    }

    #[test]
    fn connection_context_is_checked_like_the_unary_call() {
        let missing = checked_conn(None).unwrap_err();
        assert_eq!(missing.code(), ErrorCode::ErrorBadRequest);
        let no_user = checked_conn(Some(ConnContext::default())).unwrap_err();
        assert_eq!(no_user.code(), ErrorCode::ErrorInvalidId);
    }
}
