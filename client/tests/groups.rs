//! Super groups and rooms through the SDK against an in-process cluster:
//! the client subscribes its user's super groups by itself, delivers each
//! group seq once and in order across a gateway failover, follows joins
//! and removals, and reads rooms again after reconnecting.
#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

use rim_client::Event;
use rim_client::groups::{Change, change_of};
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::store;
use rim_proto::v1::{ContentType, Message};
use support::*;

async fn propose(c: &Cluster, group_id: GroupId, op: store::op::Op) {
    let node = c.nodes.values().next().unwrap();
    let shard = node.core.placement().unwrap().shard_of_group(group_id);
    let deadline = Instant::now() + WAIT;
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

async fn create_group(
    c: &Cluster,
    group_id: GroupId,
    kind: store::GroupKind,
    owner: UserId,
    members: &[UserId],
) {
    let op = store::op::Op::CreateGroup(store::CreateGroup {
        group_id: group_id.0,
        kind: kind as i32,
        owner_id: owner.0,
        name: format!("g{group_id}"),
        member_ids: members.iter().map(|m| m.0).collect(),
        ..Default::default()
    });
    propose(c, group_id, op).await;
}

/// The entries of `group` among the events, by kind.
fn group_messages(inbox: &Inbox, group: GroupId) -> Vec<Message> {
    inbox
        .events
        .iter()
        .filter_map(|e| match e {
            Event::GroupMessage(m) if m.conversation_id == group.0 => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn room_messages(inbox: &Inbox, room: GroupId) -> Vec<Message> {
    inbox
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RoomMessage(m) if m.conversation_id == room.0 => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.content).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn super_group_entries_arrive_once_in_order_across_a_gateway_failover() {
    let _g = serial().await;
    let c = cluster().await;
    let api = api(&c);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let g = GroupId(930_001);
    create_group(&c, g, store::GroupKind::Super, alice.user_id, &[bob.user_id]).await;
    let gw1 = c.gateway("gw-1").await;
    let gw2 = c.gateway("gw-2").await;

    let (a, _a_inbox) = connect("alice", config(vec![endpoint(&gw2, Kind::Tcp)]), alice.clone());
    let bob_config = config(vec![endpoint(&gw1, Kind::Tcp), endpoint(&gw2, Kind::Ws)]);
    let (b, mut inbox) = connect("bob", bob_config, bob.clone());
    a.wait_online(WAIT).await.unwrap();
    // Subscribed by itself, from the join point: the creation notice.
    inbox
        .wait_until("the creation notice", |ev| ev.iter().any(|e| matches!(e, Event::GroupMessage(_))))
        .await;
    for i in 1..=5 {
        let out = a.send_group(g, ContentType::Text, format!("m{i}")).await.unwrap();
        assert_eq!((out.seq, out.group_seq), (0, i + 1), "SEND_GROUP, with the group seq");
    }
    inbox.wait_until("m1..m5", |ev| count_group(ev, g) >= 6).await;

    // Bob's gateway goes away; alice keeps sending while he reconnects.
    gw1.shutdown().await;
    for i in 6..=10 {
        a.send_group(g, ContentType::Text, format!("m{i}")).await.unwrap();
    }
    inbox.wait_until("m6..m10", |ev| count_group(ev, g) >= 11).await;
    let got = group_messages(&inbox, g);
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>(), "each group seq once, in order");
    let texts: Vec<String> = got[1..].iter().map(text).collect();
    assert_eq!(texts, (1..=10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert!(inbox.count(|e| matches!(e, Event::Disconnected { .. })) >= 1);
    assert_eq!(b.group_cursors().get(&g), Some(&Seq(11)));
    // Read diffusion: none of it is in bob's own list.
    assert!(inbox.messages().iter().all(|m| !text(m).starts_with('m')));

    a.close().await;
    b.close().await;
    gw2.shutdown().await;
    c.shutdown().await;
}

/// How many entries of `group` are among `events`.
fn count_group(events: &[Event], group: GroupId) -> usize {
    events.iter().filter(|e| matches!(e, Event::GroupMessage(m) if m.conversation_id == group.0)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_joins_and_removals() {
    let _g = serial().await;
    let c = cluster().await;
    let api = api(&c);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let g = GroupId(930_002);
    create_group(&c, g, store::GroupKind::Super, alice.user_id, &[]).await;
    let gw = c.gateway("gw-1").await;
    let (a, _a_inbox) = connect("alice", config(vec![endpoint(&gw, Kind::Ws)]), alice.clone());
    let (b, mut inbox) = connect("bob", config(vec![endpoint(&gw, Kind::Tcp)]), bob.clone());
    b.wait_online(WAIT).await.unwrap();
    a.send_group(g, ContentType::Text, "before").await.unwrap();

    // Added: the notice in bob's own list makes the client subscribe,
    // after the notice: nothing from before the join.
    let add = store::op::Op::AddMembers(store::AddMembers {
        group_id: g.0,
        by_user_id: alice.user_id.0,
        user_ids: vec![bob.user_id.0],
    });
    propose(&c, g, add).await;
    let me = bob.user_id;
    inbox
        .wait_until("the join notice", |ev| {
            ev.iter().any(|e| {
                matches!(e, Event::Message(m)
                    if matches!(change_of(me, m), Some(Change::Join { group_id, .. }) if group_id == g))
            })
        })
        .await;
    let bobs = gw.router().user_conns(bob.user_id);
    wait_for(|| gw.router().room_conns(g).iter().any(|c| bobs.contains(c)).then_some(())).await;
    a.send_group(g, ContentType::Text, "after").await.unwrap();
    inbox
        .wait_until("the message after the join", |ev| {
            ev.iter().any(|e| matches!(e, Event::GroupMessage(m) if text(m) == "after"))
        })
        .await;
    assert!(group_messages(&inbox, g).iter().all(|m| text(m) != "before"), "nothing from before the join");

    // Removed: the client stops reading the group.
    let remove = store::op::Op::RemoveMembers(store::RemoveMembers {
        group_id: g.0,
        by_user_id: alice.user_id.0,
        user_ids: vec![bob.user_id.0],
    });
    propose(&c, g, remove).await;
    inbox
        .wait_until("the end of the subscription", |ev| {
            ev.iter().any(|e| matches!(e, Event::Unsubscribed { group_id, code: ErrorCode::ErrorNotGroupMember, .. } if *group_id == g))
        })
        .await;
    // Alice reads the group too; bob's connection no longer does.
    let bobs = gw.router().user_conns(bob.user_id);
    wait_for(|| gw.router().room_conns(g).iter().all(|c| !bobs.contains(c)).then_some(())).await;
    let before = group_messages(&inbox, g).len();
    a.send_group(g, ContentType::Text, "gone").await.unwrap();
    // A barrier through bob's own list: a 1:1 message sent after it.
    a.send(bob.user_id, ContentType::Text, "barrier").await.unwrap();
    inbox
        .wait_until("the barrier", |ev| {
            ev.iter().any(|e| matches!(e, Event::Message(m) if text(m) == "barrier"))
        })
        .await;
    assert_eq!(group_messages(&inbox, g).len(), before, "nothing after the removal");
    assert!(!b.group_cursors().is_empty());

    a.close().await;
    b.close().await;
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_is_read_again_after_a_reconnect_until_unsubscribed() {
    let _g = serial().await;
    let c = cluster().await;
    let api = api(&c);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let room = GroupId(930_003);
    create_group(&c, room, store::GroupKind::Room, UserId(0), &[]).await;
    let gw1 = c.gateway("gw-1").await;
    let gw2 = c.gateway("gw-2").await;
    let (a, _a_inbox) = connect("alice", config(vec![endpoint(&gw2, Kind::Tcp)]), alice.clone());
    let bob_config = config(vec![endpoint(&gw1, Kind::Ws), endpoint(&gw2, Kind::Tcp)]);
    let (b, mut inbox) = connect("bob", bob_config, bob.clone());
    let out = b.subscribe_room(room, Seq::ZERO).await.unwrap();
    assert_eq!(out.last_seq, 0);
    for i in 1..=3 {
        assert_eq!(a.send_group(room, ContentType::Text, format!("r{i}")).await.unwrap().group_seq, i);
    }
    wait_room(&mut inbox, room, 3).await;

    gw1.shutdown().await;
    inbox
        .wait_until("a reconnect", |ev| {
            ev.iter().filter(|e| matches!(e, Event::Connected { .. })).count() >= 2
        })
        .await;
    for i in 4..=5 {
        a.send_group(room, ContentType::Text, format!("r{i}")).await.unwrap();
    }
    wait_room(&mut inbox, room, 5).await;
    let seqs: Vec<u64> = room_messages(&inbox, room).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "each once, in order, across the reconnect");

    // Unsubscribed: the gateway no longer reads it for bob (nor anyone).
    b.unsubscribe_room(room).await.unwrap();
    assert!(gw2.router().room_conns(room).is_empty());
    assert!(b.group_cursors().contains_key(&room));
    a.close().await;
    b.close().await;
    gw2.shutdown().await;
    c.shutdown().await;
}

/// Waits until `room`'s entries up to `seq` arrived.
async fn wait_room(inbox: &mut Inbox, room: GroupId, seq: u64) {
    inbox
        .wait_until(&format!("room {room} up to {seq}"), |ev| {
            ev.iter()
                .any(|e| matches!(e, Event::RoomMessage(m) if m.conversation_id == room.0 && m.seq >= seq))
        })
        .await;
}
