//! Room subscriptions over the long connection, end to end against an
//! in-process cluster, on both transports: `SUBSCRIBE_ROOM` (reply, backlog,
//! live pushes, each room seq once and in order), `UNSUBSCRIBE_ROOM`, the
//! subscription's end with its connection, errors, and a leader change of
//! the room's shard.
//!
//! No public API creates rooms yet, so the tests propose the store's
//! `CreateGroup{kind: ROOM}` through a node's core.
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_gateway::session::MAX_ROOMS_PER_CONNECTION;
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId};
use rim_proto::store;
use rim_proto::v1::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod cluster;
mod common;
mod e2e;
use cluster::{Cluster, Device, register, serial, wait_for};
use e2e::{Client, Gateway, Kind, Read, consecutive, is_push, is_reply, message_of};

/// Creates room `room` (no members, default retention).
async fn create_room(c: &Cluster, room: u64) {
    create_group(c, room, store::GroupKind::Room, 0).await;
}

async fn create_group(c: &Cluster, group_id: u64, kind: store::GroupKind, owner_id: u64) {
    let node = c.nodes.values().next().unwrap();
    let shard = node.core.placement().unwrap().shard_of_group(GroupId(group_id));
    let op = store::Op {
        op: Some(store::op::Op::CreateGroup(store::CreateGroup {
            group_id,
            kind: kind as i32,
            owner_id,
            name: format!("group{group_id}"),
            ..Default::default()
        })),
    };
    node.core.propose(shard, op).await.expect("group created");
}

fn shard_of_room(c: &Cluster, room: u64) -> ShardId {
    c.nodes.values().next().unwrap().core.placement().unwrap().shard_of_group(GroupId(room))
}

/// `SUBSCRIBE_ROOM`; the reply.
async fn subscribe(client: &mut Client, room_id: u64, after_seq: u64) -> Reply {
    client.request(Command::SubscribeRoom, SubscribeRoomInput { room_id, after_seq }.encode_to_vec()).await
}

/// `SUBSCRIBE_ROOM` that must succeed.
async fn subscribed(client: &mut Client, room_id: u64, after_seq: u64) -> SubscribeRoomOutput {
    let reply = subscribe(client, room_id, after_seq).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "subscribe {room_id}: {}", reply.message);
    SubscribeRoomOutput::decode(reply.data).unwrap()
}

async fn unsubscribe(client: &mut Client, room_id: u64) {
    let reply =
        client.request(Command::UnsubscribeRoom, UnsubscribeRoomInput { room_id }.encode_to_vec()).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "unsubscribe {room_id}: {}", reply.message);
}

/// Sends a text to a room with `SEND_GROUP`, retrying retryable errors with
/// the same client_msg_id until acknowledged; returns the room seq.
async fn send_room(client: &mut Client, room: u64, cmid: &str) -> u64 {
    let input = SendInput {
        conversation_kind: ConversationKind::Room as i32,
        conversation_id: room,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: cmid.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = client.request(Command::SendGroup, input.encode_to_vec()).await;
        if reply.code == ErrorCode::Ok as i32 {
            let out = SendOutput::decode(reply.data).unwrap();
            assert!(out.group_seq > 0, "a room send has a room seq");
            return out.group_seq;
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable(), "send {cmid}: {code:?} {}", reply.message);
        assert!(Instant::now() < deadline, "send {cmid} never acknowledged: {}", reply.message);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every push of `room` up to the one of room seq `seq`, in the order
/// received (other packets are kept).
async fn room_pushes_through(client: &mut Client, room: u64, seq: u64) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let p = client
            .wait(&format!("a push of room {room}"), |p| is_push(p) && message_of(p).conversation_id == room)
            .await;
        let m = message_of(&p);
        assert_eq!(m.conversation_kind, ConversationKind::Room as i32);
        assert_eq!(m.group_seq, m.seq, "a room push carries the room seq");
        let done = m.seq == seq;
        out.push(m);
        if done {
            return out;
        }
    }
}

