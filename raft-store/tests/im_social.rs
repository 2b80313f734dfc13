//! Friend actions across shards, recalls, read positions and receipts,
//! business pushes and group sends, group conversion, member changes and
//! the conversation-view reads.

mod common;

use common::*;
use openraft::storage::RaftStateMachine;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::store::notification::Event;
use rim_proto::store::{self, FriendAction, FriendStatus, GroupKind, MemberRole, OpResult, op::Op as O};
use rim_proto::v1::{ContentType, ConversationKind, Message};
use rim_raft_store::{GroupId, Limits, Seq, UserId};

const A: u64 = 101;
const B: u64 = 202;
const C: u64 = 303;
const D: u64 = 404;
const T0: i64 = 1_700_000_000_000;

/// Applies one op to shard `s` at time `now`.
async fn at(n: &mut Node, s: u32, now: i64, o: store::Op) -> OpResult {
    let e = n.entry(s, now, vec![o]);
    n.sm(s).apply(vec![e]).await.unwrap().pop().unwrap().0.results.pop().unwrap()
}

/// Relays shard `from`'s outbox to shard `to` (Deliver, then AckOutbox).
/// Returns how many records moved.
async fn relay(n: &mut Node, from: u32, to: u32) -> usize {
    let items = n.reader(from).outbox(0, 1000).unwrap();
    if items.is_empty() {
        return 0;
    }
    let outbox_ids = items.iter().map(|o| o.outbox_id).collect();
    let r = n.apply1(to, op(O::Deliver(store::Deliver { items: items.clone() }))).await;
    assert_eq!(code(&r), ErrorCode::Ok, "{}", r.message);
    n.apply1(from, op(O::AckOutbox(store::AckOutbox { outbox_ids }))).await;
    items.len()
}

fn friend_op(user: u64, friend: u64, action: FriendAction) -> store::Op {
    op(O::ChangeFriend(store::ChangeFriend {
        user_id: user,
        friend_id: friend,
        action: action as i32,
        remarks: String::new(),
        description: String::new(),
    }))
}

fn friend(n: &Node, s: u32, u: u64, f: u64) -> Option<store::FriendRecord> {
    n.reader(s).friends(UserId(u)).unwrap().into_iter().find(|r| r.friend_id == f)
}

fn status(n: &Node, s: u32, u: u64, f: u64) -> Option<FriendStatus> {
    friend(n, s, u, f).map(|r| r.status())
}

fn event(m: &Message) -> Event {
    assert_eq!(m.content_type, ContentType::Notification as i32, "{m:?}");
    store::Notification::decode(m.content.as_ref()).unwrap().event.unwrap()
}

fn friend_event(m: &Message) -> store::FriendChanged {
    match event(m) {
        Event::FriendChanged(e) => e,
        e => panic!("{e:?}"),
    }
}

fn last(n: &Node, s: u32, u: u64) -> Message {
    n.reader(s).tail(UserId(u), 1).unwrap().pop().expect("non-empty list")
}

fn recall(user: u64, kind: ConversationKind, conv: u64, m: &Message, cmid: &str) -> store::Op {
    op(O::Recall(store::Recall {
        user_id: user,
        device_id: 1,
        conversation_kind: kind as i32,
        conversation_id: conv,
        message_id: m.message_id,
        seq: m.seq,
        client_msg_id: cmid.into(),
    }))
}

fn mark_read(user: u64, kind: ConversationKind, conv: u64, seq: u64, receipt: u64) -> store::Op {
    op(O::MarkRead(store::MarkRead {
        user_id: user,
        device_id: 1,
        conversation_kind: kind as i32,
        conversation_id: conv,
        read_seq: seq,
        receipt_message_id: receipt,
    }))
}

fn read_seq(r: &OpResult) -> u64 {
    match r.value {
        Some(store::op_result::Value::ReadSeq(s)) => s,
        ref v => panic!("{v:?} (code {}, {})", r.code, r.message),
    }
}

fn push(ids: &[u64], cmid: &str, content_type: ContentType) -> store::Op {
    op(O::PushToUsers(store::PushToUsers {
        user_ids: ids.to_vec(),
        sender_user_id: 0,
        content_type: content_type as i32,
        content: b"promo".to_vec().into(),
        client_msg_id: cmid.into(),
        ..Default::default()
    }))
}

fn members_changed(r: &OpResult) -> store::MembersChanged {
    match &r.value {
        Some(store::op_result::Value::MembersChanged(m)) => m.clone(),
        v => panic!("{v:?} (code {}, {})", r.code, r.message),
    }
}

fn set_member(g: u64, by: u64, user: u64, role: MemberRole, nickname: Option<&str>) -> store::Op {
    op(O::SetMember(store::SetMember {
        group_id: g,
        by_user_id: by,
        user_id: user,
        role: role as i32,
        nickname: nickname.map(str::to_owned),
    }))
}

