//! State-machine behaviour: seqs, idempotency, delivery dedup, determinism,
//! persistence, snapshots, ack cursors and typed rejections.

mod common;

use common::*;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use rim_proto::ErrorCode;
use rim_proto::store::{self, GroupKind, op::Op as O};
use rim_raft_store::{GroupId, Limits, Seq, UserId};

const A: u64 = 101;
const B: u64 = 202;
const C: u64 = 303;

#[tokio::test]
async fn seqs_are_gap_free_and_ordered_under_many_appends() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    // 600 sends in proposals of varying size, several proposals per apply call.
    let mut k = 0;
    let mut entries = Vec::new();
    for batch in [1usize, 7, 64, 3, 200, 25, 300] {
        let ops = (0..batch)
            .map(|_| {
                k += 1;
                send(A, B, &format!("m{k}"), &format!("hello {k}"))
            })
            .collect();
        entries.push(n.entry(1, 1, ops));
        if entries.len() == 3 {
            n.sm(1).apply(std::mem::take(&mut entries)).await.unwrap();
        }
    }
    n.sm(1).apply(entries).await.unwrap();

    let r = n.reader(1);
    for user in [A, B] {
        let msgs = list(&r, user);
        assert_eq!(msgs.len(), k, "user {user}");
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "seq of entry {i} in list of {user}");
            assert_eq!(m.client_msg_id, format!("m{}", i + 1), "order in list of {user}");
        }
        assert_eq!(r.user_head(UserId(user)).unwrap().last_seq, k as u64);
    }
    let mut ids: Vec<u64> = list(&r, A).iter().map(|m| m.message_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), k, "message ids are unique");
}

#[tokio::test]
async fn retried_send_returns_the_original_result_and_writes_nothing() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let first = sent(&n.apply1(1, send(A, B, "once", "hello")).await);
    let before = n.reader(1).data_digest().unwrap();

    // Same id, even with other content, in its own entry and twice in one entry.
    let again = sent(&n.apply1(1, send(A, B, "once", "different")).await);
    let batch = n.apply(1, vec![send(A, B, "once", "x"), send(A, B, "once", "y")]).await;
    assert_eq!(again, first);
    assert_eq!(sent(&batch[0]), first);
    assert_eq!(sent(&batch[1]), first);
    assert_eq!(n.reader(1).data_digest().unwrap(), before, "a retry must not write");
    assert_eq!(list(&n.reader(1), B).len(), 1);
}

#[tokio::test]
async fn deliver_of_the_same_message_twice_appends_once() {
    // A lives in shard 1, B in shard 2, both in one database.
    let mut n = Node::new(&[1, 2]);
    n.apply1(1, create_user(A)).await;
    n.apply1(2, create_user(B)).await;
    let res = sent(&n.apply1(1, send(A, B, "c1", "hi B")).await);

    let outbox = n.reader(1).outbox(0, 10).unwrap();
    assert_eq!(outbox.len(), 1, "remote recipient goes through the outbox");
    assert_eq!(outbox[0].recipients, vec![B]);
    assert_eq!(outbox[0].message.as_ref().unwrap().message_id, res.message_id);
    assert!(list(&n.reader(2), B).is_empty(), "nothing delivered before the relay runs");

    let deliver = || op(O::Deliver(store::Deliver { items: vec![outbox[0].clone()] }));
    let first = n.apply1(2, deliver()).await;
    let twice = n.apply(2, vec![deliver(), deliver()]).await;
    let later = n.apply1(2, deliver()).await;
    let seqs = |r: &store::OpResult| match &r.value {
        Some(store::op_result::Value::Delivered(d)) => d.seqs.clone(),
        v => panic!("{v:?}"),
    };
    assert_eq!(seqs(&first), vec![1]);
    assert_eq!(seqs(&twice[0]), vec![1]);
    assert_eq!(seqs(&twice[1]), vec![1]);
    assert_eq!(seqs(&later), vec![1]);
    let b_list = list(&n.reader(2), B);
    assert_eq!(b_list.len(), 1);
    assert_eq!(b_list[0].message_id, res.message_id);

    // Unknown recipients are reported, not invented.
    let mut stray = outbox[0].clone();
    stray.recipients = vec![C];
    let r = n.apply1(2, op(O::Deliver(store::Deliver { items: vec![stray] }))).await;
    match r.value {
        Some(store::op_result::Value::Delivered(d)) => assert_eq!(d.missing_users, vec![C]),
        v => panic!("{v:?}"),
    }

    n.apply1(1, op(O::AckOutbox(store::AckOutbox { outbox_ids: vec![outbox[0].outbox_id] }))).await;
    assert!(n.reader(1).outbox(0, 10).unwrap().is_empty());
}

