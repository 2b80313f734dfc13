//! Real-process super-group test (issue 6): a super group of 10,000 members,
//! 1,000 of them online on connections spread over 2 gateways. One message
//! reaches every online member once; an offline member syncs it; a member
//! who joins later does not see earlier history.
//!
//! Users are made by phone sign-in with the nodes' development code (no
//! password hashing), group membership in batches of 1,000.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rim_proto::ids::{GroupId, UserId};
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::{AddGroupMembersRequest, Command, ContentType, GroupKind, SubscribeRoomInput};
use support::*;

const MEMBERS: usize = 10_000;
const ONLINE: usize = 1_000;

/// Signs in `n` users by phone, `concurrency` at a time.
async fn many_users(client: &Client, n: usize, concurrency: usize) -> Vec<Session> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, sem) = (client.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            client.phone_sign_in(&format!("+4470{i:08}")).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("sign-in task"));
    }
    out
}

async fn add_members(client: &Client, owner: &Session, group: GroupId, ids: &[UserId]) {
    for chunk in ids.chunks(1_000) {
        retry(Duration::from_secs(60), "add_group_members", || {
            let mut g = GroupServiceClient::new(client.channel.clone());
            let user_ids = chunk.iter().map(|u| u.0).collect();
            let req = Client::authed(owner, AddGroupMembersRequest { group_id: group.0, user_ids });
            async move { g.add_group_members(req).await.map(|r| r.into_inner()) }
        })
        .await;
    }
}

/// Text messages of `group` in a list.
fn texts_of(list: &[rim_proto::v1::Message], group: GroupId) -> Vec<(u64, String)> {
    list.iter()
        .filter(|m| m.conversation_id == group.0 && m.content_type == ContentType::Text as i32)
        .map(|m| (m.message_id, m.client_msg_id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn super_group_of_ten_thousand_reaches_every_online_member_once() {
    let _g = serial().await;
    let t0 = Instant::now();
    let c = ProcCluster::start(3, 4).await;
    let seeds = c.internal_addrs();
    let gateways = [GatewayProc::start("gw-a", &seeds).await, GatewayProc::start("gw-b", &seeds).await];
    let api = c.client(1);

    let users = many_users(&api, MEMBERS + 1, 32).await;
    let (members, late) = users.split_at(MEMBERS);
    let late = &late[0];
    eprintln!("{} users signed in ({:?})", users.len(), t0.elapsed());
    let owner = &members[0];
    let first: Vec<UserId> = members[1..1_000].iter().map(|s| s.user).collect();
    let group = api.create_group(owner, GroupKind::Super, &first).await;
    let gid = GroupId(group.group_id);
    assert_eq!(group.kind, GroupKind::Super as i32);
    let rest: Vec<UserId> = members[1_000..].iter().map(|s| s.user).collect();
    add_members(&api, owner, gid, &rest).await;
    eprintln!("super group {gid} has {MEMBERS} members ({:?})", t0.elapsed());

    // 1,000 members online, half on each gateway, each subscribed to the group.
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::with_capacity(ONLINE);
    for (i, s) in members[..ONLINE].iter().enumerate() {
        let (s, sem, gw) = (s.clone(), sem.clone(), gateways[i % 2].tcp.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let (mut conn, out) = Conn::sign_in(&gw, &s).await;
            let head = out.super_groups.iter().find(|h| h.group_id == gid.0);
            assert!(
                head.is_some(),
                "user {}'s sign-in lists super group {gid}: {:?}",
                s.user,
                out.super_groups
            );
            let sub = SubscribeRoomInput { room_id: gid.0, after_seq: head.map_or(0, |h| h.last_group_seq) };
            conn.call(Command::SubscribeRoom, &sub)
                .await
                .unwrap_or_else(|r| panic!("subscribe {}: {r:?}", s.user));
            conn
        }));
    }
    let mut conns = Vec::with_capacity(ONLINE);
    for t in tasks {
        conns.push(t.await.expect("connect task"));
    }
    // Connections idle for 3 heartbeat intervals are closed: beat once now.
    for conn in conns.iter_mut() {
        conn.call(Command::Heartbeat, &()).await.expect("heartbeat");
    }
    eprintln!("{ONLINE} members online and subscribed ({:?})", t0.elapsed());

    // Two messages; every online member gets exactly [m1, m2] (the second
    // arriving after the first on each connection rules out a late duplicate
    // of the first).
    let sender = &members[1];
    let m1 =
        retry(Duration::from_secs(30), "send m1", || api.send_group(sender, gid, "sg-1", "hello all")).await;
    let m2 =
        retry(Duration::from_secs(30), "send m2", || api.send_group(sender, gid, "sg-2", "second")).await;
    assert!(m1.group_seq > 0 && m2.group_seq > m1.group_seq, "group seqs {m1:?} {m2:?}");
    let want = vec![(m1.message_id, "sg-1".to_string()), (m2.message_id, "sg-2".to_string())];
    let t_send = Instant::now();
    for (i, conn) in conns.iter_mut().enumerate() {
        let msgs = conn.messages_until(Duration::from_secs(30), |m| texts_of(m, gid).len() >= 2).await;
        assert_eq!(texts_of(&msgs, gid), want, "online member #{i} (user {})", members[i].user);
        for m in msgs.iter().filter(|m| m.conversation_id == gid.0) {
            assert_eq!(m.seq, m.group_seq, "pushes of a super group carry the group seq");
        }
    }
    eprintln!("every online member got both messages within {:?} ({:?})", t_send.elapsed(), t0.elapsed());

    // An offline member syncs them; the group stored each once.
    let offline = &members[MEMBERS - 1];
    let list = retry(Duration::from_secs(30), "sync offline", || api.sync_group_all(offline, gid)).await;
    assert_eq!(texts_of(&list, gid), want, "offline member's sync of the group");
    let seqs: Vec<u64> = list.iter().map(|m| m.group_seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gap-free group seqs: {seqs:?}");

    // A member who joins later sees nothing from before the join.
    add_members(&api, owner, gid, &[late.user]).await;
    let list = retry(Duration::from_secs(30), "sync late joiner", || api.sync_group_all(late, gid)).await;
    assert!(texts_of(&list, gid).is_empty(), "late joiner sees earlier history: {:?}", texts_of(&list, gid));
    assert!(list.iter().all(|m| m.group_seq > m2.group_seq), "late joiner's entries: {list:?}");
    let m3 = retry(Duration::from_secs(30), "send m3", || api.send_group(sender, gid, "sg-3", "third")).await;
    let list = retry(Duration::from_secs(30), "sync late joiner", || api.sync_group_all(late, gid)).await;
    assert_eq!(texts_of(&list, gid), vec![(m3.message_id, "sg-3".to_string())], "late joiner after m3");
    eprintln!("super_group_of_ten_thousand_reaches_every_online_member_once: {:?}", t0.elapsed());
}