#[tokio::test]
async fn friend_request_accept_and_delete_across_two_shards() {
    // A in shard 1, B in shard 2.
    let mut n = Node::new(&[1, 2]);
    n.apply1(1, create_user(A)).await;
    n.apply1(2, create_user(B)).await;

    let req = op(O::ChangeFriend(store::ChangeFriend {
        user_id: A,
        friend_id: B,
        action: FriendAction::Request as i32,
        remarks: "bee".into(),
        description: "hi, it's A".into(),
    }));
    let r = n.apply1(1, req).await;
    match r.value {
        Some(store::op_result::Value::Friend(f)) => {
            assert_eq!((f.friend_id, f.status(), f.remarks.as_str()), (B, FriendStatus::RequestSent, "bee"));
            assert_eq!(f.description, "hi, it's A");
        }
        v => panic!("{v:?} {}", r.message),
    }
    // The actor's own copy of the notice does not touch its record.
    let notice = last(&n, 1, A);
    assert_eq!(notice.conversation_kind, ConversationKind::System as i32);
    assert_eq!((notice.conversation_id, notice.sender_user_id), (0, A));
    let e = friend_event(&notice);
    assert_eq!(
        (e.user_id, e.friend_id, e.action(), e.status()),
        (A, B, FriendAction::Request, FriendStatus::RequestSent)
    );
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::RequestSent));
    assert_eq!(status(&n, 2, B, A), None, "nothing before the relay");

    assert_eq!(relay(&mut n, 1, 2).await, 1);
    let b_side = friend(&n, 2, B, A).unwrap();
    assert_eq!(b_side.status(), FriendStatus::RequestReceived);
    assert_eq!(b_side.description, "hi, it's A");
    assert_eq!(b_side.created_ms, notice.send_time_ms);
    assert_eq!(last(&n, 2, B).message_id, notice.message_id, "B's list holds the same notice");

    // A cannot accept its own request; B accepts.
    assert_eq!(code(&n.apply1(1, friend_op(A, B, FriendAction::Accept)).await), ErrorCode::ErrorNotFriend);
    let r = n.apply1(2, friend_op(B, A, FriendAction::Accept)).await;
    assert_eq!(code(&r), ErrorCode::Ok, "{}", r.message);
    assert_eq!(status(&n, 2, B, A), Some(FriendStatus::Accepted));
    relay(&mut n, 2, 1).await;
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::Accepted));
    // A request between friends (say a retry of the one that was accepted)
    // changes nothing and notifies nobody.
    let a_len = list(&n.reader(1), A).len();
    assert_eq!(code(&n.apply1(1, friend_op(A, B, FriendAction::Request)).await), ErrorCode::Ok);
    assert_eq!((list(&n.reader(1), A).len(), status(&n, 1, A, B)), (a_len, Some(FriendStatus::Accepted)));

    // B ends the friendship: no record on either side afterwards.
    let r = n.apply1(2, friend_op(B, A, FriendAction::Delete)).await;
    assert_eq!(code(&r), ErrorCode::Ok);
    assert!(r.value.is_none(), "a deleted relation returns no record");
    assert_eq!(friend_event(&last(&n, 2, B)).status(), FriendStatus::Unspecified);
    assert_eq!(status(&n, 2, B, A), None);
    relay(&mut n, 2, 1).await;
    assert_eq!(status(&n, 1, A, B), None);
    // Without a relation: nothing to accept; rejecting or deleting (a retry)
    // is already done.
    for (action, want) in [
        (FriendAction::Accept, ErrorCode::ErrorNotFriend),
        (FriendAction::Reject, ErrorCode::Ok),
        (FriendAction::Delete, ErrorCode::Ok),
    ] {
        assert_eq!(code(&n.apply1(1, friend_op(A, B, action)).await), want, "{action:?}");
    }

    // Request, reject: both sides gone.
    n.apply1(1, friend_op(A, B, FriendAction::Request)).await;
    relay(&mut n, 1, 2).await;
    assert_eq!(code(&n.apply1(2, friend_op(B, A, FriendAction::Reject)).await), ErrorCode::Ok);
    assert_eq!(status(&n, 2, B, A), None);
    relay(&mut n, 2, 1).await;
    assert_eq!(status(&n, 1, A, B), None);

    // Request, then the other side requests too: auto-accept.
    n.apply1(1, friend_op(A, B, FriendAction::Request)).await;
    relay(&mut n, 1, 2).await;
    let r = n.apply1(2, friend_op(B, A, FriendAction::Request)).await;
    assert_eq!(code(&r), ErrorCode::Ok);
    assert_eq!(status(&n, 2, B, A), Some(FriendStatus::Accepted));
    assert_eq!(friend_event(&last(&n, 2, B)).action(), FriendAction::Accept, "notified as an accept");
    relay(&mut n, 2, 1).await;
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::Accepted));
}

#[tokio::test]
async fn crossing_requests_make_both_sides_friends() {
    let mut n = Node::new(&[1, 2]);
    n.apply1(1, create_user(A)).await;
    n.apply1(2, create_user(B)).await;
    n.apply1(1, friend_op(A, B, FriendAction::Request)).await;
    n.apply1(2, friend_op(B, A, FriendAction::Request)).await;
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::RequestSent));
    assert_eq!(status(&n, 2, B, A), Some(FriendStatus::RequestSent));
    let a_request = n.reader(1).outbox(0, 10).unwrap();
    relay(&mut n, 1, 2).await;
    relay(&mut n, 2, 1).await;
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::Accepted));
    assert_eq!(status(&n, 2, B, A), Some(FriendStatus::Accepted));
    // A relay retry of A's request is deduplicated and changes nothing.
    let b_len = list(&n.reader(2), B).len();
    n.apply1(2, op(O::Deliver(store::Deliver { items: a_request }))).await;
    assert_eq!(list(&n.reader(2), B).len(), b_len);
    assert_eq!(status(&n, 2, B, A), Some(FriendStatus::Accepted));
}