/// A deterministic mix of operations, including rejected ones.
fn workload(seed: u64, n: usize) -> Vec<store::Op> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ops = vec![create_user(A), create_user(B), create_user(C), register_device(A, 1)];
    ops.push(create_group(9, GroupKind::Small, A, &[B, 77]));
    ops.push(create_group(10, GroupKind::Room, A, &[]));
    // Recalls that succeed: the group notice is message 1 (A's seq 1, group seq 1).
    let recall = |kind: i32, conversation_id, counter: u64, seq, cmid: &str| {
        op(O::Recall(store::Recall {
            user_id: A,
            conversation_kind: kind,
            conversation_id,
            message_id: (1 << 48) | counter,
            seq,
            client_msg_id: cmid.into(),
            ..Default::default()
        }))
    };
    ops.push(send(A, B, "known", "x"));
    ops.push(recall(1, B, 2, 2, "recall-known"));
    ops.push(send_group(9, A, "known-g", "x"));
    ops.push(recall(2, 9, 4, 2, "recall-known-g"));
    for i in 0..n {
        let users = [A, B, C, 999];
        let from = users[(next() % 4) as usize];
        let to = users[(next() % 4) as usize];
        ops.push(match next() % 11 {
            0 => send_group(9, from, &format!("g{i}"), "group"),
            1 => send_group(10, from, &format!("r{i}"), "room"),
            2 => op(O::AckSeq(store::AckSeq { user_id: A, device_id: 1, seq: next() % 50 })),
            3 => send(from, to, &format!("c{}", next() % (n as u64)), "dup-prone"),
            4 => op(O::ChangeFriend(store::ChangeFriend {
                user_id: from,
                friend_id: to,
                action: (next() % 5) as i32,
                description: "hi".into(),
                ..Default::default()
            })),
            5 => op(O::Recall(store::Recall {
                user_id: from,
                conversation_kind: [1, 2][(next() % 2) as usize],
                conversation_id: if next() % 2 == 0 { 9 } else { to },
                message_id: (1 << 48) | (next() % 64),
                seq: next() % 20,
                client_msg_id: format!("x{}", next() % 8),
                ..Default::default()
            })),
            6 => op(O::MarkRead(store::MarkRead {
                user_id: from,
                conversation_kind: (next() % 6) as i32,
                conversation_id: to,
                read_seq: next() % 40,
                receipt_message_id: next() % 8,
                ..Default::default()
            })),
            7 => op(O::PushToUsers(store::PushToUsers {
                user_ids: vec![from, to],
                content_type: rim_proto::v1::ContentType::Custom as i32,
                content: b"push".to_vec().into(),
                client_msg_id: format!("p{}", next() % 16),
                ..Default::default()
            })),
            8 => send_group(9, 0, &format!("b{i}"), "business"),
            _ => send(from, to, &format!("u{i}"), "hello"),
        });
    }
    ops
}

#[tokio::test]
async fn two_replicas_applying_the_same_log_end_identical() {
    let ops = workload(7, 400);
    let entries: Vec<_> = {
        let mut scratch = Node::new(&[1]);
        ops.chunks(5).map(|c| scratch.entry(1, 1_700_000_000_000, c.to_vec())).collect()
    };
    let mut r1 = Node::new(&[1]);
    let mut r2 = Node::new(&[1]);
    // Different apply batching on each replica: the state must not depend on it.
    // The workload exercises every kind of operation, not only its rejections.
    let mut accepted = std::collections::BTreeMap::<String, usize>::new();
    for (entry, chunk_ops) in entries.iter().zip(ops.chunks(5)) {
        let mut res = r1.sm(1).apply(vec![entry.clone()]).await.unwrap();
        for (o, r) in chunk_ops.iter().zip(res.pop().unwrap().0.results) {
            if r.code == 0 {
                let name = format!("{:?}", o.op.as_ref().unwrap());
                *accepted.entry(name[..name.find('(').unwrap()].to_owned()).or_default() += 1;
            }
        }
    }
    for kind in ["ChangeFriend", "Recall", "MarkRead", "PushToUsers", "SendToGroup", "AckSeq", "SendToUser"] {
        assert!(accepted.contains_key(kind), "no {kind} accepted: {accepted:?}");
    }
    assert!(accepted["Recall"] >= 2, "1:1 and group recalls: {accepted:?}");
    for chunk in entries.chunks(13) {
        r2.sm(1).apply(chunk.to_vec()).await.unwrap();
    }
    let d1 = r1.reader(1).digest().unwrap();
    assert_eq!(d1, r2.reader(1).digest().unwrap());
    // And the digest does see differences.
    r2.apply1(1, send(A, B, "extra", "x")).await;
    assert_ne!(d1, r2.reader(1).digest().unwrap());
}

