//! Recall, read positions and receipts, and the conversation view, through
//! the client and gateway APIs: 3 nodes, 4 shards.

use rim_proto::ErrorCode;
use rim_proto::v1::friend_service_client::FriendServiceClient;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

fn messages(c: &Client) -> MessageServiceClient<tonic::transport::Channel> {
    MessageServiceClient::new(c.channel.clone())
}

fn gateway(c: &Cluster, node: u64) -> GatewayServiceClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&node].listen))
        .unwrap()
        .connect_lazy();
    GatewayServiceClient::new(ch)
}

fn conn(s: &Session) -> Option<ConnContext> {
    Some(ConnContext {
        user_id: s.user.0,
        device_id: s.device.0,
        gateway_id: "gw-test".into(),
        ..Default::default()
    })
}

async fn recall(c: &Client, s: &Session, input: RecallInput) -> Result<SendOutput, tonic::Status> {
    messages(c).recall(Client::authed(s, input)).await.map(|r| r.into_inner())
}

async fn mark_read(c: &Client, s: &Session, input: ReadInput) -> u64 {
    messages(c).mark_read(Client::authed(s, input)).await.unwrap().into_inner().read_seq
}

async fn view(c: &Client, s: &Session, limit: u32, before_ms: i64) -> ListConversationsReply {
    let req = ListConversationsRequest { limit, before_ms };
    messages(c).list_conversations(Client::authed(s, req)).await.unwrap().into_inner()
}

fn line(v: &ListConversationsReply, kind: ConversationKind, id: u64) -> Option<&Conversation> {
    v.conversations.iter().find(|c| c.conversation_kind() == kind && c.conversation_id == id)
}

