//! The per-shard push streams of the [`PushRouter`](super::PushRouter).
//!
//! Per data shard one task ([`shard_task`]) keeps one `Subscribe` stream to
//! the shard's leader for as long as the router runs: it finds the leader
//! (the learned hint, the map's hint, then every node in turn; a
//! `StreamEnd{ERROR_NOT_LEADER}` names the new leader, followed at once),
//! gives each attempt [`RouterOptions::subscribe_timeout`](super::RouterOptions)
//! to open, and waits between failed attempts as the one retry policy says
//! ([`rim_cluster::Backoff`]; see [`ReconnectBackoff`]). Once subscribed it
//! sends the shard's member and room changes as they come
//! ([`sync_members`]) and routes what arrives ([`route_push`],
//! [`route_kick`]).
//!
//! # Invariants
//!
//! * A shard's `subscribed` and `subscribed_rooms` are what the live stream
//!   carries, and empty while none is live.
//! * Whenever a stream is (re)established, and whenever users or rooms are
//!   added to a live one, their connections get
//!   [`ConnEvent::ResyncNeeded`]: pushes may have been missed meanwhile.
//! * At most a few hints are followed without a wait, so stale hints naming
//!   each other cannot spin.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rim_cluster::{Backoff, retryable};
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId, UserId};
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::subscribe_event::Event;
use rim_proto::v1::{KickDevice, KickPush, ListKind, PushedMessage, SubscribeEvent, SubscribeRequest};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::{ConnEvent, Inner};

/// How long a reconnect backoff runs before it is re-armed. A stream is
/// retried for as long as the router runs, but [`Backoff`] always has a
/// deadline; this one is far enough that the waits reach and stay at
/// [`Backoff::MAX`] in any outage worth the name.
const RECONNECT_HORIZON: Duration = Duration::from_secs(3600);

/// The waits between a shard stream's failed attempts: the shared
/// [`Backoff`] (from [`Backoff::MIN`], doubling, capped at
/// [`Backoff::MAX`]) without a deadline. Reset when a stream is live.
pub(super) struct ReconnectBackoff(Backoff);

impl ReconnectBackoff {
    pub(super) fn new() -> ReconnectBackoff {
        ReconnectBackoff(Backoff::within(RECONNECT_HORIZON))
    }

    /// Back to the first wait (a stream came up).
    pub(super) fn reset(&mut self) {
        *self = ReconnectBackoff::new();
    }

    /// The next wait; re-arms the backoff once its horizon has passed, so
    /// it never reaches a deadline.
    pub(super) fn step(&mut self) -> Duration {
        if self.0.left() <= Backoff::MAX {
            self.0 = Backoff::within(RECONNECT_HORIZON);
            // Keep the long waits: the outage goes on.
            while self.0.step() < Backoff::MAX {}
        }
        self.0.step()
    }
}

/// How a stream ended.
pub(super) enum StreamOutcome {
    /// Try this address next (the node named the leader).
    Hint(String),
    /// Try another node, after a backoff.
    Retry,
    /// The router stopped.
    Stopped,
}