#[tokio::test]
async fn close_and_reopen_keeps_everything() {
    let mut n = Node::new(&[1, 2]);
    for chunk in workload(11, 200).chunks(10) {
        n.apply(1, chunk.to_vec()).await;
    }
    n.apply1(2, create_user(B)).await;
    let (d1, d2) = (n.reader(1).digest().unwrap(), n.reader(2).digest().unwrap());
    let applied = n.sm(1).applied_state().await.unwrap();
    let head = n.reader(1).user_head(UserId(A)).unwrap();

    let mut n = n.reopen();
    assert_eq!(n.reader(1).digest().unwrap(), d1);
    assert_eq!(n.reader(2).digest().unwrap(), d2);
    assert_eq!(n.sm(1).applied_state().await.unwrap(), applied);
    // Seqs continue where they stopped.
    let r = sent(&n.apply1(1, send(A, B, "after-restart", "x")).await);
    assert_eq!(r.seq, head.last_seq + 1);
}

#[tokio::test]
async fn snapshot_built_on_one_store_installs_identically_on_another() {
    let mut src = Node::new(&[1, 2]);
    for chunk in workload(3, 300).chunks(7) {
        src.apply(1, chunk.to_vec()).await;
    }
    src.apply1(2, create_user(C)).await;
    let snap = src.sm(1).get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, src.sm(1).applied_state().await.unwrap().0);

    // The destination has its own shard 2 and stale data in shard 1.
    let mut dst = Node::new(&[1, 2]);
    dst.apply1(1, create_user(999)).await;
    dst.apply1(2, create_user(B)).await;
    let dst_shard2 = dst.reader(2).digest().unwrap();

    let mut rx = dst.sm(1).begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut *src.sm(1).get_current_snapshot().await.unwrap().unwrap().snapshot, &mut *rx)
        .await
        .unwrap();
    dst.sm(1).install_snapshot(&snap.meta, rx).await.unwrap();

    assert_eq!(dst.reader(1).digest().unwrap(), src.reader(1).digest().unwrap());
    assert_eq!(dst.sm(1).applied_state().await.unwrap(), src.sm(1).applied_state().await.unwrap());
    assert_eq!(dst.reader(2).digest().unwrap(), dst_shard2, "other shards untouched");
    assert!(dst.reader(1).user(UserId(999)).unwrap().is_none(), "stale data replaced");
    let cur = dst.sm(1).get_current_snapshot().await.unwrap().expect("installed snapshot is current");
    assert_eq!(cur.meta, snap.meta);

    // Survives a restart.
    let mut dst = dst.reopen();
    assert_eq!(dst.reader(1).digest().unwrap(), src.reader(1).digest().unwrap());
    assert_eq!(dst.sm(1).applied_state().await.unwrap().0, snap.meta.last_log_id);
}

#[tokio::test]
async fn snapshot_is_a_point_in_time_view() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), send(A, B, "1", "x")]).await;
    let at = n.sm(1).applied_state().await.unwrap().0;
    let digest_then = n.reader(1).digest().unwrap();
    let mut builder = n.sm(1).get_snapshot_builder().await;
    // Apply goes on while the snapshot is being built.
    n.apply1(1, send(A, B, "2", "y")).await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, at);

    let mut other = Node::new(&[1]);
    let mut rx = other.sm(1).begin_receiving_snapshot().await.unwrap();
    let mut data = snap.snapshot;
    tokio::io::copy(&mut *data, &mut *rx).await.unwrap();
    other.sm(1).install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(other.reader(1).digest().unwrap(), digest_then);
}