#[tokio::test]
async fn local_friend_actions_apply_to_both_sides_at_once_and_validate() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(D)]).await;
    n.apply1(1, friend_op(A, D, FriendAction::Request)).await;
    assert_eq!(
        status(&n, 1, D, A),
        Some(FriendStatus::RequestReceived),
        "local friend updated in the same entry"
    );
    assert!(n.reader(1).outbox(0, 10).unwrap().is_empty());
    // A repeated request (a retry) is answered Ok and notifies nobody again.
    let d_len = list(&n.reader(1), D).len();
    assert_eq!(code(&n.apply1(1, friend_op(A, D, FriendAction::Request)).await), ErrorCode::Ok);
    assert_eq!(list(&n.reader(1), D).len(), d_len);
    // Withdrawing the request removes it on the other side.
    n.apply1(1, friend_op(A, D, FriendAction::Delete)).await;
    assert_eq!(status(&n, 1, D, A), None);
    assert_eq!(status(&n, 1, A, D), None);

    let before = n.reader(1).data_digest().unwrap();
    let cases = [
        (friend_op(A, 0, FriendAction::Request), ErrorCode::ErrorInvalidId),
        (friend_op(A, A, FriendAction::Request), ErrorCode::ErrorBadRequest),
        (friend_op(777, A, FriendAction::Request), ErrorCode::ErrorUserNotFound),
        (friend_op(A, D, FriendAction::Unspecified), ErrorCode::ErrorBadRequest),
        (friend_op(A, D, FriendAction::Accept), ErrorCode::ErrorNotFriend),
        // Nothing to reject: already done (a retry), and nothing is written.
        (friend_op(A, D, FriendAction::Reject), ErrorCode::Ok),
    ];
    for (i, (o, want)) in cases.into_iter().enumerate() {
        assert_eq!(code(&n.apply1(1, o).await), want, "case {i}");
    }
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
}

#[tokio::test]
async fn set_friend_without_status_keeps_it_and_needs_a_record() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let set = |status: FriendStatus, remarks: &str| {
        op(O::SetFriend(store::SetFriend {
            user_id: A,
            friend_id: B,
            status: status as i32,
            remarks: Some(remarks.into()),
            extra: None,
        }))
    };
    assert_eq!(code(&n.apply1(1, set(FriendStatus::Unspecified, "x")).await), ErrorCode::ErrorNotFriend);
    assert_eq!(status(&n, 1, A, B), None);
    assert_eq!(code(&n.apply1(1, set(FriendStatus::Accepted, "first")).await), ErrorCode::Ok);
    let r = n.apply1(1, set(FriendStatus::Unspecified, "second")).await;
    let rec = friend(&n, 1, A, B).unwrap();
    assert_eq!(r.value, Some(store::op_result::Value::Friend(rec.clone())), "the stored record");
    assert_eq!((rec.status(), rec.remarks.as_str()), (FriendStatus::Accepted, "second"));
}

