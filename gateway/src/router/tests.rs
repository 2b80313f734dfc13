//! Routing decisions of the push router, without a node: pushes are handed
//! to `route_push` as if they came on a shard's stream.

use std::time::Duration;

use rim_proto::ids::{DeviceId, GroupId, ShardId, UserId};
use rim_proto::v1::{ListKind, Message, PushPriority, PushedMessage};
use tokio::sync::mpsc;

use super::stream::route_push;
use super::*;
use crate::call::CallId;
use crate::upstream::UpstreamOptions;

/// A router whose streams never come up (the seed does not listen), so
/// only the pushes handed to `route_push` reach connections.
fn router() -> PushRouter {
    let mut options = UpstreamOptions::new(vec!["127.0.0.1:9".into()], "secret", "gw-router-test");
    options.request_timeout = Duration::from_millis(200);
    let upstream = Upstream::new(options).unwrap();
    let options = RouterOptions { subscribe_timeout: Duration::from_millis(200), request_queue: 4 };
    PushRouter::new(upstream, options)
}

fn online(list_kind: ListKind, owner_id: u64) -> PushedMessage {
    PushedMessage {
        list_kind: list_kind as i32,
        owner_id,
        seq: 0,
        message: Some(Message { message_id: 77, ..Default::default() }),
        priority: PushPriority::High as i32,
        persisted: false,
        skip_device_id: 0,
    }
}

/// The pushes queued for one connection (resync signals skipped).
fn pushes(rx: &mut mpsc::Receiver<ConnEvent>) -> Vec<PushedMessage> {
    let mut out = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let ConnEvent::Push(p) = event {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_broadcast_reaches_each_connection_once_from_its_users_shard() {
    let router = router();
    // Users 1 and 2 live in shard 1, user 3 in shard 2; user 1 has two
    // devices.
    let mut rx = Vec::new();
    for (conn, user, device, shard) in [(1, 1, 11, 1), (2, 1, 12, 1), (3, 2, 21, 1), (4, 3, 31, 2)] {
        let (tx, r) = mpsc::channel(16);
        router.register(conn, UserId(user), DeviceId(device), ShardId(shard), tx);
        rx.push(r);
    }
    // Every shard leader sends the broadcast once; a third shard has no
    // connection here.
    for shard in [1, 2, 3] {
        route_push(&router.inner, ShardId(shard), online(ListKind::Unspecified, 0));
    }
    for (i, r) in rx.iter_mut().enumerate() {
        let got = pushes(r);
        assert_eq!(got.len(), 1, "connection {} got the broadcast once", i + 1);
        assert!(!got[0].persisted);
    }
    router.shutdown().await;
}

#[tokio::test]
async fn group_pushes_go_to_the_groups_readers_user_pushes_to_the_users_connections() {
    let router = router();
    let (tx1, mut rx1) = mpsc::channel(16);
    let (tx2, mut rx2) = mpsc::channel(16);
    router.register(1, UserId(1), DeviceId(11), ShardId(1), tx1);
    router.register(2, UserId(2), DeviceId(21), ShardId(2), tx2);
    router.subscribe_room(1, GroupId(500), ShardId(2), CallId(1)).unwrap();
    route_push(&router.inner, ShardId(2), online(ListKind::Group, 500));
    route_push(&router.inner, ShardId(1), online(ListKind::Group, 501));
    route_push(&router.inner, ShardId(2), online(ListKind::User, 2));
    assert_eq!(pushes(&mut rx1).iter().map(|p| p.owner_id).collect::<Vec<_>>(), [500]);
    assert_eq!(pushes(&mut rx2).iter().map(|p| p.owner_id).collect::<Vec<_>>(), [2]);
    // Unsubscribed: the group's pushes stop.
    router.unsubscribe_room(1, Some(GroupId(500)), CallId(2));
    assert!(router.room_conns(GroupId(500)).is_empty());
    route_push(&router.inner, ShardId(2), online(ListKind::Group, 500));
    assert!(pushes(&mut rx1).is_empty());
    router.shutdown().await;
}