#[tokio::test]
async fn ack_cursor_never_moves_backwards_or_past_the_head() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), register_device(B, 5)]).await;
    for i in 0..10 {
        n.apply1(1, send(A, B, &format!("m{i}"), "x")).await;
    }
    let ack = |seq| op(O::AckSeq(store::AckSeq { user_id: B, device_id: 5, seq }));
    let cursor = |r: &store::OpResult| match r.value {
        Some(store::op_result::Value::AckSeq(s)) => s,
        ref v => panic!("{v:?}"),
    };
    assert_eq!(cursor(&n.apply1(1, ack(6)).await), 6);
    assert_eq!(cursor(&n.apply1(1, ack(3)).await), 6, "never backwards");
    assert_eq!(cursor(&n.apply1(1, ack(500)).await), 10, "never past the head");
    let dev = n.reader(1).device(UserId(B), rim_raft_store::DeviceId(5)).unwrap().unwrap();
    assert_eq!(dev.ack_seq, 10);
    // Re-registering the device keeps its cursor.
    n.apply1(1, register_device(B, 5)).await;
    assert_eq!(n.reader(1).device(UserId(B), rim_raft_store::DeviceId(5)).unwrap().unwrap().ack_seq, 10);
}

/// An app's device id maps to one device of its user for good: racing
/// first registrations under different fresh ids (here in one entry) and
/// later ones all register the first device; another user's device of the
/// same external id is another device; a revocation is timestamped.
#[tokio::test]
async fn an_external_device_id_maps_to_one_device() {
    let mut n = Node::new(&[1]);
    let ext = |user: u64, device: u64, external: &str| {
        op(O::RegisterDevice(store::RegisterDevice {
            user_id: user,
            device_id: device,
            external_id: external.into(),
            ..Default::default()
        }))
    };
    let device_of = |r: &store::OpResult| match &r.value {
        Some(store::op_result::Value::Device(d)) => (d.device_id, d.external_id.clone()),
        v => panic!("{v:?}"),
    };
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let first = n.apply(1, vec![ext(A, 10, "phone"), ext(A, 11, "phone")]).await;
    assert_eq!(device_of(&first[0]), (10, "phone".into()));
    assert_eq!(device_of(&first[1]), (10, "phone".into()), "the second fresh id is not used");
    assert_eq!(device_of(&n.apply1(1, ext(A, 12, "phone")).await), (10, "phone".into()));
    assert_eq!(device_of(&n.apply1(1, ext(A, 13, "laptop")).await), (13, "laptop".into()));
    assert_eq!(device_of(&n.apply1(1, ext(B, 14, "phone")).await), (14, "phone".into()));
    let devices: Vec<u64> = n.reader(1).devices(UserId(A)).unwrap().iter().map(|d| d.device_id).collect();
    assert_eq!(devices, vec![10, 13]);
    // A plain re-registration keeps the external id; a revocation stamps its time.
    n.apply1(1, register_device(A, 10)).await;
    let revoke = op(O::RevokeDevice(store::RevokeDevice { user_id: A, device_id: 10 }));
    n.apply1(1, revoke).await;
    let d = n.reader(1).device(UserId(A), rim_raft_store::DeviceId(10)).unwrap().unwrap();
    assert_eq!((d.external_id.as_str(), d.token_version, d.revoked_ms), ("phone", 1, 1_700_000_000_000));
}

