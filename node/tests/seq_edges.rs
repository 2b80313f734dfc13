//! Reads by seq at the edges through a node's client API: 3 nodes, 2 shards.
//!
//! Found by a black-box client: `Sync(after_seq = 2^64-1)` returned the
//! caller's whole list from seq 1, and `SyncGroup(after_group_seq = 2^64-1)`
//! by a member who joined a super group late returned the group's history
//! from before the member's join point (`Seq::next` wrapped to 0 in release
//! builds; debug builds panicked). Both must read nothing.
//!
//! The conversation view reads a super group by the caller's read position,
//! which is the client's number: a position of 2^64-1 must count nothing
//! unread (`lower + 1` overflowed: a panic in debug builds, a wrong count
//! in release builds).

use rim_node::service::conversation::GROUP_SCAN;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

const LAST: u64 = u64::MAX;

fn messages(c: &Client) -> MessageServiceClient<tonic::transport::Channel> {
    MessageServiceClient::new(c.channel.clone())
}

async fn user(client: &Client, name: &str) -> Session {
    client.register(name).await;
    client.sign_in(name).await
}

async fn sync(c: &Client, s: &Session, after_seq: u64) -> SyncOutput {
    let input = SyncInput { after_seq, limit: 100 };
    let reply = messages(c).sync(Client::authed(s, input)).await;
    reply.unwrap_or_else(|e| panic!("sync after {after_seq}: {e:?}")).into_inner()
}

async fn sync_group(c: &Client, s: &Session, group_id: u64, after_group_seq: u64) -> SyncGroupOutput {
    let input = SyncGroupInput { group_id, after_group_seq, limit: 100 };
    let reply = messages(c).sync_group(Client::authed(s, input)).await;
    reply.unwrap_or_else(|e| panic!("sync group {group_id} after {after_group_seq}: {e:?}")).into_inner()
}

async fn create_group(c: &Client, owner: &Session, kind: GroupKind, members: &[&Session]) -> u64 {
    let create = CreateGroupRequest {
        kind: kind as i32,
        name: "edges".into(),
        member_ids: members.iter().map(|m| m.user.0).collect(),
        ..Default::default()
    };
    let reply = GroupServiceClient::new(c.channel.clone()).create_group(Client::authed(owner, create)).await;
    reply.unwrap().into_inner().group.unwrap().group_id
}