/// A heartbeat round trip, then the pushes read and not yet taken: what
/// arrived before the gateway answered.
async fn settle(client: &mut Client) -> Vec<Message> {
    assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
    client.unread_pushes()
}

fn cmids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

/// Room ids from `from` whose rooms live on one shard, `n` of them.
fn rooms_on_one_shard(c: &Cluster, from: u64, n: usize) -> Vec<u64> {
    let shard = shard_of_room(c, from);
    (from..).filter(|r| shard_of_room(c, *r) == shard).take(n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_both_transports_get_each_room_message_once_with_its_seq() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let carol = register(&c, "carol").await;
    let room = 900_001;
    create_room(&c, room).await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;

    let (mut a, _) = gw.signed_in(Kind::Tcp, &alice).await;
    let (mut b, _) = gw.signed_in(Kind::Ws, &bob).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;
    let out = subscribed(&mut a, room, 0).await;
    assert_eq!((out.last_seq, out.first_seq), (0, 1), "an empty room");
    subscribed(&mut b, room, 0).await;
    assert_eq!(gw.router.room_conns(GroupId(room)).len(), 2);

    for i in 1..=3 {
        assert_eq!(send_room(&mut sender, room, &format!("r{i}")).await, i);
    }
    for client in [&mut a, &mut b] {
        let pushed = room_pushes_through(client, room, 3).await;
        assert_eq!(consecutive(&pushed, 1), cmids(1..=3), "{:?}", client.kind);
        assert_eq!(pushed[0].sender_user_id, carol.user);
        assert!(settle(client).await.is_empty(), "{:?}: nothing twice", client.kind);
    }
    // The sender did not subscribe: rooms have no members and no fan-out.
    assert!(settle(&mut sender).await.is_empty());
    wait_for(Duration::from_secs(20), || gw.router.is_room_subscribed(GroupId(room)).then_some(())).await;

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_the_backlog_then_live_messages_none_twice() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let carol = register(&c, "carol").await;
    let room = 900_002;
    create_room(&c, room).await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;
    for i in 1..=5 {
        send_room(&mut sender, room, &format!("r{i}")).await;
    }

    // Alice asks for what follows seq 2 while messages keep coming: the
    // backlog 3..=5, then whatever the sender adds, each once, in order.
    let (mut a, _) = gw.signed_in(Kind::Ws, &alice).await;
    let sending = tokio::spawn(async move {
        for i in 6..=25 {
            send_room(&mut sender, room, &format!("r{i}")).await;
        }
        sender
    });
    let out = subscribed(&mut a, room, 2).await;
    assert!((5..=25).contains(&out.last_seq), "{out:?}");
    assert_eq!(out.first_seq, 1);
    let mut sender = sending.await.unwrap();
    let pushed = room_pushes_through(&mut a, room, 25).await;
    assert_eq!(consecutive(&pushed, 3), cmids(3..=25));
    assert!(settle(&mut a).await.is_empty());

    // after_seq 0 is "live only" (SubscribeRoomInput): nothing of the past.
    let (mut b, _) = gw.signed_in(Kind::Tcp, &bob).await;
    let out = subscribed(&mut b, room, 0).await;
    assert_eq!(out.last_seq, 25);
    assert_eq!(send_room(&mut sender, room, "r26").await, 26);
    let pushed = room_pushes_through(&mut b, room, 26).await;
    assert_eq!(consecutive(&pushed, 26), cmids(26..=26));
    let pushed = room_pushes_through(&mut a, room, 26).await;
    assert_eq!(consecutive(&pushed, 26), cmids(26..=26));

    // Subscribing again restarts from the new after_seq.
    subscribed(&mut b, room, 23).await;
    let pushed = room_pushes_through(&mut b, room, 26).await;
    assert_eq!(consecutive(&pushed, 24), cmids(24..=26));
    assert_eq!(send_room(&mut sender, room, "r27").await, 27);
    let pushed = room_pushes_through(&mut b, room, 27).await;
    assert_eq!(consecutive(&pushed, 27), cmids(27..=27));
    assert!(settle(&mut b).await.is_empty());
    // A client ahead of the room is taken back to its end.
    let (mut b2, _) = gw.signed_in(Kind::Tcp, &bob).await;
    assert_eq!(subscribed(&mut b2, room, 1_000).await.last_seq, 27);
    assert_eq!(send_room(&mut sender, room, "r28").await, 28);
    let pushed = room_pushes_through(&mut b2, room, 28).await;
    assert_eq!(consecutive(&pushed, 28), cmids(28..=28));

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_closing_and_kicks_end_room_subscriptions() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let carol = register(&c, "carol").await;
    let rooms = rooms_on_one_shard(&c, 900_010, 2);
    let (r1, r2) = (rooms[0], rooms[1]);
    create_room(&c, r1).await;
    create_room(&c, r2).await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;

    for kind in [Kind::Tcp, Kind::Ws] {
        let (mut a, _) = gw.signed_in(kind, &alice).await;
        subscribed(&mut a, r1, 0).await;
        subscribed(&mut a, r2, 0).await;
        let conn = gw.router.room_conns(GroupId(r1));
        assert_eq!(conn.len(), 1);
        wait_for(Duration::from_secs(20), || {
            (gw.router.is_room_subscribed(GroupId(r1)) && gw.router.is_room_subscribed(GroupId(r2)))
                .then_some(())
        })
        .await;

        // UNSUBSCRIBE_ROOM of r1: its pushes stop, r2's go on. Both rooms
        // are on one shard, so one stream carries their pushes in order.
        unsubscribe(&mut a, r1).await;
        assert!(gw.router.room_conns(GroupId(r1)).is_empty());
        let s1 = send_room(&mut sender, r1, &format!("{kind:?}-a")).await;
        let s2 = send_room(&mut sender, r2, &format!("{kind:?}-b")).await;
        let pushed = room_pushes_through(&mut a, r2, s2).await;
        assert_eq!(pushed.last().unwrap().client_msg_id, format!("{kind:?}-b"));
        assert!(settle(&mut a).await.iter().all(|m| m.conversation_id != r1));
        assert!(s1 > 0);
        // Nobody here reads r1 any more: it left the shard's stream.
        wait_for(Duration::from_secs(20), || (!gw.router.is_room_subscribed(GroupId(r1))).then_some(()))
            .await;

        // UNSUBSCRIBE_ROOM 0 leaves every room.
        unsubscribe(&mut a, 0).await;
        assert!(gw.router.room_conns(GroupId(r2)).is_empty());
        wait_for(Duration::from_secs(20), || (!gw.router.is_room_subscribed(GroupId(r2))).then_some(()))
            .await;

        // SUBSCRIBE_ROOM of room 0 too (gim), with an empty output.
        subscribed(&mut a, r1, 0).await;
        assert_eq!(subscribed(&mut a, 0, 0).await, SubscribeRoomOutput::default());
        assert!(gw.router.room_conns(GroupId(r1)).is_empty());
        send_room(&mut sender, r1, &format!("{kind:?}-c")).await;
        let s2 = send_room(&mut sender, r2, &format!("{kind:?}-d")).await;
        subscribed(&mut a, r2, s2 - 1).await;
        let pushed = room_pushes_through(&mut a, r2, s2).await;
        assert_eq!(pushed.len(), 1);
        assert!(settle(&mut a).await.iter().all(|m| m.conversation_id != r1));

        // Closing the connection ends its subscriptions.
        drop(a);
        wait_for(Duration::from_secs(20), || gw.router.room_conns(GroupId(r2)).is_empty().then_some(()))
            .await;
        wait_for(Duration::from_secs(20), || (!gw.router.is_room_subscribed(GroupId(r2))).then_some(()))
            .await;

        // So does a kick: the device signs in again elsewhere.
        let (mut a, _) = gw.signed_in(kind, &alice).await;
        subscribed(&mut a, r1, 0).await;
        let old = gw.router.room_conns(GroupId(r1));
        let (mut a2, _) = gw.signed_in(Kind::Tcp, &alice).await;
        a.closed_within(e2e::WAIT).await;
        assert!(gw.router.room_conns(GroupId(r1)).iter().all(|id| !old.contains(id)));
        assert!(gw.router.room_conns(GroupId(r1)).is_empty());
        assert!(settle(&mut a2).await.is_empty());
    }

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_unknown_rooms_and_too_many_rooms_are_refused() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let group = 900_099;
    create_group(&c, group, store::GroupKind::Small, alice.user).await;
    let base = 900_100;
    for i in 0..MAX_ROOMS_PER_CONNECTION as u64 {
        create_room(&c, base + i).await;
    }
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;

    for kind in [Kind::Tcp, Kind::Ws] {
        // Before sign-in.
        let mut fresh = gw.connect(kind).await;
        assert_eq!(subscribe(&mut fresh, base, 0).await.code, ErrorCode::ErrorNotSignedIn as i32);

        let (mut a, _) = gw.signed_in(kind, &alice).await;
        // An unknown room: the node's answer.
        let reply = subscribe(&mut a, 424_242, 0).await;
        assert_eq!(reply.code, ErrorCode::ErrorGroupNotFound as i32, "{}", reply.message);
        assert!(gw.router.room_conns(GroupId(424_242)).is_empty());
        // A group is not a room, and its non-members may not read it.
        let reply = subscribe(&mut a, group, 0).await;
        assert_eq!(reply.code, ErrorCode::ErrorBadRequest as i32, "{}", reply.message);
        let (mut b, _) = gw.signed_in(kind, &bob).await;
        let reply = subscribe(&mut b, group, 0).await;
        assert_eq!(reply.code, ErrorCode::ErrorNotGroupMember as i32, "{}", reply.message);
        // Undecodable content.
        let reply = a.request(Command::SubscribeRoom, vec![0xff, 0xff]).await;
        assert_eq!(reply.code, ErrorCode::ErrorBadRequest as i32);

        // At most MAX_ROOMS_PER_CONNECTION rooms; subscribing again to one
        // of them is fine.
        for i in 0..MAX_ROOMS_PER_CONNECTION as u64 {
            subscribed(&mut a, base + i, 0).await;
        }
        let reply = subscribe(&mut a, base + 1_000, 0).await;
        assert_eq!(reply.code, ErrorCode::ErrorBadRequest as i32, "{}", reply.message);
        subscribed(&mut a, base, 0).await;
        unsubscribe(&mut a, base).await;
        // Room-less again: a failed subscription leaves nothing behind.
        let reply = subscribe(&mut a, 424_243, 0).await;
        assert_eq!(reply.code, ErrorCode::ErrorGroupNotFound as i32);
        subscribed(&mut a, base, 0).await;
        assert_eq!(a.heartbeat().await.code, ErrorCode::Ok as i32, "the connection stays open");
    }

    gw.shutdown().await;
    c.shutdown().await;
}

/// A subscriber whose room pushes a task collects.
struct Subscriber {
    name: &'static str,
    seen: Arc<Mutex<Vec<Message>>>,
    task: JoinHandle<Client>,
}

impl Subscriber {
    async fn start(
        gw: &Gateway,
        name: &'static str,
        kind: Kind,
        d: &Device,
        room: u64,
        stop: watch::Receiver<bool>,
    ) -> Subscriber {
        let (mut client, _) = gw.signed_in(kind, d).await;
        subscribed(&mut client, room, 0).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(collect(client, room, seen.clone(), stop));
        Subscriber { name, seen, task }
    }

    fn cmids(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|m| m.client_msg_id.clone()).collect()
    }
}

