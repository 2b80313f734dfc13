//! Test support for super groups and rooms over the long connection:
//! creating groups and changing their members through a node's core (the
//! store's operations), subscribing, sending with `SEND_GROUP`, and reading
//! a group's pushes.
#![allow(dead_code, missing_docs)]

use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::store;
use rim_proto::v1::*;

use crate::cluster::Cluster;
use crate::e2e::{Client, is_push, message_of};

async fn propose(c: &Cluster, group_id: u64, op: store::op::Op) {
    let node = c.nodes.values().next().unwrap();
    let shard = node.core.placement().unwrap().shard_of_group(rim_proto::ids::GroupId(group_id));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match node.core.propose(shard, store::Op { op: Some(op.clone()) }).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "group {group_id}: {op:?} failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Creates group `group_id` of `kind` owned by `owner` (0 for a room) with
/// `members` besides the owner and the given retention (rooms: the
/// default if `None`).
pub async fn create_group(
    c: &Cluster,
    group_id: u64,
    kind: store::GroupKind,
    owner: u64,
    members: &[u64],
    retention: Option<store::Retention>,
) {
    let op = store::op::Op::CreateGroup(store::CreateGroup {
        group_id,
        kind: kind as i32,
        owner_id: owner,
        name: format!("group{group_id}"),
        member_ids: members.to_vec(),
        retention,
        ..Default::default()
    });
    propose(c, group_id, op).await;
}

/// Creates super group `group_id` owned by `owner` with `members`.
pub async fn create_super_group(c: &Cluster, group_id: u64, owner: u64, members: &[u64]) {
    create_group(c, group_id, store::GroupKind::Super, owner, members, None).await;
}

/// Creates room `room_id` with `max_count` retention (0: the default).
pub async fn create_room(c: &Cluster, room_id: u64, max_count: u64) {
    let retention = (max_count > 0).then_some(store::Retention { max_count, max_age_ms: 0 });
    create_group(c, room_id, store::GroupKind::Room, 0, &[], retention).await;
}

pub async fn add_members(c: &Cluster, group_id: u64, by: u64, users: &[u64]) {
    let op =
        store::op::Op::AddMembers(store::AddMembers { group_id, by_user_id: by, user_ids: users.to_vec() });
    propose(c, group_id, op).await;
}

pub async fn remove_members(c: &Cluster, group_id: u64, by: u64, users: &[u64]) {
    let op = store::op::Op::RemoveMembers(store::RemoveMembers {
        group_id,
        by_user_id: by,
        user_ids: users.to_vec(),
    });
    propose(c, group_id, op).await;
}

pub async fn dissolve(c: &Cluster, group_id: u64, by: u64) {
    let op = store::op::Op::DissolveGroup(store::DissolveGroup { group_id, by_user_id: by });
    propose(c, group_id, op).await;
}

/// `SUBSCRIBE_ROOM`; the reply.
pub async fn subscribe(client: &mut Client, group_id: u64, after_seq: u64) -> Reply {
    client
        .request(Command::SubscribeRoom, SubscribeRoomInput { room_id: group_id, after_seq }.encode_to_vec())
        .await
}

/// `SUBSCRIBE_ROOM` that must succeed.
pub async fn subscribed(client: &mut Client, group_id: u64, after_seq: u64) -> SubscribeRoomOutput {
    let reply = subscribe(client, group_id, after_seq).await;
    assert_eq!(
        reply.code,
        ErrorCode::Ok as i32,
        "{:?}: subscribe {group_id}: {}",
        client.kind,
        reply.message
    );
    SubscribeRoomOutput::decode(reply.data).unwrap()
}

pub async fn unsubscribe(client: &mut Client, group_id: u64) {
    let reply = client
        .request(Command::UnsubscribeRoom, UnsubscribeRoomInput { room_id: group_id }.encode_to_vec())
        .await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "unsubscribe {group_id}: {}", reply.message);
}

/// `SEND_GROUP` of a text of `size` bytes (at least `cmid`), retrying
/// retryable errors with the same client_msg_id until acknowledged;
/// returns the group seq.
pub async fn send_group_sized(client: &mut Client, group_id: u64, cmid: &str, size: usize) -> u64 {
    let mut content = cmid.as_bytes().to_vec();
    if content.len() < size {
        content.resize(size, b'.');
    }
    let input = SendInput {
        conversation_id: group_id,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: content.into(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = client.request(Command::SendGroup, input.encode_to_vec()).await;
        if reply.code == ErrorCode::Ok as i32 {
            let out = SendOutput::decode(reply.data).unwrap();
            assert!(out.group_seq > 0, "a group send has a group seq");
            return out.group_seq;
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable(), "send {cmid}: {code:?} {}", reply.message);
        assert!(Instant::now() < deadline, "send {cmid} never acknowledged: {}", reply.message);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn send_group(client: &mut Client, group_id: u64, cmid: &str) -> u64 {
    send_group_sized(client, group_id, cmid, 0).await
}

/// Whether `m` is an entry of `group_id`'s list (the user's own list holds
/// copies of the group's notifications that concern the user: same
/// conversation, but their seq is the user's).
pub fn of_list(m: &Message, group_id: u64) -> bool {
    m.conversation_id == group_id && m.seq == m.group_seq
}

/// Every push of `group_id`'s list up to the one of group seq `seq`, in
/// the order received (other packets are kept).
pub async fn pushes_through(client: &mut Client, group_id: u64, seq: u64) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let p = client
            .wait(&format!("a push of group {group_id} up to {seq}"), |p| {
                is_push(p) && of_list(&message_of(p), group_id)
            })
            .await;
        let m = message_of(&p);
        assert_eq!(m.group_seq, m.seq, "a group push carries the group seq");
        let done = m.seq >= seq;
        out.push(m);
        if done {
            return out;
        }
    }
}

/// A heartbeat round trip, then the pushes of `group_id`'s list read and
/// not yet taken: what arrived before the gateway answered.
pub async fn settle(client: &mut Client, group_id: u64) -> Vec<Message> {
    assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
    client.unread_pushes().into_iter().filter(|m| of_list(m, group_id)).collect()
}

/// The client_msg_ids of the non-notification messages among `messages`.
pub fn texts(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.content_type != ContentType::Notification as i32)
        .map(|m| m.client_msg_id.clone())
        .collect()
}

/// The notification carried by `m`, if it is one.
pub fn notification(m: &Message) -> Option<store::notification::Event> {
    if m.content_type != ContentType::Notification as i32 {
        return None;
    }
    store::Notification::decode(m.content.clone()).ok()?.event
}