/// Waits until `s`'s list holds an entry matching `f`; returns it.
async fn wait_entry(c: &Client, s: &Session, f: impl Fn(&Message) -> bool) -> Message {
    eventually(WAIT, &format!("a matching entry in the list of user {}", s.user), || async {
        c.sync_all(s).await.unwrap().into_iter().find(|m| f(m))
    })
    .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits until the clock passed `t` (so a later send gets a later time).
async fn after_ms(t: i64) {
    wait_for(WAIT, &format!("the clock past {t} ms"), || (now_ms() > t + 1).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_mark_read_receipts_and_unread_counts() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (a, b) = users_on_two_shards(&c, &client, "rc").await;
    client.register("rc-carol").await;
    let carol = client.sign_in("rc-carol").await;

    // Recall: own message within the window, by its seq in the own list.
    let m1 = client.send(&a, b.user, "m1", "first").await.unwrap();
    let in_b = wait_entry(&client, &b, |m| m.message_id == m1.message_id).await;
    let by_b = RecallInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: a.user.0,
        message_id: m1.message_id,
        client_msg_id: "b-recall".into(),
        seq: in_b.seq,
    };
    assert_eq!(code(&recall(&client, &b, by_b).await.unwrap_err()), ErrorCode::ErrorPermissionDenied);
    let mut by_a = RecallInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: b.user.0,
        message_id: m1.message_id,
        client_msg_id: "a-recall".into(),
        seq: m1.seq + 100,
    };
    assert_eq!(code(&recall(&client, &a, by_a.clone()).await.unwrap_err()), ErrorCode::ErrorMessageNotFound);
    by_a.seq = m1.seq;
    let r1 = recall(&client, &a, by_a.clone()).await.unwrap();
    let again = recall(&c.client(2), &a, by_a).await.unwrap();
    assert_eq!(again.message_id, r1.message_id, "a retried recall is the same recall");
    let rec = wait_entry(&client, &b, |m| m.content_type == ContentType::Recall as i32).await;
    assert_eq!((rec.refers_to, rec.sender_user_id), (m1.message_id, a.user.0));

    // Unread counts: the recalled message and the recall itself do not count.
    client.send(&a, b.user, "m2", "second").await.unwrap();
    let m3 = client.send(&a, b.user, "m3", "third").await.unwrap();
    let m3_in_b = wait_entry(&client, &b, |m| m.message_id == m3.message_id).await;
    let v = view(&client, &b, 0, 0).await;
    let with_a = line(&v, ConversationKind::User, a.user.0).unwrap();
    assert_eq!(with_a.unread_count, 2, "{v:?}");
    assert_eq!(with_a.last_message.as_ref().unwrap().message_id, m3.message_id);
    assert!(v.last_seq >= m3_in_b.seq);
    let recalls_in_b = client
        .sync_all(&b)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.content_type == ContentType::Recall as i32)
        .count();
    assert_eq!(recalls_in_b, 1);

    // A newer conversation comes first; paging by time.
    after_ms(m3_in_b.send_time_ms).await;
    let c1 = client.send(&carol, b.user, "c1", "hello").await.unwrap();
    wait_entry(&client, &b, |m| m.message_id == c1.message_id).await;
    let v = view(&client, &b, 0, 0).await;
    let order: Vec<u64> = v.conversations.iter().map(|c| c.conversation_id).collect();
    assert_eq!(order, vec![carol.user.0, a.user.0]);
    let first = view(&client, &b, 1, 0).await;
    assert_eq!((first.conversations.len(), first.has_more), (1, true));
    let t = first.conversations[0].last_message.as_ref().unwrap().send_time_ms;
    let rest = view(&client, &b, 1, t).await;
    assert_eq!(rest.conversations.iter().map(|c| c.conversation_id).collect::<Vec<_>>(), vec![a.user.0]);
    assert!(!rest.has_more);

    // MarkRead with a receipt: the position moves, the peer gets one receipt.
    let read = ReadInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: a.user.0,
        read_seq: m3_in_b.seq,
        receipt_message_id: m3.message_id,
    };
    assert_eq!(mark_read(&client, &b, read).await, m3_in_b.seq);
    // The same READ again through a gateway: no second receipt, no move back.
    let again = ConnReadRequest { conn: conn(&b), input: Some(ReadInput { read_seq: 1, ..read }) };
    let out = gateway(&c, 3).mark_read(with_secret(again)).await.unwrap().into_inner();
    assert_eq!(out.read_seq, m3_in_b.seq, "read positions only move forward");
    let v = view(&client, &b, 0, 0).await;
    let with_a = line(&v, ConversationKind::User, a.user.0).unwrap();
    assert_eq!((with_a.unread_count, with_a.read_seq), (0, m3_in_b.seq));
    assert_eq!(line(&v, ConversationKind::User, carol.user.0).unwrap().unread_count, 1);
    let receipt = wait_entry(&client, &a, |m| m.content_type == ContentType::ReadReceipt as i32).await;
    assert_eq!((receipt.sender_user_id, receipt.refers_to), (b.user.0, m3.message_id));
    // A later marker from b proves no second receipt is on its way.
    let marker = client.send(&b, a.user, "marker", "x").await.unwrap();
    let list = eventually(WAIT, "b's marker in a's list", || async {
        let l = client.sync_all(&a).await.unwrap();
        l.iter().any(|m| m.message_id == marker.message_id).then_some(l)
    })
    .await;
    assert_eq!(list.iter().filter(|m| m.content_type == ContentType::ReadReceipt as i32).count(), 1);
    let v = view(&client, &a, 0, 0).await;
    let with_b = line(&v, ConversationKind::User, b.user.0).unwrap();
    assert_eq!(with_b.last_message.as_ref().unwrap().message_id, marker.message_id);
    assert_eq!(with_b.unread_count, 1, "b's marker; a's own messages and receipts do not count");

    // System line: a friend request; read by its own-list seq.
    let req = SendFriendRequestRequest { friend_id: b.user.0, ..Default::default() };
    FriendServiceClient::new(client.channel.clone())
        .send_friend_request(Client::authed(&carol, req))
        .await
        .unwrap();
    let n = wait_entry(&client, &b, |m| m.conversation_kind == ConversationKind::System as i32).await;
    let v = view(&client, &b, 0, 0).await;
    assert_eq!(line(&v, ConversationKind::System, 0).unwrap().unread_count, 1);
    let read = ReadInput {
        conversation_kind: ConversationKind::System as i32,
        read_seq: n.seq,
        ..Default::default()
    };
    assert_eq!(mark_read(&client, &b, read).await, n.seq);
    assert_eq!(line(&view(&client, &b, 0, 0).await, ConversationKind::System, 0).unwrap().unread_count, 0);

    // Group recall through the gateway, by group seq; others' messages are not the caller's to recall.
    let create = CreateGroupRequest { member_ids: vec![b.user.0], ..Default::default() };
    let mut groups = GroupServiceClient::new(client.channel.clone());
    let g =
        groups.create_group(Client::authed(&a, create)).await.unwrap().into_inner().group.unwrap().group_id;
    let input = SendInput {
        conversation_kind: ConversationKind::Group as i32,
        conversation_id: g,
        client_msg_id: "gm".into(),
        content_type: ContentType::Text as i32,
        content: b"group".to_vec().into(),
        ..Default::default()
    };
    let gm = messages(&client).send_group_message(Client::authed(&b, input)).await.unwrap().into_inner();
    let input = RecallInput {
        conversation_kind: ConversationKind::Group as i32,
        conversation_id: g,
        message_id: gm.message_id,
        client_msg_id: "gr".into(),
        seq: gm.group_seq,
    };
    // Not a member: not carol's to recall.
    let mut req = ConnRecallRequest { conn: conn(&carol), input: Some(input) };
    let err = gateway(&c, 2).recall(with_secret(req.clone())).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    req.conn = conn(&b);
    let r = gateway(&c, 2).recall(with_secret(req)).await.unwrap().into_inner();
    assert!(r.group_seq > gm.group_seq);
    let gone =
        wait_entry(&client, &a, |m| m.content_type == ContentType::Recall as i32 && m.conversation_id == g)
            .await;
    assert_eq!(gone.refers_to, gm.message_id);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_view_and_sign_in_cover_super_groups() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (a, b) = users_on_two_shards(&c, &client, "sg").await;
    let mut groups = GroupServiceClient::new(client.channel.clone());
    let create = CreateGroupRequest {
        kind: GroupKind::Super as i32,
        member_ids: vec![b.user.0],
        ..Default::default()
    };
    let g = groups.create_group(Client::authed(&a, create)).await.unwrap().into_inner().group.unwrap();
    assert_eq!((g.kind(), g.last_group_seq), (GroupKind::Super, 1), "the creation notice is entry 1");
    let gid = g.group_id;
    let mut last = None;
    for i in 0..3 {
        let input = SendInput {
            conversation_kind: ConversationKind::SuperGroup as i32,
            conversation_id: gid,
            client_msg_id: format!("s{i}"),
            content_type: ContentType::Text as i32,
            content: b"hi all".to_vec().into(),
            ..Default::default()
        };
        last =
            Some(messages(&client).send_group_message(Client::authed(&a, input)).await.unwrap().into_inner());
    }
    let last = last.unwrap();

    // b's own list of groups learns the group through the relay.
    let v = eventually(WAIT, "the super group in b's conversation view", || async {
        let v = view(&client, &b, 0, 0).await;
        line(&v, ConversationKind::SuperGroup, gid).is_some().then_some(v)
    })
    .await;
    let l = line(&v, ConversationKind::SuperGroup, gid).unwrap();
    assert_eq!(l.unread_count, 4, "creation notice and three messages: {l:?}");
    assert_eq!(l.last_message.as_ref().unwrap().message_id, last.message_id);
    assert!(line(&v, ConversationKind::Group, gid).is_none(), "one line per group");
    let mine = view(&client, &a, 0, 0).await;
    assert_eq!(line(&mine, ConversationKind::SuperGroup, gid).unwrap().unread_count, 0, "own messages");

    let read = ReadInput {
        conversation_kind: ConversationKind::SuperGroup as i32,
        conversation_id: gid,
        read_seq: last.group_seq - 1,
        receipt_message_id: 0,
    };
    assert_eq!(mark_read(&client, &b, read).await, last.group_seq - 1);
    let l = view(&client, &b, 0, 0).await;
    let l = line(&l, ConversationKind::SuperGroup, gid).unwrap().clone();
    assert_eq!((l.unread_count, l.read_seq), (1, last.group_seq - 1));

    // A gateway sign-in lists the super group with its head and join point.
    let sign_in = ConnSignInRequest {
        conn: conn(&b),
        input: Some(SignInInput { user_id: b.user.0, device_id: b.device.0, token: b.token.clone() }),
    };
    let out = gateway(&c, 2).conn_sign_in(with_secret(sign_in)).await.unwrap().into_inner().output.unwrap();
    assert_eq!(
        out.super_groups,
        vec![GroupHead { group_id: gid, last_group_seq: last.group_seq, joined_group_seq: 0 }]
    );

    // A small group's line counts its entries in the own list.
    let create = CreateGroupRequest { member_ids: vec![b.user.0], ..Default::default() };
    let small = groups.create_group(Client::authed(&a, create)).await.unwrap().into_inner().group.unwrap();
    assert_eq!(small.last_group_seq, 0, "small groups report no group seq");
    let input = SendInput {
        conversation_kind: ConversationKind::Group as i32,
        conversation_id: small.group_id,
        client_msg_id: "small".into(),
        content_type: ContentType::Text as i32,
        content: b"x".to_vec().into(),
        ..Default::default()
    };
    let sent = messages(&client).send_group_message(Client::authed(&a, input)).await.unwrap().into_inner();
    wait_entry(&client, &b, |m| m.message_id == sent.message_id).await;
    let v = view(&client, &b, 0, 0).await;
    let l = line(&v, ConversationKind::Group, small.group_id).unwrap();
    assert_eq!(l.unread_count, 2, "creation notice and one message");
    assert_eq!(v.conversations[0].conversation_id, small.group_id, "newest first");
    c.shutdown().await;
}