#[tokio::test]
async fn one_to_one_recall_within_the_window_only_by_the_sender_and_once_per_id() {
    let mut n = Node::new(&[1, 2]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(2, create_user(C)).await;
    let sent_at = sent(&at(&mut n, 1, T0, send(A, B, "m1", "oops")).await);
    let original = n.reader(1).user_message(UserId(A), Seq(sent_at.seq)).unwrap().unwrap();

    // B holds the message too, but did not send it.
    let b_copy = last(&n, 1, B);
    assert_eq!(
        code(&at(&mut n, 1, T0 + 10, recall(B, ConversationKind::User, A, &b_copy, "rb")).await),
        ErrorCode::ErrorPermissionDenied
    );
    // Wrong id at that seq.
    let mut wrong = original.clone();
    wrong.message_id += 1;
    assert_eq!(
        code(&at(&mut n, 1, T0 + 10, recall(A, ConversationKind::User, B, &wrong, "rw")).await),
        ErrorCode::ErrorMessageNotFound
    );

    let r = sent(&at(&mut n, 1, T0 + 1_000, recall(A, ConversationKind::User, B, &original, "r1")).await);
    assert_eq!(r.seq, sent_at.seq + 1);
    for u in [A, B] {
        let m = last(&n, 1, u);
        assert_eq!(m.content_type, ContentType::Recall as i32, "user {u}");
        assert_eq!((m.refers_to, m.conversation_id, m.sender_user_id), (original.message_id, B, A));
        assert!(m.content.is_empty());
    }
    // The recalled entry itself is unchanged.
    assert_eq!(n.reader(1).user_message(UserId(A), Seq(sent_at.seq)).unwrap().unwrap(), original);

    // A retry, even after the window, returns the first result and writes nothing.
    let before = n.reader(1).data_digest().unwrap();
    let again =
        sent(&at(&mut n, 1, T0 + 1_000_000, recall(A, ConversationKind::User, B, &original, "r1")).await);
    assert_eq!(again, r);
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
    let recalls =
        list(&n.reader(1), B).iter().filter(|m| m.content_type == ContentType::Recall as i32).count();
    assert_eq!(recalls, 1);

    // A recall entry cannot be recalled.
    let recall_entry = last(&n, 1, A);
    assert_eq!(
        code(&at(&mut n, 1, T0 + 2_000, recall(A, ConversationKind::User, B, &recall_entry, "r2")).await),
        ErrorCode::ErrorBadRequest
    );
    // Past the window (default 120 s).
    let late = sent(&at(&mut n, 1, T0, send(A, C, "m2", "late")).await);
    let late_msg = n.reader(1).user_message(UserId(A), Seq(late.seq)).unwrap().unwrap();
    assert_eq!(
        code(&at(&mut n, 1, T0 + 120_001, recall(A, ConversationKind::User, C, &late_msg, "r3")).await),
        ErrorCode::ErrorRecallWindowPassed
    );
    // At the window's edge it still works, and a remote peer gets it through the outbox.
    let r = at(&mut n, 1, T0 + 120_000, recall(A, ConversationKind::User, C, &late_msg, "r4")).await;
    assert_eq!(code(&r), ErrorCode::Ok, "{}", r.message);
    let owed = n.reader(1).outbox(0, 10).unwrap();
    let last_owed = owed.last().unwrap().message.as_ref().unwrap();
    assert_eq!(
        (last_owed.content_type, last_owed.refers_to),
        (ContentType::Recall as i32, late_msg.message_id)
    );
}

#[tokio::test]
async fn recall_window_zero_means_no_limit() {
    let mut n = Node::with_limits(&[1], Limits { recall_window_ms: 0, ..Limits::default() });
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let s = sent(&at(&mut n, 1, T0, send(A, B, "m", "x")).await);
    let m = n.reader(1).user_message(UserId(A), Seq(s.seq)).unwrap().unwrap();
    let r = at(&mut n, 1, T0 + 365 * 24 * 3600 * 1000, recall(A, ConversationKind::User, B, &m, "r")).await;
    assert_eq!(code(&r), ErrorCode::Ok, "{}", r.message);
}

#[tokio::test]
async fn group_recall_by_the_sender_in_time_or_by_an_admin_any_time() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), create_user(C), create_user(D)]).await;
    n.apply1(1, create_group(9, GroupKind::Small, A, &[B, C])).await;
    n.apply1(1, set_member(9, A, B, MemberRole::Admin, None)).await;
    let own = sent(&at(&mut n, 1, T0, send_group(9, C, "c1", "mine")).await);
    let own_msg = n.reader(1).group_message(GroupId(9), Seq(own.group_seq)).unwrap().unwrap();
    let other = sent(&at(&mut n, 1, T0, send_group(9, A, "a1", "owner's")).await);
    let other_msg = n.reader(1).group_message(GroupId(9), Seq(other.group_seq)).unwrap().unwrap();
    let g = ConversationKind::Group;

    assert_eq!(
        code(&at(&mut n, 1, T0 + 5, recall(C, g, 9, &other_msg, "x")).await),
        ErrorCode::ErrorPermissionDenied
    );
    assert_eq!(
        code(&at(&mut n, 1, T0 + 5, recall(D, g, 9, &own_msg, "x")).await),
        ErrorCode::ErrorPermissionDenied
    );
    assert_eq!(
        code(&at(&mut n, 1, T0 + 200_000, recall(C, g, 9, &own_msg, "x")).await),
        ErrorCode::ErrorRecallWindowPassed
    );
    let r = sent(&at(&mut n, 1, T0 + 5, recall(C, g, 9, &own_msg, "c-r")).await);
    assert_eq!(r.group_seq, other.group_seq + 1);
    let entry = n.reader(1).group_message(GroupId(9), Seq(r.group_seq)).unwrap().unwrap();
    assert_eq!(
        (entry.content_type, entry.refers_to, entry.sender_user_id),
        (ContentType::Recall as i32, own_msg.message_id, C)
    );
    // Small group: diffused to every member's list.
    for u in [A, B, C] {
        assert_eq!(last(&n, 1, u).message_id, entry.message_id, "user {u}");
    }
    let before = n.reader(1).data_digest().unwrap();
    assert_eq!(sent(&at(&mut n, 1, T0 + 6, recall(C, g, 9, &own_msg, "c-r")).await), r, "retry");
    assert_eq!(n.reader(1).data_digest().unwrap(), before);

    // The admin recalls the owner's message long after the window.
    let r =
        at(&mut n, 1, T0 + 10_000_000, recall(B, ConversationKind::SuperGroup, 9, &other_msg, "b-r")).await;
    assert_eq!(code(&r), ErrorCode::Ok, "{}", r.message);
    // A notification (the creation notice at group seq 1) cannot be recalled.
    let notice = n.reader(1).group_message(GroupId(9), Seq(1)).unwrap().unwrap();
    assert_eq!(code(&at(&mut n, 1, T0, recall(A, g, 9, &notice, "n")).await), ErrorCode::ErrorBadRequest);
}

