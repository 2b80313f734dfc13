//! Friends and groups through the client API: 3 nodes, 4 shards, users on
//! different shards, notifications in every list.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::ShardId;
use rim_proto::store::{self, notification::Event};
use rim_proto::v1::friend_service_client::FriendServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

fn friends(c: &Client) -> FriendServiceClient<tonic::transport::Channel> {
    FriendServiceClient::new(c.channel.clone())
}

fn groups(c: &Client) -> GroupServiceClient<tonic::transport::Channel> {
    GroupServiceClient::new(c.channel.clone())
}

async fn list_friends(c: &Client, s: &Session, pending: bool) -> BTreeMap<u64, Friend> {
    let r = friends(c)
        .list_friends(Client::authed(s, ListFriendsRequest { include_pending: pending }))
        .await
        .unwrap()
        .into_inner();
    r.friends.into_iter().map(|f| (f.friend_id, f)).collect()
}

/// Waits until `s`'s side of the relation with `other` has `status`
/// (UNSPECIFIED: no relation).
async fn wait_status(c: &Client, s: &Session, other: u64, status: FriendStatus) -> Option<Friend> {
    eventually(WAIT, &format!("status {status:?} of user {} with {other}", s.user), || async {
        let f = list_friends(c, s, true).await.remove(&other);
        let now = f.as_ref().map_or(FriendStatus::Unspecified, |f| f.status());
        (now == status).then_some(f)
    })
    .await
}

/// `(actor, friend, action)` of the friend notifications in a list.
fn friend_events(list: &[Message]) -> Vec<(u64, u64, store::FriendAction)> {
    list.iter()
        .filter(|m| {
            m.content_type == ContentType::Notification as i32
                && m.conversation_kind == ConversationKind::System as i32
        })
        .filter_map(|m| store::Notification::decode(m.content.as_ref()).ok())
        .filter_map(|n| match n.event {
            Some(Event::FriendChanged(f)) => Some((f.user_id, f.friend_id, f.action())),
            _ => None,
        })
        .collect()
}

