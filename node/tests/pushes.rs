//! The business push API (internal listener): persisted pushes in every
//! list once, online-only pushes on the gateways' push streams.

use std::collections::BTreeMap;

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId};
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::push_service_client::PushServiceClient;
use rim_proto::v1::subscribe_event::Event;
use rim_proto::v1::*;
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;
use tokio_stream::StreamExt;

fn channel(c: &Cluster, node: u64) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&node].listen))
        .unwrap()
        .connect_lazy()
}

fn pusher(c: &Cluster, node: u64) -> PushServiceClient<tonic::transport::Channel> {
    PushServiceClient::new(channel(c, node))
}

fn body(content_type: ContentType, text: &str, cmid: &str) -> Option<PushContent> {
    Some(PushContent {
        content_type: content_type as i32,
        content: text.as_bytes().to_vec().into(),
        sender_user_id: 0,
        client_msg_id: cmid.into(),
    })
}

/// A push stream as a gateway opens it: to the shard's leader, with the
/// given users and groups.
struct Stream {
    events: tonic::Streaming<SubscribeEvent>,
    _requests: tokio::sync::mpsc::Sender<SubscribeRequest>,
}

async fn subscribe(c: &Cluster, shard: ShardId, users: &[u64], groups: &[u64]) -> Stream {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let leader = c.leader(shard).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(SubscribeRequest {
            gateway_id: "gw-push-test".into(),
            shard_id: shard.0,
            reset: true,
            add_user_ids: users.to_vec(),
            add_group_ids: groups.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        let req = with_secret(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut events =
            GatewayServiceClient::new(channel(c, leader)).subscribe(req).await.unwrap().into_inner();
        let first = tokio::time::timeout(WAIT, events.next()).await.expect("first event");
        if let Some(Ok(SubscribeEvent { event: Some(Event::Subscribed(_)) })) = first {
            return Stream { events, _requests: tx };
        }
        // Leadership moved meanwhile: ask again.
        assert!(std::time::Instant::now() < deadline, "no stream to the leader of shard {shard}: {first:?}");
    }
}

impl Stream {
    /// The next pushed message matching `f` (others are skipped).
    async fn next_push(&mut self, f: impl Fn(&PushedMessage) -> bool) -> PushedMessage {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev =
                tokio::time::timeout_at(deadline, self.events.next()).await.expect("a matching push in time");
            match ev {
                Some(Ok(SubscribeEvent { event: Some(Event::Message(m)) })) if f(&m) => return m,
                Some(Ok(SubscribeEvent { event: Some(Event::End(e)) })) => panic!("stream ended: {e:?}"),
                Some(Ok(_)) => {}
                other => panic!("stream broke: {other:?}"),
            }
        }
    }

    /// The next online-only push.
    async fn next_online(&mut self) -> PushedMessage {
        self.next_push(|m| !m.persisted).await
    }
}

fn text(m: &PushedMessage) -> String {
    String::from_utf8_lossy(&m.message.as_ref().unwrap().content).into_owned()
}

/// Registers users until every shard holds one; one per shard.
async fn one_per_shard(
    c: &Cluster,
    client: &Client,
    prefix: &str,
    shards: u32,
) -> BTreeMap<ShardId, Session> {
    let mut out = BTreeMap::new();
    for i in 0..100 {
        if out.len() == shards as usize {
            break;
        }
        let name = format!("{prefix}{i}");
        let id = client.register(&name).await;
        let shard = c.shard_of_user(id);
        if let std::collections::btree_map::Entry::Vacant(e) = out.entry(shard) {
            e.insert(client.sign_in(&name).await);
        }
    }
    assert_eq!(out.len(), shards as usize);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_pushes_land_in_every_list_once() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let users: Vec<Session> = one_per_shard(&c, &client, "pp", 4).await.into_values().collect();
    let ids: Vec<u64> = users.iter().map(|s| s.user.0).collect();

    let req = PushToUsersRequest {
        user_ids: ids.clone(),
        content: body(ContentType::Custom, "p1", "p1"),
        persist: true,
    };
    let first = pusher(&c, 2).push_to_users(with_secret(req.clone())).await.unwrap().into_inner();
    assert_ne!(first.message_id, 0);
    let retry = pusher(&c, 3).push_to_users(with_secret(req)).await.unwrap().into_inner();
    assert_eq!(retry.message_id, first.message_id, "a retry is the same push");
    // A later push from the same shard arrives after anything the retry could have written.
    let req = PushToUsersRequest {
        user_ids: ids.clone(),
        content: body(ContentType::Text, "p2", "p2"),
        persist: true,
    };
    let marker = pusher(&c, 1).push_to_users(with_secret(req)).await.unwrap().into_inner();
    for s in &users {
        let list = eventually(WAIT, &format!("the marker push in the list of user {}", s.user), || async {
            let l = client.sync_all(s).await.unwrap();
            l.iter().any(|m| m.message_id == marker.message_id).then_some(l)
        })
        .await;
        let p1: Vec<&Message> = list.iter().filter(|m| m.message_id == first.message_id).collect();
        assert_eq!(p1.len(), 1, "user {} holds the push once", s.user);
        assert_eq!(p1[0].conversation_kind(), ConversationKind::System);
        assert_eq!((p1[0].sender_user_id, p1[0].content_type()), (0, ContentType::Custom));
    }

    // A persisted group push is one group entry, in every member's list.
    let create = CreateGroupRequest { member_ids: ids[1..].to_vec(), ..Default::default() };
    let mut groups = GroupServiceClient::new(client.channel.clone());
    let g = groups.create_group(Client::authed(&users[0], create)).await.unwrap().into_inner().group.unwrap();
    let req = PushToGroupRequest {
        group_id: g.group_id,
        content: body(ContentType::Text, "gp", "gp"),
        persist: true,
    };
    let gp = pusher(&c, 2).push_to_group(with_secret(req)).await.unwrap().into_inner();
    assert!(gp.message_id != 0 && gp.group_seq > 1);
    for s in &users {
        let list = eventually(WAIT, &format!("the group push in the list of user {}", s.user), || async {
            let l = client.sync_all(s).await.unwrap();
            l.iter().any(|m| m.message_id == gp.message_id).then_some(l)
        })
        .await;
        assert_eq!(list.iter().filter(|m| m.message_id == gp.message_id).count(), 1);
    }

    // Refusals.
    let bad = |content| PushToUsersRequest { user_ids: ids.clone(), content, persist: true };
    let err = pusher(&c, 1)
        .push_to_users(with_secret(bad(body(ContentType::Notification, "n", "n"))))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest);
    let err = pusher(&c, 1).push_to_users(with_secret(bad(None))).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest);
    let err = pusher(&c, 1)
        .push_to_users(tonic::Request::new(bad(body(ContentType::Text, "x", ""))))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied, "the cluster secret is required");
    let many = PushToUsersRequest {
        user_ids: (1..=1001).collect(),
        content: body(ContentType::Text, "x", ""),
        persist: false,
    };
    assert_eq!(
        code(&pusher(&c, 1).push_to_users(with_secret(many)).await.unwrap_err()),
        ErrorCode::ErrorBadRequest
    );
    let room = PushRoomRequest {
        room_id: g.group_id,
        content: body(ContentType::Text, "x", ""),
        ..Default::default()
    };
    let err = pusher(&c, 1).push_room(with_secret(room)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest, "not a room");
    let nf =
        PushToGroupRequest { group_id: 777_777, content: body(ContentType::Text, "x", ""), persist: false };
    assert_eq!(
        code(&pusher(&c, 1).push_to_group(with_secret(nf)).await.unwrap_err()),
        ErrorCode::ErrorGroupNotFound
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_pushes_reach_subscribed_streams_only() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (u, v) = users_on_two_shards(&c, &client, "op").await;
    let shard = c.shard_of_user(u.user);
    let mut stream = subscribe(&c, shard, &[u.user.0], &[]).await;

    // To users: each shard leader streams it to the gateways of its users.
    let req = PushToUsersRequest {
        user_ids: vec![v.user.0, u.user.0],
        content: body(ContentType::Custom, "live", ""),
        persist: false,
    };
    let r = pusher(&c, 2).push_to_users(with_secret(req)).await.unwrap().into_inner();
    assert_eq!(r.message_id, 0);
    let m = stream.next_online().await;
    assert_eq!((m.list_kind(), m.owner_id, m.seq, m.persisted), (ListKind::User, u.user.0, 0, false));
    let msg = m.message.as_ref().unwrap();
    assert_eq!(
        (msg.conversation_kind(), msg.message_id, text(&m).as_str()),
        (ConversationKind::System, 0, "live")
    );
    // Nothing was stored: a persisted marker arrives, the online push is not in the list.
    let req = PushToUsersRequest {
        user_ids: vec![u.user.0],
        content: body(ContentType::Text, "stored", ""),
        persist: true,
    };
    let stored = pusher(&c, 3).push_to_users(with_secret(req)).await.unwrap().into_inner();
    let p = stream.next_push(|m| m.persisted).await;
    assert_eq!(p.message.unwrap().message_id, stored.message_id);
    let list = client.sync_all(&u).await.unwrap();
    assert!(list.iter().any(|m| m.message_id == stored.message_id));
    assert!(!list.iter().any(|m| m.content.as_ref() == b"live"), "online-only pushes are not stored");

    // A small group's online push goes to its members' streams.
    let mut groups = GroupServiceClient::new(client.channel.clone());
    let create = CreateGroupRequest { member_ids: vec![v.user.0], ..Default::default() };
    let small = groups.create_group(Client::authed(&u, create)).await.unwrap().into_inner().group.unwrap();
    let req = PushToGroupRequest {
        group_id: small.group_id,
        content: body(ContentType::Text, "team", ""),
        persist: false,
    };
    pusher(&c, 1).push_to_group(with_secret(req)).await.unwrap();
    let m = stream.next_online().await;
    assert_eq!((m.list_kind(), m.owner_id, text(&m).as_str()), (ListKind::User, u.user.0, "team"));
    assert_eq!(m.message.unwrap().conversation_id, small.group_id);

    // Rooms: streams subscribed to the room, with the request's priority.
    let create =
        CreateGroupRequest { kind: GroupKind::Room as i32, name: "lobby".into(), ..Default::default() };
    let room =
        groups.create_group(Client::authed(&u, create)).await.unwrap().into_inner().group.unwrap().group_id;
    let room_shard = c.nodes[&1].core.placement().unwrap().shard_of_group(GroupId(room));
    let mut room_stream = subscribe(&c, room_shard, &[], &[room]).await;
    let req = PushRoomRequest {
        room_id: room,
        content: body(ContentType::Text, "hear ye", ""),
        priority: PushPriority::High as i32,
        persist: false,
    };
    let r = pusher(&c, 3).push_room(with_secret(req)).await.unwrap().into_inner();
    assert_eq!((r.message_id, r.group_seq), (0, 0));
    let m = room_stream.next_online().await;
    assert_eq!((m.list_kind(), m.owner_id, m.priority()), (ListKind::Group, room, PushPriority::High));
    assert_eq!(m.message.unwrap().conversation_kind(), ConversationKind::Room);
    let req = PushRoomRequest {
        room_id: room,
        content: body(ContentType::Text, "kept", ""),
        persist: true,
        ..Default::default()
    };
    let kept = pusher(&c, 2).push_room(with_secret(req)).await.unwrap().into_inner();
    assert!(kept.group_seq > 0);
    let m = room_stream.next_push(|m| m.persisted).await;
    assert_eq!((m.seq, m.owner_id, text(&m).as_str()), (kept.group_seq, room, "kept"));

    // Super groups: streams subscribed to the group.
    let create = CreateGroupRequest {
        kind: GroupKind::Super as i32,
        member_ids: vec![v.user.0],
        ..Default::default()
    };
    let sg =
        groups.create_group(Client::authed(&u, create)).await.unwrap().into_inner().group.unwrap().group_id;
    let sg_shard = c.nodes[&1].core.placement().unwrap().shard_of_group(GroupId(sg));
    let mut sg_stream = subscribe(&c, sg_shard, &[], &[sg]).await;
    let req =
        PushToGroupRequest { group_id: sg, content: body(ContentType::Text, "supers", ""), persist: false };
    pusher(&c, 1).push_to_group(with_secret(req)).await.unwrap();
    let m = sg_stream.next_online().await;
    assert_eq!((m.list_kind(), m.owner_id, text(&m).as_str()), (ListKind::Group, sg, "supers"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_all_reaches_a_stream_of_every_shard_once() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let shards: Vec<ShardId> =
        c.nodes[&1].core.placement().unwrap().data_shards().map(|s| ShardId(s.shard_id)).collect();
    assert_eq!(shards.len(), 4);
    let mut streams = Vec::new();
    for &s in &shards {
        streams.push(subscribe(&c, s, &[], &[]).await);
    }
    for (i, via) in [1u64, 3].into_iter().enumerate() {
        let req =
            PushToAllRequest { content: body(ContentType::Custom, &format!("all-{i}"), ""), priority: 0 };
        pusher(&c, via).push_to_all(with_secret(req)).await.unwrap();
        // Each stream's next online push is this one: the previous one came once.
        for s in &mut streams {
            let m = s.next_online().await;
            assert_eq!((m.list_kind(), m.owner_id, m.seq), (ListKind::Unspecified, 0, 0));
            assert_eq!(text(&m), format!("all-{i}"));
        }
    }
    let req = PushToAllRequest { content: body(ContentType::Notification, "x", ""), priority: 0 };
    assert_eq!(
        code(&pusher(&c, 2).push_to_all(with_secret(req)).await.unwrap_err()),
        ErrorCode::ErrorBadRequest
    );
    c.shutdown().await;
}