#[tokio::test]
async fn read_positions_only_move_forward_and_receipts_are_sent_once() {
    let mut n = Node::new(&[1, 2]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(2, create_user(C)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(sent(&n.apply1(1, send(A, B, &format!("m{i}"), "x")).await).message_id);
    }
    let u = ConversationKind::User;
    let a_len = list(&n.reader(1), A).len();
    assert_eq!(read_seq(&n.apply1(1, mark_read(B, u, A, 2, ids[1])).await), 2);
    let receipt = last(&n, 1, A);
    assert_eq!(receipt.content_type, ContentType::ReadReceipt as i32);
    assert_eq!((receipt.refers_to, receipt.sender_user_id, receipt.conversation_id), (ids[1], B, A));
    assert_eq!(list(&n.reader(1), A).len(), a_len + 1);

    // Backwards is ignored; a retried receipt adds nothing.
    assert_eq!(read_seq(&n.apply1(1, mark_read(B, u, A, 1, ids[1])).await), 2);
    assert_eq!(list(&n.reader(1), A).len(), a_len + 1, "receipt deduplicated");
    // A client's own id "read:<id>" cannot suppress a receipt.
    n.apply1(1, send(B, A, &format!("read:{}", ids[2]), "text")).await;
    let b_head = n.reader(1).user_head(UserId(B)).unwrap().last_seq;
    assert_eq!(read_seq(&n.apply1(1, mark_read(B, u, A, 1_000, ids[2])).await), b_head, "capped at the head");
    assert_eq!(last(&n, 1, A).content_type, ContentType::ReadReceipt as i32);
    assert_eq!(n.reader(1).read_position(UserId(B), u as i32, A).unwrap(), b_head);

    // Super groups are read by group seq: not capped by the user's list.
    let sg = ConversationKind::SuperGroup;
    assert_eq!(read_seq(&n.apply1(1, mark_read(B, sg, 9, 50, 0)).await), 50);
    assert_eq!(read_seq(&n.apply1(1, mark_read(B, ConversationKind::System, 0, 1, 0)).await), 1);
    let all = n.reader(1).read_positions(UserId(B)).unwrap();
    let keys: Vec<(i32, u64, u64)> = all.iter().map(|(k, c, r)| (*k, *c, r.read_seq)).collect();
    assert_eq!(
        keys,
        vec![(u as i32, A, b_head), (sg as i32, 9, 50), (ConversationKind::System as i32, 0, 1)]
    );
    assert_eq!(n.reader(1).read_position(UserId(B), sg as i32, 10).unwrap(), 0);

    // A receipt to a remote peer goes through the outbox.
    let s = sent(&n.apply1(2, send(C, B, "c1", "hi")).await);
    relay(&mut n, 2, 1).await;
    n.apply1(1, mark_read(B, u, C, 100, s.message_id)).await;
    let owed = n.reader(1).outbox(0, 10).unwrap();
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].recipients, vec![C]);
    assert_eq!(owed[0].message.as_ref().unwrap().refers_to, s.message_id);

    let before = n.reader(1).data_digest().unwrap();
    for (o, want) in [
        (mark_read(B, ConversationKind::Unspecified, A, 1, 0), ErrorCode::ErrorBadRequest),
        (mark_read(B, u, 0, 1, 0), ErrorCode::ErrorBadRequest),
        (mark_read(777, u, A, 1, 0), ErrorCode::ErrorUserNotFound),
    ] {
        assert_eq!(code(&n.apply1(1, o).await), want);
    }
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
}

#[tokio::test]
async fn receipt_dedup_records_leave_with_the_window() {
    let mut n = Node::with_limits(&[1], Limits { dedup_window: 3, ..Limits::default() });
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let id = sent(&n.apply1(1, send(A, B, "m", "x")).await).message_id;
    n.apply1(1, mark_read(B, ConversationKind::User, A, 1, id)).await;
    n.apply1(1, mark_read(B, ConversationKind::User, A, 1, id)).await;
    let receipts = |n: &Node| {
        list(&n.reader(1), A).iter().filter(|m| m.content_type == ContentType::ReadReceipt as i32).count()
    };
    assert_eq!(receipts(&n), 1);
    for i in 0..3 {
        n.apply1(1, send(B, A, &format!("f{i}"), "x")).await;
    }
    // B's list grew past the window: the message can no longer be found by
    // its id, so a receipt for it is refused rather than sent twice.
    let r = n.apply1(1, mark_read(B, ConversationKind::User, A, 1, id)).await;
    assert_eq!(code(&r), ErrorCode::ErrorMessageNotFound);
    assert_eq!(receipts(&n), 1);
}