/// Registers `{prefix}{i}` until every one of `shards` shards holds at least
/// `per_shard` of them; returns them signed in, ordered by shard then id.
async fn users_on_every_shard(
    c: &Cluster,
    client: &Client,
    prefix: &str,
    shards: u32,
    per_shard: usize,
) -> Vec<Session> {
    let mut by_shard: BTreeMap<ShardId, Vec<String>> = BTreeMap::new();
    for i in 0..200 {
        if by_shard.len() == shards as usize && by_shard.values().all(|v| v.len() >= per_shard) {
            break;
        }
        let name = format!("{prefix}{i}");
        let id = client.register(&name).await;
        let names = by_shard.entry(c.shard_of_user(id)).or_default();
        if names.len() < per_shard {
            names.push(name);
        }
    }
    assert_eq!(by_shard.len(), shards as usize, "users on every shard");
    let mut out = Vec::new();
    for names in by_shard.values() {
        for n in names {
            out.push(client.sign_in(n).await);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_request_accept_remark_delete_reject_and_cross_across_shards() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (a, b) = users_on_two_shards(&c, &client, "fr").await;
    let other = c.client(2);

    // Request: the asker's side at once, the other side through the relay.
    let req = SendFriendRequestRequest {
        friend_id: b.user.0,
        remarks: "bob".into(),
        description: "hi, it's a".into(),
    };
    let f = friends(&client).send_friend_request(Client::authed(&a, req)).await.unwrap().into_inner();
    let f = f.friend.unwrap();
    assert_eq!((f.friend_id, f.status(), f.remarks.as_str()), (b.user.0, FriendStatus::RequestSent, "bob"));
    assert_eq!(f.profile.unwrap().user_id, b.user.0);
    let got = wait_status(&other, &b, a.user.0, FriendStatus::RequestReceived).await.unwrap();
    assert_eq!(got.description, "hi, it's a");
    assert!(list_friends(&other, &b, false).await.is_empty(), "pending requests only when asked for");

    // Accept: both sides become friends.
    let acc = AcceptFriendRequestRequest { friend_id: a.user.0, remarks: "alice".into() };
    let f = friends(&other).accept_friend_request(Client::authed(&b, acc)).await.unwrap().into_inner();
    assert_eq!(f.friend.unwrap().status(), FriendStatus::Accepted);
    let got = wait_status(&client, &a, b.user.0, FriendStatus::Accepted).await.unwrap();
    assert_eq!(got.remarks, "bob");
    let listed = list_friends(&client, &a, false).await;
    assert_eq!(listed.keys().copied().collect::<Vec<_>>(), vec![b.user.0]);
    assert!(listed[&b.user.0].profile.as_ref().unwrap().username.starts_with("frb"), "profiles are filled");

    // Remarks and extra of the caller's side only.
    let set = SetFriendRequest {
        friend_id: b.user.0,
        remarks: Some("bobby".into()),
        extra: Some(b"x".to_vec().into()),
    };
    let f = friends(&client).set_friend(Client::authed(&a, set)).await.unwrap().into_inner().friend.unwrap();
    assert_eq!(
        (f.remarks.as_str(), f.extra.as_ref(), f.status()),
        ("bobby", &b"x"[..], FriendStatus::Accepted)
    );
    assert_eq!(list_friends(&other, &b, false).await[&a.user.0].remarks, "alice");

    // Every change is a SYSTEM notification in both lists, once each.
    use store::FriendAction as A;
    let want = vec![(a.user.0, b.user.0, A::Request), (b.user.0, a.user.0, A::Accept)];
    for s in [&a, &b] {
        let events = eventually(WAIT, &format!("2 friend notifications for user {}", s.user), || async {
            Some(friend_events(&client.sync_all(s).await.unwrap())).filter(|e| e.len() >= 2)
        })
        .await;
        assert_eq!(events, want, "notifications of user {}", s.user);
    }

    // Delete ends both sides.
    let del = DeleteFriendRequest { friend_id: a.user.0 };
    friends(&other).delete_friend(Client::authed(&b, del)).await.unwrap();
    wait_status(&client, &a, b.user.0, FriendStatus::Unspecified).await;
    assert!(list_friends(&other, &b, true).await.is_empty());
    let events = eventually(WAIT, "3 friend notifications for a", || async {
        Some(friend_events(&client.sync_all(&a).await.unwrap())).filter(|e| e.len() >= 3)
    })
    .await;
    assert_eq!(events[2], (b.user.0, a.user.0, A::Delete));
    let set = SetFriendRequest { friend_id: b.user.0, remarks: Some("gone".into()), extra: None };
    let err = friends(&client).set_friend(Client::authed(&a, set)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotFriend);

    // Reject: the asker's pending request disappears.
    let req = SendFriendRequestRequest { friend_id: a.user.0, ..Default::default() };
    friends(&other).send_friend_request(Client::authed(&b, req)).await.unwrap();
    wait_status(&client, &a, b.user.0, FriendStatus::RequestReceived).await;
    friends(&client)
        .reject_friend_request(Client::authed(&a, RejectFriendRequestRequest { friend_id: b.user.0 }))
        .await
        .unwrap();
    wait_status(&other, &b, a.user.0, FriendStatus::Unspecified).await;
    assert!(list_friends(&client, &a, true).await.is_empty());

    // Crossing requests end as friends on both sides.
    let (mut fa, mut fb) = (friends(&client), friends(&other));
    let to_b = SendFriendRequestRequest { friend_id: b.user.0, ..Default::default() };
    let to_a = SendFriendRequestRequest { friend_id: a.user.0, ..Default::default() };
    let (ra, rb) = tokio::join!(
        fa.send_friend_request(Client::authed(&a, to_b)),
        fb.send_friend_request(Client::authed(&b, to_a)),
    );
    ra.unwrap();
    rb.unwrap();
    wait_status(&client, &a, b.user.0, FriendStatus::Accepted).await;
    wait_status(&other, &b, a.user.0, FriendStatus::Accepted).await;

    // Refusals.
    let err = friends(&client)
        .accept_friend_request(Client::authed(
            &a,
            AcceptFriendRequestRequest { friend_id: 999_999, ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotFriend);
    let err = friends(&client)
        .send_friend_request(Client::authed(
            &a,
            SendFriendRequestRequest { friend_id: 999_999, ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorUserNotFound);
    let err = friends(&client)
        .send_friend_request(Client::authed(
            &a,
            SendFriendRequestRequest { friend_id: a.user.0, ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest);
    let err =
        friends(&client).list_friends(tonic::Request::new(ListFriendsRequest::default())).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorUnauthenticated);
    c.shutdown().await;
}

async fn group_send(c: &Client, s: &Session, g: u64, cmid: &str) -> Result<SendOutput, tonic::Status> {
    let input = SendInput {
        conversation_kind: ConversationKind::Group as i32,
        conversation_id: g,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: cmid.as_bytes().to_vec().into(),
        ..Default::default()
    };
    MessageServiceClient::new(c.channel.clone())
        .send_group_message(Client::authed(s, input))
        .await
        .map(|r| r.into_inner())
}

/// The group's text messages in `s`'s list, as client_msg_ids in list order.
async fn group_texts(c: &Client, s: &Session, g: u64) -> Vec<String> {
    c.sync_all(s)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.conversation_id == g && m.content_type == ContentType::Text as i32)
        .map(|m| m.client_msg_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_reach_every_member_once_in_one_order_and_roles_are_enforced() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let via2 = c.client(2);
    let users = users_on_every_shard(&c, &client, "gm", 4, 2).await;
    let (owner, members, outsider) = (&users[0], &users[1..7], &users[7]);

    let create = CreateGroupRequest {
        name: "team".into(),
        member_ids: members.iter().map(|m| m.user.0).collect(),
        ..Default::default()
    };
    let g = groups(&client)
        .create_group(Client::authed(owner, create))
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    assert_eq!((g.kind(), g.member_count, g.owner_id), (GroupKind::Small, 7, owner.user.0));
    let gid = g.group_id;

    // Several senders through two nodes, concurrently.
    let senders: Vec<&Session> = vec![owner, &members[0], &members[3], &members[5]];
    let sends = senders.iter().enumerate().map(|(i, s)| {
        let via = if i % 2 == 0 { &client } else { &via2 };
        async move {
            for j in 0..4 {
                group_send(via, s, gid, &format!("g{i}-{j}")).await.unwrap();
            }
        }
    });
    futures::future::join_all(sends).await;
    let everyone: Vec<&Session> = std::iter::once(owner).chain(members.iter()).collect();
    let mut orders = BTreeSet::new();
    for s in &everyone {
        let list = eventually(WAIT, &format!("16 group messages for user {}", s.user), || async {
            Some(group_texts(&client, s, gid).await).filter(|l| l.len() >= 16)
        })
        .await;
        let unique: BTreeSet<&String> = list.iter().collect();
        assert_eq!((list.len(), unique.len()), (16, 16), "each message once for user {}", s.user);
        for i in 0..4 {
            let mine: Vec<&String> = list.iter().filter(|m| m.starts_with(&format!("g{i}-"))).collect();
            let want: Vec<String> = (0..4).map(|j| format!("g{i}-{j}")).collect();
            assert_eq!(mine, want.iter().collect::<Vec<_>>(), "sender order for user {}", s.user);
        }
        orders.insert(list);
    }
    assert_eq!(orders.len(), 1, "every member sees the group's messages in the same order");

    // Permissions.
    let err = group_send(&client, outsider, gid, "intruder").await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotGroupMember);
    let err = groups(&client)
        .get_group(Client::authed(outsider, GetGroupRequest { group_id: gid }))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotGroupMember);
    let m0 = &members[0];
    let add = AddGroupMembersRequest { group_id: gid, user_ids: vec![outsider.user.0] };
    let err = groups(&client).add_group_members(Client::authed(m0, add)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    let rm = RemoveGroupMembersRequest { group_id: gid, user_ids: vec![members[1].user.0] };
    let err = groups(&client).remove_group_members(Client::authed(m0, rm)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    let up = UpdateGroupRequest { group_id: gid, name: Some("mine".into()), ..Default::default() };
    let err = groups(&client).update_group(Client::authed(m0, up)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    let up = UpdateGroupRequest { group_id: gid, name: Some("team 2".into()), ..Default::default() };
    let g =
        groups(&client).update_group(Client::authed(owner, up)).await.unwrap().into_inner().group.unwrap();
    assert_eq!(g.name, "team 2");

    // A removed member stops getting messages; added back, it gets them again.
    let gone = &members[1];
    let rm = RemoveGroupMembersRequest { group_id: gid, user_ids: vec![gone.user.0, outsider.user.0] };
    let removed = groups(&client).remove_group_members(Client::authed(owner, rm)).await.unwrap().into_inner();
    assert_eq!(removed.removed_user_ids, vec![gone.user.0]);
    group_send(&client, owner, gid, "after-remove").await.unwrap();
    let add = AddGroupMembersRequest { group_id: gid, user_ids: vec![gone.user.0, members[2].user.0] };
    let added = groups(&client).add_group_members(Client::authed(owner, add)).await.unwrap().into_inner();
    assert_eq!(added.added_user_ids, vec![gone.user.0]);
    group_send(&client, owner, gid, "after-readd").await.unwrap();
    let list = eventually(WAIT, "\"after-readd\" for the re-added member", || async {
        Some(group_texts(&client, gone, gid).await)
            .filter(|l| l.last().map(String::as_str) == Some("after-readd"))
    })
    .await;
    assert!(!list.iter().any(|m| m == "after-remove"), "a removed member got a message: {list:?}");
    assert!(group_texts(&client, &members[2], gid).await.contains(&"after-remove".to_string()));

    // The owner cannot leave before transferring; after it, it can.
    let err = groups(&client)
        .leave_group(Client::authed(owner, LeaveGroupRequest { group_id: gid }))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    let t = TransferGroupRequest { group_id: gid, new_owner_id: m0.user.0 };
    let err = groups(&client).transfer_group(Client::authed(&members[2], t)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    groups(&client).transfer_group(Client::authed(owner, t)).await.unwrap();
    let got = groups(&via2)
        .get_group(Client::authed(owner, GetGroupRequest { group_id: gid }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group.unwrap().owner_id, m0.user.0);
    assert_eq!(got.me.unwrap().role(), MemberRole::Admin, "the old owner stays as an admin");
    groups(&client).leave_group(Client::authed(owner, LeaveGroupRequest { group_id: gid })).await.unwrap();
    let err = groups(&client)
        .get_group(Client::authed(owner, GetGroupRequest { group_id: gid }))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotGroupMember);
    let err = group_send(&client, owner, gid, "left").await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotGroupMember);
    let got = groups(&client)
        .get_group(Client::authed(m0, GetGroupRequest { group_id: gid }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.me.unwrap().role(), MemberRole::Owner);
    assert_eq!(got.group.unwrap().member_count, 6);

    // The members' own lists of groups follow (through the relay).
    for s in [m0, &members[5]] {
        eventually(WAIT, &format!("group {gid} in the groups of user {}", s.user), || async {
            let r = groups(&client)
                .list_my_groups(Client::authed(s, ListMyGroupsRequest {}))
                .await
                .unwrap()
                .into_inner();
            r.groups.iter().any(|x| x.group_id == gid && x.name == "team 2").then_some(())
        })
        .await;
    }
    let mine = groups(&client)
        .list_my_groups(Client::authed(owner, ListMyGroupsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!mine.groups.iter().any(|x| x.group_id == gid), "the owner left");

    // Roles: only the owner sets them; an admin may then add members.
    let set = SetGroupMemberRequest {
        group_id: gid,
        user_id: members[3].user.0,
        role: MemberRole::Admin as i32,
        ..Default::default()
    };
    let err = groups(&client).set_group_member(Client::authed(&members[5], set.clone())).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    let m =
        groups(&client).set_group_member(Client::authed(m0, set)).await.unwrap().into_inner().member.unwrap();
    assert_eq!(m.role(), MemberRole::Admin);
    let add = AddGroupMembersRequest { group_id: gid, user_ids: vec![outsider.user.0] };
    let added =
        groups(&client).add_group_members(Client::authed(&members[3], add)).await.unwrap().into_inner();
    assert_eq!(added.added_user_ids, vec![outsider.user.0]);
    let nick = SetGroupMemberRequest {
        group_id: gid,
        user_id: members[5].user.0,
        nickname: Some("five".into()),
        ..Default::default()
    };
    let m = groups(&client)
        .set_group_member(Client::authed(&members[5], nick))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(m.nickname, "five");

    // Dissolved: no more messages.
    let err = groups(&client)
        .dissolve_group(Client::authed(&members[3], DissolveGroupRequest { group_id: gid }))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    groups(&client).dissolve_group(Client::authed(m0, DissolveGroupRequest { group_id: gid })).await.unwrap();
    let err = group_send(&client, m0, gid, "late").await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorGroupNotFound);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_are_listed_in_pages_by_user_id() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let users = users_on_every_shard(&c, &client, "pg", 4, 3).await;
    let owner = &users[0];
    let ids: Vec<u64> = users[1..].iter().map(|s| s.user.0).collect();
    let create = CreateGroupRequest { name: "paged".into(), member_ids: ids.clone(), ..Default::default() };
    let gid = groups(&client)
        .create_group(Client::authed(owner, create))
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap()
        .group_id;

    let mut all: Vec<u64> = users.iter().map(|s| s.user.0).collect();
    all.sort_unstable();
    let (mut after, mut seen, mut pages) = (0, Vec::new(), 0);
    loop {
        let req = ListGroupMembersRequest {
            group_id: gid,
            after_user_id: after,
            limit: 5,
            with_profiles: pages == 0,
        };
        let r =
            groups(&client).list_group_members(Client::authed(&users[3], req)).await.unwrap().into_inner();
        assert!(r.members.len() <= 5);
        if pages == 0 {
            assert!(r.members.iter().all(|m| m.profile.as_ref().is_some_and(|p| p.user_id == m.user_id)));
        } else {
            assert!(r.members.iter().all(|m| m.profile.is_none()));
        }
        seen.extend(r.members.iter().map(|m| m.user_id));
        pages += 1;
        if !r.has_more {
            break;
        }
        after = r.members.last().unwrap().user_id;
        assert!(pages < 10);
    }
    assert_eq!(seen, all, "every member once, by user id");
    assert_eq!(pages, all.len().div_ceil(5));

    // Default page, and the cap.
    let req = ListGroupMembersRequest { group_id: gid, limit: 0, ..Default::default() };
    let r = groups(&client).list_group_members(Client::authed(owner, req)).await.unwrap().into_inner();
    assert_eq!((r.members.len(), r.has_more), (all.len(), false));

    // Members only.
    let name = "pg-outsider";
    client.register(name).await;
    let outsider = client.sign_in(name).await;
    let req = ListGroupMembersRequest { group_id: gid, ..Default::default() };
    let err = groups(&client).list_group_members(Client::authed(&outsider, req)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorNotGroupMember);
    let req = ListGroupMembersRequest { group_id: 424_242, ..Default::default() };
    let err = groups(&client).list_group_members(Client::authed(owner, req)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorGroupNotFound);
    // Unknown users cannot be added or made members.
    let create = CreateGroupRequest { member_ids: vec![999_999], ..Default::default() };
    let err = groups(&client).create_group(Client::authed(owner, create)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorUserNotFound);
    c.shutdown().await;
}