async fn group_send(c: &Client, s: &Session, g: u64, text: impl Into<String>) {
    let text = text.into();
    let input = SendInput {
        conversation_kind: ConversationKind::SuperGroup as i32,
        conversation_id: g,
        client_msg_id: text.clone(),
        content_type: ContentType::Text as i32,
        content: text.into_bytes().into(),
        ..Default::default()
    };
    messages(c).send_group_message(Client::authed(s, input)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_last_seq_return_nothing() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let client = c.client(1);
    let (alice, bob, carol) =
        (user(&client, "edge-a").await, user(&client, "edge-b").await, user(&client, "edge-c").await);

    // Sync: alice's own list, read after 0, its head, head + 1 and 2^64-1.
    for i in 0..3 {
        client.send(&alice, bob.user, &format!("dm{i}"), "hi").await.unwrap();
    }
    let all = sync(&client, &alice, 0).await;
    let head = all.last_seq;
    assert!(head >= 3 && !all.has_more, "{all:?}");
    assert_eq!(all.messages.len() as u64, head);
    for after in [head, head + 1, LAST] {
        let out = sync(&client, &alice, after).await;
        assert_eq!(texts(&out.messages), vec![], "sync after {after} reads nothing");
        assert_eq!((out.last_seq, out.has_more), (head, false), "sync after {after}");
    }

    // SyncGroup of a super group by a member who joined late: never the
    // history before the join point, whatever `after_group_seq` says.
    let g = create_group(&client, &alice, GroupKind::Super, &[&bob]).await;
    group_send(&client, &alice, g, "before-join-1").await;
    group_send(&client, &alice, g, "before-join-2").await;
    let add = AddGroupMembersRequest { group_id: g, user_ids: vec![carol.user.0] };
    GroupServiceClient::new(client.channel.clone())
        .add_group_members(Client::authed(&alice, add))
        .await
        .unwrap();
    group_send(&client, &alice, g, "after-join").await;

    let early = sync_group(&client, &bob, g, 0).await;
    let early_texts: Vec<String> = texts(&early.messages).into_iter().map(|(_, t)| t).collect();
    assert_eq!(early_texts, ["before-join-1", "before-join-2", "after-join"], "an early member reads it all");
    let last = early.last_group_seq;
    let joined = sync_group(&client, &carol, g, 0).await;
    let late = texts(&joined.messages);
    assert_eq!(late.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(), ["after-join"]);
    let join_point = joined.messages.first().unwrap().seq - 1;
    for after in [1, join_point] {
        let out = sync_group(&client, &carol, g, after).await;
        assert_eq!(texts(&out.messages), late, "late member after {after}: from the join point");
    }
    for after in [last, last + 1, LAST] {
        let out = sync_group(&client, &carol, g, after).await;
        assert_eq!(out.messages, vec![], "late member after {after} reads nothing");
        assert_eq!((out.last_group_seq, out.has_more), (last, false), "late member after {after}");
        let out = sync_group(&client, &bob, g, after).await;
        assert_eq!(out.messages, vec![], "early member after {after} reads nothing");
    }

    // SyncGroup of a small group.
    let small = create_group(&client, &alice, GroupKind::Small, &[&bob]).await;
    let all = sync_group(&client, &bob, small, 0).await;
    assert!(!all.messages.is_empty(), "the creation notice");
    for after in [all.last_group_seq, all.last_group_seq + 1, LAST] {
        let out = sync_group(&client, &bob, small, after).await;
        assert_eq!(out.messages, vec![], "small group after {after} reads nothing");
        assert_eq!(out.last_group_seq, all.last_group_seq, "small group after {after}");
    }
    c.shutdown().await;
}

async fn unread(c: &Client, s: &Session, g: u64, read_seq: u64) -> Conversation {
    let read = ReadInput {
        conversation_kind: ConversationKind::SuperGroup as i32,
        conversation_id: g,
        read_seq,
        receipt_message_id: 0,
    };
    messages(c).mark_read(Client::authed(s, read)).await.unwrap();
    let view = ListConversationsRequest { limit: 10, before_ms: 0 };
    let reply = messages(c).list_conversations(Client::authed(s, view)).await;
    let reply =
        reply.unwrap_or_else(|e| panic!("conversations after reading {read_seq}: {e:?}")).into_inner();
    let line = reply.conversations.into_iter().find(|l| l.conversation_id == g);
    line.unwrap_or_else(|| panic!("no line for super group {g}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_position_past_a_super_groups_head_counts_nothing_unread() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let client = c.client(1);
    let (alice, bob) = (user(&client, "read-a").await, user(&client, "read-b").await);
    let g = create_group(&client, &alice, GroupKind::Super, &[&bob]).await;
    // More entries than the view scans, so it estimates the rest from seqs.
    let sends: Vec<usize> = (0..=GROUP_SCAN).collect();
    for chunk in sends.chunks(25) {
        let sends = chunk.iter().map(|i| group_send(&client, &alice, g, format!("m{i}")));
        futures::future::join_all(sends).await;
    }
    let last = sync_group(&client, &bob, g, LAST - 1).await.last_group_seq;
    assert!(last > GROUP_SCAN as u64, "{last}");

    let line = unread(&client, &bob, g, 0).await;
    assert!(line.unread_count > GROUP_SCAN as u64, "nothing read: {line:?}");
    for read_seq in [last, last + 1, LAST] {
        let line = unread(&client, &bob, g, read_seq).await;
        assert_eq!((line.unread_count, line.read_seq), (0, read_seq), "read up to {read_seq}");
    }
    c.shutdown().await;
}