#[tokio::test]
async fn push_to_users_reaches_local_and_remote_users_once() {
    let mut n = Node::with_limits(&[1, 2], Limits { dedup_window: 2, ..Limits::default() });
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(2, create_user(C)).await;
    let r = sent(&n.apply1(1, push(&[A, C, B, A], "p1", ContentType::Custom)).await);
    for u in [A, B] {
        let l = list(&n.reader(1), u);
        assert_eq!(l.len(), 1, "user {u}");
        assert_eq!(
            (l[0].message_id, l[0].conversation_kind),
            (r.message_id, ConversationKind::System as i32)
        );
        assert_eq!((l[0].conversation_id, l[0].send_time_ms), (0, r.send_time_ms));
    }
    let owed = n.reader(1).outbox(0, 10).unwrap();
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].recipients, vec![C]);

    let before = n.reader(1).data_digest().unwrap();
    assert_eq!(sent(&n.apply1(1, push(&[A], "p1", ContentType::Custom)).await), r, "retry");
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
    // Without an id every push is new.
    n.apply1(1, push(&[A], "", ContentType::Text)).await;
    n.apply1(1, push(&[A], "", ContentType::Text)).await;
    assert_eq!(list(&n.reader(1), A).len(), 3);
    // The push dedup records are bounded by the window, in push order.
    n.apply1(1, push(&[A], "p2", ContentType::Text)).await;
    let p3 = sent(&n.apply1(1, push(&[A], "p3", ContentType::Text)).await);
    assert_eq!(sent(&n.apply1(1, push(&[A], "p3", ContentType::Text)).await), p3, "inside the window");
    assert_ne!(sent(&n.apply1(1, push(&[A], "p1", ContentType::Text)).await).message_id, r.message_id);

    let before = n.reader(1).data_digest().unwrap();
    let big = op(O::PushToUsers(store::PushToUsers {
        user_ids: vec![A],
        content_type: ContentType::Text as i32,
        content: vec![0; Limits::default().max_content_bytes + 1].into(),
        ..Default::default()
    }));
    for (o, want) in [
        (push(&[A], "n", ContentType::Notification), ErrorCode::ErrorBadRequest),
        (push(&[], "e", ContentType::Text), ErrorCode::ErrorBadRequest),
        (push(&[A, 0], "z", ContentType::Text), ErrorCode::ErrorInvalidId),
        (big, ErrorCode::ErrorContentTooLarge),
    ] {
        assert_eq!(code(&n.apply1(1, o).await), want);
    }
    assert_eq!(n.reader(1).data_digest().unwrap(), before);
}

#[tokio::test]
async fn business_sends_to_groups_need_no_membership() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, create_group(9, GroupKind::Small, A, &[B])).await;
    let r = sent(&n.apply1(1, send_group(9, 0, "biz1", "announcement")).await);
    for u in [A, B] {
        let m = last(&n, 1, u);
        assert_eq!((m.message_id, m.sender_user_id, m.group_seq), (r.message_id, 0, r.group_seq));
    }
    assert_eq!(sent(&n.apply1(1, send_group(9, 0, "biz1", "again")).await), r, "idempotent");
    let mut notice = send_group(9, 0, "biz2", "x");
    if let Some(O::SendToGroup(s)) = &mut notice.op {
        s.content_type = ContentType::Notification as i32;
    }
    assert_eq!(code(&n.apply1(1, notice).await), ErrorCode::ErrorBadRequest);
    // A user who is not a member is still refused.
    assert_eq!(code(&n.apply1(1, send_group(9, C, "c", "x")).await), ErrorCode::ErrorNotGroupMember);
}

