//! Rooms under retention and load, end to end against an in-process
//! cluster: the retention bound holds for subscribers and readers, a
//! subscriber catches up by subscribing again from its last room seq, and
//! a subscriber that stops reading neither holds up the others nor is
//! closed (normal-priority room pushes are skipped for it).
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::GroupId;
use rim_proto::v1::*;

mod cluster;
mod e2e;
mod groups;
use cluster::{Cluster, register, serial, wait_for};
use e2e::{Client, Gateway, Kind, Read, consecutive, is_push, message_of};
use groups::*;

fn cmids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

async fn sync_room(client: &mut Client, room: u64, after: u64) -> SyncGroupOutput {
    let input = SyncGroupInput { group_id: room, after_group_seq: after, limit: 0 };
    let reply = client.request(Command::SyncGroup, input.encode_to_vec()).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "sync room {room}: {}", reply.message);
    SyncGroupOutput::decode(reply.data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_retention_bound_holds_and_a_subscriber_catches_up_by_subscribing_again() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let carol = register(&c, "carol").await;
    let room = 920_001;
    create_room(&c, room, 5).await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;
    for i in 1..=12 {
        assert_eq!(send_group(&mut sender, room, &format!("r{i}")).await, i);
    }

    // Only the last 5 are kept: a subscriber from 1 gets 8..=12.
    let (mut a, _) = gw.signed_in(Kind::Ws, &alice).await;
    let sub = subscribed(&mut a, room, 1).await;
    assert_eq!((sub.last_seq, sub.first_seq), (12, 8));
    let pushed = pushes_through(&mut a, room, 12).await;
    assert_eq!(consecutive(&pushed, 8), cmids(8..=12));
    let page = sync_room(&mut a, room, 0).await;
    assert_eq!((page.first_group_seq, page.last_group_seq), (8, 12));
    assert_eq!(consecutive(&page.messages, 8), cmids(8..=12));

    // Away and back within the retention: exactly what was missed.
    unsubscribe(&mut a, room).await;
    for i in 13..=15 {
        send_group(&mut sender, room, &format!("r{i}")).await;
    }
    assert!(settle(&mut a, room).await.is_empty(), "nothing while unsubscribed");
    subscribed(&mut a, room, 12).await;
    let pushed = pushes_through(&mut a, room, 15).await;
    assert_eq!(consecutive(&pushed, 13), cmids(13..=15));

    // Away for longer than the retention, on a new connection: what was
    // trimmed is skipped, the rest comes in order, then live entries.
    drop(a);
    wait_for(Duration::from_secs(20), || gw.router.room_conns(GroupId(room)).is_empty().then_some(())).await;
    for i in 16..=25 {
        send_group(&mut sender, room, &format!("r{i}")).await;
    }
    let (mut a, _) = gw.signed_in(Kind::Tcp, &alice).await;
    let sub = subscribed(&mut a, room, 15).await;
    assert_eq!((sub.last_seq, sub.first_seq), (25, 21));
    let pushed = pushes_through(&mut a, room, 25).await;
    assert_eq!(consecutive(&pushed, 21), cmids(21..=25));
    assert_eq!(send_group(&mut sender, room, "r26").await, 26);
    let pushed = pushes_through(&mut a, room, 26).await;
    assert_eq!(consecutive(&pushed, 26), cmids(26..=26));
    assert!(settle(&mut a, room).await.is_empty());
    let page = sync_room(&mut a, room, 0).await;
    assert_eq!(page.messages.len(), 5, "the bound holds: {:?}", page.messages.len());

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_room_subscriber_neither_holds_up_the_others_nor_is_closed() {
    // Large messages, so that the kernel's socket buffers (megabytes on
    // loopback) and the session's queue fill.
    const SIZE: usize = 64 * 1024;
    const N: u64 = 160;
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let carol = register(&c, "carol").await;
    let room = 920_002;
    create_room(&c, room, 0).await;
    let config = SessionConfig { send_queue_limit: 4 * SIZE, resync_batch: 2, ..SessionConfig::default() };
    let gw = Gateway::start(c.seeds(), config).await;

    // Bob subscribes, then stops reading (a tiny receive buffer).
    let (mut stalled, _) = gw.signed_in_with(Kind::Tcp, &bob, Some(4096)).await;
    subscribed(&mut stalled, room, 0).await;
    let (mut fast, _) = gw.signed_in(Kind::Ws, &alice).await;
    subscribed(&mut fast, room, 0).await;
    wait_for(Duration::from_secs(20), || gw.router.is_room_subscribed(GroupId(room)).then_some(())).await;
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &carol).await;

    let sending = tokio::spawn(async move {
        for i in 1..=N {
            send_group_sized(&mut sender, room, &format!("r{i}"), SIZE).await;
        }
        sender
    });
    // Alice gets every entry, in order, while bob reads nothing.
    let pushed = pushes_through(&mut fast, room, N).await;
    assert_eq!(consecutive(&pushed, 1), cmids(1..=N));
    let mut sender = sending.await.unwrap();
    assert_eq!(gw.router.room_conns(GroupId(room)).len(), 2, "the stalled subscriber is still subscribed");

    // Bob reads again: an increasing subsequence (entries were skipped for
    // him, not queued without bound), and his connection is open.
    let mut got: Vec<u64> = Vec::new();
    loop {
        match stalled.read_raw(Instant::now() + Duration::from_secs(2)).await {
            Read::Packet(p) if is_push(&p) => got.push(message_of(&p).seq),
            Read::Packet(_) => {}
            Read::Timeout => break,
            Read::Closed(code) => panic!("the stalled subscriber was closed ({code:?})"),
        }
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, each once: {got:?}");
    assert!((got.len() as u64) < N, "entries were skipped for the stalled subscriber");
    eprintln!("stalled subscriber got {} of {N} entries", got.len());
    assert_eq!(stalled.heartbeat().await.code, ErrorCode::Ok as i32);
    // Live entries reach it again once it reads.
    assert_eq!(send_group(&mut sender, room, "after").await, N + 1);
    let pushed = pushes_through(&mut stalled, room, N + 1).await;
    assert_eq!(pushed.last().unwrap().client_msg_id, "after");

    gw.shutdown().await;
    c.shutdown().await;
}