#[tokio::test]
async fn bad_commands_get_typed_errors_and_change_nothing() {
    let limits = Limits { max_group_members: 3, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits.clone());
    n.apply(1, vec![create_user(A), create_user(B), create_group(9, GroupKind::Small, A, &[B])]).await;
    let before = n.reader(1).data_digest().unwrap();

    let big = "x".repeat(limits.max_content_bytes + 1);
    let cases: Vec<(store::Op, ErrorCode)> = vec![
        (send(777, B, "c", "from nobody"), ErrorCode::ErrorUserNotFound),
        (send(A, 0, "c", "to nobody"), ErrorCode::ErrorInvalidId),
        (send(A, B, "", "no id"), ErrorCode::ErrorBadRequest),
        (send(A, B, &"k".repeat(65), "long id"), ErrorCode::ErrorBadRequest),
        (send(A, B, "c", &big), ErrorCode::ErrorContentTooLarge),
        (create_user(0), ErrorCode::ErrorInvalidId),
        (create_user(A), ErrorCode::ErrorAlreadyExists),
        (register_device(777, 1), ErrorCode::ErrorUserNotFound),
        (op(O::AckSeq(store::AckSeq { user_id: A, device_id: 42, seq: 1 })), ErrorCode::ErrorDeviceNotFound),
        (
            op(O::RevokeDevice(store::RevokeDevice { user_id: A, device_id: 42 })),
            ErrorCode::ErrorDeviceNotFound,
        ),
        (send_group(9, C, "g", "not a member"), ErrorCode::ErrorNotGroupMember),
        (send_group(404, A, "g", "no group"), ErrorCode::ErrorGroupNotFound),
        (create_group(11, GroupKind::Small, A, &[1, 2, 3, 4]), ErrorCode::ErrorGroupFull),
        (
            op(O::AddMembers(store::AddMembers { group_id: 9, by_user_id: A, user_ids: vec![5, 6] })),
            ErrorCode::ErrorGroupFull,
        ),
        (
            op(O::AddMembers(store::AddMembers { group_id: 9, by_user_id: B, user_ids: vec![5] })),
            ErrorCode::ErrorPermissionDenied,
        ),
        (
            op(O::DissolveGroup(store::DissolveGroup { group_id: 9, by_user_id: B })),
            ErrorCode::ErrorPermissionDenied,
        ),
        (store::Op { op: None }, ErrorCode::ErrorBadRequest),
    ];
    for (i, (o, want)) in cases.into_iter().enumerate() {
        let r = n.apply1(1, o).await;
        assert_eq!(code(&r), want, "case {i}: {}", r.message);
        assert!(r.value.is_none(), "case {i}");
        assert_eq!(n.reader(1).data_digest().unwrap(), before, "case {i} changed state");
    }
    // A rejection in the middle of a proposal does not affect its neighbours.
    let rs = n.apply(1, vec![send(A, B, "ok1", "x"), send(A, 0, "bad", "x"), send(A, B, "ok2", "y")]).await;
    assert_eq!(
        rs.iter().map(code).collect::<Vec<_>>(),
        [ErrorCode::Ok, ErrorCode::ErrorInvalidId, ErrorCode::Ok]
    );
    let texts: Vec<String> = list(&n.reader(1), B)
        .into_iter()
        .filter(|m| m.content_type == rim_proto::v1::ContentType::Text as i32)
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(texts, ["ok1", "ok2"]);
}

#[tokio::test]
async fn small_group_messages_reach_every_member_once_in_group_order() {
    // A and B local to shard 1; C lives elsewhere and is reached by the outbox.
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), create_group(9, GroupKind::Small, A, &[B, C])]).await;
    for i in 0..5 {
        let r =
            sent(&n.apply1(1, send_group(9, if i % 2 == 0 { A } else { B }, &format!("g{i}"), "hi")).await);
        assert_eq!(r.group_seq, i + 2, "group seq follows the creation notice");
    }
    let r = n.reader(1);
    let texts = |u| list(&r, u).iter().map(|m| m.group_seq).collect::<Vec<_>>();
    assert_eq!(texts(A), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(texts(B), vec![1, 2, 3, 4, 5, 6]);
    // Every group message is owed to C exactly once, in group order.
    let owed: Vec<u64> = r
        .outbox(0, 100)
        .unwrap()
        .iter()
        .filter(|o| o.recipients.contains(&C))
        .map(|o| o.message.as_ref().unwrap().group_seq)
        .collect();
    assert_eq!(owed, vec![1, 2, 3, 4, 5, 6]);
    // The creation notice put the group into the local members' group lists.
    assert_eq!(r.user_groups(UserId(B)).unwrap().len(), 1);
    assert_eq!(r.group_head(GroupId(9)).unwrap().last_seq, 6);
}