#[tokio::test]
async fn conversion_notifies_every_member_and_updates_their_group_records() {
    let limits = Limits { small_group_limit: 3, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, create_group(9, GroupKind::Small, A, &[B])).await;
    let kind_of = |n: &Node, u| n.reader(1).user_groups(UserId(u)).unwrap()[0].kind();
    assert_eq!(kind_of(&n, B), GroupKind::Small);

    // C lives in another shard.
    let add = op(O::AddMembers(store::AddMembers { group_id: 9, by_user_id: A, user_ids: vec![B, C, D, C] }));
    let m = members_changed(&n.apply1(1, add).await);
    assert_eq!(m.user_ids, vec![C, D], "B was a member already");
    assert_eq!(m.group.as_ref().unwrap().kind(), GroupKind::Super);
    for u in [A, B] {
        assert_eq!(kind_of(&n, u), GroupKind::Super, "user {u}");
        let converted: Vec<_> = list(&n.reader(1), u)
            .iter()
            .filter_map(|m| match event(m) {
                Event::GroupConverted(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(converted.len(), 1, "user {u}");
        assert_eq!((converted[0].group_id, converted[0].kind()), (9, GroupKind::Super));
    }
    // The remote new members get the conversion and the (super) membership notice.
    let owed: Vec<_> = n.reader(1).outbox(0, 10).unwrap();
    let events: Vec<Event> = owed.iter().map(|o| event(o.message.as_ref().unwrap())).collect();
    assert!(matches!(&events[0], Event::GroupConverted(_)), "{events:?}");
    assert_eq!(owed[0].recipients, vec![C, D]);
    match &events[1] {
        Event::GroupMembersAdded(e) => {
            assert_eq!((e.kind(), e.user_ids.clone()), (GroupKind::Super, vec![C, D]))
        }
        e => panic!("{e:?}"),
    }
    // The membership notice follows the conversion notice in the group list.
    let tail = n.reader(1).group_tail(GroupId(9), 2).unwrap();
    assert!(matches!(event(&tail[0]), Event::GroupMembersAdded(_)));
    assert!(matches!(event(&tail[1]), Event::GroupConverted(_)));

    let rm =
        op(O::RemoveMembers(store::RemoveMembers { group_id: 9, by_user_id: A, user_ids: vec![D, 777] }));
    let m = members_changed(&n.apply1(1, rm).await);
    assert_eq!(m.user_ids, vec![D]);
    assert_eq!(m.group.unwrap().member_count, 3);

    // A group created above the limit is born super, without a conversion notice.
    n.apply1(1, create_group(10, GroupKind::Small, A, &[B, C, D])).await;
    let g10 = n.reader(1).group(GroupId(10)).unwrap().unwrap();
    assert_eq!(g10.kind(), GroupKind::Super);
    let tail = n.reader(1).group_tail(GroupId(10), 10).unwrap();
    assert_eq!(tail.len(), 1);
    assert!(matches!(event(&tail[0]), Event::GroupMembersAdded(e) if e.kind() == GroupKind::Super));
}

#[tokio::test]
async fn ownership_transfer_and_member_changes() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), create_user(C)]).await;
    n.apply1(1, create_group(9, GroupKind::Small, A, &[B, C])).await;
    let role = |n: &Node, u| n.reader(1).member(GroupId(9), UserId(u)).unwrap().unwrap().role();

    let before = n.reader(1).data_digest().unwrap();
    for (o, want) in [
        (set_member(9, B, C, MemberRole::Admin, None), ErrorCode::ErrorPermissionDenied),
        (set_member(9, C, B, MemberRole::Unspecified, Some("bob")), ErrorCode::ErrorPermissionDenied),
        (set_member(9, A, A, MemberRole::Admin, None), ErrorCode::ErrorPermissionDenied),
        (set_member(9, A, 777, MemberRole::Admin, None), ErrorCode::ErrorNotGroupMember),
    ] {
        assert_eq!(code(&n.apply1(1, o).await), want);
    }
    assert_eq!(n.reader(1).data_digest().unwrap(), before);

    assert_eq!(code(&n.apply1(1, set_member(9, A, B, MemberRole::Admin, None)).await), ErrorCode::Ok);
    let e = match event(&last(&n, 1, C)) {
        Event::MemberChanged(e) => e,
        e => panic!("{e:?}"),
    };
    assert_eq!((e.group_id, e.by_user_id, e.user_id, e.role()), (9, A, B, MemberRole::Admin));
    // Admins rename others; members rename themselves; only the owner sets roles.
    assert_eq!(
        code(&n.apply1(1, set_member(9, B, C, MemberRole::Unspecified, Some("cee"))).await),
        ErrorCode::Ok
    );
    assert_eq!(
        code(&n.apply1(1, set_member(9, C, C, MemberRole::Unspecified, Some("me"))).await),
        ErrorCode::Ok
    );
    assert_eq!(n.reader(1).member(GroupId(9), UserId(C)).unwrap().unwrap().nickname, "me");
    assert_eq!(
        code(&n.apply1(1, set_member(9, B, C, MemberRole::Admin, None)).await),
        ErrorCode::ErrorPermissionDenied
    );

    // Transfer to C: C owner, A admin, group.owner_id C.
    let len = list(&n.reader(1), B).len();
    let r = n.apply1(1, set_member(9, A, C, MemberRole::Owner, None)).await;
    match r.value {
        Some(store::op_result::Value::Group(g)) => assert_eq!(g.owner_id, C),
        v => panic!("{v:?} {}", r.message),
    }
    assert_eq!(
        (role(&n, A), role(&n, C), role(&n, B)),
        (MemberRole::Admin, MemberRole::Owner, MemberRole::Admin)
    );
    let notices: Vec<(u64, MemberRole)> = list(&n.reader(1), B)[len..]
        .iter()
        .map(|m| match event(m) {
            Event::MemberChanged(e) => (e.user_id, e.role()),
            e => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(notices, vec![(A, MemberRole::Admin), (C, MemberRole::Owner)]);
    // The old owner has lost its powers, the new one has them.
    let dissolve = |by| op(O::DissolveGroup(store::DissolveGroup { group_id: 9, by_user_id: by }));
    assert_eq!(code(&n.apply1(1, dissolve(A)).await), ErrorCode::ErrorPermissionDenied);
    assert_eq!(
        code(&n.apply1(1, set_member(9, C, C, MemberRole::Member, None)).await),
        ErrorCode::ErrorPermissionDenied,
        "the owner cannot demote itself"
    );
    assert_eq!(code(&n.apply1(1, set_member(9, C, A, MemberRole::Member, None)).await), ErrorCode::Ok);
    assert_eq!(role(&n, A), MemberRole::Member);
    assert_eq!(code(&n.apply1(1, dissolve(C)).await), ErrorCode::Ok);
}

#[tokio::test]
async fn tails_are_newest_first_and_stay_inside_their_list() {
    let mut n = Node::new(&[1]);
    // Users 100 and 102 sit on both sides of A (101) in key order.
    n.apply(1, vec![create_user(100), create_user(A), create_user(102)]).await;
    for i in 0..5 {
        n.apply1(1, send(A, 100, &format!("a{i}"), "x")).await;
    }
    let seqs = |v: Vec<Message>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
    let r = n.reader(1);
    assert_eq!(seqs(r.tail(UserId(A), 3).unwrap()), vec![5, 4, 3]);
    assert_eq!(seqs(r.tail(UserId(A), 100).unwrap()), vec![5, 4, 3, 2, 1]);
    assert!(
        r.tail(UserId(A), 100).unwrap().iter().all(|m| m.sender_user_id == A && m.conversation_id == 100)
    );
    assert!(r.tail(UserId(102), 10).unwrap().is_empty(), "an empty list does not see its neighbour");
    assert_eq!(r.tail(UserId(100), 10).unwrap().len(), 5);
    assert!(r.tail(UserId(A), 0).unwrap().is_empty());
    assert_eq!(r.user_message(UserId(A), Seq(2)).unwrap().unwrap().client_msg_id, "a1");
    assert!(r.user_message(UserId(A), Seq(6)).unwrap().is_none());

    n.apply1(1, create_group(8, GroupKind::Room, 0, &[])).await;
    n.apply1(1, create_group(9, GroupKind::Room, 0, &[])).await;
    for i in 0..4 {
        n.apply1(1, send_group(9, A, &format!("g{i}"), "x")).await;
    }
    let r = n.reader(1);
    assert_eq!(seqs(r.group_tail(GroupId(9), 2).unwrap()), vec![4, 3]);
    assert!(r.group_tail(GroupId(8), 5).unwrap().is_empty());
    assert_eq!(r.group_message(GroupId(9), Seq(1)).unwrap().unwrap().client_msg_id, "g0");
    assert!(r.group_message(GroupId(9), Seq(5)).unwrap().is_none());
}

/// Applies `o` twice (a client retry after an unknown outcome): both answer
/// Ok with the same record, and the retry writes and notifies nothing.
async fn twice(n: &mut Node, o: store::Op) -> OpResult {
    let first = n.apply1(1, o.clone()).await;
    assert_eq!(code(&first), ErrorCode::Ok, "{}", first.message);
    let before = n.reader(1).data_digest().unwrap();
    let again = n.apply1(1, o.clone()).await;
    assert_eq!(code(&again), ErrorCode::Ok, "retry of {o:?}: {}", again.message);
    assert_eq!(n.reader(1).data_digest().unwrap(), before, "the retry of {o:?} wrote something");
    again
}

#[tokio::test]
async fn retried_operations_answer_ok_and_change_nothing() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), create_user(C)]).await;
    // Friends: every action, retried.
    twice(&mut n, friend_op(A, B, FriendAction::Request)).await;
    twice(&mut n, friend_op(B, A, FriendAction::Accept)).await;
    assert_eq!(status(&n, 1, A, B), Some(FriendStatus::Accepted));
    twice(&mut n, friend_op(A, C, FriendAction::Request)).await;
    let r = twice(&mut n, friend_op(C, A, FriendAction::Reject)).await;
    assert!(r.value.is_none());
    assert_eq!(status(&n, 1, A, C), None);
    twice(&mut n, friend_op(A, B, FriendAction::Delete)).await;
    assert_eq!(status(&n, 1, B, A), None);

    // Groups: an update, a role and a nickname change, dissolving.
    n.apply1(1, create_group(9, GroupKind::Small, A, &[B, C])).await;
    let update = op(O::UpdateGroup(store::UpdateGroup {
        group_id: 9,
        by_user_id: A,
        name: Some("renamed".into()),
        ..Default::default()
    }));
    twice(&mut n, update).await;
    twice(&mut n, set_member(9, A, B, MemberRole::Admin, None)).await;
    twice(&mut n, set_member(9, B, B, MemberRole::Unspecified, Some("bee"))).await;
    let dissolve = |by| op(O::DissolveGroup(store::DissolveGroup { group_id: 9, by_user_id: by }));
    twice(&mut n, dissolve(A)).await;
    assert_eq!(
        code(&n.apply1(1, dissolve(B)).await),
        ErrorCode::ErrorGroupNotFound,
        "only the owner's retry"
    );
}