/// Keeps shard `shard_id`'s stream up until the router stops.
pub(super) async fn shard_task(inner: Arc<Inner>, shard_id: ShardId, notify: Arc<Notify>) {
    let mut stop = inner.stop.subscribe();
    let mut backoff = ReconnectBackoff::new();
    let mut hint: Option<String> = None;
    let mut failed: Option<String> = None;
    let mut rotation = 0usize;
    // Hints followed without a backoff since the last one; bounded so that
    // stale hints pointing at each other cannot spin.
    let mut hops = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let known = inner.upstream.leader_addr(shard_id).filter(|a| failed.as_ref() != Some(a));
        let addr = match hint.take().or(known) {
            Some(a) => a,
            None => {
                if inner.upstream.cluster_map().is_none() {
                    let _ = inner.upstream.refresh_map().await;
                }
                let mut nodes = inner.upstream.node_addrs();
                if nodes.len() > 1 {
                    nodes.retain(|a| failed.as_ref() != Some(a));
                }
                rotation = rotation.wrapping_add(1);
                nodes[rotation % nodes.len()].clone()
            }
        };
        let outcome = run_stream(&inner, shard_id, &addr, &notify, &mut stop, &mut backoff).await;
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = st.shards.get_mut(&shard_id) {
                s.subscribed.clear();
                s.subscribed_rooms.clear();
                s.leader = None;
            }
        }
        match outcome {
            StreamOutcome::Stopped => return,
            StreamOutcome::Hint(h) if h != addr => {
                inner.upstream.note_not_leader(shard_id, &addr);
                inner.upstream.note_leader(shard_id, &h);
                failed = Some(addr);
                hint = Some(h);
                hops += 1;
                if hops <= 3 {
                    continue;
                }
            }
            StreamOutcome::Hint(_) | StreamOutcome::Retry => {
                inner.upstream.note_not_leader(shard_id, &addr);
                failed = Some(addr);
            }
        }
        hops = 0;
        tokio::select! {
            _ = tokio::time::sleep(backoff.step()) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Opens one stream at `addr` and serves it until it ends.
async fn run_stream(
    inner: &Arc<Inner>,
    shard_id: ShardId,
    addr: &str,
    notify: &Notify,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut ReconnectBackoff,
) -> StreamOutcome {
    let opts = &inner.options;
    let upstream = &inner.upstream;
    let gateway_id = upstream.gateway_id().to_string();
    let ch = match upstream.channel(addr) {
        Ok(ch) => ch,
        Err(_) => return StreamOutcome::Retry,
    };
    let mut sent = {
        let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.shards
            .get(&shard_id)
            .map(|s| Sent { users: s.members.clone(), rooms: s.rooms.clone() })
            .unwrap_or_default()
    };
    let (tx, rx) = mpsc::channel::<SubscribeRequest>(opts.request_queue.max(1));
    let first = SubscribeRequest {
        gateway_id: gateway_id.clone(),
        shard_id: shard_id.0,
        reset: true,
        add_user_ids: sent.users.iter().map(|u| u.0).collect(),
        add_group_ids: sent.rooms.iter().map(|r| r.0).collect(),
        ..Default::default()
    };
    if tx.try_send(first).is_err() {
        return StreamOutcome::Retry;
    }
    let req = upstream.request(tokio_stream::wrappers::ReceiverStream::new(rx), None);
    let deadline = Instant::now() + opts.subscribe_timeout;
    let open = async {
        let mut stream = GatewayServiceClient::new(ch).subscribe(req).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = tokio::select! {
        r = tokio::time::timeout_at(deadline, open) => match r {
            Ok(Ok(v)) => v,
            Ok(Err(status)) => {
                tracing::debug!(shard = %shard_id, node = addr, %status, "subscribe failed");
                return match rim_proto::error::leader_of_status(&status) {
                    Some(h) if !h.is_empty() => StreamOutcome::Hint(h.to_string()),
                    _ => StreamOutcome::Retry,
                };
            }
            Err(_) => {
                tracing::debug!(shard = %shard_id, node = addr, "subscribe timed out");
                return StreamOutcome::Retry;
            }
        },
        _ = stop.changed() => return StreamOutcome::Stopped,
    };
    match first.and_then(|e| e.event) {
        Some(Event::Subscribed(_)) => {}
        Some(Event::End(end)) => return end_outcome(inner, shard_id, addr, &end),
        other => {
            tracing::debug!(shard = %shard_id, node = addr, ?other, "unexpected first subscribe event");
            return StreamOutcome::Retry;
        }
    }
    // Live: everyone of this shard resyncs (pushes may have been missed).
    backoff.reset();
    upstream.note_leader(shard_id, addr);
    tracing::info!(
        shard = %shard_id,
        node = addr,
        users = sent.users.len(),
        rooms = sent.rooms.len(),
        "push stream subscribed"
    );
    {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.subscriptions += 1;
        let (members, rooms): (Vec<UserId>, Vec<GroupId>) = match st.shards.get_mut(&shard_id) {
            Some(s) => {
                s.subscribed = sent.users.clone();
                s.subscribed_rooms = sent.rooms.clone();
                s.leader = Some(addr.to_string());
                (s.members.iter().copied().collect(), s.rooms.iter().copied().collect())
            }
            None => (Vec::new(), Vec::new()),
        };
        // Members and rooms added since the snapshot are handled by the
        // diff below.
        let mut conns: BTreeSet<u64> =
            members.iter().filter(|u| sent.users.contains(u)).flat_map(|u| st.conns_of(*u)).collect();
        conns.extend(rooms.iter().filter(|r| sent.rooms.contains(r)).flat_map(|r| st.room_conns(*r)));
        let conns: Vec<u64> = conns.into_iter().collect();
        st.deliver(&conns, &ConnEvent::ResyncNeeded);
    }
    notify.notify_one();
    let outcome = loop {
        tokio::select! {
            _ = notify.notified() => {
                if let Err(()) = sync_members(inner, shard_id, &gateway_id, &tx, &mut sent).await {
                    break StreamOutcome::Retry;
                }
            }
            ev = stream.message() => match ev {
                Ok(Some(SubscribeEvent { event: Some(ev) })) => match ev {
                    Event::Message(m) => route_push(inner, shard_id, m),
                    Event::Kick(k) => route_kick(inner, k),
                    Event::Subscribed(_) => {}
                    Event::End(end) => break end_outcome(inner, shard_id, addr, &end),
                },
                Ok(Some(SubscribeEvent { event: None })) => {}
                Ok(None) => break StreamOutcome::Retry,
                Err(status) => {
                    tracing::debug!(shard = %shard_id, node = addr, %status, "push stream broke");
                    break StreamOutcome::Retry;
                }
            },
            _ = stop.changed() => break StreamOutcome::Stopped,
        }
    };
    if !matches!(outcome, StreamOutcome::Stopped) {
        tracing::info!(shard = %shard_id, node = addr, "push stream ended; re-subscribing");
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.stream_breaks += 1;
    }
    outcome
}

/// What a stream's subscription carries.
#[derive(Default)]
struct Sent {
    users: HashSet<UserId>,
    rooms: HashSet<GroupId>,
}

/// Sends the difference between the shard's members and rooms and what the
/// stream carries; signals a resync to the connections of users and rooms
/// just added.
async fn sync_members(
    inner: &Arc<Inner>,
    shard_id: ShardId,
    gateway_id: &str,
    tx: &mpsc::Sender<SubscribeRequest>,
    sent: &mut Sent,
) -> Result<(), ()> {
    let (members, rooms) = {
        let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.shards.get(&shard_id).map(|s| (s.members.clone(), s.rooms.clone())).unwrap_or_default()
    };
    let add: Vec<UserId> = members.difference(&sent.users).copied().collect();
    let remove: Vec<UserId> = sent.users.difference(&members).copied().collect();
    let add_rooms: Vec<GroupId> = rooms.difference(&sent.rooms).copied().collect();
    let remove_rooms: Vec<GroupId> = sent.rooms.difference(&rooms).copied().collect();
    if add.is_empty() && remove.is_empty() && add_rooms.is_empty() && remove_rooms.is_empty() {
        return Ok(());
    }
    let req = SubscribeRequest {
        gateway_id: gateway_id.to_string(),
        shard_id: shard_id.0,
        reset: false,
        add_user_ids: add.iter().map(|u| u.0).collect(),
        remove_user_ids: remove.iter().map(|u| u.0).collect(),
        add_group_ids: add_rooms.iter().map(|r| r.0).collect(),
        remove_group_ids: remove_rooms.iter().map(|r| r.0).collect(),
    };
    let timeout = inner.options.subscribe_timeout;
    if tokio::time::timeout(timeout, tx.send(req)).await.map_or(true, |r| r.is_err()) {
        return Err(());
    }
    for u in &remove {
        sent.users.remove(u);
    }
    sent.users.extend(add.iter().copied());
    for r in &remove_rooms {
        sent.rooms.remove(r);
    }
    sent.rooms.extend(add_rooms.iter().copied());
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = st.shards.get_mut(&shard_id) {
        s.subscribed = sent.users.clone();
        s.subscribed_rooms = sent.rooms.clone();
    }
    let mut conns: BTreeSet<u64> = add.iter().flat_map(|u| st.conns_of(*u)).collect();
    conns.extend(add_rooms.iter().flat_map(|r| st.room_conns(*r)));
    let conns: Vec<u64> = conns.into_iter().collect();
    st.deliver(&conns, &ConnEvent::ResyncNeeded);
    Ok(())
}

fn end_outcome(
    inner: &Inner,
    shard_id: ShardId,
    addr: &str,
    end: &rim_proto::v1::StreamEnd,
) -> StreamOutcome {
    let code = rim_proto::error::code_from_number(end.code);
    tracing::debug!(shard = %shard_id, node = addr, code = code.as_str_name(), leader = %end.leader_addr, "stream end");
    if let Some(map) = inner.upstream.cluster_map()
        && end.cluster_map_version > map.version()
    {
        // Refreshed by the task's next attempt when it needs node addresses.
        let up = inner.upstream.clone();
        inner.runtime.spawn(async move {
            let _ = up.refresh_map().await;
        });
    }
    let hinted = if !end.leader_addr.is_empty() {
        Some(end.leader_addr.clone())
    } else if end.leader_node_id != 0 {
        inner.upstream.node_addr(end.leader_node_id)
    } else {
        None
    };
    match hinted {
        // A hint is followed at once (the shared policy: a retryable end
        // names the leader); the same address again waits like a failure.
        Some(h) if retryable(code) || h != addr => StreamOutcome::Hint(h),
        _ => StreamOutcome::Retry,
    }
}

/// Hands a push that came on shard `shard_id`'s stream to its connections.
pub(super) fn route_push(inner: &Inner, shard_id: ShardId, push: PushedMessage) {
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let conns: Vec<u64> = if push.owner_id == 0 && push.list_kind != ListKind::Group as i32 {
        // A broadcast: every shard leader sends it once, each to the
        // connections of its own users, so each connection gets it once.
        st.conns.iter().filter(|(_, c)| c.shard_id == shard_id).map(|(id, _)| *id).collect()
    } else if push.list_kind == ListKind::Group as i32 {
        // Rooms and super groups.
        st.room_conns(GroupId(push.owner_id))
    } else {
        st.conns_of(UserId(push.owner_id))
    };
    st.deliver(&conns, &ConnEvent::Push(push));
}

fn route_kick(inner: &Inner, kick: KickDevice) {
    let gateway_id = inner.upstream.gateway_id();
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let targets: Vec<u64> = st
        .conns_of(UserId(kick.user_id))
        .into_iter()
        .filter(|id| st.conns.get(id).is_some_and(|c| c.device_id.0 == kick.device_id))
        .filter(|id| !(kick.keep_conn_id == *id && kick.keep_gateway_id == gateway_id))
        .collect();
    let push = kick.push.unwrap_or(KickPush {
        code: ErrorCode::ErrorTokenRevoked as i32,
        reason: "the device was signed out".into(),
    });
    for id in targets {
        st.kick(id, push.clone());
    }
}