#[tokio::test]
async fn groups_convert_to_read_diffusion_past_the_limit_and_rooms_trim() {
    let limits = Limits {
        small_group_limit: 3,
        room_retention: store::Retention { max_count: 5, max_age_ms: 0 },
        ..Limits::default()
    };
    let mut n = Node::with_limits(&[1], limits);
    n.apply(1, vec![create_user(A), create_user(B), create_group(9, GroupKind::Small, A, &[B])]).await;
    n.apply1(1, send_group(9, A, "before", "x")).await;
    let add = op(O::AddMembers(store::AddMembers { group_id: 9, by_user_id: A, user_ids: vec![5, 6] }));
    let r = n.apply1(1, add).await;
    match r.value {
        Some(store::op_result::Value::MembersChanged(m)) => {
            assert_eq!(m.group.unwrap().kind(), GroupKind::Super);
            assert_eq!(m.user_ids, vec![5, 6]);
        }
        v => panic!("{v:?}"),
    }
    let b_before = list(&n.reader(1), B).len();
    n.apply1(1, send_group(9, A, "after", "x")).await;
    assert_eq!(list(&n.reader(1), B).len(), b_before, "super group messages are not copied");
    let page = n.reader(1).sync_group(GroupId(9), Seq(0), 100).unwrap();
    assert_eq!(page.messages.last().unwrap().client_msg_id, "after", "history kept across conversion");
    let m = n.reader(1).member(GroupId(9), UserId(5)).unwrap().unwrap();
    assert_eq!(m.joined_group_seq, 2, "a new member sees history from its join point");

    // A room keeps the newest 5 entries, with stable seqs.
    n.apply1(1, create_group(10, GroupKind::Room, 0, &[])).await;
    for i in 0..12 {
        assert_eq!(code(&n.apply1(1, send_group(10, A, &format!("r{i}"), "x")).await), ErrorCode::Ok);
    }
    let page = n.reader(1).sync_group(GroupId(10), Seq(0), 100).unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![8, 9, 10, 11, 12]);
    assert_eq!(n.reader(1).group_head(GroupId(10)).unwrap().first_seq, 8);
}