#[tokio::test]
async fn an_orphaned_account_claim_is_taken_over_only_when_old_and_unchanged() {
    let mut n = Node::new(&[1]);
    let claim = |user_id: u64, replaces_user_id: u64| {
        op(O::ClaimAccount(store::ClaimAccount { name: "u:orphan".into(), user_id, replaces_user_id }))
    };
    let window = Limits::default().orphan_claim_ms;
    assert_eq!(at(&mut n, 1, T0, claim(A, 0)).await.code, 0);
    // Taken, and too young to take over.
    let r = at(&mut n, 1, T0 + 1, claim(B, 0)).await;
    assert_eq!(r.code, ErrorCode::ErrorAlreadyExists as i32);
    let r = at(&mut n, 1, T0 + window - 1, claim(B, A)).await;
    assert_eq!(r.code, ErrorCode::ErrorAlreadyExists as i32, "a registration may still be creating A");
    // Old enough, but naming another owner: refused.
    let r = at(&mut n, 1, T0 + window, claim(B, C)).await;
    assert_eq!(r.code, ErrorCode::ErrorAlreadyExists as i32);
    assert_eq!(n.reader(1).account("u:orphan").unwrap(), Some(UserId(A)));
    // Old enough and still A's: taken over, and the new claim is young again.
    assert_eq!(at(&mut n, 1, T0 + window, claim(B, A)).await.code, 0);
    assert_eq!(n.reader(1).account("u:orphan").unwrap(), Some(UserId(B)));
    let r = at(&mut n, 1, T0 + window + 1, claim(C, B)).await;
    assert_eq!(r.code, ErrorCode::ErrorAlreadyExists as i32);
    // Retrying the winning claim is fine.
    assert_eq!(at(&mut n, 1, T0 + window + 2, claim(B, A)).await.code, 0);
}