/// Reads pushes of `room` into `seen` until `stop`; heartbeats meanwhile.
/// The connection must stay open throughout.
async fn collect(
    mut client: Client,
    room: u64,
    seen: Arc<Mutex<Vec<Message>>>,
    stop: watch::Receiver<bool>,
) -> Client {
    let mut heartbeat_at = Instant::now() + Duration::from_secs(5);
    while !*stop.borrow() {
        match client.read_raw(Instant::now() + Duration::from_millis(200)).await {
            Read::Packet(p) if is_push(&p) => {
                let m = message_of(&p);
                assert_eq!(m.conversation_id, room, "{:?}: a push of another list", client.kind);
                seen.lock().unwrap().push(m);
            }
            Read::Packet(p) => assert!(is_reply(&p), "{:?}: unexpected {p:?}", client.kind),
            Read::Closed(code) => panic!("{:?}: the subscriber was closed ({code:?})", client.kind),
            Read::Timeout => {}
        }
        if Instant::now() >= heartbeat_at {
            client.send(Command::Heartbeat as i32, Vec::new()).await;
            heartbeat_at = Instant::now() + Duration::from_secs(5);
        }
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_subscriptions_survive_a_leader_change_of_the_rooms_shard() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let carol = register(&c, "carol").await;
    let room = 900_200;
    create_room(&c, room).await;
    let shard = shard_of_room(&c, room);
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;

    let (stop, stopped) = watch::channel(false);
    let subscribers = [
        Subscriber::start(&gw, "alice over TCP", Kind::Tcp, &alice, room, stopped.clone()).await,
        Subscriber::start(&gw, "bob over WebSocket", Kind::Ws, &bob, room, stopped.clone()).await,
    ];
    wait_for(Duration::from_secs(20), || gw.router.is_room_subscribed(GroupId(room)).then_some(())).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;

    let mut acked: Vec<String> = Vec::new();
    let mut n = 0u64;
    let mut send = async |sender: &mut Client| {
        n += 1;
        let cmid = format!("r{n}");
        assert_eq!(send_room(sender, room, &cmid).await, n, "room seqs follow the acks");
        acked.push(cmid);
    };
    for _ in 0..10 {
        send(&mut sender).await;
    }

    // Stop the room shard's leader while sending goes on.
    let old = c.leader(shard).await;
    let old_addr = c.configs[&old].listen.clone();
    wait_for(Duration::from_secs(10), || (gw.router.stream_node(shard)? == old_addr).then_some(())).await;
    let subscriptions = gw.router.stats().subscriptions;
    let node = c.nodes.remove(&old).unwrap();
    let stopping = tokio::spawn(node.shutdown());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after = 0;
    while after < 10 {
        assert!(Instant::now() < deadline, "the router never re-subscribed at a new leader");
        send(&mut sender).await;
        if gw.router.stream_node(shard).is_some_and(|a| a != old_addr) {
            after += 1;
        }
    }
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("the node stopped").unwrap();
    assert_ne!(c.leader(shard).await, old);
    assert!(gw.router.stats().subscriptions > subscriptions, "re-subscribed");
    assert!(gw.router.is_room_subscribed(GroupId(room)), "the room is on the new stream");

    // Every subscriber gets the whole room sequence, gap-free, none twice:
    // by push, or by the resync after the stream broke.
    for s in &subscribers {
        wait_for(Duration::from_secs(60), || (s.cmids().len() >= acked.len()).then_some(())).await;
    }
    stop.send(true).unwrap();
    for s in subscribers {
        let mut client = s.task.await.unwrap();
        let pushed = s.seen.lock().unwrap().clone();
        assert_eq!(consecutive(&pushed, 1), acked, "{}: the room's entries exactly", s.name);
        assert!(settle(&mut client).await.is_empty(), "{}: nothing more", s.name);
    }
    gw.shutdown().await;
    c.shutdown().await;
}

// ------------------------------------------------ the session, without IO

mod session {
    use std::time::Instant;

    use rim_gateway::{Action, CallError, CallId, NodeCall, NodeReply, SessionConfig};
    use rim_proto::ErrorCode;
    use rim_proto::ids::{GroupId, Seq};
    use rim_proto::v1::*;

    use crate::common::{
        calls, closes_with, drain, entry, only_call, packet, pushed_seqs, reply_of, sent, signed_in,
        sync_call,
    };
    use rim_gateway::session::MAX_ROOMS_PER_CONNECTION;

    const ROOM: u64 = 50;

    fn room_push(seq: u64) -> PushedMessage {
        PushedMessage {
            list_kind: ListKind::Group as i32,
            owner_id: ROOM,
            seq,
            message: Some(entry(seq)),
            priority: PushPriority::Normal as i32,
            persisted: true,
            skip_device_id: 0,
        }
    }

    /// The room sync call among `actions`: its id and input.
    fn room_sync(actions: &[Action]) -> Option<(CallId, SyncGroupInput)> {
        calls(actions).into_iter().find_map(|c| match c.request {
            NodeCall::SyncGroup(input) => Some((c.id, input)),
            _ => None,
        })
    }

    fn synced(range: std::ops::RangeInclusive<u64>, first: u64, has_more: bool) -> NodeReply {
        let last = *range.end();
        NodeReply::SyncGroup(SyncGroupOutput {
            messages: range.map(entry).collect(),
            has_more,
            last_group_seq: last,
            first_group_seq: first,
        })
    }

    fn subscribe(s: &mut rim_gateway::Session, request_id: u64, after_seq: u64) -> CallId {
        let t0 = Instant::now();
        s.on_packet(
            t0,
            packet(request_id, Command::SubscribeRoom, SubscribeRoomInput { room_id: ROOM, after_seq }),
        );
        let call = only_call(&drain(s));
        assert_eq!(call.request, NodeCall::SubscribeRoom(SubscribeRoomInput { room_id: ROOM, after_seq }));
        call.id
    }

    #[test]
    fn pushes_are_held_until_the_backlog_is_read_then_go_in_order_once() {
        let t0 = Instant::now();
        let mut s = signed_in(SessionConfig::default(), t0, 0);
        let id = subscribe(&mut s, 2, 2);
        s.on_push(t0, room_push(5));
        s.on_push(t0, room_push(6));
        assert!(pushed_seqs(&drain(&mut s)).is_empty(), "held while subscribing");

        let out = SubscribeRoomOutput { last_seq: 5, first_seq: 1 };
        s.on_reply(t0, id, Ok(NodeReply::SubscribeRoom(out)));
        let actions = drain(&mut s);
        let reply = &sent(&actions)[0];
        assert_eq!((reply.request_id, reply.command), (2, Command::SubscribeRoom as i32));
        assert_eq!(reply_of(reply).data, prost::Message::encode_to_vec(&out));
        let (sync, input) = room_sync(&actions).expect("the backlog is synced");
        assert_eq!((input.group_id, input.after_group_seq), (ROOM, 2));

        s.on_reply(t0, sync, Ok(synced(3..=5, 1, false)));
        let actions = drain(&mut s);
        assert_eq!(pushed_seqs(&actions), [3, 4, 5, 6], "backlog, then the held pushes");
        assert!(calls(&actions).is_empty());

        s.on_push(t0, room_push(6));
        s.on_push(t0, room_push(7));
        assert_eq!(pushed_seqs(&drain(&mut s)), [7], "each seq once");
        s.on_push(t0, room_push(9));
        let actions = drain(&mut s);
        assert!(pushed_seqs(&actions).is_empty());
        assert_eq!(room_sync(&actions).map(|(_, i)| i.after_group_seq), Some(7), "a gap is repaired");
        assert_eq!(s.last_room_seq(GroupId(ROOM)), Some(Seq(7)));
        assert_eq!(s.rooms(), [GroupId(ROOM)]);
    }

    #[test]
    fn live_only_retention_resync_and_a_vanished_room() {
        let t0 = Instant::now();
        let mut s = signed_in(SessionConfig::default(), t0, 0);
        // after_seq 0: live only, from the room's end.
        let id = subscribe(&mut s, 2, 0);
        s.on_reply(t0, id, Ok(NodeReply::SubscribeRoom(SubscribeRoomOutput { last_seq: 4, first_seq: 1 })));
        let (sync, input) = room_sync(&drain(&mut s)).unwrap();
        assert_eq!(input.after_group_seq, 4);
        s.on_reply(t0, sync, Ok(synced(5..=5, 1, false)));
        assert_eq!(pushed_seqs(&drain(&mut s)), [5]);

        // Trimmed entries are skipped: the backlog starts at the oldest
        // retained one, even if it moved while syncing.
        let id = subscribe(&mut s, 3, 1);
        s.on_reply(t0, id, Ok(NodeReply::SubscribeRoom(SubscribeRoomOutput { last_seq: 10, first_seq: 6 })));
        let (sync, input) = room_sync(&drain(&mut s)).unwrap();
        assert_eq!(input.after_group_seq, 5);
        s.on_reply(t0, sync, Ok(synced(8..=10, 8, false)));
        assert_eq!(pushed_seqs(&drain(&mut s)), [8, 9, 10]);

        // A resync request syncs the user's list and every room.
        s.on_resync_needed(t0);
        let actions = drain(&mut s);
        assert_eq!(sync_call(&actions).map(|(_, after)| after), Some(0));
        let (sync, input) = room_sync(&actions).unwrap();
        assert_eq!(input.after_group_seq, 10);
        // The room is gone: dropped here and at the router, the
        // connection stays.
        let gone = CallError::new(ErrorCode::ErrorGroupNotFound, "group not found");
        s.on_reply(t0, sync, Err(gone));
        let actions = drain(&mut s);
        assert_eq!(
            only_call(&actions).request,
            NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: ROOM })
        );
        assert!(s.rooms().is_empty());
        assert!(!s.is_closed());
    }

    #[test]
    fn failed_and_overtaken_subscriptions_and_the_room_limit() {
        let t0 = Instant::now();
        let mut s = signed_in(SessionConfig::default(), t0, 0);
        let first = subscribe(&mut s, 2, 0);
        let second = subscribe(&mut s, 3, 0);
        // The first reply is answered, but the second subscription rules.
        s.on_reply(t0, first, Ok(NodeReply::SubscribeRoom(SubscribeRoomOutput::default())));
        let actions = drain(&mut s);
        assert_eq!(sent(&actions).len(), 1);
        assert!(calls(&actions).is_empty());
        let e = CallError::new(ErrorCode::ErrorGroupNotFound, "group not found");
        s.on_reply(t0, second, Err(e));
        let actions = drain(&mut s);
        assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorGroupNotFound as i32);
        assert_eq!(
            only_call(&actions).request,
            NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: ROOM })
        );
        assert!(s.rooms().is_empty(), "a failed subscription leaves the room");

        for room_id in 1..=MAX_ROOMS_PER_CONNECTION as u64 {
            s.on_packet(
                t0,
                packet(room_id + 10, Command::SubscribeRoom, SubscribeRoomInput { room_id, after_seq: 0 }),
            );
            // Answered, so that the requests in flight stay below their limit.
            let call = only_call(&drain(&mut s));
            s.on_reply(t0, call.id, Ok(NodeReply::SubscribeRoom(SubscribeRoomOutput::default())));
            drain(&mut s);
        }
        drain(&mut s);
        s.on_packet(
            t0,
            packet(99, Command::SubscribeRoom, SubscribeRoomInput { room_id: 999, after_seq: 0 }),
        );
        let actions = drain(&mut s);
        assert!(calls(&actions).is_empty());
        assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorBadRequest as i32);
        // Room 0 leaves every room, at once.
        s.on_packet(t0, packet(100, Command::SubscribeRoom, SubscribeRoomInput { room_id: 0, after_seq: 0 }));
        let call = only_call(&drain(&mut s));
        assert_eq!(call.request, NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: 0 }));
        assert!(s.rooms().is_empty());
        s.on_reply(t0, call.id, Ok(NodeReply::Empty));
        let actions = drain(&mut s);
        assert_eq!((sent(&actions)[0].request_id, reply_of(&sent(&actions)[0]).code), (100, 0));
        assert!(!closes_with(&actions, ErrorCode::ErrorBusy));
    }
}