#[tokio::test]
async fn meta_group_allocates_fresh_ids_and_versions_the_cluster_map() {
    let mut n = Node::new(&[0]);
    let alloc =
        |kind: store::IdKind, count| op(O::AllocateIds(store::AllocateIds { kind: kind as i32, count }));
    let range = |r: store::OpResult| match r.value {
        Some(store::op_result::Value::Ids(ids)) => (ids.first, ids.count),
        v => panic!("{v:?} {}", r.message),
    };
    assert_eq!(range(n.apply1(0, alloc(store::IdKind::User, 100)).await), (1, 100));
    assert_eq!(range(n.apply1(0, alloc(store::IdKind::User, 10)).await), (101, 10));
    assert_eq!(range(n.apply1(0, alloc(store::IdKind::Device, 5)).await), (1, 5), "kinds are independent");
    assert_eq!(code(&n.apply1(0, alloc(store::IdKind::User, 0)).await), ErrorCode::ErrorBadRequest);
    let mut n = n.reopen();
    assert_eq!(
        range(n.apply1(0, alloc(store::IdKind::User, 1)).await),
        (111, 1),
        "never reused after restart"
    );

    let map = |version| {
        op(O::SetClusterMap(store::SetClusterMap {
            map: Some(rim_proto::v1::ClusterMap { version, slots: 4, ..Default::default() }),
        }))
    };
    assert_eq!(code(&n.apply1(0, map(2)).await), ErrorCode::ErrorBadRequest, "must start at 1");
    assert_eq!(code(&n.apply1(0, map(1)).await), ErrorCode::Ok);
    assert_eq!(code(&n.apply1(0, map(1)).await), ErrorCode::ErrorBadRequest, "stale version refused");
    assert_eq!(code(&n.apply1(0, map(2)).await), ErrorCode::Ok);
    assert_eq!(n.reader(0).cluster_map().unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn applied_effects_are_published_after_the_write() {
    let (tx, mut rx) = tokio::sync::broadcast::channel(16);
    let mut n = Node::new(&[]);
    let sm = rim_raft_store::StateMachine::open(n.db.clone(), rim_raft_store::ShardId(1), Default::default())
        .unwrap()
        .with_events(tx);
    n.sms.insert(1, sm);
    n.open_shard_index(1);
    n.apply(1, vec![create_user(A), create_user(B), register_device(B, 1)]).await;
    assert!(rx.try_recv().is_err(), "no list changed yet");
    n.apply(1, vec![send(A, B, "x", "hi"), send(A, C, "y", "remote")]).await;
    let ev = rx.try_recv().unwrap();
    let lists: Vec<_> = ev.effects.appended.iter().map(|a| (a.list, a.message.seq)).collect();
    use rim_raft_store::ListRef::User;
    assert_eq!(lists, vec![(User(UserId(A)), 1), (User(UserId(B)), 1), (User(UserId(A)), 2)]);
    assert!(ev.effects.outbox, "the send to C went to the outbox");
    // A rejected operation publishes nothing.
    n.apply1(1, send(A, 0, "bad", "x")).await;
    assert!(rx.try_recv().is_err());
    n.apply1(1, op(O::RevokeDevice(store::RevokeDevice { user_id: B, device_id: 1 }))).await;
    assert_eq!(rx.try_recv().unwrap().effects.revoked, vec![(UserId(B), rim_raft_store::DeviceId(1))]);
}

#[tokio::test]
async fn dedup_tables_stay_bounded_by_the_window() {
    let limits = Limits {
        dedup_window: 5,
        room_retention: store::Retention { max_count: 5, max_age_ms: 0 },
        ..Limits::default()
    };
    let mut n = Node::with_limits(&[1, 2], limits);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(2, create_user(C)).await;
    let mut results = Vec::new();
    for i in 0..12 {
        results.push(sent(&n.apply1(1, send(A, B, &format!("m{i}"), "x")).await));
    }
    // Inside the window a retry is recognised and writes nothing ...
    let before = n.reader(1).data_digest().unwrap();
    assert_eq!(sent(&n.apply1(1, send(A, B, "m11", "x")).await), results[11]);
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
    // ... outside it, it is a new message (the documented limit of the window).
    assert_eq!(sent(&n.apply1(1, send(A, B, "m0", "x")).await).seq, 13);

    // Delivery marks expire the same way in the recipient's list.
    let item = |i: u64| store::OutboxRecord {
        outbox_id: i,
        message: Some(rim_proto::v1::Message {
            message_id: 1000 + i,
            client_msg_id: format!("d{i}"),
            ..Default::default()
        }),
        recipients: vec![C],
    };
    for i in 1..=12 {
        n.apply1(2, op(O::Deliver(store::Deliver { items: vec![item(i)] }))).await;
    }
    n.apply1(2, op(O::Deliver(store::Deliver { items: vec![item(12), item(1)] }))).await;
    let list = list(&n.reader(2), C);
    assert_eq!(list.len(), 13, "d12 deduplicated, d1 outside the window delivered again");
    assert_eq!(list.last().unwrap().client_msg_id, "d1");

    // Group sends: a room entry trimmed by retention takes its dedup record along.
    n.apply1(1, create_group(10, GroupKind::Room, 0, &[])).await;
    for i in 0..12 {
        n.apply1(1, send_group(10, A, &format!("r{i}"), "x")).await;
    }
    let again = sent(&n.apply1(1, send_group(10, A, "r11", "x")).await);
    assert_eq!(again.group_seq, 12, "recent room send recognised");
    assert_eq!(sent(&n.apply1(1, send_group(10, A, "r0", "x")).await).group_seq, 13);
}

/// A page and the `last_seq` it reports come from one snapshot: with appends
/// applied concurrently, a page without `has_more` always ends at the head
/// it reports. (Reading the head separately, after the entries, let the
/// jepsen harness observe `last_seq` one beyond the entries, an IM-3 gap a
/// client trusting `last_seq` would turn into a lost message.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_its_head_come_from_one_snapshot() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let r = n.reader(1);
    const SENDS: usize = 400;
    let writer = tokio::spawn(async move {
        for k in 0..SENDS {
            n.apply1(1, send(A, B, &format!("c{k}"), "x")).await;
            tokio::task::yield_now().await;
        }
        n
    });
    let mut reads = 0u64;
    let mut after = 0u64;
    loop {
        let done = writer.is_finished();
        let page = r.sync(UserId(B), Seq(after), 50).unwrap();
        reads += 1;
        match (page.messages.last(), page.has_more) {
            (Some(last), false) => assert_eq!(last.seq, page.head.last_seq, "page ends before its head"),
            (None, false) => {
                assert!(page.head.last_seq <= after, "empty page below head {}", page.head.last_seq)
            }
            (_, true) => assert!(page.head.last_seq > page.messages.last().map_or(after, |m| m.seq)),
        }
        // Alternate between reading from the start and near the head.
        after = if reads.is_multiple_of(2) { 0 } else { page.head.last_seq.saturating_sub(3) };
        if done {
            break;
        }
    }
    let n = writer.await.unwrap();
    assert_eq!(n.reader(1).user_head(UserId(B)).unwrap().last_seq, SENDS as u64);
    assert!(reads > 10, "the reader ran alongside the writer ({reads} reads)");
}
